"""bluserver: evaluates batches of arithmetic expressions sent over TCP, in worker processes.

Usage: ``python bluserver.py -p 1982 -n 2``.  README.md has the protocol, the limits and a
reading guide.  This module is the server, the handler and the command line; worker.py holds
both ends of a worker, grammar.py the language, client.py the wire protocol.  The path of one
request through the three kinds of process::

    client ──[length, lines]──▶ BluServer                     server process: accepts, and
                                  │ ForkingMixIn                forks a handler per connection
                                  ▼
                RequestHandler.receive_request                handler process: the request
                                  │ slice_bounds                ≤ n ranges of whole lines
                                  ▼
                worker.evaluate_in_workers                    a Slice per range: one forked
                       │                    │                 Process and Pipe each
        worker.evaluate_slice      worker.evaluate_slice      worker processes: result blocks
                       │                    │                 up the Pipe, then END_OF_SLICE
                 Slice.spool          Slice.spool             nameless temporary files
                       └─────────┬──────────┘
                                 ▼
    client ◀──[length, results]── RequestHandler.send_reply   read back from the spools
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import itertools
import json
import logging
import math
import multiprocessing
import os
import signal
import socket
import socketserver
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any, Callable

import worker
from client import CHUNK_BYTES, HEADER, Pace, count_lines, recv_exactly, send_frame

LINGER_S = 2.0  # how long a handler reads what a client still sends, so it can read the reply
SHUTDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM)
CLIENT_FAILURES = (socket.timeout, ConnectionError)  # silent or too slow; closed or reset
EXCERPT_CHARS = 80  # how much of a rejected line -vv logs

logger = logging.getLogger("bluserver")


class EventLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """``events.info("Request served", lines=3)``: one event and its fields, with the request's
    id when there is one.  logging's own keywords (``exc_info``, ...) keep their meaning."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        own = {key: kwargs.pop(key) for key in LOGGING_KEYWORDS if key in kwargs}
        context = dict(self.extra or {})
        return msg, {**own, "extra": {"context": context, "fields": kwargs}}


LOGGING_KEYWORDS = ("exc_info", "stack_info", "stacklevel")


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


server_events = EventLog(logger, {})  # the server's own events, outside any request


