"""Both ends of a worker: what runs in a worker process, and how its handler supervises it.

A handler (bluserver.py) cuts its request into slices of whole lines and calls
``evaluate_in_workers``, which forks one worker process per slice and waits for their
results::

    handler process                                   worker process
    ───────────────                                   ──────────────
    evaluate_in_workers(payload, ranges, ...)
      Slice.start_worker ── fork, Pipe ─────────────▶ evaluate_slice(sender, payload, ...)
      wait() for news, a silent worker, the client      slice_lines: the slice's lines
      Slice.receive ◀──────── result block ───────────   grammar.evaluate_line, per line
        └▶ Spool.write (a nameless file)                 a block every BLOCK_BYTES or
      Slice.receive ◀──────── END_OF_SLICE ───────────   REPORT_INTERVAL_S; then END_OF_SLICE
    the reply is read back from the spools, in order

The worker reads the request from the memory it shares with its handler (fork copies
nothing until written), so no byte of the request travels through a pipe.  The handler
never blocks on a worker: it reads what has arrived, so a worker that is stopped half-way
through a block, dies, or goes silent costs at most ``--worker-timeout``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import multiprocessing
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterator

# multiprocessing calls a Pipe's ends Connections; here a connection is a client's socket.
from multiprocessing.connection import Connection as PipeEnd
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from typing import Any, NamedTuple, Union

import grammar
from client import CHUNK_BYTES, ERROR_PREFIX, HEADER, count_lines

# Forked whatever the default start method (3.14: forkserver): ~1 ms, where spawn costs ~100 ms.
PROCESSES = multiprocessing.get_context("fork")

DECODE_BYTES = 256 * 1024  # a worker decodes its lines a batch of about this many bytes at a time
BLOCK_BYTES = 256 * 1024  # a worker sends its results at least this many bytes at a time...
REPORT_INTERVAL_S = 0.5  # ...or after this long, so that its handler can tell slow from stuck
END_OF_SLICE = b""  # a worker's last message: every line of its slice is answered

ATTEMPTS = 2  # a worker that dies or is stuck has its unanswered lines run once more
# Waits before trying again to fork a worker when the system is out of processes (EAGAIN).
START_BACKOFF_S = (0.05, 0.1, 0.2, 0.4, 0.8)
EXIT_GRACE_S = 1.0  # how long a worker that has sent END_OF_SLICE may take to exit
WORKER_FAILED = ERROR_PREFIX + b"worker failed\n"


# --- The worker process. -------------------------------------------------------------------


class LineTooLong(NamedTuple):
    """A line longer than grammar.MAX_LINE_BYTES, judged in bytes and never decoded."""

    size: int  # its bytes, without the line's end


Line = Union[str, LineTooLong]


def evaluate_slice(sender: PipeEnd, payload: bytearray, start: int, end: int) -> None:
    """Evaluate the lines of payload[start:end] and send their results up sender, in blocks
    of whole result lines, then END_OF_SLICE.  Runs in the worker process."""
    hold_only(sender)
    results: list[str] = []
    results_bytes = 0
    reported_at = time.monotonic()
    try:
        for line in slice_lines(payload, start, end):
            if isinstance(line, LineTooLong):
                result = grammar.line_too_long(line.size)
            else:
                result = grammar.evaluate_line(line)
            results.append(result)
            results_bytes += len(result) + 1  # an estimate: a character is at least one byte
            if results_bytes >= BLOCK_BYTES or time.monotonic() - reported_at >= REPORT_INTERVAL_S:
                send_block(sender, encode_results(results))
                results = []
                results_bytes = 0
                reported_at = time.monotonic()
        if results:
            send_block(sender, encode_results(results))
        send_block(sender, END_OF_SLICE)
    except BrokenPipeError:
        return  # the handler is gone (killed, or it gave up on us): nobody waits for these


def send_block(sender: PipeEnd, block: bytes) -> None:
    """Write block up the Pipe framed as the wire protocol frames a message: its length
    (client.HEADER), then its bytes.  The framing is ours, at both ends, so that the handler
    can read what has arrived without waiting for the rest (Slice.whole_blocks)."""
    write_all(sender.fileno(), HEADER.pack(len(block)) + block)


def write_all(fd: int, data: bytes) -> None:
    """Write all of data to the file descriptor fd: one write() may take only part of it (a
    full pipe interrupted, a file reaching its size limit), and the rest must follow, or the
    error that stopped it."""
    unwritten = memoryview(data)
    while unwritten:
        written = os.write(fd, unwritten)
        unwritten = unwritten[written:]


def encode_results(results: list[str]) -> bytes:
    """Result lines as one block of bytes, each line ended by a newline."""
    return "\n".join(results).encode() + b"\n"


def hold_only(sender: PipeEnd) -> None:
    """Close what fork inherited (the client's socket, the server's stdout) but sender and
    stderr, whose tracebacks are the one clue to why a worker died; set the language's limits."""
    os.closerange(3, sender.fileno())
    os.closerange(sender.fileno() + 1, os.sysconf("SC_OPEN_MAX"))
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    # Evaluating nested parentheses recurses: deep enough for any line the grammar accepts.
    sys.setrecursionlimit(grammar.RECURSION_LIMIT)
    if hasattr(sys, "set_int_max_str_digits"):  # Python 3.11+, 3.10.7+, 3.9.14+
        # The language's limit, set here so that PYTHONINTMAXSTRDIGITS cannot change it.
        sys.set_int_max_str_digits(grammar.MAX_INT_DIGITS)


