"""Ingest: the shared corpus, reference resolution, the bad-input corpus, warnings, fuzzing.

Every bad input carries SENTINEL where clinical content would be (names, values, text); no
error or warning may repeat it, since messages name *where* and *what rule*, never the value.
"""

from __future__ import annotations

import codecs
import copy
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from epicrisis.config import Limits
from epicrisis.errors import BundleError, EntryError, InputError, StayError
from epicrisis.fhir import DataWarning, Entry, IngestedBundle, ingest
from epicrisis.fhir import bundle as bundle_module
from epicrisis.fhir.bundle import BUNDLE_TYPES
from epicrisis.fhir.references import ReferenceResolver
from epicrisis.fhir.validate import ElementMemo, validate_entry
from epicrisis.pipeline import summarize
from epicrisis.stay import gather_stay

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SENTINEL = "ZEBRA-SENTINEL"
ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
BASE = "https://ehr.example.test/fhir/"


def fixture_bytes(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def fixture_json(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(fixture_bytes(name))
    return doc


def dumps(doc: Any) -> bytes:
    return orjson.dumps(doc)


def bundle(entries: list[Any], btype: str = "collection", **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": btype, **extra, "entry": entries}


def rest(resource: dict[str, Any], base: str = BASE) -> dict[str, Any]:
    """An entry with a RESTful fullUrl ``base + Type/id``."""
    return {"fullUrl": f"{base}{resource['resourceType']}/{resource['id']}", "resource": resource}


def by_ref(bundle: IngestedBundle, local_ref: str) -> Entry:
    (entry,) = [e for e in bundle.entries if e.local_ref == local_ref]
    return entry


# --------------------------------------------------------------------------- shared corpus


@pytest.mark.corpus
def test_corpus_bundle_ingests(corpus_bundle: Path) -> None:
    raw = orjson.loads(corpus_bundle.read_bytes())
    bundle = ingest(corpus_bundle.read_bytes())

    assert bundle.bundle_type == raw["type"]
    assert len(bundle.entries) == len(raw["entry"]) > 0
    assert [e.index for e in bundle.entries] == list(range(len(raw["entry"])))
    # Every reference between the clinical resources of the stay resolves, to the right type
    # (clinosim cites departments, devices and locations it does not export: those may dangle).
    resolver = ReferenceResolver(bundle)
    checked = 0
    for entry in bundle.entries:
        for ref in _references(entry.resource):
            target = resolver.resolve(ref, source=entry)
            kind = ref.split("/")[-2] if "/" in ref else None
            if ref.startswith("urn:uuid:") or kind in CLINICAL:
                assert target is not None, f"{entry.local_ref}: {ref} does not resolve"
                assert kind is None or target.resource_type == kind
                checked += 1
    assert checked > 0 or not bundle.of_type("Encounter")


CLINICAL = {
    "Patient",
    "Encounter",
    "Condition",
    "Observation",
    "Procedure",
    "Medication",
    "MedicationRequest",
    "DiagnosticReport",
    "DocumentReference",
    "AllergyIntolerance",
}


def _references(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                yield value
            elif key != "contained":
                yield from _references(value)
    elif isinstance(node, list):
        for value in node:
            yield from _references(value)


# --------------------------------------------------------------------------- accepted shapes


def test_no_epicrisis_setting_leaks_into_tests() -> None:
    """conftest's isolation: limits and paths come from the test, not the developer's shell."""
    leaked = [name for name in os.environ if name.startswith("EPICRISIS_")]
    assert leaked == ["EPICRISIS_METRICS_PORT"]  # conftest's own: any free port for /metrics
    assert os.environ["EPICRISIS_METRICS_PORT"] == "0"
    assert Limits() == Limits(max_bundle_bytes=64 * 1024 * 1024, max_entries=100_000)


def test_all_nine_r4_bundle_types_are_accepted() -> None:
    nine = {
        "document",
        "message",
        "transaction",
        "transaction-response",
        "batch",
        "batch-response",
        "history",
        "searchset",
        "collection",
    }
    assert nine == BUNDLE_TYPES
    patient = {"resourceType": "Patient", "id": "p"}
    for btype in sorted(nine):
        ingested = ingest(dumps(bundle([rest(patient)], btype)))
        assert ingested.bundle_type == btype
        assert [e.local_ref for e in ingested.entries] == ["Patient/p"]


@pytest.mark.parametrize(
    ("name", "btype", "encounter"),
    [
        ("collection-relative.json", "collection", "Encounter/enc-1"),
        (
            "transaction-urn-uuid.json",
            "transaction",
            "Encounter/6f1c0a52-0000-4000-8000-000000000002",
        ),
        ("document.json", "document", "Encounter/enc-doc"),
        ("batch.json", "batch", "Encounter/enc-batch"),
        ("death-in-hospital.json", "searchset", "Encounter/enc-exp"),
        ("degraded.json", "searchset", "Encounter/enc-deg"),
    ],
)
def test_fixture_bundles_ingest_and_summarize(name: str, btype: str, encounter: str) -> None:
    ingested = ingest(fixture_bytes(name))
    assert ingested.bundle_type == btype
    summary = summarize(fixture_bytes(name))
    assert summary.encounter.reference == encounter


def test_entries_without_a_resource_are_skipped_not_refused() -> None:
    ingested = ingest(fixture_bytes("transaction-urn-uuid.json"))  # last entry is a DELETE
    assert [e.index for e in ingested.entries] == [0, 1, 2, 3]


def test_document_bundle_starts_with_its_composition() -> None:
    ingested = ingest(fixture_bytes("document.json"))
    assert ingested.entries[0].resource_type == "Composition"
    resolver = ReferenceResolver(ingested)
    comp = ingested.entries[0]
    subject = resolver.resolve_field(comp.resource["subject"], source=comp)
    assert subject is not None and subject.local_ref == "Patient/pt-doc"


def test_death_in_hospital_from_discharge_disposition_alone() -> None:
    doc = fixture_json("death-in-hospital.json")
    assert "deceasedDateTime" not in doc["entry"][0]["resource"]
    summary = summarize(dumps(doc)).model_dump(mode="json")
    assert summary["patient"]["died"] == "2024-01-09T03:40:00+00:00"
    alive = copy.deepcopy(doc)
    alive["entry"][1]["resource"]["hospitalization"]["dischargeDisposition"]["coding"][0][
        "code"
    ] = "home"
    assert summarize(dumps(alive)).model_dump(mode="json")["patient"]["died"] is None


def test_a_utf8_bom_is_accepted() -> None:
    data = fixture_bytes("collection-relative.json")
    with_bom = codecs.BOM_UTF8 + data
    assert [e.local_ref for e in ingest(with_bom).entries] == [
        e.local_ref for e in ingest(data).entries
    ]
    assert summarize(with_bom) == summarize(data)


def test_history_bundle_may_repeat_a_fullurl_with_other_versions() -> None:
    v1 = {"resourceType": "Patient", "id": "p", "meta": {"versionId": "1"}, "gender": "male"}
    v2 = {"resourceType": "Patient", "id": "p", "meta": {"versionId": "2"}, "gender": "female"}
    ingested = ingest(dumps(bundle([rest(v2), rest(v1)], "history")))
    assert [e.resource["meta"]["versionId"] for e in ingested.by_type_id["Patient/p"]] == [
        "2",
        "1",
    ]
    assert ingested.by_full_url[f"{BASE}Patient/p"] is ingested.entries[0]  # the newest
    # bdl-7 exempts history Bundles altogether; elsewhere the same version twice is an error.
    assert len(ingest(dumps(bundle([rest(v1), rest(v1)], "history"))).entries) == 2
    with pytest.raises(BundleError, match="bdl-7"):
        ingest(dumps(bundle([rest(v1), rest(v1)], "collection")))
    with pytest.raises(BundleError, match=r"entry\[2\].*duplicates that of entry\[0\].*bdl-7"):
        ingest(dumps(bundle([rest(v1), rest(v2), rest(v1)], "collection")))


# --------------------------------------------------------------------------- references


@pytest.fixture(scope="module")
def collection() -> IngestedBundle:
    return ingest(fixture_bytes("collection-relative.json"))


def test_relative_reference_resolves_against_the_absolute_fullurl_base(
    collection: IngestedBundle,
) -> None:
    resolver = ReferenceResolver(collection)
    enc = by_ref(collection, "Encounter/enc-1")
    targets = [
        resolver.resolve_field(d["condition"], source=enc) for d in enc.resource["diagnosis"]
    ]
    assert [t.full_url for t in targets if t] == [
        f"{BASE}Condition/cond-ad",
        f"{BASE}Condition/cond-dd",
    ]
    assert resolver.resolve("Patient/pt-1", source=enc) is by_ref(collection, "Patient/pt-1")


def test_relative_reference_prefers_the_citing_entrys_server() -> None:
    """Two servers each hold a Patient/1: ``Patient/1`` means the one on the citing entry's base."""
    a, b = "https://a.example.test/fhir/", "https://b.example.test/fhir/"
    enc = {"resourceType": "Encounter", "id": "e", "status": "finished", "class": {"code": "IMP"}}
    ingested = ingest(
        dumps(
            bundle(
                [
                    rest({"resourceType": "Patient", "id": "1"}, a),
                    rest({"resourceType": "Patient", "id": "1"}, b),
                    rest(enc, b),
                    {"fullUrl": "urn:uuid:0d9e7c1a-0000-4000-8000-000000000001", "resource": enc},
                ]
            )
        )
    )
    resolver = ReferenceResolver(ingested)
    target = resolver.resolve("Patient/1", source=ingested.entries[2])
    assert target is not None and target.full_url == f"{b}Patient/1"
    # Without a RESTful base, an ambiguous Type/id resolves to nothing rather than a guess.
    assert resolver.resolve("Patient/1", source=ingested.entries[3]) is None


def test_urn_uuid_references_resolve() -> None:
    ingested = ingest(fixture_bytes("transaction-urn-uuid.json"))
    resolver = ReferenceResolver(ingested)
    enc = ingested.entries[1]
    target = resolver.resolve(enc.resource["subject"]["reference"], source=enc)
    assert target is ingested.entries[0]
    assert target.resource_type == "Patient"
    # Synthea-style relative Type/id against urn:uuid fullUrls: the unique Type/id fallback.
    assert resolver.resolve("Patient/6f1c0a52-0000-4000-8000-000000000001", source=enc) is target
    assert resolver.resolve("urn:uuid:6f1c0a52-0000-4000-8000-00000000ffff", source=enc) is None


def test_absolute_url_references_resolve(collection: IngestedBundle) -> None:
    resolver = ReferenceResolver(collection)
    enc = by_ref(collection, "Encounter/enc-1")
    patient = by_ref(collection, "Patient/pt-1")
    assert resolver.resolve(f"{BASE}Patient/pt-1", source=enc) is patient
    assert resolver.resolve(f"{BASE}Patient/pt-1/_history/7", source=enc) is patient
    # The same Type/id on another server is another resource, not this one.
    assert resolver.resolve("https://other.example.test/fhir/Patient/pt-1", source=enc) is None


def test_history_versions_resolve(collection: IngestedBundle) -> None:
    resolver = ReferenceResolver(collection)
    enc = by_ref(collection, "Encounter/enc-1")
    patient = by_ref(collection, "Patient/pt-1")
    assert resolver.resolve("Patient/pt-1/_history/2", source=enc) is patient

    versions = [
        {"resourceType": "Patient", "id": "p", "meta": {"versionId": v}, "gender": g}
        for v, g in (("3", "female"), ("2", "male"))
    ]
    cite = {"resourceType": "Encounter", "id": "e", "status": "finished", "class": {"code": "IMP"}}
    history = ingest(dumps(bundle([rest(versions[0]), rest(versions[1]), rest(cite)], "history")))
    resolver = ReferenceResolver(history)
    source = history.entries[2]
    v3 = resolver.resolve("Patient/p/_history/3", source=source)
    v2 = resolver.resolve(f"{BASE}Patient/p/_history/2", source=source)
    assert v3 is not None and v3.resource["meta"]["versionId"] == "3"
    assert v2 is not None and v2.resource["meta"]["versionId"] == "2"
    # Unversioned: the current version, which a history Bundle lists first.
    latest = resolver.resolve("Patient/p", source=source)
    assert latest is not None and latest.resource["meta"]["versionId"] == "3"
    assert resolver.resolve("Patient/p/_history/9", source=source) is None


def test_contained_references_resolve(collection: IngestedBundle) -> None:
    resolver = ReferenceResolver(collection)
    request = by_ref(collection, "MedicationRequest/mr-1")
    med = resolver.resolve("#med1", source=request)
    assert med is not None
    assert med.resource_type == "Medication"
    assert med.container is request
    assert med.local_ref == "MedicationRequest/mr-1#med1"
    assert med.resource["code"]["coding"][0]["display"] == "Aspirin"
    # The same contained resource is the same Entry each time (callers compare by identity).
    assert resolver.resolve("#med1", source=request) is med
    # A contained resource cites its siblings with #id too.
    assert resolver.resolve("#med1", source=med) is med
    assert resolver.resolve("#nope", source=request) is None
    assert resolver.resolve("#med1", source=by_ref(collection, "Patient/pt-1")) is None


def test_contained_medication_reaches_the_summary() -> None:
    text = summarize(fixture_bytes("collection-relative.json")).model_dump_json()
    assert "Aspirin" in text
    assert "MedicationRequest/mr-1" in text


def test_dangling_references_resolve_to_none(collection: IngestedBundle) -> None:
    resolver = ReferenceResolver(collection)
    enc = by_ref(collection, "Encounter/enc-1")
    for ref in (
        "Condition/missing",
        f"{BASE}Condition/missing",
        "urn:uuid:00000000-0000-4000-8000-000000000000",
        "#missing",
        "Condition?code=123",
        "not a reference",
    ):
        assert resolver.resolve(ref, source=enc) is None, ref
    assert resolver.resolve_field({"display": "no reference"}, source=enc) is None
    assert resolver.resolve_field("Patient/pt-1", source=enc) is None


@pytest.mark.parametrize("contained", [5, "text", {"id": "x"}, [5, None, "x"]])
def test_malformed_contained_is_not_a_crash(contained: Any) -> None:
    obs = {"resourceType": "Observation", "id": "o", "contained": contained}
    ingested = ingest(dumps(bundle([rest(obs)])))
    assert ReferenceResolver(ingested).resolve("#x", source=ingested.entries[0]) is None


# --------------------------------------------------------------------------- bad input corpus


def stay(**changes: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    """A small valid stay with SENTINEL in its clinical content (entry 0 Patient, 1 Encounter)."""
    doc = bundle(
        [
            rest(
                {
                    "resourceType": "Patient",
                    "id": "pt-1",
                    "name": [{"family": SENTINEL, "given": [SENTINEL]}],
                    "birthDate": "1960-01-01",
                    "gender": "female",
                }
            ),
            rest(
                {
                    "resourceType": "Encounter",
                    "id": "enc-1",
                    "status": "finished",
                    "class": {"system": ACT, "code": "IMP"},
                    "subject": {"reference": "Patient/pt-1"},
                    "period": {
                        "start": "2024-01-01T10:00:00+01:00",
                        "end": "2024-01-04T10:00:00+01:00",
                    },
                    "reasonCode": [{"text": SENTINEL}],
                }
            ),
            rest(
                {
                    "resourceType": "Observation",
                    "id": "obs-1",
                    "status": "final",
                    "code": {"text": SENTINEL},
                    "subject": {"reference": "Patient/pt-1"},
                    "encounter": {"reference": "Encounter/enc-1"},
                    "effectiveDateTime": "2024-01-02T10:00:00+01:00",
                    "valueString": SENTINEL,
                }
            ),
        ]
    )
    for change in changes.values():
        change(doc)
    return doc


def test_the_sentinel_stay_is_valid() -> None:
    """The base of the bad-input corpus summarizes, so each case below fails for its own reason."""
    summary = summarize(dumps(stay()))
    assert summary.warnings == []
    assert SENTINEL in summary.model_dump_json()


def nested(levels: int) -> Any:
    value: Any = SENTINEL
    for _ in range(levels):
        value = {"extension": [value]} if isinstance(value, dict) else {"valueString": value}
    return value


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        node: Any = doc
        parts = path.split(".")
        for part in parts[:-1]:
            node = node[int(part)] if part.isdigit() else node[part]
        last = parts[-1]
        if last.isdigit():
            node[int(last)] = value
        else:
            node[last] = value

    return change


def _del(path: str) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        node: Any = doc
        parts = path.split(".")
        for part in parts[:-1]:
            node = node[int(part)] if part.isdigit() else node[part]
        del node[int(parts[-1]) if parts[-1].isdigit() else parts[-1]]

    return change


def _deep_entry(levels: int) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        doc["entry"].append({"resource": {"resourceType": "Basic", "id": "deep", **nested(levels)}})

    return change


def _sentinel_bytes() -> bytes:
    return dumps(stay())


BAD_INPUTS: list[Any] = [
    # (id, bytes, summarize kwargs, exception, words the message must contain)
    ("not-json", f"{SENTINEL} is not JSON".encode(), {}, BundleError, ["not valid JSON", "line 1"]),
    (
        "truncated",
        _sentinel_bytes()[: _sentinel_bytes().index(SENTINEL.encode()) + len(SENTINEL)],
        {},
        BundleError,
        ["not valid JSON", "end of data"],
    ),
    ("empty", b"", {}, BundleError, ["empty"]),
    ("whitespace", b" \r\n\t ", {}, BundleError, ["empty"]),
    ("bom-only", codecs.BOM_UTF8, {}, BundleError, ["empty"]),
    ("array", dumps([stay()]), {}, BundleError, ["top-level JSON is an array", "Bundle"]),
    ("string", dumps(SENTINEL), {}, BundleError, ["top-level JSON is a string"]),
    ("number", b"42", {}, BundleError, ["top-level JSON is a number"]),
    (
        "bare-patient",
        dumps(stay()["entry"][0]["resource"]),
        {},
        BundleError,
        ["expected a FHIR Bundle but got a bare Patient resource", "wrap"],
    ),
    (
        "not-a-resource",
        dumps({"name": SENTINEL}),
        {},
        BundleError,
        ["expected a FHIR Bundle", "no valid resourceType", "not a FHIR resource"],
    ),
    (
        "resourcetype-is-content",
        dumps({"resourceType": f"{SENTINEL} x"}),
        {},
        BundleError,
        ["expected a FHIR Bundle", "no valid resourceType"],
    ),
    (
        "bad-type",
        dumps(stay(t=_set("type", SENTINEL))),
        {},
        BundleError,
        ["Bundle.type", "at type"],
    ),
    ("missing-type", dumps(stay(t=_del("type"))), {}, BundleError, ["Bundle.type"]),
    ("type-is-array", dumps(stay(t=_set("type", [SENTINEL]))), {}, BundleError, ["Bundle.type"]),
    ("type-is-object", dumps(stay(t=_set("type", {"x": 1}))), {}, BundleError, ["Bundle.type"]),
    (
        "entry-not-a-list",
        dumps(stay(e=lambda d: d.update(entry=d["entry"][0]))),
        {},
        BundleError,
        ["Bundle.entry is an object", "expected an array", "at entry"],
    ),
    (
        "entry-not-an-object",
        dumps(stay(e=lambda d: d["entry"].append(SENTINEL))),
        {},
        BundleError,
        ["entry[3]", "entry is a string", "expected an object"],
    ),
    (
        "resource-not-an-object",
        dumps(stay(e=_set("entry.2.resource", [SENTINEL]))),
        {},
        BundleError,
        ["entry[2]", "resource is an array", "entry[2].resource"],
    ),
    (
        "no-resourcetype",
        dumps(stay(e=_del("entry.2.resource.resourceType"))),
        {},
        BundleError,
        ["entry[2]", "no valid resourceType", "entry[2].resource.resourceType"],
    ),
    (
        "resourcetype-an-object",
        dumps(stay(e=_set("entry.2.resource.resourceType", {"text": SENTINEL}))),
        {},
        BundleError,
        ["entry[2]", "no valid resourceType", "entry[2].resource.resourceType"],
    ),
    (
        "invalid-id",
        dumps(stay(e=_set("entry.2.resource.id", f"{SENTINEL} 1960-01-01"))),
        {},
        BundleError,
        ["entry[2]", "Observation", "not a valid FHIR id", "entry[2].resource.id"],
    ),
    (
        "id-not-a-string",
        dumps(stay(e=_set("entry.2.resource.id", 7))),
        {},
        BundleError,
        ["entry[2]", "not a valid FHIR id"],
    ),
    (
        "empty-fullurl",
        dumps(stay(e=_set("entry.2.fullUrl", " "))),
        {},
        BundleError,
        ["entry[2]", "fullUrl", "non-empty string"],
    ),
    (
        "duplicate-fullurl",
        dumps(stay(e=_set("entry.2.fullUrl", f"{BASE}Encounter/enc-1"))),
        {},
        BundleError,
        ["entry[2]", "duplicates", "entry[1]", "bdl-7", "entry[2].fullUrl"],
    ),
    (
        "duplicate-fullurl-same-version",
        dumps(
            stay(
                e=_set(
                    "entry.2",
                    {"fullUrl": f"{BASE}Patient/pt-1", "resource": stay()["entry"][0]["resource"]},
                ),
                t=_set("type", "searchset"),
            )
        ),
        {},
        BundleError,
        ["entry[2]", "Patient/pt-1", "bdl-7"],
    ),
    (
        "no-patient",
        dumps(stay(e=_del("entry.0"))),
        {},
        StayError,
        ["no Patient", "Encounter/enc-1", "Encounter.subject"],
    ),
    (
        "subject-not-a-patient",
        dumps(
            stay(
                e=_set("entry.1.resource.subject.reference", "Observation/obs-1"), p=_del("entry.0")
            )
        ),
        {},
        StayError,
        ["no Patient"],
    ),
    (
        "no-inpatient-stay",
        dumps(stay(e=_set("entry.1.resource.class.code", "AMB"))),
        {},
        StayError,
        ["no finished inpatient", "1 encounters present", "--encounter"],
    ),
    (
        "no-encounter-at-all",
        dumps(stay(e=_del("entry.1"))),
        {},
        StayError,
        ["no finished inpatient", "0 encounters", "--encounter"],
    ),
    (
        "named-encounter-absent",
        _sentinel_bytes(),
        {"encounter_id": "enc-404"},
        StayError,
        ["no Encounter with id enc-404", "1 encounters present"],
    ),
    (
        "named-encounter-id-is-content",
        _sentinel_bytes(),
        {"encounter_id": f"{SENTINEL} 12/03"},
        StayError,
        ["no Encounter with id <invalid id>"],
    ),
    (
        "encounter-period-start-not-a-datetime",
        dumps(stay(e=_set("entry.1.resource.period.start", SENTINEL))),
        {},
        EntryError,
        ["entry[1] Encounter/enc-1 at entry[1].resource.period.start", "dateTime"],
    ),
    (
        "encounter-period-start-a-number",
        dumps(stay(e=_set("entry.1.resource.period.start", 1704099600))),
        {},
        EntryError,
        ["entry[1] Encounter/enc-1 at entry[1].resource.period.start", "expected a string"],
    ),
    (
        "encounter-period-as-json-text",
        dumps(stay(e=_set("entry.1.resource.period", json.dumps({"start": "2024-01-01"})))),
        {"encounter_id": "enc-1"},
        EntryError,
        ["entry[1] Encounter/enc-1 at entry[1].resource.period", "expected an object"],
    ),
    (
        "encounter-class-a-list",
        dumps(stay(e=_set("entry.1.resource.class", [{"code": "IMP"}]))),
        {"encounter_id": "Encounter/enc-1"},
        EntryError,
        ["entry[1] Encounter/enc-1 at entry[1].resource.class"],
    ),
    (
        "encounter-unknown-element-strict",
        dumps(stay(e=_set("entry.1.resource.admission", {"text": SENTINEL}))),
        {"strict": True},
        EntryError,
        ["entry[1] Encounter/enc-1 at entry[1].resource.admission", "not defined in FHIR R4"],
    ),
    (
        "encounter-too-deep",
        dumps(stay(e=_set("entry.1.resource.extension", [{"url": "u", **nested(70)}]))),
        {},
        EntryError,
        ["entry[1] Encounter/enc-1", "deeper than 64 levels"],
    ),
    (
        "patient-birthdate-not-a-date",
        dumps(stay(e=_set("entry.0.resource.birthDate", SENTINEL))),
        {},
        EntryError,
        ["entry[0] Patient/pt-1 at entry[0].resource.birthDate", "date"],
    ),
    (
        "patient-name-not-a-list",
        dumps(stay(e=_set("entry.0.resource.name", SENTINEL))),
        {},
        EntryError,
        ["entry[0] Patient/pt-1 at entry[0].resource.name", "expected an array"],
    ),
    (
        "patient-given-not-a-list",
        dumps(stay(e=_set("entry.0.resource.name.0.given", SENTINEL))),
        {},
        EntryError,
        ["entry[0] Patient/pt-1 at entry[0].resource.name[0].given", "expected an array"],
    ),
    (
        "patient-unknown-element-named-like-content",
        dumps(stay(e=_set(f"entry.0.resource.{SENTINEL} lives at 1 Main St", 1))),
        {"strict": True},
        EntryError,
        ["entry[0] Patient/pt-1", "not defined in FHIR R4"],
    ),
    (
        "deeper-than-1024",
        dumps(stay(e=_deep_entry(3))).replace(
            b'"valueString":"%s"' % SENTINEL.encode(),
            b'"valueString":' + b"[" * 1100 + b'"%s"' % SENTINEL.encode() + b"]" * 1100,
        ),
        {},
        BundleError,
        ["nested deeper than 1024 levels"],
    ),
    (
        "over-size-limit",
        _sentinel_bytes(),
        {"limits": Limits(max_bundle_bytes=500)},
        BundleError,
        [f"Bundle is {len(_sentinel_bytes())} bytes", "over the limit of 500 bytes"],
    ),
    (
        "too-many-entries",
        _sentinel_bytes(),
        {"limits": Limits(max_entries=2)},
        BundleError,
        ["3 entries", "over the limit of 2"],
    ),
    (
        "invalid-utf8",
        _sentinel_bytes().replace(SENTINEL.encode(), SENTINEL.encode() + b"\xff\xfe", 1),
        {},
        BundleError,
        ["not valid UTF-8", "offset"],
    ),
    (
        "lone-surrogate-escape",
        _sentinel_bytes().replace(SENTINEL.encode(), SENTINEL.encode() + b"\\ud800", 1),
        {},
        BundleError,
        ["not valid JSON", "surrogate"],
    ),
    (
        "unknown-resource-type-strict",
        dumps(
            stay(
                e=lambda d: d["entry"].append(
                    {"resource": {"resourceType": "Zebra", "note": SENTINEL}}
                )
            )
        ),
        {"strict": True},
        EntryError,
        ["entry[3] <unknown resourceType>", "not a FHIR R4 resource"],
    ),
    (
        "datatype-as-resource-strict",
        dumps(
            stay(
                e=lambda d: d["entry"].append(
                    {"resource": {"resourceType": "Coding", "code": SENTINEL}}
                )
            )
        ),
        {"strict": True},
        EntryError,
        ["entry[3] <unknown resourceType>", "not a FHIR R4 resource"],
    ),
]


@pytest.mark.parametrize(
    ("data", "kwargs", "error", "words"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_INPUTS],
)
def test_bad_input_is_refused_with_a_clear_error(
    data: bytes, kwargs: dict[str, Any], error: type[InputError], words: list[str]
) -> None:
    with pytest.raises(InputError) as caught:
        summarize(data, **kwargs)
    exc = caught.value
    assert type(exc) is error, f"{type(exc).__name__}: {exc}"
    text = str(exc)
    for word in words:
        assert word in text, f"{word!r} not in {text!r}"
    assert SENTINEL not in text
    assert SENTINEL not in exc.message
    assert SENTINEL not in repr(exc.location)
    assert exc.__cause__ is None  # raised "from None": no chained exception echoes the input
    assert "\n" not in text


def test_bad_inputs_really_carry_the_sentinel() -> None:
    """Guard the guard: the no-echo assertions above are only worth something if it is there."""
    lacking = {case[0] for case in BAD_INPUTS if SENTINEL.encode() not in case[1]}
    assert lacking == {"empty", "whitespace", "bom-only", "number"}


@pytest.mark.parametrize(
    ("damage", "bad"),
    [
        pytest.param(lambda d: d.replace(b'"final"', b'"fin\xffal"', 1), b"\xff", id="in-a-string"),
        pytest.param(lambda d: d + b"\n\xc3", b"\xc3", id="after-the-document"),
        pytest.param(  # UTF-8 is checked first, whatever comes before the bad byte
            lambda d: d.replace(b'"final"', b'"final",,', 1) + b' "\xed\xa0\x80"',
            b"\xed",
            id="after-a-syntax-error",
        ),
    ],
)
def test_invalid_utf8_is_refused_at_the_offset_of_its_first_bad_byte(
    damage: Callable[[bytes], bytes], bad: bytes
) -> None:
    data = damage(_sentinel_bytes())
    offset = data.index(bad)
    with pytest.raises(BundleError) as caught:
        ingest(data)
    assert caught.value.message == f"input is not valid UTF-8 (first bad byte at offset {offset})"
    assert caught.value.__cause__ is None


def test_over_deep_entry_the_summary_does_not_read_is_no_error() -> None:
    doc = stay(e=_deep_entry(100))
    assert summarize(dumps(doc)).warnings == []
    with pytest.raises(EntryError, match=r"entry\[3\] Basic/deep.*deeper than 64"):
        summarize(dumps(doc), strict=True)


def test_same_fullurl_with_another_version_is_allowed() -> None:
    doc = stay()
    v2 = copy.deepcopy(doc["entry"][0])
    doc["entry"][0]["resource"]["meta"] = {"versionId": "1"}
    v2["resource"]["meta"] = {"versionId": "2"}
    doc["entry"].append(v2)
    ingested = ingest(dumps(doc))
    assert len(ingested.by_type_id["Patient/pt-1"]) == 2


# --------------------------------------------------------------------------- warnings


def test_invalid_entry_unknown_element_and_dangling_reference_are_warnings() -> None:
    summary = summarize(fixture_bytes("degraded.json"))
    warnings = {(w.code, w.entry_index): w for w in summary.warnings}
    assert set(warnings) == {
        ("invalid-entry", 3),
        ("unknown-element", 5),
        ("dangling-reference", 1),
    }

    invalid = warnings["invalid-entry", 3]
    assert invalid.resource_type == "Observation"
    assert invalid.resource_id == "obs-bad"
    assert invalid.path == "entry[3].resource.valueQuantity.value"
    assert "left out" in invalid.message

    unknown = warnings["unknown-element", 5]
    assert unknown.resource_type == "MedicationAdministration"
    assert unknown.path == "entry[5].resource.dosage.<unknown element>"

    assert warnings["dangling-reference", 1].resource_type == "Encounter"

    for warning in summary.warnings:
        assert SENTINEL not in warning.model_dump_json()

    cited = summary.model_dump_json()
    assert "MedicationAdministration/ma-1" in cited  # kept, without its unknown element
    assert "Ceftriaxone" in cited
    assert "Observation/obs-bad" not in cited


def test_strict_mode_refuses_what_lenient_mode_warns_about() -> None:
    with pytest.raises(EntryError) as caught:
        summarize(fixture_bytes("degraded.json"), strict=True)
    text = str(caught.value)
    assert "entry[3] Observation/obs-bad at entry[3].resource.valueQuantity.value" in text
    assert SENTINEL not in text

    doc = fixture_json("degraded.json")
    del doc["entry"][3]  # the invalid Observation: now only the unknown element is left
    assert [w.code for w in summarize(dumps(doc)).warnings].count("unknown-element") == 1
    with pytest.raises(
        EntryError,
        match=r"entry\[4\] MedicationAdministration/ma-1 at "
        r"entry\[4\]\.resource\.dosage\.timing: element is not defined in FHIR R4",
    ):
        summarize(dumps(doc), strict=True)


def test_warning_paths_inside_contained_resources() -> None:
    doc = fixture_json("collection-relative.json")
    request = doc["entry"][6]["resource"]
    request["contained"].insert(0, {"resourceType": "Organization", "id": "org"})
    request["contained"][1]["code"]["coding"][0]["userSelected"] = SENTINEL
    summary = summarize(dumps(doc))
    (warning,) = summary.warnings
    assert warning.code == "invalid-entry"
    assert warning.path == "entry[6].resource.contained[1].code.coding[0].userSelected"
    assert SENTINEL not in warning.model_dump_json()


@pytest.mark.parametrize(
    ("path", "value", "at", "rule"),
    [
        (
            "entry.1.resource.diagnosis",
            [{"condition": {"reference": "#c"}, "rank": "1"}],
            "diagnosis[0].rank",
            "expected an integer",
        ),
        (
            "entry.1.resource.type",
            [{"coding": [{"code": "a"}, {"code": "b", "userSelected": "true"}]}],
            "type[0].coding[1].userSelected",
            "expected true or false",
        ),
        ("entry.1.resource.length", {"value": "3.5"}, "length.value", "expected a number"),
    ],
)
def test_an_element_the_model_reads_from_another_json_type_is_refused_where_it_is(
    path: str, value: Any, at: str, rule: str
) -> None:
    """fhir.resources takes ``"1"`` for an integer; FHIR JSON does not, nor do our readers."""
    with pytest.raises(EntryError) as caught:
        summarize(dumps(stay(e=_set(path, value))))
    assert str(caught.value) == f"entry[1] Encounter/enc-1 at entry[1].resource.{at}: {rule}"


def test_dropping_unknown_elements_leaves_the_parsed_bundle_as_it_was() -> None:
    doc = stay()
    doc["entry"][2]["resource"]["component"] = [{"code": {"text": "x"}, "valueString": "y", "z": 1}]
    ingested = ingest(dumps(doc))
    entry = ingested.entries[2]
    before = copy.deepcopy(entry.resource)
    cleaned, warnings = validate_entry(entry, limits=Limits())
    assert [w.path for w in warnings] == ["entry[2].resource.component[0].<unknown element>"]
    assert "z" not in cleaned["component"][0]
    assert entry.resource == before


def test_an_invalid_observation_becomes_a_warning() -> None:
    """An invalid entry the summary can do without is left out; the summary still succeeds."""
    doc = stay()
    doc["entry"][2]["resource"]["valueString"] = 12.5  # valueString must be a string
    summary = summarize(dumps(doc))
    assert [(w.code, w.entry_index, w.path) for w in summary.warnings] == [
        ("invalid-entry", 2, "entry[2].resource.valueString")
    ]
    assert isinstance(summary.warnings[0], DataWarning)


def test_too_deep_observation_becomes_a_warning() -> None:
    doc = stay()
    doc["entry"][2]["resource"]["extension"] = [{"url": "u", **nested(70)}]
    summary = summarize(dumps(doc))
    assert [(w.code, w.entry_index) for w in summary.warnings] == [("invalid-entry", 2)]
    assert "deeper than 64" in summary.warnings[0].message


# --------------------------------------------------------------------------- property


json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.sampled_from(
        [
            "Bundle",
            "Patient",
            "Encounter",
            "IMP",
            "finished",
            "collection",
            "Patient/pt-1",
            "#med1",
            "2024-03-02",
            "2024-03-02T10:00:00+01:00",
            "{}",
            "[]",
            "urn:uuid:x",
        ]
    )
)
json_values = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "resourceType",
                    "type",
                    "entry",
                    "resource",
                    "id",
                    "fullUrl",
                    "class",
                    "code",
                    "status",
                    "subject",
                    "reference",
                    "period",
                    "start",
                ]
            )
            | st.text(max_size=6),
            inner,
            max_size=4,
        )
    ),
    max_leaves=20,
)

