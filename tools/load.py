"""Load test: many concurrent clients against bluserver, every reply verified line by line.

Run ``make load``, or ``.venv/bin/python -m tools.load [-p PORT] [--throughput]``.

- By default: 50 concurrent clients x 2,000 lines; prints one summary line.
- ``--throughput``: many small clients (1,000 requests of 10 lines, 50 at a time), run 5
  times; prints requests per second, each run's and the median.  Given several ports
  (``-p 1983 -p 1982``: one instance, then HAProxy in front of several, from ``make
  cluster``), it measures them in turn, run after run, so that a noisy neighbour slows
  them alike: what the balancer costs and what more instances bring (OPERATIONS.md, "Running
  several instances").

Without -p it starts its own server (``bluserver.py -a 127.0.0.1 -p 0 -n 2``, with
tests.harness.ServerProcess: the one way to start a real server) and stops it at the end with
SIGTERM, after which the server must exit 0; with -p it uses whatever listens on
127.0.0.1:PORT.

The clients are non-blocking sockets in this one process, driven by a selector: up to the
concurrency limit connect at once, send their requests and read their replies as the
server allows, and each one done makes room for the next.  Each client sends seed-like
lines (bench.seed_like_lines: flat expressions plus the seed's hostile lines, which must
come back as error lines), and its reply is checked against fastpath.evaluate_line
computed here, before the clock starts.

Exits 1 if any line mismatches or anything fails, else 0.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import selectors
import socket
import statistics
import sys
import time
from collections.abc import Iterable, Iterator, Sequence

from client import CHUNK_BYTES, HEADER
from fastpath import evaluate_line
from tests.harness import ServerProcess
from tools.bench import HOST, HOSTILE_LINES, SEED, seed_like_lines, to_payload

CLIENTS = 50
LINES_PER_CLIENT = 2_000
THROUGHPUT_REQUESTS = 1_000  # per run of --throughput
THROUGHPUT_LINES = 10  # per request of --throughput
THROUGHPUT_RUNS = 5
THROUGHPUT_TIMEOUT_S = 120.0  # for each run of --throughput
CONCURRENCY = 50  # clients connected at once
WORKERS = 2
LOAD_TIMEOUT_S = 45.0  # every client must be answered within this
PROBLEMS_SHOWN = 5  # clients whose failure or first mismatch is printed


def request_lines(number: int, count: int) -> tuple[list[str], list[str]]:
    """Request number's count seed-like lines, and the result lines it must get back."""
    lines = seed_like_lines(count - len(HOSTILE_LINES), SEED + number)
    return lines, [evaluate_line(line) for line in lines]