def slice_lines(payload: bytearray, start: int, end: int) -> Iterator[Line]:
    """The lines of payload[start:end]: text, or LineTooLong for a line over MAX_LINE_BYTES.

    The lines are decoded a batch of about DECODE_BYTES of whole lines at a time.  A line longer
    than that is judged by its bytes and skipped, never copied or decoded: a 100 MiB line
    costs a search for its end, not 400 MiB of text (a shorter line over the limit is decoded
    with its batch, and grammar.evaluate_line refuses it).  '\\r\\n' ends a line as '\\n' does; a
    final newline is optional.  A byte that is not UTF-8 becomes a lone surrogate, which
    grammar.evaluate_line answers with 'not valid UTF-8'.
    """
    while start < end:
        batch_end = min(start + DECODE_BYTES, end)
        # The batch ends with the line that crosses batch_end (searched from one byte before
        # it: a line ending exactly at batch_end is that line).
        newline = payload.find(b"\n", batch_end - 1, end)
        stop = end if newline < 0 else newline + 1
        last_line_start = payload.rfind(b"\n", start, batch_end - 1) + 1
        last_line_start = max(last_line_start, start)
        last_line_bytes = line_size(payload, last_line_start, stop)
        if last_line_bytes > grammar.MAX_LINE_BYTES:
            yield from decode_lines(payload, start, last_line_start)
            yield LineTooLong(last_line_bytes)
        else:
            yield from decode_lines(payload, start, stop)
        start = stop


def line_size(payload: bytearray, start: int, stop: int) -> int:
    """The bytes of the line payload[start:stop], without its '\\n' or '\\r\\n'."""
    if payload.endswith(b"\n", start, stop):
        stop -= 1
        if payload.endswith(b"\r", start, stop):
            stop -= 1
    return stop - start


def decode_lines(payload: bytearray, start: int, stop: int) -> Iterator[str]:
    """The lines of payload[start:stop], a batch of whole lines, as text."""
    if start == stop:
        return
    text = bytes(payload[start:stop]).replace(b"\r\n", b"\n").decode("utf-8", "surrogateescape")
    if text.endswith("\n"):
        text = text[:-1]
    yield from text.split("\n")


# --- The handler's end: supervising the workers of one request. ----------------------------


