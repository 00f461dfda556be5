"""Capacity model: what a daily volume of discharge summaries needs, and what runs out first.

    python bench/capacity.py [--answer-tokens N] [--replica-tokens-per-second X] [--no-corpus] ...

Prints markdown: the inputs (each with its source), the plan per daily volume (TGI replicas,
GPUs, worker processes, server replicas, Redis memory), and the volume one unit of each part
carries. Offline, in seconds. Prompt tokens, stored sizes and the server's CPU per Submit are
measured on the corpus in ../shared/data/fhir when it is there (else the defaults below,
measured the same way on 2026-11-29, and the output says so).

The model, per job: the model writes `answer_tokens` (times `attempts`, since an answer that
fails verification is generated again); a TGI replica writes `replica_tokens_per_second`
tokens/s in aggregate while its batch is full, prefill of prompts like ours included. Capacity
is sized for the peak hour (`peak_factor` x the daily mean) at `utilisation` of each part; a
backfill runs flat out at `backfill_utilisation`. A worker process is one event loop (one
core); a server replica validates in its ingest processes, one under the manifests' limit of
2 CPUs (one core of validation; EPICRISIS_INGEST_PROCESSES). Redis holds every job's sealed
result for EPICRISIS_JOB_TTL_SECONDS, plus the sealed stays of the jobs waiting (at most
EPICRISIS_MAX_QUEUED_JOBS per priority).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SHOWN = "../shared/data"  # how the output names it: beside the clone
DAY = 86_400
BACKFILL_STAYS = 350e6  # a national backfill: ten years of US discharges (35 M a year)
BACKFILL_DAYS = 365


@dataclass(frozen=True)
class Inputs:
    # -- per stay (measured on the corpus; these defaults are that measurement) ----------------
    prompt_tokens_mean: float = 4_532  # 39 inpatient stays, Llama 3 tokenizer, default budget
    prompt_tokens_p90: float = 6_606
    payload_bytes: float = 10_000  # sealed stay waiting in Redis (mean; the sample's is 8 KB)
    result_bytes: float = 7_000  # sealed job record: summary JSON + FHIR document (mean)
    server_cpu_seconds: float = 0.12  # ingest + R4B validation at Submit (mean CPU, 2-core EPYC)
    corpus: str = "the defaults (--no-corpus)"
    given: tuple[str, ...] = ()  # inputs set on the command line
    # -- the model's answer --------------------------------------------------------------------
    answer_tokens: float = 1_000  # the extractive prose in the answer schema (mean)
    answer_tokens_p90: float = 1_300
    max_answer_tokens: int = 2_048  # EPICRISIS_LLM_MAX_OUTPUT_TOKENS: the upper bound
    attempts: float = 1.1  # generations per job: verification failures cost another
    # -- one TGI replica: Med42-v2 70B (Llama 3 70B), bf16, --num-shard 4 ----------------------
    replica_tokens_per_second: float = 920
    gpus_per_replica: int = 4
    gpu_memory_gb: float = 80
    weights_gb: float = 141  # 70B parameters in bf16 (docs/DESIGN.md section 6)
    kv_bytes_per_token: float = 327_680  # 80 layers x 8 KV heads x 128 x (K, V) x 2 bytes
    memory_reserved: float = 0.10  # of GPU memory kept for activations, CUDA graphs
    # -- load shape and headroom -----------------------------------------------------------------
    peak_factor: float = 2.8
    utilisation: float = 0.7
    backfill_utilisation: float = 0.9
    # -- Epicrisis processes ---------------------------------------------------------------------
    worker_cpu_seconds: float = 0.08  # per job (bench/README.md saturation runs)
    min_replicas_of_services: int = 2  # server and workers: survive one restart
    job_ttl_seconds: float = 86_400  # EPICRISIS_JOB_TTL_SECONDS
    max_queued_jobs: int = 1_000  # EPICRISIS_MAX_QUEUED_JOBS, per priority (2 priorities)
    queued_overhead_bytes: float = 2_000  # Celery message and job keys per waiting job
    redis_overhead: float = 1.5  # allocator, keys, replication buffers
    redis_gib: float = 16  # the size of one Redis for the "limits" table


SOURCES = {
    "prompt_tokens_mean": "measured: epicrisis.build_prompt, Llama 3 tokenizer, default budget",
    "payload_bytes": "measured: encode_stay compressed and sealed, as Submit stores it",
    "result_bytes": "measured: extractive summary JSON + FHIR document, compressed and sealed",
    "server_cpu_seconds": "measured here: CPU of load_stay (parse, R4B validation, gather)",
    "answer_tokens": "measured: the extractive prose as the answer schema's JSON [1]",
    "attempts": "assumed: 1 answer in 10 fails verification once [2]",
    "replica_tokens_per_second": "assumed from a published benchmark [3]",
    "peak_factor": "derived from published discharge times [4]",
    "utilisation": "assumed: headroom for a lost replica and bursts",
    "worker_cpu_seconds": "measured: bench/README.md saturation runs [5]",
    "kv_bytes_per_token": "Llama 3 70B: 80 layers x 8 KV heads x 128 x (K, V) x bf16",
}

NOTES = """\
[1] The extractive backend writes the same three sections from the same stay; its sentences,
    encoded as the JSON the model must return (answer schema, prompt handles as citations),
    counted with the Llama 3 tokenizer. A proxy for Med42-v2's answer: replace it with the
    mean of epicrisis_generated_tokens once the model runs on real stays. The last paragraph
    gives a replica's share if every answer used EPICRISIS_LLM_MAX_OUTPUT_TOKENS.
