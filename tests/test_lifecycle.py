"""Lifecycle: how the server starts, stops and restarts without losing a request.

Starting: on an IPv4 or IPv6 address, or on a listening socket handed to it (systemd's
socket activation, or --fd, closing every other listening socket it inherited), and telling
its service manager when it serves (sd_notify).  Stopping: the backlog is served, two
signals are two, a connection still silent is not waited for, and a process killed outright
takes its children with it.  Under pressure: a fork of a handler that fails is retried, and
refused once a drain has failed to fork for a while; a connection that sends nothing holds
no handler; a connection lost at any step of being accepted is logged, never fatal.
Every test runs real servers (conftest.start_server) on a loopback address, logging one JSON
object per line, and waits for logged events or for /proc to show a state.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from client import recv_frame, reset_on_close, send_frame
from tests.harness import (
    EVENT_TIMEOUT_S,
    LOG,
    SCRIPTED,
    StartServer,
    connect,
    process_table,
    run_client,
    run_python,
    session_processes,
    wait_for_exit,
    wait_until,
)

LOOPBACK_HEX = "0100007F"  # 127.0.0.1 as /proc/net/tcp shows it (little-endian hosts)
TCP_LISTEN = "0A"  # the LISTEN state in /proc/net/tcp


def accept_queue_length(port: int) -> int:
    """Connections the kernel has accepted for 127.0.0.1:port that wait for the server to take
    them: for a listening socket, /proc/net/tcp shows that count as its rx_queue."""
    for row in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = row.split()
        if fields[1] == f"{LOOPBACK_HEX}:{port:04X}" and fields[3] == TCP_LISTEN:
            return int(fields[4].split(":")[1], 16)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


def signal_pending(pid: int, signum: signal.Signals) -> bool:
    """Whether signum, sent to process pid, still waits to be delivered (/proc/PID/status: ShdPnd,
    a hexadecimal mask of the signals pending for the whole process; bit n-1 is signal n)."""
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        if row.startswith("ShdPnd:"):
            return bool(int(row.split()[1], 16) >> (signum - 1) & 1)
    raise AssertionError(f"no ShdPnd for process {pid}")


@contextlib.contextmanager
def connections(port: int, count: int) -> Iterator[list[socket.socket]]:
    """count connections to 127.0.0.1:port, closed at the end."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(connect(port)) for _ in range(count)]


def reset(sock: socket.socket) -> None:
    """Close sock with a reset (RST), as a client that has gone does."""
    reset_on_close(sock)
    sock.close()


def alive(pid: int) -> bool:
    """Whether process pid runs (a zombie has ended)."""
    return any(row.pid == pid and row.state != "Z" for row in process_table())


def children(pid: int) -> list[int]:
    """The live children of process pid."""
    return [row.pid for row in process_table() if row.ppid == pid and row.state != "Z"]


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A listening socket on 127.0.0.1, held by the test as systemd holds a .socket unit's."""
    with socket.create_server(("127.0.0.1", 0), backlog=socket.SOMAXCONN) as sock:
        yield sock


# --- Stopping. -----------------------------------------------------------------------------------


