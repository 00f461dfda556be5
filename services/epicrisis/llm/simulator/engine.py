"""The simulated model run: the tokens a request gets, and TGI's JSON for them.

A :class:`Job` is a request that passed validation; :func:`plan` turns the answer text into
the exact tokens the client will see (cut by ``max_new_tokens`` or a stop sequence, ended
by the end-of-turn token), and the ``*_body`` / ``*_event`` functions render them in the
shapes of TGI's OpenAPI document (``GenerateResponse``, ``StreamResponse``,
``ChatCompletion``, ``ChatCompletionChunk``).

Med42-v2 ships a generation config that stops on ``<|end_of_text|>`` only, so on real TGI a
plain-text request that does not pass ``<|eot_id|>`` as a stop runs past the end of its
turn until ``max_new_tokens``; the simulator does the same unless told ``stop_on_eot``. A
grammar always ends the answer (the grammar allows nothing after the JSON value).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

from epicrisis.llm.simulator.answer import ParsedPrompt
from epicrisis.llm.simulator.config import SimulatorConfig, Stats
from epicrisis.llm.simulator.tokens import (
    EOT,
    HEADER_END,
    HEADER_START,
    SimToken,
    SimTokenizer,
    pieces,
)

FinishReason = Literal["length", "eos_token", "stop_sequence"]
_MAX_REPEATS = 64


@dataclass(frozen=True, slots=True)
class Job:
    """One validated generation request, as the simulated model runs it."""

    inputs: str
    input_tokens: tuple[SimToken, ...]
    prompt: ParsedPrompt
    schema: Any  # the JSON schema of the grammar; None for plain text (or a regex)
    max_new_tokens: int
    stop: tuple[str, ...]
    seed: int | None  # None when decoding greedily
    details: bool
    decoder_input_details: bool
    top_n_tokens: int
    best_of: int
    return_full_text: bool

    @property
    def json(self) -> bool:
        return self.schema is not None


@dataclass(frozen=True, slots=True)
class Generated:
    """The tokens a request gets and why generation stopped."""

    tokens: tuple[SimToken, ...]
    text: str  # the generated text, special tokens left out (as TGI decodes it)
    finish_reason: FinishReason


def plan(job: Job, answer: str, tokenizer: SimTokenizer, *, eot_ends: bool) -> Generated:
    """The tokens for ``answer``, stopped as TGI's stopping criteria would stop them."""
    eot = tokenizer.special(EOT)
    sequence = [*pieces(tokenizer, answer), eot]
    if not eot_ends:  # Med42 talks on past its turn: another assistant turn, and another
        turn = [
            tokenizer.special(HEADER_START),
            *pieces(tokenizer, "assistant"),
            tokenizer.special(HEADER_END),
            *pieces(tokenizer, "\n\n" + answer),
            eot,
        ]
        repeats = 0
        while len(sequence) <= job.max_new_tokens and repeats < _MAX_REPEATS:
            sequence.extend(turn)
            repeats += 1
    out: list[SimToken] = []
    text: list[str] = []
    seen = ""
    finish: FinishReason = "length"
    reach = max((len(s) for s in job.stop), default=0)
    for token in sequence:
        out.append(token)
        seen += token.text
        if not token.special:
            text.append(token.text)
        if len(out) >= job.max_new_tokens:
            finish = "length"
            break
        if token.special and token.id == eot.id and eot_ends:
            finish = "eos_token"
            break
        window = seen[-(reach + len(token.text)) :]
        if any(s and s in window for s in job.stop):
            finish = "stop_sequence"
            break
    return Generated(tuple(out), "".join(text), finish)


def logprob(token: SimToken) -> float:
    """A stable, plausible log-probability for a token."""
    return -round(((token.id * 2654435761) % 1000) / 1000 * 1.5, 4)


def token_json(token: SimToken) -> dict[str, Any]:
    return {"id": token.id, "text": token.text, "logprob": logprob(token), "special": token.special}


