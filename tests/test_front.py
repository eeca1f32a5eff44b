"""The cluster's front against hostile clients: deploy/haproxy.cfg as shipped, in front of real
servers, driven by clients that connect and send nothing, never finish a TLS handshake, stall
after a request's header, hold their connection after their reply, open too many
connections from one address, or offer TLS suites without forward secrecy — and by honest
ones that must still be served: requests that evaluate, or wait in the queue, longer than
any silence the front allows otherwise, from clients that half-closed after sending.

Each test runs HAProxy itself (``Front``) on the configuration rendered as make cluster
renders it (tools.circus_cluster.haproxy_config), with TLS when given a certificate that the
``certificate`` fixture writes as make cert does. The limits the tests drive a client into
are read from the shipped configuration (``configured``), so that they follow it; where a
test must outlast a silence, it runs the configuration with its silences shortened
(``shortened``), which changes how long, not which timeout applies when. Skipped where
haproxy is not installed.
"""

from __future__ import annotations

import contextlib
import os
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
CLIENT_S = 3  # timeout client in shortened()
STALL_S = 3  # an instance's --client-timeout, for clients it must drop
HEADER_WAIT_S = 2  # inspect-delay in shortened()
STATIC_RSA_SUITES = ("AES128-SHA", "AES256-SHA", "AES128-GCM-SHA256")  # no forward secrecy


def configured(pattern: str) -> int:
    """The number the shipped configuration gives where pattern's group stands."""
    match = re.search(pattern, TEMPLATE.read_text(), re.MULTILINE)
    assert match, f"{TEMPLATE} has no line matching {pattern!r}"
    return int(match.group(1))


def slots() -> int:
    """An instance's slots: the connections HAProxy sends it at once (maxconn)."""
    return configured(r"^\s*default-server .*\bmaxconn (\d+)")


def with_slots(template: str, count: int) -> str:
    """template with count slots per instance."""
    return re.sub(r"^(\s*default-server .*\bmaxconn )\d+", rf"\g<1>{count}", template, flags=re.M)


def shortened() -> str:
    """The shipped configuration with timeout client (30 s) shortened to CLIENT_S and the wait
    for a request's header (inspect-delay, 5 s) to HEADER_WAIT_S."""
    config = TEMPLATE.read_text()
    config, clients = re.subn(
        r"^(\s*timeout client )\d+s\b", rf"\g<1>{CLIENT_S}s", config, flags=re.M
    )
    config, waits = re.subn(
        r"^(\s*tcp-request inspect-delay )\d+s\b", rf"\g<1>{HEADER_WAIT_S}s", config, flags=re.M
    )
    assert clients == waits == 1, f"{TEMPLATE}: no timeout client or no inspect-delay"
    return config


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
    """HAProxy running template (deploy/haproxy.cfg, rendered) on a free port in front of the
    instances, with TLS if certificate (a PEM of certificate and key) is given; its output
    goes to haproxy.log in work_dir."""

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
        with (work_dir / "haproxy.log").open("wb") as log:
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


def connected(front: Front, first_bytes: bytes) -> socket.socket | None:
    """A connection to front that has sent first_bytes, or None if HAProxy refused it
    (closed it at once, which may show as soon as connect())."""
    try:
        sock = front.connect()
    except ConnectionError:
        return None
    try:
        sock.sendall(first_bytes)
    except ConnectionError:
        sock.close()
        return None
    return sock


def held(connections: list[socket.socket | None]) -> int:
    """How many of connections HAProxy holds open."""
    return sum(1 for sock in connections if sock and still_open(sock))


def refused(front: Front) -> bool:
    """Whether a request sent now gets its connection closed (or reset) without a reply."""
    sock = connected(front, HEADER.pack(4) + b"1+1\n")
    if sock is None:
        return True
    with sock:
        return closed_by_peer(sock, EVENT_TIMEOUT_S)


def close_all(connections: list[socket.socket]) -> None:
    for connection in connections:
        connection.close()


# --- Silent connections, and connections the instance is done with (issue 31, finding 1) --


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
        header_wait_s = configured(r"^\s*tcp-request inspect-delay (\d+)s\b")
        assert all(closed_by_peer(sock, header_wait_s + EVENT_TIMEOUT_S) for sock in silent)
    finally:
        close_all(silent)


def test_a_client_the_instance_drops_frees_its_slot_at_once(start_front: StartFront) -> None:
    """A client that sends a request's header, then stalls, is dropped by the instance
    (--client-timeout); HAProxy then closes its side too, and its slot is free for the next
    request, however long the client keeps its connection."""
    front = start_front(1, "--client-timeout", str(STALL_S))
    stalled = open_connections(front, slots(), HEADER.pack(1))  # the 1 byte never comes
    try:
        wait_until(lambda: len(front.instances[0].handlers()) == slots(), "every slot taken")
        assert front.request(b"1+1\n") == b"2\n"
    finally:
        close_all(stalled)