[2] Replace with 1 + rate(epicrisis_verification_failures_total) / rate(epicrisis_jobs_finished_total).
[3] NVIDIA NIM LLM benchmarks (docs.nvidia.com/nim/benchmarking/llm/1.0.0/performance):
    Llama-3.3-70B-Instruct (the Llama 3 70B architecture of Med42-v2 70B) on 2 x H100 80 GB,
    FP8, TP2, 5,000 input / 500 output tokens: ~920 output tokens/s from 100 to 250 concurrent
    requests, inter-token latency ~93 ms. 4 x H100 in bf16 (TGI --num-shard 4) hold the same
    weight bytes per GPU (35 GB); NIM's engine is not TGI. Cross-checks: TensorRT-LLM 0.5.0
    performance table, LLaMA 70B on 4 x H100 FP8, batch 64, 2,048 in / 2,048 out: 1,583
    tokens/s; bench/README.md's simulator assumes 20 tokens/s x 128 slots = 2,560. An
    assumption until measured: take rate(tgi_request_generated_tokens_sum) of one replica
    with a non-empty queue on the production GPUs (dashboard row "TGI backends").
[4] Florida acute hospitals, all weekday discharges (Epstein, Dexter et al., J Med Syst 2019
    and 2025): 13 % by noon, 42 % by 3 PM, median 3 PM, i.e. ~9.7 % an hour in the early
    afternoon, 2.3 x the hourly mean; x 1.2 for a weekday over the weekly mean (assumed).
[5] One worker process: 0.23 cores at 2.9 jobs/s, 0.43 cores at 5.4 jobs/s (prompt, HTTP
    streams to TGI, verification); one process is one event loop, about one core.
