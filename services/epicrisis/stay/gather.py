"""Gather one stay from an ingested Bundle: select, scope, validate what is read, reduce.

Only entries the summary reads are validated (R4B), on first use; an invalid one that the
summary can do without is dropped with a warning, while an invalid Patient or target
Encounter is an error.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, tzinfo
from typing import Any

from epicrisis.config import Limits, get_settings
from epicrisis.errors import EntryError, Location, StayError
from epicrisis.fhir.bundle import DataWarning, Entry, IngestedBundle, Json, WarningCode
from epicrisis.fhir.references import ReferenceResolver, reference_of
from epicrisis.fhir.validate import ElementMemo, validate_entry
from epicrisis.stay.context import (
    UNREADABLE_ALLERGY,
    AllergyFact,
    Concept,
    ConditionFact,
    DiagnosisFact,
    EncounterFacts,
    MedicationFact,
    NoteFact,
    PatientFacts,
    PlanFact,
    ProcedureFact,
    ReportFact,
    Stay,
)
from epicrisis.stay.medications import LIVE, drug_of, medication_fact, reconcile
from epicrisis.stay.notes import attachment_text, html_to_text
from epicrisis.stay.observations import readings_of, series_of
from epicrisis.stay.readers import codes_of, concept_of, first_code
from epicrisis.stay.select import EMERGENCY_CLASSES, INPATIENT_CLASSES, select_encounter
from epicrisis.stay.time import When, parse_when

EXPIRED_DISPOSITIONS = frozenset({"exp", "20", "40", "41", "42"})  # HL7 discharge-disposition, NUBC
VOID = frozenset({"entered-in-error", "cancelled"})
PENDING = frozenset({"registered", "preliminary", "partial"})
ACTIVE_PROBLEM = frozenset({"active", "recurrence", "relapse"})
# Resources with no encounter link count when these times fall inside the stay.
WINDOW_FIELDS = {
    "Observation": ("effectiveDateTime", "effectiveInstant"),
    "Procedure": ("performedDateTime",),
    "DiagnosticReport": ("effectiveDateTime",),
    "DocumentReference": ("date",),
    "Composition": ("date",),
}
# Which element links a resource type to its encounter (``encounter`` unless named here),
# as the keys leading to it.
ENCOUNTER_FIELD = {
    "MedicationAdministration": ("context",),
    "DocumentReference": ("context", "encounter"),
}
_ABSENT = object()  # what Entry.peek answers for a key the resource lacks (null is not absent)


class _Reader:
    """Validates entries on demand (once each) and resolves references from them."""

    def __init__(self, bundle: IngestedBundle, limits: Limits, memo: ElementMemo) -> None:
        self.bundle = bundle
        self.limits = limits
        self.memo = memo
        self.resolver = ReferenceResolver(bundle)
        self.warnings: list[DataWarning] = []
        self._cache: dict[int, Json | None] = {}

    def warn(self, location: Location, code: WarningCode, message: str) -> None:
        self.warnings.append(DataWarning.at(location, code, message))

    def require(self, entry: Entry) -> Json:
        """The validated resource; an invalid one is the caller's error."""
        resource, warnings = validate_entry(entry, limits=self.limits, memo=self.memo)
        self.warnings.extend(warnings)
        return resource

    def read(self, entry: Entry) -> Json | None:
        """The validated resource, or None (with a warning) when it is invalid."""
        key = id(entry)  # entries live as long as the Bundle (the resolver keeps contained ones)
        if key not in self._cache:
            try:
                resource, warnings = validate_entry(entry, limits=self.limits, memo=self.memo)
                self.warnings.extend(warnings)
                self._cache[key] = resource
            except EntryError as exc:
                self.warn(
                    exc.location,
                    "invalid-entry",
                    f"{exc.message}; the entry was left out of the summary",
                )
                self._cache[key] = None
        return self._cache[key]

    def follow(self, value: Any, source: Entry, path: str) -> Entry | None:
        """Resolve the Reference at ``path`` (under the resource); a dangling one is a warning."""
        ref = reference_of(value)
        if ref is None:
            return None
        target = self.resolver.resolve(ref, source=source)
        if target is None:
            loc = source.location
            self.warn(
                Location(
                    loc.entry_index,
                    loc.resource_type,
                    loc.resource_id,
                    f"entry[{source.index}].resource.{path}",
                ),
                "dangling-reference",
                "reference does not resolve to an entry of the Bundle",
            )
        return target


