"""Benchmark bluserver: evaluation speed, end-to-end speed, latency and memory, in one table.

Run ``make bench`` (``python -m tools.bench [small] [--repeats N] [--quick]``).  It prints one
table of times and ratios, each ratio marked against its target; ``small`` measures only the
floor and the small-request rows (0, 4 and 8's -n 1), to compare two versions quickly.
Servers are started the one way the tests start them (``tests.harness.ServerProcess``) on
127.0.0.1 and an ephemeral port.

Two deterministic workloads.  The flat one is seed-like: 300,000 lines of 2-10 integers
1-99 joined by ``+ - * /`` with single spaces, plus the seed's hostile lines.  The full
one is 100,000 lines of the whole language, mostly outside the flat form: unary signs,
parentheses, decimals, ``// % **``.

0. floor        what the design's two forks per request cost here (fork_floor_times): a
                process that has imported the server's modules forks a child, which forks a
                grandchild that writes one byte up a pipe; both exit and are reaped.  The
                p50 of 200, in a fresh interpreter (the bench's heap would make forks
                dearer); the small-request figures are given as ratios to it (FLOOR_NOTE);
1. yardstick    a plain one-process evaluator of the flat form written here (one regular
                expression, ``re.split``, ``int``, a left-to-right fold): the speed to beat;
2. evaluator    ``fastpath.evaluate_line`` (what the server's workers run) on every line,
                in this process;
3. end to end   one request through a real server, ``-n 1`` and ``-n 2``; each reply must
                equal the evaluator's result;
4. one line     round trips of a one-line request (``1 + 2``, 300 in a row) to a ``-n 2``
                server, by a plain socket here (one_line_round_trip): p50, its ratio to the
                floor, and p99; the p50 of the lesson with the fast path (LESSON_PROGRAM:
                bluserver without its armour); and the median with the interpreter's
                default start method forced to fork, forkserver and spawn;
5. 100 MB       the flat input repeated to ~100 MB as one request to the ``-n 2`` server: its
                time, and the peak RSS of the largest server process and of the whole
                server (every process in its session), sampled from /proc;
6. full         the full workload: evaluator and simpleeval (what users pick instead) in
                µs per line, and end to end at ``-n 1`` and ``-n 2``;
7. non-flat     6,000 lines of the full workload outside the flat form, each timed with
                ``fastpath.evaluate_line`` and with simpleeval in turn (best of 3): the median
                µs of each and the median of the per-line ratios; the first 500 of them with
                the lesson's evaluator, ``grammar.evaluate_line`` (pyparsing, every line);
                2,000 of them with a typo each (``1 +``, ``(2``, ``2 ** ``, ``1 $ 2``),
                which the pyparsing grammar answers: their median µs and lines per second;
                10,000-byte lines, valid
                and invalid; and 1 MiB of the costliest invalid lines as one request to a
                ``-n 1`` server, refused by its CPU limit (and the next request served);
8. small        20 concurrent clients sending 10-line requests (tools/load.py's clients,
                every reply verified): requests/s at ``-n 1`` and ``-n 2``, and the first
                times the floor; the same at ``-n 1`` to the lesson with the fast path; and
                one 20,000-line flat request at ``-n 1`` and ``-n 2``.

Times 0, 1, 2, 3, 4's p50, 5, 6 and 8 are medians of --repeats runs taken in turn, so that
a noisy neighbour slows them alike (and a ratio to the floor divides by a floor measured
among the same neighbours); the peak RSS comes from one more 100 MB request of its own,
since sampling costs CPU.  load.py reuses ``seed_like_lines`` and ``to_payload`` from here.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import multiprocessing
import os
import platform
import random
import re
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TypeVar, Union

from simpleeval import SimpleEval

import client
import fastpath
import grammar
from tests.harness import ROOT, ServerProcess

Number = Union[int, float]
Result = TypeVar("Result")

HOST = "127.0.0.1"
SEED = 1982
HOSTILE_LINES = ("import sys;sys.exit()", "import time;time.sleep(3600)", "1/0")
OPERANDS = [str(number) for number in range(1, 100)]
OPERATORS = "+-*/"
MIN_OPERANDS, MAX_OPERANDS = 2, 10
FULL_OPERATORS = ["+", "-", "*", "/", "//", "%", "**"]
FULL_NESTING = 2  # levels of parentheses in the full workload
NON_FLAT_MAX_CHARS = 300  # the non-flat lines timed one by one are shorter
LONG_LINES = {  # 10,000 bytes at most, outside the flat form
    "valid": "(1)+" * 2499 + "1",
    "invalid": "(1)+" * 2499 + "^",
    "invalid, nested groups": "((1))+" * 1666 + "^",
    "invalid, 200-deep groups": ("(" * 200 + "1" + ")" * 200 + "+") * 24 + "^",
}
# A request of the costliest lines is bounded by the CPU limit (--cpu-floor, --cpu-per-mib):
# 1 MiB of them at -n 1 must be answered, or refused, within this (issue 25's goal).
COSTLY_REQUEST_BYTES = 2**20
COSTLY_REQUEST_TARGET_S = 10.0
INVALID_LINE_REPEATS = 3  # each invalid line's time is its best of this many
LESSON_LINES = (
    500  # non-flat lines also timed with the lesson's evaluator (pyparsing: ~100x slower)
)
SMALL_REQUEST_LINES = 10
SMALL_REQUEST_CLIENTS = 20  # connected at once
LARGE_REQUEST_LINES = 20_000
START_METHODS = ("fork", "forkserver", "spawn")
# The small-request targets (issue 33), as ratios to the floor: see FLOOR_NOTE.
TRIP_TO_FLOOR_TARGET = 1.5
TRIP_TO_FLOOR_STRETCH = 1.0  # the exits are off the reply's path
SMALL_TIMES_FLOOR_TARGET = 0.8
SMALL_TIMES_FLOOR_STRETCH = 1.2
FLOOR_NOTE = """\
floor: a process that has imported the server's modules forks a child, which forks a
  grandchild that writes one byte up a pipe; both exit and are reaped (the p50 of {forks},
  in a fresh interpreter).  A request costs at least that: a handler and a worker forked.
