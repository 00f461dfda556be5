"""Token counting: exact with a local ``tokenizer.json``, else a conservative estimate.

The prompt must fit Med42-v2's context, so the budget is counted in Llama 3 tokens. With
a ``tokenizer.json`` (``EPICRISIS_TOKENIZER_PATH``) counts are exact; without one,
:class:`EstimateTokenizer` imitates Llama 3's pre-tokenizer (words, digit groups of three,
punctuation runs) and charges each piece at least what Llama 3 usually does.

Measured margin (re-checked by ``tests/test_prompt.py``): on 312 prompts (the 39 inpatient
stays of ``shared/data/fhir`` at budgets of 8,192, 6,656, 6,144 and 3,072 tokens, each
packed with the exact and with the estimating tokenizer; whole messages plus chat-template
overhead) the estimate is 1.079 to 1.299 times the Llama 3 count (mean 1.17). It never
undercounted a prompt: :data:`ESTIMATE_UNDERCOUNT_MARGIN` = 0.0, with at least 7.9 % to
spare. Single lines can be undercounted (716 of 7,678 lines, by at most 6 tokens); the
surplus of the others absorbs that, and the packer leaves :data:`ESTIMATE_SAFETY` of the
budget unused when it counts with the estimate, for text unlike the corpus.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from epicrisis.config import get_settings
from epicrisis.errors import ConfigurationError

ESTIMATE_UNDERCOUNT_MARGIN = 0.0
"""Largest measured undercount of the estimate on corpus prompts (a share of the exact count)."""

ESTIMATE_SAFETY = 0.02
"""Share of the budget left unused when counting with the estimate: headroom beyond the corpus."""


@runtime_checkable
class Tokenizer(Protocol):
    """Counts tokens of text as the served model would (without special tokens)."""

    @property
    def name(self) -> str: ...

    @property
    def exact(self) -> bool: ...

    def count(self, text: str) -> int: ...


@runtime_checkable
class BatchTokenizer(Tokenizer, Protocol):
    """A tokenizer that can count many texts in one call (the packer's fast path)."""

    def count_batch(self, texts: Sequence[str]) -> list[int]: ...


def count_many(tokenizer: Tokenizer, texts: Sequence[str]) -> list[int]:
    """Token counts of ``texts``, batched when the tokenizer can."""
    if isinstance(tokenizer, BatchTokenizer):
        return tokenizer.count_batch(texts)
    return [tokenizer.count(t) for t in texts]


class HFTokenizer:
    """Exact counts from a Hugging Face ``tokenizer.json`` (the Llama 3 one for Med42-v2)."""

    exact = True

    def __init__(self, backend: Any, name: str) -> None:
        self._backend = backend
        self.name = name
        # Counting needs the ids only: ``encode_batch_fast`` (tokenizers 0.21+) does not
        # compute character offsets, which saves about a quarter of the time on prompt text.
        self._encode_ids = getattr(backend, "encode_batch_fast", backend.encode_batch)

    @classmethod
    def from_file(cls, path: Path | str) -> HFTokenizer:
        """Load ``tokenizer.json``; a missing or unreadable file is a deployment error."""
        from tokenizers import Tokenizer as _Backend

        file = Path(path)
        if not file.is_file():
            raise ConfigurationError(f"tokenizer file not found: {file}")
        try:
            backend = _Backend.from_file(str(file))
        except Exception as exc:  # the Rust side raises plain Exception on bad JSON
            raise ConfigurationError(f"tokenizer file could not be loaded: {file}") from exc
        return cls(backend, f"hf:{file.name}")

    def count(self, text: str) -> int:
        return len(self._encode_ids([text], add_special_tokens=False)[0].ids)

    def count_batch(self, texts: Sequence[str]) -> list[int]:
        if not texts:
            return []
        encodings = self._encode_ids(list(texts), add_special_tokens=False)
        return [len(e.ids) for e in encodings]

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r})"


# Llama 3's pre-tokenizer, in Python ``re``: contractions, words with one leading non-letter,
# digit groups of up to three, punctuation runs (with trailing newlines), newline runs, spaces.
LLAMA3_PIECES = re.compile(
    r"'(?:[sStTmMdD]|[rR][eE]|[vV][eE]|[lL][lL])"
    r"|[^\r\n\w]?[^\W\d_]+"
    r"|\d{1,3}"
    r"| ?[^\s\w]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
    r"|_+"
)


class EstimateTokenizer:
    """A conservative Llama 3 token estimate, pure Python (see the module docstring)."""

    exact = False
    name = "estimate"

    def count(self, text: str) -> int:
        total = 0
        for piece in LLAMA3_PIECES.findall(text):
            total += _piece_tokens(piece)
        return total

    def count_batch(self, texts: Sequence[str]) -> list[int]:
        return [self.count(t) for t in texts]

    def __repr__(self) -> str:
        return "EstimateTokenizer()"


def _piece_tokens(piece: str) -> int:
    """Tokens charged for one pre-token piece."""
    first = piece[0]
    if first.isdigit():
        return 1
    if not piece.isascii():
        # Byte-level BPE: a character outside ASCII costs up to one token per UTF-8 byte;
        # charge all but one byte of each (common ones like "°" or "é" merge with a neighbour).
        extra = sum(len(ch.encode("utf-8")) - 1 for ch in piece if ord(ch) > 127)
        return extra + _piece_tokens_ascii("".join(ch for ch in piece if ord(ch) <= 127) or " ")
    return _piece_tokens_ascii(piece)


def _piece_tokens_ascii(piece: str) -> int:
    stripped = piece.strip(" ")
    if not stripped or stripped[0] in "\r\n":
        return 1  # a space or newline run: one token
    letters = stripped.lstrip("".join(ch for ch in stripped if not ch.isalpha()))
    if letters and letters.isalpha():
        # A word (with at most one leading symbol, which Llama 3 may split off).
        lead = 1 if len(stripped) > len(letters) and not piece.startswith(" ") else 0
        size = len(letters)
        if size <= 4:
            return 1 + lead
        if letters.isupper():  # abbreviations split into small pieces
            return math.ceil(size / 3) + lead
        return math.ceil(size / 5) + lead
    # Punctuation runs: Llama 3 has merges for common pairs like "),", ")\n", "--".
    return math.ceil(len(stripped.rstrip("\r\n")) / 2) or 1


_CACHE: dict[str, Tokenizer] = {}
_LOCK = threading.Lock()
_ESTIMATE = EstimateTokenizer()


def load_tokenizer(path: Path | str | None = None) -> Tokenizer:
    """The exact tokenizer at ``path`` (else ``EPICRISIS_TOKENIZER_PATH``), else the estimate.

    A path that is given (or configured) but missing or unreadable raises
    :class:`ConfigurationError`: silently falling back would hide a broken deployment.
    Loaded tokenizers are cached per resolved path (loading takes about half a second).
    """
    if path is None:
        path = get_settings().tokenizer_path
    if path is None:
        return _ESTIMATE
    key = str(Path(path).expanduser().resolve())
    with _LOCK:
        cached = _CACHE.get(key)
        if cached is None:
            cached = HFTokenizer.from_file(key)
            _CACHE[key] = cached
        return cached
