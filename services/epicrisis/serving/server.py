"""The gRPC server: the service, standard health checking and reflection, graceful drain.

``create_server(address, ...)`` binds and returns ``(server, port)`` so tests bind
``127.0.0.1:0``. :func:`run_server` is ``epicrisis serve [--embedded]``: the server with an
in-process worker, or queueing to Celery on Redis; stopped by SIGINT/SIGTERM after draining
in-flight calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import get_args

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from epicrisis.config import Settings
from epicrisis.errors import ConfigurationError
from epicrisis.observability import metrics
from epicrisis.observability.tracing import configure_tracing, shutdown_tracing
from epicrisis.serving.audit import Auditor
from epicrisis.serving.auth import ApiKeys
from epicrisis.serving.backends import BackendChooser, JobSummarizer
from epicrisis.serving.embedded import EmbeddedWorker
from epicrisis.serving.ingest import StayLoader, default_processes
from epicrisis.serving.interceptor import ObservedCalls
from epicrisis.serving.jobs import MemoryJobStore
from epicrisis.serving.servicer import SERVICE_NAME, DischargeSummarizer
from epicrisis.v1 import summarizer_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
MESSAGE_OVERHEAD = 1024 * 1024  # room for the other fields of a request beside the Bundle


def create_server(
    address: str,
    servicer: DischargeSummarizer,
    health_servicer: health.aio.HealthServicer,
    *,
    max_bundle_bytes: int,
    credentials: grpc.ServerCredentials | None = None,
    keys: ApiKeys | None = None,
) -> tuple[grpc.aio.Server, int]:
    """A server on ``address``: TLS with ``credentials`` (None: plaintext), callers
    authenticated by ``keys`` (None: anonymous)."""
    size = max_bundle_bytes + MESSAGE_OVERHEAD
    server = grpc.aio.server(
        interceptors=[ObservedCalls(keys, servicer.auditor)],
        options=[
            ("grpc.max_receive_message_length", size),
            ("grpc.max_send_message_length", size),
            ("grpc.so_reuseport", 0),  # a second server on a taken port must fail, not share it
        ],
    )
    pb_grpc.add_DischargeSummarizerServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError:  # grpc's word for a bind failure
        port = 0
    if port == 0:
        raise OSError(errno.EADDRINUSE, f"could not listen on {address} (address in use?)")
    return server, port


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS from ``EPICRISIS_GRPC_TLS_*`` (mutual when a client CA is set); None (plaintext)
    only when ``EPICRISIS_GRPC_ALLOW_PLAINTEXT`` says so: never by default."""
    cert, key, client_ca = (
        settings.grpc_tls_cert_file,
        settings.grpc_tls_key_file,
        settings.grpc_tls_client_ca_file,
    )
    if cert is None and key is None:
        if client_ca is not None:
            raise ConfigurationError("EPICRISIS_GRPC_TLS_CLIENT_CA_FILE needs a server certificate")
        if settings.grpc_allow_plaintext:
            return None
        raise ConfigurationError(
            "no TLS certificate: set EPICRISIS_GRPC_TLS_CERT_FILE and EPICRISIS_GRPC_TLS_KEY_FILE "
            "(or EPICRISIS_GRPC_ALLOW_PLAINTEXT=true, for local use only)"
        )
    if cert is None or key is None:
        raise ConfigurationError(
            "EPICRISIS_GRPC_TLS_CERT_FILE and EPICRISIS_GRPC_TLS_KEY_FILE go together"
        )
    pem = {name: _read_pem(path, name) for name, path in (("CERT", cert), ("KEY", key))}
    ca = None if client_ca is None else _read_pem(client_ca, "CLIENT_CA")
    return grpc.ssl_server_credentials(
        [(pem["KEY"], pem["CERT"])], root_certificates=ca, require_client_auth=ca is not None
    )


def api_keys(settings: Settings) -> ApiKeys | None:
    """The callers of ``EPICRISIS_API_KEYS_FILE``; None (anonymous) only when
    ``EPICRISIS_ALLOW_ANONYMOUS`` says so: never by default."""
    if settings.api_keys_file is not None:
        return ApiKeys.from_file(settings.api_keys_file)
    if settings.allow_anonymous:
        return None
    raise ConfigurationError(
        "no API keys: set EPICRISIS_API_KEYS_FILE (see `epicrisis api-key`), "
        "or EPICRISIS_ALLOW_ANONYMOUS=true for local use only"
    )


