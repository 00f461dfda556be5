"""Per-entry validation against the ``fhir.resources`` R4B models (R4-compatible).

R5 models reject R4 data (``Encounter.class`` became a list), so R4B it is. Outside strict
mode, elements that R4 does not define (real exports carry them, e.g. clinosim's
``MedicationAdministration.dosage.timing``) are dropped with a warning and the rest is
validated again; any other failure makes the entry invalid, and the caller decides whether
the summary can do without it.

The models are laxer than FHIR JSON: they take ``"1"`` for an integer, a number for a
dateTime and a string of JSON text for an object. Readers of the returned JSON rely on its
shape, so a resource the model accepts must also carry every element with its JSON type
(object, array, string, number, boolean), or it is invalid too.

Only concrete R4 resource types validate, contained ones included: not ``Resource``, not a
datatype such as ``Coding``, not a name fhir.resources does not know.

Messages name the rule and the JSON path, never a value; a key that is not shaped like a
FHIR element name (keys can carry anything) is shown as ``<unknown element>``.

Within one Bundle the same elements come back entry after entry (a series' code and
reference ranges, the subject, the encounter): an ``ElementMemo`` validates each distinct
complex element once and hands the model's instance to every resource that carries it.
"""

from __future__ import annotations

import contextlib
import re
import types
import typing
from collections.abc import Container
from decimal import Decimal
from functools import cache
from typing import Any

import orjson
from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.resource import Resource
from pydantic import BaseModel, ValidationError

from epicrisis.config import Limits
from epicrisis.errors import EntryError, Location
from epicrisis.fhir.bundle import DataWarning, Entry, Json
from epicrisis.fhir.models import resource_model

# pydantic error types, in words that name the rule and never the value.
_RULES = {
    "missing": "required element is missing",
    "extra_forbidden": "element is not defined in FHIR R4",
    "string_type": "expected a string",
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "int_from_float": "expected an integer",
    "float_type": "expected a number",
    "decimal_type": "expected a number",
    "bool_type": "expected true or false",
    "list_type": "expected an array",
    "dict_type": "expected an object",
    "model_type": "expected an object",
    "model_attributes_type": "expected an object",
    "model_validation_format": "object is empty or malformed",
    "json_invalid": "expected an object",
    "value_error": "value does not match its FHIR datatype or invariant",
    "string_pattern_mismatch": "value does not match its FHIR datatype",
    "string_too_short": "string is empty",
    "datetime_type": "expected a FHIR dateTime",
    "date_type": "expected a FHIR date",
    "resource_type": "resourceType is not a FHIR R4 resource",
    "unreadable": "resource cannot be read as its FHIR R4 type",
}
_ELEMENT_NAME = re.compile(r"_?[a-z][A-Za-z0-9]{0,63}")

Problem = tuple[str, tuple[int | str, ...]]  # (rule, location inside the resource)


def rule_text(error_type: str) -> str:
    return _RULES.get(error_type, f"invalid value ({error_type})")


def json_path(prefix: str, loc: tuple[int | str, ...]) -> str:
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part == "root":
            continue  # pydantic's name for a root model, not an element of the input
        else:
            path += f".{part}" if _ELEMENT_NAME.fullmatch(part) else ".<unknown element>"
    return path


def depth(value: Any, limit: int) -> bool:
    """True when ``value`` nests no deeper than ``limit`` (iterative: no recursion to exhaust).

    Runs on every entry the summary reads, so it goes a level at a time: a level is the list
    of every value inside the objects and arrays of the level above (scalars too, passed over
    one level later), and no node carries a level number of its own.
    """
    if limit < 1:
        return False  # even a scalar is one level
    level: list[Any] = [value]
    for _ in range(limit):
        inner: list[Any] = []
        for node in level:
            if isinstance(node, dict):
                inner.extend(node.values())
            elif isinstance(node, list):
                inner.extend(node)
        if not inner:
            return True
        level = inner
    # ``level`` now holds the values at level ``limit + 1``: only scalars may be there.
    return not any(isinstance(node, dict | list) for node in level)


