"""What the sync and the asyncio clients share: requests, the method table, the retry policy."""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from epicrisis.client.errors import ClientError
from epicrisis.v1 import summarizer_pb2 as pb

BackendName = Literal["extractive", "llm"]
PriorityName = Literal["interactive", "batch"]
RetryHook = Callable[[ClientError, float], None]
"""Called before each retry with the error and the seconds about to be slept (for logs)."""

DEFAULT_TIMEOUT = 60.0  # seconds per unary call (a large Bundle is validated within Submit)
DEFAULT_SUMMARIZE_TIMEOUT = 600.0
MAX_MESSAGE_BYTES = 65 * 1024 * 1024  # the server's 64 MB Bundle limit and the other fields

_BACKENDS: dict[str | None, pb.Backend] = {
    None: pb.BACKEND_UNSPECIFIED,
    "extractive": pb.BACKEND_EXTRACTIVE,
    "llm": pb.BACKEND_LLM,
}
_PRIORITIES: dict[str | None, pb.Priority] = {
    None: pb.PRIORITY_UNSPECIFIED,
    "interactive": pb.PRIORITY_INTERACTIVE,
    "batch": pb.PRIORITY_BATCH,
}
_SERVICE = pb.DESCRIPTOR.services_by_name["DischargeSummarizer"].full_name


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounded exponential backoff with jitter, used by ``submit`` with an idempotency key only.

    Only a keyed Submit is safe to repeat: the server returns the job of a known key instead
    of starting a second generation.
    """

    max_attempts: int = 5
    initial_backoff: float = 0.2
    max_backoff: float = 5.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.initial_backoff < 0 or self.multiplier < 1:
            raise ValueError("max_attempts >= 1, initial_backoff >= 0 and multiplier >= 1")

    def backoff(self, failures: int) -> float:
        """Seconds to wait after ``failures`` failed attempts: half fixed, half random."""
        ceiling = min(self.max_backoff, self.initial_backoff * self.multiplier ** (failures - 1))
        return ceiling / 2 + random.uniform(0, ceiling / 2)


NO_RETRY = RetryPolicy(max_attempts=1)


def submit_request(
    bundle: bytes,
    *,
    encounter_id: str | None,
    idempotency_key: str | None,
    backend: BackendName | None,
    priority: PriorityName | None,
    strict: bool,
    allow_emergency: bool,
    max_output_tokens: int | None,
) -> pb.SubmitRequest:
    if not isinstance(bundle, bytes | bytearray | memoryview):
        raise TypeError("bundle must be the FHIR JSON as bytes")
    if idempotency_key == "":
        raise ValueError("idempotency_key must not be empty (None means no key)")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of extractive, llm (not {backend!r})")
    if priority not in _PRIORITIES:
        raise ValueError(f"priority must be one of interactive, batch (not {priority!r})")
    options = pb.SummaryOptions(
        backend=_BACKENDS[backend],
        priority=_PRIORITIES[priority],
        strict=strict,
        allow_emergency=allow_emergency,
        max_output_tokens=max_output_tokens,
    )
    return pb.SubmitRequest(
        bundle=bytes(bundle),
        encounter_id=encounter_id,
        idempotency_key=idempotency_key,
        options=options,
    )


@dataclass(frozen=True, slots=True)
class Methods:
    """The service's callables on one channel (sync or grpc.aio: both have the same shape).

    Built here rather than with the generated stub, whose module is untyped.
    """

    submit: Any
    get: Any
    watch: Any
    summarize: Any
    cancel: Any

    @classmethod
    def bind(cls, channel: Any, *, api_key: str | None = None) -> Methods:
        """The methods on ``channel``, each call carrying ``api_key`` (as a bearer token)."""
        metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None

        def keyed(method: Any) -> Any:
            return method if metadata is None else functools.partial(method, metadata=metadata)

        def unary(name: str, request: Any) -> Any:
            return keyed(
                channel.unary_unary(
                    f"/{_SERVICE}/{name}",
                    request_serializer=request.SerializeToString,
                    response_deserializer=pb.Job.FromString,
                )
            )

        return cls(
            submit=unary("Submit", pb.SubmitRequest),
            get=unary("GetJob", pb.GetJobRequest),
            watch=keyed(
                channel.unary_stream(
                    f"/{_SERVICE}/WatchJob",
                    request_serializer=pb.WatchJobRequest.SerializeToString,
                    response_deserializer=pb.Job.FromString,
                )
            ),
            summarize=unary("Summarize", pb.SubmitRequest),
            cancel=unary("CancelJob", pb.CancelJobRequest),
        )


def channel_options(extra: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        *extra,
    ]
