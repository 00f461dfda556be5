"""Faults over real processes, with every job counted: workers killed with SIGKILL at random
moments, Redis restarted under load, every model endpoint away, a slow and a flapping one,
the server stopped mid-call, and jobs cancelled while they generate.

What happened is read from the jobs (gRPC), from Redis (the queues, the unacknowledged
messages, each job's delivery counter), from the workers' logs (one line per delivery and
outcome) and from the simulators' counters. Waits are bounds against hanging, never timing
assertions.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import SecretStr

from deployment import LLM, LOCAL_ONLY, WAIT_SECONDS, Deployment, deployed
from deployment import stop as deployment_stop
from epicrisis.config import Settings
from epicrisis.errors import BackendRejectedError
from epicrisis.pipeline import load_stay, summarize
from epicrisis.serving.crypto import Sealer, new_key_text
from epicrisis.serving.jobs import JobOptions, JobRecord, cancelled
from epicrisis.serving.queue import JobRunner, create_app
from epicrisis.serving.redis_store import RedisJobStore
from epicrisis.stay import Stay
from epicrisis.summary.model import DischargeSummary
from epicrisis.v1 import summarizer_pb2 as pb
from epicrisis.v1 import summarizer_pb2_grpc as pb_grpc
from redis_server import redis_server
from sim_control import chat_counts, set_faults, sim_state

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
FINAL = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)
EXTRACTIVE = pb.SummaryOptions(backend=pb.BACKEND_EXTRACTIVE)
# A small stay (validated in about 10 ms, where the sample takes 300 ms of the server's CPU):
# the model's answer to it is about 300 tokens.
SMALL = (Path(__file__).parent / "fixtures" / "collection-relative.json").read_bytes()
# Short limits so that a dead worker's messages come back within the test: the visibility
# timeout is the job's time limit + the longest retry countdown + a margin (as long as the
# time limit here), and every worker sweeps for them every second or so.
QUICK_REDELIVERY = {
    "EPICRISIS_JOB_TIMEOUT_SECONDS": "10",
    "EPICRISIS_JOB_RETRY_BACKOFF_MAX_SECONDS": "1",
}


# -- helpers ---------------------------------------------------------------------------------


def submit(stub: pb_grpc.DischargeSummarizerStub, request: pb.SubmitRequest) -> str:
    """Submit until accepted: UNAVAILABLE (Redis away) is retried with the same request,
    whose idempotency key makes the retries one job."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        try:
            job_id: str = stub.Submit(request, timeout=10).id
            return job_id
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def finals(
    stub: pb_grpc.DischargeSummarizerStub,
    ids: list[str],
    limit: float = WAIT_SECONDS * 2,
    explain: Callable[[list[str]], str] = lambda ids: "",
) -> dict[str, pb.Job]:
    """Every job once final, polled with GetJob (UNAVAILABLE, while Redis is away, is
    waited out); the assertion names how many never got there within ``limit`` (and what
    ``explain`` says of them)."""
    done: dict[str, pb.Job] = {}
    deadline = time.monotonic() + limit
    while len(done) < len(ids):
        for job_id in [i for i in ids if i not in done]:
            try:
                job = stub.GetJob(pb.GetJobRequest(id=job_id), timeout=10)
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                break
            if job.state in FINAL:
                done[job_id] = job
        if time.monotonic() > deadline:
            left = [i for i in ids if i not in done]
            raise AssertionError(f"{len(left)} of {len(ids)} not final; {explain(left)}")
        time.sleep(0.5)
    return done


def log_records(log: Path) -> list[dict[str, Any]]:
    """The JSON lines of a log (Celery's banner and other plain lines left out)."""
    records = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by SIGKILL
    return records


def outcomes(deployment: Deployment) -> Counter[tuple[str, str]]:
    """(job id, outcome) -> deliveries that logged it: 'job succeeded', 'job skipped' ..."""
    return Counter(
        (record["job_id"], record["message"].removeprefix("job "))
        for record in log_records(deployment.worker_log)
        if record.get("job_id")
        and record.get("logger") == "epicrisis.serving.queue"
        and record["message"].startswith("job ")
        and " " not in record["message"][4:]
    )