def gather_stay(
    bundle: IngestedBundle,
    encounter_id: str | None = None,
    *,
    limits: Limits | None = None,
    strict: bool = False,
    allow_emergency: bool = False,
) -> Stay:
    limits = limits or get_settings().limits
    memo = ElementMemo()
    if strict:
        for entry in bundle.entries:
            validate_entry(entry, limits=limits, strict=True, memo=memo)
    reader = _Reader(bundle, limits, memo)
    enc_entry = select_encounter(bundle, encounter_id, allow_emergency=allow_emergency)
    encounter = reader.require(enc_entry)
    patient_entry = _patient_entry(reader, enc_entry, encounter)
    patient = reader.require(patient_entry)

    period = encounter.get("period") or {}
    bounds = [parse_when(period.get("start")), parse_when(period.get("end"))]
    timed = [b for b in bounds if b is not None and b.precision == "second"]
    tz: tzinfo = (timed[0].at.tzinfo or UTC) if timed else UTC
    start = parse_when(period.get("start"), tz)
    end = parse_when(period.get("end"), tz)
    scope = _Scope(reader, enc_entry, patient_entry, start, end)

    candidates = (e for e in scope.of_patient("Condition") if _may_matter(e, scope))
    conditions = [c for c in (_condition(reader, e, scope) for e in candidates) if c]
    diagnoses = _diagnoses(reader, enc_entry, encounter, scope, conditions)
    listed = {d.condition.ref for d in diagnoses}
    stay_conditions = tuple(
        c
        for c in conditions
        if c.of_this_stay
        and ("encounter-diagnosis" in c.categories or not c.categories or c.ref in listed)
    )
    problems = tuple(c for c in conditions if not c.of_this_stay and _active_problem(c, end))
    reasons = [
        reader.follow(r, enc_entry, f"reasonReference[{i}]")
        for i, r in enumerate(encounter.get("reasonReference") or [])
    ]
    reason_refs = tuple(t.local_ref for t in reasons if t is not None)
    encounter_facts = _encounter_facts(enc_entry, encounter, tz, start, end, reason_refs)

    readings = []
    for entry, obs in scope.in_stay("Observation"):
        if obs.get("status") not in VOID:
            readings.extend(readings_of(entry.local_ref, obs, tz))
    medications = tuple(_medications(reader, scope, tz))
    death = _died(encounter, patient, start, end, tz)
    return Stay(
        patient=_patient_facts(
            patient_entry, patient, end or start, death if death is not _UNKNOWN_TIME else None
        ),
        encounter=encounter_facts,
        diagnoses=diagnoses,
        stay_conditions=stay_conditions,
        problems=problems,
        observations=series_of(readings),
        procedures=tuple(_procedures(scope, tz)),
        medications=medications,
        discharge_medications=reconcile(medications, start),
        allergies=tuple(_allergies(scope)),
        reports=tuple(_reports(reader, scope, tz)),
        notes=tuple(_notes(reader, scope, tz)),
        plans=tuple(_plans(scope, tz)),
        died_in_hospital=death is not None,
        warnings=tuple(reader.warnings),
    )


