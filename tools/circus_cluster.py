"""Several bluserver instances behind HAProxy, under circus, in the foreground: ``make cluster``.

``python -m tools.circus_cluster [-p PORT] [-i INSTANCES] [-n WORKERS] [--cert PEM]`` writes
deploy/circus.ini and deploy/haproxy.cfg, adapted to these values (``circus_config``,
``haproxy_config``; with the defaults they change only paths), to the run directory
build/cluster-PORT/, and runs circus's arbiter on them: HAProxy on 127.0.0.1:PORT (TLS with
--cert) in front of INSTANCES servers (``bluserver.py -n WORKERS``) on PORT+1 ... PORT+INSTANCES.

circus supervises (deploy/circus.ini says how: it holds every listening socket, starts the
processes on them, starts again those that die, stops each gracefully, then with SIGKILL).
This module adds only what circusd's own signal handling lacks (``ClusterSignals``):

- SIGHUP restarts the instances one at a time, then HAProxy: a new process starts on the
  socket, and the old one drains (circus's graceful reload, one watcher after the other).
- The first SIGINT (Ctrl-C) or SIGTERM stops HAProxy softly (it finishes its connections),
  then drains the instances; exit 0. During a rolling restart, the instance being replaced
  finishes its step first (circusd would refuse to stop while it reloads).
- A second one kills every process with its children (circusd ignores it); exit 1.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import ssl
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from circus import logger
from circus.arbiter import Arbiter
from circus.controller import Controller
from circus.pidfile import Pidfile
from circus.sighandler import SysHandler
from circus.util import configure_logger
from circus.watcher import Watcher
from tornado import gen, ioloop

from client import HEADER, recv_exactly

ROOT = Path(__file__).resolve().parent.parent
CIRCUS_TEMPLATE = ROOT / "deploy" / "circus.ini"
HAPROXY_TEMPLATE = ROOT / "deploy" / "haproxy.cfg"
HOST = "127.0.0.1"
DEFAULT_PORT = 1982
DEFAULT_INSTANCES = 3
DEFAULT_WORKERS = 2
STARTUP_TIMEOUT_S = 20.0  # for HAProxy to answer through an instance, after the start
PROBE_INTERVAL_S = 0.1  # how often the start-up looks whether HAProxy answers
PROBE_TIMEOUT_S = 0.5  # for one such look

# What deploy/circus.ini names, and make cluster changes (circus_config).
TEMPLATE_RUN_DIR = "build/cluster-1982"
TEMPLATE_SERVER = ".venv/bin/python bluserver.py"
FIRST_INSTANCE = "[socket:blu1]"  # blu1's socket and watcher, up to blu2's: every instance's
SECOND_INSTANCE = "[socket:blu2]"
FRONT_PORT = re.compile(r"^(\[socket:front\]\nhost = \S+\nport = )\d+", re.MULTILINE)
INSTANCE_PORT = re.compile(r"^port = \d+", re.MULTILINE)
WORKERS_OPTION = re.compile(r" -n \d+$", re.MULTILINE)

# What deploy/haproxy.cfg names, and make cluster changes (haproxy_config).
BIND_LINE = re.compile(r"^(\s*bind\s+)\S+", re.MULTILINE)
SERVER_LINE = re.compile(r"^\s*server\s.*\n", re.MULTILINE)
FRONT_SOCKET = '"fd@${FRONT_FD}"'  # the socket circus hands HAProxy (deploy/circus.ini)
TLS_OPTIONS = "ssl crt {certificate} ssl-min-ver TLSv1.2"  # as deploy/haproxy.cfg shows


def haproxy_config(
    template: str, address: str, instance_ports: Sequence[int], certificate: str | None = None
) -> str:
    """template with its bind address set to address (with TLS if certificate, a PEM file of
    certificate and key, is given) and its server lines replaced by one per instance.

    Raises ValueError if template has not exactly one bind line or has no server line.
    """
    tls = "" if certificate is None else " " + TLS_OPTIONS.format(certificate=certificate)
    bind = address + tls
    config, binds = BIND_LINE.subn(lambda line: line.group(1) + bind, template)
    first_server = SERVER_LINE.search(config)
    if binds != 1 or not first_server:
        raise ValueError(
            f"{HAPROXY_TEMPLATE} must have one 'bind ADDRESS' line and at least one 'server' line"
        )
    servers = "".join(
        f"    server blu{number} {HOST}:{instance_port}\n"
        for number, instance_port in enumerate(instance_ports, 1)
    )
    head = config[: first_server.start()]
    tail = config[first_server.start() :]
    return head + servers + SERVER_LINE.sub("", tail)


def circus_config(
    template: str, port: int, instances: int, *, workers: int, server: str, run_dir: str
) -> str:
    """template with the front socket on port, one socket and watcher per instance (copies of
    blu1's, on port+1 ... port+instances), -n workers, server for the interpreter and
    bluserver.py, and run_dir for the run directory.

    Raises ValueError if template has no front socket or no blu1.
    """
    head, first, rest = template.partition(FIRST_INSTANCE)
    head, fronts = FRONT_PORT.subn(rf"\g<1>{port}", head)
    if not first or fronts != 1:
        raise ValueError(f"{CIRCUS_TEMPLATE} must have a [socket:front] and a {FIRST_INSTANCE}")
    first_block = (first + rest.partition(SECOND_INSTANCE)[0]).rstrip("\n") + "\n"
    blocks = [
        INSTANCE_PORT.sub(f"port = {port + number}", first_block.replace("blu1", f"blu{number}"))
        for number in range(1, instances + 1)
    ]
    config = WORKERS_OPTION.sub(f" -n {workers}", head + "\n".join(blocks))
    config = config.replace(TEMPLATE_SERVER, server)
    return config.replace(TEMPLATE_RUN_DIR, run_dir)


def answers_empty_request(port: int, tls: bool = False) -> bool:
    """Whether 127.0.0.1:port answers an empty request with an empty reply, as HAProxy checks an
    instance (with tls, inside TLS, the certificate unchecked: it asks only whether it answers).
    """
    try:
        with socket.create_connection((HOST, port), timeout=PROBE_TIMEOUT_S) as plain:
            sock = plain
            if tls:
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
                sock = context.wrap_socket(plain)
            sock.sendall(HEADER.pack(0))
            return recv_exactly(sock, HEADER.size) == HEADER.pack(0)
    except OSError:  # ssl.SSLError among them
        return False


class ClusterSignals(SysHandler):  # type: ignore[misc]
    """make cluster's signals (module docstring). circus's SysHandler turns each into a command
    for the arbiter, and the arbiter refuses a command while another runs: a second Ctrl-C
    while it stops, or Ctrl-C while it reloads. This one acts on the watchers itself."""

    def __init__(self, controller: Controller) -> None:
        self.stops = 0  # stopping signals received
        self.killed = False  # a second one came: every process was killed
        self.rolling: Any = None  # the rolling restart's current step (a Future), if any
        super().__init__(controller)  # registers the handlers

    def handle_hup(self) -> None:
        self.controller.loop.add_callback_from_signal(self.roll)

    def handle_int(self) -> None:
        self.controller.loop.add_callback_from_signal(self.drain_then_stop)

    handle_term = handle_int
    handle_quit = handle_int

    def watchers(self) -> tuple[list[Watcher], list[Watcher]]:
        """The instances' watchers and HAProxy's."""
        every = self.controller.arbiter.watchers
        balancers = [watcher for watcher in every if watcher.name == "haproxy"]
        return [watcher for watcher in every if watcher not in balancers], balancers

    async def roll(self) -> None:
        """Reload each instance, then HAProxy, one at a time: circus starts a new process on
        the socket and stops the old one, which drains (waiting for it to exit)."""
        if self.stops or self.rolling:
            logger.info("SIGHUP ignored: the cluster is stopping, or already restarting")
            return
        logger.info("rolling restart: each process is replaced by a new one on its socket")
        # circus's periodic check (of dead processes, to start others) would act on a watcher
        # in the middle of its reload, and fail (two removals of one process): circusd's
        # reload excludes it with a lock, this one pauses it.
        self.controller.caller.stop()
        try:
            instances, balancers = self.watchers()
            for watcher in [*instances, *balancers]:
                if self.stops:
                    return
                self.rolling = gen.convert_yielded(watcher._reload(graceful=True))
                await self.rolling
        finally:
            self.rolling = None
            self.controller.caller.start()
        logger.info("rolling restart done")

    async def drain_then_stop(self) -> None:
        """The first call drains (HAProxy, then the instances) and ends the arbiter's loop; the
        next one kills every process."""
        self.stops += 1
        if self.stops > 1:
            self.kill_every_process()
            return
        logger.info("stopping: HAProxy finishes its connections, then the instances drain")
        self.controller.arbiter._stopping = True  # circus starts no process from now on
        if self.rolling:
            await self.rolling
        instances, balancers = self.watchers()
        await gen.multi([watcher._stop(True) for watcher in balancers])
        await gen.multi([watcher._stop(True) for watcher in instances])
        self.controller.loop.add_callback(self.controller.loop.stop)  # then sockets close

    def kill_every_process(self) -> None:
        logger.info("second stop signal: killing every process and its children")
        self.killed = True
        for watcher in self.controller.arbiter.watchers:
            for process in list(watcher.processes.values()):
                watcher.send_signal_process(process, signal.SIGKILL, recursive=True)


class ClusterController(Controller):  # type: ignore[misc]
    def _init_syshandler(self) -> None:
        self.sys_hdl = ClusterSignals(self)


class ClusterArbiter(Arbiter):  # type: ignore[misc]
    """circus's arbiter, with ClusterController's signal handling."""

    def _init_context(self, context: Any) -> None:
        super()._init_context(context)
        self.ctrl.sys_hdl.stop()  # give the signals back; ClusterSignals takes them
        self.ctrl = ClusterController(
            self.endpoint,
            self.multicast_endpoint,
            self.context,
            self.loop,
            self,
            self.check_delay,
            self.endpoint_owner,
        )


def announce_when_serving(port: int, tls: bool, deadline: float) -> None:
    """Print the banner once HAProxy answers through an instance; look again a moment later
    until then, or say that it did not within STARTUP_TIMEOUT_S."""
    loop = ioloop.IOLoop.current()
    if answers_empty_request(port, tls):
        scheme = "TLS" if tls else "plain TCP"
        report(f"HAProxy serving on {HOST}:{port}, {scheme} (Ctrl-C stops, SIGHUP restarts)")
    elif time.monotonic() > deadline:
        report(f"not serving on {HOST}:{port} within {STARTUP_TIMEOUT_S:g} s: see the logs")
    else:
        loop.call_later(PROBE_INTERVAL_S, announce_when_serving, port, tls, deadline)


def report(message: str) -> None:
    """One line on stderr; none if the terminal has gone (the cluster serves on)."""
    with contextlib.suppress(OSError):
        print(f"cluster: {message}", file=sys.stderr, flush=True)


def write_configs(args: argparse.Namespace, run_dir: Path) -> Path:
    """Write circus's and HAProxy's configurations for args to run_dir; circus's path."""
    run_dir.mkdir(parents=True, exist_ok=True)
    ports = [args.port + number for number in range(1, args.instances + 1)]
    certificate = str(Path(args.cert).resolve()) if args.cert else None
    haproxy = haproxy_config(HAPROXY_TEMPLATE.read_text(), FRONT_SOCKET, ports, certificate)
    (run_dir / "haproxy.cfg").write_text(haproxy)
    circus = circus_config(
        CIRCUS_TEMPLATE.read_text(),
        args.port,
        args.instances,
        workers=args.workers,
        server=f"{sys.executable} {args.server}",
        run_dir=str(run_dir),
    )
    config_path = run_dir / "circus.ini"
    config_path.write_text(circus)
    return config_path


def run(config_path: Path, port: int, tls: bool) -> int:
    """Run circus on config_path until it stops; 0 if it drained, 1 if it had to kill."""
    arbiter = ClusterArbiter.load_from_config(str(config_path))
    pidfile = Pidfile(arbiter.pidfile)
    try:
        pidfile.create(os.getpid())
    except RuntimeError as error:
        report(f"{error} (a cluster runs on this port: stop it, or choose another PORT)")
        return 1
    try:
        ioloop.IOLoop.current().add_callback(
            announce_when_serving, port, tls, time.monotonic() + STARTUP_TIMEOUT_S
        )
        arbiter.start()
    except OSError as error:  # a socket circus could not bind
        report(f"cannot listen: {error.strerror} (a cluster still running? try PORT=...)")
        return 1
    finally:
        pidfile.unlink()
    return 1 if arbiter.ctrl.sys_hdl.killed else 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.circus_cluster",
        description="HAProxy on PORT in front of INSTANCES bluservers on PORT+1 ... "
        "PORT+INSTANCES, under circus, in the foreground: a process that dies is started "
        "again, SIGHUP restarts them one at a time, Ctrl-C drains and stops them all, a "
        "second one kills them.",
    )
    add = parser.add_argument
    add("-p", "--port", type=int, default=DEFAULT_PORT, help="HAProxy's (default: %(default)s)")
    add("-i", "--instances", type=int, default=DEFAULT_INSTANCES, help="(default: %(default)s)")
    add("-n", "--workers", type=int, default=DEFAULT_WORKERS, help="per request (default: 2)")
    add("--cert", metavar="PEM", help="serve TLS with this certificate and key (make cert)")
    add("--run-dir", type=Path, help="configurations and logs (default: build/cluster-PORT)")
    # The tests run the instances as tests/launch.py, with the faults FAULTS names.
    add("--server", default="bluserver.py", help="the instances' script (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.instances < 1 or args.workers < 1:
        parser.error("INSTANCES and WORKERS must be at least 1")
    if args.cert and not Path(args.cert).is_file():
        parser.error(f"no certificate file {args.cert} (make cert writes tls/bluserver.pem)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not shutil.which("haproxy"):
        report("haproxy is not installed (sudo apt-get install haproxy)")
        return 1
    os.chdir(ROOT)  # deploy/circus.ini's paths are relative to the checkout
    run_dir = args.run_dir or Path("build") / f"cluster-{args.port}"
    configure_logger(logger, "info", "-")
    config_path = write_configs(args, run_dir)
    report(f"circus: {config_path}; logs in {run_dir}/*.log")
    return run(config_path, args.port, tls=bool(args.cert))


if __name__ == "__main__":
    sys.exit(main())