def _read_pem(path: Path, name: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read EPICRISIS_GRPC_TLS_{name}_FILE ({exc.strerror or type(exc).__name__})"
        ) from None
    if b"-----BEGIN " not in data:
        raise ConfigurationError(f"EPICRISIS_GRPC_TLS_{name}_FILE is not PEM")
    return data


@contextlib.asynccontextmanager
async def embedded_service(
    settings: Settings,
    address: str,
    *,
    summarizer: JobSummarizer | None = None,
    max_queued: int | None = None,
) -> AsyncIterator[tuple[grpc.aio.Server, int, health.aio.HealthServicer]]:
    """A started server with an in-process worker; drained and stopped on exit."""
    store = MemoryJobStore()
    chooser = BackendChooser(settings)
    worker = EmbeddedWorker(
        store,
        summarizer or chooser,
        concurrency=settings.embedded_concurrency,
        max_queued=max_queued or settings.max_queued_jobs,
    )
    health_servicer = health.aio.HealthServicer()
    loader = _stay_loader(settings)
    server, port = create_server(
        address,
        DischargeSummarizer(
            store, worker, Auditor.from_settings(settings), loader, settings.limits
        ),
        health_servicer,
        max_bundle_bytes=settings.limits.max_bundle_bytes,
        credentials=server_credentials(settings),
        keys=api_keys(settings),
    )
    await _set_status(health_servicer, health_pb2.HealthCheckResponse.SERVING, "embedded")

    async def llm_answers() -> bool:  # True without an LLM: the extractive backend serves
        return await chooser.llm_health() is not False

    async def sample() -> None:
        worker.sample_queue()

    await worker.start()
    try:
        await loader.start()
        async with _watched(server, health_servicer, [llm_answers], settings, sample, "embedded"):
            yield server, port, health_servicer
    finally:
        await worker.stop()
        await chooser.aclose()
        await loader.aclose()


@contextlib.asynccontextmanager
async def queued_service(
    settings: Settings, address: str
) -> AsyncIterator[tuple[grpc.aio.Server, int, health.aio.HealthServicer]]:
    """A started server that queues to Celery on Redis; refuses to start without its key."""
    from epicrisis.serving.crypto import Sealer
    from epicrisis.serving.queue import QUEUES, create_app
    from epicrisis.serving.queued import QueuedWorker
    from epicrisis.serving.redis_store import RedisJobStore
    from epicrisis.serving.workers import LlmState, ready

    sealer = Sealer.from_settings(settings)  # no key outside the embedded mode: an error now
    store = RedisJobStore.from_url(
        settings.redis_url,
        sealer,
        ttl_seconds=settings.job_ttl_seconds,
        prefix=settings.redis_key_prefix,
    )
    app = create_app(settings)
    health_servicer = health.aio.HealthServicer()
    worker = QueuedWorker(store, app, max_queued=settings.max_queued_jobs)
    loader = _stay_loader(settings)
    servicer = DischargeSummarizer(
        store, worker, Auditor.from_settings(settings), loader, settings.limits
    )
    server, port = create_server(
        address,
        servicer,
        health_servicer,
        max_bundle_bytes=settings.limits.max_bundle_bytes,
        credentials=server_credentials(settings),
        keys=api_keys(settings),
    )

    async def redis_answers() -> bool:
        await store.ping()
        return True

    async def workers_ready() -> bool:  # alive, and reaching a model (their heartbeats)
        return ready(await store.live_workers())

    async def sample() -> None:
        """The queues' depth and age, and the workers' states, for the metrics."""
        for queue in QUEUES:
            metrics.QUEUE_DEPTH.labels(queue).set(await store.queue_depth(queue))
            metrics.QUEUE_OLDEST_AGE.labels(queue).set(await store.queue_oldest_age(queue))
        states = Counter(worker.llm for worker in await store.live_workers())
        for state in get_args(LlmState):
            metrics.WORKERS.labels(state).set(states[state])

    try:
        await loader.start()
        checks: list[Check] = [redis_answers, workers_ready]
        async with _watched(server, health_servicer, checks, settings, sample, "queued"):
            yield server, port, health_servicer
            # Draining now: a Summarize still open when the grace period ends is cut by the
            # stop, not by its caller; its job goes on in the workers (a retry with the same
            # idempotency key finds it), so it is not cancelled.
            servicer.keep_jobs_of_cut_calls = True
    finally:
        await store.aclose()
        await loader.aclose()


