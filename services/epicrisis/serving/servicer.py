"""The DischargeSummarizer service: validate now, queue the work, report the job.

Dependencies come through the constructor (a job store and a worker), so the embedded and
the queued modes share this code. Every method goes through :func:`_unary` or
:func:`_streaming`, which turn errors into status codes in one place (:mod:`status`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, Protocol, TypeVar

import grpc

from epicrisis.config import Limits, get_settings
from epicrisis.observability import metrics
from epicrisis.observability.logs import JOB_ID
from epicrisis.observability.tracing import carrier, tracer
from epicrisis.serving.audit import Auditor
from epicrisis.serving.auth import current_caller
from epicrisis.serving.convert import job_message
from epicrisis.serving.ingest import StayLoader
from epicrisis.serving.jobs import (
    Accepted,
    JobNotFound,
    JobOptions,
    JobRecord,
    JobState,
    QueueFull,
    fingerprint,
)
from epicrisis.serving.requests import validate_job_id, validate_submit
from epicrisis.serving.status import grpc_status_name, status_for
from epicrisis.v1 import summarizer_pb2 as pb
from epicrisis.v1 import summarizer_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)  # ids and outcomes only, never request content
BACKENDS = {pb.BACKEND_EXTRACTIVE: "extractive", pb.BACKEND_LLM: "llm"}
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DischargeSummarizer"].full_name
DEADLINE_MARGIN_SECONDS = 0.05  # answer DEADLINE_EXCEEDED ourselves, before the transport does


@dataclasses.dataclass(slots=True)
class _Event:
    """What a call's audit event names, filled in as the call learns it."""

    job_id: str | None = None
    patient: str | None = None  # a reference; the auditor hashes it
    state: str | None = None  # the job's state when it was read


def _read(event: _Event, record: JobRecord) -> JobRecord:
    """Note a job read for the audit: which job, whose, in what state."""
    event.job_id = record.id
    event.state = record.state.value
    if record.summary is not None:
        event.patient = record.summary.patient.reference
    return record


Request = TypeVar("Request")
Response = TypeVar("Response")


class Worker(Protocol):
    """What the servicer needs of a worker: a queue (that may be full) and cancellation."""

    async def enqueue(self, job_id: str, accepted: Accepted) -> None: ...

    async def resume(self, job_id: str, accepted: Accepted) -> None: ...

    async def cancel(self, job_id: str) -> JobRecord: ...


class JobStore(Protocol):
    """The job records: in memory (embedded) or in Redis (queued)."""

    async def create(
        self, *, idempotency_key: str | None, request_digest: str, owner: str
    ) -> tuple[JobRecord, bool]: ...

    async def get(self, job_id: str) -> JobRecord: ...

    def watch(self, job_id: str) -> AsyncIterator[JobRecord]: ...

    async def discard(self, job_id: str) -> None: ...


