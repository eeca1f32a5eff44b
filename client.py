"""bluserver's client, and the wire protocol both sides speak.  Standard library only: copy it.

    python client.py operations.txt output.txt

sends the input file as one request and writes one result line per input line.  The file
has three parts, in this order:

    The protocol        framing (HEADER, send_frame, recv_exactly, recv_frame), the line
                        rule (count_lines) and what a refusal is (refusal).  bluserver.py
                        imports this part, so the two sides cannot drift apart; README.md,
                        "The protocol", is its specification.
    The client          one request per run (main, run): read the input, open the output,
                        connect (in TLS with --tls), send, receive, check, write; a
                        progress line on a terminal (Progress); Ctrl-C cancels the
                        request on the server too (round_trip, reset_on_close).
    Its command line    parse_args and the argparse types it uses.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import itertools
import math
import os
import select
import signal
import socket
import ssl
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
JOINED_PART_BYTES = 64 * 1024  # send_frame sends a first part up to this size with the header
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
    """Receive one frame: its length (HEADER), then that many bytes."""
    (size,) = HEADER.unpack(recv_exactly(sock, HEADER.size, before_wait))
    return recv_exactly(sock, size, before_wait)


def send_frame(
    sock: socket.socket,
    parts: Iterable[bytes],
    length: int | None = None,
    before_wait: BeforeWait | None = None,
) -> None:
    """Send the parts, one after another, as one frame.  With length (their total) given, the
    parts are taken as they are sent, so that a reply read from disk never sits whole in
    memory; without it, they are listed first to add up their lengths.

    Not sendall(): its timeout would bound the whole frame, and cut off a slow but steady
    reader; before_wait (the server's pace) sets the timeout before each wait instead."""
    if length is None:
        parts = list(parts)
        length = sum(map(len, parts))
    pending = iter(parts)
    first = next(pending, b"")
    # A small first part goes with the header, in one send: a small frame is then one TCP
    # segment, which its reader takes at one wake-up.  A large one is not copied to join it.
    if len(first) <= JOINED_PART_BYTES:
        opening = [HEADER.pack(length) + first]
    else:
        opening = [HEADER.pack(length), first]
    sent = 0
    for part in itertools.chain(opening, pending):
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


def error_line(reason: str) -> bytes:
    """The line that answers a line with no value, or refuses a whole request: 'error: '
    and the reason."""
    return ERROR_PREFIX + reason.encode() + b"\n"


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
# A TLS server answers a handshake at once.  One that does not is most likely a plain port
# waiting for the rest of what it takes for a request: give up rather than hang.
TLS_HANDSHAKE_TIMEOUT_S = 30.0
INTERRUPTING_SIGNALS = (signal.SIGINT, signal.SIGTERM)
EQUATION_BATCH_LINES = 10_000  # --format equation writes this many lines at a time
PROGRESS_INTERVAL_S = 0.25  # how often the progress line is redrawn: live, and costs nothing
ERASE_LINE = "\r\x1b[K"  # back to column 1, then clear to the end of the line (ANSI)


class Interrupted(BaseException):
    """SIGINT (Ctrl-C) or SIGTERM arrived: the person or system running the client cancels.

    A BaseException, as KeyboardInterrupt is: it is no error, and must pass every handler of
    errors on its way out (replacing() and round_trip() clean up on it, then let it go)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class NoHandshake(ConnectionError):
    """The server did not answer the TLS handshake within TLS_HANDSHAKE_TIMEOUT_S."""


def main(argv: Sequence[str] | None = None) -> None:
    """Run the client; on failure, exit with status 1 and a one-line message (SystemExit
    prints it), leaving the output as it was.  On SIGINT or SIGTERM, say so in one line and
    exit with 128 + the signal's number (130, 143), as a shell reports a process it ended;
    the output is left as it was, and the server stops the request's workers (round_trip)."""
    args = parse_args(argv)
    try:
        with interrupted_by_signals():
            run(args)
    except Interrupted as interrupted:
        if sys.stderr:  # None if stderr is closed; print() would then write to stdout
            print("client: interrupted", file=sys.stderr)
        raise SystemExit(128 + interrupted.signum) from None


def run(args: argparse.Namespace) -> None:
    """Read the input, open the output, exchange the request for its reply, write the
    results, print the summary."""
    started = time.monotonic()
    payload = read_input(args.input)
    tls = tls_context(args.cafile) if args.tls else None
    try:
        # Opened before the request: an output that cannot be written costs the server nothing.
        with open_output(args.output) as output:
            reply = exchange(payload, args, tls)
            if args.format == "equation":
                output.writelines(equations(payload, reply))
            else:
                output.write(reply)
    except OSError as error:
        raise SystemExit(
            f"client: cannot write {args.output}: {error.strerror or error}"
        ) from None
    lines = count_lines(payload)
    error_lines = reply.count(ERROR_PREFIX)
    seconds = time.monotonic() - started
    if sys.stderr:  # None if stderr is closed
        print(
            f"client: {lines} lines, {error_lines} error lines, {seconds:.2f} s", file=sys.stderr
        )


@contextlib.contextmanager
def interrupted_by_signals() -> Iterator[None]:
    """Within the with block, SIGINT and SIGTERM raise Interrupted; the previous handlers are
    back after it.

    Without this, SIGTERM would end the process at once, closing its connection with a FIN
    (see round_trip), and Ctrl-C would print a KeyboardInterrupt traceback.  The first signal
    cancels; later ones are ignored, so that a second Ctrl-C cannot cut short the cleanup the
    first one started (the reset, removing the temporary output file).
    """

    def interrupt(signum: int, frame: object) -> None:
        for ignored in INTERRUPTING_SIGNALS:
            signal.signal(ignored, signal.SIG_IGN)
        raise Interrupted(signum)

    previous_handlers = {}
    for signum in INTERRUPTING_SIGNALS:
        previous_handlers[signum] = signal.signal(signum, interrupt)
    try:
        yield
    finally:
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)


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


