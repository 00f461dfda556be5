"""Pack a stay's lines into a token budget: safety set first, then by priority.

Every line is counted once (batched); packing is then plain arithmetic over those counts,
so a dense stay with a thousand candidate lines packs in milliseconds. Selection follows
priority, then rank, then reading order, which makes it deterministic; the output keeps
reading order. Whatever is cut is said in the prompt, one omission line per section and
kind ("42 normal vital-sign readings omitted (1,240 tokens)"), and returned as data.

Per-line counts are an approximation of the assembled text's count (Llama 3 merges some
punctuation with the following newline), so the caller checks the exact count of the
assembled messages and packs again into a smaller budget when it is over.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from epicrisis.errors import ConfigurationError
from epicrisis.prompt.linearize import GROUPS, SECTION_TITLES, SECTIONS, Line
from epicrisis.prompt.tokenizers import Tokenizer, count_many

MODEL_CONTEXT_TOKENS = 8192
"""Med42-v2's context window (Llama 3)."""
OUTPUT_RESERVE_TOKENS = 2048
"""Room kept for the answer: a full answer at the schema's bounds (28 sentences with their
citations, as JSON) fits inside it, and the prompt keeps 6,144 tokens, which holds every
corpus stay's safety set with room to spare (bench/README.md)."""
DEFAULT_MAX_INPUT_TOKENS = MODEL_CONTEXT_TOKENS - OUTPUT_RESERVE_TOKENS


@dataclass(frozen=True, slots=True)
class Omission:
    """What the budget cut: ``count`` lines of one kind in one section, worth ``tokens``."""

    section: str  # a key of linearize.SECTIONS ("vitals")
    group: str  # a key of linearize.GROUPS ("vital_normal")
    count: int
    tokens: int

    @property
    def what(self) -> str:
        """``normal vital-sign readings`` (singular when one was cut)."""
        singular, plural = GROUPS.get(self.group, (self.group, self.group))
        return singular if self.count == 1 else plural

    @property
    def text(self) -> str:
        """The line the prompt shows in place of what was cut."""
        return f"({self.count:,} {self.what} omitted for length, {self.tokens:,} tokens)"


@dataclass(frozen=True, slots=True)
class Packed:
    """The lines kept (indices into the candidates, reading order) and what was cut."""

    kept: tuple[int, ...]
    omitted: tuple[Omission, ...]
    body: str
    estimated_tokens: int


def line_costs(lines: Sequence[Line], tokenizer: Tokenizer) -> list[int]:
    """Tokens of each line plus its newline, counted once per build."""
    return [n + 1 for n in count_many(tokenizer, [line.text for line in lines])]


def safety_tokens(lines: Sequence[Line], costs: Sequence[int]) -> int:
    return sum(c for line, c in zip(lines, costs, strict=True) if line.safety)


def pack(
    lines: Sequence[Line], costs: Sequence[int], available: int, tokenizer: Tokenizer
) -> Packed:
    """Choose lines for ``available`` tokens of body (headings and omission lines included).

    Raises :class:`ConfigurationError` when the safety set, its headings and the omission
    lines for everything else do not fit: such a prompt would silently drop safety facts.
    """
    present = {line.section for line in lines}
    sections = [key for key, _ in SECTIONS if key in present]

    # Omission groups, with the worst-case cost of their line (everything cut).
    group_lines: dict[tuple[str, str], list[int]] = {}
    for index, line in enumerate(lines):
        if not line.safety:
            group_lines.setdefault((line.section, line.group), []).append(index)
    worst = [
        Omission(section, group, len(members), sum(costs[i] for i in members))
        for (section, group), members in group_lines.items()
    ]
    # Headings and omission lines in one call: each call to the tokenizer has a fixed cost.
    counts = count_many(tokenizer, [*(_heading(key) for key in sections), *(o.text for o in worst)])
    heading_costs, worst_counts = counts[: len(sections)], counts[len(sections) :]
    fixed = sum(c + 2 for c in heading_costs)  # heading line, and the blank line before it
    worst_costs = [c + 1 for c in worst_counts]
    omission_cost = dict(zip(group_lines, worst_costs, strict=True))

    used = fixed + safety_tokens(lines, costs) + sum(worst_costs)
    if used > available:
        short = used - available
        raise ConfigurationError(
            f"the safety set of this stay needs {used:,} prompt tokens but the budget leaves "
            f"{max(available, 0):,} for the stay: {short:,} tokens short; raise the input "
            "token budget"
        )

    remaining = {key: len(members) for key, members in group_lines.items()}
    keep = [line.safety for line in lines]
    order = sorted(
        (i for i, line in enumerate(lines) if not line.safety),
        key=lambda i: (lines[i].priority, lines[i].rank, i),
    )
    for index in order:
        line = lines[index]
        key = (line.section, line.group)
        freed = omission_cost[key] if remaining[key] == 1 else 0
        if used + costs[index] - freed <= available:
            keep[index] = True
            used += costs[index] - freed
            remaining[key] -= 1

    omitted: list[Omission] = []
    for (section, group), members in group_lines.items():
        cut = [i for i in members if not keep[i]]
        if cut:
            omitted.append(Omission(section, group, len(cut), sum(costs[i] for i in cut)))
    kept = tuple(i for i, k in enumerate(keep) if k)
    return Packed(kept, tuple(omitted), render(lines, kept, omitted, sections), used)


def render(
    lines: Sequence[Line],
    kept: Sequence[int],
    omitted: Sequence[Omission],
    sections: Sequence[str],
) -> str:
    """The body: each section's heading, its kept lines in order, then its omission lines."""
    by_section: dict[str, list[str]] = {key: [] for key in sections}
    for index in kept:
        by_section[lines[index].section].append(lines[index].text)
    for omission in omitted:
        by_section[omission.section].append(omission.text)
    blocks = ["\n".join([_heading(key), *texts]) for key, texts in by_section.items()]
    return "\n\n".join(blocks)


def _heading(section: str) -> str:
    return f"## {SECTION_TITLES[section]}"
