"""The queued deployment as separate processes on loopback: redis-server, ``epicrisis
worker`` (Celery), ``epicrisis serve`` (gRPC) and ``epicrisis tgi-sim`` (the model)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import grpc
import pytest
from fhir.resources.R4B.bundle import Bundle
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epicrisis.errors import StayError
from epicrisis.pipeline import load_stay
from epicrisis.serving.crypto import new_key_text
from epicrisis.v1 import summarizer_pb2 as pb
from epicrisis.v1 import summarizer_pb2_grpc as pb_grpc
from redis_server import redis_server

EPICRISIS = Path(sys.executable).parent / "epicrisis"
SAMPLE = resources.files("epicrisis.samples").joinpath("sample-stay.json").read_bytes()
CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "fhir"
WAIT_SECONDS = 60


@dataclass
class Deployment:
    target: str
    env: dict[str, str]


def _banner_port(process: subprocess.Popen[str], pattern: str) -> str:
    assert process.stderr is not None
    line = process.stderr.readline()
    match = re.search(pattern, line)
    assert match, line
    return match.group(1)


def _stop(process: subprocess.Popen[str]) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise
    finally:
        if process.stderr is not None:
            process.stderr.close()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    base = {k: v for k, v in os.environ.items() if not k.startswith("EPICRISIS_")}
    with redis_server() as redis:
        sim = subprocess.Popen(
            [str(EPICRISIS), "tgi-sim", "--port", "0"], stderr=subprocess.PIPE, text=True
        )
        sim_port = _banner_port(sim, r"http://127\.0\.0\.1:(\d+)")
        env = base | {
            "EPICRISIS_REDIS_URL": redis.url,
            "EPICRISIS_ENCRYPTION_KEY": new_key_text(),
            "EPICRISIS_LLM_URLS": f"http://127.0.0.1:{sim_port}",
            "EPICRISIS_GRPC_PORT": "0",
        }
        with log.open("w") as sink:
            worker = subprocess.Popen(
                [str(EPICRISIS), "worker", "--concurrency", "8"],
                env=env, stdout=sink, stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip
        deadline = time.monotonic() + WAIT_SECONDS
        while " ready." not in log.read_text(errors="replace"):
            assert worker.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        server = subprocess.Popen(
            [str(EPICRISIS), "serve"], env=env, stderr=subprocess.PIPE, text=True
        )
        try:
            port = _banner_port(server, r"127\.0\.0\.1:(\d+)")
            yield Deployment(f"127.0.0.1:{port}", env)
        finally:
            assert _stop(server) == 0
            assert _stop(worker) == 0, log.read_text()[-3000:]
            _stop(sim)


def _stub(target: str) -> tuple[grpc.Channel, pb_grpc.DischargeSummarizerStub]:
    channel = grpc.insecure_channel(target)
    return channel, pb_grpc.DischargeSummarizerStub(channel)


def test_health_reports_serving(deployment: Deployment) -> None:
    with grpc.insecure_channel(deployment.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 10
        status = None
        while time.monotonic() < deadline:
            status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                break
            time.sleep(0.2)
        assert status == health_pb2.HealthCheckResponse.SERVING


def test_the_sample_is_summarized_by_the_model_through_the_queue(deployment: Deployment) -> None:
    channel, stub = _stub(deployment.target)
    with channel:
        request = pb.SubmitRequest(bundle=SAMPLE, options=pb.SummaryOptions(backend=pb.BACKEND_LLM))
        job = stub.Summarize(request, timeout=WAIT_SECONDS)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    assert job.summary.provenance.backend == "llm"
    assert not job.summary.provenance.fallback
    assert job.summary.provenance.model == "m42-health/Llama3-Med42-70B"
    Bundle.model_validate_json(job.fhir_document)


def test_bad_input_is_refused_before_anything_is_queued(deployment: Deployment) -> None:
    channel, stub = _stub(deployment.target)
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
    deployment: Deployment,
) -> None:
    bundles = _inpatient_bundles()
    assert len(bundles) >= 39
    channel, stub = _stub(deployment.target)

    def one(path: Path) -> pb.Job:
        request = pb.SubmitRequest(
            bundle=path.read_bytes(),
            options=pb.SummaryOptions(backend=pb.BACKEND_LLM, priority=pb.PRIORITY_BATCH),
        )
        return stub.Summarize(request, timeout=WAIT_SECONDS * 3)

    with channel, ThreadPoolExecutor(8) as pool:
        jobs = list(pool.map(one, bundles))
    for path, job in zip(bundles, jobs, strict=True):
        assert job.state == pb.JOB_STATE_SUCCEEDED, (path.name, job.error)
        assert job.summary.provenance.backend == "llm" and not job.summary.provenance.fallback
        Bundle.model_validate_json(job.fhir_document)


def test_the_queued_server_refuses_to_start_without_its_key(deployment: Deployment) -> None:
    env = {k: v for k, v in deployment.env.items() if k != "EPICRISIS_ENCRYPTION_KEY"}
    result = subprocess.run(
        [str(EPICRISIS), "serve"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 3
    assert result.stderr.count("\n") == 1 and "EPICRISIS_ENCRYPTION_KEY" in result.stderr
