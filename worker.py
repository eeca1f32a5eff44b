"""What runs in a worker process: evaluate one slice of a request, report results as they come.

The handler (bluserver.py, ``Slice.start_worker``) forks ``run`` with the request's buffer
and a byte range of whole lines.  Forked, the worker reads the buffer it inherited, shared
copy-on-write, so the request is never copied to reach it.  Up its one Pipe go result
blocks, each the result lines ('\\n'-terminated) of the next run of input lines, then one
empty message: done.  Only that message marks success, so a worker that dies can never
pass off part of its slice as all of it.

A block goes up when it holds BLOCK_BYTES of results or after REPORT_INTERVAL_S of work,
whichever comes first: neither side ever holds more than a block, and a slow worker keeps
reporting, so the handler can tell it from a stuck one (silent for ``--worker-timeout``).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator, Sequence
from multiprocessing.connection import Connection

from grammar import MAX_INT_DIGITS, NOT_UTF8, RECURSION_LIMIT, evaluate_line

BLOCK_BYTES = 256 * 1024  # input decoded at once, and results sent at once
REPORT_INTERVAL_S = 0.5  # the longest a worker works without sending what it has


def run(conn: Connection, payload: bytearray, bounds: tuple[int, int], reply_budget: int, reply_limit: int) -> None:
    """Worker process entry point: evaluate the lines of payload[start:end], send their results on conn.

    A result that would take this slice's results past reply_budget bytes (its share of
    the reply's limit, --max-reply-bytes) is replaced by an error line: no content can
    make a reply unbounded.
    """
    hold_only(conn)
    too_large = f"error: reply too large (limit {reply_limit} bytes)"
    results: list[str] = []
    results_bytes = 0
    reported_at = time.monotonic()
    for line in slice_lines(payload, *bounds):
        result = NOT_UTF8 if line is None else evaluate_line(line)
        size = len(result.encode()) + 1
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
    """Make the worker independent of what it inherited by fork, and of the environment.

    It would otherwise keep the client's socket and the server's stdout open after its
    handler is gone.  stderr stays: a worker's traceback is the one clue to why it died.
    """
    os.closerange(3, conn.fileno())
    os.closerange(conn.fileno() + 1, os.sysconf("SC_OPEN_MAX"))
    os.dup2(os.open(os.devnull, os.O_RDWR), 0)
    os.dup2(0, 1)
    # pyparsing recurses about ten frames per nesting level: this lets a few hundred levels
    # parse, and deeper lines end in a quick RecursionError rather than a stack overflow.
    sys.setrecursionlimit(RECURSION_LIMIT)
    if hasattr(sys, "set_int_max_str_digits"):  # Python 3.11+, 3.10.7+, 3.9.14+
        # The language's limit, not whatever PYTHONINTMAXSTRDIGITS says.
        sys.set_int_max_str_digits(MAX_INT_DIGITS)


def slice_lines(payload: bytearray, start: int, end: int) -> Iterator[str | None]:
    """The lines of payload[start:end] as text, None for a line that is not UTF-8.

    Decoded a run of about BLOCK_BYTES of whole lines at a time; a '\\r' before '\\n' is
    dropped, and a final newline ends the last line rather than starting an empty one.
    """
    while start < end:
        # Search from one byte before the run's nominal end: a run of exactly BLOCK_BYTES
        # that ends in '\n' is found there, not one line later.
        newline = payload.find(b"\n", min(start + BLOCK_BYTES, end) - 1, end)
        stop = end if newline < 0 else newline + 1
        run_bytes = bytes(payload[start:stop]).replace(b"\r\n", b"\n")
        yield from decode_lines(run_bytes[:-1] if newline >= 0 else run_bytes)
        start = stop


def decode_lines(run_bytes: bytes) -> Sequence[str | None]:
    try:
        return run_bytes.decode("utf-8").split("\n")
    except UnicodeDecodeError:  # rare: only then pay for decoding line by line
        return [decode_or_none(line) for line in run_bytes.split(b"\n")]


def decode_or_none(line: bytes) -> str | None:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        return None