class _Scope:
    """Answers which entries belong to the patient, and which to the stay."""

    def __init__(
        self, reader: _Reader, stay: Entry, patient: Entry, start: When | None, end: When | None
    ) -> None:
        self.reader = reader
        self.stay = stay
        self.patient = patient
        self.start = start
        self.end = end
        self.single_patient = len(reader.bundle.of_type("Patient")) <= 1
        self._in_stay: dict[str, list[tuple[Entry, Json]]] = {}
        # Conditions the Encounter names (diagnosis, reasonReference) belong to the stay too.
        named = [
            d.get("condition") for d in stay.resource.get("diagnosis") or [] if isinstance(d, dict)
        ]
        named += stay.resource.get("reasonReference") or []
        self.named_conditions = {
            id(target)
            for target in (reader.resolver.resolve_field(n, source=stay) for n in named)
            if target
        }

    def of_patient(self, resource_type: str) -> Iterable[Entry]:
        for entry in self.reader.bundle.of_type(resource_type):
            if self._belongs_to_patient(entry):
                yield entry

    def in_stay(self, resource_type: str) -> list[tuple[Entry, Json]]:
        """Validated resources linked to the stay, or unlinked but timed inside its window.

        Computed once per type: several sections read the same resources.
        """
        found = self._in_stay.get(resource_type)
        if found is None:
            found = []
            timed_by = WINDOW_FIELDS.get(resource_type, ())
            for entry in self.reader.bundle.of_type(resource_type):
                # The link first: in a patient's whole record most entries belong to other
                # visits, and that test is cheaper than resolving whose they are.
                link = self._encounter_link(entry)
                if link is not None:
                    if link is not self.stay:
                        continue
                elif not timed_by or not self._in_window(entry, timed_by):
                    continue
                if not self._belongs_to_patient(entry):
                    continue
                resource = self.reader.read(entry)
                if resource is not None:
                    found.append((entry, resource))
            self._in_stay[resource_type] = found
        return found

    def links_to_stay(self, entry: Entry) -> bool:
        return self._encounter_link(entry) is self.stay

    def _belongs_to_patient(self, entry: Entry) -> bool:
        subject = entry.peek("subject", _ABSENT)
        if subject is _ABSENT:
            subject = entry.peek("patient")
        if subject is None:  # R4 allows it; in a Bundle of several patients it is nobody's
            return self.single_patient
        target = self.reader.resolver.resolve_field(subject, source=entry)
        if target is None:
            return self.single_patient
        return target is self.patient

    def _encounter_link(self, entry: Entry) -> Entry | None:
        first, *inner = ENCOUNTER_FIELD.get(entry.resource_type, ("encounter",))
        value = entry.peek(first)
        for part in inner:
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, list):
            value = value[0] if value else None
        ref = reference_of(value)
        if ref is None:
            return None
        # The stay is the stay whatever version a resource cites.
        target = self.reader.resolver.resolve(ref.partition("/_history/")[0], source=entry)
        # A link to an encounter not in the Bundle is still a link, to some other visit.
        return target if target is not None else entry

    def links_to_another_stay(self, entry: Entry) -> bool:
        """Linked to another inpatient or emergency encounter of the Bundle."""
        link = self._encounter_link(entry)
        if link is None or link is self.stay or link.resource_type != "Encounter":
            return False
        cls = link.peek("class")
        return isinstance(cls, dict) and cls.get("code") in INPATIENT_CLASSES | EMERGENCY_CLASSES

    def _in_window(self, entry: Entry, fields: tuple[str, ...]) -> bool:
        if self.start is None:
            return False
        for name in fields:
            when = parse_when(entry.peek(name))
            if when is not None:
                return self.start.at <= when.at and (self.end is None or when.at < self.end.until)
        return False


def _patient_entry(reader: _Reader, enc_entry: Entry, encounter: Json) -> Entry:
    target = reader.follow(encounter.get("subject"), enc_entry, "subject")
    if target is not None and target.resource_type == "Patient":
        return target
    patients = reader.bundle.of_type("Patient")
    if len(patients) == 1:
        return patients[0]
    raise StayError(
        "the Bundle has no Patient for the encounter (Encounter.subject must reference a Patient entry)",
        location=enc_entry.location,
    )


def _patient_facts(
    entry: Entry, patient: Json, at: When | None, death: When | None
) -> PatientFacts:
    birth = parse_when(patient.get("birthDate"))
    age = None
    if birth is not None and at is not None:
        b, a = birth.at.date(), at.at.date()
        age = a.year - b.year - ((a.month, a.day) < (b.month, b.day))
    deceased = parse_when(patient.get("deceasedDateTime"))
    return PatientFacts(entry.local_ref, patient.get("gender"), birth, age, death or deceased)


