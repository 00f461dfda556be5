"""TGI's wire protocol for the simulator: request bodies, validation rules and error shapes.

Bodies are read the way TGI's axum router reads them: a body that is not JSON, or not the
expected shape, is refused in plain text (415, 400, 422) before TGI sees it; a well-formed
request that breaks a rule gets TGI's JSON error ``{"error", "error_type"}`` with TGI's
wording (``Input validation error: `top_p` must be > 0.0 and < 1.0``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from epicrisis.llm.simulator.tokens import SimToken, SimTokenizer

U32 = Annotated[int, Field(ge=0, le=2**32 - 1)]
U64 = Annotated[int, Field(ge=0, le=2**64 - 1)]
M = TypeVar("M", bound=BaseModel)


class TGIError(Exception):
    """An error TGI reports as ``{"error": ..., "error_type": ...}`` with an HTTP status."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message

    def body(self) -> dict[str, str]:
        return {"error": self.message, "error_type": self.error_type}

    @property
    def failure_label(self) -> str:
        """The ``err`` label of ``tgi_request_failure``."""
        return "incomplete" if self.error_type == "incomplete_generation" else self.error_type


class BodyRejected(Exception):
    """A body refused before TGI sees it: plain text, as axum's ``Json`` extractor answers."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


def validation_error(detail: str) -> TGIError:
    return TGIError(422, "validation", f"Input validation error: {detail}")


def generation_error(detail: str) -> TGIError:
    return TGIError(424, "generation", f"Request failed during generation: {detail}")


def overloaded() -> TGIError:
    return TGIError(429, "overloaded", "Model is overloaded")


def incomplete(stream: bool) -> TGIError:
    text = "Incomplete generation stream" if stream else "Incomplete generation"
    return TGIError(500, "incomplete_generation", text)


class _Strict(BaseModel):
    # serde-like: exact JSON types (an integer is a fine float), unknown fields ignored.
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class Grammar(_Strict):
    """TGI's ``GrammarType``: ``json`` (alias ``json_object``), ``json_schema`` or ``regex``."""

    type: str
    value: Any

    @field_validator("type")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in ("json", "json_object", "json_schema", "regex"):
            raise ValueError(
                f"unknown variant `{value}`, expected one of `json`, `json_object`, "
                "`regex`, `json_schema`"
            )
        return value

    def json_schema(self) -> Any:
        """The JSON schema asked for (None for a regex); a broken one is a 422."""
        if self.type == "regex":
            if not isinstance(self.value, str):
                raise validation_error("grammar is not valid: regex grammar must be a string")
            return None
        value = self.value
        if self.type == "json_schema":
            if not isinstance(value, dict) or "schema" not in value:
                raise validation_error("grammar is not valid: missing field `schema`")
            value = value["schema"]
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise validation_error(f"grammar is not valid: {exc}") from None
        if not isinstance(value, dict | bool):
            raise validation_error("grammar is not valid: the schema must be a JSON object")
        return value


class GenerateParameters(_Strict):
    adapter_id: str | None = None
    best_of: U32 | None = None
    decoder_input_details: bool = False
    details: bool = False
    do_sample: bool = False
    frequency_penalty: float | None = None
    grammar: Grammar | None = None
    max_new_tokens: U32 | None = None
    repetition_penalty: float | None = None
    return_full_text: bool | None = None
    seed: U64 | None = None
    stop: list[str] = Field(default_factory=list)
    temperature: float | None = None
    top_k: int | None = None
    top_n_tokens: U32 | None = None
    top_p: float | None = None
    truncate: U32 | None = None
    typical_p: float | None = None
    watermark: bool = False


class GenerateRequest(_Strict):
    inputs: str
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)


class CompatGenerateRequest(GenerateRequest):
    stream: bool = False


class TextChunk(_Strict):
    type: str
    text: str = ""


class ChatMessage(_Strict):
    role: str
    content: str | list[TextChunk] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(chunk.text for chunk in self.content if chunk.type == "text")
        return self.content or ""


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    messages: list[ChatMessage]
    model: str | None = None
    frequency_penalty: float | None = None
    logprobs: bool | None = None
    max_tokens: U32 | None = None
    presence_penalty: float | None = None
    response_format: Grammar | None = None
    seed: U64 | None = None
    stop: list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_logprobs: U32 | None = None
    top_p: float | None = None


def parse_body(body: bytes, content_type: str, model: type[M]) -> M:
    """``body`` as ``model``, or :class:`BodyRejected` with axum's status and wording."""
    if content_type != "application/json" and not content_type.endswith("+json"):
        raise BodyRejected(415, "Expected request with `Content-Type: application/json`")
    try:
        data = json.loads(body)
    except ValueError as exc:
        where = (
            f" at line {exc.lineno} column {exc.colno}"
            if isinstance(exc, json.JSONDecodeError)
            else ""
        )
        message = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise BodyRejected(
            400, f"Failed to parse the request body as JSON: {message}{where}"
        ) from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        error = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in error["loc"])
        detail = f"{where}: {error['msg']}" if where else error["msg"]
        raise BodyRejected(
            422, f"Failed to deserialize the JSON body into the target type: {detail}"
        ) from None