def slice_bounds(payload: bytes | bytearray, count: int) -> list[tuple[int, int]]:
    """At most count byte ranges of whole lines of about equal size; none for no payload."""
    cuts = [0]
    for number in range(1, count):
        # From one byte before the nominal cut: a line ending exactly there ends this range.
        newline = payload.find(b"\n", max(cuts[-1], len(payload) * number // count - 1))
        cuts.append(len(payload) if newline < 0 else newline + 1)
    return [(start, end) for start, end in zip(cuts, [*cuts[1:], len(payload)]) if start < end]


def line_excerpt(payload: bytearray, line_start: int) -> str:
    """The repr of the line at line_start, cut at EXCERPT_CHARS: built from a copy of that
    many bytes, never of the whole line, which may be 256 MiB."""
    head = bytes(payload[line_start : line_start + EXCERPT_CHARS])
    newline = head.find(b"\n")
    if newline >= 0:  # the whole line is here: its '\n' or '\r\n' is no part of it
        head = head[:newline].removesuffix(b"\r")
    return repr(head.decode("utf-8", "surrogateescape"))[:EXCERPT_CHARS]


class RequestTooLarge(Exception):
    """A request declared more bytes than --max-bytes allows."""


# Why a request is answered with one error line instead of its results.
REFUSALS = (RequestTooLarge, worker.ReplyTooLarge, worker.ReplyNotStored, worker.WorkerNotStarted)


class RequestHandler(socketserver.BaseRequestHandler):
    """Receives one request, evaluates it in workers, sends the reply.  Runs in its own process."""

    server: BluServer
    request: socket.socket

    def setup(self) -> None:
        # Own process group: a terminal's Ctrl-C reaches only the server, and killpg() ends
        # the workers.
        os.setpgid(0, 0)
        for signum in SHUTDOWN_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        self.server.socket.close()  # only the server accepts
        multiprocessing.current_process().name = "handler"
        self.options = self.server.options
        self.events = EventLog(logger, {"uuid": uuid.uuid4().hex})
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def handle(self) -> None:
        started = time.monotonic()
        self.events.info("Incoming connection", peer=self.client_address)
        try:
            payload = self.receive_request()
            self.evaluate_and_reply(payload, started)
        except REFUSALS as error:
            self.events.warning("Request refused", reason=str(error))
            self.reply_and_linger(f"error: {error}\n".encode())
        except CLIENT_FAILURES as error:
            self.events.warning("Client failed", reason=str(error) or "timed out")

    def evaluate_and_reply(self, payload: bytearray, started: float) -> None:
        """Evaluate payload in workers, send the reply, log the request's summary, linger."""
        ranges = slice_bounds(payload, self.options.workers)
        with worker.evaluate_in_workers(
            payload,
            ranges,
            self.request,
            worker_timeout_s=self.options.worker_timeout_s,
            max_reply_bytes=self.options.max_reply_bytes,
            events=self.events,
        ) as slices:
            bytes_out = self.send_reply(slices)
            if self.events.isEnabledFor(logging.DEBUG):
                self.log_rejected_lines(payload, slices)
        # Logged once the workers are reaped (leaving the with block), so that the summary is last.
        self.events.info(
            "Request served",
            lines=count_lines(payload),
            error_lines=sum(slice_.error_lines for slice_ in slices),
            bytes_in=len(payload),
            bytes_out=bytes_out,
            workers=len(slices),
            seconds=round(time.monotonic() - started, 6),
        )
        self.linger()

    def pace(self) -> Pace:
        """Apache mod_reqtimeout's rule: --client-timeout seconds plus one per --min-rate bytes
        moved, no wait longer than --client-timeout.  A steady client is served; one that
        trickles is cut off."""
        timeout_s = self.options.client_timeout_s
        min_rate = self.options.min_rate
        started = time.monotonic()

        def before_wait(moved: int) -> None:
            left_s = started + timeout_s + moved / min_rate - time.monotonic()
            if left_s <= 0:
                raise socket.timeout(f"slower than --min-rate {min_rate} bytes/s")
            self.request.settimeout(min(timeout_s, left_s))

        return before_wait

    def receive_request(self) -> bytearray:
        """The request's bytes; raises RequestTooLarge before reading an oversized body."""
        pace = self.pace()
        (size,) = HEADER.unpack(recv_exactly(self.request, HEADER.size, pace))
        if size > self.options.max_bytes:
            limit = self.options.max_bytes
            raise RequestTooLarge(f"request too large ({size} bytes, limit {limit})")
        self.events.info("Request announced", bytes=size)
        return recv_exactly(self.request, size, pace)

    def send_reply(self, slices: list[worker.Slice]) -> int:
        """Send the slices' spooled results as one frame, in order, read back a chunk at a
        time; return its length."""
        length = sum(slice_.spool.size for slice_ in slices)
        spooled = (chunk for slice_ in slices for chunk in slice_.spool.chunks())
        send_frame(self.request, spooled, length, self.pace())
        return length

    def log_rejected_lines(self, payload: bytearray, slices: list[worker.Slice]) -> None:
        """One DEBUG event per error line (-vv only), with at most EXCERPT_CHARS of its line:
        a line may be 256 MiB long, and its log entry is still one short line."""
        for slice_ in slices:
            line_start = slice_.first
            for result in slice_.spool.lines():
                if result.startswith(b"error: "):
                    excerpt = line_excerpt(payload, line_start)
                    reason = result[len(b"error: ") : -1].decode()
                    self.events.debug("Line rejected", line=excerpt, reason=reason)
                line_start = payload.find(b"\n", line_start, slice_.end) + 1

    def reply_and_linger(self, reply: bytes) -> None:
        """Send a one-line reply (a refusal), then linger."""
        with contextlib.suppress(*CLIENT_FAILURES):  # a client gone or silent needs nothing more
            send_frame(self.request, [reply])
        self.linger()

    def linger(self) -> None:
        """Say we are done (FIN), then read and drop what the client still sends, until it
        closes or for LINGER_S at most (nginx's lingering close): closing with unread bytes
        sends a reset, which destroys whatever of the reply the client has not read yet."""
        deadline = time.monotonic() + LINGER_S
        with contextlib.suppress(*CLIENT_FAILURES):  # a client gone or silent needs nothing more
            self.request.shutdown(socket.SHUT_WR)
            while True:
                left_s = deadline - time.monotonic()
                if left_s <= 0:
                    return
                self.request.settimeout(left_s)
                if not self.request.recv(CHUNK_BYTES):
                    return


class BluServer(socketserver.ForkingTCPServer):
    """Listens, and forks a RequestHandler process per connection, ``max_children`` at once: when all
    are busy, ``collect_children`` waits for one to exit, and new connections wait in the backlog."""

    allow_reuse_address = True  # restart at once, while old connections sit in TIME_WAIT
    request_queue_size = (
        socket.SOMAXCONN
    )  # as long a backlog as the kernel allows: none is refused
    block_on_close = (
        False  # serve_until_signalled waits for the handlers, so a second signal can stop them
    )
    timeout = 0.05  # seconds handle_request waits for a connection: how often a signal is checked

    def __init__(self, options: argparse.Namespace) -> None:
        self.options = options
        self.max_children = options.max_children
        self.active_children: set[int] = set()  # the handlers' pids
        self.shutdown_signal: str | None = None  # set by the first SIGINT or SIGTERM
        super().__init__((options.address, options.port), RequestHandler)

    def collect_children(self, *, blocking: bool = False) -> None:
        """Reap finished handlers; while all are busy, wait for one or a signal: ForkingMixIn's waitpid()
        resumes after a signal (PEP 475).  Blocked before reaping, no signal is lost before sigwait()."""
        wake_signals = {signal.SIGCHLD, *SHUTDOWN_SIGNALS}
        signal.pthread_sigmask(signal.SIG_BLOCK, wake_signals)
        try:
            while True:
                with contextlib.suppress(ChildProcessError):  # no child left
                    while pid := os.waitpid(-1, os.WNOHANG)[0]:  # 0: none has finished
                        self.active_children.discard(pid)
                if len(self.active_children) < self.max_children or self.shutdown_signal:
                    return
                if (signum := signal.sigwait(wake_signals)) != signal.SIGCHLD:
                    self.shutdown_signal = signal.Signals(signum).name
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, wake_signals)


def serve_until_signalled(server: BluServer) -> None:
    """Serve until SIGINT or SIGTERM, then let requests in flight finish; a second signal kills them."""

    def request_shutdown(signum: int, frame: object) -> None:
        # Only note it: an exception raised here could land mid-fork or mid-accept.
        server.shutdown_signal = signal.Signals(signum).name

    def stop_now(signum: int, frame: object) -> None:
        for pid, kill in itertools.product(list(server.active_children), (os.kill, os.killpg)):
            with contextlib.suppress(ProcessLookupError):  # killpg: no group yet, before setup
                kill(pid, signal.SIGKILL)  # the handler, then its group: its workers
        server_events.warning("Stopped at once", signal=signal.Signals(signum).name)
        raise SystemExit(1)

    for signum in SHUTDOWN_SIGNALS:
        signal.signal(signum, request_shutdown)
    host, port = server.socket.getsockname()[:2]
    print(
        f"bluserver: serving on {host}:{port} with up to {server.options.workers} workers per request",
        flush=True,
    )
    server_events.info("Server started", **{**vars(server.options), "address": host, "port": port})
    # Not serve_forever(): leaving it takes shutdown(), which waits for it, from another thread.
    while not server.shutdown_signal:
        server.handle_request()  # one connection, or none within server.timeout
        server.collect_children()
    for signum in SHUTDOWN_SIGNALS:
        signal.signal(signum, stop_now)
    server.server_close()  # stop accepting: new connections are refused from here on
    in_flight = server.active_children
    server_events.warning(
        "Shutting down", signal=server.shutdown_signal, requests_in_flight=len(in_flight)
    )
    with contextlib.suppress(ChildProcessError):  # none left
        while in_flight:
            in_flight.discard(os.waitpid(-1, 0)[0])  # forgotten once reaped: its pid may be reused
    server_events.warning("Server stopped")


def whole_number(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number from low to high."""

    def parse(text: str) -> int:
        if not text.isdigit() or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"must be a whole number {low}-{high}, not {text}")
        return int(text)

    return parse


def seconds(low: float, high: float) -> Callable[[str], float]:
    """An argparse type: a number of seconds from low to high ('inf' and 'nan' are not)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not low <= value <= high:  # false for nan
            raise argparse.ArgumentTypeError(f"must be {low:g}-{high:g} seconds, not {text}")
        return value

    return parse


DAY_S = 86_400.0  # the longest timeout: past it, a timeout is a mistake, not a choice
MAX_WORKERS = 64  # a fork each: far more than cores only costs time and memory per request


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Evaluate batches of arithmetic expressions sent over TCP, in worker "
        "processes.\nA client sends a request of lines; the reply has one result line per line.",
        epilog="examples:\n"
        "  python bluserver.py                  # localhost:1982, 2 workers per request\n"
        "  python bluserver.py -a 0.0.0.0 -p 2000 -n 4 -v --log-format json\n"
        "\nsignals: the first SIGINT (Ctrl-C) or SIGTERM stops accepting, lets requests in\n"
        "flight finish and exits 0; a second one ends them at once and exits 1.\n"
        "exit status: 1 if the address cannot be used, 2 on bad arguments.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("-a", "--address", default="localhost", help="address to listen on (default: %(default)s)")
    add(
        "-p",
        "--port",
        type=whole_number(0, 65535),
        default=1982,
        help="TCP port, 0 for any free one (default: %(default)s)",
    )
    add(
        "-n",
        "--workers",
        type=whole_number(1, MAX_WORKERS),
        default=2,
        help=f"most worker processes per request, 1-{MAX_WORKERS} (default: %(default)s)",
    )
    add(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log events to stdout; -vv also each rejected line",
    )
    add(
        "--log-format",
        choices=("kv", "json"),
        default="kv",
        help="key=value lines or JSON (default: %(default)s)",
    )
    add_limits(
        parser.add_argument_group("limits (README.md, 'Limits', says what happens at each)")
    )
    return parser.parse_args(argv)


def add_limits(group: argparse._ArgumentGroup) -> None:
    """The options that bound what one client or request can cost."""
    group.add_argument(
        "--max-bytes",
        type=whole_number(1, 2**36),
        default=256 * 2**20,
        metavar="BYTES",
        help="largest request; a larger one is refused unread (256 MiB)",
    )
    group.add_argument(
        "--max-reply-bytes",
        type=whole_number(1, 2**40),
        default=2**30,
        metavar="BYTES",
        help="largest reply; a request whose reply would be larger is refused (1 GiB)",
    )
    group.add_argument(
        "--max-children",
        type=whole_number(1, 4096),
        default=16,
        metavar="N",
        help="requests handled at once; more wait in the listen backlog (16)",
    )
    group.add_argument(
        "--client-timeout",
        dest="client_timeout_s",
        type=seconds(0.1, DAY_S),
        default=30.0,
        metavar="SECONDS",
        help="longest silence of a client, and its initial allowance (30)",
    )
    group.add_argument(
        "--min-rate",
        type=whole_number(1, 2**30),
        default=16384,
        metavar="BYTES_PER_S",
        help="slowest steady transfer, past the allowance (16384)",
    )
    group.add_argument(
        "--worker-timeout",
        dest="worker_timeout_s",
        # At least two report intervals: a working worker is never silent this long.
        type=seconds(2 * worker.REPORT_INTERVAL_S, DAY_S),
        default=60.0,
        metavar="SECONDS",
        help=f"longest silence of a worker, at least {2 * worker.REPORT_INTERVAL_S:g} "
        f"(60; workers report every {worker.REPORT_INTERVAL_S:g} s)",
    )


def main(argv: Sequence[str] | None = None) -> None:
    options = parse_args(argv)
    multiprocessing.current_process().name = "server"
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(EventFormatter(as_json=options.log_format == "json"))
    logger.addHandler(handler)
    logger.setLevel([logging.WARNING, logging.INFO, logging.DEBUG][min(options.verbose, 2)])
    try:
        server = BluServer(options)
    except OSError as error:
        where = (
            f"port {options.port} is already in use (try -p)"
            if error.errno == errno.EADDRINUSE
            else (f"cannot listen on {options.address}:{options.port}: {error.strerror or error}")
        )
        raise SystemExit(f"bluserver: {where}") from None  # exit status 1
    serve_until_signalled(server)


if __name__ == "__main__":
    main()
