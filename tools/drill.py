"""Restart drills: what a rolling restart, the loss of an instance, or a drain costs the clients.

``python -m tools.drill {roll,kill} [-i INSTANCES] [-c CLIENTS]`` starts ``make cluster``
(tools/cluster.sh: stock circusd running HAProxy in front of INSTANCES instances, ``-n 1``)
on free ports, and keeps CLIENTS clients sending requests of 10 lines through HAProxy, each
replaced by the next as soon as its reply has come and been verified (tools.load's
clients).  Once WARMUP_ROUNDS requests per client have been served, it acts:

- roll: SIGHUP to circusd, until it reports HAProxy (its last watcher) reloaded;
- kill: SIGKILL to the server process of the first instance, until circus has started another.

It goes on for as many requests again, stops the clients, stops the cluster as Ctrl-C does,
and prints the requests served and failed, in all and while the drill lasted.  Exits 1 if a
request failed.

``python -m tools.drill drain [-s SECONDS]`` sends a request that evaluates for SECONDS
(tests/faults.py's ``sleep``) through HAProxy with deploy/haproxy.cfg, and drains the
instance evaluating it, in each setup the README documents (``DRAINS``): a plain instance
given SIGTERM, a `systemctl restart` (the socket held by the drill, as systemd holds it), and
make cluster's rolling restart and Ctrl-C.  It prints whether the reply came whole and
whether HAProxy had marked the instance down.  Exits 1 if a reply was cut.

tests/test_cluster.py runs the same drills, smaller and shorter.
"""

from __future__ import annotations

import argparse
import os
import selectors
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from client import HEADER, recv_exactly, recv_frame
from tests.harness import (
    EXIT_TIMEOUT_S,
    LOG,
    ROOT,
    SCRIPTED,
    ServerProcess,
    process_table,
    session_processes,
    wait_for_exit,
    wait_until,
)
from tools.circus_cluster import HAPROXY_TEMPLATE, HOST, haproxy_config
from tools.load import LoadClient, request_lines, step

LINES = 10  # per request
WARMUP_ROUNDS = 3  # requests per client before the drill, and again after
DRILL_TIMEOUT_S = 60.0  # for the drill's event (restart done, instance back), and each phase
CIRCUS_TIMEOUT_S = 5.0  # for circusd to answer a command
PROBE_TIMEOUT_S = 0.5  # for answers_empty_request
# For a request sent during a drain: an instance being replaced takes its new process's start,
# ~0.3 s on an idle machine, to answer (circus stops the old process as it starts the new one).
AT_ONCE_S = 3.0
DRAIN_SECONDS = 20.0  # how long the drained request evaluates (python -m tools.drill drain)


def answers_empty_request(
    port: int, tls: bool = False, timeout_s: float = PROBE_TIMEOUT_S
) -> bool:
    """Whether 127.0.0.1:port answers an empty request with an empty reply within timeout_s, as
    HAProxy checks an instance (with tls, inside TLS, the certificate unchecked: it asks only
    whether it answers).
    """
    try:
        with socket.create_connection((HOST, port), timeout=timeout_s) as plain:
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


def free_port(ports_after: int = 0) -> int:
    """A port that is free now on 127.0.0.1, and so are the ports_after ports after it."""
    while True:
        with socket.socket() as probe:
            probe.bind((HOST, 0))
            port: int = probe.getsockname()[1]
        try:
            for following in range(port + 1, port + 1 + ports_after):
                with socket.socket() as probe:
                    probe.bind((HOST, following))
        except OSError:
            continue
        return port