def working(deployment: Deployment) -> list[subprocess.Popen[str]]:
    """The live workers that said they are ready (so they take jobs)."""
    ready = {
        record.get("pid")
        for record in log_records(deployment.worker_log)
        if record["message"].endswith(" ready.")
    }
    return [w for w in deployment.workers if w.poll() is None and w.pid in ready]


def health_becomes(deployment: Deployment, wanted: int, limit: float = 30.0) -> int:
    """The status once it is ``wanted``, or the last one seen when ``limit`` runs out."""
    seen = -1
    deadline = time.monotonic() + limit
    with deployment.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                seen = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
            except grpc.RpcError:
                seen = -1
            if seen == wanted:
                break
            time.sleep(0.2)
    return seen


def wait_until(predicate: Callable[[], bool], what: str, limit: float = WAIT_SECONDS) -> None:
    """A bound against hanging, not a timing."""
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, f"waited {limit:g} s for {what}"
        time.sleep(0.05)


def broker(deployment: Deployment) -> redis.Redis:
    return redis.Redis.from_url(deployment.env["EPICRISIS_REDIS_URL"])


def settled(deployment: Deployment) -> bool:
    """No message waits in a queue and none is held unacknowledged: every delivery ended."""
    with broker(deployment) as client:
        return (
            client.llen("interactive") == 0
            and client.llen("batch") == 0
            and client.hlen("unacked") == 0
        )


def whereabouts(
    deployment: Deployment, stub: pb_grpc.DischargeSummarizerStub
) -> Callable[[list[str]], str]:
    """What the job, Redis and the workers' logs say of jobs that never ended."""

    def explain(ids: list[str]) -> str:
        runs = deliveries(deployment, ids)
        with broker(deployment) as client:
            held = [bytes(v) for v in client.hvals("unacked")]
            waiting = client.lrange("interactive", 0, -1) + client.lrange("batch", 0, -1)
        lines = [r for r in log_records(deployment.worker_log) if r.get("job_id") in ids]
        said = {}
        for job_id in ids:
            job = stub.GetJob(pb.GetJobRequest(id=job_id), timeout=10)
            said[job_id] = {
                "state": pb.JobState.Name(job.state),
                "stage": job.progress.stage,
                "runs": runs[job_id],
                "unacked": sum(job_id.encode() in m for m in held),
                "queued": sum(job_id.encode() in m for m in waiting),
                "log": [(r["pid"], r["message"]) for r in lines if r["job_id"] == job_id],
            }
        return json.dumps(said)

    return explain


def deliveries(deployment: Deployment, ids: list[str]) -> dict[str, int]:
    """Each job's delivery counter (``{prefix}:runs:{id}``): 1 when it ran once."""
    with broker(deployment) as client:
        values = client.mget([f"epicrisis:runs:{job_id}" for job_id in ids])
    return {job_id: int(value or 0) for job_id, value in zip(ids, values, strict=True)}


def busy(urls: list[str]) -> int:
    """Generations the simulators hold now."""
    return sum(sim_state(url)["counters"]["in_flight"] for url in urls)


def chats_answered(urls: list[str]) -> int:
    return sum(chat_counts(url).get("200", 0) for url in urls)


# -- 1. workers killed at random moments -------------------------------------------------------