def _encounter_facts(
    entry: Entry,
    enc: Json,
    tz: tzinfo,
    start: When | None,
    end: When | None,
    reason_refs: tuple[str, ...],
) -> EncounterFacts:
    hosp = enc.get("hospitalization") or {}
    los = None
    if start is not None and end is not None:
        if start.precision == end.precision == "second":
            los = round((end.at - start.at).total_seconds() / 86400, 1)
        else:  # dates only: count calendar days
            los = float((end.at.date() - start.at.date()).days)
    cls = enc.get("class") or {}
    return EncounterFacts(
        ref=entry.local_ref,
        status=str(enc.get("status")),
        class_code=cls.get("code"),
        types=tuple(c for c in (concept_of(t) for t in enc.get("type") or []) if c),
        start=start,
        end=end,
        length_of_stay_days=los,
        reasons=tuple(c for c in (concept_of(r) for r in enc.get("reasonCode") or []) if c),
        reason_refs=reason_refs,
        admit_source=concept_of(hosp.get("admitSource")),
        disposition=concept_of(hosp.get("dischargeDisposition")),
        service=concept_of(enc.get("serviceType")),
        tz=tz,
    )


def _condition(reader: _Reader, entry: Entry, scope: _Scope) -> ConditionFact | None:
    cond = reader.read(entry)
    if cond is None:
        return None
    verification = first_code(cond.get("verificationStatus"))
    if verification in ("refuted", "entered-in-error"):
        return None
    concept = concept_of(cond.get("code"))
    if concept is None:
        return None
    return ConditionFact(
        ref=entry.local_ref,
        concept=concept,
        clinical_status=first_code(cond.get("clinicalStatus")),
        verification=verification,
        categories=codes_of(cond.get("category") or []),
        onset=parse_when(cond.get("onsetDateTime") or (cond.get("onsetPeriod") or {}).get("start")),
        abatement=parse_when(
            cond.get("abatementDateTime") or (cond.get("abatementPeriod") or {}).get("start")
        ),
        of_this_stay=scope.links_to_stay(entry) or id(entry) in scope.named_conditions,
    )


def _may_matter(entry: Entry, scope: _Scope) -> bool:
    """A Condition of the stay, named by it, or possibly active: the others are never read."""
    if scope.links_to_stay(entry) or id(entry) in scope.named_conditions:
        return True
    status = entry.peek("clinicalStatus")
    return not isinstance(status, dict) or bool(set(codes_of(status)) & ACTIVE_PROBLEM)


def _diagnoses(
    reader: _Reader, enc_entry: Entry, enc: Json, scope: _Scope, conditions: list[ConditionFact]
) -> tuple[DiagnosisFact, ...]:
    by_ref = {c.ref: c for c in conditions}
    found = []
    for index, item in enumerate(enc.get("diagnosis") or []):
        target = reader.follow(item.get("condition"), enc_entry, f"diagnosis[{index}].condition")
        if target is None or target.local_ref not in by_ref:
            continue  # dangling, a Procedure, refuted or invalid: nothing to cite
        rank = item.get("rank") if isinstance(item.get("rank"), int) else None
        found.append(DiagnosisFact(by_ref[target.local_ref], first_code(item.get("use")), rank))
    found.sort(key=lambda d: d.rank if d.rank is not None else 1_000_000)
    return tuple(found)


def _active_problem(cond: ConditionFact, end: When | None) -> bool:
    if cond.clinical_status not in ACTIVE_PROBLEM:
        return False
    if cond.categories and "problem-list-item" not in cond.categories:
        return False
    return end is None or cond.onset is None or cond.onset.at < end.until


def _procedures(scope: _Scope, tz: tzinfo) -> Iterable[ProcedureFact]:
    found = []
    for entry, proc in scope.in_stay("Procedure"):
        concept = concept_of(proc.get("code"))
        if concept is None or proc.get("status") in VOID | {"not-done"}:
            continue
        when = parse_when(proc.get("performedDateTime"), tz)
        if when is None and isinstance(proc.get("performedPeriod"), dict):
            when = parse_when(proc["performedPeriod"].get("start"), tz)
        outcome = concept_of(proc.get("outcome"))
        found.append(
            ProcedureFact(
                entry.local_ref,
                concept,
                str(proc.get("status")),
                when,
                outcome.label if outcome else None,
            )
        )
    return sorted(found, key=lambda p: (_ts(p.when), p.ref))


