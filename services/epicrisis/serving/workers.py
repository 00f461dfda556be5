"""Which workers are alive and can reach a model: the heartbeat each worker process writes to
Redis, and the rule the server's health check applies to it.

The server cannot see Celery workers (and, behind a NetworkPolicy, cannot reach the model
servers), so each worker process reports every ``interval`` seconds: when, whether some LLM
endpoint answered ``/health`` just now, how many jobs it runs and how many it may. A report
older than three intervals is a dead worker. Reports name a process (host and pid), never a
job or a patient.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Literal, Protocol

log = logging.getLogger(__name__)

LlmState = Literal["ready", "down", "none"]  # none: the worker has no LLM configured
STALE_INTERVALS = 3  # reports missed before a worker counts as gone


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    """One worker process's last report."""

    worker_id: str
    at: float  # wall-clock time of the report (seconds since the epoch)
    llm: LlmState
    running: int  # jobs in this process now
    slots: int  # jobs it takes at once (Celery's concurrency)
    interval: float  # seconds between reports

    def fresh(self, now: float | None = None) -> bool:
        """Whether the worker reported within its last few intervals."""
        age = (time.time() if now is None else now) - self.at
        return age <= self.interval * STALE_INTERVALS


class WorkerRegistry(Protocol):
    """Where reports go (:class:`~epicrisis.serving.redis_store.RedisJobStore`)."""

    async def report_worker(self, status: WorkerStatus) -> None: ...
    async def forget_worker(self, worker_id: str) -> None: ...


def this_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def ready(reports: Iterable[WorkerStatus]) -> bool:
    """SERVING: some worker is alive and can reach a model (or needs none)."""
    return any(report.fresh() and report.llm != "down" for report in reports)


async def heartbeat(
    registry: WorkerRegistry, status: Callable[[], Awaitable[WorkerStatus]]
) -> None:
    """Report ``status()`` every ``interval`` it names until cancelled, then withdraw it.

    A failed report (Redis away) is logged and retried at the next beat: the worker keeps
    running its jobs, and the server sees it as gone until a report lands again.
    """
    worker_id, interval = "", 1.0
    try:
        while True:
            try:
                report = await status()
                worker_id, interval = report.worker_id, report.interval
                await registry.report_worker(report)
            except Exception as exc:  # Redis or a probe failed: the next beat tries again
                log.warning("worker heartbeat failed (%s)", type(exc).__name__)
            await asyncio.sleep(interval)
    finally:
        if worker_id:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(registry.forget_worker(worker_id), 2.0)
