"""Reliability: bluserver facing hostile or failing clients, failing workers, load limits and signals.

Every test runs real servers (conftest.start_server) on ephemeral 127.0.0.1 ports.  `Observed`
reads each server's stdout and stderr as they come, so that a verbose server never blocks on a
full pipe and a test can wait for a log event (`wait_for_event`) instead of sleeping.  Process
checks read /proc: the server's children are its handler processes, the handlers' children are
workers, and everything the server starts lives in the session the fixture gives it.
"""

from __future__ import annotations

import ast
import errno
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, TextIO

import pytest

from bluserver import slice_bounds
from client import HEADER, recv_exactly, recv_frame, send_frame
from conftest import ROOT, ServerProcess, session_processes, wait_until

EVENT_TIMEOUT_S = 10.0  # how long to wait for a log event that must come
REPLY_TIMEOUT_S = 30.0  # client socket timeout: a reply that must come
EXIT_TIMEOUT_S = 30.0  # a graceful shutdown finishing its requests in flight
STOP_AT_ONCE_S = 3.0  # the second signal: far less than the request in flight would need
READER_JOIN_S = 5.0  # output readers end when every process holding the pipes has exited
WORKER_FAILED = b"error: worker failed\n"


# --- Processes, as /proc shows them. -----------------------------------------------------


class ProcessState(NamedTuple):
    pid: int
    state: str  # 'R', 'S', ..., 'Z' for a zombie
    ppid: int
    session: int


def process_table() -> list[ProcessState]:
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


def live_children(pid: int) -> list[int]:
    """The server's live children are its handler processes."""
    return [row.pid for row in process_table() if row.ppid == pid and row.state != "Z"]


def session_zombies(session: int) -> list[int]:
    return [row.pid for row in process_table() if row.session == session and row.state == "Z"]


class ProcessSampler:
    """Counts, every few milliseconds in a thread, a server's handlers and its session's processes."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self.handler_counts: list[int] = []
        self.process_counts: list[int] = []
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stopped.wait(0.005):
            table = [row for row in process_table() if row.state != "Z"]
            self.handler_counts.append(sum(row.ppid == self.server_pid for row in table))
            self.process_counts.append(sum(row.session == self.server_pid for row in table))

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()


# --- A server whose output is read as it comes. ------------------------------------------

EVENT_LINE = re.compile(r"\[bluserver\] .*?: (?P<level>[A-Z]+) (?P<fields>.*)")
FIELD = re.compile(r"""(\w+)=('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|[^\s'"(]+)""")


