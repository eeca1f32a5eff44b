"""bluserver's client, and the wire protocol both sides speak.

One file, standard library only: copy it anywhere next to a Python 3.9+ and run

    python client.py operations.txt output.txt -a localhost -p 1982

It sends the input file as one request and writes one result line per input line.
The framing functions below are the protocol itself; bluserver.py imports them, so
the two sides cannot drift apart:

    request:  8-byte unsigned big-endian length N, then N bytes of UTF-8 text,
              one expression per line ('\\n', optionally '\\r\\n'; the final newline
              is optional)
    reply:    8-byte unsigned big-endian length M, then M bytes: exactly one result
              line per input line, in order, each ending in '\\n'
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import lzma
import os
import socket
import struct
import sys
import time
import zipfile
from collections.abc import Callable, Sequence
from typing import Any

HEADER = struct.Struct(">Q")  # the length prefix of a request and of a reply
RECV_BYTES = 1024 * 1024  # upper bound on one recv() call
SEND_BYTES = 1024 * 1024  # upper bound on one send() call
PROGRESS_MIN_BYTES = 1024 * 1024  # smaller inputs finish before a progress line helps
DEFAULT_TIMEOUT_S = 300.0
DECOMPRESSORS: dict[str, Callable[..., Any]] = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


class ClosedEarly(ConnectionError):
    """The peer closed the connection before sending all it had announced."""


def recv_exactly(sock: socket.socket, size: int) -> bytearray:
    """Receive exactly size bytes into one buffer; raise ClosedEarly if the peer stops short."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    received = 0
    while received < size:
        count = sock.recv_into(view[received:], min(size - received, RECV_BYTES))
        if count == 0:
            raise ClosedEarly(f"connection closed after {received} of {size} bytes")
        received += count
    return buffer


def recv_frame(sock: socket.socket) -> bytearray:
    """Receive one length-prefixed message."""
    (size,) = HEADER.unpack(recv_exactly(sock, HEADER.size))
    return recv_exactly(sock, size)


def send_frame(sock: socket.socket, blocks: Sequence[bytes]) -> None:
    """Send the concatenation of blocks as one length-prefixed message.

    Not sendall(): its timeout bounds the whole message, which would cut off a slow but
    steady reader of a large one.  Here the socket's timeout bounds each wait for room.
    """
    for block in (HEADER.pack(sum(len(block) for block in blocks)), *blocks):
        unsent = memoryview(block)
        while unsent:
            unsent = unsent[sock.send(unsent[:SEND_BYTES]) :]


def count_lines(data: bytes | bytearray) -> int:
    """Number of lines in data as the protocol counts them: the final newline is optional."""
    return data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)


# --- The command line. -------------------------------------------------------------------


def port_number(text: str) -> int:
    """argparse type for a TCP port; 0 lets the server pick any free port."""
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0-65535, not {text}")
    return value


def read_input(path: str) -> bytes:
    """The request payload: a file (decompressed by its extension) or stdin for '-'."""
    if path == "-":
        return sys.stdin.buffer.read()
    if path.endswith(".zip"):
        with zipfile.ZipFile(path) as archive:
            members = archive.namelist()
            if len(members) != 1:
                raise ValueError(f"{path} holds {len(members)} files; expected exactly one")
            return archive.read(members[0])
    opener = DECOMPRESSORS.get(os.path.splitext(path)[1], open)
    with opener(path, "rb") as stream:
        data: bytes = stream.read()
    return data


def format_output(payload: bytes, reply: bytes, style: str) -> bytes:
    """The output file: the reply itself, or 'expression = result' lines."""
    if style == "plain":
        return reply
    expressions = payload.decode("utf-8", "replace").split("\n")
    lines = [
        f"{expression.rstrip(chr(13))} = {result}" if expression.strip() else ""
        for expression, result in zip(expressions, reply.decode("utf-8").splitlines())
    ]
    return "".join(line + "\n" for line in lines).encode("utf-8")


