"""FHIR date and dateTime values as absolute instants, shown in the encounter's own offset.

R4 allows ``YYYY``, ``YYYY-MM``, ``YYYY-MM-DD`` and full dateTimes that must carry an offset.
A partial date starts at local midnight in the encounter's offset and keeps its precision,
so it is never shown with more detail than the source had.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Literal

Precision = Literal["year", "month", "day", "second"]
END_OF_TIME = datetime.max.replace(tzinfo=UTC)
"""Where a span that would end past year 9999 ends instead."""


@dataclass(frozen=True, slots=True, order=True)
class When:
    """A point in time with the precision the source gave it."""

    at: datetime  # timezone-aware
    precision: Precision = "second"

    @property
    def until(self) -> datetime:
        """The exclusive end of the span the value names: a day ends at the next midnight."""
        if self.precision == "second":
            return self.at
        try:
            if self.precision == "day":
                return self.at + timedelta(days=1)
            if self.precision == "month":
                return self.at.replace(
                    year=self.at.year + self.at.month // 12, month=self.at.month % 12 + 1
                )
            return self.at.replace(year=self.at.year + 1)
        except (OverflowError, ValueError):  # the span of 9999-12-31 ends past year 9999
            return END_OF_TIME

    def iso(self, tz: tzinfo | None = None) -> str:
        """ISO 8601 at the source precision; full times in ``tz`` when given."""
        if self.precision == "year":
            return f"{self.at.year:04d}"
        if self.precision == "month":
            return f"{self.at.year:04d}-{self.at.month:02d}"
        if self.precision == "day":
            return self.at.date().isoformat()
        return self._in(tz).isoformat(timespec="seconds")

    def short(self, tz: tzinfo | None = None) -> str:
        """``2024-06-16 08:10`` (minutes, no offset): for lines whose offset is stated once."""
        if self.precision != "second":
            return self.iso(tz)
        return self._in(tz).strftime("%Y-%m-%d %H:%M")

    def date(self, tz: tzinfo | None = None) -> str:
        if self.precision in ("year", "month"):
            return self.iso()
        at = self._in(tz) if self.precision == "second" else self.at
        return at.date().isoformat()

    def _in(self, tz: tzinfo | None) -> datetime:
        """This instant in ``tz``; as written when the shift would leave years 1-9999."""
        if tz is None:
            return self.at
        try:
            return self.at.astimezone(tz)
        except OverflowError:
            return self.at


def parse_when(value: object, default_tz: tzinfo = UTC) -> When | None:
    """Parse a validated FHIR date/dateTime/instant; ``None`` for anything else."""
    if not isinstance(value, str) or len(value) < 4:
        return None
    try:
        if len(value) == 4:
            return When(datetime(int(value), 1, 1, tzinfo=default_tz), "year")
        if len(value) == 7:
            return When(datetime(int(value[:4]), int(value[5:7]), 1, tzinfo=default_tz), "month")
        if len(value) == 10:
            return When(datetime.fromisoformat(value).replace(tzinfo=default_tz), "day")
        at = datetime.fromisoformat(value)
    except ValueError:
        return None
    if at.tzinfo is None:  # R4 requires an offset with a time; tolerate its absence
        at = at.replace(tzinfo=default_tz)
    try:
        at.astimezone(UTC)  # an offset that pushes it out of years 1-9999 is unusable
    except OverflowError:
        return None
    return When(at, "second")


def offset_label(tz: tzinfo) -> str:
    """``UTC+02:00`` for the encounter's offset, stated once per document."""
    delta = tz.utcoffset(None) or timedelta(0)
    minutes = int(delta.total_seconds() // 60)
    sign = "+" if minutes >= 0 else "-"
    minutes = abs(minutes)
    return f"UTC{sign}{minutes // 60:02d}:{minutes % 60:02d}"
