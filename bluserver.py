"""bluserver: evaluates batches of arithmetic expressions sent over TCP, in worker processes.

Usage: ``python bluserver.py -p 1982 -n 2`` (``--help`` lists every option).

One request, start to finish (the wire format is in client.py)::

    client --[length, lines]--> BluServer            accepts; ForkingMixIn forks a
                                   |                  handler process per connection
                                   v
                  RequestHandler.receive_request      reads the length, then the bytes
                                   |
                     evaluate_in_workers              slice_bounds() cuts the bytes into
                          /        \\                  <= n runs of whole lines
                 SliceJob.start   SliceJob.start      one multiprocessing.Process each,
                        |            |                the slice sent down its Pipe
                  worker.run    worker.run            evaluate lines (grammar.py), stream
                        |            |                result blocks back up the Pipe
                          \\        /
                   gathered in slice order            a dead or stuck worker's slice is
                                   |                  run once more, then marked failed
                                   v
    client <--[length, results]-- RequestHandler.handle

Class hierarchy: BluServer(socketserver.ForkingTCPServer), RequestHandler(
socketserver.BaseRequestHandler).  Options are attributes of the server that the handler
reads; nothing is global.  The server process never evaluates anything and never holds a
request; each handler process holds one request and joins every worker it starts.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import logging.handlers
import multiprocessing
import os
import signal
import socket
import socketserver
import stat
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

import worker
from client import HEADER, count_lines, port_number, recv_exactly, send_frame

DEFAULT_PORT = 1982
DEFAULT_WORKERS = 2
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_WORKER_TIMEOUT_S = 60.0
DEFAULT_MAX_CLIENTS = 32
ATTEMPTS_PER_SLICE = 2  # a slice whose worker dies or hangs is run once more
REAP_INTERVAL_S = 0.05  # how often the server reaps finished handlers (no zombies linger)
LINGER_S = 2.0  # how long to drain an oversized request so the client can read the reply
WORKER_FAILED = b"error: worker failed\n"

logger = logging.getLogger("bluserver")


# --- Logging: one key=value (or JSON) line per event, carrying the request id. -------


class EventLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """``log.info("Request served", lines=3)`` logs one event with its fields and request id."""

    def __init__(self, logger: logging.Logger, request_id: str | None) -> None:
        super().__init__(logger, {})
        self.request_id = request_id

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return msg, {"extra": {"uuid": self.request_id, "fields": kwargs}}


def event_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {
        "uuid": getattr(record, "uuid", None),
        "pname": record.processName,
        "pid": record.process,
        "event": record.getMessage(),
        **getattr(record, "fields", {}),
    }


class KeyValueFormatter(logging.Formatter):
    """``[bluserver] 2026-11-28 07:44:10,584: INFO uuid='…' pname='handler' pid=43 event='…'``"""

    def format(self, record: logging.LogRecord) -> str:
        pairs = " ".join(f"{key}={value!r}" for key, value in event_fields(record).items())
        return f"[{record.name}] {self.formatTime(record)}: {record.levelname} {pairs}"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        head = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name}
        return json.dumps({**head, **event_fields(record)}, default=str)


def configure_logging(verbosity: int, log_format: str, syslog_address: str | None) -> None:
    """Log to stdout (WARNING, -v INFO, -vv DEBUG), and to syslog when asked."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if syslog_address:
        handlers.append(syslog_handler(syslog_address))
    formatter = JsonFormatter() if log_format == "json" else KeyValueFormatter()
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    logger.setLevel([logging.WARNING, logging.INFO, logging.DEBUG][min(verbosity, 2)])


log = EventLog(logger, None)  # the server's own events, outside any request


def syslog_handler(address: str) -> logging.Handler:
    """A handler for HOST:PORT (UDP) or a unix socket path; OSError if the path is no socket."""
    host, _, port = address.rpartition(":")
    if port.isdigit():
        return logging.handlers.SysLogHandler(address=(host, int(port)))
    # SysLogHandler would accept a missing socket and then fail on every record.
    if not stat.S_ISSOCK(os.stat(address).st_mode):
        raise OSError(errno.ENOTSOCK, "not a unix socket", address)
    return logging.handlers.SysLogHandler(address=address)


# --- Evaluating one request in worker processes. --------------------------------------


