"""How a request ends early: refused, or its client gone.  Shared by the handler's armour.

Two kinds of ending, raised wherever they are found and answered in one place
(guard.ClientGuard.handle):

- a ``Refusal``: the server will not evaluate the request, or not finish it; the client gets
  one error line instead of the results.  Each limit's refusal is defined beside the limit:
  guard.py's toward the client (RequestTooLarge), supervise.py's toward the workers
  (ReplyTooLarge, ReplyNotStored, WorkerNotStarted, RequestTooCostly);
- a client failure (``CLIENT_FAILURES``): it went silent, too slow, or reset the connection;
  nobody is left to answer.

``ClientWatch`` finds the second while the request is evaluated: supervise.py's wait for the
workers also waits on the client's connection through it, and guard.py's reply pace drops
what the client sends meanwhile.
"""

from __future__ import annotations

import math
import os
import socket

from client import CHUNK_BYTES

CLIENT_FAILURES = (socket.timeout, ConnectionError)  # silent or too slow; closed or reset


class Refusal(Exception):
    """Why a request is answered with one error line instead of its results."""


class ClientWatch:
    """The client's connection while its request is evaluated.

    Stray bytes it sends after the request are read and dropped: unread, they would make
    close() reset the connection and cut the reply.  A reset raises ConnectionResetError (or
    another ConnectionError), which cancels the work.  End of file is a half-close after
    sending, and the request is still served; from then on the socket is always readable, so
    it is no longer waited on, only checked for a reset, at least every CHECK_INTERVAL_S.
    """

    CHECK_INTERVAL_S = 0.5  # a check costs one system call; a reset is noticed within this

    def __init__(self, connection: socket.socket) -> None:
        self.connection = connection
        self.half_closed = False

    def sockets(self) -> list[socket.socket]:
        """What to wait on: the socket, until the client has half-closed it."""
        return [] if self.half_closed else [self.connection]

    def longest_wait_s(self) -> float:
        """How long the handler may wait without checking on the client."""
        return self.CHECK_INTERVAL_S if self.half_closed else math.inf

    def discard_stray_bytes(self) -> None:
        """Read what the client has sent (it is readable): drop it, or note its half-close."""
        if not self.connection.recv(CHUNK_BYTES):
            self.half_closed = True

    def check(self) -> None:
        """Raise ConnectionResetError if a half-closed client has since reset the connection."""
        if not self.half_closed:
            return
        # A reset after the client's end of file is not seen by reading (end of file again),
        # but leaves its error on the socket.
        error = self.connection.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            raise ConnectionResetError(error, os.strerror(error))
