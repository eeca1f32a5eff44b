"""What runs in a worker process: evaluate one slice of a request, report results as they come.

``Slice.start_worker`` (bluserver.py) forks ``run`` with the request's buffer, shared
copy-on-write, and the slice's byte range.  Up its Pipe go result blocks, then b"": done, so
a worker that dies cannot pass off part of its slice as all of it.  A block goes up at least
every REPORT_INTERVAL_S: the handler tells a slow worker (reporting) from a stuck one.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection

from grammar import MAX_INT_DIGITS, RECURSION_LIMIT, evaluate_line

READ_BYTES = 256 * 1024  # input decoded at once
BLOCK_BYTES = 256 * 1024  # results sent at once
REPORT_INTERVAL_S = 0.5  # the longest a worker works without sending what it has


def run(
    conn: Connection,
    payload: bytearray,
    bounds: tuple[int, int],
    reply_budget: int,
    reply_limit: int,
) -> None:
    """Evaluate the lines of payload[start:end] and send the results; one that would take the slice
    past reply_budget bytes (its share of --max-reply-bytes, reply_limit) is an error line instead."""
    hold_only(conn)
    too_large = f"error: reply too large (limit {reply_limit} bytes)"
    results: list[str] = []
    results_bytes, reported_at = 0, time.monotonic()
    for line in slice_lines(payload, *bounds):
        result = evaluate_line(line)
        size = (len(result) if result.isascii() else len(result.encode())) + 1  # '\n' included
        if size > reply_budget:
            result, size = too_large, len(too_large) + 1
        else:
            reply_budget -= size
        results.append(result)
        results_bytes += size
        if results_bytes >= BLOCK_BYTES or time.monotonic() - reported_at >= REPORT_INTERVAL_S:
            conn.send_bytes("\n".join(results).encode() + b"\n")
            results, results_bytes, reported_at = [], 0, time.monotonic()
    if results:
        conn.send_bytes("\n".join(results).encode() + b"\n")
    conn.send_bytes(b"")


def hold_only(conn: Connection) -> None:
    """Close what fork inherited (the client's socket, the server's stdout) but conn and stderr,
    whose tracebacks are the one clue to why a worker died; set the language's limits."""
    os.closerange(3, conn.fileno())
    os.closerange(conn.fileno() + 1, os.sysconf("SC_OPEN_MAX"))
    os.dup2(os.open(os.devnull, os.O_RDWR), 0)
    os.dup2(0, 1)
    sys.setrecursionlimit(RECURSION_LIMIT)
    if hasattr(sys, "set_int_max_str_digits"):  # Python 3.11+, 3.10.7+, 3.9.14+
        sys.set_int_max_str_digits(MAX_INT_DIGITS)  # whatever PYTHONINTMAXSTRDIGITS says


def slice_lines(payload: bytearray, start: int, end: int) -> Iterator[str]:
    """The lines of payload[start:end] as text, decoded READ_BYTES of whole lines at a time.
    '\\r\\n' ends a line as '\\n' does; a final newline is optional.  A byte that is not UTF-8
    becomes a lone surrogate, which grammar.evaluate_line answers with 'not valid UTF-8'."""
    while start < end:
        # From one byte before the nominal end: a run of READ_BYTES ending in '\n' ends there.
        newline = payload.find(b"\n", min(start + READ_BYTES, end) - 1, end)
        stop = end if newline < 0 else newline + 1
        text = (
            bytes(payload[start:stop]).replace(b"\r\n", b"\n").decode("utf-8", "surrogateescape")
        )
        yield from (text[:-1] if newline >= 0 else text).split("\n")
        start = stop
