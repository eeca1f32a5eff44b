"""The client: failures in one line, refusals, its output file, its progress line, its formats.

Tests run client.py as a subprocess, as a user runs it, or call ``client.main`` where the
process around it does not matter.  The server is a real one (the ``server`` and
``start_server`` fixtures of conftest.py) or a fake one scripted here, which answers what the
test needs the client to face.  A terminal is a pseudo-terminal the test reads from.
"""

from __future__ import annotations

import contextlib
import os
import pty
import re
import resource
import select
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import pytest

import client
from client import HEADER, recv_exactly, recv_frame, send_frame
from tests.harness import (
    EVENT_TIMEOUT_S,
    LOG,
    ROOT,
    SCRIPTED,
    SUBPROCESS_TIMEOUT_S,
    ServerProcess,
    StartServer,
    request,
    run_client,
    wait_until,
)

# --- Helpers. ----------------------------------------------------------------------------

FAKE_SERVER_RECEIVE_BUFFER = 64 * 1024  # bytes


@contextmanager
def client_facing_a_fake_server(
    *args: str,
    read_body: bool = True,
    python: Sequence[str] = (sys.executable,),
    **popen_options: Any,
) -> Iterator[tuple[subprocess.Popen[bytes], socket.socket]]:
    """Start client.py with args against a fake server on 127.0.0.1, and read its request
    (only its header if not read_body); yield the client's process and its connection, on
    which the test answers.

    python is the command that runs client.py; popen_options go to subprocess.Popen.  The
    connection is closed, and the client killed if it is still running, at the end.
    """
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(SUBPROCESS_TIMEOUT_S)
        # Small and fixed (no autotuning): what a client sends unread stays in its own buffers.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, FAKE_SERVER_RECEIVE_BUFFER)
        port = str(listener.getsockname()[1])
        command = [*python, str(ROOT / "client.py"), *args, "-a", "127.0.0.1", "-p", port]
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, **popen_options)
        try:
            connection, _ = listener.accept()
            with connection:
                if read_body:
                    recv_frame(connection)
                else:
                    recv_exactly(connection, HEADER.size)
                yield process, connection
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def run_client_against_fake_server(
    reply: bytes, input_path: Path
) -> subprocess.CompletedProcess[str]:
    """Run the client against a server that reads the request, sends `reply` verbatim, closes."""
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    with client_facing_a_fake_server(str(input_path), "-", **pipes) as (process, connection):
        connection.sendall(reply)
        connection.close()
        stdout, stderr = process.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    return subprocess.CompletedProcess(
        process.args, process.returncode, stdout.decode(), stderr.decode()
    )


# The environment without coverage's variables: a client run with it is not measured.
UNMEASURED = {name: value for name, value in os.environ.items() if not name.startswith("COVERAGE")}


def assert_fails_in_one_line(result: subprocess.CompletedProcess[str], pattern: str) -> None:
    """The client exited 1, wrote nothing to stdout and one line matching pattern to stderr."""
    assert result.returncode == 1
    [message] = result.stderr.splitlines()  # so no traceback either
    assert re.fullmatch(f"client: {pattern}", message), message
    assert result.stdout == ""


@contextmanager
def refused_port() -> Iterator[int]:
    """A port on 127.0.0.1 that is reserved (bound) but refuses connections (not listening)."""
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        yield placeholder.getsockname()[1]


def main_fails_with(*args: str) -> str:
    """The one-line message client.main(args) exits with (status 1: SystemExit with a string)."""
    with pytest.raises(SystemExit) as exit_info:
        client.main(list(args))
    message = exit_info.value.code
    assert isinstance(message, str), f"exit status {message}, not a message"
    return message


def read_terminal(terminal: int, until: bytes | None = None) -> bytes:
    """What was written to a pseudo-terminal, read until `until` has appeared or, if None,
    until the last process holding its other side has closed it."""
    shown = b""
    deadline = time.monotonic() + EVENT_TIMEOUT_S
    while until is None or until not in shown:
        ready, _, _ = select.select([terminal], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"timed out waiting for {until!r}; the terminal shows {shown!r}")
        try:
            chunk = os.read(terminal, 65536)
        except OSError:  # EIO: nobody holds the other side any more
            chunk = b""
        if not chunk:
            assert until is None, f"closed before {until!r} appeared: {shown!r}"
            return shown
        shown += chunk
    return shown


