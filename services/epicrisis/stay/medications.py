"""Medication facts and the discharge medication list, reconciled against before admission.

Take-home orders are the stay's orders of category discharge, outpatient or community; home
medications are live orders from before admission that no other hospital stay placed.

new:        a live take-home order for a drug not taken before admission
changed:    a live take-home order for a drug taken before admission, with another dosage
continued:  taken before admission and still ordered (re-ordered with the same dosage, or untouched)
stopped:    a home medication whose take-home order of the stay is stopped or cancelled
inpatient-active: a live order of the stay with no take-home category (inpatient, or none
            stated): still active at discharge, so flagged for review, never called new
"""

from __future__ import annotations

from datetime import tzinfo
from typing import Any

from epicrisis.stay.context import Concept, MedicationChange, MedicationFact, MedicationStatus
from epicrisis.stay.readers import codes_of, concept_of, quantity_text
from epicrisis.stay.time import When, parse_when

LIVE = frozenset({"active", "on-hold", "draft", "unknown"})
TAKE_HOME = frozenset({"discharge", "outpatient", "community"})
ENDED = frozenset({"stopped", "cancelled"})


def medication_fact(
    ref: str,
    resource: dict[str, Any],
    drug: Concept,
    *,
    of_this_stay: bool,
    of_another_stay: bool,
    tz: tzinfo,
) -> MedicationFact:
    if resource["resourceType"] == "MedicationRequest":
        codes = codes_of(resource.get("category") or [])
        category = next(
            (c for c in ("discharge", "inpatient", "outpatient", "community") if c in codes), None
        )
        return MedicationFact(
            ref,
            "request",
            drug,
            str(resource.get("status") or "unknown"),
            category,
            parse_when(resource.get("authoredOn"), tz),
            _dosage(resource.get("dosageInstruction")),
            of_this_stay,
            of_another_stay,
        )
    when = parse_when(resource.get("effectiveDateTime"), tz)
    if when is None and isinstance(resource.get("effectivePeriod"), dict):
        when = parse_when(resource["effectivePeriod"].get("start"), tz)
    raw_dosage = resource.get("dosage")
    dosage: dict[str, Any] = raw_dosage if isinstance(raw_dosage, dict) else {}
    text = (
        dosage.get("text")
        if isinstance(dosage.get("text"), str)
        else quantity_text(dosage.get("dose"))
    )
    return MedicationFact(
        ref,
        "administration",
        drug,
        str(resource.get("status") or "unknown"),
        "inpatient",
        when,
        text,
        of_this_stay,
    )


def reconcile(
    facts: tuple[MedicationFact, ...], admitted: When | None
) -> tuple[MedicationChange, ...]:
    """The discharge medication list from the requests read (administrations never count)."""
    requests = [f for f in facts if f.kind == "request"]
    before = [
        f
        for f in requests
        if not f.of_this_stay
        and not f.of_another_stay
        and f.category != "inpatient"
        and f.status in LIVE
        and (admitted is None or f.when is None or f.when.at <= admitted.at)
    ]
    home = {f.drug.key: f for f in sorted(before, key=_order)}
    changes: list[MedicationChange] = []
    ordered: set[str] = set()
    for fact in sorted(requests, key=_order):
        if not fact.of_this_stay or fact.category not in TAKE_HOME:
            continue
        key = fact.drug.key
        prior = home.get(key)
        if fact.status in ENDED and prior is not None:
            changes.append(
                MedicationChange(fact.drug, "stopped", None, prior.dosage, (prior.ref, fact.ref))
            )
        elif fact.status in LIVE:
            status: MedicationStatus
            if prior is None:
                status = "new"
            elif (prior.dosage or "") == (fact.dosage or ""):
                status = "continued"
            else:
                status = "changed"
            previous = prior.dosage if prior is not None and status == "changed" else None
            changes.append(
                MedicationChange(fact.drug, status, fact.dosage, previous, _refs(prior, fact))
            )
        else:
            continue  # completed, or an ended order of a drug not taken before: nothing to do
        ordered.add(key)
    for key, prior in home.items():
        if key not in ordered:
            changes.append(
                MedicationChange(prior.drug, "continued", prior.dosage, None, (prior.ref,))
            )
    for fact in sorted(requests, key=_order):
        key = fact.drug.key
        if (
            fact.of_this_stay
            and fact.category in (None, "inpatient")
            and fact.status in LIVE
            and key not in ordered
            and key not in home
        ):
            changes.append(
                MedicationChange(fact.drug, "inpatient-active", fact.dosage, None, (fact.ref,))
            )
    rank = {"new": 0, "changed": 1, "continued": 2, "stopped": 3, "inpatient-active": 4}
    changes.sort(key=lambda c: (rank[c.status], c.drug.label.lower(), c.refs))
    return tuple(_merge_duplicates(changes))


def _merge_duplicates(changes: list[MedicationChange]) -> list[MedicationChange]:
    """One line per drug and status: repeated orders cite all their sources and dosages."""
    merged: dict[tuple[str, str], MedicationChange] = {}
    for change in changes:
        slot = (change.drug.key, change.status)
        twin = merged.get(slot)
        if twin is None:
            merged[slot] = change
        else:
            refs = tuple(dict.fromkeys(twin.refs + change.refs))
            dosages = [d for d in (twin.dosage, change.dosage) if d]
            dosage = " / ".join(dict.fromkeys(dosages)) or None  # every dosage ordered, once
            merged[slot] = MedicationChange(
                twin.drug, twin.status, dosage, twin.previous_dosage, refs
            )
    return list(merged.values())


def _refs(prior: MedicationFact | None, fact: MedicationFact) -> tuple[str, ...]:
    return (prior.ref, fact.ref) if prior is not None else (fact.ref,)


def _order(fact: MedicationFact) -> tuple[float, str]:
    return (fact.when.at.timestamp() if fact.when else 0.0, fact.ref)


def _dosage(instructions: Any) -> str | None:
    if not isinstance(instructions, list) or not instructions:
        return None
    first = instructions[0]
    if not isinstance(first, dict):
        return None
    if isinstance(first.get("text"), str) and first["text"].strip():
        return str(first["text"]).strip()
    for dose_rate in first.get("doseAndRate") or []:
        text = quantity_text(dose_rate.get("doseQuantity"))
        if text:
            return text
    return None


def drug_of(resource: dict[str, Any]) -> Concept | None:
    """medicationCodeableConcept, when the drug is coded inline."""
    return concept_of(resource.get("medicationCodeableConcept"))
