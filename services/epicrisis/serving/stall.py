"""A worker whose Celery consumer has stopped taking messages leaves, to be started afresh.

Celery's consumer on the Redis transport can stop fetching after reconnections in quick
succession (celery/celery#8030, #9054, #10205): the process and its heartbeat live on,
messages wait in the queue, and nothing takes them. A healthy worker with a free slot
takes a waiting message within one poll. So when this one has had a free slot, a message
has been waiting and no delivery has reached it, on end for ``EPICRISIS_WORKER_STALL_SECONDS``
(Redis answering throughout), it says so and asks Celery for a warm shutdown (jobs it is
running finish), and its supervisor (Kubernetes, Compose's ``restart``) starts it again
with a new consumer. If even the shutdown hangs, the process exits after the job timeout.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from redis.exceptions import RedisError

from epicrisis.serving.redis_store import RedisJobStore

log = logging.getLogger(__name__)
# A message that has waited this long with a free slot and no delivery was not merely
# between two polls of a healthy consumer.
POLL_GRACE_SECONDS = 5.0
SHUTDOWN_MARGIN_SECONDS = 30.0  # beyond the job timeout, for a warm shutdown to end
STALL_EXIT_CODE = 75  # EX_TEMPFAIL: the supervisor should start the worker again


@dataclass
class StallWatch:
    """The rule, apart from the clocks and Redis it reads. Times are monotonic seconds."""

    after: float  # how long the signs must hold on end
    last_delivery: float  # when this worker last took a message (or started)
    _since: float | None = None  # when the signs were first seen, this spell
    _stopped: bool = False

    def delivered(self, now: float) -> None:
        self.last_delivery = now

    def stop(self) -> None:
        """No stall from now on: the worker is shutting down and has stopped consuming."""
        self._stopped = True

    def stalled(self, now: float, *, free_slot: bool, oldest_wait: float | None) -> bool:
        """Whether the consumer has looked stalled for ``after`` seconds on end.

        ``oldest_wait``: how long the oldest waiting message has waited; None when Redis
        did not answer, which ends the spell (the consumer may be reconnecting)."""
        signs = (
            not self._stopped
            and free_slot
            and oldest_wait is not None
            and oldest_wait >= POLL_GRACE_SECONDS
            and now - self.last_delivery >= POLL_GRACE_SECONDS
        )
        if not signs:
            self._since = None
            return False
        if self._since is None:
            self._since = now
        return now - self._since >= self.after


async def watch_consumer(
    store: RedisJobStore,
    queues: tuple[str, ...],
    watch: StallWatch,
    free_slot: Callable[[], bool],
    *,
    interval: float,
    shutdown_grace: float,
) -> None:
    """Check every ``interval`` seconds until cancelled; on a stall, leave (once)."""
    while True:
        await asyncio.sleep(interval)
        try:
            oldest: float | None = max([await store.queue_oldest_age(q) for q in queues])
        except (RedisError, OSError):
            oldest = None
        if watch.stalled(time.monotonic(), free_slot=free_slot(), oldest_wait=oldest):
            log.error(
                "this worker took no job for %.0f s while it had a free slot and a job had "
                "waited %.0f s in its queues: its consumer has stalled; shutting down to be "
                "started again",
                time.monotonic() - watch.last_delivery,
                oldest or 0.0,
            )
            leave(shutdown_grace)
            return


def leave(grace: float) -> None:
    """Ask Celery for a warm shutdown (SIGTERM, as Kubernetes would); exit outright if the
    process is still here ``grace`` seconds later."""
    timer = threading.Timer(grace, os._exit, args=(STALL_EXIT_CODE,))
    timer.daemon = True
    timer.start()
    os.kill(os.getpid(), signal.SIGTERM)
