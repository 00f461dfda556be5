"""The one exception tree of Epicrisis.

    EpicrisisError                    base: everything the package raises on purpose
    ├── InputError                    the caller's input is wrong (gRPC INVALID_ARGUMENT, exit 2)
    │   ├── BundleError               bytes that are not a usable Bundle: encoding, JSON, shape,
    │   │                             size and nesting limits, duplicate fullUrls
    │   ├── EntryError                one entry is wrong where the summary cannot do without it
    │   └── StayError                 no patient or stay to summarize, or the named one is absent
    ├── ConfigurationError            the deployment is wrong (missing tokenizer, bad setting)
    └── BackendError                  an LLM endpoint failed a request; ``retryable`` says if
        │                             another attempt may succeed (context: endpoint, status)
        ├── BackendUnavailableError   refused, timed out, 503, no healthy endpoint (retryable)
        ├── BackendOverloadedError    429, past the server's concurrency limit (retryable)
        ├── BackendRejectedError      422 and other 4xx: the request itself is wrong (permanent)
        └── BackendGenerationError    424, 500 incomplete generation (retryable once)

Messages never carry clinical content: they name *where* (entry index, resource type, id,
JSON path) and *what rule*, never the offending value. Context is keyword-only, so every
raise site says what it knows by name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

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

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle by state, not by calling ``__init__`` again (whose keyword-only context
        pickle cannot pass), so an error keeps its location and context on its way
        between processes (the servers' ingest processes)."""
        return (_rebuild_error, (type(self), self.args, self.__dict__))


def _rebuild_error(
    kind: type[EpicrisisError], args: tuple[Any, ...], state: dict[str, Any]
) -> EpicrisisError:
    error = kind.__new__(kind, *args)
    error.__dict__.update(state)
    return error


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


_SAFE_ERROR_TYPE = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]{0,63}")


class BackendError(EpicrisisError):
    """An LLM endpoint failed a request; ``retryable`` says whether another attempt may help.

    Context is keyword-only: ``endpoint`` (the index in ``EPICRISIS_LLM_URLS``, never the URL,
    which may carry credentials), ``status`` (HTTP), ``error_type`` (TGI's ``error_type`` or
    an OpenAI error type) and ``parameters`` (request fields the server complained about,
    from a fixed list). The server's own message is never copied: validation errors echo
    request content, and the request content is the patient's record.
    """

    default_retryable: bool = False
    max_retries: int | None = None
    """Retries this kind of failure deserves (None: as many as the caller's bounds allow)."""

    def __init__(
        self,
        message: str,
        *,
        endpoint: int | None = None,
        status: int | None = None,
        error_type: str | None = None,
        parameters: tuple[str, ...] = (),
        retryable: bool | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.status = status
        self.error_type = (
            error_type if error_type and _SAFE_ERROR_TYPE.fullmatch(error_type) else None
        )
        self.parameters = parameters
        self.retryable = self.default_retryable if retryable is None else retryable
        self.retry_after = retry_after  # seconds until an endpoint may take requests again
        self.reason = message  # the bare text, without the context below
        super().__init__(f"{message} ({self._context()})")

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle by keyword, so the context survives a trip between processes (Celery)."""
        fields = {
            "endpoint": self.endpoint,
            "status": self.status,
            "error_type": self.error_type,
            "parameters": self.parameters,
            "retryable": self.retryable,
            "retry_after": self.retry_after,
        }
        return (_rebuild_backend_error, (type(self), self.reason, fields))

    def _context(self) -> str:
        parts = ["LLM endpoint" if self.endpoint is None else f"LLM endpoint {self.endpoint}"]
        if self.status is not None:
            parts.append(f"HTTP {self.status}")
        if self.error_type:
            parts.append(f"error_type {self.error_type}")
        if self.parameters:
            parts.append("about " + ", ".join(f"`{p}`" for p in self.parameters))
        return "; ".join(parts)


def _rebuild_backend_error(
    kind: type[BackendError], reason: str, fields: dict[str, Any]
) -> BackendError:
    return kind(reason, **fields)


class BackendUnavailableError(BackendError):
    """No answer: connection refused (a loading TGI), a timeout, 503, or every endpoint ejected."""

    default_retryable = True


class BackendOverloadedError(BackendError):
    """429: the server is past its concurrency limit; another endpoint, or later, may take it."""

    default_retryable = True


class BackendRejectedError(BackendError):
    """The server refused the request itself (422 validation, other 4xx): retrying cannot help."""


class BackendGenerationError(BackendError):
    """Generation failed on the server (424, 500 incomplete generation): worth one more try."""

    default_retryable = True
    max_retries = 1
