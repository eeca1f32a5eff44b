"""Supervising the workers of one request: the handler's armour toward its workers.

The lesson (lesson.py's ``Slice`` and ``RequestHandler``) takes it that every worker
starts, answers each line of its slice and exits, that the disk takes every result, and that
a request costs what its size suggests.  None of that is promised:

- the system is out of processes: a worker start is tried again after pauses
  (START_BACKOFF_S), then the request is refused (``WorkerNotStarted``);
- a worker dies, or goes silent for --worker-timeout while using no CPU (stopped by SIGSTOP
  or a debugger, blocked): the lines it has not answered run once more, then are answered
  ``error: worker failed`` (``SupervisedSlice.retry``, ATTEMPTS);
- the reply would exceed --max-reply-bytes: refused whole, before anything past the limit
  is stored (``ReplyBudget``, ``ReplyTooLarge``);
- the disk will not take the results: refused (``ReplyNotStored``);
- the lines cost far more than their size says (a line of nested groups, invalid lines that
  pyparsing must explain): past --cpu-floor plus --cpu-per-mib seconds per MiB of the request,
  refused and its workers stopped (``CpuLimit``, ``RequestTooCostly``);
- the client resets while its request is evaluated (endings.ClientWatch, waited on here).

``SupervisedSlice`` is a subclass of the lesson's Slice; ``WorkerSupervision``, a mixin of its
handler, makes them and waits for their workers, through the lesson's hooks (bluserver.py
composes the handler).  A SupervisedSlice keeps these invariants, whatever happens to its
worker (a results file that cannot be written ends the whole request instead, with
ReplyNotStored):

- its results hold one result line for each of the slice's lines before ``start`` (which
  moves past the lines answered, at each attempt), then one for each of the first
  ``answered`` lines from ``start``, in order;
- a worker evaluates payload[start:end]: a new attempt starts past the lines answered;
- ``finished`` once the results hold a result line for every line of the slice.

A result line longer than a message spans two or more: a worker lost between them leaves part
of a line in the results, which is dropped before its lines run again (``drop_partial_line``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection, wait

import lesson
from client import count_lines, error_line
from endings import ClientWatch, Refusal
from events import EventLog

ATTEMPTS = 2  # a worker that dies or is stuck has its unanswered lines run once more
# Waits before trying again to fork a worker when the system is out of processes (EAGAIN).
START_BACKOFF_S = (0.05, 0.1, 0.2, 0.4, 0.8)
EXIT_GRACE_S = 1.0  # how long a worker that has sent END_OF_SLICE may take to exit
SKIP_BYTES = 64 * 1024  # a retry finds the first unanswered line counting this much at once
WORKER_FAILED = error_line("worker failed")
MIB = 2**20
# /proc counts CPU time in ticks of 10 ms: checking the limit more often than this learns nothing.
CPU_CHECK_MIN_INTERVAL_S = 0.01
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")  # the unit of /proc/PID/stat's CPU times


class ReplyTooLarge(Refusal):
    """The results of a request would exceed --max-reply-bytes."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"reply too large (limit {limit} bytes)")


class ReplyNotStored(Refusal):
    """A results file could not be created or written (results past what a slice holds in
    memory): no usable temporary directory, the disk is full, or a file size limit was hit."""

    def __init__(self, error: OSError) -> None:
        super().__init__(f"server could not store the reply ({error.strerror or error})")


class WorkerNotStarted(Refusal):
    """A worker could not be started, even after waiting: the system is out of processes
    (EAGAIN), of memory, or of file descriptors."""

    def __init__(self, error: OSError) -> None:
        reason = error.strerror or error
        super().__init__(f"server cannot start a worker ({reason}); try again later")


class RequestTooCostly(Refusal):
    """The request's workers used more CPU time than its size allows."""

    def __init__(self, limit_s: float) -> None:
        super().__init__(
            f"request too costly (over {limit_s:.2f} s of CPU; see --cpu-floor, --cpu-per-mib)"
        )


