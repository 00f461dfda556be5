"""The one exception tree of Epicrisis.

    EpicrisisError                    base: everything the package raises on purpose
    ├── InputError                    the caller's input is wrong (gRPC INVALID_ARGUMENT, exit 2)
    │   ├── BundleError               bytes that are not a usable Bundle: encoding, JSON, shape,
    │   │                             size and nesting limits, duplicate fullUrls
    │   ├── EntryError                one entry is wrong where the summary cannot do without it
    │   └── StayError                 no patient or stay to summarize, or the named one is absent
    └── ConfigurationError            the deployment is wrong (missing tokenizer, bad setting)

Messages never carry clinical content: they name *where* (entry index, resource type, id,
JSON path) and *what rule*, never the offending value. Context is keyword-only, so every
raise site says what it knows by name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_SAFE_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_SAFE_TYPE = re.compile(r"[A-Z][A-Za-z]{1,63}")


def safe_id(value: object) -> str | None:
    """A resource id fit to print: a valid FHIR id, else a marker (ids can carry anything)."""
    if value is None:
        return None
    if isinstance(value, str) and _SAFE_ID.fullmatch(value):
        return value
    return "<invalid id>"


def safe_type(value: object) -> str | None:
    """A resourceType fit to print: a FHIR type name, else a marker."""
    if value is None:
        return None
    if isinstance(value, str) and _SAFE_TYPE.fullmatch(value):
        return value
    return "<invalid resourceType>"


@dataclass(frozen=True, slots=True)
class Location:
    """Where in the Bundle a problem is; every part optional, all safe to print."""

    entry_index: int | None = None
    resource_type: str | None = None
    resource_id: str | None = None
    path: str | None = None

    def describe(self) -> str:
        parts: list[str] = []
        if self.entry_index is not None:
            parts.append(f"entry[{self.entry_index}]")
        if self.resource_type:
            parts.append(
                f"{self.resource_type}/{self.resource_id}"
                if self.resource_id
                else self.resource_type
            )
        if self.path:
            parts.append(f"at {self.path}")
        return " ".join(parts)


class EpicrisisError(Exception):
    """Base of every error Epicrisis raises on purpose."""

    def __init__(self, message: str, *, location: Location | None = None) -> None:
        self.message = message
        self.location = location or Location()
        where = self.location.describe()
        super().__init__(f"{where}: {message}" if where else message)


class InputError(EpicrisisError):
    """The caller sent something we cannot summarize; the text says what and where."""


class BundleError(InputError):
    """The bytes are not a usable FHIR Bundle."""


class EntryError(InputError):
    """One Bundle entry is invalid and the summary cannot do without it."""


class StayError(InputError):
    """There is no patient or hospital stay to summarize, or the named encounter is absent."""


class ConfigurationError(EpicrisisError):
    """The deployment is misconfigured (a missing tokenizer file, an impossible budget)."""
