"""Metrics, logs and traces of a running queued deployment, read by real tools.

One deployment (redis-server, a simulator, a worker, the server) runs a few summaries and a
bad Bundle; a real Prometheus scrapes the server and the worker and answers queries for the
key series; ``promtool check metrics`` lints both expositions; an OTLP/HTTP receiver in this
process collects the spans of both processes; the logs are JSON lines with job ids and no
patient data.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from deployment import (
    EPICRISIS,
    LOCAL_ENV,
    SAMPLE,
    WAIT_SECONDS,
    Deployment,
    deployed,
    launch,
    metrics_address,
    stop,
)
from epicrisis.observability.logs import JOB_ID, JsonFormatter
from epicrisis.v1 import summarizer_pb2 as pb
from epicrisis.v1 import summarizer_pb2_grpc as pb_grpc
from sim_control import set_faults
from tools import tool

SUMMARIES = 3
JOBS = SUMMARIES + 2  # and two Submits, watched
PATIENT = ("Patient1", "FORCED-0001")  # the sample's patient name and MRN: never in telemetry


@dataclass
class Spans:
    """What the OTLP/HTTP receiver was sent: every span with its service name."""

    received: list[tuple[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def named(self, name: str) -> list[tuple[str, Any]]:
        with self.lock:
            return [(service, span) for service, span in self.received if span.name == name]


@contextlib.contextmanager
def otlp_receiver() -> Iterator[tuple[str, Spans]]:
    """An OTLP/HTTP trace endpoint on loopback (protobuf bodies, as the exporter sends)."""
    spans = Spans()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            request = ExportTraceServiceRequest.FromString(body)
            with spans.lock:
                for resource_spans in request.resource_spans:
                    attributes = {
                        a.key: a.value.string_value for a in resource_spans.resource.attributes
                    }
                    for scope in resource_spans.scope_spans:
                        spans.received.extend(
                            (attributes.get("service.name", ""), span) for span in scope.spans
                        )
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", spans
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class Observed:
    deployment: Deployment
    server_metrics: str  # host:port of each /metrics
    worker_metrics: str
    spans: Spans
    logs: Path


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    logs = tmp_path_factory.mktemp("observed")
    with otlp_receiver() as (endpoint, spans):
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "200",  # ms: spans leave within a fraction of a second
            "EPICRISIS_LOG_FORMAT": "json",
        }
        with deployed(logs, env=env) as deployment:
            channel, stub = deployment.stub()
            with channel:
                for _ in range(SUMMARIES):
                    job = stub.Summarize(
                        pb.SubmitRequest(
                            bundle=SAMPLE, options=pb.SummaryOptions(backend=pb.BACKEND_LLM)
                        ),
                        timeout=WAIT_SECONDS,
                    )
                    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
                submitted = stub.Submit(pb.SubmitRequest(bundle=SAMPLE), timeout=WAIT_SECONDS)
                watch = pb.WatchJobRequest(id=submitted.id)
                watched = list(stub.WatchJob(watch, timeout=WAIT_SECONDS))  # until it ends
                assert watched[-1].state == pb.JOB_STATE_SUCCEEDED
                set_faults(deployment.sims[0], {"first_token_seconds": 1.0})
                slow = stub.Submit(pb.SubmitRequest(bundle=SAMPLE), timeout=WAIT_SECONDS)
                stream = stub.WatchJob(pb.WatchJobRequest(id=slow.id), timeout=WAIT_SECONDS)
                next(stream)
                stream.cancel()  # a caller that stops listening while the job runs
                set_faults(deployment.sims[0], {"first_token_seconds": 0.0})
                rest = list(stub.WatchJob(pb.WatchJobRequest(id=slow.id), timeout=WAIT_SECONDS))
                assert rest[-1].state == pb.JOB_STATE_SUCCEEDED
                with pytest.raises(grpc.RpcError) as refused:
                    stub.Submit(
                        pb.SubmitRequest(bundle=b'{"resourceType": "Bundle"'), timeout=WAIT_SECONDS
                    )
                assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            yield Observed(
                deployment,
                metrics_address(logs / "server.log"),
                metrics_address(deployment.worker_log),
                spans,
                logs,
            )


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        return str(response.read().decode())


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def prometheus(tmp: Path, targets: dict[str, str]) -> Iterator[str]:
    """A real Prometheus scraping ``targets`` (job name -> host:port) every second."""
    config = tmp / "prometheus.yml"
    scrape_configs = [
        {"job_name": job, "scrape_interval": "1s", "static_configs": [{"targets": [address]}]}
        for job, address in targets.items()
    ]
    config.write_text(
        json.dumps({"global": {"scrape_interval": "1s"}, "scrape_configs": scrape_configs})
    )
    binary = tool("prometheus")  # skips (or fails) before anything is opened
    port = _free_port()
    log = (tmp / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def query(base: str, expr: str) -> list[dict[str, Any]]:
    url = f"{base}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    with urllib.request.urlopen(url, timeout=10) as response:
        answer = json.loads(response.read())
    assert answer["status"] == "success", answer
    return list(answer["data"]["result"])


def eventually(base: str, expr: str, wanted: float, *, at_least: bool = False) -> float:
    """The value of a one-series ``expr`` once it is ``wanted`` (or more), else the last one
    seen when the bound runs out: Prometheus scrapes each target on its own schedule."""
    seen = float("nan")
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            result = query(base, expr)
            if result:
                seen = float(result[0]["value"][1])
                if seen == wanted or (at_least and seen >= wanted):
                    return seen
        time.sleep(0.25)
    return seen


def test_a_real_prometheus_scrapes_the_server_and_the_worker(
    observed: Observed, tmp_path: Path
) -> None:
    targets = {
        "epicrisis-server": observed.server_metrics,
        "epicrisis-worker": observed.worker_metrics,
    }
    with prometheus(tmp_path, targets) as base:
        assert eventually(base, 'sum(up{job=~"epicrisis-.*"})', 2) == 2
        summarized = 'sum(epicrisis_rpc_requests_total{method="Summarize",code="OK"})'
        assert eventually(base, summarized, SUMMARIES) == SUMMARIES
        refused = 'sum(epicrisis_rpc_requests_total{method="Submit",code="INVALID_ARGUMENT"})'
        assert eventually(base, refused, 1) == 1
        watched = 'sum(epicrisis_rpc_requests_total{method="WatchJob",code="OK"})'
        assert eventually(base, watched, 2) == 2
        dropped = 'sum(epicrisis_rpc_requests_total{method="WatchJob",code="CANCELLED"})'
        assert eventually(base, dropped, 1) == 1
        finished = 'sum by (job) (epicrisis_jobs_finished_total{state="succeeded"})'
        assert eventually(base, finished, JOBS) == JOBS
        assert query(base, finished)[0]["metric"]["job"] == "epicrisis-worker"
        assert (
            eventually(base, 'sum(epicrisis_jobs_submitted_total{priority="interactive"})', JOBS)
            == JOBS
        )
        for stage, job in [
            ("ingest", "epicrisis-server"), ("queue_wait", "epicrisis-worker"),
            ("prompt", "epicrisis-worker"), ("generation", "epicrisis-worker"),
            ("verification", "epicrisis-worker"), ("end_to_end", "epicrisis-worker"),
        ]:  # fmt: skip
            count = f'epicrisis_stage_duration_seconds_count{{stage="{stage}",job="{job}"}}'
            assert eventually(base, count, SUMMARIES, at_least=True) >= SUMMARIES, stage
        assert eventually(base, 'epicrisis_llm_slots{endpoint="0"}', 128) == 128  # the sim's /info
        assert eventually(base, 'epicrisis_llm_endpoint_up{endpoint="0"}', 1) == 1
        assert (
            eventually(
                base,
                'epicrisis_llm_requests_total{endpoint="0",outcome="ok"}',
                SUMMARIES,
                at_least=True,
            )
            >= SUMMARIES
        )
        assert eventually(base, "sum(epicrisis_prompt_tokens_count)", JOBS) == JOBS
        assert eventually(base, "sum(epicrisis_generated_tokens_count)", JOBS) == JOBS
        assert eventually(base, "sum(epicrisis_prompt_budget_used_ratio_count)", JOBS) == JOBS
        assert eventually(base, "sum(epicrisis_grounding_ratio_count)", JOBS) == JOBS
        assert eventually(base, 'epicrisis_queue_depth{queue="interactive"}', 0) == 0
        assert eventually(base, 'epicrisis_workers{llm="ready"}', 1) == 1
        assert eventually(base, 'epicrisis_serving{mode="queued"}', 1) == 1
        assert eventually(base, 'epicrisis_job_slots{job="epicrisis-worker"}', 8) == 8
        assert eventually(base, 'count(epicrisis_build_info{version!=""})', 2) == 2


def test_promtool_finds_no_problem_in_either_exposition(observed: Observed) -> None:
    for address in (observed.server_metrics, observed.worker_metrics):
        text = scrape(address)
        checked = subprocess.run(
            [tool("promtool"), "check", "metrics"], input=text, capture_output=True, text=True
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr


def test_no_metric_label_carries_patient_data(observed: Observed) -> None:
    for address in (observed.server_metrics, observed.worker_metrics):
        text = scrape(address)
        assert text.count("epicrisis_") > 50
        for value in PATIENT:
            assert value not in text


def test_one_trace_runs_from_the_grpc_call_through_the_queue_to_the_model(
    observed: Observed,
) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while len(observed.spans.named("llm.generate")) < JOBS:
        assert time.monotonic() < deadline, "the worker's spans never arrived"
        time.sleep(0.1)
    calls = observed.spans.named("epicrisis.v1.DischargeSummarizer/Summarize")
    calls += observed.spans.named("epicrisis.v1.DischargeSummarizer/Submit")
    jobs = observed.spans.named("epicrisis.job")
    generations = observed.spans.named("llm.generate")
    assert {service for service, _ in calls} == {"epicrisis-server"}
    assert {service for service, _ in jobs} == {"epicrisis-worker"}
    by_id = {span.span_id: span for _, span in calls + jobs}
    for _, generation in generations:
        job = by_id[generation.parent_span_id]  # the model request is a step of the job ...
        call = by_id[job.parent_span_id]  # ... which the gRPC call submitted, across the queue
        assert generation.trace_id == job.trace_id == call.trace_id
        assert call.name.endswith(("/Summarize", "/Submit"))
    for _, span in observed.spans.received:
        text = span.SerializeToString()
        assert all(value.encode() not in text for value in PATIENT)


def test_logs_are_json_lines_that_name_jobs_and_never_the_patient(observed: Observed) -> None:
    for log in (observed.logs / "server.log", observed.deployment.worker_log):
        text = log.read_text()
        assert all(value not in text for value in PATIENT)
        records = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        assert records, text[-2000:]
        assert all({"time", "level", "logger", "message"} <= record.keys() for record in records)
        assert [r for r in records if r["level"] == "ERROR"] == []  # e.g. a span's context
    server = [
        json.loads(line)
        for line in (observed.logs / "server.log").read_text().splitlines()
        if line.startswith("{")
    ]
    assert any("serving gRPC" in record["message"] for record in server)
    accepted = [record for record in server if record["message"].startswith("job accepted")]
    assert len(accepted) == JOBS
    assert all({"job_id", "request_id", "trace_id"} <= record.keys() for record in accepted)
    worker = [
        json.loads(line)
        for line in observed.deployment.worker_log.read_text().splitlines()
        if line.startswith("{")
    ]
    assert any(re.fullmatch(r"[0-9a-f]{32}", record.get("job_id", "")) for record in worker)


def test_a_taken_metrics_port_stops_the_server_with_one_line(observed: Observed) -> None:
    port = observed.server_metrics.rsplit(":", 1)[1]
    env = observed.deployment.env | {"EPICRISIS_METRICS_PORT": port}
    taken = subprocess.run(
        [str(EPICRISIS), "serve"], env=env, capture_output=True, text=True, timeout=60
    )
    assert taken.returncode == 3
    assert taken.stderr.count("\n") == 1 and "EPICRISIS_METRICS_PORT" in taken.stderr


def test_a_logged_exception_shows_its_type_and_frames_never_its_text() -> None:
    """Library exceptions can quote their input (a validation error, say): never logged."""
    formatter = JsonFormatter("server")
    try:
        raise ValueError(f"bad value {PATIENT[0]}")
    except ValueError:
        record = logging.getLogger("test").makeRecord(
            "test", logging.ERROR, __file__, 1, "job failed", (), sys.exc_info()
        )
    token = JOB_ID.set("0" * 32)
    try:
        line = json.loads(formatter.format(record))
    finally:
        JOB_ID.reset(token)
    assert line["exception"] == "ValueError" and line["job_id"] == "0" * 32
    assert line["stack"] and PATIENT[0] not in json.dumps(line)


def test_the_embedded_server_exports_its_own_queue_and_jobs(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPICRISIS_")}
    env |= {"EPICRISIS_GRPC_PORT": "0", "EPICRISIS_METRICS_PORT": "0", **LOCAL_ENV}
    log = tmp_path / "server.log"
    server, port = launch(
        [str(EPICRISIS), "serve", "--embedded"], env, log, r"serving gRPC on 127\.0\.0\.1:(\d+)"
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            job = pb_grpc.DischargeSummarizerStub(channel).Summarize(
                pb.SubmitRequest(bundle=SAMPLE), timeout=WAIT_SECONDS
            )
        assert job.state == pb.JOB_STATE_SUCCEEDED
        text = scrape(metrics_address(log))
    finally:
        assert stop(server) == 0, log.read_text()[-3000:]
    assert 'epicrisis_jobs_finished_total{state="succeeded"} 1.0' in text
    assert 'epicrisis_queue_depth{queue="embedded"} 0.0' in text
    assert 'epicrisis_serving{mode="embedded"} 1.0' in text
    assert 'epicrisis_rpc_requests_total{code="OK",method="Summarize"} 1.0' in text
    assert "epicrisis_job_slots 2.0" in text  # EPICRISIS_EMBEDDED_CONCURRENCY's default
