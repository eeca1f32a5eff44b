"""The container image (Dockerfile), built with podman and run as its users run it: `podman run`.

No image registry is reachable from the machines this suite runs on, so python:3.12-slim cannot
be pulled: the image is built FROM a Debian base made here with debootstrap, from the mirror
apt is configured with, and imported into podman.  It takes a minute or two and 272 MB, so it
is kept between runs under its name (base_image_name).  pip cannot reach an index inside a
build either: the wheels are downloaded on the host first, as `make docker-build` does.

Every podman command runs with CONTAINERS_CONF=deploy/containers.conf: on machines like the
ones this suite runs on, podman's defaults cannot start a container (crun refuses hybrid
cgroups, there is no systemd to manage cgroups, and the default open-file limit is above the
machine's hard limit); that file says which setting answers which, and needs runc installed.

Nothing here is skipped: where podman cannot run a container, the tests fail and say why
(image_runs's message).  tests/test_kubernetes.py runs the same image under `podman kube play`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from client import HEADER, recv_frame
from tests.harness import ROOT, connect, run_client, wait_until
from tools.drill import answers_empty_request, free_port

PODMAN = shutil.which("podman")
CONTAINERS_CONF = ROOT / "deploy" / "containers.conf"
PODMAN_ENVIRONMENT = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}
APT_SOURCES = Path("/etc/apt")
DEBOOTSTRAP_SCRIPTS = Path("/usr/share/debootstrap/scripts")  # one per suite it can install
BUILD_TIMEOUT_S = 600.0  # debootstrap downloads about 100 packages
COMMAND_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 60  # podman stop -t: longer than any request here
SERVER_PORT = 1982  # inside the container (the image's CMD)

# Lines like operations.txt's, with the results any correct server gives them.
LINES_AND_RESULTS = [
    ("87 * 12", "1044"),
    ("18 - 98 / 4", "-6.5"),
    ("55 * 3 - 10", "155"),
    ("2 ** -1", "0.5"),
    ("", ""),
    ("1/0", "error: division by zero"),
]
REQUEST = "".join(f"{line}\n" for line, _ in LINES_AND_RESULTS).encode()
REPLY = "".join(f"{result}\n" for _, result in LINES_AND_RESULTS).encode()

pytestmark = pytest.mark.slow


class Mirror(NamedTuple):
    uri: str
    suite: str  # bookworm


class AptEntry(NamedTuple):
    types: list[str]  # ["deb"], ["deb", "deb-src"]
    uris: list[str]
    suites: list[str]


def apt_entries() -> list[AptEntry]:
    """Every entry of apt's sources: the one-line format (.list) and deb822 (.sources)."""
    entries = []
    for path in [APT_SOURCES / "sources.list", *sorted(APT_SOURCES.glob("sources.list.d/*"))]:
        if path.suffix == ".sources":
            entries += deb822_entries(path.read_text())
        elif path.suffix == ".list" and path.exists():
            entries += one_line_entries(path.read_text())
    return entries


def one_line_entries(text: str) -> list[AptEntry]:
    """'deb [options] URI SUITE COMPONENT...' lines."""
    entries = []
    for line in text.splitlines():
        words = line.partition("#")[0].split()
        if words and words[1:2] and words[1].startswith("["):  # options: [arch=amd64 ...]
            options_end = next(index for index, word in enumerate(words) if word.endswith("]"))
            words = words[:1] + words[options_end + 1 :]
        if len(words) >= 3:
            entries.append(AptEntry([words[0]], [words[1]], [words[2]]))
    return entries


def deb822_entries(text: str) -> list[AptEntry]:
    """Stanzas of 'Field: value' lines, separated by blank lines."""
    entries = []
    for stanza in text.split("\n\n"):
        fields = {}
        for line in stanza.splitlines():
            name, colon, value = line.partition(":")
            if colon and not line.startswith(("#", " ")):
                fields[name] = value.split()
        if fields.get("Enabled") != ["no"]:
            entries.append(
                AptEntry(fields.get("Types", []), fields.get("URIs", []), fields.get("Suites", []))
            )
    return entries


def debian_mirror() -> Mirror:
    """The first mirror apt uses for a suite debootstrap can install.  Read here, never written
    in the repository: each machine has its own."""
    for entry in apt_entries():
        for suite in entry.suites:
            if "deb" in entry.types and entry.uris and (DEBOOTSTRAP_SCRIPTS / suite).exists():
                return Mirror(entry.uris[0], suite)
    raise AssertionError(f"no mirror for debootstrap in {APT_SOURCES}/sources.list(.d)")


