"""Both ends of a worker in unit form: how a worker reads its slice's lines and sends its
results, and how a handler's supervised Slice (supervise.SupervisedSlice) keeps
its invariants in every state a worker can leave it in.

The Slice tests fork real workers through real Pipes, but each worker runs a script instead
of ``worker.evaluate_slice``: it sends the messages the test names (results, END_OF_SLICE)
and then exits, or dies, as a real worker might at any point.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import select
import signal
import time
from collections.abc import Iterator, Sequence
from multiprocessing.connection import Connection, wait
from typing import Callable, Union

import pytest

import events
import grammar
import supervise
import worker

EVENT_LOG = events.EventLog(logging.getLogger("test_worker"), {})
LIMIT = grammar.MAX_LINE_BYTES
BATCH = worker.DECODE_BYTES


# --- slice_lines: a slice's bytes to lines. ------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "lines"),
    [
        (b"1\n2\n", ["1", "2"]),
        (b"1\n2", ["1", "2"]),
        (b"1\r\n2\r\n", ["1", "2"]),
        (b"\n\n", ["", ""]),
        (b"1 + \xff\n", ["1 + \udcff"]),
        (b"x" * LIMIT + b"\n1", ["x" * LIMIT, "1"]),
        (b"x" * LIMIT + b"\r\n1", ["x" * LIMIT, "1"]),
        # A line within a batch is decoded, and grammar.evaluate_line measures it; one longer
        # than a batch is measured in bytes here, and never decoded.
        (b"x" * (LIMIT + 1) + b"\n1", ["x" * (LIMIT + 1), "1"]),
        (b"x" * (BATCH + 1) + b"\r\n1", [worker.LineTooLong(BATCH + 1), "1"]),
        (b"1\n" + b"x" * (BATCH + 1), ["1", worker.LineTooLong(BATCH + 1)]),
    ],
    ids=[
        "ended",
        "last-unended",
        "crlf",
        "blank",
        "not-utf8",
        "at-limit",
        "at-limit-crlf",
        "over-limit",
        "over-a-batch-crlf",
        "over-a-batch-last",
    ],
)
def test_slice_lines_examples(payload: bytes, lines: list[worker.Line]) -> None:
    assert list(worker.slice_lines(bytearray(payload), 0, len(payload))) == lines


def test_a_line_longer_than_a_batch_is_judged_by_its_bytes_and_never_decoded() -> None:
    long_line = b"1" * (3 * worker.DECODE_BYTES) + b"\xff"  # not UTF-8: decoding would show it
    payload = bytearray(b"1\n" * 1000 + long_line + b"\n2\n")
    lines = list(worker.slice_lines(payload, 0, len(payload)))
    assert lines == ["1"] * 1000 + [worker.LineTooLong(len(long_line)), "2"]


def test_slice_lines_reads_only_its_range() -> None:
    payload = bytearray(b"1\n2\n3\n4\n")
    assert list(worker.slice_lines(payload, 2, 6)) == ["2", "3"]


# --- Slice: what a handler keeps of a worker, whatever the worker does. --------------------------


# --- send_results: results up the Pipe, in messages the handler can never find half of. -----


def sent_messages(results: list[str]) -> list[bytes]:
    """The messages send_results sends for results, as the handler receives them."""
    receiver, sender = multiprocessing.Pipe(duplex=False)
    with receiver, sender:
        worker.send_results(sender, results)
        sender.send_bytes(worker.END_OF_SLICE)
        messages = []
        message = receiver.recv_bytes()
        while message != worker.END_OF_SLICE:
            messages.append(message)
            message = receiver.recv_bytes()
    return messages


LONG_RESULT = "1" + "0" * 4000  # 10 ** 4000: about one message


@pytest.mark.parametrize(
    "results",
    [["1"], ["2"] * 5000, [LONG_RESULT] * 3, [LONG_RESULT * 3, "1"], ["é" * 3000] * 2],
    ids=["one", "many-short", "long", "longer-than-a-message", "multi-byte"],
)
def test_results_go_up_the_pipe_in_messages_of_whole_lines_written_at_once(
    results: list[str],
) -> None:
    messages = sent_messages(results)
    assert b"".join(messages) == "".join(f"{result}\n" for result in results).encode()
    # At most PIPE_BUF bytes with Connection's 4-byte header: one write, which is atomic.
    assert max(map(len, messages)) <= select.PIPE_BUF - 4
    longest_line = max(len(f"{result}\n".encode()) for result in results)
    if longest_line <= worker.MESSAGE_BYTES:
        assert all(message.endswith(b"\n") for message in messages)


Script = Sequence[Union[bytes, None]]  # what a scripted worker sends, in order
STOPPED = None  # in a script: the worker stops itself there (SIGSTOP), as a debugger would


def scripted_workers(scripts: dict[int, Script]) -> Callable[..., None]:
    """A stand-in for worker.evaluate_slice: the worker for the range starting at offset sends
    the messages scripts[offset], then exits without another word (as if it died)."""

    def evaluate_slice(
        sender: Connection, payload: bytearray, start: int, end: int, *_: object
    ) -> None:
        worker.close_inherited_files(sender)  # as a real worker does
        for message in scripts[start]:
            if message is STOPPED:
                os.kill(os.getpid(), signal.SIGSTOP)
            else:
                sender.send_bytes(message)
        os._exit(0)

    return evaluate_slice


MakeSlice = Callable[..., supervise.SupervisedSlice]


@pytest.fixture
def make_slice(monkeypatch: pytest.MonkeyPatch) -> Iterator[MakeSlice]:
    """make_slice(payload, scripts) -> a Slice over all of payload, its worker started."""
    slices: list[supervise.SupervisedSlice] = []

    def make(
        payload: bytes, scripts: dict[int, Script], limit: int = 2**20
    ) -> supervise.SupervisedSlice:
        monkeypatch.setattr(worker, "evaluate_slice", scripted_workers(scripts))
        budget = supervise.ReplyBudget(limit)
        slice_ = supervise.SupervisedSlice(
            bytearray(payload), (0, len(payload)), EVENT_LOG, budget
        )
        slices.append(slice_)
        slice_.start_worker("worker-1")
        return slice_

    yield make
    for slice_ in slices:
        slice_.close()


def run_to_the_end(slice_: supervise.SupervisedSlice) -> bytes:
    """Receive until the slice is finished (no worker here is ever stuck); its stored results."""
    deadline = time.monotonic() + 10
    while not slice_.finished:
        assert time.monotonic() < deadline, "the slice never finished"
        assert slice_.receiver
        wait([slice_.receiver], timeout=1)
        slice_.receive()
    return b"".join(slice_.result_chunks())


def test_a_worker_that_says_it_is_done_finishes_its_slice(make_slice: MakeSlice) -> None:
    slice_ = make_slice(b"1\n2\n", {0: [b"1\n2\n", worker.END_OF_SLICE]})
    assert run_to_the_end(slice_) == b"1\n2\n"
    assert slice_.attempts == 1


def test_lines_a_dead_worker_did_not_answer_are_run_again_and_only_those(
    make_slice: MakeSlice,
) -> None:
    scripts = {0: [b"r1\n"], 2: [b"r2\nr3\n", worker.END_OF_SLICE]}  # the rerun starts at "2"
    slice_ = make_slice(b"1\n2\n3", scripts)
    assert run_to_the_end(slice_) == b"r1\nr2\nr3\n"
    assert slice_.attempts == 2


@pytest.mark.parametrize("payload", [b"1\n2", b"1\n2\n"], ids=["last-unended", "ended"])
def test_a_worker_lost_after_its_last_result_leaves_the_slice_finished(
    make_slice: MakeSlice, payload: bytes
) -> None:
    slice_ = make_slice(payload, {0: [b"1\n2\n"]})  # all results, then no END_OF_SLICE
    assert run_to_the_end(slice_) == b"1\n2\n"
    assert (slice_.attempts, slice_.start) == (1, len(payload))


def test_lines_still_unanswered_after_the_last_attempt_are_error_lines(
    make_slice: MakeSlice,
) -> None:
    slice_ = make_slice(b"1\n2\n3\n", {0: [b"r1\n"], 2: []})  # dies twice
    assert run_to_the_end(slice_) == b"r1\n" + supervise.WORKER_FAILED * 2
    assert (slice_.attempts, slice_.error_lines) == (supervise.ATTEMPTS, 2)


def test_results_that_would_overrun_the_reply_budget_are_refused_before_they_are_stored(
    make_slice: MakeSlice,
) -> None:
    slice_ = make_slice(b"1\n2\n", {0: [b"r1\n", b"r2\n", worker.END_OF_SLICE]}, limit=5)
    with pytest.raises(supervise.ReplyTooLarge, match=r"reply too large \(limit 5 bytes\)"):
        run_to_the_end(slice_)
    assert b"".join(slice_.result_chunks()) == b"r1\n"


class WaitedTooLong(Exception):
    """stop_worker did not return: it waited for a worker that will never exit on its own."""


def test_a_finished_worker_that_never_exits_is_killed_not_waited_for(
    make_slice: MakeSlice,
) -> None:
    slice_ = make_slice(b"1\n", {0: [b"1\n", worker.END_OF_SLICE, STOPPED]})
    assert run_to_the_end(slice_) == b"1\n"
    process = slice_.process
    assert process
    # A safety net, not a timing: without it a regression would hang the suite for ever.
    previous = signal.signal(signal.SIGALRM, raise_waited_too_long)
    signal.alarm(30)
    try:
        slice_.stop_worker()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert process.exitcode == -signal.SIGKILL


def raise_waited_too_long(signum: int, frame: object) -> None:
    raise WaitedTooLong
