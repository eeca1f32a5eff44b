"""socketserver's contracts on the server main() runs: bluserver.ArmouredServer, the armour of
serving.py composed over the lesson, keeps BaseServer's and ForkingMixIn's promises under
their names.  Its own loop is serve_until_signalled (tests/test_lifecycle.py runs it as
main() does); here socketserver's serve_forever, shutdown and server_close are called as a
program that embeds the server would call them, so the server runs in the test's process,
on 127.0.0.1 and an ephemeral port.
"""

from __future__ import annotations

import argparse
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import bluserver
import lesson
from tests.faults import wait_for
from tests.harness import EVENT_TIMEOUT_S


class GatedHandler(lesson.RequestHandler):
    """The lesson's handler, whose handle() only waits until the file at ``gate`` exists: it
    outlives its fork as long as the test wants."""

    gate = ""  # set by the test before the fork

    def handle(self) -> None:
        wait_for(self.gate)


class GatedServer(bluserver.ArmouredServer):
    """The server main() runs, its handlers gated."""

    handler_class = GatedHandler


@pytest.fixture
def options() -> argparse.Namespace:
    return bluserver.parse_args(["-a", "127.0.0.1", "-p", "0"])


@pytest.fixture
def gated_server(options: argparse.Namespace, tmp_path: Path) -> Iterator[GatedServer]:
    GatedHandler.gate = str(tmp_path / "gate")
    with GatedServer(options) as server:
        try:
            yield server
        finally:  # a handler left by a failed test ends, before server_close waits for it
            Path(GatedHandler.gate).touch()


def test_shutdown_from_another_thread_stops_serve_forever(
    options: argparse.Namespace,
) -> None:
    with bluserver.ArmouredServer(options) as server:
        loop = threading.Thread(target=server.serve_forever, daemon=True)
        loop.start()
        stopper = threading.Thread(target=server.shutdown, daemon=True)
        stopper.start()
        stopper.join(EVENT_TIMEOUT_S)
        assert not stopper.is_alive(), "shutdown() returns once serve_forever has stopped"
        loop.join(EVENT_TIMEOUT_S)
        assert not loop.is_alive()


def test_server_close_waits_for_every_handler_under_block_on_close(
    gated_server: GatedServer,
) -> None:
    assert gated_server.block_on_close  # ForkingMixIn's default
    with socket.create_connection(("127.0.0.1", gated_server.server_address[1])) as client:
        client.sendall(b"x")  # deferred accept hands over a connection that has sent something
        gated_server.handle_request()  # socketserver's loop, one turn: a handler is forked
        (handler,) = gated_server.active_children
        Path(GatedHandler.gate).touch()  # it ends after a poll of the gate: not yet
        gated_server.server_close()
        assert not gated_server.active_children
        with pytest.raises(ChildProcessError):  # reaped already
            os.waitpid(handler, os.WNOHANG)
