"""The summary: its typed model, the extractive writer, and the renderers."""

from epicrisis.summary.model import DischargeSummary, Item, Section, Sentence

__all__ = ["DischargeSummary", "Item", "Section", "Sentence"]
