"""bluserver: the server people run — the lesson, with its armour composed over it.

Usage: ``python bluserver.py -p 1982 -n 2``.  README.md has the protocol and a reading guide;
OPERATIONS.md the limits and running it in production.

The lesson (lesson.py) is a ``socketserver.ForkingTCPServer`` whose handler cuts each
request into slices and evaluates each slice in a ``multiprocessing.Process``, linked to it
by a ``multiprocessing.Pipe``; it runs alone, and trusts its clients, its workers and the
machine.  This module composes the server people run from it, as socketserver composes
``ForkingTCPServer`` from ``ForkingMixIn`` and ``TCPServer``: each piece of armour is a class
that opens with the failure it handles, attached through socketserver's hooks and the
lesson's::

    ArmouredServer         the lesson's BluServer, with serving.py's classes: signals and
                           the drain, forks that fail, idle connections, handed sockets
      GuardedRequestHandler  the lesson's RequestHandler, with guard.py (the client),
                             supervise.py (the workers) and RejectedLinesLog (-vv)
        ServedSlice          the lesson's Slice, supervised (supervise.py), whose workers
                             answer with fastpath.py (the grammar's answers, faster)

Then the command line: the lesson's options and the limits, each with its unit.
"""

from __future__ import annotations

import argparse
import errno
import logging
import math
from collections.abc import Sequence
from typing import Callable

import fastpath
import guard
import lesson
import serving
import supervise
from client import ERROR_PREFIX
from events import log_to_stdout, server_log
from lesson import whole_number

# === The server people run: the lesson, with its armour composed over it =================


class ServedSlice(supervise.SupervisedSlice):
    """The lesson's Slice, supervised (supervise.py), its workers answering with the fast path:
    the grammar's answers, without pyparsing for a valid line (fastpath.py)."""

    evaluate_line = staticmethod(fastpath.evaluate_line)


EXCERPT_CHARS = 80  # how much of a rejected line -vv logs


class RejectedLinesLog(lesson.RequestHandler):
    """A mixin of the lesson's RequestHandler, for -vv: once the reply is sent, one DEBUG event
    per error line, with at most EXCERPT_CHARS of its line.  A line may be 256 MiB long, and
    its log entry is still one short line."""

    def send_reply(self, slices: list[lesson.Slice]) -> int:
        length = super().send_reply(slices)
        if slices and self.event_log.isEnabledFor(logging.DEBUG):
            self.log_rejected_lines(slices)
        return length

    def log_rejected_lines(self, slices: list[lesson.Slice]) -> None:
        """The results hold one line for each line of the request, in order, slice after
        slice: the nth result line answers the nth line of the payload."""
        payload = slices[0].payload  # every slice's: the whole request
        line_start = 0
        for slice_ in slices:
            slice_.results.seek(0)
            for result in slice_.results:
                if result.startswith(ERROR_PREFIX):
                    excerpt = line_excerpt(payload, line_start)
                    reason = result[len(ERROR_PREFIX) : -1].decode()
                    self.event_log.debug("Line rejected", line=excerpt, reason=reason)
                line_start = payload.find(b"\n", line_start) + 1


def line_excerpt(payload: bytearray, line_start: int) -> str:
    """The repr of the line at line_start, cut at EXCERPT_CHARS: built from a copy of that
    many bytes, never of the whole line, which may be 256 MiB."""
    head = bytes(payload[line_start : line_start + EXCERPT_CHARS])
    newline = head.find(b"\n")
    if newline >= 0:  # the whole line is here: its '\n' or '\r\n' is no part of it
        head = head[:newline].removesuffix(b"\r")
    return repr(head.decode("utf-8", "surrogateescape"))[:EXCERPT_CHARS]


class GuardedRequestHandler(
    RejectedLinesLog, guard.ClientGuard, supervise.WorkerSupervision, lesson.RequestHandler
):
    """The lesson's RequestHandler, guarded toward its client (guard.py), supervising its
    workers (supervise.py), and logging rejected lines at -vv (RejectedLinesLog).

    No two of these mixins override the same method, so their order among themselves changes
    nothing; each comes before lesson.RequestHandler, which their super() calls reach.
    ClientGuard.handle wraps the lesson's handle, so that a Refusal raised anywhere in it
    (guard.py's announced; supervise.py's slices and CPU limit) becomes one error line.
    """

    slice_class = ServedSlice


