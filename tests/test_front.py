"""The cluster's front against hostile clients: deploy/haproxy.cfg as shipped, in front of real
servers, driven by clients that connect and send nothing, never finish a TLS handshake, open
too many connections from one address, or offer TLS suites without forward secrecy — and by
honest ones that must still be served: a request that evaluates, or waits in the queue,
longer than every silence the front allows, from a client that half-closed after sending.

Each test runs HAProxy itself (``Front``) on the configuration rendered as make cluster
renders it (tools.circus_cluster.haproxy_config), with TLS when given a certificate that the
``certificate`` fixture writes as make cert does. The limits the tests drive a client into
are read from the shipped configuration (``configured``), so that they follow it. Skipped
where haproxy is not installed.
"""

from __future__ import annotations

import contextlib
import re
import select
import shutil
import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from client import HEADER, recv_frame
from tests.harness import (
    EVENT_TIMEOUT_S,
    EXIT_TIMEOUT_S,
    JSON_LOG,
    ROOT,
    SCRIPTED,
    ServerProcess,
    StartServers,
    wait_for_exit,
    wait_until,
)
from tools.circus_cluster import haproxy_config

pytestmark = pytest.mark.skipif(
    not shutil.which("haproxy"), reason="haproxy is not installed (sudo apt-get install haproxy)"
)

TEMPLATE = ROOT / "deploy" / "haproxy.cfg"
HOST = "127.0.0.1"
SILENT_CONNECTIONS = 45  # the attack: every slot of 3 instances (maxconn 15 each)
PROBE_TIMEOUT_S = 0.5  # for one look whether HAProxy answers yet
NEVER_S = 600  # an instance's --client-timeout that no test reaches: only HAProxy may close
STATIC_RSA_SUITES = ("AES128-SHA", "AES256-SHA", "AES128-GCM-SHA256")  # no forward secrecy


def configured(pattern: str) -> int:
    """The number the shipped configuration gives where pattern's group stands."""
    match = re.search(pattern, TEMPLATE.read_text(), re.MULTILINE)
    assert match, f"{TEMPLATE} has no line matching {pattern!r}"
    return int(match.group(1))


def longest_silence_s() -> int:
    """The longest a client may stay silent before its connection reaches an instance: the
    TLS handshake's bound (timeout client) or the wait for a request (inspect-delay)."""
    client_s = configured(r"^\s*timeout client (\d+)s\b")
    inspect_s = configured(r"^\s*tcp-request inspect-delay (\d+)s\b")
    return max(client_s, inspect_s)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def closed_by_peer(sock: socket.socket, timeout_s: float) -> bool:
    """Whether the other end closes sock (a FIN or a reset) within timeout_s, sock sending
    nothing meanwhile."""
    if not select.select([sock], [], [], timeout_s)[0]:
        return False
    try:
        return sock.recv(1) == b""
    except ConnectionError:
        return True


def still_open(sock: socket.socket) -> bool:
    """Whether the other end has neither closed sock nor sent anything on it."""
    return not select.select([sock], [], [], 0)[0]


