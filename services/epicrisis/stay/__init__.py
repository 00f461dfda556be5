"""The stay: one encounter's clinical context, gathered from an ingested Bundle."""

from epicrisis.stay.context import Stay
from epicrisis.stay.gather import gather_stay

__all__ = ["Stay", "gather_stay"]