MEMO_ELEMENT_BYTES = 4096  # the largest element an ElementMemo keeps, as JSON text
MEMO_BUDGET_BYTES = 8 * 1024 * 1024  # its keys in all (a 2 MB stay's Bundle: under 1 MB)
# What fhir.resources raises on bad input: pydantic's errors, and bare ones from validators
# that meet shapes they do not expect.
_REFUSALS = (ValidationError, KeyError, ValueError, TypeError, AttributeError)


class ElementMemo:
    """The complex elements of one Bundle's resources validated so far, by their JSON text.

    fhir.resources validates a nested element on its own (``model_validate`` of its model,
    no context from the resource around it) and takes an instance of that model as it is,
    so a resource whose elements are swapped for instances validated earlier is checked
    exactly as the plain JSON would be, at a fraction of the cost where elements repeat.
    Only valid elements are kept; one that fails stays JSON, for the resource's validation
    to report in place. Lives as long as one gather: it holds data of one patient.

    Keys are JSON text, one per nesting level, so a deep chain of elements would be kept
    many times over: only elements of up to ``MEMO_ELEMENT_BYTES`` are kept (the repeated
    ones are codes, references, quantities, ranges), and no more than ``MEMO_BUDGET_BYTES``
    in all; past that, elements are validated as before and forgotten.
    """

    def __init__(self, budget: int = MEMO_BUDGET_BYTES) -> None:
        self._valid: dict[tuple[type[BaseModel], bytes], BaseModel] = {}
        self.vetted: set[int] = set()  # ids of those instances: their JSON types are checked
        self.kept_bytes = 0
        self._budget = budget

    def with_instances(self, model: type[BaseModel], raw: Json) -> Json:
        """``raw`` with each complex element replaced by its validated instance where valid."""
        elements = _element_models(model)
        out: Json = {}
        for key, value in raw.items():
            element = elements.get(key)
            if element is None:
                out[key] = value
            elif isinstance(value, list):
                out[key] = [self._instance(element, item) for item in value]
            else:
                out[key] = self._instance(element, value)
        return out

    def _instance(self, model: type[BaseModel], raw: Any) -> Any:
        if not isinstance(raw, dict):
            return raw
        try:
            key = (model, orjson.dumps(raw))
        except orjson.JSONEncodeError:  # an integer beyond 64 bits from a dict caller
            return raw
        found = self._valid.get(key)
        if found is None:
            try:
                found = model.model_validate(self.with_instances(model, raw))
            except _REFUSALS:
                return raw
            if _json_types(found, raw, self.vetted) is not None:
                return raw
            size = len(key[1])
            if size <= MEMO_ELEMENT_BYTES and self.kept_bytes + size <= self._budget:
                self._valid[key] = found
                self.vetted.add(id(found))
                self.kept_bytes += size
        return found