class Front:
    """HAProxy running deploy/haproxy.cfg (or template) on a free port in front of the
    instances on ports, with TLS if certificate (a PEM of certificate and key) is given."""

    def __init__(
        self,
        instances: list[ServerProcess],
        work_dir: Path,
        certificate: Path | None,
        template: str,
    ) -> None:
        self.instances = instances
        self.port = free_port()
        self.context: ssl.SSLContext | None = None
        if certificate:
            self.context = ssl.create_default_context(cafile=certificate.with_suffix(".crt"))
        config_path = work_dir / "haproxy.cfg"
        pem = str(certificate) if certificate else None
        ports = [instance.port for instance in instances]
        config_path.write_text(haproxy_config(template, f"{HOST}:{self.port}", ports, pem))
        self.log = work_dir / "haproxy.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                ["haproxy", "-db", "-f", str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        wait_until(self.answers, "HAProxy to answer an empty request")

    def connect(self, timeout_s: float = EVENT_TIMEOUT_S) -> socket.socket:
        """A connection to the front, not yet speaking TLS."""
        return socket.create_connection((HOST, self.port), timeout=timeout_s)

    def request(
        self,
        payload: bytes,
        context: ssl.SSLContext | None = None,
        timeout_s: float = EVENT_TIMEOUT_S,
    ) -> bytes:
        """Send one request (inside TLS if the front serves TLS; with context, that one's);
        return the reply."""
        context = context or self.context
        with contextlib.ExitStack() as stack:
            sock = stack.enter_context(self.connect(timeout_s))
            if context:
                sock = stack.enter_context(context.wrap_socket(sock, server_hostname="localhost"))
            sock.sendall(HEADER.pack(len(payload)) + payload)
            return bytes(recv_frame(sock))

    def answers(self) -> bool:
        try:
            return self.request(b"", timeout_s=PROBE_TIMEOUT_S) == b""
        except OSError:  # ssl.SSLError among them
            return False

    def cleanup(self) -> None:
        self.process.terminate()  # HAProxy stops at once, closing every connection
        wait_for_exit(self.process, EXIT_TIMEOUT_S)


StartFront = Callable[..., Front]


@pytest.fixture
def start_front(start_servers: StartServers, tmp_path: Path) -> Iterator[StartFront]:
    """start_front(instances, *args, certificate=None, template=shipped, **options) -> a Front
    before that many servers (bluserver.py -n 1 *args, JSON logs, ServerProcess options), all
    stopped after the test: HAProxy first, which closes every client's connection."""
    fronts: list[Front] = []

    def start(
        instances: int,
        *args: str,
        certificate: Path | None = None,
        template: str | None = None,
        **options: object,
    ) -> Front:
        servers = start_servers(*[["-n", "1", *JSON_LOG, *args]] * instances, **options)
        fronts.append(Front(servers, tmp_path, certificate, template or TEMPLATE.read_text()))
        return fronts[-1]

    yield start
    for front in fronts:
        front.cleanup()


@pytest.fixture
def certificate(tmp_path: Path) -> Path:
    """A self-signed certificate for localhost, as make cert writes it: tmp_path/front.pem
    (certificate, then key), and front.crt (the certificate alone, for clients)."""
    crt = tmp_path / "front.crt"
    key = tmp_path / "front.key"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"),
            *("-keyout", str(key), "-out", str(crt)),
        ],
        check=True,
        capture_output=True,
    )
    pem = tmp_path / "front.pem"
    pem.write_bytes(crt.read_bytes() + key.read_bytes())
    return pem


def open_connections(front: Front, count: int, first_bytes: bytes = b"") -> list[socket.socket]:
    """count connections to front, each having sent first_bytes (none: silent)."""
    connections = []
    for _ in range(count):
        connections.append(front.connect())
        connections[-1].sendall(first_bytes)
    return connections


def close_all(connections: list[socket.socket]) -> None:
    for connection in connections:
        connection.close()


# --- Connections that send nothing (issue 31, finding 1) ------------------------------------


@pytest.mark.slow
def test_silent_connections_take_no_instance_slot_and_haproxy_closes_them(
    start_front: StartFront,
) -> None:
    """45 connections that send nothing once took every slot of 3 instances, and a request
    waited until their client closed them. Now they wait in HAProxy, which closes them."""
    front = start_front(3, "--client-timeout", str(NEVER_S))
    silent = open_connections(front, SILENT_CONNECTIONS)
    try:
        assert front.request(b"1+1\n") == b"2\n"
        assert all(still_open(sock) for sock in silent)  # answered while they all hold on
        deadline_s = longest_silence_s() + EVENT_TIMEOUT_S
        assert all(closed_by_peer(sock, deadline_s) for sock in silent)
    finally:
        close_all(silent)


