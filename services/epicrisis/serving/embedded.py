"""The embedded worker: jobs run in the server's own process, for a laptop or a small site.

The same pipeline functions as the CLI and the Celery worker; CPU-bound steps run in
threads so the event loop keeps serving RPCs. At most ``concurrency`` jobs run at once and
at most ``max_queued`` wait; beyond that Submit answers RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import logging
import time

from epicrisis import __version__
from epicrisis.errors import EpicrisisError, InputError
from epicrisis.observability import metrics
from epicrisis.observability.tracing import job_span
from epicrisis.serving.backends import JobSummarizer
from epicrisis.serving.jobs import (
    Accepted,
    JobFailure,
    JobRecord,
    MemoryJobStore,
    QueueFull,
    cancelled,
    failed,
    started,
    succeeded,
)
from epicrisis.summary.render_fhir import render_fhir

log = logging.getLogger(__name__)
QUEUE_NAME = "embedded"  # the queue label of the in-process worker's one queue


class EmbeddedWorker:
    def __init__(
        self,
        store: MemoryJobStore,
        summarizer: JobSummarizer,
        *,
        concurrency: int = 2,
        max_queued: int = 1000,
    ) -> None:
        self._store = store
        self._summarizer = summarizer
        self._queue: asyncio.Queue[tuple[str, Accepted]] = asyncio.Queue(maxsize=max_queued)
        self._concurrency = concurrency
        self._consumers: list[asyncio.Task[None]] = []
        self._running: dict[str, asyncio.Task[None]] = {}
        self._waiting_since: dict[str, float] = {}  # job id -> when it was queued (monotonic)
        metrics.JOB_SLOTS.set(concurrency)

    def sample_queue(self) -> None:
        """Set the queue gauges (the server's watch loop calls this every few seconds)."""
        oldest = min(self._waiting_since.values(), default=None)
        metrics.QUEUE_DEPTH.labels(QUEUE_NAME).set(self._queue.qsize())
        age = 0.0 if oldest is None else time.monotonic() - oldest
        metrics.QUEUE_OLDEST_AGE.labels(QUEUE_NAME).set(age)

    async def start(self) -> None:
        self._consumers = [asyncio.create_task(self._consume()) for _ in range(self._concurrency)]

    async def stop(self) -> None:
        for task in self._consumers:
            task.cancel()
        await asyncio.gather(*self._consumers, return_exceptions=True)

    async def enqueue(self, job_id: str, accepted: Accepted) -> None:
        try:
            self._queue.put_nowait((job_id, accepted))
            self._waiting_since[job_id] = time.monotonic()
        except asyncio.QueueFull:
            raise QueueFull(f"{self._queue.maxsize} jobs are waiting; retry later") from None

    async def resume(self, job_id: str, accepted: Accepted) -> None:
        """Nothing to do: a QUEUED job of this process is in its queue (nothing is lost
        between saving a job and queueing it without a network in between)."""

    async def cancel(self, job_id: str) -> JobRecord:
        record = await self._store.update(job_id, cancelled)
        task = self._running.get(job_id)
        if task is not None:
            task.cancel()
        return record

    async def _consume(self) -> None:
        while True:
            job_id, accepted = await self._queue.get()
            self._waiting_since.pop(job_id, None)
            try:
                record = await self._store.get(job_id)
                if not record.final:  # cancelled while it waited
                    task = asyncio.create_task(self._run(job_id, accepted))
                    self._running[job_id] = task
                    await asyncio.gather(task, return_exceptions=True)
            finally:
                self._running.pop(job_id, None)
                self._queue.task_done()

    async def _run(self, job_id: str, accepted: Accepted) -> None:
        await self._store.update(job_id, started)
        metrics.JOBS_RUNNING.inc()
        try:
            with job_span(job_id, accepted.options.trace_context):
                summary = await self._summarizer(accepted.stay, accepted.options)
                document = await asyncio.to_thread(render_fhir, summary, version=__version__)
        except asyncio.CancelledError:
            return  # CancelJob already recorded the final state
        except EpicrisisError as exc:
            await self._fail(job_id, job_failure(exc))
            return
        except Exception as exc:  # a bug: record it without input content, keep serving
            log.error("job %s failed with an internal error (%s)", job_id, type(exc).__name__)
            await self._fail(
                job_id, JobFailure("internal", "internal error; please report it", True)
            )
            return
        finally:
            metrics.JOBS_RUNNING.dec()
        await self._store.update(job_id, succeeded(summary, document))

    async def _fail(self, job_id: str, failure: JobFailure) -> None:
        await self._store.update(
            job_id,
            failed(failure),
        )


def job_failure(exc: EpicrisisError) -> JobFailure:
    """How a failed job explains itself to the caller (the message is PHI-free)."""
    if isinstance(exc, InputError):
        return JobFailure("invalid-input", str(exc), False)
    retryable = bool(getattr(exc, "retryable", False))
    code = "backend-unavailable" if retryable else "failed"
    return JobFailure(code, str(exc), retryable)
