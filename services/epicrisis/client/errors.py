"""gRPC status codes as a small exception tree a caller can act on.

    ClientError            base (an EpicrisisError): ``status`` names the gRPC code
    ├── InvalidBundle      INVALID_ARGUMENT: the Bundle is refused; ``violations`` says where
    ├── JobNotFound        NOT_FOUND: no such job (never created, or expired)
    ├── Overloaded         RESOURCE_EXHAUSTED, UNAVAILABLE: try again later (``retryable``)
    └── DeadlineExceeded   DEADLINE_EXCEEDED: the call ran out of time (``job_id`` when known)

Messages are the server's, which never carry clinical content, or gRPC's own transport text.
"""

from __future__ import annotations

import re

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from epicrisis.errors import EpicrisisError


class ClientError(EpicrisisError):
    """A call to the Epicrisis server failed; ``retryable`` says if the same call may succeed."""

    default_retryable = False

    def __init__(
        self, message: str, *, status: str | None = None, retryable: bool | None = None
    ) -> None:
        super().__init__(message)
        self.status = status  # the gRPC status code's name, e.g. "INVALID_ARGUMENT"
        self.retryable = self.default_retryable if retryable is None else retryable


class InvalidBundle(ClientError):
    """The server refused the Bundle; ``violations`` lists (field, description) pairs."""

    def __init__(
        self, message: str, *, status: str | None = None, violations: list[tuple[str, str]]
    ) -> None:
        super().__init__(message, status=status)
        self.violations = violations


class JobNotFound(ClientError):
    """No job with that id: never created, another server's, or expired."""

    def __init__(self, message: str, *, status: str | None = None, job_id: str | None) -> None:
        super().__init__(message, status=status)
        self.job_id = job_id


class Overloaded(ClientError):
    """The server (or the way to it) cannot take the call now; the same call may succeed later."""

    default_retryable = True


class DeadlineExceeded(ClientError):
    """The call's deadline passed; a Summarize names the job, which the server then cancelled."""

    def __init__(self, message: str, *, status: str | None = None, job_id: str | None) -> None:
        super().__init__(message, status=status)
        self.job_id = job_id


_DEADLINE_JOB = re.compile(r"\bjob (\S+) did not finish")


def error_from_rpc(error: grpc.RpcError, *, job_id: str | None = None) -> ClientError:
    """The :class:`ClientError` for a failed call; ``job_id`` is the job the call named."""
    code = error.code()
    name = code.name if code is not None else "UNKNOWN"
    message = " ".join((error.details() or name).split())  # always one line
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidBundle(message, status=name, violations=_violations(error))
    if code == grpc.StatusCode.NOT_FOUND:
        return JobNotFound(message, status=name, job_id=job_id)
    if code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
        return Overloaded(message, status=name)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        named = _DEADLINE_JOB.search(message)
        return DeadlineExceeded(message, status=name, job_id=named[1] if named else job_id)
    return ClientError(message, status=name)


def _violations(error: grpc.RpcError) -> list[tuple[str, str]]:
    """The google.rpc.BadRequest field violations in the call's trailing status, if any."""
    try:
        status = rpc_status.from_call(error)
    except (ValueError, AttributeError):  # a status that contradicts the call, or none at all
        return []
    if status is None:
        return []
    violations: list[tuple[str, str]] = []
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            violations.extend((v.field, v.description) for v in bad_request.field_violations)
    return violations
