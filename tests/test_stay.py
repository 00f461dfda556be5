"""The stay: which encounter, which resources, medication reconciliation, time and death.

Bundles are built here, small and to the point of each rule.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from epicrisis.errors import StayError
from epicrisis.fhir import ingest
from epicrisis.pipeline import load_stay, render, summarize, summarize_stay
from epicrisis.stay import gather_stay
from epicrisis.stay.codec import StayDecodeError, decode_stay, encode_stay
from epicrisis.summary.render_fhir import render_fhir

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


# -- found in review: each of these was wrong once -------------------------------------


def test_orders_of_the_stay_without_a_take_home_category_are_never_new() -> None:
    stay = load_stay(
        bundle(
            patient(),
            encounter(),
            med_request(
                "done",
                "Ceftriaxone",
                "2193",
                status="completed",
                encounter_id="e1",
                authored="2024-06-10",
            ),
            med_request(
                "ip-stopped",
                "Vancomycin",
                "11124",
                status="stopped",
                category="inpatient",
                encounter_id="e1",
                authored="2024-06-10",
            ),
            med_request("nocat", "Furosemide", "4603", encounter_id="e1", authored="2024-06-11"),
        )
    )
    assert [(c.drug.label, c.status) for c in stay.discharge_medications] == [
        ("Furosemide", "inpatient-active")
    ]


def test_another_stays_orders_are_not_home_medications() -> None:
    stay = load_stay(
        bundle(
            patient(),
            encounter("old", start="2023-01-01T08:00:00+02:00", end="2023-01-03T08:00:00+02:00"),
            encounter(),
            med_request("old-ip", "Heparin", "5224", encounter_id="old", authored="2023-01-01"),
        )
    )
    assert stay.discharge_medications == ()


@pytest.mark.parametrize(
    ("deceased", "disposition", "death"),
    [
        ("2024-06-10", None, True),  # a date on the admission day (admitted 08:00)
        ("2024-06-14T20:00:00+02:00", "home", False),  # after a 10:00 discharge home
        (None, {"text": "Expired"}, True),  # text only, nothing coded
    ],
)
def test_death_in_hospital_by_date_time_or_text(
    deceased: str | None, disposition: Any, death: bool
) -> None:
    extra: dict[str, Any] = {}
    if disposition == "home":
        extra["hospitalization"] = {"dischargeDisposition": {"coding": [{"code": "home"}]}}
    elif disposition:
        extra["hospitalization"] = {"dischargeDisposition": disposition}
    pat = patient(deceasedDateTime=deceased) if deceased else patient()
    summary = summarize(bundle(pat, encounter(**extra)))
    assert (summary.kind == "death-summary") is death


def test_a_date_only_discharge_keeps_that_whole_day_and_its_offset() -> None:
    data = bundle(
        patient(),
        encounter(start="2024-06-15", end="2024-06-20T12:00:00+02:00"),
        observation("last-day", "2024-06-20T08:00:00+02:00", 3.5),
    )
    summary = summarize(data)
    assert summary.encounter.timezone == "UTC+02:00"
    assert "Observation/last-day" in summary.source_references()
    data = bundle(
        patient(),
        encounter(start="2024-06-15T10:00:00+02:00", end="2024-06-20"),
        observation("last-day", "2024-06-20T08:00:00+02:00", 3.5),
    )
    summary = summarize(data)
    assert "Observation/last-day" in summary.source_references()
    assert summary.encounter.length_of_stay_days == 5


def test_within_range_is_said_only_where_the_source_gives_a_range() -> None:
    def reading(oid: str, when: str, value: float, flag: str | None) -> dict[str, Any]:
        obs = observation(oid, when, value, encounter={"reference": "Encounter/e1"})
        del obs["referenceRange"]
        if flag:
            obs["interpretation"] = [{"coding": [{"code": flag}]}]
        return obs

    summary = summarize(
        bundle(
            patient(),
            encounter(),
            reading("k1", "2024-06-11T08:00:00+02:00", 6.8, "HH"),
            reading("k2", "2024-06-12T08:00:00+02:00", 6.1, None),
        )
    )
    course = " ".join(s.text for s in summary.section("hospital_course").narrative)
    assert "within range" not in course and "6.1 mg/dL at last measurement" in course


def test_an_unreadable_allergy_is_listed_not_read_as_no_allergies() -> None:
    broken = {
        "resourceType": "AllergyIntolerance",
        "id": "a1",
        "patient": {"reference": "Patient/p1"},
        "code": {"text": "Penicillin"},
        "onsetDateTime": "2019-13-45",
    }
    summary = summarize(bundle(patient(), encounter(), broken))
    section = summary.section("allergies")
    assert [i.status for i in section.items] == ["unreadable record"]
    assert section.items[0].sources == ["AllergyIntolerance/a1"]
    assert section.empty_reason is None


def test_no_known_allergy_is_a_statement_not_an_allergen() -> None:
    nka = {
        "resourceType": "AllergyIntolerance",
        "id": "nka",
        "patient": {"reference": "Patient/p1"},
        "code": {
            "coding": [
                {
                    "system": "http://snomed.info/sct",
                    "code": "716186003",
                    "display": "No known allergy",
                }
            ]
        },
    }
    summary = summarize(bundle(patient(), encounter(), nka))
    assert [i.status for i in summary.section("allergies").items] == ["no known allergy"]
    instructions = " ".join(s.text for s in summary.section("discharge_instructions").narrative)
    assert "Avoid" not in instructions


def test_readings_in_different_units_are_different_series() -> None:
    celsius = observation(
        "t1", "2024-06-11T08:00:00+02:00", 39.4, encounter={"reference": "Encounter/e1"}
    )
    fahrenheit = observation(
        "t2", "2024-06-12T08:00:00+02:00", 98.6, encounter={"reference": "Encounter/e1"}
    )
    fahrenheit["valueQuantity"]["unit"] = "[degF]"
    stay = load_stay(bundle(patient(), encounter(), celsius, fahrenheit))
    assert sorted(len(s.readings) for s in stay.observations) == [1, 1]


def test_a_resource_without_subject_belongs_to_nobody_in_a_bundle_of_two_patients() -> None:
    other = {"resourceType": "Patient", "id": "p2"}
    orphan = observation("orphan", "2024-06-11T08:00:00+02:00", 1.0)
    del orphan["subject"]
    stay = load_stay(bundle(patient(), other, encounter(), orphan))
    assert stay.observations == ()


def test_a_versioned_encounter_reference_still_links_to_the_stay() -> None:
    enc = encounter(meta={"versionId": "3"})
    obs = observation(
        "o1", "2024-06-11T08:00:00+02:00", 2.0, encounter={"reference": "Encounter/e1/_history/2"}
    )
    stay = load_stay(bundle(patient(), enc, obs))
    assert [r.ref for s in stay.observations for r in s.readings] == ["Observation/o1"]


def test_reason_reference_conditions_are_reasons_for_visit() -> None:
    cond = {
        "resourceType": "Condition",
        "id": "c1",
        "subject": {"reference": "Patient/p1"},
        "code": {"text": "Chest pain"},
    }
    summary = summarize(
        bundle(patient(), encounter(reasonReference=[{"reference": "Condition/c1"}]), cond)
    )
    items = summary.section("reason_for_visit").items
    assert [(i.text, i.sources) for i in items] == [("Chest pain", ["Condition/c1"])]


def test_raw_json_of_unread_entries_never_crashes_the_gathering() -> None:
    cond = {
        "resourceType": "Condition",
        "id": "c9",
        "subject": {"reference": "Patient/p1"},
        "clinicalStatus": {"coding": [{"code": ["active"]}]},
        "code": {"text": "x"},
    }
    order = med_request("odd", "Aspirin", "1191")
    order["status"] = ["active"]
    summary = summarize(bundle(patient(), encounter(), cond, order))
    assert summary.kind == "discharge-summary"


def test_ratio_values_are_kept_as_text() -> None:
    titre = observation(
        "titre", "2024-06-11T08:00:00+02:00", 0, encounter={"reference": "Encounter/e1"}
    )
    del titre["valueQuantity"], titre["referenceRange"]
    titre["valueRatio"] = {"numerator": {"value": 1}, "denominator": {"value": 40}}
    summary = summarize(bundle(patient(), encounter(), titre))
    assert any("1:40" in i.text for i in summary.section("results").items)


def test_control_characters_never_reach_the_terminal_or_the_document() -> None:
    cond = {
        "resourceType": "Condition",
        "id": "c1",
        "subject": {"reference": "Patient/p1"},
        "encounter": {"reference": "Encounter/e1"},
        "category": [{"coding": [{"code": "encounter-diagnosis"}]}],
        "code": {"text": "Pneu\x1b[31mmonia\x00"},
    }
    summary = summarize(bundle(patient(), encounter(), cond))
    for fmt in ("text", "fhir"):
        out = render(summary, fmt)
        assert "\x1b" not in out and "\x00" not in out and "\\u0000" not in out


def test_type_names_and_keys_the_input_invents_are_never_repeated() -> None:
    from epicrisis.errors import InputError

    with pytest.raises(InputError) as raised:
        summarize(json.dumps({"resourceType": "MaryJonesHivPositive"}).encode())
    assert "MaryJones" not in str(raised.value)
    odd = observation(
        "o1", "2024-06-11T08:00:00+02:00", 2.0, encounter={"reference": "Encounter/e1"}
    )
    odd["hivPositiveJohnSmith"] = True
    summary = summarize(bundle(patient(), encounter(), odd))
    assert summary.warnings and all("JohnSmith" not in (w.path or "") for w in summary.warnings)


# -- the stay as the server hands it to a queued worker (stay.codec) ---------------------------


def test_every_corpus_stay_survives_encoding_and_summarizes_the_same(corpus_bundle: Path) -> None:
    try:
        stay = load_stay(corpus_bundle.read_bytes())
    except StayError:
        pytest.skip("no finished inpatient stay")
    decoded = decode_stay(encode_stay(stay))
    assert decoded == stay
    assert decoded.encounter.tz.utcoffset(None) == stay.encounter.tz.utcoffset(None)
    summary = summarize_stay(decoded)
    assert summary == summarize_stay(stay)
    assert render_fhir(summary, version="t") == render_fhir(summarize_stay(stay), version="t")


@pytest.mark.parametrize(
    "data", [b"{}", b"[]", b"not json", b'{"patient": "ZEBRA-SENTINEL"}'], ids=repr
)
def test_bytes_that_are_not_a_stay_fail_without_echoing_them(data: bytes) -> None:
    with pytest.raises(StayDecodeError) as raised:
        decode_stay(data)
    assert "ZEBRA" not in str(raised.value) and "does not decode" in str(raised.value)
