"""The worker process: evaluates one slice of a request and sends the results up its Pipe.

A handler (lesson.py) cuts its request into slices of whole lines and forks one worker
per slice with ``multiprocessing.Process``, each linked to it by a one-way
``multiprocessing.Pipe``::

    handler process                                   worker process
    ───────────────                                   ──────────────
    Slice.start_worker ── Process(target=evaluate_slice), Pipe ──▶ evaluate_slice
                                                        slice_lines: the slice's lines
                                                        evaluate_line, per line
    Slice.receive ◀──── recv_bytes ◀──── send_bytes ── results, in messages
    Slice.receive ◀──── recv_bytes ◀──── send_bytes ── END_OF_SLICE: all lines answered

The worker reads the request from the memory it shares with its handler (fork copies
nothing until written), so no byte of the request travels through a pipe: only results do.
"""

from __future__ import annotations

import os
import select
import sys
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Callable, NamedTuple, Union

import grammar

# One message is one write() of at most PIPE_BUF bytes, its 4-byte length (Connection's own
# framing) included: Connection.send_bytes writes a message of up to 16 KiB and its length
# in one write (CPython's connection.py, bpo-20540), and tests/test_reliability.py stops a
# worker mid-reply to prove it.  POSIX makes such a write to a pipe atomic: the handler never
# finds half a message in the pipe, so a worker stopped between two writes (SIGSTOP, a
# debugger) can never keep the handler's recv_bytes() waiting for the rest of one.
MESSAGE_BYTES = select.PIPE_BUF - 4
# Results are encoded and sent once about this many are ready: a few messages at a time.
SEND_AT_BYTES = 16 * MESSAGE_BYTES
END_OF_SLICE = b""  # a worker's last message: every line of its slice is answered
STDERR_FD = 2
DECODE_BYTES = 256 * 1024  # a worker decodes its lines a batch of about this many bytes at a time


def evaluate_slice(
    sender: Connection,
    payload: bytearray,
    start: int,
    end: int,
    evaluate_line: Callable[[str], str],
) -> None:
    """Evaluate the lines of payload[start:end] with evaluate_line (the lesson's:
    grammar.evaluate_line) and send their results up sender, one result line per line, in
    order; then END_OF_SLICE.  Runs in the worker process."""
    become_worker(sender)
    results: list[str] = []
    results_chars = 0  # a character is at least one byte
    try:
        for line in slice_lines(payload, start, end):
            if isinstance(line, LineTooLong):
                result = grammar.line_too_long(line.size)
            else:
                result = evaluate_line(line)
            results.append(result)
            results_chars += len(result) + 1
            if results_chars >= SEND_AT_BYTES:
                send_results(sender, results)
                results = []
                results_chars = 0
        send_results(sender, results)
        sender.send_bytes(END_OF_SLICE)
    except (BrokenPipeError, KeyboardInterrupt):
        # The handler is gone (killed, or it gave up on us), or a terminal's Ctrl-C reached the
        # lesson's whole process group: either way nobody waits for these.
        return


def send_results(sender: Connection, results: list[str]) -> None:
    """Send result lines, each ended by a newline, in messages of at most MESSAGE_BYTES, each
    ending at the end of a line: a message holds whole lines, but for a result line longer than
    a message, which spans messages (the handler stores the results as one stream of bytes)."""
    if not results:
        return
    encoded = "\n".join(results).encode() + b"\n"
    offset = 0
    while offset < len(encoded):
        end = min(offset + MESSAGE_BYTES, len(encoded))
        line_end = encoded.rfind(b"\n", offset, end)
        if end < len(encoded) and line_end >= 0:
            end = line_end + 1
        sender.send_bytes(encoded, offset, end - offset)
        offset = end


