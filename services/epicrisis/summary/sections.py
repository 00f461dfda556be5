"""The sections of a discharge summary (C-CDA on FHIR Discharge Summary, LOINC 18842-5)."""

from __future__ import annotations

from typing import NamedTuple

DOCUMENT_LOINC = "18842-5"
DOCUMENT_DISPLAY = "Discharge summary"


class SectionSpec(NamedTuple):
    key: str
    title: str
    loinc: str
    display: str


SECTIONS = (
    SectionSpec("reason_for_visit", "Reason for visit", "29299-5", "Reason for visit Narrative"),
    SectionSpec(
        "admission_diagnosis",
        "Admission diagnosis",
        "46241-6",
        "Hospital admission diagnosis Narrative - Reported",
    ),
    SectionSpec("hospital_course", "Hospital course", "8648-8", "Hospital course Narrative"),
    SectionSpec(
        "discharge_diagnosis", "Discharge diagnosis", "11535-2", "Hospital discharge Dx Narrative"
    ),
    SectionSpec("procedures", "Procedures", "47519-4", "History of Procedures Document"),
    SectionSpec(
        "results", "Results", "30954-2", "Relevant diagnostic tests/laboratory data Narrative"
    ),
    SectionSpec("allergies", "Allergies", "48765-2", "Allergies and adverse reactions Document"),
    SectionSpec(
        "discharge_medications",
        "Discharge medications",
        "10183-2",
        "Hospital discharge medications Narrative",
    ),
    SectionSpec(
        "plan_of_treatment", "Plan of treatment and follow-up", "18776-5", "Plan of care note"
    ),
    SectionSpec(
        "discharge_instructions",
        "Discharge instructions",
        "8653-8",
        "Hospital Discharge instructions",
    ),
)

SPEC_BY_KEY = {spec.key: spec for spec in SECTIONS}
