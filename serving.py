"""The armour of the server process: what keeps bluserver.BluServer serving when things go wrong.

bluserver.BluServer is the lesson: socketserver's ForkingTCPServer with a handler class, the
way socketserver means it to be used.  Each class here is a ForkingTCPServer too, and
overrides socketserver's hooks to handle one failure of a server process; its docstring
opens with that failure.  bluserver.ArmouredServer composes them over BluServer, the way
socketserver composes ``ForkingTCPServer`` from ``ForkingMixIn`` and ``TCPServer``::

    class ArmouredServer(SignalledServing, ForkRetry, DeferredAccept, HandedListener, BluServer)

    SignalledServing   Ctrl-C or SIGTERM would end every request in flight: serve_forever is
                       replaced by a loop that turns signals into a drain (and a second signal
                       into a stop), and forks handlers that signals meant for the server
                       cannot reach (the fork sequence: process_request).
    ForkRetry          out of processes, fork() fails: the connection is kept and its fork
                       tried again; during a drain, for a few seconds, then it is refused.
    DeferredAccept     a connection that sends nothing would hold a handler: the kernel keeps
                       it until it sends (TCP_DEFER_ACCEPT), and verify_request drops it after.
    HandedListener     a restart that binds its own port refuses connections while no process
                       listens: a service manager holds the socket and hands it over.

Socket activation and sd_notify (the service manager's side) close the module.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import selectors
import signal
import socket
import socketserver
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, NoReturn

from client import CHUNK_BYTES, error_line, send_frame
from events import server_log

SHUTDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM)
SD_LISTEN_FDS_START = 3  # systemd's protocol, sd_listen_fds(3): handed sockets start at fd 3
TCP_FAMILIES = (socket.AF_INET, socket.AF_INET6)


# === Signals: a drain, then a stop ===============================================================


class SignalPipe:
    """The signals the server handles, as one byte each in a pipe (``signal.set_wakeup_fd``).

    The pipe, not a Python-level signal handler, is the record, for two reasons.  CPython runs
    a signal handler once for signals of one kind that arrive close together, but writes a
    byte for each.  And the pipe wakes the select() that waits for a connection and a signal
    at once, so nothing blocks signals while the server waits (sigwait() would: two SIGTERMs
    merged into one).
    """

    def __init__(self, signums: Sequence[signal.Signals]) -> None:
        self.reader, self.writer = os.pipe()
        os.set_blocking(self.reader, False)  # received() reads until it is empty
        os.set_blocking(self.writer, False)  # C's signal handler writes: it must never block
        signal.set_wakeup_fd(self.writer)
        for signum in signums:
            signal.signal(signum, self.noted)

    @staticmethod
    def noted(signum: int, frame: object) -> None:
        """Nothing to do: without a signal handler no byte is written; the byte is the record."""

    def received(self) -> list[signal.Signals]:
        """The signals that arrived since the last call, in order."""
        data = bytearray()
        with contextlib.suppress(BlockingIOError):  # nothing more to read
            while True:
                data += os.read(self.reader, 4096)
        return [signal.Signals(signum) for signum in data]

    def close(self) -> None:
        """Stop recording signals (in a forked handler: its signals are its own)."""
        signal.set_wakeup_fd(-1)
        os.close(self.reader)
        os.close(self.writer)


class SignalledServing(socketserver.ForkingTCPServer):
    """The failure: SIGINT (a terminal's Ctrl-C) raises KeyboardInterrupt wherever the server
    happens to be, and SIGTERM's default action ends it at once; either way the connections in
    the listen backlog are reset, and a Ctrl-C also reaches every handler and worker on the
    terminal, ending the requests in flight.

    Here the first SIGINT or SIGTERM ends serve_forever; drain() then serves the connections
    already waiting and the requests in flight, and returns once every handler has ended.  A
    second signal kills them all and exits 1 (stop_now).  Handlers live in process groups of
    their own, out of the terminal's reach (the fork sequence: process_request).

    Of socketserver, this replaces serve_forever (why: there) and overrides service_actions
    (act on the signals), collect_children (never wait), process_request and finish_request
    (the fork sequence), server_activate (signals are handled from the moment the server
    listens) and get_request (the connections in ``accepted`` first).
    """

    # At the drain, take connections from the backlog for at most this long: a flood of new
    # ones must not keep the listener open.
    backlog_take_s = 0.5

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # ForkingMixIn's set of the handlers' pids is None until its first fork: a set from
        # the start, for stop_now.
        self.active_children: set[int] = set()
        # The connections accepted that have no handler yet: the backlog, taken when the drain
        # begins, and one whose fork failed (ForkRetry).  Served before the listener's, in
        # order; the first not before next_try_at.
        self.accepted: deque[tuple[socket.socket, Any]] = deque()
        self.next_try_at = 0.0
        self.shutdown_signal: signal.Signals | None = None  # the first SIGINT or SIGTERM
        self.signals: SignalPipe | None = None  # set once the server listens
        super().__init__(*args, **kwargs)

    def server_activate(self) -> None:
        """Listen, then handle signals: from now on a SIGTERM drains (connections may already
        wait in the backlog).  The listener does not block: the loop accepts only once select()
        says a connection waits, and a socket shared with other processes (HandedListener) may
        have lost it to one of them meanwhile; the drain accepts until the backlog is empty."""
        super().server_activate()
        self.socket.setblocking(False)
        self.signals = SignalPipe([*SHUTDOWN_SIGNALS, signal.SIGCHLD])

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Serve until the first SIGINT or SIGTERM; drain() serves what is left.

        Not socketserver's own loop, for three reasons:

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
        connection (wait_for_signal_or_connection); it keeps socketserver's hook for the
        work of each turn (service_actions: here, acting on the signals) and its steps for
        each connection (serve_connection).  poll_interval is unused: nothing is polled.
        """
        notify_service_manager("READY=1")
        while not self.shutdown_signal:
            self.serve_one_turn()

    def drain(self) -> None:
        """After serve_forever: serve the connections taken from the backlog as handlers
        become free to start (max_children still holds), and return once every handler has
        ended.  begin_drain, at the first signal, has closed the listener."""
        assert self.shutdown_signal, "serve_forever has returned"
        while self.active_children or self.accepted:
            self.serve_one_turn()

    def begin_drain(self, signum: signal.Signals) -> None:
        """The first SIGINT or SIGTERM, at once: take the connections waiting in the listen
        backlog, close the listener, and say so (serve_forever returns, drain follows).

        New connections are refused once the listener is closed (a balancer retries them
        elsewhere), or wait in the socket's backlog if a service manager holds it.  So are
        connections open but silent when the drain begins: deferred accept keeps them from the
        backlog (README, "Signals", says why they are not waited for)."""
        self.shutdown_signal = signum
        self.take_backlog()
        self.server_close()
        notify_service_manager("STOPPING=1")
        server_log.warning(
            "Shutting down",
            signal=signum.name,
            requests_in_flight=len(self.active_children),
            connections_waiting=len(self.accepted),
        )

    def serve_one_turn(self) -> None:
        """Wait for a signal or a connection, act on the signals, then hand the connection
        that is due (if one is) to a handler."""
        readable = self.wait_for_signal_or_connection()
        self.service_actions()
        if self.connection_due(listener_ready=self.socket in readable):
            self.serve_connection()

    def wait_for_signal_or_connection(self) -> list[Any]:
        """Wait in select() until a signal arrives, or a connection is to be served while a
        handler is free to start: the first of ``accepted`` once its try is due, else one in
        the listener's backlog.  While max_children handlers run, only a signal ends the wait
        (SIGCHLD: one has ended).  Returns the readable ones of the objects selected."""
        assert self.signals, "the server listens"
        readers: list[Any] = [self.signals.reader]
        timeout_s = None  # until a signal
        if self.handler_free_to_start() and self.accepted:
            timeout_s = max(0.0, self.next_try_at - time.monotonic())
        elif self.handler_free_to_start() and not self.shutdown_signal:
            readers.append(self.socket)
        # A selector, not select.select(): a socket handed over may be past descriptor 1023.
        with selectors.DefaultSelector() as selector:
            for reader in readers:
                selector.register(reader, selectors.EVENT_READ)
            return [key.fileobj for key, _ in selector.select(timeout_s)]

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
        get_request, verify_request, then process_request or shutdown_request."""
        try:
            connection, client_address = self.get_request()
        except OSError:  # as socketserver: another process took it first, or it was reset
            return
        if not self.verify_request(connection, client_address):
            self.shutdown_request(connection)
            return
        try:
            self.process_request(connection, client_address)
        except Exception:  # as socketserver: an error of one connection is logged, not fatal
            self.handle_error(connection, client_address)
            self.shutdown_request(connection)

    def get_request(self) -> tuple[socket.socket, Any]:
        """The first connection accepted that has no handler yet, else the next from the
        backlog (BlockingIOError if there is none)."""
        if self.accepted:
            return self.accepted.popleft()
        return self.socket.accept()

    def service_actions(self) -> None:
        """socketserver's hook, run once per turn of the loop: act on the signals that arrived.
        SIGCHLD: reap the handlers that ended.  The first SIGINT or SIGTERM: stop serving
        (serve_forever returns; drain follows).  Any later one: stop at once."""
        assert self.signals, "the server listens"
        for signum in self.signals.received():
            if signum == signal.SIGCHLD:
                self.collect_children()
            elif not self.shutdown_signal:
                self.begin_drain(signum)
            else:
                self.stop_now(signum)

    def collect_children(self, *, blocking: bool = False) -> None:
        """Reap every handler that has ended, never waiting for one: the loop waits, in
        select(), for the SIGCHLD that says one has.  ForkingMixIn's own blocks in
        os.waitpid(-1, 0) while max_children handlers run, and with blocking (which its
        server_close, called by begin_drain to close the listener, passes as block_on_close)
        waits for every one, deaf to a second signal.  So blocking is ignored: the drain
        waits for the handlers itself, in select()."""
        while self.active_children:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:  # no child left
                return
            if not pid:  # none has ended
                return
            self.active_children.discard(pid)  # forgotten once reaped: its pid may be reused

    def process_request(self, connection: Any, client_address: Any) -> None:
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
        """
        signal.pthread_sigmask(signal.SIG_BLOCK, SHUTDOWN_SIGNALS)
        try:
            super().process_request(connection, client_address)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SHUTDOWN_SIGNALS)

    def finish_request(self, connection: Any, client_address: Any) -> None:
        """Steps 3 to 7 of the fork sequence (process_request), in the child only."""
        assert self.signals, "the server listens"
        self.signals.close()
        self.socket.close()  # only the server accepts
        for waiting_connection, _ in self.accepted:
            waiting_connection.close()
        self.accepted.clear()
        os.setpgid(0, 0)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SHUTDOWN_SIGNALS)
        for signum in (*SHUTDOWN_SIGNALS, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        super().finish_request(connection, client_address)

    def take_backlog(self) -> None:
        """Accept every connection in the listen backlog: closing the listener would reset
        them, and a balancer that has already sent a request on one cannot send it again."""
        deadline = time.monotonic() + self.backlog_take_s
        while time.monotonic() < deadline:
            try:
                self.accepted.append(self.socket.accept())
            except BlockingIOError:  # the backlog is empty
                return
            except OSError as error:  # e.g. out of file descriptors: the rest are reset
                server_log.warning("Backlog not taken", reason=str(error))
                return

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


# === Out of processes: a fork that fails =========================================================


class ForkRetry(socketserver.ForkingTCPServer):
    """The failure: fork() fails when the system is out of processes (EAGAIN: RLIMIT_NPROC, a
    full process table) or memory (ENOMEM).  ForkingMixIn lets the error reach socketserver's
    handle_error, which prints a traceback and closes the connection: a request lost to a
    moment's shortage.

    Here the connection is kept, first in ``accepted`` (SignalledServing), and its fork tried
    again every fork_retry_s; the loop acts on signals meanwhile, and new connections wait in
    the backlog.  During a drain the retries end: once forks have failed for
    drain_fork_failures_s, every connection accepted is refused with one line (refuse), and
    the drain ends with the requests in flight.
    """

    accepted: deque[tuple[socket.socket, Any]]  # SignalledServing's
    next_try_at: float
    shutdown_signal: signal.Signals | None
    fork_retry_s = 0.1
    drain_fork_failures_s = 3.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.fork_failed_for: socket.socket | None = None  # warned about once, not at each try
        self.failing_in_drain_since: float | None = None  # forks have failed since, draining
        super().__init__(*args, **kwargs)

    def process_request(self, connection: Any, client_address: Any) -> None:
        """Fork a handler; if fork() fails, keep the connection and try again."""
        try:
            super().process_request(connection, client_address)
        except OSError as error:  # from fork(), before anything was started
            self.fork_failed(connection, client_address, error)
        else:
            self.failing_in_drain_since = None

    def fork_failed(self, connection: socket.socket, client_address: Any, error: OSError) -> None:
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
            connection, _ = self.accepted.popleft()
            refuse(connection, error_line(reason))
            self.shutdown_request(connection)


def refuse(connection: socket.socket, refusal: bytes) -> None:
    """Send refusal as the reply, from the server process itself, which must never wait for a
    client: the socket does not block, and a client that does not take a line is not sent one.

    First what has arrived of the request is read and dropped: closing a connection with
    unread bytes resets it, which destroys the refusal before the client reads it.  A request
    larger than what has arrived (CHUNK_BYTES at most) still meets that reset."""
    connection.setblocking(False)
    with contextlib.suppress(OSError):  # nothing has arrived, or the client has gone
        connection.recv(CHUNK_BYTES)
    with contextlib.suppress(OSError):  # the client has gone, or takes nothing
        send_frame(connection, [refusal])


# === Idle connections: deferred accept ===========================================================


class DeferredAccept(socketserver.ForkingTCPServer):
    """The failure: a client that connects and sends nothing would hold a handler — a process,
    one of max_children — for its whole --client-timeout; max_children such connections hold
    the server, and every other client waits.

    Here the kernel keeps a connection from accept() until its client has sent something, for
    up to --client-timeout seconds (Linux's TCP_DEFER_ACCEPT, nginx's "deferred", HAProxy's
    "defer-accept"): one that sends nothing takes no handler; verify_request drops one that
    comes out of that wait having sent nothing.
    """

    options: argparse.Namespace  # bluserver.BluServer's
    defers_accept = hasattr(socket, "TCP_DEFER_ACCEPT")  # Linux's

    def server_activate(self) -> None:
        """Listen, with deferred accept.  Set on a handed socket too: the option lives in the
        socket, and the server knows the timeout."""
        super().server_activate()
        if self.defers_accept:
            silence_s = math.ceil(self.options.client_timeout_s)
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, silence_s)

    def verify_request(self, connection: Any, client_address: Any) -> bool:
        """False for a connection that has sent nothing: under deferred accept, the kernel hands
        one over only after --client-timeout seconds of silence."""
        if not self.defers_accept:
            return True
        try:
            connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)  # left for the handler
        except BlockingIOError:
            silent_s = self.options.client_timeout_s
            reason = f"sent nothing within --client-timeout ({silent_s:g} s)"
            server_log.warning("Client failed", peer=client_address, reason=reason)
            return False
        return True


# === Restarts: a listening socket handed over ====================================================


class HandedSocketError(Exception):
    """A socket handed over (--fd, or by the service manager) is not one the server can use."""


class HandedListener(socketserver.ForkingTCPServer):
    """The failure: a server that binds its own port leaves a gap at every restart.  Until the
    new process listens, connections are refused; the old one's backlog is reset when it
    closes; and while it still holds the port, the new one cannot bind it.

    Here a process manager holds the listening socket and hands it to each process it starts:
    connections wait in the socket's backlog for whichever process serves next.  systemd does
    it by socket activation (handed_by_service_manager), others (circus, a shell) by an
    open file descriptor named with --fd.  A handed socket is bound and listening already:
    server_bind takes it instead of binding, and server_activate leaves it as it is.
    """

    options: argparse.Namespace  # bluserver.BluServer's
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