def tls_context(cafile: str | None) -> ssl.SSLContext:
    """What --tls verifies the server's certificate against: the system's certificate
    authorities, or those in cafile (a private CA, or the server's own certificate)."""
    try:
        return ssl.create_default_context(cafile=cafile)
    except ssl.SSLError as error:  # a file that holds no certificate
        raise SystemExit(f"client: cannot use --cafile {cafile}: {tls_reason(error)}") from None
    except OSError as error:
        raise SystemExit(f"client: cannot read --cafile {cafile}: {error.strerror}") from None


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


def exchange(
    payload: bytes, args: argparse.Namespace, tls: ssl.SSLContext | None = None
) -> bytearray:
    """The server's reply to payload, with as many lines; SystemExit if the connection fails,
    the server refuses the request or answers with another number of lines."""
    server = f"{args.address}:{args.port}"
    lines = count_lines(payload)
    try:
        with Progress(sys.stderr) as progress:
            reply = round_trip(
                payload,
                args.address,
                args.port,
                args.timeout,
                progress=progress,
                tls=tls,
                server_name=args.server_name,
            )
    except OSError as error:
        raise SystemExit(f"client: {describe_connection_failure(error, server)}") from None
    reason = refusal(reply, lines)
    if reason is not None:
        raise SystemExit(f"client: {server} refused the request: {reason}")
    received = count_lines(reply)
    if received != lines:
        raise SystemExit(f"client: {server} answered {received} lines for {lines} input lines")
    return reply


def connect(
    address: str,
    port: int,
    timeout_s: float | None,
    tls: ssl.SSLContext | None = None,
    server_name: str | None = None,
) -> socket.socket:
    """A connection to the server, in TLS if tls is given.

    timeout_s is --timeout: as the socket's timeout, it bounds every wait on the connection
    (connecting, sending, receiving) to timeout_s of silence, and wait_for_reply holds the
    wait for the server's evaluation to the same.  None waits as long as the server lives:
    a server is silent until the reply is ready, maybe for minutes, and TCP keepalive tells a
    dead server from a busy one.
    """
    sock = socket.create_connection((address, port), timeout=timeout_s)
    # Header and body are two writes: without NODELAY, Nagle's algorithm holds the body ~40 ms.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in KEEPALIVE.items():
        if hasattr(socket, option):  # not on every platform; the OS defaults apply there
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
    if tls is None:
        return sock
    return handshake(sock, tls, server_name or address, timeout_s)