def test_requests_waiting_in_the_backlog_at_shutdown_are_all_served(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = start_server(*LOG, "--max-children", "1", **SCRIPTED)
    gate = tmp_path / "gate"
    with connections(server.port, 6) as (in_flight, *waiting):
        send_frame(in_flight, [f"gate {gate}\n".encode()])
        server.wait_for_event("Worker started")
        for number, sock in enumerate(waiting):
            send_frame(sock, [f"{number} + 1\n".encode()])
        wait_until(lambda: accept_queue_length(server.port) == 5, "five requests in the backlog")
        server.process.send_signal(signal.SIGTERM)
        assert server.wait_for_event("Shutting down")["connections_waiting"] == 5
        gate.touch()
        replies = [recv_frame(sock) for sock in (in_flight, *waiting)]
    assert replies == [b"released\n", b"1\n", b"2\n", b"3\n", b"4\n", b"5\n"]
    assert wait_for_exit(server.process, EVENT_TIMEOUT_S) == 0


@pytest.mark.parametrize(
    "max_children", ["1", "16"], ids=["max-children-running", "a-handler-free-to-start"]
)
def test_second_signal_after_the_first_is_delivered_ends_every_handler_and_worker_with_status_1(
    start_server: StartServer, tmp_path: Path, max_children: str
) -> None:
    server = start_server(*LOG, "--max-children", max_children, **SCRIPTED)
    with server.connect() as sock:
        send_frame(sock, [f"gate {tmp_path / 'gate'}\n1 + 1\n".encode()])  # never released
        server.wait_for_event("Worker started", worker="worker-1")  # a small request's only worker
        os.kill(server.pid, signal.SIGTERM)
        # Not sooner: two signals of a kind pending at once are one for the kernel itself.
        wait_until(lambda: not signal_pending(server.pid, signal.SIGTERM), "the first delivered")
        os.kill(server.pid, signal.SIGTERM)
        assert wait_for_exit(server.process, EVENT_TIMEOUT_S) == 1
        with pytest.raises(ConnectionError):  # closed without a reply
            recv_frame(sock)
    wait_until(
        lambda: not session_processes(server.pid), "the killed handler and workers to be gone"
    )
    server_events = [
        (event["event"], event.get("signal")) for event in server.events(pname="server")
    ]
    assert server_events[-2:] == [("Shutting down", "SIGTERM"), ("Stopped at once", "SIGTERM")]


def test_workers_of_a_handler_killed_outright_are_killed_with_it(
    start_server: StartServer,
) -> None:
    server = start_server(*LOG, **SCRIPTED)
    with server.connect() as sock:
        send_frame(sock, [b"sleep 600\n"])  # a slow line: its worker sleeps
        worker = server.wait_for_event("Worker started")["worker_pid"]
        (handler,) = server.handlers()
        os.kill(handler, signal.SIGKILL)
        wait_until(lambda: not alive(worker), "the worker to die with its handler")
    assert server.request(b"1 + 1\n") == b"2\n"


def test_handler_and_workers_of_a_server_killed_outright_are_killed_with_it(
    start_server: StartServer,
) -> None:
    server = start_server(*LOG, **SCRIPTED)
    with server.connect() as sock:
        send_frame(sock, [b"sleep 600\n"])
        server.wait_for_event("Worker started")
        server.process.kill()
        wait_until(
            lambda: not session_processes(server.pid), "the handler and worker to die with it"
        )


def test_connection_still_silent_when_the_drain_begins_is_reset_when_it_sends(
    start_server: StartServer,
) -> None:
    # As README's "Signals" says: deferred accept keeps it from the backlog the drain takes,
    # and closing the listener resets it.
    server = start_server(*LOG)
    with server.connect() as silent:
        server.process.send_signal(signal.SIGTERM)
        server.wait_for_event("Shutting down")  # logged once the listener is closed
        with pytest.raises(ConnectionError):
            send_frame(silent, [b"1 + 1\n"])
            recv_frame(silent)
    assert wait_for_exit(server.process, EVENT_TIMEOUT_S) == 0


def test_connection_still_silent_when_a_drain_begins_on_a_handed_socket_is_served_next(
    start_server: StartServer, listener: socket.socket
) -> None:
    first = start_server(*LOG, listener=listener)
    with first.connect() as silent:
        assert first.stop() == 0
        send_frame(silent, [b"1 + 1\n"])  # no server runs: it waits in the socket's backlog
        start_server(*LOG, listener=listener)
        assert recv_frame(silent) == b"2\n"


def test_connection_lost_as_the_drain_takes_the_backlog_is_logged_and_the_rest_served(
    start_server: StartServer, tmp_path: Path
) -> None:
    # The second accept is the drain's first: that connection is lost as it is taken.
    faults = ["scripted_lines", "aborted_accept:2"]
    server = start_server(*LOG, "--max-children", "1", faults=faults)
    gate = tmp_path / "gate"
    with connections(server.port, 4) as (in_flight, lost, *waiting):
        send_frame(in_flight, [f"gate {gate}\n".encode()])
        server.wait_for_event("Worker started")
        for number, sock in enumerate((lost, *waiting)):
            send_frame(sock, [f"{number} + 1\n".encode()])
        wait_until(lambda: accept_queue_length(server.port) == 3, "three requests in the backlog")
        server.process.send_signal(signal.SIGTERM)
        assert server.wait_for_event("Shutting down")["connections_waiting"] == 2
        gate.touch()
        assert [recv_frame(sock) for sock in (in_flight, *waiting)] == [
            b"released\n",
            b"2\n",
            b"3\n",
        ]
        with pytest.raises(ConnectionError):
            recv_frame(lost)
    assert wait_for_exit(server.process, EVENT_TIMEOUT_S) == 0
    aborted = f"[Errno {errno.ECONNABORTED}] {os.strerror(errno.ECONNABORTED)}"
    assert server.events("Connection not accepted")[0]["reason"] == aborted


def test_connection_reset_before_its_refusal_at_a_drain_is_logged_and_the_drain_ends(
    start_server: StartServer,
) -> None:
    server = start_server(*LOG, faults=["failing_forks:1000000"])  # none will be forked
    with server.connect() as sock:
        send_frame(sock, [b"1 + 1\n"])
        server.wait_for_event("Handler not started")
        reset(sock)
    server.process.send_signal(signal.SIGTERM)
    assert wait_for_exit(server.process, EVENT_TIMEOUT_S) == 0
    assert server.events("Connections refused")[0]["connections"] == 1
    assert server.events("Client failed", pname="server")[0]["reason"].startswith(
        ("gone before its refusal", "refusal not sent")
    )
    assert "Traceback" not in server.stderr()


def test_drain_that_cannot_fork_a_handler_refuses_the_connections_waiting_and_ends(
    start_server: StartServer,
) -> None:
    server = start_server(*LOG, faults=["failing_forks:1000000"])  # none will be forked
    with server.connect() as sock:
        send_frame(sock, [b"1 + 1\n"])
        server.wait_for_event("Handler not started")
        server.process.send_signal(signal.SIGTERM)
        cause = os.strerror(errno.EAGAIN)
        refusal = f"error: server cannot start a handler ({cause}); try again later\n"
        assert recv_frame(sock) == refusal.encode()
    assert wait_for_exit(server.process, EVENT_TIMEOUT_S) == 0
    assert server.events("Connections refused")[0]["connections"] == 1


# --- Starting on an address, or on a socket handed over, and telling the service manager. --------


@pytest.mark.parametrize("address", ["127.0.0.1", "::1"], ids=["IPv4", "IPv6"])
def test_server_serves_on_the_loopback_address_of_either_family(
    start_server: StartServer, address: str
) -> None:
    server = start_server("-a", address)  # after the harness's -a 127.0.0.1: this one counts
    result = run_client("-", "-", "-a", address, "-p", str(server.port), stdin=b"1 + 1\n")
    assert (result.returncode, result.stdout) == (0, "2\n")


def test_server_serves_the_listening_socket_open_at_the_fd_it_is_given(
    start_server: StartServer, listener: socket.socket
) -> None:
    # The listener at fd 3, as the harness hands it, without socket activation's variables:
    # as a process manager such as circus hands one over.
    unset = ["env", "-u", "LISTEN_PID", "-u", "LISTEN_FDS"]
    server = start_server(
        *LOG, "--fd", "3", listener=listener, command=[*unset, sys.executable, "bluserver.py"]
    )
    assert server.port == listener.getsockname()[1]
    assert server.request(b"1 + 1\n") == b"2\n"


@pytest.mark.parametrize(
    ("fd", "complaint"),
    [("99", os.strerror(errno.EBADF)), ("0", os.strerror(errno.ENOTSOCK))],
    ids=["not-open", "not-a-socket"],
)
def test_fd_that_is_no_listening_socket_is_one_line_and_exit_1(fd: str, complaint: str) -> None:
    result = run_python("bluserver.py", "--fd", fd)  # its stdin (fd 0) is a pipe
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == f"bluserver: --fd {fd}: {complaint}\n"


def test_server_on_a_handed_fd_closes_every_other_listening_socket_it_inherited(
    start_server: StartServer, listener: socket.socket, tmp_path: Path
) -> None:
    # As circus starts each process: its own socket at --fd, every other one inherited too.
    port_file = tmp_path / "port"
    unset = ["env", "-u", "LISTEN_PID", "-u", "LISTEN_FDS"]
    server = start_server(
        *LOG,
        "--fd",
        "3",
        listener=listener,
        faults=[f"inherited_listener:{port_file}"],
        command=[*unset, sys.executable, "tests/launch.py"],
    )
    with pytest.raises(ConnectionRefusedError):  # nothing listens on it any more
        connect(int(port_file.read_text()))
    assert server.request(b"1 + 1\n") == b"2\n"


def test_server_serves_the_listening_socket_it_is_handed(
    start_server: StartServer, listener: socket.socket
) -> None:
    server = start_server(*LOG, listener=listener)
    assert server.port == listener.getsockname()[1]
    assert server.request(b"1 + 1\n") == b"2\n"


def test_requests_sent_between_two_servers_on_a_handed_socket_are_answered_by_the_second(
    start_server: StartServer, listener: socket.socket
) -> None:
    first = start_server(*LOG, listener=listener)
    assert first.stop() == 0
    port = listener.getsockname()[1]
    with connections(port, 3) as queued:  # no server runs: they wait in the socket's backlog
        for number, sock in enumerate(queued):
            send_frame(sock, [f"{number} * 10\n".encode()])
        start_server(*LOG, listener=listener)
        assert [recv_frame(sock) for sock in queued] == [b"0\n", b"10\n", b"20\n"]


def test_handed_socket_defers_accepting_until_a_client_has_sent_something(
    start_server: StartServer, listener: socket.socket
) -> None:
    start_server(listener=listener)
    # --client-timeout's 30 s, which the kernel rounds up to its retransmission steps: 31 s.
    assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) == 31


