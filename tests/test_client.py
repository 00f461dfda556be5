"""The client library and ``epicrisis submit`` against a real server over loopback.

The asyncio client runs in the test's event loop beside the embedded server; the blocking
client and ``run_submit`` (which runs its own loop) talk to one started on a loop of its own
in a background thread.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from deployment import LOCAL_ONLY
from epicrisis.client import (
    AsyncClient,
    Client,
    ClientError,
    DeadlineExceeded,
    InvalidBundle,
    JobNotFound,
    JobResult,
    JobState,
    Overloaded,
    RetryPolicy,
    bulk,
    summary_from_message,
)
from epicrisis.client.bulk import Options, add_submit_arguments, run_submit
from epicrisis.config import Settings
from epicrisis.errors import EpicrisisError
from epicrisis.fhir.bundle import DataWarning
from epicrisis.pipeline import summarize, summarize_stay
from epicrisis.serving.convert import summary_message
from epicrisis.serving.jobs import JobOptions
from epicrisis.serving.server import embedded_service
from epicrisis.stay import Stay
from epicrisis.summary.model import DischargeSummary, Omission, Provenance

SAMPLE = resources.files("epicrisis.samples").joinpath("sample-stay.json").read_bytes()
FIXTURES = Path(__file__).resolve().parent / "fixtures"
DEATH = (FIXTURES / "death-in-hospital.json").read_bytes()
SENTINEL = "ZEBRA-SENTINEL"
FAST_RETRY = RetryPolicy(max_attempts=100, initial_backoff=0.01, max_backoff=0.2)


def broken_bundle() -> tuple[bytes, int]:
    """collection-relative.json with its Encounter's period.start unreadable; and that entry."""
    doc = json.loads((FIXTURES / "collection-relative.json").read_text())
    index = next(
        i for i, e in enumerate(doc["entry"]) if e["resource"]["resourceType"] == "Encounter"
    )
    doc["entry"][index]["resource"]["period"]["start"] = f"{SENTINEL} last tuesday"
    return json.dumps(doc).encode(), index


class Gate:
    """A summarizer that waits until released: jobs that stay RUNNING on demand."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, stay: Stay, options: JobOptions) -> DischargeSummary:
        self.started.set()
        await self.release.wait()
        return summarize_stay(stay)


@asynccontextmanager
async def serving(summarizer: Any = None, **options: Any) -> AsyncIterator[str]:
    """The embedded server in this event loop; yields its ``host:port``."""
    if summarizer is not None:
        options["summarizer"] = summarizer
    settings = Settings(embedded_concurrency=1, shutdown_grace_seconds=1, **LOCAL_ONLY)
    async with embedded_service(settings, "127.0.0.1:0", **options) as (_, port, _health):
        yield f"127.0.0.1:{port}"


class BackgroundServer:
    """The embedded server on an event loop in a thread, counting the summaries it generates."""

    def __init__(self) -> None:
        self.generations = 0
        self.holding = threading.Event()  # a summary waits at the gate
        self.target = ""
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._main(),))
        self._gate: asyncio.Event | None = None

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        settings = Settings(embedded_concurrency=2, shutdown_grace_seconds=1, **LOCAL_ONLY)
        async with embedded_service(settings, "127.0.0.1:0", summarizer=self._summarize) as (
            _,
            port,
            _health,
        ):
            self.target = f"127.0.0.1:{port}"
            self._ready.set()
            await self._stop.wait()

    async def _summarize(self, stay: Stay, options: JobOptions) -> DischargeSummary:
        self.generations += 1
        if self._gate is not None:
            self.holding.set()
            await self._gate.wait()
        return await asyncio.to_thread(summarize_stay, stay)

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Summaries started inside the block wait until it ends."""

        async def close() -> asyncio.Event:
            return asyncio.Event()

        gate = asyncio.run_coroutine_threadsafe(close(), self._loop).result()
        self.holding.clear()
        self._gate = gate
        try:
            yield
        finally:
            self._gate = None
            self._loop.call_soon_threadsafe(gate.set)

    def start(self) -> None:
        self._thread.start()
        assert self._ready.wait(30), "the background server did not start"

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        self._loop.close()


