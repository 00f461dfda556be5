"""The gRPC server: the service, standard health checking and reflection, graceful drain.

``create_server(address, ...)`` binds and returns ``(server, port)`` so tests bind
``127.0.0.1:0``. :func:`run_embedded` is ``epicrisis serve --embedded``: the server and an
in-process worker, no Redis, stopped by SIGINT/SIGTERM after draining in-flight calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from epicrisis.config import Settings
from epicrisis.pipeline import summarize_stay
from epicrisis.serving.embedded import EmbeddedWorker, Summarizer
from epicrisis.serving.jobs import MemoryJobStore
from epicrisis.serving.servicer import SERVICE_NAME, DischargeSummarizer
from epicrisis.stay import Stay
from epicrisis.summary.model import DischargeSummary
from epicrisis.v1 import summarizer_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
MESSAGE_OVERHEAD = 1024 * 1024  # room for the other fields of a request beside the Bundle


def create_server(
    address: str,
    servicer: DischargeSummarizer,
    health_servicer: health.aio.HealthServicer,
    *,
    max_bundle_bytes: int,
) -> tuple[grpc.aio.Server, int]:
    size = max_bundle_bytes + MESSAGE_OVERHEAD
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)]
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
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {address}")
    return server, port


async def _extractive(stay: Stay) -> DischargeSummary:
    return await asyncio.to_thread(summarize_stay, stay)


@contextlib.asynccontextmanager
async def embedded_service(
    settings: Settings,
    address: str,
    *,
    summarizer: Summarizer = _extractive,
    max_queued: int = 1000,
) -> AsyncIterator[tuple[grpc.aio.Server, int, health.aio.HealthServicer]]:
    """A started server with an in-process worker; drained and stopped on exit."""
    store = MemoryJobStore()
    worker = EmbeddedWorker(
        store, summarizer, concurrency=settings.embedded_concurrency, max_queued=max_queued
    )
    health_servicer = health.aio.HealthServicer()
    server, port = create_server(
        address,
        DischargeSummarizer(store, worker),
        health_servicer,
        max_bundle_bytes=settings.limits.max_bundle_bytes,
    )
    await worker.start()
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    try:
        yield server, port, health_servicer
    finally:
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.stop(settings.shutdown_grace_seconds)
        await worker.stop()


async def run_embedded(settings: Settings) -> None:
    """``epicrisis serve --embedded``: serve until SIGINT or SIGTERM, then drain."""
    address = f"{settings.grpc_host}:{settings.grpc_port}"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with embedded_service(settings, address) as (_, port, _health):
        sys.stderr.write(
            f"epicrisis: serving gRPC on {settings.grpc_host}:{port} (embedded worker)\n"
        )
        await stop.wait()
        sys.stderr.write("epicrisis: draining in-flight calls\n")
