"""Plain text from clinical notes: attachments and narrative HTML, tags stripped.

Notes are data for the summary and the prompt, never instructions; here they only become
text, bounded in length.
"""

from __future__ import annotations

import base64
import binascii
import re
from html.parser import HTMLParser

MAX_NOTE_CHARS = 20_000
TEXT_TYPES = ("text/plain", "text/html", "text/markdown", "application/xhtml+xml")


class _TextOnly(HTMLParser):
    _BLOCK = frozenset({"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "td"})
    _SKIP = frozenset({"script", "style"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIP:
            self._skipping += 1
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP and self._skipping:
            self._skipping -= 1
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self.parts.append(data)


def html_to_text(markup: str) -> str:
    parser = _TextOnly()
    parser.feed(markup)
    parser.close()
    return tidy("".join(parser.parts))


def tidy(text: str) -> str:
    """Collapse runs of spaces and blank lines; bound the length."""
    lines = [re.sub(r"[ \t\r\f\v]+", " ", line).strip() for line in text.splitlines()]
    out = "\n".join(line for line in lines if line)
    if len(out) > MAX_NOTE_CHARS:
        out = out[:MAX_NOTE_CHARS].rstrip() + " [truncated]"
    return out


def attachment_text(attachment: object) -> str | None:
    """Text of an inline Attachment (``data``, base64); None for URLs, binaries or bad data."""
    if not isinstance(attachment, dict):
        return None
    content_type = str(attachment.get("contentType") or "text/plain").split(";")[0].strip().lower()
    if content_type not in TEXT_TYPES:
        return None
    data = attachment.get("data")
    if not isinstance(data, str):
        return None
    try:
        text = base64.b64decode(data, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    if content_type in ("text/html", "application/xhtml+xml"):
        return html_to_text(text)
    return tidy(text)
