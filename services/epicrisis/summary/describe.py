"""Short, factual phrases for stay facts, shared by the structured sections and the prose."""

from __future__ import annotations

import re

from epicrisis.stay.context import ObservationSeries, Reading, Stay
from epicrisis.stay.readers import format_number

SEX = {"male": "male", "female": "female", "other": "patient", "unknown": "patient"}


def value_text(reading: Reading) -> str:
    if reading.value is not None and not reading.text:
        unit = f" {reading.unit}" if reading.unit else ""
        return f"{format_number(reading.value)}{unit}"
    return reading.text or ""


def range_text(reading: Reading) -> str | None:
    if reading.low is not None and reading.high is not None:
        return f"{format_number(reading.low)}-{format_number(reading.high)}"
    if reading.low is not None:
        return f">={format_number(reading.low)}"
    if reading.high is not None:
        return f"<={format_number(reading.high)}"
    return reading.range_text


def series_text(series: ObservationSeries, stay: Stay) -> str:
    """``Creatinine: last 1.2 mg/dL (H) on 2024-06-18; first 3.19, peak 3.5; 5 readings, falling``."""
    tz = stay.encounter.tz
    last = series.last
    flag = last.flag()
    parts = [f"{series.concept.label}: last {value_text(last)}" + (f" ({flag})" if flag else "")]
    if last.when:
        parts[0] += f" on {last.when.short(tz)}"
    count = len(series.readings)
    if count > 1:
        extra = [f"first {value_text(series.first)}"]
        peak, trough = series.peak, series.trough
        if peak is not None and trough is not None and peak.value != trough.value:
            extra.append(f"range {value_text(trough)} to {value_text(peak)}")
        parts.append(", ".join(extra))
        parts.append(f"{count} readings" + (f", {series.trend}" if series.trend else ""))
    ref = range_text(last)
    if ref:
        parts.append(f"reference {ref}")
    return "; ".join(parts)


def patient_phrase(stay: Stay) -> str:
    age = stay.patient.age_at_discharge
    sex = SEX.get(stay.patient.sex or "unknown", "patient")
    if age is not None:
        return f"{age}-year-old {sex}"
    return "Patient" if sex == "patient" else f"{sex.capitalize()} patient"


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """Text without control characters: input must not drive a terminal or break XHTML."""
    return _CONTROL.sub("", text)
