"""The client's behaviour at its edges: failures reported in one line, refusals, its output file.

Tests run client.py as a subprocess, as a user runs it, against real servers (the
``start_server`` and ``server`` fixtures of conftest.py) or against a fake server scripted
here, which answers what the test needs the client to face.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from client import HEADER, recv_frame
from conftest import ROOT, ServerProcess

SUBPROCESS_TIMEOUT_S = 30.0


# --- Helpers. ----------------------------------------------------------------------------


def run_client(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    """Run client.py to completion; stdout and stderr decoded, newlines untouched."""
    command = [sys.executable, str(ROOT / "client.py"), *args]
    result = subprocess.run(
        command, input=stdin, capture_output=True, timeout=SUBPROCESS_TIMEOUT_S, check=False
    )
    return subprocess.CompletedProcess(
        command, result.returncode, result.stdout.decode(), result.stderr.decode()
    )


def run_client_against_fake_server(
    reply: bytes, input_path: Path
) -> subprocess.CompletedProcess[str]:
    """Run the client against a server that reads the request, sends `reply` verbatim, closes."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(SUBPROCESS_TIMEOUT_S)
        port = listener.getsockname()[1]
        args = [
            sys.executable,
            str(ROOT / "client.py"),
            str(input_path),
            "-",
            "-a",
            "127.0.0.1",
            "-p",
            str(port),
        ]
        process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        try:
            connection, _ = listener.accept()
            with connection:
                recv_frame(connection)
                connection.sendall(reply)
            stdout, stderr = process.communicate(timeout=SUBPROCESS_TIMEOUT_S)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
    return subprocess.CompletedProcess(args, process.returncode, stdout.decode(), stderr.decode())


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


# --- Failures, each in one line. -------------------------------------------------------


def test_client_fails_in_one_line_when_the_server_cannot_be_reached() -> None:
    with refused_port() as port:
        result = run_client("-", "-", "-a", "127.0.0.1", "-p", str(port), stdin=b"1\n")

    assert_fails_in_one_line(
        result, rf"cannot connect to 127\.0\.0\.1:{port}: connection refused.*"
    )


def test_client_fails_in_one_line_when_the_input_file_is_missing(tmp_path: Path) -> None:
    with refused_port() as port:
        result = run_client(str(tmp_path / "missing.txt"), "-", "-a", "127.0.0.1", "-p", str(port))

    assert_fails_in_one_line(
        result, f"cannot read {re.escape(str(tmp_path / 'missing.txt'))}: No such file.*"
    )


def test_client_fails_in_one_line_when_the_output_cannot_be_written(
    server: ServerProcess, tmp_path: Path
) -> None:
    output = tmp_path / "no such folder" / "output.txt"
    result = run_client("-", str(output), "-a", "127.0.0.1", "-p", str(server.port), stdin=b"1\n")

    assert_fails_in_one_line(result, f"cannot write {re.escape(str(output))}: No such file.*")


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (b"", r"127\.0\.0\.1:\d+ closed the connection early .*\b0 of 8 bytes.*"),
        (
            HEADER.pack(100) + b"2\n",
            r"127\.0\.0\.1:\d+ closed the connection early .*\b2 of 100 bytes.*",
        ),
        (HEADER.pack(2) + b"2\n", r".*\b1 lines for 2 input lines"),
        (HEADER.pack(6) + b"2\n6\n9\n", r".*\b3 lines for 2 input lines"),
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
