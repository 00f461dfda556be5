"""The queued deployment as processes on loopback, for tests and benchmarks: redis-server,
``epicrisis tgi-sim`` simulators, ``epicrisis worker`` processes and ``epicrisis serve``."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import grpc

from epicrisis.serving.crypto import new_key_text
from epicrisis.v1 import summarizer_pb2 as pb
from epicrisis.v1 import summarizer_pb2_grpc as pb_grpc
from redis_server import redis_server

EPICRISIS = Path(sys.executable).parent / "epicrisis"
SAMPLE = resources.files("epicrisis.samples").joinpath("sample-stay.json").read_bytes()
WAIT_SECONDS = 60  # a bound against hanging, never a timing assertion
# Plaintext and anonymous callers, which a server allows only when told: the tests of
# everything but security; tests/test_security.py runs with TLS and API keys.
LOCAL_ENV = {"EPICRISIS_GRPC_ALLOW_PLAINTEXT": "true", "EPICRISIS_ALLOW_ANONYMOUS": "true"}
LOCAL_ONLY = {"grpc_allow_plaintext": True, "allow_anonymous": True}  # the same, as Settings
LLM = pb.SummaryOptions(backend=pb.BACKEND_LLM)


@dataclass
class Deployment:
    """A running queued deployment: the server's address, the environment its processes
    share, the simulators' URLs, and the workers (logging to one file)."""

    target: str
    env: dict[str, str]
    sims: list[str]  # base URLs of the simulators the worker uses
    worker_log: Path
    workers: list[subprocess.Popen[str]]

    def stub(self) -> tuple[grpc.Channel, pb_grpc.DischargeSummarizerStub]:
        channel = grpc.insecure_channel(self.target)
        return channel, pb_grpc.DischargeSummarizerStub(channel)

    def summarize(self, bundle: bytes = SAMPLE, options: pb.SummaryOptions = LLM) -> pb.Job:
        channel, stub = self.stub()
        with channel:
            job: pb.Job = stub.Summarize(
                pb.SubmitRequest(bundle=bundle, options=options), timeout=WAIT_SECONDS
            )
            return job

    def start_worker(self, *args: str) -> subprocess.Popen[str]:
        with self.worker_log.open("a") as sink:
            worker = subprocess.Popen(
                [str(EPICRISIS), "worker", *args],
                env=self.env, stdout=sink, stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip
        self.workers.append(worker)
        deadline = time.monotonic() + WAIT_SECONDS
        while self.worker_log.read_text(errors="replace").count(" ready.") < len(self.workers):
            assert worker.poll() is None and time.monotonic() < deadline, self.log_tail()
            time.sleep(0.05)
        return worker

    def log_tail(self) -> str:
        return self.worker_log.read_text(errors="replace")[-4000:]


def launch(
    argv: Sequence[str], env: dict[str, str] | None, log: Path, banner: str
) -> tuple[subprocess.Popen[str], str]:
    """Start a process logging to ``log``; wait for the ``banner`` regex, return its group."""
    with log.open("w") as sink:
        process = subprocess.Popen(
            list(argv), env=env, stdout=sink, stderr=subprocess.STDOUT, text=True
        )
    deadline = time.monotonic() + WAIT_SECONDS
    while not (match := re.search(banner, log.read_text(errors="replace"))):
        if process.poll() is not None or time.monotonic() > deadline:
            stop(process)
            raise AssertionError(f"{argv[1]} did not start:\n{log.read_text(errors='replace')}")
        time.sleep(0.02)
    return process, match.group(1)


def stop(process: subprocess.Popen[str]) -> int:
    if process.poll() is not None:
        return process.returncode
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=60)  # a warm shutdown finishes the jobs it holds
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise


def _start_sim(stack: contextlib.ExitStack, logs: Path, *args: str) -> str:
    log = logs / f"sim-{len(list(logs.glob('sim-*')))}.log"
    argv = [str(EPICRISIS), "tgi-sim", "--port", "0", *args]
    sim, port = launch(argv, None, log, r"http://127\.0\.0\.1:(\d+)")
    stack.callback(stop, sim)
    return f"http://127.0.0.1:{port}"


def _start_server(stack: contextlib.ExitStack, logs: Path, env: dict[str, str], *args: str) -> str:
    """``epicrisis serve`` with ``args``; its address. Stopped by ``stack``, exiting 0."""
    log = logs / "server.log"
    argv = [str(EPICRISIS), "serve", *args]
    server, port = launch(argv, env, log, r"serving gRPC on 127\.0\.0\.1:(\d+)")

    def stop_cleanly() -> None:
        assert stop(server) == 0, f"the server did not exit 0:\n{log.read_text()[-3000:]}"
        errors = [line for line in log.read_text().splitlines() if '"level":"ERROR"' in line]
        assert errors == [], "the server logged errors:\n" + "\n".join(errors)[-3000:]

    stack.callback(stop_cleanly)
    return f"127.0.0.1:{port}"


def _closed_port_url() -> str:
    """A loopback URL nothing listens on: a connection there is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


@contextlib.contextmanager
def deployed(
    tmp: Path,
    *,
    sims: int = 1,
    sim_args: Sequence[str] = (),
    dead_endpoints: int = 0,
    worker_args: Sequence[str] = ("--concurrency", "8"),
    workers: int = 1,
    env: dict[str, str] | None = None,
) -> Iterator[Deployment]:
    """Redis, ``sims`` simulators (plus ``dead_endpoints`` URLs that refuse connections),
    ``workers`` worker processes and the server; stopped in reverse order, each required to
    exit cleanly."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("EPICRISIS_")}
    with redis_server() as redis, contextlib.ExitStack() as stack:
        urls = [_start_sim(stack, tmp, *sim_args) for _ in range(sims)]
        settings = (
            base
            | {
                "EPICRISIS_REDIS_URL": redis.url,
                "EPICRISIS_ENCRYPTION_KEY": new_key_text(),
                "EPICRISIS_LLM_URLS": ",".join(urls + [_closed_port_url()] * dead_endpoints),
                "EPICRISIS_GRPC_PORT": "0",
                "EPICRISIS_METRICS_PORT": "0",
                "EPICRISIS_WORKER_HEARTBEAT_SECONDS": "0.5",
                **LOCAL_ENV,
                "EPICRISIS_JOB_RETRY_BACKOFF_MAX_SECONDS": "4",
            }
            | (env or {})
        )
        deployment = Deployment("", settings, urls, tmp / "worker.log", [])

        def stop_workers() -> None:
            for worker in deployment.workers:
                assert stop(worker) == 0, deployment.log_tail()

        stack.callback(stop_workers)
        for _ in range(workers):
            deployment.start_worker(*worker_args)
        deployment.target = _start_server(stack, tmp, settings)
        yield deployment


@contextlib.contextmanager
def embedded(
    *, sims: int = 1, sim_args: Sequence[str] = (), env: dict[str, str] | None = None
) -> Iterator[tuple[str, list[str]]]:
    """``epicrisis serve --embedded`` in front of ``sims`` simulators: its address and theirs."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("EPICRISIS_")}
    with (
        tempfile.TemporaryDirectory(prefix="epicrisis-embedded-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        logs = Path(tmp)
        urls = [_start_sim(stack, logs, *sim_args) for _ in range(sims)]
        settings = base | {
            "EPICRISIS_LLM_URLS": ",".join(urls),
            "EPICRISIS_GRPC_PORT": "0",
            "EPICRISIS_METRICS_PORT": "0",
            **LOCAL_ENV,
        }
        yield _start_server(stack, logs, settings | (env or {}), "--embedded"), urls