def test_socket_meant_for_another_process_is_ignored_and_the_server_binds_its_own(
    start_server: StartServer,
) -> None:
    # LISTEN_PID names the process the sockets are for: here not the server (pid 1 is init).
    server = start_server(env={"LISTEN_PID": "1", "LISTEN_FDS": "1"})
    assert server.request(b"1 + 1\n") == b"2\n"


def test_server_tells_its_service_manager_when_it_serves_and_when_it_stops(
    start_server: StartServer, tmp_path: Path
) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(path)
        notify.settimeout(EVENT_TIMEOUT_S)
        server = start_server(env={"NOTIFY_SOCKET": path})
        assert notify.recv(1024) == b"READY=1"
        assert server.stop() == 0
        assert notify.recv(1024) == b"STOPPING=1"


# --- Under pressure: out of processes, idle connections. -----------------------------------------


def test_handler_that_cannot_be_forked_is_forked_again_and_the_request_served(
    start_server: StartServer,
) -> None:
    server = start_server(*LOG, faults=["failing_forks:2"])
    assert server.request(b"1 + 1\n") == b"2\n"
    warnings = [event for event in server.events() if event["level"] == "WARNING"]
    assert [(event["event"], event["reason"]) for event in warnings] == [
        (
            "Handler not started",
            f"cannot start: [Errno {errno.EAGAIN}] {os.strerror(errno.EAGAIN)}",
        )
    ]
    assert "Traceback" not in server.stderr()