@pytest.fixture(scope="module")
def background() -> Iterator[BackgroundServer]:
    server = BackgroundServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def run(scenario: Any) -> Any:
    return asyncio.run(scenario())


# ---- the summary comes back as the pydantic model it was ---------------------------------


@pytest.mark.parametrize("bundle", [SAMPLE, DEATH], ids=["sample-stay", "death-in-hospital"])
def test_the_summary_survives_pydantic_to_proto_to_pydantic(bundle: bytes) -> None:
    summary = summarize(bundle)
    assert summary_from_message(summary_message(summary)) == summary
    # and with every optional part the pipeline left empty set
    full = summary.model_copy(
        update={
            "provenance": Provenance(
                generator="epicrisis-llm/0.1.0",
                backend="llm",
                model="m42-health/Llama3-Med42-8B",
                fallback=True,
                fallback_reason="unsupported sentence",
                prompt_tokens=5120,
                generated_tokens=0,
                omitted=[
                    Omission(section="labs", count=3, tokens=40),
                    Omission(section="notes", count=1),
                ],
                grounding=0.875,
                timings_ms={"ingest": 12.5, "total": 3000.25},
            ),
            "warnings": [
                *summary.warnings,
                DataWarning(code="unreadable-note", message="m", entry_index=0, path="x.y"),
            ],
        }
    )
    back = summary_from_message(summary_message(full))
    assert back == full
    assert back.model_dump(mode="json") == full.model_dump(mode="json")


def test_the_death_summary_keeps_its_kind_and_time_of_death() -> None:
    back = summary_from_message(summary_message(summarize(DEATH)))
    assert back.kind == "death-summary" and back.patient.died == "2024-01-09T03:40:00+00:00"


# ---- the asyncio client -----------------------------------------------------------------


def test_async_client_submits_watches_gets_summarizes_and_cancels() -> None:
    async def scenario() -> tuple[JobResult, list[JobResult], JobResult, JobResult, JobResult]:
        async with serving() as target, AsyncClient(target) as client:
            queued = await client.submit(SAMPLE, backend="extractive", priority="interactive")
            updates = [update async for update in client.watch(queued.id)]
            got = await client.get(queued.id)
            death = await client.summarize(DEATH, timeout=60)
            too_late = await client.cancel(queued.id)
            return queued, updates, got, death, too_late

    queued, updates, got, death, too_late = run(scenario)
    assert queued.state is JobState.QUEUED and not queued.final and queued.summary is None
    assert isinstance(queued.created_at, datetime) and queued.created_at.tzinfo is not None
    order = list(JobState)
    assert [order.index(u.state) for u in updates] == sorted(order.index(u.state) for u in updates)
    final = updates[-1]
    assert final.state is JobState.SUCCEEDED and final.final and final.error is None
    assert final.summary == summarize(SAMPLE)  # exactly what the CLI would have written
    assert final.fhir_document is not None
    assert json.loads(final.fhir_document)["resourceType"] == "Bundle"
    assert final.finished_at is not None and final.created_at is not None
    assert final.finished_at >= final.created_at
    assert 0.0 <= final.progress.fraction <= 1.0
    assert got == final
    assert death.state is JobState.SUCCEEDED and death.summary is not None
    assert death.summary.kind == "death-summary"
    assert too_late.state is JobState.SUCCEEDED  # a finished job keeps its final state


