"""What the client returns: plain Python objects read back from the epicrisis.v1 messages.

Callers of the client never touch protobuf. :func:`summary_from_message` is the inverse of
:func:`epicrisis.serving.convert.summary_message`, so the summary a caller receives is the
same :class:`~epicrisis.summary.model.DischargeSummary` the server built (one proto3 limit:
an empty ``timings_ms`` map comes back as ``None``, the value the pipeline uses for "none").
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp
from pydantic import ValidationError

from epicrisis.client.errors import ClientError
from epicrisis.fhir.bundle import DataWarning
from epicrisis.serving.convert import STATES
from epicrisis.serving.jobs import FINAL, JobFailure, JobState
from epicrisis.summary.model import (
    Code,
    DischargeSummary,
    EncounterInfo,
    Item,
    Omission,
    PatientInfo,
    Provenance,
    Section,
    Sentence,
)
from epicrisis.v1 import summarizer_pb2 as pb

# The server's own state names and failure record: one definition on both sides.
JobError = JobFailure
_STATES = {message: state for state, message in STATES.items()}


@dataclass(frozen=True, slots=True)
class Progress:
    """The current stage (queued, building-prompt, generating, ..., done) and its fraction."""

    stage: str
    fraction: float


@dataclass(frozen=True, slots=True)
class JobResult:
    """One summary job as the server last reported it."""

    id: str
    state: JobState
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    progress: Progress
    summary: DischargeSummary | None = None
    fhir_document: str | None = None
    error: JobError | None = None

    @property
    def final(self) -> bool:
        """True once the job will not change any more."""
        return self.state in FINAL


def job_from_message(job: pb.Job) -> JobResult:
    state = _STATES.get(job.state)
    if state is None:
        raise ClientError(f"the server sent job {job.id} in an unknown state ({job.state})")
    return JobResult(
        id=job.id,
        state=state,
        created_at=_time(job.created_at) if job.HasField("created_at") else None,
        started_at=_time(job.started_at) if job.HasField("started_at") else None,
        finished_at=_time(job.finished_at) if job.HasField("finished_at") else None,
        # a float32 on the wire: 0.1 arrives as 0.10000000149
        progress=Progress(stage=job.progress.stage, fraction=round(job.progress.fraction, 6)),
        summary=summary_from_message(job.summary) if job.HasField("summary") else None,
        fhir_document=job.fhir_document or None,
        error=JobError(
            code=job.error.code, message=job.error.message, retryable=job.error.retryable
        )
        if job.HasField("error")
        else None,
    )


def _time(stamp: Timestamp) -> datetime:
    return stamp.ToDatetime(tzinfo=UTC)


_KINDS = {pb.SUMMARY_KIND_DISCHARGE: "discharge-summary", pb.SUMMARY_KIND_DEATH: "death-summary"}


def summary_from_message(message: pb.DischargeSummary) -> DischargeSummary:
    """The pydantic summary of a ``DischargeSummary`` message (inverse of ``summary_message``)."""
    kind = _KINDS.get(message.kind)
    if kind is None:
        raise ClientError(f"the server sent a summary of an unknown kind ({message.kind})")
    try:
        return DischargeSummary(
            kind=kind,
            patient=_patient(message.patient),
            encounter=_encounter(message.encounter),
            sections=[_section(s) for s in message.sections],
            provenance=_provenance(message.provenance),
            warnings=[_warning(w) for w in message.warnings],
        )
    except ValidationError as exc:
        # Name the fields only: a value that fails validation may be clinical content.
        fields = sorted({".".join(str(p) for p in e["loc"]) for e in exc.errors()})
        raise ClientError(
            f"the server sent a summary this client cannot read (at {', '.join(fields)})"
        ) from None


def _patient(p: pb.PatientInfo) -> PatientInfo:
    return PatientInfo(
        reference=p.reference,
        sex=p.sex if p.HasField("sex") else None,
        age_at_discharge=p.age_at_discharge if p.HasField("age_at_discharge") else None,
        died=p.died if p.HasField("died") else None,
    )


def _encounter(e: pb.EncounterInfo) -> EncounterInfo:
    return EncounterInfo(
        reference=e.reference,
        class_code=e.class_code if e.HasField("class_code") else None,
        start=e.start if e.HasField("start") else None,
        end=e.end if e.HasField("end") else None,
        timezone=e.timezone,
        length_of_stay_days=e.length_of_stay_days if e.HasField("length_of_stay_days") else None,
        types=list(e.types),
        admit_source=e.admit_source if e.HasField("admit_source") else None,
        disposition=e.disposition if e.HasField("disposition") else None,
    )


def _section(s: pb.Section) -> Section:
    return Section(
        key=s.key,
        title=s.title,
        loinc=s.loinc,
        items=[
            Item(
                text=i.text,
                codes=[
                    Code(
                        system=c.system if c.HasField("system") else None,
                        code=c.code if c.HasField("code") else None,
                        display=c.display if c.HasField("display") else None,
                    )
                    for c in i.codes
                ],
                status=i.status if i.HasField("status") else None,
                date=i.date if i.HasField("date") else None,
                sources=list(i.sources),
            )
            for i in s.items
        ],
        narrative=[Sentence(text=n.text, sources=list(n.sources)) for n in s.narrative],
        empty_reason=s.empty_reason if s.HasField("empty_reason") else None,
    )


def _provenance(p: pb.Provenance) -> Provenance:
    return Provenance(
        generator=p.generator,
        backend=p.backend,
        model=p.model if p.HasField("model") else None,
        fallback=p.fallback,
        fallback_reason=p.fallback_reason if p.HasField("fallback_reason") else None,
        prompt_tokens=p.prompt_tokens if p.HasField("prompt_tokens") else None,
        generated_tokens=p.generated_tokens if p.HasField("generated_tokens") else None,
        omitted=[
            Omission(
                section=o.section, count=o.count, tokens=o.tokens if o.HasField("tokens") else None
            )
            for o in p.omitted
        ],
        grounding=p.grounding if p.HasField("grounding") else None,
        timings_ms=dict(p.timings_ms) or None,
        prompt_budget_used=p.prompt_budget_used if p.HasField("prompt_budget_used") else None,
    )


def _warning(w: pb.DataWarning) -> DataWarning:
    return DataWarning(
        code=w.code,
        message=w.message,
        entry_index=w.entry_index if w.HasField("entry_index") else None,
        resource_type=w.resource_type if w.HasField("resource_type") else None,
        resource_id=w.resource_id if w.HasField("resource_id") else None,
        path=w.path if w.HasField("path") else None,
    )
