"""The functions one small request passes through, per process: ``make trace``.

``python -m tools.trace [lesson|server]`` (both without an argument) starts a server on
127.0.0.1 and a free port, sends it one request of four lines (REQUEST_LINES) with client.py,
stops it with SIGINT, and prints, for each process the request ran in (client, server,
handler, worker-1), the project functions it called: the first call of each, in order, as
``module:qualname``, and how many there are.  ``lesson`` is the lesson alone (LESSON), ``server``
the server people run (``bluserver.py``).  It is the README's reading route, checked by a
tool: tests/test_trace.py holds the trace to the six hops.

A project function is a function (or method) defined in one of the checkout's runtime modules:
every ``*.py`` at its top but ``test_*.py`` and ``conftest.py``.  Module-level code, class
bodies, lambdas and comprehensions are not functions a reader names, and are left out.

How every process is traced.  The server runs under this module's launcher
(``python -m tools.trace run server LOG SCRIPT ARGS``), which installs a profile function
(``sys.setprofile``; a call trace, not coverage) and runs SCRIPT as ``__main__`` in the same
process.  The handlers and workers are forked from it (socketserver's ForkingMixIn, and
multiprocessing's fork context), and a forked process keeps its parent's profile function, so
they are traced too.  Each record is appended to LOG through a file opened by path for that
record alone, in one write: the worker closes every file descriptor it inherited
(worker.close_inherited_files), and several processes append at once.  A process is named
by ``multiprocessing.current_process().name``, which the code sets ("handler", "worker-N")
and which a handler takes only in setup: so a process is named by its last record, and the
launcher's own process by its role ("server", "client").  The client runs under the same
launcher, as a process of its own.

What is counted: the request, not start-up and stop.  The handler and the workers live only
for the request, and the client is the request, so all their calls count (the client's
import-time code calls no project function).  The server process also imports, parses its
command line, listens and, after SIGINT, drains: its part of the request is its loop.  So the
launcher logs, as a marker, each call that the server process makes of ``selectors``'
``select`` (where both loops wait, socketserver's and serving.py's), with the project
functions it waits in.  The client starts once the server's last record is that marker: the
server waits for a connection.  The server's trace is the functions it waited in then, and
the calls it made after; it ends once the server has reaped the handler and its last record
is the marker again, where the log's size is taken before SIGINT.  No moment is a time read
from a clock, so a slow machine gives the same trace.

Before Python 3.11 a code object has no qualified name (``co_qualname``): a method is then
named without its class, and the methods of one name in one module count as one.
"""

from __future__ import annotations

import argparse
import inspect
import multiprocessing
import os
import runpy
import selectors
import signal
import sys
import tempfile
import textwrap
from collections.abc import Sequence
from pathlib import Path
from types import CodeType, FrameType
from typing import NamedTuple

from tests.harness import ROOT, ServerProcess, process_table, run_python, wait_until

# The lesson alone, run as a program with its own command line (-a -p -n -v).
LESSON = "lesson.py"
SERVER = "bluserver.py"  # the server people run
TARGETS = {"lesson": LESSON, "server": SERVER}
WORKERS = 2  # -n: the request is one slice (under 32 KiB), so one worker runs
REQUEST_LINES = ("1 + 2", "2 ** -1", "1/0", "(1 + 2) * 3")  # a result, a float, an error
WAITING = "(waits in select)"  # the marker the server process logs where it waits
SIDES = ("client", "server", "handler")  # the order processes are shown in; then the workers
WIDTH = 99


# === The launcher: runs a script with every project function call logged ====================


def runtime_files(root: Path) -> set[str]:
    """The paths of the checkout's runtime modules: every *.py at its top but the tests."""
    return {
        str(path.resolve())
        for path in root.glob("*.py")
        if not path.name.startswith("test_") and path.name != "conftest.py"
    }


