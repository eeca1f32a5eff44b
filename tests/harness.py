"""The one way to start a real bluserver: for the tests (through conftest.py's fixtures),
``make bench``, ``make limits``, ``make load`` and the cluster drills (tools/).

``ServerProcess`` runs ``python bluserver.py`` on 127.0.0.1 and an ephemeral port, in a
session of its own, so that at the end a test can prove that no process of that session
(server, handler or worker) is left.  Its stdout and stderr go to files rather than pipes:
a verbose server can never block on a full pipe, and a test waits for a logged event by
reading the file (``wait_for_event``) instead of sleeping.

Under ``start_method`` or ``faults``, the server runs through tests/launch.py, which sets
the interpreter's default multiprocessing start method or installs a fault from
tests/faults.py before it imports bluserver.  Given a ``listener``, the server is handed that
listening socket as systemd hands one (socket activation, ``socket_activation``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable, NamedTuple

from client import recv_frame, send_frame

ROOT = Path(__file__).resolve().parent.parent  # the checkout: bluserver.py is here
STARTUP_TIMEOUT_S = 20.0
EVENT_TIMEOUT_S = 20.0  # how long to wait for something that must happen
EXIT_TIMEOUT_S = 30.0
SUBPROCESS_TIMEOUT_S = 30.0  # how long a command the tests run (a client, --help) may take
POLL_S = 0.01  # how often a wait checks its condition
LISTEN_FDS_START = 3  # systemd's protocol: the first socket handed over is fd 3

# Options the tests start servers with: start_server(*LOG, **SCRIPTED), start_server(*JSON_LOG).
JSON_LOG = ("--log-format", "json")  # one JSON object per log line, as ServerProcess.events reads
LOG = ("-v", *JSON_LOG)  # and with the events of every request
SCRIPTED = {"faults": ["scripted_lines"]}  # a line "gate PATH" waits until the file PATH exists


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


def wait_until(
    condition: Callable[[], object], what: str, timeout_s: float = EVENT_TIMEOUT_S
) -> None:
    """Poll condition until it is true; fail the test with `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(POLL_S)


def wait_for_exit(process: subprocess.Popen[Any], timeout_s: float) -> int:
    """process.wait(timeout_s), checking every POLL_S: Popen.wait with a timeout sleeps up to
    50 ms between checks, which a test pays at every server it stops."""
    try:
        wait_until(lambda: process.poll() is not None, f"process {process.pid} to exit", timeout_s)
    except AssertionError:
        raise subprocess.TimeoutExpired(process.args, timeout_s) from None
    return process.wait()  # at once: it has exited


def socket_activation(listener: socket.socket, env: Mapping[str, str]) -> Callable[[], None]:
    """A preexec_fn that hands listener to the program Popen starts, as systemd does
    (sd_listen_fds(3)): the socket at fd 3, LISTEN_FDS=1, and LISTEN_PID set to the pid of the
    started process itself.  That pid is known only once forked, so the whole environment (env)
    is set here, between fork and exec.  Give Popen env=None, and close_fds=False so that fd 3
    survives exec; every other file descriptor is closed at exec, as systemd passes nothing
    else."""
    listener_fd = listener.fileno()

    def hand_over() -> None:
        os.dup2(listener_fd, LISTEN_FDS_START)
        os.set_inheritable(LISTEN_FDS_START, True)  # dup2 onto itself (fd 3 already) would not
        for name in os.listdir("/proc/self/fd"):  # Python's own are closed at exec (PEP 446),
            if int(name) > LISTEN_FDS_START:  # but not what this process inherited
                with contextlib.suppress(OSError):  # the listing's own, closed by now
                    os.set_inheritable(int(name), False)
        os.environ.clear()
        os.environ.update(env, LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))

    return hand_over


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=EVENT_TIMEOUT_S)


def request(port: int, payload: bytes) -> bytes:
    """Send one request with the wire protocol to 127.0.0.1:port; return the reply's bytes."""
    with connect(port) as sock:
        send_frame(sock, [payload])
        return bytes(recv_frame(sock))


class ServerProcess:
    """A running bluserver on 127.0.0.1 and an ephemeral port."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        start_method: str | None = None,
        faults: Sequence[str] = (),
        env: dict[str, str] | None = None,
        command: Sequence[str] = (),
        cwd: Path = ROOT,
        wait: bool = True,
        listener: socket.socket | None = None,
    ) -> None:
        """command, if given, runs instead of bluserver.py (e.g. the zipapp under another Python).

        listener, if given, is handed to the server as systemd does (LISTEN_PID, LISTEN_FDS, fd 3),
        which serves it instead of binding a port of its own.

        wait=False returns as soon as the process is launched; call wait_until_serving before
        using it.  Servers launched together start in parallel (start_servers).
        """
        self.stdout = tempfile.TemporaryFile()  # noqa: SIM115 (closed by cleanup)
        self.stderr_file = tempfile.TemporaryFile()  # noqa: SIM115 (closed by cleanup)
        program = ROOT / ("tests/launch.py" if start_method or faults else "bluserver.py")
        environment = {
            **os.environ,
            **(env or {}),
            "START_METHOD": start_method or "",
            "FAULTS": " ".join(faults),
        }
        # Socket activation sets the environment itself, in the child (LISTEN_PID is its pid).
        activation = socket_activation(listener, environment) if listener else None
        self.process = subprocess.Popen(
            [*(command or [sys.executable, str(program)]), "-a", "127.0.0.1", "-p", "0", *args],
            cwd=cwd,
            env=None if activation else environment,
            preexec_fn=activation,  # noqa: PLW1509 - it makes system calls only, no locks
            close_fds=not activation,  # fd 3 must reach the server; the hand-over closes the rest
            stdout=self.stdout,
            stderr=self.stderr_file,
            start_new_session=True,
        )
        self.pid = self.process.pid  # also the id of the session its children live in
        self.port = 0  # known once it serves
        if wait:
            self.wait_until_serving()

    def wait_until_serving(self) -> None:
        """Wait for the banner, and take the port from it."""
        wait_until(
            lambda: "\n" in self.output(banner=True) or self.process.poll() is not None,
            "the banner",
        )
        match = re.search(r"serving on [^ ]+:(\d+)", self.output(banner=True))
        if not match:
            self.process.kill()
            raise AssertionError(
                f"server did not start: {self.output(banner=True)!r} {self.stderr()!r}"
            )
        self.port = int(match.group(1))

    def output(self, banner: bool = False) -> str:
        """What the server wrote to stdout so far, after its banner unless banner is true."""
        text = os.pread(self.stdout.fileno(), 1 << 30, 0).decode(errors="backslashreplace")
        return text if banner else text.partition("\n")[2]

    def stderr(self) -> str:
        return os.pread(self.stderr_file.fileno(), 1 << 30, 0).decode(errors="backslashreplace")

    def events(self, name: str | None = None, **fields: Any) -> list[dict[str, Any]]:
        """Logged events (of a server run with --log-format json) called name, with these
        fields."""
        events = [json.loads(line) for line in self.output().splitlines() if line.startswith("{")]
        return [
            event
            for event in events
            if name in (None, event["event"])
            and all(event.get(key) == value for key, value in fields.items())
        ]

    def wait_for_event(self, name: str, **fields: Any) -> dict[str, Any]:
        """The first such event, once it is logged."""
        wait_until(lambda: self.events(name, **fields), f"event {name!r} with {fields}")
        return self.events(name, **fields)[0]

    def handlers(self) -> list[int]:
        """The server's live children: its handler processes."""
        return [row.pid for row in process_table() if row.ppid == self.pid and row.state != "Z"]

    def wait_until_idle(self) -> None:
        """Wait until the server is its session's only live process: every handler and worker
        gone."""
        wait_until(
            lambda: session_processes(self.pid) == [self.pid], "the server's children to exit"
        )

    def connect(self) -> socket.socket:
        return connect(self.port)

    def request(self, payload: bytes) -> bytes:
        return request(self.port, payload)

    def stop(self, signum: signal.Signals = signal.SIGTERM) -> int:
        """Send signum (unless it has exited), wait, and return the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signum)
        return wait_for_exit(self.process, EXIT_TIMEOUT_S)

    def cleanup(self, signalled: bool = False) -> None:
        """Stop the server (if signalled, the caller has sent it SIGTERM: only wait for it) and
        make sure nothing of its session outlives it."""
        try:
            if signalled:
                wait_for_exit(self.process, EXIT_TIMEOUT_S)
            else:
                self.stop()
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        # Processes of the session may take a moment to finish exiting after the server.
        leftovers: list[int] = []
        try:
            wait_until(
                lambda: not session_processes(self.pid),
                "the server's session to end",
                timeout_s=2.0,
            )
        except AssertionError:
            leftovers = session_processes(self.pid)
            for pid in leftovers:
                os.kill(pid, signal.SIGKILL)
        finally:
            self.stdout.close()
            self.stderr_file.close()
        assert not leftovers, f"processes outlived the server: {leftovers}"


StartServer = Callable[..., ServerProcess]  # conftest.py's start_server fixture
StartServers = Callable[..., list[ServerProcess]]  # and its start_servers


def run_python(*args: str, stdin: bytes = b"", **options: Any) -> subprocess.CompletedProcess[str]:
    """Run `python *args` in the checkout to completion (options go to subprocess.run, cwd
    among them); stdout and stderr decoded, newlines untouched."""
    command = [sys.executable, *args]
    result = subprocess.run(
        command,
        input=stdin,
        capture_output=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        check=False,
        **{"cwd": ROOT, **options},
    )
    return subprocess.CompletedProcess(
        command, result.returncode, result.stdout.decode(), result.stderr.decode()
    )


def run_client(*args: str, stdin: bytes = b"", **options: Any) -> subprocess.CompletedProcess[str]:
    """Run client.py to completion, as run_python runs a command."""
    return run_python(str(ROOT / "client.py"), *args, stdin=stdin, **options)
