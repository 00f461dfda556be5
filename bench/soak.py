"""Soak: thousands of jobs through the queued deployment, memory and Redis keys watched.

The queued deployment of ``tests/deployment.py`` (redis-server, one ``epicrisis tgi-sim``
with a small time per token, ``epicrisis worker`` processes, ``epicrisis serve``), each its
own process on 127.0.0.1, with a short job TTL (``EPICRISIS_JOB_TTL_SECONDS``). This
process submits ``--jobs`` jobs (LLM backend; the packaged sample stay and, when the corpus
is beside the clone, a few small Synthea stays, in turn; every second job with an
idempotency key, every fourth at batch priority, every hundredth cancelled right after
Submit), at most ``--in-flight`` at once, and follows each with ``WatchJob`` to its final
state. Meanwhile it samples every few seconds:

- the resident memory (``VmRSS`` from ``/proc/<pid>/status``) of the server, each worker,
  the simulator and redis-server, and Redis's own ``used_memory`` (``INFO memory``);
- every key in Redis (``SCAN`` + ``PTTL``) about once a minute, by family: a key of a job
  without a TTL is a defect; Celery's and kombu's bookkeeping keys (queues, bindings,
  unacked messages) have none by design, and their sizes are recorded to show they stay
  bounded.

After the last job it waits for the TTL to pass and checks that the job keys are back to
the count before the first job (no key outlives its expiry), then stops the deployment
(each process must exit cleanly). It writes ``soak.csv`` (the samples), ``soak.json`` (the
results), ``soak-rss.png`` (memory over time) and ``soak.md`` (the README section) into
``--out`` (default ``bench/``), and, when ``--out`` is ``bench/``, replaces the section
in ``bench/README.md`` (``bench/run.py`` appends ``soak.md`` when it rewrites the README).

    .venv/bin/python bench/soak.py                      # 10,000 jobs, about 15 minutes on 2 cores
    .venv/bin/python bench/soak.py --jobs 300 --ttl-seconds 30 --out /tmp/soak
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import redis

import epicrisis
from epicrisis.v1 import summarizer_pb2 as pb

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from deployment import SAMPLE, Deployment, deployed  # the tests' process harness

HERE = Path(__file__).resolve().parent
CORPUS = HERE.parents[1] / "shared" / "data" / "fhir" / "synthea-r4"
# small Synthea stays (0.6-1.1 MB, prompts of 1,000-1,400 tokens): answers of other lengths
CORPUS_STAYS = (
    "Rudolf_Weber_a4b93263-c55f-4d39-8c4e-31dfba932181.json",
    "Lavelle_Kuvalis_9f0fb46c-c9f5-4c50-a983-9f87bf591ce9.json",
    "Natalia_Ruelas_bff04956-b74d-46b1-b8a3-a41b083b3045.json",
)
SIM_ARGS = ("--first-token-latency", "0.05", "--token-latency", "0.002", "--seed", "0")
JOB_SECONDS = 300.0  # bound on one job, Submit to final
STATES = {
    pb.JOB_STATE_SUCCEEDED: "succeeded",
    pb.JOB_STATE_FAILED: "failed",
    pb.JOB_STATE_CANCELLED: "cancelled",
}
PREFIX = "epicrisis"
JOB_FAMILIES = ("job", "payload", "runs", "idem")  # {prefix}:{family}:{id}: a TTL each
MB = 1024 * 1024


# -- processes ---------------------------------------------------------------------------


def rss_bytes(pid: int) -> int | None:
    """Resident set size of a live process (``VmRSS``), None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children() -> dict[int, list[str]]:
    """This process's children: pid to command line (``tests/deployment.py`` starts every
    part of the deployment as a child and does not say which pid is the server)."""
    found = {}
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == me:
                cmdline = (entry / "cmdline").read_bytes().decode().rstrip("\0")
                found[int(entry.name)] = cmdline.split("\0")
    return found


def processes(running: Deployment) -> dict[str, int]:
    """Name to pid: server, worker-0..n, sim, redis."""
    named = {f"worker-{i}": worker.pid for i, worker in enumerate(running.workers)}
    for pid, argv in sorted(children().items()):
        if pid in named.values():
            continue
        if argv[0].split()[0].endswith("redis-server"):  # it rewrites its title
            named["redis"] = pid
        elif "tgi-sim" in argv:
            named["sim"] = pid
        elif "serve" in argv:
            named["server"] = pid
    missing = {"server", "redis", "sim"} - named.keys()
    if missing:
        raise RuntimeError(f"soak: could not find {sorted(missing)} among {children()}")
    return named