# --- Failures, each in one line. -------------------------------------------------------


def test_client_fails_in_one_line_when_the_server_cannot_be_reached() -> None:
    with refused_port() as port:
        result = run_client("-", "-", "-a", "127.0.0.1", "-p", str(port), stdin=b"1\n")

    assert_fails_in_one_line(
        result,
        rf"cannot connect to 127\.0\.0\.1:{port}: connection refused"
        r" \(is the server running\? try: make run\)",
    )


def test_client_fails_in_one_line_when_the_input_file_is_missing(tmp_path: Path) -> None:
    with refused_port() as port:
        result = run_client(str(tmp_path / "missing.txt"), "-", "-a", "127.0.0.1", "-p", str(port))

    assert_fails_in_one_line(
        result,
        f"cannot read {re.escape(str(tmp_path / 'missing.txt'))}: No such file or directory",
    )


def test_client_fails_in_one_line_before_connecting_when_the_output_cannot_be_created(
    tmp_path: Path,
) -> None:
    output = tmp_path / "no such folder" / "output.txt"
    with refused_port() as port:  # connecting would fail: the output is checked first
        result = run_client("-", str(output), "-a", "127.0.0.1", "-p", str(port), stdin=b"1\n")

    assert_fails_in_one_line(
        result, f"cannot write {re.escape(str(output))}: No such file or directory"
    )


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (
            b"",
            r"127\.0\.0\.1:\d+ closed the connection early"
            r" \(connection closed after 0 of 8 bytes\)",
        ),
        (
            HEADER.pack(100) + b"2\n",
            r"127\.0\.0\.1:\d+ closed the connection early"
            r" \(connection closed after 2 of 100 bytes\)",
        ),
        (HEADER.pack(2) + b"2\n", r"127\.0\.0\.1:\d+ answered 1 lines for 2 input lines"),
        (HEADER.pack(6) + b"2\n6\n9\n", r"127\.0\.0\.1:\d+ answered 3 lines for 2 input lines"),
    ],
    ids=["closes_before_reply", "closes_mid_reply", "too_few_lines", "too_many_lines"],
)
def test_client_fails_in_one_line_on_a_broken_reply(
    reply: bytes, message: str, tmp_path: Path
) -> None:
    input_path = tmp_path / "input.txt"
    input_path.write_bytes(b"1 + 1\n2 * 3\n")

    result = run_client_against_fake_server(reply, input_path)

    assert_fails_in_one_line(result, message)


def test_client_fails_in_one_line_when_stdin_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", None)  # what Python makes of a closed file descriptor 0

    with refused_port() as port:
        message = main_fails_with("-", "-", "-a", "127.0.0.1", "-p", str(port))

    assert message == "client: cannot read -: stdin is closed"


def test_client_fails_in_one_line_before_connecting_when_stdout_is_closed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(sys, "stdout", None)  # what Python makes of a closed file descriptor 1
    (tmp_path / "input.txt").write_bytes(b"1 + 1\n")

    with refused_port() as port:
        message = main_fails_with(str(tmp_path / "input.txt"), "-", "-p", str(port))

    assert message == "client: cannot write -: stdout is closed"


# --- Interrupted: Ctrl-C and SIGTERM. ------------------------------------------------------

INTERRUPTIONS = {"SIGINT": (signal.SIGINT, 130), "SIGTERM": (signal.SIGTERM, 143)}