def podman_result(
    *args: str, stdin: Any = None, timeout_s: float = COMMAND_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    """podman with args, under deploy/containers.conf; its result, whatever its status."""
    assert PODMAN, "podman is not installed (apt-get install podman runc; .ci/run does)"
    return subprocess.run(
        [PODMAN, *args],
        stdin=stdin,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=PODMAN_ENVIRONMENT,
        check=False,
    )


def podman(*args: str, stdin: Any = None, timeout_s: float = COMMAND_TIMEOUT_S) -> str:
    """Run podman with args; its stdout, stripped.  Fails the test, with podman's message, if
    podman fails."""
    result = podman_result(*args, stdin=stdin, timeout_s=timeout_s)
    assert result.returncode == 0, f"podman {' '.join(args)}: {result.stderr}"
    return result.stdout.strip()


def make_base_image(name: str, mirror: Mirror) -> None:
    """A minimal Debian with Python and its venv module, imported into podman as name: the
    stand-in for python:3.12-slim."""
    debootstrap = shutil.which("debootstrap")
    assert debootstrap, f"{name} is not in podman, and debootstrap is not installed to make it"
    with tempfile.TemporaryDirectory(prefix="bluserver-base-") as root:
        command = [debootstrap, "--variant=minbase", "--include=python3,python3-venv"]
        result = subprocess.run(
            [*command, mirror.suite, root, mirror.uri],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
            check=False,
        )
        assert result.returncode == 0, f"debootstrap from {mirror.uri}: {result.stdout[-2000:]}"
        with subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE) as tar:
            podman("import", "-", name, stdin=tar.stdout, timeout_s=BUILD_TIMEOUT_S)
        if tar.returncode != 0:
            podman("rmi", name)  # half a base must not be kept for the next run
            raise AssertionError(f"tar could not read all of {root}: see its message above")


def base_image_name() -> str:
    """The Debian base's name in podman, made on the first run only."""
    mirror = debian_mirror()
    name = f"localhost/bluserver-base:{mirror.suite}"
    if podman_result("image", "exists", name).returncode != 0:
        make_base_image(name, mirror)
    return name


def build_image(tag: str, *options: str) -> dict[str, Any]:
    """The checkout's Dockerfile built as tag on the Debian base, as `make docker-build` builds
    it (the docker format keeps HEALTHCHECK); its configuration (podman image inspect)."""
    download = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check"]
    subprocess.run(
        [*download, "-d", str(ROOT / "build/wheels"), "-r", str(ROOT / "requirements.txt")],
        capture_output=True,
        timeout=COMMAND_TIMEOUT_S,
        check=True,
    )
    podman(
        *("build", "--format", "docker", "--build-arg", f"BASE={base_image_name()}"),
        *(*options, "-t", tag, str(ROOT)),
        timeout_s=BUILD_TIMEOUT_S,
    )
    inspected: list[dict[str, Any]] = json.loads(podman("image", "inspect", tag))
    return inspected[0]


@pytest.fixture(scope="module")
def image() -> Iterator[dict[str, Any]]:
    """The image, tagged for this run alone (other checkouts may build at the same time), and
    removed after: its layers stay in podman's cache for the next build.  Fails at once, with
    podman's reason, where podman cannot run a container."""
    base = base_image_name()
    trial = podman_result("run", "--rm", base, "true")
    assert trial.returncode == 0, (
        f"podman cannot run a container here, even with {CONTAINERS_CONF.name} (which needs "
        f"runc: apt-get install runc): {trial.stderr}"
    )
    tag = f"localhost/bluserver:test-{os.getpid()}"
    yield build_image(tag)
    podman("rmi", tag)


def image_name(image: dict[str, Any]) -> str:
    return str(image["RepoTags"][0])


class Container:
    """A container of the image, detached (podman run -d), port 1982 published on 127.0.0.1
    at a free port; removed by cleanup.  Its health check's timer is left off (podman would
    start it through systemd, which these machines lack): tests run it themselves."""

    def __init__(self, image: dict[str, Any], *options: str, command: tuple[str, ...] = ()):
        self.port = free_port()
        self.name = f"bluserver-test-{os.getpid()}-{self.port}"
        publish = f"127.0.0.1:{self.port}:{SERVER_PORT}"
        podman(
            *("run", "-d", "--name", self.name, "-p", publish, "--health-interval", "disable"),
            *(*options, image_name(image), *command),
        )
        wait_until(lambda: answers_empty_request(self.port), f"{self.name} to serve")

    def state(self) -> dict[str, Any]:
        inspected: list[dict[str, Any]] = json.loads(podman("container", "inspect", self.name))
        return dict(inspected[0]["State"])

    def health_check(self) -> subprocess.CompletedProcess[str]:
        """Run the image's HEALTHCHECK now (podman healthcheck run): status 0 if healthy."""
        return podman_result("healthcheck", "run", self.name)

    def logs(self) -> str:
        return podman("logs", self.name)

    def holds_requests(self) -> bool:
        """Whether the server (the container's PID 1) has live children: handlers, requests
        held (as the image's HEALTHCHECK looks for them)."""
        search = "grep -qs ') [^ZX] 1 ' /proc/[0-9]*/stat"
        return podman_result("exec", self.name, "sh", "-c", search).returncode == 0

    def cleanup(self) -> None:
        podman("rm", "--force", "--time", "0", self.name)


@pytest.fixture
def container(image: dict[str, Any]) -> Iterator[Container]:
    """The image's own command, as `podman run` starts it."""
    started = Container(image)
    yield started
    started.cleanup()


