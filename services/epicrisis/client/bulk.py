"""``epicrisis submit``: many Bundles to a server, one result file each, safe to rerun.

Each Bundle is submitted with an idempotency key derived from its content and options, so a
rerun (after a crash, a Ctrl-C, or on the same folder next night) gets the earlier job back
instead of generating again. Files whose result already exists are not even sent unless
``--force``; failed ones (``<stem>.error.txt``) are retried. Results are written to a temp
file and renamed, so a result file is never half written.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import grpc
import orjson

from epicrisis.client._core import BackendName, PriorityName, RetryPolicy
from epicrisis.client.aio import AsyncClient
from epicrisis.client.errors import ClientError
from epicrisis.client.model import JobResult
from epicrisis.serving.jobs import JobState

SUFFIXES = {"json": ".json", "fhir": ".fhir.json", "text": ".txt"}
ERROR_SUFFIX = ".error.txt"
CONNECT_TIMEOUT = 10.0  # seconds to reach the server before giving up on the whole run
MAX_GENERATIONS = 3  # keys per Bundle: a rerun may replace a job that failed retryably
# A full queue is the normal state of a bulk run against a busy server: wait (about two
# minutes in all) rather than write an error file the next run must redo.
BULK_RETRY = RetryPolicy(max_attempts=10, initial_backoff=0.5, max_backoff=30.0)
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_submit_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``epicrisis submit`` (the caller adds ``set_defaults(run=run_submit)``)."""
    parser.add_argument(
        "paths", nargs="+", metavar="PATH", help="FHIR R4 Bundles, or directories of *.json"
    )
    parser.add_argument("--server", required=True, metavar="HOST:PORT", help="the gRPC server")
    parser.add_argument(
        "--out", required=True, metavar="DIR", type=Path, help="one result per Bundle goes here"
    )
    parser.add_argument(
        "--concurrency",
        type=positive_int,
        default=4,
        metavar="N",
        help="Bundles in flight at once (default: 4)",
    )
    parser.add_argument(
        "--format",
        choices=tuple(SUFFIXES),
        default="json",
        help="json: <stem>.json, the API shape; fhir: <stem>.fhir.json; text: <stem>.txt",
    )
    parser.add_argument(
        "--backend", choices=("extractive", "llm"), help="who writes the prose (server default)"
    )
    parser.add_argument(
        "--priority",
        choices=("batch", "interactive"),
        default="batch",
        help="queue class (default: batch, behind interactive work)",
    )
    parser.add_argument(
        "--strict", action="store_true", help="refuse a Bundle if any entry is invalid"
    )
    parser.add_argument(
        "--emergency",
        action="store_true",
        help="with no inpatient stay, take the latest finished emergency visit",
    )
    parser.add_argument(
        "--force", action="store_true", help="submit even when the result file exists"
    )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        default=900.0,
        metavar="SECONDS",
        help="give up on (and cancel) a job with no result after this long (default: 900)",
    )
    parser.add_argument("--tls", action="store_true", help="connect with TLS (system roots)")
    parser.add_argument(
        "--ca-cert", type=Path, metavar="PEM", help="trust this CA for TLS (implies --tls)"
    )
    parser.add_argument(
        "--client-cert", type=Path, metavar="PEM", help="for mutual TLS, with --client-key"
    )
    parser.add_argument("--client-key", type=Path, metavar="PEM", help="its private key")
    parser.add_argument(
        "--api-key-file",
        type=Path,
        metavar="PATH",
        help="a file holding the API key (default: the EPICRISIS_API_KEY environment variable)",
    )


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


@dataclass(frozen=True, slots=True)
class Options:
    """What is asked of the server for every Bundle; part of each idempotency key."""

    backend: BackendName | None
    priority: PriorityName | None
    strict: bool
    allow_emergency: bool

    def key(self, bundle: bytes) -> str:
        """The idempotency key of ``bundle`` with these options: same input, same job."""
        options = f"{self.backend}|{self.priority}|{self.strict}|{self.allow_emergency}"
        digest = hashlib.sha256(options.encode() + b"\0" + bundle).hexdigest()
        return f"epicrisis-submit:{digest}"


@dataclass(frozen=True, slots=True)
class _Work:
    source: Path
    result: Path
    error: Path


class _UsageError(Exception):
    """Bad paths or options: exit 2 with one line."""