def parse_event(line: str) -> dict[str, Any] | None:
    """The fields of a key=value log line, plus its level; None for any other line."""
    match = EVENT_LINE.match(line)
    if not match:
        return None
    event: dict[str, Any] = {"level": match["level"]}
    for key, text in FIELD.findall(match["fields"]):
        try:
            event[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            event[key] = text
    return event


def collect_lines(stream: TextIO, lines: list[str]) -> None:
    for line in stream:
        lines.append(line)


class Observed:
    """A ServerProcess whose stdout and stderr are collected line by line by two threads."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.process = server.process
        self.pid = server.process.pid  # also the id of the session it and its children live in
        self.port = server.port
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self._readers = [
            threading.Thread(target=collect_lines, args=(stream, lines), daemon=True)
            for stream, lines in (
                (server.process.stdout, self.stdout_lines),
                (server.process.stderr, self.stderr_lines),
            )
        ]
        for reader in self._readers:
            reader.start()

    def connect(self, timeout_s: float = REPLY_TIMEOUT_S, receive_buffer_bytes: int | None = None) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer_bytes:  # before connecting, so that it also limits the TCP window
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer_bytes)
        sock.settimeout(timeout_s)
        sock.connect(("127.0.0.1", self.port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def request(self, payload: bytes) -> bytes:
        with self.connect() as sock:
            send_frame(sock, [payload])
            return bytes(recv_frame(sock))

    def handlers(self) -> list[int]:
        return live_children(self.pid)

    def wait_until_idle(self, what: str) -> None:
        """Wait until the server is its session's only live process: every handler and worker gone."""
        wait_until(lambda: session_processes(self.pid) == [self.pid], EVENT_TIMEOUT_S, what)

    def events(self, name: str, **fields: Any) -> list[dict[str, Any]]:
        """Logged events called name whose fields include fields, in the order logged."""
        parsed = (parse_event(line) for line in list(self.stdout_lines))
        return [
            event
            for event in parsed
            if event and event.get("event") == name and all(event.get(key) == value for key, value in fields.items())
        ]

    def wait_for_event(self, name: str, **fields: Any) -> dict[str, Any]:
        """The first such event, once it is logged; fail after EVENT_TIMEOUT_S."""
        wait_until(lambda: self.events(name, **fields), EVENT_TIMEOUT_S, f"event {name!r} with {fields}")
        return self.events(name, **fields)[0]

    def stop(self) -> int:
        """SIGTERM, wait for the exit and for the last of the output; return the exit status."""
        status = self.server.stop()
        self.join_output()
        return status

    def join_output(self) -> None:
        """Wait until every process holding the output pipes has exited and all is read."""
        for reader in self._readers:
            reader.join(READER_JOIN_S)

    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    def close(self) -> None:
        """Stop the server; fail if a process of its session still holds its output open.

        The readers must be done before the fixture closes the pipes: closing a stream
        that another thread is reading would block the fixture.
        """
        try:
            self.server.stop()
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.join_output()
        if not any(reader.is_alive() for reader in self._readers):
            return
        leftovers = session_processes(self.pid)
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
        self.join_output()
        raise AssertionError(f"processes outlived the server, holding its output open: {leftovers}")


@pytest.fixture
def serve(start_server: Callable[..., ServerProcess]) -> Iterator[Callable[..., Observed]]:
    """serve(*args) -> an Observed server; stopped after the test, before start_server's leftover check."""
    observed: list[Observed] = []

    def start(*args: str) -> Observed:
        observed.append(Observed(start_server(*args)))
        return observed[-1]

    yield start
    for server in observed:
        server.close()


# --- Requests and their expected replies. ------------------------------------------------


def slow_request(count: int, first: int = 0) -> tuple[bytes, bytes]:
    """count lines that only the full grammar evaluates (pyparsing, ~150 µs each here), and the reply."""
    numbers = range(first, first + count)
    payload = "".join(f"({number} + 2) * -3\n" for number in numbers).encode()
    reply = "".join(f"{(number + 2) * -3}\n" for number in numbers).encode()
    return payload, reply


def fast_request(count: int, first: int = 0) -> tuple[bytes, bytes]:
    """count lines in the flat form the fast path evaluates (~1 µs each), and the reply."""
    numbers = range(first, first + count)
    payload = "".join(f"{number} * 2 - 1000\n" for number in numbers).encode()
    reply = "".join(f"{number * 2 - 1000}\n" for number in numbers).encode()
    return payload, reply


def large_reply_request(count: int) -> tuple[bytes, bytes]:
    """count short lines whose results are 4,001 digits each: a reply ~360 times the request."""
    return b"10 ** 4000\n" * count, (b"1" + b"0" * 4000 + b"\n") * count


def run_server_expecting_failure(*args: str) -> subprocess.CompletedProcess[str]:
    """Run a server that must exit at once; its completed process, output captured."""
    return subprocess.run(
        [sys.executable, "bluserver.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=EVENT_TIMEOUT_S,
        check=False,
    )


# --- Oversized requests. -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "declared", "reply"),
    [
        (["--max-bytes", "100"], 101, b"error: request too large (101 bytes, limit 100)\n"),
        (
            ["--max-bytes", "100"],
            2**64 - 1,  # a buffer this size cannot exist: the reply proves none was allocated
            b"error: request too large (18446744073709551615 bytes, limit 100)\n",
        ),
        ([], 256 * 1024 * 1024 + 1, b"error: request too large (268435457 bytes, limit 268435456)\n"),
    ],
    ids=["one-byte-over", "largest-length", "default-limit-256MiB"],
)
def test_oversized_declared_length_is_answered_and_closed_without_reading_the_body(
    serve: Callable[..., Observed], options: list[str], declared: int, reply: bytes
) -> None:
    server = serve(*options)
    with server.connect(timeout_s=EVENT_TIMEOUT_S) as sock:
        sock.sendall(HEADER.pack(declared))  # and never the body
        assert recv_frame(sock) == reply
        assert sock.recv(1) == b"", "the server must close the connection after the error reply"
    wait_until(lambda: not server.handlers(), EVENT_TIMEOUT_S, "the handler to exit")


def test_request_of_exactly_max_bytes_is_served(serve: Callable[..., Observed]) -> None:
    server = serve("--max-bytes", "12")
    assert server.request(b"1 + 2\n3 * 4\n") == b"3\n12\n"


def test_oversized_request_sent_in_full_at_once_still_gets_the_error_reply(serve: Callable[..., Observed]) -> None:
    server = serve("--max-bytes", "1000")
    body = b"1 + 1\n" * (8 * 1024 * 1024 // 6)  # more than the socket buffers hold: the server must drain it
    with server.connect(timeout_s=EVENT_TIMEOUT_S) as sock:
        send_frame(sock, [body])
        assert recv_frame(sock) == f"error: request too large ({len(body)} bytes, limit 1000)\n".encode()


# --- Clients that are idle, stall, or leave. -----------------------------------------------


def test_idle_client_is_disconnected_after_timeout_while_another_client_is_served(
    serve: Callable[..., Observed],
) -> None:
    timeout_s = 1.0
    server = serve("-v", "--timeout", str(timeout_s))
    connected = time.monotonic()
    with server.connect(timeout_s=timeout_s + EVENT_TIMEOUT_S) as idle:
        server.wait_for_event("Incoming connection")
        assert server.request(b"6 * 7\n") == b"42\n"
        assert idle.recv(1) == b"", "the idle client must be disconnected"
        idle_for_s = time.monotonic() - connected
    assert idle_for_s >= timeout_s
    dropped = server.wait_for_event("Client failed while sending")
    assert (dropped["level"], dropped["reason"]) == ("WARNING", "timed out")
    events = [event["event"] for event in map(parse_event, server.stdout_lines) if event]
    assert events.index("Request served") < events.index("Client failed while sending"), "served meanwhile"
    wait_until(lambda: not server.handlers(), EVENT_TIMEOUT_S, "the idle client's handler to exit")
    assert server.stop() == 0
    assert "Traceback" not in server.stderr()


STALLED_REQUESTS = {
    "within-the-header": HEADER.pack(100)[:3],
    "after-the-header": HEADER.pack(100),
    "within-the-body": HEADER.pack(100) + b"1 + 1\n",
}


@pytest.mark.parametrize("sent", STALLED_REQUESTS.values(), ids=STALLED_REQUESTS.keys())
def test_client_stalled_mid_request_is_disconnected_after_timeout_and_its_handler_exits(
    serve: Callable[..., Observed], sent: bytes
) -> None:
    timeout_s = 0.5
    server = serve("-v", "--timeout", str(timeout_s))
    connected = time.monotonic()
    with server.connect(timeout_s=timeout_s + EVENT_TIMEOUT_S) as sock:
        sock.sendall(sent)
        assert sock.recv(1) == b"", "the stalled client must be disconnected"
        assert time.monotonic() - connected >= timeout_s
    dropped = server.wait_for_event("Client failed while sending")
    assert (dropped["level"], dropped["pname"], dropped["reason"]) == ("WARNING", "handler", "timed out")
    wait_until(lambda: not server.handlers(), EVENT_TIMEOUT_S, "the stalled client's handler to exit")
    assert server.stop() == 0
    assert "Traceback" not in server.stderr()


TRUNCATED_REQUESTS = {
    "within-the-header": (HEADER.pack(100)[:3], False, "connection closed after 3 of 8 bytes"),
    "after-the-header": (HEADER.pack(100), False, "connection closed after 0 of 100 bytes"),
    "within-the-body": (HEADER.pack(100) + b"1 + 1\n", False, "connection closed after 6 of 100 bytes"),
    "reset-within-the-body": (HEADER.pack(100) + b"1 + 1\n", True, f"[Errno {errno.ECONNRESET}] "),
}


@pytest.mark.parametrize(("sent", "reset", "reason"), TRUNCATED_REQUESTS.values(), ids=TRUNCATED_REQUESTS.keys())
def test_client_closing_before_sending_all_it_declared_is_logged_in_one_line_without_traceback(
    serve: Callable[..., Observed], sent: bytes, reset: bool, reason: str
) -> None:
    server = serve()  # warnings only: the failure is the one line a request logs
    with server.connect() as sock:
        sock.sendall(sent)
        if reset:  # close with RST rather than FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    server.wait_for_event("Client failed while sending")
    wait_until(lambda: not server.handlers(), EVENT_TIMEOUT_S, "the handler to exit")
    assert server.request(b"2 * 3\n") == b"6\n"
    assert server.stop() == 0
    events = [parse_event(line) for line in server.stdout_lines]
    assert [event and event["event"] for event in events] == [
        "Client failed while sending",
        "Shutting down",
        "Server stopped",
    ]
    assert events[0] is not None
    assert events[0]["reason"].startswith(reason)
    assert "Traceback" not in server.stderr()


def test_client_that_stops_reading_the_reply_is_disconnected_after_timeout(serve: Callable[..., Observed]) -> None:
    server = serve("-v", "--timeout", "0.5")
    payload, _ = large_reply_request(2000)  # an 8 MB reply: more than the socket buffers hold
    with server.connect(receive_buffer_bytes=16 * 1024) as sock:
        send_frame(sock, [payload])
        dropped = server.wait_for_event("Client failed while receiving")
        assert (dropped["level"], dropped["reason"]) == ("WARNING", "timed out")
        wait_until(lambda: not server.handlers(), EVENT_TIMEOUT_S, "the handler to exit")


def test_client_sending_slowly_but_steadily_is_served_although_it_takes_longer_than_timeout(
    serve: Callable[..., Observed],
) -> None:
    timeout_s = 0.5
    server = serve("--timeout", str(timeout_s))
    payload, reply = fast_request(10)  # 170 bytes, sent 17 at a time
    with server.connect() as sock:
        started = time.monotonic()
        sock.sendall(HEADER.pack(len(payload)))
        for offset in range(0, len(payload), 17):
            time.sleep(timeout_s / 5)  # a slow client, not synchronisation: never silent for --timeout
            sock.sendall(payload[offset : offset + 17])
        assert time.monotonic() - started > timeout_s
        assert recv_frame(sock) == reply


def receive_at_rate(sock: socket.socket, size: int, bytes_per_s: float) -> bytearray:
    """Up to size bytes, read no faster than bytes_per_s (catching up when behind); less if the peer closes."""
    received = bytearray()
    started = time.monotonic()
    while len(received) < size:
        ahead_s = len(received) / bytes_per_s - (time.monotonic() - started)
        if ahead_s > 0:
            time.sleep(ahead_s)  # pacing a slow reader, not synchronisation
        chunk = sock.recv(min(64 * 1024, size - len(received)))
        if not chunk:
            break
        received += chunk
    return received


@pytest.mark.slow
def test_client_reading_a_large_reply_steadily_is_served_although_it_takes_longer_than_timeout(
    serve: Callable[..., Observed],
) -> None:
    # The server's send buffer (up to 4 MB on loopback) frees in steps of about a third, so a
    # reader at 8 MB/s lets the server write every ~0.2 s: steady activity for a 0.5 s timeout.
    # The whole 12 MB reply still takes ~1.5 s, three times the timeout.
    timeout_s, bytes_per_s = 0.5, 8e6
    server = serve("--timeout", str(timeout_s))
    payload, reply = large_reply_request(3000)
    with server.connect(receive_buffer_bytes=64 * 1024) as sock:
        started = time.monotonic()
        send_frame(sock, [payload])
        (size,) = HEADER.unpack(recv_exactly(sock, HEADER.size))
        received = receive_at_rate(sock, size, bytes_per_s)
        took_s = time.monotonic() - started
    assert took_s > 2 * timeout_s
    assert len(received) == size == len(reply), "the server disconnected a client that never stalled"
    assert received == reply


# --- Workers that die or hang. -------------------------------------------------------------


def test_worker_killed_mid_request_has_its_slice_run_again_and_the_reply_is_complete(
    serve: Callable[..., Observed],
) -> None:
    server = serve("-v", "-n", "2")
    payload, expected = slow_request(10_000)  # ~0.8 s a slice: the worker is busy when killed
    with server.connect() as sock:
        send_frame(sock, [payload])
        started = server.wait_for_event("Worker started", worker="worker-1", attempt=1)
        os.kill(started["worker_pid"], signal.SIGKILL)
        assert recv_frame(sock) == expected
    server.wait_for_event("Request served")  # the handler's earlier events are read by now
    failures = server.events("Worker failed")
    assert [(failure["worker"], failure["attempt"]) for failure in failures] == [("worker-1", 1)]
    assert failures[0]["reason"] in {"died", "died at start"}
    assert server.events("Worker started", worker="worker-1", attempt=2)


def test_worker_killed_on_both_attempts_fails_only_its_own_lines(serve: Callable[..., Observed]) -> None:
    server = serve("-v", "-n", "2")
    payload, expected = slow_request(10_000)
    (_, first_slice_end), _ = slice_bounds(payload, 2)
    failed_lines = payload[:first_slice_end].count(b"\n")
    with server.connect() as sock:
        send_frame(sock, [payload])
        for attempt in (1, 2):
            started = server.wait_for_event("Worker started", worker="worker-1", attempt=attempt)
            os.kill(started["worker_pid"], signal.SIGKILL)
        reply = recv_frame(sock)
    assert reply == WORKER_FAILED * failed_lines + b"".join(expected.splitlines(keepends=True)[failed_lines:])
    served = server.wait_for_event("Request served")
    assert (served["lines"], served["error_lines"]) == (10_000, failed_lines)


def test_worker_timeout_fails_the_slow_slice_only_and_the_server_serves_the_next_request(
    serve: Callable[..., Observed],
) -> None:
    server = serve("-v", "-n", "2", "--worker-timeout", "0.5")
    # Lines of equal length, so that the two slices are exactly the fast half and the slow half.
    fast_payload, fast_reply = fast_request(20_000, first=10_000)  # ~40 ms of work
    slow_payload, _ = slow_request(20_000, first=10_000)  # ~3 s of work
    payload = fast_payload + slow_payload
    assert slice_bounds(payload, 2) == [(0, len(fast_payload)), (len(fast_payload), len(payload))]
    assert server.request(payload) == fast_reply + WORKER_FAILED * 20_000
    server.wait_for_event("Request served")
    failures = server.events("Worker failed")
    assert [(failure["worker"], failure["reason"], failure["attempt"]) for failure in failures] == [
        ("worker-2", "timed out", 1),
        ("worker-2", "timed out", 2),
    ]
    server.wait_until_idle("the handler and its killed workers to be gone")
    assert server.request(b"1 + 1\n2 * 3\n") == b"2\n6\n"


# --- Many clients at once. -----------------------------------------------------------------


def test_max_clients_bounds_the_handlers_while_every_waiting_connection_is_served(
    serve: Callable[..., Observed],
) -> None:
    max_clients, workers = 2, 2
    server = serve("--max-clients", str(max_clients), "-n", str(workers))
    requests = [slow_request(1500, first=number * 1500) for number in range(6)]  # ~0.25 s each
    sampler = ProcessSampler(server.pid)
    sockets: list[socket.socket] = []
    try:
        sockets.extend(server.connect() for _ in requests)  # all six connect: none is refused
        for sock, (payload, _) in zip(sockets, requests):
            send_frame(sock, [payload])
        replies = [bytes(recv_frame(sock)) for sock in sockets]
    finally:
        sampler.stop()
        for sock in sockets:
            sock.close()
    assert replies == [reply for _, reply in requests]
    assert max(sampler.handler_counts) == max_clients
    assert max(sampler.process_counts) <= max_clients * (1 + workers) + 1


# --- Shutdown. -------------------------------------------------------------------------------

SHUTDOWN_SIGNALS = [signal.SIGTERM, signal.SIGINT]


@pytest.mark.parametrize("signum", SHUTDOWN_SIGNALS, ids=[signum.name for signum in SHUTDOWN_SIGNALS])
def test_shutdown_signal_refuses_new_connections_and_finishes_the_request_in_flight(
    serve: Callable[..., Observed], signum: signal.Signals
) -> None:
    server = serve("-v", "-n", "2")
    payload, expected = slow_request(10_000)  # ~0.8 s in flight
    with server.connect() as sock:
        send_frame(sock, [payload])
        server.wait_for_event("Worker started", worker="worker-2")
        server.process.send_signal(signum)
        shutting_down = server.wait_for_event("Shutting down")
        assert (shutting_down["signal"], shutting_down["requests_in_flight"]) == (signum.name, 1)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", server.port), timeout=EVENT_TIMEOUT_S).close()
        assert server.handlers(), "the request must still be in flight when the connection is refused"
        assert recv_frame(sock) == expected
    assert server.process.wait(EXIT_TIMEOUT_S) == 0
    assert session_processes(server.pid) == [], "the server reaps every child before it exits"
    server.join_output()
    assert server.events("Server stopped")
    assert "Traceback" not in server.stderr()


@pytest.mark.parametrize("signum", SHUTDOWN_SIGNALS, ids=[signum.name for signum in SHUTDOWN_SIGNALS])
def test_second_shutdown_signal_stops_at_once_with_status_1_and_leaves_no_process(
    serve: Callable[..., Observed], signum: signal.Signals
) -> None:
    server = serve("-v", "-n", "2")
    payload, _ = slow_request(100_000)  # ~8 s of work per worker
    with server.connect() as sock:
        send_frame(sock, [payload])
        server.wait_for_event("Worker started", worker="worker-2")
        server.process.send_signal(signum)
        server.wait_for_event("Shutting down")
        server.process.send_signal(signum)
        assert server.process.wait(STOP_AT_ONCE_S) == 1
        with pytest.raises(ConnectionError):  # closed without a reply
            recv_frame(sock)
    wait_until(lambda: not session_processes(server.pid), 2.0, "the killed handler and workers to be gone")
    server.join_output()
    assert server.events("Stopped at once", signal=signum.name)


@pytest.mark.slow
def test_hundreds_of_sequential_requests_leave_no_zombie_processes(serve: Callable[..., Observed]) -> None:
    server = serve("-n", "2")
    for number in range(200):
        assert server.request(f"{number} * 2\n1 + {number}\n".encode()) == f"{number * 2}\n{1 + number}\n".encode()
    # The last handler may still be exiting; the server reaps every REAP_INTERVAL_S (0.05 s).
    wait_until(
        lambda: session_processes(server.pid) == [server.pid] and not session_zombies(server.pid),
        2.0,
        "the server to be its session's only process, with no zombie",
    )


# --- Addresses that cannot be used. ------------------------------------------------------


def test_second_server_on_a_port_in_use_says_so_in_one_line_and_exits_1(serve: Callable[..., Observed]) -> None:
    server = serve()
    second = run_server_expecting_failure("-a", "127.0.0.1", "-p", str(server.port))
    assert (second.returncode, second.stdout) == (1, "")
    assert second.stderr == f"bluserver: port {server.port} is already in use (try -p)\n"
    assert server.request(b"1 + 1\n") == b"2\n", "the first server serves on"


def test_address_that_cannot_be_bound_is_reported_in_one_line_and_exits_1() -> None:
    # 192.0.2.1 (TEST-NET-1) is not an address of this machine: bind() fails, nothing is sent.
    result = run_server_expecting_failure("-a", "192.0.2.1", "-p", "0")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == f"bluserver: cannot listen on 192.0.2.1:0: {os.strerror(errno.EADDRNOTAVAIL)}\n"
