"""bluserver: evaluates arithmetic expressions sent over TCP, one per line, in worker processes.

Usage: ``python bluserver.py -p 1982 -n 2``.  README.md has the protocol, the limits and a
reading guide.  This module is the lesson: a ``socketserver.ForkingTCPServer`` whose handler
cuts each request into slices and evaluates each slice in a ``multiprocessing.Process``,
linked to it by a ``multiprocessing.Pipe``.  One request, through the three kinds of process::

    client ──[length, lines]──▶ BluServer.serve_forever        server process: accepts, and
                                  │ ForkingMixIn.process_request  forks a handler per connection
                                  ▼
                RequestHandler.handle                          handler process:
                  receive_request                                the request's bytes
                  slice_bounds                                   ≤ n ranges of whole lines
                  Slice.start_worker, per slice                  a Process and a Pipe each
                       │                    │
        worker.evaluate_slice      worker.evaluate_slice      worker processes: results up
                       │ send_bytes         │ send_bytes        the Pipe, then END_OF_SLICE
                       ▼                    ▼
                  collect_results: wait(), Slice.receive        recv_bytes, into a nameless
                       └─────────┬──────────┘                   temporary file per slice
                                 ▼
    client ◀──[length, results]── send_reply                   read back in order

The other modules: worker.py is the worker process, grammar.py the language, client.py the
wire protocol (and the client), events.py the log.  What can go wrong lives apart, each piece
in a place that opens with the failures it handles, attached through socketserver's hooks and
the lesson's: guard.py (the client), supervise.py (the workers), serving.py (the server
process: signals, draining, handed sockets).  The classes the server runs compose the lesson
with them, as socketserver composes ``ForkingMixIn`` with ``TCPServer``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
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
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any, Callable, NoReturn

import guard
import supervise
import worker
from client import (
    CHUNK_BYTES,
    ERROR_PREFIX,
    HEADER,
    BeforeWait,
    count_lines,
    recv_exactly,
    send_frame,
)
from events import EventFormatter, EventLog, RejectedLinesLog, logger, server_log

SHUTDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM)
SD_LISTEN_FDS_START = 3  # systemd's protocol, sd_listen_fds(3): handed sockets start at fd 3
TCP_FAMILIES = (socket.AF_INET, socket.AF_INET6)


# === The lesson: one request, from its connection to its reply ===========================

# Forked whatever the default start method (3.14: forkserver): ~1 ms, where spawn costs ~100 ms,
# and a forked worker shares the request's memory with its handler instead of being sent it.
WORKERS = multiprocessing.get_context("fork")

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
    """The handler's end of one worker: a range of whole lines of the request, the worker
    process evaluating it, the Pipe it answers by, and its results.

    The results go to a nameless temporary file: they cost no memory however large the reply,
    and the file vanishes however the handler ends.
    """

    def __init__(self, payload: bytearray, bounds: tuple[int, int], event_log: EventLog) -> None:
        self.payload = payload
        self.start = bounds[0]
        self.end = bounds[1]
        self.event_log = event_log
        self.results = tempfile.TemporaryFile()  # noqa: SIM115 (closed by the handler, after the reply)
        self.results_size = 0
        self.error_lines = 0
        self.finished = False  # once the worker has sent END_OF_SLICE
        self.process: BaseProcess | None = None
        self.receiver: Connection | None = None  # the handler's end of the worker's Pipe

    def start_worker(self, name: str) -> None:
        """Fork a worker process on payload[start:end], linked to this one by a Pipe."""
        receiver, sender = WORKERS.Pipe(duplex=False)
        self.receiver = receiver
        args = (sender, self.payload, self.start, self.end)
        self.process = WORKERS.Process(target=worker.evaluate_slice, args=args, name=name)
        try:
            self.process.start()
        finally:
            sender.close()  # the worker's copy only: its death shows here as end of file
        pid = self.process.pid
        self.event_log.info("Worker started", worker=name, worker_pid=pid)

    def receive(self) -> None:
        """Take one message from the worker (wait() said there is one): results, or
        END_OF_SLICE."""
        assert self.receiver, "only a running worker sends"
        message = self.receiver.recv_bytes()
        if message == worker.END_OF_SLICE:
            self.finished = True
            self.event_log.info("Worker finished", worker=self.name)
        else:
            self.store(message)

    def store(self, results: bytes) -> None:
        self.results.write(results)
        self.results_size += len(results)
        self.error_lines += results.count(ERROR_PREFIX)

    @property
    def name(self) -> str:
        return self.process.name if self.process else "worker"

    def stop_worker(self) -> None:
        """Reap the worker, which exits once it has sent END_OF_SLICE; let go of its Pipe."""
        if self.process:
            self.process.join()
        if self.receiver:
            self.receiver.close()

    def result_chunks(self) -> Iterator[bytes]:
        """Every result stored, from the start, CHUNK_BYTES at a time."""
        self.results.seek(0)
        return iter(functools.partial(self.results.read, CHUNK_BYTES), b"")


class RequestHandler(socketserver.BaseRequestHandler):
    """Receives one request, evaluates it in workers, sends the reply.  Runs in its own process:
    ForkingMixIn forks one per connection, and calls setup, handle and finish in it."""

    server: BluServer
    request: socket.socket  # socketserver's name for the connection: see setup
    connection: socket.socket
    options: argparse.Namespace
    event_log: EventLog
    slice_class: type[Slice] = Slice

    def setup(self) -> None:
        # Own process group: a terminal's Ctrl-C reaches only the server, and killpg() ends
        # the workers.
        os.setpgid(0, 0)
        for signum in SHUTDOWN_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        self.server.socket.close()  # only the server accepts
        multiprocessing.current_process().name = "handler"
        self.options = self.server.options
        self.event_log = EventLog(logger, {"uuid": uuid.uuid4().hex})
        # As socketserver.StreamRequestHandler does, the connection is named "connection":
        # socketserver calls it "request", and here a request is the message that comes over it.
        self.connection = self.request
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def handle(self) -> None:
        """Receive the request, cut it into slices, evaluate each in a worker, send the reply;
        reap every worker, whatever happens."""
        self.event_log.info("Incoming connection", peer=self.client_address)
        started = time.monotonic()
        payload = self.receive_request()
        ranges = slice_bounds(payload, self.options.max_workers)
        slices = self.new_slices(payload, ranges)
        try:
            for number, slice_ in enumerate(slices, 1):
                slice_.start_worker(f"worker-{number}")
            self.collect_results(slices)
            bytes_out = self.send_reply(slices)
        finally:
            for slice_ in slices:
                slice_.stop_worker()
                slice_.results.close()
        self.event_log.info(
            "Request served",
            lines=count_lines(payload),
            error_lines=sum(slice_.error_lines for slice_ in slices),
            bytes_in=len(payload),
            bytes_out=bytes_out,
            slices=len(slices),
            seconds=round(time.monotonic() - started, 6),
            cpu_s=round(worker.reaped_workers_cpu_s(), 3),  # the workers', all reaped by now
        )

    def receive_request(self) -> bytearray:
        """The request's bytes: its length (HEADER), then that many bytes."""
        pace = self.pace_request()
        (size,) = HEADER.unpack(recv_exactly(self.connection, HEADER.size, pace))
        self.announced(size)
        return recv_exactly(self.connection, size, pace)

    def pace_request(self) -> BeforeWait | None:
        """What recv_exactly calls before each wait for the request; None: wait as long as
        the client takes (guard.ClientGuard bounds it)."""
        return None

    def pace_reply(self) -> BeforeWait | None:
        """What send_frame calls before each wait for the client to take more of the reply."""
        return None

    def announced(self, size: int) -> None:
        """The client has said how many bytes its request has."""
        self.event_log.info("Request announced", bytes=size)

    def new_slices(self, payload: bytearray, ranges: list[tuple[int, int]]) -> list[Slice]:
        return [self.slice_class(payload, bounds, self.event_log) for bounds in ranges]

    def collect_results(self, slices: list[Slice]) -> None:
        """Take the workers' messages as they arrive, until each worker has sent END_OF_SLICE."""
        running = slices
        while running:
            for slice_ in self.slices_with_messages(running):
                slice_.receive()
            running = [slice_ for slice_ in slices if not slice_.finished]

    def slices_with_messages(self, running: list[Slice]) -> list[Slice]:
        """Wait until at least one running slice's worker has sent a message (or closed its
        end of the Pipe); return those slices.  wait() watches every Pipe at once."""
        receivers: list[Any] = [slice_.receiver for slice_ in running]
        ready = wait(receivers)
        return [slice_ for slice_ in running if slice_.receiver in ready]

    def send_reply(self, slices: list[Slice]) -> int:
        """Send the slices' results as one frame, in order, read back a chunk at a time; return
        its length."""
        length = sum(slice_.results_size for slice_ in slices)
        chunks = (chunk for slice_ in slices for chunk in slice_.result_chunks())
        send_frame(self.connection, chunks, length, self.pace_reply())
        return length