class ArmouredServer(
    serving.SignalledServing,
    serving.DeferredAccept,
    serving.HandedListener,
    lesson.BluServer,
):
    """The server main() runs: the lesson's BluServer, with the armour of the server process
    composed over it.  Each class of serving.py opens with the failures it handles: signals
    (a drain, then a stop) and a fork that fails, a connection that sends nothing, a
    listening socket handed over by a process manager.

    The order matters where two classes override one hook, each calling the next:

    - SignalledServing first: its process_request must wrap any other class's (a fork only
      inside the signal mask), and its finish_request take the child's first steps (its
      own process group, its own signals) before any other runs in the child.  No other
      class overrides either today.
    - DeferredAccept before HandedListener: HandedListener.server_activate does not call
      super() for a handed socket (it listens already), and deferred accept is set on it too.
    - HandedListener before BluServer: its server_bind takes the handed socket instead of
      TCPServer's bind.

    Of socketserver, it uses

    - as they are: TCPServer's bind, listen and close; ForkingMixIn's fork and its child's end
      (shutdown_request, os._exit), collect_children, service_actions; handle_error;
      serve_forever, shutdown and handle_request, for a program that embeds the server;
    - extended: server_bind (HandedListener), server_activate (HandedListener, DeferredAccept,
      SignalledServing), server_close (SignalledServing: signals no longer recorded),
      verify_request (DeferredAccept), process_request and finish_request (SignalledServing:
      the fork sequence);
    - replaced: get_request (the connections already accepted first);
    - added: main() serves with SignalledServing.serve_until_signalled (its docstring says why
      it is not serve_forever), which takes socketserver's steps per connection and reaps
      handlers without waiting (reap_handlers).
    """

    handler_class = GuardedRequestHandler

    def __init__(self, options: argparse.Namespace) -> None:
        self.max_children = options.max_children  # --max-children, where the lesson keeps 40
        super().__init__(options)


# === The command line ============================================================================


def seconds(low: float, high: float) -> Callable[[str], float]:
    """An argparse type: a number of seconds from low to high ('inf' and 'nan' are not)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not low <= value <= high:  # false for nan
            raise argparse.ArgumentTypeError(f"must be {low:g}-{high:g} seconds, not {text}")
        return value

    return parse


DAY_S = 86_400.0  # the longest timeout: past it, a timeout is a mistake, not a choice
MAX_FD = 2**31 - 1  # the largest file descriptor number (a C int)
# The shortest --worker-timeout: under a second, a moment of a busy machine's scheduling
# would look like a worker's silence.
MIN_WORKER_TIMEOUT_S = 1.0
MIN_REPLY_BYTES = 1024  # a refusal line must fit in a reply

EPILOG = """\
examples:
  python bluserver.py                  # localhost:1982, up to 2 workers per request
  python bluserver.py -a 0.0.0.0 -p 2000 -n 4 -v --log-format json
  python bluserver.py -a ::1           # IPv6; -a :: takes IPv6 and IPv4 on Linux

signals:
  The first SIGINT (Ctrl-C) or SIGTERM takes the connections already waiting in the listen
  backlog, closes the listening socket, serves those connections and the requests in flight,
  and exits 0.  A second one ends them at once and exits 1.  If no handler can be started
  (out of processes) for 3 s of the drain, the connections still waiting are answered with
  one error line ("error: server cannot start a handler (...); try again later").

