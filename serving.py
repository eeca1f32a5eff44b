"""The armour of the server process: what keeps lesson.BluServer serving when things go wrong.

lesson.BluServer is the lesson: socketserver's ForkingTCPServer with a handler class, the
way socketserver means it to be used, serving with socketserver's own serve_forever.  Each
class here extends BluServer, overriding socketserver's hooks to handle the failures of a
server process its docstring opens with.  bluserver.ArmouredServer composes
them over BluServer, the way socketserver composes ``ForkingTCPServer`` from ``ForkingMixIn``
and ``TCPServer``::

    class ArmouredServer(SignalledServing, DeferredAccept, HandedListener, BluServer)

    SignalledServing   Ctrl-C or SIGTERM would end every request in flight, and fork() fails
                       when the system is out of processes: serve_until_signalled, a loop of
                       its own, turns signals into a drain (and a second signal into a stop),
                       forks handlers that signals meant for the server cannot reach, and
                       keeps a connection whose fork failed to try it again.  One class: the
                       connections it holds, waiting for a handler, are both failures' state.
    DeferredAccept     a connection that sends nothing would hold a handler: the kernel keeps
                       it until it sends (TCP_DEFER_ACCEPT), and verify_request drops it after.
    HandedListener     a restart that binds its own port refuses connections while no process
                       listens: a service manager holds the socket and hands it over; the
                       other listening sockets it hands every process are closed.

Each stands on its own state; the orders of the MRO that matter are written where
ArmouredServer composes them (its docstring).  An error of one connection at any step of
accepting it is logged and the connection dropped, never fatal.  And serve_until_signalled
makes every process the server forks die with its parent (children_die_with_their_parent):
a forced stop of the server or of a handler leaves no process behind.  Socket activation and
sd_notify (the service manager's side) close the module.

socketserver's own loop and its contracts still hold on every class here: serve_forever stops
on shutdown(), collect_children(blocking=True) and server_close (block_on_close) wait for the
handlers; serve_until_signalled reaps them without waiting, and closes the listener itself.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import functools
import math
import os
import selectors
import signal
import socket
import stat
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, Callable, NoReturn, Union

import lesson
from client import CHUNK_BYTES, error_line, send_frame
from events import server_log

# socketserver's types for what its hooks are given, as typeshed writes them: a request is a
# connection (or, for a UDP server, a datagram and its socket), and an address is Any there,
# its shape depending on the socket's family (typeshed's _RetAddress).
Request = Union[socket.socket, tuple[bytes, socket.socket]]
Address = Any

SHUTDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM)
SD_LISTEN_FDS_START = 3  # systemd's protocol, sd_listen_fds(3): handed sockets start at fd 3
TCP_FAMILIES = (socket.AF_INET, socket.AF_INET6)
# accept() errors that are the server's, not one connection's: the backlog cannot be taken.
OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
SIGNALS_PER_READ = 4096  # signals are rare: a read takes every one but in a flood


# === Signals: a drain, then a stop ===============================================================


class SignalPipe:
    """The signals the server handles, as one byte each in a pipe (``signal.set_wakeup_fd``).

    The pipe, not a Python-level signal handler, is the record, for two reasons.  CPython runs
    a signal handler once for signals of one kind that arrive close together, but writes a
    byte for each.  And the pipe wakes the select() that waits for a connection and a signal
    at once, so nothing blocks signals while the server waits (sigwait() would: two SIGTERMs
    merged into one).  close() puts back the handlers and the wakeup fd it found.
    """

    def __init__(self, signums: Sequence[signal.Signals]) -> None:
        self.reader, self.writer = os.pipe()
        os.set_blocking(self.reader, False)  # a read never waits for a signal
        os.set_blocking(self.writer, False)  # C's signal handler writes: it must never block
        self.previous_wakeup_fd = signal.set_wakeup_fd(self.writer)
        self.previous_handlers = {signum: signal.signal(signum, self.noted) for signum in signums}

    @staticmethod
    def noted(signum: int, frame: object) -> None:
        """Nothing to do: without a signal handler no byte is written; the byte is the record."""

    def received(self) -> list[signal.Signals]:
        """The signals that arrived since the last call, in order, once the pipe is readable;
        at most SIGNALS_PER_READ (the rest keep the pipe readable, for the next call)."""
        return [signal.Signals(signum) for signum in os.read(self.reader, SIGNALS_PER_READ)]

    def close(self) -> None:
        """Stop recording signals: the handlers and wakeup fd found are back."""
        for signum, handler in self.previous_handlers.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(self.previous_wakeup_fd)
        self.close_pipe()

    def leave(self) -> None:
        """In a process forked from the server: write no more signals to the server's pipe,
        and close this process's copy of it.  Its signal handlers are left to the caller, who
        sets the child's own (the fork sequence, step 6)."""
        signal.set_wakeup_fd(-1)
        self.close_pipe()

    def close_pipe(self) -> None:
        os.close(self.reader)
        os.close(self.writer)