def test_connection_that_sends_nothing_holds_no_handler(start_server: StartServer) -> None:
    server = start_server(*LOG, "--max-children", "1")
    with server.connect(), server.connect() as sock:  # the first one sends nothing
        send_frame(sock, [b"1 + 1\n"])
        assert recv_frame(sock) == b"2\n"
        server.wait_until_idle()  # while the silent connection is open: no handler holds it


def test_connection_reset_in_the_backlog_past_deferred_accept_is_logged_and_the_server_serves_on(
    start_server: StartServer, tmp_path: Path
) -> None:
    # At max_children, a connection silent past --client-timeout leaves deferred accept for
    # the backlog, where it is reset: the server takes it once a handler is free to start.
    server = start_server(*LOG, "--max-children", "1", "--client-timeout", "1", **SCRIPTED)
    gate = tmp_path / "gate"
    with server.connect() as in_flight:
        send_frame(in_flight, [f"gate {gate}\n".encode()])
        server.wait_for_event("Worker started")
        silent = server.connect()
        wait_until(lambda: accept_queue_length(server.port) == 1, "it to leave deferred accept")
        reset(silent)
        gate.touch()
        assert recv_frame(in_flight) == b"released\n"
    failed = server.wait_for_event("Client failed", pname="server")
    reset_by_peer = f"[Errno {errno.ECONNRESET}] {os.strerror(errno.ECONNRESET)}"
    assert failed["reason"] == f"gone before it was served: {reset_by_peer}"
    assert server.request(b"1 + 1\n") == b"2\n"


def test_connection_lost_as_the_server_accepts_it_is_logged_and_the_next_served(
    start_server: StartServer,
) -> None:
    server = start_server(*LOG, faults=["aborted_accept:1"])
    with server.connect() as lost:
        send_frame(lost, [b"1 + 1\n"])
        with pytest.raises(ConnectionError):
            recv_frame(lost)
    assert server.request(b"2 + 2\n") == b"4\n"
    aborted = f"[Errno {errno.ECONNABORTED}] {os.strerror(errno.ECONNABORTED)}"
    assert server.events("Connection not accepted")[0]["reason"] == aborted


def test_connection_silent_for_the_client_timeout_is_closed_without_a_handler(
    start_server: StartServer,
) -> None:
    server = start_server(*LOG, "--client-timeout", "1")
    with server.connect() as silent:
        assert silent.recv(1) == b"", "the server must close a connection that sends nothing"
    dropped = server.wait_for_event("Client failed")
    assert dropped["pname"] == "server"
