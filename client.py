"""bluserver's client, and the wire protocol both sides speak.  Standard library only: copy it.

    python client.py operations.txt output.txt

sends the input file as one request and writes one result line per input line.  The file
has three parts, in this order:

    The protocol        framing (HEADER, send_frame, recv_exactly, recv_frame), the line
                        rule (count_lines) and what a refusal is (refusal).  bluserver.py
                        imports this part, so the two sides cannot drift apart; README.md,
                        "The protocol", is its specification.
    The client          one request per run (main): read the input, open the output, send,
                        receive, check, write; a progress line on a terminal (Progress).
    Its command line    parse_args and the argparse types it uses.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import itertools
import math
import os
import select
import socket
import stat
import struct
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import IO, Callable, NamedTuple

# === The protocol =========================================================================
# bluserver.py imports this part: both sides frame, count lines and refuse with this code.

HEADER = struct.Struct(">Q")  # the length prefix of a request and of a reply
CHUNK_BYTES = 1024 * 1024  # upper bound on one recv() or send() call
ERROR_PREFIX = b"error: "  # starts an error line, and a refusal

BeforeWait = Callable[[int], None]  # called with the bytes moved so far, before each wait


class ClosedEarly(ConnectionError):
    """The peer closed the connection before sending all it had announced."""


def recv_exactly(
    sock: socket.socket, size: int, before_wait: BeforeWait | None = None
) -> bytearray:
    """Exactly size bytes, or ClosedEarly.  The buffer grows as they arrive: a header is a claim,
    not a commitment, and announcing a gigabyte then sending nothing must cost nothing."""
    buffer = bytearray()
    while len(buffer) < size:
        if before_wait:
            before_wait(len(buffer))
        chunk = sock.recv(min(size - len(buffer), CHUNK_BYTES))
        if not chunk:
            raise ClosedEarly(f"connection closed after {len(buffer)} of {size} bytes")
        buffer += chunk
    return buffer


def recv_frame(sock: socket.socket, before_wait: BeforeWait | None = None) -> bytearray:
    """Receive one length-prefixed message."""
    (size,) = HEADER.unpack(recv_exactly(sock, HEADER.size, before_wait))
    return recv_exactly(sock, size, before_wait)


def send_frame(
    sock: socket.socket,
    parts: Iterable[bytes],
    length: int | None = None,
    before_wait: BeforeWait | None = None,
) -> None:
    """Send the parts, one after another, as one message.  With length (their total) given, the
    parts are taken as they are sent, so that a reply read from disk never sits whole in
    memory; without it, they are listed first to add up their lengths.

    Not sendall(): its timeout would bound the whole message, and cut off a slow but steady
    reader; before_wait (the server's pace) sets the timeout before each wait instead."""
    if length is None:
        parts = list(parts)
        length = sum(map(len, parts))
    sent = 0
    for part in itertools.chain([HEADER.pack(length)], parts):
        unsent = memoryview(part)
        while unsent:
            if before_wait:
                before_wait(sent)
            count = sock.send(unsent[:CHUNK_BYTES])
            unsent = unsent[count:]
            sent += count


def count_lines(data: bytes | bytearray, start: int = 0, end: int | None = None) -> int:
    """Lines in data[start:end] (no copy) as the protocol counts them: the final newline is
    optional."""
    end = len(data) if end is None else end
    return data.count(b"\n", start, end) + (start < end and data[end - 1] != ord("\n"))


def refusal(reply: bytes | bytearray, request_lines: int) -> str | None:
    """The server's reason if reply refuses the whole request, else None.

    A refusal is one line starting 'error: ' in answer to a request of any number of lines but
    one.  To a one-line request the same reply is that line's result: it is shown as such.
    """
    if request_lines == 1 or count_lines(reply) != 1 or not reply.startswith(ERROR_PREFIX):
        return None
    return reply[len(ERROR_PREFIX) :].rstrip(b"\n").decode("utf-8", "backslashreplace")


# === The client ===========================================================================

# TCP keepalive: a silent server is probed after 60 s, every 10 s, and is dead after 6 misses.
KEEPALIVE = {"TCP_KEEPIDLE": 60, "TCP_KEEPINTVL": 10, "TCP_KEEPCNT": 6}
PROGRESS_INTERVAL_S = 0.25  # how often the progress line is redrawn: live, and costs nothing
ERASE_LINE = "\r\x1b[K"  # back to column 1, then clear to the end of the line (ANSI)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the client; on failure, exit with status 1 and a one-line message (SystemExit
    prints it), leaving the output as it was."""
    args = parse_args(argv)
    started = time.monotonic()
    payload = read_input(args.input)
    try:
        # Opened before the request: an output that cannot be written costs the server nothing.
        with open_output(args.output) as output:
            reply = exchange(payload, args)
            output.write(equations(payload, reply) if args.format == "equation" else reply)
    except OSError as error:
        raise SystemExit(
            f"client: cannot write {args.output}: {error.strerror or error}"
        ) from None
    lines = count_lines(payload)
    error_lines = reply.count(ERROR_PREFIX)
    seconds = time.monotonic() - started
    if sys.stderr:  # None if stderr is closed; print() would then write to stdout
        print(
            f"client: {lines} lines, {error_lines} error lines, {seconds:.2f} s", file=sys.stderr
        )


def read_input(path: str) -> bytes:
    """The request's payload: the file at path, or stdin for '-'."""
    try:
        if path != "-":
            with open(path, "rb") as source:
                return source.read()
        if sys.stdin is None:  # Python's stdin when file descriptor 0 is closed
            raise OSError(errno.EBADF, "stdin is closed")
        return sys.stdin.buffer.read()
    except OSError as error:
        raise SystemExit(f"client: cannot read {path}: {error.strerror or error}") from None


