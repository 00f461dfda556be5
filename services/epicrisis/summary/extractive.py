"""The extractive backend: templated prose built only from stay facts, every sentence cited.

It is the embedded default (no model, no network) and the fallback when an LLM answer
fails verification; the LLM writes the same three prose parts.
"""

from __future__ import annotations

from dataclasses import dataclass

from epicrisis.stay.context import Stay
from epicrisis.stay.readers import format_days
from epicrisis.summary.describe import patient_phrase, value_text
from epicrisis.summary.model import Sentence

MAX_LAB_SENTENCES = 6
MAX_LISTED = 8


@dataclass(frozen=True)
class Prose:
    """The prose parts of a summary, whoever wrote them."""

    hospital_course: list[Sentence]
    discharge_instructions: list[Sentence]
    follow_up: list[Sentence]


def extractive_prose(stay: Stay) -> Prose:
    return Prose(_hospital_course(stay), _instructions(stay), _follow_up(stay))


def _listing(names: list[str]) -> str:
    shown = names[:MAX_LISTED]
    rest = len(names) - len(shown)
    return ", ".join(shown) + (f" and {rest} more" if rest > 0 else "")


def _hospital_course(stay: Stay) -> list[Sentence]:
    enc = stay.encounter
    tz = enc.tz
    out: list[Sentence] = []
    opening = f"{patient_phrase(stay)} admitted"
    if enc.start:
        opening += f" on {enc.start.short(tz)}"
    if enc.admit_source:
        opening += f" ({enc.admit_source.label.lower()})"
    principal = [d.condition for d in stay.diagnoses if d.use in ("DD", "AD", None)][:1] or list(
        stay.stay_conditions[:1]
    )
    refs = [stay.patient.ref, enc.ref]
    if enc.reasons:
        opening += f" for {_listing([r.label for r in enc.reasons])}"
    elif principal:
        opening += f" for {principal[0].concept.label}"
        refs.append(principal[0].ref)
    out.append(Sentence(text=opening + ".", sources=refs))

    stay_dx = [d.condition for d in stay.diagnoses if d.use not in ("AD", "CC")] or list(
        stay.stay_conditions
    )
    if stay_dx:
        out.append(
            Sentence(
                text=f"Diagnoses during the stay: {_listing([c.concept.label for c in stay_dx])}.",
                sources=[c.ref for c in stay_dx],
            )
        )
    if stay.procedures:
        names = [
            p.concept.label + (f" on {p.when.date(tz)}" if p.when else "") for p in stay.procedures
        ]
        out.append(
            Sentence(
                text=f"Procedures: {_listing(names)}.", sources=[p.ref for p in stay.procedures]
            )
        )
    abnormal = [s for s in stay.labs if s.abnormal]
    for series in abnormal[:MAX_LAB_SENTENCES]:
        first, last = series.first, series.last
        if len(series.readings) == 1:
            text = f"{series.concept.label} was {value_text(last)}"
            text += f" ({last.flag()})" if last.flag() else ""
            refs = [last.ref]
        else:
            text = f"{series.concept.label} was {value_text(first)} at first measurement"
            peak, trough = series.peak, series.trough
            refs = [first.ref]
            if series.trend == "falling" and peak is not None and peak.ref != first.ref:
                text += f", peaked at {value_text(peak)}"
                refs.append(peak.ref)
            elif (
                series.trend != "falling"
                and trough is not None
                and trough.ref != first.ref
                and (trough.value or 0) < (first.value or 0)
            ):
                text += f", fell to {value_text(trough)}"
                refs.append(trough.ref)
            text += f" and {value_text(last)} at last measurement"
            if last.flag():
                text += f" ({last.flag()})"
            elif last.low is not None or last.high is not None:
                text += " (within range)"  # said only where the source gives a range
            refs.append(last.ref)
        out.append(Sentence(text=text + ".", sources=list(dict.fromkeys(refs))))
    if len(abnormal) > MAX_LAB_SENTENCES:
        rest = abnormal[MAX_LAB_SENTENCES:]
        out.append(
            Sentence(
                text=f"Other abnormal results: {_listing([s.concept.label for s in rest])} (see Results).",
                sources=[[r for r in s.readings if r.abnormal][-1].ref for s in rest],
            )
        )
    inpatient: dict[str, str] = {}
    for fact in stay.medications:
        if fact.of_this_stay and fact.category == "inpatient":
            inpatient.setdefault(fact.drug.label, fact.ref)
    if inpatient:
        out.append(
            Sentence(
                text=f"Treated in hospital with {_listing(list(inpatient))}.",
                sources=list(inpatient.values()),
            )
        )
    out.append(_outcome(stay))
    return out