@pytest.mark.parametrize(("signum", "status"), INTERRUPTIONS.values(), ids=INTERRUPTIONS.keys())
def test_interrupted_client_says_so_in_one_line_and_its_reset_stops_the_servers_workers(
    signum: signal.Signals, status: int, start_server: StartServer, tmp_path: Path
) -> None:
    server = start_server(*LOG, **SCRIPTED)
    input_path = tmp_path / "input.txt"
    input_path.write_bytes(f"1 + 1\ngate {tmp_path / 'gate'}\n".encode())  # never opened
    output = tmp_path / "output.txt"
    output.write_bytes(b"the previous results\n")
    command = [sys.executable, str(ROOT / "client.py"), str(input_path), str(output)]
    process = subprocess.Popen(
        [*command, "-a", "127.0.0.1", "-p", str(server.port)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        server.wait_for_event("Worker started")  # the request is sent...
        wait_until((tmp_path / "gate.waiting").exists, "the worker to wait at the gate")
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert (process.returncode, stdout, stderr) == (status, b"", b"client: interrupted\n")
    # A reset, not a FIN (a half-close, after which the server would wait for the gate):
    failure = server.wait_for_event("Client failed")
    assert "Connection reset by peer" in failure["reason"]
    server.wait_until_idle()  # the request's handler and worker are gone
    assert output.read_bytes() == b"the previous results\n"
    assert sorted(os.listdir(tmp_path)) == ["gate.waiting", "input.txt", "output.txt"]


# --- Refusals. ---------------------------------------------------------------------------


def test_refusal_of_the_whole_request_is_reported_with_the_servers_reason(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = start_server("--max-bytes", "100")
    (tmp_path / "input.txt").write_bytes(b"1 + 1\n" * 50)  # 300 bytes

    message = main_fails_with(
        str(tmp_path / "input.txt"), str(tmp_path / "output.txt"), "-p", str(server.port)
    )

    assert message == (
        f"client: localhost:{server.port} refused the request: "
        "request too large (300 bytes, limit 100)"
    )
    assert not (tmp_path / "output.txt").exists()


def test_refusal_sent_while_the_client_still_uploads_is_reported_not_a_broken_pipe(
    tmp_path: Path,
) -> None:
    # A server refuses a request too large after its header, then closes, the body unread
    # (a reset), while the client is still sending: its send fails, the refusal waits unread.
    input_path = tmp_path / "input.txt"
    input_path.write_bytes(b"1 + 1\n" * 3_000_000)  # 18 MB: more than the socket buffers hold
    answer = b"error: request too large (18000000 bytes, limit 100)\n"
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    with client_facing_a_fake_server(str(input_path), "-", read_body=False, **pipes) as (
        process,
        connection,
    ):
        connection.sendall(HEADER.pack(len(answer)) + answer)
        connection.close()
        stdout, stderr = process.communicate(timeout=SUBPROCESS_TIMEOUT_S)

    result = subprocess.CompletedProcess(
        process.args, process.returncode, stdout.decode(), stderr.decode()
    )
    assert_fails_in_one_line(
        result,
        r"127\.0\.0\.1:\d+ refused the request: request too large \(18000000 bytes, limit 100\)",
    )


def test_error_line_answering_a_one_line_request_is_its_result_not_a_refusal(
    tmp_path: Path,
) -> None:
    input_path = tmp_path / "input.txt"
    input_path.write_bytes(b"1 + 1\n")
    answer = b"error: request too large (6 bytes, limit 5)\n"

    result = run_client_against_fake_server(HEADER.pack(len(answer)) + answer, input_path)

    assert result.returncode == 0
    assert result.stdout == answer.decode()


# --- The output file. --------------------------------------------------------------------


def limit_file_size_to_1000_bytes() -> None:
    """A child's preexec_fn: writing past 1000 bytes fails with EFBIG ("File too large"), as a
    full disk would fail it (Python ignores SIGXFSZ, so the write returns the error)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))


def test_failed_write_leaves_the_previous_output_as_it_was_and_no_temporary_file(
    server: ServerProcess, tmp_path: Path
) -> None:
    output = tmp_path / "output.txt"
    output.write_bytes(b"the previous results\n")

    result = run_client(
        "-",
        str(output),
        "-p",
        str(server.port),
        stdin=b"1 + 1\n" * 600,  # a reply of 1200 bytes
        preexec_fn=limit_file_size_to_1000_bytes,
        env=UNMEASURED,  # under `make coverage`, its data file would fail to be written too
    )

    assert_fails_in_one_line(result, f"cannot write {re.escape(str(output))}: File too large")
    assert output.read_bytes() == b"the previous results\n"
    assert os.listdir(tmp_path) == ["output.txt"]


def test_new_output_file_gets_the_permissions_the_umask_allows(
    server: ServerProcess, tmp_path: Path
) -> None:
    (tmp_path / "input.txt").write_bytes(b"1 + 1\n")
    previous_umask = os.umask(0o027)
    try:
        client.main(
            [str(tmp_path / "input.txt"), str(tmp_path / "output.txt"), "-p", str(server.port)]
        )
    finally:
        os.umask(previous_umask)

    assert stat.S_IMODE((tmp_path / "output.txt").stat().st_mode) == 0o640


def test_output_that_is_not_a_regular_file_is_written_in_place(
    server: ServerProcess, tmp_path: Path
) -> None:
    (tmp_path / "input.txt").write_bytes(b"1 + 1\n")
    terminal, device = pty.openpty()  # a character device, as /dev/null is: not to be replaced
    try:
        client.main([str(tmp_path / "input.txt"), os.ttyname(device), "-p", str(server.port)])
        os.close(device)
        shown = read_terminal(terminal)
    finally:
        os.close(terminal)

    assert shown == b"2\r\n"  # the terminal turns "\n" into "\r\n"


# --- The progress line. ------------------------------------------------------------------


def test_progress_on_a_terminal_shows_sending_then_evaluating_then_receiving(
    tmp_path: Path,
) -> None:
    (tmp_path / "input.txt").write_bytes(b"1 + 1\n2 * 3\n")
    terminal, client_stderr = pty.openpty()
    try:
        with client_facing_a_fake_server(
            str(tmp_path / "input.txt"), str(tmp_path / "output.txt"), stderr=client_stderr
        ) as (process, connection):
            os.close(client_stderr)  # only the client holds it now: it closes with the client
            shown = read_terminal(terminal, until=b"evaluating")
            connection.sendall(HEADER.pack(4) + b"2\n")  # half the reply
            shown += read_terminal(terminal, until=b"receiving")
            connection.sendall(b"6\n")
            shown += read_terminal(terminal)
            assert process.wait(SUBPROCESS_TIMEOUT_S) == 0
    finally:
        os.close(terminal)

    assert shown.index(b"sending") < shown.index(b"evaluating") < shown.index(b"receiving")
    assert b"\r\x1b[Kclient: 2 lines, 0 error lines" in shown  # the progress line erased first


def test_progress_line_is_redrawn_while_the_server_is_silent(silent_server: socket.socket) -> None:
    # The server sends nothing while it evaluates: the line must show the time passing.
    terminal, device = pty.openpty()
    port = silent_server.getsockname()[1]
    try:
        with open(device, "w") as stream, client.Progress(stream) as progress:
            progress.begin("the server is evaluating")
            sock = client.connect("127.0.0.1", port, timeout_s=None)
            with sock, pytest.raises(socket.timeout):
                client.wait_for_reply(sock, 1.5, progress)
            shown = read_terminal(terminal, until=b"evaluating, 1 s")
    finally:
        os.close(terminal)

    assert shown.startswith(b"\r\x1b[Kclient: the server is evaluating, 0 s")


def test_no_progress_when_stderr_is_a_file(server: ServerProcess, tmp_path: Path) -> None:
    with open(tmp_path / "stderr.txt", "wb") as stderr:
        subprocess.run(
            [sys.executable, str(ROOT / "client.py"), "-", "-", "-p", str(server.port)],
            input=b"1 + 1\n",
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            timeout=SUBPROCESS_TIMEOUT_S,
            check=True,
        )

    summary = (tmp_path / "stderr.txt").read_text()
    assert re.fullmatch(r"client: 1 lines, 0 error lines, \d+\.\d\d s\n", summary)


# --- --format equation. ------------------------------------------------------------------


def test_equation_format_writes_expression_equals_result_and_leaves_blank_lines_blank(
    server: ServerProcess, tmp_path: Path
) -> None:
    input_path = tmp_path / "input.txt"
    input_path.write_bytes(b"1 + 2\n\n  1/0\t\r\n2 * 3")
    output = tmp_path / "output.txt"

    client.main([str(input_path), str(output), "-p", str(server.port), "--format", "equation"])

    assert output.read_bytes() == b"1 + 2 = 3\n\n1/0 = error: division by zero\n2 * 3 = 6\n"


EQUATIONS = {
    "no lines": (b"", b"", b""),
    "final newline missing": (b"1+1\n2*3", b"2\n6\n", b"1+1 = 2\n2*3 = 6\n"),
    "blank and spaces-only lines": (b"\n \t\n1\n", b"\n\n1\n", b"\n\n1 = 1\n"),
    "spaces, tabs and \\r around": (b" \t1 + 2\t\r\n", b"3\n", b"1 + 2 = 3\n"),
    "error line": (b"1/0\n", b"error: division by zero\n", b"1/0 = error: division by zero\n"),
    "more lines than a batch": (
        b"1\n" * (client.EQUATION_BATCH_LINES + 1),
        b"1\n" * (client.EQUATION_BATCH_LINES + 1),
        b"1 = 1\n" * (client.EQUATION_BATCH_LINES + 1),
    ),
}


@pytest.mark.parametrize(("payload", "reply", "output"), EQUATIONS.values(), ids=EQUATIONS.keys())
def test_equations_are_written_in_pieces_that_make_the_equation_format(
    payload: bytes, reply: bytes, output: bytes
) -> None:
    pieces = list(client.equations(payload, bytearray(reply)))

    assert b"".join(pieces) == output
    assert all(piece.count(b"\n") <= client.EQUATION_BATCH_LINES for piece in pieces)


# Runs the command in its arguments and prints the peak memory (resident, KiB) it used.
PRINT_PEAK_MEMORY = (
    "import resource, subprocess, sys;"
    "subprocess.run(sys.argv[1:], check=True);"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def client_peak_memory_kib(output_format: str, tmp_path: Path) -> int:
    """The peak memory of a client in --format output_format, for a 1,000,000-line request."""
    lines = 1_000_000
    (tmp_path / "input.txt").write_bytes(b"1 + 1\n" * lines)
    with client_facing_a_fake_server(
        str(tmp_path / "input.txt"),
        str(tmp_path / "output.txt"),
        "--format",
        output_format,
        python=(sys.executable, "-c", PRINT_PEAK_MEMORY, sys.executable),
        stdout=subprocess.PIPE,
        env=UNMEASURED,  # coverage's tracing would weigh on both
    ) as (process, connection):
        send_frame(connection, [b"2\n" * lines])
        stdout, _ = process.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    assert process.returncode == 0
    return int(stdout)


def test_equation_format_takes_at_most_twice_the_memory_of_plain(tmp_path: Path) -> None:
    # A list of all the lines took some 50 times the input: 12 times plain's memory here.
    plain_kib = client_peak_memory_kib("plain", tmp_path)
    equation_kib = client_peak_memory_kib("equation", tmp_path)

    assert equation_kib <= 2 * plain_kib, f"{equation_kib} KiB, plain {plain_kib} KiB"


# --- Waiting for the server, and --timeout. -----------------------------------------------

PAYLOAD = b"1 + 2\n2 ** 10\n(1\n7 / 0\n"
CLIENT_TIMEOUT_S = 0.5  # --timeout against a silent server


@pytest.fixture
def silent_server() -> Iterator[socket.socket]:
    """A listening socket that nobody serves: the kernel completes connections into its backlog.

    A client's connect succeeds and its small request fits in the socket buffers, so the
    client then waits for a reply that never comes.  The test accepts the connection
    afterwards, to read what the client sent.
    """
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(SUBPROCESS_TIMEOUT_S)
        yield listener


def test_timeout_against_a_silent_server_is_a_one_line_error_and_exit_1(
    silent_server: socket.socket, tmp_path: Path
) -> None:
    port = str(silent_server.getsockname()[1])
    result = run_client(
        "-",
        str(tmp_path / "out.txt"),
        "-a",
        "127.0.0.1",
        "-p",
        port,
        "--timeout",
        str(CLIENT_TIMEOUT_S),
        stdin=PAYLOAD,
    )
    assert result.returncode == 1
    assert result.stderr == f"client: 127.0.0.1:{port} sent nothing for too long (see --timeout)\n"
    assert not (tmp_path / "out.txt").exists()
    # The client had connected and sent its whole request: it timed out waiting for the reply.
    connection, _ = silent_server.accept()
    with connection:
        connection.settimeout(SUBPROCESS_TIMEOUT_S)
        assert recv_frame(connection) == PAYLOAD
        assert connection.recv(1) == b""  # and it closed the connection when it gave up


def test_timeout_holds_when_stderr_is_a_terminal(
    silent_server: socket.socket, tmp_path: Path
) -> None:
    # The progress line redraws while the client waits; --timeout still ends the wait.
    (tmp_path / "input.txt").write_bytes(PAYLOAD)
    port = str(silent_server.getsockname()[1])
    terminal, client_stderr = pty.openpty()
    command = [sys.executable, str(ROOT / "client.py"), str(tmp_path / "input.txt"), "-"]
    try:
        process = subprocess.Popen(
            [*command, "-a", "127.0.0.1", "-p", port, "--timeout", str(CLIENT_TIMEOUT_S)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=client_stderr,
        )
        os.close(client_stderr)  # only the client holds it now: it closes with the client
        shown = read_terminal(terminal)
        assert process.wait(SUBPROCESS_TIMEOUT_S) == 1
    finally:
        os.close(terminal)

    assert shown.endswith(
        f"\r\x1b[Kclient: 127.0.0.1:{port} sent nothing for too long (see --timeout)\r\n".encode()
    )


def test_connection_without_a_timeout_blocks_and_has_tcp_keepalive_on(
    silent_server: socket.socket,
) -> None:
    # Silence alone is no failure (the server sends nothing until the reply is complete):
    # no timeout, and TCP keepalive probes to notice a dead peer.
    with client.connect("127.0.0.1", silent_server.getsockname()[1], timeout_s=None) as sock:
        assert sock.gettimeout() is None
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1


NOT_POSITIVE = "argument --timeout: must be a number greater than 0, not {}"
LONGER_THAN_A_WEEK = (
    "argument --timeout: must be at most 604800 seconds (a week), not {};"
    " leave --timeout out to wait while the server is alive"
)
BAD_TIMEOUTS = {
    "zero": ("0", NOT_POSITIVE.format("0")),
    "negative": ("-1", NOT_POSITIVE.format("-1")),
    "word": ("soon", NOT_POSITIVE.format("soon")),
    "infinite": ("inf", LONGER_THAN_A_WEEK.format("inf")),
    "longer-than-a-socket-can-wait": ("1e20", LONGER_THAN_A_WEEK.format("1e20")),
}


@pytest.mark.parametrize(("timeout", "complaint"), BAD_TIMEOUTS.values(), ids=BAD_TIMEOUTS.keys())
def test_timeout_that_is_not_a_positive_number_of_at_most_a_week_is_a_usage_error(
    timeout: str, complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_status:
        client.parse_args(["-", "-", "--timeout", timeout])
    assert exit_status.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"error: {complaint}")


# --- TLS. --------------------------------------------------------------------------------


class Certificate(NamedTuple):
    certificate: Path  # what a client trusts (--cafile)
    key: Path


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    """A self-signed certificate for localhost and 127.0.0.1, made now, valid for a day."""
    folder = tmp_path_factory.mktemp("tls")
    made = Certificate(folder / "bluserver.crt", folder / "bluserver.key")
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
            *("-keyout", str(made.key), "-out", str(made.certificate)),
        ],
        capture_output=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        check=True,
    )
    return made


@contextmanager
def tls_front(certificate: Certificate, server_port: int) -> Iterator[int]:
    """A TLS terminator on 127.0.0.1, in a thread, in front of the server at server_port, as
    HAProxy is in a cluster; yield its port.  It serves one connection: a request read in TLS
    is passed on in plain, its reply passed back.  A failed handshake ends it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate.certificate, certificate.key)

    def serve_one(listener: socket.socket) -> None:
        connection, _ = listener.accept()
        connection.settimeout(EVENT_TIMEOUT_S)
        # ssl.SSLError: a client that refuses the certificate, or one that is not in TLS.
        with (
            contextlib.suppress(OSError),
            context.wrap_socket(connection, server_side=True) as secure,
        ):
            send_frame(secure, [request(server_port, bytes(recv_frame(secure)))])
        connection.close()

    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(EVENT_TIMEOUT_S)
        front = threading.Thread(target=serve_one, args=(listener,), daemon=True)
        front.start()
        yield listener.getsockname()[1]
        front.join(EVENT_TIMEOUT_S)


TRUSTING = {
    "cafile": ["--cafile", "{certificate}"],
    "cafile, address not the name": ["--cafile", "{certificate}", "--server-name", "localhost"],
}


@pytest.mark.parametrize("tls_options", TRUSTING.values(), ids=TRUSTING.keys())
def test_tls_round_trip_through_a_tls_front_gives_the_servers_results(
    tls_options: list[str], certificate: Certificate, server: ServerProcess
) -> None:
    options = [option.format(certificate=certificate.certificate) for option in tls_options]
    with tls_front(certificate, server.port) as port:
        result = run_client("-", "-", "-a", "127.0.0.1", "-p", str(port), *options, stdin=PAYLOAD)

    assert result.returncode == 0, result.stderr
    assert result.stdout == "3\n1024\nerror: missing ')' at column 3\nerror: division by zero\n"


UNTRUSTED = {
    "unknown certificate": (
        ["--tls"],
        r"cannot verify the certificate of 127\.0\.0\.1:\d+: self-signed certificate"
        r" \(trust it with --cafile; --server-name for the name it was issued to\)",
    ),
    "another name": (
        ["--cafile", "{certificate}", "--server-name", "example.org"],
        r"cannot verify the certificate of 127\.0\.0\.1:\d+: Hostname mismatch, certificate"
        r" is not valid for 'example\.org'\. \(trust it with --cafile; .*\)",
    ),
}


@pytest.mark.parametrize(("tls_options", "message"), UNTRUSTED.values(), ids=UNTRUSTED.keys())
def test_tls_to_a_certificate_not_trusted_fails_in_one_line(
    tls_options: list[str], message: str, certificate: Certificate, server: ServerProcess
) -> None:
    options = [option.format(certificate=certificate.certificate) for option in tls_options]
    with tls_front(certificate, server.port) as port:
        result = run_client("-", "-", "-a", "127.0.0.1", "-p", str(port), *options, stdin=PAYLOAD)

    assert_fails_in_one_line(result, message)


def test_tls_to_a_plain_server_fails_in_one_line(
    certificate: Certificate, server: ServerProcess
) -> None:
    cafile = str(certificate.certificate)
    result = run_client("-", "-", "-p", str(server.port), "--cafile", cafile, stdin=PAYLOAD)

    assert_fails_in_one_line(
        result, r"TLS with localhost:\d+ failed: .+ \(does it serve TLS on this port\?\)"
    )


def test_tls_handshake_unanswered_fails_in_one_line_without_a_timeout(
    silent_server: socket.socket,
    certificate: Certificate,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    # A listener that never answers the hello; the same for a plain server given a huge
    # --max-bytes, waiting for the rest of a request header.
    monkeypatch.setattr(client, "TLS_HANDSHAKE_TIMEOUT_S", CLIENT_TIMEOUT_S)
    port = str(silent_server.getsockname()[1])
    (tmp_path / "input.txt").write_bytes(PAYLOAD)
    cafile = str(certificate.certificate)

    message = main_fails_with(
        str(tmp_path / "input.txt"), "-", "-a", "127.0.0.1", "-p", port, "--cafile", cafile
    )

    assert message == (
        f"client: TLS with 127.0.0.1:{port} failed: no answer in {CLIENT_TIMEOUT_S:g} s"
        " (does it serve TLS on this port?)"
    )


def test_plain_client_to_a_tls_front_fails_in_one_line(
    certificate: Certificate, server: ServerProcess
) -> None:
    with tls_front(certificate, server.port) as port:
        result = run_client("-", "-", "-a", "127.0.0.1", "-p", str(port), stdin=PAYLOAD)

    # The front's handshake fails on the request header: it closes, the request unread.
    assert_fails_in_one_line(
        result,
        r"(connection to 127\.0\.0\.1:\d+ failed: Connection reset by peer"
        r"|127\.0\.0\.1:\d+ closed the connection early \(.*\))",
    )