def handshake(
    sock: socket.socket, tls: ssl.SSLContext, server_name: str, timeout_s: float | None
) -> ssl.SSLSocket:
    """sock in TLS, once the server's certificate is verified as server_name's.  Raises
    ssl.SSLCertVerificationError for a certificate tls does not trust, ssl.SSLError for a
    server that does not speak TLS, NoHandshake for one that does not answer.

    The handshake waits at most TLS_HANDSHAKE_TIMEOUT_S (or timeout_s, if shorter): a plain
    server reads the hello as the start of a request and may wait for the rest of it (a
    bluserver reads a length of about 2**60 there, and refuses it at once, as too large).
    """
    handshake_timeout_s = min(timeout_s or math.inf, TLS_HANDSHAKE_TIMEOUT_S)
    sock.settimeout(handshake_timeout_s)
    try:
        secure = tls.wrap_socket(sock, server_hostname=server_name)
    except socket.timeout:
        raise NoHandshake(f"no answer in {handshake_timeout_s:g} s") from None
    secure.settimeout(timeout_s)
    return secure


def round_trip(
    payload: bytes,
    address: str,
    port: int,
    timeout_s: float | None,
    *,
    progress: Progress | None = None,
    tls: ssl.SSLContext | None = None,
    server_name: str | None = None,
) -> bytearray:
    """Send payload as one request and return the reply's bytes, telling progress each step.

    send_frame then recv_frame, with the reply's header read apart: the wait for it is the
    server's evaluation, and its length the size of what is left to receive.  Interrupted
    (SIGINT, SIGTERM) resets the connection, which cancels the request on the server.
    """
    progress = progress or Progress(None)
    with connect(address, port, timeout_s, tls, server_name) as sock:
        try:
            progress.begin("sending the request", HEADER.size + len(payload))
            try:
                send_frame(sock, [payload], before_wait=progress.moved)
            except (BrokenPipeError, ConnectionResetError) as error:
                return reply_already_received(sock, error)
            progress.begin("the server is evaluating")
            wait_for_reply(sock, timeout_s, progress)
            (size,) = HEADER.unpack(recv_exactly(sock, HEADER.size))
            progress.begin("receiving the results", size)
            return recv_exactly(sock, size, progress.moved)
        except Interrupted:
            reset_on_close(sock)
            raise


def wait_for_reply(sock: socket.socket, timeout_s: float | None, progress: Progress) -> None:
    """Return once the server has begun its reply; socket.timeout if it is silent for timeout_s
    (--timeout, as every other wait on the connection: connect).

    The server sends nothing while it evaluates, maybe for minutes.  The wait goes in steps of
    PROGRESS_INTERVAL_S, so that the progress line shows the time passing.
    """
    waited_from = time.monotonic()
    while not sock_readable(sock, PROGRESS_INTERVAL_S):
        if timeout_s is not None and time.monotonic() - waited_from >= timeout_s:
            raise socket.timeout("timed out")
        progress.moved(0)


def sock_readable(sock: socket.socket, wait_s: float) -> bool:
    """Whether sock has something to read (or has closed), waiting up to wait_s: TLS may hold
    decrypted bytes that the socket below no longer shows."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    return bool(select.select([sock], [], [], wait_s)[0])


def reset_on_close(sock: socket.socket) -> None:
    """Make closing sock send a reset (RST) instead of a FIN: SO_LINGER on, for 0 seconds.

    A FIN is a half-close, which the protocol allows once a request is sent: the server
    takes it for the end of a valid request and evaluates it to the end, for nobody.  A reset
    says the client is gone: the server's ClientWatch sees it and stops the request's workers.
    A client killed outright (SIGKILL) cannot do this: its kernel closes with a FIN.
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def reply_already_received(sock: socket.socket, send_error: OSError) -> bytearray:
    """The reply the server sent before it stopped reading the request; send_error again if
    there is none.

    A server refuses a request that is too large without reading it: it sends its one-line
    refusal, reads and drops what comes for a while (its lingering close), then closes, and
    a client still sending fails with a broken pipe or a reset.  The refusal is then in the
    client's receive buffer: read it, so that the person sees the reason, not 'Broken pipe'.
    The connection has ended: all the server sent is here, and the read never waits.
    """
    sock.setblocking(False)
    try:
        return recv_frame(sock)
    except OSError:  # the server closed or reset before sending a whole reply
        raise send_error from None


