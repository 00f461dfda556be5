import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Backend(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BACKEND_UNSPECIFIED: _ClassVar[Backend]
    BACKEND_EXTRACTIVE: _ClassVar[Backend]
    BACKEND_LLM: _ClassVar[Backend]

class Priority(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRIORITY_UNSPECIFIED: _ClassVar[Priority]
    PRIORITY_INTERACTIVE: _ClassVar[Priority]
    PRIORITY_BATCH: _ClassVar[Priority]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]

class SummaryKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SUMMARY_KIND_UNSPECIFIED: _ClassVar[SummaryKind]
    SUMMARY_KIND_DISCHARGE: _ClassVar[SummaryKind]
    SUMMARY_KIND_DEATH: _ClassVar[SummaryKind]
BACKEND_UNSPECIFIED: Backend
BACKEND_EXTRACTIVE: Backend
BACKEND_LLM: Backend
PRIORITY_UNSPECIFIED: Priority
PRIORITY_INTERACTIVE: Priority
PRIORITY_BATCH: Priority
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState
SUMMARY_KIND_UNSPECIFIED: SummaryKind
SUMMARY_KIND_DISCHARGE: SummaryKind
SUMMARY_KIND_DEATH: SummaryKind

class SubmitRequest(_message.Message):
    __slots__ = ("bundle", "encounter_id", "idempotency_key", "options")
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    ENCOUNTER_ID_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    bundle: bytes
    encounter_id: str
    idempotency_key: str
    options: SummaryOptions
    def __init__(self, bundle: _Optional[bytes] = ..., encounter_id: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., options: _Optional[_Union[SummaryOptions, _Mapping]] = ...) -> None: ...

class SummaryOptions(_message.Message):
    __slots__ = ("backend", "max_output_tokens", "priority", "strict", "allow_emergency")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    STRICT_FIELD_NUMBER: _ClassVar[int]
    ALLOW_EMERGENCY_FIELD_NUMBER: _ClassVar[int]
    backend: Backend
    max_output_tokens: int
    priority: Priority
    strict: bool
    allow_emergency: bool
    def __init__(self, backend: _Optional[_Union[Backend, str]] = ..., max_output_tokens: _Optional[int] = ..., priority: _Optional[_Union[Priority, str]] = ..., strict: _Optional[bool] = ..., allow_emergency: _Optional[bool] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "state", "created_at", "started_at", "finished_at", "progress", "summary", "fhir_document", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    FHIR_DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: str
    state: JobState
    created_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    progress: Progress
    summary: DischargeSummary
    fhir_document: str
    error: JobError
    def __init__(self, id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., summary: _Optional[_Union[DischargeSummary, _Mapping]] = ..., fhir_document: _Optional[str] = ..., error: _Optional[_Union[JobError, _Mapping]] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("stage", "fraction")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    stage: str
    fraction: float
    def __init__(self, stage: _Optional[str] = ..., fraction: _Optional[float] = ...) -> None: ...

class JobError(_message.Message):
    __slots__ = ("code", "message", "retryable")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRYABLE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    retryable: bool
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., retryable: _Optional[bool] = ...) -> None: ...

class DischargeSummary(_message.Message):
    __slots__ = ("kind", "patient", "encounter", "sections", "provenance", "warnings")
    KIND_FIELD_NUMBER: _ClassVar[int]
    PATIENT_FIELD_NUMBER: _ClassVar[int]
    ENCOUNTER_FIELD_NUMBER: _ClassVar[int]
    SECTIONS_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    kind: SummaryKind
    patient: PatientInfo
    encounter: EncounterInfo
    sections: _containers.RepeatedCompositeFieldContainer[Section]
    provenance: Provenance
    warnings: _containers.RepeatedCompositeFieldContainer[DataWarning]
    def __init__(self, kind: _Optional[_Union[SummaryKind, str]] = ..., patient: _Optional[_Union[PatientInfo, _Mapping]] = ..., encounter: _Optional[_Union[EncounterInfo, _Mapping]] = ..., sections: _Optional[_Iterable[_Union[Section, _Mapping]]] = ..., provenance: _Optional[_Union[Provenance, _Mapping]] = ..., warnings: _Optional[_Iterable[_Union[DataWarning, _Mapping]]] = ...) -> None: ...

class PatientInfo(_message.Message):
    __slots__ = ("reference", "sex", "age_at_discharge", "died")
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    SEX_FIELD_NUMBER: _ClassVar[int]
    AGE_AT_DISCHARGE_FIELD_NUMBER: _ClassVar[int]
    DIED_FIELD_NUMBER: _ClassVar[int]
    reference: str
    sex: str
    age_at_discharge: int
    died: str
    def __init__(self, reference: _Optional[str] = ..., sex: _Optional[str] = ..., age_at_discharge: _Optional[int] = ..., died: _Optional[str] = ...) -> None: ...

class EncounterInfo(_message.Message):
    __slots__ = ("reference", "class_code", "start", "end", "timezone", "length_of_stay_days", "types", "admit_source", "disposition")
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    CLASS_CODE_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    TIMEZONE_FIELD_NUMBER: _ClassVar[int]
    LENGTH_OF_STAY_DAYS_FIELD_NUMBER: _ClassVar[int]
    TYPES_FIELD_NUMBER: _ClassVar[int]
    ADMIT_SOURCE_FIELD_NUMBER: _ClassVar[int]
    DISPOSITION_FIELD_NUMBER: _ClassVar[int]
    reference: str
    class_code: str
    start: str
    end: str
    timezone: str
    length_of_stay_days: float
    types: _containers.RepeatedScalarFieldContainer[str]
    admit_source: str
    disposition: str
    def __init__(self, reference: _Optional[str] = ..., class_code: _Optional[str] = ..., start: _Optional[str] = ..., end: _Optional[str] = ..., timezone: _Optional[str] = ..., length_of_stay_days: _Optional[float] = ..., types: _Optional[_Iterable[str]] = ..., admit_source: _Optional[str] = ..., disposition: _Optional[str] = ...) -> None: ...

class Section(_message.Message):
    __slots__ = ("key", "title", "loinc", "items", "narrative", "empty_reason")
    KEY_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    LOINC_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    NARRATIVE_FIELD_NUMBER: _ClassVar[int]
    EMPTY_REASON_FIELD_NUMBER: _ClassVar[int]
    key: str
    title: str
    loinc: str
    items: _containers.RepeatedCompositeFieldContainer[Item]
    narrative: _containers.RepeatedCompositeFieldContainer[Sentence]
    empty_reason: str
    def __init__(self, key: _Optional[str] = ..., title: _Optional[str] = ..., loinc: _Optional[str] = ..., items: _Optional[_Iterable[_Union[Item, _Mapping]]] = ..., narrative: _Optional[_Iterable[_Union[Sentence, _Mapping]]] = ..., empty_reason: _Optional[str] = ...) -> None: ...

class Item(_message.Message):
    __slots__ = ("text", "codes", "status", "date", "sources")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CODES_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DATE_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    text: str
    codes: _containers.RepeatedCompositeFieldContainer[Code]
    status: str
    date: str
    sources: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, text: _Optional[str] = ..., codes: _Optional[_Iterable[_Union[Code, _Mapping]]] = ..., status: _Optional[str] = ..., date: _Optional[str] = ..., sources: _Optional[_Iterable[str]] = ...) -> None: ...

class Code(_message.Message):
    __slots__ = ("system", "code", "display")
    SYSTEM_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_FIELD_NUMBER: _ClassVar[int]
    system: str
    code: str
    display: str
    def __init__(self, system: _Optional[str] = ..., code: _Optional[str] = ..., display: _Optional[str] = ...) -> None: ...

class Sentence(_message.Message):
    __slots__ = ("text", "sources")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    text: str
    sources: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, text: _Optional[str] = ..., sources: _Optional[_Iterable[str]] = ...) -> None: ...