class ReplyTooLarge(Exception):
    """The results of a request would exceed --max-reply-bytes."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"reply too large (limit {limit} bytes)")


class ReplyNotStored(Exception):
    """A spool could not be created or written: the disk is full, or a file size limit hit."""

    def __init__(self, error: OSError) -> None:
        super().__init__(f"server could not store the reply ({error.strerror or error})")


class WorkerNotStarted(Exception):
    """A worker could not be started, even after waiting: the system is out of processes
    (EAGAIN), of memory, or of file descriptors."""

    def __init__(self, error: OSError) -> None:
        reason = error.strerror or error
        super().__init__(f"server cannot start a worker ({reason}); try again later")


class ReplyBudget:
    """What is left of --max-reply-bytes for a whole reply, shared by the request's slices:
    a reply that would exceed it is refused whole, so that nothing past the limit is spooled."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.left = limit

    def spend(self, size: int) -> None:
        """Take size bytes from the budget; raise ReplyTooLarge if they are not there."""
        if size > self.left:
            raise ReplyTooLarge(self.limit)
        self.left -= size


class Spool:
    """Results on disk, in a temporary file with no name: it costs no memory, and it vanishes
    however its process ends.  Unbuffered: a failed write leaves nothing behind to flush."""

    def __init__(self) -> None:
        try:
            self.file = tempfile.TemporaryFile(buffering=0)  # noqa: SIM115 (see close)
        except OSError as error:
            raise ReplyNotStored(error) from None
        self.size = 0

    def write(self, data: bytes) -> None:
        """Append data; raise ReplyNotStored if the disk will not take all of it."""
        try:
            write_all(self.file.fileno(), data)
        except OSError as error:  # ENOSPC, or EFBIG past RLIMIT_FSIZE
            raise ReplyNotStored(error) from None
        self.size += len(data)

    def chunks(self) -> Iterator[bytes]:
        """Everything written, from the start, CHUNK_BYTES at a time."""
        self.file.seek(0)
        while True:
            chunk = self.file.read(CHUNK_BYTES)
            if not chunk:
                return
            yield chunk

    def lines(self) -> Iterator[bytes]:
        """Everything written, from the start, a line at a time (for -vv's log)."""
        self.file.seek(0)
        with open(self.file.fileno(), "rb", closefd=False) as buffered:
            yield from buffered

    def close(self) -> None:
        self.file.close()