def _full_text(job: Job, text: str) -> str:
    return job.inputs + text if job.return_full_text else text


def _prefill(job: Job) -> list[dict[str, Any]]:
    if not job.decoder_input_details:
        return []
    return [
        {"id": t.id, "text": t.text, "logprob": None if i == 0 else logprob(t)}
        for i, t in enumerate(job.input_tokens)
    ]


def _top_tokens(job: Job, gen: Generated) -> list[list[dict[str, Any]]]:
    return [[token_json(t)] for t in gen.tokens] if job.top_n_tokens else []


def generate_body(job: Job, gen: Generated) -> dict[str, Any]:
    """``GenerateResponse``: the text, with ``details`` when asked."""
    body: dict[str, Any] = {"generated_text": _full_text(job, gen.text)}
    if job.details or job.decoder_input_details:
        details: dict[str, Any] = {
            "finish_reason": gen.finish_reason,
            "generated_tokens": len(gen.tokens),
            "seed": job.seed,
            "prefill": _prefill(job),
            "tokens": [token_json(t) for t in gen.tokens],
        }
        top = _top_tokens(job, gen)
        if top:
            details["top_tokens"] = top
        if job.best_of > 1:
            details["best_of_sequences"] = [
                {
                    "generated_text": body["generated_text"],
                    "finish_reason": gen.finish_reason,
                    "generated_tokens": len(gen.tokens),
                    "prefill": details["prefill"],
                    "tokens": details["tokens"],
                    "seed": (job.seed or 0) + i,
                }
                for i in range(1, job.best_of)
            ]
        body["details"] = details
    return body


def stream_event(job: Job, gen: Generated, index: int) -> dict[str, Any]:
    """``StreamResponse`` for the token at ``index`` (the last one carries the whole text)."""
    token = gen.tokens[index]
    last = index == len(gen.tokens) - 1
    event: dict[str, Any] = {"index": index + 1, "token": token_json(token)}
    if job.top_n_tokens:
        event["top_tokens"] = [token_json(token)]
    event["generated_text"] = _full_text(job, gen.text) if last else None
    event["details"] = (
        {
            "finish_reason": gen.finish_reason,
            "generated_tokens": len(gen.tokens),
            "seed": job.seed,
            "input_length": len(job.input_tokens),
        }
        if last and job.details
        else None
    )
    return event


@dataclass(frozen=True, slots=True)
class ChatContext:
    """What the chat route adds around a generation."""

    model_id: str
    fingerprint: str
    logprobs: bool
    top_logprobs: int
    include_usage: bool


def openai_finish(reason: FinishReason) -> str:
    return "length" if reason == "length" else "stop"


def _chat_logprobs(ctx: ChatContext, tokens: tuple[SimToken, ...]) -> dict[str, Any] | None:
    if not ctx.logprobs:
        return None
    return {
        "content": [
            {
                "token": t.text,
                "logprob": logprob(t),
                "top_logprobs": [{"token": t.text, "logprob": logprob(t)}][: ctx.top_logprobs],
            }
            for t in tokens
        ]
    }


def usage(job: Job, gen: Generated) -> dict[str, int]:
    prompt, completion = len(job.input_tokens), len(gen.tokens)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def chat_body(ctx: ChatContext, job: Job, gen: Generated) -> dict[str, Any]:
    """``ChatCompletion``."""
    return {
        "object": "chat.completion",
        "id": "",
        "created": int(time.time()),
        "model": ctx.model_id,
        "system_fingerprint": ctx.fingerprint,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": gen.text},
                "logprobs": _chat_logprobs(ctx, gen.tokens),
                "finish_reason": openai_finish(gen.finish_reason),
            }
        ],
        "usage": usage(job, gen),
    }


def _chunk(
    ctx: ChatContext, choices: list[dict[str, Any]], usage_: dict[str, int] | None
) -> dict[str, Any]:
    return {
        "object": "chat.completion.chunk",
        "id": "",
        "created": int(time.time()),
        "model": ctx.model_id,
        "system_fingerprint": ctx.fingerprint,
        "choices": choices,
        "usage": usage_,
    }


