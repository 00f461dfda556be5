"""The gRPC API over a real channel on loopback, with the embedded worker (no Redis)."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from fhir.resources.R4B.bundle import Bundle
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from deployment import LOCAL_ONLY
from epicrisis.config import Limits, Settings
from epicrisis.errors import EntryError
from epicrisis.pipeline import load_stay
from epicrisis.serving import ingest
from epicrisis.serving.ingest import StayLoader, usable_cpus
from epicrisis.serving.jobs import JobOptions
from epicrisis.serving.server import embedded_service
from epicrisis.serving.servicer import SERVICE_NAME
from epicrisis.serving.status import status_for
from epicrisis.stay import Stay
from epicrisis.stay.codec import encode_stay
from epicrisis.summary.model import DischargeSummary
from epicrisis.v1 import summarizer_pb2 as pb
from epicrisis.v1 import summarizer_pb2_grpc as pb_grpc
from sim_control import set_faults

SAMPLE = resources.files("epicrisis.samples").joinpath("sample-stay.json").read_bytes()
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SENTINEL = "ZEBRA-SENTINEL"
T = TypeVar("T")


@asynccontextmanager
async def api(
    summarizer: Callable[[Stay, JobOptions], Awaitable[DischargeSummary]] | None = None,
    **kwargs: Any,
) -> AsyncIterator[tuple[pb_grpc.DischargeSummarizerStub, grpc.aio.Channel]]:
    options: dict[str, Any] = dict(kwargs)
    if summarizer is not None:
        options["summarizer"] = summarizer
    limits = options.pop("limits", Limits())
    settings = Settings(
        embedded_concurrency=1, shutdown_grace_seconds=1, limits=limits, **LOCAL_ONLY
    )
    async with (
        embedded_service(settings, "127.0.0.1:0", **options) as (_, port, _health),
        grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
    ):
        yield pb_grpc.DischargeSummarizerStub(channel), channel


def run(scenario: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(scenario())


class Gate:
    """A summarizer that waits until released: jobs that stay RUNNING on demand."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, stay: Stay, options: JobOptions) -> DischargeSummary:
        from epicrisis.pipeline import summarize_stay

        self.started.set()
        await self.release.wait()
        return summarize_stay(stay)


def test_submit_then_watch_until_the_summary_and_its_document() -> None:
    async def scenario() -> list[pb.Job]:
        async with api() as (stub, _):
            job = await stub.Submit(pb.SubmitRequest(bundle=SAMPLE))
            assert job.state == pb.JOB_STATE_QUEUED and job.id
            return [update async for update in stub.WatchJob(pb.WatchJobRequest(id=job.id))]

    updates = run(scenario)
    final = updates[-1]
    assert final.state == pb.JOB_STATE_SUCCEEDED
    assert [u.state for u in updates] == sorted(u.state for u in updates)  # never backwards
    assert final.summary.kind == pb.SUMMARY_KIND_DISCHARGE
    assert final.summary.encounter.reference == "Encounter/enc-7daf1ddf68df"
    loincs = [s.loinc for s in final.summary.sections]
    assert "11535-2" in loincs and "48765-2" in loincs
    assert all(i.sources for s in final.summary.sections for i in s.items)
    Bundle.model_validate_json(final.fhir_document)
    assert final.HasField("created_at") and final.HasField("finished_at")


def test_summarize_waits_for_the_result_and_get_job_reads_it() -> None:
    async def scenario() -> tuple[pb.Job, pb.Job]:
        async with api() as (stub, _):
            done = await stub.Summarize(pb.SubmitRequest(bundle=SAMPLE), timeout=60)
            again = await stub.GetJob(pb.GetJobRequest(id=done.id))
            return done, again

    done, again = run(scenario)
    assert done.state == again.state == pb.JOB_STATE_SUCCEEDED
    assert done.summary == again.summary


def test_bad_input_is_invalid_argument_naming_the_entry_without_its_content() -> None:
    doc = json.loads((FIXTURES / "collection-relative.json").read_text())
    for index, entry in enumerate(doc["entry"]):
        if entry["resource"]["resourceType"] == "Encounter":
            entry["resource"]["period"]["start"] = f"{SENTINEL} last tuesday"
            broken = index

    async def scenario() -> grpc.aio.AioRpcError:
        async with api() as (stub, _):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.Submit(pb.SubmitRequest(bundle=json.dumps(doc).encode()))
            return raised.value

    error = run(scenario)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"entry[{broken}]" in (error.details() or "")
    assert SENTINEL not in (error.details() or "")
    status = rpc_status.from_call(error)
    assert status is not None
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    violation = bad_request.field_violations[0]
    assert violation.field == f"bundle.entry[{broken}].resource.period.start"
    assert "Encounter" in violation.description and SENTINEL not in violation.description


