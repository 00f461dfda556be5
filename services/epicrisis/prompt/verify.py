"""Check a model answer against the prompt it answered: citations, numbers, drugs, diagnoses.

A sentence is grounded when every handle it cites was shown in the prompt and what it
states appears in the lines of those handles:

- numbers (integers, decimals, ``10,378``) by value, so ``2.10`` matches ``2.1``; dates and
  times must occur as written in a cited line; digits of handles (``C3``) are ignored;
- drugs: a word of the sentence that names a drug of the stay (from any medication's label
  or coding display) must occur in a cited line (its medication line, or a note or report
  that names it);
- diagnoses: a condition of the stay named in the sentence (a core phrase of its label,
  such as "septic shock", or its head noun, such as "pneumonia") must occur in a cited line.
- drugs and diagnoses the stay never mentions (what a compromised model, or one obeying an
  instruction hidden in a note, would add): a word shaped like a drug name (an INN stem
  such as -pril, -olol, -statin, -mycin, or a common drug without one: aspirin, insulin)
  or like a diagnosis (-itis, -osis, -emia, -oma, carcinoma, cancer, ...) must occur in a
  cited line too;
- instructions: a sentence that speaks of instructions, prompts or the model ("ignore
  previous instructions", "system prompt", "as an AI") is never prose of a summary.

Problems name the place (``hospital_course[2]``), the handle and the rule broken, never
the clinical text, so they may be logged and returned to callers (no PHI).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from pydantic import ValidationError

from epicrisis.prompt.handles import HANDLE_PATTERN, is_handle
from epicrisis.prompt.linearize import INSTRUCTION_TALK
from epicrisis.prompt.messages import PromptResult
from epicrisis.prompt.schema import SECTIONS, Answer
from epicrisis.stay.context import Concept, Stay

Rule = Literal[
    "json",
    "schema",
    "missing-cites",
    "unknown-handle",
    "handle-not-shown",
    "numbers",
    "drugs",
    "diagnoses",
    "instructions",
    "death",
]


@dataclass(frozen=True, slots=True)
class Problem:
    """One broken rule: where (``follow_up[1]``), which rule, which handle if any."""

    rule: Rule
    where: str
    handle: str | None = None

    @property
    def message(self) -> str:
        if self.rule == "unknown-handle" and self.handle is None:
            text = "cites something that is not a handle"  # never echo what it was
        else:
            text = _MESSAGES[self.rule].format(handle=self.handle)
        return (
            f"{self.where}: {text} (rule: {self.rule})"
            if self.where
            else f"{text} (rule: {self.rule})"
        )


_MESSAGES: dict[str, str] = {
    "json": "the answer is not a JSON object",
    "schema": "does not match the answer schema",
    "missing-cites": "the sentence cites no handle",
    "unknown-handle": "cites {handle}, which is not a handle of this prompt",
    "handle-not-shown": "cites {handle}, whose lines were cut from the prompt",
    "numbers": "states a number or date that is not in the cited lines",
    "drugs": "names a drug that is not in the cited lines",
    "diagnoses": "names a diagnosis that is not in the cited lines",
    "instructions": "speaks of instructions or prompts, not of the patient",
    "death": "discharge_instructions must be empty in a death summary",
}


@dataclass(frozen=True, slots=True)
class CitedSentence:
    """A sentence of the answer with its cites mapped to the Stay's references."""

    section: str
    index: int
    text: str
    cites: tuple[str, ...]
    refs: tuple[str, ...]  # references of the cites that the prompt showed
    supported: bool


@dataclass(frozen=True, slots=True)
class Verification:
    """The verdict on one answer."""

    ok: bool
    problems: list[str]
    issues: list[Problem]
    grounding: float  # share of sentences fully supported
    sentences: list[CitedSentence]
    answer: Answer | None  # the parsed answer when it matches the schema

    def section(self, name: str) -> list[CitedSentence]:
        return [s for s in self.sentences if s.section == name]

    @property
    def hospital_course(self) -> list[CitedSentence]:
        return self.section("hospital_course")

    @property
    def discharge_instructions(self) -> list[CitedSentence]:
        return self.section("discharge_instructions")

    @property
    def follow_up(self) -> list[CitedSentence]:
        return self.section("follow_up")


