"""Several bluserver instances behind HAProxy, in the foreground: ``make cluster``.

``python -m tools.cluster [-p PORT] [-i INSTANCES] [-n WORKERS]`` runs INSTANCES servers
(``bluserver.py -n WORKERS``) on 127.0.0.1:PORT+k, k = 1 ... INSTANCES, and HAProxy on PORT
with deploy/haproxy.cfg, its bind port and server lines rewritten for these instances
(``haproxy_config``; with the defaults the rewrite changes nothing).

It supervises them as systemd supervises the units in deploy/ (README, "As services"):

- It holds each instance's listening socket and hands it to the instance's process
  (``socket_activation``, systemd's protocol), so that while an instance restarts, its
  connections wait in the socket's backlog instead of being refused.
- A process serves once it has sent READY=1 to its instance's notify socket (sd_notify,
  as for ``Type=notify``).  HAProxy starts once every instance serves; the banner comes
  once HAProxy answers.
- An instance that exits or dies is started again after RESTART_DELAY_S, at most
  START_LIMIT_BURST times in START_LIMIT_INTERVAL_S (systemd's RestartSec= and
  StartLimitBurst=); past that it stays down and its socket is closed, so that HAProxy's
  connections to it are refused and go to the others.
- SIGHUP restarts the instances one at a time (gunicorn's HUP): a new process starts on
  the instance's socket, and once it serves, the old one gets SIGTERM and drains.  A
  closed terminal sends SIGHUP: the cluster restarts rather than being orphaned.
- The first SIGINT or SIGTERM drains everything (HAProxy's soft stop, SIGUSR1: it stops
  accepting and finishes its connections; SIGTERM to each server: it finishes its
  requests), a second one stops everything at once.

The children run in process groups of their own, so that Ctrl-C reaches only this
supervisor.  If HAProxy exits by itself, or an instance fails before the cluster first
serves, everything is stopped.  The exit status is 0 only if no instance was given up and
every process that the stopping signal found exited 0.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from client import HEADER, recv_exactly

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "deploy" / "haproxy.cfg"
HOST = "127.0.0.1"
DEFAULT_PORT = 1982
DEFAULT_INSTANCES = 3
DEFAULT_WORKERS = 2
STARTUP_TIMEOUT_S = 20.0  # for the cluster to serve, and for a new process to report ready
POLL_INTERVAL_S = 0.05  # how often the supervisor looks for signals and exited children
RESTART_DELAY_S = 0.1  # systemd's RestartSec= default: a crash loop costs little CPU
START_LIMIT_BURST = 5  # systemd's defaults: at most 5 starts of an instance in 10 s
START_LIMIT_INTERVAL_S = 10.0
LISTEN_FDS_START = 3  # systemd's protocol: the first socket handed over is fd 3
BIND_LINE = re.compile(r"^(\s*bind\s+\S*:)\d+", re.MULTILINE)
SERVER_LINE = re.compile(r"^\s*server\s.*\n", re.MULTILINE)

Process = subprocess.Popen[bytes]


def haproxy_config(template: str, port: int, instance_ports: Sequence[int]) -> str:
    """template with its bind port set to port and its server lines replaced by one per instance.

    Raises ValueError if template has not exactly one bind line or has no server line.
    """
    config, binds = BIND_LINE.subn(rf"\g<1>{port}", template)
    first_server = SERVER_LINE.search(config)
    if binds != 1 or not first_server:
        raise ValueError(
            f"{TEMPLATE} must have one 'bind ADDRESS:PORT' line and at least one 'server' line"
        )
    servers = "".join(
        f"    server blu{number} {HOST}:{instance_port}\n"
        for number, instance_port in enumerate(instance_ports, 1)
    )
    head = config[: first_server.start()]
    tail = config[first_server.start() :]
    return head + servers + SERVER_LINE.sub("", tail)


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


def answers_empty_request(port: int) -> bool:
    """Whether the server on port answers an empty request with an empty reply, as HAProxy
    checks."""
    try:
        with socket.create_connection((HOST, port), timeout=1.0) as sock:
            sock.sendall(HEADER.pack(0))
            return recv_exactly(sock, HEADER.size) == HEADER.pack(0)
    except OSError:
        return False


def report(message: str) -> None:
    """One line on stderr; none if the terminal has gone (the cluster serves on after SIGHUP)."""
    with contextlib.suppress(OSError):
        print(f"cluster: {message}", file=sys.stderr, flush=True)


class ClusterError(Exception):
    """The cluster cannot start: the message says why and what to do."""


class StartLimit:
    """systemd's StartLimitBurst= in StartLimitIntervalSec=: at most burst starts in interval_s."""

    def __init__(
        self, burst: int = START_LIMIT_BURST, interval_s: float = START_LIMIT_INTERVAL_S
    ) -> None:
        self.burst = burst
        self.interval_s = interval_s
        self.starts: list[float] = []  # monotonic times of the starts within the interval

    def allows_start(self, now: float) -> bool:
        """Whether one more start at now keeps within the limit."""
        self.starts = [start for start in self.starts if now - start < self.interval_s]
        return len(self.starts) < self.burst

    def record_start(self, now: float) -> None:
        self.starts.append(now)


