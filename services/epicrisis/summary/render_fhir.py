"""The summary as a FHIR R4 document Bundle: a Composition (LOINC 18842-5) and its author Device.

Sections carry their LOINC code, an XHTML narrative and entry references to the input
resources. The document is marked ``preliminary``: machine-written, for a clinician to sign.
Ids and dates derive from the input, so the same input gives the same document.
"""

from __future__ import annotations

import html
import uuid
from typing import Any

import orjson
from fhir.resources.R4B.bundle import Bundle

from epicrisis.summary.describe import printable
from epicrisis.summary.model import DischargeSummary, Section, section_sources
from epicrisis.summary.sections import DOCUMENT_DISPLAY, DOCUMENT_LOINC, SPEC_BY_KEY

LOINC = "http://loinc.org"
XHTML = 'xmlns="http://www.w3.org/1999/xhtml"'
EMPTY_REASON = "http://terminology.hl7.org/CodeSystem/list-empty-reason"
_NAMESPACE = uuid.UUID("1b0f6a1e-6f5c-4d8e-9a59-1c4b5e2f7d10")


def render_fhir(summary: DischargeSummary, *, version: str) -> str:
    """The document Bundle as JSON text, validated with the R4B models before it is returned."""
    seed = summary.model_dump_json()  # same summary, same ids
    doc_id = str(uuid.uuid5(_NAMESPACE, seed))
    device_id = str(uuid.uuid5(_NAMESPACE, f"device|{summary.provenance.generator}|{version}"))
    date = summary.encounter.end or summary.encounter.start or "1970-01-01"
    title = "Death summary" if summary.kind == "death-summary" else "Discharge summary"
    composition: dict[str, Any] = {
        "resourceType": "Composition",
        "id": doc_id,
        "identifier": {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{doc_id}"},
        "status": "preliminary",
        "type": {
            "coding": [{"system": LOINC, "code": DOCUMENT_LOINC, "display": DOCUMENT_DISPLAY}]
        },
        "subject": {"reference": summary.patient.reference},
        "encounter": {"reference": summary.encounter.reference},
        "date": date,
        "author": [{"reference": f"urn:uuid:{device_id}", "display": summary.provenance.generator}],
        "title": title,
        "section": [_section(s) for s in summary.sections],
    }
    device: dict[str, Any] = {
        "resourceType": "Device",
        "id": device_id,
        "deviceName": [{"name": summary.provenance.generator, "type": "model-name"}],
        "version": [{"value": version}],
    }
    bundle_id = str(uuid.uuid5(_NAMESPACE, f"bundle|{doc_id}"))
    bundle = {
        "resourceType": "Bundle",
        "id": bundle_id,
        "identifier": {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{bundle_id}"},
        "type": "document",
        "timestamp": _instant(date),
        "entry": [
            {"fullUrl": f"urn:uuid:{doc_id}", "resource": composition},
            {"fullUrl": f"urn:uuid:{device_id}", "resource": device},
        ],
    }
    Bundle.model_validate(bundle)  # a document we could not read back is a bug, not an output
    return orjson.dumps(bundle, option=orjson.OPT_INDENT_2).decode() + "\n"


def _section(section: Section) -> dict[str, Any]:
    spec = SPEC_BY_KEY[section.key]
    parts = [f"<p>{_xhtml(s.text)}</p>" for s in section.narrative]
    if section.items:
        lis = "".join(
            f"<li>{_xhtml((f'[{i.status}] ' if i.status else '') + i.text)}</li>"
            for i in section.items
        )
        parts.append(f"<ul>{lis}</ul>")
    if section.empty_reason:
        parts.append(f"<p>{_xhtml(section.empty_reason)}.</p>")
    refs: dict[str, None] = {}
    for sources in section_sources(section):
        refs.update(dict.fromkeys(sources))
    out: dict[str, Any] = {
        "title": section.title,
        "code": {"coding": [{"system": LOINC, "code": spec.loinc, "display": spec.display}]},
        "text": {"status": "generated", "div": f"<div {XHTML}>{''.join(parts)}</div>"},
    }
    if refs:
        out["entry"] = [{"reference": r} for r in refs]
    else:
        out["emptyReason"] = {
            "coding": [{"system": EMPTY_REASON, "code": "unavailable", "display": "Unavailable"}]
        }
    return out


def _instant(value: str) -> str:
    """A FHIR instant from a dateTime of any precision (2024, 2024-06, 2024-06-19, full)."""
    if "T" in value:
        return value
    year, month, day = ([*value.split("-"), "01", "01"])[:3]
    return f"{year}-{month}-{day}T00:00:00Z"


def _xhtml(text: str) -> str:
    return html.escape(printable(text))
