"""Several bluserver instances behind HAProxy, in the foreground: ``make cluster``.

``python -m tools.cluster [-p PORT] [-i INSTANCES] [-n WORKERS]`` starts INSTANCES servers
(``bluserver.py -a 127.0.0.1 -p PORT+k -n WORKERS``, k = 1 ... INSTANCES) and HAProxy on PORT
with deploy/haproxy.cfg, its bind port and server lines rewritten for these instances
(``haproxy_config``; with the defaults the rewrite changes nothing). HAProxy starts once every
instance answers an empty request (HAProxy's health check); the banner comes once HAProxy does.

The children run in process groups of their own, so that Ctrl-C reaches only this
supervisor, which stops them in order: the first SIGINT or SIGTERM drains (HAProxy's soft
stop, SIGUSR1: it stops accepting and finishes its connections; SIGTERM to each server: it
finishes its requests in flight), a second one stops everything at once. If a child exits by
itself (a port in use, a crash), the others are stopped too. The exit status is 0 only if
every child exited 0 after a signal.
"""

from __future__ import annotations

import argparse
import os
import re
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
STARTUP_TIMEOUT_S = 20.0  # for every instance to answer its first empty request
LISTEN_FDS_START = 3  # systemd's protocol: the first socket handed over is fd 3
POLL_INTERVAL_S = 0.05  # how often the supervisor looks for signals and exited children
BIND_LINE = re.compile(r"^(\s*bind\s+\S*:)\d+", re.MULTILINE)
SERVER_LINE = re.compile(r"^\s*server\s.*\n", re.MULTILINE)


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
    head, tail = config[: first_server.start()], config[first_server.start() :]
    return head + servers + SERVER_LINE.sub("", tail)


def socket_activation(listener: socket.socket, env: Mapping[str, str]) -> Callable[[], None]:
    """A preexec_fn that hands listener to the program Popen starts, as systemd does
    (sd_listen_fds(3)): the socket at fd 3, LISTEN_FDS=1, and LISTEN_PID set to the pid of the
    started process itself.  That pid is known only once forked, so the whole environment (env)
    is set here, between fork and exec: give Popen env=None, and close_fds=False so that fd 3
    survives exec (Python's own file descriptors are never inherited, PEP 446)."""
    listener_fd = listener.fileno()

    def hand_over() -> None:
        os.dup2(listener_fd, LISTEN_FDS_START)
        os.set_inheritable(LISTEN_FDS_START, True)  # dup2 onto itself (fd 3 already) would not
        os.environ.clear()
        os.environ.update(env, LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))

    return hand_over


def answers_empty_request(port: int) -> bool:
    """Whether the server on port answers an empty request with an empty reply, as HAProxy checks."""
    try:
        with socket.create_connection((HOST, port), timeout=1.0) as sock:
            sock.sendall(HEADER.pack(0))
            return recv_exactly(sock, HEADER.size) == HEADER.pack(0)
    except OSError:
        return False


class Cluster:
    """The processes of the cluster: the servers, then HAProxy; how to stop them."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen[bytes]] = []
        self.haproxy: subprocess.Popen[bytes] | None = None
        self.stops_sent = 0

    def start(self, command: Sequence[str]) -> subprocess.Popen[bytes]:
        """Start command in a process group of its own: Ctrl-C in the terminal does not reach it."""
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            preexec_fn=os.setpgrp,  # noqa: PLW1509 - this process starts no threads
        )
        self.processes.append(process)
        return process

    def running(self) -> list[subprocess.Popen[bytes]]:
        return [process for process in self.processes if process.poll() is None]

    def stop(self) -> None:
        """The first call drains every process, the next one stops them at once."""
        self.stops_sent += 1
        haproxy_signal = (
            signal.SIGUSR1 if self.stops_sent == 1 else signal.SIGTERM
        )  # soft stop, then hard
        for process in self.running():
            process.send_signal(haproxy_signal if process is self.haproxy else signal.SIGTERM)


def wait_until_ready(cluster: Cluster, ports: Sequence[int], signals: list[int]) -> bool:
    """Wait until the server on each port answers; False if a signal comes, a child exits or time runs out."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    waiting = list(ports)
    while waiting and not signals and len(cluster.running()) == len(cluster.processes):
        if time.monotonic() > deadline:
            print(
                f"cluster: no answer on port {waiting[0]} within {STARTUP_TIMEOUT_S:g} s",
                file=sys.stderr,
            )
            return False
        if answers_empty_request(waiting[0]):
            waiting.pop(0)
        else:
            time.sleep(POLL_INTERVAL_S)
    return not waiting


def supervise(cluster: Cluster, signals: list[int], failed: bool) -> int:
    """Act on the signals that arrive in signals (which a handler appends to) and on children
    that exit, until every child has exited; return the exit status."""
    handled = 0
    while cluster.running():
        if handled < len(signals):
            handled += 1
            cluster.stop()
        elif not cluster.stops_sent and (
            failed or len(cluster.running()) < len(cluster.processes)
        ):
            print(
                "cluster: stopping every process, since one has exited or failed to start",
                file=sys.stderr,
            )
            failed = True
            cluster.stop()
        time.sleep(POLL_INTERVAL_S)
    return 1 if failed or any(process.returncode for process in cluster.processes) else 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.cluster",
        description="HAProxy on PORT in front of INSTANCES bluservers on PORT+1 ... PORT+INSTANCES, "
        "in the foreground; Ctrl-C drains and stops them all, a second Ctrl-C at once.",
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
        print("cluster: haproxy is not installed (sudo apt-get install haproxy)", file=sys.stderr)
        return 1
    ports = [args.port + number for number in range(1, args.instances + 1)]
    config = haproxy_config(TEMPLATE.read_text(), args.port, ports)
    signals: list[int] = []  # from here on, Ctrl-C is only noted; supervise() acts on it
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda signum, frame: signals.append(signum))
    cluster = Cluster()
    with tempfile.NamedTemporaryFile("w", prefix="haproxy-", suffix=".cfg") as config_file:
        config_file.write(config)
        config_file.flush()
        for port in ports:
            cluster.start(
                [
                    sys.executable,
                    "bluserver.py",
                    "-a",
                    HOST,
                    "-p",
                    str(port),
                    "-n",
                    str(args.workers),
                ]
            )
        ready = wait_until_ready(cluster, ports, signals)
        if ready:
            cluster.haproxy = cluster.start([haproxy, "-db", "-f", config_file.name])
            ready = wait_until_ready(
                cluster, [args.port], signals
            )  # through HAProxy to an instance
        if ready:
            print(f"cluster: HAProxy serving on {HOST}:{args.port} (Ctrl-C stops)", flush=True)
        return supervise(cluster, signals, failed=not ready and not signals)


if __name__ == "__main__":
    sys.exit(main())