def listening_socket(port: int) -> socket.socket:
    """A listening socket on HOST:port, for the supervisor to hold and hand to an instance.

    Raises ClusterError if the port cannot be used.
    """
    try:
        return socket.create_server((HOST, port), backlog=socket.SOMAXCONN)
    except OSError as error:
        raise ClusterError(f"cannot listen on {HOST}:{port}: {error.strerror} (try -p)") from None


def start_in_own_group(
    command: Sequence[str], hand_over: Callable[[], None] | None = None
) -> Process:
    """Start command in a process group of its own, so that Ctrl-C in the terminal does not
    reach it; hand_over, if given, runs in the child too (socket_activation)."""

    def in_child() -> None:
        os.setpgrp()
        if hand_over:
            hand_over()

    return subprocess.Popen(
        command,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        preexec_fn=in_child,  # noqa: PLW1509 - the supervisor starts no threads
        close_fds=not hand_over,  # fd 3 must reach the instance
    )


class Instance:
    """One bluserver of the cluster: its port, the listening and notify sockets the supervisor
    holds for it, and its processes: the one serving, and the one starting (to replace it in a
    rolling restart, or after it exited) until it reports READY=1."""

    def __init__(self, number: int, port: int, workers: int, notify_path: str) -> None:
        self.name = f"blu{number}"
        self.port = port
        self.command = [sys.executable, "bluserver.py", "-n", str(workers)]
        self.listener = listening_socket(port)
        self.notify_path = notify_path
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(notify_path)
        self.notify.setblocking(False)
        self.serving: Process | None = None
        self.starting: Process | None = None
        self.started_at = 0.0  # when starting was started
        self.restart_at: float | None = None  # when to start it again, after it exited
        self.start_limit = StartLimit()
        self.given_up = False

    def start(self) -> None:
        """Start a process on the instance's socket; it serves once it reports ready."""
        env = {**os.environ, "NOTIFY_SOCKET": self.notify_path}
        self.starting = start_in_own_group(self.command, socket_activation(self.listener, env))
        self.started_at = time.monotonic()
        self.start_limit.record_start(self.started_at)

    def reported_ready(self) -> bool:
        """Whether READY=1 has come since the last look: from the starting process, since the
        others sent theirs before it started."""
        states: list[bytes] = []
        with contextlib.suppress(BlockingIOError):  # nothing more
            while True:
                message = self.notify.recv(4096)
                states.extend(message.split(b"\n"))
        return b"READY=1" in states

    def processes(self) -> list[Process]:
        return [process for process in (self.serving, self.starting) if process]

    def give_up(self) -> None:
        """Stay down: close the socket, so that connections to it are refused (a balancer sends
        them to another instance) rather than left waiting for a process that never comes."""
        self.given_up = True
        self.restart_at = None
        self.listener.close()

    def close(self) -> None:
        self.listener.close()
        self.notify.close()