MUTABLE = fixture_json("collection-relative.json")


def _slots(node: Any) -> list[tuple[Any, Any]]:
    """Every (container, key) in a JSON document, in a stable order."""
    found: list[tuple[Any, Any]] = []
    stack = [node]
    while stack:
        current = stack.pop()
        items = current.items() if isinstance(current, dict) else enumerate(current)
        for key, value in items:
            found.append((current, key))
            if isinstance(value, dict | list):
                stack.append(value)
    return found


def _mutate(draw: st.DrawFn, doc: Any) -> None:
    """Delete, replace, wrap, unwrap, stringify or empty one to four elements of ``doc``."""
    for _ in range(draw(st.integers(1, 4))):
        slots = _slots(doc)
        if not slots:
            break
        container, key = draw(st.sampled_from(slots))
        old = container[key]
        op = draw(st.sampled_from(["delete", "replace", "wrap", "unwrap", "as-text", "empty"]))
        if op == "delete":
            del container[key]
            continue
        if op == "replace":
            new = draw(json_leaf | st.just({}) | st.just([]))
        elif op == "wrap":
            new = [old]
        elif op == "unwrap":
            new = (
                old[0]
                if isinstance(old, list) and old
                else next(iter(old.values()), None)
                if isinstance(old, dict)
                else old
            )
        elif op == "as-text":
            new = json.dumps(old)
        else:
            new = type(old)() if isinstance(old, dict | list | str) else 0
        container[key] = new


