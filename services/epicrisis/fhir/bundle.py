"""Parse Bundle bytes and check the shape of every entry, cheaply.

Only the shape is checked here (resourceType, id, unique fullUrl); the full R4B validation
runs later, in :mod:`epicrisis.fhir.validate`, on just the entries the summary reads. That
split is what keeps a 4 MB Bundle fast without trusting any resource we use.

The same split applies to parsing. simdjson checks the whole document (UTF-8, syntax, depth)
without building Python objects; a resource becomes JSON values only when it is read, and
scoping reads single elements (:meth:`Entry.peek`). A whole-patient Bundle's stay reads a few
dozen of its thousands of entries, so most are never built nor freed. What simdjson does not
take as orjson would (a syntax error, an integer beyond 64 bits, a key repeated in an
object) is parsed again with orjson. Both are checked by the same code, so they yield the
same entries and the same errors.

A fullUrl may repeat only with another ``meta.versionId``, or in a history Bundle (rule
bdl-7); the index by fullUrl then keeps the first listed, which a history Bundle lists as the
newest.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from typing import Any, Literal, TypeGuard

import orjson
from pydantic import BaseModel, ConfigDict

try:
    from simdjson import Array, Object, Parser
except ImportError:  # no wheel for this Python (see pyproject.toml): orjson parses every Bundle
    Parser = None  # type: ignore[assignment,misc]
    Array = Object = type("NoNode", (), {})  # type: ignore[assignment,misc]

from epicrisis.config import Limits, get_settings
from epicrisis.errors import BundleError, Location, safe_id, safe_type
from epicrisis.fhir.models import printable_type, resource_model

BUNDLE_TYPES = frozenset(
    {
        "transaction",
        "searchset",
        "collection",
        "batch",
        "document",
        "transaction-response",
        "batch-response",
        "history",
        "message",
    }
)

Json = dict[str, Any]
# A JSON object or array as either parser gives it (tuples: isinstance takes them fastest).
OBJECTS = (dict, Object)
ARRAYS = (list, Array)


WarningCode = Literal["invalid-entry", "unknown-element", "dangling-reference", "unreadable-note"]


class DataWarning(BaseModel):
    """Something in the input the summary worked around; says where, never what it contained."""

    model_config = ConfigDict(frozen=True)

    code: WarningCode
    message: str
    entry_index: int | None = None
    resource_type: str | None = None
    resource_id: str | None = None
    path: str | None = None

    @classmethod
    def at(cls, location: Location, code: WarningCode, message: str) -> DataWarning:
        return cls(
            code=code,
            message=message,
            entry_index=location.entry_index,
            resource_type=location.resource_type,
            resource_id=location.resource_id,
            path=location.path,
        )


@dataclass(slots=True)
class Entry:
    """One entry with a resource: its position, identity and the resource as parsed."""

    index: int
    full_url: str | None
    resource_type: str
    resource_id: str | None
    parsed: Json | Object  # JSON values, or simdjson's node until the resource is first read
    container: Entry | None = None  # set for a contained resource: the entry holding it

    @property
    def resource(self) -> Json:
        """The resource as JSON values, built on first use and kept."""
        parsed = self.parsed
        if isinstance(parsed, Object):
            parsed = self.parsed = parsed.as_dict()
        return parsed

    def peek(self, key: str, default: Any = None) -> Any:
        """One top-level element as JSON values, without building the rest of the resource."""
        value = self.parsed.get(key, default)
        if isinstance(value, Object):
            return value.as_dict()
        if isinstance(value, Array):
            return value.as_list()
        return value

    @property
    def location(self) -> Location:
        return Location(self.index, printable_type(self.resource_type), safe_id(self.resource_id))

    @property
    def local_ref(self) -> str:
        """``Type/id`` when the resource has an id, else its fullUrl: how outputs cite it."""
        if self.container is not None:
            return f"{self.container.local_ref}#{self.resource_id}"
        if self.resource_id:
            return f"{self.resource_type}/{self.resource_id}"
        return self.full_url or f"{self.resource_type}#entry{self.index}"


@dataclass(slots=True)
class IngestedBundle:
    """A shape-checked Bundle with its entries indexed by fullUrl and by ``Type/id``."""

    bundle_type: str
    entries: list[Entry]
    by_full_url: dict[str, Entry] = field(default_factory=dict)
    by_type_id: dict[str, list[Entry]] = field(default_factory=dict)
    by_type: dict[str, list[Entry]] = field(default_factory=dict)

    def of_type(self, resource_type: str) -> list[Entry]:
        return self.by_type.get(resource_type, [])


def _payload(data: bytes, limits: Limits) -> bytes:
    """The JSON text of the input: its size checked and a UTF-8 BOM left out."""
    if len(data) > limits.max_bundle_bytes:
        raise BundleError(
            f"Bundle is {len(data)} bytes, over the limit of {limits.max_bundle_bytes} bytes"
        )
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    if not data or data.isspace():  # what ``not data.strip()`` says, without copying the input
        raise BundleError("input is empty; expected a FHIR R4 Bundle as JSON")
    return data


def decode_json(data: bytes) -> Any:
    """JSON text to JSON values: UTF-8 and syntax checked, with errors that say which."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        # orjson checks the UTF-8 of the whole input before any syntax, so valid JSON is
        # valid UTF-8; the input is decoded again only here, for the offset of the bad byte.
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as bad:
            raise BundleError(
                f"input is not valid UTF-8 (first bad byte at offset {bad.start})"
            ) from None
        if "depth limit" in exc.msg:
            raise BundleError("JSON is nested deeper than 1024 levels") from None
        # exc.msg names the rule broken and pos the offset; neither repeats the content.
        raise BundleError(
            f"input is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None


def ingest(data: bytes, *, limits: Limits | None = None) -> IngestedBundle:
    """Parse and shape-check a Bundle; raises :class:`BundleError` naming the first problem."""
    limits = limits or get_settings().limits
    data = _payload(data, limits)
    if Parser is not None:
        try:
            return _ingest_parsed(_parse_nodes(data), limits)
        except _Unusual:
            pass
    return _ingest_parsed(decode_json(data), limits)


class _Unusual(Exception):
    """Input that simdjson's nodes would not show as orjson's values do: orjson parses it."""


def _parse_nodes(data: bytes) -> Any:
    """simdjson's document of ``data``; what it refuses (syntax, UTF-8, depth, an integer
    beyond 64 bits) is _Unusual, for orjson to parse or to name in its error."""
    try:
        return Parser().parse(data)
    except (ValueError, RuntimeError):
        raise _Unusual from None


def _check_repeats(node: Any) -> None:
    """A key repeated in an object: orjson keeps its last value, simdjson's lookups the first,
    so a node that repeats one is _Unusual. (Iterating a node yields every key, repeats too;
    below the top of a resource, nodes are built as orjson builds values.)"""
    if isinstance(node, Object) and len(set(node)) != len(node):
        raise _Unusual


def _ingest_parsed(doc: Any, limits: Limits) -> IngestedBundle:
    """The Bundle over parsed JSON: orjson's values, or simdjson's nodes, checked alike."""
    _check_repeats(doc)
    if not isinstance(doc, OBJECTS):
        raise BundleError(f"top-level JSON is {_kind(doc)}; expected a FHIR Bundle object")
    rtype = doc.get("resourceType")
    if rtype != "Bundle":
        got = (
            f"a bare {rtype} resource; wrap resources in a Bundle"
            if isinstance(rtype, str) and resource_model(rtype) is not None
            else "a JSON object with no valid resourceType (not a FHIR resource)"
        )
        raise BundleError(
            f"expected a FHIR Bundle but got {got}", location=Location(path="resourceType")
        )
    btype = doc.get("type")
    if not isinstance(btype, str) or btype not in BUNDLE_TYPES:
        raise BundleError(
            "Bundle.type is missing or not a FHIR R4 bundle type", location=Location(path="type")
        )
    raw_entries: Any = doc.get("entry", [])
    if not isinstance(raw_entries, ARRAYS):
        raise BundleError(
            f"Bundle.entry is {_kind(raw_entries)}; expected an array",
            location=Location(path="entry"),
        )
    if len(raw_entries) > limits.max_entries:
        raise BundleError(
            f"Bundle has {len(raw_entries)} entries, over the limit of {limits.max_entries}"
        )

    bundle = IngestedBundle(bundle_type=btype, entries=[])
    versions: _Versions = {}
    for index, raw in enumerate(raw_entries):
        entry = _shape_checked_entry(index, raw)
        if entry is None:
            continue
        bundle.entries.append(entry)
        _index_entry(bundle, entry, versions)
    return bundle


def _shape_checked_entry(index: int, raw: Any) -> Entry | None:
    # Runs once per entry of every Bundle: the error paths are built only when needed.
    _check_repeats(raw)
    if not isinstance(raw, OBJECTS):
        raise BundleError(
            f"entry is {_kind(raw)}; expected an object",
            location=Location(index, path=f"entry[{index}]"),
        )
    full_url = raw.get("fullUrl")
    if full_url is not None and (not isinstance(full_url, str) or not full_url.strip()):
        raise BundleError(
            "fullUrl is not a non-empty string",
            location=Location(index, path=f"entry[{index}].fullUrl"),
        )
    resource = raw.get("resource")
    if resource is None:
        return None  # e.g. a DELETE in a transaction, or a search outcome without a resource
    if not isinstance(resource, OBJECTS):
        raise BundleError(
            f"resource is {_kind(resource)}; expected an object",
            location=Location(index, path=f"entry[{index}].resource"),
        )
    _check_repeats(resource)
    rtype = resource.get("resourceType")
    if not _valid_type(rtype):
        raise BundleError(
            "resource has no valid resourceType",
            location=Location(index, path=f"entry[{index}].resource.resourceType"),
        )
    rid = resource.get("id")
    if rid is not None and safe_id(rid) != rid:
        raise BundleError(
            "resource id is not a valid FHIR id ([A-Za-z0-9-.]{1,64})",
            location=Location(index, printable_type(rtype), path=f"entry[{index}].resource.id"),
        )
    return Entry(index, full_url, rtype, rid, resource)


def _valid_type(rtype: object) -> TypeGuard[str]:
    """Shaped like a resourceType name (whether FHIR knows it is validation's question)."""
    if not isinstance(rtype, str):
        return False
    if rtype in _TYPES_SEEN:
        return True
    if safe_type(rtype) != rtype:
        return False
    if len(_TYPES_SEEN) < 1024:  # bounded: type names come from callers
        _TYPES_SEEN.add(rtype)
    return True


_TYPES_SEEN: set[str] = set()  # resourceType names that passed the shape rule once
_Versions = dict[tuple[str, str | None], Entry]  # (fullUrl, versionId): the first listed


def _index_entry(bundle: IngestedBundle, entry: Entry, versions: _Versions) -> None:
    url = entry.full_url
    if url is not None:
        first = bundle.by_full_url.setdefault(url, entry)
        if first is not entry and bundle.bundle_type != "history":
            # Versions are read only for a fullUrl that repeats: almost every one is unique.
            versions.setdefault((url, entry_version(first)), first)
            twin = versions.setdefault((url, entry_version(entry)), entry)
            if twin is not entry:
                raise BundleError(
                    f"fullUrl duplicates that of entry[{twin.index}] (rule bdl-7: fullUrl must be unique)",
                    location=Location(
                        entry.index,
                        entry.resource_type,
                        safe_id(entry.resource_id),
                        f"entry[{entry.index}].fullUrl",
                    ),
                )
    bundle.by_type.setdefault(entry.resource_type, []).append(entry)
    if entry.resource_id:
        bundle.by_type_id.setdefault(f"{entry.resource_type}/{entry.resource_id}", []).append(entry)


def entry_version(entry: Entry) -> str | None:
    """The resource's ``meta.versionId``, when it states one (a number read as its digits)."""
    meta = entry.peek("meta")
    version = meta.get("versionId") if isinstance(meta, dict) else None
    if isinstance(version, int) and not isinstance(version, bool):
        return str(version)
    return version if isinstance(version, str) else None


def _kind(value: object) -> str:
    names = {
        dict: "an object",
        Object: "an object",
        list: "an array",
        Array: "an array",
        str: "a string",
        bool: "a boolean",
        type(None): "null",
    }
    return names.get(type(value), "a number")
