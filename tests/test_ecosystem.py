"""Everything around the server: the zipapp, the --help of the server and the client, and the
key=value logs.  (The client's options are tested with the client, in tests/test_client.py.)

Servers run as real processes (``bluserver.py``, or ``bluserver.pyz`` built by
tools/make_zipapp.py) on 127.0.0.1 and ephemeral ports, and no process of theirs outlives
the test; ``--help`` runs each script as a user runs it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

from tests.harness import ServerProcess, StartServer, run_python
from tools import make_zipapp

PAYLOAD = b"1 + 2\n2 ** 10\n(1\n7 / 0\n"
REPLY = b"3\n1024\nerror: missing ')' at column 3\nerror: division by zero\n"
SUPPORTED_EXTREMES = ("3.9", "3.13")  # the oldest and newest Python the zipapp must run on


# --- Helpers: interpreters, and a stopped server's log. ----------------------------------


def find_interpreter(version: str) -> str | None:
    """A working python<version>: pyenv's newest patch release of it, else one on PATH."""
    pyenv_versions = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    installed = pyenv_versions.iterdir() if pyenv_versions.is_dir() else []
    release_name = re.compile(re.escape(version) + r"\.(\d+)")  # 3.9.18: patch release 18
    releases = []
    for path in installed:
        match = release_name.fullmatch(path.name)
        if match:
            releases.append((int(match.group(1)), path / "bin" / "python"))
    candidates = [str(python) for _, python in sorted(releases, reverse=True)]
    candidates.append(shutil.which(f"python{version}") or "")
    for candidate in filter(None, candidates):
        check = subprocess.run([candidate, "-c", "import sys"], capture_output=True, check=False)
        if check.returncode == 0:
            return candidate
    return None


def zipapp_interpreters() -> list[Any]:
    """The running interpreter, then 3.9 and 3.13: skipped, visibly, where this machine lacks
    them."""
    running = "{}.{}".format(*sys.version_info[:2])
    params = [pytest.param(sys.executable, id=f"running-python{running}")]
    for version in SUPPORTED_EXTREMES:
        if version == running:
            continue
        python = find_interpreter(version)
        missing = pytest.mark.skip(
            reason=f"python{version} not found (pyenv or PATH); the zipapp is untested on it"
        )
        params.append(pytest.param(python, id=f"python{version}", marks=() if python else missing))
    return params


def log_lines(server: ServerProcess) -> list[str]:
    """The server's log lines, after stopping it (the banner is not among them)."""
    assert server.stop() == 0
    return server.output().splitlines()


# --- The zipapp. ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def built_zipapp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_zipapp.build(tmp_path_factory.mktemp("dist") / "bluserver.pyz")


@pytest.fixture
def lone_zipapp(built_zipapp: Path, tmp_path: Path) -> Path:
    """The zipapp copied alone into an empty directory."""
    app = tmp_path / "app.pyz"
    shutil.copy(built_zipapp, app)
    assert sorted(tmp_path.iterdir()) == [app]
    return app


@pytest.mark.parametrize("python", zipapp_interpreters())
def test_zipapp_copied_alone_serves_without_site_packages_and_exits_0_on_sigterm(
    python: str, lone_zipapp: Path, start_server: StartServer
) -> None:
    server = start_server(
        "-n", "2", command=[python, "-S", lone_zipapp.name], cwd=lone_zipapp.parent
    )
    assert server.request(PAYLOAD) == REPLY
    assert server.stop() == 0


def test_zipapp_holds_the_modules_an_entry_point_and_pyparsing_source_only(
    built_zipapp: Path,
) -> None:
    with zipfile.ZipFile(built_zipapp) as archive:
        names = set(archive.namelist())
    assert {
        "__main__.py",
        "bluserver.py",
        "worker.py",
        "grammar.py",
        "client.py",
        "pyparsing/__init__.py",
    } <= names
    assert "pyparsing-LICENSE" in names
    assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]


def test_zipapp_is_executable_and_starts_with_an_env_python3_shebang(built_zipapp: Path) -> None:
    assert built_zipapp.read_bytes().startswith(b"#!/usr/bin/env python3\n")
    assert os.access(built_zipapp, os.X_OK)


def test_make_zipapp_writes_the_archive_to_the_path_given_on_its_command_line(
    tmp_path: Path,
) -> None:
    output = tmp_path / "elsewhere" / "custom.pyz"
    result = run_python("-m", "tools.make_zipapp", str(output))
    assert result.returncode == 0, result.stderr
    assert zipfile.is_zipfile(output)
    assert str(output) in result.stdout


# --- --help. --------------------------------------------------------------------------

HELP_OPTIONS = {
    "bluserver.py": [
        "-a",
        "-p",
        "-n",
        "-v",
        "--log-format",
        "--max-bytes",
        "--max-reply-bytes",
        "--max-children",
        "--client-timeout",
        "--min-rate",
        "--worker-timeout",
        "--cpu-floor",
        "--cpu-per-mib",
        "--fd",
    ],
    "client.py": [
        "input",
        "output",
        "-a",
        "-p",
        "--timeout",
        "--format",
        "--tls",
        "--cafile",
        "--server-name",
    ],
}


@pytest.mark.parametrize("script", sorted(HELP_OPTIONS))
def test_help_exits_0_documents_every_option_and_shows_an_example(script: str) -> None:
    result = run_python(script, "--help")
    assert result.returncode == 0
    undocumented = [
        option
        for option in HELP_OPTIONS[script]
        # an entry of the option list: "  -a ADDRESS, --address ADDRESS", "  input"
        if not re.search(
            rf"^ +(?:-\w(?: \S+)?, )?{re.escape(option)}(?: |,|$)", result.stdout, re.MULTILINE
        )
    ]
    assert undocumented == []
    assert "examples:" in result.stdout
    assert f"python {script}" in result.stdout.split("examples:", 1)[1]


# --- Logs. ----------------------------------------------------------------------------

KV_EVENT = re.compile(
    # A request's events carry its uuid; the server's own events have none.
    r"^\[bluserver[.\w]*\] [\d-]+ [\d:,]+: [A-Z]+ (uuid='[0-9a-f]{32}' )?pname='[^']+' pid=\d+ "
    r"event='[^']+'"
)


def test_verbose_log_lines_carry_uuid_pname_pid_and_event(
    start_server: StartServer,
) -> None:
    server = start_server("-v")
    server.request(PAYLOAD)
    lines = log_lines(server)
    assert [line for line in lines if not KV_EVENT.match(line)] == []
    events = set(re.findall(r" event='([^']+)'", "\n".join(lines)))
    assert events == {
        "Server started",
        "Incoming connection",
        "Request announced",
        "Worker started",
        "Worker finished",
        "Request served",
        "Shutting down",
        "Server stopped",
    }