@st.composite
def mutated_bundles(draw: st.DrawFn) -> bytes:
    doc = copy.deepcopy(MUTABLE)
    _mutate(draw, doc)
    return dumps(doc)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.one_of(
        json_values.map(dumps),
        mutated_bundles(),
        st.binary(max_size=40),
    ),
    encounter=st.sampled_from([None, "enc-1"]),
    strict=st.booleans(),
)
def test_any_input_either_summarizes_or_raises_input_error(
    data: bytes, encounter: str | None, strict: bool
) -> None:
    try:
        summary = summarize(data, encounter_id=encounter, strict=strict)
    except InputError as exc:
        event(type(exc).__name__)
        assert str(exc)
        assert "\n" not in str(exc)
    else:
        event("summarized" + (" with warnings" if summary.warnings else ""))


def _validated(entry: Entry, memo: ElementMemo | None) -> Any:
    """What validation makes of ``entry``: the JSON and warnings, or the error's text."""
    try:
        cleaned, warnings = validate_entry(entry, limits=Limits(), memo=memo)
    except EntryError as exc:
        return str(exc)
    return cleaned, [(w.code, w.path, w.message) for w in warnings]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), index=st.integers(0, len(MUTABLE["entry"]) - 1))
def test_validating_with_the_element_memo_gives_what_plain_validation_gives(
    data: st.DataObject, index: int
) -> None:
    """A memo warmed on the Bundle as sent must not change the verdict on a mutated entry:
    its elements that are unchanged come from the memo, the mutated ones are validated."""
    doc = copy.deepcopy(MUTABLE)
    resource = doc["entry"][index]["resource"]
    doc["entry"].append({"fullUrl": "urn:uuid:mutant", "resource": copy.deepcopy(resource)})
    _mutate(data.draw, doc["entry"][-1]["resource"])
    try:
        ingested = ingest(dumps(doc))
    except InputError:
        return  # the mutant broke the Bundle itself (no resourceType, say): nothing to compare
    memo = ElementMemo()
    for entry in ingested.entries[:-1]:
        _validated(entry, memo)
    mutant = ingested.entries[-1]
    assert _validated(mutant, memo) == _validated(mutant, None)