def become_worker(sender: Connection) -> None:
    """What a worker does before its first line: let go of what fork inherited, and set the
    language's limits."""
    close_inherited_files(sender)
    # Evaluating nested parentheses recurses: deep enough for any line the grammar accepts.
    sys.setrecursionlimit(grammar.RECURSION_LIMIT)
    if hasattr(sys, "set_int_max_str_digits"):  # Python 3.11+, 3.10.7+, 3.9.14+
        # The language's limit, set here so that PYTHONINTMAXSTRDIGITS cannot change it.
        sys.set_int_max_str_digits(grammar.MAX_INT_DIGITS)


def close_inherited_files(sender: Connection) -> None:
    """Close every file descriptor fork inherited but sender and stderr (whose tracebacks are
    the one clue to why a worker died): a worker that holds the client's socket keeps the
    connection open after its handler has closed it, and one that holds the server's stdout
    keeps a pipe reader waiting.  stdin and stdout become /dev/null.

    Among them is multiprocessing's sentinel, the pipe whose end of file tells the handler
    the worker has exited: closed here, its end of file comes at once, so the handler's
    Process.join(timeout) no longer times out, but waits (waitpid) as long as the worker
    takes (supervise.SupervisedSlice.stop_worker waits for the end of file of the worker's
    own Pipe instead, which comes when it exits)."""
    # Up to the highest open, from Linux's /proc: os.closerange up to the open-file limit
    # costs a system call per number on Python 3.9, and a container's limit may be a billion.
    # closerange skips the numbers not open (the listing's own, closed by now, among them).
    highest = max(map(int, os.listdir("/proc/self/fd")))
    kept = sender.fileno()
    os.closerange(STDERR_FD + 1, kept)
    os.closerange(kept + 1, highest + 1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)


# --- Reading a slice's lines. ---------------------------------------------------------------


class LineTooLong(NamedTuple):
    """A line longer than grammar.MAX_LINE_BYTES, judged in bytes and never decoded."""

    size: int  # its bytes, without the line's end


Line = Union[str, LineTooLong]


def slice_lines(payload: bytearray, start: int, end: int) -> Iterator[Line]:
    """The lines of payload[start:end]: text, or LineTooLong for a line over MAX_LINE_BYTES.

    The lines are decoded a batch of about DECODE_BYTES of whole lines at a time.  A line longer
    than that is judged by its bytes and skipped, never copied or decoded: a 100 MiB line
    costs a search for its end, not 400 MiB of text (a shorter line over the limit is decoded
    with its batch, and grammar.evaluate_line refuses it).  '\\r\\n' ends a line as '\\n' does; a
    final newline is optional.  A byte that is not UTF-8 becomes a lone surrogate
    ('surrogateescape'), which grammar.evaluate_line answers with 'not valid UTF-8'.
    """
    while start < end:
        batch_end = min(start + DECODE_BYTES, end)
        # The batch ends with the line that crosses batch_end (searched from one byte before
        # it: a line ending exactly at batch_end is that line).
        newline = payload.find(b"\n", batch_end - 1, end)
        stop = end if newline < 0 else newline + 1
        last_line_start = payload.rfind(b"\n", start, batch_end - 1) + 1
        last_line_start = max(last_line_start, start)
        last_line_bytes = line_size(payload, last_line_start, stop)
        if last_line_bytes > grammar.MAX_LINE_BYTES:
            yield from decode_lines(payload, start, last_line_start)
            yield LineTooLong(last_line_bytes)
        else:
            yield from decode_lines(payload, start, stop)
        start = stop


def line_size(payload: bytearray, start: int, stop: int) -> int:
    """The bytes of the line payload[start:stop], without its '\\n' or '\\r\\n'."""
    if payload.endswith(b"\n", start, stop):
        stop -= 1
        if payload.endswith(b"\r", start, stop):
            stop -= 1
    return stop - start


def decode_lines(payload: bytearray, start: int, stop: int) -> Iterator[str]:
    """The lines of payload[start:stop], a batch of whole lines, as text."""
    if start == stop:
        return
    text = bytes(payload[start:stop]).replace(b"\r\n", b"\n").decode("utf-8", "surrogateescape")
    if text.endswith("\n"):
        text = text[:-1]
    yield from text.split("\n")