class CallLog:
    """The profile function of a traced process and of every process forked from it: appends
    a record (pid, process name, module:qualname) to the log for each call of a project
    function, and the WAITING marker for each select() of the launcher's own process."""

    def __init__(self, log: str, role: str) -> None:
        self.log = log
        self.role = role  # the launcher's own process: "server" or "client"
        self.launcher_pid = os.getpid()  # its forks have other pids
        self.project = runtime_files(ROOT)
        self.selectors_file = os.path.realpath(selectors.__file__)
        # Per code object: its label, or None for what is not logged.  A profile function
        # sees every call of every function, the standard library's included: this keeps
        # the cost of those to one lookup.
        self.labels: dict[CodeType, str | None] = {}

    def __call__(self, frame: FrameType, event: str, arg: object) -> None:
        if event != "call":  # a return, or a call of a function written in C
            return
        label = self.labelled(frame.f_code)
        if label == WAITING:
            self.waits(frame)
        elif label is not None:
            self.append(label, "")

    def labelled(self, code: CodeType) -> str | None:
        """code's label (see label), worked out once."""
        if code not in self.labels:
            self.labels[code] = self.label(code)
        return self.labels[code]

    def label(self, code: CodeType) -> str | None:
        """module:qualname for a project function, WAITING for select(), else None."""
        path = os.path.realpath(code.co_filename)
        if path == self.selectors_file and code.co_name == "select":
            return WAITING
        if path not in self.project or code.co_name.startswith("<"):  # <lambda>, <genexpr>
            return None
        if not code.co_flags & inspect.CO_OPTIMIZED:  # a module's code, a class body
            return None
        qualname = getattr(code, "co_qualname", code.co_name)  # co_qualname: Python 3.11+
        return f"{Path(path).stem}:{qualname}"

    def waits(self, frame: FrameType) -> None:
        """The WAITING marker, with the project functions the process waits in (outermost
        first): the server's loop, which a connection wakes."""
        if os.getpid() != self.launcher_pid:  # a handler waits on its workers
            return
        stack = []
        caller = frame.f_back
        while caller:
            label = self.labelled(caller.f_code)
            if label is not None:
                stack.append(label)
            caller = caller.f_back
        self.append(WAITING, " ".join(reversed(stack)))

    def append(self, label: str, stack: str) -> None:
        pid = os.getpid()
        process = self.role if pid == self.launcher_pid else multiprocessing.current_process().name
        # Opened for this record alone: a worker closes every file descriptor it inherited.
        # One write with O_APPEND: the records of processes writing at once never mix.
        log = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(log, f"{pid}\t{process}\t{label}\t{stack}\n".encode())
        finally:
            os.close(log)


def run_traced(role: str, log: str, script: str, args: Sequence[str]) -> None:
    """Run script with args as ``python script args`` would, in this process, every call of a
    project function logged to log (and so in every process forked from it)."""
    sys.argv = [script, *args]
    sys.path[0] = str(Path(script).resolve().parent)  # as python puts the script's folder
    sys.setprofile(CallLog(log, role))
    runpy.run_path(script, run_name="__main__")


# === The driver: one request to a traced server ===========================================


class Record(NamedTuple):
    offset: int  # where the record starts in the log: the order of the records of all processes
    pid: int
    process: str
    label: str  # module:qualname, or WAITING
    stack: str  # for WAITING, the project functions it waits in, outermost first


class Process(NamedTuple):
    name: str  # client, server, handler, worker-1, ...
    pid: int
    functions: list[str]  # module:qualname, first calls in order


class Trace(NamedTuple):
    target: str
    command: str
    processes: list[Process]
    reply: str


def read_log(log: Path) -> list[Record]:
    records = []
    offset = 0
    for line in log.read_bytes().splitlines(keepends=True):
        pid, process, label, stack = line.decode().rstrip("\n").split("\t")
        records.append(Record(offset, int(pid), process, label, stack))
        offset += len(line)
    return records


def waiting(log: Path, server_pid: int) -> bool:
    """Whether the server process's last record says it waits in select()."""
    if not log.exists():
        return False
    labels = [record.label for record in read_log(log) if record.pid == server_pid]
    return bool(labels) and labels[-1] == WAITING


def alone(server_pid: int) -> bool:
    """Whether the server is its session's only process, zombies included: every handler has
    ended and been reaped."""
    return [row.pid for row in process_table() if row.session == server_pid] == [server_pid]


def trace(target: str) -> Trace:
    """Start the target's server, traced; once it waits for a connection, send one request
    with client.py, traced; once the server has reaped the handler and waits again, stop it
    with SIGINT; return each process's first calls."""
    command = TARGETS[target]
    with tempfile.TemporaryDirectory() as directory:
        log = Path(directory) / "calls.log"
        launcher = [sys.executable, "-m", "tools.trace", "run", "server", str(log), command]
        server = ServerProcess(["-n", str(WORKERS), "-v"], command=launcher)
        try:
            wait_until(lambda: waiting(log, server.pid), "the server to wait for a connection")
            reply = send_request(log, server.port)
            wait_until(
                lambda: alone(server.pid) and waiting(log, server.pid),
                "the handler to be reaped and the server to wait again",
            )
            stopped_at = log.stat().st_size  # what the server logs from now on is its stop
            server.stop(signal.SIGINT)
        finally:
            server.cleanup()
        records = [record for record in read_log(log) if record.offset < stopped_at]
    return Trace(target, command, processes(records, server.pid), reply)


