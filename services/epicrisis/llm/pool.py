"""Spread generations over several LLM endpoints: least outstanding, health-checked, limited.

One TGI replica batches well only with many sequences in flight, so a worker keeps up to
the replica's ``max_concurrent_requests`` (from ``/info``) open on each endpoint, each
behind its own semaphore. A request goes to the healthy endpoint with the fewest
outstanding requests (ties in turn). An endpoint that fails with a retryable error is
ejected for a back-off that doubles with each consecutive failure; when it ends, a
``/health`` probe decides whether it takes requests again. Everything runs on the
caller's event loop: no threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType

from epicrisis.config import Settings, get_settings
from epicrisis.errors import (
    BackendError,
    BackendGenerationError,
    BackendOverloadedError,
    BackendUnavailableError,
    ConfigurationError,
)
from epicrisis.llm.client import EndpointClient, EndpointDefaults, EndpointInfo
from epicrisis.observability import metrics

HEALTH_PROBE_SECONDS = 1.5  # within the health watchdog's 2 s and the heartbeat's interval
_KINDS: tuple[tuple[type[BackendError], str], ...] = (
    (BackendUnavailableError, "unavailable"),
    (BackendOverloadedError, "overloaded"),
    (BackendGenerationError, "generation"),
)


def failure_kind(error: BackendError) -> str:
    """A short label for metrics: unavailable, overloaded, generation or rejected."""
    return next((label for kind, label in _KINDS if isinstance(error, kind)), "rejected")


@dataclass(slots=True)
class Endpoint:
    """One endpoint of the pool: its client, its limits once known, and its state."""

    index: int
    client: EndpointClient
    info: EndpointInfo | None = None
    limit: int | None = None  # generations kept in flight at most
    semaphore: asyncio.Semaphore | None = None
    waiting: int = 0  # leased, waiting for a slot
    in_flight: int = 0  # holding a slot
    strikes: int = 0  # consecutive failures (the back-off grows with them)
    ejected_until: float | None = None  # monotonic time; None while in rotation
    probe: asyncio.Task[None] | None = None
    requests: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    ejections: int = 0

    @property
    def outstanding(self) -> int:
        return self.waiting + self.in_flight


@dataclass(frozen=True, slots=True)
class EndpointStats:
    """A snapshot of one endpoint, for metrics (labels: the index, never the URL)."""

    index: int
    healthy: bool
    in_flight: int
    waiting: int
    limit: int | None
    requests: int
    failures: dict[str, int]
    ejections: int
    model_id: str | None


class EndpointPool:
    """Endpoints that share the work: ``async with pool.lease() as endpoint: ...``.

    A :class:`BackendError` leaving the ``async with`` body counts against the endpoint (a
    retryable one ejects it); a normal exit counts as a success. Close with :meth:`aclose`
    (or use the pool as an async context manager).
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        timeout: float = 180.0,
        connect_timeout: float = 5.0,
        api_key: str | None = None,
        max_in_flight: int | None = None,
        defaults: EndpointDefaults | None = None,
        eject_seconds: float = 0.5,
        max_eject_seconds: float = 30.0,
    ) -> None:
        if not urls:
            raise ConfigurationError("no LLM endpoint configured (set EPICRISIS_LLM_URLS)")
        if max_in_flight is not None and max_in_flight < 1:
            raise ConfigurationError("the in-flight limit per endpoint must be at least 1")
        self.endpoints = [
            Endpoint(
                index,
                EndpointClient(
                    url,
                    index=index,
                    timeout=timeout,
                    connect_timeout=connect_timeout,
                    api_key=api_key,
                    defaults=defaults,
                ),
            )
            for index, url in enumerate(urls)
        ]
        self.max_in_flight = max_in_flight
        self.eject_seconds = eject_seconds
        self.max_eject_seconds = max_eject_seconds
        self._turn = 0  # round-robin start among equally loaded endpoints
        self._info_locks: dict[int, asyncio.Lock] = {}
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> EndpointPool:
        """The pool ``EPICRISIS_LLM_*`` describes."""
        s = settings or get_settings()
        return cls(
            s.llm_urls,
            timeout=s.llm_timeout_seconds,
            connect_timeout=s.llm_connect_timeout_seconds,
            api_key=s.llm_api_key.get_secret_value() if s.llm_api_key else None,
            max_in_flight=s.llm_max_in_flight,
            defaults=EndpointDefaults(context_tokens=s.llm_context_tokens),
        )

    async def __aenter__(self) -> EndpointPool:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._closed = True
        probes = [e.probe for e in self.endpoints if e.probe is not None]
        for probe in probes:
            probe.cancel()
        await asyncio.gather(*probes, return_exceptions=True)
        for endpoint in self.endpoints:
            await endpoint.client.aclose()

    # -- leasing -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lease(self) -> AsyncIterator[Endpoint]:
        """An endpoint with a free generation slot, its ``info`` known.

        Raises :class:`BackendUnavailableError` (``retry_after`` set) when every endpoint is
        ejected, and the endpoint's own error when its ``/info`` cannot be read.
        """
        while True:
            endpoint = await self._pick()
            if endpoint.info is None:
                endpoint.waiting += 1  # counts as outstanding while /info is read
                try:
                    loaded = await self._load_info(endpoint)
                finally:
                    endpoint.waiting -= 1
                if not loaded:  # another lease's read failed and ejected it: choose again
                    continue
            assert endpoint.semaphore is not None
            endpoint.waiting += 1
            try:
                await endpoint.semaphore.acquire()
            finally:
                endpoint.waiting -= 1
            if endpoint.ejected_until is not None:  # failed while we waited: choose again
                endpoint.semaphore.release()
                continue
            break
        endpoint.in_flight += 1
        endpoint.requests += 1
        label = str(endpoint.index)
        try:
            yield endpoint
        except BackendError as error:
            self.record_failure(endpoint, error)
            metrics.LLM_REQUESTS.labels(label, failure_kind(error)).inc()
            raise
        else:
            endpoint.strikes = 0
            metrics.LLM_REQUESTS.labels(label, "ok").inc()
        finally:
            endpoint.in_flight -= 1
            endpoint.semaphore.release()

    async def _pick(self) -> Endpoint:
        """The ready endpoint with the fewest outstanding requests; probes the recovering."""
        while True:
            if self._closed:
                raise BackendUnavailableError("the endpoint pool is closed", retryable=False)
            now = time.monotonic()
            ready: list[Endpoint] = []
            probing: list[asyncio.Task[None]] = []
            for endpoint in self._rotation():
                if endpoint.ejected_until is None:
                    ready.append(endpoint)
                elif endpoint.ejected_until <= now:
                    probing.append(self._probe(endpoint))
            if ready:
                chosen = min(ready, key=lambda e: e.outstanding)  # first in turn among ties
                self._turn = chosen.index + 1
                return chosen
            if not probing:
                wait = min(e.ejected_until or now for e in self.endpoints) - now
                raise BackendUnavailableError(
                    "no LLM endpoint is taking requests", retry_after=max(wait, 0.0)
                )
            await asyncio.wait(probing, return_when=asyncio.FIRST_COMPLETED)

    def _rotation(self) -> list[Endpoint]:
        start = self._turn % len(self.endpoints)
        return self.endpoints[start:] + self.endpoints[:start]

    async def _load_info(self, endpoint: Endpoint) -> bool:
        """Read ``/info`` once (concurrent leases share the read); size the semaphore.

        False when the endpoint was ejected while this lease waited for another's read.
        """
        lock = self._info_locks.setdefault(endpoint.index, asyncio.Lock())
        async with lock:
            if endpoint.info is not None:
                return True
            if endpoint.ejected_until is not None:
                return False
            try:
                info = await endpoint.client.info()
            except BackendError as error:
                self.record_failure(endpoint, error)
                raise
            limit = info.max_concurrent_requests
            if self.max_in_flight is not None:
                limit = min(limit, self.max_in_flight)
            endpoint.limit = limit
            endpoint.semaphore = asyncio.Semaphore(limit)
            endpoint.info = info
            return True

    # -- health --------------------------------------------------------------------------

    def record_failure(self, endpoint: Endpoint, error: BackendError) -> None:
        """Count ``error``; eject the endpoint when another attempt there may fail alike."""
        endpoint.failures[failure_kind(error)] += 1
        if error.retryable:
            self._eject(endpoint)

    def _eject(self, endpoint: Endpoint) -> None:
        endpoint.strikes += 1
        backoff = min(self.eject_seconds * 2 ** (endpoint.strikes - 1), self.max_eject_seconds)
        until = time.monotonic() + backoff
        if endpoint.ejected_until is None:
            endpoint.ejections += 1
        endpoint.ejected_until = max(until, endpoint.ejected_until or 0.0)

    def _probe(self, endpoint: Endpoint) -> asyncio.Task[None]:
        """The running ``/health`` probe of a recovering endpoint (one at a time)."""
        if endpoint.probe is None or endpoint.probe.done():
            endpoint.probe = asyncio.ensure_future(self._run_probe(endpoint))
        return endpoint.probe

    async def _run_probe(self, endpoint: Endpoint) -> None:
        if await endpoint.client.health():
            endpoint.ejected_until = None
        else:
            endpoint.failures["unavailable"] += 1
            self._eject(endpoint)

    async def check_health(self, timeout: float = HEALTH_PROBE_SECONDS) -> bool:
        """Probe every endpoint's ``/health`` now, each for at most ``timeout`` seconds (one
        endpoint that drops packets must not hide the others); whether any answered.

        The worker's heartbeat calls this, so an idle worker notices an outage (and a
        recovery) before a job meets it: a failing endpoint leaves the rotation, and an
        ejected one whose back-off is over comes back if it answers, as with the probes of
        :meth:`lease` (an overloaded endpoint still answers ``/health``: its back-off holds).
        """

        async def probe(endpoint: Endpoint) -> bool:
            try:
                return await asyncio.wait_for(endpoint.client.health(), timeout)
            except TimeoutError:
                return False

        answers = await asyncio.gather(*(probe(e) for e in self.endpoints))
        now = time.monotonic()
        for endpoint, healthy in zip(self.endpoints, answers, strict=True):
            if healthy:
                if endpoint.ejected_until is not None and endpoint.ejected_until <= now:
                    endpoint.ejected_until = None
            elif endpoint.ejected_until is None:
                endpoint.failures["unavailable"] += 1
                self._eject(endpoint)
        return any(answers)

    async def capacity(self) -> int:
        """Generations the endpoints take at once: each one's ``/info`` limit (capped by
        ``max_in_flight``); an endpoint that cannot say yet counts as its defaults say
        (TGI's 128), since a loading TGI is the usual reason."""

        async def limit_of(endpoint: Endpoint) -> int:
            with contextlib.suppress(BackendError):
                await self._load_info(endpoint)
            if endpoint.limit is not None:
                return endpoint.limit
            default = endpoint.client.defaults.max_concurrent_requests
            return min(default, self.max_in_flight or default)

        return sum(await asyncio.gather(*(limit_of(e) for e in self.endpoints)))

    def has_ready(self, *, besides: int | None = None) -> bool:
        """Whether an endpoint (other than ``besides``) is in rotation right now."""
        return any(e.ejected_until is None and e.index != besides for e in self.endpoints)

    def stats(self) -> list[EndpointStats]:
        return [
            EndpointStats(
                index=e.index,
                healthy=e.ejected_until is None,
                in_flight=e.in_flight,
                waiting=e.waiting,
                limit=e.limit,
                requests=e.requests,
                failures=dict(e.failures),
                ejections=e.ejections,
                model_id=e.info.model_id if e.info else None,
            )
            for e in self.endpoints
        ]
