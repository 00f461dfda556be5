"""The stay: which encounter, which resources, medication reconciliation, time and death.

Bundles are built here, small and to the point of each rule.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from epicrisis.errors import StayError
from epicrisis.fhir import ingest
from epicrisis.pipeline import load_stay, render, summarize
from epicrisis.stay import gather_stay

BASE = "https://ehr.example.org/fhir/"
RX = "http://www.nlm.nih.gov/research/umls/rxnorm"


def bundle(*resources: dict[str, Any]) -> bytes:
    entries = [
        {"fullUrl": f"{BASE}{r['resourceType']}/{r['id']}", "resource": r} for r in resources
    ]
    return json.dumps({"resourceType": "Bundle", "type": "collection", "entry": entries}).encode()


def patient(**extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": "p1",
        "gender": "female",
        "birthDate": "1950-03-02",
        **extra,
    }


def encounter(
    eid: str = "e1",
    start: str = "2024-06-10T08:00:00+02:00",
    end: str = "2024-06-14T10:00:00+02:00",
    code: str = "IMP",
    status: str = "finished",
    **extra: Any,
) -> dict[str, Any]:
    return {
        "resourceType": "Encounter",
        "id": eid,
        "status": status,
        "class": {"code": code},
        "subject": {"reference": "Patient/p1"},
        "period": {"start": start, "end": end},
        **extra,
    }


def med_request(
    mid: str,
    drug: str,
    code: str,
    *,
    status: str = "active",
    dose: str | None = None,
    category: str | None = None,
    encounter_id: str | None = None,
    authored: str = "2023-01-01",
) -> dict[str, Any]:
    res: dict[str, Any] = {
        "resourceType": "MedicationRequest",
        "id": mid,
        "status": status,
        "intent": "order",
        "medicationCodeableConcept": {"coding": [{"system": RX, "code": code, "display": drug}]},
        "subject": {"reference": "Patient/p1"},
        "authoredOn": authored,
    }
    if dose:
        res["dosageInstruction"] = [{"text": dose}]
    if category:
        res["category"] = [{"coding": [{"code": category}]}]
    if encounter_id:
        res["encounter"] = {"reference": f"Encounter/{encounter_id}"}
    return res


def observation(oid: str, when: str, value: float, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "category": [{"coding": [{"code": "laboratory"}]}],
        "code": {
            "coding": [{"system": "http://loinc.org", "code": "2160-0", "display": "Creatinine"}]
        },
        "subject": {"reference": "Patient/p1"},
        "effectiveDateTime": when,
        "valueQuantity": {"value": value, "unit": "mg/dL"},
        "referenceRange": [{"low": {"value": 0.6}, "high": {"value": 1.2}}],
        **extra,
    }


def test_medications_are_reconciled_against_before_admission() -> None:
    stay = load_stay(
        bundle(
            patient(),
            encounter(),
            med_request("home-a", "Lisinopril", "29046", dose="10 mg daily"),
            med_request("home-b", "Metformin", "6809", dose="500 mg bid"),
            med_request("home-c", "Aspirin", "1191", dose="81 mg daily"),
            med_request("home-old", "Warfarin", "11289", status="stopped"),
            med_request(
                "dc-a",
                "Lisinopril",
                "29046",
                dose="20 mg daily",
                category="discharge",
                encounter_id="e1",
                authored="2024-06-14",
            ),
            med_request(
                "dc-b",
                "Metformin",
                "6809",
                dose="500 mg bid",
                category="discharge",
                encounter_id="e1",
                authored="2024-06-14",
            ),
            med_request(
                "dc-d",
                "Apixaban",
                "1364430",
                dose="5 mg bid",
                category="discharge",
                encounter_id="e1",
                authored="2024-06-14",
            ),
            med_request(
                "dc-c",
                "Aspirin",
                "1191",
                status="stopped",
                category="discharge",
                encounter_id="e1",
                authored="2024-06-14",
            ),
            med_request(
                "ip-e",
                "Heparin",
                "5224",
                category="inpatient",
                encounter_id="e1",
                authored="2024-06-10",
            ),
            med_request(
                "ip-f",
                "Ondansetron",
                "26225",
                status="completed",
                category="inpatient",
                encounter_id="e1",
                authored="2024-06-10",
            ),
        )
    )
    by_drug = {c.drug.label: c for c in stay.discharge_medications}
    assert by_drug["Lisinopril"].status == "changed"
    assert by_drug["Lisinopril"].previous_dosage == "10 mg daily"
    assert by_drug["Lisinopril"].refs == ("MedicationRequest/home-a", "MedicationRequest/dc-a")
    assert by_drug["Metformin"].status == "continued"
    assert by_drug["Apixaban"].status == "new"
    assert by_drug["Aspirin"].status == "stopped"
    assert by_drug["Heparin"].status == "inpatient-active"
    assert "Ondansetron" not in by_drug and "Warfarin" not in by_drug
    assert [c.status for c in stay.discharge_medications] == [
        "new",
        "changed",
        "continued",
        "stopped",
        "inpatient-active",
    ]


def test_the_latest_finished_inpatient_stay_is_chosen_unless_one_is_named() -> None:
    data = bundle(
        patient(),
        encounter("old", start="2020-01-01T08:00:00Z", end="2020-01-03T08:00:00Z"),
        encounter("new", start="2024-01-01T08:00:00Z", end="2024-01-05T08:00:00Z"),
        encounter(
            "open", start="2024-05-01T08:00:00Z", end="2024-05-02T08:00:00Z", status="in-progress"
        ),
        encounter("er", start="2024-06-01T08:00:00Z", end="2024-06-01T12:00:00Z", code="EMER"),
        encounter("clinic", start="2024-07-01T08:00:00Z", end="2024-07-01T09:00:00Z", code="AMB"),
    )
    assert summarize(data).encounter.reference == "Encounter/new"
    assert summarize(data, encounter_id="old").encounter.reference == "Encounter/old"
    assert (
        summarize(data, encounter_id="Encounter/clinic").encounter.reference == "Encounter/clinic"
    )
    assert summarize(data, encounter_id=f"{BASE}Encounter/er").encounter.reference == "Encounter/er"
    with pytest.raises(StayError, match="no Encounter with id nope"):
        summarize(data, encounter_id="nope")


def test_an_emergency_visit_only_when_asked() -> None:
    data = bundle(patient(), encounter("er", code="EMER"))
    with pytest.raises(StayError, match="--encounter"):
        summarize(data)
    assert summarize(data, allow_emergency=True).encounter.reference == "Encounter/er"


def test_times_are_shown_in_the_encounters_own_offset() -> None:
    data = bundle(
        patient(),
        encounter(),
        observation("o1", "2024-06-11T04:30:00Z", 2.3, encounter={"reference": "Encounter/e1"}),
    )
    summary = summarize(data)
    assert summary.encounter.start == "2024-06-10T08:00:00+02:00"
    assert summary.encounter.timezone == "UTC+02:00"
    results = summary.section("results")
    assert "on 2024-06-11 06:30" in results.items[0].text


def test_observations_without_an_encounter_count_inside_the_window_only() -> None:
    data = bundle(
        patient(),
        encounter(),
        observation("inside", "2024-06-12T08:00:00+02:00", 2.0),
        observation("before", "2024-05-01T08:00:00+02:00", 1.0),
        observation(
            "other-visit",
            "2024-06-12T09:00:00+02:00",
            3.0,
            encounter={"reference": "Encounter/elsewhere"},
        ),
    )
    stay = load_stay(data)
    refs = {r.ref for s in stay.observations for r in s.readings}
    assert refs == {"Observation/inside"}


def test_partial_dates_give_a_valid_document() -> None:
    data = bundle(patient(), encounter(start="2024-02", end="2024-03"))
    document = json.loads(render(summarize(data), "fhir"))
    assert document["timestamp"] == "2024-03-01T00:00:00Z"
    assert document["entry"][0]["resource"]["date"] == "2024-03"


def test_offsets_beyond_the_calendar_are_ignored_not_fatal() -> None:
    data = bundle(
        patient(), encounter(start="0001-01-01T00:30:00+01:00", end="9999-12-31T23:59:59-14:00")
    )
    summary = summarize(data)
    assert summary.encounter.start is None and summary.encounter.end is None
    for fmt in ("json", "text", "fhir"):
        assert render(summary, fmt)


def test_a_dangling_diagnosis_is_a_warning_with_its_path() -> None:
    enc = encounter(diagnosis=[{"condition": {"reference": "Condition/missing"}}])
    summary = summarize(bundle(patient(), enc))
    dangling = [w for w in summary.warnings if w.code == "dangling-reference"]
    assert [w.path for w in dangling] == ["entry[1].resource.diagnosis[0].condition"]
    assert dangling[0].entry_index == 1 and dangling[0].resource_type == "Encounter"


def test_a_death_date_inside_the_stay_makes_a_death_summary() -> None:
    summary = summarize(bundle(patient(deceasedDateTime="2024-06-14T09:00:00+02:00"), encounter()))
    assert summary.kind == "death-summary"
    assert summary.patient.died == "2024-06-14T09:00:00+02:00"
    assert summary.section("discharge_instructions") is None


def test_a_death_years_after_the_stay_does_not() -> None:
    summary = summarize(bundle(patient(deceasedDateTime="2030-01-01T00:00:00Z"), encounter()))
    assert summary.kind == "discharge-summary"


def test_the_problem_list_keeps_active_problems_only() -> None:
    def condition(cid: str, status: str, verification: str = "confirmed") -> dict[str, Any]:
        return {
            "resourceType": "Condition",
            "id": cid,
            "subject": {"reference": "Patient/p1"},
            "clinicalStatus": {"coding": [{"code": status}]},
            "verificationStatus": {"coding": [{"code": verification}]},
            "category": [{"coding": [{"code": "problem-list-item"}]}],
            "code": {"text": f"problem {cid}"},
            "onsetDateTime": "2019-01-01",
        }

    stay = gather_stay(
        ingest(
            bundle(
                patient(),
                encounter(),
                condition("active", "active"),
                condition("gone", "resolved"),
                condition("wrong", "active", "refuted"),
                condition("mistake", "active", "entered-in-error"),
            )
        )
    )
    assert [c.ref for c in stay.problems] == ["Condition/active"]


def test_age_is_at_discharge() -> None:
    summary = summarize(bundle(patient(birthDate="1950-06-14"), encounter()))
    assert summary.patient.age_at_discharge == 74
    summary = summarize(bundle(patient(birthDate="1950-06-15"), encounter()))
    assert summary.patient.age_at_discharge == 73


def test_gathering_twice_from_one_ingest_reports_each_warning_once() -> None:
    enc = encounter(diagnosis=[{"condition": {"reference": "Condition/missing"}}])
    ingested = ingest(bundle(patient(), enc))
    first = gather_stay(ingested)
    second = gather_stay(ingested)
    assert len(first.warnings) == len(second.warnings) == 1
