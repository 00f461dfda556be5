"""The one code path from Bundle bytes to a summary; the CLI, the worker and tests call it."""

from __future__ import annotations

from typing import Literal, TypedDict, Unpack

import orjson

from epicrisis import __version__
from epicrisis.config import Limits
from epicrisis.fhir import ingest
from epicrisis.prompt import PromptResult, Tokenizer, build_messages
from epicrisis.stay import Stay, gather_stay
from epicrisis.summary.build import build_summary
from epicrisis.summary.extractive import extractive_prose
from epicrisis.summary.model import DischargeSummary, Provenance
from epicrisis.summary.render_fhir import render_fhir
from epicrisis.summary.render_text import render_text

Format = Literal["json", "text", "fhir"]
EXTRACTIVE = f"epicrisis-extractive/{__version__}"


class StayOptions(TypedDict, total=False):
    """Which stay to summarize and how strictly: shared by every entry point."""

    encounter_id: str | None
    strict: bool
    allow_emergency: bool
    limits: Limits | None


def load_stay(bundle: bytes, **options: Unpack[StayOptions]) -> Stay:
    """Ingest the Bundle and gather the stay to summarize (the named one, else the latest)."""
    limits = options.get("limits")
    return gather_stay(
        ingest(bundle, limits=limits),
        options.get("encounter_id"),
        limits=limits,
        strict=options.get("strict", False),
        allow_emergency=options.get("allow_emergency", False),
    )


def summarize(bundle: bytes, **options: Unpack[StayOptions]) -> DischargeSummary:
    """Summarize one stay with the extractive backend: deterministic, no model, no network."""
    return summarize_stay(load_stay(bundle, **options))


def summarize_stay(stay: Stay) -> DischargeSummary:
    provenance = Provenance(generator=EXTRACTIVE, backend="extractive")
    return build_summary(stay, extractive_prose(stay), provenance)


def build_prompt(
    bundle: bytes,
    *,
    max_input_tokens: int | None = None,
    tokenizer: Tokenizer | None = None,
    **options: Unpack[StayOptions],
) -> PromptResult:
    """The Med42-v2 chat messages for one stay, within ``max_input_tokens``."""
    stay = load_stay(bundle, **options)
    return build_messages(stay, tokenizer=tokenizer, max_input_tokens=max_input_tokens)


def render(summary: DischargeSummary, fmt: Format) -> str:
    if fmt == "json":
        return (
            orjson.dumps(summary.model_dump(mode="json"), option=orjson.OPT_INDENT_2).decode()
            + "\n"
        )
    if fmt == "text":
        return render_text(summary)
    return render_fhir(summary, version=__version__)