def test_an_invalid_element_shared_by_two_entries_is_reported_in_each() -> None:
    """The memo keeps valid elements only: a bad one is validated, and reported, every time."""
    doc = stay()
    bad_code = {"coding": [{"system": "http://loinc.org", "code": "x", "userSelected": "yes"}]}
    reading = doc["entry"][2]["resource"]
    reading["code"] = bad_code
    doc["entry"].append({"fullUrl": "urn:uuid:obs-2", "resource": {**reading, "id": "obs-2"}})
    summary = summarize(dumps(doc))
    assert [(w.code, w.path) for w in summary.warnings] == [
        ("invalid-entry", "entry[2].resource.code.coding[0].userSelected"),
        ("invalid-entry", "entry[3].resource.code.coding[0].userSelected"),
    ]


def test_the_element_memo_stays_within_its_budget_on_deep_unique_elements() -> None:
    """A key per nesting level would keep a deep chain many times over: the memo keeps
    small elements only, within its budget, and gives the same verdicts as without it."""
    doc = stay()
    reading = doc["entry"][2]["resource"]
    for n in range(40):
        chain: dict[str, Any] = {"url": "http://example.test/leaf", "valueString": f"v{n}"}
        for _ in range(25):  # 50 levels of JSON, within the limit of 64 with the resource's
            chain = {"url": "http://example.test/link", "extension": [chain]}
        doc["entry"].append(
            {
                "fullUrl": f"urn:uuid:obs-{n}",
                "resource": {**reading, "id": f"obs-{n}", "extension": [chain]},
            }
        )
    ingested = ingest(dumps(doc))
    memo = ElementMemo(budget=50_000)
    for entry in ingested.entries:
        verdict = _validated(entry, memo)
        assert not isinstance(verdict, str), verdict  # valid, chains and all
        assert verdict == _validated(entry, None)
    assert 40_000 < memo.kept_bytes <= 50_000


