"""Several instances behind HAProxy (deploy/haproxy.cfg), make cluster under stock circusd
(deploy/circus.ini, written by tools/circus_cluster.py, run by tools/cluster.sh), TLS, make
cert, and the systemd units.

The balancer tests run a real HAProxy on 127.0.0.1 with deploy/haproxy.cfg, its ports
rewritten by tools.circus_cluster.haproxy_config, in front of real servers (tests.harness.
ServerProcess, run with -v and JSON logs, which show which instance served which request), or
run make cluster itself (tools/drill.py's Cluster) under steady load, or with a request in
flight while an instance drains, or is stopped by force. They are skipped where haproxy is not
installed; .ci/run installs it.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
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
    run_client,
    wait_for_exit,
    wait_until,
)
from tools.circus_cluster import (
    CIRCUS_TEMPLATE,
    FRONT_SOCKET,
    HAPROXY_TEMPLATE,
    circus_config,
    haproxy_config,
)
from tools.drill import (
    DRAINS,
    Balancer,
    Cluster,
    DrainOutcome,
    Release,
    drill,
    free_port,
    running_cluster,
)

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


class Instances:
    """HAProxy (a tools.drill.Balancer) and the instances behind it."""

    def __init__(self, balancer: Balancer, instances: list[ServerProcess]) -> None:
        self.port = balancer.port
        self.instances = instances

    def connect(self) -> socket.socket:
        return connect(self.port)

    def request(self, payload: bytes) -> bytes:
        return request(self.port, payload)

    def served(self) -> list[list[int]]:
        return [served(instance) for instance in self.instances]


@pytest.fixture
def balancer(start_servers: StartServers, tmp_path: Path) -> Iterator[Instances]:
    """HAProxy in front of INSTANCES servers with one worker each."""
    instances = start_servers(*[[*LOG, "-n", "1"]] * INSTANCES)
    balancer = Balancer([instance.port for instance in instances], tmp_path / "haproxy.cfg")
    try:
        yield Instances(balancer, instances)
    finally:
        balancer.cleanup()


def test_shipped_haproxy_config_is_what_make_cluster_runs_by_default_but_its_socket() -> None:
    template = HAPROXY_TEMPLATE.read_text()
    assert haproxy_config(template, "127.0.0.1:1982", [1983, 1984, 1985]) == template


def test_haproxy_config_gets_the_front_socket_tls_and_one_server_line_per_instance() -> None:
    config = haproxy_config(HAPROXY_TEMPLATE.read_text(), FRONT_SOCKET, [5001, 5002], "c.pem")
    assert re.findall(r"^\s*(bind|server)\s+(\S+(?: \S+)*?)(?:\s+#.*)?$", config, re.M) == [
        ("bind", '"fd@${FRONT_FD}" ssl crt c.pem ssl-min-ver TLSv1.2'),
        ("server", "blu1 127.0.0.1:5001"),
        ("server", "blu2 127.0.0.1:5002"),
    ]


def test_shipped_circus_config_is_what_make_cluster_runs_by_default() -> None:
    template = CIRCUS_TEMPLATE.read_text()
    config = circus_config(
        template,
        1982,
        3,
        workers=2,
        server=".venv/bin/python bluserver.py",
        run_dir="build/cluster-1982",
    )
    assert config == template


def test_circus_config_gets_a_socket_and_a_watcher_per_instance() -> None:
    config = configparser.ConfigParser(interpolation=None)
    config.read_string(
        circus_config(
            CIRCUS_TEMPLATE.read_text(), 5000, 2, workers=1, server="py blu.py", run_dir="/r"
        )
    )
    sockets = {name: config[name]["port"] for name in config if name.startswith("socket:")}
    assert sockets == {"socket:front": "5000", "socket:blu1": "5001", "socket:blu2": "5002"}
    commands = [config[name]["cmd"] for name in config if name.startswith("watcher:blu")]
    assert commands == [
        f"setpriv --pdeathsig KILL py blu.py --fd $(circus.sockets.blu{number}) -n 1"
        for number in (1, 2)
    ]
    assert config["watcher:blu2"]["stdout_stream.filename"] == "/r/blu2.log"
    assert config["circus"]["endpoint"] == "ipc:///r/control.sock"


@needs_haproxy
def test_concurrent_clients_are_all_answered_right_and_spread_over_instances(
    balancer: Instances,
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
def test_requests_after_an_instance_is_killed_are_all_answered_right(balancer: Instances) -> None:
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
    balancer: Instances,
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


def gated(tmp_path: Path) -> tuple[tuple[str, bytes], Path]:
    """A request that evaluates until the test creates a file (tests/faults.py's gate), its
    reply, and the file."""
    gate = tmp_path / "gate"
    return (f"gate {gate}", b"released\n"), gate


def release_once(condition: Callable[[str], bool], gate: Path) -> Release:
    """What a drain waits for before it lets the request finish: condition on HAProxy's log."""

    def release(haproxy_log: Callable[[], str]) -> None:
        wait_until(lambda: condition(haproxy_log()), "HAProxy's log to show it")
        gate.touch()

    return release


@needs_haproxy
@pytest.mark.parametrize("setup", ["plain instance, SIGTERM", "systemctl restart (socket held)"])
def test_a_draining_instance_marked_down_by_haproxy_still_finishes_its_request(
    setup: str, tmp_path: Path
) -> None:
    # The request finishes only after HAProxy has marked its instance down: with
    # "on-marked-down shutdown-sessions", HAProxy cut it then (issue 25.10's flake).
    request, gate = gated(tmp_path)
    drain = DRAINS[setup]
    outcome = drain(request, release_once(lambda log: " is DOWN" in log, gate), tmp_path)
    assert (outcome.reply, outcome.marked_down, outcome.exit_status) == ("whole", True, 0)


@needs_haproxy
def test_make_cluster_rolling_restart_lets_the_old_process_finish_its_request(
    tmp_path: Path,
) -> None:
    request, gate = gated(tmp_path)
    outcome = DRAINS["make cluster, rolling restart (SIGHUP)"](
        request, release_once(lambda log: True, gate), tmp_path
    )
    assert (outcome.reply, outcome.marked_down, outcome.others_served) == ("whole", False, True)


@needs_haproxy
def test_ctrl_c_of_make_cluster_lets_haproxy_and_the_instances_finish_a_request(
    tmp_path: Path,
) -> None:
    request, gate = gated(tmp_path)
    outcome: DrainOutcome = DRAINS["make cluster, Ctrl-C (SIGINT)"](
        request, release_once(lambda log: True, gate), tmp_path
    )
    assert (outcome.reply, outcome.exit_status) == ("whole", 0)


@needs_haproxy
def test_a_hung_instance_is_marked_down_sent_nothing_new_and_keeps_its_request(
    balancer: Instances, tmp_path: Path
) -> None:
    payload, expected = numbered_lines(100)
    with balancer.connect() as in_flight:
        in_flight.sendall(HEADER.pack(len(payload)) + payload[:100])  # begun, not ended
        announced = {"bytes": len(payload)}
        wait_until(
            lambda: any(i.events("Request announced", **announced) for i in balancer.instances),
            "an instance to receive the request",
        )
        hung = next(i for i in balancer.instances if i.events("Request announced", **announced))
        os.kill(hung.pid, signal.SIGSTOP)
        try:
            log_path = tmp_path / "haproxy.log"
            wait_until(lambda: " is DOWN" in log_path.read_text(), "HAProxy to mark it down")
            new_requests = [numbered_lines(size) for size in range(10, 16)]
            assert [balancer.request(request) for request, _ in new_requests] == [
                reply for _, reply in new_requests
            ]
        finally:
            os.kill(hung.pid, signal.SIGCONT)
        in_flight.sendall(payload[100:])
        assert recv_frame(in_flight) == expected
    wait_until(lambda: served(hung) == [100], "its request, and only it, to be logged")


@needs_haproxy
def test_ctrl_c_stops_make_cluster_leaving_no_process() -> None:
    with running_cluster(2) as cluster:
        assert len(cluster.processes()) >= 5  # the shell, circusd, HAProxy and two servers
        cluster.interrupt()
        assert wait_for_exit(cluster.process, EXIT_TIMEOUT_S) == 0, cluster.log()
        wait_until(lambda: not cluster.processes(), "every process to exit")


@needs_haproxy
def test_ctrl_c_stops_haproxy_before_it_stops_the_instances() -> None:
    with running_cluster(2) as cluster:
        cluster.interrupt()
        assert wait_for_exit(cluster.process, EXIT_TIMEOUT_S) == 0, cluster.log()
        stops = re.findall(r"\] (\w+) stopped$", cluster.log(), re.MULTILINE)
        assert stops[0] == "haproxy" and sorted(stops[1:]) == ["blu1", "blu2"], cluster.log()


def in_flight_gated(cluster: Cluster, tmp_path: Path) -> tuple[socket.socket, Path]:
    """A request sent through the cluster that its instance's worker evaluates until the test
    creates the file returned; the connection, once the worker waits."""
    (line, _), gate = gated(tmp_path)
    in_flight = socket.create_connection(("127.0.0.1", cluster.port))
    payload = line.encode() + b"\n"
    in_flight.sendall(HEADER.pack(len(payload)) + payload)
    wait_until(lambda: Path(f"{gate}.waiting").exists(), "the request to be evaluated")
    return in_flight, gate


@needs_haproxy
@pytest.mark.parametrize("instance", ["draining", "stopped (SIGSTOP)"])
def test_a_second_ctrl_c_kills_every_process_handlers_and_workers_too(
    instance: str, tmp_path: Path
) -> None:
    # Issue 31.3: circus signals only its own children; the request's handler and worker must
    # die with their instance, not run on with ppid 1.
    with running_cluster(2, scripted=True) as cluster:
        in_flight, _ = in_flight_gated(cluster, tmp_path)  # never released: the drain never ends
        busy = next(pid for pids in cluster.pids().values() for pid in pids if children(pid))
        if instance != "draining":
            os.kill(busy, signal.SIGSTOP)  # it cannot even act on SIGTERM
        cluster.interrupt()  # HAProxy's soft stop waits for the request, which waits for ever
        wait_until(lambda: "stopping:" in cluster.log(), "the stop to begin")
        cluster.interrupt()
        assert wait_for_exit(cluster.process, EXIT_TIMEOUT_S) == 1, cluster.log()
        wait_until(lambda: not cluster.processes(), "every process to exit")
        with in_flight, pytest.raises(ConnectionError):
            recv_frame(in_flight)


def children(pid: int) -> list[int]:
    return [row.pid for row in process_table() if row.ppid == pid]


@needs_haproxy
def test_a_stop_that_outlasts_its_timeout_kills_everything_and_exits_1(tmp_path: Path) -> None:
    # Issue 31.6: a drain that never ends (here a request never released; there, one idle
    # client holding HAProxy's soft stop) is killed after STOP_TIMEOUT_S, and the exit status
    # says so (circus's own graceful timeout kills silently, and circusd exits 0).
    with running_cluster(1, scripted=True, stop_timeout_s=2) as cluster:
        in_flight, _ = in_flight_gated(cluster, tmp_path)
        cluster.interrupt()
        assert wait_for_exit(cluster.process, EXIT_TIMEOUT_S) == 1, cluster.log()
        assert "still stopping after 2 s: killing circusd" in cluster.log()
        wait_until(lambda: not cluster.processes(), "every process to exit")
        in_flight.close()


@needs_haproxy
def test_ctrl_c_during_a_rolling_restart_stops_make_cluster(tmp_path: Path) -> None:
    with running_cluster(2, scripted=True) as cluster:
        in_flight, gate = in_flight_gated(cluster, tmp_path)
        cluster.restart()  # the busy instance's old process drains: the restart waits for it
        wait_until(lambda: "Got signal SIG_HUP" in cluster.log(), "the rolling restart")
        cluster.interrupt()  # circusd refuses to stop while it restarts: the cluster insists
        gate.touch()
        with in_flight:
            assert recv_frame(in_flight) == b"released\n"
        assert wait_for_exit(cluster.process, EXIT_TIMEOUT_S) == 0, cluster.log()
        wait_until(lambda: not cluster.processes(), "every process to exit")


@needs_haproxy
def test_sigkill_of_circusd_stops_every_process_and_every_port(tmp_path: Path) -> None:
    # Issue 31.7: with circusd gone, nothing may go on accepting connections on its ports.
    with running_cluster(2, scripted=True) as cluster:
        in_flight, _ = in_flight_gated(cluster, tmp_path)
        os.kill(cluster.circusd, signal.SIGKILL)
        wait_until(lambda: not cluster.processes(), "every process to exit (parent death signals)")
        in_flight.close()
        for port in range(cluster.port, cluster.port + 3):
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port)).close()