def verify_answer(
    answer_json: str | bytes | Mapping[str, Any], prompt: PromptResult, stay: Stay
) -> Verification:
    """Verify ``answer_json`` (the model's raw JSON text, or it parsed) against ``prompt``."""
    data: Any
    if isinstance(answer_json, str | bytes):
        try:
            data = json.loads(answer_json)
        except (ValueError, RecursionError):
            return _failed(Problem("json", ""))
    else:
        data = answer_json
    if not isinstance(data, Mapping):
        return _failed(Problem("json", ""))

    issues: list[Problem] = []
    answer: Answer | None = None
    try:
        answer = Answer.model_validate(dict(data))
    except ValidationError as exc:
        issues.extend(_schema_problems(exc))

    vocabulary = _vocabulary(stay)
    sentences: list[CitedSentence] = []
    for section, index, text, cites in _lenient_sentences(data):
        where = f"{section}[{index}]"
        found = _sentence_problems(where, text, cites, prompt, vocabulary)
        for problem in found:
            if problem not in issues:
                issues.append(problem)
        refs = tuple(r for r in (prompt.handles.ref(c) for c in cites) if r is not None)
        sentences.append(CitedSentence(section, index, text, cites, refs, not found))

    if (stay.died_in_hospital or prompt.died_in_hospital) and _has_items(
        data.get("discharge_instructions")
    ):
        issues.append(Problem("death", "discharge_instructions"))

    supported = sum(1 for s in sentences if s.supported)
    grounding = supported / len(sentences) if sentences else 0.0
    return Verification(
        ok=not issues,
        problems=[p.message for p in issues],
        issues=issues,
        grounding=grounding,
        sentences=sentences,
        answer=answer,
    )


def _failed(problem: Problem) -> Verification:
    return Verification(False, [problem.message], [problem], 0.0, [], None)