class Provenance(_message.Message):
    __slots__ = ("generator", "backend", "model", "fallback", "fallback_reason", "prompt_tokens", "generated_tokens", "omitted", "grounding", "timings_ms", "prompt_budget_used")
    class TimingsMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    GENERATOR_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OMITTED_FIELD_NUMBER: _ClassVar[int]
    GROUNDING_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_MS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_BUDGET_USED_FIELD_NUMBER: _ClassVar[int]
    generator: str
    backend: str
    model: str
    fallback: bool
    fallback_reason: str
    prompt_tokens: int
    generated_tokens: int
    omitted: _containers.RepeatedCompositeFieldContainer[Omission]
    grounding: float
    timings_ms: _containers.ScalarMap[str, float]
    prompt_budget_used: float
    def __init__(self, generator: _Optional[str] = ..., backend: _Optional[str] = ..., model: _Optional[str] = ..., fallback: _Optional[bool] = ..., fallback_reason: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., omitted: _Optional[_Iterable[_Union[Omission, _Mapping]]] = ..., grounding: _Optional[float] = ..., timings_ms: _Optional[_Mapping[str, float]] = ..., prompt_budget_used: _Optional[float] = ...) -> None: ...

class Omission(_message.Message):
    __slots__ = ("section", "count", "tokens")
    SECTION_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    section: str
    count: int
    tokens: int
    def __init__(self, section: _Optional[str] = ..., count: _Optional[int] = ..., tokens: _Optional[int] = ...) -> None: ...

class DataWarning(_message.Message):
    __slots__ = ("code", "message", "entry_index", "resource_type", "resource_id", "path")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ENTRY_INDEX_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_TYPE_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    entry_index: int
    resource_type: str
    resource_id: str
    path: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., entry_index: _Optional[int] = ..., resource_type: _Optional[str] = ..., resource_id: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...