@pytest.mark.parametrize(
    ("bundle", "words"),
    [
        (b"not json", "not valid JSON"),
        (b'{"resourceType": "Patient"}', "bare Patient"),
        (b'{"resourceType": "Bundle", "type": "collection", "entry": []}', "--encounter"),
    ],
)
def test_other_bad_inputs_are_refused_synchronously(bundle: bytes, words: str) -> None:
    async def scenario() -> grpc.aio.AioRpcError:
        async with api() as (stub, _):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.Submit(pb.SubmitRequest(bundle=bundle))
            return raised.value

    error = run(scenario)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in (error.details() or "")


def test_an_unknown_job_is_not_found() -> None:
    async def scenario() -> list[grpc.StatusCode]:
        codes = []
        async with api() as (stub, _):
            for call in (
                stub.GetJob(pb.GetJobRequest(id="nope")),
                stub.CancelJob(pb.CancelJobRequest(id="nope")),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await call
                codes.append(raised.value.code())
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                async for _ in stub.WatchJob(pb.WatchJobRequest(id="nope")):
                    pass
            codes.append(raised.value.code())
        return codes

    assert run(scenario) == [grpc.StatusCode.NOT_FOUND] * 3


def test_the_same_idempotency_key_returns_the_same_job_and_never_a_second_run() -> None:
    calls: list[str] = []

    async def counting(stay: Stay, options: JobOptions) -> DischargeSummary:
        from epicrisis.pipeline import summarize_stay

        calls.append(stay.encounter.ref)
        return summarize_stay(stay)

    async def scenario() -> tuple[pb.Job, pb.Job, grpc.aio.AioRpcError]:
        async with api(counting) as (stub, _):
            request = pb.SubmitRequest(bundle=SAMPLE, idempotency_key="order-17")
            first = await stub.Summarize(request, timeout=60)
            second = await stub.Submit(request)
            other = pb.SubmitRequest(
                bundle=SAMPLE, idempotency_key="order-17", encounter_id="enc-7daf1ddf68df"
            )
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.Submit(other)
            return first, second, raised.value

    first, second, conflict = run(scenario)
    assert first.id == second.id and second.state == pb.JOB_STATE_SUCCEEDED
    assert len(calls) == 1
    assert conflict.code() == grpc.StatusCode.ALREADY_EXISTS


def test_cancel_job_stops_a_running_job() -> None:
    gate = Gate()

    async def scenario() -> tuple[pb.Job, pb.Job]:
        async with api(gate) as (stub, _):
            job = await stub.Submit(pb.SubmitRequest(bundle=SAMPLE))
            await gate.started.wait()
            cancelled = await stub.CancelJob(pb.CancelJobRequest(id=job.id))
            gate.release.set()
            await asyncio.sleep(0.1)
            return cancelled, await stub.GetJob(pb.GetJobRequest(id=job.id))

    cancelled, later = run(scenario)
    assert cancelled.state == later.state == pb.JOB_STATE_CANCELLED
    assert not later.HasField("summary")


def test_summarize_past_its_deadline_is_deadline_exceeded_and_the_job_is_cancelled() -> None:
    gate = Gate()

    async def scenario() -> tuple[grpc.aio.AioRpcError, list[pb.Job]]:
        async with api(gate) as (stub, _):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.Summarize(
                    pb.SubmitRequest(bundle=SAMPLE), timeout=3.0
                )  # room for validation on a busy machine
            job_id = (raised.value.details() or "").split()[1]
            return raised.value, [await stub.GetJob(pb.GetJobRequest(id=job_id))]

    error, (job,) = run(scenario)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert job.state == pb.JOB_STATE_CANCELLED


def test_a_full_queue_is_resource_exhausted() -> None:
    gate = Gate()

    async def scenario() -> tuple[grpc.StatusCode, pb.Job]:
        async with api(gate, max_queued=1) as (stub, _):
            await stub.Submit(pb.SubmitRequest(bundle=SAMPLE))  # running
            await gate.started.wait()
            await stub.Submit(pb.SubmitRequest(bundle=SAMPLE))  # waiting
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.Submit(pb.SubmitRequest(bundle=SAMPLE, idempotency_key="k"))
            gate.release.set()
            # The refused key was forgotten: the same request is accepted once there is room.
            retried = None
            for _ in range(100):
                try:
                    retried = await stub.Submit(
                        pb.SubmitRequest(bundle=SAMPLE, idempotency_key="k")
                    )
                    break
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.05)
            assert retried is not None
            return raised.value.code(), retried

    code, retried = run(scenario)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert retried.state in (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING, pb.JOB_STATE_SUCCEEDED)


