"""The one place where errors become gRPC status codes (with google.rpc details).

Bad input is INVALID_ARGUMENT with a ``google.rpc.BadRequest`` whose field violation names
the Bundle entry and JSON path; the rest map to the code a client can act on. Unexpected
exceptions become INTERNAL with a fixed text: no exception message (which could carry
input) ever reaches a caller.
"""

from __future__ import annotations

import logging

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from kombu.exceptions import OperationalError
from redis.exceptions import RedisError

from epicrisis.errors import ConfigurationError, EpicrisisError, InputError
from epicrisis.serving.jobs import IdempotencyConflict, JobNotFound, QueueFull

log = logging.getLogger(__name__)


def status_for(exc: BaseException) -> grpc.Status:
    """The status to answer ``exc`` with."""
    if isinstance(exc, InputError):
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=getattr(exc, "field", None)  # serving.requests: a field beside the Bundle
            or (f"bundle.{exc.location.path}" if exc.location.path else "bundle"),
            description=str(exc),
        )
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
        return _status(code_pb2.INVALID_ARGUMENT, f"invalid input: {exc}", [detail])
    if isinstance(exc, JobNotFound):
        return _status(code_pb2.NOT_FOUND, str(exc))
    if isinstance(exc, QueueFull):
        return _status(code_pb2.RESOURCE_EXHAUSTED, str(exc))
    if isinstance(exc, IdempotencyConflict):
        return _status(code_pb2.ALREADY_EXISTS, str(exc))
    if isinstance(exc, ConfigurationError):
        return _status(code_pb2.FAILED_PRECONDITION, str(exc))
    if isinstance(exc, EpicrisisError) and getattr(exc, "retryable", False):
        return _status(code_pb2.UNAVAILABLE, str(exc))
    if isinstance(exc, EpicrisisError):
        return _status(code_pb2.INTERNAL, str(exc))
    if isinstance(exc, RedisError | OperationalError):  # job store or broker away or swamped
        log.warning("the job store or queue did not answer (%s)", type(exc).__name__)
        return _status(code_pb2.UNAVAILABLE, "the job store is not answering; retry later")
    log.error("internal error in an RPC (%s)", type(exc).__name__)
    return _status(code_pb2.INTERNAL, "internal error; please report it")


def grpc_status_name(status: grpc.Status) -> str:
    """``INVALID_ARGUMENT`` and so on: the code of a status from :func:`status_for`."""
    return str(status.code.name)


def _status(code: int, message: str, details: list[any_pb2.Any] | None = None) -> grpc.Status:
    return rpc_status.to_status(
        status_pb2.Status(code=code, message=message, details=details or [])
    )
