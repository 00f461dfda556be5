"""The LLM backend: Med42-v2 (or any chat model) writes the prose, the verifier guards it.

One summary: size the prompt from the leased endpoint's ``/info``, build it, ask for JSON
in the answer schema, verify every sentence against the lines it cites. An answer that
fails verification gets one fresh call; a second failure falls back to the extractive
prose, flagged in the provenance with the rules that failed (never the text). Transport
failures are retried with exponential back-off and jitter, on another endpoint when one
is ready, within a bound on attempts and on total time; a request the server rejects as
invalid (422) is raised at once, since sending it again cannot help.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from opentelemetry import trace

from epicrisis import __version__
from epicrisis.config import Settings, get_settings
from epicrisis.errors import BackendError, BackendUnavailableError, ConfigurationError
from epicrisis.llm.client import EOT, ChatResult
from epicrisis.llm.pool import EndpointPool, failure_kind
from epicrisis.observability import metrics
from epicrisis.observability.tracing import tracer
from epicrisis.prompt import (
    ANSWER_SCHEMA,
    PromptResult,
    Tokenizer,
    Verification,
    build_messages,
    load_tokenizer,
    verify_answer,
)
from epicrisis.prompt.budget import Omission as PromptOmission
from epicrisis.stay.context import Stay
from epicrisis.summary.build import build_summary
from epicrisis.summary.extractive import Prose, extractive_prose
from epicrisis.summary.model import DischargeSummary, Omission, Provenance, Sentence

LLM_GENERATOR = f"epicrisis-llm/{__version__}"
EXTRACTIVE_GENERATOR = f"epicrisis-extractive/{__version__}"
VERIFIED_CALLS = 2  # the first answer, and one fresh call when it fails verification

_jitter = random.Random()
log = logging.getLogger(__name__)  # errors and rules only: never prompt or answer text


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounds on one summary's transport retries (verification has its own single retry)."""

    max_attempts: int = 6  # requests that reached an endpoint, the first one included
    total_seconds: float = 300.0  # the whole summary, waits included
    base_seconds: float = 0.25  # first back-off; doubles per failed attempt
    max_backoff_seconds: float = 8.0

    def backoff(self, failures: int) -> float:
        """Exponential back-off with jitter: between half and all of ``base * 2**(n-1)``."""
        ceiling = min(self.max_backoff_seconds, self.base_seconds * 2.0 ** max(failures - 1, 0))
        return ceiling / 2 + _jitter.uniform(0.0, ceiling / 2)

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(max_attempts=settings.llm_max_attempts, total_seconds=settings.llm_retry_seconds)


