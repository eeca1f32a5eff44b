"""The container image (Dockerfile): built with podman, then served from as a container would be.

No image registry is reachable from the machines this suite runs on, so python:3.12-slim cannot
be pulled: the image is built FROM a Debian base made here with debootstrap, from the mirror
apt is configured with, and imported into podman.  It takes a minute and 275 MB, so it is kept
between runs under its name (base_image_name).  pip cannot reach an index inside a build
either: the wheels are downloaded on the host first, as `make docker-build` does.

The server runs from the image's own files: `podman image mount`, then chroot, in a mount
namespace of its own (unshare) holding /proc and a tmpfs on /tmp and on each of the image's
volumes, as the image's user, with its environment, working directory and command — what a
container engine does, without an OCI runtime (which cannot start containers where podman
runs as it does here: setrlimit is refused).  The namespace's mounts end with its processes.

Skipped, with the reason, where podman cannot build: not installed, or not run as root.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from client import HEADER, recv_frame
from tests.harness import (
    EXIT_TIMEOUT_S,
    ROOT,
    ServerProcess,
    connect,
    run_client,
    wait_for_exit,
    wait_until,
)

PODMAN = shutil.which("podman")
IMAGE = "localhost/bluserver:test"  # not `make docker-build`'s bluserver:latest
APT_SOURCES = Path("/etc/apt")
DEBOOTSTRAP_SCRIPTS = Path("/usr/share/debootstrap/scripts")  # one per suite it can install
BUILD_TIMEOUT_S = 600.0  # debootstrap downloads about 100 packages
COMMAND_TIMEOUT_S = 60.0

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


def cannot_build() -> str | None:
    """Why podman cannot build images here, or None if it can."""
    if not PODMAN:
        return "podman is not installed (apt-get install podman debootstrap; .ci/run does)"
    if os.geteuid() != 0:
        return "podman image mount and chroot need root"
    return None


CANNOT_BUILD = cannot_build()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(CANNOT_BUILD), reason=str(CANNOT_BUILD))]


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


def podman(*args: str, stdin: Any = None, timeout_s: float = COMMAND_TIMEOUT_S) -> str:
    """Run podman with args; its stdout, stripped.  Fails the test, with podman's message, if
    podman fails."""
    assert PODMAN
    result = subprocess.run(
        [PODMAN, *args],
        stdin=stdin,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert result.returncode == 0, f"podman {' '.join(args)}: {result.stderr}"
    return result.stdout.strip()


def make_base_image(name: str, mirror: Mirror) -> None:
    """A minimal Debian with Python and its venv module, imported into podman as name: the
    stand-in for python:3.12-slim."""
    debootstrap = shutil.which("debootstrap")
    if not debootstrap:
        pytest.skip(f"{name} is not in podman, and debootstrap is not installed to make it")
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


@pytest.fixture(scope="module")
def base_image() -> str:
    """The Debian base's name in podman, made on the first run only."""
    mirror = debian_mirror()
    name = f"localhost/bluserver-base:{mirror.suite}"
    assert PODMAN
    exists = subprocess.run([PODMAN, "image", "exists", name], check=False)
    if exists.returncode != 0:
        make_base_image(name, mirror)
    return name


@pytest.fixture(scope="module")
def image(base_image: str) -> dict[str, Any]:
    """IMAGE built from the checkout's Dockerfile on base_image, as `make docker-build` builds
    it; its configuration (podman image inspect)."""
    download = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check"]
    subprocess.run(
        [*download, "-d", str(ROOT / "build/wheels"), "-r", str(ROOT / "requirements.txt")],
        capture_output=True,
        timeout=COMMAND_TIMEOUT_S,
        check=True,
    )
    # chroot isolation: RUN steps need no OCI runtime.  The docker format keeps HEALTHCHECK.
    podman(
        *("build", "--isolation", "chroot", "--format", "docker", "--build-arg"),
        *(f"BASE={base_image}", "-t", IMAGE, str(ROOT)),
        timeout_s=BUILD_TIMEOUT_S,
    )
    inspected: list[dict[str, Any]] = json.loads(podman("image", "inspect", IMAGE))
    return inspected[0]


