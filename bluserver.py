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
import errno
import functools
import logging
import math
import multiprocessing
import socket
import socketserver
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any, Callable

import guard
import serving
import supervise
import worker

# The protocol is client.py's, imported rather than written twice: both sides frame, count
# lines and refuse with the same code, and the client stays one file that people can copy.
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

# === The lesson: one request, from its connection to its reply ===========================

# Forked whatever the default start method (3.14: forkserver): ~1 ms, where spawn costs ~100 ms,
# and a forked worker shares the request's memory with its handler instead of being sent it.
FORK = multiprocessing.get_context("fork")

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
    """The handler's end of one worker: a range of whole lines of the request
    (payload[start:end], which the worker evaluates), the worker process, the Pipe it answers
    by, and its results.

    The results go to a nameless temporary file: they cost no memory however large the reply,
    and the file vanishes however the handler ends.
    """

    def __init__(self, payload: bytearray, bounds: tuple[int, int], event_log: EventLog) -> None:
        self.payload = payload
        self.start = bounds[0]
        self.end = bounds[1]
        self.event_log = event_log
        self.results = tempfile.TemporaryFile()  # noqa: SIM115 (see close)
        self.results_size = 0
        self.error_lines = 0
        self.finished = False  # once the worker has sent END_OF_SLICE
        self.process: BaseProcess | None = None
        self.receiver: Connection | None = None  # the handler's end of the worker's Pipe

    def start_worker(self, name: str) -> None:
        """Fork a worker process on payload[start:end], linked to this one by a Pipe."""
        receiver, sender = FORK.Pipe(duplex=False)
        self.receiver = receiver
        args = (sender, self.payload, self.start, self.end)
        self.process = FORK.Process(target=worker.evaluate_slice, args=args, name=name)
        try:
            self.process.start()
        finally:
            sender.close()  # the worker's copy only: its death shows here as end of file
        pid = self.process.pid
        self.event_log.info("Worker started", worker=name, worker_pid=pid)

    def receive(self) -> None:
        """Take one message from the worker (wait() said there is one): results, or
        END_OF_SLICE.  Raises EOFError if the worker has ended without END_OF_SLICE: it died
        (supervise.py runs its lines again)."""
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

    def close(self) -> None:
        """Reap the worker, and let go of its Pipe and of the results (once they are sent)."""
        self.stop_worker()
        self.results.close()

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
                slice_.close()
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
        """The client has said how many bytes its request has (guard.py refuses here a
        request larger than --max-bytes, before reading it)."""
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
        """The running slices whose worker has sent a message (or closed its end of the
        Pipe), once there is at least one."""
        ready = self.wait_for_workers(running)
        return [slice_ for slice_ in running if slice_.receiver in ready]

    def wait_for_workers(self, running: list[Slice]) -> list[Any]:
        """Wait until a running slice's receiver has a message (or its worker's end of file);
        return the receivers that have.  multiprocessing.connection.wait() watches every
        Pipe at once."""
        receivers: list[Any] = [slice_.receiver for slice_ in running]
        return wait(receivers)

    def send_reply(self, slices: list[Slice]) -> int:
        """Send the slices' results as one frame, in order, read back a chunk at a time; return
        its length."""
        length = sum(slice_.results_size for slice_ in slices)
        chunks = (chunk for slice_ in slices for chunk in slice_.result_chunks())
        send_frame(self.connection, chunks, length, self.pace_reply())
        return length


class BluServer(socketserver.ForkingTCPServer):
    """Listens on -a and -p, and forks a RequestHandler process per connection, at most
    max_children at once: socketserver's ForkingTCPServer as it is meant to be used, set up
    by class attributes and its constructor.

    Alone, it serves with socketserver's own loop (``BluServer(options).serve_forever()``,
    until Ctrl-C; tests/lesson_server.py runs it so).  main() runs ArmouredServer: this class
    with the armour of the server process (serving.py) composed over it.  Of socketserver,
    ArmouredServer uses

    - as they are: TCPServer's bind, listen and close; ForkingMixIn's fork and its child's end
      (shutdown_request, os._exit); handle_error;
    - extended, calling socketserver's own: server_bind (HandedListener: a socket handed
      over), server_activate (HandedListener, DeferredAccept, SignalledServing),
      verify_request (DeferredAccept), process_request (SignalledServing: the fork sequence;
      ForkRetry: a fork that fails), finish_request (SignalledServing: the child's steps);
    - replaced: serve_forever and the steps of one connection (SignalledServing's, whose
      docstring says why), get_request (the connections already accepted first),
      service_actions (acting on signals) and collect_children (never waiting); so
      handle_request, handle_timeout and shutdown are unused.
    """

    allow_reuse_address = True  # restart at once, while old connections sit in TIME_WAIT
    request_queue_size = socket.SOMAXCONN  # as long a backlog as the kernel allows: none refused
    handler_class: type[RequestHandler] = RequestHandler  # forked for each connection

    def __init__(self, options: argparse.Namespace) -> None:
        self.options = options  # what the handlers read theirs from
        self.max_children = options.max_children
        # TCPServer makes an IPv4 socket unless told otherwise: the address says which.
        self.address_family = address_family(options.address)
        super().__init__((options.address, options.port), self.handler_class)


def address_family(host: str) -> socket.AddressFamily:
    """AF_INET if host is or names an IPv4 address ('localhost' among them, as TCPServer
    assumes), else AF_INET6 ('::1', '::', a name with IPv6 addresses only).  Raises
    socket.gaierror for a name that resolves to neither."""
    found = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    families = {family for family, *_ in found}
    return socket.AF_INET if socket.AF_INET in families else socket.AF_INET6


# === The server people run: the lesson, with its armour composed over it =================