@dataclass(frozen=True, slots=True)
class Limits:
    """The router's limits (``/info``)."""

    max_input_tokens: int
    max_total_tokens: int
    max_best_of: int
    max_stop_sequences: int
    max_top_n_tokens: int


def check_parameters(p: GenerateParameters, limits: Limits, *, stream: bool) -> None:
    """TGI's parameter rules, in TGI's order (the token-count rules come later)."""
    best_of = 1 if p.best_of is None else p.best_of
    if stream and best_of != 1:
        raise validation_error("`best_of` != 1 is not supported when streaming tokens")
    if stream and p.decoder_input_details:
        raise validation_error(
            "`decoder_input_details` == true is not supported when streaming tokens"
        )
    if best_of == 0 or best_of > limits.max_best_of:
        raise validation_error(
            f"`best_of` must be > 0 and <= {limits.max_best_of}. Given: {best_of}"
        )
    if best_of > 1 and not sampling(p):
        raise validation_error("you must use sampling when `best_of` is > 1")
    if best_of > 1 and p.seed is not None:
        raise validation_error("`seed` must not be set when `best_of` > 1")
    if p.temperature is not None and p.temperature <= 0.0:
        raise validation_error("`temperature` must be strictly positive")
    if p.repetition_penalty is not None and p.repetition_penalty <= 0.0:
        raise validation_error("`repetition_penalty` must be strictly positive")
    if p.frequency_penalty is not None and not -2.0 <= p.frequency_penalty <= 2.0:
        raise validation_error("`frequency_penalty` must be >= -2.0 and <= 2.0")
    if p.top_p is not None and not 0.0 < p.top_p < 1.0:
        raise validation_error("`top_p` must be > 0.0 and < 1.0")
    if p.typical_p is not None and not 0.0 < p.typical_p < 1.0:
        raise validation_error("`typical_p` must be > 0.0 and < 1.0")
    if p.top_k is not None and p.top_k <= 0:
        raise validation_error("`top_k` must be strictly positive")
    if p.max_new_tokens == 0:
        raise validation_error("`max_new_tokens` must be strictly positive")
    if len(p.stop) > limits.max_stop_sequences:
        raise validation_error(
            f"`stop` supports up to {limits.max_stop_sequences} stop sequences. "
            f"Given: {len(p.stop)}"
        )
    if p.top_n_tokens is not None and p.top_n_tokens > limits.max_top_n_tokens:
        raise validation_error(
            f"`top_n_tokens` must be >= 0 and <= {limits.max_top_n_tokens}. Given: {p.top_n_tokens}"
        )
    if p.truncate is not None and not 0 < p.truncate <= limits.max_input_tokens:
        raise validation_error(
            f"`truncate` must be strictly positive and less than {limits.max_input_tokens}. "
            f"Given: {p.truncate}"
        )


def check_lengths(input_length: int, max_new_tokens: int | None, limits: Limits) -> int:
    """The ``max_new_tokens`` to use (TGI's default fills the context), or a 422."""
    if max_new_tokens is None:
        max_new_tokens = max(0, limits.max_total_tokens - input_length)
    if input_length + max_new_tokens > limits.max_total_tokens:
        raise validation_error(
            f"`inputs` tokens + `max_new_tokens` must be <= {limits.max_total_tokens}. "
            f"Given: {input_length} `inputs` tokens and {max_new_tokens} `max_new_tokens`"
        )
    if input_length > limits.max_input_tokens:
        raise validation_error(
            f"`inputs` must have less than {limits.max_input_tokens} tokens. Given: {input_length}"
        )
    return max_new_tokens


def sampling(p: GenerateParameters) -> bool:
    """Whether TGI samples (and so reports a seed): asked to, or given a sampling knob."""
    return p.do_sample or any(v is not None for v in (p.temperature, p.top_k, p.top_p, p.typical_p))


def validate(
    inputs: str,
    p: GenerateParameters,
    tokenizer: SimTokenizer,
    limits: Limits,
    *,
    stream: bool,
    chat: bool,
) -> tuple[Any, list[SimToken], int]:
    """TGI's validation of one request: its grammar's schema, input tokens, max_new_tokens.

    Chat inputs carry the template's own ``<|begin_of_text|>``; others get one added.
    """
    check_parameters(p, limits, stream=stream)
    if not inputs:
        raise validation_error("`inputs` cannot be empty")
    schema = p.grammar.json_schema() if p.grammar is not None else None
    tokens = tokenizer.encode(inputs, add_special_tokens=not chat)
    if p.truncate is not None:
        tokens = tokens[-p.truncate :]
    return schema, tokens, check_lengths(len(tokens), p.max_new_tokens, limits)
