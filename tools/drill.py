"""Restart drills: what a rolling restart, or the loss of an instance, costs the clients.

``python -m tools.drill {roll,kill} [-i INSTANCES] [-c CLIENTS]`` starts ``make cluster``'s
supervisor (tools/cluster.py: HAProxy in front of INSTANCES instances, ``-n 1``) on free
ports, and keeps CLIENTS clients sending requests of 10 lines through HAProxy, each
replaced by the next as soon as its reply has come and been verified (tools.load's
clients).  Once WARMUP_ROUNDS requests per client have been served, it acts:

- roll: SIGHUP to the supervisor, until it reports "rolling restart done";
- kill: SIGKILL to the server process of the first instance, until a new one serves.

It goes on for as many requests again, stops the clients, stops the cluster with SIGINT
and prints the requests served and failed, in all and while the drill lasted.
tests/test_cluster.py runs the same drills, smaller.  Exits 1 if a request failed.
"""

from __future__ import annotations

import argparse
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness import EXIT_TIMEOUT_S, ROOT, process_table, session_processes, wait_until
from tools.cluster import HOST, answers_empty_request
from tools.load import LoadClient, request_lines, step

LINES = 10  # per request
WARMUP_ROUNDS = 3  # requests per client before the drill, and again after
DRILL_TIMEOUT_S = 60.0  # for the drill's event (restart done, instance back), and each phase
SERVING = re.compile(r"cluster: (blu\d+) serving on \S+ \(pid (\d+)")


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


@dataclass
class Outcome:
    """What a drill cost: requests served and failed, in all and while it lasted."""

    served: int = 0
    failures: list[str] = field(default_factory=list)
    served_during: int = 0
    failed_during: int = 0
    seconds: float = 0.0  # from the signal to the end of the drill's event
    replaced: dict[str, tuple[int, int]] = field(default_factory=dict)  # name: old, new pid
    evaluating_at_kill: int = 0  # the killed server's handlers: requests it was evaluating
    exit_status: int | None = None  # the supervisor's, after SIGINT


class Cluster:
    """`python -m tools.cluster` on free ports, in a session of its own, its output in a file."""

    def __init__(self, instances: int, log_path: Path) -> None:
        self.port = free_port(ports_after=instances)
        self.log_path = log_path
        command = ["-m", "tools.cluster", "-p", str(self.port), "-i", str(instances), "-n", "1"]
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, *command],
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        wait_until(lambda: answers_empty_request(self.port), "the cluster to answer")

    def log(self) -> str:
        return self.log_path.read_text()

    def pids(self) -> dict[str, int]:
        """Each instance's serving process, as the supervisor last reported it."""
        return {name: int(pid) for name, pid in SERVING.findall(self.log())}

    def stop(self) -> int:
        """SIGINT (a Ctrl-C), then wait for every process of the session to exit."""
        self.process.send_signal(signal.SIGINT)
        status = self.process.wait(EXIT_TIMEOUT_S)
        wait_until(lambda: not session_processes(self.process.pid), "the cluster's processes")
        return status

    def cleanup(self) -> None:
        """Kill whatever is left of the session (after a failure)."""
        for pid in session_processes(self.process.pid):
            os.kill(pid, signal.SIGKILL)
        self.process.wait()


def drill(action: str, instances: int, clients: int) -> Outcome:
    """Run the drill action ("roll" or "kill") under clients' steady load; what it cost."""
    with tempfile.TemporaryDirectory(prefix="drill-") as workdir:
        cluster = Cluster(instances, Path(workdir) / "cluster.log")
        try:
            return drill_on(cluster, action, clients)
        finally:
            cluster.cleanup()


def drill_on(cluster: Cluster, action: str, clients: int) -> Outcome:
    outcome = Outcome()
    load = SteadyLoad(cluster.port, clients)
    load.run_until(lambda: load.served >= WARMUP_ROUNDS * clients, "warm-up")
    served_before = load.served
    failed_before = len(load.failures)
    old_pids = cluster.pids()
    started = time.monotonic()
    if action == "roll":
        cluster.process.send_signal(signal.SIGHUP)
        load.run_until(lambda: "rolling restart done" in cluster.log(), "rolling restart")
    else:
        victim = old_pids["blu1"]
        handlers = [row.pid for row in process_table() if row.ppid == victim]
        outcome.evaluating_at_kill = len(handlers)
        os.kill(victim, signal.SIGKILL)
        load.run_until(lambda: cluster.pids()["blu1"] != victim, "new blu1")
    outcome.seconds = time.monotonic() - started
    outcome.served_during = load.served - served_before
    outcome.failed_during = len(load.failures) - failed_before
    served_after = load.served + WARMUP_ROUNDS * clients
    load.run_until(lambda: load.served >= served_after, "requests after the drill")
    load.stop()
    new_pids = cluster.pids()
    for name, pid in old_pids.items():
        if new_pids[name] != pid:
            outcome.replaced[name] = (pid, new_pids[name])
    outcome.served = load.served
    outcome.failures = load.failures
    outcome.exit_status = cluster.stop()
    return outcome


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.drill",
        description="A rolling restart (roll) or the SIGKILL of an instance (kill) of make "
        "cluster under steady load; prints the requests served and failed.",
    )
    parser.add_argument("action", choices=("roll", "kill"))
    parser.add_argument("-i", "--instances", type=int, default=3, help="(default: %(default)s)")
    parser.add_argument("-c", "--clients", type=int, default=20, help="(default: %(default)s)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
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
