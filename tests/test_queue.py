"""The queued mode end to end: a real Celery worker process on a real redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
from pydantic import SecretStr

from epicrisis.config import Settings
from epicrisis.errors import (
    BackendGenerationError,
    BackendRejectedError,
    BackendUnavailableError,
    EpicrisisError,
)
from epicrisis.llm.simulator import SimulatorConfig, SimulatorThread
from epicrisis.pipeline import load_stay, summarize
from epicrisis.serving.crypto import Sealer, new_key_text
from epicrisis.serving.jobs import JobOptions, JobRecord, JobState
from epicrisis.serving.queue import (
    BATCH,
    INTERACTIVE,
    JobRunner,
    Priority,
    RetryLater,
    _retry_allowed,
    create_app,
    mark_live,
    submit,
    worker_concurrency,
)
from epicrisis.serving.redis_store import RedisJobStore
from epicrisis.serving.stall import POLL_GRACE_SECONDS, StallWatch
from epicrisis.stay import Stay
from epicrisis.summary.model import DischargeSummary
from redis_server import redis_server

SAMPLE = resources.files("epicrisis.samples").joinpath("sample-stay.json").read_bytes()
SENTINEL = "ZEBRA-SENTINEL"
WAIT_SECONDS = 60  # a bound against hanging, not a timing assertion
T = TypeVar("T")


def run(scenario: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(scenario)


@dataclass
class Queued:
    """The test's side of the queued mode: settings, a Celery client app, the worker's log."""

    settings: Settings
    app: Any
    log: Path

    def store(self) -> RedisJobStore:
        return RedisJobStore.from_url(
            self.settings.redis_url, Sealer.from_settings(self.settings), poll_seconds=1
        )

    def outcomes(self, job_id: str | None) -> list[str]:
        """The outcomes the worker logged for ``job_id`` ("succeeded", "skipped" ...), one per
        delivery; ``None``: deliveries it refused, having no job id it could read."""
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            record = json.loads(line)
            message = str(record.get("message", ""))
            if job_id is None and message == "run_job refused a malformed job id":
                found.append("refused")
            elif (
                job_id is not None
                and record.get("job_id") == job_id
                and message.startswith("job ")
                and " " not in message[4:]
            ):
                found.append(message[4:])
        return found

    async def outcome(self, job_id: str | None, count: int = 1) -> str:
        """The ``count``-th outcome of ``job_id`` once the worker has logged it (a bound)."""
        async with asyncio.timeout(WAIT_SECONDS):
            while len(seen := self.outcomes(job_id)) < count:
                await asyncio.sleep(0.05)
        return seen[count - 1]


def wait_until_ready(worker: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while " ready." not in log.read_text(errors="replace"):
        if worker.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the worker did not start:\n{log.read_text(errors='replace')}")
        time.sleep(0.05)


@contextlib.contextmanager
def celery_worker(redis_url: str, key: str, log: Path, *, concurrency: int = 2) -> Iterator[None]:
    """``celery worker`` as a subprocess on ``redis_url``; stopped with SIGTERM (warm shutdown)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPICRISIS_")}
    env |= {
        "EPICRISIS_REDIS_URL": redis_url,
        "EPICRISIS_ENCRYPTION_KEY": key,
        "EPICRISIS_METRICS_PORT": "0",
        "EPICRISIS_LOG_FORMAT": "json",  # the tests read outcomes from its records
    }
    with log.open("wb") as sink:
        worker = subprocess.Popen(
            [
                sys.executable, "-m", "celery", "-A", "epicrisis.serving.queue", "worker",
                "--pool", "threads", "--concurrency", str(concurrency), "-Q", "interactive,batch",
                "--without-heartbeat", "--without-gossip", "--without-mingle",
                "--loglevel", "INFO",
            ],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_until_ready(worker, log)  # before that, SIGTERM would kill it without a shutdown
        yield
    finally:
        worker.send_signal(signal.SIGTERM)  # finish what runs, then exit
        try:
            code = worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
            raise
    text = log.read_text(errors="replace")
    assert code == 0, text[-4000:]
    assert SENTINEL not in text  # nothing of a Bundle is logged


@pytest.fixture(scope="module")
def queued(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Queued]:
    """A redis-server and one worker process consuming both queues."""
    key = new_key_text()
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    with redis_server() as server, celery_worker(server.url, key, log):
        settings = Settings(redis_url=server.url, encryption_key=SecretStr(key))
        app = create_app(settings)
        try:
            yield Queued(settings, app, log)
        finally:
            app.close()


async def enqueue_only(queued: Queued, bundle: bytes, options: JobOptions | None = None) -> str:
    """A stored job and payload, as the server leaves them before it queues the task."""
    store = queued.store()
    try:
        record, _ = await store.create(idempotency_key=None, request_digest="d")
        await store.put_payload(record.id, load_stay(bundle), options or JobOptions())
    finally:
        await store.aclose()
    return record.id


async def enqueue(
    queued: Queued,
    bundle: bytes,
    options: JobOptions | None = None,
    priority: Priority = INTERACTIVE,
) -> str:
    job_id = await enqueue_only(queued, bundle, options)
    await asyncio.to_thread(submit, queued.app, job_id, priority=priority)
    return job_id


async def final(queued: Queued, job_id: str) -> JobRecord:
    store = queued.store()
    try:
        async with asyncio.timeout(WAIT_SECONDS):
            async for record in store.watch(job_id):
                if record.final:
                    return record
    finally:
        await store.aclose()
    raise AssertionError("a watch ends with a final state")


def test_a_submitted_job_runs_to_the_summary_the_cli_would_give(queued: Queued) -> None:
    async def scenario() -> tuple[JobRecord, str]:
        job_id = await enqueue(queued, SAMPLE, priority=BATCH)
        record = await final(queued, job_id)
        return record, await queued.outcome(job_id)

    record, outcome = run(scenario())
    assert outcome == "succeeded"
    assert record.state is JobState.SUCCEEDED and record.error is None
    assert record.summary == summarize(SAMPLE)
    assert record.fhir_document is not None and '"Composition"' in record.fhir_document
    assert record.started_at is not None and record.finished_at is not None


def test_a_payload_of_another_version_ends_failed_with_a_reason_and_no_content(
    queued: Queued,
) -> None:
    """A payload sealed with the right key in a layout this worker does not know (as a
    server of another version would leave it) fails the job, saying why."""

    async def scenario() -> JobRecord:
        store = queued.store()
        try:
            record, _ = await store.create(idempotency_key=None, request_digest="d")
        finally:
            await store.aclose()
        head = json.dumps({"format": 1, "encounter_id": SENTINEL}).encode()
        sealed = Sealer.from_settings(queued.settings).seal(
            len(head).to_bytes(4, "big") + head + SENTINEL.encode(),
            context=f"epicrisis/payload/{record.id}".encode(),
        )
        with redis.Redis.from_url(queued.settings.redis_url) as client:
            client.set(f"epicrisis:payload:{record.id}", sealed, px=60_000)
        await asyncio.to_thread(submit, queued.app, record.id)
        return await final(queued, record.id)

    record = run(scenario())
    assert record.state is JobState.FAILED and record.summary is None
    assert record.error is not None and "another version" in record.error.message
    assert SENTINEL not in record.error.message
    assert not record.error.retryable


def test_a_redelivered_job_that_is_already_final_is_not_run_again(queued: Queued) -> None:
    async def scenario() -> tuple[JobRecord, JobRecord, str]:
        job_id = await enqueue(queued, SAMPLE)
        first = await final(queued, job_id)
        assert await queued.outcome(job_id) == "succeeded"
        await asyncio.to_thread(submit, queued.app, job_id)  # as a redelivery would
        outcome = await queued.outcome(job_id, count=2)
        store = queued.store()
        try:
            return first, await store.get(job_id), outcome
        finally:
            await store.aclose()

    first, after, outcome = run(scenario())
    assert outcome == "skipped"
    assert after == first  # same finish time, same summary: nothing ran


def test_a_job_id_that_names_no_job_is_dropped(queued: Queued) -> None:
    async def scenario() -> list[str]:
        refused_before = len(queued.outcomes(None))
        await asyncio.to_thread(submit, queued.app, "0" * 32)
        await asyncio.to_thread(submit, queued.app, f"../{SENTINEL}")
        return [
            await queued.outcome("0" * 32),
            await queued.outcome(None, count=refused_before + 1),
        ]

    assert run(scenario()) == ["expired", "refused"]


def other_database(queued: Queued, number: int) -> Queued:
    """The same server, a database the module's worker does not read."""
    url = queued.settings.redis_url.rsplit("/", 1)[0] + f"/{number}"
    settings = queued.settings.model_copy(update={"redis_url": url})
    return Queued(settings, create_app(settings), queued.log)


def test_waiting_interactive_work_starts_before_waiting_batch_work(
    queued: Queued, tmp_path: Path
) -> None:
    waiting = other_database(queued, 2)
    key = queued.settings.encryption_key
    assert key is not None

    async def scenario() -> dict[str, JobRecord]:
        jobs: dict[str, str] = {}
        order: tuple[tuple[str, Priority], ...] = (
            ("batch-1", BATCH),
            ("batch-2", BATCH),
            ("urgent-1", INTERACTIVE),
            ("urgent-2", INTERACTIVE),
        )
        for name, priority in order:
            jobs[name] = await enqueue(waiting, SAMPLE, priority=priority)
        with celery_worker(
            waiting.settings.redis_url, key.get_secret_value(), tmp_path / "w.log", concurrency=1
        ):
            return {name: await final(waiting, job_id) for name, job_id in jobs.items()}

    try:
        records = run(scenario())
    finally:
        waiting.app.close()
    assert all(r.state is JobState.SUCCEEDED for r in records.values())
    started = {name: r.started_at or 0.0 for name, r in records.items()}
    # An order, not a duration. Round robin would start batch-1 second.
    assert started["urgent-1"] < started["urgent-2"] < started["batch-1"] < started["batch-2"]


def test_each_priority_lands_in_its_own_queue(queued: Queued) -> None:
    """On a database no worker reads, so the messages stay where they were routed."""
    idle_url = queued.settings.redis_url.rsplit("/", 1)[0] + "/1"
    idle = create_app(queued.settings.model_copy(update={"redis_url": idle_url}))

    async def depths() -> dict[str, int]:
        store = RedisJobStore.from_url(idle_url, Sealer.from_settings(queued.settings))
        try:
            return {name: await store.queue_depth(name) for name in (INTERACTIVE, BATCH)}
        finally:
            await store.aclose()

    try:
        for priority in (BATCH, BATCH, INTERACTIVE):
            submit(idle, "0" * 32, priority=priority)
        assert run(depths()) == {INTERACTIVE: 1, BATCH: 2}
    finally:
        idle.close()


@pytest.mark.parametrize(
    ("error", "retries", "allowed"),
    [
        (BackendUnavailableError("no endpoint answered"), 0, True),
        (BackendUnavailableError("no endpoint answered"), 5, False),  # the task's bound
        (BackendGenerationError("incomplete generation"), 0, True),
        (BackendGenerationError("incomplete generation"), 1, False),  # its kind's bound
        (BackendRejectedError("422"), 0, False),  # permanent
    ],
)
def test_only_retryable_backend_errors_are_retried_within_bounds(
    error: EpicrisisError, retries: int, allowed: bool
) -> None:
    assert _retry_allowed(error, retries, 5) is allowed
    assert issubclass(RetryLater, Exception)


def test_the_task_retries_a_retryable_backend_error_then_fails_and_never_retries_a_permanent_one(
    queued: Queued,
) -> None:
    """JobRunner in this process (the task's body without Celery), on a database of its own."""
    runner_settings = other_database(queued, 3)
    runner_settings.app.close()
    errors: list[Exception] = [BackendUnavailableError("no endpoint answered")]

    async def failing(stay: Stay, options: JobOptions) -> DischargeSummary:
        raise errors[0]

    runner = JobRunner(runner_settings.settings, summarizer=failing)

    async def record_of(job_id: str) -> JobRecord:
        store = runner_settings.store()
        try:
            return await store.get(job_id)
        finally:
            await store.aclose()

    try:
        job_id = run(enqueue_only(runner_settings, SAMPLE))
        with pytest.raises(RetryLater):
            runner.run(job_id, retries=0, max_retries=2)
        waiting = run(record_of(job_id))
        assert waiting.state is JobState.RUNNING and waiting.stage == "waiting to retry"
        assert runner.run(job_id, retries=2, max_retries=2) == "failed"  # out of retries
        failed = run(record_of(job_id))
        assert failed.error is not None and failed.error.code == "backend-unavailable"
        assert failed.error.retryable  # the caller may submit again later

        errors[0] = BackendRejectedError("422")
        job_id = run(enqueue_only(runner_settings, SAMPLE))
        assert runner.run(job_id, retries=0, max_retries=2) == "failed"  # no retry
        rejected = run(record_of(job_id))
        assert rejected.error is not None and not rejected.error.retryable
    finally:
        runner.close()


def test_worker_concurrency_follows_the_endpoints_and_assumes_tgi_defaults_while_loading(
    tmp_path: Path,
) -> None:
    with socket.socket() as probe:  # a port nothing listens on: a TGI still loading
        probe.bind(("127.0.0.1", 0))
        loading = f"http://127.0.0.1:{probe.getsockname()[1]}"
    with SimulatorThread(SimulatorConfig(port=0, max_concurrent_requests=40)) as sim:
        sized = worker_concurrency(Settings(llm_urls=[sim.base_url, loading]))
        capped = worker_concurrency(Settings(llm_urls=[sim.base_url], llm_max_in_flight=10))
    assert sized == (40 + 128) + (40 + 128) // 8
    assert capped == 10 + 2
    assert worker_concurrency(Settings(llm_urls=[])) == (os.cpu_count() or 2)


@pytest.mark.parametrize(
    ("args", "key", "named"),
    [
        (["--pool", "prefork"], True, "the prefork pool is not supported"),
        (["--pool", "threads"], False, "EPICRISIS_ENCRYPTION_KEY"),
    ],
    ids=["prefork-pool", "no-key"],
)
def test_a_worker_that_cannot_run_jobs_right_stops_at_once_saying_why(
    args: list[str], key: bool, named: str
) -> None:
    """Jobs share one loop, one endpoint pool and one /metrics per process: a pool of
    processes would split them unseen; without the key no payload opens."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPICRISIS_")}
    env |= {"EPICRISIS_REDIS_URL": "redis://127.0.0.1:1/0", "EPICRISIS_METRICS_PORT": "0"}
    if key:
        env["EPICRISIS_ENCRYPTION_KEY"] = new_key_text()
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "epicrisis.serving.queue", "worker", *args],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert named in result.stderr + result.stdout
    assert "Traceback" not in result.stderr + result.stdout


def test_queueing_a_job_leaves_no_subscription_or_result_behind() -> None:
    """Celery with a result backend subscribed once per sent task and never read the
    channel (the 10,000-job soak saw the server's memory grow with it): there is none."""
    with redis_server() as server:
        settings = Settings(redis_url=server.url, encryption_key=SecretStr(new_key_text()))
        app = create_app(settings)
        try:
            for n in range(20):
                submit(app, f"{n:032x}", priority="batch")
            with server.client() as client:
                others = [c for c in client.client_list() if c["cmd"] != "client|list"]
                pubsub = [c for c in others if "subscribe" in c["cmd"] or int(c["sub"])]
                assert pubsub == [], pubsub
                assert client.llen("batch") == 20
                assert not list(client.scan_iter("celery-task-meta-*"))
        finally:
            app.close()


def test_the_live_job_index_expires_like_the_jobs_in_it() -> None:
    """Every key of the store has a TTL (the soak's rule): the index of unfinished jobs
    too, refreshed with each job added."""

    async def scenario() -> tuple[int, int]:
        with redis_server() as server:
            sealer = Sealer.from_text(new_key_text())
            store = RedisJobStore.from_url(server.url, sealer, ttl_seconds=60)
            try:
                await mark_live(store, "a" * 32, INTERACTIVE)
                await mark_live(store, "b" * 32, INTERACTIVE, seen=0.0)
                with server.client() as client:
                    return int(client.pttl("epicrisis:live:interactive")), int(
                        client.zcard("epicrisis:live:interactive")
                    )
            finally:
                await store.aclose()

    ttl_ms, members = run(scenario())
    assert members == 2 and 0 < ttl_ms <= 60_000


# -- the stall watch (serving.stall) --------------------------------------------------------


def test_the_stall_watch_needs_every_sign_on_end_for_its_whole_period() -> None:
    """Stalled: a free slot, a job waiting past a poll, no delivery, for ``after`` seconds
    on end. Any delivery, a full worker, an empty queue or Redis away ends the spell."""
    grace = POLL_GRACE_SECONDS
    watch = StallWatch(after=30.0, last_delivery=0.0)
    signs = {"free_slot": True, "oldest_wait": grace}
    assert not watch.stalled(grace, **signs)  # the spell starts
    assert not watch.stalled(grace + 29.9, **signs)
    assert watch.stalled(grace + 30.0, **signs)
    for broken in (
        {"free_slot": False},  # every slot busy: waiting jobs are the backlog, not a stall
        {"oldest_wait": None},  # Redis did not answer: the consumer may be reconnecting
        {"oldest_wait": 0.0},  # nothing waits
        {"oldest_wait": grace - 0.1},  # a job between two polls of a healthy consumer
    ):
        watch = StallWatch(after=30.0, last_delivery=0.0)
        assert not watch.stalled(grace, **signs)
        assert not watch.stalled(grace + 20.0, **(signs | broken)), broken  # spell ended
        assert not watch.stalled(grace + 40.0, **signs), broken  # a new spell starts here
        assert watch.stalled(grace + 70.0, **signs), broken
    watch = StallWatch(after=30.0, last_delivery=0.0)
    assert not watch.stalled(grace, **signs)
    watch.delivered(grace + 20.0)  # the consumer took a job
    assert not watch.stalled(grace + 21.0, **signs)  # within a poll of that delivery
    assert not watch.stalled(grace + 40.0, **signs)  # a new spell from here
    assert watch.stalled(grace + 70.0, **signs)
    watch.stop()  # a warm shutdown: the consumer stops on purpose
    assert not watch.stalled(grace + 1000.0, **signs)
