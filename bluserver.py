"""bluserver: evaluates batches of arithmetic expressions sent over TCP, in worker processes.

Usage: ``python bluserver.py -p 1982 -n 2``.  README.md has the protocol, the limits and a
reading guide; this is the path of one request through the three kinds of process::

    client ──[length, lines]──▶ BluServer                   server process: accepts, and
                                  │ ForkingMixIn              forks one handler per connection
                                  ▼
                RequestHandler.receive_request              handler process: the request's bytes
                                  │ slice_bounds              ≤ n byte ranges of whole lines
                                  ▼
                evaluate_in_workers → Slice.start_worker    one forked Process + Pipe per slice
                       │                    │
                 worker.run           worker.run            worker processes: result blocks
                       │                    │                up the Pipe, b"" when done
                 Slice.results        Slice.results         spooled to nameless temporary files
                       └─────────┬──────────┘
                                 ▼
    client ◀──[length, results]── RequestHandler.send_reply  read back from the spools, in order
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import itertools
import json
import logging
import multiprocessing
import os
import signal
import socket
import socketserver
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from functools import partial
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import IO, Any

import worker
from client import (
    HEADER,
    Pace,
    count_lines,
    port_number,
    positive_float,
    positive_int,
    recv_exactly,
    send_frame,
)

# Forked whatever the default start method (3.14: forkserver): ~1 ms, where spawn costs ~100 ms.
WORKERS = multiprocessing.get_context("fork")
ATTEMPTS = 2  # a worker that dies or is stuck has its unanswered lines run once more
LINGER_S = 2.0  # how long to drain an oversized request so the client can read the reply
WORKER_FAILED = b"error: worker failed\n"
SHUTDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM)
CLIENT_FAILURES = (socket.timeout, ConnectionError)  # silent or too slow; closed or reset

logger = logging.getLogger("bluserver")


class EventLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """``events.info("Request served", lines=3)``: one event, its fields, and the request id."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return msg, {"extra": {"uuid": (self.extra or {}).get("uuid"), "fields": kwargs}}


class EventFormatter(logging.Formatter):
    """One line per event: key=value pairs in the original's style, or a JSON object."""

    def __init__(self, as_json: bool) -> None:
        super().__init__()
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        fields = {"uuid": record.uuid, "pname": record.processName, "pid": record.process}  # type: ignore[attr-defined]
        fields.update(event=record.getMessage(), **record.fields)  # type: ignore[attr-defined]
        if self.as_json:
            return json.dumps(
                {"time": self.formatTime(record), "level": record.levelname, **fields}, default=str
            )
        pairs = " ".join(f"{key}={value!r}" for key, value in fields.items())
        return f"[bluserver] {self.formatTime(record)}: {record.levelname} {pairs}"


server_events = EventLog(logger, {})  # the server's own events, outside any request


# A worker costs ~3 ms of CPU to fork, start and join (2-line requests, -n 2 against -n 1), and
# the flat form, the cheapest per byte, is evaluated at ~120 ns a byte (450 for the full
# language): below ~25 KB a slice takes less time than its worker's fork, and a second worker
# costs more than it saves even on idle cores.  Rounded up to 32 KiB.
MIN_SLICE_BYTES = 32 * 1024