def test_image_holds_every_runtime_module_and_no_test(image: dict[str, Any]) -> None:
    runtime = {
        path.name
        for path in ROOT.glob("*.py")
        if not path.name.startswith("test_") and path.name != "conftest.py"
    }
    assert {"bluserver.py", "worker.py", "grammar.py", "client.py"} <= runtime
    listed = podman("run", "--rm", image_name(image), "ls", "/app")
    assert set(listed.split()) == runtime


def test_image_runs_as_a_user_that_is_not_root(image: dict[str, Any]) -> None:
    assert image["Config"]["User"] not in ("", "root", "0")


def test_no_private_key_reaches_an_image_build(tmp_path: Path) -> None:
    # Issue 31.9: make docker-test's stage copies the whole checkout; .dockerignore must keep
    # make cert's tls/ (and any key) out. A build that copies everything shows what gets in.
    context = tmp_path / "context"
    shutil.copytree(ROOT, context, ignore=shutil.ignore_patterns(".git", ".venv*", "build"))
    (context / "tls").mkdir(exist_ok=True)
    for name in ("tls/bluserver.pem", "tls/bluserver.key", "deploy/other.key"):
        (context / name).write_text("private\n")
    (context / "Containerfile.copy-all").write_text(
        f'FROM {base_image_name()}\nCOPY . /context\nCMD ["true"]\n'
    )
    tag = f"localhost/bluserver-context:test-{os.getpid()}"
    podman("build", "-q", "-f", "Containerfile.copy-all", "-t", tag, str(context))
    try:
        found = podman(
            "run",
            "--rm",
            tag,
            "find",
            "/context",
            "-name",
            "*.pem",
            "-o",
            "-name",
            "*.key",
            "-o",
            "-name",
            "tls",
        )
    finally:
        podman("rmi", tag)
    assert found == ""


def test_container_answers_the_client(container: Container) -> None:
    port = str(container.port)
    result = run_client("-", "-", "-a", "127.0.0.1", "-p", port, stdin=REQUEST)
    assert (result.returncode, result.stdout) == (0, REPLY.decode()), result.stderr


def test_image_health_check_passes_on_a_serving_container(container: Container) -> None:
    assert container.health_check().returncode == 0


def held_request(port: int) -> Any:
    """A connection whose request has begun (its header and one byte): the server holds it in a
    handler, waiting for the rest."""
    sock = connect(port)
    sock.sendall(HEADER.pack(len(REQUEST)) + REQUEST[:1])
    return sock


def test_health_check_passes_on_a_server_busy_at_max_children(image: dict[str, Any]) -> None:
    # Issue 31.10: at --max-children the check waits in the backlog like any client; three
    # such checks made a busy container unhealthy.
    command = ("python", "bluserver.py", "-a", "0.0.0.0", "-p", "1982", "-n", "1")
    busy = Container(image, command=(*command, "--max-children", "1"))
    try:
        with held_request(busy.port) as in_flight:
            wait_until(lambda: not answers_empty_request(busy.port), "the server to be full")
            assert busy.health_check().returncode == 0
            in_flight.sendall(REQUEST[1:])
            assert recv_frame(in_flight) == REPLY
    finally:
        busy.cleanup()


def test_health_check_fails_on_a_server_that_answers_nothing_and_holds_no_request(
    container: Container,
) -> None:
    wait_until(lambda: not container.holds_requests(), "the start-up check's handler to exit")
    podman("kill", "--signal", "STOP", container.name)  # hung: its socket still accepts
    try:
        result = container.health_check()
    finally:
        podman("kill", "--signal", "CONT", container.name)
    assert (result.returncode, result.stdout.strip()) == (1, "unhealthy")


def stop_answering_the_request_in_flight(
    in_flight: socket.socket, name: str, grace_s: int, logs: Callable[[], str]
) -> tuple[int, str]:
    """`podman stop -t grace_s` the container called name while in_flight holds a request
    begun (held_request); once its server drains, send the rest, and check that the reply
    comes whole.  Returns podman stop's exit status and what it wrote to stderr."""
    stopping = subprocess.Popen(
        [PODMAN or "podman", "stop", "-t", str(grace_s), name],
        env=PODMAN_ENVIRONMENT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_until(lambda: "Shutting down" in logs(), "the server to drain")
    in_flight.sendall(REQUEST[1:])
    assert recv_frame(in_flight) == REPLY
    _, errors = stopping.communicate(timeout=STOP_TIMEOUT_S)
    return stopping.returncode, errors


def test_podman_stop_answers_a_request_in_flight_then_exits_0(container: Container) -> None:
    with held_request(container.port) as in_flight:
        wait_until(container.holds_requests, "a handler for the request")
        status, errors = stop_answering_the_request_in_flight(
            in_flight, container.name, STOP_TIMEOUT_S, container.logs
        )
    state = container.state()
    assert (status, state["Status"], state["ExitCode"]) == (0, "exited", 0), errors


def test_container_serves_with_a_read_only_root(image: dict[str, Any]) -> None:
    read_only = Container(image, "--read-only")
    try:
        result = run_client("-", "-", "-p", str(read_only.port), stdin=REQUEST)
        assert (result.returncode, result.stdout) == (0, REPLY.decode()), result.stderr
    finally:
        read_only.cleanup()
