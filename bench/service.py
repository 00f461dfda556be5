"""The gRPC service: its overhead over a direct call, and how full it keeps the LLM backend.

Every part runs as its own process on 127.0.0.1 (``tests/deployment.py``): TGI simulators
(``epicrisis tgi-sim``), redis-server, ``epicrisis worker``, ``epicrisis serve
[--embedded]``. This process only calls and samples, on the packaged sample stay
(``epicrisis/samples/sample-stay.json``).

1. Overhead, LLM backend, a simulator that answers at once: ``Summarize`` from 1, 16 and 64
   concurrent grpc.aio callers to the embedded server and to the queued deployment (server,
   Redis, one worker), against the same pipeline called directly in this process
   (``load_stay``, ``llm_summary`` on the same kind of simulator, ``render_fhir``), one
   call at a time, in the same run.
2. Saturation: the queued deployment, one worker sized from ``/info``, in front of one or
   two simulators of 128 slots with a realistic time per token; a backlog submitted at
   once; ``/__sim/state`` is sampled every 0.1 s and the mean in-flight count over the
   steady part is divided by the slots.

``python bench/service.py`` prints the markdown; ``bench/run.py`` calls :func:`markdown`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import aiohttp
import grpc

import epicrisis
from epicrisis.errors import StayError
from epicrisis.llm.backend import llm_summary
from epicrisis.llm.pool import EndpointPool
from epicrisis.pipeline import load_stay
from epicrisis.serving.ingest import YOUNG_COLLECTION_THRESHOLD
from epicrisis.summary.render_fhir import render_fhir
from epicrisis.v1 import summarizer_pb2 as pb
from epicrisis.v1 import summarizer_pb2_grpc as pb_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from deployment import Deployment, deployed, embedded  # the tests' process harness

SAMPLE = Path(epicrisis.__file__).resolve().parent / "samples" / "sample-stay.json"
CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "fhir"
LEVELS = (1, 16, 64)  # concurrent callers
REQUESTS_PER_LEVEL = 192
OVERHEAD_REPEATS = 3
DIRECT = "direct call (in process)"
QUEUED = "queued (Redis, 1 worker)"
LEVEL_SECONDS = 20.0  # no new request after this long at one level
EMBEDDED_CONCURRENCY = 4
SLOTS = 128  # max_concurrent_requests of each simulator
TOKEN_SECONDS = 0.05  # 20 tokens/s a sequence at a full batch: see markdown()
FIRST_TOKEN_SECONDS = 0.2
BACKLOG_PER_SLOT = 2.5  # jobs queued before the worker starts, per slot on offer
SUBMITTERS = 8  # concurrent Submit calls while the backlog is queued
SATURATION_SECONDS = 240.0  # bound on one saturation run, from the worker's start
SAMPLE_SECONDS = 0.1
GOAL = 0.95
GOAL_CALLERS = 16
GOAL_OVERHEAD_MS = 10.0
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20)]
LLM = pb.SummaryOptions(backend=pb.BACKEND_LLM)


# -- 1. overhead -------------------------------------------------------------------------


@dataclass
class Level:
    """One concurrency level: per-request latencies (ms) and throughput."""

    callers: int
    latencies_ms: list[float]
    errors: int
    seconds: float

    @property
    def jobs_per_second(self) -> float:
        return len(self.latencies_ms) / self.seconds


@dataclass
class Overhead:
    """Per path, per repeat, one Level per number of callers; all from the same run, the
    paths taking turns within each repeat so that drift hits them alike."""

    runs: dict[str, list[list[Level]]]  # path -> repeats -> levels (the first path is direct)

    def over_direct(self, path: str, index: int, pct: int) -> list[float]:
        """Per repeat, ``path``'s ``pct``-th percentile minus the direct call's, at the level
        ``index`` (the same callers) of the same repeat; repeats where either had no
        successful call are left out."""
        pairs = zip(self.runs[path], self.runs[DIRECT], strict=True)
        return [
            _percentile(run[index].latencies_ms, pct) - _percentile(base[index].latencies_ms, pct)
            for run, base in pairs
            if run[index].latencies_ms and base[index].latencies_ms
        ]


def _percentile(values: list[float], pct: int) -> float:
    """The ``pct``-th percentile (inclusive method; 50 is the median); the value itself for
    one sample."""
    if len(values) < 2:
        return values[0]
    if pct == 50:
        return statistics.median(values)
    return statistics.quantiles(values, n=100, method="inclusive")[pct - 1]


async def _callers(one: Callable[[], Awaitable[bool]], callers: int, total: int) -> Level:
    """``callers`` loops sharing ``total`` calls of ``one`` (none started past the bound);
    ``one`` says whether its call succeeded."""
    latencies: list[float] = []
    errors = 0
    issued = 0
    started = time.perf_counter()
    cutoff = started + LEVEL_SECONDS

    async def caller() -> None:
        nonlocal issued, errors
        while issued < total and time.perf_counter() < cutoff:
            issued += 1
            t0 = time.perf_counter()
            if await one():
                latencies.append((time.perf_counter() - t0) * 1000)
            else:
                errors += 1

    await asyncio.gather(*(caller() for _ in range(callers)))
    return Level(callers, latencies, errors, time.perf_counter() - started)


async def _direct_level(sim_url: str, data: bytes, callers: int, total: int) -> Level:
    """What a job does, called in this process: Bundle to stay, the model's summary, the
    document. CPU work runs in threads as in the servers, so the event loop keeps the model
    requests flowing."""
    async with EndpointPool([sim_url]) as pool:

        async def one() -> bool:  # False for a fallback answer
            stay = await asyncio.to_thread(load_stay, data)
            summary = await llm_summary(stay, pool)
            await asyncio.to_thread(render_fhir, summary, version=epicrisis.__version__)
            return not summary.provenance.fallback

        for _ in range(3):  # warm the pool (/info) and the caches
            await one()
        return await _callers(one, callers, total)


async def _level(
    stub: pb_grpc.DischargeSummarizerStub, request: pb.SubmitRequest, callers: int, total: int
) -> Level:
    """Summarize calls; a failed call or a fallback answer is an error."""

    async def one() -> bool:
        try:
            job = await stub.Summarize(request, timeout=60.0)
        except grpc.aio.AioRpcError:
            return False
        return job.state == pb.JOB_STATE_SUCCEEDED and not job.summary.provenance.fallback

    return await _callers(one, callers, total)


async def _serve_levels(
    target: str, data: bytes, levels: tuple[int, ...], total: int
) -> list[Level]:
    request = pb.SubmitRequest(bundle=data, options=LLM)
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.DischargeSummarizerStub(channel)
        for _ in range(3):  # warm the channel, the worker's pools and the caches
            await stub.Summarize(request, timeout=60.0)
        return [await _level(stub, request, callers, total) for callers in levels]


def measure_overhead(
    levels: tuple[int, ...] = LEVELS,
    requests_per_level: int = REQUESTS_PER_LEVEL,
    repeats: int = OVERHEAD_REPEATS,
) -> Overhead:
    """Direct calls, the embedded server and the queued deployment, in turns, ``repeats`` times."""
    # as `epicrisis serve` does after start: a like baseline
    gc.freeze()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, *gc.get_threshold()[1:])
    data = SAMPLE.read_bytes()
    concurrency = {"EPICRISIS_EMBEDDED_CONCURRENCY": str(EMBEDDED_CONCURRENCY)}
    embedded_path = f"embedded ({EMBEDDED_CONCURRENCY} jobs at once)"
    runs: dict[str, list[list[Level]]] = {DIRECT: [], embedded_path: [], QUEUED: []}
    with (
        embedded(env=concurrency) as (target, sims),
        _queued(sims=1, sim_args=()) as running,
    ):
        for _ in range(repeats):
            runs[DIRECT].append(
                [
                    asyncio.run(_direct_level(sims[0], data, callers, requests_per_level))
                    for callers in levels
                ]
            )
            runs[embedded_path].append(
                asyncio.run(_serve_levels(target, data, levels, requests_per_level))
            )
            runs[QUEUED].append(
                asyncio.run(_serve_levels(running.target, data, levels, requests_per_level))
            )
    return Overhead(runs)


@contextlib.contextmanager
def _queued(*, sims: int, sim_args: tuple[str, ...], workers: int = 1) -> Iterator[Deployment]:
    """The queued deployment; its workers sized from /info."""
    with (
        tempfile.TemporaryDirectory(prefix="epicrisis-bench-") as tmp,
        deployed(
            Path(tmp), sims=sims, sim_args=sim_args, worker_args=(), workers=workers
        ) as running,
    ):
        yield running


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- 2. saturation -----------------------------------------------------------------------


@dataclass
class Saturation:
    """One backlog against ``endpoints`` simulators of ``SLOTS`` slots each."""

    endpoints: int
    backlog: int
    submit_seconds: float  # the whole backlog accepted by the server (no worker yet)
    samples: list[tuple[float, int]]  # (seconds since the worker started, in flight, all sims)
    steady: tuple[float, float]  # the window averaged, same clock
    full_seconds: float | None  # first sample with every slot busy
    succeeded: int
    failed: int
    seconds: float  # worker start to last job final (or the bound)
    timed_out: bool
    max_in_flight: int  # the simulators' own peak counters, summed
    worker_cores: float  # the worker process's CPU time / wall time (the GIL caps Python at 1)
    fallbacks: int = 0  # LLM answers replaced by the extractive prose
    notes: list[str] = field(default_factory=list)

    @property
    def slots(self) -> int:
        return self.endpoints * SLOTS

    @property
    def steady_values(self) -> list[int]:
        start, end = self.steady
        return [n for t, n in self.samples if start <= t <= end]

    @property
    def mean_share(self) -> float | None:
        values = self.steady_values
        return statistics.fmean(values) / self.slots if values else None


def _corpus_stays() -> list[bytes]:
    """Every corpus Bundle with a finished inpatient stay: prompts and answers of varied
    length, so generations end at different times as they do in production."""
    found = []
    for folder in ("synthea-r4", "clinosim"):
        for path in sorted((CORPUS / folder).glob("*.json")):
            data = path.read_bytes()
            with contextlib.suppress(StayError):
                load_stay(data)
                found.append(data)
    return found


async def _state(session: aiohttp.ClientSession, url: str) -> dict:
    async with session.get(url + "/__sim/state") as response:
        return await response.json()


async def _saturate(running: Deployment, backlog: int, bound: float) -> Saturation:
    """Queue ``backlog`` jobs with no worker, then start one and watch the slots fill."""
    urls = running.sims
    slots = SLOTS * len(urls)
    batch = pb.SummaryOptions(backend=pb.BACKEND_LLM, priority=pb.PRIORITY_BATCH)
    stays = _corpus_stays()
    requests = [
        pb.SubmitRequest(bundle=stays[i % len(stays)], options=batch) for i in range(backlog)
    ]
    samples: list[tuple[float, int]] = []
    finished: list[float] = []
    outcomes = {"ok": 0, "failed": 0, "fallbacks": 0}
    notes: list[str] = []
    async with (
        aiohttp.ClientSession() as session,
        grpc.aio.insecure_channel(running.target, options=CHANNEL_OPTIONS) as channel,
    ):
        stub = pb_grpc.DischargeSummarizerStub(channel)
        submitting = time.perf_counter()
        callers = asyncio.Semaphore(SUBMITTERS)

        async def submit(request: pb.SubmitRequest) -> str:
            async with callers:
                job = await stub.Submit(request, timeout=60.0)
                return job.id

        ids = await asyncio.gather(*(submit(request) for request in requests))
        submit_seconds = time.perf_counter() - submitting
        t0 = 0.0

        async def sample() -> None:
            while True:
                states = await asyncio.gather(*(_state(session, u) for u in urls))
                in_flight = sum(s["counters"]["in_flight"] for s in states)
                samples.append((time.perf_counter() - t0, in_flight))
                await asyncio.sleep(SAMPLE_SECONDS)

        async def watch(job_id: str) -> None:
            try:
                async for update in stub.WatchJob(pb.WatchJobRequest(id=job_id), timeout=bound):
                    if update.state in (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING):
                        continue
                    finished.append(time.perf_counter() - t0)
                    if update.state == pb.JOB_STATE_SUCCEEDED:
                        outcomes["ok"] += 1
                        outcomes["fallbacks"] += update.summary.provenance.fallback
                    else:
                        outcomes["failed"] += 1
                        notes.append(f"job {update.state}: {update.error.code}")
                    return
            except grpc.aio.AioRpcError as exc:
                outcomes["failed"] += 1
                notes.append(f"RPC {exc.code().name}: {exc.details()}")

        watchers = [asyncio.create_task(watch(job_id)) for job_id in ids]
        await asyncio.to_thread(running.start_worker)  # returns once it is ready
        t0 = time.perf_counter()
        sampler = asyncio.create_task(sample())
        _done, pending = await asyncio.wait(watchers, timeout=bound)
        timed_out = bool(pending)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        seconds = time.perf_counter() - t0
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        states = await asyncio.gather(*(_state(session, u) for u in urls))

    # Steady part: from every slot first busy (or, if never, the worker's start) until fewer
    # jobs than slots are left (then the slots cannot all be busy).
    full = next((t for t, n in samples if n >= slots), None)
    finished.sort()
    end = finished[backlog - slots - 1] if len(finished) >= backlog - slots > 0 else seconds
    return Saturation(
        endpoints=len(urls),
        backlog=backlog,
        submit_seconds=submit_seconds,
        samples=samples,
        steady=(0.0 if full is None else full, end),
        full_seconds=full,
        succeeded=outcomes["ok"],
        failed=outcomes["failed"],
        seconds=seconds,
        timed_out=timed_out,
        max_in_flight=sum(s["counters"]["max_in_flight"] for s in states),
        worker_cores=0.0,
        fallbacks=outcomes["fallbacks"],
        notes=sorted(set(notes))[:5],
    )


def measure_saturation(endpoints: int, bound: float = SATURATION_SECONDS) -> Saturation:
    """A backlog against ``endpoints`` simulators through the queued deployment."""
    sim_args = (
        "--max-concurrent-requests", str(SLOTS),
        "--token-latency", str(TOKEN_SECONDS),
        "--first-token-latency", str(FIRST_TOKEN_SECONDS),
        "--seed", "0",
    )  # fmt: skip
    backlog = round(BACKLOG_PER_SLOT * SLOTS * endpoints)
    with _queued(sims=endpoints, sim_args=sim_args, workers=0) as running:
        result = asyncio.run(_saturate(running, backlog, bound))
        worker = running.workers[0].pid
        cores = _cpu_seconds(worker) / result.seconds  # the worker started with the run
    return replace(result, worker_cores=cores)


# -- markdown ----------------------------------------------------------------------------


def _median_spread(values: list[float], sign: bool = False) -> str:
    form = "{:+.1f}" if sign else "{:.1f}"
    middle, low, high = statistics.median(values), min(values), max(values)
    return f"{form.format(middle)} ({form.format(low)} to {form.format(high)})"


def _overhead_markdown(o: Overhead) -> str:
    """Per path and number of callers: medians over the repeats (min to max), and the
    served minus direct figures paired within each repeat."""
    lines = [
        "| path | callers | requests | p50 ms | p99 ms | jobs/s | p50 - direct p50 ms "
        "| p99 - direct p99 ms | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    verdicts = []
    for path, repeats in o.runs.items():
        for index, callers in enumerate(level.callers for level in repeats[0]):
            levels = [run[index] for run in repeats]
            done = [(run_no, lv) for run_no, lv in enumerate(levels) if lv.latencies_ms]
            errors = sum(lv.errors for lv in levels)
            if not done:
                lines.append(f"| {path} | {callers} | 0 | - | - | - | - | - | {errors} |")
                continue
            p50 = [statistics.median(lv.latencies_ms) for _, lv in done]
            p99 = [_percentile(lv.latencies_ms, 99) for _, lv in done]
            extra = ["-", "-"]
            over50 = o.over_direct(path, index, 50) if path != DIRECT else []
            if over50:
                over99 = o.over_direct(path, index, 99)
                extra = [_median_spread(over50, True), _median_spread(over99, True)]
                if callers == GOAL_CALLERS:
                    middle = statistics.median(over50)
                    verdicts.append(
                        f"{path}: p50 {middle:+.1f} ms against the direct call at "
                        f"{GOAL_CALLERS} callers ("
                        f"{'meets' if middle <= GOAL_OVERHEAD_MS else 'misses'} the goal of "
                        f"at most +{GOAL_OVERHEAD_MS:g} ms; p99 {statistics.median(over99):+.1f} ms)"
                    )
            requests = sum(len(lv.latencies_ms) for _, lv in done)
            rate = statistics.median(lv.jobs_per_second for _, lv in done)
            lines.append(
                f"| {path} | {callers} | {requests} | {_median_spread(p50)} | {_median_spread(p99)} "
                f"| {rate:.1f} | {extra[0]} | {extra[1]} | {errors} |"
            )
    return "\n".join(lines) + "\n\n" + "; ".join(verdicts) + ".\n"


def _saturation_markdown(runs: list[Saturation]) -> str:
    lines = [
        "| endpoints | slots | backlog | queued in s | steady window s | samples "
        "| mean in flight | ÷ slots | min-max in flight | full after s | peak "
        "| jobs ok / failed | jobs/s | worker CPU cores |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: |",
    ]
    notes = []
    for r in runs:
        values = r.steady_values
        share = r.mean_share
        start, end = r.steady
        full = "never" if r.full_seconds is None else f"{r.full_seconds:.1f}"
        lines.append(
            f"| {r.endpoints} | {r.slots} | {r.backlog} | {r.submit_seconds:.1f} "
            f"| {start:.1f}-{end:.1f} | {len(values)} "
            f"| {statistics.fmean(values) if values else 0:.1f} "
            f"| {'-' if share is None else f'{share:.3f}'} "
            f"| {min(values, default=0)}-{max(values, default=0)} | {full} | {r.max_in_flight} "
            f"| {r.succeeded} / {r.failed} | {r.succeeded / r.seconds:.1f} | {r.worker_cores:.2f} |"
        )
        if r.timed_out:
            notes.append(
                f"{r.endpoints} endpoint(s): stopped at the {SATURATION_SECONDS:g} s bound."
            )
        if r.fallbacks:
            notes.append(f"{r.endpoints} endpoint(s): {r.fallbacks} extractive fallbacks.")
        notes.extend(f"{r.endpoints} endpoint(s): {note}" for note in r.notes)
    verdict = [
        f"{r.endpoints} endpoint(s): {r.mean_share:.3f} of the slots busy "
        f"({'meets' if r.mean_share >= GOAL else 'below'} the goal of {GOAL})"
        for r in runs
        if r.mean_share is not None
    ]
    text = "\n".join(lines) + "\n\n" + "; ".join(verdict) + ".\n"
    if notes:
        text += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    return text


def plot(overhead: Overhead, runs: list[Saturation], path: Path) -> None:
    """Latency against callers per path (p50 and p99, medians over the repeats), and the
    slots busy over time in each saturation run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for shift, (path_name, repeats) in enumerate(overhead.runs.items()):
        if path_name == DIRECT:
            continue
        xs, middles, lows, highs = [], [], [], []
        for i, level in enumerate(repeats[0]):
            over = overhead.over_direct(path_name, i, 50)
            if over:
                middle = statistics.median(over)
                xs.append(level.callers * (1 + 0.04 * shift))  # side by side, not on top
                middles.append(middle)
                lows.append(middle - min(over))
                highs.append(max(over) - middle)
        left.errorbar(xs, middles, yerr=[lows, highs], fmt="o-", capsize=4, label=path_name)
    left.axhline(GOAL_OVERHEAD_MS, color="red", linestyle="--",
                 label=f"goal at {GOAL_CALLERS} callers: +{GOAL_OVERHEAD_MS:g} ms")  # fmt: skip
    left.axhline(0, color="grey", linewidth=0.8)
    left.set(xscale="log", yscale="symlog", xlabel="concurrent callers",
             ylabel="served p50 - direct p50, ms (median, min to max)",
             title="Service overhead against direct calls")  # fmt: skip
    left.set_xticks(list(LEVELS), [str(n) for n in LEVELS])
    left.legend(fontsize=8)
    for run in runs:
        right.plot([t for t, _ in run.samples], [n / run.slots for _, n in run.samples],
                   label=f"{run.endpoints} endpoint(s), {run.slots} slots")  # fmt: skip
    right.axhline(GOAL, color="red", linestyle="--", label=f"goal: {GOAL}")
    right.set(xlabel="seconds since the worker started", ylabel="share of the slots busy",
              ylim=(0, 1.05), title="Backend saturation under a backlog")  # fmt: skip
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def glance(overhead: Overhead, runs: list[Saturation]) -> list[tuple[str, str, str, bool]]:
    """The goals' rows for bench/README.md's summary: (goal, figure, baseline, met)."""
    index = next(i for i, lv in enumerate(overhead.runs[DIRECT][0]) if lv.callers == GOAL_CALLERS)
    rows = []
    for path in overhead.runs:
        if path == DIRECT:
            continue
        over50, over99 = (
            overhead.over_direct(path, index, 50),
            overhead.over_direct(path, index, 99),
        )
        met = bool(over50) and statistics.median(over50) <= GOAL_OVERHEAD_MS
        figure = (
            f"{path}: p50 {statistics.median(over50):+.1f} ms, p99 {statistics.median(over99):+.1f} ms"
            if over50
            else f"{path}: no successful calls"
        )
        rows.append(
            (
                f"service overhead at {GOAL_CALLERS} callers: p50 at most +{GOAL_OVERHEAD_MS:g} ms",
                figure,
                f"direct in-process calls at {GOAL_CALLERS} callers",
                met,
            )
        )
    shares = [r.mean_share for r in runs]
    rows.append(
        (
            f"backend saturation: at least {GOAL} of the slots busy, 1 and 2 endpoints",
            ", ".join(
                f"{r.endpoints} endpoint(s): {'-' if s is None else f'{s:.3f}'}"
                for r, s in zip(runs, shares, strict=True)
            ),
            "the slots on offer",
            all(s is not None and s >= GOAL for s in shares),
        )
    )
    return rows