def slice_bounds(payload: bytes | bytearray, count: int) -> list[tuple[int, int]]:
    """At most count byte ranges of whole lines of about equal size, nominally of at least
    MIN_SLICE_BYTES each (a smaller payload is one range); none for no payload."""
    worth_forking = min(count, max(1, len(payload) // MIN_SLICE_BYTES))
    cuts = [0]
    for number in range(1, worth_forking):
        # From one byte before the nominal cut: a line ending exactly there ends this range.
        newline = payload.find(b"\n", max(cuts[-1], len(payload) * number // worth_forking - 1))
        cuts.append(len(payload) if newline < 0 else newline + 1)
    return [(start, end) for start, end in zip(cuts, [*cuts[1:], len(payload)]) if start < end]


class Slice:
    """A byte range of whole lines, its worker, and its results so far, spooled to a nameless file
    (no memory; it vanishes however the process ends).  A rerun starts past the lines answered."""

    def __init__(
        self, payload: bytearray, bounds: tuple[int, int], reply_limit: int, events: EventLog
    ) -> None:
        self.payload, self.bounds, self.reply_limit, self.events = (
            payload,
            bounds,
            reply_limit,
            events,
        )
        self.start, self.end = bounds
        self.reply_budget = (
            reply_limit * (self.end - self.start) // len(payload)
        )  # this slice's share
        self.results: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 (closed by evaluate_in_workers)
        self.error_lines = self.answered = self.attempts = 0  # answered: lines, in this attempt
        self.process: BaseProcess | None = None
        self.conn: Connection | None = None  # the reading end of the worker's Pipe
        self.heard_at = 0.0  # when the worker last sent something (or started)
        self.done = False

    def start_worker(self, name: str) -> None:
        """Start a worker on the lines not yet answered; once out of attempts, fail them."""
        while self.attempts < ATTEMPTS:
            self.attempts += 1
            self.conn, child_conn = WORKERS.Pipe(duplex=False)
            # The whole buffer and a range, not payload[start:end]: a slice of it would be a copy.
            args = (
                child_conn,
                self.payload,
                (self.start, self.end),
                self.reply_budget,
                self.reply_limit,
            )
            self.process = WORKERS.Process(target=worker.run, args=args, name=name)
            try:
                self.process.start()
                self.heard_at, self.answered = time.monotonic(), 0
                self.events.info(
                    "Worker started",
                    worker=name,
                    worker_pid=self.process.pid,
                    attempt=self.attempts,
                )
                return
            except OSError as error:  # e.g. EAGAIN: too many processes
                self.conn.close()
                self.process, self.conn, reason = None, None, f"cannot start: {error}"
                self.events.warning(
                    "Worker failed", worker=name, reason=reason, attempt=self.attempts
                )
            finally:
                child_conn.close()  # so that the worker's death shows here as end of file
        self.fail_the_rest()

    def receive(self) -> None:
        """Spool every block the worker has sent so far, up to b"" (done); if it died, rerun the rest."""
        assert self.conn and self.process, "only a running worker sends"
        try:
            while not self.done and self.conn.poll():
                block = self.conn.recv_bytes()
                self.heard_at, self.done = time.monotonic(), not block
                self.results.write(block)
                self.answered += block.count(b"\n")
                self.error_lines += block.count(b"error: ")
                self.reply_budget -= len(block)
        except (EOFError, OSError):
            self.retry("died")
            return
        if self.done:
            self.events.info(
                "Worker finished",
                worker=self.process.name,
                lines=self.answered,
                attempt=self.attempts,
            )

    def retry(self, reason: str) -> None:
        """Stop the worker; run the lines it has not answered once more, if attempts are left."""
        assert self.process, "only a running worker fails"
        name = self.process.name
        self.stop_worker()
        self.events.warning("Worker failed", worker=name, reason=reason, attempt=self.attempts)
        for _ in range(self.answered):
            self.start = self.payload.index(b"\n", self.start) + 1
        self.start_worker(name)

    def fail_the_rest(self) -> None:
        """Answer every line not yet answered with an error line."""
        count = count_lines(self.payload, self.start, self.end)
        for chunk in range(0, count, 10_000):  # in chunks: the lines may be millions
            self.results.write(WORKER_FAILED * min(10_000, count - chunk))
        self.error_lines, self.done = self.error_lines + count, True

    def stop_worker(self) -> None:
        """Kill the worker unless it has finished its slice, then reap it."""
        if self.conn and self.process:
            self.conn.close()
            if not self.done:
                self.process.kill()
            self.process.join()
        self.process = self.conn = None


def await_workers(
    slices: list[Slice], client: list[socket.socket], worker_timeout_s: float
) -> None:
    """Wait for a worker's news or long silence, or the client's hang-up: a reset raises ConnectionResetError
    (the work is for nobody); end of file is a half-close after sending, and the request is served."""
    running = {slice_.conn: slice_ for slice_ in slices if slice_.conn and not slice_.done}
    silent_s = time.monotonic() - min(slice_.heard_at for slice_ in running.values())
    for ready in wait([*running, *client], timeout=max(0.0, worker_timeout_s - silent_s)):
        if isinstance(ready, socket.socket):
            ready.recv(1)
            client.clear()  # watched until first readable
    for slice_ in running.values():
        if not slice_.done:
            slice_.receive()  # all it has sent, also since the wait ended
        if not slice_.done and time.monotonic() - slice_.heard_at >= worker_timeout_s:
            slice_.retry("stuck")


@contextlib.contextmanager
def evaluate_in_workers(
    payload: bytearray, client: socket.socket, options: argparse.Namespace, events: EventLog
) -> Iterator[list[Slice]]:
    """Evaluate payload in workers; yield its slices, results spooled.  Join the workers after the reply."""
    ranges = slice_bounds(payload, options.workers)
    slices = [Slice(payload, bounds, options.max_reply_bytes, events) for bounds in ranges]
    try:
        for number, slice_ in enumerate(slices, 1):
            slice_.start_worker(f"worker-{number}")
        watched_client = [client]
        while not all(slice_.done for slice_ in slices):
            await_workers(slices, watched_client, options.worker_timeout_s)
        yield slices
    finally:
        for slice_ in slices:
            slice_.stop_worker()
            slice_.results.close()


class RequestTooLarge(Exception):
    """A request declared more bytes than --max-bytes allows."""


class RequestHandler(socketserver.BaseRequestHandler):
    """Receives one request, evaluates it in workers, sends the reply.  Runs in its own process."""

    server: BluServer
    request: socket.socket

    def setup(self) -> None:
        # Own process group: a terminal's Ctrl-C reaches only the server; killpg() ends the workers.
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
            with evaluate_in_workers(payload, self.request, self.options, self.events) as slices:
                bytes_out = self.send_reply(slices)
                if self.events.isEnabledFor(logging.DEBUG):
                    self.log_rejected_lines(payload, slices)
        except RequestTooLarge as error:
            self.events.warning("Request refused", reason=str(error))
            self.reply_and_linger(f"error: {error}\n".encode())
            return
        except CLIENT_FAILURES as error:
            self.events.warning("Client failed", reason=str(error) or "timed out")
            return
        error_lines, seconds = (
            sum(slice_.error_lines for slice_ in slices),
            round(time.monotonic() - started, 6),
        )
        self.events.info(
            "Request served",
            lines=count_lines(payload),
            error_lines=error_lines,
            bytes_in=len(payload),
            bytes_out=bytes_out,
            workers=len(slices),
            seconds=seconds,
        )

    def pace(self) -> Pace:
        """Apache mod_reqtimeout's rule: --client-timeout seconds plus one per --min-rate bytes moved,
        no wait longer than --client-timeout.  A steady client is served; one that trickles is cut off."""
        timeout_s, min_rate, started = (
            self.options.client_timeout_s,
            self.options.min_rate,
            time.monotonic(),
        )

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
            raise RequestTooLarge(
                f"request too large ({size} bytes, limit {self.options.max_bytes})"
            )
        self.events.info("Request announced", bytes=size)
        return recv_exactly(self.request, size, pace)

    def send_reply(self, slices: list[Slice]) -> int:
        """Send the slices' spooled results as one frame, in order, read as it goes; its length."""
        length = sum(slice_.results.seek(0, os.SEEK_END) for slice_ in slices)
        for slice_ in slices:
            slice_.results.seek(0)
        spooled = (
            block
            for slice_ in slices
            for block in iter(partial(slice_.results.read, worker.BLOCK_BYTES), b"")
        )
        send_frame(self.request, spooled, length, self.pace())
        return length

    def log_rejected_lines(self, payload: bytearray, slices: list[Slice]) -> None:
        """One DEBUG event per error line, with a bounded excerpt of the line (-vv only)."""
        for slice_ in slices:
            slice_.results.seek(0)
            for line, result in zip(worker.slice_lines(payload, *slice_.bounds), slice_.results):
                if result.startswith(b"error: "):
                    reason = result.decode()[len("error: ") : -1]
                    self.events.debug("Line rejected", line=repr(line)[:80], reason=reason)

    def reply_and_linger(self, reply: bytes) -> None:
        """Send reply, then discard what the client still sends for LINGER_S at most (nginx's lingering
        close): closing with unread data sends a reset, which can destroy the reply before it is read."""
        deadline = time.monotonic() + LINGER_S
        with contextlib.suppress(*CLIENT_FAILURES):  # a client gone or silent needs nothing more
            send_frame(self.request, [reply])
            self.request.shutdown(socket.SHUT_WR)
            self.request.settimeout(LINGER_S)
            while time.monotonic() < deadline and self.request.recv(1024 * 1024):
                pass


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


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Evaluate batches of arithmetic expressions sent over TCP, in worker processes.",
        epilog="examples:\n"
        "  python bluserver.py                  # localhost:1982, 2 workers per request\n"
        "  python bluserver.py -a 0.0.0.0 -p 2000 -n 4 -v --log-format json\n"
        "\nsignals: the first SIGINT (Ctrl-C) or SIGTERM stops accepting, lets requests in flight\n"
        "finish and exits 0; a second one ends them at once and exits 1.\n"
        "exit status: 1 if the address cannot be used, 2 on bad arguments.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("-a", "--address", default="localhost", help="address to listen on (default: %(default)s)")
    add(
        "-p",
        "--port",
        type=port_number,
        default=1982,
        help="TCP port, 0 for any free one (default: %(default)s)",
    )
    add(
        "-n",
        "--workers",
        type=positive_int,
        default=2,
        help="worker processes per request (default: %(default)s)",
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
    limit = parser.add_argument_group(
        "limits (README.md, 'Limits', says what happens at each)"
    ).add_argument
    limit(
        "--max-bytes",
        type=positive_int,
        default=256 * 2**20,
        metavar="BYTES",
        help="largest request (256 MiB)",
    )
    limit(
        "--max-reply-bytes",
        type=positive_int,
        default=2**30,
        metavar="BYTES",
        help="reply budget (1 GiB)",
    )
    limit(
        "--max-children",
        type=positive_int,
        default=16,
        metavar="N",
        help="requests handled at once (16)",
    )
    limit(
        "--client-timeout",
        dest="client_timeout_s",
        type=positive_float,
        default=30.0,
        metavar="SECONDS",
        help="longest silence of a client, and its initial allowance (30)",
    )
    limit(
        "--min-rate",
        type=positive_int,
        default=16384,
        metavar="BYTES_PER_S",
        help="slowest steady transfer, past the allowance (16384)",
    )
    limit(
        "--worker-timeout",
        dest="worker_timeout_s",
        type=positive_float,
        default=60.0,
        metavar="SECONDS",
        help="longest silence of a worker (60; workers report every 0.5 s)",
    )
    return parser.parse_args(argv)


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
