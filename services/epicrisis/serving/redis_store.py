"""The queued mode's job store: :class:`MemoryJobStore`'s interface on Redis, shared by processes.

Key layout (``prefix`` defaults to ``epicrisis``; ids are random hex, hashes are HMAC-SHA256
with a key derived from the encryption key, so no name holds anything from a request)::

    {prefix}:job:{id}            sealed job record (state, progress, summary, FHIR document)
    {prefix}:payload:{id}        sealed stay (the validated facts) and options, for the
                                 worker; gone once final
    {prefix}:runs:{id}           deliveries of the job to a worker (a counter)
    {prefix}:idem:{hmac(key)}    "{id}:{hmac(request digest)}" for idempotent Submit
    {prefix}:events:{id}         pub/sub channel (not a key): "a record changed, re-read it"
    {prefix}:live:{queue}        sorted set: unfinished jobs -> when last seen (serving.queue
                                 queues again one whose message was lost); expires with the
                                 newest job in it
    {prefix}:reconcile           the lock of a worker's round of that check (a few seconds)
    {prefix}:workers:all         hash: worker process -> its last heartbeat (plain JSON: a
                                 host and pid, times and counts; nothing about a job)

Every job key is written with the store's TTL (default 24 h), and updates keep the remaining
TTL, so nothing about a job outlives its record; the workers' hash lives three heartbeats
past the last one. Values are sealed (:mod:`crypto`) with the job id and the slot as context:
a value moved to another job or slot does not open.

Records and payloads are compressed before they are sealed (``seal(compress=True)``: zlib
makes them 6-9 times smaller), so one Redis holds that many more jobs over a TTL; values
sealed uncompressed by earlier versions still open. Compression lets the stored length
vary with the content, which matters only where a secret shares a value with data an
attacker chooses: here the caller supplies the whole Bundle, and a record holds only what
was derived from that caller's own request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from typing import Any, Self

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError, WatchError

from epicrisis.serving.auth import ANONYMOUS
from epicrisis.serving.crypto import Sealer
from epicrisis.serving.jobs import (
    IdempotencyConflict,
    JobFailure,
    JobNotFound,
    JobOptions,
    JobRecord,
    JobState,
    observe_transition,
)
from epicrisis.serving.workers import STALE_INTERVALS, WorkerStatus
from epicrisis.stay import Stay
from epicrisis.stay.codec import StayDecodeError, decode_stay, encode_stay
from epicrisis.summary.model import DischargeSummary

log = logging.getLogger(__name__)

DEFAULT_TTL_SECONDS = 24 * 3600
DEFAULT_POLL_SECONDS = 5.0  # the watchers' safety net when a notification is lost
MAX_CONNECTIONS = 64  # per store (process); watchers share one more for the subscription
POOL_WAIT_SECONDS = 20.0  # a command waits this long for a free connection
RESUBSCRIBE_SECONDS = 1.0  # after the subscription's connection drops
_FORMAT = 1
_PAYLOAD_FORMAT = 2  # 1 carried the Bundle itself
_NOT_FOUND = "no such job (it may have expired)"
ENQUEUED_AT_HEADER = "epicrisis_enqueued_at"  # in each Celery message: when it was sent

# Deletes the idempotency key only while it still names this job (a later job may own it).
_DROP_IDEMPOTENCY = """
local value = redis.call('GET', KEYS[1])
if value and string.sub(value, 1, string.len(ARGV[1])) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisJobStore:
    """Jobs in Redis: sealed records with a TTL, atomic updates, watchers across processes."""

    def __init__(
        self,
        client: aioredis.Redis,
        sealer: Sealer,
        *,
        ttl_seconds: float = DEFAULT_TTL_SECONDS,
        prefix: str = "epicrisis",
        poll_seconds: float = DEFAULT_POLL_SECONDS,
    ) -> None:
        if ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be positive")
        self._redis = client
        self._sealer = sealer
        self._ttl_ms = max(1, round(ttl_seconds * 1000))
        self._prefix = prefix
        self._poll = poll_seconds
        self._drop_idempotency = client.register_script(_DROP_IDEMPOTENCY)
        self._notifier = _Notifier(client, self._key("events", "*"))

    @classmethod
    def from_url(
        cls, url: str, sealer: Sealer, *, max_connections: int = MAX_CONNECTIONS, **options: Any
    ) -> Self:
        """A store with its own connection pool (``redis://``, ``rediss://`` for TLS). A
        burst waits for a free connection (up to ``POOL_WAIT_SECONDS``) instead of failing."""
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=POOL_WAIT_SECONDS
        )
        return cls(aioredis.Redis(connection_pool=pool), sealer, **options)

    async def aclose(self) -> None:
        await self._notifier.aclose()
        await self._redis.aclose()
        await self._redis.connection_pool.disconnect()

    @property
    def client(self) -> aioredis.Redis:
        """The store's connection pool, for the queue's own keys (the live-job index)."""
        return self._redis

    @property
    def prefix(self) -> str:
        return self._prefix

    @property
    def ttl_ms(self) -> int:
        """How long a job's keys live (EPICRISIS_JOB_TTL_SECONDS), in milliseconds."""
        return self._ttl_ms

    async def has_payload(self, job_id: str) -> bool:
        return bool(await self._redis.exists(self._key("payload", job_id)))

    async def ping(self) -> None:
        """Raise unless Redis answers (the server's health check)."""
        await self._redis.ping()

    # -- the MemoryJobStore interface ------------------------------------------------------

    async def create(
        self, *, idempotency_key: str | None, request_digest: str, owner: str = ANONYMOUS
    ) -> tuple[JobRecord, bool]:
        """A new QUEUED job, or the live job of a known idempotency key (``created`` False)."""
        record = JobRecord(
            id=uuid.uuid4().hex, state=JobState.QUEUED, created_at=time.time(), owner=owner
        )
        if idempotency_key is None:
            await self._redis.set(
                self._key("job", record.id), self._seal(record, None), px=self._ttl_ms
            )
            return record, True
        slot = self._sealer.index(idempotency_key)
        idem_key = self._key("idem", slot)
        digest = self._sealer.index(request_digest)
        blob = self._seal(record, slot)
        async with self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(idem_key)
                    known = await pipe.get(idem_key)
                    if known is not None:
                        job_id, _, known_digest = _raw(known).decode().partition(":")
                        existing = await pipe.get(self._key("job", job_id))
                        if existing is not None:  # else: discarded or expired, start afresh
                            if known_digest != digest:
                                raise IdempotencyConflict(
                                    "idempotency key was already used for a different request"
                                )
                            return self._open(job_id, _raw(existing)), False
                    pipe.multi()
                    pipe.set(self._key("job", record.id), blob, px=self._ttl_ms)
                    pipe.set(idem_key, f"{record.id}:{digest}", px=self._ttl_ms)
                    await pipe.execute()
                    return record, True
                except WatchError:
                    continue  # another Submit with this key won the race; look again

    async def get(self, job_id: str) -> JobRecord:
        blob = await self._redis.get(self._key("job", job_id))
        if blob is None:
            raise JobNotFound(_NOT_FOUND)
        return self._open(job_id, _raw(blob))

    async def update(self, job_id: str, change: Callable[[JobRecord], JobRecord]) -> JobRecord:
        """Apply ``change`` atomically unless the job is final; a final job drops its payload."""
        key = self._key("job", job_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    blob = await pipe.get(key)
                    if blob is None:
                        raise JobNotFound(_NOT_FOUND)
                    current, slot = self._open_envelope(job_id, _raw(blob))
                    if current.final:
                        return current
                    changed = change(current)
                    pipe.multi()
                    pipe.set(key, self._seal(changed, slot), keepttl=True)
                    if changed.final:
                        pipe.delete(self._key("payload", job_id))
                    pipe.publish(self._key("events", job_id), b"1")
                    await pipe.execute()
                    observe_transition(current, changed)
                    return changed
                except WatchError:
                    continue  # changed under us: apply the change to the new record

    async def watch(self, job_id: str) -> AsyncIterator[JobRecord]:
        """The job now, then after each change, ending with its final state.

        Every watcher of the process shares one subscription (:class:`_Notifier`), so a
        thousand open ``WatchJob`` calls cost one connection, not a thousand. The watcher
        registers before the first read, so no change between the two is missed; a re-read
        every ``poll_seconds`` covers notifications lost to a reconnect.
        """
        changed = self._notifier.register(job_id)
        try:
            await self._notifier.wait_subscribed(self._poll)
            seen = await self.get(job_id)
            yield seen
            while not seen.final:
                with contextlib.suppress(TimeoutError):  # asyncio.timeout: see wait_subscribed
                    async with asyncio.timeout(self._poll):
                        await changed.wait()
                changed.clear()  # a change after this sets it again: the next wait sees it
                current = await self.get(job_id)
                if current != seen:
                    seen = current
                    yield seen
        finally:
            self._notifier.unregister(job_id, changed)

    async def discard(self, job_id: str) -> None:
        """Forget a job that never started (its queue was full), and its idempotency key."""
        blob = await self._redis.get(self._key("job", job_id))
        if blob is not None:
            _, slot = self._open_envelope(job_id, _raw(blob))
            if slot is not None:
                await self._drop_idempotency(keys=[self._key("idem", slot)], args=[f"{job_id}:"])
        await self._redis.delete(
            self._key("job", job_id), self._key("payload", job_id), self._key("runs", job_id)
        )

    # -- the worker's side -----------------------------------------------------------------

    async def put_payload(self, job_id: str, stay: Stay, options: JobOptions) -> None:
        """Store the validated stay for the worker, to expire with the job's record."""
        remaining = await self._redis.pttl(self._key("job", job_id))
        if remaining <= 0:  # -2: no record; -1 cannot happen, every record has a TTL
            raise JobNotFound(_NOT_FOUND)
        head = orjson.dumps({"format": _PAYLOAD_FORMAT, "options": asdict(options)})
        plain = len(head).to_bytes(4, "big") + head + encode_stay(stay)
        sealed = self._sealer.seal(plain, context=self._context("payload", job_id), compress=True)
        await self._redis.set(self._key("payload", job_id), sealed, px=remaining)

    async def take_payload(self, job_id: str) -> tuple[Stay, JobOptions]:
        """The stay and options of a job. Read, not removed: a redelivered task needs them
        again; the payload is deleted when the job becomes final."""
        sealed = await self._redis.get(self._key("payload", job_id))
        if sealed is None:
            raise JobNotFound("the job's payload is gone (it may have expired)")
        plain = self._sealer.open(_raw(sealed), context=self._context("payload", job_id))
        size = int.from_bytes(plain[:4], "big")
        head = orjson.loads(plain[4 : 4 + size])
        if not isinstance(head, dict) or head.get("format") != _PAYLOAD_FORMAT:
            raise StayDecodeError("the job was stored by another version of the server")
        return decode_stay(plain[4 + size :]), JobOptions(**head["options"])

    async def count_run(self, job_id: str) -> int:
        """Count one more delivery of the job to a worker, so a job that kills workers ends."""
        key = self._key("runs", job_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(key, 0, px=self._ttl_ms, nx=True)  # the first delivery starts the clock
            pipe.incr(key)
            _, runs = await pipe.execute()
        return int(runs)

    async def queue_depth(self, queue_name: str) -> int:
        """Messages waiting in a Celery queue (the Redis transport keeps each in a list)."""
        return int(await self._redis.llen(queue_name))

    async def queue_oldest_age(self, queue_name: str) -> float:
        """Seconds the oldest waiting message has waited (0 for an empty queue): the Redis
        transport pushes on the left and pops on the right, and :func:`queue.submit` stamps
        each message's headers with the time it was sent."""
        oldest = await self._redis.lindex(queue_name, -1)
        if oldest is None:
            return 0.0
        try:
            sent = float(orjson.loads(oldest)["headers"][ENQUEUED_AT_HEADER])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return 0.0  # a message from another sender: its age is unknown
        return max(time.time() - sent, 0.0)

    # -- workers (serving.workers) ---------------------------------------------------------

    async def report_worker(self, status: WorkerStatus) -> None:
        """Record a worker's heartbeat; the hash outlives its freshest report only briefly."""
        key = self._key("workers", "all")
        ttl_ms = max(1, round(status.interval * STALE_INTERVALS * 1000))
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, status.worker_id, orjson.dumps(asdict(status)))
            pipe.pexpire(key, ttl_ms)  # each beat extends it: gone soon after the last worker
            await pipe.execute()

    async def forget_worker(self, worker_id: str) -> None:
        """A worker that stops withdraws its report, so health sees it gone at once."""
        await self._redis.hdel(self._key("workers", "all"), worker_id)

    async def live_workers(self) -> list[WorkerStatus]:
        """The fresh reports; stale ones (workers that died) are removed."""
        key = self._key("workers", "all")
        fresh: list[WorkerStatus] = []
        stale: list[bytes | str] = []
        for field, value in (await self._redis.hgetall(key)).items():
            try:
                report: WorkerStatus | None = WorkerStatus(**orjson.loads(value))
            except (orjson.JSONDecodeError, TypeError):
                report = None  # written by another version: let it go
            if report is not None and report.fresh():
                fresh.append(report)
            else:
                stale.append(field)
        if stale:
            await self._redis.hdel(key, *stale)
        return fresh

    # -- encoding --------------------------------------------------------------------------

    def _key(self, kind: str, name: str) -> str:
        return f"{self._prefix}:{kind}:{name}"

    @staticmethod
    def _context(kind: str, job_id: str) -> bytes:
        return f"epicrisis/{kind}/{job_id}".encode()

    def _seal(self, record: JobRecord, idempotency_slot: str | None) -> bytes:
        envelope = {"format": _FORMAT, "record": _record_to_json(record), "idem": idempotency_slot}
        context = self._context("job", record.id)
        return self._sealer.seal(orjson.dumps(envelope), context=context, compress=True)

    def _open_envelope(self, job_id: str, blob: bytes) -> tuple[JobRecord, str | None]:
        envelope = orjson.loads(self._sealer.open(blob, context=self._context("job", job_id)))
        return _record_from_json(envelope["record"]), envelope["idem"]

    def _open(self, job_id: str, blob: bytes) -> JobRecord:
        return self._open_envelope(job_id, blob)[0]


def _raw(value: bytes | str) -> bytes:
    """Values as Redis stored them: the store's client must not decode responses."""
    if isinstance(value, str):
        raise TypeError("RedisJobStore needs a client with decode_responses=False")
    return value


def _record_to_json(record: JobRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "state": record.state.value,
        "created_at": record.created_at,
        "started_at": record.started_at,
        "finished_at": record.finished_at,
        "stage": record.stage,
        "fraction": record.fraction,
        "summary": None if record.summary is None else record.summary.model_dump(mode="json"),
        "fhir_document": record.fhir_document,
        "error": None if record.error is None else asdict(record.error),
        "owner": record.owner,
    }


def _record_from_json(data: dict[str, Any]) -> JobRecord:
    summary = data["summary"]
    error = data["error"]
    return JobRecord(
        id=data["id"],
        state=JobState(data["state"]),
        created_at=data["created_at"],
        started_at=data["started_at"],
        finished_at=data["finished_at"],
        stage=data["stage"],
        fraction=data["fraction"],
        summary=None if summary is None else DischargeSummary.model_validate(summary),
        fhir_document=data["fhir_document"],
        error=None if error is None else JobFailure(**error),
        owner=data.get("owner", ANONYMOUS),
    )


class _Notifier:
    """One pattern subscription to ``{prefix}:events:*`` for all watchers of a process.

    A reader task wakes the watchers of each job a message names; when its connection
    drops it subscribes again after a pause (the watchers poll meanwhile). Started by the
    first watcher, so a store that never watches holds no subscription.
    """

    def __init__(self, client: aioredis.Redis, pattern: str) -> None:
        self._client = client
        self._pattern = pattern
        self._prefix = pattern.removesuffix("*")
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()

    def register(self, job_id: str) -> asyncio.Event:
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read())
        event = asyncio.Event()
        self._waiters.setdefault(job_id, set()).add(event)
        return event

    def unregister(self, job_id: str, event: asyncio.Event) -> None:
        events = self._waiters.get(job_id)
        if events is not None:
            events.discard(event)
            if not events:
                del self._waiters[job_id]

    async def wait_subscribed(self, limit: float) -> None:
        """Until the subscription is live (or ``limit`` passes: the watcher then polls)."""
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can lose a cancellation that
        # arrives as the awaited event is set (CPython gh-86296), and the watch never ends.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit):
                await self._subscribed.wait()

    async def _read(self) -> None:
        while True:
            pubsub = self._client.pubsub()
            try:
                await pubsub.psubscribe(self._pattern)
                self._subscribed.set()
                self._wake_all()  # changes during a reconnect were missed: re-read
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=60)
                    if message is not None:
                        self._wake(_raw(message["channel"]).decode())
            except (RedisError, OSError) as exc:
                log.warning("job notifications interrupted (%s); resubscribing", type(exc).__name__)
            finally:
                self._subscribed.clear()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(RESUBSCRIBE_SECONDS)

    def _wake(self, channel: str) -> None:
        for event in self._waiters.get(channel.removeprefix(self._prefix), ()):
            event.set()

    def _wake_all(self) -> None:
        for events in self._waiters.values():
            for event in events:
                event.set()

    async def aclose(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None
