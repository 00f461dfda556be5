"""The clinical context of one hospital stay: everything a discharge summary may say.

Plain frozen dataclasses built once by :func:`epicrisis.stay.gather.gather_stay`; the
summary writers and the prompt linearizer only read them. Every fact keeps ``ref``, the
``Type/id`` (or fullUrl) of the input resource it came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta, timezone, tzinfo
from typing import Annotated, Literal

from pydantic import PlainSerializer, PlainValidator

from epicrisis.fhir.bundle import DataWarning
from epicrisis.stay.time import When


def _offset_seconds(tz: tzinfo) -> int:
    offset = tz.utcoffset(None)
    return 0 if offset is None else int(offset.total_seconds())


def _offset_from(value: object) -> tzinfo:
    if isinstance(value, tzinfo):
        return value
    if isinstance(value, int) and abs(value) < 24 * 3600:
        return timezone(timedelta(seconds=value))
    raise ValueError("a UTC offset in seconds")


# The stay's display offset (from the timestamps, so always fixed); in seconds when encoded.
Offset = Annotated[tzinfo, PlainValidator(_offset_from), PlainSerializer(_offset_seconds)]


@dataclass(frozen=True, slots=True)
class Coding:
    system: str | None
    code: str | None
    display: str | None


@dataclass(frozen=True, slots=True)
class Concept:
    """A CodeableConcept reduced to a label and its codings."""

    text: str | None
    codings: tuple[Coding, ...] = ()

    @property
    def label(self) -> str:
        if self.text:
            return self.text
        for coding in self.codings:
            if coding.display:
                return coding.display
        for coding in self.codings:
            if coding.code:
                return coding.code
        return "unnamed"

    def has_code(self, *codes: str) -> bool:
        return any(c.code in codes for c in self.codings)

    @property
    def key(self) -> str:
        """A stable grouping key: the first system|code, else the label."""
        for coding in self.codings:
            if coding.code:
                return f"{coding.system or ''}|{coding.code}"
        return f"text|{self.label.lower()}"


@dataclass(frozen=True, slots=True)
class PatientFacts:
    ref: str
    sex: str | None
    birth_date: When | None
    age_at_discharge: int | None
    deceased: When | None


DiagnosisUse = Literal["AD", "DD", "CC", "CM", "pre-op", "post-op", "billing"]


@dataclass(frozen=True, slots=True)
class ConditionFact:
    ref: str
    concept: Concept
    clinical_status: str | None
    verification: str | None
    categories: tuple[str, ...]
    onset: When | None
    abatement: When | None
    of_this_stay: bool  # Condition.encounter is the stay, or the Encounter lists it


@dataclass(frozen=True, slots=True)
class DiagnosisFact:
    """Encounter.diagnosis: a Condition (or Procedure) with its role in the stay and rank."""

    condition: ConditionFact
    use: str | None
    rank: int | None


@dataclass(frozen=True, slots=True)
class EncounterFacts:
    ref: str
    status: str
    class_code: str | None
    types: tuple[Concept, ...]
    start: When | None
    end: When | None
    length_of_stay_days: float | None
    reasons: tuple[Concept, ...]
    reason_refs: tuple[str, ...]  # Conditions named by Encounter.reasonReference, as cited
    admit_source: Concept | None
    disposition: Concept | None
    service: Concept | None
    tz: Offset


@dataclass(frozen=True, slots=True)
class Reading:
    """One value of an observation (or of one component of it, such as systolic pressure)."""

    ref: str
    when: When | None
    value: float | None
    text: str | None  # a non-numeric value (coded or string), shown as is
    unit: str | None
    low: float | None
    high: float | None
    range_text: str | None
    flags: tuple[str, ...]  # interpretation codes: H, L, HH, LL, A, AA, N ...
    status: str

    @property
    def abnormal(self) -> bool:
        if any(f in ABNORMAL_FLAGS for f in self.flags):
            return True
        if self.value is None:
            return False
        return (self.low is not None and self.value < self.low) or (
            self.high is not None and self.value > self.high
        )

    def flag(self) -> str | None:
        """The interpretation to show: the source's own code, else derived from the range."""
        for f in self.flags:
            if f in ABNORMAL_FLAGS:
                return f
        if self.value is not None:
            if self.low is not None and self.value < self.low:
                return "L"
            if self.high is not None and self.value > self.high:
                return "H"
        return None


ABNORMAL_FLAGS = frozenset(
    {"H", "L", "HH", "LL", "HU", "LU", "A", "AA", "POS", "DET", ">", "<", "W"}
)