def test_async_client_cancels_a_running_job() -> None:
    gate = Gate()

    async def scenario() -> tuple[JobResult, list[JobResult]]:
        async with serving(gate) as target, AsyncClient(target) as client:
            job = await client.submit(SAMPLE)
            await gate.started.wait()
            cancelled = await client.cancel(job.id)
            gate.release.set()
            return cancelled, [u async for u in client.watch(job.id)]

    cancelled, updates = run(scenario)
    assert cancelled.state is JobState.CANCELLED and cancelled.summary is None
    assert [u.state for u in updates] == [JobState.CANCELLED]


def test_a_broken_bundle_is_invalid_bundle_with_field_violations_and_no_content() -> None:
    bundle, index = broken_bundle()

    async def scenario() -> InvalidBundle:
        async with serving() as target, AsyncClient(target) as client:
            with pytest.raises(InvalidBundle) as raised:
                await client.submit(bundle, idempotency_key="broken")  # no retry: not transient
            return raised.value

    error: InvalidBundle = run(scenario)
    assert isinstance(error, ClientError) and isinstance(error, EpicrisisError)
    assert error.status == "INVALID_ARGUMENT" and not error.retryable
    assert f"entry[{index}]" in str(error)
    ((field, description),) = error.violations
    assert field == f"bundle.entry[{index}].resource.period.start"
    assert "Encounter" in description
    assert SENTINEL not in str(error) and SENTINEL not in description


def test_an_unknown_job_is_job_not_found_for_get_cancel_and_watch() -> None:
    async def scenario() -> list[JobNotFound]:
        errors = []
        async with serving() as target, AsyncClient(target) as client:
            for call in (client.get("nope"), client.cancel("nope")):
                with pytest.raises(JobNotFound) as raised:
                    await call
                errors.append(raised.value)
            with pytest.raises(JobNotFound) as raised:
                async for _ in client.watch("nope"):
                    pass
            errors.append(raised.value)
        return errors

    errors = run(scenario)
    assert [(e.job_id, e.status) for e in errors] == [("nope", "NOT_FOUND")] * 3


def test_summarize_past_its_deadline_names_the_job_the_server_cancelled() -> None:
    gate = Gate()

    async def scenario() -> tuple[DeadlineExceeded, JobResult]:
        async with serving(gate) as target, AsyncClient(target) as client:
            with pytest.raises(DeadlineExceeded) as raised:
                await client.summarize(SAMPLE, timeout=0.5)
            assert raised.value.job_id is not None
            job = await client.get(raised.value.job_id)
            gate.release.set()
            return raised.value, job

    error, job = run(scenario)
    assert error.status == "DEADLINE_EXCEEDED"
    assert job.state is JobState.CANCELLED


def test_a_keyed_submit_is_retried_while_the_queue_is_full_and_an_unkeyed_one_is_not() -> None:
    gate = Gate()
    retried: list[ClientError] = []

    def on_retry(error: ClientError, delay: float) -> None:
        retried.append(error)
        gate.release.set()  # room appears while the client backs off

    async def scenario() -> tuple[Overloaded, JobResult, JobResult]:
        async with (
            serving(gate, max_queued=1) as target,
            AsyncClient(target, retry=FAST_RETRY, on_retry=on_retry) as client,
        ):
            await client.submit(SAMPLE)  # running
            await gate.started.wait()
            await client.submit(SAMPLE)  # waiting: the queue is full
            with pytest.raises(Overloaded) as refused:
                await client.submit(SAMPLE)
            assert not retried  # without a key a repeat could generate twice: never retried
            job = await client.submit(SAMPLE, idempotency_key="order-17")
            again = await client.submit(SAMPLE, idempotency_key="order-17")
            return refused.value, job, again

    refused, job, again = run(scenario)
    assert refused.retryable and refused.status == "RESOURCE_EXHAUSTED"
    assert retried and all(isinstance(e, Overloaded) for e in retried)
    assert again.id == job.id