def show_progress(message: str) -> None:
    sys.stderr.write(f"\r\x1b[Kclient: {message}")
    sys.stderr.flush()


def request(payload: bytes, address: str, port: int, timeout_s: float, progress: bool) -> bytearray:
    """Send payload as one request and return the reply's bytes."""
    with socket.create_connection((address, port), timeout=timeout_s) as sock:
        # Header and body are separate writes: without NODELAY, Nagle's algorithm
        # would hold the body back until the header is acknowledged (~40 ms).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if progress:
            show_progress(f"sending {len(payload) / 1e6:.1f} MB")
        send_frame(sock, [payload])
        if progress:
            show_progress("waiting for the results")
        reply = recv_frame(sock)
        if progress:
            show_progress(f"received {len(reply) / 1e6:.1f} MB\n")
        return reply


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Send a file of arithmetic expressions, one per line, to a bluserver and write\n"
        "one result line per input line: the value, an empty line for a blank line, or\n"
        "'error: <reason>'.",
        epilog="examples:\n"
        "  python client.py                                  # operations.txt -> output.txt\n"
        "  python client.py big.txt.gz - -p 2000 | head      # compressed input, to stdout\n"
        "  printf '1 + 2\\n3 / 0\\n' | python client.py - - --format equation\n"
        "\nexit status: 0 on success; 1 if the input cannot be read, the server cannot be\n"
        "reached, closes early or answers with a different number of lines; 2 on bad arguments.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "input", nargs="?", default="operations.txt",
        help="file of expressions; .gz .bz2 .xz and single-file .zip are decompressed; "
        "'-' reads stdin (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "output", nargs="?", default="output.txt", help="where to write results; '-' is stdout (default: %(default)s)"
    )
    parser.add_argument("-a", "--address", default="localhost", help="server address (default: %(default)s)")
    parser.add_argument("-p", "--port", type=port_number, default=1982, help="server port (default: %(default)s)")
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
        help="give up when the server is silent this long, e.g. --timeout 5 (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--format", choices=("plain", "equation"), default="plain",
        help="plain: the results as sent; equation: 'expression = result' (default: %(default)s)",
    )  # fmt: skip
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    try:
        payload = read_input(args.input)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        return fail(f"cannot read {args.input}: {getattr(error, 'strerror', None) or error}")
    server = f"{args.address}:{args.port}"
    try:
        progress = sys.stderr.isatty() and len(payload) >= PROGRESS_MIN_BYTES
        reply = request(payload, args.address, args.port, args.timeout, progress)
    except OSError as error:
        return fail(describe_connection_failure(error, server))
    expected, received = count_lines(payload), count_lines(reply)
    if received != expected:
        return fail(f"{server} answered {received} lines for {expected} input lines")
    output = format_output(payload, bytes(reply), args.format)
    try:
        write_output(args.output, output)
    except OSError as error:
        return fail(f"cannot write {args.output}: {error.strerror or error}")
    seconds = time.monotonic() - started
    print(f"client: {expected} lines, {reply.count(b'error: ')} error lines, {seconds:.2f} s", file=sys.stderr)
    return 0


def write_output(path: str, output: bytes) -> None:
    if path == "-":
        sys.stdout.buffer.write(output)
        sys.stdout.buffer.flush()
        return
    with open(path, "wb") as stream:
        stream.write(output)


def fail(message: str) -> int:
    print(f"client: {message}", file=sys.stderr)
    return 1


def describe_connection_failure(error: OSError, server: str) -> str:
    """One line saying what went wrong with the server, for the person who ran the client."""
    if isinstance(error, ClosedEarly):
        return f"{server} closed the connection early ({error})"
    if isinstance(error, socket.timeout):
        return f"{server} sent nothing for too long (see --timeout)"
    if isinstance(error, ConnectionRefusedError):
        return f"cannot connect to {server}: connection refused (is the server running? try: make run)"
    return f"connection to {server} failed: {error.strerror or error}"


if __name__ == "__main__":
    sys.exit(main())
