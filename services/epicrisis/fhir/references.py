"""Resolve FHIR references inside one Bundle (R4 Bundle rules, section 2.36.4.1).

- ``#id``: a resource contained in the citing resource (from a contained resource: in its
  container, which ``#`` alone names);
- ``urn:uuid:``/``urn:oid:`` and absolute URLs: the entry with that fullUrl;
- relative ``Type/id``: against the base of the citing entry's RESTful fullUrl, else the one
  resource in the Bundle with that ``Type/id`` (Synthea cites its urn:uuid entries that way);
- ``…/_history/v``: the entry with that ``meta.versionId`` (one that states no version
  stands for any); without a version, the first listed (a history Bundle lists the newest
  first).

An absolute URL that no fullUrl matches (another server's resource), an ambiguous
``Type/id`` and a version the Bundle lacks resolve to ``None``. A contained resource comes
back as the same :class:`Entry` each time, so callers may compare and cache by identity.
"""

from __future__ import annotations

import re
from typing import Any

from epicrisis.errors import safe_type
from epicrisis.fhir.bundle import Entry, IngestedBundle, entry_version

_TYPE_ID = re.compile(
    r"(?:(?P<base>.*/))?(?P<type>[A-Z][A-Za-z]+)/(?P<id>[A-Za-z0-9\-.]{1,64})"
    r"(?:/_history/(?P<version>[A-Za-z0-9\-.]{1,64}))?$"
)


def reference_of(value: Any) -> str | None:
    """The ``reference`` string of a Reference object, if it has one."""
    if isinstance(value, dict):
        ref = value.get("reference")
        if isinstance(ref, str) and ref:
            return ref
    return None


class ReferenceResolver:
    """Looks references up in an :class:`IngestedBundle`; unresolved ones answer ``None``."""

    def __init__(self, bundle: IngestedBundle) -> None:
        self._bundle = bundle
        self._contained: dict[tuple[int, str], Entry | None] = {}

    def resolve(self, reference: str, *, source: Entry) -> Entry | None:
        holder = source.container or source  # contained resources cite as their container does
        if reference.startswith("#"):
            return self._contained_entry(reference[1:], holder)
        hit = self._bundle.by_full_url.get(reference)
        if hit is not None:
            return hit
        match = _TYPE_ID.match(reference)
        if match is None:
            return None
        type_id = f"{match['type']}/{match['id']}"
        versions = self._bundle.by_type_id.get(type_id, [])
        explicit = match["base"] is not None
        base = match["base"] if explicit else _base_of(holder)
        if base is not None:
            url = base + type_id
            same = [e for e in versions if e.full_url == url]
            if not same and (hit := self._bundle.by_full_url.get(url)) is not None:
                same = [hit]
            if same:
                return _pick_version(same, match["version"])
            if explicit:
                return None  # another server's resource, or one the Bundle does not hold
        # Relative and not on the citing entry's server: the one resource with that Type/id.
        if len({e.full_url for e in versions}) == 1:
            return _pick_version(versions, match["version"])
        return None

    def resolve_field(self, value: Any, *, source: Entry) -> Entry | None:
        ref = reference_of(value)
        return None if ref is None else self.resolve(ref, source=source)

    def _contained_entry(self, local_id: str, holder: Entry) -> Entry | None:
        if not local_id:
            return holder  # "#" alone: the container itself
        key = (holder.index, local_id)
        if key not in self._contained:
            self._contained[key] = _find_contained(holder, local_id)
        return self._contained[key]


def _find_contained(holder: Entry, local_id: str) -> Entry | None:
    items = holder.resource.get("contained")
    if not isinstance(items, list):
        return None
    for item in items:
        if isinstance(item, dict) and item.get("id") == local_id:
            rtype = item.get("resourceType")
            if isinstance(rtype, str) and safe_type(rtype) == rtype:
                return Entry(holder.index, None, rtype, local_id, item, container=holder)
            return None
    return None


def _pick_version(entries: list[Entry], version: str | None) -> Entry | None:
    """The entry of ``version`` among versions of one resource; unversioned: the first listed."""
    if version is None:
        return entries[0]
    for entry in entries:
        if entry_version(entry) == version:
            return entry
    if len(entries) == 1 and entry_version(entries[0]) is None:
        return entries[0]
    return None


def _base_of(entry: Entry) -> str | None:
    """``https://x/fhir/`` from ``https://x/fhir/Patient/1``: the base relative refs resolve against."""
    if entry.full_url is None:
        return None
    match = _TYPE_ID.match(entry.full_url)
    return match["base"] if match is not None else None