def test_bad_arguments_are_refused_before_any_call() -> None:
    async def scenario() -> None:
        async with AsyncClient("127.0.0.1:1") as client:
            with pytest.raises(ValueError, match="backend"):
                await client.submit(SAMPLE, backend="gpt")  # type: ignore[arg-type]
            with pytest.raises(ValueError, match="idempotency_key"):
                await client.submit(SAMPLE, idempotency_key="")
            with pytest.raises(TypeError):
                await client.submit("{}")  # type: ignore[arg-type]

    run(scenario)


# ---- the blocking client ----------------------------------------------------------------


def test_blocking_client_submits_watches_gets_and_summarizes(background: BackgroundServer) -> None:
    bundle, index = broken_bundle()
    with Client(background.target) as client:
        queued = client.submit(SAMPLE, idempotency_key="blocking-1")
        updates = list(client.watch(queued.id))
        got = client.get(queued.id)
        again = client.submit(SAMPLE, idempotency_key="blocking-1")
        death = client.summarize(DEATH, timeout=60)
        with pytest.raises(InvalidBundle) as invalid:
            client.submit(bundle)
        missing = []
        for call in (client.get, client.cancel, lambda job_id: list(client.watch(job_id))):
            with pytest.raises(JobNotFound) as raised:
                call("nope")
            missing.append(raised.value.job_id)

    assert queued.state is JobState.QUEUED
    assert updates[-1].state is JobState.SUCCEEDED and updates[-1] == got
    assert got.summary == summarize(SAMPLE)
    assert again.id == queued.id and again.state is JobState.SUCCEEDED
    assert death.summary is not None and death.summary.kind == "death-summary"
    assert invalid.value.violations[0][0] == f"bundle.entry[{index}].resource.period.start"
    assert missing == ["nope"] * 3


def test_blocking_client_cancels_a_running_job(background: BackgroundServer) -> None:
    with Client(background.target) as client:
        with background.hold():
            job = client.submit(DEATH)
            assert background.holding.wait(30)
            cancelled = client.cancel(job.id)
        later = client.get(job.id)
    assert cancelled.state is later.state is JobState.CANCELLED
    assert later.summary is None


# ---- epicrisis submit -------------------------------------------------------------------


def submit_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="epicrisis submit")
    add_submit_arguments(parser)
    return parser.parse_args(argv)


def bundles(folder: Path, *, broken: bool = True) -> Path:
    folder.mkdir()
    (folder / "sample-stay.json").write_bytes(SAMPLE)
    (folder / "death-in-hospital.json").write_bytes(DEATH)
    if broken:
        (folder / "broken.json").write_bytes(broken_bundle()[0])
    return folder


