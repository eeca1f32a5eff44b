"""Everything around the server: the zipapp, --help, logging and the client's conveniences.

Every test runs real processes (``bluserver.py``, ``client.py``, or ``bluserver.pyz``
built by make_zipapp.py) on 127.0.0.1 and ephemeral ports, and proves that none of them
outlives the test.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

from client import recv_frame
from conftest import (
    LEFTOVER_GRACE_S,
    ROOT,
    STARTUP_TIMEOUT_S,
    ServerProcess,
    session_processes,
    wait_until,
)
from tools import make_zipapp

PAYLOAD = b"1 + 2\n2 ** 10\n(1\n7 / 0\n"
REPLY = b"3\n1024\nerror: missing ')' at column 3\nerror: division by zero\n"
ALL_REJECTED = b"(1\n7 / 0\n(2\n8 / 0\n"  # with -n 2, both workers reject lines
SUPPORTED_EXTREMES = ("3.9", "3.13")  # the oldest and newest Python the zipapp must run on
CLIENT_TIMEOUT_S = 1.0
RUN_TIMEOUT_S = 30.0


# --- Helpers: interpreters, processes, the client. --------------------------------------


def find_interpreter(version: str) -> str | None:
    """A working python<version>: pyenv's newest patch release of it, else one on PATH."""
    pyenv_versions = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    releases = [
        (int(match.group(1)), path / "bin" / "python")
        for path in (pyenv_versions.iterdir() if pyenv_versions.is_dir() else [])
        if (match := re.fullmatch(re.escape(version) + r"\.(\d+)", path.name))
    ]
    candidates = [str(python) for _, python in sorted(releases, reverse=True)]
    candidates.append(shutil.which(f"python{version}") or "")
    for candidate in filter(None, candidates):
        if subprocess.run([candidate, "-c", "import sys"], capture_output=True, check=False).returncode == 0:
            return candidate
    return None


def zipapp_interpreters() -> list[Any]:
    """The running interpreter, then 3.9 and 3.13: skipped, visibly, where this machine lacks them."""
    running = "{}.{}".format(*sys.version_info[:2])
    params = [pytest.param(sys.executable, id=f"running-python{running}")]
    for version in SUPPORTED_EXTREMES:
        if version == running:
            continue
        python = find_interpreter(version)
        missing = pytest.mark.skip(reason=f"python{version} not found (pyenv or PATH); the zipapp is untested on it")
        params.append(pytest.param(python, id=f"python{version}", marks=() if python else missing))
    return params


def environment_without_python_path() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if name not in ("PYTHONPATH", "PYTHONHOME")}


class CommandServer(ServerProcess):
    """A server started by any command line, e.g. the zipapp under another interpreter."""

    def __init__(self, command: list[str], cwd: Path) -> None:
        self.process = subprocess.Popen(
            command,
            cwd=cwd,
            env=environment_without_python_path(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert self.process.stdout is not None and self.process.stderr is not None
        banner = self.process.stdout.readline()
        match = re.search(r"serving on [^ ]+:(\d+)", banner)
        if not match:
            self.process.kill()
            raise AssertionError(f"server did not start: {banner!r} {self.process.stderr.read()!r}")
        self.port = int(match.group(1))

    def assert_nothing_left(self) -> None:
        """Fail unless every process of the server's session has exited."""
        wait_until(lambda: not session_processes(self.process.pid), LEFTOVER_GRACE_S, "the session to empty")


@pytest.fixture
def start_command() -> Iterator[Callable[..., CommandServer]]:
    """start_command(command, cwd) -> a running CommandServer, cleaned up after the test."""
    servers: list[CommandServer] = []

    def start(command: list[str], cwd: Path) -> CommandServer:
        server = CommandServer(command, cwd)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.cleanup()


def run_client(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, str(ROOT / "client.py"), *args],
        input=stdin,
        capture_output=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )


def log_lines(server: ServerProcess) -> list[str]:
    """The server's log lines, after stopping it (the banner is not among them)."""
    assert server.stop() == 0
    return server.output().splitlines()


def json_events(server: ServerProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log_lines(server)]


# --- The zipapp. ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def built_zipapp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_zipapp.build(tmp_path_factory.mktemp("dist") / "bluserver.pyz")


@pytest.fixture
def lone_zipapp(built_zipapp: Path, tmp_path: Path) -> Path:
    """The zipapp copied alone into an empty directory."""
    app = tmp_path / "app.pyz"
    shutil.copy(built_zipapp, app)
    assert sorted(tmp_path.iterdir()) == [app]
    return app


@pytest.mark.parametrize("python", zipapp_interpreters())
def test_zipapp_copied_alone_serves_without_site_packages_and_exits_0_on_sigterm(
    python: str, lone_zipapp: Path, start_command: Callable[..., CommandServer]
) -> None:
    server = start_command(
        [python, "-S", lone_zipapp.name, "-a", "127.0.0.1", "-p", "0", "-n", "2"], cwd=lone_zipapp.parent
    )
    assert server.request(PAYLOAD) == REPLY
    assert server.stop() == 0
    server.assert_nothing_left()


def test_zipapp_workers_import_from_the_archive_under_spawn_start_method(
    lone_zipapp: Path, start_command: Callable[..., CommandServer]
) -> None:
    # Spawned workers start a fresh interpreter that must import worker, grammar and
    # pyparsing from the archive (forked ones inherit them already imported).
    launcher = (
        "import multiprocessing, sys; sys.path.insert(0, sys.argv.pop(1)); "
        "multiprocessing.set_start_method('spawn'); import bluserver; sys.exit(bluserver.main(sys.argv[1:]))"
    )
    server = start_command(
        [sys.executable, "-S", "-c", launcher, str(lone_zipapp), "-a", "127.0.0.1", "-p", "0", "-n", "2", "-v"],
        cwd=lone_zipapp.parent,
    )
    assert server.request(PAYLOAD) == REPLY
    assert sum("event='Worker started'" in line for line in log_lines(server)) == 2
    server.assert_nothing_left()


def test_zipapp_holds_the_modules_an_entry_point_and_pyparsing_source_only(built_zipapp: Path) -> None:
    with zipfile.ZipFile(built_zipapp) as archive:
        names = set(archive.namelist())
    assert {"__main__.py", "bluserver.py", "worker.py", "grammar.py", "client.py", "pyparsing/__init__.py"} <= names
    assert "pyparsing-LICENSE" in names
    assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]