class SteadyLoad:
    """clients connections through port at all times: each, once answered (and verified) or
    failed, is replaced by a new request, until stopped.  Counts what was served and failed."""

    def __init__(self, port: int, clients: int) -> None:
        self.port = port
        self.requests = [request_lines(number, LINES) for number in range(clients)]
        self.selector = selectors.DefaultSelector()
        self.served = 0
        self.failures: list[str] = []
        self.stopping = False
        for number in range(clients):
            self.send(number)

    def send(self, number: int) -> None:
        """Connect client number with its request; a refused connection is a failure."""
        load_client = LoadClient(number, *self.requests[number])
        self.selector.register(load_client.sock, selectors.EVENT_WRITE, load_client)
        try:
            load_client.connect(self.port)
        except OSError as error:
            self.selector.unregister(load_client.sock)
            load_client.sock.close()
            self.failures.append(str(error))

    def run_until(self, condition: Callable[[], bool], what: str) -> None:
        """Drive the clients until condition holds; raises TimeoutError after DRILL_TIMEOUT_S."""
        deadline = time.monotonic() + DRILL_TIMEOUT_S
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {what} within {DRILL_TIMEOUT_S:g} s")
            for key, _ in self.selector.select(timeout=0.05):
                if step(self.selector, key):  # this client is done, or failed
                    self.count(key.data)

    def count(self, load_client: LoadClient) -> None:
        problem = load_client.problem()
        if problem:
            self.failures.append(problem)
        else:
            self.served += 1
        if not self.stopping:
            self.send(load_client.number)

    def stop(self) -> None:
        """Send no new request; wait for those under way."""
        self.stopping = True
        self.run_until(lambda: not self.selector.get_map(), "reply to the last requests")
        self.selector.close()