def measure_all() -> tuple[Overhead, list[Saturation]]:
    """Both measurements, run now."""
    return measure_overhead(), [measure_saturation(1), measure_saturation(2)]


def markdown(
    measured: tuple[Overhead, list[Saturation]] | None = None, plot_to: Path | None = None
) -> str:
    """Both measurements as markdown (tables and a one-line verdict), run now when not
    given; with ``plot_to``, their picture as a PNG there too."""
    overhead, runs = measured if measured is not None else measure_all()
    if plot_to is not None:
        plot(overhead, runs, plot_to)
    return (
        _overhead_markdown(overhead)
        + "\n"
        + "Direct: `load_stay`, `llm_summary` and `render_fhir` called in the benchmark's "
        f"process on {SAMPLE.name} ({SAMPLE.stat().st_size / 1e6:.2f} MB) by as many "
        "concurrent callers (asyncio tasks; the CPU parts in threads, as in the servers) as "
        "the served rows, against a simulator that answers at once (`epicrisis tgi-sim`, no "
        "latency). Served: `Summarize` over loopback gRPC from grpc.aio callers, the LLM "
        "backend and the same kind of simulator, each part its own process (the servers "
        "validate Bundles in their ingest processes: one on 2 cores, "
        "`EPICRISIS_INGEST_PROCESSES`); up to "
        f"{REQUESTS_PER_LEVEL} requests per level. The three paths take turns, "
        f"{OVERHEAD_REPEATS} times; figures are the median over the repeats (min to max). "
        "Overhead is the served p50 (p99) minus the direct p50 (p99) at the same number of "
        "callers in the same repeat: on 2 cores, beyond one caller both are mostly waiting "
        "for CPU, and only the same offered load compares (the served paths spread over "
        "several processes, the direct one is held to one core by the GIL: at one caller "
        "the difference is the served path's own cost). An error is a "
        "failed call or a fallback answer.\n\n"
        f"Saturation: {SLOTS}-slot simulators (first token {FIRST_TOKEN_SECONDS:g} s, "
        f"{TOKEN_SECONDS:g} s per token: about 20 tokens/s per sequence at a full batch, "
        "an assumption for Med42-v2 70B on one 4-GPU TGI replica; the sample's answer is "
        "712 tokens, so its generation takes about 36 s) behind the queued deployment: "
        "`epicrisis serve`, redis-server and `epicrisis worker`, separate processes. The "
        f"backlog ({BACKLOG_PER_SLOT:g} jobs per slot, batch priority, cycling through the "
        "corpus's inpatient stays so that answers differ in length) is submitted first "
        "with no worker running ('queued in': the server validates each Bundle, the one CPU "
        "cost left before the queue), then one worker starts, its concurrency from `/info` "
        f"(slots + an eighth); `/__sim/state` is sampled every {SAMPLE_SECONDS:g} s, each run "
        f"bounded to {SATURATION_SECONDS:g} s after the worker starts. The steady window runs "
        "from every slot first busy (the worker's start if never) until fewer jobs than "
        "slots are left; "
        "an empty window shows '-'.\n\n" + _saturation_markdown(runs)
    )


if __name__ == "__main__":
    print(markdown())