def _medications(reader: _Reader, scope: _Scope, tz: tzinfo) -> Iterable[MedicationFact]:
    facts = []
    for rtype in ("MedicationRequest", "MedicationAdministration"):
        entries = scope.of_patient(rtype)
        for entry in entries:
            of_stay = scope.links_to_stay(entry)
            if not of_stay and (rtype == "MedicationAdministration" or not could_be_home(entry)):
                continue  # other visits' administrations and ended orders: never read, never validated
            resource = reader.read(entry)
            if resource is None or resource.get("status") in VOID:
                continue
            drug = drug_of(resource)
            if drug is None:
                target = reader.follow(
                    resource.get("medicationReference"), entry, "medicationReference"
                )
                med = reader.read(target) if target is not None else None
                drug = concept_of(med.get("code")) if med else None
            if drug is None:
                continue
            facts.append(
                medication_fact(
                    entry.local_ref,
                    resource,
                    drug,
                    of_this_stay=of_stay,
                    of_another_stay=scope.links_to_another_stay(entry),
                    tz=tz,
                )
            )
    return sorted(facts, key=lambda f: (f.kind, _ts(f.when), f.ref))


def could_be_home(entry: Entry) -> bool:
    """Only a live order can be a medication from before admission (see ``reconcile``)."""
    status = entry.peek("status")
    return isinstance(status, str) and status in LIVE


# SNOMED CT "no known ..." allergy situations: a statement, not an allergen.
NO_KNOWN_ALLERGY = frozenset({"716186003", "409137002", "428607008", "429625007", "428197003"})


def _allergies(scope: _Scope) -> Iterable[AllergyFact]:
    """Active allergies; a record that cannot be read stays listed as such, never dropped."""
    found = []
    for entry in scope.of_patient("AllergyIntolerance"):
        allergy = scope.reader.read(entry)
        if allergy is None:
            found.append(
                AllergyFact(
                    entry.local_ref, UNREADABLE_ALLERGY, None, None, None, (), kind="unreadable"
                )
            )
            continue
        verification = first_code(allergy.get("verificationStatus"))
        status = first_code(allergy.get("clinicalStatus"))
        if verification in ("refuted", "entered-in-error") or status in ("inactive", "resolved"):
            continue
        substance = concept_of(allergy.get("code"))
        if substance is None:
            continue
        reactions = []
        for reaction in allergy.get("reaction") or []:
            for manifestation in reaction.get("manifestation") or []:
                concept = concept_of(manifestation)
                if concept:
                    reactions.append(concept.label)
        found.append(
            AllergyFact(
                entry.local_ref,
                substance,
                status,
                verification,
                allergy.get("criticality"),
                tuple(dict.fromkeys(reactions)),
                kind="none-known" if substance.has_code(*NO_KNOWN_ALLERGY) else "allergy",
            )
        )
    return sorted(found, key=lambda a: (a.kind != "allergy", a.substance.label.lower(), a.ref))


def _reports(reader: _Reader, scope: _Scope, tz: tzinfo) -> Iterable[ReportFact]:
    found = []
    for entry, report in scope.in_stay("DiagnosticReport"):
        concept = concept_of(report.get("code"))
        if concept is None:
            continue
        results = tuple(
            t.local_ref
            for t in (
                reader.resolver.resolve_field(r, source=entry) for r in report.get("result") or []
            )
            if t
        )
        conclusion = report.get("conclusion")
        found.append(
            ReportFact(
                entry.local_ref,
                concept,
                str(report.get("status")),
                parse_when(report.get("effectiveDateTime") or report.get("issued"), tz),
                conclusion.strip() if isinstance(conclusion, str) and conclusion.strip() else None,
                results,
            )
        )
    return sorted(found, key=lambda r: (_ts(r.when), r.ref))