def open_output(path: str) -> contextlib.AbstractContextManager[IO[bytes]]:
    """Where the results go, opened (or created) now, before the request is sent.

    A regular file, or a new one, is replaced when the results are complete (replacing).
    stdout ('-') and the files that are not regular (a terminal, a pipe, /dev/null) cannot be
    replaced: they are written in place.
    """
    if path == "-":
        if sys.stdout is None:  # Python's stdout when file descriptor 1 is closed
            raise OSError(errno.EBADF, "stdout is closed")
        return open(sys.stdout.fileno(), "wb", closefd=False)
    target = os.path.realpath(path)  # through a symbolic link: replace the file, not the link
    if os.path.exists(target) and not os.path.isfile(target):
        return open(target, "wb")
    return replacing(target)


@contextlib.contextmanager
def replacing(path: str) -> Iterator[IO[bytes]]:
    """A new file beside path, renamed over it when the with block ends, removed if it fails:
    path has either its previous content or the complete results, never half of them.

    Beside path, so that the rename stays within one file system, where it is atomic.  No
    fsync: this guards against failures of this process (a full disk, a refusal, Ctrl-C), not
    of the machine.
    """
    folder, name = os.path.split(path)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        with open(descriptor, "wb") as stream:
            os.chmod(temporary, file_mode(path))  # mkstemp's 0o600 would hide the results
            yield stream
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def file_mode(path: str) -> int:
    """The permissions of the file at path, or if there is none, those open() gives a new one."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        umask = os.umask(0)  # reading the umask means setting it...
        os.umask(umask)  # ...and setting it back
        return 0o666 & ~umask


def exchange(payload: bytes, args: argparse.Namespace) -> bytearray:
    """The server's reply to payload, with as many lines; SystemExit if the connection fails,
    the server refuses the request or answers with another number of lines."""
    server = f"{args.address}:{args.port}"
    lines = count_lines(payload)
    try:
        with Progress(sys.stderr) as progress:
            reply = round_trip(payload, args.address, args.port, args.timeout, progress)
    except OSError as error:
        raise SystemExit(f"client: {describe_connection_failure(error, server)}") from None
    reason = refusal(reply, lines)
    if reason is not None:
        raise SystemExit(f"client: {server} refused the request: {reason}")
    received = count_lines(reply)
    if received != lines:
        raise SystemExit(f"client: {server} answered {received} lines for {lines} input lines")
    return reply


def connect(address: str, port: int, timeout_s: float | None) -> socket.socket:
    """A connection that waits as long as the server lives, or timeout_s: a server is silent
    until the reply is ready, maybe for minutes; TCP keepalive tells a dead server from a busy
    one."""
    sock = socket.create_connection((address, port), timeout=timeout_s)
    # Header and body are two writes: without NODELAY, Nagle's algorithm holds the body ~40 ms.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in KEEPALIVE.items():
        if hasattr(socket, option):  # not on every platform; the OS defaults apply there
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
    return sock


def round_trip(
    payload: bytes,
    address: str,
    port: int,
    timeout_s: float | None,
    progress: Progress | None = None,
) -> bytearray:
    """Send payload as one request and return the reply's bytes, telling progress each step.

    send_frame then recv_frame, with the reply's header read apart: the wait for it is the
    server's evaluation, and its length the size of what is left to receive.
    """
    progress = progress or Progress(None)
    with connect(address, port, timeout_s) as sock:
        progress.begin("sending the request", HEADER.size + len(payload))
        send_frame(sock, [payload], before_wait=progress.moved)
        progress.begin("the server is evaluating")
        progress.wait_for_reply(sock, timeout_s)
        (size,) = HEADER.unpack(recv_exactly(sock, HEADER.size))
        progress.begin("receiving the results", size)
        return recv_exactly(sock, size, progress.moved)


class Step(NamedTuple):
    """What the client is doing, for its progress line."""

    what: str  # "sending the request"
    total_bytes: int | None  # what the step moves; None for a wait, which shows its duration
    started: float  # time.monotonic() when it began


class Progress:
    """A progress line on stream if it is a terminal, redrawn in place; nothing otherwise.

    The line is drawn when a step begins, then at most every PROGRESS_INTERVAL_S: by the loops
    that move the bytes (moved), and while the server is silent (wait_for_reply), so that it
    costs the transfer nothing and the wait for the server still shows time passing.
    Leaving the with block erases the line, for the summary or a failure message to follow.
    """

    def __init__(self, stream: IO[str] | None) -> None:
        self.stream = stream if stream is not None and stream.isatty() else None
        self.step = Step("connecting", None, time.monotonic())
        self.drawn_at = 0.0

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exception: object) -> None:
        self.write(ERASE_LINE)

    def begin(self, what: str, total_bytes: int | None = None) -> None:
        self.step = Step(what, total_bytes, time.monotonic())
        self.draw(0)

    def moved(self, moved_bytes: int) -> None:
        """A BeforeWait for send_frame and recv_exactly: redraw, if the line is due."""
        if self.stream and time.monotonic() - self.drawn_at >= PROGRESS_INTERVAL_S:
            self.draw(moved_bytes)

    def wait_for_reply(self, sock: socket.socket, timeout_s: float | None) -> None:
        """Return once sock has something to read, redrawing the line while it has not;
        socket.timeout after timeout_s.  Without a line to draw, the read itself waits."""
        if not self.stream:
            return
        waited_from = time.monotonic()
        while not select.select([sock], [], [], PROGRESS_INTERVAL_S)[0]:
            self.moved(0)
            if timeout_s is not None and time.monotonic() - waited_from >= timeout_s:
                raise socket.timeout("timed out")

    def draw(self, moved_bytes: int) -> None:
        step = self.step
        if step.total_bytes is None:
            detail = f"{time.monotonic() - step.started:.0f} s"
        else:
            detail = f"{moved_bytes / 1e6:.1f} of {step.total_bytes / 1e6:.1f} MB"
        self.write(f"{ERASE_LINE}client: {step.what}, {detail}")
        self.drawn_at = time.monotonic()

    def write(self, text: str) -> None:
        if not self.stream:
            return
        with contextlib.suppress(OSError):  # a terminal gone (EIO) loses the line, not the request
            self.stream.write(text)
            self.stream.flush()


def equations(payload: bytes, reply: bytes | bytearray) -> bytes:
    """The output of --format equation: 'expression = result' for each input line.

    The expression is the input line without the spaces, tabs and '\\r' around it.  An error
    reads '1/0 = error: division by zero'.  A blank line stays blank, so that line N of the
    output still answers line N of the input.
    """
    lines = count_lines(payload)
    output = []
    for expression, result in zip(payload.split(b"\n")[:lines], reply.split(b"\n")[:lines]):
        if result:
            output.append(b"%s = %s\n" % (expression.strip(b" \t\r"), result))
        else:
            output.append(b"\n")
    return b"".join(output)


def describe_connection_failure(error: OSError, server: str) -> str:
    """One line saying what went wrong with the server, for the person who ran the client."""
    if isinstance(error, ClosedEarly):
        return f"{server} closed the connection early ({error})"
    if isinstance(error, socket.timeout):
        return f"{server} sent nothing for too long (see --timeout)"
    if isinstance(error, ConnectionRefusedError):
        return (
            f"cannot connect to {server}: connection refused"
            " (is the server running? try: make run)"
        )
    return f"connection to {server} failed: {error.strerror or error}"


# === Its command line =====================================================================

MAX_TIMEOUT_S = 7 * 24 * 3600  # a week; a socket's timeout cannot exceed about 2**33 s

DESCRIPTION = """\
Send a file of arithmetic expressions, one per line, to a bluserver, as one request; write
one result line per input line: the value, an empty line for a blank one, or
'error: <reason>'.

