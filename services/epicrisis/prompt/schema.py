"""The shape of the model's answer: cited prose only, never structured facts.

Structured sections (diagnoses, medications, results) come straight from FHIR; the model
writes only the hospital course, the discharge instructions and the follow-up, one cited
sentence at a time so the verifier can check each sentence against the lines it cites.
:data:`ANSWER_SCHEMA` is sent as the grammar (TGI ``{"type": "json_object", "value": …}``,
OpenAI ``json_schema``) and printed in the system prompt, so it must never change between
requests: it is built once and :func:`answer_schema_json` renders it canonically.
"""

from __future__ import annotations

import copy
import json
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from epicrisis.prompt.handles import HANDLE_PATTERN

# Bounds that keep a complete answer inside the output reserve (2,048 tokens): about 28
# sentences of 40 to 60 tokens each, JSON included.
MAX_SENTENCE_CHARS = 400
MAX_COURSE_SENTENCES = 12
MAX_OTHER_SENTENCES = 8

Handle = Annotated[str, StringConstraints(pattern=f"^{HANDLE_PATTERN}$")]


class Sentence(BaseModel):
    """One sentence of prose and the handles of the prompt lines that support it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    text: str = Field(min_length=1, max_length=MAX_SENTENCE_CHARS)
    cites: list[Handle] = Field(min_length=1, max_length=12)


class Answer(BaseModel):
    """What the model returns for one stay."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hospital_course: list[Sentence] = Field(min_length=1, max_length=MAX_COURSE_SENTENCES)
    discharge_instructions: list[Sentence] = Field(max_length=MAX_OTHER_SENTENCES)
    follow_up: list[Sentence] = Field(max_length=MAX_OTHER_SENTENCES)


SECTIONS: tuple[str, ...] = ("hospital_course", "discharge_instructions", "follow_up")

ANSWER_SCHEMA: dict[str, Any] = Answer.model_json_schema()
_SCHEMA_JSON = json.dumps(ANSWER_SCHEMA, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def answer_schema() -> dict[str, Any]:
    """A private copy of :data:`ANSWER_SCHEMA` (for callers that may mutate it)."""
    return copy.deepcopy(ANSWER_SCHEMA)


def answer_schema_json() -> str:
    """The schema as compact, key-sorted JSON: byte-identical in every process."""
    return _SCHEMA_JSON
