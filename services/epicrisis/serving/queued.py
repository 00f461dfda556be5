"""The servicer's worker in the queued mode: sealed stays to Redis, job ids to Celery.

The server validates and stores; Celery workers (``epicrisis worker``) run the jobs. The
queue depth is bounded per priority: past ``max_queued`` waiting jobs, Submit answers
RESOURCE_EXHAUSTED instead of letting Redis grow without bound.

Each job is indexed as live before its message is sent (:func:`queue.mark_live`), so a
message that a dying worker took and lost is found and sent again; and if sending fails
(Redis or the broker away), the job is indexed all the same, so it is sent later instead of
waiting for ever under an idempotency key the caller will retry with.
"""

from __future__ import annotations

import asyncio
from typing import Any

from epicrisis.serving.jobs import Accepted, JobRecord, QueueFull, cancelled
from epicrisis.serving.queue import drop_live, mark_live, submit
from epicrisis.serving.redis_store import RedisJobStore


class QueuedWorker:
    def __init__(self, store: RedisJobStore, app: Any, *, max_queued: int) -> None:
        self._store = store
        self._app = app
        self._max_queued = max_queued

    async def enqueue(self, job_id: str, accepted: Accepted) -> None:
        if await self._store.queue_depth(accepted.priority) >= self._max_queued:
            raise QueueFull(f"{self._max_queued} {accepted.priority} jobs are waiting; retry later")
        await self._store.put_payload(job_id, accepted.stay, accepted.options)
        await mark_live(self._store, job_id, accepted.priority)
        await asyncio.to_thread(submit, self._app, job_id, priority=accepted.priority)

    async def cancel(self, job_id: str) -> JobRecord:
        """Final at once; a worker never overwrites a final record, nor starts a cancelled
        job, and one running it stops (it watches the record)."""
        record = await self._store.update(job_id, cancelled)
        await drop_live(self._store, job_id)
        return record
