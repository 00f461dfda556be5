"""Bounds on the fields of a gRPC request beside the Bundle, checked before any work.

The Bundle has its own limits (size, entries, nesting: :mod:`epicrisis.fhir.bundle`); the
other fields are bounded here, so that a caller cannot carry megabytes into a job record, a
Redis key or a log line through an encounter id, an idempotency key or a job id (the
transport alone would let any of them be as large as the Bundle limit). Every refusal is a
:class:`RequestFieldError` (an :class:`InputError`, so ``INVALID_ARGUMENT``) whose ``field``
names the request field and whose message names the limit, never the value.
"""

from __future__ import annotations

import re

from epicrisis.config import Limits, get_settings
from epicrisis.errors import InputError
from epicrisis.v1 import summarizer_pb2 as pb

_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]+")


class RequestFieldError(InputError):
    """A field of the request (not the Bundle) is out of bounds; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field} {message}")


def validate_submit(request: pb.SubmitRequest, limits: Limits | None = None) -> None:
    """Refuse a ``SubmitRequest`` whose fields beside the Bundle break a limit."""
    limits = limits or get_settings().limits
    if request.HasField("encounter_id"):
        _bounded("encounter_id", request.encounter_id, limits.max_encounter_id_chars)
    if request.HasField("idempotency_key"):
        key = request.idempotency_key
        if not key:
            raise RequestFieldError("idempotency_key", "is empty (leave it unset for no key)")
        _bounded("idempotency_key", key, limits.max_idempotency_key_chars)
        if not _VISIBLE_ASCII.fullmatch(key):
            raise RequestFieldError(
                "idempotency_key", "must be visible ASCII characters (no spaces or controls)"
            )
    options = request.options
    if options.HasField("max_output_tokens") and not (
        0 < options.max_output_tokens <= limits.max_output_tokens
    ):
        raise RequestFieldError(
            "options.max_output_tokens",
            f"must be between 1 and the limit of {limits.max_output_tokens:,}",
        )


def validate_job_id(job_id: str, limits: Limits | None = None) -> None:
    """Refuse a job id (GetJob, WatchJob, CancelJob) that no job can have: too long."""
    limits = limits or get_settings().limits
    if not job_id:
        raise RequestFieldError("id", "is empty; name the job")
    _bounded("id", job_id, limits.max_job_id_chars)


def _bounded(field: str, value: str, limit: int) -> None:
    if len(value) > limit:
        raise RequestFieldError(
            field, f"is {len(value):,} characters, over the limit of {limit:,} characters"
        )