# -- Redis keys --------------------------------------------------------------------------


def family(key: str) -> str:
    """A key's family: ``epicrisis:job`` ..., ``celery-task-meta``, ``kombu`` ..."""
    if key.startswith(PREFIX + ":"):
        return ":".join(key.split(":")[:2])
    if key.startswith("celery-task-meta-"):
        return "celery-task-meta"
    if key.startswith("_kombu."):
        return key  # bindings: one per exchange, named in full
    if key in ("unacked", "unacked_index", "unacked_mutex", "interactive", "batch"):
        return key
    if key.endswith(".reply.celery.pidbox"):
        return "*.reply.celery.pidbox"
    return "other:" + key


def bounded_by_design(name: str) -> bool:
    """Celery's and kombu's bookkeeping: no TTL, size bounded by queues and messages held."""
    return name.startswith("_kombu.") or name in (
        "unacked",
        "unacked_index",
        "unacked_mutex",
        "interactive",
        "batch",
    )


def _size(client: redis.Redis, key: str, kind: str) -> int:
    sizer = {"list": client.llen, "hash": client.hlen, "set": client.scard, "zset": client.zcard}
    return int(sizer[kind](key)) if kind in sizer else 1


def census(client: redis.Redis) -> dict[str, dict[str, Any]]:
    """Every key by family: count, keys without a TTL, the longest TTL left (s), and for
    bookkeeping keys their type and size (members, entries)."""
    out: dict[str, dict[str, Any]] = {}
    keys = [k.decode() for k in client.scan_iter(count=1000)]
    for start in range(0, len(keys), 1000):
        chunk = keys[start : start + 1000]
        with client.pipeline(transaction=False) as pipe:
            for key in chunk:
                pipe.pttl(key)
            ttls = pipe.execute()
        for key, ttl in zip(chunk, ttls, strict=True):
            if ttl == -2:
                continue  # expired between SCAN and PTTL
            name = family(key)
            entry = out.setdefault(name, {"count": 0, "no_ttl": 0, "max_ttl_s": 0.0})
            entry["count"] += 1
            if ttl == -1:
                entry["no_ttl"] += 1
            else:
                entry["max_ttl_s"] = max(entry["max_ttl_s"], ttl / 1000)
            if bounded_by_design(name):
                kind = client.type(key).decode()
                entry["type"] = kind
                entry["size"] = entry.get("size", 0) + _size(client, key, kind)
    return out


def job_keys(taken: dict[str, dict[str, Any]]) -> int:
    """Keys that belong to jobs: the store's job families and Celery's results."""
    names = [f"{PREFIX}:{f}" for f in JOB_FAMILIES] + ["celery-task-meta"]
    return sum(taken.get(name, {}).get("count", 0) for name in names)


def defects(taken: dict[str, dict[str, Any]]) -> dict[str, int]:
    """Families whose keys ought to expire but have no TTL."""
    return {
        name: entry["no_ttl"]
        for name, entry in taken.items()
        if entry["no_ttl"] and not bounded_by_design(name)
    }


# -- sampling ----------------------------------------------------------------------------


@dataclass
class Sample:
    t: float  # seconds since the first Submit
    done: int  # jobs final so far
    rss: dict[str, int | None]  # process name to bytes
    used_memory: int  # Redis INFO memory
    keys: int  # DBSIZE
    clients: int  # Redis INFO clients: connected_clients
    channels: int  # Redis INFO stats: pubsub_channels (Celery result subscriptions among them)


