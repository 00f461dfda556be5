"""The queued mode's Celery app and its one task, ``run_job(job_id)``, on Redis.

The task is thin: the message carries only the job id (JSON), the stay the server validated
waits sealed in the job store, and the work is the same pipeline as the CLI and the embedded
worker from there on (a summarizer, ``render_fhir``): a Bundle is parsed and validated once.
The result lands in :class:`RedisJobStore`; Celery keeps no result (no result backend), and
the task's return value, an outcome word (``succeeded``, ``failed``, ``skipped`` ...), is
only logged.

Ordering: two queues, ``interactive`` and ``batch``; workers run with
``-Q interactive,batch`` and the Redis transport's ``queue_order_strategy="priority"``, so
every poll is ``BRPOP interactive batch``, which Redis answers from the first non-empty list
(the default, round robin, would rotate the order and serve batch work half of the time).
``worker_prefetch_multiplier=1`` keeps a worker from holding batch messages it has not
started while interactive ones arrive. Sustained interactive load starves batch: by design.

Delivery: ``acks_late`` and ``reject_on_worker_lost``, so a job whose worker dies is
delivered again; it is idempotent, since a job already final is skipped, and a delivery
counter fails a job that keeps killing its workers. ``visibility_timeout`` exceeds the
longest a message can stay unacknowledged (time limit + the longest retry countdown), so
Redis never hands a running job to a second worker; the workers sweep for messages of dead
workers every few seconds (kombu's default sweep is every 100 s). Exactly one delivery
writes a job's result: the store never changes a final record, and only the delivery whose
transition it applied reports ``succeeded`` (or ``failed``).

Redis away (a restart): a delivery waits for the job store for up to
``STORE_RETRY_SECONDS`` at each step, then puts its message back (``Reject(requeue)``)
instead of failing, so no job is lost or left RUNNING with an acknowledged message.

Lost messages: kombu's Redis transport takes a message with ``BRPOP`` and only then records
it as unacknowledged, so a worker killed between the two (a few milliseconds; longer on a
busy worker) loses the message for good. Every job not yet final is therefore indexed
(``{prefix}:live:{queue}``, by when it was last seen: queued, delivered), and each worker
in turn (:func:`reconcile`) queues again a job that has not been seen for the visibility
timeout and whose message is neither waiting in a queue nor held by a worker. A duplicate
is harmless: a job already final is skipped, and a running one stops the other delivery.

Cancellation: while a job runs, a watch on its record stops the pipeline as soon as the
job turns final elsewhere (CancelJob, a Summarize deadline): the model request is closed,
and the model server (TGI, the simulator) drops a sequence whose client has gone.

One loop per process: ``epicrisis worker`` runs Celery's threads pool, and every thread hands
its job to the process's single event loop (:class:`_JobLoop`), where all jobs share one
async :class:`RedisJobStore` (the server's store code) and one LLM endpoint pool. So the
worker's concurrency is the number of jobs it holds, and the pool keeps each endpoint's
``/info`` limit of generations in flight across all of them (:func:`worker_concurrency`
sizes it). The loop also sends the heartbeat the server's health check reads
(:mod:`epicrisis.serving.workers`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import replace
from typing import Any, Final, Literal, TypeVar

import orjson
import redis.asyncio as aioredis
from celery import Celery
from celery.concurrency import get_implementation
from celery.exceptions import Reject
from celery.signals import (
    setup_logging,
    worker_init,
    worker_ready,
    worker_shutdown,
    worker_shutting_down,
)
from kombu.entity import Exchange, Queue
from redis.exceptions import RedisError

from epicrisis import __version__
from epicrisis.config import Settings, get_settings
from epicrisis.errors import BackendError, ConfigurationError, EpicrisisError
from epicrisis.llm.client import EndpointDefaults
from epicrisis.llm.pool import HEALTH_PROBE_SECONDS, EndpointPool, failure_kind
from epicrisis.observability import metrics
from epicrisis.observability.logs import JOB_ID, configure_logging
from epicrisis.observability.tracing import configure_tracing, job_span, shutdown_tracing
from epicrisis.serving.backends import BackendChooser, JobSummarizer
from epicrisis.serving.crypto import Sealer
from epicrisis.serving.embedded import job_failure
from epicrisis.serving.jobs import (
    JobFailure,
    JobNotFound,
    JobRecord,
    failed,
    started,
    succeeded,
)
from epicrisis.serving.redis_store import ENQUEUED_AT_HEADER, RedisJobStore
from epicrisis.serving.stall import SHUTDOWN_MARGIN_SECONDS, StallWatch, watch_consumer
from epicrisis.serving.workers import LlmState, WorkerStatus, heartbeat, this_worker_id
from epicrisis.summary.model import DischargeSummary
from epicrisis.summary.render_fhir import render_fhir

log = logging.getLogger(__name__)

TASK_NAME = "epicrisis.run_job"
INTERACTIVE: Final = "interactive"
BATCH: Final = "batch"
QUEUES = (INTERACTIVE, BATCH)  # the order workers consume them in: -Q interactive,batch
Priority = Literal["interactive", "batch"]
_JOB_ID = re.compile(r"[0-9a-f]{32}")
EXTRA_DELIVERIES = 2  # deliveries beyond the retries: worker losses a job may survive
CAPACITY_WAIT_SECONDS = 15.0  # reading /info at worker start, before assuming defaults
ONE_PROCESS_POOLS = ("thread", "solo")  # Celery pools whose jobs share this process's loop
VISIBILITY_MARGIN_SECONDS = 120  # at most; never more than the job's own time limit
RESTORE_SWEEP_SECONDS = 10  # at most: how often a worker looks for dead workers' messages
RESTORE_MUTEX_SECONDS = 30  # a sweep takes milliseconds; one killed mid-sweep blocks no longer
STORE_RETRY_SECONDS = 30.0  # a delivery waits this long for Redis, then requeues its message
STOP_RETRY_SECONDS = 0.5  # how often a task that ignored its cancellation is cancelled again
REWATCH_SECONDS = 1.0  # after a cancellation watch lost Redis
RECONCILE_BATCH = 500  # suspect jobs looked at per round
RECONCILE_SCAN_LIMIT = 50_000  # waiting messages read at most per round (else: next round)
UNACKED_KEY = "unacked"  # kombu's hash of the messages workers hold (Channel.unacked_key)
T = TypeVar("T")


def visibility_timeout(settings: Settings) -> int:
    """Longer than a message may stay unacknowledged: a run (bounded by the pipeline's own
    timeout, which records FAILED), or a retry's countdown, with a margin for the store
    commands around the pipeline (the job's time limit or 120 s, whichever is shorter).

    A worker that dies leaves its messages unacknowledged this long: they are then
    delivered again (at the next sweep, :func:`restore_sweep_seconds`)."""
    margin = min(VISIBILITY_MARGIN_SECONDS, settings.job_timeout_seconds)
    return int(settings.job_timeout_seconds + settings.job_retry_backoff_max_seconds + margin)


def restore_sweep_seconds(settings: Settings) -> int:
    """How often each worker moves messages unacknowledged past the visibility timeout
    (their worker died) back to their queue: a tenth of the timeout, at most 10 s."""
    return max(1, min(RESTORE_SWEEP_SECONDS, visibility_timeout(settings) // 10))


class RetryLater(Exception):
    """A retryable backend failure; Celery retries the task with backoff (carries no PHI)."""


class StoreUnavailable(Exception):
    """Redis did not answer for ``STORE_RETRY_SECONDS``: the delivery's message goes back to
    its queue (or, if Redis cannot take even that, is restored after the visibility timeout)."""


class _JobLoop:
    """The one event loop of a worker process, in a daemon thread, with the process's store.

    Celery's threads hand each job to it and block until it is done, so every job of the
    process shares one Redis connection pool and one LLM endpoint pool: the endpoints'
    in-flight limits hold across the whole process, and a job waiting for a generation slot
    costs a coroutine, not a connection.
    """

    def __init__(self, store: RedisJobStore) -> None:
        self.store = store
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="epicrisis-jobs", daemon=True
        )
        self._thread.start()
        self._tasks: list[asyncio.Task[None]] = []

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        """Run ``work`` on the loop and wait for it; an exception raised into the waiting
        thread (Celery's soft time limit) cancels it."""
        future = asyncio.run_coroutine_threadsafe(work, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def start(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` in the background until :meth:`close`."""

        async def spawn() -> None:
            self._tasks.append(asyncio.create_task(work))

        self.run(spawn())

    def close(self, *closers: Callable[[], Awaitable[None]]) -> None:
        """Cancel the background work, await ``closers``, stop the loop."""

        async def wind_down() -> None:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)  # their finally blocks
            for close in closers:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(close(), 5.0)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(wind_down(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.loop.close()


class JobRunner:
    """Runs the jobs of one worker process on one event loop (:class:`_JobLoop`)."""

    def __init__(
        self,
        settings: Settings,
        summarizer: JobSummarizer | None = None,
        *,
        slots: int = 1,
    ) -> None:
        self.settings = settings
        self.slots = slots  # Celery's concurrency, for the heartbeat
        self._chooser: BackendChooser | None = None  # the deployment's backends (not in tests)
        if summarizer is None:
            summarizer = self._chooser = BackendChooser(settings)
        self.summarizer = summarizer
        self._sealer: Sealer | None = None
        self._job_loop: _JobLoop | None = None
        self._lock = threading.RLock()
        self._running = 0  # jobs on the loop now (touched only from the loop)
        self.stall_watch = StallWatch(settings.worker_stall_seconds, time.monotonic())
        self.app: Any = None  # the Celery app (create_app sets it): for reconcile()
        self.metrics_address: str | None = None  # where the worker serves /metrics

    def sealer(self) -> Sealer:
        """The keys, read once; a missing or malformed key stops the worker at start."""
        with self._lock:
            if self._sealer is None:
                self._sealer = Sealer.from_settings(self.settings)
            return self._sealer

    def run(self, job_id: str, *, retries: int, max_retries: int) -> str:
        """One delivery of ``run_job``: the outcome, or :class:`RetryLater`."""
        if not _JOB_ID.fullmatch(job_id):
            log.error("run_job refused a malformed job id")
            return "refused"
        jobs = self._loop()
        return jobs.run(self._execute(jobs.store, job_id, retries, max_retries))

    async def _execute(
        self, store: RedisJobStore, job_id: str, retries: int, max_retries: int
    ) -> str:
        self._running += 1
        self.stall_watch.delivered(time.monotonic())
        metrics.JOBS_RUNNING.inc()
        token = JOB_ID.set(job_id)
        try:
            outcome = await self._deliver(store, job_id, retries, max_retries)
            log.info("job %s", outcome)  # one line per delivery; the record names the job
            return outcome
        finally:
            JOB_ID.reset(token)
            metrics.JOBS_RUNNING.dec()
            self._running -= 1

    async def _deliver(
        self, store: RedisJobStore, job_id: str, retries: int, max_retries: int
    ) -> str:
        try:
            record = await _stored(lambda: store.get(job_id))
            if record.final:
                await _stored(lambda: drop_live(store, job_id))
                return "skipped"  # a redelivery of a finished or cancelled job
            runs = await _stored(lambda: store.count_run(job_id))
            await _stored(lambda: touch_live(store, job_id))
            if runs > max_retries + 1 + EXTRA_DELIVERIES:
                failure = JobFailure("worker-lost", "the job stopped its workers repeatedly", True)
                return await _fail(store, job_id, failure)
            record = await _stored(lambda: store.update(job_id, started))
            if record.final:
                return "skipped"  # cancelled meanwhile
        except JobNotFound:
            log.warning("job %s expired before it ran", job_id)
            return "expired"
        try:
            outcome = await self._unless_ended(store, job_id)
        except JobNotFound:
            log.warning("job %s expired before it ran", job_id)
            return "expired"
        except TimeoutError:
            failure = JobFailure("deadline-exceeded", "the job ran past its time limit", True)
            return await _fail(store, job_id, failure)
        except StoreUnavailable:
            raise
        except EpicrisisError as exc:
            if _retry_allowed(exc, retries, max_retries):
                metrics.JOB_RETRIES.labels(retry_reason(exc)).inc()
                await _stored(
                    lambda: store.update(job_id, lambda r: replace(r, stage="waiting to retry"))
                )
                raise RetryLater(f"retryable {type(exc).__name__}") from None
            return await _fail(store, job_id, job_failure(exc))
        except Exception as exc:  # a bug: record it without input content, keep serving
            log.error("job %s failed with an internal error (%s)", job_id, type(exc).__name__)
            failure = JobFailure("internal", "internal error; please report it", True)
            return await _fail(store, job_id, failure)
        if outcome is None:
            return "stopped"  # final elsewhere while it ran (cancelled): its generation dropped
        written = await _transition(store, job_id, succeeded(*outcome))
        return "succeeded" if written else "skipped"

    async def _unless_ended(
        self, store: RedisJobStore, job_id: str
    ) -> tuple[DischargeSummary, str] | None:
        """The pipeline within the job's time limit, stopped (None) as soon as the job turns
        final elsewhere (CancelJob, a Summarize deadline): cancelling it closes the model
        request, and TGI drops a sequence whose client has gone, freeing its slot."""
        work = asyncio.ensure_future(
            asyncio.wait_for(self._pipeline(store, job_id), self.settings.job_timeout_seconds)
        )
        ended = asyncio.ensure_future(_until_final(store, job_id))
        try:
            await asyncio.wait({work, ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (ended, work):
                task.cancel()  # both asked now, even if this delivery is itself cancelled
            await _stop(ended)
            await _stop(work)
        if work.cancelled():
            return None
        return work.result()  # the pipeline's answer, or its exception

    async def _pipeline(self, store: RedisJobStore, job_id: str) -> tuple[DischargeSummary, str]:
        """The stay the server validated, to summary and document (no second parse)."""
        stay, options = await _stored(lambda: store.take_payload(job_id))
        with job_span(job_id, options.trace_context):
            summary = await self.summarizer(stay, options)
            document = await asyncio.to_thread(render_fhir, summary, version=__version__)
        return summary, document

    def _loop(self) -> _JobLoop:
        """This process's loop, started at worker start (or on first use)."""
        with self._lock:
            if self._job_loop is None:
                store = RedisJobStore.from_url(
                    self.settings.redis_url,
                    self.sealer(),
                    ttl_seconds=self.settings.job_ttl_seconds,
                    prefix=self.settings.redis_key_prefix,
                )
                self._job_loop = _JobLoop(store)
                self._job_loop.start(heartbeat(store, self._status))
                if self.app is not None:
                    self._job_loop.start(reconcile(store, self.app, self.settings))
                    self._job_loop.start(
                        watch_consumer(
                            store,
                            QUEUES,
                            self.stall_watch,
                            lambda: self._running < self.slots,
                            interval=self.settings.worker_heartbeat_seconds,
                            shutdown_grace=self.settings.job_timeout_seconds
                            + SHUTDOWN_MARGIN_SECONDS,
                        )
                    )
            return self._job_loop

    def start(self) -> None:
        """Open the loop and start the heartbeat before the first job (worker start)."""
        self._loop()

    async def _status(self) -> WorkerStatus:
        interval = self.settings.worker_heartbeat_seconds
        llm: LlmState = "none"
        if self._chooser is not None:
            healthy = await self._chooser.llm_health(timeout=min(interval, HEALTH_PROBE_SECONDS))
            llm = "none" if healthy is None else "ready" if healthy else "down"
        return WorkerStatus(
            worker_id=this_worker_id(),
            at=time.time(),
            llm=llm,
            running=self._running,
            slots=self.slots,
            interval=interval,
        )

    def close(self) -> None:
        """Withdraw the heartbeat, close the pools and stop the loop (worker shutdown)."""
        with self._lock:
            jobs, self._job_loop = self._job_loop, None
        if jobs is None:
            return
        closers: list[Callable[[], Awaitable[None]]] = [jobs.store.aclose]
        if self._chooser is not None:
            closers.insert(0, self._chooser.aclose)
        jobs.close(*closers)


async def _fail(store: RedisJobStore, job_id: str, failure: JobFailure) -> str:
    return "failed" if await _transition(store, job_id, failed(failure)) else "skipped"


async def _transition(
    store: RedisJobStore, job_id: str, change: Callable[[JobRecord], JobRecord]
) -> bool:
    """Apply a final ``change``; whether this call made it (False: the job was final
    already, by a cancellation or another delivery). So each job reports its result once."""
    made: list[JobRecord] = []

    def apply(record: JobRecord) -> JobRecord:
        made.append(change(record))  # called again when the record changed under us
        return made[-1]

    record = await _stored(lambda: store.update(job_id, apply))
    if record.final:
        await _stored(lambda: drop_live(store, job_id))
    return bool(made) and record is made[-1]


async def waiting_out(
    step: Callable[[], Awaitable[T]],
    *,
    errors: tuple[type[Exception], ...],
    seconds: float,
    max_pause: float,
    what: str,
) -> T:
    """``step``, repeated with a doubling pause (0.1 s up to ``max_pause``) while it raises
    one of ``errors`` (Redis or the broker away: a restart, a failover), for up to
    ``seconds``; then that error. Only for steps that are safe to repeat."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    pause = 0.1
    while True:
        try:
            return await step()
        except errors as exc:
            if loop.time() + pause > deadline:
                raise
            log.warning("%s did not answer (%s); trying again", what, type(exc).__name__)
        await asyncio.sleep(pause)
        pause = min(pause * 2, max_pause)


async def _stored(command: Callable[[], Awaitable[T]]) -> T:
    """A job store command, repeated while Redis does not answer for up to
    ``STORE_RETRY_SECONDS``; then :class:`StoreUnavailable`. The commands are safe to
    repeat: reads, a delivery counter, and updates that never change a final job."""
    try:
        return await waiting_out(
            command,
            errors=(RedisError,),
            seconds=STORE_RETRY_SECONDS,
            max_pause=2.0,
            what="the job store",
        )
    except RedisError as exc:
        raise StoreUnavailable(f"the job store did not answer ({type(exc).__name__})") from None


async def _until_final(store: RedisJobStore, job_id: str) -> None:
    """Returns once the job is final (or gone). A watch that loses Redis is opened again:
    the job runs on meanwhile, since a lost watch must not stop work."""
    while True:
        try:
            async for record in store.watch(job_id):
                if record.final:
                    return
        except JobNotFound:
            return
        except (RedisError, OSError) as exc:
            log.warning("job %s: cancellation watch lost (%s)", job_id, type(exc).__name__)
        await asyncio.sleep(REWATCH_SECONDS)


async def _stop(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` and wait until it has ended.

    Cancelled again until it ends: on Python 3.11, ``asyncio.wait_for`` loses a
    cancellation that arrives just as the awaitable it wraps completes (CPython
    gh-86296, fixed in 3.12), and the job store's watch waits with it. Cancelled once, such
    a watch of a job that this very delivery was to finish went on watching, and the
    delivery waited for it for ever (the hang of the first attempt at this, 5f067be)."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=STOP_RETRY_SECONDS)
    if not task.cancelled():
        task.exception()  # retrieved: the caller reads the result it needs


def retry_reason(exc: EpicrisisError) -> str:
    """A metric label for a retried job: the backend failure's kind."""
    return failure_kind(exc) if isinstance(exc, BackendError) else "other"


def _retry_allowed(exc: EpicrisisError, retries: int, max_retries: int) -> bool:
    """Only retryable backend errors, within the task's and the error kind's own bound."""
    if not getattr(exc, "retryable", False):
        return False
    kind_bound: int | None = getattr(exc, "max_retries", None)
    bound = max_retries if kind_bound is None else min(max_retries, kind_bound)
    return retries < bound


def create_app(settings: Settings, runner: JobRunner | None = None) -> Any:
    """A Celery app on ``settings.redis_url`` with ``run_job`` registered (Celery is untyped)."""
    job_runner = runner or JobRunner(settings)
    # No result backend: a job's result is in the job store. Celery's results would only
    # add a key per job and, on the sending side, a pub/sub subscription per task that
    # nothing reads (the soak found the server's memory growing with them).
    app = Celery("epicrisis", broker=settings.redis_url)
    app.conf.update(
        task_serializer="json",
        task_ignore_result=True,
        accept_content=["json"],
        task_queues=[Queue(name, Exchange(name), routing_key=name) for name in QUEUES],
        task_default_queue=INTERACTIVE,
        task_default_exchange=INTERACTIVE,
        task_default_routing_key=INTERACTIVE,
        task_create_missing_queues=False,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={
            "visibility_timeout": visibility_timeout(settings),
            "queue_order_strategy": "priority",
            # Messages of a dead worker: swept every few seconds, each sweep a scan
            # (kombu scans only every tenth 10 s tick by default: 100 s), under a mutex
            # that a worker killed mid-sweep holds for seconds, not kombu's 5 minutes.
            "unacked_restore_interval": restore_sweep_seconds(settings),
            "unacked_restore_throttle": 1,
            "unacked_mutex_expire": RESTORE_MUTEX_SECONDS,
        },
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    app.epicrisis_runner = job_runner
    job_runner.app = app

    def run_job(task: Any, job_id: str) -> str:
        try:
            return job_runner.run(
                job_id, retries=task.request.retries, max_retries=task.max_retries
            )
        except StoreUnavailable:
            log.warning("job %s: the job store is away; its message goes back to the queue", job_id)
            raise Reject("the job store did not answer", requeue=True) from None

    app.task(
        name=TASK_NAME,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        autoretry_for=(RetryLater,),
        max_retries=settings.job_max_retries,
        retry_backoff=2,  # 2, 4, 8 ... seconds, capped, each drawn at random below its cap
        retry_backoff_max=settings.job_retry_backoff_max_seconds,
        retry_jitter=True,
    )(run_job)
    return app


# -- jobs whose message was lost ----------------------------------------------------------


def _client(store: RedisJobStore) -> aioredis.Redis:
    return store.client


def _prefix(store: RedisJobStore) -> str:
    return store.prefix


def _live_key(store: RedisJobStore, queue: str) -> str:
    return f"{_prefix(store)}:live:{queue}"


async def mark_live(
    store: RedisJobStore, job_id: str, queue: str, *, seen: float | None = None
) -> None:
    """Index a job about to be queued (the server, before it sends the message); ``seen=0``
    makes the next reconcile round look for its message at once. The index expires with
    the newest job in it (every key of the store has a TTL)."""
    key = _live_key(store, queue)
    async with _client(store).pipeline(transaction=False) as pipe:
        pipe.zadd(key, {job_id: time.time() if seen is None else seen})
        pipe.pexpire(key, store.ttl_ms)
        await pipe.execute()


async def touch_live(store: RedisJobStore, job_id: str) -> None:
    """A job was seen alive now (a delivery started, its message was found)."""
    async with _client(store).pipeline(transaction=False) as pipe:
        for queue in QUEUES:
            pipe.zadd(_live_key(store, queue), {job_id: time.time()}, xx=True)
        await pipe.execute()


async def drop_live(store: RedisJobStore, job_id: str) -> None:
    """A job turned final: nothing to look after any more."""
    async with _client(store).pipeline(transaction=False) as pipe:
        for queue in QUEUES:
            pipe.zrem(_live_key(store, queue), job_id)
        await pipe.execute()


def _job_of(message: bytes | str) -> str | None:
    """The job id a Celery message (as kombu stores it) carries, if it is ``run_job``'s."""
    try:
        data = orjson.loads(message)
        if isinstance(data, list):  # an unacknowledged one: [message, exchange, routing key]
            data = data[0]
        if data["headers"].get("task") != TASK_NAME:
            return None
        args = orjson.loads(base64.b64decode(data["body"]))[0]
        return str(args[0])
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, ValueError):
        return None


async def _messages_hold(store: RedisJobStore) -> set[str] | None:
    """The jobs whose message waits in a queue or is held by a worker; None when the queues
    are too long to read this round."""
    client = _client(store)
    waiting = sum([await client.llen(queue) for queue in QUEUES])
    if waiting > RECONCILE_SCAN_LIMIT:
        return None
    raw: list[bytes | str] = list(await client.hvals(UNACKED_KEY))
    for queue in QUEUES:
        raw.extend(await client.lrange(queue, 0, -1))
    return {job for job in map(_job_of, raw) if job is not None}


async def reconcile_once(store: RedisJobStore, app: Any, settings: Settings) -> list[str]:
    """Queue again the jobs not seen for the visibility timeout whose message is nowhere
    (nor waiting, nor held); forget the final and the expired. The jobs queued again."""
    client = _client(store)
    horizon = time.time() - visibility_timeout(settings)
    again: list[str] = []
    for queue in QUEUES:
        key = _live_key(store, queue)
        suspects = [
            raw.decode() if isinstance(raw, bytes) else str(raw)
            for raw in await client.zrangebyscore(key, "-inf", horizon, 0, RECONCILE_BATCH)
        ]
        if not suspects:
            continue
        held = await _messages_hold(store)
        if held is None:
            log.info("reconcile: the queues are long; the next round looks again")
            return again
        for job_id in suspects:
            try:
                record = await store.get(job_id)
            except JobNotFound:
                record = None
            if record is None or record.final:
                await client.zrem(key, job_id)
            elif job_id in held:
                await client.zadd(key, {job_id: time.time()}, xx=True)
            else:
                log.warning(
                    "job %s: its message was lost (a worker died taking it); queued again", job_id
                )
                metrics.JOBS_REQUEUED.inc()
                await client.zadd(key, {job_id: time.time()}, xx=True)
                await asyncio.to_thread(submit, app, job_id, priority=queue)  # type: ignore[arg-type]
                again.append(job_id)
    return again


async def reconcile(store: RedisJobStore, app: Any, settings: Settings) -> None:
    """Every worker, every few seconds, tries to take the round (a lock in Redis for one
    sweep interval): so the round runs about once per interval across the workers."""
    interval = restore_sweep_seconds(settings)
    lock = f"{_prefix(store)}:reconcile"
    while True:
        await asyncio.sleep(interval)
        try:
            if await _client(store).set(lock, this_worker_id(), nx=True, px=interval * 1000):
                await reconcile_once(store, app, settings)
        except (RedisError, OSError) as exc:
            log.warning("reconcile round failed (%s)", type(exc).__name__)


def worker_concurrency(settings: Settings) -> int:
    """How many jobs one worker process holds: every endpoint's in-flight limit (``/info``,
    capped by ``EPICRISIS_LLM_MAX_IN_FLIGHT``) and an eighth more, so that when a
    generation ends the next job is already loaded and waiting for the slot. Without an
    LLM the jobs are CPU work: one per CPU."""
    if not settings.llm_urls:
        return os.cpu_count() or 2

    async def capacity() -> int:
        async with EndpointPool.from_settings(settings) as pool:
            try:
                return await asyncio.wait_for(pool.capacity(), CAPACITY_WAIT_SECONDS)
            except TimeoutError:  # the endpoints' defaults, as for one that cannot answer
                default = EndpointDefaults().max_concurrent_requests
                per_endpoint = min(default, settings.llm_max_in_flight or default)
                return per_endpoint * len(settings.llm_urls)

    slots = asyncio.run(capacity())
    return slots + max(2, slots // 8)


def submit(app: Any, job_id: str, *, priority: Priority = INTERACTIVE) -> None:
    """Queue ``run_job`` for a job whose record and payload are stored; blocking I/O (kombu),
    so async callers run it in a thread."""
    if priority not in QUEUES:
        raise ValueError(f"priority must be one of {QUEUES}")
    app.send_task(
        TASK_NAME,
        args=(job_id,),
        queue=priority,
        ignore_result=True,
        headers={ENQUEUED_AT_HEADER: time.time()},  # for the queue's oldest age (metrics)
    )


app = create_app(get_settings())  # ``celery -A epicrisis.serving.queue worker`` finds it


def _runner_of(sender: Any) -> JobRunner | None:
    runner = getattr(getattr(sender, "app", None), "epicrisis_runner", None)
    return runner if isinstance(runner, JobRunner) else None


def _pool_kind(sender: Any) -> str:
    """The worker's pool implementation, by its module's name: thread, solo, prefork ..."""
    pool = getattr(sender, "pool_cls", None) or "prefork"
    implementation = get_implementation(pool) if isinstance(pool, str) else pool
    return str(getattr(implementation, "__module__", "")).rsplit(".", 1)[-1]


def _prepare_worker(sender: Any = None, **_: Any) -> None:
    """Before the worker starts: refuse to run without the keys that open payloads or in a
    pool of several processes (Celery logs and ignores exceptions from signal handlers;
    SystemExit gets through and prints one line), serve /metrics, note the concurrency for
    the heartbeat, quiet per-request HTTP logging.

    Jobs run on one event loop per process, with one endpoint pool and one ``/metrics``:
    a prefork (or eventlet, gevent) pool would split them across processes that no one
    scrapes, so scale with more worker processes (pods) instead.
    """
    runner = _runner_of(sender)
    if runner is not None:
        kind = _pool_kind(sender)
        if kind not in ONE_PROCESS_POOLS:
            raise SystemExit(
                f"epicrisis worker: the {kind} pool is not supported; use --pool threads "
                "(as `epicrisis worker` does) and run more worker processes to scale"
            )
        try:
            runner.sealer()
            runner.metrics_address = metrics.serve_metrics(
                runner.settings, default_port=metrics.WORKER_PORT
            )
        except ConfigurationError as exc:
            raise SystemExit(f"epicrisis worker: {exc}") from None
        configure_tracing("worker")
        runner.slots = int(getattr(sender, "concurrency", None) or runner.slots)
        metrics.JOB_SLOTS.set(runner.slots)
    for chatty in ("httpx", "httpx2"):  # a line per model request and heartbeat probe
        logging.getLogger(chatty).setLevel(logging.WARNING)


def _configure_logging(**_: Any) -> None:
    """Celery leaves logging to us when this signal has a receiver: JSON lines, as the server."""
    settings = get_settings()
    configure_logging("worker", log_format=settings.log_format, level=settings.log_level)


_started: list[JobRunner] = []  # the runners this process started: one in a worker


def _start_loop(sender: Any = None, **_: Any) -> None:
    """Heartbeat from the start; then say where the metrics are (logging is set up now)."""
    runner = _runner_of(sender)
    if runner is not None:
        runner.start()
        _started.append(runner)
        log.info("metrics on %s", runner.metrics_address)


def _shutting_down(**_: Any) -> None:
    """A warm shutdown stops the consumer on purpose: from now on that is no stall."""
    for runner in _started:
        runner.stall_watch.stop()


def _close_loop(sender: Any = None, **_: Any) -> None:
    """After a warm shutdown has finished the running jobs: withdraw the heartbeat, close."""
    runner = _runner_of(sender)
    if runner is not None:
        runner.close()
    shutdown_tracing()


setup_logging.connect(_configure_logging, weak=False)
worker_init.connect(_prepare_worker, weak=False)
worker_ready.connect(_start_loop, weak=False)
worker_shutdown.connect(_close_loop, weak=False)
worker_shutting_down.connect(_shutting_down, weak=False)