# --------------------------------------------------------------------------- parsing paths
# simdjson's nodes must give what orjson's values give, or leave the input to orjson
# (fhir.bundle._Unusual): the comparisons below run both on the same bytes.

ABSENT = object()


def _outcome(build: Callable[[], IngestedBundle]) -> Any:
    """What a parsing path makes of the input: its entries and indexes, or its error."""
    try:
        ingested = build()
    except BundleError as exc:
        return ("error", str(exc), exc.location)
    peeked = [  # before .resource builds them: peek reads the parsed nodes
        [e.peek(key, ABSENT) for key in (*e.parsed, "subject", "no-such-key")]
        for e in ingested.entries
    ]
    entries = [
        (e.index, e.full_url, e.resource_type, e.resource_id, e.resource) for e in ingested.entries
    ]
    for values, entry in zip(peeked, ingested.entries, strict=True):
        assert values == [
            entry.resource.get(key, ABSENT) for key in (*entry.resource, "subject", "no-such-key")
        ]
    return (
        ingested.bundle_type,
        entries,
        {url: e.index for url, e in ingested.by_full_url.items()},
        {ref: [e.index for e in found] for ref, found in ingested.by_type_id.items()},
        {rtype: [e.index for e in found] for rtype, found in ingested.by_type.items()},
    )


