"""Ingest + prompt per Bundle, beside orjson parsing and whole-Bundle R4B validation.

All three run in one process on the same bytes, interleaved per Bundle, so the ratios hold
on whatever machine runs them. Token figures use the Llama 3 tokenizer from shared/data.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from fhir.resources.R4B.bundle import Bundle
from pydantic import ValidationError

from epicrisis.errors import StayError
from epicrisis.fhir import ingest
from epicrisis.pipeline import build_prompt
from epicrisis.prompt import DEFAULT_MAX_INPUT_TOKENS, HFTokenizer, linearize
from epicrisis.prompt.budget import line_costs, safety_tokens
from epicrisis.stay import gather_stay
from epicrisis.stay.context import Stay

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DROP = frozenset({"meta", "identifier", "text"})
TOKEN_GOAL = 6_144
Rounds = dict[int, list[float]]  # round number -> the timed calls of a path's turn in it
REPEAT = 9  # rounds per Bundle
BLOCK = 3  # calls of a path in its turn: one to settle, the rest timed
VALIDATE_EVERY = 3  # whole-Bundle validation (0.2-0.6 s) in every third round


@dataclass
class Row:
    name: str
    megabytes: float
    parse_rounds: Rounds
    validate_rounds: Rounds
    validates: bool
    ours_rounds: Rounds
    prompt_tokens: int
    safety_tokens: int  # the safety set's lines alone (never cut)
    safety_whole: bool  # every safety line is in the prompt, word for word
    stay_json_tokens: int
    slim_json_tokens: int

    @property
    def parse_ms(self) -> list[float]:
        return _flat(self.parse_rounds)

    @property
    def validate_ms(self) -> list[float]:
        return _flat(self.validate_rounds)

    @property
    def ours_ms(self) -> list[float]:
        return _flat(self.ours_rounds)

    @property
    def vs_validation(self) -> float:
        """Median over the rounds that validated of ours / validation in the same round."""
        return _paired(self.ours_rounds, self.validate_rounds)

    @property
    def vs_parse(self) -> float:
        """Median over the rounds of ours / parse in the same round."""
        return _paired(self.ours_rounds, self.parse_rounds)


def _flat(rounds: Rounds) -> list[float]:
    return [ms for timed in rounds.values() for ms in timed]


def _paired(ours: Rounds, baseline: Rounds) -> float:
    """The median over the rounds the baseline ran in of ours / baseline, each the median of
    its timed calls in that round."""
    return statistics.median(
        statistics.median(ours[r]) / statistics.median(timed) for r, timed in baseline.items()
    )


def _timed(fn: Callable[[], Any]) -> float:
    """Milliseconds of one call, as timeit takes them: the cyclic collector off during the
    call, so a collection that earlier calls' garbage set off does not land on this one
    (the service tunes the collector to about 0.1 ms a request: epicrisis.serving.ingest.settle_heap).
    No collection just before: walking the heap then would leave the caches cold for the
    short calls. Each path frees its own result inside the timing."""
    gc.disable()
    try:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1000
    finally:
        gc.enable()


def _rounds(
    paths: dict[str, Callable[[], Any]], repeat: int, every: dict[str, int]
) -> dict[str, Rounds]:
    """The paths take turns, ``repeat`` rounds, so drift on a shared machine hits them alike.
    In its turn a path runs ``BLOCK`` times back to back and the last ``BLOCK - 1`` calls are
    timed: each is measured in its own steady state, as timeit's loops are, not in the wake
    of the previous path's memory (whole-Bundle validation frees hundreds of MB). A path
    named in ``every`` takes its turn only every n-th round (the slow validation)."""
    out: dict[str, Rounds] = {name: {} for name in paths}
    for round_no in range(repeat):
        for name, fn in paths.items():
            if round_no % every.get(name, 1) == 0:
                fn()
                out[name][round_no] = [_timed(fn) for _ in range(BLOCK - 1)]
    return out


def _validate_whole(data: bytes) -> bool:
    try:
        Bundle.model_validate_json(data)
        return True
    except ValidationError:
        return False


def _stay_refs(stay: Stay) -> set[str]:
    refs = {stay.patient.ref, stay.encounter.ref}
    refs |= {c.ref for c in (*stay.stay_conditions, *stay.problems)}
    refs |= {r.ref for s in stay.observations for r in s.readings}
    refs |= {x.ref for x in (*stay.procedures, *stay.medications, *stay.allergies)}
    refs |= {x.ref for x in (*stay.reports, *stay.notes, *stay.plans)}
    return refs


def _slim(value: Any) -> Any:
    """Drop meta, identifiers, narrative and references: what a smart JSON dump would keep."""
    if isinstance(value, dict):
        if "reference" in value:
            return None
        kept = {k: _slim(v) for k, v in value.items() if k not in DROP}
        return {k: v for k, v in kept.items() if v is not None}
    if isinstance(value, list):
        items = [_slim(v) for v in value]
        return [v for v in items if v is not None] or None
    return value


def measure(paths: list[Path], repeat: int = REPEAT) -> list[Row]:
    tokenizer = HFTokenizer.from_file(SHARED / "tokenizer" / "llama3-tokenizer.json")
    rows = []
    for path in paths:
        data = path.read_bytes()
        try:
            stay = gather_stay(ingest(data))
        except StayError:
            continue
        entries = {e.local_ref: e.resource for e in ingest(data).entries}
        resources = [entries[r] for r in sorted(_stay_refs(stay)) if r in entries]
        prompt = build_prompt(data, tokenizer=tokenizer)
        lines = linearize(stay).lines
        safety = [line for line in lines if line.safety]
        times = _rounds(
            {
                "parse": lambda d=data: orjson.loads(d),
                "ours": lambda d=data: build_prompt(d, tokenizer=tokenizer),
                "validate": lambda d=data: _validate_whole(d),
            },
            repeat,
            every={"validate": VALIDATE_EVERY},
        )
        rows.append(
            Row(
                name=path.stem[:32],
                megabytes=len(data) / 1e6,
                parse_rounds=times["parse"],
                validate_rounds=times["validate"],
                validates=_validate_whole(data),
                ours_rounds=times["ours"],
                prompt_tokens=prompt.token_count,
                safety_tokens=safety_tokens(lines, line_costs(lines, tokenizer)),
                safety_whole=all(line.text in prompt.user for line in safety),
                stay_json_tokens=sum(
                    tokenizer.count_batch([orjson.dumps(r).decode() for r in resources])
                ),
                slim_json_tokens=sum(
                    tokenizer.count_batch([orjson.dumps(_slim(r)).decode() for r in resources])
                ),
            )
        )
    return rows


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def markdown(rows: list[Row]) -> str:
    lines = [
        "| Bundle | MB | orjson parse ms | whole-Bundle R4B validation ms | ingest + prompt ms "
        "| ÷ validation | ÷ parse | prompt tokens | safety set tokens (whole) | stay as JSON "
        "| slimmed JSON |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in sorted(rows, key=lambda r: -r.megabytes):
        valid = "" if r.validates else " (fails)"
        lines.append(
            f"| {r.name} | {r.megabytes:.2f} | {_spread(r.parse_ms)} | {_spread(r.validate_ms)}{valid} "
            f"| {_spread(r.ours_ms)} | {r.vs_validation:.3f} | {r.vs_parse:.1f} | {r.prompt_tokens:,} "
            f"| {r.safety_tokens:,} ({'yes' if r.safety_whole else 'NO'}) "
            f"| {r.stay_json_tokens:,} | {r.slim_json_tokens:,} |"
        )
    big = [r for r in rows if 2.0 <= r.megabytes <= 4.0]
    summary = []
    if big:
        summary.append(
            f"Bundles of 2 to 4 MB ({len(big)}): ingest + prompt takes "
            f"{statistics.median(r.vs_validation for r in big):.3f} of whole-Bundle validation "
            f"(worst {max(r.vs_validation for r in big):.3f}; goal ≤ 0.1) and "
            f"{statistics.median(r.vs_parse for r in big):.1f}× the orjson parse "
            f"(worst {max(r.vs_parse for r in big):.1f}×)."
        )
    largest = max(r.prompt_tokens for r in rows)
    whole = sum(r.safety_whole for r in rows)
    within = largest <= TOKEN_GOAL and whole == len(rows)
    summary.append(
        f"All {len(rows)} stays: median prompt {statistics.median(r.prompt_tokens for r in rows):,.0f} "
        f"tokens (max {largest:,}; the default budget is {DEFAULT_MAX_INPUT_TOKENS:,}) against a "
        f"median of {statistics.median(r.stay_json_tokens for r in rows):,.0f} tokens for the "
        f"stay's resources as JSON ({statistics.median(r.stay_json_tokens / r.prompt_tokens for r in rows):.0f}× "
        f"the prompt) and {statistics.median(r.slim_json_tokens for r in rows):,.0f} slimmed "
        f"({statistics.median(r.slim_json_tokens / r.prompt_tokens for r in rows):.0f}×). The safety "
        f"set is whole in {whole} of {len(rows)} prompts (its largest: "
        f"{max(r.safety_tokens for r in rows):,} tokens): "
        f"{'meets' if within else 'misses'} the goal of every stay within {TOKEN_GOAL:,} tokens "
        "with the safety set whole."
    )
    return "\n".join(lines) + "\n\n" + "\n\n".join(summary) + "\n"


def glance(rows: list[Row]) -> list[tuple[str, str, str, bool]]:
    """The goals' rows for bench/README.md's summary: (goal, figure, baseline, met)."""
    big = [r for r in rows if 2.0 <= r.megabytes <= 4.0]
    out = []
    if big:
        worst_v = max(r.vs_validation for r in big)
        worst_p = max(r.vs_parse for r in big)
        out.append(
            (
                "ingest + prompt, 2 to 4 MB Bundles: at most 0.1 of validation and 5× the parse",
                f"{statistics.median(r.vs_validation for r in big):.3f} of validation (worst "
                f"{worst_v:.3f}), {statistics.median(r.vs_parse for r in big):.1f}× the parse "
                f"(worst {worst_p:.1f}×), {len(big)} Bundles",
                "fhir.resources whole-Bundle validation; orjson parse",
                worst_v <= 0.1 and worst_p <= 5.0,
            )
        )
    largest = max(r.prompt_tokens for r in rows)
    whole = all(r.safety_whole for r in rows)
    out.append(
        (
            f"prompt tokens: every corpus stay within {TOKEN_GOAL:,}, safety set whole",
            f"max {largest:,} tokens over {len(rows)} stays; safety set whole in "
            f"{sum(r.safety_whole for r in rows)}; median "
            f"{statistics.median(r.stay_json_tokens / r.prompt_tokens for r in rows):.0f}× fewer "
            "tokens than the stay as JSON",
            "the stay's resources as JSON, whole and slimmed",
            largest <= TOKEN_GOAL and whole,
        )
    )
    return out


def plot(rows: list[Row], path: Path) -> None:
    """Two panels: time against Bundle size for the three paths, and tokens per stay."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    by_size = sorted(rows, key=lambda r: r.megabytes)
    sizes = [r.megabytes for r in by_size]
    for label, values, marker in (
        ("whole-Bundle R4B validation", [r.validate_ms for r in by_size], "s"),
        ("ingest + prompt", [r.ours_ms for r in by_size], "o"),
        ("orjson parse", [r.parse_ms for r in by_size], "^"),
    ):
        left.scatter(sizes, [statistics.median(v) for v in values], label=label, marker=marker)
    left.axvspan(2.0, 4.0, color="grey", alpha=0.12, label="2 to 4 MB (the goal's range)")
    left.set(xlabel="Bundle size (MB)", ylabel="ms (median)", yscale="log",
             title="Ingest + prompt against its baselines")  # fmt: skip
    left.legend(fontsize=8)
    by_json = sorted(rows, key=lambda r: r.stay_json_tokens)
    x = range(len(by_json))
    right.plot(x, [r.stay_json_tokens for r in by_json], "s-", label="stay's resources as JSON")
    right.plot(x, [r.slim_json_tokens for r in by_json], "^-", label="slimmed JSON")
    right.plot(x, [r.prompt_tokens for r in by_json], "o-", label="prompt")
    right.plot(x, [r.safety_tokens for r in by_json], ".-", label="safety set in the prompt")
    right.axhline(TOKEN_GOAL, color="red", linestyle="--", label=f"goal: {TOKEN_GOAL:,}")
    right.set(xlabel="stays, by JSON size", ylabel="Llama 3 tokens", yscale="log",
              title="Prompt tokens per stay")  # fmt: skip
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    files = sorted((SHARED / "fhir" / "synthea-r4").glob("*.json")) + sorted(
        (SHARED / "fhir" / "clinosim").glob("*.json")
    )
    print(markdown(measure(files, repeat=3)))