def test_workers_killed_at_random_moments_lose_no_job_and_write_no_result_twice(
    tmp_path: Path,
) -> None:
    """Three worker processes run 220 jobs (nine in ten with the model, whose answers take
    about two seconds); while they run, a worker chosen by a seeded draw gets SIGKILL every
    second or so, mid-job, and a fresh one starts. Every job ends SUCCEEDED, and exactly
    once: after every message is acknowledged (the dead workers' ones delivered again, then
    skipped or run), no job's final record changed since the client first saw it, and no
    job was reported written by two deliveries."""
    rng = random.Random(20261129)
    jobs, kills, workers = 220, 8, 3
    with deployed(
        tmp_path,
        sims=2,
        sim_args=("--token-latency", "0.006"),
        workers=1,
        worker_args=("--concurrency", "8"),
        env=QUICK_REDELIVERY,
    ) as running:
        for _ in range(workers - 1):  # starting together: each takes seconds of CPU
            running.start_worker("--concurrency", "8", wait=False)
        requests = [
            pb.SubmitRequest(bundle=SMALL, options=LLM if rng.random() < 0.9 else EXTRACTIVE)
            for _ in range(jobs)
        ]
        channel, stub = running.stub()
        killed: list[int] = []
        with channel, ThreadPoolExecutor(8) as pool:
            submitted = pool.map(lambda request: submit(stub, request), requests)
            try:
                wait_until(lambda: busy(running.sims) >= 8, "the backlog to reach the model")
                for _ in range(kills):  # while the backlog is submitted and run
                    time.sleep(rng.uniform(0.3, 2.0))
                    wait_until(lambda: bool(working(running)), "a worker to be ready")
                    victim = rng.choice(working(running))
                    victim.send_signal(signal.SIGKILL)
                    victim.wait()
                    killed.append(victim.pid)
                    running.start_worker("--concurrency", "8", wait=False)
                ids = list(submitted)
                first = finals(stub, ids, 150, whereabouts(running, stub))
                wait_until(lambda: settled(running), "every message to be acknowledged", 90)
                last = finals(stub, ids)
            finally:  # the killed ones are not stopped again
                running.workers[:] = [w for w in running.workers if w.poll() is None]
        runs = deliveries(running, ids)
        reported = outcomes(running)
        answered = chats_answered(running.sims)
        requeued = running.worker_log.read_text(errors="replace").count("message was lost")

    states = Counter(pb.JobState.Name(job.state) for job in first.values())
    assert states == {"JOB_STATE_SUCCEEDED": jobs}, states
    for job_id in ids:  # written once: the record the client saw first is the record now
        assert last[job_id].finished_at == first[job_id].finished_at, job_id
        assert last[job_id].summary == first[job_id].summary, job_id
    written = Counter(
        job_id
        for (job_id, outcome), n in reported.items()
        for _ in range(n)
        if outcome in ("succeeded", "failed")
    )
    assert max(written.values()) == 1, written.most_common(3)
    # A job reported by no delivery: its worker died between the write and the log line.
    assert jobs - len(written) <= len(killed)
    redelivered = {job_id: n for job_id, n in runs.items() if n > 1}
    assert redelivered, "no kill landed mid-job: the test proved nothing"
    llm_jobs = sum(1 for r in requests if r.options.backend == pb.BACKEND_LLM)
    assert answered >= llm_jobs  # the model wrote them (and again for a job killed after)
    print(
        f"\n{jobs} jobs ({llm_jobs} with the model), {len(killed)} workers killed, "
        f"{len(redelivered)} jobs delivered again ({sum(runs.values()) - jobs} extra "
        f"deliveries), {requeued} lost messages queued again, {answered} model answers, outcomes "
        f"{dict(Counter(outcome for (_, outcome) in reported.elements()))}"
    )


def test_a_job_whose_message_a_dying_worker_took_is_queued_again(tmp_path: Path) -> None:
    """kombu takes a message (BRPOP) before it records it as unacknowledged: a worker killed
    between the two loses it (the test above met it: a job QUEUED for ever, its message in
    no queue and held by no worker). Here the message is taken out of the queue by hand
    while no worker runs; the job is still summarized, queued again by a worker."""
    with deployed(tmp_path, env=QUICK_REDELIVERY) as running:
        assert stop_worker(running) == 0
        channel, stub = running.stub()
        with channel:
            job_id = submit(stub, pb.SubmitRequest(bundle=SMALL, options=LLM))
            with broker(running) as client:
                taken = client.rpop("interactive")  # as BRPOP would, and nobody records it
            assert taken is not None and job_id.encode() in base64.b64decode(
                json.loads(taken)["body"]
            )
            running.start_worker("--concurrency", "2")
            job = finals(stub, [job_id], explain=whereabouts(running, stub))[job_id]
        log = running.worker_log.read_text(errors="replace")
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    assert log.count("message was lost") == 1


