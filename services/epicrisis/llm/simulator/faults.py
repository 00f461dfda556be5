"""Fault injection for the TGI simulator: what can go wrong, how often, and seeded.

Each fault has a probability and a countdown ("the next N requests"); the countdown wins
while it lasts. Faults are drawn with one ``random.Random(seed)``, so a given sequence of
requests meets the same faults on every run with the same ``--seed``. A request draws a
fault only at the stage where it could meet it (a request refused as overloaded never uses
up a ``malformed`` countdown), and meets at most one error. The answer faults (malformed,
off-schema, unverifiable) strike only requests whose grammar is the epicrisis answer schema,
and ``stream_error`` only streams.
"""

from __future__ import annotations

import copy
import random
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from epicrisis.llm.simulator.answer import (
    ParsedPrompt,
    build_answer,
    is_answer_schema,
    json_text,
    plain_answer,
    schema_instance,
)

FaultKind = Literal[
    "overloaded",  # 429 {"error_type": "overloaded"}, as past --max-concurrent-requests
    "unhealthy",  # 503 from /health
    "validation",  # 422 input validation error
    "generation",  # 424 request failed during generation (before the first token)
    "incomplete",  # 500 incomplete generation (a stream stops half way)
    "malformed",  # the JSON answer is not valid JSON
    "off_schema",  # valid JSON that breaks the answer schema
    "unverifiable",  # schema-valid, but cites a handle not shown or states a foreign number
    "stream_error",  # an error event inside a stream after some tokens
    "slow",  # extra delay before the first token
    "loading",  # after answering, refuse connections for a while (a model reload)
]
FAULT_KINDS: tuple[FaultKind, ...] = get_args(FaultKind)
ANSWER_FAULTS: tuple[FaultKind, ...] = ("malformed", "off_schema", "unverifiable")


@dataclass(slots=True)
class FaultSpec:
    """How often a fault fires: on each request with ``probability``, and on the next ``next``."""

    probability: float = 0.0
    next: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(
                f"a fault probability must be between 0 and 1 (got {self.probability})"
            )
        if self.next < 0:
            raise ValueError(f"a fault countdown must not be negative (got {self.next})")

    @property
    def active(self) -> bool:
        return self.next > 0 or self.probability > 0.0


class FaultBoard:
    """The faults in force and a seeded draw; one per simulator, used from its event loop."""

    def __init__(self, specs: Mapping[str, FaultSpec] | None = None, seed: int | None = None):
        self._specs: dict[FaultKind, FaultSpec] = {kind: FaultSpec() for kind in FAULT_KINDS}
        self._rng = random.Random(seed)
        self.fired: Counter[str] = Counter()
        for kind, spec in (specs or {}).items():
            self.set(kind, spec)

    def set(self, kind: str, spec: FaultSpec) -> None:
        """Replace the spec of ``kind`` (``ValueError`` for an unknown kind)."""
        self._specs[_kind(kind)] = copy.copy(spec)

    def clear(self) -> None:
        for kind in FAULT_KINDS:
            self._specs[kind] = FaultSpec()

    def fire(self, kind: FaultKind) -> bool:
        """Whether ``kind`` strikes this request (using up one of its countdown)."""
        spec = self._specs[kind]
        if spec.next > 0:
            spec.next -= 1
        elif not (spec.probability > 0.0 and self._rng.random() < spec.probability):
            return False
        self.fired[kind] += 1
        return True

    def first(self, kinds: Iterable[FaultKind]) -> FaultKind | None:
        """The first of ``kinds`` that strikes (later ones are not drawn)."""
        for kind in kinds:
            if self.fire(kind):
                return kind
        return None

    def pick(self, count: int) -> int:
        """A seeded choice among ``count`` variants of a fault."""
        return self._rng.randrange(count)

    def snapshot(self) -> dict[str, Any]:
        return {
            "faults": {kind: asdict(spec) for kind, spec in self._specs.items()},
            "fired": {kind: self.fired[kind] for kind in FAULT_KINDS},
        }


def _kind(name: str) -> FaultKind:
    for kind in FAULT_KINDS:
        if kind == name:
            return kind
    raise ValueError(f"unknown fault {name!r} (known: {', '.join(FAULT_KINDS)})")


