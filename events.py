"""The server's log: one line per event, key=value pairs in the original's style, or JSON.

Every process logs through ``logger`` to the server's stdout: the server with ``server_log``,
each handler with an ``EventLog`` that carries its request's uuid, so that one request can be
followed across its processes with ``grep uuid=...``.  ``-v`` logs each request's events,
``-vv`` each rejected line too (bluserver.py's command line sets the level).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from client import ERROR_PREFIX

logger = logging.getLogger("bluserver")


# logging's own keywords: an event's fields are every other keyword.
LOGGING_KEYWORDS = ("exc_info", "stack_info", "stacklevel", "extra")


class EventLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """``event_log.info("Request served", lines=3)``: one event and its fields, with the request's
    id when there is one.  logging's own keywords (``exc_info``, ...) keep their meaning."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        own = {key: kwargs.pop(key) for key in LOGGING_KEYWORDS if key in kwargs}
        context = dict(self.extra or {})
        extra = {**own.pop("extra", {}), "context": context, "fields": kwargs}
        return msg, {**own, "extra": extra}


class EventFormatter(logging.Formatter):
    """One line per event: key=value pairs in the original's style, or a JSON object."""

    def __init__(self, as_json: bool) -> None:
        super().__init__()
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "context", {}).copy()  # the request's uuid, in a handler
        fields.update(pname=record.processName, pid=record.process, event=record.getMessage())
        fields.update(getattr(record, "fields", {}))
        if record.exc_info:
            fields["traceback"] = self.formatException(record.exc_info)
        if self.as_json:
            entry = {"time": self.formatTime(record), "level": record.levelname, **fields}
            return json.dumps(entry, default=str)
        pairs = " ".join(f"{key}={value!r}" for key, value in fields.items())
        return f"[bluserver] {self.formatTime(record)}: {record.levelname} {pairs}"


server_log = EventLog(logger, {})  # the server's own events, outside any request


# --- -vv: each rejected line. -----------------------------------------------------------------

EXCERPT_CHARS = 80  # how much of a rejected line -vv logs


class RejectedLinesLog:
    """A RequestHandler mixin for -vv: once the reply is sent, one DEBUG event per error line,
    with at most EXCERPT_CHARS of its line.  A line may be 256 MiB long, and its log entry is
    still one short line."""

    event_log: EventLog

    def send_reply(self, slices: list[Any]) -> int:
        length: int = super().send_reply(slices)  # type: ignore[misc]
        if self.event_log.isEnabledFor(logging.DEBUG):
            for slice_ in slices:
                self.log_rejected_lines(slice_)
        return length

    def log_rejected_lines(self, slice_: Any) -> None:
        payload = slice_.payload
        line_start = slice_.first_line_at
        slice_.results.seek(0)
        for result in slice_.results:
            if result.startswith(ERROR_PREFIX):
                excerpt = line_excerpt(payload, line_start)
                reason = result[len(ERROR_PREFIX) : -1].decode()
                self.event_log.debug("Line rejected", line=excerpt, reason=reason)
            line_start = payload.find(b"\n", line_start, slice_.end) + 1


def line_excerpt(payload: bytearray, line_start: int) -> str:
    """The repr of the line at line_start, cut at EXCERPT_CHARS: built from a copy of that
    many bytes, never of the whole line, which may be 256 MiB."""
    head = bytes(payload[line_start : line_start + EXCERPT_CHARS])
    newline = head.find(b"\n")
    if newline >= 0:  # the whole line is here: its '\n' or '\r\n' is no part of it
        head = head[:newline].removesuffix(b"\r")
    return repr(head.decode("utf-8", "surrogateescape"))[:EXCERPT_CHARS]
