"""Faults the tests install in a server process (through tests/launch.py), to drive it into
states that real work reaches only by chance or by time: a worker that waits for the test,
hangs, dies, cannot be started, a handler that has not yet run, a connection lost as the
server accepts it, or a listening socket inherited from a process manager.
"""

from __future__ import annotations

import errno
import os
import resource
import signal
import socket
import tempfile
import time
from multiprocessing import connection, popen_fork

import fastpath
from client import reset_on_close


def scripted_lines(_: str) -> None:
    """Lines that script a worker; every other line is evaluated as usual.

    ``gate PATH``       create PATH.waiting, then wait until the test creates PATH; 'released'
    ``sleep SECONDS``   wait that long, using no CPU; result 'slept'
    ``spin SECONDS``    work that long, using the CPU; result 'spun'
    ``hang-once PATH``  hang until killed if PATH does not exist (creating it); else 'resumed'
    ``die-once PATH``   exit at once if PATH does not exist (creating it); else 'resumed'
    ``count PATH``      append a byte to PATH, so the test can count evaluations; 'counted'
    """
    evaluate = fastpath.evaluate_line

    def scripted(line: str) -> str:
        command, _, argument = line.partition(" ")
        if command == "gate":
            open(f"{argument}.waiting", "w").close()
            wait_for(argument)
            return "released"
        if command == "sleep":
            time.sleep(float(argument))
            return "slept"
        if command == "spin":
            deadline = time.process_time() + float(argument)
            while time.process_time() < deadline:
                pass
            return "spun"
        if command in ("hang-once", "die-once") and not os.path.exists(argument):
            open(argument, "w").close()
            if command == "die-once":
                os._exit(1)
            signal.pause()
        if command in ("hang-once", "die-once"):
            return "resumed"
        if command == "count":
            with open(argument, "ab") as counter:
                counter.write(b".")
            return "counted"
        return evaluate(line)

    # Before bluserver is imported: its workers' evaluator is fastpath's, as it is then.
    fastpath.evaluate_line = scripted


def failing_worker_starts(times: str) -> None:
    """The first `times` worker starts of each handler fail as fork() does when out of
    processes."""
    launch = popen_fork.Popen._launch
    failures_left = [int(times)]

    def failing_launch(self: popen_fork.Popen, process_object: object) -> None:
        if failures_left[0] > 0:
            failures_left[0] -= 1
            raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        launch(self, process_object)  # type: ignore[arg-type]

    popen_fork.Popen._launch = failing_launch  # type: ignore[method-assign]


def file_size_limit(size: str) -> None:
    """The server and its children may write no file past size bytes (RLIMIT_FSIZE): a results file
    write past it fails with EFBIG, as on a full disk.  The server's logs go to the test's files:
    keep them short."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(size), int(size)))


def missing_temporary_directory(path: str) -> None:
    """tempfile's directory is path, which does not exist (removed while the server runs): a
    results file cannot be created there."""
    tempfile.tempdir = path


def dying_before_end_of_slice(_: str) -> None:
    """A worker exits after it has sent all its results, before it says it is done."""
    send_bytes = connection.Connection.send_bytes

    def send_or_die(
        sender: connection.Connection, message: bytes, offset: int = 0, size: int | None = None
    ) -> None:
        if message == b"":  # worker.END_OF_SLICE: only workers send on a Pipe
            os._exit(1)
        send_bytes(sender, message, offset, size)

    connection.Connection.send_bytes = send_or_die  # type: ignore[method-assign]


def gated_handlers(path: str) -> None:
    """Each handler waits, before it does anything, until the test creates the file at path."""
    # Imported here: the faults before it must be in place when it imports worker.
    import lesson  # noqa: PLC0415

    setup = lesson.RequestHandler.setup

    def gated_setup(self: lesson.RequestHandler) -> None:
        wait_for(path)
        setup(self)

    lesson.RequestHandler.setup = gated_setup  # type: ignore[method-assign]


def wait_for(path: str) -> None:
    """Return once the file at path exists (the test's signal to go on)."""
    while not os.path.exists(path):
        time.sleep(0.01)


def failing_forks(times: str) -> None:
    """The first `times` os.fork() calls of the server fail as fork() does when out of processes
    (EAGAIN: RLIMIT_NPROC, a full process table); the processes it forks after inherit no
    failures left."""
    fork = os.fork
    failures_left = [int(times)]

    def failing_fork() -> int:
        if failures_left[0] > 0:
            failures_left[0] -= 1
            raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        return fork()

    os.fork = failing_fork


def failing_worker_forks(times: str) -> None:
    """In each handler, the first `times` os.fork() calls (its workers') fail as fork() does
    when out of processes, after multiprocessing has opened the pipes it forks with."""
    # Imported here: the faults before it must be in place when it imports worker.
    import lesson  # noqa: PLC0415

    setup = lesson.RequestHandler.setup

    def setup_then_fail_forks(self: lesson.RequestHandler) -> None:
        setup(self)
        failing_forks(times)

    lesson.RequestHandler.setup = setup_then_fail_forks  # type: ignore[method-assign]


def aborted_accept(number: str) -> None:
    """The server's accept() number `number` (counting from 1) takes its connection, resets it,
    and fails as accept() does for a connection aborted before the server took it
    (ECONNABORTED; Linux passes a new connection's network errors, EPROTO and others, the
    same way): its client sees a reset."""
    accept = socket.socket.accept
    accepted = [0]

    def aborting_accept(listener: socket.socket) -> tuple[socket.socket, object]:
        connection, address = accept(listener)
        accepted[0] += 1
        if accepted[0] != int(number):
            return connection, address
        reset_on_close(connection)
        connection.close()
        raise ConnectionAbortedError(errno.ECONNABORTED, os.strerror(errno.ECONNABORTED))

    socket.socket.accept = aborting_accept  # type: ignore[method-assign,assignment]


def inherited_listener(path: str) -> None:
    """A listening socket on 127.0.0.1 open in the server from its start, as a process manager
    leaves one (circus hands each process every socket it holds); its port is written to
    path.  Its descriptor belongs to no Python object: only the server may close it."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.detach()
    with open(path, "w") as port_file:
        port_file.write(str(port))