# === The handler the server runs: the lesson's, with its armour attached ===================


class SupervisedSlice(supervise.Supervision, Slice):
    """The lesson's Slice, its worker supervised (supervise.py)."""


class GuardedRequestHandler(
    RejectedLinesLog, guard.ClientGuard, supervise.WorkerSupervision, RequestHandler
):
    """The lesson's RequestHandler, guarded toward its client (guard.py), supervising its
    workers (supervise.py), and logging rejected lines at -vv (events.py)."""

    slice_class = SupervisedSlice


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
            server_log.warning("Service manager not told", state=state, reason=str(error))


class SignalPipe:
    """The signals the server handles, as one byte each in a pipe (``signal.set_wakeup_fd``).

    The pipe, not a Python-level signal handler, is the record: CPython runs a signal handler
    once for
    signals of one kind that arrive close together, but writes a byte for each; and the
    pipe wakes the select() that waits for a connection and a signal at once, so nothing
    blocks signals while the server waits (two SIGTERMs merged into one in sigwait()).
    """

    def __init__(self, signums: Sequence[signal.Signals]) -> None:
        self.reader, self.writer = os.pipe()
        os.set_blocking(self.reader, False)  # received() reads until it is empty
        os.set_blocking(self.writer, False)  # C's signal handler writes: it must never block
        signal.set_wakeup_fd(self.writer)
        for signum in signums:
            signal.signal(signum, self.noted)

    @staticmethod
    def noted(signum: int, frame: object) -> None:
        """Nothing to do: without a signal handler no byte is written; the byte is the record."""

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
            (options.address, options.port),
            GuardedRequestHandler,
            bind_and_activate=handed is None,
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
        readable = select.select(readers, [], [], timeout_s)[0]  # those of readers ready
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
            connection, client_address = self.get_request()
        except OSError:  # as socketserver: another process took it first, or it was reset
            return
        if self.verify_request(connection, client_address):
            self.process_request(connection, client_address)
        else:
            self.shutdown_request(connection)

    def get_request(self) -> tuple[socket.socket, Any]:
        """The first waiting connection, else one from the backlog (BlockingIOError if none)."""
        if self.waiting:
            return self.waiting.popleft()
        return self.socket.accept()

    def verify_request(self, connection: Any, client_address: Any) -> bool:
        """False for a connection that has sent nothing: under deferred accept, the kernel hands
        one over only after --client-timeout seconds of silence, its whole allowance."""
        if not self.defers_accept:
            return True
        try:
            connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)  # left for the handler
        except BlockingIOError:
            silent_s = self.options.client_timeout_s
            reason = f"sent nothing within --client-timeout ({silent_s:g} s)"
            server_log.warning("Client failed", peer=client_address, reason=reason)
            return False
        return True

    def process_request(self, connection: Any, client_address: Any) -> None:
        """Fork a handler for the connection (ForkingMixIn's); if fork() fails (EAGAIN: out of
        processes, or ENOMEM), keep the connection and try again after fork_retry_s.

        SIGINT and SIGTERM wait while the process splits, until the child no longer writes to
        the server's signal pipe (finish_request): a Ctrl-C reaches both, and must count once.
        """
        signal.pthread_sigmask(signal.SIG_BLOCK, SHUTDOWN_SIGNALS)
        try:
            super().process_request(connection, client_address)
        except OSError as error:  # from fork(), before anything was started
            if connection is not self.fork_failed_for:
                reason = f"cannot start: {error}"
                retry_in_s = self.fork_retry_s
                server_log.warning("Handler not started", reason=reason, retry_in_s=retry_in_s)
            self.fork_failed_for = connection
            self.waiting.appendleft((connection, client_address))
            self.fork_retry_at = time.monotonic() + self.fork_retry_s
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SHUTDOWN_SIGNALS)

    def finish_request(self, connection: Any, client_address: Any) -> None:
        """In the handler just forked (ForkingMixIn calls this in the child only): let go of
        what is the server's — its signal pipe, the connections waiting for other handlers —
        then run the handler."""
        assert self.signals, "serving has started"
        self.signals.close()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for waiting_connection, _ in self.waiting:
            waiting_connection.close()
        self.waiting.clear()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SHUTDOWN_SIGNALS)  # blocked for the fork
        super().finish_request(connection, client_address)

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
        server_log.warning(
            "Shutting down",
            signal=signum.name,
            requests_in_flight=len(self.active_children),
            connections_waiting=len(self.waiting),
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
                server_log.warning("Backlog not taken", reason=str(error))
                return

    def stop_now(self, signum: signal.Signals) -> NoReturn:
        """A second SIGINT or SIGTERM: kill every handler and its workers, close the waiting
        connections, and exit 1."""
        for pid in self.active_children:
            with contextlib.suppress(ProcessLookupError):  # it has just exited
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):  # no group yet: killed before setup
                os.killpg(pid, signal.SIGKILL)  # its workers, in the process group it made
        for connection, _ in self.waiting:
            self.shutdown_request(connection)
        server_log.warning("Stopped at once", signal=signum.name)
        raise SystemExit(1)


