"""Audit events: who submitted or read which job, about which patient, with what outcome.

One JSON record per event on the ``epicrisis.audit`` logger (route it to its own sink): the
caller, the job, the RPC, the outcome, and the patient as a keyed hash (HMAC-SHA256) that
lets an auditor match events about one patient without Epicrisis logging who it is. The
hash key is ``EPICRISIS_AUDIT_KEY``, else derived from the encryption key (so it changes
when that key rotates), else a random key per process (the embedded mode without keys).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time

from epicrisis.config import Settings

log = logging.getLogger("epicrisis.audit")
_LABEL = b"epicrisis audit patient v1"


class Auditor:
    def __init__(self, key: bytes) -> None:
        self._key = key

    @classmethod
    def from_settings(cls, settings: Settings) -> Auditor:
        if settings.audit_key is not None:
            secret = settings.audit_key.get_secret_value().encode()
            return cls(hmac.new(secret, _LABEL, hashlib.sha256).digest())
        if settings.encryption_key is not None or settings.encryption_key_file is not None:
            from epicrisis.serving.crypto import Sealer

            return cls(Sealer.from_settings(settings).derive_key(_LABEL))
        return cls(secrets.token_bytes(32))

    def patient_hash(self, patient: str | None) -> str | None:
        if not patient:
            return None
        return hmac.new(self._key, patient.encode(), hashlib.sha256).hexdigest()[:32]

    def event(
        self,
        action: str,
        *,
        caller: str,
        method: str,
        outcome: str,
        job_id: str | None = None,
        patient: str | None = None,
    ) -> None:
        """Record one event; ``patient`` (a reference or identifier) is hashed, never logged."""
        record = {
            "audit": True,
            "action": action,
            "caller": caller,
            "method": method,
            "outcome": outcome,
            "job_id": job_id,
            "patient": self.patient_hash(patient),
            "at": time.time(),
        }
        log.info(
            "audit %s %s by %s: %s", action, job_id or "-", caller, outcome, extra={"audit": record}
        )
