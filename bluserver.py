"""bluserver: evaluates arithmetic expressions sent over TCP, one per line, in worker processes.

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
from typing import Callable

import serving
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
from events import EventFormatter, EventLog, logger, server_log
from serving import SHUTDOWN_SIGNALS

LINGER_S = 2.0  # how long a handler reads what a client still sends, so it can read the reply
CLIENT_FAILURES = (socket.timeout, ConnectionError)  # silent or too slow; closed or reset
EXCERPT_CHARS = 80  # how much of a rejected line -vv logs


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
    request: socket.socket  # socketserver's name for the connection: see setup

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
        # socketserver calls the connection "request" (as StreamRequestHandler does, this
        # names it "connection"): here a request is the message that comes over it.
        self.connection = self.request
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def handle(self) -> None:
        started = time.monotonic()
        self.event_log.info("Incoming connection", peer=self.client_address)
        try:
            payload = self.receive_request()
            self.evaluate_and_reply(payload, started)
        except REFUSALS as error:
            self.event_log.warning("Request refused", reason=str(error))
            self.reply_and_linger(f"error: {error}\n".encode())
        except CLIENT_FAILURES as error:
            self.event_log.warning("Client failed", reason=str(error) or "timed out")

    def evaluate_and_reply(self, payload: bytearray, started: float) -> None:
        """Evaluate payload in workers, send the reply, log the request's summary, linger."""
        ranges = slice_bounds(payload, self.options.max_workers)
        with worker.evaluate_in_workers(
            payload,
            ranges,
            self.connection,
            worker_timeout_s=self.options.worker_timeout_s,
            max_reply_bytes=self.options.max_reply_bytes,
            event_log=self.event_log,
        ) as slices:
            bytes_out = self.send_reply(slices)
            if self.event_log.isEnabledFor(logging.DEBUG):
                self.log_rejected_lines(payload, slices)
        # Logged once the workers are reaped (leaving the with block), so that the summary is last.
        self.event_log.info(
            "Request served",
            lines=count_lines(payload),
            error_lines=sum(slice_.error_lines for slice_ in slices),
            bytes_in=len(payload),
            bytes_out=bytes_out,
            slices=len(slices),
            seconds=round(time.monotonic() - started, 6),
        )
        self.linger()

    def pace(self) -> BeforeWait:
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
            self.connection.settimeout(min(timeout_s, left_s))

        return before_wait

    def receive_request(self) -> bytearray:
        """The request's bytes; raises RequestTooLarge before reading an oversized body."""
        pace = self.pace()
        (size,) = HEADER.unpack(recv_exactly(self.connection, HEADER.size, pace))
        if size > self.options.max_bytes:
            limit = self.options.max_bytes
            raise RequestTooLarge(f"request too large ({size} bytes, limit {limit})")
        self.event_log.info("Request announced", bytes=size)
        return recv_exactly(self.connection, size, pace)

    def send_reply(self, slices: list[worker.Slice]) -> int:
        """Send the slices' spooled results as one frame, in order, read back a chunk at a
        time; return its length."""
        length = sum(slice_.spool.size for slice_ in slices)
        spooled = (chunk for slice_ in slices for chunk in slice_.spool.chunks())
        send_frame(self.connection, spooled, length, self.pace())
        return length

    def log_rejected_lines(self, payload: bytearray, slices: list[worker.Slice]) -> None:
        """One DEBUG event per error line (-vv only), with at most EXCERPT_CHARS of its line:
        a line may be 256 MiB long, and its log entry is still one short line."""
        for slice_ in slices:
            line_start = slice_.first
            for result in slice_.spool.lines():
                if result.startswith(ERROR_PREFIX):
                    excerpt = line_excerpt(payload, line_start)
                    reason = result[len(ERROR_PREFIX) : -1].decode()
                    self.event_log.debug("Line rejected", line=excerpt, reason=reason)
                line_start = payload.find(b"\n", line_start, slice_.end) + 1

    def reply_and_linger(self, reply: bytes) -> None:
        """Send a one-line reply (a refusal), then linger."""
        with contextlib.suppress(*CLIENT_FAILURES):  # a client gone or silent needs nothing more
            send_frame(self.connection, [reply])
        self.linger()

    def linger(self) -> None:
        """Say we are done (FIN), then read and drop what the client still sends, until it
        closes or for LINGER_S at most (nginx's lingering close): closing with unread bytes
        sends a reset, which destroys whatever of the reply the client has not read yet."""
        deadline = time.monotonic() + LINGER_S
        with contextlib.suppress(*CLIENT_FAILURES):  # a client gone or silent needs nothing more
            self.connection.shutdown(socket.SHUT_WR)
            while True:
                left_s = deadline - time.monotonic()
                if left_s <= 0:
                    return
                self.connection.settimeout(left_s)
                if not self.connection.recv(CHUNK_BYTES):
                    return


class BluServer(socketserver.ForkingTCPServer):
    """Listens on -a and -p, and forks a RequestHandler process per connection, at most
    max_children at once: socketserver's ForkingTCPServer as it is meant to be used, set up
    by class attributes and its constructor.

    Alone, it serves with socketserver's own loop (``BluServer(options).serve_forever()``,
    until Ctrl-C).  main() runs ArmouredServer: this class with the armour of the server
    process (serving.py) composed over it.  Of socketserver, ArmouredServer uses

    - as they are: TCPServer's bind, listen and accept; ForkingMixIn.process_request, its
      fork and its child's end (finish_request, shutdown_request, os._exit); handle_error;
    - overridden: server_bind (HandedListener: a socket handed over), server_activate
      (HandedListener, DeferredAccept, SignalledServing), verify_request (DeferredAccept),
      process_request (SignalledServing: the fork sequence; ForkRetry: a fork that fails),
      finish_request, get_request, service_actions, collect_children (SignalledServing);
    - replaced: serve_forever, by SignalledServing's, which says why (a signal handler cannot
      call shutdown(); ForkingMixIn.collect_children blocks while max_children handlers
      run; the loop polls), so handle_request, handle_timeout and shutdown are unused.
    """

    allow_reuse_address = True  # restart at once, while old connections sit in TIME_WAIT
    request_queue_size = socket.SOMAXCONN  # as long a backlog as the kernel allows: none refused

    def __init__(self, options: argparse.Namespace) -> None:
        self.options = options  # what the handlers read theirs from
        self.max_children = options.max_children
        # TCPServer makes an IPv4 socket unless told otherwise: the address says which.
        self.address_family = address_family(options.address)
        super().__init__((options.address, options.port), RequestHandler)


def address_family(host: str) -> socket.AddressFamily:
    """AF_INET if host is or names an IPv4 address ('localhost' among them, as TCPServer
    assumes), else AF_INET6 ('::1', '::', a name with IPv6 addresses only).  Raises
    socket.gaierror for a name that resolves to neither."""
    found = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    families = {family for family, *_ in found}
    return socket.AF_INET if socket.AF_INET in families else socket.AF_INET6


class ArmouredServer(
    serving.SignalledServing,
    serving.ForkRetry,
    serving.DeferredAccept,
    serving.HandedListener,
    BluServer,
):
    """The server main() runs: BluServer, with the armour of the server process composed over
    it as socketserver composes ForkingTCPServer.  Each class of serving.py opens with the
    failure it handles: signals (a drain, then a stop), a fork that fails, a connection that
    sends nothing, a listening socket handed over by a process manager."""


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
        type=seconds(0, DAY_S),
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
    server.serve_forever()  # until the first SIGINT or SIGTERM
    server.drain()  # serve what is waiting and in flight
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
