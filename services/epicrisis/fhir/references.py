"""Resolve FHIR references inside one Bundle (R4 Bundle rules, section 2.36.4.1).

Handles ``urn:uuid:``/``urn:oid:`` fullUrls, absolute URLs, relative ``Type/id`` against the
base of the citing entry's fullUrl (with a unique ``Type/id`` fallback), ``_history``
versions, and contained ``#id`` resources.
"""

from __future__ import annotations

import re
from typing import Any

from epicrisis.fhir.bundle import Entry, IngestedBundle

_TYPE_ID = re.compile(
    r"(?:(?P<base>.*/))?(?P<type>[A-Z][A-Za-z]+)/(?P<id>[A-Za-z0-9\-.]{1,64})"
    r"(?:/_history/[A-Za-z0-9\-.]{1,64})?$"
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

    def resolve(self, reference: str, *, source: Entry) -> Entry | None:
        if reference.startswith("#"):
            return self._contained(reference[1:], source)
        if reference.startswith(("urn:uuid:", "urn:oid:")):
            return self._bundle.by_full_url.get(reference)
        hit = self._bundle.by_full_url.get(reference)
        if hit is not None:
            return hit
        match = _TYPE_ID.match(reference)
        if match is None:
            return None
        type_id = f"{match['type']}/{match['id']}"
        if match["base"] is None and source.full_url:
            base = _base_of(source)
            if base is not None:
                hit = self._bundle.by_full_url.get(base + type_id)
                if hit is not None:
                    return hit
        candidates = self._bundle.by_type_id.get(type_id, [])
        if len(candidates) == 1:
            return candidates[0]
        if candidates and match["base"] is not None:
            for candidate in candidates:
                if candidate.full_url and candidate.full_url.startswith(match["base"]):
                    return candidate
        return None

    def resolve_field(self, value: Any, *, source: Entry) -> Entry | None:
        ref = reference_of(value)
        return None if ref is None else self.resolve(ref, source=source)

    @staticmethod
    def _contained(local_id: str, source: Entry) -> Entry | None:
        for item in source.resource.get("contained") or []:
            if isinstance(item, dict) and item.get("id") == local_id:
                rtype = item.get("resourceType")
                if isinstance(rtype, str):
                    return Entry(source.index, None, rtype, local_id, item, container=source)
        return None


def _base_of(entry: Entry) -> str | None:
    """``https://x/fhir/`` from ``https://x/fhir/Patient/1``: the base relative refs resolve against."""
    if entry.full_url is None or entry.resource_id is None:
        return None
    tail = f"{entry.resource_type}/{entry.resource_id}"
    url = entry.full_url.split("/_history/")[0]
    if url.endswith(tail):
        return url[: -len(tail)]
    return None