@pytest.mark.slow
def test_requests_silent_longer_than_any_front_timeout_are_answered_even_half_closed(
    start_front: StartFront, tmp_path: Path
) -> None:
    """Silence after a request is sent is normal: a request that evaluates longer than every
    silence the front allows, and a larger one waiting in the queue as long behind it (one
    slot, maxconn 1, to reach the queue cheaply), are answered whole, their clients having
    half-closed after sending, as the protocol allows."""
    template = re.sub(r"\bmaxconn 15\b", "maxconn 1", TEMPLATE.read_text())
    front = start_front(1, template=template, **SCRIPTED)
    evaluating_s = longest_silence_s() + 2
    sleeping = f"sleep {evaluating_s}\n".encode()
    numbers = range(16_384)  # 80 KiB: more than HAProxy's buffer, which it holds while queued
    queued_payload = "".join(f"{number} + 1\n" for number in numbers).encode()
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(front.connect(evaluating_s + EVENT_TIMEOUT_S))
        first.sendall(HEADER.pack(len(sleeping)) + sleeping)
        first.shutdown(socket.SHUT_WR)
        wait_until(front.instances[0].handlers, "the first request to take the only slot")
        second = stack.enter_context(front.connect(2 * evaluating_s + EVENT_TIMEOUT_S))
        second.sendall(HEADER.pack(len(queued_payload)) + queued_payload)
        second.shutdown(socket.SHUT_WR)
        assert recv_frame(first) == b"slept\n"
        assert recv_frame(second) == "".join(f"{number + 1}\n" for number in numbers).encode()


# --- TLS handshakes that never end (finding 4) ----------------------------------------------


@pytest.mark.slow
def test_connections_that_never_start_their_tls_handshake_are_closed(
    start_front: StartFront, certificate: Path
) -> None:
    front = start_front(1, certificate=certificate)
    silent = open_connections(front, 20)
    try:
        assert front.request(b"2*3\n") == b"6\n"  # a TLS client, served meanwhile
        deadline_s = longest_silence_s() + EVENT_TIMEOUT_S
        assert all(closed_by_peer(sock, deadline_s) for sock in silent)
    finally:
        close_all(silent)


# --- Many connections from one address (finding 5) ------------------------------------------


def test_an_address_holding_its_limit_of_connections_is_refused_one_more(
    start_front: StartFront,
) -> None:
    """Each connection has sent a request's header, so it holds an instance's slot or waits
    in the queue for one. Of one more than the limit, HAProxy closes one at once (which one
    depends on the order its threads accept them in) and holds all the others."""
    limit = configured(r"reject if \{ sc0_conn_cur gt (\d+) \}")
    front = start_front(1, "--client-timeout", str(NEVER_S))
    connections = open_connections(front, limit + 1, HEADER.pack(1))  # the 1 byte never comes
    try:
        wait_until(
            lambda: not all(still_open(sock) for sock in connections), "HAProxy to close one"
        )
        assert sum(still_open(sock) for sock in connections) == limit
    finally:
        close_all(connections)
    wait_until(front.answers, "HAProxy to serve the address again, below its limit")


def test_an_address_opening_connections_too_fast_is_refused_new_ones(
    start_front: StartFront,
) -> None:
    limit = configured(r"reject if \{ sc0_conn_rate gt (\d+) \}")
    front = start_front(1)
    for _ in range(limit):
        front.connect().close()
    with front.connect() as refused:
        refused.sendall(HEADER.pack(4) + b"1+1\n")
        assert closed_by_peer(refused, EVENT_TIMEOUT_S)


# --- TLS suites (finding 8) -----------------------------------------------------------------


def tls_1_2_context(certificate: Path, suites: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=certificate.with_suffix(".crt"))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(suites)
    return context


def test_tls_1_2_is_served_with_forward_secrecy_only(
    start_front: StartFront, certificate: Path
) -> None:
    front = start_front(1, certificate=certificate)
    assert front.request(b"1+1\n") == b"2\n"  # TLS 1.3, as the client offers it
    ecdhe = tls_1_2_context(certificate, "ECDHE-RSA-AES128-GCM-SHA256")
    assert front.request(b"1+1\n", ecdhe) == b"2\n"
    for suite in STATIC_RSA_SUITES:
        with pytest.raises(ssl.SSLError, match=r"HANDSHAKE_FAILURE|NO_SHARED_CIPHER"):
            front.request(b"1+1\n", tls_1_2_context(certificate, suite))
