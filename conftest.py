"""Shared test fixtures: real bluserver processes on ephemeral 127.0.0.1 ports.

Every server a test starts runs in a session of its own, so that at the end the test
can prove that no process of that session — server, handler or worker — is left.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Callable, NamedTuple

import pytest

from client import recv_frame, send_frame

ROOT = Path(__file__).resolve().parent
STARTUP_TIMEOUT_S = 20.0
EXIT_TIMEOUT_S = 30.0
LEFTOVER_GRACE_S = 2.0

# Runs the server under a chosen multiprocessing start method.
START_METHOD_LAUNCHER = (
    "import multiprocessing, sys; multiprocessing.set_start_method(sys.argv.pop(1)); "
    "import bluserver; sys.exit(bluserver.main(sys.argv[1:]))"
)


class ProcessState(NamedTuple):
    pid: int
    state: str  # 'R', 'S', ..., 'Z' for a zombie
    ppid: int
    session: int


def process_table() -> list[ProcessState]:
    """Every process /proc shows now: its pid, state, parent and session."""
    table = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # it exited while we looked
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        table.append(ProcessState(int(entry.name), fields[0], int(fields[1]), int(fields[3])))
    return table


def session_processes(session_id: int) -> list[int]:
    """Pids of the live (non-zombie) processes in a session."""
    return [row.pid for row in process_table() if row.session == session_id and row.state != "Z"]


def read_banner(stream: IO[str], timeout_s: float) -> str:
    """The first line on a server's stdout ("" if none comes within timeout_s).

    Read byte by byte from the pipe itself, so that nothing after the banner is left in
    the stream's buffers: a test may go on to read the pipe by its file descriptor.
    """
    line = bytearray()
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as selector:
        selector.register(stream.fileno(), selectors.EVENT_READ)
        while not line.endswith(b"\n") and selector.select(max(0.0, deadline - time.monotonic())):
            byte = os.read(stream.fileno(), 1)
            if not byte:
                break
            line += byte
    return line.decode(errors="replace")


def wait_until(condition: Callable[[], object], timeout_s: float, what: str) -> None:
    """Poll condition until it is true; fail the test with `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.01)


class ServerProcess:
    """A running `python bluserver.py` on 127.0.0.1 and an ephemeral port."""

    def __init__(self, args: list[str], start_method: str | None) -> None:
        launcher = ["-c", START_METHOD_LAUNCHER, start_method] if start_method else ["bluserver.py"]
        self.process = subprocess.Popen(
            [sys.executable, *launcher, "-a", "127.0.0.1", "-p", "0", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert self.process.stdout is not None
        banner = read_banner(self.process.stdout, STARTUP_TIMEOUT_S)
        match = re.search(r"serving on [^ ]+:(\d+)", banner)
        if not match:
            self.process.kill()
            _, errors = self.process.communicate()
            raise AssertionError(f"server did not start: {banner!r} {errors!r}")
        self.port = int(match.group(1))

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=STARTUP_TIMEOUT_S)

    def request(self, payload: bytes) -> bytes:
        """Send one request with the wire protocol; return the reply's bytes."""
        with self.connect() as sock:
            send_frame(sock, [payload])
            return bytes(recv_frame(sock))

    def stop(self) -> int:
        """SIGTERM, wait, and return the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(EXIT_TIMEOUT_S)

    def output(self) -> str:
        """Everything the server wrote to stdout after its banner (call after stop)."""
        assert self.process.stdout is not None
        return self.process.stdout.read()

    def cleanup(self) -> None:
        """Stop the server and make sure nothing of its session outlives it."""
        try:
            self.stop()
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for stream in (self.process.stdout, self.process.stderr):
            if stream:
                stream.close()
        # Processes of the session may take a moment to finish exiting after the server.
        deadline = time.monotonic() + LEFTOVER_GRACE_S
        while session_processes(self.process.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        leftovers = session_processes(self.process.pid)
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
        assert not leftovers, f"processes outlived the server: {leftovers}"


@pytest.fixture
def start_server() -> Iterator[Callable[..., ServerProcess]]:
    """start_server(*args, start_method=None) -> a running ServerProcess, cleaned up after the test."""
    servers: list[ServerProcess] = []

    def start(*args: str, start_method: str | None = None) -> ServerProcess:
        server = ServerProcess(list(args), start_method)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.cleanup()


@pytest.fixture
def server(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    """A server with default options."""
    return start_server()
