"""A real ``redis-server`` on a free loopback port, in a temp dir, with nothing saved to disk
(or, with ``durable=True``, every write in an append-only file, fsynced at once, as in
production), which a test may stop and start again on the same port.

Redis cannot bind port 0, so a free port is found by binding a socket first; if another
process takes it before Redis starts, the next port is tried.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

START_ATTEMPTS = 5
START_TIMEOUT_SECONDS = 10.0


class RedisServer:
    """One running server; ``url`` points at database 0."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        port: int,
        workdir: Path,
        argv: list[str] | None = None,
    ) -> None:
        self.process = process
        self.port = port
        self.workdir = workdir
        self.url = f"redis://127.0.0.1:{port}/0"
        self.argv = argv or []  # how it was started: restart() runs it again
        self.restarts = 0

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final save; what reached the AOF is all that is left."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def restart(self, *, down_seconds: float = 0.0, kill: bool = False) -> None:
        """Stop the server (SIGTERM, or SIGKILL with ``kill``), wait ``down_seconds``, start it
        again on the same port with the same files, and wait until it answers."""
        if kill:
            self.kill()
        else:
            self.stop()
        time.sleep(down_seconds)
        deadline = time.monotonic() + START_TIMEOUT_SECONDS * 3
        while True:  # the port may linger a moment in the kernel after the old process
            self.process = subprocess.Popen(
                self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            if _answers(self, self.process, deadline):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not restart on port {self.port}")
            time.sleep(0.1)
        self.restarts += 1


def _answers(server: RedisServer, process: subprocess.Popen[bytes], deadline: float) -> bool:
    """Whether the started ``process`` answers PING before ``deadline`` (False: it exited)."""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        with (
            contextlib.suppress(redis.ConnectionError, redis.BusyLoadingError),
            server.client() as client,
        ):
            if client.ping():
                return True
        time.sleep(0.05)
    server.stop()
    return False


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _start_once(binary: str, workdir: Path, durable: bool) -> RedisServer | None:
    port = _free_port()
    log = workdir / f"redis-{port}.log"
    persistence = (
        ["--appendonly", "yes", "--appendfsync", "always"] if durable else ["--appendonly", "no"]
    )
    argv = [
        binary,
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--save", "",
        *persistence,
        "--dir", str(workdir),
        "--logfile", str(log),
        "--protected-mode", "yes",
    ]  # fmt: skip
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = RedisServer(process, port, workdir, argv)
    # most likely the port was taken meanwhile when it exits at once
    return server if _answers(server, process, time.monotonic() + START_TIMEOUT_SECONDS) else None


@contextlib.contextmanager
def redis_server(*, durable: bool = False) -> Iterator[RedisServer]:
    """A started server, stopped on exit; the test is skipped when no binary is on PATH.
    ``durable``: every write appended to a file and fsynced before Redis answers, so a
    restart (:meth:`RedisServer.restart`) loses nothing that was acknowledged."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not on PATH (install the redis-server package)")
    with tempfile.TemporaryDirectory(prefix="epicrisis-redis-") as tmp:
        for _ in range(START_ATTEMPTS):
            server = _start_once(binary, Path(tmp), durable)
            if server is not None:
                break
        else:
            raise RuntimeError(f"redis-server did not start after {START_ATTEMPTS} attempts")
        try:
            yield server
        finally:
            server.stop()