def parse_kind(name: str) -> FaultKind:
    """``name`` as a fault kind, accepting ``off-schema`` for ``off_schema``."""
    return _kind(name.strip().replace("-", "_"))


def answer_text(
    schema: Any, prompt: ParsedPrompt, fault: FaultKind | None, board: FaultBoard
) -> str:
    """What the model writes: prose, an instance of a foreign schema, or the cited answer
    (broken the way an answer ``fault`` says)."""
    if schema is None:
        return plain_answer(prompt)
    if not is_answer_schema(schema):
        return json_text(schema_instance(schema))
    answer = build_answer(prompt)
    return json_text(answer) if fault is None else corrupt_answer(fault, answer, prompt, board)


def corrupt_answer(
    kind: FaultKind, answer: dict[str, Any], prompt: ParsedPrompt, board: FaultBoard
) -> str:
    """The answer's JSON text, broken the way ``kind`` says (one of a few seeded variants)."""
    text = json_text(answer)
    if kind == "malformed":
        if board.pick(2) == 0:
            return text[: max(1, len(text) * 3 // 5)]  # cut off mid-object
        return f"```json\n{text}\n```"  # wrapped in a markdown fence
    broken = copy.deepcopy(answer)
    first = broken["hospital_course"][0]
    if kind == "off_schema":
        variant = board.pick(4)
        if variant == 0:
            del broken["hospital_course"]
        elif variant == 1:
            first["cites"] = []
        elif variant == 2:
            broken["confidence"] = 0.9
        else:
            first["text"] = 42
        return json_text(broken)
    if kind == "unverifiable":
        if board.pick(2) == 0:
            first["cites"] = [_foreign_handle(prompt)]
        else:
            first["text"] = f"{first['text'][:300]} (measured {_foreign_number(prompt)})"
        return json_text(broken)
    return text


def _foreign_handle(prompt: ParsedPrompt) -> str:
    """A handle-shaped name the prompt never shows."""
    number = 900
    while f"C{number}" in prompt.handles:
        number += 1
    return f"C{number}"


def _foreign_number(prompt: ParsedPrompt) -> str:
    """A number that occurs nowhere in the prompt, so no cited line can support it."""
    number = 97531
    while str(number) in prompt.text:
        number += 2
    return str(number)


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    probability: float = Field(0.0, ge=0.0, le=1.0)
    next: int = Field(0, ge=0)


class _Update(BaseModel):
    model_config = ConfigDict(extra="allow")  # the extra keys are fault kinds
    clear: bool = False
    reset_counters: bool = False
    reload: float | None = Field(None, ge=0.0)
    first_token_seconds: float | None = Field(None, ge=0.0)
    token_seconds: float | None = Field(None, ge=0.0)
    slow_seconds: float | None = Field(None, ge=0.0)
    loading_seconds: float | None = Field(None, ge=0.0)


@dataclass(frozen=True, slots=True)
class FaultUpdate:
    """A ``POST /__sim/faults`` body: faults to set, latencies to change, a reload to do."""

    specs: dict[FaultKind, FaultSpec] = field(default_factory=dict)
    settings: dict[str, float] = field(default_factory=dict)  # simulator attributes
    clear: bool = False  # drop every fault first
    reset_counters: bool = False
    reload: float | None = None  # refuse connections for this long, now


def parse_update(body: bytes) -> FaultUpdate:
    """``{"malformed": {"next": 2}, "reload": 3, ...}`` as an update (``ValueError`` if bad)."""
    try:
        raw = _Update.model_validate_json(body or b"{}")
        specs = {
            parse_kind(name): FaultSpec(**_Spec.model_validate(value).model_dump())
            for name, value in (raw.model_extra or {}).items()
        }
    except PydanticValidationError as exc:
        error = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in error["loc"])
        raise ValueError(f"{where}: {error['msg']}" if where else error["msg"]) from None
    names = ("first_token_seconds", "token_seconds", "slow_seconds", "loading_seconds")
    settings = {n: float(v) for n in names if (v := getattr(raw, n)) is not None}
    return FaultUpdate(specs, settings, raw.clear, raw.reset_counters, raw.reload)
