"""Jobs and where they live: one record per Submit, watched until it reaches a final state.

:class:`MemoryJobStore` serves the embedded mode (one process, no Redis); the queued mode's
Redis store keeps the same interface. Records carry no Bundle: only the summary and
PHI-free status, and they expire.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Literal

from epicrisis.errors import EpicrisisError
from epicrisis.observability import metrics
from epicrisis.serving.auth import ANONYMOUS
from epicrisis.stay import Stay
from epicrisis.summary.model import DischargeSummary

Priority = Literal["interactive", "batch"]


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


class JobNotFound(EpicrisisError):
    """No job with that id (never created, another caller's, or expired)."""


class IdempotencyConflict(EpicrisisError):
    """An idempotency key was reused with a different request."""


class QueueFull(EpicrisisError):
    """The queue holds as many jobs as it may; the caller should retry later."""


@dataclass(frozen=True, slots=True)
class JobFailure:
    code: str
    message: str
    retryable: bool


@dataclass(frozen=True, slots=True)
class JobRecord:
    id: str
    state: JobState
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    stage: str = "queued"
    fraction: float = 0.0
    summary: DischargeSummary | None = None
    fhir_document: str | None = None
    error: JobFailure | None = None
    owner: str = ANONYMOUS  # the caller that submitted it: no one else sees it

    @property
    def final(self) -> bool:
        return self.state in FINAL


@dataclass(frozen=True, slots=True)
class JobOptions:
    """What the worker needs besides the Bundle to run the same pipeline the server validated."""

    encounter_id: str | None = None
    strict: bool = False
    allow_emergency: bool = False
    backend: str | None = None  # "extractive" | "llm"; None: the worker's default
    max_output_tokens: int | None = None
    trace_context: dict[str, str] = field(default_factory=dict)  # W3C traceparent of Submit


@dataclass(frozen=True, slots=True)
class Accepted:
    """A validated request: the stay and how to summarize it."""

    stay: Stay
    options: JobOptions
    priority: Priority


# -- the transitions every worker applies (``store.update(job_id, transition)``) ----------


def started(record: JobRecord) -> JobRecord:
    return replace(
        record,
        state=JobState.RUNNING,
        started_at=record.started_at or time.time(),
        stage="summarizing",
        fraction=0.1,
    )


def succeeded(summary: DischargeSummary, document: str) -> Callable[[JobRecord], JobRecord]:
    return lambda record: replace(
        record,
        state=JobState.SUCCEEDED,
        finished_at=time.time(),
        stage="done",
        fraction=1.0,
        summary=summary,
        fhir_document=document,
    )


def failed(failure: JobFailure) -> Callable[[JobRecord], JobRecord]:
    return lambda record: replace(
        record, state=JobState.FAILED, finished_at=time.time(), error=failure
    )


def cancelled(record: JobRecord) -> JobRecord:
    return replace(record, state=JobState.CANCELLED, finished_at=time.time())


def observe_transition(before: JobRecord, after: JobRecord) -> None:
    """Count a change of state in the process that made it (so each is counted once): the
    wait in the queue at the first start, the job's end-to-end time when it turns final."""
    if after.started_at is not None and before.started_at is None:
        metrics.STAGE_DURATION.labels("queue_wait").observe(
            max(after.started_at - after.created_at, 0.0)
        )
    if after.final and not before.final:
        metrics.JOBS_FINISHED.labels(after.state.value).inc()
        finished = after.finished_at or time.time()
        metrics.STAGE_DURATION.labels("end_to_end").observe(max(finished - after.created_at, 0.0))


def fingerprint(*parts: bytes | str | None) -> str:
    """A digest of a request, to tell a replay of an idempotency key from a different request."""
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else (part or b"")
        digest.update(len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()


@dataclass
class _Slot:
    record: JobRecord
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    expires_at: float = 0.0


class MemoryJobStore:
    """Jobs in this process's memory, for the embedded mode; expired jobs are forgotten."""

    def __init__(self, *, ttl_seconds: float = 24 * 3600, max_jobs: int = 10_000) -> None:
        self._ttl = ttl_seconds
        self._max_jobs = max_jobs
        self._slots: dict[str, _Slot] = {}
        self._keys: dict[str, tuple[str, str]] = {}  # idempotency key -> (job id, fingerprint)

    async def create(
        self, *, idempotency_key: str | None, request_digest: str, owner: str = ANONYMOUS
    ) -> tuple[JobRecord, bool]:
        """A new QUEUED job, or the job of a known idempotency key (``created`` is then False)."""
        self._forget_expired()
        if idempotency_key is not None and idempotency_key in self._keys:
            job_id, digest = self._keys[idempotency_key]
            if digest != request_digest:
                raise IdempotencyConflict(
                    "idempotency key was already used for a different request"
                )
            if job_id in self._slots:
                return self._slots[job_id].record, False
        if len(self._slots) >= self._max_jobs:
            raise QueueFull(f"the server holds {self._max_jobs} jobs; retry later")
        record = JobRecord(
            id=uuid.uuid4().hex, state=JobState.QUEUED, created_at=time.time(), owner=owner
        )
        self._slots[record.id] = _Slot(record, expires_at=time.monotonic() + self._ttl)
        if idempotency_key is not None:
            self._keys[idempotency_key] = (record.id, request_digest)
        return record, True

    async def discard(self, job_id: str) -> None:
        """Forget a job that never started (its queue was full), and its idempotency key."""
        self._slots.pop(job_id, None)
        for key in [k for k, (j, _) in self._keys.items() if j == job_id]:
            del self._keys[key]

    async def get(self, job_id: str) -> JobRecord:
        slot = self._slots.get(job_id)
        if slot is None or slot.expires_at < time.monotonic():
            raise JobNotFound("no such job (it may have expired)")
        return slot.record

    async def update(self, job_id: str, change: Callable[[JobRecord], JobRecord]) -> JobRecord:
        """Apply ``change`` unless the job is already final (a cancelled job stays cancelled)."""
        slot = self._slots.get(job_id)
        if slot is None:
            raise JobNotFound("no such job (it may have expired)")
        if slot.record.final:
            return slot.record
        async with slot.changed:
            before, slot.record = slot.record, change(slot.record)
            slot.changed.notify_all()
        observe_transition(before, slot.record)
        return slot.record

    async def watch(self, job_id: str) -> AsyncIterator[JobRecord]:
        """The job now, then after each change, ending with its final state."""
        slot = self._slots.get(job_id)
        if slot is None:
            raise JobNotFound("no such job (it may have expired)")
        seen = slot.record
        yield seen
        while not seen.final:
            async with slot.changed:
                while slot.record is seen:
                    await slot.changed.wait()
                seen = slot.record
            yield seen

    def _forget_expired(self) -> None:
        now = time.monotonic()
        for job_id in [j for j, s in self._slots.items() if s.expires_at < now and s.record.final]:
            del self._slots[job_id]
        live = set(self._slots)
        for key in [k for k, (j, _) in self._keys.items() if j not in live]:
            del self._keys[key]