def _has_items(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0


def _schema_problems(exc: ValidationError) -> list[Problem]:
    """Schema errors as problems; a sentence without cites gets its own rule."""
    found: list[Problem] = []
    for error in exc.errors(include_url=False, include_input=False):
        loc = error.get("loc", ())
        if loc and loc[-1] == "cites" and error.get("type") == "too_short":
            problem = Problem("missing-cites", _where(loc[:-1]))
        elif (
            len(loc) >= 2 and loc[-2] == "cites" and error.get("type") == "string_pattern_mismatch"
        ):
            continue  # reported per sentence as an unknown handle
        else:
            problem = Problem("schema", _where(loc))
        if problem not in found:
            found.append(problem)
    return found


def _where(loc: Iterable[int | str]) -> str:
    """``hospital_course[2].text`` from a pydantic location, naming only schema fields."""
    known = {*SECTIONS, "text", "cites"}
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in known:
            out += f".{part}" if out else part
        else:
            out += ".<unexpected field>" if out else "<unexpected field>"
    return out


def _lenient_sentences(data: Mapping[str, Any]) -> Iterable[tuple[str, int, str, tuple[str, ...]]]:
    """Every sentence-shaped item of the answer, even when the whole does not validate."""
    for section in SECTIONS:
        items = data.get(section)
        if not isinstance(items, list):
            continue
        for index, item in enumerate(items):
            if not isinstance(item, Mapping) or not isinstance(item.get("text"), str):
                continue
            raw = item.get("cites")
            cites = tuple(c for c in raw if isinstance(c, str)) if isinstance(raw, list) else ()
            yield section, index, item["text"], cites


# -- the grounding rules -------------------------------------------------------------------

# Drug names by their WHO INN / USAN stems, and common drugs that have none. A word of this
# shape in a sentence must occur in the lines it cites, whether or not the stay knows it:
# this is what catches a drug the model invented, which the stay's own vocabulary cannot.
_DRUG_SHAPE = re.compile(
    r"[a-z]{2,}(?:pril|prilat|sartan|olol|alol|ilol|statin|dipine|prazole|tidine|semide|"
    r"thiazide|parin|farin|xaban|gatran|grel|grelor|cillin|mycin|micin|cycline|floxacin|"
    r"penem|bactam|azole|conazole|vir|navir|mab|umab|ximab|zumab|tinib|platin|taxel|"
    r"rubicin|formin|gliptin|gliflozin|glutide|glinide|triptan|oxetine|xetine|azepam|"
    r"zolam|barbital|profen|fenac|lukast|terol|tropium|sonide|asone|olone|isone|morphone|"
    r"codone|fentanil|tyline|pramine|peridol|apine|idone|etine|arone|dronate|setron|"
    r"pramide|osin|asteride|purinol|teplase|kacin|mectin|trexate|phylline|oxacin|ximin|"
    r"pentin|gabalin|tiazem|pamil|alazine|onidine|lutamide|rozole|quine|dopa|sporine|"
    r"limus|cort|caine|fibrate|tadine)"
)
_NOT_DRUGS = frozenset({"cholesterol", "escort"})
_COMMON_DRUGS = frozenset(
    {
        "aspirin",
        "insulin",
        "heparin",
        "warfarin",
        "morphine",
        "codeine",
        "digoxin",
        "lithium",
        "nitroglycerin",
        "epinephrine",
        "norepinephrine",
        "adrenaline",
        "dopamine",
        "dobutamine",
        "vasopressin",
        "paracetamol",
        "acetaminophen",
        "naloxone",
        "fentanyl",
        "tramadol",
        "propofol",
        "ketamine",
        "clopidogrel",
        "methadone",
        "levothyroxine",
        "spironolactone",
        "colchicine",
        "nitrofurantoin",
        "trimethoprim",
        "sulfamethoxazole",
        "tacrolimus",
        "cyclosporine",
        "penicillin",
        "amoxicillin",
        "vancomycin",
        "ceftriaxone",
        "cefazolin",
        "cefepime",
        "cephalexin",
        "lactulose",
        "sucralfate",
        "zolpidem",
        "oxytocin",
        "glucagon",
        "atropine",
        "adenosine",
        "amiodarone",
        "chemotherapy",
        "opioid",
        "opioids",
        "steroid",
        "steroids",
    }
)
# Diagnoses by the shape of their names (inflammation, condition, blood, tumour ...) and the
# common ones without such a shape; ordinary words of the same shape are left out.
_DIAGNOSIS_SHAPE = re.compile(
    r"[a-z]{3,}(?:itis|osis|emia|aemia|oma|omas|pathy|algia|plegia|paresis|penia|cytosis|"
    r"rrhage|rrhea|rrhoea|uria|iasis|trophy|sclerosis|plasia|ectasis|megaly|spasm|"
    r"thrombus|embolism|infarction|insufficiency|stenosis|fibrillation|arrhythmia)"
)
_NOT_DIAGNOSES = frozenset(
    {
        "diagnosis",
        "prognosis",
        "diploma",
        "aroma",
        "academia",
        "nostalgia",
        "empathy",
        "sympathy",
        "telepathy",
        "trophy",
        "hypostasis",
        "emphasis",
        "oasis",
        "basis",
        "thesis",
        "synthesis",
    }
)
_COMMON_DIAGNOSES = frozenset(
    {
        "cancer",
        "carcinoma",
        "malignancy",
        "metastatic",
        "metastases",
        "metastasis",
        "tumor",
        "tumour",
        "leukemia",
        "lymphoma",
        "sepsis",
        "pneumonia",
        "stroke",
        "diabetes",
        "hypertension",
        "hypotension",
        "dementia",
        "asthma",
        "influenza",
        "tuberculosis",
        "hiv",
        "aids",
        "covid",
        "fracture",
        "schizophrenia",
        "depression",
        "epilepsy",
        "seizure",
        "seizures",
        "psychosis",
        "overdose",
        "dvt",
        "copd",
    }
)


def _drug_like(word: str) -> bool:
    if word in _COMMON_DRUGS:
        return True
    return len(word) >= 6 and word not in _NOT_DRUGS and _DRUG_SHAPE.fullmatch(word) is not None


def _diagnosis_like(word: str) -> bool:
    if word in _COMMON_DIAGNOSES:
        return True
    return (
        len(word) >= 6
        and word not in _NOT_DIAGNOSES
        and _DIAGNOSIS_SHAPE.fullmatch(word) is not None
    )


_HANDLE_TOKEN = re.compile(rf"\[?\b{HANDLE_PATTERN}\b\]?")
_FENCE_HANDLE = re.compile(rf"END NOTE {HANDLE_PATTERN}")
_DATE = re.compile(r"\b\d{4}-\d{2}-\d{2}(?:[ T]\d{2}:\d{2})?\b")
_TIME = re.compile(r"(?<![\d:])\d{1,2}:\d{2}(?![\d:])")
_SENTENCE_NUMBER = re.compile(r"(?<![A-Za-z0-9_.,])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_SOURCE_NUMBER = re.compile(r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_WORD = re.compile(r"[a-z]+")

# Words in drug labels that name a form, a unit or a salt, not the drug itself.
_DRUG_STOPWORDS = frozenset(
    {
        "tablet",
        "tablets",
        "capsule",
        "capsules",
        "oral",
        "injection",
        "injectable",
        "solution",
        "suspension",
        "extended",
        "release",
        "delayed",
        "prefilled",
        "syringe",
        "topical",
        "cream",
        "ointment",
        "patch",
        "spray",
        "inhaler",
        "inhalation",
        "nasal",
        "metered",
        "dose",
        "doses",
        "actuat",
        "actuation",
        "chewable",
        "film",
        "coated",
        "hour",
        "hours",
        "daily",
        "sodium",
        "potassium",
        "chloride",
        "calcium",
        "magnesium",
        "hydrochloride",
        "acetate",
        "succinate",
        "tartrate",
        "sulfate",
        "phosphate",
        "citrate",
        "bromide",
        "besylate",
        "maleate",
        "mesylate",
        "fumarate",
        "disodium",
        "monohydrate",
        "anhydrous",
        "product",
        "unit",
        "units",
        "vial",
        "bolus",
        "infusion",
        "drip",
        "within",
        "with",
        "fluid",
        "fluids",
        "water",
        "intravenous",
        "subcutaneous",
        "pack",
        "kit",
        "powder",
        "liquid",
        "drops",
        "ophthalmic",
        "otic",
        "rectal",
        "vaginal",
        "transdermal",
        "system",
        "pen",
        "auto",
        "injector",
        "mcg",
        "unspecified",
        "other",
        "each",
        "plus",
        "abuse",
        "deterrent",
        "drug",
        "human",
        "implant",
        "mucosal",
        "normal",
        "regular",
        "acid",
        "bitartrate",
        "hydrobromide",
    }
)
# Parts of condition labels that qualify rather than name a diagnosis.
_CONDITION_QUALIFIERS = (
    "unspecified",
    "without",
    "with ",
    "other",
    "not elsewhere",
    "site not",
    "initial encounter",
    "subsequent encounter",
    "sequela",
    "tnm ",
)
_CONDITION_GENERIC = frozenset(
    {
        "finding",
        "disorder",
        "situation",
        "procedure",
        "diagnosis",
        "morphologic abnormality",
        "clinical",
        "history",
        "event",
        "observable entity",
        "essential",
        "localized",
        "primary",
        "secondary",
        "generalized",
        "bilateral",
        "left",
        "right",
        "acute",
        "chronic",
        "severe",
        "mild",
        "moderate",
        "recurrent",
    }
)


# Head nouns too vague to name a diagnosis alone, and Latin words that follow the noun.
_GENERIC_HEADS = frozenset(
    {
        "disease",
        "diseases",
        "failure",
        "disorder",
        "disorders",
        "infection",
        "injury",
        "syndrome",
        "finding",
        "condition",
        "problem",
        "complication",
        "complications",
        "symptom",
        "symptoms",
        "abnormality",
        "lesion",
        "state",
        "status",
        "event",
        "episode",
        "exacerbation",
        "organism",
        "encounter",
        "index",
        "daily",
        "specified",
        "history",
    }
)
_POSTPOSITIVE = frozenset({"mellitus", "pectoris", "insipidus", "vulgaris", "nos"})
_HEAD_SPLIT = re.compile(r" (?:with|without|due to|of|in|and|on|from|caused by) ")


@dataclass(frozen=True, slots=True)
class _Vocabulary:
    drugs: frozenset[str]  # single words
    conditions: tuple[tuple[str, re.Pattern[str]], ...]  # phrases and their matchers
    condition_words: frozenset[str]  # head nouns: "pneumonia" of "lobar pneumonia"


def _vocabulary(stay: Stay) -> _Vocabulary:
    drugs: set[str] = set()
    for concept in [f.drug for f in stay.medications] + [
        c.drug for c in stay.discharge_medications
    ]:
        for name in _names(concept):
            drugs.update(
                w for w in _WORD.findall(name.lower()) if len(w) >= 4 and w not in _DRUG_STOPWORDS
            )
    phrases: set[str] = set()
    conditions = (
        [d.condition for d in stay.diagnoses] + list(stay.stay_conditions) + list(stay.problems)
    )
    for condition in conditions:
        for name in _names(condition.concept):
            for part in re.split(r"[,;/()\[\]]| - ", name):
                phrase = " ".join(part.split()).lower()
                letters = sum(ch.isalpha() for ch in phrase)
                if (
                    (letters < 4 and not (letters >= 3 and part.strip().isupper()))
                    or phrase in _CONDITION_GENERIC
                    or phrase.startswith(_CONDITION_QUALIFIERS)
                ):
                    continue
                phrases.add(phrase)
    heads: set[str] = set()
    for phrase in phrases:
        words = _WORD.findall(_HEAD_SPLIT.split(phrase)[0])
        while words and words[-1] in _POSTPOSITIVE:
            words.pop()
        if words and len(words[-1]) >= 5 and words[-1] not in _GENERIC_HEADS:
            heads.add(words[-1])
    matchers = tuple(
        (p, re.compile(rf"(?<![a-z0-9]){re.escape(p)}(?![a-z0-9])")) for p in sorted(phrases)
    )
    return _Vocabulary(frozenset(drugs), matchers, frozenset(heads))


def _names(concept: Concept) -> list[str]:
    names = [concept.label]
    names += [c.display for c in concept.codings if c.display]
    return names


def _sentence_problems(
    where: str, text: str, cites: tuple[str, ...], prompt: PromptResult, vocabulary: _Vocabulary
) -> list[Problem]:
    found: list[Problem] = []
    if not cites:
        found.append(Problem("missing-cites", where))
    sources: list[str] = []
    for cite in dict.fromkeys(cites):
        if cite in prompt.handles:
            sources.append(prompt.sources.get(cite, ""))
        elif is_handle(cite) and cite in prompt.omitted_handles:
            found.append(Problem("handle-not-shown", where, cite))
        else:
            found.append(Problem("unknown-handle", where, cite if is_handle(cite) else None))
    if not sources:
        return found  # nothing shown to check the content against
    source = _FENCE_HANDLE.sub(" ", _HANDLE_TOKEN.sub(" ", "\n".join(sources)))
    source_lower = source.lower()
    if not _numbers_supported(text, source):
        found.append(Problem("numbers", where))
    words = set(_WORD.findall(text.lower()))
    source_words = set(_WORD.findall(source_lower))
    unsupported = words - source_words
    if any(w in vocabulary.drugs or _drug_like(w) for w in unsupported):
        found.append(Problem("drugs", where))
    sentence_lower = " ".join(text.lower().split())
    flat_source = " ".join(source_lower.split())
    if any(w in vocabulary.condition_words or _diagnosis_like(w) for w in unsupported) or any(
        matcher.search(sentence_lower) and phrase not in flat_source
        for phrase, matcher in vocabulary.conditions
    ):
        found.append(Problem("diagnoses", where))
    if INSTRUCTION_TALK.search(text):
        found.append(Problem("instructions", where))
    return found


def _numbers_supported(text: str, source: str) -> bool:
    """Every number, date and time of the sentence occurs in the cited lines."""
    text = _HANDLE_TOKEN.sub(" ", text)
    for pattern in (_DATE, _TIME):
        for match in pattern.finditer(text):
            if match.group() not in source:
                return False
        text = pattern.sub(" ", text)
    available = {_value(m.group()) for m in _SOURCE_NUMBER.finditer(source)}
    return all(_value(m.group()) in available for m in _SENTENCE_NUMBER.finditer(text))


def _value(number: str) -> Decimal | str:
    try:
        return Decimal(number.replace(",", "")).normalize()
    except InvalidOperation:  # pragma: no cover - the patterns only match numbers
        return number
