"""Memory per job in flight: the goal is at most 1 MB per job beyond its payload (the Bundle
bytes the caller sent), summed over the processes that hold jobs.

The queued deployment of ``tests/deployment.py``, each part its own process on 127.0.0.1:
redis-server, one ``epicrisis tgi-sim``, one ``epicrisis worker`` (its concurrency from
``/info``: the simulator's 512 slots and an eighth more) and ``epicrisis serve``. The
simulator holds every request before its first token for far longer than a run lasts, so
the jobs submitted stay inside the model call until this process cancels them.

One run: warm up (a few jobs that finish, with the simulator answering at once, so the
tokenizer, the pools and the server's buffers for a Bundle are loaded before the idle
figure), then climb a staircase of jobs in flight (``Submit``, never ``Summarize``, from a
few concurrent callers), and at each step, once the simulator's ``/__sim/state`` counts
exactly that many requests in flight, sample the resident memory (``VmRSS``) of the server,
the worker and redis-server, and Redis's own ``used_memory``. The steps climb within one
deployment, so memory freed by finished work is never reused by the next step; the jobs are
cancelled at the end. A least-squares line of memory against jobs in flight gives the bytes
per job, per process and summed; each run starts a fresh deployment and the figures are the
median (min-max) of the runs.

``python bench/memory.py`` prints the markdown and writes ``bench/memory.png``;
``bench/run.py`` calls :func:`markdown`.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import orjson
import redis

import epicrisis
from epicrisis.v1 import summarizer_pb2 as pb
from epicrisis.v1 import summarizer_pb2_grpc as pb_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from deployment import Deployment, deployed, descendants  # the tests' process harness

HERE = Path(__file__).resolve().parent
SAMPLE = Path(epicrisis.__file__).resolve().parent / "samples" / "sample-stay.json"
CORPUS = HERE.parents[1] / "shared" / "data" / "fhir"
LARGE = CORPUS / "clinosim" / "sepsis_2.json"  # the corpus's largest Bundle and stay
PLOT = HERE / "memory.png"

LEVELS = (0, 32, 128, 256)  # jobs in flight, the sample stay
LARGE_LEVELS = (0, 32, 64)  # the large Bundle: validated at Submit, 0.3 s of CPU each
RUNS = 3  # fresh deployments per Bundle
SLOTS = 512  # the simulator's --max-concurrent-requests (the worker takes 576 jobs)
HOLD_SECONDS = 1200.0  # the simulator's first-token latency: jobs wait until cancelled
TOKEN_SECONDS = 0.05  # per further token (never reached: the jobs are cancelled first)
# Bounds on one job well past HOLD_SECONDS, so that none ends while it is measured.
LONG_TIMEOUTS = {
    f"EPICRISIS_{name}": str(2 * HOLD_SECONDS)
    for name in ("LLM_TIMEOUT_SECONDS", "LLM_RETRY_SECONDS", "JOB_TIMEOUT_SECONDS")
}
WARMUP_JOBS = 16
SUBMITTERS = 8  # concurrent Submit (and CancelJob) calls
SAMPLES_PER_LEVEL = 3
SAMPLE_GAP_SECONDS = 0.5
SETTLE_SECONDS = 1.0  # after the simulator counts every job in flight, before sampling
WAIT_SECONDS = 180.0  # bound on reaching one level, never a timing assertion
GOAL_BYTES = 1_000_000  # 1 MB beyond the payload
PROCESSES = ("server", "worker", "redis")
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20)]
LLM = pb.SummaryOptions(backend=pb.BACKEND_LLM)
MB = 1e6


# -- one run -----------------------------------------------------------------------------


@dataclass
class Sample:
    """Memory with ``jobs`` in flight (the simulator counted ``in_flight`` of them)."""

    jobs: int
    in_flight: int
    rss: dict[str, int]  # process name to VmRSS bytes
    used_memory: int  # Redis INFO memory

    @property
    def total(self) -> int:
        return sum(self.rss.values())


@dataclass
class Run:
    """One staircase of jobs in flight through a fresh deployment."""

    samples: list[Sample]
    after: Sample  # once every job was cancelled and its model request dropped
    payload_bytes: int  # one job's sealed stay in Redis (STRLEN)
    payload_memory: int  # and what Redis spends on that key (MEMORY USAGE)
    worker_slots: int  # the worker's concurrency, as its heartbeat reports it
    seconds: float
    notes: list[str] = field(default_factory=list)

    def series(self, name: str) -> list[tuple[int, int]]:
        """(jobs, bytes) of one measure (:func:`value`)."""
        return [(s.jobs, value(s, name)) for s in self.samples]

    def slope(self, name: str) -> float:
        """Bytes per job in flight: the least-squares line of :meth:`series`."""
        return fit(self.series(name))[0]

    def idle(self, name: str) -> float:
        """The mean with no job in flight."""
        return statistics.fmean(b for jobs, b in self.series(name) if jobs == 0)

    def growth(self, name: str) -> float:
        """Above idle at the top level (mean of its samples)."""
        top = max(jobs for jobs, _ in self.series(name))
        return statistics.fmean(b for jobs, b in self.series(name) if jobs == top) - self.idle(name)

    def kept(self, name: str) -> float:
        """Still above idle once every job was cancelled."""
        return value(self.after, name) - self.idle(name)


def value(sample: Sample, name: str) -> int:
    """A process's RSS, ``total`` (their sum) or ``used_memory`` (Redis's own count)."""
    if name == "total":
        return sample.total
    if name == "used_memory":
        return sample.used_memory
    return sample.rss[name]


def fit(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Slope and intercept of the least-squares line through ``points``."""
    xs = [float(x) for x, _ in points]
    ys = [float(y) for _, y in points]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread
    return slope, mean_y - slope * mean_x