class LoadClient:
    """One connection: connects, sends one request, reads the reply, then compares it."""

    def __init__(self, number: int, lines: list[str], expected: list[str]) -> None:
        self.number = number
        self.lines = lines
        self.expected = expected
        payload = to_payload(lines)
        self.outgoing = memoryview(HEADER.pack(len(payload)) + payload)
        self.incoming = bytearray()
        self.failure: str | None = None
        self.mismatches = 0
        self.first_mismatch: str | None = None
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setblocking(False)

    def connect(self, port: int) -> None:
        """Start connecting; step() finds out whether it worked."""
        code = self.sock.connect_ex((HOST, port))
        if code not in (0, errno.EINPROGRESS):
            raise OSError(code, f"cannot connect to {HOST}:{port}: {os.strerror(code)}")

    def step(self) -> int:
        """Send or receive what the socket allows now; return the events to wait for next, 0
        when done.

        Raises OSError if the connection fails.
        """
        if self.outgoing:
            return self.send()
        return self.receive()

    def send(self) -> int:
        code = self.sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_ERROR
        )  # a failed connect shows here
        if code:
            raise OSError(code, f"cannot connect: {os.strerror(code)}")
        sent = self.sock.send(self.outgoing)
        self.outgoing = self.outgoing[sent:]
        return selectors.EVENT_WRITE if self.outgoing else selectors.EVENT_READ

    def receive(self) -> int:
        chunk = self.sock.recv(CHUNK_BYTES)
        if not chunk:
            raise ConnectionError(
                f"connection closed after {len(self.incoming)} bytes of the reply"
            )
        self.incoming += chunk
        if len(self.incoming) < HEADER.size:
            return selectors.EVENT_READ
        (size,) = HEADER.unpack_from(self.incoming)
        if len(self.incoming) < HEADER.size + size:
            return selectors.EVENT_READ
        self.verify(self.incoming[HEADER.size :])
        return 0

    def verify(self, reply: bytearray) -> None:
        """Count the reply's lines that differ from the expected results; a wrong count is a
        failure."""
        results = reply.decode("utf-8").split("\n")
        if results.pop() != "" or len(results) != len(self.expected):
            self.failure = (
                f"the reply has {len(results)} lines for {len(self.expected)} input lines"
            )
            return
        wrong = [
            index for index, (got, want) in enumerate(zip(results, self.expected)) if got != want
        ]
        self.mismatches = len(wrong)
        if wrong:
            first = wrong[0]
            got = results[first]
            expected = self.expected[first]
            self.first_mismatch = (
                f"line {first + 1} {self.lines[first]!r}: got {got!r}, expected {expected!r}"
            )

    def problem(self) -> str | None:
        """What went wrong for this client, if anything."""
        if self.failure:
            return self.failure
        if self.mismatches:
            return f"{self.mismatches} mismatches, the first at {self.first_mismatch}"
        return None

    def error_lines(self) -> int:
        return sum(result.startswith("error: ") for result in self.expected)


def run_clients(
    clients: Iterable[LoadClient], port: int, timeout_s: float, concurrency: int = CONCURRENCY
) -> list[LoadClient]:
    """Drive the clients against port, concurrency at a time, each until it is done or
    fails; clients still waiting after timeout_s fail.  Returns them; closes every socket."""
    deadline = time.monotonic() + timeout_s
    waiting = iter(clients)
    started: list[LoadClient] = []
    with selectors.DefaultSelector() as selector:
        try:
            for _ in range(concurrency):
                start_next(waiting, selector, port, started)
            while selector.get_map() and time.monotonic() < deadline:
                for key, _ in selector.select(timeout=deadline - time.monotonic()):
                    if step(selector, key):
                        start_next(waiting, selector, port, started)
        finally:
            for key in list(selector.get_map().values()):
                key.data.failure = f"no complete reply within {timeout_s:g} s"
                selector.unregister(key.fileobj)
                key.data.sock.close()
    return started


def start_next(
    waiting: Iterator[LoadClient],
    selector: selectors.BaseSelector,
    port: int,
    started: list[LoadClient],
) -> None:
    """Connect the next waiting client, if any."""
    load_client = next(waiting, None)
    if load_client:
        started.append(load_client)
        selector.register(load_client.sock, selectors.EVENT_WRITE, load_client)
        load_client.connect(port)


def step(selector: selectors.BaseSelector, key: selectors.SelectorKey) -> bool:
    """Let the client of key act on its socket, and wait for what it needs next; True once it
    is done."""
    load_client: LoadClient = key.data
    try:
        events = load_client.step()
    except OSError as error:
        load_client.failure = str(error) or type(error).__name__
        events = 0
    if not events:
        selector.unregister(load_client.sock)
        load_client.sock.close()
        return True
    if events != key.events:
        selector.modify(load_client.sock, events, load_client)
    return False


def show_problems(clients: Sequence[LoadClient]) -> bool:
    """Print the first clients' problems to stderr; return whether there were any."""
    problems = [
        f"client {load_client.number}: {load_client.problem()}"
        for load_client in clients
        if load_client.problem()
    ]
    for problem in problems[:PROBLEMS_SHOWN]:
        print(f"load: {problem}", file=sys.stderr)
    if len(problems) > PROBLEMS_SHOWN:
        print(
            f"load: ... and {len(problems) - PROBLEMS_SHOWN} more clients with problems",
            file=sys.stderr,
        )
    return bool(problems)