def _both_paths(data: bytes) -> str:
    """Compare the paths on ``data``; say which one answered."""
    limits = Limits()
    try:
        text = bundle_module._payload(data, limits)  # size, BOM, emptiness: before either path
    except BundleError:
        return "refused before parsing"
    by_values = _outcome(
        lambda: bundle_module._ingest_parsed(bundle_module.decode_json(text), limits)
    )
    try:
        by_nodes = _outcome(
            lambda: bundle_module._ingest_parsed(bundle_module._parse_nodes(text), limits)
        )
    except bundle_module._Unusual:
        assert _outcome(lambda: ingest(data)) == by_values
        return "left to orjson"
    assert by_nodes == by_values
    assert _outcome(lambda: ingest(data)) == by_values
    return "simdjson"


@pytest.mark.corpus
@pytest.mark.skipif(bundle_module.Parser is None, reason="pysimdjson has no wheel for this Python")
def test_corpus_bundle_takes_the_simdjson_path_and_gives_what_orjson_gives(
    corpus_bundle: Path,
) -> None:
    assert _both_paths(corpus_bundle.read_bytes()) == "simdjson"


def test_a_stay_builds_only_the_resources_it_reads() -> None:
    """Scoping peeks at single elements: the resources of other visits are never built."""
    data = fixture_bytes("collection-relative.json")
    doc = orjson.loads(data)
    for n in range(200):  # a year of another visit's readings
        doc["entry"].append(
            {
                "fullUrl": f"urn:uuid:old-{n}",
                "resource": {
                    "resourceType": "Observation",
                    "id": f"old-{n}",
                    "status": "final",
                    "code": {"text": "Heart rate"},
                    "subject": {"reference": "Patient/pt-1"},
                    "encounter": {"reference": "urn:uuid:elsewhere"},
                    "effectiveDateTime": "2023-01-01T10:00:00Z",
                    "valueQuantity": {"value": 70, "unit": "/min"},
                },
            }
        )
    ingested = ingest(dumps(doc))
    gather_stay(ingested)
    built = {e.resource_id for e in ingested.entries if isinstance(e.parsed, dict)}
    assert {"pt-1", "enc-1"} <= built
    assert not any(rid.startswith("old-") for rid in built if rid)