class SupervisedSlice(supervise.SliceSupervision, Slice):
    """The lesson's Slice, its worker supervised (supervise.py)."""


class GuardedRequestHandler(
    RejectedLinesLog, guard.ClientGuard, supervise.WorkerSupervision, RequestHandler
):
    """The lesson's RequestHandler, guarded toward its client (guard.py), supervising its
    workers (supervise.py), and logging rejected lines at -vv (events.py)."""

    slice_class = SupervisedSlice


class ArmouredServer(
    serving.SignalledServing,
    serving.DeferredAccept,
    serving.HandedListener,
    BluServer,
):
    """The server main() runs: BluServer, with the armour of the server process composed over
    it as socketserver composes ForkingTCPServer.  Each class of serving.py opens with the
    failures it handles: signals (a drain, then a stop) and a fork that fails, a connection
    that sends nothing, a listening socket handed over by a process manager.

    The order matters where two classes override one hook, each calling the next:

    - SignalledServing first: its process_request must wrap any other class's (a fork only
      inside the signal mask), and its finish_request take the child's first steps (its
      own process group, its own signals) before any other runs in the child.  No other
      class overrides either today.
    - DeferredAccept before HandedListener: HandedListener.server_activate does not call
      super() for a handed socket (it listens already), and deferred accept is set on it too.
    - HandedListener before BluServer: its server_bind takes the handed socket instead of
      TCPServer's bind.
    """

    handler_class = GuardedRequestHandler


# === The command line ============================================================================


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
MAX_FD = 2**31 - 1  # the largest file descriptor number (a C int)
# The shortest --worker-timeout: under a second, a moment of a busy machine's scheduling
# would look like a worker's silence.
MIN_WORKER_TIMEOUT_S = 1.0
MIN_REPLY_BYTES = 1024  # a refusal line must fit in a reply

EPILOG = """\
examples:
  python bluserver.py                  # localhost:1982, up to 2 workers per request
  python bluserver.py -a 0.0.0.0 -p 2000 -n 4 -v --log-format json
  python bluserver.py -a ::1           # IPv6; -a :: takes IPv6 and IPv4 on Linux

signals:
  The first SIGINT (Ctrl-C) or SIGTERM takes the connections already waiting in the listen
  backlog, closes the listening socket, serves those connections and the requests in flight,
  and exits 0.  A second one ends them at once and exits 1.  If no handler can be started
  (out of processes) for 3 s of the drain, the connections still waiting are answered with
  one error line ("error: server cannot start a handler (...); try again later").

a listening socket handed over (the address is then the socket's: -a and -p are unused):
  --fd N             serve the listening TCP socket open at file descriptor N, as a process
                     manager hands one over (circus: --fd $(circus.sockets.NAME))
  socket activation  started by systemd with a listening socket (LISTEN_PID, LISTEN_FDS, the
                     socket at fd 3), the server serves it (deploy/bluserver@.socket) and
                     tells systemd when it serves and stops (sd_notify, $NOTIFY_SOCKET)
  --fd wins if both are given.

exit status:
  0  stopped by a signal, after the drain
  1  the address cannot be used, a socket handed over is not a listening TCP socket, or a
     second signal stopped the server at once
  2  bad arguments
"""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Evaluate arithmetic expressions sent over TCP, one per line, in worker "
        "processes.\nA client sends a request of lines; the reply has one result line per line.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add(
        "-a",
        "--address",
        default="localhost",
        help="address to listen on, IPv4 or IPv6 (default: %(default)s)",
    )
    add(
        "-p",
        "--port",
        type=whole_number(0, 65535),
        default=1982,
        help="TCP port, 0 for any free one (default: %(default)s)",
    )
    add(
        "--fd",
        type=whole_number(0, MAX_FD),
        metavar="N",
        help="serve the listening socket open at file descriptor N instead of -a and -p",
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
        parser.add_argument_group("limits (OPERATIONS.md, 'Limits', says what happens at each)")
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
        help="largest reply, at least 1024 (a refusal line must fit); a request whose reply "
        "would be larger is refused (1 GiB)",
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
        help="longest silence of a client; sending a request or reading a reply may take "
        "this long plus a second per --min-rate bytes (30)",
    )
    group.add_argument(
        "--min-rate",
        type=whole_number(1, 2**30),
        default=16384,
        metavar="BYTES_PER_S",
        help="slowest steady transfer of a request or reply, past --client-timeout (16384)",
    )
    group.add_argument(
        "--worker-timeout",
        dest="worker_timeout_s",
        type=seconds(MIN_WORKER_TIMEOUT_S, DAY_S),
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
    server = open_server(options)
    announce(server)
    # Until the first SIGINT or SIGTERM, then the drain (serving.SignalledServing).
    server.serve_until_signalled()
    server_log.warning("Server stopped")


def open_server(options: argparse.Namespace) -> ArmouredServer:
    """The server, listening; if it cannot listen, exit 1 with one line on stderr."""
    try:
        return ArmouredServer(options)
    except serving.HandedSocketError as error:
        raise SystemExit(f"bluserver: {error}") from None
    except OSError as error:
        where = (
            f"port {options.port} is already in use (try -p)"
            if error.errno == errno.EADDRINUSE
            else (f"cannot listen on {options.address}:{options.port}: {error.strerror or error}")
        )
        raise SystemExit(f"bluserver: {where}") from None


def announce(server: BluServer) -> None:
    """The banner on stdout, which says where the server listens (the port, if -p 0 let the
    kernel pick it), and the log's first event."""
    host, port = server.socket.getsockname()[:2]
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    workers = server.options.max_workers
    print(f"bluserver: serving on {shown} with up to {workers} workers per request", flush=True)
    server_log.info("Server started", **{**vars(server.options), "address": host, "port": port})


if __name__ == "__main__":
    main()
