"""Epicrisis: discharge summaries from FHIR R4 Bundles, every fact cited to its source.

Public API: :func:`summarize` (Bundle bytes to a :class:`DischargeSummary`), :func:`render`
(json, text or a FHIR document), and :func:`build_prompt` (the Med42-v2 chat messages).
"""

__version__ = "0.1.0"

from epicrisis.errors import EpicrisisError, InputError
from epicrisis.pipeline import build_prompt, render, summarize
from epicrisis.summary.model import DischargeSummary

__all__ = [
    "DischargeSummary",
    "EpicrisisError",
    "InputError",
    "__version__",
    "build_prompt",
    "render",
    "summarize",
]
