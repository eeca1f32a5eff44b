"""Benchmark bluserver: evaluation speed, end-to-end speed, latency and memory, in one table.

Run ``make bench``, or ``.venv/bin/python bench.py [--repeats N] [--quick]``.  It prints one
table of times and ratios, each ratio marked against its target.  Standard library and the
repository's modules only; servers run as subprocesses on 127.0.0.1 and an ephemeral port.

Every measurement uses the same deterministic, seed-like input: 300,000 lines of 2-10
integers 1-99 joined by ``+ - * /`` with single spaces, plus the seed's hostile lines.

1. yardstick    a plain one-process evaluator written here (one regular expression,
                ``re.split``, ``int``, a left-to-right fold): the speed to beat;
2. evaluator    the project's own evaluator in this process, exactly what a worker does:
                ``worker.evaluate_block`` over ``worker.line_blocks``;
3. end to end   one request through a real server with the wire protocol, ``-n 1`` and
                ``-n 2``; each reply must equal the evaluator's result;
4. one line     round trips of a one-line request to the ``-n 2`` server: median and p99;
5. 100 MB       the input repeated to ~100 MB as one request to the ``-n 2`` server: its
                time, and the peak RSS of the largest server process and of the whole
                server (every process in its session), sampled from /proc.

Times 1, 2, 3 and 5 are medians of --repeats runs taken in turn, so that a noisy neighbour
slows them alike; the peak RSS comes from one more 100 MB request of its own, since sampling
costs CPU.  load.py reuses ``seed_like_lines`` and ``ServerProcess`` from here.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import platform
import random
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TypeVar, Union

import client
import worker

Number = Union[int, float]
Result = TypeVar("Result")

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
BANNER = re.compile(r"serving on \S+:(\d+)")
SEED = 1982
HOSTILE_LINES = ("import sys;sys.exit()", "import time;time.sleep(3600)", "1/0")
OPERANDS = [str(number) for number in range(1, 100)]
OPERATORS = "+-*/"
MIN_OPERANDS, MAX_OPERANDS = 2, 10
REQUEST_TIMEOUT_S = 300.0
EXIT_TIMEOUT_S = 60.0
RSS_SAMPLE_INTERVAL_S = 0.02
MB = 1_000_000


@dataclass(frozen=True)
class Plan:
    """How much to measure: the full run, or the --quick smoke run."""

    lines: int
    repeats: int
    round_trips: int
    big_request_bytes: int


FULL_PLAN = Plan(lines=300_000, repeats=5, round_trips=300, big_request_bytes=100 * MB)
QUICK_PLAN = Plan(lines=30_000, repeats=1, round_trips=50, big_request_bytes=10 * MB)


# --- The input. -------------------------------------------------------------------------


def seed_like_lines(count: int, seed: int) -> list[str]:
    """count flat lines like the seed's operations.txt, then HOSTILE_LINES spread among them."""
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        operands = rng.choices(OPERANDS, k=rng.randint(MIN_OPERANDS, MAX_OPERANDS))
        operators = rng.choices(OPERATORS, k=len(operands) - 1)
        lines.append(operands[0] + "".join(f" {op} {operand}" for op, operand in zip(operators, operands[1:])))
    for number, line in enumerate(HOSTILE_LINES, 1):
        lines.insert(number * len(lines) // (len(HOSTILE_LINES) + 1), line)
    return lines


def to_payload(lines: Sequence[str]) -> bytes:
    return "".join(line + "\n" for line in lines).encode("utf-8")


# --- 1. The yardstick: a plain evaluator of the flat form, written the obvious way. -----

YARDSTICK_LINE = re.compile(r"[0-9]+(?: ?[-+*/] ?[0-9]+)*")
ADDITIVE_OPERATOR = re.compile(r"([-+])")  # int() ignores the spaces left around operands
MULTIPLICATIVE_OPERATOR = re.compile(r"([*/])")


def yardstick(payload: bytes) -> bytes:
    """One result line per line of payload, like the server's reply."""
    results = [yardstick_line(line) for line in payload.decode("utf-8").splitlines()]
    results.append("")  # so that join ends the last result line with '\n' too
    return "\n".join(results).encode("utf-8")


def yardstick_line(line: str) -> str:
    if not YARDSTICK_LINE.fullmatch(line):
        return "error: invalid expression"
    parts = ADDITIVE_OPERATOR.split(line)  # term, sign, term, sign, term ...
    try:
        total = yardstick_term(parts[0])
        for sign, term in zip(parts[1::2], parts[2::2]):
            total = total + yardstick_term(term) if sign == "+" else total - yardstick_term(term)
    except ZeroDivisionError:
        return "error: division by zero"
    return str(total)


def yardstick_term(term: str) -> Number:
    parts = MULTIPLICATIVE_OPERATOR.split(term)  # factor, operator, factor ...
    value: Number = int(parts[0])
    for operator, factor in zip(parts[1::2], parts[2::2]):
        value = value * int(factor) if operator == "*" else value / int(factor)
    return value


def check_yardstick(payload: bytes, expected: bytes) -> None:
    """Raise RuntimeError unless the yardstick computes the same values as expected
    (two error lines agree whatever their reasons): the race must be a fair one."""
    disagreements = sum(
        1
        for got, want in zip(yardstick(payload).split(b"\n"), expected.split(b"\n"))
        if got != want and not (got.startswith(b"error: ") and want.startswith(b"error: "))
    )
    if disagreements:
        raise RuntimeError(f"the yardstick and the project's evaluator disagree on {disagreements} lines")


# --- 2. The project's evaluator, as a worker runs it. ----------------------------------


def evaluate_in_process(payload: bytes) -> bytes:
    """What the workers of a request compute together, computed here in one process."""
    return b"".join(worker.evaluate_block(block) for block in worker.line_blocks(payload))


# --- 3-5. A real server, and what its processes hold. ------------------------------------


class ServerProcess:
    """``python bluserver.py -a 127.0.0.1 -p 0 -n WORKERS`` in a session of its own.

    A context manager: leaving it stops the server with SIGTERM and raises RuntimeError
    unless it exits 0.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.command = [sys.executable, "bluserver.py", "-a", HOST, "-p", "0", "-n", str(workers)]
        self.process = subprocess.Popen(
            self.command, cwd=ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True
        )
        assert self.process.stdout is not None
        banner = self.process.stdout.readline()
        match = BANNER.search(banner)
        if not match:
            self.process.kill()
            self.process.wait()
            raise RuntimeError(f"server did not start: {' '.join(self.command)} printed {banner!r}")
        self.port = int(match.group(1))

    def request(self, payload: bytes) -> bytearray:
        """Send payload as one request with the wire protocol; return the reply."""
        return client.request(payload, HOST, self.port, REQUEST_TIMEOUT_S, progress=False)

    def stop(self) -> None:
        """SIGTERM, wait; raise RuntimeError unless the server exits 0."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.communicate(timeout=EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.communicate()
        if self.process.returncode != 0:
            raise RuntimeError(f"server (port {self.port}) exited with status {self.process.returncode}")

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def session_rss_kib(session_id: int) -> list[int]:
    """VmRSS in KiB of each live process in the session, read from /proc."""
    sizes = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat_file:
                stat = stat_file.read()
            if int(stat[stat.rindex(b")") + 2 :].split()[3]) != session_id:  # after "pid (comm) "
                continue
            with open(f"/proc/{entry.name}/status", "rb") as status_file:
                status = status_file.read()
        except OSError:  # the process ended meanwhile
            continue
        match = re.search(rb"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        if match:  # a zombie has none
            sizes.append(int(match.group(1)))
    return sizes


def sample_peak_rss(session_id: int, conn: Connection) -> None:
    """Sampler process: every RSS_SAMPLE_INTERVAL_S until told to stop, then send the
    peak RSS in bytes of the largest process and of the session as a whole."""
    peak_process = peak_session = 0
    while not conn.poll(RSS_SAMPLE_INTERVAL_S):
        sizes = session_rss_kib(session_id)
        peak_process = max(peak_process, *sizes, 0)
        peak_session = max(peak_session, sum(sizes))
    conn.send((peak_process * 1024, peak_session * 1024))


@contextlib.contextmanager
def peak_rss_sampler(session_id: int) -> Iterator[list[int]]:
    """Sample the session's RSS while the block runs; the yielded list then holds
    [largest process peak, whole session peak] in bytes."""
    peaks: list[int] = []
    conn, sampler_conn = multiprocessing.Pipe()
    sampler = multiprocessing.Process(target=sample_peak_rss, args=(session_id, sampler_conn), name="rss-sampler")
    sampler.start()
    try:
        yield peaks
    finally:
        conn.send("stop")
        peaks.extend(conn.recv())
        sampler.join()


# --- Measuring. -----------------------------------------------------------------------


def timed(function: Callable[..., Result], *args: object) -> tuple[float, Result]:
    """Seconds that function(*args) took, and what it returned."""
    started = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - started, result


def timed_request(what: str, server: ServerProcess, payload: bytes, expected: bytes) -> float:
    """Seconds from connecting to having the whole reply, checked after the clock stops.

    Raises RuntimeError if the reply has the wrong number of lines or differs from expected.
    """
    seconds, reply = timed(server.request, payload)
    lines, reply_lines = client.count_lines(payload), client.count_lines(reply)
    if reply_lines != lines:
        raise RuntimeError(f"{what}: the reply has {reply_lines} lines for {lines} input lines")
    if reply != expected:
        raise RuntimeError(f"{what}: the reply differs from the in-process result")
    return seconds


@dataclass
class Results:
    """Every measurement, in seconds and bytes."""

    payload_bytes: int
    yardstick_s: float
    evaluator_s: float
    one_worker_s: float
    two_workers_s: float
    round_trip_median_s: float
    round_trip_p99_s: float
    big_payload_bytes: int
    big_s: float
    big_peak_process_bytes: int
    big_peak_session_bytes: int


def interleaved_medians(contestants: Sequence[Callable[[], float]], repeats: int) -> list[float]:
    """Median seconds of each contestant, run in turn repeats times, so that a noisy
    neighbour slows them all alike and the ratios between them stay fair."""
    runs = [[contestant() for contestant in contestants] for _ in range(repeats)]
    return [statistics.median(column) for column in zip(*runs)]


def measure_round_trips(server: ServerProcess, round_trips: int) -> tuple[float, float]:
    """Median and 99th percentile seconds of a one-line request."""
    times = [timed_request("one-line request", server, b"1 + 2 * 3\n", b"7\n") for _ in range(round_trips)]
    return statistics.median(times), statistics.quantiles(times, n=100, method="inclusive")[98]


def measure_peak_rss(server: ServerProcess, payload: bytes, expected: bytes) -> tuple[int, int]:
    """Peak RSS in bytes of the largest server process and of the whole server during one
    request of payload; a run of its own, as sampling costs CPU."""
    with peak_rss_sampler(server.process.pid) as peaks:
        timed_request("big request", server, payload, expected)
    return peaks[0], peaks[1]


def run_benchmark(payload: bytes, plan: Plan) -> Results:
    expected = evaluate_in_process(payload)
    check_yardstick(payload, expected)
    copies = max(1, round(plan.big_request_bytes / len(payload)))
    big_payload, big_expected = payload * copies, expected * copies
    with ServerProcess(workers=1) as one_worker, ServerProcess(workers=2) as two_workers:
        big_peak_process_bytes, big_peak_session_bytes = measure_peak_rss(two_workers, big_payload, big_expected)
        contestants = [
            lambda: timed(yardstick, payload)[0],
            lambda: timed(evaluate_in_process, payload)[0],
            lambda: timed_request("-n 1", one_worker, payload, expected),
            lambda: timed_request("-n 2", two_workers, payload, expected),
            lambda: timed_request("big request", two_workers, big_payload, big_expected),
        ]
        yardstick_s, evaluator_s, one_worker_s, two_workers_s, big_s = interleaved_medians(contestants, plan.repeats)
        round_trip_median_s, round_trip_p99_s = measure_round_trips(two_workers, plan.round_trips)
    return Results(
        payload_bytes=len(payload),
        yardstick_s=yardstick_s,
        evaluator_s=evaluator_s,
        one_worker_s=one_worker_s,
        two_workers_s=two_workers_s,
        round_trip_median_s=round_trip_median_s,
        round_trip_p99_s=round_trip_p99_s,
        big_payload_bytes=len(big_payload),
        big_s=big_s,
        big_peak_process_bytes=big_peak_process_bytes,
        big_peak_session_bytes=big_peak_session_bytes,
    )


# --- The table. ------------------------------------------------------------------------


def target_row(
    label: str, value: float, limit: float, *, at_least: bool = False, stretch: float | None = None, unit: str = ""
) -> list[str]:
    """A row with a target: the value, the target (at most limit, unless at_least), met or MISSED."""
    sign = ">=" if at_least else "<="

    def meets(bound: float) -> bool:
        return value >= bound if at_least else value <= bound

    target = f"{sign} {limit:g}{unit}"
    verdict = "met" if meets(limit) else "MISSED"
    if stretch is not None:
        target += f" (stretch {sign} {stretch:g})"
        verdict += ", stretch met" if meets(stretch) else ", stretch missed"
    return [label, f"{value:.2f}{unit}", target, verdict]


def table_rows(results: Results, plan: Plan) -> list[list[str]]:
    r = results
    big = f"{r.big_payload_bytes / MB:.0f} MB"
    trips = plan.round_trips
    return [
        ["measurement", "value", "target", "verdict"],
        ["1. yardstick, one process", f"{r.yardstick_s:.3f} s", "", ""],
        ["2. project evaluator, one process", f"{r.evaluator_s:.3f} s", "", ""],
        ["3. end to end, -n 1", f"{r.one_worker_s:.3f} s", "", ""],
        ["3. end to end, -n 2", f"{r.two_workers_s:.3f} s", "", ""],
        target_row(f"4. 1-line round trip, -n 2, median of {trips}", r.round_trip_median_s * 1000, 6, unit=" ms"),
        [f"4. 1-line round trip, -n 2, p99 of {trips}", f"{r.round_trip_p99_s * 1000:.2f} ms", "", ""],
        [f"5. {big} request, -n 2", f"{r.big_s:.3f} s", "", ""],
        [f"5. {big} request: peak RSS, largest server process", f"{r.big_peak_process_bytes / MB:.0f} MB", "", ""],
        [f"5. {big} request: peak RSS, whole server session", f"{r.big_peak_session_bytes / MB:.0f} MB", "", ""],
        target_row("e2e -n 2 / yardstick", r.two_workers_s / r.yardstick_s, 0.65, stretch=0.5),
        target_row("(-n 1) / (-n 2)", r.one_worker_s / r.two_workers_s, 1.6, at_least=True),
        target_row("project evaluator / yardstick", r.evaluator_s / r.yardstick_s, 1.0),
        target_row(f"{big}: peak process RSS / request size", r.big_peak_process_bytes / r.big_payload_bytes, 3),
        target_row(
            f"time per byte, {big} / {r.payload_bytes / MB:.1f} MB",
            (r.big_s / r.big_payload_bytes) / (r.two_workers_s / r.payload_bytes),
            1.3,
        ),
    ]


def print_table(rows: list[list[str]]) -> None:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    aligned = [str.ljust, str.rjust, str.ljust, str.ljust]
    for number, row in enumerate(rows):
        print("  ".join(align(cell, width) for align, cell, width in zip(aligned, row, widths)).rstrip())
        if number == 0:
            print("  ".join("-" * width for width in widths))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench.py", description="Measure bluserver's evaluation and end-to-end speed, latency and memory."
    )
    parser.add_argument(
        "--repeats", type=int, metavar="N",
        help=f"runs of each timing, the median is reported (default: {FULL_PLAN.repeats}, with --quick 1)",
    )  # fmt: skip
    parser.add_argument(
        "--quick", action="store_true",
        help=f"smoke run: {QUICK_PLAN.lines:,} lines, a {QUICK_PLAN.big_request_bytes // MB} MB big request "
        "(the targets are meant for the full run)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    plan = QUICK_PLAN if args.quick else FULL_PLAN
    if args.repeats:
        plan = Plan(plan.lines, args.repeats, plan.round_trips, plan.big_request_bytes)
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"python {platform.python_version()} ({platform.python_implementation()}), {os.cpu_count()} CPUs")
    lines = seed_like_lines(plan.lines, SEED)
    payload = to_payload(lines)
    print(f"input: {len(lines):,} lines, {len(payload) / MB:.1f} MB; runs per timing: {plan.repeats} (median shown)")
    print(f"servers: {sys.executable} bluserver.py -a {HOST} -p 0 -n N (N = 1, 2)")
    try:
        results = run_benchmark(payload, plan)
    except (RuntimeError, OSError) as error:
        print(f"bench: {error}", file=sys.stderr)
        return 1
    print_table(table_rows(results, plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