def _notes(reader: _Reader, scope: _Scope, tz: tzinfo) -> Iterable[NoteFact]:
    found = []
    for entry, doc in scope.in_stay("DocumentReference"):
        if doc.get("status") == "entered-in-error":
            continue
        concept = concept_of(doc.get("type"))
        title = doc.get("description") if isinstance(doc.get("description"), str) else None
        texts = [attachment_text(c.get("attachment")) for c in doc.get("content") or []]
        text = "\n".join(t for t in texts if t)
        if not text:
            reader.warn(
                entry.location, "unreadable-note", "note has no inline text attachment; left out"
            )
            continue
        found.append(
            NoteFact(
                entry.local_ref,
                (concept.label if concept else None) or title or "Note",
                parse_when(doc.get("date"), tz),
                text,
            )
        )
    for entry, comp in scope.in_stay("Composition"):
        if comp.get("status") == "entered-in-error":
            continue
        parts = []
        for section in comp.get("section") or []:
            div = (section.get("text") or {}).get("div")
            if isinstance(div, str):
                body = html_to_text(div)
                if body:
                    parts.append(f"{section.get('title') or 'Section'}: {body}")
        if parts:
            found.append(
                NoteFact(
                    entry.local_ref,
                    str(comp.get("title") or "Composition"),
                    parse_when(comp.get("date"), tz),
                    "\n".join(parts),
                )
            )
    return sorted(found, key=lambda n: (_ts(n.when), n.ref))


def _plans(scope: _Scope, tz: tzinfo) -> Iterable[PlanFact]:
    found = []
    for entry, req in scope.in_stay("ServiceRequest"):
        concept = concept_of(req.get("code"))
        if concept and req.get("status") in ("active", "draft", "on-hold"):
            found.append(
                PlanFact(
                    entry.local_ref,
                    concept,
                    "order",
                    str(req.get("status")),
                    parse_when(req.get("occurrenceDateTime") or req.get("authoredOn"), tz),
                )
            )
    for entry, plan in scope.in_stay("CarePlan"):
        concept = concept_of((plan.get("category") or [None])[0]) or (
            Concept(plan["title"]) if isinstance(plan.get("title"), str) else None
        )
        if concept and plan.get("status") in ("active", "draft", "on-hold"):
            found.append(
                PlanFact(
                    entry.local_ref,
                    concept,
                    "care-plan",
                    str(plan.get("status")),
                    parse_when((plan.get("period") or {}).get("start"), tz),
                )
            )
    for rtype in ("DiagnosticReport", "Observation"):
        for entry, res in scope.in_stay(rtype):
            concept = concept_of(res.get("code"))
            if concept and res.get("status") in PENDING:
                found.append(
                    PlanFact(
                        entry.local_ref,
                        concept,
                        "pending-result",
                        str(res.get("status")),
                        parse_when(res.get("effectiveDateTime") or res.get("issued"), tz),
                    )
                )
    return sorted(found, key=lambda p: (p.kind, _ts(p.when), p.ref))


def _died(
    encounter: Json, patient: Json, start: When | None, end: When | None, tz: tzinfo
) -> When | None:
    """When the patient died during the stay, or None; ``_UNKNOWN_TIME`` if the time is unknown."""
    disposition = concept_of((encounter.get("hospitalization") or {}).get("dischargeDisposition"))
    expired = disposition is not None and (
        disposition.has_code(*EXPIRED_DISPOSITIONS)
        or (  # text only, when nothing is coded
            not disposition.codings
            and any(word in disposition.label.lower() for word in ("expired", "died", "deceased"))
        )
    )
    deceased = parse_when(patient.get("deceasedDateTime"), tz)
    if deceased is not None and start is not None:
        if deceased.precision == "second":
            inside = start.at <= deceased.at and (end is None or deceased.at <= end.until)
        else:  # a date: it died in hospital if that day overlaps the stay and nothing says home
            inside = deceased.until > start.at and (end is None or deceased.at < end.until)
            if inside and disposition is not None and not expired and end is not None:
                inside = deceased.at.date() < end.at.date()
        if inside:
            return deceased
    if expired:
        return end or start or deceased or _UNKNOWN_TIME
    return None


_UNKNOWN_TIME = When(datetime(1, 1, 1, tzinfo=UTC), "year")  # died, time not recorded


def _ts(when: When | None) -> float:
    return when.at.timestamp() if when else 0.0
