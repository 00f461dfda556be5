"""Encryption at rest and the Redis job store, against a real redis-server on loopback."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
import tracemalloc
import zlib
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import asdict, dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import SecretStr

from epicrisis.errors import ConfigurationError
from epicrisis.pipeline import load_stay, summarize
from epicrisis.serving import crypto
from epicrisis.serving.crypto import Sealer, SealError, new_key_text
from epicrisis.serving.jobs import (
    IdempotencyConflict,
    JobFailure,
    JobNotFound,
    JobOptions,
    JobRecord,
    JobState,
    fingerprint,
)
from epicrisis.serving.redis_store import RedisJobStore
from epicrisis.serving.workers import LlmState, WorkerStatus, ready
from epicrisis.stay.codec import encode_stay
from epicrisis.summary.render_fhir import render_fhir
from redis_server import RedisServer, redis_server

SAMPLE = resources.files("epicrisis.samples").joinpath("sample-stay.json").read_bytes()
STAY = load_stay(SAMPLE)
SENTINEL = "ZEBRA-SENTINEL"
KEY = new_key_text()  # the sealer's, so a test can seal a value by hand in any version
T = TypeVar("T")


def run(scenario: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(scenario())


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with redis_server() as running:
        yield running


@pytest.fixture
def redis_url(server: RedisServer) -> str:
    """The server, emptied: each test sees only its own keys."""
    with server.client() as client:
        client.flushall()
    return server.url


@pytest.fixture(scope="module")
def sealer() -> Sealer:
    return Sealer.from_text(KEY)


def seal_by_hand(sealer: Sealer, version: int, plaintext: bytes, context: bytes) -> bytes:
    """A value sealed with the sealer's key as crypto's format describes, in any version and
    with any plaintext (e.g. a compressed stream ``seal`` would never write)."""
    key_id = sealer.current.encode()
    header = bytes((version, len(key_id))) + key_id
    nonce = secrets.token_bytes(crypto.NONCE_BYTES)
    cipher = AESGCM(base64.b64decode(KEY))
    return header + nonce + cipher.encrypt(nonce, plaintext, header + context)


def store_for(url: str, sealer: Sealer, **options: float) -> RedisJobStore:
    return RedisJobStore.from_url(url, sealer, **options)


def running(record: JobRecord) -> JobRecord:
    return replace(record, state=JobState.RUNNING, started_at=time.time(), stage="summarizing")


def failed(record: JobRecord) -> JobRecord:
    return replace(
        record, state=JobState.FAILED, finished_at=time.time(), error=JobFailure("x", "y", False)
    )


# -- crypto ---------------------------------------------------------------------------------


def test_seal_then_open_round_trips_and_every_seal_differs(sealer: Sealer) -> None:
    first = sealer.seal(b"plain", context=b"job-1")
    second = sealer.seal(b"plain", context=b"job-1")
    assert first != second  # a fresh nonce each time
    assert b"plain" not in first
    assert sealer.open(first, context=b"job-1") == b"plain"
    assert sealer.open(second, context=b"job-1") == b"plain"


def test_a_tampered_truncated_or_moved_value_does_not_open(sealer: Sealer) -> None:
    sealed = sealer.seal(b"the patient's record", context=b"job-1")
    for position in (1, 2, len(sealed) - 30, len(sealed) - 1):  # key id, id, nonce/body, tag
        tampered = bytearray(sealed)
        tampered[position] ^= 0x01
        with pytest.raises(SealError) as raised:
            sealer.open(bytes(tampered), context=b"job-1")
        assert "patient" not in str(raised.value)
    with pytest.raises(SealError):
        sealer.open(sealed, context=b"job-2")
    with pytest.raises(SealError):
        sealer.open(sealed[:20], context=b"job-1")
    with pytest.raises(SealError):
        sealer.open(b"\x09" + sealed[1:], context=b"job-1")  # unknown format version


def test_rotation_seals_with_the_first_key_and_opens_with_any() -> None:
    old_key, new_key = new_key_text(), new_key_text()
    before = Sealer.from_text(f"k1:{old_key}")
    after = Sealer.from_text(f"k2:{new_key}, k1:{old_key}")
    assert after.current == "k2"
    old_value = before.seal(b"sealed before the rotation", context=b"c")
    assert after.open(old_value, context=b"c") == b"sealed before the rotation"
    new_value = after.seal(b"sealed after", context=b"c")
    with pytest.raises(SealError, match="encryption key"):
        before.open(new_value, context=b"c")
    # A bare key gets an id derived from it, the same in every process.
    assert Sealer.from_text(old_key).current == Sealer.from_text(old_key).current


def test_a_compressed_value_opens_and_its_version_is_authenticated(sealer: Sealer) -> None:
    plaintext = SAMPLE  # JSON, which compresses well
    sealed = sealer.seal(plaintext, context=b"c", compress=True)
    assert sealed[0] == crypto.COMPRESSED_VERSION
    assert len(sealed) * 4 < len(plaintext)
    assert sealer.open(sealed, context=b"c") == plaintext
    assert sealer.seal(b"", context=b"c", compress=True)[0] == crypto.COMPRESSED_VERSION
    assert sealer.open(sealer.seal(b"", context=b"c", compress=True), context=b"c") == b""
    plain = sealer.seal(plaintext, context=b"c")  # as the previous version sealed everything
    assert plain[0] == crypto.VERSION and sealer.open(plain, context=b"c") == plaintext
    # The version is in the associated data: relabelled, a value does not open as the other.
    for value, other in ((sealed, crypto.VERSION), (plain, crypto.COMPRESSED_VERSION)):
        with pytest.raises(SealError, match="failed authentication"):
            sealer.open(bytes((other,)) + value[1:], context=b"c")
    # A version this code does not know, properly sealed, is refused as before: unknown format.
    unknown = seal_by_hand(sealer, 3, zlib.compress(plaintext), b"c")
    with pytest.raises(SealError, match="unknown format"):
        sealer.open(unknown, context=b"c")


def test_a_zlib_bomb_in_a_correctly_sealed_value_is_refused_without_inflating_it(
    sealer: Sealer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """64 MiB of zeros in a 64 kB stream, sealed with the right key and context: opening
    stops one byte past the limit (lowered to 1 MiB here; 256 MiB in service)."""
    monkeypatch.setattr(crypto, "MAX_PLAINTEXT_BYTES", 1 << 20)
    deflater = zlib.compressobj(9)
    zeros = bytes(1 << 20)
    bomb = b"".join(deflater.compress(zeros) for _ in range(64)) + deflater.flush()
    assert len(bomb) < 100_000
    sealed = seal_by_hand(sealer, crypto.COMPRESSED_VERSION, bomb, b"c")
    tracemalloc.start()
    try:
        with pytest.raises(SealError, match="inflates past"):
            sealer.open(sealed, context=b"c")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20  # the limit and its buffers, not the 64 MiB
    # A stream cut short, or followed by other bytes, does not open either.
    whole = zlib.compress(SAMPLE)
    for broken in (whole[:-10], whole + b"tail", b"not zlib at all"):
        with pytest.raises(SealError, match="does not decompress"):
            sealer.open(seal_by_hand(sealer, crypto.COMPRESSED_VERSION, broken, b"c"), context=b"c")
    # What would not open again is not sealed.
    with pytest.raises(SealError, match="too large to seal"):
        sealer.seal(bytes((1 << 20) + 1), context=b"c", compress=True)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not base64!",
        base64.b64encode(b"short").decode(),
        "k1:"
        + base64.b64encode(bytes(32)).decode()
        + ",k1:"
        + base64.b64encode(bytes(32)).decode(),
        "bad id:" + base64.b64encode(bytes(32)).decode(),
    ],
)
def test_a_malformed_key_is_a_configuration_error_that_does_not_print_it(text: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        Sealer.from_text(text)
    if len(text) > 8:
        assert text.split(":")[-1] not in str(raised.value)


@dataclass
class KeySettings:
    encryption_key: SecretStr | None = None
    encryption_key_file: Path | None = None


def test_the_key_comes_from_the_setting_or_a_mounted_file(tmp_path: Path) -> None:
    key = new_key_text()
    secret = tmp_path / "encryption-key"
    secret.write_text(key + "\n")
    from_setting = Sealer.from_settings(KeySettings(encryption_key=SecretStr(key)))
    from_file = Sealer.from_settings(KeySettings(encryption_key_file=secret))
    assert from_file.open(from_setting.seal(b"x", context=b"c"), context=b"c") == b"x"
    from_env = Sealer.from_environ({"EPICRISIS_ENCRYPTION_KEY_FILE": str(secret)})
    assert from_env.current == from_setting.current
    with pytest.raises(ConfigurationError, match="EPICRISIS_ENCRYPTION_KEY"):
        Sealer.from_settings(KeySettings())
    with pytest.raises(ConfigurationError, match="EPICRISIS_ENCRYPTION_KEY"):
        Sealer.from_environ({})
    with pytest.raises(ConfigurationError, match="cannot read"):
        Sealer.from_settings(KeySettings(encryption_key_file=tmp_path / "absent"))


# -- the store ------------------------------------------------------------------------------


def test_create_get_update_and_a_final_record_never_changes(redis_url: str, sealer: Sealer) -> None:
    async def scenario() -> None:
        store = store_for(redis_url, sealer)
        try:
            record, created = await store.create(idempotency_key=None, request_digest="d")
            assert created and record.state is JobState.QUEUED and len(record.id) == 32
            assert await store.get(record.id) == record
            started = await store.update(record.id, running)
            assert started.state is JobState.RUNNING
            summary = summarize(SAMPLE)
            done = await store.update(
                record.id,
                lambda r: replace(
                    r, state=JobState.SUCCEEDED, summary=summary, fhir_document="{}", fraction=1.0
                ),
            )
            assert await store.get(record.id) == done and done.summary == summary
            assert await store.update(record.id, failed) == done  # final stays final
            with pytest.raises(JobNotFound):
                await store.get("0" * 32)
            with pytest.raises(JobNotFound):
                await store.update("0" * 32, running)
        finally:
            await store.aclose()

    run(scenario)


def test_idempotency_returns_the_same_job_refuses_another_request_and_restarts_after_discard(
    redis_url: str, sealer: Sealer
) -> None:
    async def scenario() -> None:
        store = store_for(redis_url, sealer)
        other_process = store_for(redis_url, sealer)
        try:
            first, created = await store.create(idempotency_key="order-1", request_digest="a")
            again, created_again = await other_process.create(
                idempotency_key="order-1", request_digest="a"
            )
            assert created and not created_again and again == first
            with pytest.raises(IdempotencyConflict):
                await store.create(idempotency_key="order-1", request_digest="b")
            racing = await asyncio.gather(
                *(
                    s.create(idempotency_key="order-2", request_digest="a")
                    for s in (store, other_process) * 4
                )
            )
            assert len({record.id for record, _ in racing}) == 1
            assert [created for _, created in racing].count(True) == 1

            await store.discard(first.id)
            with pytest.raises(JobNotFound):
                await store.get(first.id)
            fresh, created_fresh = await store.create(idempotency_key="order-1", request_digest="b")
            assert created_fresh and fresh.id != first.id
        finally:
            await store.aclose()
            await other_process.aclose()

    run(scenario)


def test_a_watcher_sees_changes_made_through_another_connection(
    redis_url: str, sealer: Sealer
) -> None:
    async def scenario() -> list[JobRecord]:
        # A long poll: the changes must arrive through pub/sub, not the safety-net re-read.
        watcher_store = store_for(redis_url, sealer, poll_seconds=120)
        worker_store = store_for(redis_url, sealer)
        try:
            record, _ = await watcher_store.create(idempotency_key=None, request_digest="d")
            seen: list[JobRecord] = []
            first_seen = asyncio.Event()

            async def watch() -> None:
                async for update in watcher_store.watch(record.id):
                    seen.append(update)
                    first_seen.set()

            watcher = asyncio.create_task(watch())
            await first_seen.wait()
            await worker_store.update(record.id, running)
            await worker_store.update(record.id, failed)
            await asyncio.wait_for(watcher, 60)
            return seen
        finally:
            await watcher_store.aclose()
            await worker_store.aclose()

    seen = run(scenario)
    assert seen[0].state is JobState.QUEUED
    assert seen[-1].state is JobState.FAILED
    assert [r.state for r in seen] in (
        [JobState.QUEUED, JobState.RUNNING, JobState.FAILED],
        [JobState.QUEUED, JobState.FAILED],  # both changes landed before the re-read
    )


def test_payload_round_trips_and_is_dropped_when_the_job_is_final(
    redis_url: str, sealer: Sealer
) -> None:
    async def scenario() -> None:
        store = store_for(redis_url, sealer)
        try:
            record, _ = await store.create(idempotency_key=None, request_digest="d")
            options = JobOptions(encounter_id="enc-1", strict=True, max_output_tokens=512)
            await store.put_payload(record.id, STAY, options)
            assert await store.take_payload(record.id) == (STAY, options)
            assert await store.take_payload(record.id) == (STAY, options)  # redelivery
            assert await store.count_run(record.id) == 1
            assert await store.count_run(record.id) == 2
            await store.update(record.id, failed)
            with pytest.raises(JobNotFound):
                await store.take_payload(record.id)
            with pytest.raises(JobNotFound):
                await store.put_payload("0" * 32, STAY, options)
        finally:
            await store.aclose()

    run(scenario)


def test_payload_and_record_are_stored_compressed_and_round_trip(
    redis_url: str, sealer: Sealer
) -> None:
    async def scenario() -> None:
        store = store_for(redis_url, sealer)
        try:
            record, _ = await store.create(idempotency_key="order-1", request_digest="d")
            options = JobOptions(encounter_id="enc-1")
            await store.put_payload(record.id, STAY, options)
            with redis.Redis.from_url(redis_url) as client:
                payload = client.get(f"epicrisis:payload:{record.id}")
            assert payload is not None and payload[0] == crypto.COMPRESSED_VERSION
            assert len(payload) * 4 < len(encode_stay(STAY))  # 51 kB of JSON -> about 8 kB
            assert await store.take_payload(record.id) == (STAY, options)

            summary = summarize(SAMPLE)
            done = await store.update(
                record.id,
                lambda r: replace(
                    r,
                    state=JobState.SUCCEEDED,
                    summary=summary,
                    fhir_document=render_fhir(summary, version="test"),
                    fraction=1.0,
                ),
            )
            with redis.Redis.from_url(redis_url) as client:
                stored = client.get(f"epicrisis:job:{record.id}")
            assert stored is not None and stored[0] == crypto.COMPRESSED_VERSION
            envelope = sealer.open(stored, context=f"epicrisis/job/{record.id}".encode())
            assert len(stored) * 4 < len(envelope)  # 46 kB of JSON -> about 7 kB
            assert await store.get(record.id) == done
            again, created = await store.create(idempotency_key="order-1", request_digest="d")
            assert again == done and not created  # the idempotency slot survived the trip
        finally:
            await store.aclose()

    run(scenario)


def test_values_sealed_uncompressed_by_the_previous_version_still_open(
    redis_url: str, sealer: Sealer
) -> None:
    """A payload and a record as the previous version wrote them (a rolling upgrade)."""
    summary = summarize(SAMPLE)
    job_id = "a" * 32
    old_record = {
        "id": job_id,
        "state": "running",
        "created_at": 1.0,
        "started_at": 2.0,
        "finished_at": None,
        "stage": "summarizing",
        "fraction": 0.5,
        "summary": summary.model_dump(mode="json"),
        "fhir_document": "{}",
        "error": None,
        "owner": "caller-1",
    }
    envelope = json.dumps({"format": 1, "record": old_record, "idem": None}).encode()
    options = JobOptions(encounter_id="enc-1", strict=True, max_output_tokens=512)
    head = json.dumps({"format": 2, "options": asdict(options)}).encode()
    with redis.Redis.from_url(redis_url) as client:
        job_context = f"epicrisis/job/{job_id}".encode()
        payload_context = f"epicrisis/payload/{job_id}".encode()
        client.set(f"epicrisis:job:{job_id}", sealer.seal(envelope, context=job_context), px=60_000)
        client.set(
            f"epicrisis:payload:{job_id}",
            sealer.seal(
                len(head).to_bytes(4, "big") + head + encode_stay(STAY), context=payload_context
            ),
            px=60_000,
        )

    async def scenario() -> tuple[JobRecord, JobRecord, tuple[Any, ...]]:
        store = store_for(redis_url, sealer)
        try:
            before = await store.get(job_id)
            payload = await store.take_payload(job_id)
            after = await store.update(job_id, failed)  # rewritten in the new encoding
            return before, after, payload
        finally:
            await store.aclose()

    before, after, payload = run(scenario)
    assert before == JobRecord(
        id=job_id,
        state=JobState.RUNNING,
        created_at=1.0,
        started_at=2.0,
        stage="summarizing",
        fraction=0.5,
        summary=summary,
        fhir_document="{}",
        owner="caller-1",
    )
    assert payload == (STAY, options)
    assert after.state is JobState.FAILED and after.summary == summary
    with redis.Redis.from_url(redis_url) as client:
        stored = client.get(f"epicrisis:job:{job_id}")
        assert stored is not None and stored[0] == crypto.COMPRESSED_VERSION
        assert 0 < client.pttl(f"epicrisis:job:{job_id}") <= 60_000  # the TTL it had


def test_a_value_with_an_unknown_encoding_is_refused_as_another_version(
    redis_url: str, sealer: Sealer
) -> None:
    job_id = "b" * 32
    with redis.Redis.from_url(redis_url) as client:
        for slot in ("job", "payload"):
            context = f"epicrisis/{slot}/{job_id}".encode()
            value = seal_by_hand(sealer, 3, zlib.compress(b"{}"), context)
            client.set(f"epicrisis:{slot}:{job_id}", value, px=60_000)

    async def scenario() -> None:
        store = store_for(redis_url, sealer)
        try:
            with pytest.raises(SealError, match="unknown format"):
                await store.get(job_id)
            with pytest.raises(SealError, match="unknown format"):
                await store.take_payload(job_id)
        finally:
            await store.aclose()

    run(scenario)


def test_every_key_expires_with_the_ttl(redis_url: str, sealer: Sealer) -> None:
    async def scenario() -> str:
        store = store_for(redis_url, sealer, ttl_seconds=1)
        try:
            record, _ = await store.create(idempotency_key="order-9", request_digest="d")
            await store.put_payload(record.id, STAY, JobOptions())
            await store.count_run(record.id)
            await store.update(record.id, running)
            return record.id
        finally:
            await store.aclose()

    job_id = run(scenario)
    with redis.Redis.from_url(redis_url) as client:
        keys = list(client.scan_iter())
        assert len(keys) == 4  # job, payload, runs, idempotency
        for key in keys:
            assert 0 < client.pttl(key) <= 1000, key
        deadline = time.monotonic() + 10
        while client.dbsize() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.dbsize() == 0

    async def gone() -> None:
        store = store_for(redis_url, sealer)
        try:
            with pytest.raises(JobNotFound):
                await store.get(job_id)
        finally:
            await store.aclose()

    run(gone)


def everything_in(url: str) -> list[bytes]:
    """Every key name and value in the server, in every form Redis gives it out."""
    seen: list[bytes] = []
    with redis.Redis.from_url(url) as client:
        for key in client.scan_iter():
            seen.append(key)
            kind = client.type(key)
            if kind == b"string":
                seen.append(client.get(key) or b"")
            elif kind == b"hash":
                for field, value in client.hgetall(key).items():
                    seen += [field, value]
            elif kind == b"list":
                seen += client.lrange(key, 0, -1)
            elif kind == b"set":
                seen += list(client.smembers(key))
            elif kind == b"zset":
                seen += client.zrange(key, 0, -1)
            seen.append(client.dump(key) or b"")
    return seen


def sentinel_bundle() -> bytes:
    """The sample with a sentinel in a diagnosis, which the summary then repeats."""
    doc = json.loads(SAMPLE)
    for entry in doc["entry"]:
        resource = entry["resource"]
        if resource["resourceType"] == "Condition":
            resource["code"]["text"] = f"{SENTINEL} pneumonia"
            for coding in resource["code"].get("coding", []):
                coding["display"] = f"{SENTINEL} pneumonia"
    return json.dumps(doc).encode()


def test_nothing_from_the_bundle_or_the_summary_is_readable_in_redis(
    redis_url: str, sealer: Sealer
) -> None:
    bundle = sentinel_bundle()
    summary = summarize(bundle)
    assert SENTINEL in summary.model_dump_json()  # else this test proves nothing

    async def scenario() -> JobRecord:
        store = store_for(redis_url, sealer)
        try:
            record, _ = await store.create(
                idempotency_key=f"{SENTINEL}-mrn", request_digest=fingerprint(bundle)
            )
            await store.put_payload(record.id, load_stay(bundle), JobOptions(encounter_id=SENTINEL))
            await store.update(record.id, running)
            snapshot = everything_in(redis_url)  # with the payload still there
            done = await store.update(
                record.id,
                lambda r: replace(
                    r, state=JobState.SUCCEEDED, summary=summary, fhir_document=SENTINEL
                ),
            )
            snapshot += everything_in(redis_url)
            assert all(SENTINEL.encode() not in value for value in snapshot)
            assert all(fingerprint(bundle).encode() not in value for value in snapshot)
            return done
        finally:
            await store.aclose()

    done = run(scenario)
    assert done.summary is not None and SENTINEL in done.summary.model_dump_json()


def test_watchers_share_one_subscription_that_survives_a_dropped_connection(
    redis_url: str, sealer: Sealer
) -> None:
    """Forty watchers through a pool of four connections: one subscription each would
    exhaust it. Polls are two minutes apart, so every change seen came by pub/sub, also
    after Redis drops the subscriber's connection."""
    jobs = 40

    async def scenario() -> list[list[JobState]]:
        watcher_store = store_for(redis_url, sealer, poll_seconds=120, max_connections=4)
        worker_store = store_for(redis_url, sealer)
        try:
            records = [
                (await watcher_store.create(idempotency_key=None, request_digest="d"))[0]
                for _ in range(jobs)
            ]
            seen: list[list[JobState]] = [[] for _ in records]
            started = asyncio.Semaphore(0)

            async def watch(index: int, job_id: str) -> None:
                async for update in watcher_store.watch(job_id):
                    seen[index].append(update.state)
                    started.release()

            watchers = [asyncio.create_task(watch(i, r.id)) for i, r in enumerate(records)]
            for _ in records:
                await started.acquire()
            for record in records[: jobs // 2]:
                await worker_store.update(record.id, running)
            with redis.Redis.from_url(redis_url) as admin:
                assert admin.client_kill_filter(_type="pubsub") == 1  # one subscriber
            await asyncio.sleep(0.2)  # the next changes land while it resubscribes
            for record in records:
                await worker_store.update(record.id, failed)
            await asyncio.wait_for(asyncio.gather(*watchers), 60)
            return seen
        finally:
            await watcher_store.aclose()
            await worker_store.aclose()

    for states in run(scenario):
        assert states[0] is JobState.QUEUED and states[-1] is JobState.FAILED


def test_worker_reports_are_fresh_or_dropped_and_withdrawn_on_stop(
    redis_url: str, sealer: Sealer
) -> None:
    def report(worker_id: str, age: float, llm: LlmState = "ready") -> WorkerStatus:
        return WorkerStatus(worker_id, time.time() - age, llm, running=1, slots=8, interval=1.0)

    async def scenario() -> tuple[list[str], list[str], bool, bool, int]:
        store = store_for(redis_url, sealer)
        try:
            await store.report_worker(report("host-a:1", age=0.0))
            await store.report_worker(report("host-b:2", age=0.0, llm="down"))
            await store.report_worker(report("host-c:3", age=10.0))  # three intervals missed
            live = sorted(w.worker_id for w in await store.live_workers())
            up = ready(await store.live_workers())
            await store.forget_worker("host-a:1")
            after = sorted(w.worker_id for w in await store.live_workers())
            down = ready(await store.live_workers())  # only a worker that cannot reach a model
            with redis.Redis.from_url(redis_url) as admin:
                ttl = admin.pttl("epicrisis:workers:all")
            return live, after, up, down, ttl
        finally:
            await store.aclose()

    live, after, up, down, ttl = run(scenario)
    assert live == ["host-a:1", "host-b:2"]
    assert after == ["host-b:2"]
    assert up and not down
    assert 0 < ttl <= 3000  # the reports' hash outlives its last beat only briefly
