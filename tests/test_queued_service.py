"""The queued deployment as separate processes on loopback: redis-server, ``epicrisis
worker`` (Celery), ``epicrisis serve`` (gRPC) and ``epicrisis tgi-sim`` (the model).

Faults are set on the running simulators through their control routes; what happened is read
from the jobs and from the simulators' counters. No test asserts a timing: waits are bounds
against hanging.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from fhir.resources.R4B.bundle import Bundle
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deployment import EPICRISIS, LLM, SAMPLE, WAIT_SECONDS, Deployment, deployed, stop
from epicrisis.errors import StayError
from epicrisis.pipeline import load_stay
from epicrisis.v1 import summarizer_pb2 as pb
from epicrisis.v1 import summarizer_pb2_grpc as pb_grpc
from sim_control import CHAT, chat_counts, refused, set_faults, sim_state, wait_until

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "fhir"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """Two simulators behind one worker: the deployment the tests below share."""
    with deployed(tmp_path_factory.mktemp("queued"), sims=2) as running:
        yield running


@pytest.fixture
def sims(deployment: Deployment) -> Iterator[list[str]]:
    """The shared simulators, with no fault in force and fresh counters, before and after."""
    clean = {"clear": True, "reset_counters": True}
    for url in deployment.sims:
        set_faults(url, clean)
    yield deployment.sims
    for url in deployment.sims:
        set_faults(url, {"clear": True, "first_token_seconds": 0.0})


def health_becomes(target: str, wanted: int, limit: float = 30.0) -> int:
    """The status once it is ``wanted``, or the last one seen when ``limit`` runs out (the
    server re-checks every 2 s, the workers report every 0.5 s here)."""
    seen = -1
    deadline = time.monotonic() + limit
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            seen = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
            if seen == wanted:
                break
            time.sleep(0.2)
    return seen


def fired(urls: Sequence[str], kind: str) -> int:
    return sum(sim_state(url)["fired"][kind] for url in urls)


def assert_llm_success(job: pb.Job, *, fallback: bool = False) -> None:
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    assert job.summary.provenance.backend == "llm"
    assert job.summary.provenance.fallback is fallback
    Bundle.model_validate_json(job.fhir_document)


# -- the happy path -----------------------------------------------------------------------


def test_health_reports_serving(deployment: Deployment) -> None:
    assert health_becomes(deployment.target, SERVING) == SERVING


def test_the_sample_is_summarized_by_the_model_through_the_queue(
    deployment: Deployment, sims: list[str]
) -> None:
    job = deployment.summarize()
    assert_llm_success(job)
    assert job.summary.provenance.model == "m42-health/Llama3-Med42-70B"


def test_bad_input_is_refused_before_anything_is_queued(deployment: Deployment) -> None:
    channel, stub = deployment.stub()
    with channel, pytest.raises(grpc.RpcError) as raised:
        stub.Submit(pb.SubmitRequest(bundle=b'{"resourceType": "Patient"}'), timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def _inpatient_bundles() -> list[Path]:
    found = []
    for path in sorted(CORPUS.glob("*/*.json")):
        if path.parent.name == "clinosim-reference":
            continue
        try:
            load_stay(path.read_bytes())
        except StayError:
            continue
        found.append(path)
    return found


@pytest.mark.corpus
@pytest.mark.skipif(not CORPUS.is_dir(), reason="shared corpus not found at ../shared/data/fhir")
def test_every_inpatient_stay_of_the_corpus_through_grpc_with_the_model(
    deployment: Deployment, sims: list[str]
) -> None:
    bundles = _inpatient_bundles()
    assert len(bundles) >= 39
    batch = pb.SummaryOptions(backend=pb.BACKEND_LLM, priority=pb.PRIORITY_BATCH)
    with ThreadPoolExecutor(8) as pool:
        jobs = list(pool.map(lambda p: deployment.summarize(p.read_bytes(), batch), bundles))
    for path, job in zip(bundles, jobs, strict=True):
        assert job.state == pb.JOB_STATE_SUCCEEDED, (path.name, job.error)
        assert_llm_success(job)
    assert all(chat_counts(url).get("200", 0) > 0 for url in sims)  # both endpoints worked


def test_the_queued_server_refuses_to_start_without_its_key(deployment: Deployment) -> None:
    env = {k: v for k, v in deployment.env.items() if k != "EPICRISIS_ENCRYPTION_KEY"}
    result = subprocess.run(
        [str(EPICRISIS), "serve"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 3
    assert result.stderr.count("\n") == 1 and "EPICRISIS_ENCRYPTION_KEY" in result.stderr


# -- model faults, end to end ----------------------------------------------------------------


def test_overloaded_endpoints_are_retried_until_the_job_succeeds(
    deployment: Deployment, sims: list[str]
) -> None:
    for url in sims:
        set_faults(url, {"overloaded": {"next": 2}})
    assert_llm_success(deployment.summarize())
    assert fired(sims, "overloaded") >= 2  # 429s were met, and the job still succeeded


def test_refused_connections_and_unhealthy_endpoints_are_retried_until_the_job_succeeds(
    deployment: Deployment, sims: list[str]
) -> None:
    for url in sims:  # TGI reloading: connections refused, then /health 503, then back
        set_faults(url, {"reload": 1.5, "unhealthy": {"next": 3}})
    for url in sims:  # the reload begins just after the control call has answered
        wait_until(lambda url=url: refused(url), "the reload to close the port")
    assert_llm_success(deployment.summarize())
    for url in sims:  # both back before their counters are read
        wait_until(lambda url=url: not refused(url), "the port to open again")
    assert fired(sims, "unhealthy") >= 1


@pytest.mark.parametrize("kind", ["off_schema", "unverifiable", "malformed"])
def test_a_bad_answer_ends_in_a_flagged_fallback(
    deployment: Deployment, sims: list[str], kind: str
) -> None:
    for url in sims:
        set_faults(url, {kind: {"probability": 1.0}})
    job = deployment.summarize()
    assert_llm_success(job, fallback=True)
    assert fired(sims, kind) == 2  # the answer and its one retry
    course = next(s for s in job.summary.sections if s.key == "hospital_course")
    assert course.narrative  # the extractive prose stands in


def test_a_rejected_request_fails_the_job_with_its_reason(
    deployment: Deployment, sims: list[str]
) -> None:
    for url in sims:
        set_faults(url, {"validation": {"probability": 1.0}})
    job = deployment.summarize()
    assert job.state == pb.JOB_STATE_FAILED and not job.HasField("summary")
    assert job.error.message and not job.error.retryable
    assert fired(sims, "validation") == 1  # a 422 is not retried


# -- the job contract: idempotency, cancellation, deadlines --------------------------------


def slow_model(sims: Sequence[str], seconds: float = 3.0) -> None:
    for url in sims:
        set_faults(url, {"first_token_seconds": seconds})


def wait_for_outcome(deployment: Deployment, outcome: str, count: int = 1) -> None:
    """Until the worker has logged ``count`` task outcomes ``outcome`` ('skipped' ...)."""
    deadline = time.monotonic() + WAIT_SECONDS
    while deployment.worker_log.read_text(errors="replace").count(f": '{outcome}'") < count:
        assert time.monotonic() < deadline, deployment.log_tail()
        time.sleep(0.1)


def test_the_same_idempotency_key_gives_one_job_and_one_generation(
    deployment: Deployment, sims: list[str]
) -> None:
    slow_model(sims, 1.0)
    request = pb.SubmitRequest(bundle=SAMPLE, options=LLM, idempotency_key="discharge-7")
    channel, stub = deployment.stub()
    with channel, ThreadPoolExecutor(4) as pool:
        ids = set(pool.map(lambda _: stub.Submit(request, timeout=10).id, range(4)))
        assert len(ids) == 1
        job = _final(stub, ids.pop())
        again = stub.Summarize(request, timeout=WAIT_SECONDS)  # after it finished, too
    assert_llm_success(job)
    assert again.id == job.id and again.state == pb.JOB_STATE_SUCCEEDED
    assert sum(chat_counts(url).get("200", 0) for url in sims) == 1


def test_a_cancelled_job_stays_cancelled_when_its_generation_ends(
    deployment: Deployment, sims: list[str]
) -> None:
    slow_model(sims)
    stopped_before = deployment.worker_log.read_text(errors="replace").count(": 'stopped'")
    channel, stub = deployment.stub()
    with channel:
        job_id = stub.Submit(pb.SubmitRequest(bundle=SAMPLE, options=LLM), timeout=10).id
        for seen in stub.WatchJob(pb.WatchJobRequest(id=job_id), timeout=WAIT_SECONDS):
            if seen.state == pb.JOB_STATE_RUNNING:
                break
        cancelled = stub.CancelJob(pb.CancelJobRequest(id=job_id), timeout=10)
        wait_for_outcome(deployment, "stopped", stopped_before + 1)  # the worker stopped it
        after = stub.GetJob(pb.GetJobRequest(id=job_id), timeout=10)
    assert cancelled.state == pb.JOB_STATE_CANCELLED
    assert after.state == pb.JOB_STATE_CANCELLED and not after.HasField("summary")


def test_summarize_past_its_deadline_cancels_the_job(
    deployment: Deployment, sims: list[str]
) -> None:
    slow_model(sims)
    request = pb.SubmitRequest(bundle=SAMPLE, options=LLM, idempotency_key="late-1")
    channel, stub = deployment.stub()
    with channel:
        with pytest.raises(grpc.RpcError) as raised:
            stub.Summarize(request, timeout=1.0)
        job = stub.Submit(request, timeout=10)  # the key finds the job the deadline cut off
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert job.state == pb.JOB_STATE_CANCELLED


# -- deployments of their own ---------------------------------------------------------------


def test_past_the_queue_bound_submit_is_resource_exhausted_and_nothing_is_lost(
    tmp_path: Path,
) -> None:
    bound = 2
    with deployed(
        tmp_path,
        sim_args=("--first-token-latency", "1.0"),
        worker_args=("--concurrency", "1"),
        env={"EPICRISIS_MAX_QUEUED_JOBS": str(bound)},
    ) as running:
        channel, stub = running.stub()
        accepted: list[str] = []
        refused: list[grpc.RpcError] = []
        with channel:
            for _ in range(bound + 4):
                try:
                    request = pb.SubmitRequest(bundle=SAMPLE, options=LLM)
                    accepted.append(stub.Submit(request, timeout=10).id)
                except grpc.RpcError as error:
                    refused.append(error)
            finals = [_final(stub, job_id) for job_id in accepted]
    assert refused and all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in refused)
    assert len(accepted) <= bound + 2  # waiting, plus the one running and one prefetched
    assert all(job.state == pb.JOB_STATE_SUCCEEDED for job in finals)


def test_one_endpoint_refusing_connections_moves_all_traffic_to_the_other(
    tmp_path: Path,
) -> None:
    with deployed(tmp_path, sims=1, dead_endpoints=1) as running:
        assert health_becomes(running.target, SERVING) == SERVING  # one endpoint is enough
        with ThreadPoolExecutor(6) as pool:
            jobs = list(pool.map(lambda _: running.summarize(), range(6)))
        for job in jobs:
            assert_llm_success(job)
        assert chat_counts(running.sims[0]) == {"200": 6}


def test_health_follows_the_workers_and_their_endpoints(tmp_path: Path) -> None:
    with deployed(tmp_path) as running:
        seen: dict[str, int] = {"start": health_becomes(running.target, SERVING)}
        set_faults(running.sims[0], {"reload": 5.0})  # the only endpoint refuses connections
        seen["endpoint down"] = health_becomes(running.target, NOT_SERVING)
        seen["endpoint back"] = health_becomes(running.target, SERVING)
        assert stop(running.workers.pop()) == 0  # the only worker leaves
        seen["no worker"] = health_becomes(running.target, NOT_SERVING)
        running.start_worker("--concurrency", "2")
        seen["worker back"] = health_becomes(running.target, SERVING)
        assert_llm_success(running.summarize())
    assert seen == {
        "start": SERVING,
        "endpoint down": NOT_SERVING,
        "endpoint back": SERVING,
        "no worker": NOT_SERVING,
        "worker back": SERVING,
    }


def test_one_worker_keeps_the_endpoints_limit_of_generations_in_flight(tmp_path: Path) -> None:
    """No --concurrency: the worker sizes itself from /info (6 slots, and 2 to spare) and
    keeps all 6 busy under a backlog, never past them (no 429)."""
    limit, backlog = 6, 24
    sim_args = ("--max-concurrent-requests", str(limit), "--first-token-latency", "1.0")
    with deployed(tmp_path, sim_args=sim_args, worker_args=()) as running:
        channel, stub = running.stub()
        batch = pb.SummaryOptions(backend=pb.BACKEND_LLM, priority=pb.PRIORITY_BATCH)
        with channel:
            ids = [
                stub.Submit(pb.SubmitRequest(bundle=SAMPLE, options=batch), timeout=10).id
                for _ in range(backlog)
            ]
            finals = [_final(stub, job_id) for job_id in ids]
        counters: dict[str, Any] = sim_state(running.sims[0])["counters"]
        banner = running.worker_log.read_text(errors="replace")
    assert all(job.state == pb.JOB_STATE_SUCCEEDED for job in finals)
    assert re.search(rf"concurrency:\s+{limit + 2} \(thread\)", banner), banner[:3000]
    assert counters["max_in_flight"] == limit
    assert counters["requests"][CHAT] == {"200": backlog}  # never a 429


def _final(stub: pb_grpc.DischargeSummarizerStub, job_id: str) -> pb.Job:
    for job in stub.WatchJob(pb.WatchJobRequest(id=job_id), timeout=WAIT_SECONDS * 2):
        if job.state in (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED):
            final: pb.Job = job
            return final
    raise AssertionError("a watch ends with a final state")