def slice_bounds(payload: bytes | bytearray, count: int) -> list[tuple[int, int]]:
    """Cut payload into at most count byte ranges of whole lines and about equal size.

    Never more ranges than lines, none for an empty payload.
    """
    bounds: list[tuple[int, int]] = []
    start, size = 0, len(payload)
    for number in range(1, count + 1):
        if start >= size:
            break
        newline = payload.find(b"\n", max(start, size * number // count - 1))
        end = size if newline < 0 or number == count else newline + 1
        bounds.append((start, end))
        start = end
    return bounds


class SliceJob:
    """One slice of a request and the worker process evaluating it."""

    def __init__(self, payload: bytes | bytearray, bounds: tuple[int, int], name: str, log: EventLog) -> None:
        self.payload = payload
        self.start_offset, self.end_offset = bounds
        self.name, self.log = name, log
        self.attempts = 0
        self.blocks: list[bytes] = []  # result blocks, in order

    def start(self, timeout_s: float) -> None:
        """Start a worker on this slice and send it the slice; raise OSError if it dies at once."""
        self.attempts += 1
        self.blocks = []
        self.finished = False
        self.conn, worker_conn = multiprocessing.Pipe()
        self.process = multiprocessing.Process(target=worker.run, args=(worker_conn,), name=self.name)
        self.process.start()
        worker_conn.close()  # so that the worker's death shows here as end of file
        self.deadline = time.monotonic() + timeout_s
        self.log.info("Worker started", worker=self.name, worker_pid=self.process.pid, attempt=self.attempts)
        self.conn.send_bytes(self.payload, self.start_offset, self.end_offset - self.start_offset)

    def receive(self) -> None:
        """Take the worker's next message: a result block, or b"" once the slice is complete.

        Raises EOFError if the worker died before finishing.
        """
        block = self.conn.recv_bytes()
        if block:
            self.blocks.append(block)
        else:
            self.finished = True

    def stop(self) -> None:
        """Make sure the worker is gone: kill it if it has not finished its slice, then reap it."""
        self.conn.close()
        if not self.finished and self.process.is_alive():
            self.process.kill()
        self.process.join()

    def give_up(self) -> None:
        """Answer every line of the slice with an error line."""
        lines = count_lines(self.payload[self.start_offset : self.end_offset])
        self.blocks = [WORKER_FAILED * lines]


@contextlib.contextmanager
def evaluate_in_workers(
    payload: bytes | bytearray, slices: list[tuple[int, int]], worker_timeout_s: float, log: EventLog
) -> Iterator[list[bytes]]:
    """Evaluate each slice of payload in its own worker; yield the result blocks in order.

    Every worker is joined when the with-block ends: after the reply has gone out, so
    that reaping them costs the client nothing.
    """
    jobs = [SliceJob(payload, bounds, f"worker-{number}", log) for number, bounds in enumerate(slices, 1)]
    running: dict[Connection, SliceJob] = {}

    def launch(job: SliceJob) -> None:
        try:
            job.start(worker_timeout_s)
        except OSError:  # the worker died before taking its slice
            retry_or_give_up(job, "died at start")
        else:
            running[job.conn] = job

    def retry_or_give_up(job: SliceJob, reason: str) -> None:
        running.pop(job.conn, None)
        job.stop()
        log.warning("Worker failed", worker=job.name, reason=reason, attempt=job.attempts)
        if job.attempts < ATTEMPTS_PER_SLICE:
            launch(job)
        else:
            job.give_up()

    try:
        for job in jobs:
            launch(job)
        while running:
            soonest = min(job.deadline for job in running.values())
            for conn in wait(list(running), timeout=max(0.0, soonest - time.monotonic())):
                job = running[conn]  # type: ignore[index]
                try:
                    job.receive()
                    if job.finished:
                        del running[job.conn]
                        log.info("Worker finished", worker=job.name, worker_pid=job.process.pid, blocks=len(job.blocks))
                except (EOFError, OSError):
                    retry_or_give_up(job, "died")
            now = time.monotonic()
            for job in [job for job in running.values() if job.deadline <= now]:
                retry_or_give_up(job, "timed out")
        yield [block for job in jobs for block in job.blocks]
    finally:
        for job in jobs:
            job.stop()


# --- The handler process: one per connection. ----------------------------------------


# What a client can do to its own connection: go silent, or close or reset it
# (ClosedEarly, from client.py, is a ConnectionError).
CLIENT_FAILURES = (socket.timeout, ConnectionError)


class RequestTooLarge(Exception):
    """A request declared more bytes than --max-bytes allows."""


class RequestHandler(socketserver.BaseRequestHandler):
    """Receives one request, evaluates it in workers, sends the reply.  Runs in its own process."""

    server: BluServer
    request: socket.socket

    def setup(self) -> None:
        # Own process group: a terminal's Ctrl-C reaches only the server, which lets this
        # request finish; and the server can stop this handler and its workers at once.
        os.setpgid(0, 0)
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_DFL)
        self.server.socket.close()  # only the server accepts; closed here it frees the port sooner
        multiprocessing.current_process().name = "handler"
        self.log = EventLog(logger, uuid.uuid4().hex)
        self.request.settimeout(self.server.client_timeout_s)
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def handle(self) -> None:
        started = time.monotonic()
        self.log.info("Incoming connection", peer=self.client_address)
        try:
            payload = self.receive_request()
        except RequestTooLarge as error:
            self.log.warning("Request refused", reason=str(error))
            self.reply_and_linger(f"error: {error}\n".encode())
            return
        except CLIENT_FAILURES as error:
            self.log.warning("Client failed while sending", reason=str(error) or "timed out")
            return
        slices = slice_bounds(payload, self.server.workers)
        with evaluate_in_workers(payload, slices, self.server.worker_timeout_s, self.log) as results:
            try:
                send_frame(self.request, results)
            except CLIENT_FAILURES as error:
                self.log.warning("Client failed while receiving", reason=str(error) or "timed out")
                return
        if self.log.isEnabledFor(logging.DEBUG):
            self.log_rejected_lines(payload, results)
        if not self.log.isEnabledFor(logging.INFO):
            return  # counting lines over a large reply costs time: only when it is logged
        self.log.info(
            "Request served",
            lines=sum(block.count(b"\n") for block in results),
            error_lines=sum(block.count(b"error: ") for block in results),
            bytes_in=len(payload),
            bytes_out=sum(len(block) for block in results),
            workers=len(slices),
            seconds=round(time.monotonic() - started, 6),
        )

    def log_rejected_lines(self, payload: bytearray, results: list[bytes]) -> None:
        """One DEBUG event per error line, with a bounded excerpt of the line (-vv only).

        Logged here rather than in the workers, so that it works under every start method.
        """
        lines = worker.line_blocks(payload, block_bytes=0)
        for block in results:
            for result, line in zip(block.splitlines(), lines):
                if result.startswith(b"error: "):
                    text = line.decode("utf-8", "backslashreplace")
                    excerpt = repr(text[:-1] if text.endswith("\r") else text)[:80]
                    self.log.debug("Line rejected", line=excerpt, reason=result[len(b"error: ") :].decode())

    def receive_request(self) -> bytearray:
        """The request's bytes; raises RequestTooLarge before reading an oversized body."""
        (size,) = HEADER.unpack(recv_exactly(self.request, HEADER.size))
        if size > self.server.max_bytes:
            raise RequestTooLarge(f"request too large ({size} bytes, limit {self.server.max_bytes})")
        self.log.info("Request announced", bytes=size)
        return recv_exactly(self.request, size)

    def reply_and_linger(self, reply: bytes) -> None:
        """Send reply, then discard what the client still sends for a while.

        Closing a socket with unread data makes the kernel send a reset, which can
        destroy the reply before the client reads it (nginx calls this lingering close).
        """
        deadline = time.monotonic() + LINGER_S
        try:
            send_frame(self.request, [reply])
            self.request.shutdown(socket.SHUT_WR)
            self.request.settimeout(LINGER_S)
            while time.monotonic() < deadline and self.request.recv(1024 * 1024):
                pass
        except CLIENT_FAILURES:
            pass  # the client is gone or silent: nothing left to do for it


# --- The server process. ------------------------------------------------------------


class BluServer(socketserver.ForkingTCPServer):
    """Listens and forks one RequestHandler process per connection, at most max_clients at once.

    Connections beyond max_clients wait in the listen backlog (ForkingMixIn blocks
    until a handler exits), so none is refused.
    """

    allow_reuse_address = True  # restart at once, while old connections sit in TIME_WAIT
    request_queue_size = socket.SOMAXCONN
    block_on_close = False  # shutdown() waits for every child itself, tracked or not

    def __init__(
        self,
        address: tuple[str, int],
        *,
        workers: int,
        max_clients: int,
        client_timeout_s: float,
        worker_timeout_s: float,
        max_bytes: int,
    ) -> None:
        self.workers = workers
        self.max_children = max_clients
        self.client_timeout_s = client_timeout_s
        self.worker_timeout_s = worker_timeout_s
        self.max_bytes = max_bytes
        self.shutdown_signal: str | None = None  # set by the first SIGINT or SIGTERM
        super().__init__(address, RequestHandler)

    def service_actions(self) -> None:
        """Between requests (every REAP_INTERVAL_S): reap handlers; leave serve_forever once signalled."""
        super().service_actions()
        if self.shutdown_signal:
            raise ShutdownRequested(self.shutdown_signal)


class ShutdownRequested(Exception):
    """Ends serve_forever after the first SIGINT or SIGTERM."""


def serve_until_signalled(server: BluServer) -> None:
    """Serve until SIGINT or SIGTERM, then let requests in flight finish; a second signal kills them."""

    def request_shutdown(signum: int, frame: object) -> None:
        # Only note it: an exception raised here could land mid-fork or mid-accept.
        server.shutdown_signal = signal.Signals(signum).name

    def stop_now(signum: int, frame: object) -> None:
        for pid in list(server.active_children or ()):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)  # the handler's group: it and its workers
        log.warning("Stopped at once", signal=signal.Signals(signum).name)
        raise SystemExit(1)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, request_shutdown)
    host, port = server.socket.getsockname()[:2]
    print(f"bluserver: serving on {host}:{port} with up to {server.workers} workers per request", flush=True)
    log.info("Server started", address=host, port=port, workers=server.workers, max_clients=server.max_children)
    try:
        server.serve_forever(poll_interval=REAP_INTERVAL_S)
    except ShutdownRequested as signalled:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, stop_now)
        server.server_close()  # stop accepting: new connections are refused from here on
        log.warning("Shutting down", signal=str(signalled), requests_in_flight=len(server.active_children or ()))
        while True:
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                break
        log.warning("Server stopped")