def _with_repeated_key(draw: st.DrawFn, doc: Any) -> bytes:
    """``doc`` as JSON text with one object repeating one of its keys (orjson keeps the last)."""
    objects = [doc] * bool(doc) + [c[k] for c, k in _slots(doc) if isinstance(c[k], dict) and c[k]]
    if not objects:  # the mutants left no key at all
        return dumps(doc)
    target = draw(st.sampled_from(objects))
    key = draw(st.sampled_from(sorted(target)))
    extra = draw(json_leaf)
    before = draw(st.booleans())

    def text(node: Any) -> str:
        if isinstance(node, dict):
            pairs = [f"{json.dumps(k)}:{text(v)}" for k, v in node.items()]
            if node is target:
                pair = f"{json.dumps(key)}:{json.dumps(extra)}"
                pairs = [pair, *pairs] if before else [*pairs, pair]
            return "{" + ",".join(pairs) + "}"
        if isinstance(node, list):
            return "[" + ",".join(text(v) for v in node) + "]"
        return json.dumps(node)

    return text(doc).encode()


NUMBER_TEXTS = [
    "123456789012345678901234567890",  # beyond 64 bits: orjson takes it as a float
    "-9223372036854775809",
    "18446744073709551615",
    "1e400",
    "-0",
    "-0.0",
    "1.0E2",
    "0.1000000000000000055511151231257827",
]


