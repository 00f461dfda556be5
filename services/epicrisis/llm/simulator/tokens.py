"""Tokens for the TGI simulator: a deterministic Llama-3-like rule, or a real ``tokenizer.json``.

TGI counts, validates and streams in the model's tokens; the simulator needs the same
notions (input length, ``max_new_tokens``, token-by-token streaming, ``/tokenize`` offsets)
without shipping a tokenizer. The rule splits text as Llama 3's pre-tokenizer does and cuts
long pieces, which lands close to the real count; ``--tokenizer PATH`` makes counts exact.
"""

from __future__ import annotations

import functools
import math
import re
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from epicrisis.prompt.tokenizers import LLAMA3_PIECES

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
EOT = "<|eot_id|>"
HEADER_START = "<|start_header_id|>"
HEADER_END = "<|end_header_id|>"

# Llama 3's ids for the special tokens the chat template and generation use.
SPECIAL_IDS: dict[str, int] = {
    BOS: 128000,
    EOS: 128001,
    HEADER_START: 128006,
    HEADER_END: 128007,
    EOT: 128009,
}

_VOCAB = 128000
_SPECIAL = re.compile("|".join(re.escape(s) for s in SPECIAL_IDS))
_LONG_WORD = 7  # letters per token beyond which a word is cut (Llama 3 merges most words whole)
_LONG_OTHER = 3  # symbols per token in punctuation runs


@dataclass(frozen=True, slots=True)
class SimToken:
    """One token: its id, its text and its character span in the text it came from."""

    id: int
    text: str
    start: int
    stop: int
    special: bool = False


class SimTokenizer(Protocol):
    """What the simulator needs from a tokenizer."""

    @property
    def name(self) -> str: ...

    def encode(self, text: str, *, add_special_tokens: bool) -> list[SimToken]: ...

    def special(self, token: str) -> SimToken: ...

    def __hash__(self) -> int: ...  # tokenizers key the caches of pieces()


class RuleTokenizer:
    """Deterministic Llama-3-like tokens: same text, same tokens and ids, in every process."""

    name = "rule"

    def encode(self, text: str, *, add_special_tokens: bool) -> list[SimToken]:
        tokens = _rule_tokens(text)
        if add_special_tokens:
            return [replace(self.special(BOS), start=0, stop=0), *tokens]
        return list(tokens)

    def special(self, token: str) -> SimToken:
        return SimToken(SPECIAL_IDS[token], token, 0, len(token), special=True)


@functools.lru_cache(maxsize=16)
def _rule_tokens(text: str) -> tuple[SimToken, ...]:
    """The rule's tokens of ``text``; cached, as load tests send the same prompts again."""
    out: list[SimToken] = []
    position = 0
    for match in _SPECIAL.finditer(text):
        out.extend(_ordinary(text, position, match.start()))
        token = match.group()
        out.append(SimToken(SPECIAL_IDS[token], token, match.start(), match.end(), special=True))
        position = match.end()
    out.extend(_ordinary(text, position, len(text)))
    return tuple(out)


def _ordinary(text: str, start: int, stop: int) -> list[SimToken]:
    out: list[SimToken] = []
    for match in LLAMA3_PIECES.finditer(text, start, stop):
        piece, offset = match.group(), match.start()
        size = _LONG_OTHER if not any(ch.isalpha() for ch in piece) else _LONG_WORD
        if piece.isspace() or piece.isdigit():
            size = len(piece) or 1
        count = max(1, math.ceil(len(piece) / size))
        step = math.ceil(len(piece) / count)
        for cut in range(0, len(piece), step):
            part = piece[cut : cut + step]
            token_id = zlib.crc32(part.encode("utf-8")) % _VOCAB
            out.append(SimToken(token_id, part, offset + cut, offset + cut + len(part)))
    return out


class HFTokenizer:
    """Exact tokens from a Hugging Face ``tokenizer.json`` (the Llama 3 one for Med42)."""

    def __init__(self, path: Path | str) -> None:
        from tokenizers import Tokenizer

        file = Path(path)
        self._backend: Any = Tokenizer.from_file(str(file))
        self.name = f"hf:{file.name}"
        decoder = self._backend.get_added_tokens_decoder()
        self._special_ids = {int(i) for i, tok in decoder.items() if tok.special}

    def encode(self, text: str, *, add_special_tokens: bool) -> list[SimToken]:
        encoding = self._backend.encode(text, add_special_tokens=add_special_tokens)
        return [
            SimToken(int(i), text[s:e], int(s), int(e), special=int(i) in self._special_ids)
            for i, (s, e) in zip(encoding.ids, encoding.offsets, strict=True)
        ]

    def special(self, token: str) -> SimToken:
        token_id = self._backend.token_to_id(token)
        return SimToken(
            SPECIAL_IDS[token] if token_id is None else int(token_id),
            token,
            0,
            len(token),
            special=True,
        )


def load_tokenizer(path: Path | str | None) -> SimTokenizer:
    """The tokenizer at ``path``, else the rule (a missing file raises ``FileNotFoundError``)."""
    if path is None:
        return RuleTokenizer()
    if not Path(path).is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    return HFTokenizer(path)


@functools.lru_cache(maxsize=64)
def pieces(tokenizer: SimTokenizer, text: str) -> tuple[SimToken, ...]:
    """Tokens of generated ``text`` whose texts add up to exactly ``text`` (for streaming).

    Byte-level tokens inside one character share its span: the first carries the character
    and the others are empty, as a streaming decoder shows them. Cached: a load test asks
    for the same answers again and again.
    """
    out: list[SimToken] = []
    cursor = 0
    for token in tokenizer.encode(text, add_special_tokens=False):
        stop = max(cursor, token.stop)
        out.append(replace(token, text=text[cursor:stop], start=cursor, stop=stop))
        cursor = stop
    if out and cursor < len(text):
        last = out[-1]
        out[-1] = replace(last, text=last.text + text[cursor:], stop=len(text))
    return tuple(out)


def chat_template(messages: list[tuple[str, str]]) -> str:
    """The Llama 3 chat template (as Med42-v2 ships it), ending with the assistant header."""
    parts = [BOS]
    for role, content in messages:
        parts.append(f"{HEADER_START}{role}{HEADER_END}\n\n{content.strip()}{EOT}")
    parts.append(f"{HEADER_START}assistant{HEADER_END}\n\n")
    return "".join(parts)
