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
