"""The servicer's worker in the queued mode: sealed stays to Redis, job ids to Celery.

The server validates and stores; Celery workers (``epicrisis worker``) run the jobs. The
queue depth is bounded per priority: past ``max_queued`` waiting jobs, Submit answers
RESOURCE_EXHAUSTED instead of letting Redis grow without bound.

Each job is indexed as live before its message is sent (:func:`queue.mark_live`), so a
message that a dying worker took and lost is found and sent again; and if sending fails
(Redis or the broker away), the job is indexed all the same, so it is sent later instead of
waiting for ever under an idempotency key the caller will retry with. Redis or the broker
away a moment (a restart, a failover) is waited out for ``ENQUEUE_RETRY_SECONDS``: the job
record exists by then, and a Submit that failed here would leave it behind its idempotency
key, never queued (found by tests/test_faults.py: a retried Submit answered OK with a job
QUEUED for ever).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from kombu.exceptions import OperationalError
from redis.exceptions import RedisError

from epicrisis.serving.jobs import Accepted, JobRecord, QueueFull, cancelled
from epicrisis.serving.queue import drop_live, mark_live, submit, waiting_out
from epicrisis.serving.redis_store import RedisJobStore

ENQUEUE_RETRY_SECONDS = 15.0  # Redis or the broker away: how long a Submit waits for them
T = TypeVar("T")


class QueuedWorker:
    def __init__(self, store: RedisJobStore, app: Any, *, max_queued: int) -> None:
        self._store = store
        self._app = app
        self._max_queued = max_queued

    async def enqueue(self, job_id: str, accepted: Accepted) -> None:
        if await _patiently(lambda: self._store.queue_depth(accepted.priority)) >= self._max_queued:
            raise QueueFull(f"{self._max_queued} {accepted.priority} jobs are waiting; retry later")
        await _patiently(lambda: self._store.put_payload(job_id, accepted.stay, accepted.options))
        await _patiently(lambda: mark_live(self._store, job_id, accepted.priority))
        await _patiently(
            lambda: asyncio.to_thread(submit, self._app, job_id, priority=accepted.priority)
        )

    async def resume(self, job_id: str, accepted: Accepted) -> None:
        """A Submit replayed with its idempotency key found the job still QUEUED: if the first
        Submit lost Redis between saving the job and sending its message, the job would wait
        for ever. Store the payload again if it is missing and have the next reconcile round
        look for the message at once (it sends one only if none is waiting or held)."""
        if not await self._store.has_payload(job_id):
            await self._store.put_payload(job_id, accepted.stay, accepted.options)
        await mark_live(self._store, job_id, accepted.priority, seen=0.0)

    async def cancel(self, job_id: str) -> JobRecord:
        """Final at once; a worker never overwrites a final record, nor starts a cancelled
        job, and one running it stops (it watches the record)."""
        record = await self._store.update(job_id, cancelled)
        await drop_live(self._store, job_id)
        return record


async def _patiently(step: Callable[[], Awaitable[T]]) -> T:
    """``step``, repeated while Redis or the broker does not answer, for up to
    ``ENQUEUE_RETRY_SECONDS`` (then its error: UNAVAILABLE for the caller). Each step may
    be repeated: a payload written twice is the same, a second message for a job is skipped
    by the worker that gets it."""
    return await waiting_out(
        step,
        errors=(RedisError, OperationalError),
        seconds=ENQUEUE_RETRY_SECONDS,
        max_pause=1.0,
        what="queueing a job: Redis or the broker",
    )