class ReplyBudget:
    """What is left of --max-reply-bytes for a whole reply, shared by the request's slices:
    a reply that would exceed it is refused whole, so that nothing past the limit is stored."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.left = limit

    def spend(self, size: int) -> None:
        """Take size bytes from the budget; raise ReplyTooLarge if they are not there."""
        if size > self.left:
            raise ReplyTooLarge(self.limit)
        self.left -= size

    def give_back(self, size: int) -> None:
        """Return size bytes spent on results that were dropped."""
        self.left += size


class SupervisedSlice(lesson.Slice):
    """The lesson's Slice, its worker supervised: started however the system resists,
    replaced when it dies or is stuck, and its results kept within the reply's budget (shared
    with the request's other slices) and on disk."""

    def __init__(
        self,
        payload: bytearray,
        bounds: tuple[int, int],
        event_log: EventLog,
        budget: ReplyBudget,
    ) -> None:
        super().__init__(payload, bounds, event_log)
        self.budget = budget  # the request's, shared by its slices
        self.whole_lines_size = 0  # the results' bytes up to the end of their last line
        self.answered = 0  # lines answered by the current attempt
        self.attempts = 0
        self.heard_at = 0.0  # when the worker last sent something, or started
        self.worked_ticks = -1  # the CPU time it had used at its start or the last check

    def start_worker(self, name: str) -> None:
        """Start a worker on the lines not yet answered; once out of attempts, fail them.
        While the system cannot start one (out of processes), wait and try again; raise
        WorkerNotStarted if it still cannot after the last wait."""
        if self.attempts == ATTEMPTS:
            self.fail_the_rest()
            return
        self.attempts += 1
        for wait_s in (*START_BACKOFF_S, None):
            try:
                self.try_to_start_worker(name)
                break
            except OSError as error:  # EAGAIN, ENOMEM, EMFILE: nothing was started
                if wait_s is None:
                    raise WorkerNotStarted(error) from None
                reason = str(error)
                self.event_log.warning(
                    "Worker not started", worker=name, reason=reason, retry_s=wait_s
                )
                time.sleep(wait_s)  # a pause for the system, not a wait for a condition
        self.answered = 0
        self.heard_at = time.monotonic()
        self.worked_ticks = 0  # a process forked has used no CPU time yet (fork(2))

    def try_to_start_worker(self, name: str) -> None:
        """The lesson's start_worker, leaving nothing open when fork() fails: multiprocessing
        (popen_fork) opens two pipes before it forks, and closes neither if the fork fails."""
        open_before = open_file_descriptors()
        try:
            super().start_worker(name)
        except OSError:
            if self.receiver:
                self.receiver.close()
            self.receiver = None
            self.process = None
            for leaked in open_file_descriptors() - open_before:
                with contextlib.suppress(OSError):  # the listing's own, closed already
                    os.close(leaked)
            raise

    def receive(self) -> None:
        """The lesson's receive; if the worker died (end of file before END_OF_SLICE), the
        lines it did not answer run again."""
        self.heard_at = time.monotonic()
        try:
            super().receive()
        except EOFError:
            self.retry("died")

    def store(self, results: bytes) -> None:
        """Charge the results to the reply's budget before they are stored, then store them."""
        self.budget.spend(len(results))
        try:
            super().store(results)
        except OSError as error:  # ENOSPC, or EFBIG past RLIMIT_FSIZE
            raise self.not_stored(error) from None
        lines = results.count(b"\n")
        if lines:
            self.answered += lines
            self.whole_lines_size = self.results_size - (len(results) - results.rfind(b"\n") - 1)

    def drop_partial_line(self) -> None:
        """Drop the part of a result line that a lost worker sent without the rest (a line
        longer than a message spans messages), and give its bytes back to the budget."""
        partial = self.results_size - self.whole_lines_size
        if not partial:
            return
        try:
            self.results.truncate(self.whole_lines_size)  # after writing what it buffers
        except OSError as error:
            raise self.not_stored(error) from None
        self.results.seek(self.whole_lines_size)
        self.results_size = self.whole_lines_size
        self.budget.give_back(partial)

    def flush_results(self) -> None:
        """Write what the results file still buffers: before the reply's length is sent, a
        failure is still a refusal."""
        try:
            self.results.flush()
        except OSError as error:
            raise self.not_stored(error) from None

    def not_stored(self, error: OSError) -> ReplyNotStored:
        """The refusal for results the disk would not take.  Their file is closed now:
        closing it later would try again to write what it buffers, and fail again."""
        with contextlib.suppress(OSError):
            self.results.close()
        return ReplyNotStored(error)

    def is_stuck(self, worker_timeout_s: float) -> bool:
        """True if the worker has sent nothing for worker_timeout_s seconds and has used no CPU
        time since it started or was last checked: stopped (SIGSTOP, a debugger), swapped out
        or blocked, not merely slow because it shares the CPU with many others (gunicorn's
        heartbeat idea: stuck is not making progress, not being slow).  The CPU time is read
        only here, at a check, never per message: a worker stopped after working is found
        at the second check, within twice worker_timeout_s."""
        if time.monotonic() - self.heard_at < worker_timeout_s:
            return False
        ticks = self.worker_cpu_ticks()
        if ticks > self.worked_ticks:  # it has been working: as good as a message
            self.worked_ticks = ticks
            self.heard_at = time.monotonic()
            return False
        return True

    def worker_cpu_ticks(self) -> int:
        """The CPU time its worker has used, in clock ticks (cpu_ticks)."""
        assert self.process, "only a running worker is measured"
        return cpu_ticks(self.process.pid)

    def retry(self, reason: str) -> None:
        """Stop the worker; run the lines it has not answered once more, if attempts are left."""
        name = self.name
        answered = self.answered
        self.stop_worker()
        self.drop_partial_line()
        self.start = self.skip_lines(self.start, answered)
        self.answered = 0
        if self.start == self.end:
            # It answered every line and was lost before it said so: nothing is missing.
            self.event_log.info("Worker finished", worker=name)
            self.finished = True
            return
        self.event_log.warning("Worker failed", worker=name, reason=reason, attempt=self.attempts)
        self.start_worker(name)

    def skip_lines(self, offset: int, count: int) -> int:
        """The offset count lines past offset; at most self.end (the last line may have no
        newline).  The lines may be millions: whole runs of SKIP_BYTES are counted at C speed
        (bytearray.count), and only the last run's lines one by one."""
        while count:
            run_end = min(offset + SKIP_BYTES, self.end)
            newlines = self.payload.count(b"\n", offset, run_end)
            if newlines >= count or run_end == self.end:
                break
            count -= newlines
            offset = run_end
        for _ in range(count):
            newline = self.payload.find(b"\n", offset, self.end)
            if newline < 0:
                return self.end
            offset = newline + 1
        return offset

    def fail_the_rest(self) -> None:
        """Answer every line not yet answered with an error line."""
        count = count_lines(self.payload, self.start, self.end)
        # In pieces: the lines may be millions.
        for done in range(0, count, 10_000):
            lines = min(10_000, count - done)
            self.store(WORKER_FAILED * lines)
        self.start = self.end
        self.finished = True

    def stop_worker(self) -> None:
        """End the worker, then the lesson's stop_worker reaps it: a finished one is given
        EXIT_GRACE_S to exit on its own (a killed one loses what coverage and the like write
        at exit); others are killed."""
        if self.receiver and self.finished:
            # Its end of the Pipe closes when it exits: wait for that end of file.  Not
            # join(timeout): the worker closed the pipe by which multiprocessing would know
            # (worker.close_inherited_files), so join would wait as long as the worker takes.
            wait([self.receiver], EXIT_GRACE_S)
        if self.process:
            # SIGKILL also ends a stopped process (SIGSTOP, a debugger), where SIGTERM waits;
            # to one that has exited (a zombie until reaped) it does nothing.
            self.process.kill()
        super().stop_worker()
        self.process = None
        self.receiver = None

    def close(self) -> None:
        """The lesson's close, for a request that may have been given up on (refused, its
        client gone): closing the results file writes what it still buffers, which a full disk
        may refuse again, and nobody needs those results."""
        self.stop_worker()  # outside the suppress below: its errors are its own
        with contextlib.suppress(OSError):
            super().close()


