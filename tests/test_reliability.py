"""Reliability: bluserver facing hostile or failing clients, failing workers, load limits and signals.

Every test runs real servers (conftest.start_server) on ephemeral 127.0.0.1 ports, logging one
JSON object per line (--log-format json).  `Observed` reads each server's stdout and stderr from
non-blocking pipes whenever a test waits (for a log event, a reply, a process to exit), so that a
verbose server never blocks on a full pipe and a test can wait for a log event (`wait_for_event`)
instead of sleeping.  Process checks read /proc (conftest.process_table): the server's children
are its handler processes, the handlers' children are workers, and everything the server starts
lives in the session the fixture gives it.
"""

from __future__ import annotations

import errno
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from bluserver import slice_bounds
from client import HEADER, RECV_BYTES, ClosedEarly, recv_exactly, send_frame
from conftest import ROOT, ServerProcess, process_table, session_processes

EVENT_TIMEOUT_S = 10.0  # how long to wait for a log event that must come
REPLY_TIMEOUT_S = 30.0  # client socket timeout: a reply that must come
EXIT_TIMEOUT_S = 30.0  # a graceful shutdown finishing its requests in flight
STOP_AT_ONCE_S = 3.0  # the second signal: far less than the request in flight would need
OUTPUT_END_S = 5.0  # the output pipes end when every process holding them has exited
POLL_S = 0.01  # the longest a wait goes without checking its condition
SAMPLE_INTERVAL_S = 0.005  # how often ProcessCounts samples while replies are awaited
WORKER_FAILED = b"error: worker failed\n"


# --- Processes, as /proc shows them. -----------------------------------------------------


def live_children(pid: int) -> list[int]:
    """The server's live children are its handler processes."""
    return [row.pid for row in process_table() if row.ppid == pid and row.state != "Z"]


def session_zombies(session: int) -> list[int]:
    return [row.pid for row in process_table() if row.session == session and row.state == "Z"]


class ProcessCounts:
    """A server's handlers and its session's live processes, counted at each sample()."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self.handler_counts: list[int] = []
        self.process_counts: list[int] = []

    def sample(self) -> None:
        table = [row for row in process_table() if row.state != "Z"]
        self.handler_counts.append(sum(row.ppid == self.server_pid for row in table))
        self.process_counts.append(sum(row.session == self.server_pid for row in table))


# --- A server whose output is read whenever a test waits. --------------------------------


def parse_event(line: str) -> dict[str, Any] | None:
    """The fields of a JSON log line (level, event, ...); None for any other line."""
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


class Frame:
    """One length-prefixed message, as it arrives."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.size: int | None = None  # known once the header is in

    def missing(self) -> int:
        """How many more bytes the message needs; 0 once it is complete."""
        if self.size is None and len(self.data) >= HEADER.size:
            (self.size,) = HEADER.unpack(self.data[: HEADER.size])
        wanted = HEADER.size if self.size is None else HEADER.size + self.size
        return wanted - len(self.data)

    def closed_early(self) -> ClosedEarly:
        """What recv_frame raises when the peer closes before the message is complete."""
        if self.size is None:
            return ClosedEarly(f"connection closed after {len(self.data)} of {HEADER.size} bytes")
        return ClosedEarly(f"connection closed after {len(self.data) - HEADER.size} of {self.size} bytes")


class Observed:
    """A ServerProcess whose stdout and stderr are read, without blocking, whenever a test waits."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.process = server.process
        self.pid = server.process.pid  # also the id of the session it and its children live in
        self.port = server.port
        assert server.process.stdout is not None and server.process.stderr is not None
        self._stdout = server.process.stdout.fileno()
        self._stderr = server.process.stderr.fileno()
        self._output = {self._stdout: bytearray(), self._stderr: bytearray()}
        self._ended: set[int] = set()  # the pipes read to their end
        self._selector = selectors.DefaultSelector()
        for fd in self._output:
            os.set_blocking(fd, False)
            self._selector.register(fd, selectors.EVENT_READ)

    # Output.

    def _read(self, fd: int) -> None:
        """All the pipe holds now; at its end, stop watching it."""
        try:
            while chunk := os.read(fd, 64 * 1024):
                self._output[fd] += chunk
        except BlockingIOError:
            return
        self._ended.add(fd)
        self._selector.unregister(fd)

    def _select(self, timeout_s: float) -> list[socket.socket]:
        """Wait up to timeout_s for output or a watched socket; read the output; the sockets ready."""
        ready = []
        for key, _ in self._selector.select(max(0.0, timeout_s)):
            if key.fileobj in self._output:
                self._read(key.fd)
            else:
                ready.append(key.fileobj)
        return ready

    def pump(self, timeout_s: float = 0.0) -> None:
        """Read what the server wrote, waiting up to timeout_s for it to write anything."""
        self._select(timeout_s)

    def _lines(self, fd: int) -> list[str]:
        """The complete lines read so far (and a last unterminated one once the pipe ended)."""
        data = bytes(self._output[fd])
        if fd not in self._ended:
            data = data[: data.rfind(b"\n") + 1]
        return data.decode(errors="backslashreplace").splitlines(keepends=True)

    @property
    def stdout_lines(self) -> list[str]:
        self.pump()
        return self._lines(self._stdout)

    def stderr(self) -> str:
        self.pump()
        return "".join(self._lines(self._stderr))

    def join_output(self, timeout_s: float = OUTPUT_END_S) -> bool:
        """Read until every process holding the output pipes has exited; whether they all have."""
        self.wait_until(lambda: len(self._ended) == len(self._output), timeout_s, "the end of the output", fail=False)
        return len(self._ended) == len(self._output)

    # Waiting.

    def wait_until(self, condition: Callable[[], object], timeout_s: float, what: str, fail: bool = True) -> None:
        """Poll condition, reading output meanwhile, until it is true; after timeout_s fail with `what`."""
        deadline = time.monotonic() + timeout_s
        self.pump()
        while not condition():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if not fail:
                    return
                raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
            self.pump(min(POLL_S, remaining))  # returns early when the server writes

    def wait_exit(self, timeout_s: float) -> int:
        """The server's exit status, once it exits; subprocess.TimeoutExpired after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while (status := self.process.poll()) is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.process.args, timeout_s)
            self.pump(POLL_S)
        return status

    def events(self, name: str, **fields: Any) -> list[dict[str, Any]]:
        """Logged events called name whose fields include fields, in the order logged."""
        parsed = (parse_event(line) for line in self.stdout_lines)
        return [
            event
            for event in parsed
            if event and event.get("event") == name and all(event.get(key) == value for key, value in fields.items())
        ]

    def wait_for_event(self, name: str, **fields: Any) -> dict[str, Any]:
        """The first such event, once it is logged; fail after EVENT_TIMEOUT_S."""
        self.wait_until(lambda: self.events(name, **fields), EVENT_TIMEOUT_S, f"event {name!r} with {fields}")
        return self.events(name, **fields)[0]

    def handlers(self) -> list[int]:
        return live_children(self.pid)

    def wait_until_idle(self, what: str) -> None:
        """Wait until the server is its session's only live process: every handler and worker gone."""
        self.wait_until(lambda: session_processes(self.pid) == [self.pid], EVENT_TIMEOUT_S, what)

    # Clients.

    def connect(self, timeout_s: float = REPLY_TIMEOUT_S, receive_buffer_bytes: int | None = None) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer_bytes:  # before connecting, so that it also limits the TCP window
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer_bytes)
        sock.settimeout(timeout_s)
        sock.connect(("127.0.0.1", self.port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def recv(self, sock: socket.socket, size: int) -> bytes:
        """sock.recv(size), reading output while it waits; TimeoutError after sock's timeout."""
        timeout_s = sock.gettimeout() or REPLY_TIMEOUT_S
        deadline = time.monotonic() + timeout_s
        self._selector.register(sock, selectors.EVENT_READ)
        try:
            while not self._select(min(POLL_S, deadline - time.monotonic())):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"nothing to receive for {timeout_s} s")
        finally:
            self._selector.unregister(sock)
        return sock.recv(size)

    def recv_frames(self, socks: Sequence[socket.socket], every: Callable[[], object] | None = None) -> list[bytes]:
        """One message from each socket, received as they come, reading output meanwhile.

        every, if given, is called every SAMPLE_INTERVAL_S while the messages are awaited.
        Like client.recv_frame: ClosedEarly if a peer closes short; TimeoutError when no byte
        comes for REPLY_TIMEOUT_S.
        """
        frames = {sock: Frame() for sock in socks}
        interval_s = SAMPLE_INTERVAL_S if every else POLL_S
        for sock in socks:
            self._selector.register(sock, selectors.EVENT_READ)
        try:
            deadline = time.monotonic() + REPLY_TIMEOUT_S
            next_call = time.monotonic()
            while any(frame.missing() for frame in frames.values()):
                if every and time.monotonic() >= next_call:
                    every()
                    next_call = time.monotonic() + SAMPLE_INTERVAL_S
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no reply byte for {REPLY_TIMEOUT_S} s")
                for sock in self._select(interval_s):
                    frame = frames[sock]
                    chunk = sock.recv(min(frame.missing(), RECV_BYTES))
                    if not chunk:
                        raise frame.closed_early()
                    frame.data += chunk
                    if not frame.missing():
                        self._selector.unregister(sock)
                    deadline = time.monotonic() + REPLY_TIMEOUT_S
        finally:
            for sock in socks:
                if frames[sock].missing():
                    self._selector.unregister(sock)
        return [bytes(frames[sock].data[HEADER.size :]) for sock in socks]

    def recv_frame(self, sock: socket.socket) -> bytes:
        return self.recv_frames([sock])[0]

    def request(self, payload: bytes) -> bytes:
        with self.connect() as sock:
            send_frame(sock, [payload])
            return self.recv_frame(sock)

    # Stopping.

    def terminate(self) -> int:
        """SIGTERM unless it has exited; wait for the exit and return the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.wait_exit(EXIT_TIMEOUT_S)

    def stop(self) -> int:
        """SIGTERM, wait for the exit and for the last of the output; return the exit status."""
        status = self.terminate()
        self.join_output()
        return status

    def close(self) -> None:
        """Stop the server; fail if a process of its session still holds its output open."""
        try:
            try:
                self.terminate()
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            if self.join_output():
                return
            leftovers = session_processes(self.pid)
            for pid in leftovers:
                os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"processes outlived the server, holding its output open: {leftovers}")
        finally:
            self._selector.close()


@pytest.fixture
def serve(start_server: Callable[..., ServerProcess]) -> Iterator[Callable[..., Observed]]:
    """serve(*args) -> an Observed server logging JSON; stopped after the test, before start_server's checks."""
    observed: list[Observed] = []

    def start(*args: str) -> Observed:
        observed.append(Observed(start_server("--log-format", "json", *args)))
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
        assert server.recv_frame(sock) == reply
        assert server.recv(sock, 1) == b"", "the server must close the connection after the error reply"
    server.wait_until(lambda: not server.handlers(), EVENT_TIMEOUT_S, "the handler to exit")


def test_request_of_exactly_max_bytes_is_served(serve: Callable[..., Observed]) -> None:
    server = serve("--max-bytes", "12")
    assert server.request(b"1 + 2\n3 * 4\n") == b"3\n12\n"


def test_oversized_request_sent_in_full_at_once_still_gets_the_error_reply(serve: Callable[..., Observed]) -> None:
    server = serve("--max-bytes", "1000")
    body = b"1 + 1\n" * (8 * 1024 * 1024 // 6)  # more than the socket buffers hold: the server must drain it
    with server.connect(timeout_s=EVENT_TIMEOUT_S) as sock:
        send_frame(sock, [body])
        assert server.recv_frame(sock) == f"error: request too large ({len(body)} bytes, limit 1000)\n".encode()


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
        assert server.recv(idle, 1) == b"", "the idle client must be disconnected"
        idle_for_s = time.monotonic() - connected
    assert idle_for_s >= timeout_s
    dropped = server.wait_for_event("Client failed while sending")
    assert (dropped["level"], dropped["reason"]) == ("WARNING", "timed out")
    events = [event["event"] for event in map(parse_event, server.stdout_lines) if event]
    assert events.index("Request served") < events.index("Client failed while sending"), "served meanwhile"
    server.wait_until(lambda: not server.handlers(), EVENT_TIMEOUT_S, "the idle client's handler to exit")
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
        assert server.recv(sock, 1) == b"", "the stalled client must be disconnected"
        assert time.monotonic() - connected >= timeout_s
    dropped = server.wait_for_event("Client failed while sending")
    assert (dropped["level"], dropped["pname"], dropped["reason"]) == ("WARNING", "handler", "timed out")
    server.wait_until(lambda: not server.handlers(), EVENT_TIMEOUT_S, "the stalled client's handler to exit")
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
    server.wait_until(lambda: not server.handlers(), EVENT_TIMEOUT_S, "the handler to exit")
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
        server.wait_until(lambda: not server.handlers(), EVENT_TIMEOUT_S, "the handler to exit")


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
        assert server.recv_frame(sock) == reply


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
        assert server.recv_frame(sock) == expected
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
        reply = server.recv_frame(sock)
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
    counts = ProcessCounts(server.pid)
    sockets: list[socket.socket] = []
    try:
        counts.sample()
        for _ in requests:  # all six connect: none is refused
            sockets.append(server.connect())
            counts.sample()
        for sock, (payload, _) in zip(sockets, requests):
            send_frame(sock, [payload])
            counts.sample()
        replies = server.recv_frames(sockets, every=counts.sample)  # sampling every few ms meanwhile
    finally:
        for sock in sockets:
            sock.close()
    assert replies == [reply for _, reply in requests]
    assert max(counts.handler_counts) == max_clients
    assert max(counts.process_counts) <= max_clients * (1 + workers) + 1


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
        assert server.recv_frame(sock) == expected
    assert server.wait_exit(EXIT_TIMEOUT_S) == 0
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
        assert server.wait_exit(STOP_AT_ONCE_S) == 1
        with pytest.raises(ConnectionError):  # closed without a reply
            server.recv_frame(sock)
    server.wait_until(lambda: not session_processes(server.pid), 2.0, "the killed handler and workers to be gone")
    server.join_output()
    assert server.events("Stopped at once", signal=signum.name)


@pytest.mark.slow
def test_hundreds_of_sequential_requests_leave_no_zombie_processes(serve: Callable[..., Observed]) -> None:
    server = serve("-n", "2")
    for number in range(200):
        assert server.request(f"{number} * 2\n1 + {number}\n".encode()) == f"{number * 2}\n{1 + number}\n".encode()
    # The last handler may still be exiting; the server reaps every REAP_INTERVAL_S (0.05 s).
    server.wait_until(
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