def test_a_replayed_submit_queues_a_job_whose_first_submit_lost_redis_half_way(
    tmp_path: Path,
) -> None:
    """Redis lost after the job was saved, before its payload, index entry and message
    were: the first Submit fails, and the caller's retry with the same idempotency key
    finds the job QUEUED. The replay stores the payload again and has the job looked after,
    so it runs instead of waiting for ever."""
    with deployed(tmp_path, env=QUICK_REDELIVERY) as running:
        assert stop_worker(running) == 0
        channel, stub = running.stub()
        request = pb.SubmitRequest(bundle=SMALL, options=LLM, idempotency_key="replayed")
        with channel:
            job_id = submit(stub, request)
            with broker(running) as client:  # undo all but the record: the half-way state
                client.delete("interactive", f"epicrisis:payload:{job_id}")
                client.zrem("epicrisis:live:interactive", job_id)
            assert submit(stub, request) == job_id  # the replay: same job
            running.start_worker("--concurrency", "2")
            job = finals(stub, [job_id], explain=whereabouts(running, stub))[job_id]
        log = running.worker_log.read_text(errors="replace")
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    assert log.count("message was lost") == 1


def stop_worker(deployment: Deployment) -> int:
    return deployment_stop(deployment.workers.pop())


@contextlib.contextmanager
def supervised(deployment: Deployment, *worker_args: str) -> Iterator[list[int]]:
    """Start a worker again whenever one exits 0 on its own (its stall watch shut it down),
    as a Kubernetes Deployment or Compose's ``restart`` would; yields the pids of the
    workers that were replaced."""
    restarts: list[int] = []
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.5):
            for worker in list(deployment.workers):
                if worker.poll() == 0 and worker.pid not in restarts:
                    restarts.append(worker.pid)
                    deployment.start_worker(*worker_args, wait=False)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield restarts
    finally:
        done.set()
        watcher.join()


# -- 2. Redis restarted under load ---------------------------------------------------------------


def test_a_redis_restart_under_load_loses_no_job(tmp_path: Path) -> None:
    """Redis (every write appended and fsynced) is killed with SIGKILL while 60 jobs run and
    more are submitted, and started again on its port 2 s later. The server answers
    UNAVAILABLE meanwhile (Submits are retried with their idempotency key) and NOT_SERVING;
    the workers and the server reconnect; every accepted job ends SUCCEEDED. A worker whose
    consumer stalls in the reconnection (Celery's, upstream: the test met it once before
    workers watched for it) shuts down and is started again, as Kubernetes would."""
    with (
        redis_server(durable=True) as store,
        deployed(
            tmp_path,
            sims=1,
            sim_args=("--token-latency", "0.01"),
            workers=2,
            worker_args=("--concurrency", "8"),
            env={**QUICK_REDELIVERY, "EPICRISIS_WORKER_STALL_SECONDS": "10"},
            redis_url=store.url,
        ) as running,
        supervised(running, "--concurrency", "8") as restarts,
    ):
        requests = [
            pb.SubmitRequest(bundle=SMALL, options=LLM, idempotency_key=f"restart-{n}")
            for n in range(60)
        ]
        channel, stub = running.stub()
        with channel, ThreadPoolExecutor(4) as pool:
            submitted = pool.map(lambda request: submit(stub, request), requests)
            wait_until(lambda: busy(running.sims) >= 4, "generations under way")
            store.restart(down_seconds=2.0, kill=True)
            ids = list(submitted)
            assert len(set(ids)) == len(requests)
            jobs = finals(stub, ids, 150, whereabouts(running, stub))
        assert health_becomes(running, SERVING) == SERVING
        warnings = running.worker_log.read_text(errors="replace").count("did not answer")
    states = Counter(pb.JobState.Name(job.state) for job in jobs.values())
    assert states == {"JOB_STATE_SUCCEEDED": len(requests)}, states
    assert store.restarts == 1
    print(
        f"\n{len(requests)} jobs through a Redis restart; {warnings} store waits in workers; "
        f"{len(restarts)} workers started again"
    )