@pytest.fixture(scope="module")
def image_root(image: dict[str, Any]) -> Iterator[Path]:
    """The image's files, mounted read-only (podman image mount) for as long as the module's
    tests run."""
    root = Path(podman("image", "mount", IMAGE))
    yield root
    podman("image", "unmount", IMAGE)


def in_image(root: Path, image: dict[str, Any], argv: Sequence[str]) -> list[str]:
    """The command that runs argv in the image as a container engine would: chrooted into its
    files, in a mount namespace holding /proc and a tmpfs on /tmp and on each volume, as its
    user, in its working directory, with its environment only."""
    config = image["Config"]
    writable = ["/tmp", *config.get("Volumes", {})]
    mounts = [f"mount -t proc proc {shlex.quote(f'{root}/proc')}"] + [
        f"mount -t tmpfs tmpfs {shlex.quote(f'{root}{folder}')}" for folder in writable
    ]
    script = " && ".join([*mounts, 'exec "$@"'])
    chroot = ["chroot", f"--userspec={config['User']}", str(root)]
    environment = ["env", "-i", f"--chdir={config['WorkingDir']}", *config["Env"]]
    namespace = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"]
    return [*namespace, *chroot, *environment, *argv]


@pytest.fixture
def image_server(image_root: Path, image: dict[str, Any]) -> Iterator[ServerProcess]:
    """The image's command (CMD), listening on 127.0.0.1 and a free port instead of 0.0.0.0:1982
    (later options win): the chroot shares this machine's network."""
    server = ServerProcess([], command=in_image(image_root, image, image["Config"]["Cmd"]))
    yield server
    server.cleanup()


def test_image_holds_every_runtime_module_and_no_test(image_root: Path) -> None:
    runtime = {
        path.name
        for path in ROOT.glob("*.py")
        if not path.name.startswith("test_") and path.name != "conftest.py"
    }
    assert {"bluserver.py", "worker.py", "grammar.py", "client.py"} <= runtime
    assert {path.name for path in (image_root / "app").iterdir()} == runtime


def test_image_runs_as_a_user_that_is_not_root(image: dict[str, Any]) -> None:
    assert image["Config"]["User"] not in ("", "root", "0")


def test_image_server_answers_the_client(image_server: ServerProcess) -> None:
    port = str(image_server.port)
    result = run_client("-", "-", "-a", "127.0.0.1", "-p", port, stdin=REQUEST)
    assert (result.returncode, result.stdout) == (0, REPLY.decode()), result.stderr


def test_image_health_check_passes_on_a_serving_server(
    image_server: ServerProcess, image_root: Path, image: dict[str, Any]
) -> None:
    kind, *health_check = image["Healthcheck"]["Test"]
    assert kind == "CMD"
    command = in_image(image_root, image, [*health_check, "-p", str(image_server.port)])
    result = subprocess.run(command, capture_output=True, timeout=COMMAND_TIMEOUT_S, check=False)
    assert result.returncode == 0, result.stderr
    assert image_server.request(b"") == b""  # what the health check sent, and its answer


def test_sigterm_drains_a_request_in_flight_then_exits_0(image_server: ServerProcess) -> None:
    with connect(image_server.port) as sock:
        sock.sendall(HEADER.pack(len(REQUEST)) + REQUEST[:1])  # a handler is forked for it...
        wait_until(image_server.handlers, "a handler for the request")
        image_server.process.send_signal(signal.SIGTERM)  # ...and the server told to stop
        wait_until(lambda: "Shutting down" in image_server.output(), "the server to shut down")
        sock.sendall(REQUEST[1:])
        assert recv_frame(sock) == REPLY
    assert wait_for_exit(image_server.process, EXIT_TIMEOUT_S) == 0  # no second signal sent
    assert "requests_in_flight=1" in image_server.output()