"""


@dataclass(frozen=True)
class Plan:
    label: str
    per_day: float
    peak_jobs_per_second: float
    replicas: int
    gpus: int
    workers: int
    servers: int
    redis_gib: float


def measure(inputs: Inputs) -> Inputs:
    """Per-stay figures from the corpus: prompt tokens, sealed sizes, server CPU per Submit."""
    tokenizer_file = SHARED / "tokenizer" / "llama3-tokenizer.json"
    bundles = [
        p for d in ("synthea-r4", "clinosim") for p in sorted((SHARED / "fhir" / d).glob("*.json"))
    ]
    if not tokenizer_file.is_file() or not bundles:
        return replace(inputs, corpus=f"the defaults (no corpus at {SHOWN})")
    import orjson

    from epicrisis.errors import EpicrisisError
    from epicrisis.pipeline import load_stay, render, summarize_stay
    from epicrisis.prompt import HFTokenizer, build_messages
    from epicrisis.serving.crypto import Sealer
    from epicrisis.stay.codec import encode_stay
    from epicrisis.summary.extractive import extractive_prose

    tokenizer = HFTokenizer.from_file(tokenizer_file)
    sealer = Sealer({"k": bytes(32)}, "k")  # sizes only: any key seals to the same length
    tokens, answers, payloads, results, cpu = [], [], [], [], []
    for path in bundles:
        data = path.read_bytes()
        started = time.process_time()
        try:
            stay = load_stay(data)
        except EpicrisisError:  # no inpatient stay in this Bundle
            continue
        cpu.append(time.process_time() - started)
        prompt = build_messages(stay, tokenizer=tokenizer)
        tokens.append(prompt.token_count)
        answers.append(tokenizer.count(_answer_json(extractive_prose(stay), prompt.handles)))
        sealed = sealer.seal(encode_stay(stay), context=b"", compress=True)
        payloads.append(len(sealed) + 100)  # + the job's options
        summary = summarize_stay(stay)
        record = {
            "summary": summary.model_dump(mode="json"),
            "fhir_document": render(summary, "fhir"),
        }
        sealed = sealer.seal(orjson.dumps(record), context=b"", compress=True)
        results.append(len(sealed) + 300)  # + state and times
    if not tokens:
        return replace(inputs, corpus=f"the defaults (no inpatient stay in {SHOWN}/fhir)")
    return replace(
        inputs,
        prompt_tokens_mean=statistics.fmean(tokens),
        prompt_tokens_p90=statistics.quantiles(tokens, n=10)[-1],
        answer_tokens=statistics.fmean(answers),
        answer_tokens_p90=statistics.quantiles(answers, n=10)[-1],
        payload_bytes=statistics.fmean(payloads),
        result_bytes=statistics.fmean(results),
        server_cpu_seconds=statistics.fmean(cpu),
        corpus=f"measured on the {len(tokens)} inpatient stays in {SHOWN}/fhir",
    )


def _answer_json(prose: Any, handles: Any) -> str:
    """The extractive prose as the model is asked to write it: the answer schema's JSON,
    each sentence citing prompt handles (``O12``) instead of references."""
    import orjson

    def sentences(items: list[Any]) -> list[dict[str, Any]]:
        return [
            {"text": s.text, "cites": [handles.handle(ref) or "O1" for ref in s.sources] or ["E1"]}
            for s in items
        ]

    return orjson.dumps(
        {
            "hospital_course": sentences(prose.hospital_course),
            "discharge_instructions": sentences(prose.discharge_instructions),
            "follow_up": sentences(prose.follow_up),
        }
    ).decode()


def replica_jobs_per_second(i: Inputs) -> float:
    return i.replica_tokens_per_second / (i.answer_tokens * i.attempts)


def kv_sequences(i: Inputs) -> int:
    """Sequences of p90 prompt + the answer budget (what TGI reserves) that one replica's KV
    cache holds at once."""
    free = i.gpus_per_replica * i.gpu_memory_gb * (1 - i.memory_reserved) - i.weights_gb
    return int(free * 1e9 / i.kv_bytes_per_token / (i.prompt_tokens_p90 + i.max_answer_tokens))


def redis_gib(i: Inputs, per_day: float) -> float:
    kept = per_day * i.job_ttl_seconds / DAY * i.result_bytes
    waiting = 2 * i.max_queued_jobs * (i.payload_bytes + i.queued_overhead_bytes)
    return (kept + waiting) * i.redis_overhead / 2**30


def plan(i: Inputs, label: str, per_day: float, peak_factor: float, utilisation: float) -> Plan:
    peak = per_day / DAY * peak_factor
    replicas = max(1, math.ceil(peak / (replica_jobs_per_second(i) * utilisation)))
    workers = max(i.min_replicas_of_services, math.ceil(peak * i.worker_cpu_seconds / utilisation))
    servers = max(i.min_replicas_of_services, math.ceil(peak * i.server_cpu_seconds / utilisation))
    return Plan(
        label,
        per_day,
        peak,
        replicas,
        replicas * i.gpus_per_replica,
        workers,
        servers,
        redis_gib(i, per_day),
    )


def markdown(i: Inputs, plans: list[Plan]) -> str:
    out = [
        "## Inputs",
        "",
        f"Per-stay figures: {i.corpus}.",
        "",
        "| input | value | source |",
        "| --- | ---: | --- |",
    ]
    shown = {
        "prompt_tokens_mean": f"{i.prompt_tokens_mean:,.0f} mean, {i.prompt_tokens_p90:,.0f} p90",
        "payload_bytes": f"{i.payload_bytes / 1e3:,.0f} KB",
        "result_bytes": f"{i.result_bytes / 1e3:,.0f} KB",
        "server_cpu_seconds": f"{i.server_cpu_seconds:.2f} s",
        "answer_tokens": f"{i.answer_tokens:,.0f} tokens",
        "attempts": f"{i.attempts:g}",
        "replica_tokens_per_second": f"{i.replica_tokens_per_second:,.0f} tokens/s per replica "
        f"({i.gpus_per_replica} GPUs)",
        "peak_factor": f"{i.peak_factor:g}",
        "utilisation": f"{i.utilisation:g} (backfill {i.backfill_utilisation:g})",
        "worker_cpu_seconds": f"{i.worker_cpu_seconds:.2f} s per job",
        "kv_bytes_per_token": f"{i.kv_bytes_per_token / 2**10:,.0f} KiB",
    }
    for name, value in shown.items():
        source = "given on the command line" if name in i.given else SOURCES[name]
        out.append(f"| {name} | {value} | {source} |")
    rate = replica_jobs_per_second(i)
    seqs = kv_sequences(i)
    out += [
        "",
        f"One replica: {rate:.2f} jobs/s at full batch ({rate * DAY:,.0f} a day flat out). Its KV "
        f"cache ({i.gpus_per_replica} x {i.gpu_memory_gb:g} GB, less {i.memory_reserved:.0%} and "
        f"{i.weights_gb:g} GB of weights) holds ~{seqs} sequences of p90 prompt + the answer budget, "
        f"so ~{seqs} generate at once and TGI queues the rest of its --max-concurrent-requests; "
        f"each then writes ~{i.replica_tokens_per_second / seqs:.0f} tokens/s, "
        f"{i.answer_tokens * seqs / i.replica_tokens_per_second:.0f} s for a mean answer "
        "(EPICRISIS_LLM_TIMEOUT_SECONDS is 180).",
        "",
        "## Plan",
        "",
        "| volume | discharges/day | peak jobs/s | TGI replicas | GPUs | worker processes "
        "| server replicas | Redis GiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p in plans:
        out.append(
            f"| {p.label} | {p.per_day:,.0f} | {p.peak_jobs_per_second:.3f} | {p.replicas} "
            f"| {p.gpus} | {p.workers} | {p.servers} | {p.redis_gib:.1f} |"
        )
    per_unit = {
        f"TGI replica ({i.gpus_per_replica} GPUs)": rate * i.utilisation,
        "worker process (1 core)": i.utilisation / i.worker_cpu_seconds,
        "server replica (1 core)": i.utilisation / i.server_cpu_seconds,
    }
    out += [
        "",
        "## What runs out first",
        "",
        f"Discharges a day that one unit carries at the peak factor and {i.utilisation:g} utilisation:",
        "",
        "| part | discharges/day |",
        "| --- | ---: |",
    ]
    fixed = redis_gib(i, 0)
    per_job = (redis_gib(i, DAY) - fixed) / DAY
    per_unit_days = {part: rate * DAY / i.peak_factor for part, rate in per_unit.items()}
    redis_part = f"Redis of {i.redis_gib:g} GiB (results kept {i.job_ttl_seconds / 3600:g} h)"
    redis_days = (i.redis_gib - fixed) / per_job
    for part, days in sorted(
        {**per_unit_days, redis_part: redis_days}.items(), key=lambda kv: kv[1]
    ):
        out.append(f"| {part} | {days:,.0f} |")
    out += [
        "",
        _verdict(i, plans, {**per_unit_days, redis_part: redis_days}),
        "",
        "## Sources",
        "",
        "```text",
        NOTES.rstrip(),
        "```",
    ]
    return "\n".join(out) + "\n"


def _verdict(i: Inputs, plans: list[Plan], per_unit: dict[str, float]) -> str:
    """Which part limits first as the volume grows, in words, from the figures above."""
    order = sorted(per_unit.items(), key=lambda kv: kv[1])
    (first, first_day), (second, second_day) = order[0], order[1]
    budget = replace(i, answer_tokens=i.max_answer_tokens)
    at_budget = replica_jobs_per_second(budget) * i.utilisation * DAY / i.peak_factor
    redis = next(part for part in per_unit if part.startswith("Redis"))
    over = [p for p in plans if p.redis_gib > i.redis_gib]
    text = (
        f"{first} limits first at every volume: one carries {first_day:,.0f} discharges a "
        f"day ({at_budget:,.0f} if every answer used the {i.max_answer_tokens:,}-token "
        f"budget), {second_day / first_day:.0f} times less than the next part, {second}. "
        "Replicas scale out, and so do worker and server processes, which stay small beside "
        f"them. {redis} is one instance holding every result for the job TTL "
        f"({i.job_ttl_seconds / 3600:g} h), so it is the first part that cannot simply be "
        "added to"
    )
    if over:
        text += (
            f": the row '{over[0].label}' needs {over[0].redis_gib:,.0f} GiB. A backfill "
            "should fetch each result as it finishes (`epicrisis submit` does) and run with "
            "EPICRISIS_JOB_TTL_SECONDS of an hour or two, which divides that memory by 12 to 24."
        )
    else:
        text += "; no volume here fills it."
    return text


def report(
    inputs: Inputs | None = None, stays: float = BACKFILL_STAYS, days: float = BACKFILL_DAYS
) -> str:
    """The plan for the standard volumes and a backfill of ``stays`` in ``days``, as markdown
    (inputs measured on the corpus when none are given)."""
    if inputs is None:
        inputs = measure(Inputs())
    volumes = [
        ("small hospital", 50),
        ("hospital", 500),
        ("health system", 5_000),
        ("region", 50_000),
        ("nation (35 M discharges a year)", 96_000),
    ]
    plans = [plan(inputs, label, n, inputs.peak_factor, inputs.utilisation) for label, n in volumes]
    plans.append(
        plan(
            inputs,
            f"national backfill: {stays / 1e6:g} M stays in {days:g} days",
            stays / days,
            1.0,
            inputs.backfill_utilisation,
        )
    )
    return markdown(inputs, plans)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    defaults = Inputs()
    for name in (
        "answer_tokens",
        "attempts",
        "replica_tokens_per_second",
        "gpus_per_replica",
        "peak_factor",
        "utilisation",
        "backfill_utilisation",
        "worker_cpu_seconds",
        "job_ttl_seconds",
        "redis_gib",
    ):
        kind = next(f.type for f in fields(Inputs) if f.name == name)
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=int if kind == "int" else float,
            default=getattr(defaults, name),
        )
    parser.add_argument("--backfill-stays", type=float, default=BACKFILL_STAYS)
    parser.add_argument("--backfill-days", type=float, default=BACKFILL_DAYS)
    parser.add_argument("--no-corpus", action="store_true", help="use the stated defaults")
    args = parser.parse_args(argv)
    given = {f.name: getattr(args, f.name) for f in fields(Inputs) if hasattr(args, f.name)}
    inputs = replace(defaults, **given)
    if not args.no_corpus:  # measured figures, except those given on the command line
        chosen = {k: v for k, v in given.items() if v != getattr(defaults, k)}
        inputs = replace(measure(inputs), **chosen, given=tuple(chosen))
    sys.stdout.write(report(inputs, args.backfill_stays, args.backfill_days))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