def _outcome(stay: Stay) -> Sentence:
    enc = stay.encounter
    tz = enc.tz
    if stay.died_in_hospital:
        when = stay.patient.deceased or enc.end
        text = "The patient died in hospital" + (f" on {when.short(tz)}" if when else "") + "."
        return Sentence(text=text, sources=[enc.ref, stay.patient.ref])
    text = "Discharged"
    if enc.disposition:
        text += f" ({enc.disposition.label.lower()})"
    if enc.end:
        text += f" on {enc.end.short(tz)}"
    if enc.length_of_stay_days is not None:
        text += f" after {format_days(enc.length_of_stay_days)}"
    return Sentence(text=text + ".", sources=[enc.ref])


def _instructions(stay: Stay) -> list[Sentence]:
    if stay.died_in_hospital:
        return []
    out: list[Sentence] = []
    groups = {"new": "Start", "changed": "Change", "continued": "Continue", "stopped": "Stop"}
    for status, verb in groups.items():
        meds = [m for m in stay.discharge_medications if m.status == status]
        if meds:
            refs = [r for m in meds for r in m.refs]
            names = [
                f"{m.drug.label} to {m.dosage}"
                if status == "changed" and m.dosage
                else m.drug.label
                for m in meds
            ]
            out.append(
                Sentence(text=f"{verb}: {_listing(names)}.", sources=list(dict.fromkeys(refs)))
            )
    review = [m for m in stay.discharge_medications if m.status == "inpatient-active"]
    if review:
        out.append(
            Sentence(
                text=f"Inpatient orders still active at discharge, to be reviewed: "
                f"{_listing([m.drug.label for m in review])}.",
                sources=[r for m in review for r in m.refs],
            )
        )
    allergens = [a for a in stay.allergies if a.kind == "allergy"]
    if allergens:
        out.append(
            Sentence(
                text=f"Avoid: {_listing([a.substance.label for a in allergens])} (recorded allergies).",
                sources=[a.ref for a in allergens],
            )
        )
    unreadable = [a for a in stay.allergies if a.kind == "unreadable"]
    if unreadable:
        out.append(
            Sentence(
                text=f"Check the allergy list: {len(unreadable)} allergy record(s) could not be read.",
                sources=[a.ref for a in unreadable],
            )
        )
    if stay.encounter.disposition:
        out.append(
            Sentence(
                text=f"Discharge disposition: {stay.encounter.disposition.label}.",
                sources=[stay.encounter.ref],
            )
        )
    return out


def _follow_up(stay: Stay) -> list[Sentence]:
    out: list[Sentence] = []
    orders = [p for p in stay.plans if p.kind in ("order", "care-plan")]
    pending = [p for p in stay.plans if p.kind == "pending-result"]
    if orders:
        out.append(
            Sentence(
                text=f"Open orders and plans: {_listing([p.concept.label for p in orders])}.",
                sources=[p.ref for p in orders],
            )
        )
    if pending:
        out.append(
            Sentence(
                text=f"Results pending at discharge: {_listing([p.concept.label for p in pending])}.",
                sources=[p.ref for p in pending],
            )
        )
    last_abnormal = [s for s in stay.labs if s.last_abnormal]
    if last_abnormal and not stay.died_in_hospital:
        out.append(
            Sentence(
                text=f"Abnormal at last measurement, to recheck: {_listing([s.concept.label for s in last_abnormal])}.",
                sources=[s.last.ref for s in last_abnormal],
            )
        )
    return out
