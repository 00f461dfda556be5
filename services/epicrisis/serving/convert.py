"""The typed summary and job records as their protobuf messages (epicrisis.v1)."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from epicrisis.serving.jobs import JobRecord, JobState
from epicrisis.summary.model import DischargeSummary, Section
from epicrisis.v1 import summarizer_pb2 as pb

STATES = {
    JobState.QUEUED: pb.JOB_STATE_QUEUED,
    JobState.RUNNING: pb.JOB_STATE_RUNNING,
    JobState.SUCCEEDED: pb.JOB_STATE_SUCCEEDED,
    JobState.FAILED: pb.JOB_STATE_FAILED,
    JobState.CANCELLED: pb.JOB_STATE_CANCELLED,
}


def job_message(record: JobRecord) -> pb.Job:
    job = pb.Job(
        id=record.id,
        state=STATES[record.state],
        progress=pb.Progress(stage=record.stage, fraction=record.fraction),
    )
    for name, seconds in (
        ("created_at", record.created_at),
        ("started_at", record.started_at),
        ("finished_at", record.finished_at),
    ):
        if seconds is not None:
            stamp = Timestamp()
            stamp.FromNanoseconds(int(seconds * 1e9))
            getattr(job, name).CopyFrom(stamp)
    if record.summary is not None:
        job.summary.CopyFrom(summary_message(record.summary))
    if record.fhir_document is not None:
        job.fhir_document = record.fhir_document
    if record.error is not None:
        job.error.CopyFrom(
            pb.JobError(
                code=record.error.code,
                message=record.error.message,
                retryable=record.error.retryable,
            )
        )
    return job


def summary_message(summary: DischargeSummary) -> pb.DischargeSummary:
    patient = summary.patient
    enc = summary.encounter
    prov = summary.provenance
    return pb.DischargeSummary(
        kind=pb.SUMMARY_KIND_DEATH
        if summary.kind == "death-summary"
        else pb.SUMMARY_KIND_DISCHARGE,
        patient=pb.PatientInfo(
            reference=patient.reference,
            sex=patient.sex,
            age_at_discharge=patient.age_at_discharge,
            died=patient.died,
        ),
        encounter=pb.EncounterInfo(
            reference=enc.reference,
            class_code=enc.class_code,
            start=enc.start,
            end=enc.end,
            timezone=enc.timezone,
            length_of_stay_days=enc.length_of_stay_days,
            types=enc.types,
            admit_source=enc.admit_source,
            disposition=enc.disposition,
        ),
        sections=[_section(s) for s in summary.sections],
        provenance=pb.Provenance(
            generator=prov.generator,
            backend=prov.backend,
            model=prov.model,
            fallback=prov.fallback,
            fallback_reason=prov.fallback_reason,
            prompt_tokens=prov.prompt_tokens,
            generated_tokens=prov.generated_tokens,
            omitted=[
                pb.Omission(section=o.section, count=o.count, tokens=o.tokens) for o in prov.omitted
            ],
            grounding=prov.grounding,
            timings_ms=prov.timings_ms or {},
            prompt_budget_used=prov.prompt_budget_used,
        ),
        warnings=[pb.DataWarning(**w.model_dump()) for w in summary.warnings],
    )


def _section(section: Section) -> pb.Section:
    return pb.Section(
        key=section.key,
        title=section.title,
        loinc=section.loinc,
        items=[
            pb.Item(
                text=i.text,
                codes=[pb.Code(**c.model_dump()) for c in i.codes],
                status=i.status,
                date=i.date,
                sources=i.sources,
            )
            for i in section.items
        ],
        narrative=[pb.Sentence(text=s.text, sources=s.sources) for s in section.narrative],
        empty_reason=section.empty_reason,
    )