class Slice:
    """A range of whole lines of the request, the worker evaluating it, and its results.

    Invariants, whatever happens to the worker (a spool that cannot be written ends the
    whole request instead, with ReplyNotStored):
    - ``spool`` holds one result line for each line of payload[first:start], then one for each
      of the first ``answered`` lines of payload[start:end], in order;
    - a worker evaluates payload[start:end]: a new attempt starts past the lines answered;
    - ``finished`` once the spool holds a result line for every line of payload[first:end].
    """

    def __init__(
        self,
        payload: bytearray,
        bounds: tuple[int, int],
        budget: ReplyBudget,
        event_log: logging.LoggerAdapter[logging.Logger],
    ) -> None:
        self.payload = payload
        self.first = bounds[0]
        self.start = bounds[0]
        self.end = bounds[1]
        self.budget = budget
        self.event_log = event_log
        self.spool = Spool()
        self.answered = 0  # lines answered by the current attempt
        self.attempts = 0
        self.error_lines = 0
        self.finished = False
        self.process: BaseProcess | None = None
        self.receiver: PipeEnd | None = None  # the handler's end of the worker's Pipe
        self.unread = bytearray()  # what the worker sent that is not yet a whole block
        self.heard_at = 0.0  # when the worker last sent something, or started
        self.worked_ticks = -1  # the CPU time it had used then (cpu_ticks)

    @property
    def name(self) -> str:
        return self.process.name if self.process else "worker"

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
                self.launch(name)
                return
            except OSError as error:  # EAGAIN, ENOMEM, EMFILE: nothing was started
                if wait_s is None:
                    raise WorkerNotStarted(error) from None
                reason = str(error)
                self.event_log.warning(
                    "Worker not started", worker=name, reason=reason, retry_s=wait_s
                )
                time.sleep(wait_s)  # a pause for the system, not a wait for a condition

    def launch(self, name: str) -> None:
        """Fork a worker process on payload[start:end], linked to this one by a Pipe."""
        receiver, sender = PROCESSES.Pipe(duplex=False)
        args = (sender, self.payload, self.start, self.end)
        process = PROCESSES.Process(target=evaluate_slice, args=args, name=name)
        try:
            process.start()
        except OSError:
            receiver.close()
            raise
        finally:
            sender.close()  # the worker's copy only: its death shows here as end of file
        os.set_blocking(receiver.fileno(), False)  # never wait for a block's missing part
        self.process = process
        self.receiver = receiver
        self.answered = 0
        self.unread.clear()
        self.heard_at = time.monotonic()
        self.worked_ticks = cpu_ticks(process.pid)
        pid = process.pid
        self.event_log.info("Worker started", worker=name, worker_pid=pid, attempt=self.attempts)

    def receive(self) -> None:
        """Spool every whole block the worker has sent, without waiting for more; on its
        END_OF_SLICE the slice is finished; if it died, the lines it did not answer run again."""
        assert self.receiver, "only a running worker sends"
        closed = self.read_available()
        for block in self.whole_blocks():
            if block == END_OF_SLICE:
                self.event_log.info(
                    "Worker finished", worker=self.name, lines=self.answered, attempt=self.attempts
                )
                self.finished = True
                return
            self.budget.spend(len(block))
            self.spool.write(block)
            self.answered += block.count(b"\n")
            self.error_lines += block.count(ERROR_PREFIX)
        if closed:
            self.retry("died")

    def read_available(self) -> bool:
        """Move what has arrived from the worker into self.unread; True if the worker has
        closed its end (it exited or died) and all it sent has been read."""
        assert self.receiver, "only a running worker sends"
        while True:
            try:
                data = os.read(self.receiver.fileno(), CHUNK_BYTES)
            except BlockingIOError:
                return False
            if not data:
                return True
            self.unread += data
            self.heard_at = time.monotonic()

    def whole_blocks(self) -> Iterator[bytes]:
        """The whole blocks at the front of self.unread, taken out of it."""
        while len(self.unread) >= HEADER.size:
            (size,) = HEADER.unpack_from(self.unread)
            end = HEADER.size + size
            if len(self.unread) < end:
                return
            block = bytes(self.unread[HEADER.size : end])
            del self.unread[:end]
            yield block

    def is_stuck(self, worker_timeout_s: float) -> bool:
        """True if the worker has sent nothing for worker_timeout_s seconds and has used no CPU
        time since its last news: stopped (SIGSTOP, a debugger), swapped out or blocked, not
        merely slow because it shares the CPU with many others (gunicorn's heartbeat idea:
        stuck is not making progress, not being slow)."""
        if time.monotonic() - self.heard_at < worker_timeout_s:
            return False
        assert self.process, "only a running worker is judged"
        ticks = cpu_ticks(self.process.pid)
        if ticks > self.worked_ticks:  # it has been working: that is news too
            self.worked_ticks = ticks
            self.heard_at = time.monotonic()
            return False
        return True

    def retry(self, reason: str) -> None:
        """Stop the worker; run the lines it has not answered once more, if attempts are left."""
        name = self.name
        answered = self.answered
        self.stop_worker()
        self.start = self.skip_lines(self.start, answered)
        self.answered = 0
        if self.start == self.end:
            # It answered every line and was lost before it said so: nothing is missing.
            self.event_log.info(
                "Worker finished", worker=name, lines=answered, attempt=self.attempts
            )
            self.finished = True
            return
        self.event_log.warning("Worker failed", worker=name, reason=reason, attempt=self.attempts)
        self.start_worker(name)

    def skip_lines(self, offset: int, count: int) -> int:
        """The offset count lines past offset; at most self.end (the last line may have no
        newline)."""
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
            self.budget.spend(lines * len(WORKER_FAILED))
            self.spool.write(WORKER_FAILED * lines)
        self.error_lines += count
        self.start = self.end
        self.finished = True

    def stop_worker(self) -> None:
        """End the worker and reap it: a finished one is given EXIT_GRACE_S to exit on its own
        (a killed one loses what coverage and the like write at exit); others are killed."""
        if self.receiver and self.finished:
            # Its end of the Pipe closes when it exits: wait for that end of file.  Not
            # join(timeout): hold_only closed the pipe by which multiprocessing would know,
            # so join would wait as long as the worker takes, however long that is.
            wait([self.receiver], EXIT_GRACE_S)
        if self.receiver:
            self.receiver.close()
            self.receiver = None
        if self.process and self.process.pid:
            # SIGKILL also ends a stopped process (SIGSTOP, a debugger), where SIGTERM waits;
            # to one that has exited (a zombie until reaped) it does nothing.
            self.process.kill()
            self.process.join()
        self.process = None


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


