"""Who is calling, and what they may do: API keys, stored only as SHA-256 hashes.

The keys file (``EPICRISIS_API_KEYS_FILE``, a mounted secret) has one caller per line::

    # caller      key hash                                                              rights
    ehr-north     sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08  submit,read
    audit-reader  sha256:...                                                             read

Rights: ``submit`` (Submit, Summarize), ``read`` (GetJob, WatchJob), ``cancel`` (CancelJob);
none listed means all. A key is sent as ``authorization: Bearer <key>`` (or ``x-api-key``)
metadata. Keys are random tokens (``epicrisis api-key``), so a plain SHA-256 is as strong as
their 256 bits; the file never holds a key itself. Health checking and reflection need no
key (probes and load balancers call them).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from epicrisis.errors import ConfigurationError

RIGHTS = ("submit", "read", "cancel")
METHOD_RIGHTS = {
    "Submit": "submit",
    "Summarize": "submit",
    "GetJob": "read",
    "WatchJob": "read",
    "CancelJob": "cancel",
}
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")  # probes, tools: no key
ANONYMOUS = "anonymous"
KEY_PREFIX = "epk_"
_CALLER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HASH = re.compile(r"sha256:([0-9a-f]{64})")


@dataclass(frozen=True, slots=True)
class Caller:
    id: str
    rights: frozenset[str]

    def may(self, method: str) -> bool:
        """Whether this caller may call ``method``; a method no right names: nobody (a
        method added to the service stays closed until it is given a right here)."""
        right = METHOD_RIGHTS.get(method)
        return right is not None and right in self.rights


ANONYMOUS_CALLER = Caller(ANONYMOUS, frozenset(RIGHTS))
CALLER: ContextVar[Caller] = ContextVar("epicrisis_caller", default=ANONYMOUS_CALLER)


def current_caller() -> Caller:
    """The caller of the RPC this task serves (set by the call interceptor)."""
    return CALLER.get()


class ApiKeys:
    """The callers a server knows, by the SHA-256 of their keys."""

    def __init__(self, callers: Mapping[bytes, Caller]) -> None:
        self._callers = dict(callers)

    def authenticate(self, key: str) -> Caller | None:
        """The caller whose key this is, or None."""
        return self._callers.get(hashlib.sha256(key.encode()).digest())

    @classmethod
    def from_file(cls, path: Path) -> ApiKeys:
        """Parse the keys file; a malformed line is named by its number, never its content."""
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigurationError(
                f"cannot read EPICRISIS_API_KEYS_FILE ({type(exc).__name__})"
            ) from None
        callers: dict[bytes, Caller] = {}
        for number, line in enumerate(text.splitlines(), start=1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            problem = _line_problem(fields)
            if problem is None:
                digest = bytes.fromhex(fields[1].removeprefix("sha256:"))
                rights = frozenset(fields[2].split(",")) if len(fields) == 3 else frozenset(RIGHTS)
                if digest in callers:
                    problem = "the same key hash twice"
                else:
                    callers[digest] = Caller(fields[0], rights)
            if problem is not None:
                raise ConfigurationError(f"EPICRISIS_API_KEYS_FILE line {number}: {problem}")
        if not callers:
            raise ConfigurationError("EPICRISIS_API_KEYS_FILE names no caller")
        return cls(callers)


def _line_problem(fields: list[str]) -> str | None:
    if len(fields) not in (2, 3):
        return "expected: caller sha256:<64 hex digits> [rights]"
    if not _CALLER_ID.fullmatch(fields[0]):
        return "a caller id is 1-64 of [A-Za-z0-9._-], starting with a letter or digit"
    if not _HASH.fullmatch(fields[1]):
        return "the key hash must be sha256:<64 lowercase hex digits>"
    if len(fields) == 3 and not set(fields[2].split(",")) <= set(RIGHTS):
        return f"rights are a comma-separated subset of {','.join(RIGHTS)}"
    return None


def new_key(caller: str, rights: str = "") -> tuple[str, str]:
    """A fresh API key and the keys-file line that admits it (the key is shown once)."""
    if not _CALLER_ID.fullmatch(caller):
        raise ConfigurationError("a caller id is 1-64 of [A-Za-z0-9._-]")
    if rights and not set(rights.split(",")) <= set(RIGHTS):
        raise ConfigurationError(f"rights are a comma-separated subset of {','.join(RIGHTS)}")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    line = f"{caller} sha256:{hashlib.sha256(key.encode()).hexdigest()}"
    return key, f"{line} {rights}" if rights else line


def presented_key(metadata: Mapping[str, str]) -> str | None:
    """The API key in a call's metadata: ``authorization: Bearer <key>`` or ``x-api-key``."""
    scheme, _, token = metadata.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return metadata.get("x-api-key") or None