@cache
def _element_models(model: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """JSON key to the model of its complex datatype, for the elements ``ElementMemo`` keeps:
    not resources (``contained``), which validate by their own ``resourceType``."""
    found: dict[str, type[BaseModel]] = {}
    for name, field in model.model_fields.items():
        element = _complex_type(field.annotation)
        if element is not None and not issubclass(element, Resource):
            found[field.alias or name] = element
    return found


def validate_entry(
    entry: Entry, *, limits: Limits, strict: bool = False, memo: ElementMemo | None = None
) -> tuple[Json, list[DataWarning]]:
    """Validate one resource; return the (possibly cleaned) JSON and warnings, or raise EntryError.

    Give the same ``memo`` to every call for one Bundle to validate repeated elements once.
    """
    prefix = _prefix(entry)
    loc = entry.location

    def error(rule: str, at: tuple[int | str, ...]) -> EntryError:
        return EntryError(
            rule,
            location=Location(
                loc.entry_index, loc.resource_type, loc.resource_id, json_path(prefix, at)
            ),
        )

    if not depth(entry.resource, limits.max_resource_depth):
        raise error(f"resource nests deeper than {limits.max_resource_depth} levels", ())
    model = resource_model(entry.resource_type)
    if model is None:
        raise error(rule_text("resource_type"), ("resourceType",))
    resource = entry.resource
    problems = _problems(model, resource, memo)
    if not problems:
        return resource, []
    unknown = [p for p in problems if p[0] == "extra_forbidden"]
    if strict or len(unknown) < len(problems):
        first = next((p for p in problems if p[0] != "extra_forbidden"), problems[0])
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise error(_rule(model, first) + more, first[1])
    cleaned = _json_copy(resource)
    warnings: list[DataWarning] = []
    for _, at in unknown:
        _drop(cleaned, at)
        warnings.append(
            DataWarning.at(
                Location(
                    loc.entry_index,
                    loc.resource_type,
                    loc.resource_id,
                    # An undefined key is the exporter's word, not FHIR's: never repeat it.
                    json_path(prefix, at[:-1]) + ".<unknown element>",
                ),
                "unknown-element",
                "element not defined in FHIR R4 was ignored",
            )
        )
    problems = _problems(model, cleaned, memo)
    if problems:
        raise error(_rule(model, problems[0]), problems[0][1])
    return cleaned, warnings


def _prefix(entry: Entry) -> str:
    """The JSON path of the resource: ``entry[3].resource``, or its place in a container."""
    top = f"entry[{entry.index}].resource"
    if entry.container is None:
        return top
    items = entry.container.resource.get("contained")
    if isinstance(items, list):
        for position, item in enumerate(items):
            if item is entry.resource:
                return f"{top}.contained[{position}]"
    return f"{top}.contained"


def _problems(
    model: type[BaseModel], resource: Json, memo: ElementMemo | None = None
) -> list[Problem]:
    """What is wrong with ``resource`` as a ``model``; empty when it is valid.

    With a ``memo``, a valid resource is validated with its known elements as instances;
    anything it refuses is validated again as plain JSON, so the problems reported are
    always those of the resource as sent.
    """
    contained = resource.get("contained")
    if isinstance(contained, list):
        for position, item in enumerate(contained):
            if isinstance(item, dict) and (
                not isinstance(item.get("resourceType"), str)
                or resource_model(item["resourceType"]) is None
            ):
                return [("resource_type", ("contained", position, "resourceType"))]
    instance: BaseModel | None = None
    if memo is not None:
        with contextlib.suppress(*_REFUSALS):
            instance = model.model_validate(memo.with_instances(model, resource))
    try:
        if instance is None:
            instance = model.model_validate(resource)
    except ValidationError as exc:
        return [
            (e["type"], tuple(e["loc"])) for e in exc.errors(include_input=False, include_url=False)
        ]
    except _REFUSALS:  # the bare errors of validators meeting shapes they do not expect
        return [("unreadable", ())]
    mismatch = _json_types(instance, resource, memo.vetted if memo is not None else frozenset())
    if mismatch is None:
        return []
    rule, inside_out = mismatch
    return [(rule, tuple(reversed(inside_out)))]


def _json_types(
    value: Any, raw: Any, vetted: Container[int] = frozenset()
) -> tuple[str, list[int | str]] | None:
    """The first element of ``raw`` whose JSON type differs from what the model made of it.

    Gives the rule and the element's location, innermost part first: the location is built
    only for a mismatch, on the way back out, as almost every resource has none. Runs on
    every resource the summary reads, so a string element read as a string (most of them)
    is passed over without a call, and so is an instance in ``vetted`` (an ``ElementMemo``'s,
    checked against the same JSON text before).
    """
    if isinstance(value, BaseModel):
        if not isinstance(raw, dict):
            return "dict_type", []
        fields = _fields_by_key(type(value))
        for key, item in raw.items():
            name = fields.get(key)
            if name is None or item is None:
                continue
            inner = getattr(value, name)
            if (type(inner) is str and isinstance(item, str)) or id(inner) in vetted:
                continue
            found = _json_types(inner, item, vetted)
            if found is not None:
                found[1].append(key)
                return found
        return None
    if isinstance(value, list):
        if not isinstance(raw, list) or len(raw) != len(value):
            return "list_type", []
        for position, (inner, item) in enumerate(zip(value, raw, strict=True)):
            if (
                item is None
                or (type(inner) is str and isinstance(item, str))
                or id(inner) in vetted
            ):
                continue
            found = _json_types(inner, item, vetted)
            if found is not None:
                found[1].append(position)
                return found
        return None
    if value is None:
        return None
    if isinstance(value, bool):
        ok, rule = isinstance(raw, bool), "bool_type"
    elif isinstance(value, int):
        ok, rule = isinstance(raw, int) and not isinstance(raw, bool), "int_type"
    elif isinstance(value, float | Decimal):
        ok, rule = isinstance(raw, int | float) and not isinstance(raw, bool), "decimal_type"
    else:  # strings, codes, dates and times, base64: all JSON strings
        ok, rule = isinstance(raw, str), "string_type"
    return None if ok else (rule, [])


@cache
def _fields_by_key(model: type[BaseModel]) -> dict[str, str]:
    """JSON key (``class``, ``_status``) to attribute name (``class_fhir``, ``status__ext``)."""
    return {(field.alias or name): name for name, field in model.model_fields.items()}


def _rule(model: type[BaseModel], problem: Problem) -> str:
    """The rule broken, naming the FHIR datatype expected when the model says which."""
    kind, at = problem
    if kind == "model_validation_format" and at[-1:] == ("root",):
        return "expected an object"
    if kind in ("value_error", "string_pattern_mismatch"):
        expected = _fhir_type(model, at)
        if expected is not None:
            return f"value is not a valid FHIR {expected}"
    return rule_text(kind)


def _fhir_type(model: type[BaseModel], at: tuple[int | str, ...]) -> str | None:
    """``dateTime`` for ``period.start`` of an Encounter: the primitive type at a path."""
    current: type[BaseModel] | None = model
    annotation: Any = None
    for part in at:
        if isinstance(part, int):
            continue
        if current is None:
            return None
        name = _fields_by_key(current).get(part)
        if name is None:
            return None
        annotation = current.model_fields[name].annotation
        current = _complex_type(annotation)
    if annotation is None or current is not None:
        return None
    return _primitive_name(annotation)


def _unwrapped(annotation: Any) -> Any:
    """The element type of ``Optional[List[X]]`` and the like."""
    while typing.get_origin(annotation) in (typing.Union, types.UnionType, list):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if not args:
            return None
        annotation = args[0]
    return annotation


def _complex_type(annotation: Any) -> type[BaseModel] | None:
    inner = _unwrapped(annotation)
    name = getattr(inner, "__name__", "")
    if typing.get_origin(inner) is typing.Annotated or not name.endswith("Type"):
        return None
    try:
        found = get_fhir_model_class(name.removesuffix("Type"))
    except (KeyError, ValueError, AttributeError):
        return None
    return found if isinstance(found, type) and issubclass(found, BaseModel) else None


def _primitive_name(annotation: Any) -> str | None:
    inner = _unwrapped(annotation)
    if typing.get_origin(inner) is typing.Annotated:
        for meta in typing.get_args(inner)[1:]:
            name = type(meta).__name__
            if name and name[0].isupper():
                return name[0].lower() + name[1:]
    if inner is bool:
        return "boolean"
    return None


def _json_copy(value: Any) -> Any:
    """A copy of parsed JSON to drop elements from: what ``copy.deepcopy`` gives, in a
    third of the time, as objects and arrays are all there is to copy."""
    if isinstance(value, dict):
        return {key: _json_copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_copy(item) for item in value]
    return value


def _drop(node: Any, loc: tuple[int | str, ...]) -> None:
    """Remove the element at ``loc``; a path that is not in the JSON leaves it unchanged."""
    for part in loc[:-1]:
        in_dict = isinstance(node, dict) and isinstance(part, str) and part in node
        in_list = isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        if not (in_dict or in_list):
            return
        node = node[part]
    if isinstance(node, dict) and loc:
        node.pop(loc[-1], None)