def test_submit_writes_results_and_errors_and_a_rerun_generates_nothing(
    background: BackgroundServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = bundles(tmp_path / "in")
    out = tmp_path / "out"
    argv = (str(inputs), "--server", background.target, "--out", str(out), "--concurrency", "2")
    before = background.generations

    assert run_submit(submit_args(*argv)) == 1
    err = capsys.readouterr().err
    assert "2 succeeded, 1 failed" in err.splitlines()[-1]
    assert sorted(p.name for p in out.iterdir()) == [
        "broken.error.txt",
        "death-in-hospital.json",
        "sample-stay.json",
    ]  # and no temp file left behind
    result = DischargeSummary.model_validate_json((out / "sample-stay.json").read_bytes())
    assert result == summarize(SAMPLE)
    reason = (out / "broken.error.txt").read_text()
    assert reason.count("\n") == 1 and reason.startswith("INVALID_ARGUMENT: ")
    assert "entry[" in reason and SENTINEL not in reason and SENTINEL not in err
    assert background.generations == before + 2
    written = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.suffix == ".json"}

    # The rerun skips the results it has; only the failure is tried again (and fails again).
    assert run_submit(submit_args(*argv)) == 1
    assert "0 succeeded, 1 failed, 2 skipped" in capsys.readouterr().err
    assert background.generations == before + 2
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.suffix == ".json"} == written

    # Another format elsewhere sends them again: the key returns the earlier jobs, no generation.
    text = tmp_path / "text"
    good = (str(inputs / "sample-stay.json"), str(inputs / "death-in-hospital.json"))
    args = submit_args(*good, "--server", background.target, "--out", str(text), "--format", "text")
    assert run_submit(args) == 0
    assert background.generations == before + 2
    assert "DEATH SUMMARY" in (text / "death-in-hospital.txt").read_text()
    assert "2 succeeded, 0 failed" in capsys.readouterr().err


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_submit_fhir_format_writes_the_servers_document_with_a_bar_on_a_terminal(
    background: BackgroundServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sample = tmp_path / "stay.json"
    sample.write_bytes(SAMPLE)
    out = tmp_path / "fhir"
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    args = submit_args(
        str(sample), "--server", background.target, "--out", str(out), "--format", "fhir"
    )
    assert run_submit(args) == 0
    document = json.loads((out / "stay.fhir.json").read_text())
    assert document["resourceType"] == "Bundle" and document["type"] == "document"
    shown = terminal.getvalue()
    assert "\r[" + "." * 30 + "] 0/1" in shown and "\r[" + "#" * 30 + "] 1/1" in shown
    assert shown.endswith("\nepicrisis: 1 succeeded, 0 failed\n")


def test_the_idempotency_key_follows_content_and_options() -> None:
    options = Options(backend=None, priority="batch", strict=False, allow_emergency=False)
    assert options.key(SAMPLE) == options.key(bytes(SAMPLE))
    assert options.key(SAMPLE) != options.key(DEATH)
    other = Options(backend="llm", priority="batch", strict=False, allow_emergency=False)
    assert options.key(SAMPLE) != other.key(SAMPLE)


def test_submit_with_every_result_present_contacts_no_server(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = bundles(tmp_path / "in", broken=False)
    out = tmp_path / "out"
    out.mkdir()
    for name in ("sample-stay.json", "death-in-hospital.json"):
        (out / name).write_text("{}\n")
    args = submit_args(str(inputs), "--server", "127.0.0.1:1", "--out", str(out))
    assert run_submit(args) == 0
    assert "0 succeeded, 0 failed, 2 skipped" in capsys.readouterr().err


def test_submit_to_an_unreachable_server_fails_once_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bulk, "CONNECT_TIMEOUT", 0.2)
    inputs = bundles(tmp_path / "in", broken=False)
    out = tmp_path / "out"
    assert run_submit(submit_args(str(inputs), "--server", "127.0.0.1:1", "--out", str(out))) == 1
    assert "could not be reached" in capsys.readouterr().err
    assert list(out.iterdir()) == []


def test_submit_usage_errors_exit_2_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = bundles(tmp_path / "in", broken=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "sample-stay.json").write_bytes(SAMPLE)
    cases = [
        (str(tmp_path / "absent.json"), "no such file or directory"),
        (str(tmp_path / "other" / "nothing-here"), "no such file or directory"),
        (f"{inputs} {other}", "would write the same result"),
    ]
    for paths, words in cases:
        args = submit_args(*paths.split(), "--server", "127.0.0.1:1", "--out", str(tmp_path / "o"))
        assert run_submit(args) == 2
        assert words in capsys.readouterr().err
    args = submit_args(str(inputs), "--server", "127.0.0.1:1", "--out", str(inputs))
    assert run_submit(args) == 2
    assert "--out must not be an input directory" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_submit(submit_args(str(empty), "--server", "x:1", "--out", str(tmp_path / "o"))) == 2
    assert not (tmp_path / "o").exists()  # nothing was created for a refused run
    (tmp_path / "file").write_text("")
    args = submit_args(str(inputs), "--server", "x:1", "--out", str(tmp_path / "file"))
    assert run_submit(args) == 2
    assert "cannot use --out" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        submit_args(str(inputs), "--server", "x:1", "--out", "o", "--concurrency", "0")
    assert usage.value.code == 2
