"""Assemble a :class:`DischargeSummary` from a stay and its prose, whoever wrote the prose."""

from __future__ import annotations

from epicrisis.stay.context import Stay
from epicrisis.stay.time import offset_label
from epicrisis.summary import structured
from epicrisis.summary.extractive import Prose
from epicrisis.summary.model import (
    DischargeSummary,
    EncounterInfo,
    Item,
    PatientInfo,
    Provenance,
    Section,
    Sentence,
)
from epicrisis.summary.sections import SPEC_BY_KEY


def build_summary(stay: Stay, prose: Prose, provenance: Provenance) -> DischargeSummary:
    enc = stay.encounter
    tz = enc.tz
    sections = [
        structured.reason_for_visit(stay),
        structured.admission_diagnosis(stay),
        _prose_section("hospital_course", prose.hospital_course, []),
        structured.discharge_diagnosis(stay),
        structured.procedures(stay),
        structured.results(stay),
        structured.allergies(stay),
        structured.discharge_medications(stay),
        _prose_section("plan_of_treatment", prose.follow_up, structured.plan_items(stay)),
    ]
    if not stay.died_in_hospital:
        sections.append(_prose_section("discharge_instructions", prose.discharge_instructions, []))
    died = stay.patient.deceased
    return DischargeSummary(
        kind="death-summary" if stay.died_in_hospital else "discharge-summary",
        patient=PatientInfo(
            reference=stay.patient.ref,
            sex=stay.patient.sex,
            age_at_discharge=stay.patient.age_at_discharge,
            died=died.iso(tz) if died and stay.died_in_hospital else None,
        ),
        encounter=EncounterInfo(
            reference=enc.ref,
            class_code=enc.class_code,
            start=enc.start.iso(tz) if enc.start else None,
            end=enc.end.iso(tz) if enc.end else None,
            timezone=offset_label(tz),
            length_of_stay_days=enc.length_of_stay_days,
            types=[t.label for t in enc.types],
            admit_source=enc.admit_source.label if enc.admit_source else None,
            disposition=enc.disposition.label if enc.disposition else None,
        ),
        sections=sections,
        provenance=provenance,
        warnings=list(stay.warnings),
    )


def _prose_section(key: str, sentences: list[Sentence], items: list[Item]) -> Section:
    spec = SPEC_BY_KEY[key]
    empty = None if sentences or items else "Nothing recorded to report"
    return Section(
        key=key,
        title=spec.title,
        loinc=spec.loinc,
        items=items,
        narrative=list(sentences),
        empty_reason=empty,
    )
