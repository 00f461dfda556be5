"""OpenTelemetry traces: the gRPC call, the queue, the worker's job, each LLM request.

Off unless configured: with no ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or its ``_TRACES_`` form)
the API's no-op tracer makes every span free. Configured, spans go over OTLP/HTTP in
batches. The trace context crosses the queue inside the sealed job payload (W3C
``traceparent``), so a job's spans in the worker join the trace of the call that submitted
it. Span attributes carry ids, counts and outcomes, never anything about the patient.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping

from opentelemetry import context, propagate, trace

from epicrisis import __version__
from epicrisis.observability.logs import JOB_ID

tracer = trace.get_tracer("epicrisis", __version__)


def tracing_configured() -> bool:
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    if os.environ.get("OTEL_TRACES_EXPORTER", "otlp").lower() == "none":
        return False
    return bool(
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


def configure_tracing(role: str) -> None:
    """Install an OTLP/HTTP exporting tracer provider for ``role`` when OTEL_* asks for one."""
    if not tracing_configured():
        return
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create(
        {"service.name": f"epicrisis-{role}", "service.version": __version__}
    )  # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES still override these
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)


def shutdown_tracing() -> None:
    """Send the spans still in the batch (at process exit)."""
    provider = trace.get_tracer_provider()
    shutdown = getattr(provider, "shutdown", None)
    if shutdown is not None:
        shutdown()


@contextlib.contextmanager
def job_span(job_id: str, trace_context: Mapping[str, str]) -> Iterator[trace.Span]:
    """The span of running one job, a child of the call that submitted it; log records
    inside it carry the job id."""
    token = JOB_ID.set(job_id)
    try:
        with tracer.start_as_current_span(
            "epicrisis.job",
            context=parent(trace_context),
            kind=trace.SpanKind.CONSUMER,
            attributes={"epicrisis.job_id": job_id},
        ) as span:
            yield span
    finally:
        JOB_ID.reset(token)


def carrier() -> dict[str, str]:
    """The current trace context as W3C headers (empty when no span is recording)."""
    headers: dict[str, str] = {}
    propagate.inject(headers)
    return headers


def parent(headers: Mapping[str, str]) -> context.Context:
    """The context that ``headers`` (from :func:`carrier`, or gRPC metadata) carry."""
    return propagate.extract(dict(headers))
