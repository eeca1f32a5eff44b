"""bluserver's client, standard library only, and the wire protocol: ``python client.py
operations.txt output.txt``.  bluserver.py imports the framing functions (README.md, "The
protocol"), so the two sides cannot drift apart."""

from __future__ import annotations

import argparse
import itertools
import socket
import struct
import sys
import time
from collections.abc import Iterable, Sequence
from typing import IO, Callable

HEADER = struct.Struct(">Q")  # the length prefix of a request and of a reply
CHUNK_BYTES = 1024 * 1024  # upper bound on one recv() or send() call
# TCP keepalive: a silent server is probed after 60 s, every 10 s, and is dead after 6 misses.
KEEPALIVE = {"TCP_KEEPIDLE": 60, "TCP_KEEPINTVL": 10, "TCP_KEEPCNT": 6}

Pace = Callable[[int], None]  # called with the bytes moved so far, before each wait


class ClosedEarly(ConnectionError):
    """The peer closed the connection before sending all it had announced."""


def recv_exactly(sock: socket.socket, size: int, pace: Pace | None = None) -> bytearray:
    """Exactly size bytes, or ClosedEarly; the buffer grows as they arrive: a header is only a claim."""
    buffer = bytearray()
    while len(buffer) < size:
        if pace:
            pace(len(buffer))
        chunk = sock.recv(min(size - len(buffer), CHUNK_BYTES))
        if not chunk:
            raise ClosedEarly(f"connection closed after {len(buffer)} of {size} bytes")
        buffer += chunk
    return buffer


def recv_frame(sock: socket.socket, pace: Pace | None = None) -> bytearray:
    """Receive one length-prefixed message."""
    (size,) = HEADER.unpack(recv_exactly(sock, HEADER.size, pace))
    return recv_exactly(sock, size, pace)


def send_frame(
    sock: socket.socket,
    blocks: Iterable[bytes],
    length: int | None = None,
    pace: Pace | None = None,
) -> None:
    """Send blocks as one message, read as they go if length gives their total.  Not sendall(): its
    timeout would bound the whole message, and cut off a slow but steady reader, not each wait."""
    if length is None:
        blocks = list(blocks)
        length = sum(map(len, blocks))
    sent = 0
    for block in itertools.chain([HEADER.pack(length)], blocks):
        unsent = memoryview(block)
        while unsent:
            if pace:
                pace(sent)
            count = sock.send(unsent[:CHUNK_BYTES])
            unsent, sent = unsent[count:], sent + count


def count_lines(data: bytes | bytearray, start: int = 0, end: int | None = None) -> int:
    """Lines in data[start:end] (no copy) as the protocol counts them: the final newline is optional."""
    end = len(data) if end is None else end
    return data.count(b"\n", start, end) + (start < end and data[end - 1] != ord("\n"))


def port_number(text: str) -> int:
    """argparse type (this and the next two serve bluserver.py too): a TCP port, 0 for any free one."""
    if not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0-65535, not {text}")
    return int(text)


def positive_float(text: str) -> float:
    if not float(text) > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, not {text}")
    return float(text)


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"must be a whole number greater than 0, not {text}")
    return int(text)


def connect(address: str, port: int, timeout_s: float | None) -> socket.socket:
    """A connection that waits as long as the server lives, or timeout_s: a server is silent until
    the reply is ready, maybe for minutes; TCP keepalive tells a dead server from a busy one."""
    sock = socket.create_connection((address, port), timeout=timeout_s)
    # Header and body are two writes: without NODELAY, Nagle's algorithm holds the body ~40 ms.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in KEEPALIVE.items():
        if hasattr(socket, option):  # not on every platform; the OS defaults apply there
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
    return sock


def request(payload: bytes, address: str, port: int, timeout_s: float | None) -> bytearray:
    """Send payload as one request and return the reply's bytes."""
    with connect(address, port, timeout_s) as sock:
        send_frame(sock, [payload])
        return recv_frame(sock)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Send a file of arithmetic expressions, one per line, to a bluserver; write one\n"
        "result line per input line: the value, an empty line for a blank one, or 'error: <reason>'.",
        epilog="examples:\n"
        "  python client.py                                  # operations.txt -> output.txt\n"
        "  zcat big.txt.gz | python client.py - - -p 2000    # stdin to stdout\n"
        "\nexit status: 0 on success; 1 if the input cannot be read, the server cannot be\n"
        "reached, closes early or answers with a different number of lines; 2 on bad arguments.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add(
        "input",
        nargs="?",
        default="operations.txt",
        help="file of expressions; '-' is stdin (default: %(default)s)",
    )
    add(
        "output",
        nargs="?",
        default="output.txt",
        help="where to write results; '-' is stdout (default: %(default)s)",
    )
    add("-a", "--address", default="localhost", help="server address (default: %(default)s)")
    add("-p", "--port", type=port_number, default=1982, help="server port (default: %(default)s)")
    add(
        "--timeout",
        type=positive_float,
        metavar="SECONDS",
        help="give up when the server is silent this long (default: wait while the server is alive)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Exit status 1 with a one-line message (SystemExit prints it) if anything goes wrong."""
    args = parse_args(argv)
    started, server = time.monotonic(), f"{args.address}:{args.port}"
    try:
        with open_path(args.input, "rb") as source:
            payload = source.read()
    except OSError as error:
        raise SystemExit(f"client: cannot read {args.input}: {error.strerror or error}") from None
    try:
        reply = request(payload, args.address, args.port, args.timeout)
    except OSError as error:
        raise SystemExit(f"client: {describe_connection_failure(error, server)}") from None
    expected, received = count_lines(payload), count_lines(reply)
    if received != expected:
        raise SystemExit(f"client: {server} answered {received} lines for {expected} input lines")
    try:
        with open_path(args.output, "wb") as output:
            output.write(reply)
    except OSError as error:
        raise SystemExit(
            f"client: cannot write {args.output}: {error.strerror or error}"
        ) from None
    seconds = time.monotonic() - started
    print(
        f"client: {expected} lines, {reply.count(b'error: ')} error lines, {seconds:.2f} s",
        file=sys.stderr,
    )


def open_path(path: str, mode: str) -> IO[bytes]:
    """The file at path; '-' is stdin (mode "rb") or stdout ("wb"), which closing leaves open."""
    standard = sys.stdin if mode == "rb" else sys.stdout
    return open(standard.fileno() if path == "-" else path, mode, closefd=path != "-")


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
    main()
