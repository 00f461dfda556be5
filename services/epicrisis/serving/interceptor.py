"""Every gRPC call in one place: its caller, request id, trace span, metrics by method and code.

The caller is authenticated here (:mod:`auth`): a missing or unknown API key is
UNAUTHENTICATED, a method outside the key's rights PERMISSION_DENIED, before the service
sees the call; health checking and reflection need no key. The request id is the caller's
``x-request-id`` metadata when it is a short token, else a new one; it and the call's span
follow the call into every log record (observability.logs). Status codes come from the
outcome: a normal return is OK (unless the handler set a code), an abort carries its code,
a cancelled call is CANCELLED.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace

from epicrisis.observability import metrics
from epicrisis.observability.logs import REQUEST_ID
from epicrisis.observability.tracing import parent, tracer
from epicrisis.serving.audit import Auditor
from epicrisis.serving.auth import (
    ANONYMOUS_CALLER,
    CALLER,
    OPEN_SERVICES,
    ApiKeys,
    presented_key,
)

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")  # anything else is replaced, never logged


class ObservedCalls(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, keys: ApiKeys | None, auditor: Auditor) -> None:
        self._keys = keys  # None: anonymous callers allowed (EPICRISIS_ALLOW_ANONYMOUS)
        self._auditor = auditor  # refused callers are audited here: the service never sees them

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return None
        name = details.method
        method = name.rsplit("/", 1)[-1]
        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def observed_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                with _observed(name, method, context):
                    await self._authenticate(name, context)
                    return await unary(request, context)

            return grpc.unary_unary_rpc_method_handler(
                observed_unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
            stream = handler.unary_stream

            async def observed_stream(
                request: Any, context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                with _observed(name, method, context, current=False):
                    await self._authenticate(name, context)
                    async for item in stream(request, context):
                        yield item

            return grpc.unary_stream_rpc_method_handler(
                observed_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:  # a coroutine that writes (health's Watch)
            writer = handler.unary_stream

            async def observed_writer(request: Any, context: grpc.aio.ServicerContext) -> None:
                with _observed(name, method, context):
                    await writer(request, context)

            return grpc.unary_stream_rpc_method_handler(
                observed_writer,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # streaming requests (reflection): not observed

    async def _authenticate(self, name: str, context: grpc.aio.ServicerContext) -> None:
        """Set the call's caller, or end the call: UNAUTHENTICATED, PERMISSION_DENIED.
        Every service needs a key but health checking and reflection (fail closed)."""
        if name.startswith(OPEN_SERVICES):
            return  # probes and tools carry no key
        method = name.rsplit("/", 1)[-1]
        if self._keys is None:
            CALLER.set(ANONYMOUS_CALLER)
            return
        key = presented_key(_metadata(context))
        caller = None if key is None else self._keys.authenticate(key)
        if caller is None:
            self._auditor.event(
                "authenticate", caller="unknown", method=method, outcome="UNAUTHENTICATED"
            )
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "a valid API key is required (authorization: Bearer <key>)",
            )
        assert caller is not None  # abort raises
        if not caller.may(method):
            self._auditor.event(
                "authenticate", caller=caller.id, method=method, outcome="PERMISSION_DENIED"
            )
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"caller {caller.id} may not call {method} (rights: {','.join(sorted(caller.rights))})",
            )
        CALLER.set(caller)


@contextlib.contextmanager
def _observed(
    name: str, method: str, context: grpc.aio.ServicerContext, *, current: bool = True
) -> Iterator[None]:
    """Time the call, count it by its status code, and run it in its span and request id."""
    metadata = _metadata(context)
    given = metadata.get("x-request-id", "")
    REQUEST_ID.set(given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex)
    started = time.perf_counter()
    code = "OK"
    span = tracer.start_span(
        name.lstrip("/"),
        context=parent(metadata),
        kind=trace.SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.method": method},
    )
    # A stream's generator may be resumed or closed from another context than the one it
    # started in, where a context token cannot be detached: its span is not made current.
    token = otel_context.attach(trace.set_span_in_context(span)) if current else None
    try:
        yield
        code = _code_name(context.code()) or "OK"
    except (asyncio.CancelledError, GeneratorExit):  # the caller went away
        code = "CANCELLED"
        raise
    except grpc.aio.AbortError:
        code = _code_name(context.code()) or "UNKNOWN"
        raise
    except BaseException:
        code = "UNKNOWN"
        raise
    finally:
        if token is not None:
            otel_context.detach(token)
        span.set_attribute("rpc.grpc.status_code", code)
        if code != "OK":
            span.set_status(trace.Status(trace.StatusCode.ERROR, code))
        span.end()
        metrics.RPC_REQUESTS.labels(method, code).inc()
        metrics.RPC_DURATION.labels(method).observe(time.perf_counter() - started)


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    """The call's text metadata (binary ``-bin`` values are left out)."""
    return {
        key: value for key, value in context.invocation_metadata() or () if isinstance(value, str)
    }


def _code_name(code: object) -> str | None:
    """A status code's name, from what ``context.code()`` gives (an enum, an int, or None)."""
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    if isinstance(code, int):
        for status in grpc.StatusCode:
            if status.value[0] == code:
                return str(status.name)
    return None
