"""pytest's fixtures for real servers, on tests/harness.py's ServerProcess.

``start_server`` and ``start_servers`` start servers for one test, ``server`` one shared by a
module's tests that only send it requests; every server is stopped after its test (or
module), which fails if any process of the server's session is left.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from tests.harness import ServerProcess, StartServer, StartServers


class StartedServers:
    """The servers a test starts, all stopped after it (see the fixtures below)."""

    def __init__(self) -> None:
        self.servers: list[ServerProcess] = []

    def start(
        self, arg_lists: Sequence[Sequence[str]], options: dict[str, Any]
    ) -> list[ServerProcess]:
        """A server per list of arguments: all launched, then each awaited, so that their
        start-ups (a few hundred milliseconds of imports each) overlap."""
        launched = []
        for args in arg_lists:
            launched.append(ServerProcess(args, wait=False, **options))
            self.servers.append(launched[-1])
        for server in launched:
            server.wait_until_serving()
        return launched

    def cleanup(self) -> None:
        """SIGTERM to every server still running, then each awaited: their exits overlap."""
        running = [server.process.poll() is None for server in self.servers]
        for server, signalled in zip(self.servers, running):
            if signalled:
                server.process.send_signal(signal.SIGTERM)
        for server, signalled in zip(self.servers, running):
            server.cleanup(signalled)


@pytest.fixture
def started_servers() -> Iterator[StartedServers]:
    """Every server started by start_server or start_servers, stopped after the test, which
    fails if a process is left."""
    started = StartedServers()
    yield started
    started.cleanup()


@pytest.fixture
def start_server(started_servers: StartedServers) -> StartServer:
    """start_server(*args, **options) -> a running ServerProcess (options: see its __init__).

    Every server it started is stopped after the test, which fails if a process is left.
    """

    def start(*args: str, **options: Any) -> ServerProcess:
        return started_servers.start([args], options)[0]

    return start


@pytest.fixture
def start_servers(started_servers: StartedServers) -> StartServers:
    """start_servers(args, args, ..., **options) -> running ServerProcesses, one per sequence of
    arguments, started in parallel; stopped after the test as start_server's are."""

    def start(*arg_lists: Sequence[str], **options: Any) -> list[ServerProcess]:
        return started_servers.start(arg_lists, options)

    return start


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    """A server with default options, shared by a module's tests that only send it requests."""
    shared = ServerProcess([])
    yield shared
    shared.cleanup()
