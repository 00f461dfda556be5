"""What the simulated model says: cited JSON built from the prompt's own lines, or plain text.

The simulator never calls the summarizer. It reads the user message the way a model would
see it: lines that start with citation handles (``[O12] 2024-06-16 ...``), outside the
fenced notes, under their ``## `` section headings. Each answer sentence copies a bounded
piece of one such line and cites that line's handles, so the verifier finds every number,
drug and diagnosis of the sentence in the lines it cites. For a grammar that is not the
epicrisis answer schema, it returns the smallest instance of that schema it can build.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from epicrisis.llm.simulator.tokens import EOT, HEADER_END, HEADER_START
from epicrisis.prompt.handles import HANDLE_PATTERN
from epicrisis.prompt.linearize import NOTE_CLOSE, NOTE_OPEN
from epicrisis.prompt.schema import (
    MAX_COURSE_SENTENCES,
    MAX_OTHER_SENTENCES,
    SECTIONS,
    Answer,
)

SENTENCE_CHARS = 160  # well under the schema's 400: a full answer stays inside 2,048 tokens
PER_HEADING = 3  # course sentences taken from one section, so the course spans the stay

_LINE = re.compile(rf"^((?:\[{HANDLE_PATTERN}\])+)[ \t]*(\S.*)$")
_HANDLE = re.compile(rf"\[({HANDLE_PATTERN})\]")
_ANY_HANDLE = re.compile(rf"\b({HANDLE_PATTERN})\b")
_DIED = re.compile(r"\bdied in hospital\b", re.IGNORECASE)
_USER_HEADER = f"{HEADER_START}user{HEADER_END}"

# Section headings (as the linearizer prints them, by prefix) -> which part of the answer.
_COURSE = (
    "patient and stay",
    "diagnoses",
    "procedures",
    "laboratory",
    "diagnostic report",
    "vital signs",
    "active problem",
    "other observations",
    "inpatient medications",
)
_INSTRUCTIONS = ("discharge medications", "allergies")
_FOLLOW_UP = ("plans",)


@dataclass(frozen=True, slots=True)
class PromptLine:
    """A cited line of the prompt: its section heading, its handles and its text."""

    heading: str
    handles: tuple[str, ...]
    text: str


@dataclass(frozen=True, slots=True)
class ParsedPrompt:
    """What the simulated model takes from a prompt."""

    text: str  # the user message (or the whole input when it has no chat template)
    lines: tuple[PromptLine, ...]
    died_in_hospital: bool
    handles: frozenset[str]  # every handle-shaped word of the text, fenced notes included


def user_text(prompt: str) -> str:
    """The last user message of a Llama 3 templated prompt, else the prompt itself."""
    if _USER_HEADER not in prompt:
        return prompt
    text = prompt.rsplit(_USER_HEADER, 1)[1]
    return text.split(EOT, 1)[0].strip()


def parse_prompt(text: str) -> ParsedPrompt:
    """Cited lines outside the note fences, in prompt order, and whether the patient died."""
    lines: list[PromptLine] = []
    heading = ""
    in_note = False
    died = False
    for raw in text.splitlines():
        line = raw.strip()
        if in_note:
            in_note = not line.startswith(NOTE_CLOSE)
            continue
        if line.startswith(NOTE_OPEN):
            in_note = True
            continue
        if line.startswith("## "):
            heading = line[3:].strip()
            continue
        died = died or _DIED.search(line) is not None
        match = _LINE.match(line)
        if match is not None:
            handles = tuple(dict.fromkeys(_HANDLE.findall(match.group(1))))
            lines.append(PromptLine(heading, handles, match.group(2)))
    return ParsedPrompt(text, tuple(lines), died, frozenset(_ANY_HANDLE.findall(text)))


def bounded(text: str, limit: int = SENTENCE_CHARS) -> str:
    """``text`` with whitespace collapsed, cut at a word boundary to at most ``limit`` chars.

    Whole words only: a cut inside a number or a date would state a value the line lacks.
    """
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit + 1)
    return text[: cut if cut > 0 else limit].rstrip(" ,;:(")


def _bucket(heading: str, prefixes: Sequence[str]) -> bool:
    return heading.lower().startswith(tuple(prefixes))


def _sentence(line: PromptLine) -> dict[str, Any]:
    return {"text": bounded(line.text), "cites": list(line.handles[:12])}


def build_answer(prompt: ParsedPrompt) -> dict[str, Any]:
    """A schema-valid, verifiable answer: each sentence a piece of one cited line."""
    course: list[PromptLine] = []
    per_heading: dict[str, int] = {}
    for line in prompt.lines:
        if len(course) == MAX_COURSE_SENTENCES:
            break
        if _bucket(line.heading, _COURSE) and per_heading.get(line.heading, 0) < PER_HEADING:
            per_heading[line.heading] = per_heading.get(line.heading, 0) + 1
            course.append(line)
    if not course:  # not an epicrisis prompt: any cited lines will do
        course = list(prompt.lines[:MAX_COURSE_SENTENCES])
    instructions = [ln for ln in prompt.lines if _bucket(ln.heading, _INSTRUCTIONS[:1])]
    if not instructions:
        instructions = [ln for ln in prompt.lines if _bucket(ln.heading, _INSTRUCTIONS[1:])]
    follow_up = [ln for ln in prompt.lines if _bucket(ln.heading, _FOLLOW_UP)]
    answer: dict[str, Any] = {
        "hospital_course": [_sentence(ln) for ln in course]
        or [{"text": "No cited stay data was given.", "cites": ["E1"]}],
        "discharge_instructions": []
        if prompt.died_in_hospital
        else [_sentence(ln) for ln in instructions[:MAX_OTHER_SENTENCES]],
        "follow_up": [_sentence(ln) for ln in follow_up[:MAX_OTHER_SENTENCES]],
    }
    Answer.model_validate(answer)  # the simulator's own answers always match the schema
    return answer


def is_answer_schema(schema: Any) -> bool:
    """Whether a grammar asks for the epicrisis answer (rather than some other JSON)."""
    if not isinstance(schema, Mapping):
        return False
    properties = schema.get("properties")
    return isinstance(properties, Mapping) and all(s in properties for s in SECTIONS)


def plain_answer(prompt: ParsedPrompt) -> str:
    """The answer as prose, each sentence followed by its bracketed handles."""
    if not prompt.lines:
        return "This is a simulated answer: the prompt has no cited lines to summarize."
    answer = build_answer(prompt)
    sentences = [
        f"{s['text']} {''.join(f'[{c}]' for c in s['cites'])}"
        for section in SECTIONS
        for s in answer[section]
    ]
    return "\n".join(sentences)


def json_text(value: Any) -> str:
    """JSON as a grammar-constrained model writes it: one line, UTF-8 kept."""
    return json.dumps(value, ensure_ascii=False)


def schema_instance(schema: Any, root: Any = None, depth: int = 0) -> Any:
    """A small value that satisfies ``schema`` (objects, arrays, scalars, enums, refs)."""
    root = schema if root is None else root
    if not isinstance(schema, Mapping) or depth > 12:
        return {}
    if "$ref" in schema:
        return schema_instance(_resolve(root, str(schema["$ref"])), root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            return schema_instance(options[0], root, depth + 1)
    kind = schema.get("type", "object" if "properties" in schema else "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        properties = schema.get("properties", {})
        required = schema.get("required", list(properties))
        return {
            name: schema_instance(properties.get(name, {}), root, depth + 1)
            for name in required
            if isinstance(name, str)
        }
    if kind == "array":
        count = int(schema.get("minItems", 1))
        return [schema_instance(schema.get("items", {}), root, depth + 1) for _ in range(count)]
    if kind in ("integer", "number"):
        low = schema.get("minimum", schema.get("exclusiveMinimum", 0))
        value = low + (1 if "exclusiveMinimum" in schema else 0)
        return int(value) if kind == "integer" else float(value)
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return "x" * max(1, int(schema.get("minLength", 1)))


def _resolve(root: Any, ref: str) -> Any:
    node = root
    for part in ref.lstrip("#/").split("/"):
        if not part:
            continue
        node = node.get(part, {}) if isinstance(node, Mapping) else {}
    return node
