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
import json
import logging
import math
import multiprocessing
import os
import select
import signal
import socket
import socketserver
import sys
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from functools import partial
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import IO, Any, NoReturn

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
SD_LISTEN_FDS_START = 3  # systemd's protocol, sd_listen_fds(3): handed sockets start at fd 3
TCP_FAMILIES = (socket.AF_INET, socket.AF_INET6)

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


def slice_bounds(payload: bytes | bytearray, count: int) -> list[tuple[int, int]]:
    """At most count byte ranges of whole lines of about equal size; none for no payload."""
    cuts = [0]
    for number in range(1, count):
        # From one byte before the nominal cut: a line ending exactly there ends this range.
        newline = payload.find(b"\n", max(cuts[-1], len(payload) * number // count - 1))
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


class HandedSocketError(Exception):
    """The service manager says it handed a socket over, but it is not one the server can use."""


def socket_from_service_manager() -> socket.socket | None:
    """The listening socket systemd (or tools/cluster.py) handed over, per sd_listen_fds(3): at
    fd 3, when LISTEN_PID is this process and LISTEN_FDS is 1.  None when no socket is meant for
    this process: the server then binds its own (-a, -p).

    Raises HandedSocketError when one is meant for it but it is not a listening TCP socket.
    """
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None  # none at all, or meant for another process (a parent's, inherited)
    count = os.environ.get("LISTEN_FDS")
    # Unset, as sd_listen_fds(3) does: they describe this process, not the ones it forks.
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if count != "1":
        raise HandedSocketError(f"expected 1 socket from the service manager, not {count}")
    try:
        handed = socket.socket(fileno=SD_LISTEN_FDS_START)
    except OSError as error:
        raise HandedSocketError(f"fd 3 from the service manager: {error.strerror}") from None
    listening = handed.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    if handed.family not in TCP_FAMILIES or handed.type != socket.SOCK_STREAM or not listening:
        raise HandedSocketError("fd 3 from the service manager is not a listening TCP socket")
    handed.set_inheritable(False)  # no program the server runs needs it
    return handed


def notify_service_manager(state: str) -> None:
    """Tell the service manager what the server is doing, per sd_notify(3) ("READY=1",
    "STOPPING=1"): one datagram to the AF_UNIX socket named by $NOTIFY_SOCKET, an abstract one
    if the name starts with "@".  Nothing when it is unset: no manager asked."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        try:
            notify.sendto(state.encode(), address)
        except OSError as error:  # the manager has gone: the server goes on regardless
            server_events.warning("Service manager not told", state=state, reason=str(error))


class SignalPipe:
    """The signals the server handles, as one byte each in a pipe (``signal.set_wakeup_fd``).

    The pipe, not a Python-level handler, is the record: CPython runs a handler once for
    signals of one kind that arrive close together, but writes a byte for each; and the
    pipe wakes the select() that waits for a connection and a signal at once, so nothing
    blocks signals while the server waits (two SIGTERMs merged into one in sigwait()).
    """

    def __init__(self, signums: Sequence[signal.Signals]) -> None:
        self.reader, self.writer = os.pipe()
        os.set_blocking(self.reader, False)  # received() reads until it is empty
        os.set_blocking(self.writer, False)  # the C-level handler writes: it must never block
        signal.set_wakeup_fd(self.writer)
        for signum in signums:
            signal.signal(signum, self.noted)

    @staticmethod
    def noted(signum: int, frame: object) -> None:
        """Nothing to do: without a handler no byte is written; the byte is the record."""

    def received(self) -> list[signal.Signals]:
        """The signals that arrived since the last call, in order."""
        data = bytearray()
        with contextlib.suppress(BlockingIOError):  # nothing more to read
            while True:
                data += os.read(self.reader, 4096)
        return [signal.Signals(signum) for signum in data]

    def close(self) -> None:
        """Stop recording signals (in a forked handler: its signals are its own)."""
        signal.set_wakeup_fd(-1)
        os.close(self.reader)
        os.close(self.writer)


class BluServer(socketserver.ForkingTCPServer):
    """Listens, and forks a RequestHandler process per connection, ``max_children`` at once.

    One loop (serve_until_signalled, with ``wait``) waits in select() for a signal or for a
    connection to serve; while every slot is busy it does not look at the listener, and new
    connections wait in the backlog.  The connections it has accepted that have no handler
    yet wait in ``waiting``: the backlog, taken at shutdown, and one whose fork failed.
    """

    allow_reuse_address = True  # restart at once, while old connections sit in TIME_WAIT
    request_queue_size = socket.SOMAXCONN  # as long a backlog as the kernel allows: none refused
    # serve_until_signalled waits for the handlers itself, so that a second signal can stop them.
    block_on_close = False
    # After a fork fails (EAGAIN: out of processes), wait this long before trying again; the
    # loop still reacts to signals meanwhile, and new connections wait in the backlog.
    fork_retry_s = 0.1
    # At shutdown, take connections from the backlog for at most this long: a flood of new
    # ones must not keep the listener open.
    backlog_take_s = 0.5

    def __init__(self, options: argparse.Namespace, handed: socket.socket | None = None) -> None:
        """Bind options.address and options.port, or serve handed: a listening socket from the
        service manager (socket_from_service_manager)."""
        self.options = options
        self.max_children = options.max_children
        self.active_children: set[int] = set()  # the handlers' pids
        self.waiting: deque[tuple[socket.socket, Any]] = deque()  # accepted, no handler yet
        self.fork_retry_at = 0.0  # when to try again to fork a handler for waiting[0]
        self.fork_failed_for: socket.socket | None = None  # warned about once, not at each try
        self.shutdown_signal: str | None = None  # set by the first SIGINT or SIGTERM
        self.signals: SignalPipe | None = None  # set when serving starts
        super().__init__(
            (options.address, options.port), RequestHandler, bind_and_activate=handed is None
        )
        if handed:
            self.socket.close()  # the one TCPServer made, never bound
            self.socket = handed
            self.server_address = handed.getsockname()
        # A handed socket may be shared: another process may take a connection between this
        # one's select() and accept(), which must then not block.
        self.socket.setblocking(False)
        self.defers_accept = hasattr(socket, "TCP_DEFER_ACCEPT")  # Linux's, as nginx uses it
        if self.defers_accept:
            # The kernel keeps a connection from accept() until the client has sent something,
            # for up to --client-timeout seconds (nginx's "deferred", HAProxy's
            # "defer-accept"): one that sends nothing takes no handler.  Set on a handed
            # socket too: the option lives in the socket, and the server knows the timeout.
            allowance_s = math.ceil(options.client_timeout_s)
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, allowance_s)

    def wait(self) -> bool:
        """Wait for a signal, and act on it, or for a connection to serve while a slot is free:
        a waiting one once its retry is due, else one in the backlog.  True if one is due now."""
        assert self.signals, "serving has started"
        readers: list[Any] = [self.signals.reader]
        timeout_s = None  # for ever, until a signal (SIGCHLD: a slot is free) or a connection
        if self.slot_free() and self.waiting:
            timeout_s = max(0.0, self.fork_retry_at - time.monotonic())
        elif self.slot_free() and not self.shutdown_signal:
            readers.append(self.socket)
        readable, _, _ = select.select(readers, [], [], timeout_s)
        for signum in self.signals.received():
            self.act_on_signal(signum)
        if not self.slot_free():
            return False
        if self.waiting:
            return time.monotonic() >= self.fork_retry_at
        return self.socket in readable and not self.shutdown_signal

    def slot_free(self) -> bool:
        return len(self.active_children) < self.max_children

    def act_on_signal(self, signum: signal.Signals) -> None:
        """SIGCHLD: reap.  The first SIGINT or SIGTERM: shut down.  Any later one: stop at once."""
        if signum == signal.SIGCHLD:
            self.collect_children()
        elif not self.shutdown_signal:
            self.begin_shutdown(signum)
        else:
            self.stop_now(signum)

    def serve_next(self) -> None:
        """Hand the next connection to a handler, as socketserver's handle_request() does, unless
        it is not worth one (verify_request)."""
        try:
            request, client_address = self.get_request()
        except OSError:  # as socketserver: another process took it first, or it was reset
            return
        if self.verify_request(request, client_address):
            self.process_request(request, client_address)
        else:
            self.shutdown_request(request)

    def get_request(self) -> tuple[socket.socket, Any]:
        """The first waiting connection, else one from the backlog (BlockingIOError if none)."""
        if self.waiting:
            return self.waiting.popleft()
        return self.socket.accept()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """False for a connection that has sent nothing: under deferred accept, the kernel hands
        one over only after --client-timeout seconds of silence, its whole allowance."""
        if not self.defers_accept:
            return True
        try:
            request.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)  # left for the handler
        except BlockingIOError:
            silent_s = self.options.client_timeout_s
            reason = f"sent nothing within --client-timeout ({silent_s:g} s)"
            server_events.warning("Client failed", peer=client_address, reason=reason)
            return False
        return True

    def process_request(self, request: Any, client_address: Any) -> None:
        """Fork a handler for the connection (ForkingMixIn's); if fork() fails (EAGAIN: out of
        processes, or ENOMEM), keep the connection and try again after fork_retry_s.

        SIGINT and SIGTERM wait while the process splits, until the child no longer writes to
        the server's signal pipe (finish_request): a Ctrl-C reaches both, and must count once.
        """
        signal.pthread_sigmask(signal.SIG_BLOCK, SHUTDOWN_SIGNALS)
        try:
            super().process_request(request, client_address)
        except OSError as error:  # from fork(), before anything was started
            if request is not self.fork_failed_for:
                reason = f"cannot start: {error}"
                retry_in_s = self.fork_retry_s
                server_events.warning("Handler failed", reason=reason, retry_in_s=retry_in_s)
            self.fork_failed_for = request
            self.waiting.appendleft((request, client_address))
            self.fork_retry_at = time.monotonic() + self.fork_retry_s
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SHUTDOWN_SIGNALS)

    def finish_request(self, request: Any, client_address: Any) -> None:
        """In the handler just forked (ForkingMixIn calls this in the child only): let go of
        what is the server's — its signal pipe, the connections waiting for other handlers —
        then run the handler."""
        assert self.signals, "serving has started"
        self.signals.close()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for waiting_request, _ in self.waiting:
            waiting_request.close()
        self.waiting.clear()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SHUTDOWN_SIGNALS)  # blocked for the fork
        super().finish_request(request, client_address)

    def collect_children(self, *, blocking: bool = False) -> None:
        """Reap every handler that has exited, never waiting for one: the loop waits, in
        select(), for the SIGCHLD that says one has.  (blocking: ForkingMixIn's parameter,
        always False here since block_on_close is.)"""
        while self.active_children:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:  # no child left
                return
            if not pid:  # none has exited
                return
            self.active_children.discard(pid)  # forgotten once reaped: its pid may be reused

    def begin_shutdown(self, signum: signal.Signals) -> None:
        """The first SIGINT or SIGTERM: take the connections waiting in the backlog, to be
        served, then close the listener: new connections are refused (a balancer retries
        them elsewhere), or wait in the socket's backlog if a service manager holds it."""
        self.shutdown_signal = signum.name
        self.take_backlog()
        self.server_close()
        notify_service_manager("STOPPING=1")
        server_events.warning(
            "Shutting down",
            signal=signum.name,
            requests_in_flight=len(self.active_children),
            requests_waiting=len(self.waiting),
        )

    def take_backlog(self) -> None:
        """Accept every connection in the listen backlog: closing the listener would reset them,
        and a balancer that has already sent a request on one cannot send it again."""
        deadline = time.monotonic() + self.backlog_take_s
        while time.monotonic() < deadline:
            try:
                self.waiting.append(self.socket.accept())
            except BlockingIOError:  # the backlog is empty
                return
            except OSError as error:  # e.g. out of file descriptors: the rest are reset
                server_events.warning("Backlog not taken", reason=str(error))
                return

    def stop_now(self, signum: signal.Signals) -> NoReturn:
        """A second SIGINT or SIGTERM: kill every handler and its workers, close the waiting
        connections, and exit 1."""
        for pid in self.active_children:
            with contextlib.suppress(ProcessLookupError):  # it has just exited
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):  # no group yet: killed before setup
                os.killpg(pid, signal.SIGKILL)  # its workers, in the process group it made
        for request, _ in self.waiting:
            self.shutdown_request(request)
        server_events.warning("Stopped at once", signal=signum.name)
        raise SystemExit(1)


def serve_until_signalled(server: BluServer) -> None:
    """Serve until SIGINT or SIGTERM; then serve the connections in flight, waiting or in the
    backlog, and return once every handler has exited.  A second signal kills them (exit 1)."""
    server.signals = SignalPipe([*SHUTDOWN_SIGNALS, signal.SIGCHLD])
    host, port = server.socket.getsockname()[:2]
    workers = server.options.workers
    banner = f"bluserver: serving on {host}:{port} with up to {workers} workers per request"
    print(banner, flush=True)
    server_events.info("Server started", **{**vars(server.options), "address": host, "port": port})
    notify_service_manager("READY=1")
    while not server.shutdown_signal or server.active_children or server.waiting:
        if server.wait():
            server.serve_next()
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
        server = BluServer(options, socket_from_service_manager())
    except HandedSocketError as error:
        raise SystemExit(f"bluserver: {error}") from None  # exit status 1
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
