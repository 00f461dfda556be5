"""Every inpatient stay of the shared corpus summarizes, cited and complete, in every format.

The oracles read the raw JSON independently of the pipeline's own stay gathering, so a
pipeline that drops a diagnosis or an allergy, or cites something absent, fails here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.bundle import Bundle

from epicrisis.errors import StayError
from epicrisis.pipeline import render, summarize
from epicrisis.summary.model import DischargeSummary
from epicrisis.summary.sections import SECTIONS

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "fhir"
FILES = (
    sorted(p for d in ("clinosim", "synthea-r4") for p in (DATA / d).glob("*.json"))
    if DATA.is_dir()
    else []
)
NO_STAY = {"Buster_Hoeger", "Clemente_Kreiger", "practitionerInformation"}

pytestmark = [
    pytest.mark.corpus,
    pytest.mark.skipif(not DATA.is_dir(), reason="shared corpus not found at ../shared/data/fhir"),
]


def _has_stay(path: Path) -> bool:
    return not any(path.name.startswith(prefix) for prefix in NO_STAY)


STAY_FILES = [p for p in FILES if _has_stay(p)]


@pytest.fixture(scope="module")
def summaries() -> dict[str, tuple[bytes, DischargeSummary]]:
    return {p.name: (p.read_bytes(), summarize(p.read_bytes())) for p in STAY_FILES}


def _raw_entries(data: bytes) -> list[dict[str, Any]]:
    return [e for e in json.loads(data)["entry"] if "resource" in e]


def _names_of(entry: dict[str, Any]) -> set[str]:
    """Every way a reference may name this entry: Type/id, fullUrl."""
    res = entry["resource"]
    names = {f"{res['resourceType']}/{res['id']}"} if "id" in res else set()
    if "fullUrl" in entry:
        names.add(entry["fullUrl"])
    return names


def _ref_ids(value: Any) -> set[str]:
    """A reference as the ``Type/id`` it ends with, or as is (urn:uuid)."""
    ref = value.get("reference", "") if isinstance(value, dict) else ""
    parts = ref.split("/")
    return {ref, "/".join(parts[-2:])} if len(parts) >= 2 else {ref}


def test_there_are_stays_to_summarize() -> None:
    assert len(STAY_FILES) >= 39


@pytest.mark.parametrize("path", STAY_FILES, ids=lambda p: p.stem[:40])
def test_every_stay_summarizes_in_all_formats(path: Path, summaries: dict[str, Any]) -> None:
    data, summary = summaries[path.name]
    as_json = json.loads(render(summary, "json"))
    assert as_json["encounter"]["reference"] == summary.encounter.reference
    text = render(summary, "text")
    assert "DISCHARGE SUMMARY" in text or "DEATH SUMMARY" in text

    document = json.loads(render(summary, "fhir"))
    Bundle.model_validate(document)
    assert document["type"] == "document"
    composition = document["entry"][0]["resource"]
    assert composition["resourceType"] == "Composition"
    assert composition["type"]["coding"][0]["code"] == "18842-5"
    device = document["entry"][1]["resource"]
    assert composition["author"][0]["reference"] == document["entry"][1]["fullUrl"]
    assert device["resourceType"] == "Device"
    expected = [
        s.loinc for s in SECTIONS if not (summary.kind == "death-summary" and s.loinc == "8653-8")
    ]
    assert [s["code"]["coding"][0]["code"] for s in composition["section"]] == expected
    known = set().union(*(_names_of(e) for e in _raw_entries(data)))
    for section in composition["section"]:
        assert section["text"]["div"].startswith("<div xmlns=")
        for entry in section.get("entry", []):
            assert entry["reference"] in known


@pytest.mark.parametrize("path", STAY_FILES, ids=lambda p: p.stem[:40])
def test_every_source_resolves_to_an_input_resource(path: Path, summaries: dict[str, Any]) -> None:
    data, summary = summaries[path.name]
    known = set().union(*(_names_of(e) for e in _raw_entries(data)))
    sources = summary.source_references()
    assert sources, "a summary must cite something"
    for ref in sources:
        assert ref.split("#")[0] in known, f"{ref} is not a resource of the input"


@pytest.mark.parametrize("path", STAY_FILES, ids=lambda p: p.stem[:40])
def test_every_encounter_diagnosis_is_a_discharge_diagnosis(
    path: Path, summaries: dict[str, Any]
) -> None:
    data, summary = summaries[path.name]
    stay_names = set()
    for entry in _raw_entries(data):
        if entry["resource"][
            "resourceType"
        ] == "Encounter" and summary.encounter.reference in _names_of(entry):
            stay_names = _names_of(entry)
    expected = set()
    for entry in _raw_entries(data):
        res = entry["resource"]
        if res["resourceType"] != "Condition":
            continue
        categories = {
            c.get("code") for cat in res.get("category", []) for c in cat.get("coding", [])
        }
        verification = {c.get("code") for c in res.get("verificationStatus", {}).get("coding", [])}
        if (
            "encounter-diagnosis" in categories
            and _ref_ids(res.get("encounter")) & stay_names
            and not verification & {"refuted", "entered-in-error"}
        ):
            expected.add(f"Condition/{res['id']}")
    section = summary.section("discharge_diagnosis")
    cited = {ref for item in section.items for ref in item.sources}
    assert expected <= cited


@pytest.mark.parametrize("path", STAY_FILES, ids=lambda p: p.stem[:40])
def test_every_active_allergy_is_listed(path: Path, summaries: dict[str, Any]) -> None:
    data, summary = summaries[path.name]
    expected = set()
    for entry in _raw_entries(data):
        res = entry["resource"]
        if res["resourceType"] != "AllergyIntolerance":
            continue
        status = {c.get("code") for c in res.get("clinicalStatus", {}).get("coding", [])}
        verification = {c.get("code") for c in res.get("verificationStatus", {}).get("coding", [])}
        if not status & {"inactive", "resolved"} and not verification & {
            "refuted",
            "entered-in-error",
        }:
            expected.add(f"AllergyIntolerance/{res['id']}")
    section = summary.section("allergies")
    cited = {ref for item in section.items for ref in item.sources}
    assert cited == expected
    if not expected:
        assert section.empty_reason and "No allergies recorded" in section.empty_reason


@pytest.mark.parametrize("path", STAY_FILES[:6], ids=lambda p: p.stem[:40])
def test_same_input_same_output_byte_for_byte(path: Path, summaries: dict[str, Any]) -> None:
    data, summary = summaries[path.name]
    again = summarize(data)
    for fmt in ("json", "text", "fhir"):
        assert render(again, fmt) == render(summary, fmt)


@pytest.mark.parametrize("path", [p for p in FILES if not _has_stay(p)], ids=lambda p: p.stem[:40])
def test_bundles_without_a_stay_are_refused_with_advice(path: Path) -> None:
    with pytest.raises(StayError, match="--encounter"):
        summarize(path.read_bytes())


def test_a_death_in_hospital_is_a_death_summary(summaries: dict[str, Any]) -> None:
    deaths = [s for _, s in summaries.values() if s.kind == "death-summary"]
    assert deaths, "the corpus has a patient who died in hospital"
    for summary in deaths:
        assert summary.section("discharge_instructions") is None
        assert not summary.section("discharge_medications").items
        assert summary.patient.died
        assert any(
            "died in hospital" in s.text for s in summary.section("hospital_course").narrative
        )


def test_discharge_medications_are_reconciled(summaries: dict[str, Any]) -> None:
    _, summary = summaries["acute_kidney_injury_1.json"]
    items = summary.section("discharge_medications").items
    by_source = {ref: item for item in items for ref in item.sources}
    assert by_source["MedicationRequest/rxdc-5446da418dd5"].status == "new"
    assert all(item.sources for item in items)
