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

from collections.abc import Iterator
from multiprocessing.connection import Connection

from grammar import NOT_UTF8, evaluate_line

BLOCK_BYTES = 256 * 1024  # input per result block: large enough to amortise, small in memory


def run(conn: Connection) -> None:
    """Worker process entry point: evaluate the slice received on conn, send the results."""
    # CRLF becomes LF once for the whole slice (no copy if there is none), so that no
    # later split can separate a '\r' from its '\n'.
    slice_bytes = conn.recv_bytes().replace(b"\r\n", b"\n")
    for block in line_blocks(slice_bytes):
        conn.send_bytes(evaluate_block(block))
    conn.send_bytes(b"")
    conn.close()


def line_blocks(data: bytes | bytearray, block_bytes: int = BLOCK_BYTES) -> Iterator[bytes]:
    """Split data into runs of about block_bytes of whole lines, without the '\\n' ending each run.

    Every line of data lands in exactly one run; a final newline ends the last line
    rather than starting an empty one.  With block_bytes=0 each run is one line.
    """
    start, size = 0, len(data)
    while start < size:
        end = data.find(b"\n", min(start + block_bytes, size - 1))
        if end < 0:
            end = size
        yield bytes(data[start:end])
        start = end + 1


def evaluate_block(block: bytes) -> bytes:
    """One result line per line of block ('\\n'-separated), as UTF-8 bytes."""
    try:
        text = block.decode("utf-8")
    except UnicodeDecodeError:  # rare: only then pay for decoding line by line
        results = [_evaluate_undecoded(line) for line in block.split(b"\n")]
    else:
        results = [evaluate_line(line) for line in text.split("\n")]
    results.append("")  # so that join ends the last result line with '\n' too
    return "\n".join(results).encode("utf-8")


def _evaluate_undecoded(line: bytes) -> str:
    try:
        return evaluate_line(line.decode("utf-8"))
    except UnicodeDecodeError:
        return NOT_UTF8