def open_file_descriptors() -> set[int]:
    """The file descriptors this process has open (Linux's /proc)."""
    return {int(name) for name in os.listdir("/proc/self/fd")}


def cpu_ticks(pid: int | None) -> int:
    """The CPU time a process has used, in clock ticks, from Linux's /proc; -1 where it
    cannot be read (then a silent worker is stuck by the clock alone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            stat = stat_file.read()
    except OSError:
        return -1
    fields = stat[stat.rindex(b")") + 2 :].split()  # after "pid (comm) ", from field 3
    return int(fields[11]) + int(fields[12])  # fields 14 and 15: utime, stime


class CpuLimit:
    """The CPU time a request's workers may use: --cpu-floor, plus --cpu-per-mib for each MiB
    of the request.  An ordinary line costs well under a microsecond of CPU per byte, and a
    costly one (nested groups, an invalid line pyparsing must explain) up to a hundred times
    more (`make bench`, rows "6. full language, evaluator" and "7. 10,000-byte line"): the
    default lets every ordinary request through, with a wide margin, and bounds
    what the rest can take."""

    def __init__(self, request_bytes: int, workers: int, floor_s: float, per_mib_s: float) -> None:
        self.limit_s = floor_s + per_mib_s * request_bytes / MIB
        # The workers reaped before this request: none, in a handler forked for it.
        self.reaped_s = lesson.reaped_workers_cpu_s()
        # The first check is due once the workers could have spent the limit, all working
        # flat out: an ordinary request is answered long before, and reads no /proc file.
        self.check_at = time.monotonic() + self.limit_s / max(1, workers)

    def used_s(self, running: list[SupervisedSlice]) -> float:
        """The CPU time used so far: the workers reaped, and those still running."""
        running_ticks = sum(max(0, slice_.worker_cpu_ticks()) for slice_ in running)
        reaped_s = lesson.reaped_workers_cpu_s() - self.reaped_s
        return reaped_s + running_ticks / CLOCK_TICKS_PER_S

    def check(self, running: list[SupervisedSlice]) -> None:
        """Raise RequestTooCostly if the limit is spent, when a check is due: checking costs a
        read of /proc per worker, not to be paid at every message.  The next is due once the
        running workers could have spent what is left, all working flat out."""
        now = time.monotonic()
        if now < self.check_at:
            return
        left_s = self.limit_s - self.used_s(running)
        if left_s <= 0:
            raise RequestTooCostly(self.limit_s)
        self.check_at = now + max(CPU_CHECK_MIN_INTERVAL_S, left_s / len(running))

    def seconds_to_next_check(self) -> float:
        return max(0.0, self.check_at - time.monotonic())


class WorkerSupervision(lesson.RequestHandler):
    """A mixin of the lesson's RequestHandler, extending it through its hooks: each request's
    slices are SupervisedSlices (slice_class) that share a ReplyBudget and a CpuLimit, and the
    wait for the workers' messages also watches for stuck workers, the CPU limit and the
    client (endings.ClientWatch)."""

    slice_class: type[SupervisedSlice] = SupervisedSlice
    # This request's slices, as supervised ones (the lesson's hooks pass them as Slices).
    supervised: list[SupervisedSlice]
    cpu_limit: CpuLimit  # this request's, made with its slices (new_slices)
    client_watch: ClientWatch  # while the workers run (collect_results)

    def new_slices(self, payload: bytearray, ranges: list[tuple[int, int]]) -> list[lesson.Slice]:
        """Replaces the lesson's: a SupervisedSlice for each range, sharing one ReplyBudget;
        and the request's CpuLimit."""
        budget = ReplyBudget(self.options.max_reply_bytes)
        self.supervised = [
            self.slice_class(payload, bounds, self.event_log, budget) for bounds in ranges
        ]
        floor_s = self.options.cpu_floor_s
        per_mib_s = self.options.cpu_per_mib_s
        self.cpu_limit = CpuLimit(len(payload), len(ranges), floor_s, per_mib_s)
        return list(self.supervised)

    def collect_results(self, slices: list[lesson.Slice]) -> None:
        """The lesson's collect_results, watching the client meanwhile; then every result is
        on disk."""
        self.client_watch = ClientWatch(self.connection)
        super().collect_results(slices)
        for slice_ in self.supervised:
            slice_.flush_results()

    def wait_for_workers(self, running: list[lesson.Slice]) -> Sequence[object]:
        """Replaces the lesson's wait, which waits on the Pipes alone, for as long as it takes.
        This one also waits on the client (a reset cancels the work), and at most until the
        longest-silent worker would be stuck or the CPU limit is to be checked; then it
        checks the client and the CPU limit, and replaces the workers that are stuck.
        Returns the receivers that have a message, as the lesson's does."""
        supervised = [slice_ for slice_ in self.supervised if slice_ in running]
        self.cpu_limit.check(supervised)
        worker_timeout_s = self.options.worker_timeout_s
        longest_silent_since = min(slice_.heard_at for slice_ in supervised)
        until_stuck_s = max(0.0, longest_silent_since + worker_timeout_s - time.monotonic())
        until_cpu_check_s = self.cpu_limit.seconds_to_next_check()
        timeout_s = min(until_stuck_s, until_cpu_check_s, self.client_watch.longest_wait_s())
        watched: list[Connection | socket.socket] = [*lesson.receivers(running)]
        watched += self.client_watch.sockets()
        ready = wait(watched, timeout=timeout_s)
        if self.connection in ready:
            self.client_watch.discard_stray_bytes()
        self.client_watch.check()
        for slice_ in supervised:
            if slice_.receiver not in ready and slice_.is_stuck(worker_timeout_s):
                slice_.retry("stuck")
        return ready
