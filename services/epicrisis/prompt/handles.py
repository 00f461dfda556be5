"""Citation handles: short, stable names for the resources a prompt shows (``C3``, ``O12``).

The model cites handles because references (``Observation/lab-4b98fa2928a5``, ``urn:uuid:…``)
are long, cost tokens and are easy to garble; the verifier maps handles back to references.
Handles are numbered per prefix in the order the linearizer first cites a resource, so the
same stay always gets the same handles whatever the token budget keeps.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping

# Resource type -> handle prefix.
PREFIXES: Mapping[str, str] = {
    "Condition": "C",
    "Observation": "O",
    "MedicationRequest": "M",
    "MedicationAdministration": "M",
    "MedicationStatement": "M",
    "Medication": "M",
    "Procedure": "P",
    "AllergyIntolerance": "A",
    "DiagnosticReport": "R",
    "DocumentReference": "N",
    "Composition": "N",
    "Encounter": "E",
    "ServiceRequest": "S",
    "CarePlan": "S",
    "Patient": "PT",
}

HANDLE_PATTERN = r"(?:PT|[COMPARNES])[1-9][0-9]*"
_HANDLE = re.compile(HANDLE_PATTERN)
_TYPE_ID = re.compile(r"(?:^|/)([A-Z][A-Za-z]+)/[A-Za-z0-9\-.]{1,64}(?:/_history/[^/]+)?$")


def is_handle(text: str) -> bool:
    """Whether ``text`` has the shape of a handle (``C3``), known or not."""
    return _HANDLE.fullmatch(text) is not None


def resource_type_of(ref: str) -> str | None:
    """The resource type a reference names (``Type/id`` or a URL ending in it), if it says."""
    if "#" in ref:  # a contained resource: the container's type is not the target's
        return None
    match = _TYPE_ID.search(ref)
    return match.group(1) if match else None


class HandleMap:
    """A two-way map handle <-> reference; each reference gets exactly one handle."""

    __slots__ = ("_by_handle", "_by_ref", "_counters")

    def __init__(self, pairs: Iterable[tuple[str, str]] = ()) -> None:
        self._by_handle: dict[str, str] = {}
        self._by_ref: dict[str, str] = {}
        self._counters: dict[str, int] = {}
        for handle, ref in pairs:
            self._by_handle[handle] = ref
            self._by_ref[ref] = handle

    def assign(self, ref: str, resource_type: str) -> str:
        """The handle of ``ref``, numbering a new one if needed.

        The type written in the reference wins; ``resource_type`` (what the caller knows the
        fact to be) is used when the reference does not say, as with ``urn:uuid:`` fullUrls.
        """
        known = self._by_ref.get(ref)
        if known is not None:
            return known
        rtype = resource_type_of(ref)
        prefix = PREFIXES.get(rtype or "") or PREFIXES.get(resource_type)
        if prefix is None:
            raise ValueError(f"no handle prefix for resource type {resource_type!r}")
        number = self._counters.get(prefix, 0) + 1
        handle = f"{prefix}{number}"
        while handle in self._by_handle:  # a map seeded with pairs: never reuse a handle
            number += 1
            handle = f"{prefix}{number}"
        self._counters[prefix] = number
        self._by_handle[handle] = ref
        self._by_ref[ref] = handle
        return handle

    def ref(self, handle: str) -> str | None:
        return self._by_handle.get(handle)

    def handle(self, ref: str) -> str | None:
        return self._by_ref.get(ref)

    def restricted(self, handles: Iterable[str]) -> HandleMap:
        """A new map with only ``handles`` (those a packed prompt actually shows)."""
        keep = set(handles)
        return HandleMap((h, r) for h, r in self._by_handle.items() if h in keep)

    def items(self) -> Iterator[tuple[str, str]]:
        """(handle, reference) pairs in assignment order."""
        return iter(self._by_handle.items())

    def as_dict(self) -> dict[str, str]:
        return dict(self._by_handle)

    def __contains__(self, handle: object) -> bool:
        return handle in self._by_handle

    def __len__(self) -> int:
        return len(self._by_handle)

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_handle)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HandleMap) and self._by_handle == other._by_handle

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"HandleMap({len(self)} handles)"


def bracket(handles: Iterable[str]) -> str:
    """``[C1][O4]``: how a line shows the handles it cites."""
    return "".join(f"[{h}]" for h in handles)