a listening socket handed over (the address is then the socket's: -a and -p are unused):
  --fd N             serve the listening TCP socket open at file descriptor N, as a process
                     manager hands one over (circus: --fd $(circus.sockets.NAME))
  socket activation  started by systemd with a listening socket (LISTEN_PID, LISTEN_FDS, the
                     socket at fd 3), the server serves it (deploy/bluserver@.socket) and
                     tells systemd when it serves and stops (sd_notify, $NOTIFY_SOCKET)
  --fd wins if both are given.

exit status:
  0  stopped by a signal, after the drain
  1  the address cannot be used, a socket handed over is not a listening TCP socket, or a
     second signal stopped the server at once
  2  bad arguments
"""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = lesson.command_line(
        description="Evaluate arithmetic expressions sent over TCP, one per line, in worker "
        "processes.\nA client sends a request of lines; the reply has one result line per line.",
        epilog=EPILOG,
    )
    add = parser.add_argument
    add(
        "--fd",
        type=whole_number(0, MAX_FD),
        metavar="N",
        help="serve the listening socket open at file descriptor N instead of -a and -p",
    )
    add(
        "--log-format",
        choices=("kv", "json"),
        default="kv",
        help="key=value lines or JSON (default: %(default)s)",
    )
    add_limits(
        parser.add_argument_group("limits (OPERATIONS.md, 'Limits', says what happens at each)")
    )
    return parser.parse_args(argv)


def add_limits(group: argparse._ArgumentGroup) -> None:
    """The options that bound what one client or request can cost."""
    group.add_argument(
        "--max-bytes",
        type=whole_number(1, 2**36),
        default=256 * 2**20,
        metavar="BYTES",
        help="largest request; a larger one is refused unread (256 MiB)",
    )
    group.add_argument(
        "--max-reply-bytes",
        type=whole_number(MIN_REPLY_BYTES, 2**40),
        default=2**30,
        metavar="BYTES",
        help="largest reply, at least 1024 (a refusal line must fit); a request whose reply "
        "would be larger is refused (1 GiB)",
    )
    group.add_argument(
        "--max-children",
        type=whole_number(1, 4096),
        default=16,
        metavar="N",
        help="requests handled at once; more wait in the listen backlog (16)",
    )
    group.add_argument(
        "--client-timeout",
        dest="client_timeout_s",
        type=seconds(0.1, DAY_S),
        default=30.0,
        metavar="SECONDS",
        help="longest silence of a client; sending a request or reading a reply may take "
        "this long plus a second per --min-rate bytes (30)",
    )
    group.add_argument(
        "--min-rate",
        type=whole_number(1, 2**30),
        default=16384,
        metavar="BYTES_PER_S",
        help="slowest steady transfer of a request or reply, past --client-timeout (16384)",
    )
    group.add_argument(
        "--worker-timeout",
        dest="worker_timeout_s",
        type=seconds(MIN_WORKER_TIMEOUT_S, DAY_S),
        default=60.0,
        metavar="SECONDS",
        help="longest silence of a worker that uses no CPU (60)",
    )
    group.add_argument(
        "--cpu-floor",
        dest="cpu_floor_s",
        type=seconds(0.1, DAY_S),
        default=2.0,
        metavar="SECONDS",
        help="CPU time every request's workers may use, whatever its size (2)",
    )
    group.add_argument(
        "--cpu-per-mib",
        dest="cpu_per_mib_s",
        type=seconds(0.0, DAY_S),
        default=5.0,
        metavar="SECONDS",
        help="more CPU time allowed per MiB of request; past floor plus this, the request is "
        "refused (5)",
    )


def main(argv: Sequence[str] | None = None) -> None:
    options = parse_args(argv)
    lesson.become_server()
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(options.verbose, 2)]
    log_to_stdout(level, as_json=options.log_format == "json")
    server = open_server(options)
    lesson.announce(server)
    # Until the first SIGINT or SIGTERM, then the drain (serving.SignalledServing).
    server.serve_until_signalled()
    server_log.warning("Server stopped")


def open_server(options: argparse.Namespace) -> ArmouredServer:
    """The server, listening; if it cannot listen, exit 1 with one line on stderr."""
    try:
        return ArmouredServer(options)
    except serving.HandedSocketError as error:
        raise SystemExit(f"bluserver: {error}") from None
    except OSError as error:
        where = (
            f"port {options.port} is already in use (try -p)"
            if error.errno == errno.EADDRINUSE
            else (f"cannot listen on {options.address}:{options.port}: {error.strerror or error}")
        )
        raise SystemExit(f"bluserver: {where}") from None


if __name__ == "__main__":
    main()
