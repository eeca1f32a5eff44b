"""What runs in a worker process: evaluate one slice of a request, stream the results back.

The request handler (bluserver.py, ``SliceJob.start``) starts ``run`` in a
``multiprocessing.Process`` and talks to it over one ``multiprocessing.Pipe``:

    handler -> worker   one message: the slice, whole lines of the request's bytes
    worker  -> handler  result blocks, each the result lines ('\\n'-terminated) of
                        the next run of input lines, then one empty message: done

Streaming in blocks keeps the worker's memory at its slice plus one block, and lets
the handler notice a worker that dies part-way.  Only the empty message marks
success, so a worker that crashes can never pass off part of a slice as all of it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from multiprocessing.connection import Connection

from grammar import NOT_UTF8, evaluate_line

BLOCK_BYTES = 256 * 1024  # input per result block: large enough to amortise, small in memory

log = logging.getLogger("bluserver.worker")


def run(conn: Connection, request_id: str) -> None:
    """Worker process entry point: evaluate the slice received on conn, send the results."""
    # CRLF becomes LF once for the whole slice (no copy if there is none), so that no
    # later split can separate a '\r' from its '\n'.
    slice_bytes = conn.recv_bytes().replace(b"\r\n", b"\n")
    for block in line_blocks(slice_bytes):
        conn.send_bytes(evaluate_block(block, request_id))
    conn.send_bytes(b"")
    conn.close()


def line_blocks(data: bytes) -> Iterator[bytes]:
    """Split data into runs of about BLOCK_BYTES of whole lines, without the '\\n' ending each run.

    Every line of data lands in exactly one run; a final newline ends the last line
    rather than starting an empty one.
    """
    start, size = 0, len(data)
    while start < size:
        end = data.find(b"\n", min(start + BLOCK_BYTES, size - 1))
        if end < 0:
            end = size
        yield data[start:end]
        start = end + 1


def evaluate_block(block: bytes, request_id: str) -> bytes:
    """One result line per line of block ('\\n'-separated), as UTF-8 bytes."""
    lines: list[str] | list[bytes]
    try:
        text = block.decode("utf-8")
    except UnicodeDecodeError:  # rare: only then pay for decoding line by line
        lines = block.split(b"\n")
        results = [_evaluate_undecoded(line) for line in lines]
    else:
        lines = text.split("\n")
        results = [evaluate_line(line) for line in lines]
    if log.isEnabledFor(logging.DEBUG):
        _log_rejected(lines, results, request_id)
    results.append("")  # so that join ends the last result line with '\n' too
    return "\n".join(results).encode("utf-8")


def _evaluate_undecoded(line: bytes) -> str:
    try:
        return evaluate_line(line.decode("utf-8"))
    except UnicodeDecodeError:
        return NOT_UTF8


def _log_rejected(lines: list[str] | list[bytes], results: list[str], request_id: str) -> None:
    for line, result in zip(lines, results):
        if result.startswith("error: "):
            fields = {"line": repr(line)[:80], "reason": result[len("error: ") :]}
            log.debug("Line rejected", extra={"uuid": request_id, "fields": fields})
