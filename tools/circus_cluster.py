"""make cluster's configurations: deploy/circus.ini and deploy/haproxy.cfg for a port, checked.

``python -m tools.circus_cluster [-p PORT] [-i INSTANCES] [-n WORKERS] [--cert PEM] [--run-dir
DIR]`` writes both files to the run directory (build/cluster-PORT/), adapted to these values
(``circus_config``, ``haproxy_config``; with the defaults they change only paths), for stock
``circusd`` to run: HAProxy on 127.0.0.1:PORT (TLS with --cert) in front of INSTANCES servers
(``bluserver.py -n WORKERS``) on PORT+1 ... PORT+INSTANCES. tools/cluster.sh runs it.

Nothing of ours runs between circus and the processes: this module only writes files, and
refuses at once, with one line and exit status 1, what would otherwise fail later and over
and over (HAProxy restarted every second by circus): a port out of range or in use, a
certificate HAProxy cannot load (``haproxy -c`` on the configuration written), no haproxy.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

ROOT = Path(__file__).resolve().parent.parent
CIRCUS_TEMPLATE = ROOT / "deploy" / "circus.ini"
HAPROXY_TEMPLATE = ROOT / "deploy" / "haproxy.cfg"
HOST = "127.0.0.1"
DEFAULT_PORT = 1982
DEFAULT_INSTANCES = 3
DEFAULT_WORKERS = 2
HIGHEST_PORT = 65535
CHECK_TIMEOUT_S = 30.0  # for haproxy -c

# What deploy/circus.ini names, and make cluster changes (circus_config).
TEMPLATE_RUN_DIR = "build/cluster-1982"
TEMPLATE_SERVER = ".venv/bin/python bluserver.py"
FIRST_INSTANCE = "[socket:blu1]"  # blu1's socket and watcher, up to blu2's: every instance's
SECOND_INSTANCE = "[socket:blu2]"
FRONT_PORT = re.compile(r"^(\[socket:front\]\nhost = \S+\nport = )\d+", re.MULTILINE)
INSTANCE_PORT = re.compile(r"^port = \d+", re.MULTILINE)
WORKERS_OPTION = re.compile(r" -n \d+$", re.MULTILINE)

# What deploy/haproxy.cfg names, and make cluster changes (haproxy_config).
BIND_LINE = re.compile(r"^(\s*bind\s+)\S+", re.MULTILINE)
SERVER_LINE = re.compile(r"^\s*server\s.*\n", re.MULTILINE)
FRONT_SOCKET = '"fd@${FRONT_FD}"'  # the socket circus hands HAProxy (deploy/circus.ini)
TLS_OPTIONS = "ssl crt {certificate} ssl-min-ver TLSv1.2"  # as deploy/haproxy.cfg shows


class ClusterError(Exception):
    """A configuration that cannot serve; its message is the one line make cluster prints."""


def haproxy_config(
    template: str, address: str, instance_ports: Sequence[int], certificate: str | None = None
) -> str:
    """template with its bind address set to address (with TLS if certificate, a PEM file of
    certificate and key, is given) and its server lines replaced by one per instance.

    Raises ValueError if template has not exactly one bind line or has no server line.
    """
    tls = "" if certificate is None else " " + TLS_OPTIONS.format(certificate=certificate)
    bind = address + tls
    config, binds = BIND_LINE.subn(lambda line: line.group(1) + bind, template)
    first_server = SERVER_LINE.search(config)
    if binds != 1 or not first_server:
        raise ValueError(
            f"{HAPROXY_TEMPLATE} must have one 'bind ADDRESS' line and at least one 'server' line"
        )
    servers = "".join(
        f"    server blu{number} {HOST}:{instance_port}\n"
        for number, instance_port in enumerate(instance_ports, 1)
    )
    head = config[: first_server.start()]
    tail = config[first_server.start() :]
    return head + servers + SERVER_LINE.sub("", tail)


def circus_config(
    template: str, port: int, instances: int, *, workers: int, server: str, run_dir: str
) -> str:
    """template with the front socket on port, one socket and watcher per instance (copies of
    blu1's, on port+1 ... port+instances), -n workers, server for the interpreter and
    bluserver.py, and run_dir for the run directory.

    Raises ValueError if template has no front socket or no blu1.
    """
    head, first, rest = template.partition(FIRST_INSTANCE)
    head, fronts = FRONT_PORT.subn(rf"\g<1>{port}", head)
    if not first or fronts != 1:
        raise ValueError(f"{CIRCUS_TEMPLATE} must have a [socket:front] and a {FIRST_INSTANCE}")
    first_block = (first + rest.partition(SECOND_INSTANCE)[0]).rstrip("\n") + "\n"
    blocks = [
        INSTANCE_PORT.sub(f"port = {port + number}", first_block.replace("blu1", f"blu{number}"))
        for number in range(1, instances + 1)
    ]
    config = WORKERS_OPTION.sub(f" -n {workers}", head + "\n".join(blocks))
    config = config.replace(TEMPLATE_SERVER, server)
    return config.replace(TEMPLATE_RUN_DIR, run_dir)


def check_ports(port: int, instances: int) -> None:
    """Raises ClusterError unless port ... port+instances are valid and free on HOST."""
    last = port + instances
    if port < 1 or last > HIGHEST_PORT:
        raise ClusterError(f"PORT={port}: its ports, {port}-{last}, must lie in 1-{HIGHEST_PORT}")
    for number in range(port, last + 1):
        try:
            with socket.create_server((HOST, number)):
                pass
        except OSError as error:
            raise ClusterError(
                f"port {number} cannot be listened on: {error.strerror} (a cluster running? "
                "try PORT=...)"
            ) from None


def check_haproxy(config_path: Path) -> None:
    """Raises ClusterError, with HAProxy's first complaint, unless ``haproxy -c`` accepts the
    configuration (its certificate among the rest), given a front socket as circus gives it."""
    with socket.socket() as front:
        front.bind((HOST, 0))
        front.listen()
        result = subprocess.run(
            ["haproxy", "-c", "-f", str(config_path)],
            env={**os.environ, "FRONT_FD": str(front.fileno())},
            pass_fds=[front.fileno()],
            capture_output=True,
            text=True,
            timeout=CHECK_TIMEOUT_S,
            check=False,
        )
    if result.returncode != 0:
        alerts = [line for line in result.stderr.splitlines() if "[ALERT]" in line]
        complaint = (alerts or [result.stderr.strip() or "no message"])[0]
        raise ClusterError(f"HAProxy refuses {config_path}: {complaint.partition(' : ')[2]}")


def write_configs(args: argparse.Namespace, run_dir: Path) -> Path:
    """Write circus's and HAProxy's configurations for args to run_dir; circus's path."""
    run_dir.mkdir(parents=True, exist_ok=True)
    ports = [args.port + number for number in range(1, args.instances + 1)]
    certificate = str(Path(args.cert).resolve()) if args.cert else None
    haproxy = haproxy_config(HAPROXY_TEMPLATE.read_text(), FRONT_SOCKET, ports, certificate)
    (run_dir / "haproxy.cfg").write_text(haproxy)
    circus = circus_config(
        CIRCUS_TEMPLATE.read_text(),
        args.port,
        args.instances,
        workers=args.workers,
        server=f"{args.python} {args.server}",
        run_dir=str(run_dir),
    )
    config_path = run_dir / "circus.ini"
    config_path.write_text(circus)
    return config_path


class OneLineParser(argparse.ArgumentParser):
    """Says what is wrong in one line (make cluster's PORT=-x), not after a usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(1, f"cluster: {message}\n")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = OneLineParser(
        prog="python -m tools.circus_cluster",
        description="Write circusd's and HAProxy's configurations for HAProxy on PORT in front "
        "of INSTANCES bluservers on PORT+1 ... PORT+INSTANCES, and check them.",
    )
    add = parser.add_argument
    add("-p", "--port", type=int, default=DEFAULT_PORT, help="HAProxy's (default: %(default)s)")
    add("-i", "--instances", type=int, default=DEFAULT_INSTANCES, help="(default: %(default)s)")
    add("-n", "--workers", type=int, default=DEFAULT_WORKERS, help="per request (default: 2)")
    add("--cert", metavar="PEM", help="serve TLS with this certificate and key (make cert)")
    add("--run-dir", type=Path, help="configurations and logs (default: build/cluster-PORT)")
    add("--python", default=sys.executable, help="the instances' interpreter (default: this)")
    # The tests run the instances as tests/launch.py, with the faults FAULTS names.
    add("--server", default="bluserver.py", help="the instances' script (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.instances < 1 or args.workers < 1:
        parser.error("INSTANCES and WORKERS must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Write the configurations; print circusd's configuration's path. 1 if they cannot serve."""
    args = parse_args(argv)
    os.chdir(ROOT)  # deploy/circus.ini's paths are relative to the checkout
    run_dir = args.run_dir or Path("build") / f"cluster-{args.port}"
    try:
        if not shutil.which("haproxy"):
            raise ClusterError("haproxy is not installed (sudo apt-get install haproxy)")
        if args.cert and not Path(args.cert).is_file():
            raise ClusterError(f"no file CERT={args.cert} (make cert writes tls/bluserver.pem)")
        check_ports(args.port, args.instances)
        config_path = write_configs(args, run_dir)
        check_haproxy(run_dir / "haproxy.cfg")
    except ClusterError as error:
        print(f"cluster: {error}", file=sys.stderr)
        return 1
    print(config_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
