"""The ``epicrisis`` console script as users run it: exit codes, stderr, stdout bytes.

Contract (DESIGN.md section 7): exit 0 on success; bad input exits non-zero with exactly one
line on stderr, starting ``epicrisis:``, never a traceback and never the input's content.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from importlib import resources
from pathlib import Path

import grpc
import pytest

from deployment import LOCAL_ENV, descendants
from epicrisis.v1 import summarizer_pb2 as pb
from epicrisis.v1 import summarizer_pb2_grpc as pb_grpc

EPICRISIS = Path(sys.executable).parent / "epicrisis"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SENTINEL = "ZEBRA-SENTINEL"

BARE_PATIENT = json.dumps(
    {"resourceType": "Patient", "id": "p", "name": [{"family": SENTINEL}]}
).encode()
NO_STAY = json.dumps(
    {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"resource": {"resourceType": "Patient", "id": "p", "name": [{"text": SENTINEL}]}},
            {
                "resource": {
                    "resourceType": "Encounter",
                    "id": "visit",
                    "status": "finished",
                    "class": {"code": "AMB"},
                    "subject": {"reference": "Patient/p"},
                    "reasonCode": [{"text": SENTINEL}],
                }
            },
        ],
    }
).encode()


def run(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [str(EPICRISIS), *args], input=stdin, capture_output=True, timeout=60, check=False
    )


@pytest.fixture(scope="module", autouse=True)
def _console_script() -> None:
    if not EPICRISIS.exists():
        pytest.fail(f"console script not installed at {EPICRISIS} (pip install -e '.[dev]')")


def assert_one_clean_line(result: subprocess.CompletedProcess[bytes], *words: str) -> str:
    assert result.returncode != 0
    assert result.stdout == b""
    err = result.stderr.decode("utf-8")
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("epicrisis: "), err
    assert "Traceback" not in err
    assert SENTINEL not in err
    for word in words:
        assert word in err, f"{word!r} not in {err!r}"
    return err


BAD = [
    # id, file content (None: no such file), words in the one line
    ("not-json", f"{SENTINEL} is not JSON".encode(), ["invalid input", "not valid JSON"]),
    ("empty", b"", ["invalid input", "empty"]),
    ("bare-resource", BARE_PATIENT, ["invalid input", "bare Patient resource", "Bundle"]),
    ("no-inpatient-stay", NO_STAY, ["invalid input", "no finished inpatient", "--encounter"]),
    (
        "invalid-utf8",
        BARE_PATIENT.replace(SENTINEL.encode(), b"\xc3\x28" + SENTINEL.encode()),
        ["invalid input", "UTF-8"],
    ),
]


@pytest.mark.parametrize(("content", "words"), [pytest.param(*c[1:], id=c[0]) for c in BAD])
def test_bad_input_file_gives_one_line(tmp_path: Path, content: bytes, words: list[str]) -> None:
    path = tmp_path / "input.json"
    path.write_bytes(content)
    result = run("summarize", str(path))
    assert result.returncode == 2
    assert_one_clean_line(result, *words)


@pytest.mark.parametrize("command", ["summarize", "prompt"])
@pytest.mark.parametrize(("content", "words"), [pytest.param(*c[1:], id=c[0]) for c in BAD])
def test_bad_input_on_stdin_gives_one_line(command: str, content: bytes, words: list[str]) -> None:
    result = run(command, "-", stdin=content)
    assert result.returncode == 2
    assert_one_clean_line(result, *words)


def test_missing_file_gives_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.json"
    result = run("summarize", str(missing))
    assert result.returncode == 2
    assert_one_clean_line(result, "no such file", str(missing))


def test_directory_instead_of_a_file_gives_one_line(tmp_path: Path) -> None:
    assert_one_clean_line(run("summarize", str(tmp_path)), "directory")


def test_no_input_at_all_gives_one_line() -> None:
    assert_one_clean_line(run("summarize"), "no input", "--sample")


def test_named_encounter_that_is_absent_gives_one_line() -> None:
    result = run("summarize", str(FIXTURES / "collection-relative.json"), "--encounter", "nope")
    assert result.returncode == 2
    assert_one_clean_line(result, "no Encounter with id nope")


def test_strict_refuses_an_invalid_entry_with_one_line() -> None:
    result = run("summarize", str(FIXTURES / "degraded.json"), "--strict")
    assert result.returncode == 2
    assert_one_clean_line(result, "entry[3] Observation/obs-bad", "valueQuantity.value")


@pytest.mark.parametrize("fmt", ["json", "text", "fhir"])
def test_sample_summarizes_in_every_format_deterministically(fmt: str) -> None:
    first = run("summarize", "--sample", "--format", fmt)
    assert first.returncode == 0, first.stderr.decode()
    assert first.stderr == b""
    assert first.stdout.endswith(b"\n") and len(first.stdout) > 500
    if fmt == "json":
        summary = json.loads(first.stdout)
        assert summary["kind"] in ("discharge-summary", "death-summary")
        assert summary["encounter"]["reference"].startswith("Encounter/")
    elif fmt == "fhir":
        document = json.loads(first.stdout)
        assert document["resourceType"] == "Bundle"
        assert document["type"] == "document"
        assert document["entry"][0]["resource"]["resourceType"] == "Composition"
    else:
        assert b"SUMMARY" in first.stdout.splitlines()[0]
    second = run("summarize", "--sample", "--format", fmt)
    assert second.returncode == 0
    assert second.stdout == first.stdout  # byte for byte


def test_file_and_stdin_give_the_same_bytes() -> None:
    path = FIXTURES / "collection-relative.json"
    from_file = run("summarize", str(path), "--format", "json")
    from_stdin = run("summarize", "-", "--format", "json", stdin=path.read_bytes())
    again = run("summarize", "-", "--format", "json", stdin=path.read_bytes())
    assert from_file.returncode == from_stdin.returncode == 0
    assert from_file.stdout == from_stdin.stdout == again.stdout
    assert json.loads(from_file.stdout)["encounter"]["reference"] == "Encounter/enc-1"


def test_tgi_sim_serves_until_sigterm_and_a_taken_port_is_one_line() -> None:
    """``epicrisis tgi-sim`` prints its URL, answers /info, stops cleanly on SIGTERM."""
    with subprocess.Popen(
        [str(EPICRISIS), "tgi-sim", "--port", "0"], stderr=subprocess.PIPE, text=True
    ) as sim:
        _serve_and_stop(sim)


def _serve_and_stop(sim: subprocess.Popen[str]) -> None:
    try:
        assert sim.stderr is not None
        banner = sim.stderr.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)", banner)
        assert match, banner
        port = match.group(1)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/info", timeout=10) as answer:
            assert json.loads(answer.read())["max_concurrent_requests"] == 128
        taken = run("tgi-sim", "--port", port)
        assert taken.returncode == 3
        assert_one_clean_line(taken, "Address already in use")
    finally:
        sim.send_signal(signal.SIGTERM)
        assert sim.wait(timeout=20) == 0


def test_serve_embedded_answers_over_grpc_and_drains_on_sigterm() -> None:
    env = {**os.environ, "EPICRISIS_GRPC_PORT": "0", **LOCAL_ENV}
    with subprocess.Popen(
        [str(EPICRISIS), "serve", "--embedded"], stderr=subprocess.PIPE, text=True, env=env
    ) as server:
        try:
            assert server.stderr is not None
            banner = server.stderr.readline()
            match = re.search(r"127\.0\.0\.1:(\d+)", banner)
            assert match, banner
            sample = resources.files("epicrisis.samples").joinpath("sample-stay.json").read_bytes()
            with grpc.insecure_channel(f"127.0.0.1:{match.group(1)}") as channel:
                stub = pb_grpc.DischargeSummarizerStub(channel)
                job = stub.Summarize(pb.SubmitRequest(bundle=sample), timeout=60)
            assert job.state == pb.JOB_STATE_SUCCEEDED
            taken = subprocess.run(
                [str(EPICRISIS), "serve", "--embedded"],
                env={**env, "EPICRISIS_GRPC_PORT": match.group(1)},
                capture_output=True,
                timeout=60,
                check=False,
            )
            assert taken.returncode == 3
            assert_one_clean_line(taken, "could not listen")
        finally:
            server.send_signal(signal.SIGTERM)
            assert server.wait(timeout=30) == 0


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_the_ingest_processes_end_with_a_server_killed_outright() -> None:
    """SIGKILL leaves the server no time to stop its pool: the ingest processes see their
    parent go and end, instead of waiting for work forever as orphans."""
    env = {
        **os.environ,
        "EPICRISIS_GRPC_PORT": "0",
        "EPICRISIS_INGEST_PROCESSES": "1",
        **LOCAL_ENV,
    }
    with subprocess.Popen(
        [str(EPICRISIS), "serve", "--embedded"], stderr=subprocess.PIPE, text=True, env=env
    ) as server:
        assert server.stderr is not None
        banner = server.stderr.readline()  # the processes are up before the server says so
        assert "serving gRPC" in banner, banner
        children = descendants(server.pid)
        assert children
        server.kill()
        server.wait(timeout=10)
    deadline = time.monotonic() + 20
    while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in children)


def test_services_tune_the_collector_for_big_json_requests() -> None:
    """serve freezes the start-up heap and collects the young generation rarely (the
    collector took 7 ms per request without, with the sample's Bundles in flight)."""
    code = (
        "import gc\n"
        "from epicrisis.serving.ingest import YOUNG_COLLECTION_THRESHOLD, settle_heap\n"
        "default = gc.get_threshold()\n"
        "settle_heap()\n"
        "assert gc.get_freeze_count() > 10_000, gc.get_freeze_count()\n"
        "assert gc.get_threshold() == (YOUNG_COLLECTION_THRESHOLD, *default[1:])\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
