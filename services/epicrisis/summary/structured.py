"""The structured sections, filled from FHIR alone: every item cites its resources."""

from __future__ import annotations

from epicrisis.stay.context import Concept, ConditionFact, MedicationChange, Stay
from epicrisis.summary.describe import series_text
from epicrisis.summary.model import Code, Item, Section
from epicrisis.summary.sections import SPEC_BY_KEY

USE_LABEL = {
    "AD": "admission",
    "DD": "discharge",
    "CC": "chief complaint",
    "CM": "comorbidity",
    "pre-op": "pre-operative",
    "post-op": "post-operative",
    "billing": "billing",
}
MED_LABEL = {
    "new": "new",
    "changed": "changed",
    "continued": "continue",
    "stopped": "stop",
    "inpatient-active": "inpatient order still active at discharge: review",
}


def codes(concept: Concept) -> list[Code]:
    return [Code(system=c.system, code=c.code, display=c.display) for c in concept.codings]


def section(key: str, items: list[Item], *, empty: str | None = None) -> Section:
    spec = SPEC_BY_KEY[key]
    return Section(
        key=key,
        title=spec.title,
        loinc=spec.loinc,
        items=items,
        empty_reason=None if items else empty,
    )


def reason_for_visit(stay: Stay) -> Section:
    """Encounter.reasonCode, the Conditions of Encounter.reasonReference, diagnoses of use CC."""
    items = [
        Item(text=c.label, codes=codes(c), sources=[stay.encounter.ref])
        for c in stay.encounter.reasons
    ]
    known = {c.ref: c for c in (*stay.stay_conditions, *stay.problems)}
    known.update({d.condition.ref: d.condition for d in stay.diagnoses})
    cited = [known[r] for r in stay.encounter.reason_refs if r in known]
    cited += [d.condition for d in stay.diagnoses if d.use == "CC"]
    for condition in {c.ref: c for c in cited}.values():
        items.append(_condition_item(condition, "reason for visit"))
    return section("reason_for_visit", items, empty="No reason for visit recorded")


def admission_diagnosis(stay: Stay) -> Section:
    items = [_condition_item(d.condition, "admission") for d in stay.diagnoses if d.use == "AD"]
    return section("admission_diagnosis", items, empty="No admission diagnosis recorded")


def discharge_diagnosis(stay: Stay) -> Section:
    """Ranked Encounter.diagnosis (not AD/CC), every encounter-diagnosis of the stay, then problems."""
    items: list[Item] = []
    seen: set[str] = set()
    for diagnosis in stay.diagnoses:
        if diagnosis.use in ("AD", "CC") or diagnosis.condition.ref in seen:
            continue
        role = USE_LABEL.get(diagnosis.use or "", "diagnosis")
        if diagnosis.rank == 1 and diagnosis.use in ("DD", None):
            role = "principal"
        items.append(_condition_item(diagnosis.condition, role))
        seen.add(diagnosis.condition.ref)
    for condition in stay.stay_conditions:
        if condition.ref not in seen:
            items.append(_condition_item(condition, "diagnosis of this stay"))
            seen.add(condition.ref)
    for condition in stay.problems:
        if condition.ref not in seen:
            items.append(_condition_item(condition, "active problem"))
            seen.add(condition.ref)
    return section("discharge_diagnosis", items, empty="No discharge diagnosis recorded")


def procedures(stay: Stay) -> Section:
    tz = stay.encounter.tz
    items = [
        Item(
            text=p.concept.label + (f" (outcome: {p.outcome})" if p.outcome else ""),
            codes=codes(p.concept),
            status=p.status,
            date=p.when.iso(tz) if p.when else None,
            sources=[p.ref],
        )
        for p in stay.procedures
    ]
    return section("procedures", items, empty="No procedures recorded during the stay")


def results(stay: Stay) -> Section:
    """Abnormal labs first, then normal labs, then the last vital signs, then report conclusions."""
    labs = sorted(stay.labs, key=lambda s: not s.abnormal)
    items = [
        Item(
            text=series_text(s, stay),
            codes=codes(s.concept),
            status="abnormal"
            if s.last_abnormal
            else ("abnormal during stay" if s.abnormal else "normal"),
            sources=[r.ref for r in s.key_readings()],
        )
        for s in labs
    ]
    items += [
        Item(
            text=series_text(s, stay),
            codes=codes(s.concept),
            status="vital sign",
            sources=[r.ref for r in s.key_readings()],
        )
        for s in stay.vitals
    ]
    items += [
        Item(
            text=f"{r.concept.label}: {r.conclusion}",
            codes=codes(r.concept),
            status=r.status,
            date=r.when.iso(stay.encounter.tz) if r.when else None,
            sources=[r.ref],
        )
        for r in stay.reports
        if r.conclusion
    ]
    return section("results", items, empty="No results recorded during the stay")


def allergies(stay: Stay) -> Section:
    items = []
    for allergy in stay.allergies:
        detail = [
            allergy.criticality and f"criticality {allergy.criticality}",
            allergy.reactions and "reaction: " + ", ".join(allergy.reactions),
        ]
        text = allergy.substance.label + "".join(f"; {d}" for d in detail if d)
        status = {"none-known": "no known allergy", "unreadable": "unreadable record"}.get(
            allergy.kind, allergy.verification or allergy.clinical_status
        )
        items.append(
            Item(text=text, codes=codes(allergy.substance), status=status, sources=[allergy.ref])
        )
    return section(
        "allergies", items, empty="No allergies recorded (no AllergyIntolerance in the record)"
    )


def discharge_medications(stay: Stay) -> Section:
    if stay.died_in_hospital:
        return section(
            "discharge_medications", [], empty="Not applicable: the patient died in hospital"
        )
    items = [_medication_item(m) for m in stay.discharge_medications]
    return section("discharge_medications", items, empty="No discharge medications recorded")


def plan_items(stay: Stay) -> list[Item]:
    labels = {"order": "ordered", "care-plan": "care plan", "pending-result": "result pending"}
    tz = stay.encounter.tz
    return [
        Item(
            text=f"{p.concept.label} ({labels[p.kind]})",
            codes=codes(p.concept),
            status=p.status,
            date=p.when.iso(tz) if p.when else None,
            sources=[p.ref],
        )
        for p in stay.plans
    ]


def _condition_item(condition: ConditionFact, role: str) -> Item:
    return Item(
        text=condition.concept.label,
        codes=codes(condition.concept),
        status=role,
        date=condition.onset.iso() if condition.onset else None,
        sources=[condition.ref],
    )


def _medication_item(change: MedicationChange) -> Item:
    text = change.drug.label
    if change.dosage:
        text += f" — {change.dosage}"
    if change.previous_dosage:
        text += f" (was {change.previous_dosage})"
    return Item(
        text=text,
        codes=codes(change.drug),
        status=MED_LABEL[change.status],
        sources=list(change.refs),
    )
