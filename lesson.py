"""The lesson: a forking socket server whose handler evaluates each request in worker processes.

Run it alone: ``python lesson.py -p 1982 -n 2 -v`` (``make lesson``); Ctrl-C stops it.  It is
a ``socketserver.ForkingTCPServer`` serving with socketserver's own ``serve_forever``; its
handler cuts each request into slices and evaluates each slice in a ``multiprocessing.Process``,
linked to it by a ``multiprocessing.Pipe``; each worker answers each line with the pyparsing
grammar (grammar.py).  One request, through the three kinds of process::

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
                  collect_results: wait(), Slice.receive        recv_bytes, into memory, then
                       └─────────┬──────────┘                   a nameless file, per slice
                                 ▼
    client ◀──[length, results]── send_reply                   read back in order

It imports only what a request needs: worker.py (the worker process), grammar.py (the
language), client.py (the wire protocol) and events.py (the log).  It trusts its clients, its
workers and the machine.  The server people run (bluserver.py) is this lesson with armour
composed over it, one piece per failure (serving.py, guard.py, supervise.py), through
socketserver's hooks and the ones below, and the fast path (fastpath.py) plugged in.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import multiprocessing

# What Process.start() imports on its first call: imported here, once, in the server, rather
# than from disk by every handler it forks.
import multiprocessing.popen_fork
import resource
import socket
import socketserver
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence

# multiprocessing.Pipe, from the module that defines it: the context's Pipe imports it anew
# at each call, which costs a handler, a fresh process, 0.1 ms.
from multiprocessing.connection import Connection, Pipe, wait
from multiprocessing.process import BaseProcess
from typing import Callable

import grammar
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
from events import EventLog, RequestLog, log_to_stdout, logger, server_log

# Forked whatever the default start method (3.14: forkserver): a fork costs a millisecond or
# two, where a spawned worker starts a new interpreter (`make bench`, rows "0. floor" and "4.
# 1-line round trip, start method ..."), and a forked worker shares the request's memory with
# its handler instead of being sent it.
FORK = multiprocessing.get_context("fork")

# A worker costs a few ms of CPU to fork, start and join (`make bench`, row "0. floor"), and
# the fast path evaluates the flat form, the cheapest per byte, at ~120 ns a byte (450 for the
# full language; rows "2. project evaluator" and "6. full language, evaluator"): below ~25 KB
# a slice takes less time than its worker's fork, and a second worker costs more than it
# saves even on idle cores.  Rounded up to 32 KiB.  Tuned for the server people run; the
# lesson's pyparsing is slower per line (row "7. non-flat line, the lesson's evaluator"), and
# slices alike.
MIN_SLICE_BYTES = 32 * 1024

# A few messages' worth: the results of a small request stay in memory, and cost no file,
# which a fresh process takes 0.4 ms to create, write and read back; each handler holds at
# most this much per slice before its results go to disk.
RESULTS_IN_MEMORY_BYTES = 16 * 1024

LineEvaluator = Callable[[str], str]


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

    The results are held in memory up to RESULTS_IN_MEMORY_BYTES, past that in a nameless
    temporary file (tempfile.SpooledTemporaryFile): a small reply costs no file, a large one no
    memory, and the file vanishes however the handler ends.
    """

    # What the worker answers each line with: the language's definition.  A class attribute,
    # so that a subclass can plug in an optimisation (bluserver.ServedSlice: fastpath.py's).
    evaluate_line: LineEvaluator = staticmethod(grammar.evaluate_line)

    def __init__(self, payload: bytearray, bounds: tuple[int, int], event_log: EventLog) -> None:
        self.payload = payload
        self.start = bounds[0]
        self.end = bounds[1]
        self.event_log = event_log
        # Not a with block: the results outlive this method, and close() closes them.
        self.results = tempfile.SpooledTemporaryFile(RESULTS_IN_MEMORY_BYTES)  # noqa: SIM115
        self.results_size = 0
        self.error_lines = 0
        self.finished = False  # once the worker has sent END_OF_SLICE
        self.process: BaseProcess | None = None
        self.receiver: Connection | None = None  # the handler's end of the worker's Pipe

    def start_worker(self, name: str) -> None:
        """Fork a worker process on payload[start:end], linked to this one by a Pipe."""
        receiver, sender = Pipe(duplex=False)
        self.receiver = receiver
        args = (sender, self.payload, self.start, self.end, self.evaluate_line)
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
        """Every result stored, from the start, CHUNK_BYTES at a time (all at once if fewer:
        a read allocates the size it asks for)."""
        self.results.seek(0)
        chunk_bytes = min(CHUNK_BYTES, self.results_size)
        return iter(functools.partial(self.results.read, chunk_bytes), b"")


