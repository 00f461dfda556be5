"""Security over real processes: mutual TLS, API keys and rights, each caller's own jobs,
audit events, and a sentinel patient who shows up nowhere but in the Bundle.

The deployment (tests/deployment.py, ``secure=True``) runs as in production: the server
needs a client certificate from its CA and an API key (callers ``ehr`` and ``other`` with
every right, ``reader`` with ``read`` only); the test makes its own CA with ``cryptography``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import orjson
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from certs import Authority
from deployment import (
    EPICRISIS,
    LLM,
    SAMPLE,
    WAIT_SECONDS,
    Deployment,
    deployed,
    metrics_address,
)
from epicrisis.config import Settings
from epicrisis.errors import ConfigurationError
from epicrisis.serving.auth import ApiKeys, new_key
from epicrisis.v1 import summarizer_pb2 as pb

SENTINEL_NAME = ("Zzyzxia", "Quillfeather")  # given, family: in no dictionary, easy to find
SENTINEL_MRN = "SNTL-7731-0042"


def sentinel_bundle(*, broken: bool = False) -> bytes:
    """The sample Bundle with the sentinel patient; ``broken``: the patient's birthDate is
    the sentinel MRN (invalid, so the Bundle is refused, and the error must not quote it)."""
    bundle = orjson.loads(SAMPLE)
    for entry in bundle["entry"]:
        resource = entry["resource"]
        if resource["resourceType"] == "Patient":
            resource["name"] = [
                {"use": "official", "family": SENTINEL_NAME[1], "given": [SENTINEL_NAME[0]]}
            ]
            for identifier in resource.get("identifier", []):
                identifier["value"] = SENTINEL_MRN
            if broken:
                resource["birthDate"] = SENTINEL_MRN
    return orjson.dumps(bundle)


SENTINELS = (*SENTINEL_NAME, SENTINEL_MRN)


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    with deployed(tmp_path_factory.mktemp("secure"), secure=True) as running:
        yield running


def code_of(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as failure:
        call()  # type: ignore[operator]
    code: grpc.StatusCode = failure.value.code()
    return code


def test_plaintext_and_callers_without_a_client_certificate_are_refused(
    secure: Deployment, tmp_path: Path
) -> None:
    assert secure.security is not None
    request = pb.GetJobRequest(id="0" * 32)
    with grpc.insecure_channel(secure.target) as plain:
        stub = health_pb2_grpc.HealthStub(plain)
        assert code_of(lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=10)) is (
            grpc.StatusCode.UNAVAILABLE
        )
    server_only = grpc.ssl_channel_credentials(root_certificates=secure.security.ca)
    stranger = Authority("another CA").issue("intruder", server=False)
    foreign = grpc.ssl_channel_credentials(
        root_certificates=secure.security.ca,
        private_key=stranger.key,
        certificate_chain=stranger.cert,
    )
    for credentials in (server_only, foreign):
        with grpc.secure_channel(secure.target, credentials) as channel:
            get = channel.unary_unary(
                "/epicrisis.v1.DischargeSummarizer/GetJob",
                request_serializer=pb.GetJobRequest.SerializeToString,
                response_deserializer=pb.Job.FromString,
            )
            assert code_of(lambda get=get: get(request, timeout=10)) is grpc.StatusCode.UNAVAILABLE


def test_health_needs_tls_but_no_key(secure: Deployment) -> None:
    with secure.channel(caller=None) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=WAIT_SECONDS
        )
    assert answer.status in (
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    )


def test_a_missing_or_unknown_key_is_unauthenticated(secure: Deployment) -> None:
    request = pb.SubmitRequest(bundle=SAMPLE)
    channel, stub = secure.stub(caller=None)
    with channel:
        assert code_of(lambda: stub.Submit(request, timeout=10)) is grpc.StatusCode.UNAUTHENTICATED
        forged = [("authorization", "Bearer epk_" + "A" * 43)]
        with pytest.raises(grpc.RpcError) as failure:
            stub.Submit(request, timeout=10, metadata=forged)
    assert failure.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "epk_" not in (failure.value.details() or "")  # the key is never echoed
    refused = [e for e in audit_events(secure) if e["action"] == "authenticate"]
    assert any(e["outcome"] == "UNAUTHENTICATED" and e["method"] == "Submit" for e in refused)


def test_a_call_outside_the_keys_rights_is_permission_denied(secure: Deployment) -> None:
    channel, stub = secure.stub(caller="reader")
    with channel:
        submit = lambda: stub.Submit(pb.SubmitRequest(bundle=SAMPLE), timeout=10)  # noqa: E731
        assert code_of(submit) is grpc.StatusCode.PERMISSION_DENIED
        cancel = lambda: stub.CancelJob(pb.CancelJobRequest(id="0" * 32), timeout=10)  # noqa: E731
        assert code_of(cancel) is grpc.StatusCode.PERMISSION_DENIED
    denied = [e for e in audit_events(secure) if e["outcome"] == "PERMISSION_DENIED"]
    assert {(e["caller"], e["method"]) for e in denied} >= {
        ("reader", "Submit"),
        ("reader", "CancelJob"),
    }


def test_a_caller_sees_only_its_own_jobs(secure: Deployment) -> None:
    owner_channel, owner = secure.stub(caller="ehr")
    other_channel, other = secure.stub(caller="other")
    with owner_channel, other_channel:
        job = owner.Submit(
            pb.SubmitRequest(bundle=SAMPLE, idempotency_key="stay-1"), timeout=WAIT_SECONDS
        )
        unknown = "f" * 32
        for job_id in (job.id, unknown):  # another's job answers exactly as no job at all
            with pytest.raises(grpc.RpcError) as got:
                other.GetJob(pb.GetJobRequest(id=job_id), timeout=10)
            assert got.value.code() is grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.RpcError) as watched:
                list(other.WatchJob(pb.WatchJobRequest(id=job_id), timeout=10))
            assert watched.value.code() is grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.RpcError) as cancelled:
                other.CancelJob(pb.CancelJobRequest(id=job_id), timeout=10)
            assert cancelled.value.code() is grpc.StatusCode.NOT_FOUND
        assert got.value.details() == "no such job (it may have expired)"
        # the same idempotency key from another caller is another job, not the first one
        again = other.Submit(
            pb.SubmitRequest(bundle=SAMPLE, idempotency_key="stay-1"), timeout=WAIT_SECONDS
        )
        assert again.id != job.id
        assert owner.GetJob(pb.GetJobRequest(id=job.id), timeout=10).id == job.id
        reader_channel, reader = secure.stub(caller="reader")
        with reader_channel:
            assert code_of(lambda: reader.GetJob(pb.GetJobRequest(id=job.id), timeout=10)) is (
                grpc.StatusCode.NOT_FOUND
            )


def audit_events(secure: Deployment) -> list[dict[str, object]]:
    log = secure.worker_log.parent / "server.log"
    records = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    return [r["audit"] for r in records if isinstance(r.get("audit"), dict)]


def test_every_submission_and_read_is_audited_with_a_keyed_patient_hash(secure: Deployment) -> None:
    channel, stub = secure.stub(caller="ehr")
    other_channel, other = secure.stub(caller="other")
    with channel, other_channel:
        job = stub.Summarize(
            pb.SubmitRequest(bundle=sentinel_bundle(), options=LLM), timeout=WAIT_SECONDS
        )
        assert job.state == pb.JOB_STATE_SUCCEEDED
        stub.GetJob(pb.GetJobRequest(id=job.id), timeout=10)
        with pytest.raises(grpc.RpcError):
            other.GetJob(pb.GetJobRequest(id=job.id), timeout=10)
    events = [e for e in audit_events(secure) if e.get("job_id") == job.id]
    summarize = [e for e in events if e["action"] == "summarize"]
    reads = [e for e in events if e["action"] == "read"]
    assert len(summarize) == 1 and summarize[0]["caller"] == "ehr"
    assert summarize[0]["outcome"] == "OK (succeeded)"
    patient = summarize[0]["patient"]
    assert isinstance(patient, str) and re.fullmatch(r"[0-9a-f]{32}", patient)
    assert [e["caller"] for e in reads] == ["ehr"] and reads[0]["patient"] == patient
    refused = [
        e for e in audit_events(secure) if e["caller"] == "other" and e["outcome"] == "NOT_FOUND"
    ]
    assert refused and all(e["method"] == "GetJob" for e in refused[-1:])
    assert all("pt-" not in json.dumps(e) for e in events)  # the reference is hashed


def test_the_sentinel_patient_is_in_no_log_metric_error_or_redis_key(secure: Deployment) -> None:
    channel, stub = secure.stub(caller="ehr")
    with channel:
        job = stub.Summarize(
            pb.SubmitRequest(bundle=sentinel_bundle(), options=LLM), timeout=WAIT_SECONDS
        )
        assert job.state == pb.JOB_STATE_SUCCEEDED
        watched = list(stub.WatchJob(pb.WatchJobRequest(id=job.id), timeout=WAIT_SECONDS))
        with pytest.raises(grpc.RpcError) as refused:
            stub.Submit(pb.SubmitRequest(bundle=sentinel_bundle(broken=True)), timeout=WAIT_SECONDS)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    seen = {
        "error": (refused.value.details() or "") + repr(refused.value.trailing_metadata()),
        "job": str(job.error)
        + "".join(str(w) for w in job.summary.warnings)
        + str(watched[-1].error),
        "server log": (secure.worker_log.parent / "server.log").read_text(),
        "worker log": secure.log_tail() + secure.worker_log.read_text(),
    }
    for name, log in (
        ("server", secure.worker_log.parent / "server.log"),
        ("worker", secure.worker_log),
    ):
        with urllib.request.urlopen(f"http://{metrics_address(log)}/metrics", timeout=10) as page:
            seen[f"{name} metrics"] = page.read().decode()
    seen["redis"] = redis_contents(secure.env["EPICRISIS_REDIS_URL"])
    for where, text in seen.items():
        for sentinel in SENTINELS:
            assert sentinel not in text, f"{sentinel!r} found in the {where}"
    assert "epicrisis:job:" in seen["redis"]  # the scan saw the jobs (sealed)


def redis_contents(url: str) -> str:
    """Every key of the database and every value, as text (binary values decoded loosely)."""
    client = redis.Redis.from_url(url)
    parts: list[bytes] = []
    for key in client.scan_iter(count=1000):
        parts.append(key)
        kind = client.type(key)
        if kind == b"string":
            parts.append(client.get(key) or b"")
        elif kind == b"list":
            parts.extend(client.lrange(key, 0, -1))
        elif kind == b"hash":
            for field, value in client.hgetall(key).items():
                parts += [field, value]
        elif kind in (b"set", b"zset"):
            parts.extend(client.zrange(key, 0, -1) if kind == b"zset" else client.smembers(key))
    client.close()
    return b"\n".join(parts).decode(errors="replace")


def test_the_server_refuses_to_start_without_tls_or_keys(secure: Deployment) -> None:
    env = {
        k: v
        for k, v in secure.env.items()
        if not k.startswith(("EPICRISIS_GRPC_TLS", "EPICRISIS_API"))
    }
    without_tls = {**env, "EPICRISIS_API_KEYS_FILE": secure.env["EPICRISIS_API_KEYS_FILE"]}
    without_keys = {k: v for k, v in secure.env.items() if k != "EPICRISIS_API_KEYS_FILE"}
    for environment, named in (
        (without_tls, "EPICRISIS_GRPC_TLS_CERT_FILE"),
        (without_keys, "EPICRISIS_API_KEYS_FILE"),
    ):
        result = subprocess.run(
            [str(EPICRISIS), "serve"], env=environment, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 3, result.stderr
        assert result.stderr.count("\n") == 1 and named in result.stderr


def test_a_malformed_keys_file_is_named_by_line_never_by_content(tmp_path: Path) -> None:
    key, line = new_key("ehr-north", "submit,read")
    keys = tmp_path / "keys"
    keys.write_text(f"# callers\n{line}\nbroken-line secret-looking-text\n")
    with pytest.raises(ConfigurationError) as error:
        ApiKeys.from_file(keys)
    assert "line 3" in str(error.value) and "secret-looking" not in str(error.value)
    keys.write_text(f"{line}\n")
    caller = ApiKeys.from_file(keys).authenticate(key)
    assert caller is not None and caller.id == "ehr-north"
    assert caller.may("GetJob") and not caller.may("CancelJob")
    assert not caller.may("ListJobs")  # a method no right names stays closed
    assert ApiKeys.from_file(keys).authenticate(key + "x") is None
    assert key not in keys.read_text()  # the file holds the hash only


def test_epicrisis_api_key_prints_a_key_and_the_line_that_admits_it(tmp_path: Path) -> None:
    made = subprocess.run(
        [str(EPICRISIS), "api-key", "lab-feed", "--rights", "read"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    lines = [line for line in made.stdout.splitlines() if not line.startswith("#")]
    key, entry = lines
    (tmp_path / "keys").write_text(entry + "\n")
    settings = Settings(api_keys_file=tmp_path / "keys", _env_file=None)  # type: ignore[call-arg]
    assert settings.api_keys_file is not None
    caller = ApiKeys.from_file(settings.api_keys_file).authenticate(key)
    assert caller is not None and caller.rights == frozenset({"read"})
    assert os.path.getsize(tmp_path / "keys") < 200


@contextlib.contextmanager
def tls_redis(folder: Path) -> Iterator[str]:
    """A redis-server that takes only TLS connections and a password; its rediss:// URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not on PATH")
    authority = Authority("redis CA")
    cert, key = authority.issue("127.0.0.1", server=True).write(folder, "redis")
    (folder / "redis-ca.crt").write_bytes(authority.pem)
    password = secrets.token_urlsafe(16)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [
            binary, "--port", "0", "--bind", "127.0.0.1", "--tls-port", str(port),
            "--tls-cert-file", str(cert), "--tls-key-file", str(key),
            "--tls-ca-cert-file", str(folder / "redis-ca.crt"), "--tls-auth-clients", "no",
            "--requirepass", password, "--save", "", "--appendonly", "no", "--dir", str(folder),
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    query = f"ssl_ca_certs={folder / 'redis-ca.crt'}&ssl_cert_reqs=required"
    url = f"rediss://:{password}@127.0.0.1:{port}/0?{query}"
    try:
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            try:
                with redis.Redis.from_url(url) as client:
                    client.ping()
                break
            except redis.ConnectionError:
                assert process.poll() is None and time.monotonic() < deadline, "no TLS redis"
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_a_redis_with_tls_and_a_password_serves_the_queued_mode(tmp_path: Path) -> None:
    with tls_redis(tmp_path) as url, deployed(tmp_path, secure=True, redis_url=url) as running:
        channel, stub = running.stub(caller="ehr")
        with channel:
            job = stub.Summarize(pb.SubmitRequest(bundle=SAMPLE, options=LLM), timeout=WAIT_SECONDS)
        assert job.state == pb.JOB_STATE_SUCCEEDED
        plain = url.replace("rediss://", "redis://").split("?")[0]
        with pytest.raises(redis.ConnectionError), redis.Redis.from_url(plain) as client:
            client.ping()  # the plaintext port is closed: nothing reaches Redis unencrypted
        server_log = (tmp_path / "server.log").read_text()
        assert url.split("@")[0].split(":")[-1] not in server_log  # the password is not logged