# --- Command line. ------------------------------------------------------------------


def positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be greater than 0, not {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Evaluate batches of arithmetic expressions sent over TCP.\n\n"
            "Each connection sends one request: an 8-byte big-endian length, then that many\n"
            "bytes of UTF-8 text, one expression per line. The reply has the same framing and\n"
            "exactly one line per input line: the value, an empty line for a blank line, or\n"
            "'error: <reason>'. Each connection gets its own process, which splits the lines\n"
            "across worker processes."
        ),
        epilog=(
            "examples:\n"
            "  python bluserver.py                       # localhost:1982, 2 workers per request\n"
            "  python bluserver.py -a 0.0.0.0 -p 2000 -n 4 -v\n"
            "  python bluserver.py --max-bytes 1048576 --timeout 5 --log-format json\n"
            "\n"
            "signals: SIGINT (Ctrl-C) or SIGTERM stops accepting, lets requests in flight finish\n"
            "and exits 0; a second signal stops them at once and exits 1.\n"
            "exit status: 0 after a signal, 1 if the address cannot be used, 2 on bad arguments."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("-a", "--address", default="localhost", help="address to listen on (default: %(default)s)")
    add(
        "-p",
        "--port",
        type=port_number,
        default=DEFAULT_PORT,
        help="TCP port, 0 for any free one (default: %(default)s)",
    )
    add(
        "-n", "--number-processes", dest="workers", type=positive(int), default=DEFAULT_WORKERS, metavar="PROCESSES",
        help="worker processes per request, at most one per line (default: %(default)s)",
    )  # fmt: skip
    add(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log each request to stdout: -v events, -vv also rejected lines",
    )
    add(
        "--max-bytes", type=positive(int), default=DEFAULT_MAX_BYTES, metavar="N",
        help="refuse requests longer than N bytes with an error line, unread (default: %(default)s, 256 MiB)",
    )  # fmt: skip
    add(
        "--timeout", dest="client_timeout_s", type=positive(float), default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
        help="disconnect a client silent this long while sending or receiving (default: %(default)s)",
    )  # fmt: skip
    add(
        "--worker-timeout", dest="worker_timeout_s", type=positive(float), default=DEFAULT_WORKER_TIMEOUT_S,
        metavar="SECONDS",
        help="kill a worker running longer and run its slice again, once; then its lines get "
        "'error: worker failed' (default: %(default)s)",
    )  # fmt: skip
    add(
        "--max-clients", type=positive(int), default=DEFAULT_MAX_CLIENTS, metavar="N",
        help="connections handled at once; more wait their turn (default: %(default)s)",
    )  # fmt: skip
    add(
        "--log-format",
        choices=("kv", "json"),
        default="kv",
        help="key=value lines or JSON objects (default: %(default)s)",
    )
    add(
        "--syslog", metavar="ADDRESS", help="also log to syslog at HOST:PORT (UDP) or a unix socket path, e.g. /dev/log"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    multiprocessing.current_process().name = "server"
    try:
        configure_logging(args.verbose, args.log_format, args.syslog)
    except OSError as error:
        print(f"bluserver: cannot log to syslog at {args.syslog}: {error}", file=sys.stderr)
        return 1
    try:
        server = BluServer(
            (args.address, args.port),
            workers=args.workers,
            max_clients=args.max_clients,
            client_timeout_s=args.client_timeout_s,
            worker_timeout_s=args.worker_timeout_s,
            max_bytes=args.max_bytes,
        )
    except OSError as error:
        print(f"bluserver: {describe_bind_error(error, args.address, args.port)}", file=sys.stderr)
        return 1
    serve_until_signalled(server)
    return 0


def describe_bind_error(error: OSError, address: str, port: int) -> str:
    if error.errno == errno.EADDRINUSE:
        return f"port {port} is already in use (try -p)"
    return f"cannot listen on {address}:{port}: {error.strerror or error}"


if __name__ == "__main__":
    sys.exit(main())