def _unary(
    method: Callable[[Any, Request, grpc.aio.ServicerContext], Awaitable[Response]],
) -> Callable[[Any, Request, grpc.aio.ServicerContext], Awaitable[Response]]:
    @functools.wraps(method)
    async def guarded(self: Any, request: Request, context: grpc.aio.ServicerContext) -> Response:
        try:
            return await method(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await context.abort_with_status(status_for(exc))
            raise  # abort_with_status raises; this line is never reached

    return guarded


def _streaming(
    method: Callable[[Any, Request, grpc.aio.ServicerContext], AsyncIterator[Response]],
) -> Callable[[Any, Request, grpc.aio.ServicerContext], AsyncIterator[Response]]:
    @functools.wraps(method)
    async def guarded(
        self: Any, request: Request, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Response]:
        try:
            async for item in method(self, request, context):
                yield item
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await context.abort_with_status(status_for(exc))

    return guarded


class DischargeSummarizer(pb_grpc.DischargeSummarizerServicer):
    """The service. A caller sees only its own jobs: another caller's job id is NOT_FOUND,
    exactly as an unknown one, and idempotency keys are scoped to their caller."""

    def __init__(
        self,
        store: JobStore,
        worker: Worker,
        auditor: Auditor,
        loader: StayLoader,
        limits: Limits | None = None,
    ) -> None:
        self._store = store
        self._limits = limits or get_settings().limits
        self._worker = worker
        self.auditor = auditor
        self._loader = loader
        self.keep_jobs_of_cut_calls = False  # set while a queued server drains

    @_unary
    async def Submit(self, request: pb.SubmitRequest, context: grpc.aio.ServicerContext) -> pb.Job:
        with self._audited("submit", "Submit") as event:
            record = await self._accept(request, event)
            return job_message(record)

    @_unary
    async def GetJob(self, request: pb.GetJobRequest, context: grpc.aio.ServicerContext) -> pb.Job:
        with self._audited("read", "GetJob") as event:
            return job_message(_read(event, await self._owned(request.id)))

    @_streaming
    async def WatchJob(
        self, request: pb.WatchJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Job]:
        with self._audited("read", "WatchJob") as event:
            await self._owned(request.id)
            async for record in self._store.watch(request.id):
                yield job_message(_read(event, record))

    @_unary
    async def Summarize(
        self, request: pb.SubmitRequest, context: grpc.aio.ServicerContext
    ) -> pb.Job:
        with self._audited("summarize", "Summarize") as event:
            return await self._summarize(request, context, event)

    async def _summarize(
        self, request: pb.SubmitRequest, context: grpc.aio.ServicerContext, event: _Event
    ) -> pb.Job:
        record = await self._accept(request, event)
        remaining = context.time_remaining()
        budget = None if remaining is None else max(remaining - DEADLINE_MARGIN_SECONDS, 0.0)
        try:
            async with asyncio.timeout(budget):  # not wait_for: it can lose a cancel on 3.11
                final = await self._final(record.id)
        except TimeoutError:
            await self._worker.cancel(record.id)  # nobody waits for it any more
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"job {record.id} did not finish before the deadline and was cancelled",
            )
        except asyncio.CancelledError:
            if not self.keep_jobs_of_cut_calls:
                await self._worker.cancel(record.id)  # the caller went away
            raise
        return job_message(_read(event, final))

    @_unary
    async def CancelJob(
        self, request: pb.CancelJobRequest, context: grpc.aio.ServicerContext
    ) -> pb.Job:
        with self._audited("cancel", "CancelJob") as event:
            await self._owned(request.id)
            event.job_id = request.id
            return job_message(await self._worker.cancel(request.id))

    async def _owned(self, job_id: str) -> JobRecord:
        """The caller's own job; another caller's is as unknown as a job that never was."""
        # An id no job can have (too long) is refused before a lookup.
        validate_job_id(job_id, self._limits)
        record = await self._store.get(job_id)
        if record.owner != current_caller().id:
            raise JobNotFound("no such job (it may have expired)")
        return record

    @contextlib.contextmanager
    def _audited(self, action: str, method: str) -> Iterator[_Event]:
        """One audit event for the call, with its outcome (the status code it ends with)."""
        event = _Event()
        outcome = "OK"
        caller = current_caller().id  # now: a stream may be closed from another context
        try:
            yield event
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "CANCELLED"
            raise
        except grpc.aio.AbortError:
            outcome = "ABORTED"  # the call's own status (e.g. DEADLINE_EXCEEDED) is in its span
            raise
        except Exception as exc:
            outcome = grpc_status_name(status_for(exc))
            raise
        finally:
            self.auditor.event(
                action,
                caller=caller,
                method=method,
                outcome=outcome if event.state is None else f"{outcome} ({event.state})",
                job_id=event.job_id,
                patient=event.patient,
            )

    async def _accept(self, request: pb.SubmitRequest, event: _Event) -> JobRecord:
        """Validate the Bundle (bad input fails the RPC), then create and queue the job."""
        validate_submit(
            request, self._limits
        )  # the fields beside the Bundle: lengths, key charset, tokens
        options = request.options
        encounter_id = request.encounter_id if request.HasField("encounter_id") else None
        clock = time.perf_counter()
        with tracer.start_as_current_span("epicrisis.ingest"):
            stay = await self._loader.load(
                request.bundle,
                encounter_id=encounter_id,
                strict=options.strict,
                allow_emergency=options.allow_emergency,
            )
        metrics.STAGE_DURATION.labels("ingest").observe(time.perf_counter() - clock)
        event.patient = stay.patient.ref
        digest = fingerprint(
            request.bundle, encounter_id, options.SerializeToString(deterministic=True)
        )
        caller = current_caller().id
        key = (
            f"{caller}\x00{request.idempotency_key}"  # one caller's key never finds another's job
            if request.HasField("idempotency_key")
            else None
        )
        accepted = Accepted(
            stay,
            JobOptions(
                encounter_id=encounter_id,
                strict=options.strict,
                allow_emergency=options.allow_emergency,
                backend=BACKENDS.get(options.backend),
                max_output_tokens=(
                    options.max_output_tokens if options.HasField("max_output_tokens") else None
                ),
                trace_context=carrier(),
            ),
            "batch" if options.priority == pb.PRIORITY_BATCH else "interactive",
        )
        record, created = await self._store.create(
            idempotency_key=key, request_digest=digest, owner=caller
        )
        event.job_id = record.id
        if created:
            try:
                await self._worker.enqueue(record.id, accepted)
            except QueueFull:
                await self._store.discard(record.id)  # a retry with the same key starts afresh
                raise
            metrics.JOBS_SUBMITTED.labels(accepted.priority).inc()
            metrics.record_warnings(w.code for w in stay.warnings)
            JOB_ID.set(record.id)  # the rest of this call's log records name the job
            log.info("job accepted (%s)", accepted.priority)
        elif record.state is JobState.QUEUED:  # a replay: make sure the first one got queued
            await self._worker.resume(record.id, accepted)
        return record

    async def _final(self, job_id: str) -> JobRecord:
        """The job's final record (the caller just created it: no ownership check)."""
        async for record in self._store.watch(job_id):
            if record.final:
                return record
        raise AssertionError("a watch ends with a final state")
