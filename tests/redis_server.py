"""A real ``redis-server`` on a free loopback port, in a temp dir, with nothing saved to disk.

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

    def __init__(self, process: subprocess.Popen[bytes], port: int, workdir: Path) -> None:
        self.process = process
        self.port = port
        self.workdir = workdir
        self.url = f"redis://127.0.0.1:{port}/0"

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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _start_once(binary: str, workdir: Path) -> RedisServer | None:
    port = _free_port()
    log = workdir / f"redis-{port}.log"
    process = subprocess.Popen(
        [
            binary,
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(workdir),
            "--logfile", str(log),
            "--protected-mode", "yes",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    server = RedisServer(process, port, workdir)
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:  # most likely the port was taken meanwhile
            return None
        with contextlib.suppress(redis.ConnectionError), server.client() as client:
            if client.ping():
                return server
        time.sleep(0.05)
    server.stop()
    return None


@contextlib.contextmanager
def redis_server() -> Iterator[RedisServer]:
    """A started server, stopped on exit; the test is skipped when no binary is on PATH."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not on PATH (install the redis-server package)")
    with tempfile.TemporaryDirectory(prefix="epicrisis-redis-") as tmp:
        for _ in range(START_ATTEMPTS):
            server = _start_once(binary, Path(tmp))
            if server is not None:
                break
        else:
            raise RuntimeError(f"redis-server did not start after {START_ATTEMPTS} attempts")
        try:
            yield server
        finally:
            server.stop()