The results go to a temporary file beside the output, renamed to it once all are in: a
failure leaves the output as it was ('-' and devices such as /dev/null are written in
place).  It is created before the request is sent: a path that cannot be written costs the
server nothing.  On a terminal, stderr shows a progress line while the request is sent,
evaluated and received; at the end, a one-line summary."""

EPILOG = """\
examples:
  python client.py                                  # operations.txt -> output.txt
  zcat big.txt.gz | python client.py - - -p 2000    # stdin to stdout
  printf '1 + 2\\n\\n3 / 0\\n' | python client.py - - --format equation
      1 + 2 = 3

      3 / 0 = error: division by zero

exit status: 0 on success; 1 with a one-line message if the input cannot be read, the
output cannot be written, the server cannot be reached, goes silent past --timeout,
refuses the request (it says why), closes early or answers with a different number of
lines; 2 on bad arguments."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=DESCRIPTION,
        epilog=EPILOG,
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
        type=timeout_seconds,
        metavar="SECONDS",
        help="give up when the server is silent this long, at most a week"
        " (default: wait while the server is alive)",
    )
    add(
        "--format",
        choices=("plain", "equation"),
        default="plain",
        help="plain: the results as the server sends them; equation: 'expression = result'"
        " lines, a blank line left blank (default: %(default)s)",
    )
    return parser.parse_args(argv)


def timeout_seconds(text: str) -> float:
    """argparse type for --timeout: seconds, more than 0 and at most MAX_TIMEOUT_S."""
    seconds = positive_float(text)
    if seconds > MAX_TIMEOUT_S:
        raise argparse.ArgumentTypeError(
            f"must be at most {MAX_TIMEOUT_S} seconds (a week), not {text};"
            " leave --timeout out to wait while the server is alive"
        )
    return seconds


def port_number(text: str) -> int:
    """argparse type: a TCP port."""
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"must be a whole number 1-65535, not {text}")
    return int(text)


def positive_float(text: str) -> float:
    """argparse type: a number greater than 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0:  # false for nan
        raise argparse.ArgumentTypeError(f"must be a number greater than 0, not {text}")
    return value


if __name__ == "__main__":
    main()