def test_zipapp_is_executable_and_starts_with_an_env_python3_shebang(built_zipapp: Path) -> None:
    assert built_zipapp.read_bytes().startswith(b"#!/usr/bin/env python3\n")
    assert os.access(built_zipapp, os.X_OK)


def test_make_zipapp_writes_the_archive_to_the_path_given_on_its_command_line(tmp_path: Path) -> None:
    output = tmp_path / "elsewhere" / "custom.pyz"
    result = subprocess.run(
        [sys.executable, "-m", "tools.make_zipapp", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert zipfile.is_zipfile(output)
    assert str(output) in result.stdout


# --- --help. --------------------------------------------------------------------------

HELP_OPTIONS = {
    "bluserver.py": [
        "-a", "-p", "-n", "-v", "--max-bytes", "--timeout", "--worker-timeout", "--max-clients", "--log-format",
        "--syslog",
    ],
    "client.py": ["input", "output", "-a", "-p", "--timeout", "--format"],
}  # fmt: skip


@pytest.mark.parametrize("script", sorted(HELP_OPTIONS))
def test_help_exits_0_documents_every_option_and_shows_an_example(script: str) -> None:
    result = subprocess.run(
        [sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False
    )
    assert result.returncode == 0
    undocumented = [
        option
        for option in HELP_OPTIONS[script]
        # an entry of the option list: "  -a ADDRESS, --address ADDRESS", "  --syslog ADDRESS", "  input"
        if not re.search(rf"^ +(?:-\w(?: \S+)?, )?{re.escape(option)}(?: |,|$)", result.stdout, re.MULTILINE)
    ]
    assert undocumented == []
    assert "examples:" in result.stdout
    assert f"python {script}" in result.stdout.split("examples:", 1)[1]


# --- Logs. ----------------------------------------------------------------------------

KV_EVENT = re.compile(r"^\[bluserver[.\w]*\] [\d-]+ [\d:,]+: [A-Z]+ uuid=\S+ pname='[^']+' pid=\d+ event='[^']+'")


def test_verbose_log_lines_carry_uuid_pname_pid_and_event(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("-v")
    server.request(PAYLOAD)
    lines = log_lines(server)
    assert len(lines) >= 5  # server started, request events, shutting down, stopped
    assert [line for line in lines if not KV_EVENT.match(line)] == []


def test_grep_by_uuid_follows_one_request_to_its_handler_and_each_worker_process(
    start_server: Callable[..., ServerProcess],
) -> None:
    server = start_server("-vv", "-n", "2")
    server.request(ALL_REJECTED)
    logged = "\n".join(log_lines(server))
    request_ids = set(re.findall(r"uuid='([0-9a-f]{32})'", logged))
    assert len(request_ids) == 1
    request_id = request_ids.pop()
    assert set(re.findall(rf"uuid='{request_id}' pname='([^']+)'", logged)) == {"handler"}
    worker_pids = re.findall(
        rf"uuid='{request_id}' .*event='Worker finished' worker='worker-\d' worker_pid=(\d+)", logged
    )
    assert len(set(worker_pids)) == 2


def test_json_log_format_gives_one_object_per_line_with_the_same_keys(
    start_server: Callable[..., ServerProcess],
) -> None:
    server = start_server("-v", "--log-format", "json")
    server.request(PAYLOAD)
    events = json_events(server)
    assert len(events) >= 5
    assert [event for event in events if not {"uuid", "pname", "pid", "event"} <= set(event)] == []


def test_each_request_ends_with_one_request_served_summary(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("-v", "-n", "2", "--log-format", "json")
    replies = [server.request(PAYLOAD), server.request(b"4 * 5\n")]
    events = json_events(server)
    request_ids = list(dict.fromkeys(event["uuid"] for event in events if event["uuid"]))
    assert len(request_ids) == 2
    summaries = []
    for request_id in request_ids:
        request_events = [event for event in events if event["uuid"] == request_id]
        assert [event["event"] for event in request_events].count("Request served") == 1
        summaries.append(request_events[-1])
    expected = [
        {"lines": 4, "error_lines": 2, "bytes_in": len(PAYLOAD), "bytes_out": len(replies[0]), "workers": 2},
        {"lines": 1, "error_lines": 0, "bytes_in": 6, "bytes_out": len(replies[1]), "workers": 1},
    ]
    for summary, fields in zip(summaries, expected):
        assert summary["event"] == "Request served"
        assert {key: summary[key] for key in fields} == fields
        assert isinstance(summary["seconds"], float) and summary["seconds"] >= 0


@pytest.mark.parametrize(("verbosity", "rejected"), [("-v", 0), ("-vv", 2)])
def test_very_verbose_adds_a_line_rejected_event_per_error_line(
    start_server: Callable[..., ServerProcess], verbosity: str, rejected: int
) -> None:
    server = start_server(verbosity)
    server.request(PAYLOAD)
    assert sum("event='Line rejected'" in line for line in log_lines(server)) == rejected


def test_very_verbose_logs_rejected_lines_under_spawn_start_method(
    start_server: Callable[..., ServerProcess],
) -> None:
    server = start_server("-vv", start_method="spawn")
    server.request(PAYLOAD)
    assert sum("event='Line rejected'" in line for line in log_lines(server)) == 2


@pytest.fixture
def syslog_receiver() -> Iterator[socket.socket]:
    """A UDP socket on 127.0.0.1 standing in for a syslog daemon."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        receiver.bind(("127.0.0.1", 0))
        receiver.settimeout(STARTUP_TIMEOUT_S)
        yield receiver


def receive_until(receiver: socket.socket, event: str) -> list[bytes]:
    """Datagrams received up to and including the first that carries event; socket.timeout if none."""
    datagrams = [receiver.recv(65536)]
    while f"event='{event}'".encode() not in datagrams[-1]:
        datagrams.append(receiver.recv(65536))
    return datagrams


def test_syslog_udp_address_receives_the_log_records(
    start_server: Callable[..., ServerProcess], syslog_receiver: socket.socket
) -> None:
    port = syslog_receiver.getsockname()[1]
    server = start_server("-v", "--syslog", f"127.0.0.1:{port}")
    receive_until(syslog_receiver, "Server started")
    server.request(PAYLOAD)
    datagrams = receive_until(syslog_receiver, "Request served")
    assert datagrams[-1].startswith(b"<14>[bluserver]")  # facility user, severity info
    assert re.search(rb"uuid='[0-9a-f]{32}' pname='handler' pid=\d+ event='Request served' lines=4", datagrams[-1])


def test_syslog_unix_socket_path_that_does_not_exist_is_a_one_line_error_and_exit_1(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "log"
    process = subprocess.Popen(
        [sys.executable, "bluserver.py", "-a", "127.0.0.1", "-p", "0", "--syslog", str(missing)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert process.stdout is not None
        banner = process.stdout.readline()  # "" once it exits, as it should; the banner if it serves
        if banner:
            process.terminate()
        _, stderr = process.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        process.kill()
        process.wait()
    assert (banner, process.returncode) == ("", 1)
    assert stderr.startswith(f"bluserver: cannot log to syslog at {missing}: ")
    assert stderr.count("\n") == 1


# --- The client's conveniences. ---------------------------------------------------------


def test_equation_format_writes_expression_equals_result_lines(server: ServerProcess, tmp_path: Path) -> None:
    source, output = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_bytes(b"1 + 2\n\n7 / 0\n")
    result = run_client(str(source), str(output), "-a", "127.0.0.1", "-p", str(server.port), "--format", "equation")
    assert result.returncode == 0, result.stderr
    assert output.read_text() == "1 + 2 = 3\n\n7 / 0 = error: division by zero\n"


def write_zip(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


COMPRESSORS: dict[str, Callable[[Path, bytes], object]] = {
    ".gz": lambda path, data: path.write_bytes(gzip.compress(data)),
    ".bz2": lambda path, data: path.write_bytes(bz2.compress(data)),
    ".xz": lambda path, data: path.write_bytes(lzma.compress(data)),
    ".zip": lambda path, data: write_zip(path, {"operations.txt": data}),
}


@pytest.mark.parametrize("extension", sorted(COMPRESSORS))
def test_compressed_input_is_read_by_its_extension(server: ServerProcess, tmp_path: Path, extension: str) -> None:
    source = tmp_path / f"operations.txt{extension}"
    COMPRESSORS[extension](source, PAYLOAD)
    result = run_client(str(source), "-", "-a", "127.0.0.1", "-p", str(server.port))
    assert result.returncode == 0, result.stderr
    assert result.stdout == REPLY


def test_zip_input_with_two_members_is_a_one_line_error_and_exit_1(server: ServerProcess, tmp_path: Path) -> None:
    source = tmp_path / "two.zip"
    write_zip(source, {"a.txt": b"1 + 1\n", "b.txt": b"2 + 2\n"})
    result = run_client(str(source), "-", "-a", "127.0.0.1", "-p", str(server.port))
    assert result.returncode == 1
    assert result.stdout == b""
    assert result.stderr.startswith(b"client: ")
    assert b"holds 2 files" in result.stderr
    assert result.stderr.count(b"\n") == 1


def test_dash_reads_stdin_and_writes_stdout(server: ServerProcess) -> None:
    result = run_client("-", "-", "-a", "127.0.0.1", "-p", str(server.port), stdin=PAYLOAD)
    assert result.returncode == 0, result.stderr
    assert result.stdout == REPLY


@pytest.fixture
def silent_server() -> Iterator[socket.socket]:
    """A listening socket that nobody serves: the kernel completes connections into its backlog.

    A client's connect succeeds and its small request fits in the socket buffers, so the
    client then waits for a reply that never comes.  The test accepts the connection
    afterwards, to read what the client sent.
    """
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(RUN_TIMEOUT_S)
        yield listener


def test_timeout_against_a_silent_server_is_a_one_line_error_and_exit_1(
    silent_server: socket.socket, tmp_path: Path
) -> None:
    port = str(silent_server.getsockname()[1])
    started = time.monotonic()
    result = run_client(
        "-", str(tmp_path / "out.txt"), "-a", "127.0.0.1", "-p", port, "--timeout", str(CLIENT_TIMEOUT_S),
        stdin=PAYLOAD,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert result.returncode == 1
    assert re.fullmatch(rb"client: [^\n]*--timeout[^\n]*\n", result.stderr), result.stderr
    assert CLIENT_TIMEOUT_S <= elapsed < CLIENT_TIMEOUT_S + 5
    assert not (tmp_path / "out.txt").exists()
    # The client had connected and sent its whole request: it timed out waiting for the reply.
    connection, _ = silent_server.accept()
    with connection:
        connection.settimeout(RUN_TIMEOUT_S)
        assert recv_frame(connection) == PAYLOAD
        assert connection.recv(1) == b""  # and it closed the connection when it gave up


LARGE_INPUT = b"1 + 1\n" * 200_000  # over client.PROGRESS_MIN_BYTES


def test_large_input_with_stderr_a_pipe_shows_only_the_summary(server: ServerProcess) -> None:
    result = run_client("-", "-", "-a", "127.0.0.1", "-p", str(server.port), stdin=LARGE_INPUT)
    assert result.returncode == 0
    assert re.fullmatch(rb"client: 200000 lines, 0 error lines, [\d.]+ s\n", result.stderr)


def test_large_input_with_stderr_a_terminal_shows_progress(server: ServerProcess, tmp_path: Path) -> None:
    source = tmp_path / "large.txt"
    source.write_bytes(LARGE_INPUT)
    command = [sys.executable, str(ROOT / "client.py"), str(source), os.devnull, "-a", "127.0.0.1"]
    terminal, terminal_side = os.openpty()
    try:
        with open(terminal_side, "wb") as client_stderr:  # closed here so only the client holds it
            client = subprocess.Popen(
                [*command, "-p", str(server.port), "--timeout", str(RUN_TIMEOUT_S)], stderr=client_stderr
            )
        shown = read_until_closed(terminal)
        assert client.wait(RUN_TIMEOUT_S) == 0
    finally:
        os.close(terminal)
    assert b"client: sending 1.2 MB" in shown
    assert b"client: waiting for the results" in shown
    assert b"client: 200000 lines, 0 error lines" in shown


def read_until_closed(terminal: int) -> bytes:
    """Everything written to a pseudo-terminal until the last process holding its other side exits."""
    chunks = []
    while True:
        try:
            chunk = os.read(terminal, 65536)
        except OSError:  # EIO: nobody holds the other side any more
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)