@dataclass
class Progress:
    done: int = 0
    submitted: int = 0
    states: Counter[str] = field(default_factory=Counter)
    fallbacks: int = 0
    rpc_errors: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Sampler(threading.Thread):
    """Memory every ``every`` seconds, a key census every ``census_every`` seconds."""

    def __init__(
        self,
        pids: dict[str, int],
        client: redis.Redis,
        progress: Progress,
        every: float,
        census_every: float,
    ) -> None:
        super().__init__(name="soak-sampler", daemon=True)
        self.pids = pids
        self.client = client
        self.progress = progress
        self.every = every
        self.census_every = census_every
        self.t0 = time.monotonic()
        self.samples: list[Sample] = []
        self.censuses: list[tuple[float, int, dict[str, dict[str, Any]]]] = []
        self.gone: dict[str, float] = {}  # a process that died (or was killed) meanwhile
        self._halt = threading.Event()

    def sample(self) -> Sample:
        info = self.client.info()
        rss = {name: rss_bytes(pid) for name, pid in self.pids.items()}
        t = time.monotonic() - self.t0
        for name, value in rss.items():
            if value is None and name not in self.gone:
                self.gone[name] = t
                print(f"soak: {name} (pid {self.pids[name]}) is gone at {t:.0f} s", flush=True)
        return Sample(
            t=t,
            done=self.progress.done,
            rss=rss,
            used_memory=int(info["used_memory"]),
            keys=int(self.client.dbsize()),
            clients=int(info["connected_clients"]),
            channels=int(info["pubsub_channels"]),
        )

    def take_census(self) -> dict[str, dict[str, Any]]:
        taken = census(self.client)
        self.censuses.append((time.monotonic() - self.t0, self.progress.done, taken))
        return taken

    def run(self) -> None:
        last_census = -self.census_every
        while not self._halt.is_set():
            started = time.monotonic()
            with contextlib.suppress(redis.RedisError):
                self.samples.append(self.sample())
                if started - self.t0 - last_census >= self.census_every:
                    last_census = started - self.t0
                    self.take_census()
            self._halt.wait(max(0.0, self.every - (time.monotonic() - started)))

    def stop(self) -> None:
        self._halt.set()
        self.join()


# -- load --------------------------------------------------------------------------------


def stays() -> list[tuple[str, bytes]]:
    found = [("sample-stay", SAMPLE)]
    for name in CORPUS_STAYS:
        path = CORPUS / name
        if path.is_file():
            found.append((name.split("_")[0] + "_" + name.split("_")[1], path.read_bytes()))
    return found


def request_for(i: int, bundles: list[tuple[str, bytes]], run_id: str) -> pb.SubmitRequest:
    options = pb.SummaryOptions(
        backend=pb.BACKEND_LLM,
        priority=pb.PRIORITY_BATCH if i % 4 == 3 else pb.PRIORITY_INTERACTIVE,
    )
    request = pb.SubmitRequest(bundle=bundles[i % len(bundles)][1], options=options)
    if i % 2 == 0:
        request.idempotency_key = f"soak-{run_id}-{i}"
    return request


def run_jobs(
    running: Deployment, jobs: int, in_flight: int, progress: Progress, cancel_every: int
) -> float:
    """``jobs`` jobs from ``in_flight`` threads sharing one channel: Submit, then WatchJob
    to the final state (RESOURCE_EXHAUSTED: wait and submit again). Seconds taken."""
    bundles = stays()
    run_id = uuid.uuid4().hex[:8]
    counter = itertools.count()
    channel, stub = running.stub()

    def one(i: int) -> None:
        request = request_for(i, bundles, run_id)
        started = time.monotonic()
        while True:
            try:
                job = stub.Submit(request, timeout=60)
                break
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                time.sleep(0.5)
        with progress.lock:
            progress.submitted += 1
        if cancel_every and i % cancel_every == cancel_every - 1:
            stub.CancelJob(pb.CancelJobRequest(id=job.id), timeout=60)
        final = None
        for update in stub.WatchJob(pb.WatchJobRequest(id=job.id), timeout=JOB_SECONDS):
            if update.state in STATES:
                final = update
                break
        if final is None:
            raise RuntimeError(f"job {job.id}: the watch ended without a final state")
        with progress.lock:
            progress.states[STATES[final.state]] += 1
            progress.fallbacks += bool(
                final.state == pb.JOB_STATE_SUCCEEDED and final.summary.provenance.fallback
            )
            progress.latencies.append(time.monotonic() - started)

    def loop() -> None:
        while (i := next(counter)) < jobs:
            try:
                one(i)
            except grpc.RpcError as exc:
                with progress.lock:
                    progress.rpc_errors[f"{exc.code().name}: {exc.details()}"[:160]] += 1
            except RuntimeError as exc:
                with progress.lock:
                    progress.rpc_errors[str(exc)[:160]] += 1
            with progress.lock:
                progress.done += 1

    started = time.monotonic()
    threads = [threading.Thread(target=loop, daemon=True) for _ in range(in_flight)]
    with channel:
        for thread in threads:
            thread.start()
        last = -1
        while any(thread.is_alive() for thread in threads):
            time.sleep(1)
            if progress.done // 500 != last // 500:
                last = progress.done
                rate = progress.done / (time.monotonic() - started)
                print(f"soak: {progress.done}/{jobs} jobs final ({rate:.1f}/s)", flush=True)
        for thread in threads:
            thread.join()
    return time.monotonic() - started