def test_a_worker_whose_consumer_stalls_shuts_down_to_be_started_again(tmp_path: Path) -> None:
    """Celery's consumer can stop taking messages after Redis reconnections while the process
    and its heartbeat live on (the restart test above met it once: 48 jobs QUEUED, both
    workers alive). Stalled here on purpose (Celery's remote control cancels the worker's
    consumers): with a free slot and a job waiting, the worker says so and shuts down
    cleanly, and the worker started in its place (its supervisor's part) runs the job."""
    stall = {**QUICK_REDELIVERY, "EPICRISIS_WORKER_STALL_SECONDS": "2"}
    with deployed(tmp_path, env=stall, worker_args=("--concurrency", "2")) as running:
        app = create_app(Settings(redis_url=running.env["EPICRISIS_REDIS_URL"]))
        for queue in ("interactive", "batch"):
            replies = app.control.cancel_consumer(queue, reply=True, timeout=10)
            assert len(replies) == 1, replies
        stalled = running.workers[0]
        channel, stub = running.stub()
        with channel:
            job_id = submit(stub, pb.SubmitRequest(bundle=SMALL, options=LLM))
            assert stalled.wait(timeout=60) == 0  # a warm shutdown
            assert stub.GetJob(pb.GetJobRequest(id=job_id)).state == pb.JOB_STATE_QUEUED
            running.start_worker("--concurrency", "2")
            job = finals(stub, [job_id], explain=whereabouts(running, stub))[job_id]
        records = log_records(running.worker_log)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    (said,) = [r for r in records if "consumer has stalled" in r["message"]]
    assert said["level"] == "ERROR"


# -- 3. model endpoints away, slow or flapping ---------------------------------------------------


def test_every_endpoint_away_jobs_wait_and_health_is_not_serving(tmp_path: Path) -> None:
    """Both model servers refuse connections for 12 s (TGI reloading) while 6 jobs are
    submitted: health turns NOT_SERVING, the jobs wait and retry, and all end SUCCEEDED
    with the model's prose once the servers are back; health is SERVING again."""
    with deployed(
        tmp_path, sims=2, env={"EPICRISIS_JOB_RETRY_BACKOFF_MAX_SECONDS": "2"}
    ) as running:
        assert health_becomes(running, SERVING) == SERVING
        for url in running.sims:
            set_faults(url, {"reload": 12.0})
        seen = health_becomes(running, NOT_SERVING)
        channel, stub = running.stub()
        with channel:
            ids = [submit(stub, pb.SubmitRequest(bundle=SMALL, options=LLM)) for _ in range(6)]
            jobs = finals(stub, ids, explain=whereabouts(running, stub))
        after = health_becomes(running, SERVING)
        answered = chats_answered(running.sims)
    assert seen == NOT_SERVING
    assert after == SERVING
    for job in jobs.values():
        assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
        assert job.summary.provenance.backend == "llm" and not job.summary.provenance.fallback
    assert answered == len(ids)