def load_run(port: int) -> int:
    """CLIENTS clients of LINES_PER_CLIENT lines at once; print the summary line, return the
    exit status."""
    clients = [
        LoadClient(number, *request_lines(number, LINES_PER_CLIENT)) for number in range(CLIENTS)
    ]
    started = time.monotonic()
    run_clients(clients, port, LOAD_TIMEOUT_S)
    seconds = time.monotonic() - started
    failed = show_problems(clients)
    failures = sum(1 for load_client in clients if load_client.failure)
    mismatches = sum(load_client.mismatches for load_client in clients)
    lines = sum(len(load_client.expected) for load_client in clients)
    error_lines = sum(load_client.error_lines() for load_client in clients)
    print(
        f"load: {len(clients)} clients, {lines:,} lines, {error_lines} error lines, "
        f"{mismatches} mismatches, {failures} failures, {seconds:.2f} s"
    )
    return 1 if failed else 0


def throughput_runs(ports: Sequence[int]) -> int:
    """THROUGHPUT_RUNS rounds, each a run of THROUGHPUT_REQUESTS small requests, CONCURRENCY
    at a time, against each port in turn (so that a noisy neighbour slows them alike);
    print each port's requests per second, return the exit status."""
    requests = [request_lines(number, THROUGHPUT_LINES) for number in range(CONCURRENCY)]
    rates: dict[int, list[float]] = {port: [] for port in ports}
    for _ in range(THROUGHPUT_RUNS):
        for port in ports:
            clients = (
                LoadClient(number, *requests[number % CONCURRENCY])
                for number in range(THROUGHPUT_REQUESTS)
            )
            started = time.monotonic()
            done = run_clients(clients, port, THROUGHPUT_TIMEOUT_S)
            seconds = time.monotonic() - started
            if show_problems(done):
                return 1
            rates[port].append(len(done) / seconds)
    print(
        f"load: {THROUGHPUT_REQUESTS:,} requests of {THROUGHPUT_LINES} lines, "
        f"{CONCURRENCY} at a time, "
        f"every reply verified; requests/s, the median of {THROUGHPUT_RUNS} runs:"
    )
    for port, port_rates in rates.items():
        runs = ", ".join(f"{rate:.0f}" for rate in port_rates)
        print(f"load: port {port}: {statistics.median(port_rates):,.0f} requests/s ({runs})")
    return 0


@contextlib.contextmanager
def server_ports(ports: list[int] | None) -> Iterator[list[int]]:
    """ports, or else the port of a server started here and stopped after.

    Raises RuntimeError if that server does not exit 0, AssertionError if it does not start
    or leaves a process behind.
    """
    if ports:
        yield ports
        return
    server = ServerProcess(["-n", str(WORKERS)], start_method=None)
    try:
        yield [server.port]
        status = server.stop()
    finally:
        server.cleanup()
    if status:
        raise RuntimeError(f"the server exited with status {status}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.load",
        description=f"{CLIENTS} concurrent clients x {LINES_PER_CLIENT:,} lines against "
        "bluserver, "
        "every reply verified line by line; exit status 1 on any mismatch or failure.",
    )
    parser.add_argument(
        "-p",
        "--port",
        type=int,
        action="append",
        dest="ports",
        help=f"use the server on {HOST}:PORT (default: start one with -n {WORKERS} and stop "
        "it after); "
        "--throughput takes several, measured in turn",
    )
    parser.add_argument(
        "--throughput",
        action="store_true",
        help="measure requests per second instead: "
        f"{THROUGHPUT_RUNS} runs of {THROUGHPUT_REQUESTS:,} requests "
        f"of {THROUGHPUT_LINES} lines, {CONCURRENCY} at a time",
    )
    args = parser.parse_args(argv)
    if args.ports and len(args.ports) > 1 and not args.throughput:
        parser.error("several -p only with --throughput")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with server_ports(args.ports) as ports:
            return throughput_runs(ports) if args.throughput else load_run(ports[0])
    except (
        RuntimeError,
        OSError,
        AssertionError,
    ) as error:  # cannot connect; the server did not start or stop
        print(f"load: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
