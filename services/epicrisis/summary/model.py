"""The discharge summary as typed data: the API shape every renderer and caller reads."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from epicrisis.fhir.bundle import DataWarning


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Code(_Frozen):
    system: str | None = None
    code: str | None = None
    display: str | None = None


class Item(_Frozen):
    """One structured fact (a diagnosis, a drug, a result) with the resources it came from."""

    text: str
    codes: list[Code] = Field(default_factory=list)
    status: str | None = None
    date: str | None = None
    sources: list[str]


class Sentence(_Frozen):
    """One sentence of prose and the references of every resource it rests on."""

    text: str
    sources: list[str]


class Section(_Frozen):
    key: str
    title: str
    loinc: str
    items: list[Item] = Field(default_factory=list)
    narrative: list[Sentence] = Field(default_factory=list)
    empty_reason: str | None = None


class PatientInfo(_Frozen):
    reference: str
    sex: str | None
    age_at_discharge: int | None
    died: str | None = None


class EncounterInfo(_Frozen):
    reference: str
    class_code: str | None
    start: str | None
    end: str | None
    timezone: str
    length_of_stay_days: float | None
    types: list[str]
    admit_source: str | None
    disposition: str | None


class Omission(_Frozen):
    section: str
    count: int
    tokens: int | None = None


class Provenance(_Frozen):
    """How the summary was made: enough to audit it, nothing about the patient."""

    generator: str
    backend: Literal["extractive", "llm"]
    model: str | None = None
    fallback: bool = False
    fallback_reason: str | None = None
    prompt_tokens: int | None = None
    generated_tokens: int | None = None
    prompt_budget_used: float | None = None  # the last prompt's tokens / its token budget
    omitted: list[Omission] = Field(default_factory=list)
    grounding: float | None = None
    timings_ms: dict[str, float] | None = None


class DischargeSummary(_Frozen):
    kind: Literal["discharge-summary", "death-summary"]
    patient: PatientInfo
    encounter: EncounterInfo
    sections: list[Section]
    provenance: Provenance
    warnings: list[DataWarning] = Field(default_factory=list)

    def section(self, key: str) -> Section | None:
        return next((s for s in self.sections if s.key == key), None)

    def source_references(self) -> list[str]:
        """Every reference cited anywhere in the summary, once each, in order."""
        refs: dict[str, None] = {}
        for section in self.sections:
            for sources in section_sources(section):
                refs.update(dict.fromkeys(sources))
        return list(refs)


def section_sources(section: Section) -> list[list[str]]:
    """The source lists of a section's sentences and items."""
    return [s.sources for s in section.narrative] + [i.sources for i in section.items]
