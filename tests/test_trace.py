"""tools/trace.py (``make trace``): one request, traced in every process, follows the README's
reading route, for the lesson and for the server people run.

Each target's trace is taken once (a real server on 127.0.0.1 and an ephemeral port, a real
client) and every test reads it.  Functions are matched by their name alone (the last part of
module:qualname), so that moving a function to another module or class changes nothing here;
renaming one is a change to HOPS.
"""

from __future__ import annotations

import pytest

from tests.harness import process_table
from tools.trace import TARGETS, Process, Trace, trace

PROCESSES = ["client", "server", "handler", "worker-1"]  # one request of 4 lines: one slice
REPLY = "3\n0.5\nerror: division by zero\n9\n"  # tools.trace.REQUEST_LINES, answered

# The README's six hops ("The lesson: one request in six hops"), as the functions each
# process passes through, in this order.  Hop 2, the server's, is socketserver's own
# (ForkingMixIn.process_request): the lesson's server process runs no project function.
HOPS = {
    "client": ("round_trip", "connect", "send_frame", "wait_for_reply", "recv_exactly"),
    "handler": (
        "setup",
        "handle",
        "receive_request",
        "slice_bounds",
        "start_worker",
        "collect_results",
        "receive",
        "send_reply",
        "stop_worker",
    ),
    "worker-1": ("evaluate_slice", "slice_lines", "evaluate_line", "send_results"),
}


@pytest.fixture(scope="module", params=sorted(TARGETS))
def traced(request: pytest.FixtureRequest) -> Trace:
    return trace(request.param)


def process(traced: Trace, name: str) -> Process:
    (found,) = [process for process in traced.processes if process.name == name]
    return found


def names(process: Process) -> list[str]:
    """The functions' names: 'handle' for 'bluserver:RequestHandler.handle'."""
    return [function.rpartition(":")[2].rpartition(".")[2] for function in process.functions]


def test_the_request_traced_is_answered(traced: Trace) -> None:
    assert traced.reply == REPLY


def test_client_server_handler_and_worker_are_traced(traced: Trace) -> None:
    assert [process.name for process in traced.processes] == PROCESSES


@pytest.mark.parametrize("name", ["client", "handler", "worker-1"])
def test_client_handler_and_worker_run_project_functions(traced: Trace, name: str) -> None:
    assert process(traced, name).functions


@pytest.mark.parametrize("name", sorted(HOPS))
def test_each_process_passes_through_the_readmes_hops_in_order(traced: Trace, name: str) -> None:
    called = names(process(traced, name))
    hops = iter(called)
    # Each hop is looked for after the one before it: the hops are in order among the calls.
    missing = [hop for hop in HOPS[name] if hop not in hops]
    assert not missing, f"{name}: {missing} not in order in {called}"


def test_only_the_request_is_traced_in_the_server_process(traced: Trace) -> None:
    """Nothing of its start-up (parse_args, announce) or of its stop (the drain) is counted."""
    called = names(process(traced, "server"))
    assert not {"parse_args", "announce", "begin_drain", "drain"} & set(called)


def test_no_process_of_the_request_is_left(traced: Trace) -> None:
    alive = {row.pid for row in process_table() if row.state != "Z"}
    assert not {process.pid for process in traced.processes} & alive
