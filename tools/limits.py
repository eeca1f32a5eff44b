"""Measure the limits OPERATIONS.md states, each against a real server: ``make limits``.

1. memory    a 1 MB request of ``10 ** 4000`` lines (a 364 MB reply) with --max-bytes 1000000:
             the peak RSS of the largest server process, and of the whole server;
2. trickle   a client sending one byte a second, default options: how long until it is dropped;
3. slow      a 4 MB request of lines outside the flat form with --worker-timeout 4: whether it
             is answered in full, and how long it takes;
4. stop      the second SIGTERM with every slot busy (--max-children 1, a long request in
             flight): how long until the server has exited and left no process;
5. reply     30 lines ``9 ** 4300`` then 2,000,000 empty lines with --max-reply-bytes 100000:
             the size of the reply (the request is refused whole);
6. line      one 100 MiB line with a 4-byte character: the peak RSS of the largest server
             process, against the request's size;
7. disk      4 MB of results under ``prlimit --fsize=1048576`` (no file past 1 MiB, as on a
             full disk): what the client gets, and whether the server serves the next request;
8. idle      32 connections open that send nothing, default options: the median time of 20
             one-line requests meanwhile.

Servers are started the one way the tests start them (``tests.harness.ServerProcess``).
"""

from __future__ import annotations

import socket
import statistics
import sys
import time

from client import HEADER, recv_exactly, recv_frame, send_frame
from tests.harness import ServerProcess, session_processes, wait_until
from tools.bench import peak_rss_sampler

LOG = ("-v", "--log-format", "json")
NON_FLAT_LINE = b"(12 + 7) * 3 - 4 ** 2\n"  # 41


def discard_reply(sock: socket.socket) -> int:
    """Read a reply to its end without keeping it; its length."""
    (size,) = HEADER.unpack(recv_exactly(sock, HEADER.size))
    received = 0
    while received < size:
        received += len(sock.recv(1024 * 1024))
    return size


def memory() -> str:
    server = ServerProcess(["-n", "2", "--max-bytes", "1000000"])
    try:
        payload = b"10 ** 4000\n" * (1_000_000 // 11)
        with peak_rss_sampler(server.pid) as peaks, server.connect() as sock:
            sock.settimeout(None)
            send_frame(sock, [payload])
            size = discard_reply(sock)
        largest, whole = peaks
        peak = f"peak RSS {largest / 1e6:.0f} MB (largest process), "
        peak += f"{whole / 1e6:.0f} MB (whole server)"
        return f"{len(payload):,} bytes in, {size:,} out: {peak}"
    finally:
        server.cleanup()


def trickle() -> str:
    server = ServerProcess([*LOG])
    try:
        with server.connect() as sock:
            started = time.monotonic()
            sock.sendall(HEADER.pack(1000))
            while True:
                try:
                    sock.send(b"1")
                except (BrokenPipeError, ConnectionResetError):
                    break
                time.sleep(1.0)  # the client's pace: one byte a second
        server.wait_for_event("Client failed")
        return f"dropped after {time.monotonic() - started:.1f} s"
    finally:
        server.cleanup()


def slow() -> str:
    server = ServerProcess([*LOG, "-n", "2", "--worker-timeout", "4"])
    try:
        lines = 4_000_000 // len(NON_FLAT_LINE)
        started = time.monotonic()
        with server.connect() as sock:
            sock.settimeout(None)  # as long as it takes
            send_frame(sock, [NON_FLAT_LINE * lines])
            reply = recv_frame(sock)
        seconds = time.monotonic() - started
        verdict = "answered in full" if reply == b"41\n" * lines else "INCOMPLETE"
        failures = len(server.events("Worker failed"))
        return f"{lines:,} lines in {seconds:.1f} s: {verdict}, {failures} worker failures"
    finally:
        server.cleanup()


def stop() -> str:
    server = ServerProcess([*LOG, "-n", "2", "--max-children", "1"])
    try:
        with server.connect() as sock:
            send_frame(sock, [NON_FLAT_LINE * 200_000])
            server.wait_for_event("Worker started", worker="worker-2")
            server.process.terminate()
            server.wait_for_event("Shutting down")
            started = time.monotonic()
            server.process.terminate()
            status = server.process.wait(30)
            wait_until(lambda: not session_processes(server.pid), "every process to exit")
            gone_s = time.monotonic() - started
            return (
                f"exit status {status}, every process gone {gone_s:.3f} s after the second SIGTERM"
            )
    finally:
        server.cleanup()


def reply() -> str:
    server = ServerProcess(["-n", "2", "--max-reply-bytes", "100000"])
    try:
        payload = b"9 ** 4300\n" * 30 + b"\n" * 2_000_000
        with server.connect() as sock:
            sock.settimeout(None)
            send_frame(sock, [payload])
            answer = recv_frame(sock)
        return f"{len(payload):,} bytes in, {len(answer):,} out: {bytes(answer)!r}"
    finally:
        server.cleanup()


def line() -> str:
    server = ServerProcess(["-n", "2", "--max-bytes", str(2**30)])
    try:
        payload = b"1" * (100 * 2**20) + "\U0001f600".encode() + b"\n"
        with peak_rss_sampler(server.pid) as peaks, server.connect() as sock:
            sock.settimeout(None)
            send_frame(sock, [payload])
            answer = recv_frame(sock)
        largest = peaks[0]
        ratio = f"{largest / len(payload):.2f}x the request"
        return f"{bytes(answer)!r}: peak RSS {largest / 1e6:.0f} MB (largest process), {ratio}"
    finally:
        server.cleanup()


def disk() -> str:
    limited = ["prlimit", "--fsize=1048576", sys.executable, "bluserver.py"]
    server = ServerProcess([], command=limited)
    try:
        with server.connect() as sock:
            sock.settimeout(None)
            send_frame(sock, [b"10 ** 4000\n" * 1000])  # 4 MB of results
            answer = recv_frame(sock)
        after = server.request(b"6 * 7\n")
        return f"{bytes(answer)!r}; the next request: {after!r}"
    finally:
        server.cleanup()


def idle() -> str:
    server = ServerProcess([])
    idle_connections = [server.connect() for _ in range(32)]
    try:
        seconds = []
        for _ in range(20):
            started = time.monotonic()
            answer = server.request(b"6 * 7\n")
            seconds.append(time.monotonic() - started)
        verdict = "right" if answer == b"42\n" else f"WRONG {answer!r}"
        median_ms = statistics.median(seconds) * 1000
        return (
            f"1-line request with 32 idle connections open: median {median_ms:.1f} ms, {verdict}"
        )
    finally:
        for connection in idle_connections:
            connection.close()
        server.cleanup()


def main() -> int:
    for name, measure in [
        ("memory", memory),
        ("trickle", trickle),
        ("slow", slow),
        ("stop", stop),
        ("reply", reply),
        ("line", line),
        ("disk", disk),
        ("idle", idle),
    ]:
        print(f"{name:8} {measure()}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