@dataclass(frozen=True, slots=True)
class ObservationSeries:
    """All readings of one code in the stay, in time order, with their summary statistics."""

    concept: Concept
    category: str  # laboratory, vital-signs, or another observation-category code
    readings: tuple[Reading, ...]

    @property
    def first(self) -> Reading:
        return self.readings[0]

    @property
    def last(self) -> Reading:
        return self.readings[-1]

    @property
    def numeric(self) -> tuple[Reading, ...]:
        return tuple(r for r in self.readings if r.value is not None)

    @property
    def peak(self) -> Reading | None:
        values = self.numeric
        return max(values, key=lambda r: r.value or 0.0) if values else None

    @property
    def trough(self) -> Reading | None:
        values = self.numeric
        return min(values, key=lambda r: r.value or 0.0) if values else None

    @property
    def abnormal(self) -> bool:
        return any(r.abnormal for r in self.readings)

    @property
    def last_abnormal(self) -> bool:
        return self.last.abnormal

    @property
    def trend(self) -> str | None:
        """rising / falling / stable from first to last, within a 5% band; None if not numeric."""
        values = self.numeric
        if len(values) < 2:
            return None
        first, last = values[0].value or 0.0, values[-1].value or 0.0
        band = max(abs(first), abs(last)) * 0.05
        if last - first > band:
            return "rising"
        if first - last > band:
            return "falling"
        return "stable"

    def key_readings(self) -> tuple[Reading, ...]:
        """first, trough, peak and last: the readings a summary line cites (no duplicates)."""
        seen: dict[str, Reading] = {}
        for reading in (self.first, self.trough, self.peak, self.last):
            if reading is not None:
                seen.setdefault(reading.ref + (reading.when.iso() if reading.when else ""), reading)
        return tuple(seen.values())


@dataclass(frozen=True, slots=True)
class ProcedureFact:
    ref: str
    concept: Concept
    status: str
    when: When | None
    outcome: str | None


MedicationStatus = Literal["new", "changed", "continued", "stopped", "inpatient-active"]


@dataclass(frozen=True, slots=True)
class MedicationFact:
    """One MedicationRequest or MedicationAdministration, reduced."""

    ref: str
    kind: Literal["request", "administration"]
    drug: Concept
    status: str
    category: str | None  # inpatient, outpatient, community, discharge
    when: When | None
    dosage: str | None
    of_this_stay: bool
    of_another_stay: bool = False  # placed during another inpatient or emergency encounter


@dataclass(frozen=True, slots=True)
class MedicationChange:
    """A line of the discharge medication list, with what it is relative to before admission."""

    drug: Concept
    status: MedicationStatus
    dosage: str | None
    previous_dosage: str | None
    refs: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AllergyFact:
    """An allergy, a recorded "no known allergy", or a record that could not be read."""

    ref: str
    substance: Concept
    clinical_status: str | None
    verification: str | None
    criticality: str | None
    reactions: tuple[str, ...]
    kind: Literal["allergy", "none-known", "unreadable"] = "allergy"


UNREADABLE_ALLERGY = Concept("allergy record that could not be read (see the data warnings)")


@dataclass(frozen=True, slots=True)
class ReportFact:
    ref: str
    concept: Concept
    status: str
    when: When | None
    conclusion: str | None
    result_refs: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class NoteFact:
    """Clinical free text (DocumentReference or Composition section), plain text only."""

    ref: str
    title: str
    when: When | None
    text: str


@dataclass(frozen=True, slots=True)
class PlanFact:
    """Follow-up: an order or care plan still open at discharge, or a result still pending."""

    ref: str
    concept: Concept
    kind: Literal["order", "care-plan", "pending-result"]
    status: str
    when: When | None


@dataclass(frozen=True, slots=True)
class Stay:
    """One encounter, gathered: the single input of every summary writer and of the prompt."""

    patient: PatientFacts
    encounter: EncounterFacts
    diagnoses: tuple[DiagnosisFact, ...]  # Encounter.diagnosis, ranked
    stay_conditions: tuple[ConditionFact, ...]  # encounter-diagnosis Conditions of the stay
    problems: tuple[ConditionFact, ...]  # problem list active at discharge, not of the stay
    observations: tuple[ObservationSeries, ...]
    procedures: tuple[ProcedureFact, ...]
    medications: tuple[MedicationFact, ...]  # all requests/administrations read, for the prompt
    discharge_medications: tuple[MedicationChange, ...]
    allergies: tuple[AllergyFact, ...]
    reports: tuple[ReportFact, ...]
    notes: tuple[NoteFact, ...]
    plans: tuple[PlanFact, ...]
    died_in_hospital: bool
    warnings: tuple[DataWarning, ...] = field(default=())

    @property
    def labs(self) -> tuple[ObservationSeries, ...]:
        return tuple(s for s in self.observations if s.category == "laboratory")

    @property
    def vitals(self) -> tuple[ObservationSeries, ...]:
        return tuple(s for s in self.observations if s.category == "vital-signs")
