"""Load test: 50 concurrent clients x 2,000 lines against one bluserver, every reply verified.

Run ``make load``, or ``.venv/bin/python load.py [-p PORT]``.  Without -p it starts its own
server (``bluserver.py -a 127.0.0.1 -p 0 -n 2``, see bench.ServerProcess) and stops it at the
end with SIGTERM, after which the server must exit 0; with -p it uses the server already
listening on 127.0.0.1:PORT.

The clients are non-blocking sockets in this one process, driven by a selector: all
connect at once, send their requests and read their replies as the server allows.  Each
client sends its own seed-like lines (bench.seed_like_lines: flat expressions plus the
seed's hostile lines, which must come back as error lines), and its reply is checked
line by line against grammar.evaluate_line computed here.

Prints one summary line; exits 1 if any line mismatches or anything fails, else 0.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import selectors
import socket
import sys
import time
from collections.abc import Sequence

from client import HEADER, RECV_BYTES
from grammar import evaluate_line
from tools.bench import HOST, HOSTILE_LINES, SEED, ServerProcess, seed_like_lines, to_payload

CLIENTS = 50
LINES_PER_CLIENT = 2_000
WORKERS = 2
LOAD_TIMEOUT_S = 45.0  # every client must be answered within this
PROBLEMS_SHOWN = 5  # clients whose failure or first mismatch is printed


class LoadClient:
    """One connection: connects, sends one request, reads the reply, then compares it."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.lines = seed_like_lines(LINES_PER_CLIENT - len(HOSTILE_LINES), SEED + number)
        self.expected = [evaluate_line(line) for line in self.lines]
        payload = to_payload(self.lines)
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
        """Send or receive what the socket allows now; return the events to wait for next, 0 when done.

        Raises OSError if the connection fails.
        """
        if self.outgoing:
            return self.send()
        return self.receive()

    def send(self) -> int:
        code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)  # a failed connect shows here
        if code:
            raise OSError(code, f"cannot connect: {os.strerror(code)}")
        sent = self.sock.send(self.outgoing)
        self.outgoing = self.outgoing[sent:]
        return selectors.EVENT_WRITE if self.outgoing else selectors.EVENT_READ

    def receive(self) -> int:
        chunk = self.sock.recv(RECV_BYTES)
        if not chunk:
            raise ConnectionError(f"connection closed after {len(self.incoming)} bytes of the reply")
        self.incoming += chunk
        if len(self.incoming) < HEADER.size:
            return selectors.EVENT_READ
        (size,) = HEADER.unpack_from(self.incoming)
        if len(self.incoming) < HEADER.size + size:
            return selectors.EVENT_READ
        self.verify(self.incoming[HEADER.size :])
        return 0

    def verify(self, reply: bytearray) -> None:
        """Count the reply's lines that differ from the expected results; a wrong count is a failure."""
        results = reply.decode("utf-8").split("\n")
        if results.pop() != "" or len(results) != len(self.expected):
            self.failure = f"the reply has {len(results)} lines for {len(self.expected)} input lines"
            return
        wrong = [index for index, (got, want) in enumerate(zip(results, self.expected)) if got != want]
        self.mismatches = len(wrong)
        if wrong:
            first = wrong[0]
            self.first_mismatch = (
                f"line {first + 1} {self.lines[first]!r}: got {results[first]!r}, expected {self.expected[first]!r}"
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


def run_clients(clients: Sequence[LoadClient], port: int, timeout_s: float) -> None:
    """Connect every client to port and drive each until it is done or fails; clients
    still waiting after timeout_s fail.  Closes every client's socket."""
    deadline = time.monotonic() + timeout_s
    with contextlib.ExitStack() as sockets, selectors.DefaultSelector() as selector:
        for load_client in clients:
            sockets.enter_context(load_client.sock)
            load_client.connect(port)
            selector.register(load_client.sock, selectors.EVENT_WRITE, load_client)
        while selector.get_map() and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=deadline - time.monotonic()):
                step(selector, key)
        for key in selector.get_map().values():
            key.data.failure = f"no complete reply within {timeout_s:g} s"


def step(selector: selectors.BaseSelector, key: selectors.SelectorKey) -> None:
    """Let the client of key act on its socket, and wait for what it needs next."""
    load_client: LoadClient = key.data
    try:
        events = load_client.step()
    except OSError as error:
        load_client.failure = str(error) or type(error).__name__
        events = 0
    if not events:
        selector.unregister(load_client.sock)
    elif events != key.events:
        selector.modify(load_client.sock, events, load_client)


def report(clients: Sequence[LoadClient], seconds: float) -> int:
    """Print the first problems and the summary line; return the exit status."""
    problems = [
        f"client {load_client.number}: {load_client.problem()}" for load_client in clients if load_client.problem()
    ]
    for problem in problems[:PROBLEMS_SHOWN]:
        print(f"load: {problem}", file=sys.stderr)
    if len(problems) > PROBLEMS_SHOWN:
        print(f"load: ... and {len(problems) - PROBLEMS_SHOWN} more clients with problems", file=sys.stderr)
    failures = sum(1 for load_client in clients if load_client.failure)
    mismatches = sum(load_client.mismatches for load_client in clients)
    lines = sum(len(load_client.expected) for load_client in clients)
    error_lines = sum(load_client.error_lines() for load_client in clients)
    print(
        f"load: {len(clients)} clients, {lines:,} lines, {error_lines} error lines, "
        f"{mismatches} mismatches, {failures} failures, {seconds:.2f} s"
    )
    return 1 if problems else 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="load.py",
        description=f"{CLIENTS} concurrent clients x {LINES_PER_CLIENT:,} lines against bluserver, "
        "every reply verified line by line; exit status 1 on any mismatch or failure.",
    )
    parser.add_argument(
        "-p", "--port", type=int,
        help=f"use the server on {HOST}:PORT (default: start one with -n {WORKERS} and stop it after)",
    )  # fmt: skip
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    clients = [LoadClient(number) for number in range(CLIENTS)]
    try:
        with contextlib.ExitStack() as stack:
            port = args.port or stack.enter_context(ServerProcess(workers=WORKERS)).port
            started = time.monotonic()
            run_clients(clients, port, LOAD_TIMEOUT_S)
            seconds = time.monotonic() - started
    except (RuntimeError, OSError) as error:  # cannot connect, or the server would not start or stop cleanly
        print(f"load: {error}", file=sys.stderr)
        return 1
    return report(clients, seconds)


if __name__ == "__main__":
    sys.exit(main())
