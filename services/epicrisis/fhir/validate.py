"""Per-entry validation against the ``fhir.resources`` R4B models (R4-compatible).

R5 models reject R4 data (``Encounter.class`` became a list), so R4B it is. Outside strict
mode, elements that R4 does not define (real exports carry them, e.g. clinosim's
``MedicationAdministration.dosage.timing``) are dropped with a warning and the rest is
validated again; any other failure makes the entry invalid, and the caller decides whether
the summary can do without it.
"""

from __future__ import annotations

import copy
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from epicrisis.config import Limits
from epicrisis.errors import EntryError, Location
from epicrisis.fhir.bundle import DataWarning, Entry, Json

# pydantic error types, in words that name the rule and never the value.
_RULES = {
    "missing": "required element is missing",
    "extra_forbidden": "element is not defined in FHIR R4",
    "string_type": "expected a string",
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "float_type": "expected a number",
    "decimal_type": "expected a number",
    "bool_type": "expected true or false",
    "list_type": "expected an array",
    "dict_type": "expected an object",
    "model_type": "expected an object",
    "model_attributes_type": "expected an object",
    "value_error": "value does not match its FHIR datatype or invariant",
    "string_pattern_mismatch": "value does not match its FHIR datatype",
    "string_too_short": "string is empty",
    "datetime_type": "expected a FHIR dateTime",
    "date_type": "expected a FHIR date",
}


def rule_text(error_type: str) -> str:
    return _RULES.get(error_type, f"invalid value ({error_type})")


def json_path(prefix: str, loc: tuple[int | str, ...]) -> str:
    path = prefix
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def depth(value: Any, limit: int) -> bool:
    """True when ``value`` nests no deeper than ``limit`` (iterative: no recursion to exhaust)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, level = stack.pop()
        if level > limit:
            return False
        if isinstance(node, dict):
            stack.extend((v, level + 1) for v in node.values() if isinstance(v, dict | list))
        elif isinstance(node, list):
            stack.extend((v, level + 1) for v in node if isinstance(v, dict | list))
    return True


def validate_entry(
    entry: Entry, *, limits: Limits, strict: bool = False
) -> tuple[Json, list[DataWarning]]:
    """Validate one resource; return the (possibly cleaned) JSON and warnings, or raise EntryError."""
    prefix = f"entry[{entry.index}].resource"
    loc = entry.location
    if not depth(entry.resource, limits.max_resource_depth):
        raise EntryError(
            f"resource nests deeper than {limits.max_resource_depth} levels",
            location=Location(loc.entry_index, loc.resource_type, loc.resource_id, prefix),
        )
    try:
        model = get_fhir_model_class(entry.resource_type)
    except KeyError:
        raise EntryError(
            "resourceType is not a FHIR R4 resource",
            location=Location(
                loc.entry_index, loc.resource_type, loc.resource_id, f"{prefix}.resourceType"
            ),
        ) from None
    resource = entry.resource
    warnings: list[DataWarning] = []
    try:
        model.model_validate(resource)
        return resource, warnings
    except ValidationError as exc:
        errors = exc.errors(include_input=False, include_url=False)
    unknown = [e for e in errors if e["type"] == "extra_forbidden"]
    if strict or len(unknown) < len(errors):
        first = next((e for e in errors if e["type"] != "extra_forbidden"), errors[0])
        raise EntryError(
            rule_text(first["type"])
            + (f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""),
            location=Location(
                loc.entry_index, loc.resource_type, loc.resource_id, json_path(prefix, first["loc"])
            ),
        )
    cleaned = copy.deepcopy(resource)
    for error in unknown:
        _drop(cleaned, error["loc"])
        warnings.append(
            DataWarning(
                code="unknown-element",
                message="element not defined in FHIR R4 was ignored",
                entry_index=loc.entry_index,
                resource_type=loc.resource_type,
                resource_id=loc.resource_id,
                path=json_path(prefix, error["loc"]),
            )
        )
    try:
        model.model_validate(cleaned)
    except ValidationError as exc:
        first = exc.errors(include_input=False, include_url=False)[0]
        raise EntryError(
            rule_text(first["type"]),
            location=Location(
                loc.entry_index, loc.resource_type, loc.resource_id, json_path(prefix, first["loc"])
            ),
        ) from None
    return cleaned, warnings


def _drop(node: Any, loc: tuple[int | str, ...]) -> None:
    for part in loc[:-1]:
        node = node[part]
    if isinstance(node, dict):
        node.pop(loc[-1], None)