@dataclass(slots=True)
class _Ledger:
    """What one summary spent, for its provenance."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    timings: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    model: str | None = None


@dataclass(frozen=True, slots=True)
class _Answer:
    result: ChatResult
    prompt: PromptResult


async def llm_summary(
    stay: Stay,
    pool: EndpointPool,
    *,
    max_output_tokens: int | None = None,
    tokenizer: Tokenizer | None = None,
    max_input_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    retry: RetryPolicy | None = None,
    settings: Settings | None = None,
) -> DischargeSummary:
    """The discharge summary of ``stay`` with LLM prose, verified, or the flagged fallback.

    Defaults come from ``settings`` (the ``EPICRISIS_LLM_*`` environment when None). The prompt budget is the leased
    endpoint's ``max_input_tokens`` and ``max_total_tokens - max_output_tokens``, lowered
    to ``max_input_tokens`` (or an explicitly set ``EPICRISIS_MAX_INPUT_TOKENS``).
    Raises :class:`BackendError` when the endpoints fail past the retry bounds, or reject
    the request.
    """
    settings = settings or get_settings()
    out_tokens = max_output_tokens or settings.llm_max_output_tokens
    if max_input_tokens is None and "max_input_tokens" in settings.model_fields_set:
        max_input_tokens = settings.max_input_tokens
    call = _Call(
        stay=stay,
        pool=pool,
        tokenizer=tokenizer if tokenizer is not None else load_tokenizer(None),
        max_output_tokens=out_tokens,
        max_input_tokens=max_input_tokens,
        temperature=settings.llm_temperature if temperature is None else temperature,
        top_p=settings.llm_top_p if top_p is None else top_p,
        retry=retry or RetryPolicy.from_settings(settings),
    )
    seed = settings.llm_seed if seed is None else seed
    started = time.monotonic()
    deadline = started + call.retry.total_seconds
    ledger = _Ledger()
    failed: list[tuple[Verification, ChatResult]] = []
    for attempt in range(VERIFIED_CALLS):
        answer = await call.generate(
            seed=None if seed is None else seed + attempt, deadline=deadline, ledger=ledger
        )
        clock = time.monotonic()
        # CPU work off the event loop: it keeps the other generations' requests flowing.
        verification = await asyncio.to_thread(
            verify_answer, answer.result.text, answer.prompt, stay
        )
        ledger.timings["verify"] += time.monotonic() - clock
        if verification.ok:
            ledger.timings["total"] = time.monotonic() - started
            return await asyncio.to_thread(
                build_summary,
                stay,
                _prose(verification),
                _provenance(ledger, answer.prompt, verification),
            )
        failed.append((verification, answer.result))
        for rule in sorted({issue.rule for issue in verification.issues}):
            metrics.VERIFICATION_FAILURES.labels(rule).inc()
        log.info("LLM answer failed verification: %s", "; ".join(verification.problems[:5]))
    ledger.timings["total"] = time.monotonic() - started
    provenance = _fallback(ledger, answer.prompt, failed)
    log.warning("LLM prose replaced by the extractive fallback: %s", provenance.fallback_reason)
    prose = await asyncio.to_thread(extractive_prose, stay)
    return await asyncio.to_thread(build_summary, stay, prose, provenance)


def summarize_stay_llm(stay: Stay, *, settings: Settings | None = None) -> DischargeSummary:
    """:func:`llm_summary` for synchronous callers (the CLI): one pool, one event loop."""

    async def run() -> DischargeSummary:
        async with EndpointPool.from_settings(settings) as pool:
            return await llm_summary(stay, pool, settings=settings)

    return asyncio.run(run())


@dataclass(frozen=True, slots=True)
class _Call:
    """One summary's request parameters, and the retry loop around a single generation."""

    stay: Stay
    pool: EndpointPool
    tokenizer: Tokenizer
    max_output_tokens: int
    max_input_tokens: int | None
    temperature: float
    top_p: float
    retry: RetryPolicy
    prompts: dict[int, PromptResult] = field(default_factory=dict)  # by budget

    async def generate(self, *, seed: int | None, deadline: float, ledger: _Ledger) -> _Answer:
        """One answer, retrying transport failures within the policy's bounds."""
        failures = 0
        retries: Counter[type[BackendError]] = Counter()
        while True:
            try:
                async with asyncio.timeout_at(_loop_time(deadline)):
                    return await self._once(seed, ledger)
            except TimeoutError:
                raise BackendUnavailableError(
                    f"no answer within the {self.retry.total_seconds:g} s bound on one summary"
                ) from None
            except BackendError as error:
                if not error.retryable:
                    raise
                if error.endpoint is None:  # no endpoint ready: wait for the first to recover
                    delay = (error.retry_after or 0.0) + self.retry.backoff(1) / 4
                else:
                    failures += 1
                    retries[type(error)] += 1
                    limit = error.max_retries
                    if failures >= self.retry.max_attempts or (
                        limit is not None and retries[type(error)] > limit
                    ):
                        raise
                    other = self.pool.has_ready(besides=error.endpoint)
                    delay = 0.0 if other else self.retry.backoff(failures)
                if time.monotonic() + delay >= deadline:
                    raise
                metrics.LLM_RETRIES.labels(failure_kind(error)).inc()
                log.info("%s; retrying in %.2f s", error, delay)
                await asyncio.sleep(delay)

    async def _once(self, seed: int | None, ledger: _Ledger) -> _Answer:
        async with self.pool.lease() as endpoint:
            assert endpoint.info is not None  # the lease reads /info first
            info = endpoint.info
            budget = min(info.max_input_tokens, info.max_total_tokens - self.max_output_tokens)
            if self.max_input_tokens is not None:
                budget = min(budget, self.max_input_tokens)
            if budget <= 0:
                raise ConfigurationError(
                    f"max_output_tokens ({self.max_output_tokens}) leaves no room for the prompt "
                    f"in the endpoint's {info.max_total_tokens}-token context"
                )
            prompt = self.prompts.get(budget)
            if prompt is None:
                clock = time.monotonic()
                prompt = await asyncio.to_thread(
                    build_messages, self.stay, tokenizer=self.tokenizer, max_input_tokens=budget
                )
                ledger.timings["prompt"] += time.monotonic() - clock
                self.prompts[budget] = prompt
            clock = time.monotonic()
            with tracer.start_as_current_span(
                "llm.generate",
                kind=trace.SpanKind.CLIENT,
                attributes={
                    "epicrisis.llm.endpoint": endpoint.index,
                    "gen_ai.request.max_tokens": self.max_output_tokens,
                    "gen_ai.usage.input_tokens": prompt.token_count,
                },
            ) as span:
                result = await endpoint.client.chat(
                    prompt.messages,
                    schema=ANSWER_SCHEMA,
                    max_tokens=self.max_output_tokens,
                    temperature=self.temperature,
                    top_p=self.top_p,
                    stop=(EOT,),
                    seed=seed,
                )
                span.set_attribute("gen_ai.usage.output_tokens", result.completion_tokens or 0)
            elapsed = time.monotonic() - clock
            ledger.timings["generation"] += elapsed
            metrics.LLM_REQUEST_DURATION.labels(str(endpoint.index)).observe(elapsed)
        ledger.prompt_tokens += result.prompt_tokens or prompt.token_count
        ledger.generated_tokens += result.completion_tokens or 0
        ledger.model = result.model or info.model_id
        return _Answer(result, prompt)


