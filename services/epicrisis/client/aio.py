"""The asyncio client (grpc.aio), for services that already run an event loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any

import grpc

from epicrisis.client._core import (
    DEFAULT_SUMMARIZE_TIMEOUT,
    DEFAULT_TIMEOUT,
    BackendName,
    Methods,
    PriorityName,
    RetryHook,
    RetryPolicy,
    channel_options,
    submit_request,
)
from epicrisis.client.errors import Overloaded, error_from_rpc
from epicrisis.client.model import JobResult, job_from_message
from epicrisis.v1 import summarizer_pb2 as pb


class AsyncClient:
    """The :class:`~epicrisis.client.Client` API with coroutines; ``watch`` is an async iterator.

    Create it inside the event loop that uses it (grpc.aio binds a channel to its loop).
    """

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        api_key: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        on_retry: RetryHook | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        opts = channel_options(options)
        self._channel = (
            grpc.aio.insecure_channel(target, options=opts)
            if credentials is None
            else grpc.aio.secure_channel(target, credentials, options=opts)
        )
        self._methods = Methods.bind(self._channel, api_key=api_key)
        self._timeout = timeout
        self._retry = retry or RetryPolicy()
        self._on_retry = on_retry

    async def wait_ready(self, timeout: float) -> None:
        """Return once the channel is connected; :class:`Overloaded` after ``timeout`` seconds."""
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout)
        except TimeoutError:
            raise Overloaded(
                f"the server could not be reached within {timeout:g} s", status="UNAVAILABLE"
            ) from None

    async def submit(
        self,
        bundle: bytes,
        *,
        encounter_id: str | None = None,
        idempotency_key: str | None = None,
        backend: BackendName | None = None,
        priority: PriorityName | None = None,
        strict: bool = False,
        allow_emergency: bool = False,
        max_output_tokens: int | None = None,
    ) -> JobResult:
        """Queue a summary; returns the job (QUEUED, or the earlier job of a known key).

        With an ``idempotency_key`` a busy or unreachable server is retried (bounded backoff):
        the key guarantees that a repeat never starts a second generation.
        """
        request = submit_request(
            bundle,
            encounter_id=encounter_id,
            idempotency_key=idempotency_key,
            backend=backend,
            priority=priority,
            strict=strict,
            allow_emergency=allow_emergency,
            max_output_tokens=max_output_tokens,
        )
        attempts = self._retry.max_attempts if idempotency_key is not None else 1
        for attempt in range(1, attempts + 1):
            try:
                return job_from_message(await self._methods.submit(request, timeout=self._timeout))
            except grpc.RpcError as exc:
                error = error_from_rpc(exc)
                if not isinstance(error, Overloaded) or attempt == attempts:
                    raise error from None
            delay = self._retry.backoff(attempt)
            if self._on_retry is not None:
                self._on_retry(error, delay)
            await asyncio.sleep(delay)
        raise AssertionError("the last attempt returns or raises")

    async def get(self, job_id: str) -> JobResult:
        """The job as it is now; :class:`JobNotFound` when there is none (or it expired)."""
        try:
            return job_from_message(
                await self._methods.get(pb.GetJobRequest(id=job_id), timeout=self._timeout)
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, job_id=job_id) from None

    async def watch(self, job_id: str, *, timeout: float | None = None) -> AsyncIterator[JobResult]:
        """The job now and after each change, ending with its final state."""
        call = self._methods.watch(pb.WatchJobRequest(id=job_id), timeout=timeout)
        try:
            async for message in call:
                yield job_from_message(message)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, job_id=job_id) from None
        finally:
            call.cancel()  # the caller stopped early: end the stream on the server too

    async def summarize(
        self,
        bundle: bytes,
        *,
        encounter_id: str | None = None,
        idempotency_key: str | None = None,
        backend: BackendName | None = None,
        priority: PriorityName | None = None,
        strict: bool = False,
        allow_emergency: bool = False,
        max_output_tokens: int | None = None,
        timeout: float | None = DEFAULT_SUMMARIZE_TIMEOUT,
    ) -> JobResult:
        """Submit and wait for the final state; past ``timeout`` the server cancels the job."""
        request = submit_request(
            bundle,
            encounter_id=encounter_id,
            idempotency_key=idempotency_key,
            backend=backend,
            priority=priority,
            strict=strict,
            allow_emergency=allow_emergency,
            max_output_tokens=max_output_tokens,
        )
        try:
            return job_from_message(await self._methods.summarize(request, timeout=timeout))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    async def cancel(self, job_id: str) -> JobResult:
        """Cancel a job that has not finished; returns it (CANCELLED, or its final state)."""
        try:
            return job_from_message(
                await self._methods.cancel(pb.CancelJobRequest(id=job_id), timeout=self._timeout)
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, job_id=job_id) from None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()
