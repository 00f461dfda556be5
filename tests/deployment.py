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
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import grpc

from certs import Authority, Issued
from epicrisis.serving.auth import new_key
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


CALLERS = {"ehr": "", "other": "", "reader": "read"}  # a secure deployment's callers, rights


@dataclass
class Security:
    """A secure deployment's trust: its CA, a client certificate, and each caller's key."""

    ca: bytes
    client: Issued
    keys: dict[str, str]  # caller -> API key

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca,
            private_key=self.client.key,
            certificate_chain=self.client.cert,
        )


def _secure_env(folder: Path) -> tuple[dict[str, str], Security]:
    """Mutual TLS and API keys for a server: certificates and keys file in ``folder``."""
    authority = Authority("epicrisis test CA")
    cert, key = authority.issue("127.0.0.1", server=True).write(folder, "server")
    (folder / "ca.crt").write_bytes(authority.pem)
    keys, lines = {}, []
    for caller, rights in CALLERS.items():
        keys[caller], line = new_key(caller, rights)
        lines.append(line)
    (folder / "api-keys").write_text("\n".join(lines) + "\n")
    env = {
        "EPICRISIS_GRPC_TLS_CERT_FILE": str(cert),
        "EPICRISIS_GRPC_TLS_KEY_FILE": str(key),
        "EPICRISIS_GRPC_TLS_CLIENT_CA_FILE": str(folder / "ca.crt"),
        "EPICRISIS_API_KEYS_FILE": str(folder / "api-keys"),
    }
    return env, Security(authority.pem, authority.issue("ehr-client", server=False), keys)


class _Key(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):  # type: ignore[misc]
    """Adds a caller's API key to every call of a channel."""

    def __init__(self, key: str) -> None:
        self._metadata = [("authorization", f"Bearer {key}")]

    def _keyed(self, details: Any) -> Any:
        return details._replace(metadata=[*(details.metadata or ()), *self._metadata])

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._keyed(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._keyed(details), request)


@dataclass
class Deployment:
    """A running queued deployment: the server's address, the environment its processes
    share, the simulators' URLs, and the workers (logging to one file)."""

    target: str
    env: dict[str, str]
    sims: list[str]  # base URLs of the simulators the worker uses
    worker_log: Path
    workers: list[subprocess.Popen[str]]
    security: Security | None = None  # None: plaintext, anonymous callers
    servers: list[subprocess.Popen[str]] = field(default_factory=list)  # `epicrisis serve`

    def channel(self, caller: str | None = "ehr") -> grpc.Channel:
        """A channel to the server: over mutual TLS as ``caller`` (None: no key) when the
        deployment is secure, else plaintext."""
        if self.security is None:
            return grpc.insecure_channel(self.target)
        channel = grpc.secure_channel(self.target, self.security.credentials())
        if caller is None:
            return channel
        return grpc.intercept_channel(channel, _Key(self.security.keys[caller]))

    def stub(
        self, caller: str | None = "ehr"
    ) -> tuple[grpc.Channel, pb_grpc.DischargeSummarizerStub]:
        channel = self.channel(caller)
        return channel, pb_grpc.DischargeSummarizerStub(channel)

    def summarize(self, bundle: bytes = SAMPLE, options: pb.SummaryOptions = LLM) -> pb.Job:
        channel, stub = self.stub()
        with channel:
            job: pb.Job = stub.Summarize(
                pb.SubmitRequest(bundle=bundle, options=options), timeout=WAIT_SECONDS
            )
            return job

    def start_worker(self, *args: str, wait: bool = True) -> subprocess.Popen[str]:
        """One more ``epicrisis worker``, logging to :attr:`worker_log`; with ``wait``, once
        it is ready (every worker started so far must have said so)."""
        with self.worker_log.open("a") as sink:
            worker = subprocess.Popen(
                [str(EPICRISIS), "worker", *args],
                env=self.env, stdout=sink, stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip
        self.workers.append(worker)
        if not wait:
            return worker
        deadline = time.monotonic() + WAIT_SECONDS
        while self.worker_log.read_text(errors="replace").count(" ready.") < len(self.workers):
            assert worker.poll() is None and time.monotonic() < deadline, self.log_tail()
            time.sleep(0.05)
        return worker

    def log_tail(self) -> str:
        return self.worker_log.read_text(errors="replace")[-4000:]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from the parent ids in ``/proc/<n>/stat`` (a server's
    ingest processes, say)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):  # a process that ended while we looked
            # the command name (field 2) is in parentheses and may hold spaces
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


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


def metrics_address(log: Path) -> str:
    """``host:port`` of the /metrics that a server or worker logging to ``log`` announced."""
    deadline = time.monotonic() + WAIT_SECONDS
    pattern = r"metrics on http://(127\.0\.0\.1:\d+)/metrics"
    while not (found := re.search(pattern, log.read_text(errors="replace"))):
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
        time.sleep(0.05)
    return found.group(1)


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


def _start_server(
    stack: contextlib.ExitStack,
    logs: Path,
    env: dict[str, str],
    *args: str,
    processes: list[subprocess.Popen[str]] | None = None,
) -> str:
    """``epicrisis serve`` with ``args``; its address. Stopped by ``stack``, exiting 0
    (a test may stop it first: it must still have exited 0). ``processes`` gets its process."""
    log = logs / "server.log"
    argv = [str(EPICRISIS), "serve", *args]
    server, port = launch(argv, env, log, r"serving gRPC on 127\.0\.0\.1:(\d+)")
    if processes is not None:
        processes.append(server)

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
    secure: bool = False,
    redis_url: str | None = None,
) -> Iterator[Deployment]:
    """Redis, ``sims`` simulators (plus ``dead_endpoints`` URLs that refuse connections),
    ``workers`` worker processes and the server; stopped in reverse order, each required to
    exit cleanly. ``secure``: the server with mutual TLS and API keys (:data:`CALLERS`),
    as in production; else plaintext with anonymous callers. ``redis_url``: a Redis the
    caller runs (with a password or TLS, say) instead of a fresh one."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("EPICRISIS_")}
    security_env, security = _secure_env(tmp) if secure else (LOCAL_ENV, None)
    own_redis = redis_server() if redis_url is None else contextlib.nullcontext(None)
    with own_redis as redis, contextlib.ExitStack() as stack:
        urls = [_start_sim(stack, tmp, *sim_args) for _ in range(sims)]
        settings = (
            base
            | {
                "EPICRISIS_REDIS_URL": redis.url if redis is not None else str(redis_url),
                "EPICRISIS_ENCRYPTION_KEY": new_key_text(),
                "EPICRISIS_LLM_URLS": ",".join(urls + [_closed_port_url()] * dead_endpoints),
                "EPICRISIS_GRPC_PORT": "0",
                "EPICRISIS_METRICS_PORT": "0",
                "EPICRISIS_WORKER_HEARTBEAT_SECONDS": "0.5",
                **security_env,
                "EPICRISIS_JOB_RETRY_BACKOFF_MAX_SECONDS": "4",
            }
            | (env or {})
        )
        deployment = Deployment("", settings, urls, tmp / "worker.log", [], security)

        def stop_workers() -> None:
            for worker in deployment.workers:
                assert stop(worker) == 0, deployment.log_tail()

        stack.callback(stop_workers)
        for _ in range(workers):
            deployment.start_worker(*worker_args)
        deployment.target = _start_server(stack, tmp, settings, processes=deployment.servers)
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