def run_submit(args: argparse.Namespace) -> int:
    """``epicrisis submit``: 0 when every Bundle succeeded, 1 when some failed, 2 on bad usage."""
    try:
        work, skipped = _plan(args.paths, args.out, args.format, force=args.force)
        credentials = _credentials(args.tls, args.ca_cert, args.client_cert, args.client_key)
        api_key = _api_key(args.api_key_file)
    except _UsageError as exc:
        sys.stderr.write(f"epicrisis: {exc}\n")
        return EXIT_USAGE
    options = Options(args.backend, args.priority, args.strict, args.emergency)
    progress = _Progress(len(work), sys.stderr)
    if work:
        try:
            asyncio.run(
                _submit_all(
                    work,
                    args.server,
                    credentials,
                    api_key,
                    options,
                    fmt=args.format,
                    concurrency=args.concurrency,
                    timeout=args.timeout,
                    progress=progress,
                )
            )
        except ClientError as exc:  # the server could not be reached at all
            progress.close()
            sys.stderr.write(f"epicrisis: {args.server}: {exc}\n")
            return EXIT_FAILED
    progress.close()
    line = f"{progress.succeeded} succeeded, {progress.failed} failed"
    if skipped:
        line += f", {skipped} skipped (result exists; --force submits them again)"
    sys.stderr.write(f"epicrisis: {line}\n")
    return EXIT_FAILED if progress.failed else EXIT_OK


def _plan(paths: Sequence[str], out: Path, fmt: str, *, force: bool) -> tuple[list[_Work], int]:
    """The Bundles to send and how many were skipped; every usage error before any work."""
    out_dir = out.resolve()
    sources: dict[Path, Path] = {}  # resolved path -> as given
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            if path.resolve() == out_dir:
                raise _UsageError(f"--out must not be an input directory: {raw}")
            found = sorted(p for p in path.glob("*.json") if p.is_file())
        elif path.is_file():
            found = [path]
        else:
            raise _UsageError(f"no such file or directory: {raw}")
        for source in found:
            sources.setdefault(source.resolve(), source)
    if not sources:
        raise _UsageError("no *.json Bundles in " + ", ".join(paths))
    work: list[_Work] = []
    stems: dict[str, Path] = {}
    for resolved, source in sources.items():
        stem = source.name.removesuffix(".json") if source.suffix == ".json" else source.stem
        if stem in stems:
            raise _UsageError(f"{stems[stem]} and {source} would write the same result {stem}")
        stems[stem] = source
        item = _Work(source, out / f"{stem}{SUFFIXES[fmt]}", out / f"{stem}{ERROR_SUFFIX}")
        if item.result.resolve() == resolved:
            raise _UsageError(f"the result would overwrite its input: {source}")
        work.append(item)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _UsageError(f"cannot use --out {out}: {exc.strerror or type(exc).__name__}") from None
    todo = [w for w in work if force or not w.result.exists()]
    return todo, len(work) - len(todo)


def _credentials(
    tls: bool, ca_cert: Path | None, client_cert: Path | None, client_key: Path | None
) -> grpc.ChannelCredentials | None:
    if (client_cert is None) != (client_key is None):
        raise _UsageError("--client-cert and --client-key go together")
    pems = {
        option: _read(path, option)
        for option, path in (
            ("--ca-cert", ca_cert), ("--client-cert", client_cert), ("--client-key", client_key)
        )
        if path is not None
    }  # fmt: skip
    if not (tls or pems):
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=pems.get("--ca-cert"),
        private_key=pems.get("--client-key"),
        certificate_chain=pems.get("--client-cert"),
    )


def _api_key(path: Path | None) -> str | None:
    if path is None:
        return os.environ.get("EPICRISIS_API_KEY") or None
    key = _read(path, "--api-key-file").decode(errors="replace").strip()
    if not key:
        raise _UsageError(f"--api-key-file {path} is empty")
    return key