class SignalledServing(lesson.BluServer):
    """The failures: SIGINT (a terminal's Ctrl-C) raises KeyboardInterrupt wherever the server
    happens to be, and SIGTERM's default action ends it at once; either way the connections in
    the listen backlog are reset, and a Ctrl-C also reaches every handler and worker on the
    terminal, ending the requests in flight.  And fork() fails when the system is out of
    processes (EAGAIN: RLIMIT_NPROC, a full process table) or memory (ENOMEM): ForkingMixIn
    lets the error reach socketserver's handle_error, which prints a traceback and closes the
    connection, a request lost to a moment's shortage.

    Here serve_until_signalled serves until the first SIGINT or SIGTERM, then drains: it
    serves the connections already waiting and the requests in flight, and returns once every
    handler has ended.  A second signal kills them all and exits 1 (stop_now).  Handlers live
    in process groups of their own, out of the terminal's reach (the fork sequence:
    process_request).  A connection whose fork failed is kept, first in ``accepted``, and its
    fork tried again every fork_retry_s; the loop acts on signals meanwhile, and new
    connections wait in the backlog.  During a drain the retries end: once forks have failed
    for drain_fork_failures_s, every connection accepted is refused with one line
    (refuse_accepted), and the drain ends with the requests in flight.

    One class for both: ``accepted`` holds the backlog taken at a drain and a connection whose
    fork failed, and the loop serves it before the listener's.

    Of socketserver, this overrides process_request and finish_request (the fork sequence),
    get_request (the connections in ``accepted`` first), server_activate (a listener that
    does not block; signals recorded from the moment the server listens) and server_close
    (signals no longer recorded).  Its loop has a name of its own: socketserver's
    serve_forever, shutdown, collect_children and server_close keep their contracts (stop
    serve_forever with shutdown(), as socketserver says: it does not act on signals).
    """

    # At the drain, take connections from the backlog for at most this long: a flood of new
    # ones must not keep the listener open.
    backlog_take_s = 0.5
    fork_retry_s = 0.1
    drain_fork_failures_s = 3.0

    def __init__(self, options: argparse.Namespace) -> None:
        # ForkingMixIn's set of the handlers' pids is None until its first fork: a set from
        # the start, for stop_now.
        self.active_children: set[int] = set()
        # The connections accepted that have no handler yet: the backlog, taken when the drain
        # begins, and one whose fork failed.  Served before the listener's, in order; the first
        # not before next_try_at.
        self.accepted: deque[tuple[socket.socket, Address]] = deque()
        self.next_try_at = 0.0
        self.fork_failed_for: socket.socket | None = None  # warned about once, not at each try
        self.failing_in_drain_since: float | None = None  # forks have failed since, draining
        self.shutdown_signal: signal.Signals | None = None  # the first SIGINT or SIGTERM
        self.signals: SignalPipe | None = None  # set once the server listens, until closed
        # What the loop waits on, one selector for the server's life: the signal pipe, and
        # the listener while a connection from it may be served (watch_listener).  poll(),
        # not select(): a socket handed over may be past descriptor 1023; nor epoll, the
        # default selector, whose descriptor, and its watch list, every handler would share.
        self.selector = selectors.PollSelector()
        self.listener_watched = False
        super().__init__(options)

    def server_activate(self) -> None:
        """Listen, then record signals: from now on a SIGTERM drains (connections may already
        wait in the backlog), once serve_until_signalled runs; one that arrives before waits
        in the pipe.  The listener does not block: the loop accepts only once select() says a
        connection waits, and a socket shared with other processes (HandedListener) may have
        lost it to one of them meanwhile; the drain accepts until the backlog is empty."""
        super().server_activate()
        self.socket.setblocking(False)
        self.signals = SignalPipe([*SHUTDOWN_SIGNALS, signal.SIGCHLD])
        self.selector.register(self.signals.reader, selectors.EVENT_READ)

    def server_close(self) -> None:
        """Stop recording signals, then socketserver's own: close the listener and, under
        block_on_close, wait for every handler (a Ctrl-C can end that wait)."""
        self.selector.close()
        if self.signals:
            self.signals.close()
            self.signals = None
        super().server_close()

    def serve_until_signalled(self) -> None:
        """Serve until the first SIGINT or SIGTERM, then drain (drain), and return once every
        handler has ended.  A second signal raises SystemExit(1) (stop_now).

        Not socketserver's serve_forever, for three reasons:

        1. It ends cleanly only when shutdown() is called from another thread: shutdown()
           waits for the loop to return, so a signal handler, which runs in the loop's own
           thread, would wait for itself for ever (an exception raised by a signal handler,
           as Ctrl-C's KeyboardInterrupt, ends it wherever it happens to be: in a fork, say).
        2. It bounds the handlers at max_children only by blocking: it keeps accepting, and
           ForkingMixIn.collect_children, which its service_actions calls at every turn,
           waits in os.waitpid(-1, 0) while max_children handlers run.  Signals would wait
           until a handler ends.
        3. It wakes every poll_interval (0.5 s) to look for a shutdown, and it cannot serve
           the connections in ``accepted`` (the backlog taken at a drain, a failed fork)
           before the listener's.

        This loop waits in one select() for a signal or, while a handler is free to start, a
        connection (wait_for_signal_or_connection); at each turn it acts on the signals
        (act_on_signals, where serve_forever calls service_actions), then takes socketserver's
        steps for the connection that is due (serve_connection).
        """
        children_die_with_their_parent()
        notify_service_manager("READY=1")
        while not self.shutdown_signal:
            self.serve_one_turn()
        self.drain()

    def drain(self) -> None:
        """After the first SIGINT or SIGTERM (begin_drain has closed the listener): serve the
        connections taken from the backlog as handlers become free to start (max_children
        still holds), and return once every handler has ended."""
        while self.active_children or self.accepted:
            self.serve_one_turn()

    def begin_drain(self, signum: signal.Signals) -> None:
        """The first SIGINT or SIGTERM, at once: take the connections waiting in the listen
        backlog, close the listener, and say so.

        New connections are refused once the listener is closed (a balancer retries them
        elsewhere), or wait in the socket's backlog if a service manager holds it.  So are
        connections open but silent when the drain begins: deferred accept keeps them from the
        backlog (README, "Signals", says why they are not waited for)."""
        self.shutdown_signal = signum
        self.take_backlog()
        self.watch_listener(False)
        # TCPServer.server_close's one step, not server_close itself: with block_on_close
        # (ForkingMixIn's), that waits for every handler, deaf to a second signal.
        self.socket.close()
        notify_service_manager("STOPPING=1")
        server_log.warning(
            "Shutting down",
            signal=signum.name,
            requests_in_flight=len(self.active_children),
            connections_waiting=len(self.accepted),
        )

    def serve_one_turn(self) -> None:
        """Wait for a signal or a connection, act on the signals that arrived, then hand the
        connection that is due (if one is) to a handler."""
        assert self.signals, "the server listens"
        ready = self.wait_for_signal_or_connection()
        if self.signals.reader in ready:
            self.act_on_signals()
        if self.connection_due(listener_ready=self.socket in ready):
            self.serve_connection()

    def wait_for_signal_or_connection(self) -> list[object]:
        """Wait in poll() until a signal arrives, or a connection is to be served while a
        handler is free to start: the first of ``accepted`` once its try is due, else one in
        the listener's backlog.  While max_children handlers run, only a signal ends the wait
        (SIGCHLD: one has ended).  Returns what is ready: the signal pipe, the listener."""
        timeout_s = None  # until a signal
        if self.handler_free_to_start() and self.accepted:
            timeout_s = max(0.0, self.next_try_at - time.monotonic())
        free_to_take = self.handler_free_to_start() and not self.accepted
        self.watch_listener(free_to_take and not self.shutdown_signal)
        return [key.fileobj for key, _ in self.selector.select(timeout_s)]

    def watch_listener(self, watched: bool) -> None:
        """Have the loop's selector watch the listener, or stop: only when that changes (at
        max_children, at a failed fork, at the drain), not at every turn."""
        if watched == self.listener_watched:
            return
        if watched:
            self.selector.register(self.socket, selectors.EVENT_READ)
        else:
            self.selector.unregister(self.socket)
        self.listener_watched = watched

    def handler_free_to_start(self) -> bool:
        """Fewer than max_children handlers run."""
        return len(self.active_children) < self.max_children

    def connection_due(self, *, listener_ready: bool) -> bool:
        """Whether a connection is to be handed to a handler now: the first of ``accepted``
        once its try is due, else, while the server listens, one in the backlog."""
        if not self.handler_free_to_start():
            return False
        if self.accepted:
            return time.monotonic() >= self.next_try_at
        return listener_ready and not self.shutdown_signal

    def serve_connection(self) -> None:
        """socketserver's steps for one connection, as its loop takes them once select() says
        one waits (BaseServer._handle_request_noblock, private, so written out here):
        get_request, verify_request, then process_request or shutdown_request.  An error of
        one connection is logged and the connection dropped, never fatal; a fork that fails
        keeps the connection (fork_failed), where socketserver's loop closes it."""
        try:
            connection, client_address = self.get_request()
        except BlockingIOError:  # another process sharing the listener took it first
            return
        except OSError as error:  # reset or aborted before it was taken, out of descriptors
            server_log.warning("Connection not accepted", reason=str(error))
            return
        if not self.verify_request(connection, client_address):
            self.shutdown_request(connection)
            return
        try:
            self.process_request(connection, client_address)
        except OSError as error:  # fork() failed, before anything was started: try again
            self.fork_failed(connection, client_address, error)
        except Exception:  # as socketserver: an error of one connection is logged, not fatal
            self.handle_error(connection, client_address)
            self.shutdown_request(connection)
        else:
            self.failing_in_drain_since = None

    def get_request(self) -> tuple[socket.socket, Address]:
        """The first connection accepted that has no handler yet, else the next from the
        backlog (BlockingIOError if there is none)."""
        if self.accepted:
            return self.accepted.popleft()
        return self.socket.accept()

    def act_on_signals(self) -> None:
        """Act on the signals that arrived (the signal pipe is readable).  SIGCHLD: reap the
        handlers that ended.  The first SIGINT or SIGTERM: stop serving, and drain.  Any later
        one: stop at once."""
        assert self.signals, "the server listens"
        for signum in self.signals.received():
            if signum == signal.SIGCHLD:
                self.reap_handlers()
            elif not self.shutdown_signal:
                self.begin_drain(signum)
            else:
                self.stop_now(signum)

    def reap_handlers(self) -> None:
        """Reap every handler that has ended, never waiting for one: the loop waits, in
        select(), for the SIGCHLD that says one has.  Not ForkingMixIn.collect_children, which
        waits in os.waitpid(-1, 0) while max_children handlers run, deaf to signals."""
        while self.active_children:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:  # no child left
                return
            if not pid:  # none has ended
                return
            self.active_children.discard(pid)  # forgotten once reaped: its pid may be reused

    def process_request(self, request: Request, client_address: Address) -> None:
        """Fork a handler for the connection.  The fork sequence, in order:

        1. Block SIGINT and SIGTERM.  Until step 4 the new process is in the server's process
           group, where a terminal's Ctrl-C reaches it too, and until step 3 it writes the
           signals it receives to the server's signal pipe: a Ctrl-C must count once.
        2. Fork (ForkingMixIn.process_request).  The parent records the child's pid in
           active_children, closes its copy of the connection, unblocks the signals (a
           signal that arrived meanwhile is acted on now) and goes back to the loop.
        3. In the child (finish_request): close what is the server's, the signal pipe, the
           listener and the connections waiting for other handlers.
        4. A process group of its own (setpgid): a terminal's Ctrl-C reaches only the
           server, and killpg() ends the handler's workers with it (stop_now).
        5. Unblock SIGINT and SIGTERM: one sent to the server's group during the fork is
           delivered now to the server's handler, which does nothing (the pipe is closed):
           it was meant for the server.
        6. Restore the default actions of SIGINT, SIGTERM and SIGCHLD: from now on the
           handler's signals are its own (a SIGTERM sent to it ends it).
        7. Run the handler (socketserver's finish_request: RequestHandler(...)), then end
           the process with os._exit (ForkingMixIn), never returning into the loop.

        A fork that fails raises OSError once the signals are unblocked: the loop keeps the
        connection (serve_connection, fork_failed); socketserver's hands it to handle_error.
        """
        signal.pthread_sigmask(signal.SIG_BLOCK, SHUTDOWN_SIGNALS)
        try:
            super().process_request(request, client_address)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SHUTDOWN_SIGNALS)

    def finish_request(self, request: Request, client_address: Address) -> None:
        """Steps 3 to 7 of the fork sequence (process_request), in the child only."""
        assert self.signals, "the server listens"
        self.signals.leave()
        self.signals = None
        self.socket.close()  # only the server accepts
        for waiting_connection, _ in self.accepted:
            waiting_connection.close()
        self.accepted.clear()
        os.setpgid(0, 0)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SHUTDOWN_SIGNALS)
        for signum in (*SHUTDOWN_SIGNALS, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        super().finish_request(request, client_address)

    def fork_failed(
        self, connection: socket.socket, client_address: Address, error: OSError
    ) -> None:
        """Put the connection first in ``accepted``, to be tried again after fork_retry_s;
        during a drain, refuse every connection accepted once forks have failed too long."""
        if connection is not self.fork_failed_for:
            reason = f"cannot start: {error}"
            server_log.warning("Handler not started", reason=reason, retry_in_s=self.fork_retry_s)
        self.fork_failed_for = connection
        self.accepted.appendleft((connection, client_address))
        now = time.monotonic()
        self.next_try_at = now + self.fork_retry_s
        if not self.shutdown_signal:
            return
        if self.failing_in_drain_since is None:
            self.failing_in_drain_since = now
        if now - self.failing_in_drain_since >= self.drain_fork_failures_s:
            reason = error.strerror or str(error)
            self.refuse_accepted(f"server cannot start a handler ({reason}); try again later")

    def refuse_accepted(self, reason: str) -> None:
        """Answer every connection accepted with one refusal line, and close it."""
        server_log.warning("Connections refused", reason=reason, connections=len(self.accepted))
        while self.accepted:
            connection, client_address = self.accepted.popleft()
            refuse(connection, client_address, error_line(reason))
            self.shutdown_request(connection)

    def take_backlog(self) -> None:
        """Accept every connection in the listen backlog: closing the listener would reset
        them, and a balancer that has already sent a request on one cannot send it again.
        A connection lost before it is taken (accept fails for it alone) is logged and the
        rest taken; once the server is out of descriptors or memory, the rest are reset."""
        deadline = time.monotonic() + self.backlog_take_s
        while time.monotonic() < deadline:
            try:
                self.accepted.append(self.socket.accept())
            except BlockingIOError:  # the backlog is empty
                return
            except OSError as error:
                if error.errno in OUT_OF_RESOURCES:
                    server_log.warning("Backlog not taken", reason=str(error))
                    return
                server_log.warning("Connection not accepted", reason=str(error))

    def stop_now(self, signum: signal.Signals) -> NoReturn:
        """A second SIGINT or SIGTERM: kill every handler and its workers, close the
        connections accepted that have no handler yet, and exit 1."""
        for pid in self.active_children:
            with contextlib.suppress(ProcessLookupError):  # it has just ended
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):  # no group yet: killed before step 4
                os.killpg(pid, signal.SIGKILL)  # its workers, in the process group it made
        for connection, _ in self.accepted:
            self.shutdown_request(connection)
        server_log.warning("Stopped at once", signal=signum.name)
        raise SystemExit(1)


