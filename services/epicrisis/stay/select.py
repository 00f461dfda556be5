"""Which encounter to summarize: the one named, else the latest finished inpatient stay."""

from __future__ import annotations

from epicrisis.errors import Location, StayError, safe_id
from epicrisis.fhir.bundle import Entry, IngestedBundle
from epicrisis.stay.time import parse_when

INPATIENT_CLASSES = frozenset({"IMP", "ACUTE", "NONAC"})
EMERGENCY_CLASSES = frozenset({"EMER"})


def select_encounter(
    bundle: IngestedBundle, encounter_id: str | None = None, *, allow_emergency: bool = False
) -> Entry:
    encounters = bundle.of_type("Encounter")
    if encounter_id:
        wanted = encounter_id.strip()
        for entry in encounters:
            if wanted in (entry.resource_id, entry.local_ref, entry.full_url):
                return entry
        shown = safe_id(wanted.removeprefix("Encounter/"))
        raise StayError(
            f"no Encounter with id {shown} in the Bundle ({len(encounters)} encounters present)",
            location=Location(resource_type="Encounter", resource_id=shown),
        )
    classes = INPATIENT_CLASSES | (EMERGENCY_CLASSES if allow_emergency else frozenset())
    candidates = [
        e for e in encounters if _class_code(e) in classes and e.peek("status") == "finished"
    ]
    if not candidates:
        kinds = (
            "inpatient or emergency" if allow_emergency else "inpatient (class IMP, ACUTE or NONAC)"
        )
        raise StayError(
            f"no finished {kinds} Encounter in the Bundle ({len(encounters)} encounters present); "
            "name the encounter to summarize with --encounter ID"
        )
    return max(candidates, key=_recency)


def _class_code(entry: Entry) -> str | None:
    value = entry.peek("class")
    if isinstance(value, dict):
        code = value.get("code")
        return code if isinstance(code, str) else None
    return None


def _recency(entry: Entry) -> tuple[float, int]:
    period = entry.peek("period")
    period = period if isinstance(period, dict) else {}
    when = parse_when(period.get("end")) or parse_when(period.get("start"))
    return (when.at.timestamp() if when else float("-inf"), entry.index)