def run_cluster_script(*options: str) -> subprocess.CompletedProcess[str]:
    """tools/cluster.sh with options, as make cluster runs it; expected to fail at once."""
    return subprocess.run(
        ["sh", "tools/cluster.sh", str(Path(sys.executable).parent), *options],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=EXIT_TIMEOUT_S,
        check=False,
    )


def test_make_cluster_without_haproxy_says_how_to_install_it() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tools.circus_cluster"],
        cwd=ROOT,
        env={**os.environ, "PATH": "/nonexistent"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == "cluster: haproxy is not installed (sudo apt-get install haproxy)\n"


@needs_haproxy
@pytest.mark.parametrize(
    ("option", "complaint"),
    [
        ("-5", "cluster: PORT=-5: its ports, -5--2, must lie in 1-65535"),
        ("65534", "cluster: PORT=65534: its ports, 65534-65537, must lie in 1-65535"),
        ("x", "cluster: argument -p/--port: invalid int value: 'x'"),
    ],
)
def test_make_cluster_refuses_a_bad_port_at_once_in_one_line(option: str, complaint: str) -> None:
    # Issue 31.11: circusd would start HAProxy again every second, for ever.
    result = run_cluster_script("-p", option)
    assert (result.returncode, result.stderr) == (1, complaint + "\n")


@needs_haproxy
def test_make_cluster_refuses_a_certificate_without_its_key_at_once_in_one_line(
    certificate: Path, tmp_path: Path
) -> None:
    certificate_only = certificate.with_suffix(".crt")
    port = str(free_port(3))
    result = run_cluster_script(
        "-p", port, "--cert", str(certificate_only), "--run-dir", str(tmp_path)
    )
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("cluster: HAProxy refuses ")
    assert "No Private Key found" in result.stderr


@needs_haproxy
def test_rolling_restart_under_load_replaces_every_process_and_fails_no_request() -> None:
    outcome = drill("roll", instances=2, clients=6)
    assert outcome.failures == []
    assert sorted(outcome.replaced) == ["blu1", "blu2", "haproxy"]
    assert outcome.served_during > 0, "requests were served while the instances restarted"
    assert outcome.exit_status == 0


@needs_haproxy
def test_killed_instance_under_load_is_started_again_and_costs_at_most_what_it_evaluated() -> None:
    outcome = drill("kill", instances=2, clients=6)
    assert len(outcome.failures) <= outcome.evaluating_at_kill, outcome.failures
    assert list(outcome.replaced) == ["blu1"]
    assert outcome.exit_status == 0


@pytest.fixture
def certificate(tmp_path: Path) -> Path:
    """make cert's certificate for localhost and 127.0.0.1, written to tmp_path: its .pem
    (certificate and key) and .crt (certificate)."""
    subprocess.run(
        ["make", "--no-print-directory", "-s", "cert", f"TLS_DIR={tmp_path}"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    return tmp_path / "bluserver.pem"


@pytest.mark.skipif(
    not (shutil.which("make") and shutil.which("openssl")),
    reason="make cert needs make and openssl",
)
def test_make_cert_writes_its_files_for_the_owner_alone_from_the_start(tmp_path: Path) -> None:
    # Issue 31.9: the key was written 0644, then chmod 600: readable by anyone meanwhile. The
    # files are created under the umask openssl runs with: this openssl records it.
    umask_seen = tmp_path / "umask"
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    openssl = fake_bin / "openssl"
    openssl.write_text(f'#!/bin/sh\numask > {umask_seen}\nexec {shutil.which("openssl")} "$@"\n')
    openssl.chmod(0o755)
    tls_dir = tmp_path / "tls"
    subprocess.run(
        ["make", "--no-print-directory", "-s", "cert", f"TLS_DIR={tls_dir}"],
        cwd=ROOT,
        env={**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}"},
        check=True,
        capture_output=True,
    )
    assert umask_seen.read_text().strip() == "0077"
    modes = {path.name: oct(path.stat().st_mode & 0o777) for path in tls_dir.iterdir()}
    assert modes == {"bluserver.pem": "0o600", "bluserver.crt": "0o644"}


@needs_haproxy
def test_make_cluster_with_a_certificate_answers_inside_tls_only(
    certificate: Path, tmp_path: Path
) -> None:
    payload, expected = numbered_lines(20)
    context = ssl.create_default_context(cafile=certificate.with_suffix(".crt"))
    with running_cluster(1, certificate=certificate) as cluster:
        plain = socket.create_connection(("127.0.0.1", cluster.port))
        with context.wrap_socket(plain, server_hostname="localhost") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
            tls.sendall(HEADER.pack(len(payload)) + payload)
            assert recv_frame(tls) == expected
        with socket.create_connection(("127.0.0.1", cluster.port), timeout=5) as plain:
            plain.sendall(HEADER.pack(len(payload)) + payload)  # not TLS: HAProxy hangs up
            with pytest.raises(ConnectionError):
                recv_frame(plain)


@needs_haproxy
def test_client_with_cafile_gets_its_reply_through_make_cluster_over_tls(
    certificate: Path, tmp_path: Path
) -> None:
    (tmp_path / "in.txt").write_text("1 + 2\n2 * 3\n")
    with running_cluster(1, certificate=certificate) as cluster:
        result = run_client(
            "-p",
            str(cluster.port),
            "--cafile",
            str(certificate.with_suffix(".crt")),
            str(tmp_path / "in.txt"),
            str(tmp_path / "out.txt"),
        )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out.txt").read_text() == "3\n6\n"


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