def _read(path: Path, option: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _UsageError(f"cannot read {option} {path}: {exc.strerror}") from None


async def _submit_all(
    work: list[_Work],
    server: str,
    credentials: grpc.ChannelCredentials | None,
    api_key: str | None,
    options: Options,
    *,
    fmt: str,
    concurrency: int,
    timeout: float,
    progress: _Progress,
) -> None:
    async with AsyncClient(
        server, credentials=credentials, api_key=api_key, retry=BULK_RETRY
    ) as client:
        await client.wait_ready(CONNECT_TIMEOUT)
        progress.show()
        slots = asyncio.Semaphore(concurrency)
        async with asyncio.TaskGroup() as tasks:
            for item in work:
                await slots.acquire()  # at most `concurrency` Bundles read and in flight
                tasks.create_task(
                    _one(client, item, options, fmt=fmt, timeout=timeout, progress=progress),
                ).add_done_callback(lambda _: slots.release())


async def _one(
    client: AsyncClient,
    item: _Work,
    options: Options,
    *,
    fmt: str,
    timeout: float,
    progress: _Progress,
) -> None:
    ok, text = await _outcome(client, item.source, options, fmt=fmt, timeout=timeout)
    try:
        await asyncio.to_thread(_publish, item, ok, text)
    except OSError as exc:
        ok, text = False, f"cannot write to {item.result.parent}: {exc.strerror}"
    if not ok:
        progress.note(f"epicrisis: {item.source}: {text}")
    progress.record(ok)


async def _outcome(
    client: AsyncClient, source: Path, options: Options, *, fmt: str, timeout: float
) -> tuple[bool, str]:
    """(True, the result text) or (False, one line saying why)."""
    try:
        bundle = await asyncio.to_thread(source.read_bytes)
    except OSError as exc:
        return False, f"cannot read the file: {exc.strerror or type(exc).__name__}"
    try:
        job = await _generate(client, bundle, options, timeout=timeout)
    except TimeoutError:
        return False, f"no result within {timeout:g} s; the job was cancelled"
    except ClientError as exc:
        return False, f"{exc.status or 'error'}: {exc}"
    if job.state is JobState.SUCCEEDED:
        text = _render(job, fmt)
        if text is not None:
            return True, text
        return False, f"job {job.id} succeeded without a {fmt} result"
    if job.error is not None:
        return False, f"job {job.id} {job.state}: {job.error.code}: {job.error.message}"
    return False, f"job {job.id} {job.state}"


async def _generate(
    client: AsyncClient, bundle: bytes, options: Options, *, timeout: float
) -> JobResult:
    """Submit (or find the earlier job of this input) and follow it to its final state."""
    key = options.key(bundle)
    for generation in range(1, MAX_GENERATIONS + 1):
        job = await client.submit(
            bundle,
            idempotency_key=key if generation == 1 else f"{key}.{generation}",
            backend=options.backend,
            priority=options.priority,
            strict=options.strict,
            allow_emergency=options.allow_emergency,
        )
        if not _spent(job):
            break
    else:
        return job  # every key ended in a retryable failure: report the last
    try:
        async with asyncio.timeout(timeout):
            async for update in client.watch(job.id):
                job = update
    except TimeoutError:
        with contextlib.suppress(ClientError):
            await client.cancel(job.id)  # nobody will collect it: free the worker
        raise
    return job if job.final else await client.get(job.id)


def _spent(job: JobResult) -> bool:
    """An earlier run's job that a new attempt might improve on (the key returns it as is)."""
    if job.state is JobState.CANCELLED:
        return True
    return job.state is JobState.FAILED and job.error is not None and job.error.retryable


def _render(job: JobResult, fmt: str) -> str | None:
    if fmt == "fhir":
        doc = job.fhir_document
        return None if doc is None else doc if doc.endswith("\n") else doc + "\n"
    if job.summary is None:
        return None
    if fmt == "text":
        from epicrisis.summary.render_text import render_text

        return render_text(job.summary)
    dumped = orjson.dumps(job.summary.model_dump(mode="json"), option=orjson.OPT_INDENT_2)
    return dumped.decode() + "\n"


def _publish(item: _Work, ok: bool, text: str) -> None:
    if ok:
        _write_atomically(item.result, text)
        item.error.unlink(missing_ok=True)  # an earlier run's failure, now resolved
    else:
        _write_atomically(item.error, " ".join(text.split()) + "\n")


def _write_atomically(path: Path, text: str) -> None:
    """Write beside ``path`` and rename over it: readers see the old file or the new one."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


class _Progress:
    """A bar redrawn in place on a terminal; a plain line every few seconds otherwise."""

    WIDTH = 30
    INTERVAL = 5.0

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total = total
        self.succeeded = 0
        self.failed = 0
        self._stream = stream
        self._tty = stream.isatty()
        self._started = self._last = time.monotonic()
        self._drawn = False

    def show(self) -> None:
        if self._tty:
            self._draw()

    def record(self, ok: bool) -> None:
        if ok:
            self.succeeded += 1
        else:
            self.failed += 1
        done = self.succeeded + self.failed
        if self._tty:
            self._draw()
        elif done < self.total and time.monotonic() - self._last >= self.INTERVAL:
            self._last = time.monotonic()
            self._stream.write(
                f"epicrisis: {done}/{self.total} done "
                f"({self.succeeded} succeeded, {self.failed} failed)\n"
            )
            self._stream.flush()

    def note(self, line: str) -> None:
        """A line of its own, above the bar."""
        if self._drawn:
            self._stream.write("\r\x1b[K")
        self._stream.write(line + "\n")
        if self._drawn:
            self._draw()

    def close(self) -> None:
        if self._drawn:
            self._stream.write("\n")
            self._drawn = False
        self._stream.flush()

    def _draw(self) -> None:
        done = self.succeeded + self.failed
        filled = self.WIDTH * done // self.total if self.total else self.WIDTH
        elapsed = int(time.monotonic() - self._started)
        self._stream.write(
            f"\r[{'#' * filled}{'.' * (self.WIDTH - filled)}] {done}/{self.total}"
            f"  {self.succeeded} ok  {self.failed} failed  {elapsed // 60}:{elapsed % 60:02d}"
        )
        self._stream.flush()
        self._drawn = True
