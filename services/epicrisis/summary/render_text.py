"""A discharge summary for a terminal: headed sections, bullets, sources after each fact."""

from __future__ import annotations

import re
import textwrap

from epicrisis.fhir.bundle import DataWarning
from epicrisis.stay.readers import format_days
from epicrisis.summary.describe import printable
from epicrisis.summary.model import DischargeSummary

WIDTH = 96


def render_text(summary: DischargeSummary) -> str:
    return printable(_render(summary))


def _render(summary: DischargeSummary) -> str:
    enc = summary.encounter
    pat = summary.patient
    title = "DEATH SUMMARY" if summary.kind == "death-summary" else "DISCHARGE SUMMARY"
    who = ", ".join(
        p
        for p in (
            f"{pat.age_at_discharge} y" if pat.age_at_discharge is not None else None,
            pat.sex,
        )
        if p
    )
    lines = [
        title,
        "=" * len(title),
        f"Patient   {pat.reference}" + (f" ({who})" if who else ""),
        f"Stay      {enc.reference}  {enc.start or '?'} to {enc.end or '?'}"
        + (
            f"  ({format_days(enc.length_of_stay_days)})"
            if enc.length_of_stay_days is not None
            else ""
        ),
    ]
    if enc.admit_source:
        lines.append(f"Admitted  {enc.admit_source}")
    if enc.disposition:
        lines.append(f"Outcome   {enc.disposition}")
    if pat.died:
        lines.append(f"Died      {pat.died}")
    prov = summary.provenance
    lines.append(
        f"Written by {prov.generator}"
        + (" (fallback: " + (prov.fallback_reason or "") + ")" if prov.fallback else "")
    )
    for section in summary.sections:
        lines += ["", f"{section.title.upper()}  (LOINC {section.loinc})"]
        for sentence in section.narrative:
            lines += _wrapped(sentence.text, sentence.sources, "  ")
        for item in section.items:
            status = f"[{item.status}] " if item.status else ""
            lines += _wrapped(f"{status}{item.text}", item.sources, "  - ")
        if section.empty_reason:
            lines.append(f"  {section.empty_reason}.")
    if summary.warnings:
        lines += ["", f"DATA WARNINGS ({len(summary.warnings)})"]
        lines += [f"  - {line}" for line in _grouped_warnings(summary.warnings)]
    return "\n".join(lines) + "\n"


def _wrapped(text: str, sources: list[str], lead: str) -> list[str]:
    cite = "  <- " + ", ".join(sources) if sources else ""
    pad = " " * len(lead)
    body = textwrap.wrap(text, WIDTH - len(lead), initial_indent=lead, subsequent_indent=pad) or [
        lead
    ]
    if cite:
        body += textwrap.wrap(
            cite.strip(),
            WIDTH - len(pad) - 2,
            initial_indent=pad + "  ",
            subsequent_indent=pad + "     ",
            break_on_hyphens=False,
        )
    return body


def _grouped_warnings(warnings: list[DataWarning]) -> list[str]:
    """One line per kind of problem: ``code: message (Type .path, entries 3, 4, 9)``."""
    groups: dict[tuple[str, str, str, str], list[int]] = {}
    for w in warnings:
        path = re.sub(r"^entry\[\d+\]\.resource", "", w.path or "")
        key = (w.code, w.message, w.resource_type or "", path)
        groups.setdefault(key, []).extend([w.entry_index] if w.entry_index is not None else [])
    out = []
    for (code, message, rtype, path), entries in groups.items():
        where = " ".join(p for p in (rtype, path) if p)
        if entries:
            shown = ", ".join(str(e) for e in entries[:8]) + (" ..." if len(entries) > 8 else "")
            where += f"{', ' if where else ''}entr{'y' if len(entries) == 1 else 'ies'} {shown}"
        out.append(f"{code}: {message}" + (f" ({where})" if where else ""))
    return out