class Step(NamedTuple):
    """What the client is doing, for its progress line."""

    what: str  # "sending the request"
    total_bytes: int | None  # what the step moves; None for a wait, which shows its duration
    started: float  # time.monotonic() when it began


class Progress:
    """A progress line on stream if it is a terminal, redrawn in place; nothing otherwise.

    The line is drawn when a step begins, then at most every PROGRESS_INTERVAL_S by the loops
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


def equations(payload: bytes, reply: bytes | bytearray) -> Iterator[bytes]:
    """The output of --format equation, 'expression = result' for each input line, in pieces
    of EQUATION_BATCH_LINES lines: the output is written as it is made, never held whole (a
    list of every line would cost some 50 times the input).

    The expression is the input line without the spaces, tabs and '\\r' around it.  An error
    reads '1/0 = error: division by zero'.  A blank line stays blank, so that line N of the
    output still answers line N of the input.
    """
    # BytesIO reads lines in C, as fast as split(); it shares a bytes' buffer, and copies a
    # bytearray's: a reply's size more, where every line as an object cost 50 times it.
    pairs = zip(io.BytesIO(payload), io.BytesIO(reply))  # the same number of lines: exchange
    while True:
        batch = [
            equation(expression, result)
            for expression, result in itertools.islice(pairs, EQUATION_BATCH_LINES)
        ]
        if not batch:
            return
        yield b"".join(batch)


def equation(expression: bytes, result: bytes) -> bytes:
    """One line of --format equation, from a line of the request and its result line."""
    result = result.rstrip(b"\n")
    if not result:
        return b"\n"
    return b"%s = %s\n" % (expression.strip(b" \t\r\n"), result)


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
    if isinstance(error, ssl.SSLCertVerificationError):
        return (
            f"cannot verify the certificate of {server}: {error.verify_message}"
            " (trust it with --cafile; --server-name for the name it was issued to)"
        )
    if isinstance(error, (ssl.SSLError, NoHandshake)):
        return f"TLS with {server} failed: {tls_reason(error)} (does it serve TLS on this port?)"
    return f"connection to {server} failed: {error.strerror or error}"


def tls_reason(error: OSError) -> str:
    """What failed, in words: 'wrong version number' for ssl's WRONG_VERSION_NUMBER."""
    reason = getattr(error, "reason", None)  # ssl.SSLError's code, without its source line
    return reason.lower().replace("_", " ") if reason else str(error)


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
  python client.py --cafile tls/bluserver.crt       # TLS, trusting that certificate

exit status: 0 on success; 1 with a one-line message if the input cannot be read, the
output cannot be written, the server cannot be reached, goes silent past --timeout,
refuses the request (it says why), closes early, answers with a different number of lines,
or (with --tls) has a certificate that cannot be verified or does not speak TLS; 2 on bad
arguments; 130 on Ctrl-C (SIGINT) and 143 on SIGTERM, which cancel the request on the
server too."""


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
    add(
        "--tls",
        action="store_true",
        help="connect in TLS, verifying the server's certificate against the system's"
        " certificate authorities",
    )
    add(
        "--cafile",
        metavar="FILE",
        help="verify the server's certificate against the certificates in FILE (PEM: a private"
        " CA, or the server's own self-signed certificate) instead; implies --tls",
    )
    add(
        "--server-name",
        metavar="NAME",
        help="the name the server's certificate must be issued to, when the address is not"
        " that name (default: the address); implies --tls",
    )
    args = parser.parse_args(argv)
    # Either of them is about the server's certificate: asking for one means asking for TLS.
    args.tls = args.tls or args.cafile is not None or args.server_name is not None
    return args


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
