"""The service's Prometheus metrics: one catalogue, shared by the server and the workers.

Every name starts with ``epicrisis_``; units are in the names; counters end in ``_total``.
Labels take values from small fixed sets (RPC method and code, job state, stage, queue,
endpoint index, warning code, verification rule): never a URL, an id or anything about a
patient. Each process (``epicrisis serve``, every ``epicrisis worker``) serves its own
``/metrics`` on ``EPICRISIS_METRICS_PORT``; a worker is one process whose jobs run on
threads and one event loop, so the default registry counts them all (no multiprocess mode
is needed, and none is used).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, Info, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from epicrisis import __version__
from epicrisis.config import Settings
from epicrisis.errors import ConfigurationError

if TYPE_CHECKING:
    from epicrisis.llm.pool import EndpointPool
    from epicrisis.summary.model import DischargeSummary

# An LLM job takes seconds to minutes (a 70B model at ~20 tokens/s writes 1,500 tokens in
# 75 s; retries and queueing add more): the buckets reach half an hour.
JOB_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    20,
    30,
    45,
    60,
    90,
    120,
    180,
    300,
    600,
    1200,
    1800,
)
RPC_BUCKETS = JOB_BUCKETS
TOKEN_BUCKETS = (
    64,
    128,
    256,
    512,
    1024,
    1536,
    2048,
    3072,
    4096,
    6144,
    8192,
    12288,
    16384,
    32768,
    131072,
)
RATIO_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 1.0)

STAGES = ("ingest", "queue_wait", "prompt", "generation", "verification", "end_to_end")

BUILD = Info("epicrisis_build", "The running version of Epicrisis.")
BUILD.info({"version": __version__})

# -- the gRPC edge (server) ----------------------------------------------------------------
RPC_REQUESTS = Counter(
    "epicrisis_rpc_requests",
    "gRPC calls answered, by method and status code.",
    ["method", "code"],
)
RPC_DURATION = Histogram(
    "epicrisis_rpc_duration_seconds",
    "Time to answer a gRPC call, by method.",
    ["method"],
    buckets=RPC_BUCKETS,
)
SERVING = Gauge(
    "epicrisis_serving",
    "1 while the server's gRPC health status is SERVING, else 0 (mode: queued or embedded; "
    "only servers export it).",
    ["mode"],
)

# -- jobs ----------------------------------------------------------------------------------
JOBS_SUBMITTED = Counter(
    "epicrisis_jobs_submitted", "Jobs accepted and queued, by priority.", ["priority"]
)
JOBS_FINISHED = Counter(
    "epicrisis_jobs_finished",
    "Jobs that reached a final state (succeeded, failed, cancelled).",
    ["state"],
)
JOB_RETRIES = Counter(
    "epicrisis_job_retries",
    "Jobs sent back to the queue after a retryable backend failure, by its kind.",
    ["reason"],
)
STAGE_DURATION = Histogram(
    "epicrisis_stage_duration_seconds",
    "Time spent in each stage of a job: ingest (validation at Submit), queue_wait, prompt, "
    "generation, verification, end_to_end (Submit to the final state).",
    ["stage"],
    buckets=JOB_BUCKETS,
)
JOBS_REQUEUED = Counter(
    "epicrisis_jobs_requeued",
    "Jobs queued again because their message was lost (a worker died taking it, or the "
    "server could not send it).",
)
QUEUE_DEPTH = Gauge("epicrisis_queue_depth", "Jobs waiting in each queue.", ["queue"])
QUEUE_OLDEST_AGE = Gauge(
    "epicrisis_queue_oldest_age_seconds",
    "Age of the oldest job waiting in each queue (0 when it is empty).",
    ["queue"],
)
JOBS_RUNNING = Gauge("epicrisis_jobs_running", "Jobs this process is running now.")
JOB_SLOTS = Gauge("epicrisis_job_slots", "Jobs this process can run at once.")
WORKERS = Gauge(
    "epicrisis_workers",
    "Live workers by what their last heartbeat said of the model (ready, down, none).",
    ["llm"],
)

# -- ingest and the prompt -----------------------------------------------------------------
INGEST_WARNINGS = Counter(
    "epicrisis_ingest_warnings",
    "Problems in accepted Bundles that the summary worked around, by warning code.",
    ["code"],
)
PROMPT_TOKENS = Histogram(
    "epicrisis_prompt_tokens",
    "Prompt tokens sent to the model per summary.",
    buckets=TOKEN_BUCKETS,
)
GENERATED_TOKENS = Histogram(
    "epicrisis_generated_tokens",
    "Tokens the model generated per summary.",
    buckets=TOKEN_BUCKETS,
)
PROMPT_BUDGET_USED = Histogram(
    "epicrisis_prompt_budget_used_ratio",
    "Share of the prompt's token budget a summary's prompt used.",
    buckets=RATIO_BUCKETS,
)
PROMPT_OMITTED = Counter(
    "epicrisis_prompt_omitted_items",
    "Items the prompt budget left out, by section.",
    ["section"],
)

# -- the model and the verifier ------------------------------------------------------------
LLM_REQUESTS = Counter(
    "epicrisis_llm_requests",
    "Generation requests to each LLM endpoint (by index, as in EPICRISIS_LLM_URLS), by "
    "outcome: ok, unavailable, overloaded, generation, rejected.",
    ["endpoint", "outcome"],
)
LLM_REQUEST_DURATION = Histogram(
    "epicrisis_llm_request_duration_seconds",
    "Time from sending a generation request to its answer, by endpoint.",
    ["endpoint"],
    buckets=JOB_BUCKETS,
)
LLM_RETRIES = Counter(
    "epicrisis_llm_retries",
    "Generation requests sent again after a transport failure, by its kind.",
    ["reason"],
)
VERIFICATION_FAILURES = Counter(
    "epicrisis_verification_failures",
    "Model answers that failed verification, by rule broken.",
    ["rule"],
)
FALLBACKS = Counter(
    "epicrisis_fallbacks",
    "Summaries whose prose fell back to the extractive writer after failed verification.",
)
GROUNDING = Histogram(
    "epicrisis_grounding_ratio",
    "Share of a verified answer's sentences grounded in the lines they cite.",
    buckets=RATIO_BUCKETS,
)


class _EndpointCollector(Collector):
    """Per-endpoint gauges read at scrape time from the live endpoint pools of this process."""

    def __init__(self) -> None:
        self._pools: weakref.WeakSet[EndpointPool] = weakref.WeakSet()
        self._lock = threading.Lock()

    def watch(self, pool: EndpointPool) -> None:
        with self._lock:
            self._pools.add(pool)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        in_flight = GaugeMetricFamily(
            "epicrisis_llm_in_flight",
            "Generations in flight on each LLM endpoint.",
            labels=["endpoint"],
        )
        slots = GaugeMetricFamily(
            "epicrisis_llm_slots",
            "Generations each LLM endpoint takes at once (its /info limit, capped by "
            "EPICRISIS_LLM_MAX_IN_FLIGHT); absent until /info is read.",
            labels=["endpoint"],
        )
        up = GaugeMetricFamily(
            "epicrisis_llm_endpoint_up",
            "1 while an LLM endpoint is in rotation, 0 while it is ejected.",
            labels=["endpoint"],
        )
        with self._lock:
            pools = list(self._pools)
        totals: dict[str, list[int]] = {}
        for pool in pools:
            for stats in pool.stats():
                label = str(stats.index)
                seen = totals.setdefault(label, [0, 0, 0])
                seen[0] += stats.in_flight
                seen[1] += stats.limit or 0
                seen[2] = max(seen[2], int(stats.healthy))
        for label, (flying, limit, healthy) in sorted(totals.items()):
            in_flight.add_metric([label], flying)
            if limit:
                slots.add_metric([label], limit)
            up.add_metric([label], healthy)
        yield from (in_flight, slots, up)


ENDPOINTS = _EndpointCollector()
REGISTRY.register(ENDPOINTS)


def watch_pool(pool: EndpointPool) -> None:
    """Export ``pool``'s per-endpoint gauges for as long as it lives."""
    ENDPOINTS.watch(pool)


