"""Small readers from validated FHIR JSON to the stay's value types."""

from __future__ import annotations

from typing import Any

from epicrisis.stay.context import Coding, Concept


def concept_of(value: Any) -> Concept | None:
    """A CodeableConcept (or a bare Coding) as a :class:`Concept`; None when absent or empty."""
    if not isinstance(value, dict):
        return None
    codings: list[Coding] = []
    raw_codings = value.get("coding")
    items = raw_codings if isinstance(raw_codings, list) else [value]  # a bare Coding too
    for item in items:
        if not isinstance(item, dict):
            continue
        code, display = _text(item.get("code")), _text(item.get("display"))
        if code or display:
            codings.append(Coding(_text(item.get("system")), code, display))
    text = _text(value.get("text"))
    if not codings and not text:
        return None
    return Concept(text.strip() if text else None, tuple(codings))


def _text(value: Any) -> str | None:
    """A string element as read; anything else (raw JSON of an unvalidated entry) as absent."""
    return value if isinstance(value, str) else None


def codes_of(value: Any) -> tuple[str, ...]:
    """All codes of a CodeableConcept or a list of them."""
    items = value if isinstance(value, list) else [value]
    codes: list[str] = []
    for item in items:
        concept = concept_of(item)
        if concept is not None:
            codes.extend(c.code for c in concept.codings if c.code)
    return tuple(codes)


def first_code(value: Any) -> str | None:
    codes = codes_of(value)
    return codes[0] if codes else None


def number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def quantity_text(value: Any) -> str | None:
    """``40 mg`` from a Quantity."""
    if not isinstance(value, dict):
        return None
    amount = number(value.get("value"))
    if amount is None:
        return None
    unit = value.get("unit") or value.get("code") or ""
    return f"{format_number(amount)} {unit}".strip()


def format_number(value: float) -> str:
    """Numbers as a clinician writes them: 2.1, 140, 0.59 (no trailing zeros, no exponent)."""
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.6f}".rstrip("0").rstrip(".")


def format_days(days: float) -> str:
    """``1 day``, ``3.8 days``."""
    return f"{format_number(days)} day" + ("" if days == 1 else "s")