def refuse(connection: socket.socket, client_address: Address, refusal: bytes) -> None:
    """Send refusal as the reply, from the server process itself, which must never wait for a
    client: the socket does not block, and a client that does not take a line is not sent one
    (logged, as a client that has gone).

    First what has arrived of the request is read and dropped: closing a connection with
    unread bytes resets it, which destroys the refusal before the client reads it.  A request
    larger than what has arrived (CHUNK_BYTES at most) still meets that reset."""
    connection.setblocking(False)
    try:
        connection.recv(CHUNK_BYTES)
    except BlockingIOError:  # nothing has arrived
        pass
    except OSError as error:  # the client has gone: reset
        reason = f"gone before its refusal: {error}"
        server_log.warning("Client failed", peer=client_address, reason=reason)
        return
    try:
        send_frame(connection, [refusal])
    except OSError as error:  # the client has gone, or takes nothing
        reason = f"refusal not sent: {error}"
        server_log.warning("Client failed", peer=client_address, reason=reason)


# === Forced stops: no process outlives its parent ================================================

# The failure: a process killed outright (SIGKILL; a second Ctrl-C of a cluster; a service
# manager's stop timeout) leaves its children running.  A handler's workers run on with ppid 1,
# and nothing enforces their CPU limit any more (the handler did); a killed server leaves its
# handlers evaluating for nobody.  A process manager signals only the processes it started.
#
# Here Linux's parent death signal (prctl PR_SET_PDEATHSIG): every process the server forks,
# and every process those fork (the hook is inherited), is sent SIGKILL when its parent dies.
# SIGKILL, not SIGTERM: a stopped process (SIGSTOP, a debugger) keeps a SIGTERM pending until it
# is continued, and a handler acts on SIGTERM by its default action only after step 6 of the
# fork sequence; SIGKILL ends any process at once, and nothing is lost that a kill of its parent
# has not lost already.  The kernel sends it when the thread that forked ends: here always a
# process's main thread (the server's loop, a handler's), which ends only with its process.

