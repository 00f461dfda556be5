"""Parse Bundle bytes and check the shape of every entry, cheaply.

Only the shape is checked here (resourceType, id, unique fullUrl); the full R4B validation
runs later, in :mod:`epicrisis.fhir.validate`, on just the entries the summary reads. That
split is what keeps a 4 MB Bundle fast without trusting any resource we use.

A fullUrl may repeat only with another ``meta.versionId``, or in a history Bundle (rule
bdl-7); the index by fullUrl then keeps the first listed, which a history Bundle lists as the
newest.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict

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
    """One entry with a resource: its position, identity and the raw JSON object."""

    index: int
    full_url: str | None
    resource_type: str
    resource_id: str | None
    resource: Json
    container: Entry | None = None  # set for a contained resource: the entry holding it

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


def decode_json(data: bytes, limits: Limits) -> Any:
    """Bytes to JSON values: size, BOM, UTF-8 and syntax checked with errors that say which."""
    if len(data) > limits.max_bundle_bytes:
        raise BundleError(
            f"Bundle is {len(data)} bytes, over the limit of {limits.max_bundle_bytes} bytes"
        )
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    if not data or data.isspace():  # what ``not data.strip()`` says, without copying the input
        raise BundleError("input is empty; expected a FHIR R4 Bundle as JSON")
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
    doc = decode_json(data, limits)
    if not isinstance(doc, dict):
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
    raw_entries = doc.get("entry", [])
    if not isinstance(raw_entries, list):
        raise BundleError(
            f"Bundle.entry is {_kind(raw_entries)}; expected an array",
            location=Location(path="entry"),
        )
    if len(raw_entries) > limits.max_entries:
        raise BundleError(
            f"Bundle has {len(raw_entries)} entries, over the limit of {limits.max_entries}"
        )

    bundle = IngestedBundle(bundle_type=btype, entries=[])
    seen: dict[tuple[str, str | None], Entry] = {}
    for index, raw in enumerate(raw_entries):
        entry = _shape_checked_entry(index, raw)
        if entry is None:
            continue
        bundle.entries.append(entry)
        _index_entry(bundle, entry, seen)
    return bundle


def _shape_checked_entry(index: int, raw: Any) -> Entry | None:
    # Runs once per entry of every Bundle: the error paths are built only when needed.
    if not isinstance(raw, dict):
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
    if not isinstance(resource, dict):
        raise BundleError(
            f"resource is {_kind(resource)}; expected an object",
            location=Location(index, path=f"entry[{index}].resource"),
        )
    rtype = resource.get("resourceType")
    if not isinstance(rtype, str) or rtype not in _TYPES_SEEN:
        if not isinstance(rtype, str) or safe_type(rtype) != rtype:
            raise BundleError(
                "resource has no valid resourceType",
                location=Location(index, path=f"entry[{index}].resource.resourceType"),
            )
        if len(_TYPES_SEEN) < 1024:  # bounded: type names come from callers
            _TYPES_SEEN.add(rtype)
    rid = resource.get("id")
    if rid is not None and safe_id(rid) != rid:
        raise BundleError(
            "resource id is not a valid FHIR id ([A-Za-z0-9-.]{1,64})",
            location=Location(index, printable_type(rtype), path=f"entry[{index}].resource.id"),
        )
    return Entry(index, full_url, rtype, rid, resource)


_TYPES_SEEN: set[str] = set()  # resourceType names that passed the shape rule once


def _index_entry(
    bundle: IngestedBundle, entry: Entry, seen: dict[tuple[str, str | None], Entry]
) -> None:
    if entry.full_url is not None:
        key = (entry.full_url, entry_version(entry))
        twin = seen.get(key)
        if twin is not None and bundle.bundle_type != "history":
            raise BundleError(
                f"fullUrl duplicates that of entry[{twin.index}] (rule bdl-7: fullUrl must be unique)",
                location=Location(
                    entry.index,
                    entry.resource_type,
                    safe_id(entry.resource_id),
                    f"entry[{entry.index}].fullUrl",
                ),
            )
        seen.setdefault(key, entry)
        bundle.by_full_url.setdefault(entry.full_url, entry)
    bundle.by_type.setdefault(entry.resource_type, []).append(entry)
    if entry.resource_id:
        bundle.by_type_id.setdefault(f"{entry.resource_type}/{entry.resource_id}", []).append(entry)


def entry_version(entry: Entry) -> str | None:
    """The resource's ``meta.versionId``, when it states one (a number read as its digits)."""
    meta = entry.resource.get("meta")
    version = meta.get("versionId") if isinstance(meta, dict) else None
    if isinstance(version, int) and not isinstance(version, bool):
        return str(version)
    return version if isinstance(version, str) else None


def _kind(value: object) -> str:
    names = {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        type(None): "null",
    }
    return names.get(type(value), "a number")