def _loop_time(deadline: float) -> float:
    """``deadline`` (``time.monotonic``) on the running loop's clock."""
    loop = asyncio.get_running_loop()
    return loop.time() + (deadline - time.monotonic())


def _sources(refs: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(refs))


def _prose(verification: Verification) -> Prose:
    """The verified answer as the summary's prose, each sentence citing its references."""

    def section(name: str) -> list[Sentence]:
        return [Sentence(text=s.text, sources=_sources(s.refs)) for s in verification.section(name)]

    return Prose(
        section("hospital_course"), section("discharge_instructions"), section("follow_up")
    )


def _omitted(omissions: Sequence[PromptOmission]) -> list[Omission]:
    """What the prompt budget cut, per section."""
    counts: dict[str, tuple[int, int]] = {}
    for o in omissions:
        count, tokens = counts.get(o.section, (0, 0))
        counts[o.section] = (count + o.count, tokens + o.tokens)
    return [
        Omission(section=section, count=count, tokens=tokens)
        for section, (count, tokens) in counts.items()
    ]


def _budget_used(prompt: PromptResult) -> float | None:
    if prompt.max_input_tokens <= 0:
        return None
    return round(prompt.token_count / prompt.max_input_tokens, 4)


def _timings(ledger: _Ledger) -> dict[str, float]:
    return {name: round(seconds * 1000, 1) for name, seconds in ledger.timings.items()}


def _provenance(ledger: _Ledger, prompt: PromptResult, verification: Verification) -> Provenance:
    return Provenance(
        generator=LLM_GENERATOR,
        backend="llm",
        model=ledger.model,
        prompt_tokens=ledger.prompt_tokens,
        generated_tokens=ledger.generated_tokens,
        prompt_budget_used=_budget_used(prompt),
        omitted=_omitted(prompt.omitted),
        grounding=verification.grounding,
        timings_ms=_timings(ledger),
    )


def _fallback(
    ledger: _Ledger, prompt: PromptResult, failed: Sequence[tuple[Verification, ChatResult]]
) -> Provenance:
    """Provenance of the extractive prose that replaced answers that failed verification.

    The reason names the rules that failed (``json``, ``unknown-handle``, ``numbers``...),
    never the answer's text.
    """
    rules = sorted({issue.rule for verification, _ in failed for issue in verification.issues})
    reason = (
        f"the LLM answer failed verification {len(failed)} times "
        f"(rules: {', '.join(rules) or 'none reported'})"
    )
    if any(result.finish_reason == "length" for _, result in failed):
        reason += "; an answer was cut at the output token limit"
    return Provenance(
        generator=EXTRACTIVE_GENERATOR,
        backend="llm",
        model=ledger.model,
        fallback=True,
        fallback_reason=reason,
        prompt_tokens=ledger.prompt_tokens,
        generated_tokens=ledger.generated_tokens,
        prompt_budget_used=_budget_used(prompt),
        omitted=_omitted(prompt.omitted),
        timings_ms=_timings(ledger),
    )
