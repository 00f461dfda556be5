"""Coverage against clinosim's own discharge summaries (shared/data/fhir/clinosim-reference).

For each reference section: the share of the resources it cites that our summary cites in
the section with the same LOINC code ("same section") and anywhere ("anywhere"). The
reference documents are template text, so facts (cited resources) are compared, not words.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from epicrisis.pipeline import summarize

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "fhir"


def _refs(section: dict) -> set[str]:  # type: ignore[type-arg]
    return {e["reference"] for e in section.get("entry", []) if "reference" in e}


def measure() -> tuple[list[dict], dict]:  # type: ignore[type-arg]
    per_stay = []
    totals: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    for ref_path in sorted((DATA / "clinosim-reference").glob("*.json")):
        summary = summarize((DATA / "clinosim" / ref_path.name).read_bytes())
        ours_by_loinc: dict[str, set[str]] = defaultdict(set)
        for section in summary.sections:
            for part in (*section.items, *section.narrative):
                ours_by_loinc[section.loinc].update(part.sources)
        ours_all = set().union(*ours_by_loinc.values())
        row: dict[str, object] = {"stay": ref_path.stem}
        cited = hit_same = hit_any = 0
        for composition in json.loads(ref_path.read_text()):
            doc = composition["type"]["coding"][0]["code"]
            for section in composition.get("section", []):
                refs = _refs(section)
                if not refs:
                    continue
                loinc = section["code"]["coding"][0]["code"]
                same = len(refs & ours_by_loinc.get(loinc, set()))
                anywhere = len(refs & ours_all)
                key = (doc, f"{section.get('title')} ({loinc})")
                totals[key][0] += len(refs)
                totals[key][1] += same
                totals[key][2] += anywhere
                cited, hit_same, hit_any = cited + len(refs), hit_same + same, hit_any + anywhere
        row.update(
            cited=cited,
            same=hit_same / cited if cited else 1.0,
            anywhere=hit_any / cited if cited else 1.0,
        )
        per_stay.append(row)
    return per_stay, dict(totals)


def _code(resources: dict[str, dict], ref: str) -> str:  # type: ignore[type-arg]
    return str(resources.get(ref, {}).get("code", {}).get("coding", [{}])[0].get("code"))


def by_type() -> dict[str, list[int]]:
    """Per resource type: cited by the reference, cited by us; observations also by code."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for ref_path in sorted((DATA / "clinosim-reference").glob("*.json")):
        data = (DATA / "clinosim" / ref_path.name).read_bytes()
        resources = {
            f"{e['resource']['resourceType']}/{e['resource']['id']}": e["resource"]
            for e in json.loads(data)["entry"]
        }
        ours = set(summarize(data).source_references())
        theirs = set().union(
            *(_refs(s) for c in json.loads(ref_path.read_text()) for s in c["section"])
        )
        for ref in theirs:
            counts[ref.split("/")[0]][0] += 1
            counts[ref.split("/")[0]][1] += ref in ours
        their_codes = {_code(resources, r) for r in theirs if r.startswith("Observation/")}
        our_codes = {_code(resources, r) for r in ours if r.startswith("Observation/")}
        counts["Observation codes"][0] += len(their_codes)
        counts["Observation codes"][1] += len(their_codes & our_codes)
    return dict(counts)


def markdown() -> str:
    per_stay, totals = measure()
    lines = [
        "| reference document | section | resources cited | same section | anywhere |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for (doc, section), (n, same, anywhere) in sorted(totals.items()):
        lines.append(f"| {doc} | {section} | {n} | {same / n:.0%} | {anywhere / n:.0%} |")
    all_n = sum(v[0] for v in totals.values())
    all_same = sum(v[1] for v in totals.values())
    all_any = sum(v[2] for v in totals.values())
    lines.append(f"| **all** | | {all_n} | {all_same / all_n:.0%} | {all_any / all_n:.0%} |")
    lines += [
        "",
        "| cited by the reference, by type | count | cited by us too |",
        "| --- | ---: | ---: |",
    ]
    for rtype, (n, hit) in sorted(by_type().items()):
        lines.append(f"| {rtype} | {n} | {hit / n:.0%} |")
    lines += [
        "",
        "| stay | resources cited by the reference | same section | anywhere |",
        "| --- | ---: | ---: | ---: |",
    ]
    for row in per_stay:
        lines.append(
            f"| {row['stay']} | {row['cited']} | {row['same']:.0%} | {row['anywhere']:.0%} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown())
