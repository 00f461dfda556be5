"""Encryption at rest: every value about a patient that Redis holds is sealed with AES-256-GCM.

A sealed value is ``version (1 byte) | key id length (1 byte) | key id | nonce (12 bytes) |
ciphertext + tag``. The header and the caller's ``context`` (the job id and what the value
is) are authenticated as associated data, so a value copied to another job or another slot
does not open. Keys rotate: ``EPICRISIS_ENCRYPTION_KEY`` lists one or more keys, the first
seals and any opens, so values sealed before a rotation stay readable until they expire.

    EPICRISIS_ENCRYPTION_KEY="<base64 of 32 random bytes>"            one key, id derived
    EPICRISIS_ENCRYPTION_KEY="k2:<base64>,k1:<base64>"               rotation: k2 seals

``EPICRISIS_ENCRYPTION_KEY_FILE`` names a mounted secret file with the same text instead.
Errors never carry a key, a value or a plaintext.

The version says how the plaintext is encoded: 1 as it is, 2 compressed with zlib
(``seal(compress=True)``), which opening inflates to at most ``MAX_PLAINTEXT_BYTES``. As part
of the header it is read before decrypting and authenticated, so a value cannot be made to
open as the other version, and old values (1) open beside new ones. Compressing reveals the
compressed length, which depends on the content: a caller opts in only for values that mix
no secret with data an attacker chooses.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import SecretStr

from epicrisis.errors import ConfigurationError, EpicrisisError

VERSION = 1  # the plaintext as it is
COMPRESSED_VERSION = 2  # the plaintext compressed with zlib
# zlib level 3: on the store's values (a stay of 51-289 kB, a record of 46 kB) it took the
# time of level 1 (0.07 ms for 51 kB, 0.9 ms for 289 kB) for 3-8 % smaller output; level 6
# took 2-4.5 times as long for another 10-13 %.
COMPRESS_LEVEL = 3
# The most a value may inflate to, so a corrupt or hostile value cannot exhaust memory. A
# sealed value is drawn from one request's Bundle (a stay is a fifth of it, a record less),
# which Limits.max_bundle_bytes holds to 64 MiB by default: four times that leaves room.
MAX_PLAINTEXT_BYTES = 256 * 1024 * 1024
NONCE_BYTES = 12
KEY_BYTES = 32
KEY_ENV = "EPICRISIS_ENCRYPTION_KEY"
KEY_FILE_ENV = "EPICRISIS_ENCRYPTION_KEY_FILE"
_KEY_ID = re.compile(r"[A-Za-z0-9_.\-]{1,32}")
_INDEX_LABEL = b"epicrisis/index/v1"


class SealError(EpicrisisError):
    """A sealed value did not open (tampered, truncated, for another context, an unknown key,
    or too large to inflate), or a plaintext too large to seal compressed."""


class KeySettings(Protocol):
    """The settings :meth:`Sealer.from_settings` reads (``config.Settings`` once it has them)."""

    @property
    def encryption_key(self) -> SecretStr | None: ...

    @property
    def encryption_key_file(self) -> Path | None: ...


class Sealer:
    """AES-256-GCM with key ids: seal with the current key, open with any known key."""

    def __init__(self, keys: Mapping[str, bytes], current: str) -> None:
        if current not in keys:
            raise ConfigurationError("the current encryption key id is not among the keys")
        for key_id, key in keys.items():
            if not _KEY_ID.fullmatch(key_id):
                raise ConfigurationError("an encryption key id must be 1-32 of [A-Za-z0-9_.-]")
            if len(key) != KEY_BYTES:
                raise ConfigurationError(f"encryption key {key_id!r} is not {KEY_BYTES} bytes")
        self._ciphers = {key_id: AESGCM(key) for key_id, key in keys.items()}
        self._current = current
        # Lookup keys (idempotency keys, request digests) are hashed with a key of their own,
        # derived from the current key, so a guessed input cannot be confirmed from Redis.
        self._index_key = hmac.new(keys[current], _INDEX_LABEL, hashlib.sha256).digest()
        self._current_key = keys[current]

    @property
    def current(self) -> str:
        return self._current

    def seal(self, plaintext: bytes, *, context: bytes, compress: bool = False) -> bytes:
        version = VERSION
        if compress:
            if len(plaintext) > MAX_PLAINTEXT_BYTES:  # it would not open again
                raise SealError(f"value is over {MAX_PLAINTEXT_BYTES} bytes, too large to seal")
            plaintext = zlib.compress(plaintext, COMPRESS_LEVEL)
            version = COMPRESSED_VERSION
        key_id = self._current.encode()
        header = bytes((version, len(key_id))) + key_id
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = self._ciphers[self._current].encrypt(nonce, plaintext, header + context)
        return header + nonce + sealed

    def open(self, sealed: bytes, *, context: bytes) -> bytes:
        if len(sealed) < 2 or sealed[0] not in (VERSION, COMPRESSED_VERSION):
            raise SealError("sealed value has an unknown format")
        end = 2 + sealed[1]
        key_id = sealed[2:end].decode("ascii", errors="replace")
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise SealError("sealed value names an encryption key this process does not have")
        nonce = sealed[end : end + NONCE_BYTES]
        if len(nonce) != NONCE_BYTES:
            raise SealError("sealed value is truncated")
        try:
            plaintext = cipher.decrypt(nonce, sealed[end + NONCE_BYTES :], sealed[:end] + context)
        except InvalidTag:
            raise SealError("sealed value failed authentication") from None
        return _inflate(plaintext) if sealed[0] == COMPRESSED_VERSION else plaintext

    def derive_key(self, label: bytes) -> bytes:
        """A key for another purpose (the audit's patient hash), derived from the current key."""
        return hmac.new(self._current_key, label, hashlib.sha256).digest()

    def index(self, value: bytes | str) -> str:
        """A keyed hash for Redis lookups: equal inputs match, the input cannot be recovered."""
        data = value.encode() if isinstance(value, str) else value
        return hmac.new(self._index_key, data, hashlib.sha256).hexdigest()

    @classmethod
    def from_text(cls, text: str) -> Sealer:
        """Keys from ``KEY`` or ``ID:KEY,ID:KEY,...`` (base64, first one current)."""
        keys: dict[str, bytes] = {}
        current: str | None = None
        for position, raw in enumerate(part.strip() for part in text.split(",")):
            if not raw:
                continue
            key_id, _, encoded = raw.rpartition(":")
            key = _decode_key(encoded, position)
            key_id = key_id or _derived_id(key)
            if key_id in keys:
                raise ConfigurationError(f"{KEY_ENV}: key id {key_id!r} appears twice")
            keys[key_id] = key
            current = current or key_id
        if current is None:
            raise ConfigurationError(f"{KEY_ENV} is empty")
        return cls(keys, current)

    @classmethod
    def from_settings(cls, settings: KeySettings) -> Sealer:
        """The key from the setting, else from the mounted secret file; one of them is required."""
        if settings.encryption_key is not None:
            return cls.from_text(settings.encryption_key.get_secret_value())
        if settings.encryption_key_file is not None:
            return cls.from_text(_read_secret_file(settings.encryption_key_file))
        raise ConfigurationError(f"{KEY_ENV} (or {KEY_FILE_ENV}) is required to use Redis")

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Sealer:
        """The same, read straight from the environment (for processes without Settings)."""
        env = os.environ if environ is None else environ
        if env.get(KEY_ENV):
            return cls.from_text(env[KEY_ENV])
        if env.get(KEY_FILE_ENV):
            return cls.from_text(_read_secret_file(Path(env[KEY_FILE_ENV])))
        raise ConfigurationError(f"{KEY_ENV} (or {KEY_FILE_ENV}) is required to use Redis")


def new_key_text() -> str:
    """A fresh key in the form ``EPICRISIS_ENCRYPTION_KEY`` takes (for operators and tests)."""
    return base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()


def _inflate(data: bytes) -> bytes:
    """``data`` decompressed; refused once past ``MAX_PLAINTEXT_BYTES``, without producing
    the rest, or when the stream is cut short or followed by other bytes."""
    limit = MAX_PLAINTEXT_BYTES
    inflater = zlib.decompressobj()
    try:
        plaintext = inflater.decompress(data, limit + 1)  # one byte more shows it is over
    except zlib.error:
        raise SealError("sealed value does not decompress") from None
    if len(plaintext) > limit:
        raise SealError(f"sealed value inflates past {limit} bytes")
    if not inflater.eof or inflater.unused_data:
        raise SealError("sealed value does not decompress")
    return plaintext


def _decode_key(encoded: str, position: int) -> bytes:
    try:
        key = base64.b64decode(
            encoded, altchars=b"-_" if "-" in encoded or "_" in encoded else None, validate=True
        )
    except (binascii.Error, ValueError):
        raise ConfigurationError(f"{KEY_ENV}: key {position + 1} is not valid base64") from None
    if len(key) != KEY_BYTES:
        raise ConfigurationError(
            f"{KEY_ENV}: key {position + 1} must decode to {KEY_BYTES} bytes, not {len(key)}"
        )
    return key


def _derived_id(key: bytes) -> str:
    """A stable id for a key given without one: a fingerprint that reveals nothing usable."""
    return "k" + hashlib.sha256(b"epicrisis/key-id/v1" + key).hexdigest()[:8]


def _read_secret_file(path: Path) -> str:
    try:
        return path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        raise ConfigurationError(f"{KEY_FILE_ENV}: cannot read the key file") from None