def test_health_and_reflection_are_on() -> None:
    async def scenario() -> tuple[int, list[str]]:
        async with api() as (_, channel):
            health = health_pb2_grpc.HealthStub(channel)
            status = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
            reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
            names: list[str] = []
            async for answer in reflect.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            ):
                names = [s.name for s in answer.list_services_response.service]
            return status.status, names

    status, names = run(scenario)
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert SERVICE_NAME in names and "grpc.health.v1.Health" in names


# -- with the model: the simulator on loopback -------------------------------------------


@asynccontextmanager
async def api_with_model(
    sim_base_url: str,
) -> AsyncIterator[tuple[pb_grpc.DischargeSummarizerStub, grpc.aio.Channel]]:
    settings = Settings(
        embedded_concurrency=2, shutdown_grace_seconds=1, **LOCAL_ONLY, llm_urls=[sim_base_url]
    )
    async with (
        embedded_service(settings, "127.0.0.1:0") as (_, port, _health),
        grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
    ):
        yield pb_grpc.DischargeSummarizerStub(channel), channel


def test_the_model_writes_the_prose_and_a_rejected_request_fails_the_job_with_its_reason() -> None:
    from epicrisis.llm.simulator import SimulatorConfig, SimulatorThread

    with SimulatorThread(SimulatorConfig(port=0)) as sim:

        async def scenario() -> tuple[pb.Job, pb.Job]:
            async with api_with_model(sim.base_url) as (stub, _):
                good = await stub.Summarize(pb.SubmitRequest(bundle=SAMPLE), timeout=60)
                set_faults(sim.base_url, {"validation": {"next": 10}})
                rejected = await stub.Summarize(pb.SubmitRequest(bundle=SAMPLE), timeout=60)
                return good, rejected

        good, rejected = run(scenario)
    assert good.state == pb.JOB_STATE_SUCCEEDED and good.summary.provenance.backend == "llm"
    assert rejected.state == pb.JOB_STATE_FAILED
    assert rejected.error.message and not rejected.error.retryable


def test_health_is_not_serving_while_no_model_endpoint_is_healthy() -> None:
    from epicrisis.llm.simulator import SimulatorConfig, SimulatorThread

    with SimulatorThread(SimulatorConfig(port=0)) as sim:

        async def status(channel: grpc.aio.Channel, wanted: int) -> int:
            health = health_pb2_grpc.HealthStub(channel)
            seen = -1
            for _ in range(50):  # the watchdog looks every 2 s
                seen = (await health.Check(health_pb2.HealthCheckRequest(service=""))).status
                if seen == wanted:
                    break
                await asyncio.sleep(0.2)
            return seen

        async def scenario() -> tuple[int, int]:
            async with api_with_model(sim.base_url) as (_, channel):
                serving = await status(channel, health_pb2.HealthCheckResponse.SERVING)
                set_faults(sim.base_url, {"unhealthy": {"probability": 1.0}})
                down = await status(channel, health_pb2.HealthCheckResponse.NOT_SERVING)
                return serving, down

        serving, down = run(scenario)
    assert serving == health_pb2.HealthCheckResponse.SERVING
    assert down == health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (
            RedisConnectionError("Error 111 connecting to 10.0.0.5:6379"),
            grpc.StatusCode.UNAVAILABLE,
        ),
        (RedisTimeoutError("Timeout reading from socket"), grpc.StatusCode.UNAVAILABLE),
        (KombuOperationalError("connection refused"), grpc.StatusCode.UNAVAILABLE),
        (KeyError("ZEBRA-SENTINEL"), grpc.StatusCode.INTERNAL),
    ],
)
def test_store_and_broker_failures_are_unavailable_and_no_exception_text_leaks(
    error: Exception, code: grpc.StatusCode
) -> None:
    status = status_for(error)
    assert status.code == code
    assert status.details in (
        "the job store is not answering; retry later",
        "internal error; please report it",
    )


def test_the_servers_own_limits_bound_what_it_accepts() -> None:
    """The limits in the server's settings apply, not whatever the environment says."""

    async def scenario() -> tuple[grpc.StatusCode, str]:
        async with api(limits=Limits(max_entries=5)) as (stub, _):
            try:
                await stub.Submit(pb.SubmitRequest(bundle=SAMPLE), timeout=30)
            except grpc.aio.AioRpcError as error:
                return error.code(), error.details() or ""
        raise AssertionError("a Bundle over the entry limit was accepted")

    code, details = run(scenario)
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "5" in details


