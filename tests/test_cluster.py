"""Several instances behind HAProxy (deploy/haproxy.cfg, tools/cluster.py) and the systemd units.

The balancer tests run a real HAProxy on 127.0.0.1 with deploy/haproxy.cfg, its ports
rewritten by tools.cluster.haproxy_config, in front of real servers (tests.harness.ServerProcess,
run with -v and JSON logs, which show which instance served which request), or run `make
cluster`'s supervisor itself under steady load (tools/drill.py). They are skipped where
haproxy is not installed; .ci/run installs it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from client import HEADER, recv_frame
from tests.harness import (
    EXIT_TIMEOUT_S,
    LOG,
    ROOT,
    ServerProcess,
    StartServers,
    connect,
    process_table,
    request,
    session_processes,
    wait_for_exit,
    wait_until,
)
from tools.cluster import TEMPLATE, StartLimit, answers_empty_request, haproxy_config
from tools.drill import drill, free_port

HAPROXY = shutil.which("haproxy")
needs_haproxy = pytest.mark.skipif(
    not HAPROXY, reason="haproxy is not installed (sudo apt-get install haproxy)"
)
INSTANCES = 3


def numbered_lines(count: int) -> tuple[bytes, bytes]:
    """A request of count lines, the last one a division by zero, and the reply it must get."""
    lines = [f"{number} * 3 + 1" for number in range(count - 1)] + ["1/0"]
    results = [str(number * 3 + 1) for number in range(count - 1)] + ["error: division by zero"]
    return "\n".join(lines).encode() + b"\n", "\n".join(results).encode() + b"\n"


def served(server: ServerProcess) -> list[int]:
    """The line counts of the requests the server logged as served, health checks (0 lines)
    left out."""
    return [event["lines"] for event in server.events("Request served") if event["lines"]]


class Balancer:
    """HAProxy with deploy/haproxy.cfg on a free port, in front of instances."""

    def __init__(self, instances: list[ServerProcess], config_path: Path) -> None:
        assert HAPROXY
        self.instances = instances
        self.port = free_port()
        ports = [instance.port for instance in instances]
        config_path.write_text(haproxy_config(TEMPLATE.read_text(), self.port, ports))
        with config_path.with_suffix(".log").open("wb") as log:
            self.process = subprocess.Popen(
                [HAPROXY, "-db", "-f", str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )

    def connect(self) -> socket.socket:
        return connect(self.port)

    def request(self, payload: bytes) -> bytes:
        return request(self.port, payload)

    def served(self) -> list[list[int]]:
        return [served(instance) for instance in self.instances]

    def cleanup(self) -> None:
        self.process.terminate()
        wait_for_exit(self.process, EXIT_TIMEOUT_S)
        wait_until(lambda: not session_processes(self.process.pid), "HAProxy's processes to exit")


@pytest.fixture
def balancer(start_servers: StartServers, tmp_path: Path) -> Iterator[Balancer]:
    """HAProxy in front of INSTANCES servers with one worker each."""
    instances = start_servers(*[[*LOG, "-n", "1"]] * INSTANCES)
    balancer = Balancer(instances, tmp_path / "haproxy.cfg")
    try:
        wait_until(lambda: answers_empty_request(balancer.port), "HAProxy to answer")
        yield balancer
    finally:
        balancer.cleanup()


def test_shipped_config_is_what_make_cluster_runs_by_default() -> None:
    template = TEMPLATE.read_text()
    assert haproxy_config(template, 1982, [1983, 1984, 1985]) == template


def test_config_gets_one_server_line_per_instance() -> None:
    config = haproxy_config(TEMPLATE.read_text(), 5000, [5001, 5002])
    assert re.findall(r"^\s*(bind|server)\s+(.*)$", config, re.MULTILINE) == [
        (
            "bind",
            '127.0.0.1:5000         # this machine only; "bind :1982" to serve other machines too',
        ),
        ("server", "blu1 127.0.0.1:5001"),
        ("server", "blu2 127.0.0.1:5002"),
    ]


@needs_haproxy
def test_concurrent_clients_are_all_answered_right_and_spread_over_instances(
    balancer: Balancer,
) -> None:
    sizes = range(50, 62)  # each request has its own line count, to find it in the logs
    requests = [numbered_lines(size) for size in sizes]
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        replies = list(pool.map(balancer.request, [payload for payload, _ in requests]))
    assert replies == [expected for _, expected in requests]
    wait_until(
        lambda: sum(map(len, balancer.served())) == len(sizes), "every request to be logged"
    )
    by_instance = balancer.served()
    each_by_one_instance = sorted(count for counts in by_instance for count in counts)
    assert each_by_one_instance == list(sizes)
    assert sum(1 for counts in by_instance if counts) > 1, by_instance


@needs_haproxy
def test_requests_after_an_instance_is_killed_are_all_answered_right(balancer: Balancer) -> None:
    victim = balancer.instances[0].process
    victim.kill()
    victim.wait()
    # HAProxy still takes it for alive until two health checks fail: with leastconn's round
    # robin among idle instances, some of these connections go to it, are refused and
    # are redispatched to another instance.
    requests = [numbered_lines(size) for size in range(10, 19)]
    assert [balancer.request(payload) for payload, _ in requests] == [
        expected for _, expected in requests
    ]


@needs_haproxy
def test_a_draining_instance_finishes_its_request_while_new_ones_go_to_the_others(
    balancer: Balancer,
) -> None:
    payload, expected = numbered_lines(100)
    with balancer.connect() as in_flight:
        in_flight.sendall(HEADER.pack(len(payload)) + payload[:100])  # begun, not ended
        wait_until(
            lambda: any(
                instance.events("Request announced", bytes=len(payload))
                for instance in balancer.instances
            ),
            "an instance to receive the request",
        )
        draining = next(
            i for i in balancer.instances if i.events("Request announced", bytes=len(payload))
        )
        draining.process.send_signal(signal.SIGTERM)
        draining.wait_for_event("Shutting down")

        new_requests = [numbered_lines(size) for size in range(10, 16)]
        assert [balancer.request(request) for request, _ in new_requests] == [
            reply for _, reply in new_requests
        ]

        in_flight.sendall(payload[100:])
        assert recv_frame(in_flight) == expected
    assert wait_for_exit(draining.process, EXIT_TIMEOUT_S) == 0
    assert served(draining) == [100]
    others = [instance for instance in balancer.instances if instance is not draining]
    wait_until(lambda: sum(len(served(other)) for other in others) == 6, "the new requests' logs")


@needs_haproxy
def test_ctrl_c_stops_make_cluster_leaving_no_process(tmp_path: Path) -> None:
    port = free_port(ports_after=2)
    with (tmp_path / "cluster.log").open("wb") as log:
        cluster = subprocess.Popen(
            [sys.executable, "-m", "tools.cluster", "-p", str(port), "-i", "2", "-n", "1"],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    try:
        wait_until(lambda: answers_empty_request(port), "the cluster to answer")
        children = [row.pid for row in process_table() if row.ppid == cluster.pid]
        assert len(children) == 3, children  # HAProxy and two servers (handlers are theirs)
        os.killpg(cluster.pid, signal.SIGINT)  # what Ctrl-C in its terminal does
        assert wait_for_exit(cluster, EXIT_TIMEOUT_S) == 0, (tmp_path / "cluster.log").read_text()
        wait_until(lambda: not session_processes(cluster.pid), "every process to exit")
    finally:
        for pid in session_processes(cluster.pid):
            os.kill(pid, signal.SIGKILL)


def test_make_cluster_without_haproxy_says_how_to_install_it() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tools.cluster"],
        cwd=ROOT,
        env={**os.environ, "PATH": "/nonexistent"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == "cluster: haproxy is not installed (sudo apt-get install haproxy)\n"


@needs_haproxy
def test_rolling_restart_under_load_replaces_every_instance_and_fails_no_request() -> None:
    outcome = drill("roll", instances=2, clients=6)
    assert outcome.failures == []
    assert sorted(outcome.replaced) == ["blu1", "blu2"]
    assert outcome.served_during > 0, "requests were served while the instances restarted"
    assert outcome.exit_status == 0


@needs_haproxy
def test_killed_instance_under_load_is_started_again_and_costs_at_most_what_it_evaluated() -> None:
    outcome = drill("kill", instances=2, clients=6)
    assert len(outcome.failures) <= outcome.evaluating_at_kill, outcome.failures
    assert list(outcome.replaced) == ["blu1"]
    assert outcome.exit_status == 0


def test_start_limit_allows_five_starts_in_ten_seconds() -> None:
    limit = StartLimit(burst=5, interval_s=10.0)
    for start in (0.0, 1.0, 2.0, 3.0, 4.0):
        assert limit.allows_start(start)
        limit.record_start(start)
    assert not limit.allows_start(9.9)


def test_start_limit_allows_a_start_again_once_the_oldest_is_out_of_the_window() -> None:
    limit = StartLimit(burst=5, interval_s=10.0)
    for start in (0.0, 1.0, 2.0, 3.0, 4.0):
        limit.record_start(start)
    assert limit.allows_start(10.0)


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify also checks that ExecStart's program exists: point a copy at this checkout.
    for name in ("bluserver@.service", "bluserver@.socket"):
        unit = (ROOT / "deploy" / name).read_text()
        local = unit.replace("/opt/bluserver/.venv/bin/python", sys.executable)
        (tmp_path / name).write_text(local.replace("/opt/bluserver", str(ROOT)))
    assert "/opt/" not in (tmp_path / "bluserver@.service").read_text()
    result = subprocess.run(
        ["systemd-analyze", "verify", "bluserver@1983.socket", "bluserver@1983.service"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    complaints = [
        line for line in (result.stdout + result.stderr).splitlines() if "bluserver" in line
    ]
    assert (result.returncode, complaints) == (0, [])