# libc, loaded once, at import: dlopen(NULL) finds the interpreter's own libc, with no search
# for a file, and every process the server forks has it already.
LIBC = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PRCTL: Callable[[int, int], int] | None = getattr(LIBC, "prctl", None)  # Linux's only


class ParentDeathSignal:
    """The hooks os.register_at_fork runs around each fork (children_die_with_their_parent)."""

    def __init__(self) -> None:
        self.parent_pid = 0

    def note_parent(self) -> None:
        """In the parent, before the fork: who the child's parent is."""
        self.parent_pid = os.getpid()

    def in_child(self) -> None:
        """In the child, at once: SIGKILL when the parent dies.  If it died before prctl (the
        child then belongs to init or a subreaper already), no signal will come: die now."""
        assert PRCTL, "Linux"
        PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != self.parent_pid:
            os.kill(os.getpid(), signal.SIGKILL)


@functools.cache  # once per process: each call would add hooks to every fork
def children_die_with_their_parent() -> None:
    """From now on, every process forked from this one, and from those, is killed when its
    parent dies: one prctl() per fork.  Linux only; elsewhere, nothing."""
    if not PRCTL:
        return
    hooks = ParentDeathSignal()
    os.register_at_fork(before=hooks.note_parent, after_in_child=hooks.in_child)


