"""The queued mode's Celery app and its one task, ``run_job(job_id)``, on Redis.

The task is thin: the message carries only the job id (JSON), the Bundle waits sealed in the
job store, and the work is the same pipeline as the CLI and the embedded worker
(``load_stay``, a summarizer, ``render_fhir``). The result lands in :class:`RedisJobStore`;
Celery's own result is only an outcome word (``succeeded``, ``failed``, ``skipped`` ...).

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
Redis never hands a running job to a second worker.

Event loops: each worker thread (``--pool threads``) or process (prefork) keeps one
``asyncio.Runner`` and one async :class:`RedisJobStore` for its life, so the worker uses
the very store code the server uses, with its pooled connections bound to that loop.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from dataclasses import dataclass, replace
from typing import Any, Final, Literal

from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_init
from kombu.entity import Exchange, Queue

from epicrisis import __version__
from epicrisis.config import Settings, get_settings
from epicrisis.errors import ConfigurationError, EpicrisisError
from epicrisis.pipeline import load_stay
from epicrisis.serving.backends import BackendChooser, JobSummarizer
from epicrisis.serving.crypto import Sealer
from epicrisis.serving.embedded import job_failure
from epicrisis.serving.jobs import (
    JobFailure,
    JobNotFound,
    JobOptions,
    JobState,
    failed,
    started,
    succeeded,
)
from epicrisis.serving.redis_store import RedisJobStore
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


def soft_time_limit(settings: Settings) -> float:
    """Celery's soft limit, behind the pipeline's own timeout (which records FAILED)."""
    return settings.job_timeout_seconds + 30


def time_limit(settings: Settings) -> float:
    return settings.job_timeout_seconds + 60


def visibility_timeout(settings: Settings) -> int:
    """Longer than a message may stay unacknowledged: a run, or a retry's countdown."""
    return int(time_limit(settings) + settings.job_retry_backoff_max_seconds + 60)


class RetryLater(Exception):
    """A retryable backend failure; Celery retries the task with backoff (carries no PHI)."""


@dataclass
class _ThreadState:
    runner: asyncio.Runner
    store: RedisJobStore


