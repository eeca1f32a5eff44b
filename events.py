"""The server's log: one line per event, key=value pairs in the original's style, or JSON.

Every process logs through ``logger`` to the server's stdout: the server with ``server_log``,
each handler with an ``EventLog`` that carries its request's uuid, so that one request can be
followed across its processes with ``grep uuid=...``.  ``-v`` logs each request's events;
the lesson (lesson.py) and the server people run (bluserver.py) log alike.

The server people run also logs, with ``-vv``, each rejected line: ``RejectedLinesLog``, a
mixin of its handler, at the end of this module.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import TYPE_CHECKING, Any

from client import ERROR_PREFIX

logger = logging.getLogger("bluserver")


# logging's own keywords: an event's fields are every other keyword.
LOGGING_KEYWORDS = ("exc_info", "stack_info", "stacklevel", "extra")


if TYPE_CHECKING:
    # Generic in the type checker's stubs, and at run time only from Python 3.11.
    LoggerAdapter = logging.LoggerAdapter[logging.Logger]
else:
    LoggerAdapter = logging.LoggerAdapter


class EventLog(LoggerAdapter):
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


def log_to_stdout(level: int, as_json: bool = False) -> None:
    """Send the log's events at level and above to stdout, one line each (as_json: JSON)."""
    log_output = logging.StreamHandler(sys.stdout)
    log_output.setFormatter(EventFormatter(as_json=as_json))
    logger.addHandler(log_output)
    logger.setLevel(level)


# --- -vv: each rejected line. -----------------------------------------------------------------

EXCERPT_CHARS = 80  # how much of a rejected line -vv logs

if TYPE_CHECKING:
    # The mixin's declared base, for the type checker only: what it extends.
    from lesson import RequestHandler as HandlerBase
    from lesson import Slice
else:
    HandlerBase = object


class RejectedLinesLog(HandlerBase):
    """A RequestHandler mixin of the server people run, for -vv: once the reply is sent, one
    DEBUG event per error line, with at most EXCERPT_CHARS of its line.  A line may be 256 MiB
    long, and its log entry is still one short line."""

    def send_reply(self, slices: list[Slice]) -> int:
        length = super().send_reply(slices)
        if slices and self.event_log.isEnabledFor(logging.DEBUG):
            self.log_rejected_lines(slices)
        return length

    def log_rejected_lines(self, slices: list[Slice]) -> None:
        """The results hold one line for each line of the request, in order, slice after
        slice: the nth result line answers the nth line of the payload."""
        payload = slices[0].payload  # every slice's: the whole request
        line_start = 0
        for slice_ in slices:
            slice_.results.seek(0)
            for result in slice_.results:
                if result.startswith(ERROR_PREFIX):
                    excerpt = line_excerpt(payload, line_start)
                    reason = result[len(ERROR_PREFIX) : -1].decode()
                    self.event_log.debug("Line rejected", line=excerpt, reason=reason)
                line_start = payload.find(b"\n", line_start) + 1


def line_excerpt(payload: bytearray, line_start: int) -> str:
    """The repr of the line at line_start, cut at EXCERPT_CHARS: built from a copy of that
    many bytes, never of the whole line, which may be 256 MiB."""
    head = bytes(payload[line_start : line_start + EXCERPT_CHARS])
    newline = head.find(b"\n")
    if newline >= 0:  # the whole line is here: its '\n' or '\r\n' is no part of it
        head = head[:newline].removesuffix(b"\r")
    return repr(head.decode("utf-8", "surrogateescape"))[:EXCERPT_CHARS]