def test_a_slow_endpoint_and_a_flapping_one_lose_their_traffic(tmp_path: Path) -> None:
    """Three model servers: one sound, one that takes 3 s before its first token, one that
    fails half its requests (424) and answers the other half. 40 jobs: the sound one answers
    most of them (least outstanding requests; a failing endpoint is ejected and probed back)."""
    with deployed(tmp_path, sims=3, worker_args=("--concurrency", "8")) as running:
        sound, slow, flapping = running.sims
        set_faults(slow, {"first_token_seconds": 3.0})
        set_faults(flapping, {"generation": {"probability": 0.5}})
        channel, stub = running.stub()
        with channel, ThreadPoolExecutor(8) as pool:
            requests = [pb.SubmitRequest(bundle=SMALL, options=LLM) for _ in range(40)]
            ids = list(pool.map(lambda request: submit(stub, request), requests))
            jobs = finals(stub, ids)
        answered = {url: chat_counts(url).get("200", 0) for url in running.sims}
        failed = chat_counts(flapping).get("424", 0)
    assert all(job.state == pb.JOB_STATE_SUCCEEDED for job in jobs.values())
    assert answered[sound] > answered[slow] + answered[flapping], answered
    assert answered[sound] > len(ids) / 2, answered
    print(
        f"\nanswers: sound {answered[sound]}, slow {answered[slow]}, flapping "
        f"{answered[flapping]} (and {failed} failures)"
    )


# -- 4. the server stopped mid-call; cancellation -------------------------------------------------


def sigterm_under_summarize_calls(running: Deployment) -> list[pb.Job | grpc.StatusCode]:
    """Four Summarize calls (idempotency keys ``sigterm-0`` ...) whose generations have
    started, then SIGTERM to the server, which must exit 0: what each call got."""
    channel, stub = running.stub()
    with channel, ThreadPoolExecutor(4) as pool:

        def call(n: int) -> pb.Job | grpc.StatusCode:
            request = pb.SubmitRequest(bundle=SMALL, options=LLM, idempotency_key=f"sigterm-{n}")
            try:
                job: pb.Job = stub.Summarize(request, timeout=WAIT_SECONDS)
                return job
            except grpc.RpcError as error:
                return error.code()

        calls = [pool.submit(call, n) for n in range(4)]
        wait_until(lambda: busy(running.sims) == 4, "the four generations to start")
        server = running.servers[0]
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=WAIT_SECONDS) == 0
        return [c.result(timeout=WAIT_SECONDS) for c in calls]


def test_sigterm_drains_the_calls_in_flight_and_the_server_exits_0(tmp_path: Path) -> None:
    """Summarize calls are in flight (their generations take 2 s) when the server gets
    SIGTERM: each one completes, or ends with a status a client can act on, and the
    server exits 0 without logging an error (checked as the deployment stops)."""
    with deployed(tmp_path, sim_args=("--first-token-latency", "2.0")) as running:
        results = sigterm_under_summarize_calls(running)
    clean = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    for result in results:
        if isinstance(result, pb.Job):
            assert result.state == pb.JOB_STATE_SUCCEEDED, result.error
        else:
            assert result in clean, result
    assert any(isinstance(result, pb.Job) for result in results)  # drained, not dropped


def test_calls_cut_by_a_stopping_server_leave_their_jobs_running(tmp_path: Path) -> None:
    """A rolling restart: the grace period ends before the generations do. The Summarize
    calls are cut (UNAVAILABLE or CANCELLED for their callers, who retry with their key),
    but their jobs are not cancelled: the workers finish all four."""
    env = {"EPICRISIS_SHUTDOWN_GRACE_SECONDS": "0.2"}
    with deployed(tmp_path, sim_args=("--first-token-latency", "3.0"), env=env) as running:
        codes = sigterm_under_summarize_calls(running)
        assert all(
            code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED) for code in codes
        )
        wait_until(
            lambda: running.worker_log.read_text(errors="replace").count("job succeeded") == 4,
            "the four jobs to finish in the worker",
        )
        assert "job stopped" not in running.worker_log.read_text(errors="replace")