class JobRunner:
    """Runs jobs for one worker process: settings, keys, the summarizer; a loop per thread."""

    def __init__(self, settings: Settings, summarizer: JobSummarizer | None = None) -> None:
        self.settings = settings
        self.summarizer = summarizer or BackendChooser(settings)
        self._sealer: Sealer | None = None
        self._local = threading.local()
        self._lock = threading.Lock()

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
        state = self._thread_state()
        try:
            return state.runner.run(self._execute(state.store, job_id, retries, max_retries))
        except SoftTimeLimitExceeded:
            # Celery's backstop (prefork) fired inside the loop: start this thread afresh.
            self._drop_thread_state()
            state = self._thread_state()
            failure = JobFailure("deadline-exceeded", "the job ran past its time limit", True)
            state.runner.run(_fail(state.store, job_id, failure))
            return "failed"

    async def _execute(
        self, store: RedisJobStore, job_id: str, retries: int, max_retries: int
    ) -> str:
        try:
            record = await store.get(job_id)
            if record.final:
                return "skipped"  # a redelivery of a finished or cancelled job
            if await store.count_run(job_id) > max_retries + 1 + EXTRA_DELIVERIES:
                failure = JobFailure("worker-lost", "the job stopped its workers repeatedly", True)
                return await _fail(store, job_id, failure)
            record = await store.update(job_id, started)
            if record.final:
                return "skipped"  # cancelled meanwhile
            bundle, options = await store.take_payload(job_id)
        except JobNotFound:
            log.warning("job %s expired before it ran", job_id)
            return "expired"
        try:
            summary, document = await asyncio.wait_for(
                self._pipeline(bundle, options), self.settings.job_timeout_seconds
            )
        except TimeoutError:
            failure = JobFailure("deadline-exceeded", "the job ran past its time limit", True)
            return await _fail(store, job_id, failure)
        except EpicrisisError as exc:
            if _retry_allowed(exc, retries, max_retries):
                await store.update(job_id, lambda r: replace(r, stage="waiting to retry"))
                raise RetryLater(f"retryable {type(exc).__name__}") from None
            return await _fail(store, job_id, job_failure(exc))
        except Exception as exc:  # a bug: record it without input content, keep serving
            log.error("job %s failed with an internal error (%s)", job_id, type(exc).__name__)
            failure = JobFailure("internal", "internal error; please report it", True)
            return await _fail(store, job_id, failure)
        final = await store.update(job_id, succeeded(summary, document))
        return final.state.value if final.state is JobState.SUCCEEDED else "skipped"

    async def _pipeline(self, bundle: bytes, options: JobOptions) -> tuple[DischargeSummary, str]:
        stay = await asyncio.to_thread(
            load_stay,
            bundle,
            encounter_id=options.encounter_id,
            strict=options.strict,
            allow_emergency=options.allow_emergency,
        )
        summary = await self.summarizer(stay, options)
        document = await asyncio.to_thread(render_fhir, summary, version=__version__)
        return summary, document

    def _thread_state(self) -> _ThreadState:
        state: _ThreadState | None = getattr(self._local, "state", None)
        if state is None:
            store = RedisJobStore.from_url(
                self.settings.redis_url,
                self.sealer(),
                ttl_seconds=self.settings.job_ttl_seconds,
                prefix=self.settings.redis_key_prefix,
            )
            state = _ThreadState(asyncio.Runner(), store)
            self._local.state = state
        return state

    def close(self) -> None:
        """Close this thread's loop and connections (other threads' close with the process)."""
        state: _ThreadState | None = getattr(self._local, "state", None)
        if state is not None:
            state.runner.run(state.store.aclose())
        self._drop_thread_state()

    def _drop_thread_state(self) -> None:
        state: _ThreadState | None = getattr(self._local, "state", None)
        self._local.state = None
        if state is not None:
            state.runner.close()  # cancels what the interrupted run left behind


async def _fail(store: RedisJobStore, job_id: str, failure: JobFailure) -> str:
    record = await store.update(job_id, failed(failure))
    return "failed" if record.state is JobState.FAILED else "skipped"


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
    app = Celery("epicrisis", broker=settings.redis_url, backend=settings.redis_url)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
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
        },
        broker_connection_retry_on_startup=True,
        result_expires=int(settings.job_ttl_seconds),
        worker_hijack_root_logger=False,
    )
    app.epicrisis_runner = job_runner

    def run_job(task: Any, job_id: str) -> str:
        return job_runner.run(job_id, retries=task.request.retries, max_retries=task.max_retries)

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
        soft_time_limit=soft_time_limit(settings),
        time_limit=time_limit(settings),
    )(run_job)
    return app


def submit(app: Any, job_id: str, *, priority: Priority = INTERACTIVE) -> Any:
    """Queue ``run_job`` for a job whose record and payload are stored; blocking I/O (kombu),
    so async callers run it in a thread. Returns Celery's ``AsyncResult``."""
    if priority not in QUEUES:
        raise ValueError(f"priority must be one of {QUEUES}")
    return app.send_task(TASK_NAME, args=(job_id,), queue=priority)


app = create_app(get_settings())  # ``celery -A epicrisis.serving.queue worker`` finds it


def _check_keys(sender: Any = None, **_: Any) -> None:
    """Refuse to start a worker that could not open a payload (Celery logs and ignores
    exceptions from signal handlers; SystemExit gets through and prints one line)."""
    runner = getattr(getattr(sender, "app", None), "epicrisis_runner", None)
    if isinstance(runner, JobRunner):
        try:
            runner.sealer()
        except ConfigurationError as exc:
            raise SystemExit(f"epicrisis worker: {exc}") from None


worker_init.connect(_check_keys, weak=False)