def rss_bytes(pid: int) -> int:
    """Resident set size of a process and its descendants (``VmRSS`` of
    ``/proc/<pid>/status``): the server's ingest processes are part of the server."""
    total = 0
    for one in [pid, *descendants(pid)]:
        with contextlib.suppress(FileNotFoundError):  # a child that has just ended
            for line in Path(f"/proc/{one}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    if not total:
        raise RuntimeError(f"no VmRSS for pid {pid}")
    return total


async def _sim_state(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url + "/__sim/state") as response:
        state: dict[str, Any] = await response.json()
        return state


async def _set_latency(
    session: aiohttp.ClientSession, url: str, first_token: float, per_token: float
) -> None:
    """The simulator's latencies, changed at run time."""
    body = {"first_token_seconds": first_token, "token_seconds": per_token}
    async with session.post(url + "/__sim/faults", json=body) as response:
        response.raise_for_status()


class _Staircase:
    """The client side of one run: submits, waits, samples, cancels."""

    def __init__(
        self,
        running: Deployment,
        session: aiohttp.ClientSession,
        stub: pb_grpc.DischargeSummarizerStub,
        bundle: bytes,
    ) -> None:
        self.sim = running.sims[0]
        self.session = session
        self.stub = stub
        self.request = pb.SubmitRequest(bundle=bundle, options=LLM)
        self.redis = redis.Redis.from_url(running.env["EPICRISIS_REDIS_URL"])
        self.pids = {
            "server": running.servers[0].pid,
            "worker": running.workers[0].pid,
            "redis": int(self.redis.info("server")["process_id"]),
        }
        self.ids: list[str] = []

    async def in_flight(self) -> int:
        return int((await _sim_state(self.session, self.sim))["counters"]["in_flight"])

    async def submit(self, count: int) -> list[str]:
        """``count`` jobs from ``SUBMITTERS`` concurrent callers; their ids."""
        callers = asyncio.Semaphore(SUBMITTERS)

        async def one() -> str:
            async with callers:
                job = await self.stub.Submit(self.request, timeout=60.0)
                return str(job.id)

        return list(await asyncio.gather(*(one() for _ in range(count))))

    async def warm_up(self) -> None:
        """Jobs that run to the end with the simulator answering at once, then the hold."""
        await _set_latency(self.session, self.sim, 0.0, 0.0)
        for job_id in await self.submit(WARMUP_JOBS):
            async for update in self.stub.WatchJob(pb.WatchJobRequest(id=job_id), timeout=120):
                if update.state == pb.JOB_STATE_SUCCEEDED:
                    break
                if update.state not in (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING):
                    raise RuntimeError(f"memory: a warm-up job ended {update.state}")
        await _set_latency(self.session, self.sim, HOLD_SECONDS, TOKEN_SECONDS)

    async def reach(self, jobs: int) -> None:
        """Submit up to ``jobs`` in flight; return once the simulator holds all of them."""
        self.ids += await self.submit(jobs - len(self.ids))
        deadline = time.monotonic() + WAIT_SECONDS
        while (now := await self.in_flight()) != jobs:
            if now > jobs or time.monotonic() > deadline:
                raise RuntimeError(f"memory: {now} requests in flight, {jobs} expected")
            await asyncio.sleep(0.2)

    async def sample(self, jobs: int) -> Sample:
        rss = {name: rss_bytes(pid) for name, pid in self.pids.items()}
        used = int(self.redis.info("memory")["used_memory"])
        return Sample(jobs, await self.in_flight(), rss, used)

    def worker_slots(self) -> int:
        """The jobs the worker takes at once, from its heartbeat (Celery's concurrency)."""
        reports = self.redis.hvals("epicrisis:workers:all")
        return sum(int(orjson.loads(report)["slots"]) for report in reports)

    def payload(self) -> tuple[int, int]:
        """One job's sealed stay in Redis: its length and what Redis spends on the key."""
        key = f"epicrisis:payload:{self.ids[-1]}"
        return int(self.redis.strlen(key)), int(self.redis.memory_usage(key) or 0)

    async def cancel_all(self) -> None:
        """Cancel every job and wait until the simulator has dropped their requests."""
        callers = asyncio.Semaphore(SUBMITTERS)

        async def one(job_id: str) -> None:
            async with callers:
                await self.stub.CancelJob(pb.CancelJobRequest(id=job_id), timeout=60.0)

        await asyncio.gather(*(one(job_id) for job_id in self.ids))
        self.ids = []
        deadline = time.monotonic() + WAIT_SECONDS
        while await self.in_flight() and time.monotonic() < deadline:
            await asyncio.sleep(0.2)


async def _staircase(running: Deployment, bundle: bytes, levels: Sequence[int]) -> Run:
    started = time.monotonic()
    samples: list[Sample] = []
    notes: list[str] = []
    async with (
        aiohttp.ClientSession() as session,
        grpc.aio.insecure_channel(running.target, options=CHANNEL_OPTIONS) as channel,
    ):
        stub = pb_grpc.DischargeSummarizerStub(channel)  # type: ignore[no-untyped-call]
        steps = _Staircase(running, session, stub, bundle)
        try:
            await steps.warm_up()
            for jobs in levels:
                await steps.reach(jobs)
                await asyncio.sleep(SETTLE_SECONDS)
                for i in range(SAMPLES_PER_LEVEL):
                    if i:
                        await asyncio.sleep(SAMPLE_GAP_SECONDS)
                    samples.append(await steps.sample(jobs))
                    if samples[-1].in_flight != jobs:
                        notes.append(f"{samples[-1].in_flight} in flight when {jobs} were due")
            payload = steps.payload()
            slots = steps.worker_slots()
            await steps.cancel_all()
            await asyncio.sleep(SETTLE_SECONDS)
            after = await steps.sample(0)
        finally:
            await steps.cancel_all()  # again, if a step failed: the deployment stops quickly
            steps.redis.close()
    return Run(samples, after, *payload, slots, time.monotonic() - started, notes)


@contextlib.contextmanager
def _deployment() -> Iterator[Deployment]:
    """The queued deployment: one simulator that holds requests, one worker sized from it."""
    sim_args = (
        "--max-concurrent-requests", str(SLOTS),
        "--first-token-latency", str(HOLD_SECONDS),
        "--token-latency", str(TOKEN_SECONDS),
        "--seed", "0",
    )  # fmt: skip
    with (
        tempfile.TemporaryDirectory(prefix="epicrisis-memory-") as tmp,
        deployed(
            Path(tmp), sims=1, sim_args=sim_args, worker_args=(), workers=1, env=LONG_TIMEOUTS
        ) as running,
    ):
        yield running


def measure_run(bundle: bytes, levels: Sequence[int]) -> Run:
    """One staircase through a fresh deployment."""
    with _deployment() as running:
        return asyncio.run(_staircase(running, bundle, levels))


# -- results -----------------------------------------------------------------------------


@dataclass
class Result:
    """Every run of one Bundle."""

    label: str
    bundle_bytes: int
    levels: tuple[int, ...]
    runs: list[Run]

    def slopes(self, name: str) -> list[float]:
        return [run.slope(name) for run in self.runs]

    def median(self, name: str) -> float:
        return statistics.median(self.slopes(name))


def measure(label: str, path: Path, levels: tuple[int, ...], runs: int = RUNS) -> Result:
    bundle = path.read_bytes()
    return Result(label, len(bundle), levels, [measure_run(bundle, levels) for _ in range(runs)])


def _spread(values: list[float], unit: float = 1e3) -> str:
    """Median (min to max), in ``unit``s."""
    middle, low, high = statistics.median(values), min(values), max(values)
    return f"{middle / unit:,.0f} ({low / unit:,.0f} to {high / unit:,.0f})"


MEASURES = {
    "server": "`epicrisis serve` RSS (its ingest processes included)",
    "worker": "`epicrisis worker` RSS",
    "redis": "redis-server RSS",
    "total": "**total RSS**",
    "used_memory": "Redis `used_memory` (in redis-server's RSS)",
}


def table(results: list[Result]) -> str:
    lines = [
        "| Bundle | memory | kB per job in flight | MB above idle at the top level "
        "| MB above idle once cancelled |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for r in results:
        payload = statistics.median(run.payload_bytes for run in r.runs)
        key = statistics.median(run.payload_memory for run in r.runs)
        bundle = (
            f"{r.label}: {r.bundle_bytes / MB:.2f} MB; sealed stay in Redis {payload / 1e3:,.0f} kB "
            f"({key / 1e3:,.0f} kB with the key's overhead); "
            f"{', '.join(map(str, r.levels))} jobs in flight, {len(r.runs)} runs"
        )
        for name, label in MEASURES.items():
            lines.append(
                f"| {bundle} | {label} | {_spread(r.slopes(name))} "
                f"| {_spread([run.growth(name) for run in r.runs], MB)} "
                f"| {_spread([run.kept(name) for run in r.runs], MB)} |"
            )
            bundle = ""
        beyond = [slope - r.bundle_bytes for slope in r.slopes("total")]
        lines.append(f"| | **total - Bundle** | **{_spread(beyond)}** | | |")
    return "\n".join(lines) + "\n"


def verdict(results: list[Result]) -> str:
    parts = []
    for r in results:
        worst = max(r.slopes("total")) - r.bundle_bytes
        meets = worst <= GOAL_BYTES
        parts.append(
            f"{r.label}: {(r.median('total') - r.bundle_bytes) / MB:+.2f} MB per job beyond "
            f"the payload (worst run {worst / MB:+.2f} MB), "
            f"{'meets' if meets else 'misses'} the goal of at most {GOAL_BYTES / MB:g} MB"
        )
    return "; ".join(parts) + "."


def plot(results: list[Result], path: Path = PLOT) -> bool:
    """Memory above idle against jobs in flight, per process, with the fitted lines (PNG);
    False when matplotlib is not installed (``.[bench]``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    colors = {"server": "tab:blue", "worker": "tab:orange", "redis": "tab:green"}
    colors["total"] = "black"
    for ax, r in zip(axes[0], results, strict=True):
        for name, color in colors.items():
            points = [
                (jobs, (b - run.idle(name)) / MB) for run in r.runs for jobs, b in run.series(name)
            ]
            slope, intercept = fit(points)
            ax.scatter(*zip(*points, strict=True), s=12, color=color, alpha=0.5)
            top = max(r.levels)
            ax.plot(
                [0, top],
                [intercept, intercept + slope * top],
                color=color,
                label=f"{name}: {slope * 1e3:,.0f} kB/job (fit of all runs)",
            )
        ax.plot(
            [0, max(r.levels)],
            [0, max(r.levels) * (r.bundle_bytes + GOAL_BYTES) / MB],
            color="grey",
            linestyle=":",
            label="goal: Bundle + 1 MB per job",
        )
        ax.set_title(f"{r.label} ({r.bundle_bytes / MB:.2f} MB Bundle), {len(r.runs)} runs")
        ax.set_xlabel("jobs in flight (inside the model call)")
        ax.set_ylabel("resident memory above idle, MB")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def measure_all() -> tuple[list[Result], float]:
    """Every run, now: the sample stay and (with the corpus) its largest; and the seconds."""
    started = time.monotonic()
    results = [measure("sample stay", SAMPLE, LEVELS)]
    if LARGE.is_file():
        results.append(measure(LARGE.stem, LARGE, LARGE_LEVELS))
    return results, time.monotonic() - started


def glance(results: list[Result]) -> tuple[str, str, bool]:
    """The goal's row for bench/README.md's summary: (figure, baseline, met)."""
    beyond = [max(r.slopes("total")) - r.bundle_bytes for r in results]
    figure = "; ".join(
        f"{r.label}: {(r.median('total') - r.bundle_bytes) / MB:+.2f} MB per job beyond "
        f"its {r.bundle_bytes / MB:.2f} MB Bundle"
        for r in results
    )
    return figure, "payload size", all(b <= GOAL_BYTES for b in beyond)


def markdown(results: list[Result] | None = None, seconds: float = 0.0) -> str:
    """The runs as markdown (a table, a verdict, how it was measured); writes the PNG.
    Measures now when no results are given."""
    if results is None:
        results, seconds = measure_all()
    drawn = plot(results)
    slots = " or ".join(sorted({str(run.worker_slots) for r in results for run in r.runs}))
    notes = [f"{r.label}: {note}" for r in results for run in r.runs for note in run.notes]
    text = (
        table(results)
        + "\n"
        + verdict(results)
        + "\n\n"
        + "Bytes per job in flight are the slope of a least-squares line of resident memory "
        f"(`VmRSS`) against jobs in flight, median (min to max) of {RUNS} runs, each a fresh "
        f"queued deployment on 127.0.0.1: redis-server, one `epicrisis tgi-sim` of {SLOTS} "
        f"slots, one `epicrisis worker` sized from its `/info` ({slots} jobs at once), "
        "`epicrisis serve`, each its own process. 'total' sums the server, the worker and "
        "redis-server; 'total - Bundle' is what the goal bounds (1 MB = 10^6 bytes per job "
        f"beyond the Bundle bytes sent). Each run first completes {WARMUP_JOBS} jobs with the "
        "simulator answering at once (tokenizer, pools and buffers loaded: the idle figure is "
        f"a warm deployment), then sets its first-token latency to {HOLD_SECONDS:g} s and "
        f"climbs the levels (`Submit`, LLM backend, {SUBMITTERS} concurrent callers, no "
        "`WatchJob`); at each level, once `/__sim/state` counts exactly that many requests "
        f"in flight (every job waiting inside the model call), it samples {SAMPLES_PER_LEVEL} "
        f"times {SAMPLE_GAP_SECONDS:g} s apart. Levels climb within a run, so no step reuses "
        "memory an earlier one freed; all jobs are cancelled at the end. No process's RSS "
        "shrinks much once they are (last column: the allocators keep their heaps, so the "
        "high-water is what to provision), while Redis's `used_memory` falls back: the job "
        "keys are gone. The server keeps nothing of a job once `Submit` has answered; its "
        "growth is heap left by validating Bundles, which grows with Submits done rather than "
        "jobs held, so its slope here is an upper bound. Redis holds a job's stay as the "
        "server validated it (the facts the summary reads, as JSON, compressed with zlib and "
        "sealed with AES-256-GCM), not the Bundle: the 'sealed stay' size. The simulator (the model "
        "server) is not counted. "
        f"Took {seconds:.0f} s{'' if drawn else ' (no plot: matplotlib is not installed)'}.\n"
    )
    if notes:
        text += "\n" + "\n".join(f"- {note}" for note in sorted(set(notes))) + "\n"
    return text


if __name__ == "__main__":
    print(markdown())