# === Idle connections: deferred accept ===========================================================


class DeferredAccept(lesson.BluServer):
    """The failure: a client that connects and sends nothing would hold a handler — a process,
    one of max_children — for its whole --client-timeout; max_children such connections hold
    the server, and every other client waits.

    Here the kernel keeps a connection from accept() until its client has sent something, for
    up to --client-timeout seconds (Linux's TCP_DEFER_ACCEPT, nginx's "deferred", HAProxy's
    "defer-accept"): one that sends nothing takes no handler; verify_request drops one that
    comes out of that wait having sent nothing, or reset while it waited in the backlog.
    """

    defers_accept = hasattr(socket, "TCP_DEFER_ACCEPT")  # Linux's

    def server_activate(self) -> None:
        """Listen, with deferred accept.  Set on a handed socket too: the option lives in the
        socket, and the server knows the timeout."""
        super().server_activate()
        if self.defers_accept:
            silence_s = math.ceil(self.options.client_timeout_s)
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, silence_s)

    def verify_request(self, request: Request, client_address: Address) -> bool:
        """False for a connection that has sent nothing (under deferred accept, the kernel
        hands one over only after --client-timeout seconds of silence), or whose client has
        gone meanwhile (a reset while it waited in the backlog, the server at max_children):
        logged, as a client that failed."""
        if not self.defers_accept:
            return True
        assert isinstance(request, socket.socket), "a TCP server's request is a connection"
        try:
            request.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)  # left for the handler
        except BlockingIOError:
            silent_s = self.options.client_timeout_s
            reason = f"sent nothing within --client-timeout ({silent_s:g} s)"
            server_log.warning("Client failed", peer=client_address, reason=reason)
            return False
        except OSError as error:
            reason = f"gone before it was served: {error}"
            server_log.warning("Client failed", peer=client_address, reason=reason)
            return False
        return True


