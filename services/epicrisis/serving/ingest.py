"""Bundle to stay for the servers: validation in worker processes, so one server uses its cores.

Parsing and validating a Bundle is CPU work under the GIL. In the server's own threads it
queues behind every other call's gRPC, protobuf and job work (and, embedded, the prompt
and the verifier), so a server process used about one core however many it had.
:class:`StayLoader` runs ``load_stay`` in spawned processes and brings the stay back
through its codec (a fifth of the sample Bundle's size, decoded in about 1 % of the time
``load_stay`` takes); with no processes it runs in a thread, as before.

A process that dies (a Bundle that exhausts its memory, say) fails the calls it held with
a retryable error and is replaced; the server goes on serving. The processes are spawned,
so a program that starts a server through the Python API guards its entry point, as
``multiprocessing`` requires.
"""

from __future__ import annotations

import asyncio
import logging
import math
import multiprocessing
import os
import signal
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from epicrisis.config import Limits
from epicrisis.errors import ConfigurationError, EpicrisisError
from epicrisis.pipeline import load_stay
from epicrisis.stay import Stay
from epicrisis.stay.codec import decode_stay, encode_stay

log = logging.getLogger(__name__)
# Bundles validated at once in a thread of the server: more threads only take time from
# the event loop that serves every other call; two keep one large Bundle from holding up
# the rest. With processes, one more than the processes: the next Bundle waits in the pipe.
THREAD_VALIDATIONS = 2
YOUNG_COLLECTION_THRESHOLD = 20_000
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1_CPU = Path("/sys/fs/cgroup/cpu")
MAX_DEFAULT_PROCESSES = 4


class IngestUnavailable(EpicrisisError):
    """The process validating the Bundle stopped; another attempt gets a new one."""

    retryable = True


def settle_heap() -> None:
    """Tune the cyclic collector for a process whose work is big acyclic JSON trees.

    A parsed Bundle is tens of thousands of new containers: at the default threshold (700)
    each request set off about nine collections and, now and then, a full one walking every
    module and FHIR model the imports built. Freezing that start-up heap and collecting the
    young generation every 20,000 net allocations took the collector's time per request
    from about 7 ms to 0.1 ms (the sample Bundle, 8 requests in flight, one process); the
    garbage cycles left waiting in between are bounded by the same 20,000 objects."""
    import gc

    gc.freeze()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, *gc.get_threshold()[1:])


def usable_cpus(cpu_max: Path = CGROUP_CPU_MAX, cgroup_v1_cpu: Path = CGROUP_V1_CPU) -> int:
    """The CPUs this process may use: its affinity, capped by a cgroup CPU quota (a
    Kubernetes limit of 2 on a 64-core node is 2, not 64): v2's ``cpu.max``, else v1's
    ``cpu.cfs_quota_us`` over ``cpu.cfs_period_us``."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    quota = _cgroup_quota(cpu_max, cgroup_v1_cpu)
    return min(cpus or 1, quota) if quota is not None else cpus or 1


def _cgroup_quota(cpu_max: Path, cgroup_v1_cpu: Path) -> int | None:
    """CPUs the cgroup quota allows, rounded up; None without one."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = (cgroup_v1_cpu / "cpu.cfs_quota_us").read_text().strip()
            period = (cgroup_v1_cpu / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    try:
        if quota in ("max", "-1"):
            return None
        return max(1, math.ceil(int(quota) / int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def default_processes() -> int:
    """One process per usable CPU but one, which the event loop keeps, and at most
    ``MAX_DEFAULT_PROCESSES`` (each holds 100-150 MB: more is a choice to make, not a
    default on a large machine); none on one CPU, where a process would only add its pipe
    to the same core."""
    return min(usable_cpus() - 1, MAX_DEFAULT_PROCESSES)


class StayLoader:
    """``load_stay`` for the servers, in ``processes`` worker processes (0: in a thread)."""

    def __init__(self, limits: Limits, processes: int) -> None:
        self._limits = limits
        self._processes = processes
        self._executor: ProcessPoolExecutor | None = None
        self._at_once = asyncio.Semaphore(processes + 1 if processes else THREAD_VALIDATIONS)

    async def start(self) -> None:
        """Spawn the processes and wait until each has imported the pipeline, so that the
        first Submits do not pay for it."""
        if self._processes:
            executor = self._new_executor()
            loop = asyncio.get_running_loop()
            try:
                await asyncio.gather(
                    *(loop.run_in_executor(executor, _ready) for _ in range(self._processes))
                )
            except BrokenProcessPool:
                await self.aclose()
                raise ConfigurationError(
                    "the ingest processes did not start (a program that starts the server "
                    "must guard its entry point with `if __name__ == '__main__':`); "
                    "EPICRISIS_INGEST_PROCESSES=0 validates in the server's own process"
                ) from None

    async def aclose(self) -> None:
        if self._executor is not None:
            executor, self._executor = self._executor, None
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)

    async def load(
        self,
        bundle: bytes,
        *,
        encounter_id: str | None = None,
        strict: bool = False,
        allow_emergency: bool = False,
    ) -> Stay:
        """The stay, or the InputError that says what is wrong with the Bundle."""
        async with self._at_once:
            if not self._processes:
                return await asyncio.to_thread(
                    load_stay,
                    bundle,
                    limits=self._limits,
                    encounter_id=encounter_id,
                    strict=strict,
                    allow_emergency=allow_emergency,
                )
            executor = self._executor or self._new_executor()
            loop = asyncio.get_running_loop()
            try:
                encoded = await loop.run_in_executor(
                    executor, _load, bundle, self._limits, encounter_id, strict, allow_emergency
                )
            except BrokenProcessPool:
                if self._executor is executor:  # the first call to see it replaces the pool
                    self._executor = None
                    executor.shutdown(wait=False, cancel_futures=True)
                    log.warning("an ingest process stopped; starting another")
                raise IngestUnavailable(
                    "the process validating the Bundle stopped; retry the call"
                ) from None
            return decode_stay(encoded)

    def _new_executor(self) -> ProcessPoolExecutor:
        # spawn, not fork: the server has gRPC's threads running, which a fork would copy
        # in whatever state they were in.
        self._executor = ProcessPoolExecutor(
            self._processes,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_process,
        )
        return self._executor


def _start_process() -> None:
    """In each ingest process: Ctrl-C is the server's to handle (it stops the pool), the
    process ends with the server even when that is killed outright (the pool's pipes alone
    would keep it waiting for work forever), and the collector is tuned as the server's is."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, name="parent-watch", daemon=True).start()
    settle_heap()


def _exit_with_parent() -> None:
    parent = multiprocessing.parent_process()
    if parent is not None:
        parent.join()  # returns when the server process has ended
        os._exit(1)


def _ready() -> None:
    """A no-op call: its arrival means the process has started and imported this module."""


def _load(
    bundle: bytes,
    limits: Limits,
    encounter_id: str | None,
    strict: bool,
    allow_emergency: bool,
) -> bytes:
    stay = load_stay(
        bundle,
        limits=limits,
        encounter_id=encounter_id,
        strict=strict,
        allow_emergency=allow_emergency,
    )
    return encode_stay(stay)