def record_summary(summary: DischargeSummary) -> None:
    """Count what one finished summary's provenance says (tokens, budget, omissions,
    fallback, grounding, stage times): numbers only, nothing from its text."""
    provenance = summary.provenance
    if provenance.prompt_tokens:
        PROMPT_TOKENS.observe(provenance.prompt_tokens)
    if provenance.generated_tokens:
        GENERATED_TOKENS.observe(provenance.generated_tokens)
    if provenance.prompt_budget_used is not None:
        PROMPT_BUDGET_USED.observe(provenance.prompt_budget_used)
    for omission in provenance.omitted:
        PROMPT_OMITTED.labels(omission.section).inc(omission.count)
    if provenance.fallback:
        FALLBACKS.inc()
    if provenance.grounding is not None:
        GROUNDING.observe(provenance.grounding)
    for stage, milliseconds in (provenance.timings_ms or {}).items():
        name = "verification" if stage == "verify" else stage
        if name in STAGES:
            STAGE_DURATION.labels(name).observe(milliseconds / 1000)


def record_warnings(codes: Iterable[str]) -> None:
    for code in codes:
        INGEST_WARNINGS.labels(code).inc()


SERVER_PORT = 9464  # EPICRISIS_METRICS_PORT's default for `epicrisis serve`
WORKER_PORT = 9465  # ... and for `epicrisis worker`, so both run side by side on one host


def serve_metrics(settings: Settings, *, default_port: int) -> str:
    """Serve ``/metrics`` in a daemon thread on ``EPICRISIS_METRICS_HOST`` and
    ``EPICRISIS_METRICS_PORT`` (0: any free port); the address it listens on.

    A port in use is a :class:`ConfigurationError` naming the setting, not a traceback.
    """
    port = default_port if settings.metrics_port is None else settings.metrics_port
    try:
        server, _thread = start_http_server(port, addr=settings.metrics_host)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot serve metrics on {settings.metrics_host}:{port} ({exc.strerror}); "
            "set EPICRISIS_METRICS_PORT to a free port"
        ) from None
    return f"http://{settings.metrics_host}:{server.server_port}/metrics"