1-line round trip / floor = round trip p50 / floor: 1 is a request that costs no more than
  its two forks.
{lines}-line req/s at -n 1 x floor = requests per second x the floor in seconds: 1 is a
  request finished per floor; two cores doing nothing but the two forks would reach about 2.
the lesson with the fast path = bluserver without its armour: lesson.py, its workers
  answering with fastpath.py as bluserver's do.  Its figures are what the design itself
  costs here; bluserver's excess over them is the armour's.  A small request is one worker
  whatever -n says."""
ONE_LINE_REQUEST = b"1 + 2\n"
ONE_LINE_REPLY = b"3\n"
FLOOR_FORKS = 200  # the floor is the median of this many
# The floor's process: the server's modules imported (bluserver first: what a server holds
# when it forks), then this module for the loop; it prints the median in seconds.
FLOOR_PROGRAM = """
import bluserver
import statistics
import tools.bench
print(statistics.median(tools.bench.fork_floor_times({count})))
"""
# The lesson's server, its workers answering with the fast path as bluserver's do
# (bluserver.ServedSlice): bluserver without its armour, for the small-request figures.
LESSON_PROGRAM = """
import sys
import fastpath
import lesson
lesson.Slice.evaluate_line = staticmethod(fastpath.evaluate_line)
lesson.main(sys.argv[1:])
"""
LESSON_SERVER = "the lesson with the fast path at -n 1 (LESSON_PROGRAM in tools/bench.py)"
REQUEST_TIMEOUT_S = 300.0
RSS_SAMPLE_INTERVAL_S = 0.02
MB = 1_000_000


@dataclass(frozen=True)
class Plan:
    """How much to measure: the full run, or the --quick smoke run."""

    lines: int
    full_lines: int
    simpleeval_lines: int  # non-flat lines timed with fastpath.py and with simpleeval
    invalid_lines: int  # non-flat lines with a typo, timed one by one
    repeats: int
    round_trips: int
    big_request_bytes: int
    small_requests: int  # per run of the small-request throughput


FULL_PLAN = Plan(
    300_000,
    100_000,
    6_000,
    2_000,
    repeats=5,
    round_trips=300,
    big_request_bytes=100 * MB,
    small_requests=1_000,
)
QUICK_PLAN = Plan(
    30_000,
    10_000,
    600,
    300,
    repeats=1,
    round_trips=50,
    big_request_bytes=10 * MB,
    small_requests=200,
)


# --- The input. -------------------------------------------------------------------------


def seed_like_lines(count: int, seed: int) -> list[str]:
    """count flat lines like the seed's operations.txt, then HOSTILE_LINES spread among them."""
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        operands = rng.choices(OPERANDS, k=rng.randint(MIN_OPERANDS, MAX_OPERANDS))
        operators = rng.choices(OPERATORS, k=len(operands) - 1)
        lines.append(
            operands[0]
            + "".join(f" {op} {operand}" for op, operand in zip(operators, operands[1:]))
        )
    for number, line in enumerate(HOSTILE_LINES, 1):
        lines.insert(number * len(lines) // (len(HOSTILE_LINES) + 1), line)
    return lines


def full_language_lines(count: int, seed: int) -> list[str]:
    """count lines of 1-4 operands joined by any operator; an operand may carry a sign, be
    a decimal or be parenthesised (up to FULL_NESTING levels); most are not flat."""
    rng = random.Random(seed)
    return [full_expression(rng, FULL_NESTING) for _ in range(count)]


def full_expression(rng: random.Random, nesting: int) -> str:
    parts = [full_operand(rng, nesting)]
    for _ in range(rng.randint(0, 3)):
        parts += [rng.choice(FULL_OPERATORS), full_operand(rng, nesting)]
    return " ".join(parts)


def full_operand(rng: random.Random, nesting: int) -> str:
    sign = rng.choice(["-", "+", "- "]) if rng.random() < 0.2 else ""
    kind = rng.random()
    if nesting and kind < 0.25:
        return f"{sign}({full_expression(rng, nesting - 1)})"
    if kind < 0.45:
        return f"{sign}{rng.randint(0, 99)}.{rng.randint(0, 99)}"
    return f"{sign}{rng.randint(1, 99)}"


def with_typo(rng: random.Random, line: str) -> str:
    """line with one typical typo: an operand missing at the end (``1 +``), a group never
    closed (``(2``), an exponent missing (``2 ** ``), or an operator that is not one
    (``1 $ 2``)."""
    kind = rng.randrange(4)
    if kind == 0:
        return f"{line} +"
    if kind == 1:
        return f"({line}"
    if kind == 2:
        return f"{line} ** "
    operators = [match.start() for match in re.finditer(r" [-+*/%]+ ", line)]
    if not operators:
        return f"{line} $ 2"
    position = rng.choice(operators)
    return line[:position] + " $ " + line[line.index(" ", position + 1) + 1 :]


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
        raise RuntimeError(
            f"the yardstick and the project's evaluator disagree on {disagreements} lines"
        )


# --- 2 and 6. Evaluators in this process. --------------------------------------------


def evaluate_in_process(payload: bytes) -> bytes:
    """What the workers of a request compute together, computed here in one process."""
    lines = payload.decode("utf-8").split("\n")[:-1]  # the payload ends with a newline
    return "".join(fastpath.evaluate_line(line) + "\n" for line in lines).encode("utf-8")


def simpleeval_in_process(payload: bytes) -> bytes:
    """The same with simpleeval, what users pick for safe arithmetic: the result or an error."""
    evaluator = SimpleEval()
    lines = payload.decode("utf-8").split("\n")[:-1]
    return "".join(simpleeval_line(evaluator, line) + "\n" for line in lines).encode("utf-8")


def simpleeval_line(evaluator: SimpleEval, line: str) -> str:
    """simpleeval's result for one line, or an error line."""
    try:
        return str(evaluator.eval(line))
    except Exception as error:  # simpleeval raises many kinds; each is an error line here
        return f"error: {error}"


def per_line_times(
    lines: Sequence[str], contestants: Sequence[Callable[[str], str]]
) -> list[list[float]]:
    """Seconds of each line with each contestant, timed in turn (best of three each) so
    that a noisy neighbour slows them alike: one list per contestant."""
    rows = [
        [min(timed(contestant, line)[0] for _ in range(3)) for contestant in contestants]
        for line in lines
    ]
    return [list(column) for column in zip(*rows)]


def median_ratio(times: Sequence[float], others: Sequence[float]) -> float:
    """The median over lines of each line's time over its time with the other contestant."""
    return statistics.median(time_s / other_s for time_s, other_s in zip(times, others))


# --- 3-5. A real server, and what its processes hold. ------------------------------------


@contextlib.contextmanager
def running_server(
    workers: int, start_method: str | None = None, program: str | None = None
) -> Iterator[ServerProcess]:
    """``python bluserver.py -a 127.0.0.1 -p 0 -n WORKERS`` (``python -c PROGRAM`` with the
    same options, if program is given), stopped (and checked) on leaving."""
    command = [sys.executable, "-c", program] if program else []
    server = ServerProcess(["-n", str(workers)], start_method=start_method, command=command)
    try:
        yield server
    finally:
        server.cleanup()


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
    sampler = multiprocessing.Process(
        target=sample_peak_rss, args=(session_id, sampler_conn), name="rss-sampler"
    )
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
    seconds, reply = timed(client.round_trip, payload, HOST, server.port, REQUEST_TIMEOUT_S)
    lines, reply_lines = client.count_lines(payload), client.count_lines(reply)
    if reply_lines != lines:
        raise RuntimeError(f"{what}: the reply has {reply_lines} lines for {lines} input lines")
    if reply != expected:
        raise RuntimeError(f"{what}: the reply differs from the in-process result")
    return seconds


def interleaved_medians(contestants: Sequence[Callable[[], float]], repeats: int) -> list[float]:
    """Median seconds of each contestant, run in turn repeats times, so that a noisy
    neighbour slows them all alike and the ratios between them stay fair."""
    runs = [[contestant() for contestant in contestants] for _ in range(repeats)]
    return [statistics.median(column) for column in zip(*runs)]


def round_trips(server: ServerProcess, count: int) -> list[float]:
    """Seconds of each of count one-line requests (ONE_LINE_REQUEST), in a row."""
    return [one_line_round_trip(server.port) for _ in range(count)]


def one_line_round_trip(port: int) -> float:
    """Seconds from connecting to having the whole reply to ONE_LINE_REQUEST, checked after the
    clock stops.  The client is as light as the protocol allows, so that the time is the
    server's: a plain socket, the request in one send (HEADER and the line), the reply read
    with client.recv_frame; not client.round_trip, whose progress line and keepalive cost
    system calls of their own.  Raises RuntimeError for a wrong reply."""
    request = client.HEADER.pack(len(ONE_LINE_REQUEST)) + ONE_LINE_REQUEST
    started = time.perf_counter()
    with socket.create_connection((HOST, port), REQUEST_TIMEOUT_S) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(request)
        reply = client.recv_frame(sock)
        seconds = time.perf_counter() - started
    if reply != ONE_LINE_REPLY:
        raise RuntimeError(f"one-line request: got {bytes(reply)!r}, not {ONE_LINE_REPLY!r}")
    return seconds


def fork_floor_s(count: int) -> float:
    """The floor, in seconds (FLOOR_PROGRAM): measured in a fresh interpreter that has imported
    the server's modules and nothing of this process, whose heap is far larger than a
    server's (the workloads) and would make each fork dearer."""
    done = subprocess.run(
        [sys.executable, "-c", FLOOR_PROGRAM.format(count=count)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=REQUEST_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the floor's measurement failed: {done.stderr.strip()}")
    return float(done.stdout)


def fork_floor_times(count: int) -> list[float]:
    """Seconds of each of count turns of the floor: this process forks a child, which forks a
    grandchild that writes one byte up a pipe; the child reaps the grandchild and exits; this
    process has the byte and has reaped the child.  Two forks, as a request's handler and
    worker, with their exits (which a reply need not wait for).  Run by FLOOR_PROGRAM."""
    times = []
    for _ in range(count):
        reader, writer = os.pipe()
        started = time.perf_counter()
        child = os.fork()
        if child == 0:
            grandchild = os.fork()
            if grandchild == 0:
                os.write(writer, b"x")
                os._exit(0)
            os.waitpid(grandchild, 0)
            os._exit(0)
        os.read(reader, 1)
        os.waitpid(child, 0)
        times.append(time.perf_counter() - started)
        os.close(reader)
        os.close(writer)
    return times


def small_requests_seconds(
    server: ServerProcess, requests: Sequence[tuple[list[str], list[str]]], count: int
) -> float:
    """Seconds for count requests of requests' lines, SMALL_REQUEST_CLIENTS connected at once,
    every reply verified.  Raises RuntimeError if a reply is wrong or missing."""
    from tools import load  # noqa: PLC0415 (load imports this module)

    clients = (
        load.LoadClient(number, *requests[number % len(requests)]) for number in range(count)
    )
    seconds, done = timed(
        load.run_clients, clients, server.port, REQUEST_TIMEOUT_S, SMALL_REQUEST_CLIENTS
    )
    problems = [load_client.problem() for load_client in done if load_client.problem()]
    if problems:
        raise RuntimeError(f"small requests: {len(problems)} failed, the first: {problems[0]}")
    return seconds


def measure_peak_rss(server: ServerProcess, payload: bytes, expected: bytes) -> tuple[int, int]:
    """Peak RSS in bytes of the largest server process and of the whole server during one
    request of payload; a run of its own, as sampling costs CPU."""
    with peak_rss_sampler(server.process.pid) as peaks:
        timed_request("big request", server, payload, expected)
    return peaks[0], peaks[1]


def run_benchmark(plan: Plan) -> dict[str, float]:
    """Every measurement by name, in seconds, bytes and ratios."""
    flat = to_payload(seed_like_lines(plan.lines, SEED))
    full_lines = full_language_lines(plan.full_lines, SEED)
    full = to_payload(full_lines)
    flat_expected = evaluate_in_process(flat)
    full_expected = evaluate_in_process(full)
    large = to_payload(seed_like_lines(LARGE_REQUEST_LINES - len(HOSTILE_LINES), SEED + 1))
    large_expected = evaluate_in_process(large)
    small = [small_request_lines(number) for number in range(SMALL_REQUEST_CLIENTS)]
    check_yardstick(flat, flat_expected)
    copies = max(1, round(plan.big_request_bytes / len(flat)))
    big, big_expected = flat * copies, flat_expected * copies
    results = {"flat_bytes": len(flat), "big_bytes": len(big), "full_lines": len(full_lines)}
    trips: list[float] = []
    with running_server(1) as one_worker, running_server(2) as two_workers:
        results["big_peak_process"], results["big_peak_session"] = measure_peak_rss(
            two_workers, big, big_expected
        )
        contestants = {
            "yardstick": lambda: timed(yardstick, flat)[0],
            "evaluator": lambda: timed(evaluate_in_process, flat)[0],
            "one_worker": lambda: timed_request("-n 1", one_worker, flat, flat_expected),
            "two_workers": lambda: timed_request("-n 2", two_workers, flat, flat_expected),
            "big": lambda: timed_request("big request", two_workers, big, big_expected),
            "full_evaluator": lambda: timed(evaluate_in_process, full)[0],
            "full_simpleeval": lambda: timed(simpleeval_in_process, full)[0],
            "full_one_worker": lambda: timed_request(
                "full, -n 1", one_worker, full, full_expected
            ),
            "full_two_workers": lambda: timed_request(
                "full, -n 2", two_workers, full, full_expected
            ),
            "large_one_worker": lambda: timed_request(
                "20,000 lines, -n 1", one_worker, large, large_expected
            ),
            "large_two_workers": lambda: timed_request(
                "20,000 lines, -n 2", two_workers, large, large_expected
            ),
            **small_request_contestants(plan, one_worker, two_workers, small, trips),
            "small_two_workers": lambda: small_requests_seconds(
                two_workers, small, plan.small_requests
            ),
        }
        results.update(
            zip(contestants, interleaved_medians(list(contestants.values()), plan.repeats))
        )
    results["trip_p99"] = p99(trips)
    for method in START_METHODS:
        with running_server(2, start_method=method) as server:
            results[f"trip_{method}"] = statistics.median(round_trips(server, plan.round_trips))
    results.update(non_flat_results(full_lines, plan))
    return results


def run_small_requests(plan: Plan) -> dict[str, float]:
    """``python -m tools.bench small``: the floor and the small-request figures alone, in
    seconds (the floor, the 1-line round trip's p50 and p99, the small requests' time)."""
    small = [small_request_lines(number) for number in range(SMALL_REQUEST_CLIENTS)]
    trips: list[float] = []
    with running_server(1) as one_worker, running_server(2) as two_workers:
        contestants = small_request_contestants(plan, one_worker, two_workers, small, trips)
        results = dict(
            zip(contestants, interleaved_medians(list(contestants.values()), plan.repeats))
        )
    results["trip_p99"] = p99(trips)
    return results


def small_request_contestants(
    plan: Plan,
    one_worker: ServerProcess,
    two_workers: ServerProcess,
    small: Sequence[tuple[list[str], list[str]]],
    trips: list[float],
) -> dict[str, Callable[[], float]]:
    """What a small request costs, each a contestant of interleaved_medians, so that the
    figures and the floor they are divided by meet the same neighbours: the floor; the p50
    of plan.round_trips 1-line round trips at -n 2 (each trip also goes to trips, for the
    p99); the seconds of plan.small_requests 10-line requests from SMALL_REQUEST_CLIENTS
    clients at -n 1; and the same two figures of the lesson with the fast path
    (LESSON_PROGRAM), each run on a lesson server of its own."""

    def trip_p50() -> float:
        run = round_trips(two_workers, plan.round_trips)
        trips.extend(run)
        return statistics.median(run)

    def lesson_trip_p50() -> float:
        with running_server(1, program=LESSON_PROGRAM) as lesson:
            return statistics.median(round_trips(lesson, plan.round_trips))

    def lesson_small_requests() -> float:
        with running_server(1, program=LESSON_PROGRAM) as lesson:
            return small_requests_seconds(lesson, small, plan.small_requests)

    return {
        "floor": lambda: fork_floor_s(FLOOR_FORKS),
        "trip_p50": trip_p50,
        "small_one_worker": lambda: small_requests_seconds(one_worker, small, plan.small_requests),
        "lesson_trip_p50": lesson_trip_p50,
        "lesson_small_one_worker": lesson_small_requests,
    }


def p99(times: Sequence[float]) -> float:
    return statistics.quantiles(times, n=100, method="inclusive")[98]


def small_request_lines(number: int) -> tuple[list[str], list[str]]:
    """The lines of small request number, and the results it must get back."""
    lines = seed_like_lines(SMALL_REQUEST_LINES - len(HOSTILE_LINES), SEED + number)
    return lines, [fastpath.evaluate_line(line) for line in lines]


def non_flat_results(full_lines: Sequence[str], plan: Plan) -> dict[str, float]:
    """Section 7: non-flat lines one by one against simpleeval, the same lines with a typo,
    and the 10,000-byte lines."""
    not_flat = [
        line
        for line in full_lines
        if fastpath.flat_tokens(line) is None and len(line) < NON_FLAT_MAX_CHARS
    ]
    evaluator = SimpleEval()
    ours, theirs = per_line_times(
        not_flat[: plan.simpleeval_lines],
        [fastpath.evaluate_line, lambda line: simpleeval_line(evaluator, line)],
    )
    (lesson_times,) = per_line_times(not_flat[:LESSON_LINES], [grammar.evaluate_line])
    rng = random.Random(SEED)
    invalid = [with_typo(rng, line) for line in not_flat[: plan.invalid_lines]]
    invalid_times = [
        min(timed(fastpath.evaluate_line, line)[0] for _ in range(INVALID_LINE_REPEATS))
        for line in invalid
    ]
    results = {
        "non_flat_lines": len(ours),
        "non_flat_us": statistics.median(ours) * 1e6,
        "simpleeval_us": statistics.median(theirs) * 1e6,
        "lesson_lines": len(lesson_times),
        "lesson_us": statistics.median(lesson_times) * 1e6,
        "to_simpleeval": median_ratio(ours, theirs),
        "invalid_lines": len(invalid),
        "invalid_us": statistics.median(invalid_times) * 1e6,
        "invalid_per_s": len(invalid) / sum(invalid_times),
    }
    for kind, line in LONG_LINES.items():
        results[f"long_line {kind}"] = statistics.median(
            timed(fastpath.evaluate_line, line)[0] for _ in range(5)
        )
    results["costly_request"] = costly_request_seconds()
    return results


def costly_request_seconds() -> float:
    """Seconds for 1 MiB of the costliest invalid lines (nested groups) to be refused by a
    -n 1 server with the default CPU limit; the next request must then be served."""
    line = LONG_LINES["invalid, nested groups"].encode() + b"\n"
    payload = line * (COSTLY_REQUEST_BYTES // len(line))
    with running_server(1) as server:
        seconds, reply = timed(client.round_trip, payload, HOST, server.port, REQUEST_TIMEOUT_S)
        if client.refusal(reply, client.count_lines(payload)) is None:
            raise RuntimeError("the costly request was answered, not refused for its CPU")
        timed_request("the request after the costly one", server, b"1 + 1\n", b"2\n")
    return seconds


# --- The table. ------------------------------------------------------------------------


def target_row(
    label: str,
    value: float,
    limit: float,
    *,
    at_least: bool = False,
    stretch: float | None = None,
    unit: str = "",
) -> list[str]:
    """A row with a target: the value, the target (at most limit, unless at_least), met or
    MISSED."""
    sign = ">=" if at_least else "<="

    def meets(bound: float) -> bool:
        return value >= bound if at_least else value <= bound

    target = f"{sign} {limit:g}{unit}"
    verdict = "met" if meets(limit) else "MISSED"
    if stretch is not None:
        target += f" (stretch {sign} {stretch:g})"
        verdict += ", stretch met" if meets(stretch) else ", stretch missed"
    return [label, f"{value:.2f}{unit}", target, verdict]


def table_rows(r: dict[str, float], plan: Plan) -> list[list[str]]:
    big = f"{r['big_bytes'] / MB:.0f} MB"
    trips = plan.round_trips
    full = r["full_lines"]
    non_flat = f"{r['non_flat_lines']:,}"
    invalid = f"{r['invalid_lines']:,}"
    small = f"{plan.small_requests:,} {SMALL_REQUEST_LINES}-line requests"
    small_one = plan.small_requests / r["small_one_worker"]
    small_two = plan.small_requests / r["small_two_workers"]
    large = f"{LARGE_REQUEST_LINES:,}-line request"
    return [
        ["measurement", "value", "target", "verdict"],
        floor_row(r),
        ["1. yardstick, one process", f"{r['yardstick']:.3f} s", "", ""],
        ["2. project evaluator, one process", f"{r['evaluator']:.3f} s", "", ""],
        ["3. end to end, -n 1", f"{r['one_worker']:.3f} s", "", ""],
        ["3. end to end, -n 2", f"{r['two_workers']:.3f} s", "", ""],
        *round_trip_rows(r, plan),
        *(
            [
                f"4. 1-line round trip, start method {method}, median of {trips}",
                f"{r[f'trip_{method}'] * 1000:.2f} ms",
                "",
                "",
            ]
            for method in START_METHODS
        ),
        [f"5. {big} request, -n 2", f"{r['big']:.3f} s", "", ""],
        [
            f"5. {big} request: peak RSS, largest server process",
            f"{r['big_peak_process'] / MB:.0f} MB",
            "",
            "",
        ],
        [
            f"5. {big} request: peak RSS, whole server session",
            f"{r['big_peak_session'] / MB:.0f} MB",
            "",
            "",
        ],
        [
            f"6. full language, evaluator, µs per line of {full:,}",
            f"{r['full_evaluator'] / full * 1e6:.1f}",
            "",
            "",
        ],
        [
            f"6. full language, simpleeval, µs per line of {full:,}",
            f"{r['full_simpleeval'] / full * 1e6:.1f}",
            "",
            "",
        ],
        ["6. full language, end to end, -n 1", f"{r['full_one_worker']:.3f} s", "", ""],
        ["6. full language, end to end, -n 2", f"{r['full_two_workers']:.3f} s", "", ""],
        [
            f"7. non-flat line, evaluator, µs, median of {non_flat}",
            f"{r['non_flat_us']:.1f}",
            "",
            "",
        ],
        [
            f"7. non-flat line, simpleeval, µs, median of {non_flat}",
            f"{r['simpleeval_us']:.1f}",
            "",
            "",
        ],
        [
            f"7. non-flat line, the lesson's evaluator (pyparsing), µs, median of "
            f"{r['lesson_lines']:.0f}",
            f"{r['lesson_us']:.1f}",
            "",
            "",
        ],
        [
            f"7. invalid line (a typo), evaluator, µs, median of {invalid}",
            f"{r['invalid_us']:.1f}",
            "",
            "",
        ],
        ["7. invalid lines (a typo), evaluator, lines/s", f"{r['invalid_per_s']:.0f}", "", ""],
        *(
            [f"7. 10,000-byte line, {kind}, ms", f"{r[f'long_line {kind}'] * 1000:.1f}", "", ""]
            for kind in LONG_LINES
        ),
        target_row(
            f"7. {COSTLY_REQUEST_BYTES // 2**20} MiB of invalid nested-group lines, -n 1, "
            "refused (CPU limit)",
            r["costly_request"],
            COSTLY_REQUEST_TARGET_S,
            unit=" s",
        ),
        *small_requests_rows(r, plan),
        [f"8. {small}, {SMALL_REQUEST_CLIENTS} clients, -n 2, req/s", f"{small_two:.0f}", "", ""],
        [f"8. {large}, -n 1", f"{r['large_one_worker']:.3f} s", "", ""],
        [f"8. {large}, -n 2", f"{r['large_two_workers']:.3f} s", "", ""],
        *small_request_targets(r, plan),
        *(
            target_row(
                f"1-line round trip / floor, start method {method}",
                r[f"trip_{method}"] / r["floor"],
                TRIP_TO_FLOOR_TARGET,
            )
            for method in START_METHODS
        ),
        target_row("e2e -n 2 / yardstick", r["two_workers"] / r["yardstick"], 0.65, stretch=0.5),
        target_row("(-n 1) / (-n 2)", r["one_worker"] / r["two_workers"], 1.6, at_least=True),
        target_row("project evaluator / yardstick", r["evaluator"] / r["yardstick"], 1.0),
        target_row(
            f"{big}: peak process RSS / request size", r["big_peak_process"] / r["big_bytes"], 3
        ),
        target_row(
            f"time per byte, {big} / {r['flat_bytes'] / MB:.1f} MB",
            (r["big"] / r["big_bytes"]) / (r["two_workers"] / r["flat_bytes"]),
            1.3,
        ),
        target_row(
            f"evaluator / simpleeval, median of {non_flat} non-flat lines",
            r["to_simpleeval"],
            1.0,
            stretch=0.8,
        ),
        target_row("small requests/s, (-n 2) / (-n 1)", small_two / small_one, 0.9, at_least=True),
        target_row(
            f"{large}, (-n 2) / (-n 1)", r["large_two_workers"] / r["large_one_worker"], 0.75
        ),
    ]


def small_table_rows(r: dict[str, float], plan: Plan) -> list[list[str]]:
    """The table of ``python -m tools.bench small``: the full table's rows of the same names."""
    return [
        ["measurement", "value", "target", "verdict"],
        floor_row(r),
        *round_trip_rows(r, plan),
        *small_requests_rows(r, plan),
        *small_request_targets(r, plan),
    ]


def floor_row(r: dict[str, float]) -> list[str]:
    return [f"0. floor: two forks, p50 of {FLOOR_FORKS}", f"{r['floor'] * 1000:.2f} ms", "", ""]


def round_trip_rows(r: dict[str, float], plan: Plan) -> list[list[str]]:
    trips = plan.round_trips
    return [
        [f"4. 1-line round trip, -n 2, p50 of {trips}", f"{r['trip_p50'] * 1000:.2f} ms", "", ""],
        [
            f"4. 1-line round trip, -n 2, p99 of {trips} x {plan.repeats}",
            f"{r['trip_p99'] * 1000:.2f} ms",
            "",
            "",
        ],
        [
            f"4. 1-line round trip, the lesson with the fast path, -n 1, p50 of {trips}",
            f"{r['lesson_trip_p50'] * 1000:.2f} ms",
            "",
            "",
        ],
    ]


def small_requests_rows(r: dict[str, float], plan: Plan) -> list[list[str]]:
    small = f"8. {plan.small_requests:,} {SMALL_REQUEST_LINES}-line requests"
    per_s = plan.small_requests / r["small_one_worker"]
    lesson_per_s = plan.small_requests / r["lesson_small_one_worker"]
    return [
        [f"{small}, {SMALL_REQUEST_CLIENTS} clients, -n 1, req/s", f"{per_s:.0f}", "", ""],
        [
            f"{small}, {SMALL_REQUEST_CLIENTS} clients, the lesson with the fast path, -n 1, "
            "req/s",
            f"{lesson_per_s:.0f}",
            "",
            "",
        ],
    ]


def small_request_targets(r: dict[str, float], plan: Plan) -> list[list[str]]:
    """The small-request figures as ratios to the floor, which mean the same on any machine
    (FLOOR_NOTE says how to read them); then the lesson's, the design's own cost, with no
    target."""
    per_s = plan.small_requests / r["small_one_worker"]
    lesson_per_s = plan.small_requests / r["lesson_small_one_worker"]
    return [
        target_row(
            "1-line round trip / floor",
            r["trip_p50"] / r["floor"],
            TRIP_TO_FLOOR_TARGET,
            stretch=TRIP_TO_FLOOR_STRETCH,
        ),
        target_row(
            f"{SMALL_REQUEST_LINES}-line req/s at -n 1 x floor",
            per_s * r["floor"],
            SMALL_TIMES_FLOOR_TARGET,
            at_least=True,
            stretch=SMALL_TIMES_FLOOR_STRETCH,
        ),
        [
            "1-line round trip / floor, the lesson with the fast path",
            f"{r['lesson_trip_p50'] / r['floor']:.2f}",
            "",
            "",
        ],
        [
            f"{SMALL_REQUEST_LINES}-line req/s at -n 1 x floor, the lesson with the fast path",
            f"{lesson_per_s * r['floor']:.2f}",
            "",
            "",
        ],
    ]


def print_table(rows: list[list[str]]) -> None:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    aligned = [str.ljust, str.rjust, str.ljust, str.ljust]
    for number, row in enumerate(rows):
        print(
            "  ".join(
                align(cell, width) for align, cell, width in zip(aligned, row, widths)
            ).rstrip()
        )
        if number == 0:
            print("  ".join("-" * width for width in widths))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench",
        description="Measure bluserver's evaluation and end-to-end speed, latency and memory.",
    )
    parser.add_argument(
        "rows",
        nargs="?",
        choices=("all", "small"),
        default="all",
        help="all: every row (default); small: the floor and the small-request rows alone, "
        "to compare them quickly",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        metavar="N",
        help="runs of each timing, the median is reported "
        f"(default: {FULL_PLAN.repeats}, with --quick 1)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {QUICK_PLAN.lines:,} + {QUICK_PLAN.full_lines:,} lines, a "
        f"{QUICK_PLAN.big_request_bytes // MB} MB big request "
        "(the targets are meant for the full run)",
    )
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sys.setrecursionlimit(grammar.RECURSION_LIMIT)  # as a worker does, for the evaluators here
    plan = QUICK_PLAN if args.quick else FULL_PLAN
    if args.repeats:
        plan = dataclasses.replace(plan, repeats=args.repeats)
    print(" ".join(["command: python -m tools.bench", *sys.argv[1:]]))
    python = f"{platform.python_version()} ({platform.python_implementation()})"
    print(f"python {python}, {os.cpu_count()} CPUs")
    if args.rows == "all":
        print(
            f"input: {plan.lines:,} flat and {plan.full_lines:,} full-language lines; "
            f"{plan.repeats} runs per timing"
        )
        print(
            f"servers: python bluserver.py -a {HOST} -p 0 -n N (N = 1, 2), "
            f"-n 2 under {', '.join(START_METHODS)}; {LESSON_SERVER}"
        )
    else:
        print(f"servers: python bluserver.py -a {HOST} -p 0 -n N (N = 1, 2); {LESSON_SERVER}")
        print(f"{plan.repeats} runs per timing")
    try:
        results = run_benchmark(plan) if args.rows == "all" else run_small_requests(plan)
    except (
        RuntimeError,
        OSError,
        subprocess.TimeoutExpired,  # the floor's process
        AssertionError,
    ) as error:  # AssertionError: a server did not start or stop cleanly
        print(f"bench: {error}", file=sys.stderr)
        return 1
    rows = table_rows(results, plan) if args.rows == "all" else small_table_rows(results, plan)
    print_table(rows)
    print(FLOOR_NOTE.format(forks=FLOOR_FORKS, lines=SMALL_REQUEST_LINES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