# === Restarts: a listening socket handed over ====================================================


class HandedSocketError(Exception):
    """A socket handed over (--fd, or by the service manager) is not one the server can use."""


class HandedListener(lesson.BluServer):
    """The failures: a server that binds its own port leaves a gap at every restart.  Until the
    new process listens, connections are refused; the old one's backlog is reset when it
    closes; and while it still holds the port, the new one cannot bind it.  And a process
    manager that hands every process all the sockets it holds (circus does) leaves each
    process holding the others' ports: once the manager has gone, they still accept
    connections that nobody serves.

    Here a process manager holds the listening socket and hands it to each process it starts:
    connections wait in the socket's backlog for whichever process serves next.  systemd does
    it by socket activation (handed_by_service_manager), others (circus, a shell) by an
    open file descriptor named with --fd.  A handed socket is bound and listening already:
    server_bind takes it instead of binding, and closes every other listening socket the
    process inherited (close_inherited_listeners); server_activate leaves it as it is.
    """

    listener_handed = False

    def server_bind(self) -> None:
        """Take the handed socket, if there is one (raises HandedSocketError if it is not a
        listening TCP socket), else bind -a and -p."""
        handed = handed_listener(self.options.fd)
        if not handed:
            super().server_bind()
            return
        self.socket.close()  # the one TCPServer made for -a, never bound
        self.socket = handed
        self.server_address = handed.getsockname()
        self.listener_handed = True
        for fd in close_inherited_listeners(keep=handed.fileno()):
            server_log.info("Inherited listener closed", fd=fd)

    def server_activate(self) -> None:
        if not self.listener_handed:
            super().server_activate()