class Cluster:
    """`make cluster` (tools/cluster.sh, stock circusd) on free ports, in a session of its own,
    its configurations and logs in run_dir.  scripted: the instances run tests/launch.py with
    tests/faults.py's scripted_lines (a line "sleep SECONDS" evaluates that long).
    stop_timeout_s: how long a stop may drain before the cluster kills what is left."""

    def __init__(
        self,
        instances: int,
        run_dir: Path,
        *,
        scripted: bool = False,
        certificate: Path | None = None,
        stop_timeout_s: float | None = None,
    ) -> None:
        self.port = free_port(ports_after=instances)
        self.run_dir = run_dir
        self.names = [f"blu{number}" for number in range(1, instances + 1)]
        venv_bin = Path(sys.executable).parent
        # SIGINT acted on: a shell cannot trap a signal ignored when it started, as it is in
        # whatever a non-interactive shell starts in the background (a test run, this drill).
        command = ["env", "--default-signal=INT", "sh", "tools/cluster.sh", str(venv_bin)]
        command += ["-p", str(self.port)]
        command += ["-i", str(instances), "-n", "1", "--run-dir", str(run_dir)]
        if scripted:
            command += ["--server", "tests/launch.py"]
        if certificate:
            command += ["--cert", str(certificate)]
        environment = {**os.environ}
        if scripted:
            environment.update(START_METHOD="", FAULTS="scripted_lines")
        if stop_timeout_s is not None:
            environment["STOP_TIMEOUT_S"] = f"{stop_timeout_s:g}"
        self.circusctl = [
            str(venv_bin / "circusctl"),
            "--endpoint",
            f"ipc://{run_dir}/control.sock",
        ]
        with (run_dir / "cluster.log").open("wb") as log:
            self.process = subprocess.Popen(
                command,
                cwd=ROOT,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        self.sessions = {self.process.pid}  # the shell's; circusd and each process it started
        self.circusd = 0
        try:
            wait_until(
                lambda: answers_empty_request(self.port, tls=certificate is not None),
                "the cluster to answer",
            )
            self.circusd = int((run_dir / "circusd.pid").read_text())
            self.sessions.add(self.circusd)
            self.pids()  # the sessions of its processes, for processes()
        except BaseException:
            self.cleanup()
            raise

    def log(self) -> str:
        return (self.run_dir / "cluster.log").read_text()

    def haproxy_log(self) -> str:
        return (self.run_dir / "haproxy.log").read_text()

    def interrupt(self) -> None:
        """What Ctrl-C in its terminal does: SIGINT to its process group (circusd has its own)."""
        os.killpg(self.process.pid, signal.SIGINT)

    def restart(self) -> None:
        """A rolling restart: SIGHUP to circusd."""
        os.kill(self.circusd, signal.SIGHUP)

    def pids(self) -> dict[str, list[int]]:
        """Each watcher's processes (instances and haproxy), as circusctl lists them."""
        listed = {}
        for name in [*self.names, "haproxy"]:
            answer = subprocess.run(
                [*self.circusctl, "--timeout", f"{CIRCUS_TIMEOUT_S:g}", "list", name],
                capture_output=True,
                text=True,
                timeout=EXIT_TIMEOUT_S,
                check=True,
            )
            listed[name] = sorted(int(pid) for pid in answer.stdout.strip().split(",") if pid)
            self.sessions.update(listed[name])
        return listed

    def stop(self) -> int:
        """Ctrl-C, then wait for every process of the cluster to exit; the cluster's status."""
        self.interrupt()
        status = self.process.wait(EXIT_TIMEOUT_S)
        wait_until(lambda: not self.processes(), "the cluster's processes")
        return status

    def processes(self) -> list[int]:
        """The live processes of the sessions of the shell, circusd and the processes circusd
        started (each in a session of its own), as far as pids() has seen them: their handlers
        and workers too, even once their parent has died."""
        return [pid for session in self.sessions for pid in session_processes(session)]

    def cleanup(self) -> None:
        """Kill whatever is left (after a failure): circusd first, so that it starts nothing
        more; its processes die with it, and anything still left is killed here."""
        if self.circusd:
            with suppress(ProcessLookupError):  # it exited meanwhile
                os.kill(self.circusd, signal.SIGKILL)
        for pid in self.processes():
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait()


@contextmanager
def running_cluster(instances: int, **options: object) -> Iterator[Cluster]:
    """A Cluster in a fresh run directory, cleaned up after."""
    with tempfile.TemporaryDirectory(prefix="drill-") as run_dir:
        cluster = Cluster(instances, Path(run_dir), **options)  # type: ignore[arg-type]
        try:
            yield cluster
        finally:
            cluster.cleanup()


@dataclass
class Outcome:
    """What a drill cost: requests served and failed, in all and while it lasted."""

    served: int = 0
    failures: list[str] = field(default_factory=list)
    served_during: int = 0
    failed_during: int = 0
    seconds: float = 0.0  # from the signal to the end of the drill's event
    replaced: dict[str, tuple[list[int], list[int]]] = field(default_factory=dict)
    evaluating_at_kill: int = 0  # the killed server's handlers: requests it was evaluating
    exit_status: int | None = None  # circus's, after SIGINT


def drill(action: str, instances: int, clients: int) -> Outcome:
    """Run the drill action ("roll" or "kill") under clients' steady load; what it cost."""
    with running_cluster(instances) as cluster:
        return drill_on(cluster, action, clients)


def drill_on(cluster: Cluster, action: str, clients: int) -> Outcome:
    outcome = Outcome()
    load = SteadyLoad(cluster.port, clients)
    load.run_until(lambda: load.served >= WARMUP_ROUNDS * clients, "warm-up")
    served_before = load.served
    failed_before = len(load.failures)
    old_pids = cluster.pids()
    started = time.monotonic()
    if action == "roll":
        cluster.restart()
        load.run_until(lambda: "haproxy reloaded" in cluster.log(), "rolling restart")
    else:
        victim = old_pids["blu1"][0]
        handlers = [row.pid for row in process_table() if row.ppid == victim]
        outcome.evaluating_at_kill = len(handlers)
        os.kill(victim, signal.SIGKILL)
        load.run_until(lambda: cluster.pids()["blu1"] not in ([], [victim]), "a new blu1")
    outcome.seconds = time.monotonic() - started
    outcome.served_during = load.served - served_before
    outcome.failed_during = len(load.failures) - failed_before
    served_after = load.served + WARMUP_ROUNDS * clients
    load.run_until(lambda: load.served >= served_after, "requests after the drill")
    load.stop()
    new_pids = cluster.pids()
    for name, pids in old_pids.items():
        if new_pids[name] != pids:
            outcome.replaced[name] = (pids, new_pids[name])
    outcome.served = load.served
    outcome.failures = load.failures
    outcome.exit_status = cluster.stop()
    return outcome


@dataclass
class DrainOutcome:
    """What became of a request in flight while its instance drained."""

    reply: str  # "whole", or what cut it
    seconds: float  # from the request to its reply, or to the cut
    marked_down: bool  # whether HAProxy had marked the instance down meanwhile
    others_served: bool | None = None  # whether requests sent meanwhile were answered at once
    exit_status: int | None = None  # the drained process's, or circus's after Ctrl-C


Release = Callable[[Callable[[], str]], None]  # given HAProxy's log: let the request finish


class LongRequest:
    """A request of one line (tests/faults.py's "sleep SECONDS", or "gate PATH") sent through
    HAProxy on port; ``reply`` waits for the reply, which must be expected."""

    def __init__(self, port: int, line: str, expected: bytes) -> None:
        self.expected = expected
        self.started = time.monotonic()
        self.sock = socket.create_connection((HOST, port), timeout=None)
        payload = f"{line}\n".encode()
        self.sock.sendall(HEADER.pack(len(payload)) + payload)

    def reply(self) -> tuple[str, float]:
        """ "whole" (or what went wrong) and the seconds since the request was sent."""
        with self.sock:
            try:
                reply = bytes(recv_frame(self.sock))
                verdict = "whole" if reply == self.expected else f"wrong: {reply!r}"
            except OSError as error:  # ConnectionError among them
                verdict = f"cut: {error}"
        return verdict, time.monotonic() - self.started


class Balancer:
    """HAProxy with deploy/haproxy.cfg on a free port, in front of the instances on ports, its
    output in a file beside config_path."""

    def __init__(self, ports: list[int], config_path: Path) -> None:
        self.port = free_port()
        config = haproxy_config(HAPROXY_TEMPLATE.read_text(), f"{HOST}:{self.port}", ports)
        config_path.write_text(config)
        self.log_path = config_path.with_suffix(".log")
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                ["haproxy", "-db", "-f", str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        wait_until(lambda: answers_empty_request(self.port), "HAProxy to answer")

    def log(self) -> str:
        return self.log_path.read_text()

    def cleanup(self) -> None:
        self.process.terminate()
        wait_for_exit(self.process, EXIT_TIMEOUT_S)
        wait_until(lambda: not session_processes(self.process.pid), "HAProxy's processes to exit")


def evaluating(instances: list[ServerProcess]) -> ServerProcess:
    """The instance that received the long request (it has a handler), once one has."""
    wait_until(lambda: any(instance.handlers() for instance in instances), "the request")
    return next(instance for instance in instances if instance.handlers())


def new_requests_answered(port: int) -> bool:
    """Whether a few requests sent now through port are all answered at once (AT_ONCE_S)."""
    return all(answers_empty_request(port, timeout_s=AT_ONCE_S) for _ in range(4))


def start_on(listener: socket.socket | None = None) -> ServerProcess:
    """A scripted instance (-n 1, JSON logs), serving listener if given (handed over as
    systemd hands a socket), else a port of its own."""
    return ServerProcess(["-n", "1", *LOG], listener=listener, **SCRIPTED)  # type: ignore[arg-type]


def drain_the_one_evaluating(
    balancer: Balancer,
    instances: list[ServerProcess],
    request: tuple[str, bytes],
    release: Release,
) -> tuple[ServerProcess, DrainOutcome]:
    """Send the long request through balancer, SIGTERM the instance that evaluates it, and
    see what comes of it: that instance, once it has exited, and the outcome."""
    long_request = LongRequest(balancer.port, *request)
    draining = evaluating(instances)
    draining.process.send_signal(signal.SIGTERM)
    others_served = new_requests_answered(balancer.port)
    release(balancer.log)
    verdict, elapsed = long_request.reply()
    status = wait_for_exit(draining.process, EXIT_TIMEOUT_S)
    marked_down = " is DOWN" in balancer.log()
    return draining, DrainOutcome(verdict, elapsed, marked_down, others_served, status)


def drain_plain(request: tuple[str, bytes], release: Release, work_dir: Path) -> DrainOutcome:
    """HAProxy in front of two instances started by hand; SIGTERM to the one evaluating."""
    with ExitStack() as cleanups:
        instances = [start_on() for _ in range(2)]
        for instance in instances:
            cleanups.callback(instance.cleanup)
        balancer = Balancer([instance.port for instance in instances], work_dir / "plain.cfg")
        cleanups.callback(balancer.cleanup)
        _, outcome = drain_the_one_evaluating(balancer, instances, request, release)
        return outcome


def drain_restart(request: tuple[str, bytes], release: Release, work_dir: Path) -> DrainOutcome:
    """`systemctl restart` of the instance evaluating, behind HAProxy: its socket stays open
    (held here, as systemd's socket unit holds it), the old process drains, and only once it
    has exited does the new one start on the socket."""
    with ExitStack() as cleanups:
        listeners = [socket.create_server((HOST, 0), backlog=socket.SOMAXCONN) for _ in "12"]
        for listener in listeners:
            cleanups.callback(listener.close)
        instances = [start_on(listener) for listener in listeners]
        for instance in instances:
            cleanups.callback(instance.cleanup)
        ports = [listener.getsockname()[1] for listener in listeners]
        balancer = Balancer(ports, work_dir / "restart.cfg")
        cleanups.callback(balancer.cleanup)
        drained, outcome = drain_the_one_evaluating(balancer, instances, request, release)
        cleanups.callback(start_on(listeners[instances.index(drained)]).cleanup)  # the new one
        return outcome


def drain_cluster(request: tuple[str, bytes], release: Release, restart: bool) -> DrainOutcome:
    """make cluster with a long request in flight: a rolling restart (SIGHUP to circusd), or
    Ctrl-C."""
    with running_cluster(2, scripted=True) as cluster:
        long_request = LongRequest(cluster.port, *request)
        instances = [pid for name in cluster.names for pid in cluster.pids()[name]]
        wait_until(
            lambda: any(row.ppid in instances for row in process_table()),
            "an instance to evaluate the request",
        )
        if restart:
            cluster.restart()
        else:
            cluster.interrupt()
        others_served = new_requests_answered(cluster.port) if restart else None
        release(cluster.haproxy_log)
        verdict, elapsed = long_request.reply()
        status = None if restart else cluster.process.wait(EXIT_TIMEOUT_S)
        marked_down = " is DOWN" in cluster.haproxy_log()
        return DrainOutcome(verdict, elapsed, marked_down, others_served, status)


def drain_roll(request: tuple[str, bytes], release: Release, _: Path) -> DrainOutcome:
    return drain_cluster(request, release, restart=True)


def drain_stop(request: tuple[str, bytes], release: Release, _: Path) -> DrainOutcome:
    return drain_cluster(request, release, restart=False)


DRAINS = {
    "plain instance, SIGTERM": drain_plain,
    "systemctl restart (socket held)": drain_restart,
    "make cluster, rolling restart (SIGHUP)": drain_roll,
    "make cluster, Ctrl-C (SIGINT)": drain_stop,
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.drill",
        description="A rolling restart (roll) or the SIGKILL of an instance (kill) of make "
        "cluster under steady load: prints the requests served and failed. drain: a long "
        "request through HAProxy while its instance drains, in each documented setup.",
    )
    parser.add_argument("action", choices=("roll", "kill", "drain"))
    parser.add_argument("-i", "--instances", type=int, default=3, help="(default: %(default)s)")
    parser.add_argument("-c", "--clients", type=int, default=20, help="(default: %(default)s)")
    parser.add_argument(
        "-s", "--seconds", type=float, default=DRAIN_SECONDS, help="drain: (default: 20)"
    )
    return parser.parse_args(argv)


def print_drains(seconds: float) -> int:
    cut = 0
    request = (f"sleep {seconds:g}", b"slept\n")
    answered = {True: "answered at once", False: "NOT answered at once", None: "not sent"}
    with tempfile.TemporaryDirectory(prefix="drill-") as work_dir:
        for setup, drain in DRAINS.items():
            outcome = drain(request, lambda log: None, Path(work_dir))
            down = "marked down" if outcome.marked_down else "never marked down"
            print(
                f"drill: {setup}: a {seconds:g} s request: reply {outcome.reply} after "
                f"{outcome.seconds:.1f} s; HAProxy: the instance {down}; new requests "
                f"meanwhile {answered[outcome.others_served]}; exit status "
                f"{outcome.exit_status}"
            )
            cut += outcome.reply != "whole"
    return 1 if cut else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.action == "drain":
        return print_drains(args.seconds)
    outcome = drill(args.action, args.instances, args.clients)
    what = "rolling restart" if args.action == "roll" else "SIGKILL of blu1"
    print(
        f"drill: {what}, {args.instances} instances, {args.clients} clients of {LINES}-line "
        f"requests: {outcome.served} served, {len(outcome.failures)} failed; during the "
        f"{what} ({outcome.seconds:.1f} s): {outcome.served_during} served, "
        f"{outcome.failed_during} failed"
    )
    if args.action == "kill":
        print(f"drill: blu1 was evaluating {outcome.evaluating_at_kill} requests when killed")
    for name, (old, new) in outcome.replaced.items():
        print(f"drill: {name}: pid {old} replaced by pid {new}")
    for failure in outcome.failures[:5]:
        print(f"drill: failed: {failure}", file=sys.stderr)
    return 1 if outcome.failures else 0


if __name__ == "__main__":
    sys.exit(main())
