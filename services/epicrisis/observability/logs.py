"""Structured logs: one JSON object per line, with the request and job they belong to.

``configure_logging`` is called once by ``epicrisis serve`` and ``epicrisis worker``. Every
record carries ``request_id`` (the caller's ``x-request-id``, or one made at the gRPC edge),
``job_id`` and the current trace and span ids, from context variables. Messages in this
code base never hold patient data; an exception is logged as its type and stack frames
only, since exception texts from libraries (a validation error, say) can quote the input.
"""

from __future__ import annotations

import logging
import sys
import traceback
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

import orjson
from opentelemetry import trace

REQUEST_ID: ContextVar[str | None] = ContextVar("epicrisis_request_id", default=None)
JOB_ID: ContextVar[str | None] = ContextVar("epicrisis_job_id", default=None)


class JsonFormatter(logging.Formatter):
    """A record as a JSON object: time, level, logger, message, ids; no exception text."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self._role = role

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "service": self._role,
            "pid": record.process,
        }
        for name, value in (("request_id", REQUEST_ID.get()), ("job_id", JOB_ID.get())):
            if value is not None:
                entry[name] = value
        audit = getattr(record, "audit", None)
        if isinstance(audit, dict):
            entry["audit"] = audit
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            entry["trace_id"] = f"{span.trace_id:032x}"
            entry["span_id"] = f"{span.span_id:016x}"
        if record.exc_info and record.exc_info[0] is not None:
            entry["exception"] = record.exc_info[0].__name__
            entry["stack"] = [
                f"{frame.filename}:{frame.lineno} {frame.name}"
                for frame in traceback.extract_tb(record.exc_info[2])
            ]
        return orjson.dumps(entry).decode()


class _TextFormatter(logging.Formatter):
    """Human-readable lines for a terminal; the exception without its text, as in JSON."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        exc_info, record.exc_info, record.exc_text = record.exc_info, None, None
        try:
            line = super().format(record)
        finally:
            record.exc_info = exc_info
        job = JOB_ID.get()
        if job is not None:
            line += f" [job {job}]"
        if exc_info and exc_info[0] is not None:
            line += f" ({exc_info[0].__name__})"
        return line


def configure_logging(role: str, *, log_format: str = "auto", level: str = "INFO") -> None:
    """Send every log record to stderr, as JSON (``auto``: unless stderr is a terminal)."""
    use_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(role) if use_json else _TextFormatter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
