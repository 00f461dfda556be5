"""Every input limit at its boundary: the limit is accepted, one past it is refused with a
message that names the limit (README, "Input rules and limits")."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epicrisis.config import Limits
from epicrisis.errors import BundleError, EntryError
from epicrisis.fhir import ingest
from epicrisis.fhir.validate import depth
from epicrisis.pipeline import load_stay
from epicrisis.serving.requests import RequestFieldError, validate_job_id, validate_submit
from epicrisis.v1 import summarizer_pb2 as pb

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "collection-relative.json"
DEFAULTS = Limits()


def fixture() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(FIXTURE.read_bytes())
    return doc


def test_bundle_bytes() -> None:
    data = FIXTURE.read_bytes()
    load_stay(data, limits=Limits(max_bundle_bytes=len(data)))
    with pytest.raises(BundleError, match=rf"over the limit of {len(data) - 1} bytes"):
        load_stay(data, limits=Limits(max_bundle_bytes=len(data) - 1))


def test_entries() -> None:
    data = FIXTURE.read_bytes()
    count = len(fixture()["entry"])
    assert len(ingest(data, limits=Limits(max_entries=count)).entries) == count
    with pytest.raises(BundleError, match=rf"{count} entries, over the limit of {count - 1}"):
        ingest(data, limits=Limits(max_entries=count - 1))


def test_resource_depth_of_an_entry_the_summary_needs() -> None:
    doc = fixture()
    patient = next(e for e in doc["entry"] if e["resource"]["resourceType"] == "Patient")
    patient["resource"]["extension"] = [
        {"url": "http://example.test/x", "valueCodeableConcept": {"coding": [{"code": "a"}]}}
    ]
    levels = next(n for n in range(3, 64) if depth(patient["resource"], n))
    data = json.dumps(doc).encode()
    load_stay(data, limits=Limits(max_resource_depth=levels))
    with pytest.raises(EntryError, match=rf"nests deeper than {levels - 1} levels"):
        load_stay(data, limits=Limits(max_resource_depth=levels - 1))


def _levels(value: Any) -> int:
    """How many objects and arrays deep ``value`` nests, the plain recursive way (the
    value itself is a level even when it is a scalar; scalars inside add none)."""
    if isinstance(value, dict | list):
        inner = value.values() if isinstance(value, dict) else value
        return 1 + max((_levels(v) for v in inner if isinstance(v, dict | list)), default=0)
    return 1


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=3),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(json_values, st.integers(min_value=0, max_value=12))
def test_resource_depth_counts_every_object_and_array(value: Any, limit: int) -> None:
    assert depth(value, limit) == (_levels(value) <= limit)


def test_json_nesting_of_1024_levels() -> None:
    with pytest.raises(BundleError, match="top-level JSON is an array"):
        ingest(b"[" * 1024 + b"]" * 1024)
    with pytest.raises(BundleError, match="nested deeper than 1024 levels"):
        ingest(b"[" * 1025 + b"]" * 1025)


def submit(**fields: Any) -> pb.SubmitRequest:
    options = fields.pop("options", {})
    return pb.SubmitRequest(bundle=b"{}", options=pb.SummaryOptions(**options), **fields)


@pytest.mark.parametrize(
    ("field", "limit", "make"),
    [
        ("encounter_id", DEFAULTS.max_encounter_id_chars, lambda n: submit(encounter_id="e" * n)),
        (
            "idempotency_key",
            DEFAULTS.max_idempotency_key_chars,
            lambda n: submit(idempotency_key="k" * n),
        ),
        (
            "options.max_output_tokens",
            DEFAULTS.max_output_tokens,
            lambda n: submit(options={"max_output_tokens": n}),
        ),
    ],
)
def test_request_fields(field: str, limit: int, make: Any) -> None:
    validate_submit(make(limit))
    with pytest.raises(RequestFieldError, match=f"limit of {limit:,}") as raised:
        validate_submit(make(limit + 1))
    assert raised.value.field == field and str(raised.value).startswith(field)


@pytest.mark.parametrize(
    "request_",
    [
        submit(idempotency_key=""),
        submit(idempotency_key="with space"),
        submit(idempotency_key="cl\u00e9"),
        submit(idempotency_key="nul\x00"),
        submit(options={"max_output_tokens": 0}),
    ],
    ids=["empty-key", "space", "non-ascii", "control", "zero-tokens"],
)
def test_request_fields_out_of_their_domain(request_: pb.SubmitRequest) -> None:
    with pytest.raises(RequestFieldError):
        validate_submit(request_)


def test_unset_fields_need_nothing() -> None:
    validate_submit(submit())


def test_job_id() -> None:
    validate_job_id("j" * DEFAULTS.max_job_id_chars)
    with pytest.raises(RequestFieldError, match=f"limit of {DEFAULTS.max_job_id_chars}"):
        validate_job_id("j" * (DEFAULTS.max_job_id_chars + 1))
    with pytest.raises(RequestFieldError, match="empty"):
        validate_job_id("")


def test_limits_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EPICRISIS_LIMIT_MAX_IDEMPOTENCY_KEY_CHARS", "8")
    limits = Limits()
    validate_submit(submit(idempotency_key="k" * 8), limits)
    with pytest.raises(RequestFieldError, match="limit of 8"):
        validate_submit(submit(idempotency_key="k" * 9), limits)