def wait_for_expiry(
    sampler: Sampler, baseline: int, ttl: float, margin: float
) -> tuple[float | None, list[tuple[float, int]]]:
    """After the last job: poll the job keys until they are back to ``baseline`` (or the
    TTL and ``margin`` have passed). Seconds until then (None if never), and the counts."""
    started = time.monotonic()
    trace: list[tuple[float, int]] = []
    while time.monotonic() - started < ttl + margin:
        count = job_keys(census(sampler.client))
        trace.append((time.monotonic() - started, count))
        if count <= baseline:
            return time.monotonic() - started, trace
        time.sleep(5)
    return None, trace


# -- figures -----------------------------------------------------------------------------


def _slope_mb_per_1000(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of MB against jobs done, per 1,000 jobs."""
    if len(points) < 3 or len({x for x, _ in points}) < 2:
        return None
    xs = [x / 1000 for x, _ in points]
    ys = [y for _, y in points]
    return statistics.linear_regression(xs, ys).slope


def memory_figures(
    samples: list[Sample], jobs: int, run_seconds: float, ttl: float
) -> dict[str, dict[str, float | None]]:
    """Per process, over the samples while jobs ran: medians of the first and last 10 % of
    the jobs (with min-max), growth, the slope after the warm-up (the first 10 % of the
    jobs and the first TTL, while the count of live job keys rises to its steady level),
    peak."""
    running = [s for s in samples if s.t <= run_seconds]
    warm = [s.done for s in running if s.done >= jobs * 0.1 and s.t >= ttl]
    warm_done = min(warm) if len(warm) >= 3 else jobs * 0.1
    names = [*running[0].rss, "redis used_memory"]
    out: dict[str, dict[str, float | None]] = {}

    def value(s: Sample, name: str) -> float | None:
        raw = s.used_memory if name == "redis used_memory" else s.rss.get(name)
        return None if raw is None else raw / MB

    for name in names:
        points = [(s.done, v) for s in running if (v := value(s, name)) is not None]
        first = [v for done, v in points if done <= jobs * 0.1] or [points[0][1]]
        last = [v for done, v in points if done >= jobs * 0.9] or [points[-1][1]]
        out[name] = {
            "first_median": statistics.median(first),
            "first_min": min(first),
            "first_max": max(first),
            "last_median": statistics.median(last),
            "last_min": min(last),
            "last_max": max(last),
            "growth": statistics.median(last) - statistics.median(first),
            "slope_per_1000": _slope_mb_per_1000([p for p in points if p[0] >= warm_done]),
            "slope_from_job": warm_done,
            "max": max(v for _, v in points),
        }
    return out


def write_csv(path: Path, samples: list[Sample]) -> None:
    names = list(samples[0].rss)
    with path.open("w", newline="") as sink:
        out = csv.writer(sink)
        head = ["t_s", "jobs_done", *(f"{n}_rss_mb" for n in names), "redis_used_mb"]
        out.writerow([*head, "keys", "redis_clients", "pubsub_channels"])
        for s in samples:
            rss = [("" if s.rss[n] is None else f"{s.rss[n] / MB:.2f}") for n in names]
            used = f"{s.used_memory / MB:.2f}"
            out.writerow([f"{s.t:.1f}", s.done, *rss, used, s.keys, s.clients, s.channels])


def plot(path: Path, samples: list[Sample], run_seconds: float, title: str) -> bool:
    """Memory over time (PNG); False when matplotlib is not installed (``.[bench]``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    minutes = [s.t / 60 for s in samples]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True, height_ratios=(3, 2))
    for name in samples[0].rss:
        values = [None if s.rss[name] is None else s.rss[name] / MB for s in samples]
        top.plot(minutes, values, label=f"{name} RSS", linewidth=1.2)
    top.plot(minutes, [s.used_memory / MB for s in samples], label="redis used_memory", lw=1.2)
    top.set_ylabel("MB")
    top.set_ylim(bottom=0)
    top.legend(loc="upper left", fontsize=8, ncols=3)
    top.set_title(title)
    bottom.plot(minutes, [s.done for s in samples], color="black", lw=1.2, label="jobs final")
    bottom.set_ylabel("jobs final")
    keys = bottom.twinx()
    keys.plot(minutes, [s.keys for s in samples], color="tab:red", lw=1, label="Redis keys")
    keys.set_ylabel("Redis keys", color="tab:red")
    bottom.set_xlabel("minutes since the first Submit")
    for axis in (top, bottom):
        axis.axvline(run_seconds / 60, color="grey", ls="--", lw=0.8)
        axis.grid(alpha=0.3)
    bottom.text(run_seconds / 60, 0, " last job final; then the TTL runs out", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    total = 0
    with contextlib.suppress(OSError, ValueError):
        total = int(Path("/proc/meminfo").read_text().split()[1]) // 1024 // 1024
    return (
        f"{cpu}, {os.cpu_count()} cores, {total} GiB, Python {platform.python_version()} "
        f"on {platform.system()}"
    )


def _mb(value: float | None, sign: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.1f}" if sign else f"{value:.1f}"


def markdown(r: dict[str, Any]) -> str:
    """The README section from the results (``soak.json``)."""
    a = r["args"]
    states = r["states"]
    lines = [
        f"## Soak: {a['jobs']:,} jobs",
        "",
        f"Written by `python bench/soak.py --jobs {a['jobs']} --ttl-seconds "
        f"{a['ttl_seconds']:g}` ({r['started']}) on: {r['machine']}; epicrisis "
        f"{r['version']}. Took {r['total_seconds'] / 60:.0f} min: "
        f"{r['run_seconds'] / 60:.1f} min of jobs, then {r['expiry_wait_seconds']:.0f} s "
        "waiting for the job TTL to run out.",
        "",
        "The queued deployment of `tests/deployment.py`, each part its own process on "
        f"127.0.0.1: redis-server, one `epicrisis tgi-sim` (`{' '.join(SIM_ARGS)}`), "
        f"{a['workers']} `epicrisis worker` (`--concurrency {a['worker_concurrency']}` each) "
        f"and `epicrisis serve`, with `EPICRISIS_JOB_TTL_SECONDS={a['ttl_seconds']:g}` so "
        f"that expiry is seen within the run. {a['jobs']:,} jobs with the LLM backend, at "
        f"most {a['in_flight']} at once from this process (Submit, then WatchJob to the "
        f"final state), cycling {len(r['stays'])} stays ({', '.join(r['stays'])}); every "
        "second job with an idempotency key, every fourth at batch priority, every "
        f"{a['cancel_every']}th cancelled right after Submit. Every {a['sample_seconds']:g} "
        "s the resident memory (`VmRSS`) of each process and Redis's `used_memory` are "
        f"sampled; every key in Redis is listed with its TTL every {a['census_seconds']:g} "
        "s and again after the run.",
        "",
        "| jobs | succeeded | failed | cancelled | fallbacks | RPC errors | jobs/s "
        "| Submit to final p50 s | p99 s |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {a['jobs']:,} | {states.get('succeeded', 0):,} | {states.get('failed', 0):,} "
        f"| {states.get('cancelled', 0):,} | {r['fallbacks']} | {sum(r['rpc_errors'].values())} "
        f"| {r['jobs_per_second']:.2f} | {r['latency_p50']:.2f} | {r['latency_p99']:.2f} |",
        "",
        "Memory in MB: median over the samples taken while the first 10 % of the jobs ran "
        "and while the last 10 % ran (min-max in brackets), the difference, the "
        "least-squares slope against jobs done after the warm-up (from job "
        f"{min(m['slope_from_job'] for m in r['memory'].values()):,.0f}: past the first 10 % "
        "of the jobs and the first TTL, while the live job keys rise to their steady count), "
        f"and the peak; {r['samples_running']} samples while jobs ran.",
        "",
        "| process | first 10 % | last 10 % | last - first | slope MB / 1,000 jobs | peak "
        "| CPU s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, m in r["memory"].items():
        cpu = r["cpu_seconds"].get(name)
        slope = m["slope_per_1000"]
        lines.append(
            f"| {name} | {_mb(m['first_median'])} ({_mb(m['first_min'])}-{_mb(m['first_max'])}) "
            f"| {_mb(m['last_median'])} ({_mb(m['last_min'])}-{_mb(m['last_max'])}) "
            f"| {_mb(m['growth'], sign=True)} "
            f"| {'-' if slope is None else f'{slope:+.2f}'} "
            f"| {_mb(m['max'])} | {'-' if cpu is None else f'{cpu:.0f}'} |"
        )
    lines += [
        "",
        "![Memory over time](soak-rss.png) (samples: `soak.csv`)",
        "",
        f"Redis clients: at most {r['redis_clients_max']} connected; pub/sub channels with a "
        f"subscriber: at most {r['pubsub_channels_max']}, {r['pubsub_channels_last']} at the "
        "end (the server's job watchers share one pattern subscription; Celery keeps no "
        "results, so sending a task subscribes to nothing: a count growing with the jobs "
        "would be a leak).",
        "",
    ]
    lines += [
        "Redis keys by family: the most seen in one listing during the run, keys without a "
        "TTL (most in one listing), and after the TTL has passed.",
        "",
        "| family | most during the run | without TTL | longest TTL left s | size (entries) "
        "| after the TTL |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    after = r["keys_after"]
    for name in sorted(set(r["keys_peak"]) | set(after)):
        peak = r["keys_peak"].get(name, {})
        size = peak.get("size_max")
        lines.append(
            f"| `{name}` | {peak.get('count', 0):,} | {peak.get('no_ttl', 0):,} "
            f"| {peak.get('max_ttl_s', 0):.0f} | {'-' if size is None else f'{size:,}'} "
            f"| {after.get(name, {}).get('count', 0):,} |"
        )
    peak = r["keys_peak"]

    def most(*names: str) -> int:
        return max((peak.get(n, {}).get("size_max", 0) for n in names), default=0)

    lines += [
        "",
        "Every key of a job has the job's TTL: `epicrisis:job:*` (the sealed record), "
        "`epicrisis:payload:*` (the sealed stay, deleted when the job is final), "
        "`epicrisis:runs:*` (deliveries), `epicrisis:idem:*` (idempotency keys) and "
        "`epicrisis:live:*` (the unfinished jobs, refreshed with each one added); "
        "`epicrisis:workers:all` lives three heartbeats past the last one. Without a TTL, by "
        "design, are only Celery's and kombu's own keys, none of which grows with the jobs: "
        "the queues `interactive` and `batch` (lists, at most `EPICRISIS_MAX_QUEUED_JOBS` "
        "each; empty here, the workers kept up), `unacked` and `unacked_index` (the "
        "messages delivered and not yet acknowledged: at most the workers' concurrency, "
        f"here {r['args']['workers']} x {r['args']['worker_concurrency']}; largest seen "
        f"{most('unacked', 'unacked_index')}; deleted when empty), and the binding tables "
        "`_kombu.binding.*` (the queues bound to each exchange, and `celery.pidbox` for "
        "remote control), `_kombu.binding_permanent.*` and `_kombu.binding_deadlines` "
        "(kombu 5.7's record of which bindings expire): one member per binding, created "
        "when the workers start.",
        "",
        r["verdict"],
        # what a look into the run found (tracemalloc, Redis): paragraphs added to soak.json
        *(f"\n{paragraph}" for paragraph in r.get("findings", [])),
        "",
        "To reproduce (about 20 minutes; redis-server on PATH, the corpus beside the clone "
        "is optional): `.venv/bin/pip install -e '.[dev,bench]'`, then "
        "`.venv/bin/python bench/soak.py` (`--jobs`, `--ttl-seconds`, `--in-flight`, "
        "`--workers`, `--out DIR` to leave this file alone; `--help`). It exits 1 on a key "
        "without a TTL, job keys outliving the TTL, or a process that did not exit cleanly. "
        "`bench/run.py` keeps this section (`bench/soak.md`) when it rewrites the README.",
    ]
    return "\n".join(lines) + "\n"


def verdict(r: dict[str, Any]) -> str:
    flat_mb = r["args"]["flat_mb"]
    notes = []
    for name, m in r["memory"].items():
        growth = m["growth"] or 0.0
        slope = m["slope_per_1000"] or 0.0
        if slope * r["args"]["jobs"] / 1000 > flat_mb:
            word = "GROWS"
        elif growth > flat_mb:
            word = "rises in the warm-up, then flat"
        else:
            word = "flat"
        notes.append(f"{name} {word} ({growth:+.1f} MB, {slope:+.2f} MB / 1,000 jobs)")
    if r["key_defects"]:
        keys = "keys without a TTL: " + ", ".join(f"{n} ({c})" for n, c in r["key_defects"].items())
    else:
        keys = "no job key without a TTL"
    if r["expired_after_seconds"] is None:
        expiry = (
            f"job keys NOT back to the baseline of {r['baseline_job_keys']} within the TTL + margin"
        )
    else:
        expiry = (
            f"job keys back to the baseline ({r['baseline_job_keys']}) "
            f"{r['expired_after_seconds']:.0f} s after the last job (TTL {r['args']['ttl_seconds']:g} s)"
        )
    clean = "every process exited cleanly" if r["clean_shutdown"] else r["shutdown_error"]
    if r["gone"]:
        clean = "GONE before the end: " + ", ".join(
            f"{name} at {t:.0f} s" for name, t in r["gone"].items()
        )
    return (
        f"Verdict (a process GROWS when its slope after the warm-up, over all "
        f"{r['args']['jobs']:,} jobs, comes to more than {flat_mb:g} MB): {'; '.join(notes)}. "
        f"{keys[0].upper() + keys[1:]}; {expiry}; {clean}."
    )


def splice_readme(readme: Path, section: str) -> None:
    """Replace the soak section of the README (from its heading to the next ``## ``), or
    append it."""
    text = readme.read_text()
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.startswith("## Soak: ")), None)
    if start is None:
        readme.write_text(text.rstrip("\n") + "\n\n" + section)
        return
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    tail = "".join(lines[end:])
    readme.write_text("".join(lines[:start]) + section + ("\n" + tail if tail else ""))


# -- main --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--ttl-seconds", type=float, default=120.0)
    parser.add_argument("--in-flight", type=int, default=32, help="jobs open at once")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--worker-concurrency", type=int, default=16)
    parser.add_argument("--cancel-every", type=int, default=100, help="0: never cancel")
    parser.add_argument("--sample-seconds", type=float, default=5.0)
    parser.add_argument("--census-seconds", type=float, default=60.0)
    parser.add_argument("--flat-mb", type=float, default=10.0, help="growth taken as flat")
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--logs", type=Path, help="keep the processes' logs here")
    parser.add_argument(
        "--render",
        action="store_true",
        help="only write soak.md (and the README) again from --out's soak.json, with its "
        "`findings` (paragraphs added after a run)",
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.render:
        results = json.loads((args.out / "soak.json").read_text())
        results["verdict"] = verdict(results)
        section = markdown(results)
        (args.out / "soak.md").write_text(section)
        if args.out.resolve() == HERE:
            splice_readme(HERE / "README.md", section)
        print(section)
        return 0
    logs = args.logs or Path(tempfile.mkdtemp(prefix="epicrisis-soak-"))
    logs.mkdir(parents=True, exist_ok=True)
    print(f"soak: logs in {logs}", flush=True)
    started_at = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    wall = time.monotonic()
    env = {"EPICRISIS_JOB_TTL_SECONDS": f"{args.ttl_seconds:g}"}
    progress = Progress()
    results: dict[str, Any] = {}
    shutdown_error = ""
    try:
        with deployed(
            logs,
            sims=1,
            sim_args=SIM_ARGS,
            worker_args=("--concurrency", str(args.worker_concurrency)),
            workers=args.workers,
            env=env,
        ) as running:
            client = redis.Redis.from_url(running.env["EPICRISIS_REDIS_URL"])
            pids = processes(running)
            print(f"soak: processes {pids}", flush=True)
            sampler = Sampler(pids, client, progress, args.sample_seconds, args.census_seconds)
            baseline = sampler.take_census()
            sampler.start()
            run_seconds = run_jobs(running, args.jobs, args.in_flight, progress, args.cancel_every)
            print(f"soak: jobs done in {run_seconds:.0f} s; waiting for the TTL", flush=True)
            after_run = sampler.take_census()
            expiry_start = time.monotonic()
            expired_after, trace = wait_for_expiry(
                sampler, job_keys(baseline), args.ttl_seconds, margin=120.0
            )
            expiry_wait = time.monotonic() - expiry_start
            sampler.stop()
            keys_after = sampler.take_census()
            cpu = {name: cpu_seconds(pid) for name, pid in pids.items()}
            with contextlib.suppress(redis.RedisError):
                results["redis_clients"] = [
                    {k: c.get(k) for k in ("name", "sub", "psub", "omem", "tot-mem", "cmd")}
                    for c in client.client_list()
                ]
            client.close()
            results.update(
                pids=pids,
                baseline=baseline,
                after_run=after_run,
                keys_after=keys_after,
                expiry_trace=trace,
                expired_after_seconds=expired_after,
                expiry_wait_seconds=expiry_wait,
                cpu_seconds=cpu,
                run_seconds=run_seconds,
            )
    except AssertionError as exc:  # a process did not stop cleanly (or did not start)
        shutdown_error = str(exc)[-3000:]
        print(f"soak: {shutdown_error}", file=sys.stderr)
        if "run_seconds" not in results:
            return 1
    samples = sampler.samples
    # the sampler measures from its start, just before the first Submit
    run_seconds = results["run_seconds"]
    peak: dict[str, dict[str, Any]] = {}
    for _t, _done, taken in sampler.censuses:
        for name, entry in taken.items():
            p = peak.setdefault(name, {"count": 0, "no_ttl": 0, "max_ttl_s": 0.0})
            p["count"] = max(p["count"], entry["count"])
            p["no_ttl"] = max(p["no_ttl"], entry["no_ttl"])
            p["max_ttl_s"] = max(p["max_ttl_s"], entry["max_ttl_s"])
            if "size" in entry:
                p["size_max"] = max(p.get("size_max", 0), entry["size"])
    key_defects: Counter[str] = Counter()
    for _t, _done, taken in sampler.censuses:
        for name, count in defects(taken).items():
            key_defects[name] = max(key_defects[name], count)
    latencies = sorted(progress.latencies) or [0.0]
    results.update(
        args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        started=started_at,
        machine=machine(),
        version=epicrisis.__version__,
        stays=[name for name, _ in stays()],
        states=dict(progress.states),
        fallbacks=progress.fallbacks,
        rpc_errors=dict(progress.rpc_errors),
        jobs_per_second=progress.done / run_seconds,
        latency_p50=statistics.median(latencies),
        latency_p99=latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
        samples_running=sum(1 for s in samples if s.t <= run_seconds),
        memory=memory_figures(samples, args.jobs, run_seconds, args.ttl_seconds),
        gone=sampler.gone,
        redis_clients_max=max((s.clients for s in samples), default=0),
        pubsub_channels_max=max((s.channels for s in samples), default=0),
        pubsub_channels_last=samples[-1].channels if samples else 0,
        keys_peak=peak,
        key_defects=dict(key_defects),
        baseline_job_keys=job_keys(results["baseline"]),
        censuses=[(t, done, taken) for t, done, taken in sampler.censuses],
        clean_shutdown=not shutdown_error,
        shutdown_error=shutdown_error,
        total_seconds=time.monotonic() - wall,
    )
    results["verdict"] = verdict(results)
    write_csv(args.out / "soak.csv", samples)
    (args.out / "soak.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    title = f"epicrisis soak: {args.jobs:,} jobs, job TTL {args.ttl_seconds:g} s"
    if not plot(args.out / "soak-rss.png", samples, run_seconds, title):
        print("soak: matplotlib is not installed (pip install -e '.[bench]'): no PNG")
    section = markdown(results)
    (args.out / "soak.md").write_text(section)
    if args.out.resolve() == HERE:
        splice_readme(HERE / "README.md", section)
    print(section)
    bad = results["key_defects"] or results["expired_after_seconds"] is None or shutdown_error
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
