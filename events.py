"""The server's log: one line per event, key=value pairs in the original's style, or JSON.

Every process logs through ``logger`` to the server's stdout: the server with ``server_log``,
each handler with a ``RequestLog`` that carries its request's uuid, so that one request can be
followed across its processes with ``grep uuid=...``.  ``-v`` logs each request's events;
the lesson (lesson.py) and the server people run (bluserver.py) log alike (bluserver.py's
``-vv`` adds each rejected line: its RejectedLinesLog).
"""

from __future__ import annotations

import json
import logging
import sys
import uuid
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any

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

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        own = {key: kwargs.pop(key) for key in LOGGING_KEYWORDS if key in kwargs}
        context = dict(self.extra or {})
        extra = {**own.pop("extra", {}), "context": context, "fields": kwargs}
        return msg, {**own, "extra": extra}


class RequestLog(EventLog):
    """A handler's events, each with its request's uuid, drawn at the first event logged: at
    the default level (without -v) a request logs none, and drawing a uuid costs a handler, a
    fresh process, 0.1 ms."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__(logger, {})

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        if not self.extra:
            self.extra = {"uuid": uuid.uuid4().hex}
        return super().process(msg, kwargs)


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
