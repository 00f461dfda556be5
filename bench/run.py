"""Run every benchmark and write bench/README.md: one command, figures from one run (the
soak, ``bench/soak.py``, runs on its own; its last section, ``bench/soak.md``, is kept)."""

from __future__ import annotations

import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

import capacity
import ingest_prompt  # bench/ is on sys.path when run as `python bench/run.py`
import memory
import reference_coverage
import service

HERE = Path(__file__).resolve().parent


def machine() -> str:
    cpu = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = ", ".join(
        f"{name} {metadata.version(name)}"
        for name in ("fhir.resources", "pysimdjson", "orjson", "tokenizers", "pydantic")
    )
    return (
        f"{cpu}, {os.cpu_count()} cores, {gib:.0f} GiB, Python {platform.python_version()} on "
        f"{platform.system()}; "
        f"{versions}"
    )


def main() -> None:
    if not ingest_prompt.SHARED.is_dir():
        sys.exit("bench: the shared corpus is not at ../shared/data")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    files = sorted((ingest_prompt.SHARED / "fhir" / "synthea-r4").glob("*.json")) + sorted(
        (ingest_prompt.SHARED / "fhir" / "clinosim").glob("*.json")
    )
    rows = ingest_prompt.measure(files)
    ingest_prompt.plot(rows, HERE / "ingest-prompt.png")
    speed = ingest_prompt.markdown(rows)
    covered = reference_coverage.markdown()
    measured = service.measure_all()
    served = service.markdown(measured, plot_to=HERE / "service.png")
    memory_results, memory_seconds = memory.measure_all()
    held = memory.markdown(memory_results, memory_seconds)
    figure, baseline, met = memory.glance(memory_results)
    goals = [
        *ingest_prompt.glance(rows),
        *service.glance(*measured),
        ("memory: at most 1 MB per job in flight beyond its payload", figure, baseline, met),
    ]
    glance = "\n".join(
        f"| {goal} | {baseline} | {figure} | {'met' if ok else '**missed**'} |"
        for goal, figure, baseline, ok in goals
    )
    planned = ("\n" + capacity.report()).replace("\n## ", "\n### ").lstrip("\n")
    text = f"""# Benchmarks

Written by `python bench/run.py` ({started}) on: {machine()}.
Every ratio compares figures from the same run; each section says how it was measured.

## The goals at a glance

| goal | baseline (same run) | figure | |
| --- | --- | --- | --- |
{glance}

Plots: [ingest-prompt.png](ingest-prompt.png), [service.png](service.png),
[memory.png](memory.png). The capacity model is the last section.

## Ingest + prompt against parsing and whole-Bundle validation

Times are milliseconds, median (min-max in brackets) over {ingest_prompt.REPEAT} rounds in which
the three paths take turns on the same bytes; in its turn a path runs
{ingest_prompt.BLOCK} times back to back and the last {ingest_prompt.BLOCK - 1} are timed, so each
is measured in its own steady state (as timeit's loops are) and drift on a shared machine
hits all three alike. The whole-Bundle validation takes its turn every
{ingest_prompt.VALIDATE_EVERY}rd round. A ratio is the median over the rounds of the two
paths' figures in the same round. As timeit does, the cyclic collector is off during each
call (the service tunes it to about 0.1 ms a request: `epicrisis.serving.ingest.settle_heap`); each
path frees what it built inside its timing.

"ingest + prompt" is `epicrisis.build_prompt(bytes)` with the Llama 3 tokenizer: parse
(simdjson checks the whole document; a resource becomes Python objects only when the
summary reads it: `epicrisis.fhir.bundle`), shape-check every entry, select the stay,
validate (R4B) every entry the summary reads (each distinct element of the Bundle once:
`epicrisis.fhir.validate.ElementMemo`), gather, linearize, pack into the default budget
(8,192 - 2,048 tokens) and count exactly. The "orjson parse" baseline builds the whole
Bundle as Python objects, as the issue's goal states it.
"whole-Bundle R4B validation" is `Bundle.model_validate_json(bytes)` from `fhir.resources`;
"(fails)" marks Bundles it refuses (clinosim writes `MedicationAdministration.dosage.timing`,
which R4 does not define), timed to the same end. Token columns: the prompt, and the stay's
resources (every resource the stay cites) as JSON, whole and slimmed of meta, identifiers,
narrative and references.

{speed}
![Ingest + prompt time against Bundle size beside its baselines; prompt tokens per stay](ingest-prompt.png)

## Coverage against clinosim's own discharge summaries

`shared/data/fhir/clinosim-reference/` holds the discharge summaries (LOINC 18842-5 and
34745-0) that clinosim wrote for each stay. Per reference section: the share of the
resources it cites that our extractive summary cites in the section with the same LOINC
code, and anywhere in the summary. The references cite every lab and vital reading of the
stay, and every order; we cite the key readings of each series (first, extremes, last),
hence the lower share for Observations but the share of observation *codes* covered.
Orders (ServiceRequest) we cite only while still open at discharge; the references cite
completed ones too. Medication gaps are completed inpatient orders and inpatient orders
superseded by a discharge order for the same drug, which we do not list as discharge
medications.

{covered}
## The service: overhead and backend saturation

{served}
![Served minus direct p50 against callers; slots busy over time under a backlog](service.png)

## Memory per job in flight

{held}
![Memory against jobs in flight per process](memory.png)

## Capacity: discharges a day to TGI replicas and GPUs

`python bench/capacity.py` (options: `--help`) prints this on its own, with other inputs.

{planned}"""
    # bench/soak.py runs apart (10,000 jobs, about 15 minutes) and leaves its section here
    soak = HERE / "soak.md"
    if soak.is_file():
        text = text.rstrip("\n") + "\n\n" + soak.read_text()
    (HERE / "README.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