def handed_listener(fd: int | None) -> socket.socket | None:
    """The listening socket at fd (--fd), else the one the service manager handed over
    (handed_by_service_manager), else None: the server binds its own (-a, -p)."""
    if fd is not None:
        return listening_socket(fd, f"--fd {fd}")
    if handed_by_service_manager():
        return listening_socket(SD_LISTEN_FDS_START, "fd 3 from the service manager")
    return None


def listening_socket(fd: int, name: str) -> socket.socket:
    """The socket at fd, if it is a listening TCP socket (IPv4 or IPv6); else raises
    HandedSocketError, whose message starts with name."""
    try:
        handed = socket.socket(fileno=fd)
    except OSError as error:
        raise HandedSocketError(f"{name}: {error.strerror}") from None
    listening = handed.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    if handed.family not in TCP_FAMILIES or handed.type != socket.SOCK_STREAM or not listening:
        raise HandedSocketError(f"{name} is not a listening TCP socket")
    handed.set_inheritable(False)  # no program the server runs needs it
    return handed


def close_inherited_listeners(keep: int) -> list[int]:
    """Close every listening socket open in this process past stdin, stdout and stderr but
    the one at fd keep; return their descriptors.  At start-up, every such socket was
    inherited: a process manager's (circus hands each process every socket it holds).
    Listening sockets only (SO_ACCEPTCONN): a pipe or a connection inherited is someone's
    business (a log, a notify socket), while a listener left open accepts connections that
    this server never serves."""
    closed = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd <= 2 or fd == keep or not is_listening_socket(fd):
            continue
        os.close(fd)
        closed.append(fd)
    return sorted(closed)


def is_listening_socket(fd: int) -> bool:
    """Whether fd is open on a socket that listens, of any family."""
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return False
        # A copy of the descriptor, its family given rather than found out (any will do for
        # a SOL_SOCKET option): the probe closes only its copy.
        with socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM) as probe:
            return bool(probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    except OSError:  # not open: /proc/self/fd's own descriptor, closed once listed
        return False


def handed_by_service_manager() -> bool:
    """Whether systemd (or tests/harness.py's socket_activation) handed a listening socket
    over, per sd_listen_fds(3): at fd 3, when LISTEN_PID is this process and LISTEN_FDS is 1.

    Raises HandedSocketError when sockets are meant for this process but not exactly one."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return False  # none at all, or meant for another process (a parent's, inherited)
    count = os.environ.get("LISTEN_FDS")
    # Unset, as sd_listen_fds(3) does: they describe this process, not the ones it forks.
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if count != "1":
        raise HandedSocketError(f"expected 1 socket from the service manager, not {count}")
    return True


def notify_service_manager(state: str) -> None:
    """Tell the service manager what the server is doing, per sd_notify(3) ("READY=1",
    "STOPPING=1"): one datagram to the AF_UNIX socket named by $NOTIFY_SOCKET, an abstract one
    if the name starts with "@".  Nothing when it is unset: no manager asked."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        try:
            notify.sendto(state.encode(), address)
        except OSError as error:  # the manager has gone: the server goes on regardless
            server_log.warning("Service manager not told", state=state, reason=str(error))
