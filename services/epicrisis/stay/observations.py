"""Observations of the stay grouped into series by code: first, last, extremes, trend."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import tzinfo
from typing import Any

from epicrisis.stay.context import Concept, ObservationSeries, Reading
from epicrisis.stay.readers import codes_of, concept_of, number, quantity_text
from epicrisis.stay.time import parse_when


def readings_of(ref: str, obs: dict[str, Any], tz: tzinfo) -> list[tuple[Concept, str, Reading]]:
    """The readings in one Observation: its own value and one per valued component."""
    code = concept_of(obs.get("code"))
    if code is None:
        return []
    category = _category(obs)
    when = parse_when(obs.get("effectiveDateTime") or obs.get("effectiveInstant"), tz)
    if when is None and isinstance(obs.get("effectivePeriod"), dict):
        when = parse_when(obs["effectivePeriod"].get("start"), tz)
    if when is None:
        when = parse_when(obs.get("issued"), tz)
    status = str(obs.get("status") or "unknown")
    found: list[tuple[Concept, str, Reading]] = []
    own = _reading(ref, obs, when, status)
    if own is not None:
        found.append((code, category, own))
    for component in obs.get("component") or []:
        comp_code = concept_of(component.get("code"))
        reading = _reading(ref, component, when, status)
        if comp_code is not None and reading is not None:
            found.append((comp_code, category, reading))
    return found


def series_of(items: Iterable[tuple[Concept, str, Reading]]) -> tuple[ObservationSeries, ...]:
    """Group readings by (category, code); series in a stable order: category, then label."""
    groups: dict[tuple[str, str], tuple[Concept, list[Reading]]] = {}  # (category, code|unit)
    for concept, category, reading in items:
        # One series per unit: 39.4 Cel and 98.6 [degF] are not a trend.
        slot = groups.setdefault((category, f"{concept.key}|{reading.unit or ''}"), (concept, []))
        slot[1].append(reading)
    series = []
    for (category, _), (concept, readings) in groups.items():
        readings.sort(key=lambda r: (r.when.at.timestamp() if r.when else 0.0, r.ref))
        series.append(ObservationSeries(concept, category, tuple(readings)))
    order = {"laboratory": 0, "vital-signs": 1}
    series.sort(
        key=lambda s: (order.get(s.category, 2), s.category, s.concept.label.lower(), s.concept.key)
    )
    return tuple(series)


# observation-category codes, plus HL7 v2 table 0074 (diagnostic service) codes seen in exports
_CATEGORY_ALIASES = {"lab": "laboratory", "laboratory": "laboratory", "vital-signs": "vital-signs"}


def _category(obs: dict[str, Any]) -> str:
    codes = [c.lower() for c in codes_of(obs.get("category") or [])]
    for code in codes:
        if _CATEGORY_ALIASES.get(code) == "laboratory":
            return "laboratory"
    if "vital-signs" in codes:
        return "vital-signs"
    return codes[0] if codes else "other"


def _reading(ref: str, holder: dict[str, Any], when: Any, status: str) -> Reading | None:
    value: float | None = None
    text: str | None = None
    unit: str | None = None
    quantity = holder.get("valueQuantity")
    if isinstance(quantity, dict) and number(quantity.get("value")) is not None:
        value = number(quantity.get("value"))
        unit = quantity.get("unit") or quantity.get("code")
        comparator = quantity.get("comparator")
        if comparator:
            text = f"{comparator}{quantity_text(quantity)}"
    elif "valueCodeableConcept" in holder:
        concept = concept_of(holder["valueCodeableConcept"])
        text = concept.label if concept else None
    elif any(k in holder for k in ("valueRange", "valueRatio", "valuePeriod")):
        text = _structured_value(holder)
    elif isinstance(holder.get("valueString"), str):
        text = holder["valueString"].strip()[:200]
    elif isinstance(holder.get("valueBoolean"), bool):
        text = "yes" if holder["valueBoolean"] else "no"
    elif number(holder.get("valueInteger")) is not None:
        value = number(holder.get("valueInteger"))
    if value is None and not text:
        return None
    low = high = None
    range_text = None
    ranges = holder.get("referenceRange") or []
    if ranges and isinstance(ranges[0], dict):
        low = number((ranges[0].get("low") or {}).get("value"))
        high = number((ranges[0].get("high") or {}).get("value"))
        range_text = ranges[0].get("text") if isinstance(ranges[0].get("text"), str) else None
    flags = codes_of(holder.get("interpretation") or [])
    return Reading(ref, when, value, text, unit, low, high, range_text, flags, status)


def _structured_value(holder: dict[str, Any]) -> str | None:
    """valueRange ``2-4 mmol/L``, valueRatio ``1:40``, valuePeriod ``from .. to ..``, as text."""
    if isinstance(holder.get("valueRange"), dict):
        low = quantity_text(holder["valueRange"].get("low"))
        high = quantity_text(holder["valueRange"].get("high"))
        return f"{low or '?'} to {high or '?'}" if low or high else None
    if isinstance(holder.get("valueRatio"), dict):
        num = quantity_text(holder["valueRatio"].get("numerator"))
        den = quantity_text(holder["valueRatio"].get("denominator"))
        return f"{num}:{den}" if num and den else None
    if isinstance(holder.get("valuePeriod"), dict):
        start, end = holder["valuePeriod"].get("start"), holder["valuePeriod"].get("end")
        return f"from {start or '?'} to {end or '?'}" if start or end else None
    return None