def serve_until_signalled(server: BluServer) -> None:
    """Serve until SIGINT or SIGTERM; then serve the connections in flight, waiting or in the
    backlog, and return once every handler has exited.  A second signal kills them (exit 1)."""
    server.signals = SignalPipe([*SHUTDOWN_SIGNALS, signal.SIGCHLD])
    host, port = server.socket.getsockname()[:2]
    workers = server.options.max_workers
    banner = f"bluserver: serving on {host}:{port} with up to {workers} workers per request"
    print(banner, flush=True)
    server_log.info("Server started", **{**vars(server.options), "address": host, "port": port})
    notify_service_manager("READY=1")
    while not server.shutdown_signal or server.active_children or server.waiting:
        if server.wait():
            server.serve_next()
    server_log.warning("Server stopped")


def whole_number(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number from low to high."""

    def parse(text: str) -> int:
        if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
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
MIN_REPLY_BYTES = 1024  # a refusal is one line sent instead of the results: it must fit


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Evaluate arithmetic expressions sent over TCP, one per line, in worker "
        "processes.\nA client sends a request of lines; the reply has one result line per line.",
        epilog="examples:\n"
        "  python bluserver.py                  # localhost:1982, up to 2 workers per request\n"
        "  python bluserver.py -a 0.0.0.0 -p 2000 -n 4 -v --log-format json\n"
        "\nsignals: the first SIGINT (Ctrl-C) or SIGTERM takes the connections already waiting,\n"
        "stops accepting, serves them and the requests in flight, and exits 0; a second one\n"
        "ends them at once and exits 1.\n"
        "socket activation: started by systemd with a listening socket (LISTEN_PID,\n"
        "LISTEN_FDS), it serves that socket and ignores -a and -p (deploy/bluserver@.socket).\n"
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
        dest="max_workers",
        metavar="WORKERS",
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
        type=whole_number(MIN_REPLY_BYTES, 2**40),
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
        type=seconds(1.0, DAY_S),
        default=60.0,
        metavar="SECONDS",
        help="longest silence of a worker that uses no CPU (60)",
    )
    group.add_argument(
        "--cpu-floor",
        dest="cpu_floor_s",
        type=seconds(0.1, DAY_S),
        default=2.0,
        metavar="SECONDS",
        help="CPU time every request's workers may use, whatever its size (2)",
    )
    group.add_argument(
        "--cpu-per-mib",
        dest="cpu_per_mib_s",
        type=seconds(0.0, DAY_S),
        default=5.0,
        metavar="SECONDS",
        help="more CPU time allowed per MiB of request; past floor plus this, the request is "
        "refused (5)",
    )


def main(argv: Sequence[str] | None = None) -> None:
    options = parse_args(argv)
    multiprocessing.current_process().name = "server"
    log_output = logging.StreamHandler(sys.stdout)
    log_output.setFormatter(EventFormatter(as_json=options.log_format == "json"))
    logger.addHandler(log_output)
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