def chat_events(ctx: ChatContext, job: Job, gen: Generated, index: int) -> list[dict[str, Any]]:
    """``ChatCompletionChunk``s for the token at ``index`` (special tokens show no text)."""
    token = gen.tokens[index]
    last = index == len(gen.tokens) - 1
    choice = {
        "index": 0,
        "delta": {"role": "assistant", "content": "" if token.special else token.text},
        "logprobs": _chat_logprobs(ctx, (token,)),
        "finish_reason": openai_finish(gen.finish_reason) if last else None,
    }
    events = [_chunk(ctx, [choice], None)]
    if last and ctx.include_usage:
        events.append(_chunk(ctx, [], usage(job, gen)))
    return events


def info_body(c: SimulatorConfig) -> dict[str, Any]:
    """``Info``: exactly the fields of TGI 3.x's ``/info``."""
    return {
        "model_id": c.model_id,
        "model_sha": None,
        "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": c.max_concurrent_requests,
        "max_best_of": c.max_best_of,
        "max_stop_sequences": c.max_stop_sequences,
        "max_input_tokens": c.max_input_tokens,
        "max_total_tokens": c.max_total_tokens,
        "validation_workers": c.validation_workers,
        "max_client_batch_size": c.max_client_batch_size,
        "router": "text-generation-router",
        "version": c.version,
        "sha": None,
        "docker_label": None,
    }


def metrics_text(s: Stats, config: SimulatorConfig) -> str:
    """A few of TGI's Prometheus series, from the simulator's counters."""
    lines = [
        "# TYPE tgi_request_count counter",
        f"tgi_request_count {s.request_count}",
        "# TYPE tgi_request_success counter",
        f"tgi_request_success {s.success}",
        "# TYPE tgi_request_failure counter",
        *(f'tgi_request_failure{{err="{err}"}} {n}' for err, n in sorted(s.failures.items())),
        "# TYPE tgi_queue_size gauge",
        f"tgi_queue_size {s.queued}",
        "# TYPE tgi_batch_current_size gauge",
        f"tgi_batch_current_size {s.generating}",
        "# TYPE tgi_batch_current_max_tokens gauge",
        f"tgi_batch_current_max_tokens {s.generating * config.max_total_tokens}",
    ]
    for name, total in (
        ("tgi_request_input_length", s.input_tokens),
        ("tgi_request_generated_tokens", s.generated_tokens),
        ("tgi_request_duration", round(s.duration_seconds, 6)),
    ):
        lines += [
            f"# TYPE {name} histogram",
            f'{name}_bucket{{le="+Inf"}} {s.success}',
            f"{name}_sum {total}",
            f"{name}_count {s.success}",
        ]
    return "\n".join(lines) + "\n"


def simple_token(token: SimToken, text: str) -> dict[str, Any]:
    """``SimpleToken``: TGI shows the slice of the input the token covers."""
    return {
        "id": token.id,
        "text": text[token.start : token.stop],
        "start": token.start,
        "stop": token.stop,
    }


def timing_headers(job: Job, gen: Generated, started: float) -> dict[str, str]:
    """The timing headers TGI puts on a finished generation."""
    total_ms = int((time.monotonic() - started) * 1000)
    per_token = total_ms // max(1, len(gen.tokens))
    return {
        "x-compute-type": "gpu+optimized",
        "x-compute-time": f"{total_ms / 1000:.3f}",
        "x-compute-characters": str(len(job.inputs)),
        "x-total-time": str(total_ms),
        "x-validation-time": "0",
        "x-queue-time": "0",
        "x-inference-time": str(total_ms),
        "x-time-per-token": str(per_token),
        "x-prompt-tokens": str(len(job.input_tokens)),
        "x-generated-tokens": str(len(gen.tokens)),
    }