def _stay_loader(settings: Settings) -> StayLoader:
    """The server's Bundle validation; its processes start with the server, once the
    settings have been found sound and the port bound."""
    processes = settings.ingest_processes
    return StayLoader(settings.limits, default_processes() if processes is None else processes)


Check = Callable[[], Awaitable[bool]]
Sampler = Callable[[], Awaitable[None]]
WATCH_SECONDS = 2.0  # how often health is checked and the queue gauges sampled


@contextlib.asynccontextmanager
async def _watched(
    server: grpc.aio.Server,
    health_servicer: health.aio.HealthServicer,
    checks: list[Check],
    settings: Settings,
    sample: Sampler,
    mode: str,
) -> AsyncIterator[None]:
    """The server started, health following ``checks`` and the gauges ``sample`` while the
    body runs; then NOT_SERVING and a drained stop (also when starting failed half way).

    With ``EPICRISIS_HEALTH_PORT`` the same health status is also served alone, in
    plaintext, on that port: Kubernetes' gRPC probes speak neither TLS nor API keys, and
    the status says nothing about any patient.
    """
    probes: grpc.aio.Server | None = None
    try:
        if settings.health_port is not None:
            probes = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer, probes)
            address = f"{settings.grpc_host}:{settings.health_port}"
            try:
                port = probes.add_insecure_port(address)
            except RuntimeError:
                port = 0
            if port == 0:
                raise OSError(errno.EADDRINUSE, f"could not listen on {address} (address in use?)")
            await probes.start()
            log.info("gRPC health alone, in plaintext, on %s:%d", settings.grpc_host, port)
        await server.start()
        watchdog = asyncio.create_task(_watch(checks, health_servicer, sample, mode))
        try:
            yield
        finally:
            watchdog.cancel()
    finally:
        await _set_status(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING, mode)
        await server.stop(settings.shutdown_grace_seconds)
        if probes is not None:
            await probes.stop(0)


async def _set_status(health_servicer: health.aio.HealthServicer, status: int, mode: str) -> None:
    """The same status for the whole server ("") and the summarizer service (and its gauge,
    labelled with the mode: queued or embedded)."""
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, status)
    metrics.SERVING.labels(mode).set(1 if status == health_pb2.HealthCheckResponse.SERVING else 0)


async def _watch(
    checks: list[Check], health_servicer: health.aio.HealthServicer, sample: Sampler, mode: str
) -> None:
    """SERVING while every check passes, else NOT_SERVING; checked every 2 s so load
    balancers and probes see an outage. Queued: Redis answers and some worker reports it
    reaches a model (the server itself never calls the model servers). Embedded: some LLM
    endpoint answers, when one is configured."""
    while True:
        ok = True
        for check in checks:
            try:
                ok = ok and await asyncio.wait_for(check(), WATCH_SECONDS)
            except Exception:  # unreachable or broken: not serving, whatever the cause
                ok = False
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ok
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await _set_status(health_servicer, status, mode)
        try:
            await asyncio.wait_for(sample(), WATCH_SECONDS)
        except Exception as exc:  # the gauges keep their last values; health says the rest
            log.warning("metrics sample failed (%s)", type(exc).__name__)
        await asyncio.sleep(WATCH_SECONDS)


async def run_server(settings: Settings, *, embedded: bool) -> None:
    """``epicrisis serve [--embedded]``: serve until SIGINT or SIGTERM, then drain."""
    address = f"{settings.grpc_host}:{settings.grpc_port}"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    service = embedded_service(settings, address) if embedded else queued_service(settings, address)
    mode = "embedded worker" if embedded else f"jobs queued on {_redacted(settings.redis_url)}"
    transport = (
        "plaintext"
        if settings.grpc_tls_cert_file is None
        else "mutual TLS"
        if settings.grpc_tls_client_ca_file is not None
        else "TLS"
    )
    callers = "API keys" if settings.api_keys_file is not None else "anonymous callers"
    metrics_address = metrics.serve_metrics(settings, default_port=metrics.SERVER_PORT)
    configure_tracing("server")
    try:
        async with service as (_, port, _health):
            log.info(
                "serving gRPC on %s:%d (%s; %s, %s); metrics on %s",
                settings.grpc_host,
                port,
                mode,
                transport,
                callers,
                metrics_address,
            )
            await stop.wait()
            log.info("draining in-flight calls")
    finally:
        shutdown_tracing()


def _redacted(url: str) -> str:
    """A Redis URL without its password, fit for a log line."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rsplit('@', 1)[-1]}"