# --------------------------------------------------------------------------- ingest processes


def _sample_with(change: Callable[[dict[str, Any]], None]) -> bytes:
    doc = json.loads(SAMPLE)
    change(doc)
    return json.dumps(doc).encode()


def _encounter_period_is_text(doc: dict[str, Any]) -> None:
    for entry in doc["entry"]:
        if entry["resource"]["resourceType"] == "Encounter":
            entry["resource"]["period"] = "not a period"


@pytest.mark.parametrize("processes", [0, 1])
def test_the_stay_loader_gives_what_load_stay_gives(processes: int) -> None:
    """In a thread or in a process: the same stay, the same error with the same location."""
    bad = _sample_with(_encounter_period_is_text)

    async def scenario() -> tuple[Stay, EntryError]:
        loader = StayLoader(Limits(), processes)
        await loader.start()
        try:
            stay = await loader.load(SAMPLE)
            with pytest.raises(EntryError) as caught:
                await loader.load(bad)
            return stay, caught.value
        finally:
            await loader.aclose()

    stay, error = run(scenario)
    assert encode_stay(stay) == encode_stay(load_stay(SAMPLE))
    with pytest.raises(EntryError) as here:
        load_stay(bad)
    assert (str(error), error.location) == (str(here.value), here.value.location)
    assert error.location.path and "period" in error.location.path


def test_a_dead_ingest_process_fails_its_call_as_unavailable_and_is_replaced() -> None:
    """The server outlives the process validating a Bundle (killed here as the kernel's OOM
    killer would): the call says retry, the next one is served by a new process."""
    settings = Settings(
        embedded_concurrency=1, shutdown_grace_seconds=1, ingest_processes=1, **LOCAL_ONLY
    )

    async def scenario() -> tuple[pb.Job, grpc.StatusCode, pb.Job, int, int]:
        before = set(multiprocessing.active_children())
        async with (
            embedded_service(settings, "127.0.0.1:0") as (_, port, _health),
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
        ):
            stub = pb_grpc.DischargeSummarizerStub(channel)
            (process,) = set(multiprocessing.active_children()) - before
            first = await stub.Summarize(pb.SubmitRequest(bundle=SAMPLE), timeout=60)
            os.kill(process.pid or 0, signal.SIGKILL)
            process.join(10)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Summarize(pb.SubmitRequest(bundle=SAMPLE), timeout=60)
            again = await stub.Summarize(pb.SubmitRequest(bundle=SAMPLE), timeout=60)
            during = len(set(multiprocessing.active_children()) - before)
        after = len(set(multiprocessing.active_children()) - before)
        return first, caught.value.code(), again, during, after

    first, code, again, during, after = run(scenario)
    assert first.state == again.state == pb.JOB_STATE_SUCCEEDED
    assert code == grpc.StatusCode.UNAVAILABLE
    assert (during, after) == (1, 0)  # one new process, and none left once the server stops


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [("200000 100000\n", 2), ("150000 100000\n", 2), ("50000 100000\n", 1), ("max 100000\n", None)],
)
def test_usable_cpus_follow_a_cgroup_quota(
    tmp_path: Path, cpu_max: str, expected: int | None
) -> None:
    path = tmp_path / "cpu.max"
    path.write_text(cpu_max)
    affinity = len(os.sched_getaffinity(0))
    assert usable_cpus(path, tmp_path / "absent") == min(affinity, expected or affinity)
    assert usable_cpus(tmp_path / "absent", tmp_path / "absent") == affinity
    v1 = tmp_path / "v1"  # the same quota as cgroup v1 states it
    v1.mkdir()
    quota, period = cpu_max.split()
    (v1 / "cpu.cfs_quota_us").write_text(("-1" if quota == "max" else quota) + "\n")
    (v1 / "cpu.cfs_period_us").write_text(period + "\n")
    assert usable_cpus(tmp_path / "absent", v1) == min(affinity, expected or affinity)


@pytest.mark.parametrize(("cpus", "expected"), [(1, 0), (2, 1), (4, 3), (64, 4)])
def test_the_default_ingest_processes_leave_a_cpu_to_the_loop_and_stop_at_four(
    monkeypatch: pytest.MonkeyPatch, cpus: int, expected: int
) -> None:
    monkeypatch.setattr(ingest, "usable_cpus", lambda: cpus)
    assert ingest.default_processes() == expected
