"""The handler's armour toward its client: what a client, honest or not, can do to a handler.

The lesson's RequestHandler (lesson.py) trusts its client to send its request, wait for
the reply and read it.  A client on a network may instead:

- stall, or trickle a byte at a time: each transfer is paced (``Pace``, Apache
  mod_reqtimeout's rule: --client-timeout plus one second per --min-rate bytes moved);
- announce more than --max-bytes: the request is refused unread (``RequestTooLarge``);
- send bytes after its request, or reset the connection while the request is evaluated:
  the bytes are dropped, a reset cancels the work (endings.ClientWatch, which supervise.py's
  wait for the workers watches);
- go on sending while the reply goes out: what it sends is dropped, so that neither side
  waits for the other (``ReplyPace``);
- still have unread bytes on its way when the handler closes: the handler lingers, reading
  them, so that closing does not reset the connection and destroy the reply (``linger``);
- reset the connection after its reply (HAProxy's health checks do): nothing to say.

``ClientGuard`` attaches all of this to the handler through socketserver's own hooks
(``handle``, ``finish``) and the lesson's (``pace_request``, ``pace_reply``, ``announced``).
A request the server will not evaluate (an endings.Refusal: this module's, supervise.py's) is
answered here with one error line instead of its results.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import time

from client import CHUNK_BYTES, error_line, send_frame
from endings import CLIENT_FAILURES, ClientWatch, Refusal
from lesson import RequestHandler

LINGER_S = 2.0  # how long a handler reads what a client still sends, so it can read the reply


class RequestTooLarge(Refusal):
    """A request declared more bytes than --max-bytes allows."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"request too large ({size} bytes, limit {limit})")


class Pace:
    """Apache mod_reqtimeout's rule, for one transfer (a request, or a reply): --client-timeout
    seconds plus one per --min-rate bytes moved, and no wait longer than --client-timeout.  A
    steady client is served; one that trickles is cut off.  Called before each wait."""

    def __init__(self, connection: socket.socket, timeout_s: float, min_rate: int) -> None:
        self.connection = connection
        self.timeout_s = timeout_s
        self.min_rate = min_rate
        self.started = time.monotonic()

    def __call__(self, moved: int) -> None:
        self.connection.settimeout(self.longest_wait_s(moved))

    def longest_wait_s(self, moved: int) -> float:
        """How long the next wait may take; raise socket.timeout if the client is too slow."""
        left_s = self.started + self.timeout_s + moved / self.min_rate - time.monotonic()
        if left_s <= 0:
            raise socket.timeout(f"slower than --min-rate {self.min_rate} bytes/s")
        return min(self.timeout_s, left_s)


class ReplyPace(Pace):
    """The pace of a reply, which also drops what the client still sends meanwhile: a client
    that sends while the reply goes out fills its receive buffer with the reply and blocks, and
    the handler would then wait for it to read, and it for the handler to read, until one gives
    up.  Before each send, wait until the socket can take more, reading and dropping what
    arrives."""

    def __init__(self, connection: socket.socket, timeout_s: float, min_rate: int) -> None:
        super().__init__(connection, timeout_s, min_rate)
        self.client_watch = ClientWatch(connection)

    def __call__(self, moved: int) -> None:
        while True:
            wait_s = self.longest_wait_s(moved)
            events = selectors.EVENT_WRITE
            if self.client_watch.sockets():
                events |= selectors.EVENT_READ
            # poll(), not select(): a handler's descriptors may be past 1023 (a drain takes the
            # whole backlog at once), which select() cannot watch; nor epoll, the default
            # selector, which costs two more system calls a wait, to make and to close it.
            with selectors.PollSelector() as selector:
                selector.register(self.connection, events)
                ready = selector.select(wait_s)
            if not ready:
                raise socket.timeout("timed out")
            ready_events = ready[0][1]
            if ready_events & selectors.EVENT_WRITE:
                self.connection.settimeout(wait_s)
                return
            self.client_watch.discard_stray_bytes()


class ClientGuard(RequestHandler):
    """A mixin of the lesson's RequestHandler, extending it through its hooks: the pace of
    each transfer, the limit on what a request may announce, one error line for a refusal,
    one warning for a client that fails, and the lingering close after the reply."""

    def handle(self) -> None:
        """The lesson's handle; a refusal, raised anywhere in it, answered with one error
        line; a client that failed, logged."""
        self.client_failed = False
        try:
            super().handle()
        except Refusal as refusal:
            self.event_log.warning("Request refused", reason=str(refusal))
            with contextlib.suppress(*CLIENT_FAILURES):  # a client gone needs no reply
                send_frame(self.connection, [error_line(str(refusal))])
        except CLIENT_FAILURES as error:
            self.event_log.warning("Client failed", reason=str(error) or "timed out")
            self.client_failed = True

    def pace_request(self) -> Pace:
        return Pace(self.connection, self.options.client_timeout_s, self.options.min_rate)

    def pace_reply(self) -> Pace:
        return ReplyPace(self.connection, self.options.client_timeout_s, self.options.min_rate)

    def announced(self, size: int) -> None:
        """Refuse a request larger than --max-bytes before reading a byte of it."""
        if size > self.options.max_bytes:
            raise RequestTooLarge(size, self.options.max_bytes)
        super().announced(size)

    def finish(self) -> None:
        """Linger after the reply (or a refusal), unless the client has already failed."""
        if not self.client_failed:
            linger(self.connection)
        super().finish()


def linger(connection: socket.socket) -> None:
    """Say we are done (FIN), then read and drop what the client still sends, until it closes
    or for LINGER_S at most (nginx's lingering close): closing with unread bytes sends a reset,
    which destroys whatever of the reply the client has not read yet.

    The reply has been sent: however the client's socket fails from here on (a reset, as
    HAProxy's checks end; ENOTCONN, when shutdown() meets a connection already reset), the
    request was served, and there is nothing to tell anyone.
    """
    deadline = time.monotonic() + LINGER_S
    with contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_WR)
        while True:
            left_s = deadline - time.monotonic()
            if left_s <= 0:
                return
            connection.settimeout(left_s)
            if not connection.recv(CHUNK_BYTES):
                return