def test_a_client_holding_its_connection_after_its_reply_is_closed_and_frees_its_slot(
    start_front: StartFront,
) -> None:
    """After its reply the instance closes; a client that keeps its side open is closed by
    HAProxy after timeout client, which frees its slot for the next request."""
    front = start_front(1, "--client-timeout", str(NEVER_S), template=shortened())
    holding = open_connections(front, slots(), HEADER.pack(0))
    try:
        assert all(recv_frame(sock) == b"" for sock in holding)  # replied; never closed
        assert front.request(b"1+1\n") == b"2\n"
    finally:
        close_all(holding)


@pytest.mark.slow
def test_requests_silent_longer_than_any_front_timeout_are_answered_even_half_closed(
    start_front: StartFront,
) -> None:
    """Silence while a request evaluates or waits for a slot is normal: requests that
    evaluate longer than any other silence the front allows (two slots, maxconn 2, to reach
    the queue cheaply), and a larger one that waits as long in the queue behind them, are
    answered whole, whether or not their client half-closed after sending, as the protocol
    allows."""
    template = with_slots(shortened(), 2)
    front = start_front(1, "--client-timeout", str(NEVER_S), template=template, **SCRIPTED)
    sleeping = f"sleep {max(CLIENT_S, HEADER_WAIT_S) + 2}\n".encode()
    numbers = range(16_384)  # 80 KiB: more than HAProxy's buffer, which it holds while queued
    queued = "".join(f"{number} + 1\n" for number in numbers).encode()
    with contextlib.ExitStack() as stack:
        evaluating = [stack.enter_context(front.connect()) for _ in range(2)]
        for sock in evaluating:
            sock.sendall(HEADER.pack(len(sleeping)) + sleeping)
        evaluating[0].shutdown(socket.SHUT_WR)
        wait_until(lambda: len(front.instances[0].handlers()) == 2, "both to take a slot")
        waiting = stack.enter_context(front.connect())
        waiting.sendall(HEADER.pack(len(queued)) + queued)
        waiting.shutdown(socket.SHUT_WR)
        assert [recv_frame(sock) for sock in evaluating] == [b"slept\n", b"slept\n"]
        assert recv_frame(waiting) == "".join(f"{number + 1}\n" for number in numbers).encode()


# --- TLS handshakes that never end (finding 4) ----------------------------------------------


def test_connections_that_never_start_their_tls_handshake_are_closed(
    start_front: StartFront, certificate: Path
) -> None:
    front = start_front(1, certificate=certificate, template=shortened())
    silent = open_connections(front, 20)
    try:
        assert front.request(b"2*3\n") == b"6\n"  # a TLS client, served meanwhile
        assert all(closed_by_peer(sock, CLIENT_S + EVENT_TIMEOUT_S) for sock in silent)
    finally:
        close_all(silent)


# --- Many connections from one address (finding 5) ------------------------------------------


def test_an_address_holding_its_limit_of_connections_is_refused_one_more(
    start_front: StartFront,
) -> None:
    """Each connection has sent a request's header, so it holds an instance's slot or waits
    in the queue for one. Of one more than the limit, HAProxy closes one at once and holds
    the others. Which one depends on the order its threads (one per core) count them in, and
    a thread that counts while another does may refuse its connection too."""
    limit = configured(r"reject if \{ sc0_conn_cur gt (\d+) \}")
    front = start_front(1, "--client-timeout", str(NEVER_S))
    connections = [connected(front, HEADER.pack(1)) for _ in range(limit + 1)]  # 1 byte short
    try:
        wait_until(lambda: held(connections) < len(connections), "HAProxy to refuse one")
        assert limit - (os.cpu_count() or 1) <= held(connections) <= limit
    finally:
        close_all([sock for sock in connections if sock])
    wait_until(front.answers, "HAProxy to serve the address again, below its limit")


def test_an_address_opening_connections_too_fast_is_refused_new_ones(
    start_front: StartFront,
) -> None:
    """HAProxy measures the rate over a sliding period, which a burst can straddle, so the
    address opens twice the limit before it tries once more."""
    limit = configured(r"reject if \{ sc0_conn_rate gt (\d+) \}")
    front = start_front(1)
    for _ in range(2 * limit):
        with contextlib.suppress(ConnectionError):  # refused already
            front.connect().close()
    assert refused(front)


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
