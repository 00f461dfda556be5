"""One LLM endpoint: TGI, or any OpenAI-compatible server (vLLM, SGLang), and its errors.

Chat with TGI goes through huggingface_hub's ``AsyncInferenceClient(base_url=...)``, which
turns the OpenAI ``json_schema`` response format into TGI's grammar. A server without TGI's
``/info`` is OpenAI-compatible: it gets the same request with the response format in
OpenAI's own shape, posted directly, because the client's TGI rewrite
(``{"type": "json_object", "value": schema}``) reads as unconstrained JSON mode on vLLM and
SGLang. Either way one set of settings reaches both kinds of server.

Every failure becomes a :class:`~epicrisis.errors.BackendError` that says whether to retry.
Server messages are never copied into it: validation errors echo request content, which is
the patient's record.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import httpx2
from huggingface_hub import (
    AsyncInferenceClient,
    ChatCompletionInputJSONSchema,
    ChatCompletionInputMessage,
    ChatCompletionInputResponseFormatJSONSchema,
    ChatCompletionOutput,
)
from huggingface_hub.errors import (
    GenerationError,
    HfHubHTTPError,
    IncompleteGenerationError,
    InferenceTimeoutError,
    OfflineModeIsEnabled,
    OverloadedError,
    TextGenerationError,
)
from huggingface_hub.errors import ValidationError as HfValidationError

from epicrisis.errors import (
    BackendError,
    BackendGenerationError,
    BackendOverloadedError,
    BackendRejectedError,
    BackendUnavailableError,
    ConfigurationError,
)
from epicrisis.prompt.messages import ChatMessage

EOT = "<|eot_id|>"
"""Llama 3's end of turn: Med42-v2's shipped config stops only on ``<|end_of_text|>``."""
SCHEMA_NAME = "epicrisis_answer"
CLIENT_CONNECTIONS = 100
"""Connections one ``AsyncInferenceClient`` opens at most (httpx2's default pool size)."""

Dialect = Literal["tgi", "openai"]


@dataclass(frozen=True, slots=True)
class EndpointDefaults:
    """What to assume about a server that does not say (no TGI ``/info``)."""

    context_tokens: int = 8192  # Med42-v2 (Llama 3)
    max_concurrent_requests: int = 128  # TGI's default --max-concurrent-requests


@dataclass(frozen=True, slots=True)
class EndpointInfo:
    """The limits the prompt budget and the in-flight limit are sized from."""

    model_id: str
    max_input_tokens: int
    max_total_tokens: int
    max_concurrent_requests: int
    version: str | None
    dialect: Dialect


@dataclass(frozen=True, slots=True)
class ChatResult:
    """One chat completion: the text and what it cost."""

    text: str
    prompt_tokens: int | None
    completion_tokens: int | None
    model: str | None
    finish_reason: str | None  # "stop", or "length" when max_tokens cut the answer


class EndpointClient:
    """A thin async client for one endpoint; ``index`` names it in errors (URLs may hold secrets).

    Not bound to an event loop until first used; close it with :meth:`aclose`.
    """

    def __init__(
        self,
        url: str,
        *,
        index: int = 0,
        timeout: float = 180.0,
        connect_timeout: float = 5.0,
        api_key: str | None = None,
        defaults: EndpointDefaults | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.root = self.url.removesuffix("/v1")  # /info and /health live at the root
        self.index = index
        self.defaults = defaults or EndpointDefaults()
        self._api_key = api_key
        self._timeout = httpx2.Timeout(timeout, connect=min(connect_timeout, timeout))
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # No connection cap here: the pool's per-endpoint semaphore is the limit.
        self._http = httpx2.AsyncClient(
            timeout=self._timeout,
            headers=headers,
            limits=httpx2.Limits(max_connections=None, max_keepalive_connections=32),
        )
        # AsyncInferenceClient keeps one httpx2 pool of CLIENT_CONNECTIONS: a TGI that takes
        # more generations at once (128 by default) gets one client per hundred.
        self._clients: list[AsyncInferenceClient] = []
        self._client_load: list[int] = []
        self.info_cache: EndpointInfo | None = None

    @property
    def inference_clients(self) -> int:
        """How many ``AsyncInferenceClient`` (one per hundred open generations) exist."""
        return len(self._clients)

    async def aclose(self) -> None:
        for client in self._clients:
            await client.close()  # type: ignore[no-untyped-call]  # unannotated upstream
        self._clients.clear()
        await self._http.aclose()

    # -- routes --------------------------------------------------------------------------

    async def info(self) -> EndpointInfo:
        """TGI's ``/info``; else ``/v1/models`` and :class:`EndpointDefaults`."""
        try:
            response = await self._http.get(self.root + "/info")
            data = _json_object(response) if response.status_code == 200 else None
            if response.status_code not in (200, 404, 405):
                raise parse_error(response.status_code, response.content, endpoint=self.index)
            info = _tgi_info(data) if data is not None else None
            if info is None:
                info = await self._openai_info()
        except httpx2.HTTPError as exc:
            raise _mapped(exc, self.index) from exc
        self.info_cache = info
        return info

    async def _openai_info(self) -> EndpointInfo:
        response = await self._http.get(self.root + "/v1/models")
        if response.status_code != 200:
            raise parse_error(response.status_code, response.content, endpoint=self.index)
        data = _json_object(response) or {}
        models = data.get("data")
        first = models[0] if isinstance(models, list) and models else {}
        first = first if isinstance(first, Mapping) else {}
        model_id = first.get("id")
        if not isinstance(model_id, str) or not model_id:
            raise BackendRejectedError(
                "the server lists no model at /v1/models", endpoint=self.index, status=200
            )
        total = _positive(first.get("max_model_len")) or self.defaults.context_tokens
        return EndpointInfo(
            model_id=model_id,
            max_input_tokens=total - 1,
            max_total_tokens=total,
            max_concurrent_requests=self.defaults.max_concurrent_requests,
            version=None,
            dialect="openai",
        )

    async def health(self) -> bool:
        """Whether the server answers ``/health`` (or, lacking that route, ``/v1/models``)."""
        try:
            response = await self._http.get(self.root + "/health")
            if response.status_code == 404:
                response = await self._http.get(self.root + "/v1/models")
        except httpx2.HTTPError:
            return False
        return response.status_code == 200

    async def chat(
        self,
        messages: Sequence[ChatMessage],
        *,
        schema: Mapping[str, Any],
        max_tokens: int,
        temperature: float,
        top_p: float,
        stop: Sequence[str] = (EOT,),
        seed: int | None = None,
    ) -> ChatResult:
        """One chat completion constrained to ``schema`` (raises :class:`BackendError`).

        ``top_p`` must be strictly between 0 and 1 (TGI answers 1.0 with a 422).
        """
        if not 0.0 < top_p < 1.0:
            raise ConfigurationError(f"top_p must be > 0 and < 1 (got {top_p})")
        if temperature <= 0.0:
            raise ConfigurationError(f"temperature must be > 0 (got {temperature})")
        info = self.info_cache or await self.info()
        if info.dialect == "openai":
            body = await self._openai_chat(
                messages, info, schema, max_tokens, temperature, top_p, stop, seed
            )
            return _result(body, self.index)
        return await self._tgi_chat(
            messages, info, schema, max_tokens, temperature, top_p, stop, seed
        )

    async def _tgi_chat(
        self,
        messages: Sequence[ChatMessage],
        info: EndpointInfo,
        schema: Mapping[str, Any],
        max_tokens: int,
        temperature: float,
        top_p: float,
        stop: Sequence[str],
        seed: int | None,
    ) -> ChatResult:
        slot = self._client_slot()
        payload: list[dict[Any, Any] | ChatCompletionInputMessage] = [dict(m) for m in messages]
        response_format = ChatCompletionInputResponseFormatJSONSchema(
            type="json_schema",
            json_schema=ChatCompletionInputJSONSchema(name=SCHEMA_NAME, schema=dict(schema)),
        )
        try:
            output = await self._clients[slot].chat_completion(
                messages=payload,
                model=info.model_id,
                response_format=response_format,
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                stop=list(stop),
                seed=seed,
            )
        except OfflineModeIsEnabled:
            raise ConfigurationError(
                "HF_HUB_OFFLINE is set: huggingface_hub refuses every request, even to a "
                "local LLM endpoint; unset it for the LLM backend"
            ) from None
        except (httpx2.HTTPError, TextGenerationError) as exc:
            raise _mapped(exc, self.index) from exc
        finally:
            self._client_load[slot] -= 1
        return _result(output, self.index)

    async def _openai_chat(
        self,
        messages: Sequence[ChatMessage],
        info: EndpointInfo,
        schema: Mapping[str, Any],
        max_tokens: int,
        temperature: float,
        top_p: float,
        stop: Sequence[str],
        seed: int | None,
    ) -> bytes:
        body: dict[str, Any] = {
            "model": info.model_id,
            "messages": [dict(m) for m in messages],
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "stop": list(stop),
            "stream": False,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": SCHEMA_NAME, "schema": dict(schema)},
            },
        }
        if seed is not None:
            body["seed"] = seed
        try:
            response = await self._http.post(self.root + "/v1/chat/completions", json=body)
        except httpx2.HTTPError as exc:
            raise _mapped(exc, self.index) from exc
        if response.status_code != 200:
            raise parse_error(response.status_code, response.content, endpoint=self.index)
        return response.content

    def _client_slot(self) -> int:
        """An ``AsyncInferenceClient`` with a free connection, made when all are busy."""
        for slot, load in enumerate(self._client_load):
            if load < CLIENT_CONNECTIONS:
                self._client_load[slot] += 1
                return slot
        # The httpx2.Timeout goes straight through to httpx2 (the hint says float): it keeps
        # a short connect timeout, so a host that drops packets is ejected in seconds.
        timeout = cast(float, self._timeout)
        # Without a key of ours, huggingface_hub would send the local Hugging Face token
        # (HF_TOKEN) to this server; a None header is dropped from the request instead.
        headers = None if self._api_key else cast(dict[str, str], {"authorization": None})
        self._clients.append(
            AsyncInferenceClient(
                base_url=self.url, timeout=timeout, api_key=self._api_key, headers=headers
            )
        )
        self._client_load.append(1)
        return len(self._clients) - 1


def _json_object(response: httpx2.Response) -> dict[str, Any] | None:
    try:
        data = response.json()
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _positive(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _tgi_info(data: Mapping[str, Any]) -> EndpointInfo | None:
    """TGI's ``/info`` (``max_input_length`` before TGI 2); None when it is not TGI's."""
    model_id = data.get("model_id")
    total = _positive(data.get("max_total_tokens"))
    if not isinstance(model_id, str) or total is None:
        return None
    max_input = _positive(data.get("max_input_tokens")) or _positive(data.get("max_input_length"))
    version = data.get("version")
    return EndpointInfo(
        model_id=model_id,
        max_input_tokens=min(max_input or total - 1, total - 1),
        max_total_tokens=total,
        max_concurrent_requests=_positive(data.get("max_concurrent_requests")) or 128,
        version=version if isinstance(version, str) else None,
        dialect="tgi",
    )


def _result(output: ChatCompletionOutput | bytes, endpoint: int) -> ChatResult:
    """The answer of a chat completion body; anything else is a failed generation."""
    try:
        if isinstance(output, bytes):
            output = ChatCompletionOutput.parse_obj_as_instance(output)
        choice = output.choices[0]
        usage = output.usage
        text = choice.message.content
        return ChatResult(
            text=text if isinstance(text, str) else "",
            prompt_tokens=_positive(usage.prompt_tokens) if usage else None,
            completion_tokens=_positive(usage.completion_tokens) if usage else None,
            model=output.model if isinstance(output.model, str) else None,
            finish_reason=choice.finish_reason if isinstance(choice.finish_reason, str) else None,
        )
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise BackendGenerationError(
            "the server's answer is not a chat completion", endpoint=endpoint, status=200
        ) from None


# -- errors --------------------------------------------------------------------------------

# Request fields a server may name in an error; only these names are ever repeated.
_PARAMETERS = (
    "best_of",
    "frequency_penalty",
    "grammar",
    "inputs",
    "max_new_tokens",
    "max_tokens",
    "messages",
    "model",
    "presence_penalty",
    "repetition_penalty",
    "response_format",
    "seed",
    "stop",
    "temperature",
    "top_k",
    "top_n_tokens",
    "top_p",
    "truncate",
    "typical_p",
)
_QUOTED_NAME = re.compile(r"[`'\"]([a-z_]{2,24})[`'\"]")
_STATUS_BY_TYPE = {
    "overloaded": 429,
    "validation": 422,
    "generation": 424,
    "incomplete_generation": 500,
    "healthcheck": 503,
}


def parse_error(
    status: int | None,
    payload: bytes | str | Mapping[str, Any] | None,
    *,
    endpoint: int | None = None,
) -> BackendError:
    """The :class:`BackendError` for an error answer: its status and body, in any shape.

    Bodies: TGI's ``{"error", "error_type"}``, OpenAI's ``{"error": {"message", "type",
    "code"}}``, vLLM's older ``{"object": "error", "message", "type", "code"}``, and the
    plain text of a 4xx for a body the router could not read. ``status`` may be None (an
    error event inside a stream): the body's type or code decides then.
    """
    data = _error_body(payload)
    error_type, message, code = _error_fields(data)
    if status is None:
        status = code or _STATUS_BY_TYPE.get((error_type or "").lower())
    context: dict[str, Any] = {
        "endpoint": endpoint,
        "status": status,
        "error_type": error_type,
        "parameters": _parameters(message),
    }
    kind = (error_type or "").lower()
    if status == 429 or kind == "overloaded":
        return BackendOverloadedError("the server is overloaded", **context)
    if status in (408, 502, 503, 504) or kind in ("healthcheck", "unhealthy"):
        return BackendUnavailableError("the server is unavailable", **context)
    if status == 424 or kind in ("generation", "incomplete_generation"):
        return BackendGenerationError("generation failed on the server", **context)
    if status is not None and status >= 500:
        return BackendGenerationError("the server failed", **context)
    if status in (401, 403):
        return BackendRejectedError(
            "the server refused the credentials (EPICRISIS_LLM_API_KEY)", **context
        )
    if status == 404:
        return BackendRejectedError("the server has no such route or model", **context)
    if (status is not None and 400 <= status < 500) or kind == "validation":
        return BackendRejectedError("the server rejected the request", **context)
    return BackendGenerationError("the server reported an error", **context)


def _error_body(payload: bytes | str | Mapping[str, Any] | None) -> Mapping[str, Any] | str:
    if payload is None:
        return ""
    if isinstance(payload, Mapping):
        return payload
    text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else payload
    text = text.strip()
    if text.startswith("data:"):  # one event of a stream
        text = text[len("data:") :].strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except ValueError:
            return text
        if isinstance(data, dict):
            return data
    return text


def _error_fields(data: Mapping[str, Any] | str) -> tuple[str | None, str, int | None]:
    """(type, message, status code in the body) of an error body."""
    if isinstance(data, str):
        return None, data, None
    error = data.get("error")
    if isinstance(error, Mapping):  # OpenAI: {"error": {"message", "type", "code"}}
        kind = error.get("type")
        return (
            kind if isinstance(kind, str) else None,
            str(error.get("message", "")),
            _status_code(error.get("http_status_code")) or _status_code(error.get("code")),
        )
    kind = data.get("error_type", data.get("type"))
    message = error if isinstance(error, str) else data.get("message", data.get("detail", ""))
    return (
        kind if isinstance(kind, str) else None,
        message if isinstance(message, str) else json.dumps(message, default=str),
        _status_code(data.get("code")),
    )


def _status_code(value: Any) -> int | None:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 400 <= value <= 599:
        return value
    return None


def _parameters(message: str) -> tuple[str, ...]:
    """Request fields the message names in quotes or backticks, from :data:`_PARAMETERS`."""
    found = [name for name in _QUOTED_NAME.findall(message) if name in _PARAMETERS]
    return tuple(dict.fromkeys(found))


def _mapped(exc: BaseException, endpoint: int) -> BackendError:
    error = backend_error(exc, endpoint=endpoint)
    if error is None:  # pragma: no cover - callers pass only httpx2 / huggingface_hub errors
        return BackendUnavailableError("the request failed", endpoint=endpoint)
    return error


def backend_error(exc: BaseException, *, endpoint: int | None = None) -> BackendError | None:
    """The :class:`BackendError` for an exception of huggingface_hub or httpx2, else None.

    ``text_generation`` raises TGI's own classes; ``chat_completion`` raises a plain
    ``HfHubHTTPError`` whose status and body say what happened; timeouts raise
    ``InferenceTimeoutError``; a refused connection (a loading TGI) is an httpx2 error.
    """
    hint = _parameters(str(exc))
    if isinstance(exc, OverloadedError):
        return BackendOverloadedError(
            "the server is overloaded", endpoint=endpoint, status=429, error_type="overloaded"
        )
    if isinstance(exc, HfValidationError):
        return BackendRejectedError(
            "the server rejected the request",
            endpoint=endpoint,
            status=422,
            error_type="validation",
            parameters=hint,
        )
    if isinstance(exc, IncompleteGenerationError):
        return BackendGenerationError(
            "generation stopped before the end",
            endpoint=endpoint,
            status=500,
            error_type="incomplete_generation",
        )
    if isinstance(exc, GenerationError):
        return BackendGenerationError(
            "generation failed on the server",
            endpoint=endpoint,
            status=424,
            error_type="generation",
        )
    if isinstance(exc, TextGenerationError):
        return BackendGenerationError("the server reported an error", endpoint=endpoint)
    if isinstance(exc, InferenceTimeoutError | httpx2.TimeoutException):
        return BackendUnavailableError("the request timed out", endpoint=endpoint)
    if isinstance(exc, HfHubHTTPError | httpx2.HTTPStatusError):
        try:
            body: bytes | None = exc.response.content
        except httpx2.ResponseNotRead:
            body = None
        return parse_error(exc.response.status_code, body, endpoint=endpoint)
    if isinstance(exc, httpx2.ConnectError):
        return BackendUnavailableError("the connection was refused", endpoint=endpoint)
    if isinstance(exc, httpx2.HTTPError):
        return BackendUnavailableError("the connection failed", endpoint=endpoint)
    return None