def send_request(log: Path, port: int) -> str:
    """Send REQUEST_LINES with client.py, traced; return the reply."""
    client = ["-m", "tools.trace", "run", "client", str(log), str(ROOT / "client.py")]
    request = "".join(f"{line}\n" for line in REQUEST_LINES).encode()
    result = run_python(*client, "-a", "127.0.0.1", "-p", str(port), "-", "-", stdin=request)
    if result.returncode:
        raise SystemExit(f"trace: the client failed: {result.stderr.strip()}")
    return result.stdout


def processes(records: list[Record], server_pid: int) -> list[Process]:
    """Each process's first calls, in order; a process is named by its last record (a handler
    has its parent's name until setup).  The server's begin where it waited when the client
    started: with the functions it waited in, then its calls."""
    names = {server_pid: "server"}
    functions = {server_pid: server_calls(records, server_pid)}
    for record in records:
        if record.pid != server_pid:
            names[record.pid] = record.process
            add_new(functions.setdefault(record.pid, []), [record.label])
    found = [Process(names[pid], pid, calls) for pid, calls in functions.items()]
    return sorted(found, key=shown_order)


def server_calls(records: list[Record], server_pid: int) -> list[str]:
    """The server process's functions from its last wait before the client's first call."""
    client_starts = min(record.offset for record in records if record.process == "client")
    server = [record for record in records if record.pid == server_pid]
    waits = [record for record in server if record.label == WAITING]
    last_wait = [record for record in waits if record.offset < client_starts][-1]
    calls: list[str] = []
    add_new(calls, last_wait.stack.split())
    for record in server:
        if record.offset > last_wait.offset and record.label != WAITING:
            add_new(calls, [record.label])
    return calls


def add_new(calls: list[str], labels: list[str]) -> None:
    """Append those of labels that calls does not have yet."""
    for label in labels:
        if label not in calls:
            calls.append(label)


def shown_order(process: Process) -> tuple[int, str]:
    """client, server, handler, then the workers by name."""
    if process.name in SIDES:
        return (SIDES.index(process.name), "")
    return (len(SIDES), process.name)


# === What it prints =====================================================================


def report(trace: Trace) -> str:
    lines = [
        f"{trace.target}: {trace.command} -n {WORKERS}, one request of {len(REQUEST_LINES)} lines",
        f"  request: {' | '.join(REQUEST_LINES)}",
        f"  reply:   {' | '.join(trace.reply.splitlines())}",
    ]
    for process in trace.processes:
        heading = f"  {process.name} ({len(process.functions)})"
        if not process.functions:
            lines.append(heading)
            continue
        calls = " → ".join(process.functions)
        lines.append(
            textwrap.fill(
                calls,
                WIDTH,
                initial_indent=f"{heading}: ",
                subsequent_indent="      ",
                break_long_words=False,
                break_on_hyphens=False,
            )
        )
    return "\n".join(lines)


def summary(trace: Trace) -> str:
    """One line: the functions per process, their total and the server side's (every
    process but the client)."""
    counts = [f"{process.name} {len(process.functions)}" for process in trace.processes]
    total = sum(len(process.functions) for process in trace.processes)
    server_side = sum(
        len(process.functions) for process in trace.processes if process.name != "client"
    )
    return f"  {trace.target:<7} {', '.join(counts)}; total {total}, server side {server_side}"


def main(argv: Sequence[str] | None = None) -> None:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["run"]:  # the launcher: run ROLE LOG SCRIPT ARGS...
        run_traced(arguments[1], arguments[2], arguments[3], arguments[4:])
        return
    parser = argparse.ArgumentParser(
        prog="python -m tools.trace",
        description="Print the project functions one small request passes through, per "
        "process, for the lesson and for the server people run.",
    )
    parser.add_argument("target", nargs="?", choices=sorted(TARGETS), help="default: both")
    target = parser.parse_args(arguments).target
    traces = [trace(name) for name in ([target] if target else TARGETS)]
    for traced in traces:
        print(report(traced), end="\n\n")
    print("project functions first called, per process:")
    for traced in traces:
        print(summary(traced))


if __name__ == "__main__":
    main()