class RequestHandler(socketserver.BaseRequestHandler):
    """Receives one request, evaluates it in workers, sends the reply.  Runs in its own process:
    ForkingMixIn forks one per connection, and calls setup, handle and finish in it."""

    server: BluServer
    request: socket.socket  # socketserver's name for the connection: see setup
    connection: socket.socket
    options: argparse.Namespace
    event_log: EventLog

    def setup(self) -> None:
        multiprocessing.current_process().name = "handler"
        self.options = self.server.options
        self.event_log = RequestLog(logger)
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
            cpu_s=round(reaped_workers_cpu_s(), 3),  # the workers', all reaped by now
        )

    def receive_request(self) -> bytearray:
        """The request's bytes: its length (HEADER), then that many bytes."""
        pace = self.pace_request()
        (size,) = HEADER.unpack(recv_exactly(self.connection, HEADER.size, pace))
        self.announced(size)
        return recv_exactly(self.connection, size, pace)

    def pace_request(self) -> BeforeWait | None:
        """A hook: what recv_exactly calls before each wait for the request.  None here: wait
        as long as the client takes (guard.ClientGuard bounds it)."""
        return None

    def pace_reply(self) -> BeforeWait | None:
        """A hook: what send_frame calls before each wait for the client to take more of the
        reply.  None here: wait as long as the client takes (guard.ClientGuard bounds it)."""
        return None

    def announced(self, size: int) -> None:
        """A hook: the client has said how many bytes its request has (guard.ClientGuard
        refuses here a request larger than --max-bytes, before reading it)."""
        self.event_log.info("Request announced", bytes=size)

    def new_slices(self, payload: bytearray, ranges: list[tuple[int, int]]) -> list[Slice]:
        """A hook: a Slice for each range (supervise.WorkerSupervision makes supervised ones)."""
        return [Slice(payload, bounds, self.event_log) for bounds in ranges]

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

    def wait_for_workers(self, running: list[Slice]) -> Sequence[object]:
        """A hook: wait until a running slice's receiver has a message (or its worker's end of
        file); return the receivers that have.  multiprocessing.connection.wait() watches
        every Pipe at once (supervise.WorkerSupervision's wait watches more)."""
        return wait(receivers(running))

    def send_reply(self, slices: list[Slice]) -> int:
        """Send the slices' results as one frame, in order, read back a chunk at a time; return
        its length."""
        length = sum(slice_.results_size for slice_ in slices)
        chunks = (chunk for slice_ in slices for chunk in slice_.result_chunks())
        send_frame(self.connection, chunks, length, self.pace_reply())
        return length


def receivers(running: list[Slice]) -> list[Connection]:
    """The handler's ends of the running slices' Pipes."""
    return [slice_.receiver for slice_ in running if slice_.receiver]


def reaped_workers_cpu_s() -> float:
    """In a handler: the CPU time of every worker it has reaped (its only children), in
    seconds."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class BluServer(socketserver.ForkingTCPServer):
    """Listens on -a and -p, and forks a RequestHandler process per connection: socketserver's
    ForkingTCPServer as it is meant to be used, set up by class attributes and its
    constructor.  Everything else is socketserver's own: serve_forever's loop, bind, listen,
    the fork (ForkingMixIn.process_request: at most max_children handlers at once, 40 here),
    reaping the handlers (collect_children), shutdown() and server_close()."""

    allow_reuse_address = True  # restart at once, while old connections sit in TIME_WAIT
    request_queue_size = socket.SOMAXCONN  # as long a backlog as the kernel allows: none refused
    handler_class: type[RequestHandler] = RequestHandler  # forked for each connection

    def __init__(self, options: argparse.Namespace) -> None:
        self.options = options  # what the handlers read theirs from
        # TCPServer makes an IPv4 socket unless told otherwise: the address says which.
        self.address_family = address_family(options.address)
        # tempfile looks for a usable temporary directory, writing a file there, the first
        # time it is asked: asked once here, so that no handler (each a fresh fork) repeats it
        # for its first results file.  If none is usable now, a handler asks again when its
        # results outgrow memory (bluserver.py's refuses the request if there is still none).
        with contextlib.suppress(OSError):
            tempfile.gettempdir()
        super().__init__((options.address, options.port), self.handler_class)


def address_family(host: str) -> socket.AddressFamily:
    """AF_INET if host is or names an IPv4 address ('localhost' among them, as TCPServer
    assumes), else AF_INET6 ('::1', '::', a name with IPv6 addresses only).  Raises
    socket.gaierror for a name that resolves to neither."""
    found = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    families = {family for family, *_ in found}
    return socket.AF_INET if socket.AF_INET in families else socket.AF_INET6


# === Running the lesson ==========================================================================

MAX_WORKERS = 64  # a fork each: far more than cores only costs time and memory per request


def whole_number(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number from low to high."""

    def parse(text: str) -> int:
        if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"must be a whole number {low}-{high}, not {text}")
        return int(text)

    return parse


def command_line(description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """The original's options, -a -p -n -v: the lesson's whole command line, and the start of
    the server's (bluserver.py adds its own options to it)."""
    parser = argparse.ArgumentParser(
        description=description,
        epilog=epilog,
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
        help="log events to stdout (-vv in bluserver.py: each rejected line too)",
    )
    return parser


def become_server() -> None:
    """Make this process the server: its name in the log, and what every process it forks
    would otherwise do for itself."""
    multiprocessing.current_process().name = "server"
    # The server reads no input.  Without a sys.stdin, multiprocessing's bootstrap gives a
    # worker none either, where it would open a text file on /dev/null for it in every
    # worker; a worker's descriptor 0 is /dev/null all the same (close_inherited_files).
    sys.stdin = None


def announce(server: BluServer) -> None:
    """The banner on stdout, which says where the server listens (the port, if -p 0 let the
    kernel pick it), and the log's first event."""
    host, port = server.socket.getsockname()[:2]
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    workers = server.options.max_workers
    print(f"bluserver: serving on {shown} with up to {workers} workers per request", flush=True)
    server_log.info("Server started", **{**vars(server.options), "address": host, "port": port})


def main(argv: Sequence[str] | None = None) -> None:
    """Serve the lesson until Ctrl-C (exit 0)."""
    parser = command_line(description="The lesson alone: bluserver without its armour.")
    options = parser.parse_args(argv)
    become_server()
    log_to_stdout(logging.INFO if options.verbose else logging.WARNING)
    with BluServer(options) as server:
        announce(server)
        try:
            server.serve_forever()
        except KeyboardInterrupt:  # Ctrl-C: the lesson's only way to stop
            server_log.warning("Server stopped")


if __name__ == "__main__":
    main()