def test_cancelling_a_running_job_stops_its_generation_and_frees_the_slot(
    tmp_path: Path,
) -> None:
    """The model takes 30 s to answer. A job cancelled (CancelJob) while its request is
    open, and a Summarize whose deadline passes while it generates: each worker drops its
    request (the simulator's slots are free again long before 30 s, and it never answered)
    and the jobs stay CANCELLED."""
    with deployed(tmp_path, sim_args=("--first-token-latency", "30")) as running:
        channel, stub = running.stub()
        with channel:
            job_id = submit(stub, pb.SubmitRequest(bundle=SMALL, options=LLM))
            wait_until(lambda: busy(running.sims) == 1, "the generation to start", 20)
            cancelled_job = stub.CancelJob(pb.CancelJobRequest(id=job_id), timeout=10)
            wait_until(lambda: busy(running.sims) == 0, "the slot to be freed", 20)
            request = pb.SubmitRequest(bundle=SMALL, options=LLM, idempotency_key="late")
            with pytest.raises(grpc.RpcError) as late:
                stub.Summarize(request, timeout=3.0)
            wait_until(lambda: busy(running.sims) == 0, "the slot to be freed", 20)
            after = stub.GetJob(pb.GetJobRequest(id=job_id), timeout=10)
            deadline_job = stub.Submit(request, timeout=10)  # the key finds it
            wait_until(lambda: outcomes(running)[(deadline_job.id, "stopped")] == 1, "a stop")
        stopped = sum(n for (_, o), n in outcomes(running).items() if o == "stopped")
        answered = chats_answered(running.sims)
    assert cancelled_job.state == pb.JOB_STATE_CANCELLED
    assert after.state == pb.JOB_STATE_CANCELLED and not after.HasField("summary")
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert deadline_job.state == pb.JOB_STATE_CANCELLED
    assert stopped == 2
    assert answered == 0


# -- the hang of the first attempt at stopping running jobs (5f067be) ---------------------------


@pytest.mark.timeout(120)
def test_deliveries_in_process_end_when_their_watch_does_not_hear_its_cancel(
    tmp_path: Path,
) -> None:
    """In-process deliveries (JobRunner on its loop, as tests/test_queue.py runs it), one
    after another: a job that succeeds, then jobs that fail at once. The first attempt at
    cancelling running jobs hung here: on Python 3.11 ``asyncio.wait_for`` loses a
    cancellation arriving as its awaitable completes (the store's watch, subscribed by the
    job before), so the watch went on and the delivery waited for it. Then a running job
    cancelled from outside stops."""
    release = threading.Event()

    async def slow(stay: Stay, options: JobOptions) -> DischargeSummary:
        if options.encounter_id == "fail":
            raise BackendRejectedError("422")
        if options.encounter_id == "hold":
            await asyncio.to_thread(release.wait, 60)
        return summarize(SMALL)

    with redis_server() as server:
        settings = Settings(
            redis_url=server.url, encryption_key=SecretStr(new_key_text()), **LOCAL_ONLY
        )
        runner = JobRunner(settings, summarizer=slow)

        async def job(tag: str | None) -> str:
            store = RedisJobStore.from_url(server.url, Sealer.from_settings(settings))
            try:
                record, _ = await store.create(idempotency_key=None, request_digest="d")
                options = JobOptions(encounter_id=tag)
                await store.put_payload(record.id, load_stay(SMALL), options)
                return record.id
            finally:
                await store.aclose()

        async def cancel_when_running(job_id: str) -> JobRecord:
            store = RedisJobStore.from_url(server.url, Sealer.from_settings(settings))
            try:
                async for record in store.watch(job_id):
                    if record.stage == "summarizing":
                        return await store.update(job_id, cancelled)
                raise AssertionError("the job ended before it was cancelled")
            finally:
                await store.aclose()

        try:
            assert runner.run(asyncio.run(job(None)), retries=0, max_retries=0) == "succeeded"
            for _ in range(5):
                assert runner.run(asyncio.run(job("fail")), retries=0, max_retries=0) == "failed"
            held = asyncio.run(job("hold"))
            with ThreadPoolExecutor(1) as pool:
                outcome = pool.submit(runner.run, held, retries=0, max_retries=0)
                record = asyncio.run(cancel_when_running(held))
                assert outcome.result(timeout=30) == "stopped"
        finally:
            release.set()
            runner.close()
    assert record.final
