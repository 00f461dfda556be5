"""Ingest: bytes of FHIR R4 JSON become an indexed, shape-checked Bundle."""

from epicrisis.fhir.bundle import DataWarning, Entry, IngestedBundle, ingest

__all__ = ["DataWarning", "Entry", "IngestedBundle", "ingest"]