class ClientWatch:
    """The client's connection while its request is evaluated.

    Stray bytes it sends after the request are read and dropped: unread, they would make
    close() reset the connection and cut the reply.  A reset raises ConnectionResetError (or
    another ConnectionError), which cancels the work.  End of file is a half-close after
    sending, and the request is still served; from then on the socket is always readable, so
    it is no longer waited on, only checked for a reset at each turn of the handler's loop,
    at least every CHECK_INTERVAL_S.
    """

    # As often as working workers report: checking costs one system call, and the loop wakes
    # that often anyway while they work.
    CHECK_INTERVAL_S = REPORT_INTERVAL_S

    def __init__(self, connection: socket.socket) -> None:
        self.connection = connection
        self.half_closed = False

    def sockets(self) -> list[socket.socket]:
        """What to wait on: the socket, until the client has half-closed it."""
        return [] if self.half_closed else [self.connection]

    def longest_wait_s(self) -> float:
        """How long the handler may wait without checking on the client."""
        return self.CHECK_INTERVAL_S if self.half_closed else math.inf

    def drain(self) -> None:
        """Read what the client has sent (it is readable): drop it, or note its half-close."""
        if not self.connection.recv(CHUNK_BYTES):
            self.half_closed = True

    def check(self) -> None:
        """Raise ConnectionResetError if a half-closed client has since reset the connection."""
        if not self.half_closed:
            return
        # A reset after the client's end of file leaves an error on the socket (EPIPE).
        if self.connection.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            raise ConnectionResetError(errno.ECONNRESET, os.strerror(errno.ECONNRESET))


@contextlib.contextmanager
def evaluate_in_workers(
    payload: bytearray,
    ranges: list[tuple[int, int]],
    connection: socket.socket,
    *,
    worker_timeout_s: float,
    max_reply_bytes: int,
    event_log: logging.LoggerAdapter[logging.Logger],
) -> Iterator[list[Slice]]:
    """Evaluate each range of payload in a worker; yield the slices, their results spooled.

    Raises ReplyTooLarge, ReplyNotStored, WorkerNotStarted, or what the client's connection
    raises (a reset).  The workers are stopped and reaped, and the spools closed, when the
    with block ends: after the reply is sent, so that reaping them never delays it.
    """
    budget = ReplyBudget(max_reply_bytes)
    slices: list[Slice] = []
    try:
        for number, bounds in enumerate(ranges, 1):
            slices.append(Slice(payload, bounds, budget, event_log))
            slices[-1].start_worker(f"worker-{number}")
        watch = ClientWatch(connection)
        while not all(slice_.finished for slice_ in slices):
            await_workers(slices, watch, worker_timeout_s)
        yield slices
    finally:
        for slice_ in slices:
            slice_.stop_worker()
            slice_.spool.close()


def await_workers(slices: list[Slice], watch: ClientWatch, worker_timeout_s: float) -> None:
    """One turn of the handler's loop: wait, at most until the longest-silent worker would be
    stuck, for news from any worker or the client (wait() takes pipes and sockets alike), then
    take what each worker has sent and replace a worker silent for worker_timeout_s."""
    running = [slice_ for slice_ in slices if not slice_.finished]
    oldest_news = min(slice_.heard_at for slice_ in running)
    until_stuck_s = max(0.0, oldest_news + worker_timeout_s - time.monotonic())
    timeout_s = min(until_stuck_s, watch.longest_wait_s())
    receivers: list[Any] = [slice_.receiver for slice_ in running]
    ready = wait(receivers + watch.sockets(), timeout=timeout_s)
    if watch.connection in ready:
        watch.drain()
    watch.check()
    for slice_ in running:
        slice_.receive()  # all it has sent, also since the wait ended
        if not slice_.finished and slice_.is_stuck(worker_timeout_s):
            slice_.retry("stuck")