@st.composite
def unusual_texts(draw: st.DrawFn) -> bytes:
    """Valid-looking Bundles with what JSON text allows and dicts cannot show: repeated keys,
    numbers at the edges of what parsers take, white space and a byte-order mark."""
    doc = copy.deepcopy(MUTABLE)
    if draw(st.booleans()):
        _mutate(draw, doc)
    kind = draw(st.sampled_from(["repeated-key", "number", "spaces"]))
    if kind == "repeated-key":
        return _with_repeated_key(draw, doc)
    if kind == "number":
        slots = [(c, k) for c, k in _slots(doc) if not isinstance(c[k], dict | list)]
        if not slots:  # the mutants left no value that is not an object or an array
            return dumps(doc)
        container, key = draw(st.sampled_from(slots))
        container[key] = "NUMBER-HERE"
        number = draw(st.sampled_from(NUMBER_TEXTS))
        return dumps(doc).replace(b'"NUMBER-HERE"', number.encode())
    bom = codecs.BOM_UTF8 if draw(st.booleans()) else b""
    return bom + b" \n\t" + orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\r\n"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.one_of(
        json_values.map(dumps),
        mutated_bundles(),
        unusual_texts(),
        st.binary(max_size=40),
    )
)
def test_both_parsing_paths_give_the_same_bundle_or_the_same_error(data: bytes) -> None:
    event(_both_paths(data))


def test_without_simdjson_every_bundle_takes_the_orjson_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No pysimdjson wheel for this Python (pyproject's marker): the service still works."""
    data = fixture_bytes("collection-relative.json")
    expected = summarize(data)
    monkeypatch.setattr(bundle_module, "Parser", None)
    ingested = ingest(data)
    assert all(isinstance(e.parsed, dict) for e in ingested.entries)
    assert summarize(data) == expected