class Cluster:
    """The supervisor: the instances, HAProxy, the old processes of a rolling restart that
    drain, and what to do next (see the module docstring)."""

    def __init__(self, instances: list[Instance], haproxy_command: list[str], port: int) -> None:
        self.instances = instances
        self.haproxy_command = haproxy_command
        self.port = port
        self.haproxy: Process | None = None
        self.banner_shown = False  # from then on, an instance that exits is started again
        self.deadline = time.monotonic() + STARTUP_TIMEOUT_S  # for the banner
        self.retiring: list[Process] = []  # replaced in a rolling restart, draining
        self.to_roll: list[Instance] = []  # still to restart in the rolling restart under way
        self.rolling: Instance | None = None  # the instance whose new process is starting
        self.stops_sent = 0
        self.stopped: list[Process] = []  # what the first stopping signal found running
        self.failed = False

    def processes(self) -> list[Process]:
        """Every process of the cluster that has not exited."""
        haproxy = [self.haproxy] if self.haproxy else []
        every = [*haproxy, *self.retiring]
        for instance in self.instances:
            every.extend(instance.processes())
        return [process for process in every if process.poll() is None]

    def run(self, signals: list[int]) -> int:
        """Start the instances, then act on signals (appended to signals by their handlers) and
        on the processes' news until every process has exited; return the exit status."""
        for instance in self.instances:
            instance.start()
        handled = 0
        while self.processes():
            while handled < len(signals):
                self.act_on_signal(signals[handled])
                handled += 1
            notify_sockets = [instance.notify for instance in self.instances]
            select.select(notify_sockets, [], [], POLL_INTERVAL_S)
            for instance in self.instances:
                self.check(instance)
            self.retiring = [process for process in self.retiring if process.poll() is None]
            if not self.stops_sent:
                self.advance()
        failed_stops = [process for process in self.stopped if process.returncode]
        return 1 if self.failed or failed_stops else 0

    def act_on_signal(self, signum: int) -> None:
        if signum == signal.SIGHUP:
            self.begin_roll()
        else:
            self.stop()

    def check(self, instance: Instance) -> None:
        """Act on what the instance's processes did: reported ready, or exited."""
        if instance.starting and instance.reported_ready():
            self.promote(instance)
        if instance.starting and instance.starting.poll() is not None:
            self.starting_exited(instance)
        elif instance.starting and time.monotonic() - instance.started_at > STARTUP_TIMEOUT_S:
            report(f"{instance.name}: no READY=1 within {STARTUP_TIMEOUT_S:g} s: killed")
            instance.starting.kill()
        if instance.serving and instance.serving.poll() is not None:
            self.serving_exited(instance)

    def promote(self, instance: Instance) -> None:
        """The starting process serves: the one it replaces, if any, drains."""
        assert instance.starting, "only a starting process reports ready"
        replaced = instance.serving
        instance.serving = instance.starting
        instance.starting = None
        pid = instance.serving.pid
        replacing = f", replacing pid {replaced.pid}" if replaced else ""
        report(f"{instance.name} serving on {HOST}:{instance.port} (pid {pid}{replacing})")
        if replaced and replaced.poll() is None:
            replaced.send_signal(signal.SIGTERM)  # it drains: finishes its requests and exits
            self.retiring.append(replaced)
        if instance is self.rolling:
            self.roll_next()

    def starting_exited(self, instance: Instance) -> None:
        """A process exited before it reported ready."""
        assert instance.starting, "it was starting"
        status = instance.starting.returncode
        instance.starting = None
        report(f"{instance.name}: a new process exited with status {status} before serving")
        if self.stops_sent:
            return
        if instance is self.rolling:
            report(f"rolling restart abandoned: {instance.name} keeps its old process")
            self.rolling = None
            self.to_roll.clear()
        elif not self.banner_shown:
            self.fail("an instance failed to start")
        else:
            self.schedule_restart(instance)

    def serving_exited(self, instance: Instance) -> None:
        """The serving process exited by itself (or was killed): start another, unless one is
        already on its way or the cluster is stopping."""
        assert instance.serving, "it was serving"
        status = instance.serving.returncode
        instance.serving = None
        if self.stops_sent:
            return
        report(f"{instance.name} (port {instance.port}) exited with status {status}")
        if instance.starting:
            return
        if not self.banner_shown:
            self.fail("an instance exited before the cluster served")
            return
        self.schedule_restart(instance)

    def schedule_restart(self, instance: Instance) -> None:
        """Start the instance again after RESTART_DELAY_S, or give it up past its start limit."""
        restart_at = time.monotonic() + RESTART_DELAY_S
        if instance.start_limit.allows_start(restart_at):
            instance.restart_at = restart_at
            report(f"{instance.name}: starting again in {RESTART_DELAY_S:g} s")
            return
        limit = instance.start_limit
        report(
            f"{instance.name}: {limit.burst} starts in {limit.interval_s:g} s: it stays down "
            "and its socket is closed; the other instances serve"
        )
        self.failed = True
        instance.give_up()

    def advance(self) -> None:
        """Start what is due: instances to start again, HAProxy once every instance serves; the
        banner once HAProxy answers."""
        now = time.monotonic()
        if self.haproxy and self.haproxy.poll() is not None:
            self.fail(f"HAProxy exited with status {self.haproxy.returncode}")
            return
        for instance in self.instances:
            if instance.restart_at and now >= instance.restart_at:
                instance.restart_at = None
                instance.start()
        if self.banner_shown:
            return
        if not self.haproxy and all(instance.serving for instance in self.instances):
            self.haproxy = start_in_own_group(self.haproxy_command)
        if self.haproxy and answers_empty_request(self.port):  # through HAProxy, to an instance
            self.banner_shown = True
            print(f"cluster: HAProxy serving on {HOST}:{self.port} (Ctrl-C stops)", flush=True)
        elif now > self.deadline:
            self.fail(f"not serving on {HOST}:{self.port} within {STARTUP_TIMEOUT_S:g} s")

    def begin_roll(self) -> None:
        """SIGHUP: restart every instance, one at a time (again from the first, if one is under
        way: what changed may concern them all)."""
        if self.stops_sent or not self.banner_shown:
            report("SIGHUP ignored: the cluster is starting or stopping")
            return
        report("rolling restart: each instance is replaced once its new process serves")
        self.to_roll = list(self.instances)
        if not self.rolling:
            self.roll_next()

    def roll_next(self) -> None:
        """Start the new process of the next instance to restart, skipping those down."""
        self.rolling = None
        while self.to_roll and not self.rolling:
            instance = self.to_roll.pop(0)
            if instance.serving and not instance.starting and not instance.given_up:
                self.rolling = instance
                instance.start()
        if not self.rolling:
            report("rolling restart done")

    def fail(self, reason: str) -> None:
        report(f"stopping every process: {reason}")
        self.failed = True
        self.stop()

    def stop(self) -> None:
        """The first call drains every process, the next one stops them at once."""
        self.stops_sent += 1
        if self.stops_sent == 1:
            self.stopped = self.processes()
            self.to_roll.clear()
            for instance in self.instances:
                instance.restart_at = None
        soft_stop = signal.SIGUSR1 if self.stops_sent == 1 else signal.SIGTERM
        for process in self.processes():
            if process is self.haproxy:
                process.send_signal(soft_stop)
            elif self.stops_sent > 1 or process not in self.retiring:
                process.send_signal(signal.SIGTERM)  # a second one would stop it at once


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.cluster",
        description="HAProxy on PORT in front of INSTANCES bluservers on PORT+1 ... "
        "PORT+INSTANCES, in the foreground; an instance that exits is started again, SIGHUP "
        "restarts them one at a time, Ctrl-C drains and stops them all, a second one at once.",
    )
    parser.add_argument(
        "-p",
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help="HAProxy's port (default: %(default)s)",
    )
    parser.add_argument(
        "-i",
        "--instances",
        type=int,
        default=DEFAULT_INSTANCES,
        help="bluservers to start (default: %(default)s)",
    )
    parser.add_argument(
        "-n",
        "--workers",
        type=int,
        default=DEFAULT_WORKERS,
        help="workers per request (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.instances < 1 or args.workers < 1:
        parser.error("INSTANCES and WORKERS must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    haproxy = shutil.which("haproxy")
    if not haproxy:
        report("haproxy is not installed (sudo apt-get install haproxy)")
        return 1
    ports = [args.port + number for number in range(1, args.instances + 1)]
    signals: list[int] = []  # from here on, signals are only noted; Cluster.run acts on them
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda signum, frame: signals.append(signum))
    with tempfile.TemporaryDirectory(prefix="cluster-") as workdir:
        config = Path(workdir) / "haproxy.cfg"
        config.write_text(haproxy_config(TEMPLATE.read_text(), args.port, ports))
        instances: list[Instance] = []
        try:
            for number, port in enumerate(ports, 1):
                notify_path = f"{workdir}/blu{number}.notify"
                instances.append(Instance(number, port, args.workers, notify_path))
            cluster = Cluster(instances, [haproxy, "-db", "-f", str(config)], args.port)
            return cluster.run(signals)
        except ClusterError as error:
            report(str(error))
            return 1
        finally:
            for instance in instances:
                instance.close()


if __name__ == "__main__":
    sys.exit(main())
