"""The simulator's port: bound at once, listening only when the "model" is loaded.

A loading TGI refuses connections (its port does not listen yet); clients must see exactly
that, not an HTTP error. So the port is bound without listening (the kernel answers a
connection attempt with a reset: connection refused), and a reload closes the listening
socket and binds a fresh non-listening one on the same port until the reload is over.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable

from aiohttp import web

RELOAD_DRAIN_SECONDS = 2.0  # what a request under way gets when the "model" reloads


class Listener:
    """One aiohttp application on one port, which can stop listening for a while."""

    def __init__(self, app: web.Application, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.reloads = 0
        self._runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=2.0
        )
        self._site: web.SockSite | None = None
        self._sock: socket.socket | None = None
        self._listening = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def listening(self) -> bool:
        return self._listening.is_set()

    async def open(self, delay: float = 0.0) -> None:
        """Bind the port (``port`` is then known); listen now, or after ``delay`` seconds."""
        await self._runner.setup()
        self._sock = bind(self.host, self.port)
        self.port = self._sock.getsockname()[1]
        if delay > 0:
            self.background(self._listen_after(delay))
        else:
            await self._listen()

    async def wait_listening(self) -> None:
        await self._listening.wait()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self._runner.cleanup()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._site = None
        self._listening.clear()

    async def reload(self, seconds: float, *, after: float = 0.0) -> None:
        """After ``after`` seconds, refuse new connections for ``seconds``, as a restart does.

        Open connections close too: a request under way gets up to 2 s to finish, idle
        keep-alive connections close at once (a client must not send on one and wait).
        """
        await asyncio.sleep(after)
        server = self._runner.server
        if self._site is None or server is None:
            return
        self.reloads += 1
        self._listening.clear()
        await self._site.stop()
        self._site = None
        # The port again at once, before the drain: left unbound for those 2 s, it is free
        # for any outgoing connection's ephemeral port, and then cannot be bound again.
        self._sock = bind(self.host, self.port)
        await server.shutdown(RELOAD_DRAIN_SECONDS)
        await self._listen_after(seconds)

    def background(self, coroutine: Awaitable[None]) -> None:
        """Run ``coroutine`` as a task that ``close()`` cancels."""
        task: asyncio.Task[None] = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _listen_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        await self._listen()

    async def _listen(self) -> None:
        if self._sock is None:
            return
        self._site = web.SockSite(self._runner, self._sock)
        await self._site.start()
        self._sock = None  # the site owns it now
        self._listening.set()


def bind(host: str, port: int) -> socket.socket:
    """A bound socket that does not listen yet: connections to it are refused."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock
