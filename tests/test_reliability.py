"""Reliability: bluserver facing hostile or slow clients, failing workers, its limits and signals.

Every test runs real servers (conftest.start_server) on ephemeral 127.0.0.1 ports, logging one
JSON object per line, and waits for logged events or for /proc to show a state, never for
time to pass.  Where a test needs a worker in a given state (waiting, hung, dead, not started)
it scripts one with tests/faults.py: a line ``gate PATH`` holds its worker until the test
creates the file PATH.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import signal
import socket
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import bluserver
import guard
import lesson
import supervise
import worker
from client import HEADER, recv_exactly, recv_frame, send_frame
from tests.harness import (
    EVENT_TIMEOUT_S,
    EXIT_TIMEOUT_S,
    JSON_LOG,
    LOG,
    ROOT,
    SCRIPTED,
    StartServer,
    process_table,
    run_python,
    session_processes,
    wait_for_exit,
    wait_until,
)

WORKER_FAILED = b"error: worker failed\n"
SHUTDOWN_SIGNALS = [signal.SIGTERM, signal.SIGINT]
# Lines whose results are enough for a worker to send them up at once: 17 of 4,001 bytes.
SENT_LINES = "10 ** 4000\n" * (worker.SEND_AT_BYTES // 4001 + 1)
SENT_RESULTS = (b"1" + b"0" * 4000 + b"\n") * (worker.SEND_AT_BYTES // 4001 + 1)


# --- Helpers. ---------------------------------------------------------------------------------


def release(path: Path) -> None:
    """Let every worker (or handler) waiting on the gate at path go on, now and from now on."""
    path.touch()


def proc_status(pid: int, field: str) -> int:
    """A field of /proc/PID/status in kB (VmSize, VmHWM, ...)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for process {pid}")


def proc_peak_kib(pid: int) -> int:
    """The peak resident memory of a live process (VmHWM), in KiB."""
    return proc_status(pid, "VmHWM")


def wchan(pid: int) -> str:
    """Where in the kernel a process sleeps: 'pipe_write' while it waits to write a full pipe."""
    try:
        return Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return "gone"


def process_state(pid: int) -> str:
    return next((row.state for row in process_table() if row.pid == pid), "gone")


def accepts_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=EVENT_TIMEOUT_S).close()
    except (
        ConnectionRefusedError,
        ConnectionResetError,
    ):  # reset: closed while in the listen backlog
        return False
    return True


def reset(sock: socket.socket) -> None:
    """Close sock with a reset (RST) rather than an orderly FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# --- Requests larger than --max-bytes, and what a header may claim. ----------------------------


@pytest.mark.parametrize(
    ("options", "declared", "reply"),
    [
        (["--max-bytes", "100"], 101, b"error: request too large (101 bytes, limit 100)\n"),
        (
            ["--max-bytes", "100"],
            2**64 - 1,
            b"error: request too large (18446744073709551615 bytes, limit 100)\n",
        ),
        (
            [],
            256 * 1024 * 1024 + 1,
            b"error: request too large (268435457 bytes, limit 268435456)\n",
        ),
    ],
    ids=["one-byte-over", "largest-length", "default-limit-256MiB"],
)
def test_oversized_declared_length_is_answered_and_closed_without_reading_the_body(
    start_server: StartServer, options: list[str], declared: int, reply: bytes
) -> None:
    server = start_server(*options)
    with server.connect() as sock:
        sock.sendall(HEADER.pack(declared))  # and never the body
        assert recv_frame(sock) == reply
        assert sock.recv(1) == b"", "the server must close the connection after the error reply"


def test_request_of_exactly_max_bytes_is_served(start_server: StartServer) -> None:
    server = start_server("--max-bytes", "12")
    assert server.request(b"1 + 2\n3 * 4\n") == b"3\n12\n"


def test_oversized_request_sent_in_full_at_once_still_gets_the_error_reply(
    start_server: StartServer,
) -> None:
    server = start_server("--max-bytes", "1000")
    # More than the socket buffers hold: the server must drain it.
    body = b"1 + 1\n" * (8 * 1024 * 1024 // 6)
    with server.connect() as sock:
        send_frame(sock, [body])
        assert (
            recv_frame(sock)
            == f"error: request too large ({len(body)} bytes, limit 1000)\n".encode()
        )


def test_announced_length_reserves_no_memory_before_the_bytes_arrive(
    start_server: StartServer,
) -> None:
    server = start_server(*LOG)
    with server.connect() as sock:
        sock.sendall(HEADER.pack(200 * 1024 * 1024) + b"1 + 1\n")  # 200 MiB announced, 6 sent
        handler = server.wait_for_event("Request announced")["pid"]
        wait_until(
            lambda: process_state(handler) == "S", "the handler to wait for the rest of the body"
        )
        grown_kib = proc_status(handler, "VmSize") - proc_status(server.pid, "VmSize")
    assert grown_kib < 50 * 1024, f"the handler reserved {grown_kib} KiB for 6 bytes"


# --- Replies larger than the request. -----------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b"10 ** 4000\n" * 30 + b"1 + 1\n",
        # Only 30 results are large, but 2,000,000 empty lines are 2,000,000 bytes of reply.
        b"9 ** 4300\n" * 30 + b"\n" * 2_000_000,
    ],
    ids=["large-results", "many-small-results"],
)
def test_request_whose_reply_would_exceed_the_reply_limit_is_refused_whole_in_one_line(
    start_server: StartServer, payload: bytes
) -> None:
    server = start_server(*LOG, "-n", "2", "--max-reply-bytes", "100000", "--max-bytes", "3000000")
    assert server.request(payload) == b"error: reply too large (limit 100000 bytes)\n"
    refused = server.wait_for_event("Request refused")
    assert refused["reason"] == "reply too large (limit 100000 bytes)"
    assert server.events("Request served") == []


def test_reply_of_exactly_the_reply_limit_is_served(start_server: StartServer) -> None:
    server = start_server("--max-reply-bytes", "1024")
    # 512 results of "2\n": 1,024 bytes.
    assert server.request(b"1 + 1\n" * 512) == b"2\n" * 512


def test_a_refused_reply_stores_no_more_than_the_reply_limit(start_server: StartServer) -> None:
    # The server may write no file past 1,000,000 bytes: a results file that outgrew
    # --max-reply-bytes would fail to be written, and the reply would say "could not store".
    server = start_server("--max-reply-bytes", "1000000", faults=["file_size_limit:1000000"])
    reply = server.request(b"\n" * 3_000_000)
    assert reply == b"error: reply too large (limit 1000000 bytes)\n"


def test_reply_far_larger_than_the_request_is_stored_in_nameless_files_not_held_in_memory(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = start_server("-n", "2", "--max-bytes", "1000000", *LOG, env={"TMPDIR": str(tmp_path)})
    lines = 40_000
    with server.connect() as sock:
        # 440 KB in, 40 MB out; 1,001-digit results cost a worker 2.5x less than 4,001-digit ones.
        send_frame(sock, [b"10 ** 1000\n" * lines])
        wait_until(lambda: len(server.events("Worker finished")) == 2, "both workers to finish")
        handler = server.events("Worker finished")[0]["pid"]
        peak_kib = proc_peak_kib(handler)  # the reply waits, unread, in the results files
        assert os.listdir(tmp_path) == [], (
            "a results file file must have no name, so that it vanishes with its process"
        )
        (size,) = HEADER.unpack(recv_exactly(sock, HEADER.size))
        assert size == lines * 1002
        received = 0
        while received < size:
            received += len(sock.recv(1024 * 1024))
    assert peak_kib < 40 * 1024, f"the handler's peak RSS was {peak_kib} KiB for a 40 MB reply"


def test_a_small_reply_is_held_in_memory_and_only_a_larger_one_needs_a_results_file(
    start_server: StartServer, tmp_path: Path
) -> None:
    # A slice's results stay in memory up to lesson.RESULTS_IN_MEMORY_BYTES; past that they go
    # to a nameless file, which cannot be created here.  One slice (-n 1), so that one slice's
    # results cross the line.
    server = start_server(*LOG, "-n", "1", faults=[f"missing_temporary_directory:{tmp_path}/gone"])
    assert server.request(b"6 * 7\n") == b"42\n"
    lines = lesson.RESULTS_IN_MEMORY_BYTES // len(b"42\n") + 1
    reply = server.request(b"6 * 7\n" * lines)
    assert reply == b"error: server could not store the reply (No such file or directory)\n"
    assert server.request(b"6 * 7\n") == b"42\n"
    assert "Traceback" not in server.stderr()


def test_a_results_file_that_cannot_be_written_is_one_refusal_and_the_server_keeps_serving(
    start_server: StartServer,
) -> None:
    server = start_server(*LOG, faults=["file_size_limit:1048576"])
    reply = server.request(b"10 ** 4000\n" * 1000)  # 4 MB of results
    assert reply == b"error: server could not store the reply (File too large)\n"
    [refused] = server.events("Request refused")
    assert (refused["level"], refused["reason"]) == ("WARNING", reply[7:-1].decode())
    assert server.events("Worker failed") == []
    assert server.request(b"6 * 7\n") == b"42\n"
    assert "Traceback" not in server.stderr()


# --- Lines longer than the line limit, and limits the environment cannot change. -----------------


def test_a_100_mib_line_costs_its_bytes_not_their_text(
    start_server: StartServer, tmp_path: Path
) -> None:
    # One 4-byte character makes a decoded line 4 bytes a character: decoding this line would
    # cost 400 MiB.  Logging it (-vv) must not copy it either.
    line = b"1" * (100 * 2**20) + "\U0001f600".encode()
    gate = tmp_path / "gate"  # holds the worker, once past the line, for its peak to be read
    payload = line + f"\ngate {gate}\n".encode()
    server = start_server("-vv", *JSON_LOG, "-n", "1", "--max-bytes", str(2**30), **SCRIPTED)
    with server.connect() as sock:
        send_frame(sock, [payload])
        started = server.wait_for_event("Worker started")
        wait_until((tmp_path / "gate.waiting").exists, "the worker to pass the long line")
        peak_kib = max(proc_peak_kib(started["pid"]), proc_peak_kib(started["worker_pid"]))
        release(gate)
        reply = recv_frame(sock)
    assert reply == f"error: line too long ({len(line)} bytes, limit 10000)\nreleased\n".encode()
    assert peak_kib < 1.5 * len(payload) / 1024, f"peak RSS {peak_kib} KiB"
    assert server.wait_for_event("Line rejected")["line"] == repr("1" * 80)[:80]


@pytest.mark.parametrize(
    ("head", "body"),
    [(b"", b" "), (b"\xff", b"1")],
    ids=["blank-over-the-limit", "not-utf8-over-the-limit"],
)
def test_a_line_over_the_limit_gets_the_same_result_whether_or_not_it_is_last(
    start_server: StartServer, head: bytes, body: bytes
) -> None:
    # worker.slice_lines judges a line longer than a batch by its bytes, and decodes the
    # others for grammar.evaluate_line to judge: either way, the same result, which does not
    # depend on what follows the line (nor on -n, which moves the slice ends).
    line = head + body * 20_000  # twice grammar.MAX_LINE_BYTES
    server = start_server("-n", "1")
    alone = server.request(line + b"\n")
    followed = server.request(line + b"\n1 + 1\n")
    assert followed == alone + b"2\n"


def test_language_limits_do_not_depend_on_the_environment(start_server: StartServer) -> None:
    server = start_server(env={"PYTHONINTMAXSTRDIGITS": "640"})
    digits = "7" * 700
    assert (
        server.request(f"10 ** 700\n{digits} + 0\n".encode())
        == f"1{'0' * 700}\n{digits}\n".encode()
    )


# --- Clients that are idle, slow, trickling, or leave. -------------------------------------------


# Requests the client stops sending part-way: what it sent of a 100-byte request.
PARTIAL_REQUESTS = {
    "within-the-header": HEADER.pack(100)[:3],
    "after-the-header": HEADER.pack(100),
    "within-the-body": HEADER.pack(100) + b"1 + 1\n",
}


@pytest.mark.parametrize("sent", PARTIAL_REQUESTS.values(), ids=PARTIAL_REQUESTS.keys())
def test_client_stalled_mid_request_is_disconnected_and_its_handler_exits(
    start_server: StartServer, sent: bytes
) -> None:
    server = start_server(*LOG, "--client-timeout", "0.25")
    with server.connect() as sock:
        sock.sendall(sent)
        assert sock.recv(1) == b"", "the stalled client must be disconnected"
    dropped = server.wait_for_event("Client failed")
    assert (dropped["pname"], dropped["reason"]) == ("handler", "timed out")
    server.wait_until_idle()


def test_client_trickling_its_request_is_cut_off_by_the_minimum_rate(
    start_server: StartServer,
) -> None:
    server = start_server(*LOG, "--client-timeout", "0.5", "--min-rate", "1000")
    with server.connect() as sock:
        sock.sendall(HEADER.pack(1000))
        for _ in range(100):  # 10 bytes a second, never silent for 0.5 s: at most 10 s
            try:
                sock.send(b"1")
            except (BrokenPipeError, ConnectionResetError):
                break  # the server closed the connection
            time.sleep(0.1)  # the trickle's pace, not synchronisation
        else:
            pytest.fail("a client sending 10 bytes a second was never cut off")
    assert server.wait_for_event("Client failed")["level"] == "WARNING"


def test_client_sending_slowly_but_steadily_is_served_although_it_takes_longer_than_the_timeout(
    start_server: StartServer,
) -> None:
    server = start_server("--client-timeout", "0.5", "--min-rate", "10")
    payload = b"1 + 1\n" * 45
    with server.connect() as sock:
        started = time.monotonic()
        sock.sendall(HEADER.pack(len(payload)))
        for offset in range(0, len(payload), 45):
            time.sleep(0.1)  # a slow client's pace, not synchronisation: never silent for 0.5 s
            sock.sendall(payload[offset : offset + 45])
        assert time.monotonic() - started > 0.5
        assert recv_frame(sock) == b"2\n" * 45


def test_client_that_stops_reading_the_reply_is_disconnected(start_server: StartServer) -> None:
    server = start_server(*LOG, "--client-timeout", "0.25")
    with socket.socket() as sock:
        # Before connecting: a small window.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        sock.connect(("127.0.0.1", server.port))
        # An 8 MB reply: more than the socket buffers hold.
        send_frame(sock, [b"10 ** 1000\n" * 8000])
        dropped = server.wait_for_event("Client failed")
        assert dropped["reason"] == "timed out"
        server.wait_until_idle()


# The partial requests, closed (FIN) or reset (RST), and the reason the handler logs.
TRUNCATED_REQUESTS = {
    "within-the-header": ("within-the-header", False, "connection closed after 3 of 8 bytes"),
    "after-the-header": ("after-the-header", False, "connection closed after 0 of 100 bytes"),
    "within-the-body": ("within-the-body", False, "connection closed after 6 of 100 bytes"),
    "reset-within-the-body": ("within-the-body", True, f"[Errno {errno.ECONNRESET}] "),
}


@pytest.mark.parametrize(
    ("partial", "rst", "reason"), TRUNCATED_REQUESTS.values(), ids=TRUNCATED_REQUESTS.keys()
)
def test_client_closing_before_sending_all_it_declared_is_one_warning_without_traceback(
    start_server: StartServer, partial: str, rst: bool, reason: str
) -> None:
    server = start_server(*JSON_LOG)  # warnings only: the failure is the one line logged
    sock = server.connect()
    sock.sendall(PARTIAL_REQUESTS[partial])
    if rst:
        reset(sock)
    else:
        sock.close()
    dropped = server.wait_for_event("Client failed")
    assert dropped["reason"].startswith(reason)
    assert server.stop() == 0
    assert [event["event"] for event in server.events()] == [
        "Client failed",
        "Shutting down",
        "Server stopped",
    ]
    assert "Traceback" not in server.stderr()


def test_client_resetting_during_evaluation_ends_its_handler_and_workers(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = start_server(*LOG, **SCRIPTED)
    path = tmp_path / "gate"
    sock = server.connect()
    send_frame(sock, [f"gate {path}\n1 + 1\n".encode()])
    server.wait_for_event("Worker started", worker="worker-1")  # a small request's only worker
    reset(sock)
    server.wait_until_idle()
    assert server.wait_for_event("Client failed")["reason"].startswith(
        f"[Errno {errno.ECONNRESET}]"
    )


@pytest.mark.parametrize("stray", [b"\r\n", HEADER.pack(6) + b"1 + 1\n"], ids=["crlf", "second"])
def test_bytes_after_the_request_never_cut_the_reply(
    start_server: StartServer, stray: bytes
) -> None:
    server = start_server()
    payload = b"10 ** 1000\n" * 1000  # a 1 MB reply: it fits in the socket buffers
    with server.connect() as sock:
        send_frame(sock, [payload])
        sock.sendall(stray)
        # The reply is read only once the handler has closed the connection: unread bytes at
        # its close() would have reset the connection, and the reply with it.
        server.wait_until_idle()
        assert recv_frame(sock) == (b"1" + b"0" * 1000 + b"\n") * 1000


def test_client_resetting_after_stray_bytes_still_ends_its_handler_and_workers(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = start_server(*LOG, **SCRIPTED)
    sock = server.connect()
    send_frame(sock, [f"gate {tmp_path / 'gate'}\n1 + 1\n".encode()])
    sock.sendall(b"stray")
    wait_until((tmp_path / "gate.waiting").exists, "the worker to reach the gate")
    reset(sock)
    server.wait_until_idle()
    assert server.wait_for_event("Client failed")["reason"].startswith(
        f"[Errno {errno.ECONNRESET}]"
    )


def test_client_resetting_after_half_closing_still_cancels_the_work(
    start_server: StartServer, tmp_path: Path
) -> None:
    # After the client's FIN the socket is always readable, so the handler no longer waits on
    # it; endings.ClientWatch.check looks for a reset at each turn of the handler's loop, at
    # least every CHECK_INTERVAL_S.  The reset ends the handler and its worker, although the
    # gate never opens and --worker-timeout (a minute by default) is far off.
    server = start_server(*LOG, "-n", "1", **SCRIPTED)
    sock = server.connect()
    send_frame(sock, [f"gate {tmp_path / 'gate'}\n".encode()])
    sock.shutdown(socket.SHUT_WR)  # "that is all I send" (nc -N, many HTTP-style clients)
    handler = server.wait_for_event("Worker started")["pid"]
    wait_until((tmp_path / "gate.waiting").exists, "the worker to reach the gate")
    reset(sock)
    wait_until(
        lambda: handler not in server.handlers(),
        "the reset to end the handler and its workers",
        timeout_s=5.0,
    )
    server.wait_until_idle()
    # Linux records a reset that arrives after the peer's FIN as EPIPE (tcp_reset, CLOSE_WAIT).
    assert server.wait_for_event("Client failed")["reason"].startswith(f"[Errno {errno.EPIPE}]")


# --- Workers that are slow, hang, die or cannot start. -------------------------------------------


def test_worker_silent_for_longer_than_the_worker_timeout_but_working_is_not_taken_for_stuck(
    start_server: StartServer,
) -> None:
    server = start_server(*LOG, "-n", "1", "--worker-timeout", "1", **SCRIPTED)
    # 1.5 s of CPU time on one line: nothing to send meanwhile.
    assert server.request(b"spin 1.5\n") == b"spun\n"
    server.wait_for_event("Request served")
    assert server.events("Worker failed") == []


@pytest.mark.parametrize(("fault", "reason"), [("hang-once", "stuck"), ("die-once", "died")])
def test_failed_worker_has_only_its_unanswered_lines_run_again(
    start_server: StartServer, tmp_path: Path, fault: str, reason: str
) -> None:
    server = start_server(*LOG, "-n", "1", "--worker-timeout", "1", **SCRIPTED)
    counter = tmp_path / "evaluations"
    # The worker sends the results of the lines before the fault, which fill a message.
    payload = f"count {counter}\n{SENT_LINES}{fault} {tmp_path / 'once'}\n1 + 1\n".encode()
    assert server.request(payload) == b"counted\n" + SENT_RESULTS + b"resumed\n2\n"
    assert counter.read_bytes() == b".", "an answered line was evaluated again"
    failed = server.wait_for_event("Worker failed")
    assert (failed["reason"], failed["attempt"]) == (reason, 1)


def test_worker_failing_twice_fails_only_its_unanswered_lines(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = start_server(*LOG, "-n", "1", "--worker-timeout", "1", **SCRIPTED)
    # The die-once line dies every time: it cannot create its file in a missing directory.
    payload = f"{SENT_LINES}die-once /nonexistent/dir/twice\n1 + 1\n".encode()
    assert server.request(payload) == SENT_RESULTS + WORKER_FAILED * 2
    served = server.wait_for_event("Request served")
    assert (served["lines"], served["error_lines"]) == (SENT_LINES.count("\n") + 2, 2)
    assert [event["attempt"] for event in server.events("Worker failed")] == [1, 2]


OUT_OF_PROCESSES = f"server cannot start a worker ({os.strerror(errno.EAGAIN)}); try again later"


@pytest.mark.parametrize(
    ("failures", "reply"),
    [(1, b"2\n6\n"), (5, b"2\n6\n"), (6, f"error: {OUT_OF_PROCESSES}\n".encode())],
    ids=["once", "until-the-last-try", "always"],
)
def test_worker_that_cannot_be_started_is_tried_again_after_a_pause_then_the_request_refused(
    start_server: StartServer, failures: int, reply: bytes
) -> None:
    server = start_server(*LOG, "-n", "1", faults=[f"failing_worker_starts:{failures}"])
    assert server.request(b"1 + 1\n2 * 3\n") == reply
    not_started = server.events("Worker not started")
    assert [event["reason"] for event in not_started] == [
        f"[Errno {errno.EAGAIN}] {os.strerror(errno.EAGAIN)}"
    ] * min(failures, 5)
    assert server.events("Worker failed") == []
    assert "Traceback" not in server.stderr()


def test_results_a_late_handler_finds_waiting_are_taken_not_run_again(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = start_server(*LOG, "-n", "1", "--worker-timeout", "1", **SCRIPTED)
    path = tmp_path / "gate"  # what a scripted "gate PATH" line waits for
    with server.connect() as sock:
        send_frame(sock, [f"gate {path}\n".encode()])
        started = server.wait_for_event("Worker started")
        # The handler: it cannot read what the worker sends.
        os.kill(started["pid"], signal.SIGSTOP)
        release(path)
        wait_until(
            lambda: process_state(started["worker_pid"]) in ("Z", "gone"),
            "the worker to send all and exit",
        )
        # Not synchronisation: makes the handler's last news of the worker older than 1 s.
        time.sleep(1.25)
        os.kill(started["pid"], signal.SIGCONT)
        assert recv_frame(sock) == b"released\n"
    server.wait_for_event("Request served")
    assert server.events("Worker failed") == []


def test_workers_that_are_working_but_share_a_core_are_not_taken_for_stuck(
    start_server: StartServer,
) -> None:
    # A worker reports only between lines.  32 workers of one request on one core (as -n 64
    # on 2 cores) each take ~2.4 s of wall time for one 75 ms line: silent for longer than
    # --worker-timeout 1, the shortest allowed, but working all along.
    line = b"((1))+" * 1666 + b"1\n"  # 9,997 bytes: about 75 ms of pyparsing
    workers = 32
    server = start_server(
        *LOG,
        "-n",
        str(workers),
        "--worker-timeout",
        "1",
        command=["taskset", "-c", "0", sys.executable, "bluserver.py"],
    )
    assert server.request(line * workers) == b"1667\n" * workers
    server.wait_for_event("Request served")
    assert server.events("Worker failed") == []


def test_worker_stopped_half_way_through_its_results_is_replaced_not_waited_for(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = start_server(*LOG, "-n", "1", "--worker-timeout", "1", **SCRIPTED)
    gate = tmp_path / "gate"
    # 70 results of 4,001 digits make 280 KB: more than a pipe holds (64 KiB).
    payload = f"gate {gate}\n".encode() + b"10 ** 4000\n" * 70
    with server.connect() as sock:
        send_frame(sock, [payload])
        started = server.wait_for_event("Worker started")
        wait_until((tmp_path / "gate.waiting").exists, "the worker to reach the gate")
        os.kill(started["pid"], signal.SIGSTOP)  # the handler reads nothing for now
        release(gate)
        worker = started["worker_pid"]
        wait_until(lambda: "pipe_write" in wchan(worker), "the worker to fill its pipe")
        os.kill(worker, signal.SIGSTOP)  # half-way through its results
        os.kill(started["pid"], signal.SIGCONT)
        assert recv_frame(sock) == b"released\n" + (b"1" + b"0" * 4000 + b"\n") * 70
    assert server.wait_for_event("Worker failed")["reason"] == "stuck"


@pytest.mark.parametrize("last_newline", [b"", b"\n"], ids=["last-line-unended", "ended"])
def test_worker_lost_after_its_last_result_leaves_a_complete_reply(
    start_server: StartServer, last_newline: bytes
) -> None:
    server = start_server(*LOG, "-n", "1", faults=["dying_before_end_of_slice"])
    assert server.request(b"1 + 1\n2 * 3" + last_newline) == b"2\n6\n"
    served = server.wait_for_event("Request served")
    assert (served["lines"], served["error_lines"]) == (2, 0)
    assert [event for event in server.events() if event["level"] == "WARNING"] == []
    assert "Traceback" not in server.stderr()


def test_workers_of_a_killed_handler_exit_without_a_traceback(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = start_server(*LOG, "-n", "1", "--max-reply-bytes", str(2**40), **SCRIPTED)
    gate = tmp_path / "gate"
    with server.connect() as sock:
        send_frame(sock, [f"gate {gate}\n".encode() + b"10 ** 4000\n" * 200])
        started = server.wait_for_event("Worker started")
        wait_until((tmp_path / "gate.waiting").exists, "the worker to reach the gate")
        os.kill(started["pid"], signal.SIGKILL)  # the handler, as the OOM killer would
        release(gate)
        wait_until(lambda: process_state(started["worker_pid"]) == "gone", "the worker to exit")
    assert "Traceback" not in server.stderr()


@pytest.mark.parametrize("start_method", ["fork", "forkserver", "spawn"])
def test_workers_are_forked_from_the_handler_and_hold_only_their_pipe_whatever_the_start_method(
    start_server: StartServer, tmp_path: Path, start_method: str
) -> None:
    server = start_server(*LOG, "-n", "1", start_method=start_method, **SCRIPTED)
    path = tmp_path / "gate"  # what a scripted "gate PATH" line waits for
    with server.connect() as sock:
        send_frame(sock, [f"gate {path}\n".encode()])
        started = server.wait_for_event("Worker started")
        wait_until((tmp_path / "gate.waiting").exists, "the worker to reach its first line")
        worker = started["worker_pid"]
        parent = next(row.ppid for row in process_table() if row.pid == worker)
        command_line = Path(f"/proc/{worker}/cmdline").read_bytes()
        files = {
            int(fd): os.readlink(f"/proc/{worker}/fd/{fd}")
            for fd in os.listdir(f"/proc/{worker}/fd")
        }
        release(path)
        assert recv_frame(sock) == b"released\n"
    assert parent == started["pid"], "a worker's parent is its handler"
    assert command_line == Path(f"/proc/{server.pid}/cmdline").read_bytes(), (
        "forked: the server's own command"
    )
    assert not [target for target in files.values() if target.startswith("socket:")], files
    assert files[0] == files[1] == os.devnull
    pipes = [target for target in files.values() if target.startswith("pipe:")]
    assert len(pipes) == 1, files  # its Pipe to the handler (stderr is the harness's file)


# --- Many clients, at once and one after another. ------------------------------------------------


def test_max_children_bounds_the_handlers_while_every_waiting_connection_is_served(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = start_server(*LOG, "--max-children", "2", **SCRIPTED)
    path = tmp_path / "gate"
    sockets = [server.connect() for _ in range(3)]  # all three connect: none is refused
    for sock in sockets:
        send_frame(sock, [f"gate {path}\n".encode()])
    wait_until(lambda: len(server.events("Worker started")) == 2, "two requests in flight")
    release(path)
    replies = [recv_frame(sock) for sock in sockets]
    for sock in sockets:
        sock.close()
    assert replies == [b"released\n"] * 3
    events = [event["event"] for event in server.events()]
    assert events[: events.index("Request served")].count("Incoming connection") == 2


@pytest.mark.slow
def test_sequential_requests_leave_no_zombie_processes(
    start_server: StartServer,
) -> None:
    server = start_server()
    for number in range(100):
        assert (
            server.request(f"{number} * 2\n1 + {number}\n".encode())
            == f"{number * 2}\n{1 + number}\n".encode()
        )
    server.wait_until_idle()  # zombies are not live: this waits for them to be reaped too
    wait_until(
        lambda: (
            not [row for row in process_table() if row.session == server.pid and row.state == "Z"]
        ),
        "every finished handler to be reaped",
    )


# --- Signals, in every state the server can be in. -----------------------------------------------


@pytest.mark.parametrize("max_children", ["1", "16"], ids=["all-slots-busy", "a-slot-free"])
@pytest.mark.parametrize(
    "signum", SHUTDOWN_SIGNALS, ids=[signum.name for signum in SHUTDOWN_SIGNALS]
)
def test_shutdown_signal_refuses_new_connections_and_finishes_the_request_in_flight(
    start_server: StartServer, tmp_path: Path, signum: signal.Signals, max_children: str
) -> None:
    server = start_server(*LOG, "--max-children", max_children, **SCRIPTED)
    path = tmp_path / "gate"  # what a scripted "gate PATH" line waits for
    with server.connect() as sock:
        send_frame(sock, [f"gate {path}\n1 + 1\n".encode()])
        server.wait_for_event("Worker started", worker="worker-1")
        server.process.send_signal(signum)
        shutting_down = server.wait_for_event("Shutting down")  # logged once the port is closed
        assert not accepts_connections(server.port)
        assert (shutting_down["signal"], shutting_down["requests_in_flight"]) == (signum.name, 1)
        release(path)
        assert recv_frame(sock) == b"released\n2\n"
    assert wait_for_exit(server.process, EVENT_TIMEOUT_S) == 0
    assert session_processes(server.pid) == [], "the server reaps every child before it exits"


def test_second_signal_ends_a_handler_that_has_not_started_running(
    start_server: StartServer, tmp_path: Path
) -> None:
    path = tmp_path / "gate"
    server = start_server(*LOG, faults=[f"gated_handlers:{path}"])
    with server.connect() as sock:
        sock.sendall(b"\0")  # deferred accept: a connection reaches a handler once it sends
        wait_until(server.handlers, "the handler to be forked")
        server.process.send_signal(signal.SIGTERM)
        server.wait_for_event("Shutting down")
        server.process.send_signal(signal.SIGTERM)
        assert wait_for_exit(server.process, EVENT_TIMEOUT_S) == 1
        wait_until(
            lambda: not session_processes(server.pid), "the handler, still gated, to be killed"
        )


# --- An address that cannot be bound. ------------------------------------------------------------


def test_address_that_cannot_be_bound_is_reported_in_one_line_and_exits_1() -> None:
    # 192.0.2.1 (TEST-NET-1) is not an address of this machine: bind() fails, nothing is sent.
    result = run_python("bluserver.py", "-a", "192.0.2.1", "-p", "0")
    assert (result.returncode, result.stdout) == (1, "")
    assert (
        result.stderr
        == f"bluserver: cannot listen on 192.0.2.1:0: {os.strerror(errno.EADDRNOTAVAIL)}\n"
    )


# --- Issue 25: peers that reset after their reply, costly requests, clients that keep sending. -


def test_peers_that_reset_after_reading_their_reply_leave_no_traceback_and_no_warning(
    start_server: StartServer,
) -> None:
    # As HAProxy's tcp-check does: the empty request, the eight zero bytes read, then a reset,
    # which may meet the handler's lingering close before or after its shutdown(SHUT_WR).
    server = start_server(*LOG)
    for _ in range(50):
        with server.connect() as sock:
            sock.sendall(HEADER.pack(0))
            assert recv_exactly(sock, HEADER.size) == HEADER.pack(0)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    wait_until(lambda: len(server.events("Request served")) == 50, "the 50 requests served")
    server.wait_until_idle()
    assert "Traceback" not in server.stderr()
    assert [event for event in server.events() if event["level"] == "WARNING"] == []


# A line of nested groups that pyparsing must walk: ~10,000 bytes of costly evaluation.
COSTLY_LINE = b"((((((((((1))))))))))+" * 450 + b"1\n"


def test_a_request_over_its_cpu_limit_is_refused_whole_and_the_next_is_served(
    start_server: StartServer,
) -> None:
    server = start_server(*LOG, "-n", "1", "--cpu-floor", "0.1", "--cpu-per-mib", "0")
    with server.connect() as sock:
        send_frame(sock, [COSTLY_LINE * 200])
        reply = recv_frame(sock)
    assert reply == (
        b"error: request too costly (over 0.10 s of CPU; see --cpu-floor, --cpu-per-mib)\n"
    )
    refused = server.wait_for_event("Request refused")
    server.wait_until_idle()  # its worker stopped, its handler gone
    assert refused["reason"].startswith("request too costly")
    assert server.request(b"1 + 1\n") == b"2\n"


def test_the_cpu_a_request_used_is_logged_with_its_summary(start_server: StartServer) -> None:
    server = start_server(*LOG, "-n", "1")
    assert server.request(COSTLY_LINE * 3) == b"451\n" * 3
    served = server.wait_for_event("Request served")
    assert served["cpu_s"] > 0


def test_a_client_still_sending_when_its_reply_starts_gets_the_whole_reply(
    start_server: StartServer,
) -> None:
    # The reply (8 MB) and what the client sends once it has begun (8 MB) are each more than
    # the socket buffers hold: if the handler did not read while it sends, each side would wait
    # for the other until --client-timeout.
    server = start_server(*LOG, "-n", "1", "--client-timeout", "5")
    payload = b"10 ** 4000\n" * 2000
    with server.connect() as sock:
        send_frame(sock, [payload])
        (length,) = HEADER.unpack(recv_exactly(sock, HEADER.size))  # the reply has begun
        sock.sendall(b"x" * (8 * 1024 * 1024))  # never read: bytes after the request
        assert recv_exactly(sock, length) == (b"1" + b"0" * 4000 + b"\n") * 2000
    assert server.events("Client failed") == []


def test_a_worker_fork_that_fails_leaves_no_file_descriptor_open_in_the_handler(
    start_server: StartServer, tmp_path: Path
) -> None:
    # multiprocessing opens two pipes before it forks a worker, and closes neither if the
    # fork fails: 4 pipe descriptors at each failed start, unless the handler closes them.
    # Pipes only: the handler opens files of /proc now and then (a worker's CPU time).
    def handler_pipes(faults: list[str], gate: Path) -> int:
        server = start_server(*LOG, "-n", "1", faults=["scripted_lines", *faults])
        with server.connect() as sock:
            send_frame(sock, [f"gate {gate}\n".encode()])
            handler = server.wait_for_event("Worker started")["pid"]
            wait_until(Path(f"{gate}.waiting").exists, "the worker to reach the gate")
            pipes = len(open_pipes(handler))
            release(gate)
            assert recv_frame(sock) == b"released\n"
        return pipes

    failing = handler_pipes(["failing_worker_forks:3"], tmp_path / "failing")
    assert failing == handler_pipes([], tmp_path / "ordinary")


def open_pipes(pid: int) -> list[str]:
    """The pipes process pid has open, as /proc names them ('pipe:[123]')."""
    folder = Path(f"/proc/{pid}/fd")
    targets = []
    for descriptor in folder.iterdir():
        with contextlib.suppress(FileNotFoundError):  # closed since the listing
            targets.append(os.readlink(descriptor))
    return [target for target in targets if target.startswith("pipe:")]


def test_every_refusal_fits_in_the_smallest_reply_limit() -> None:
    # A refusal is sent instead of the results, and must itself be a reply the limit allows.
    longest = max(
        len(f"error: {refusal}\n".encode())
        for refusal in (
            guard.RequestTooLarge(2**64 - 1, 2**36),
            supervise.ReplyTooLarge(2**40),
            supervise.ReplyNotStored(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))),
            supervise.WorkerNotStarted(OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))),
            supervise.RequestTooCostly(86_400 + 86_400 * 2**36 / 2**20),
        )
    )
    assert longest <= bluserver.MIN_REPLY_BYTES
    with pytest.raises(SystemExit):
        bluserver.parse_args(["--max-reply-bytes", str(bluserver.MIN_REPLY_BYTES - 1)])


# --- Found by attacking the armour: a worker lost mid-line, a full disk at a refusal, and ------
# --- descriptors past 1023, which select() cannot watch. ----------------------------------------
#
# Where a failure needs the server started in an unusual way (a worker lost between two
# messages, a socket handed over at a high descriptor), the test writes a small launcher that
# sets it up and then runs bluserver.main, and starts it with ServerProcess's ``command``.

# 10 ** 4299 has 4,300 digits: its result line is longer than one message (PIPE_BUF - 4).
LONG_RESULT_LINE = b"1" + b"0" * 4299 + b"\n"

# A worker that, the first time it has sent a message ending inside a result line, dies
# (as SIGKILL, the OOM killer, or --worker-timeout after a SIGSTOP would end it) before it
# sends the rest of that line.
DYING_MID_LINE = """\
import os, sys
sys.path.insert(0, {root!r})
from multiprocessing import connection

send_bytes = connection.Connection.send_bytes
died_once = {marker!r}


def send_then_die(sender, message, offset=0, size=None):
    send_bytes(sender, message, offset, size)
    end = len(message) if size is None else offset + size
    if end > offset and message[end - 1] != ord("\\n") and not os.path.exists(died_once):
        open(died_once, "w").close()
        os._exit(1)


connection.Connection.send_bytes = send_then_die
import bluserver

bluserver.main()
"""

# A process manager that hands the server its listening socket at a descriptor past
# FD_SETSIZE (1024), as one holding many sockets may.
HIGH_FD = 1500
HANDING_A_HIGH_FD = """\
import os, resource, socket, sys
sys.path.insert(0, {root!r})
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen()
os.dup2(listener.fileno(), {fd})
listener.close()
import bluserver

bluserver.main([*sys.argv[1:], "--fd", "{fd}"])
"""


def launcher(tmp_path: Path, source: str) -> list[str]:
    """A command that runs source (a launcher of bluserver) with this interpreter."""
    script = tmp_path / "launcher.py"
    script.write_text(source)
    return [sys.executable, str(script)]


@pytest.fixture
def many_files() -> Iterator[None]:
    """This process (and the servers it starts) may open as many files as its hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def accept_queue_length(port: int) -> int:
    """How many connections wait in the accept queue of the socket listening on port (the
    rx_queue of its LISTEN row in /proc/net/tcp)."""
    for row in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = row.split()
        if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":
            return int(fields[4].split(":")[1], 16)
    return 0


def test_a_worker_lost_between_the_two_messages_of_a_long_result_line_leaves_no_fragment(
    start_server: StartServer, tmp_path: Path
) -> None:
    # The first message holds 4,092 bytes of the line's 4,301: the retry must not append the
    # whole line after them (supervise.SupervisedSlice.drop_partial_line drops the part).
    marker = tmp_path / "died"
    command = launcher(tmp_path, DYING_MID_LINE.format(root=str(ROOT), marker=str(marker)))
    server = start_server(*LOG, "-n", "1", command=command)
    reply = server.request(b"10 ** 4299\n1 + 1\n")
    assert server.events("Worker failed")  # the worker did die mid-line
    assert reply == LONG_RESULT_LINE + b"2\n"


def test_a_refusal_while_results_wait_in_a_buffer_the_disk_refuses_is_one_line_no_traceback(
    start_server: StartServer,
) -> None:
    # 17 results of 4,002 bytes are received, 16 of them written; the CPU limit then refuses
    # the request, and closing the results file writes the 17th past RLIMIT_FSIZE (66,000).
    server = start_server(
        *JSON_LOG,
        "-n",
        "1",
        "--cpu-floor",
        "0.5",
        "--cpu-per-mib",
        "0",
        faults=["scripted_lines", "file_size_limit:66000"],
    )
    with server.connect() as sock:
        send_frame(sock, [b"10 ** 4000\n" * 17 + b"spin 30\n"])
        reply = recv_frame(sock)
    assert reply == (
        b"error: request too costly (over 0.50 s of CPU; see --cpu-floor, --cpu-per-mib)\n"
    )
    server.wait_until_idle()
    assert "Traceback" not in server.stderr()


def test_a_listening_socket_handed_over_past_fd_setsize_is_served(
    start_server: StartServer, tmp_path: Path
) -> None:
    command = launcher(tmp_path, HANDING_A_HIGH_FD.format(root=str(ROOT), fd=HIGH_FD))
    server = start_server(*LOG, command=command)
    assert server.request(b"1 + 1\n") == b"2\n"
    assert "Traceback" not in server.stderr()


def test_a_drain_serves_every_waiting_connection_even_past_fd_setsize(
    start_server: StartServer, tmp_path: Path, many_files: None
) -> None:
    # The drain accepts the whole backlog at once: past ~1,020 connections, the handlers'
    # descriptors are over 1,023, which select.select (guard.ReplyPace) cannot watch.
    gate = tmp_path / "gate"
    server = start_server(*JSON_LOG, "--max-children", "2", faults=[f"gated_handlers:{gate}"])
    clients = []
    try:
        for _ in range(1100):
            clients.append(socket.create_connection(("127.0.0.1", server.port), timeout=60))
            send_frame(clients[-1], [b"1 + 1\n"])
        wait_until(lambda: len(server.handlers()) == 2, "two handlers, held at the gate")
        wait_until(
            lambda: accept_queue_length(server.port) == 1098, "the rest in the accept queue"
        )
        server.process.send_signal(signal.SIGTERM)
        assert server.wait_for_event("Shutting down")["connections_waiting"] == 1098
        gate.touch()
        replies = []
        for client in clients:
            try:
                replies.append(bytes(recv_frame(client)))
            except (OSError, EOFError) as error:
                replies.append(repr(error).encode())
            client.close()  # at once: its handler lingers until the client closes
    finally:
        for client in clients:
            client.close()
    assert wait_for_exit(server.process, EXIT_TIMEOUT_S) == 0
    assert [reply for reply in replies if reply != b"2\n"] == []
    assert "Traceback" not in server.stderr()
