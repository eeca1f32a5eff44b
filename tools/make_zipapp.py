"""Build dist/bluserver.pyz: the server, its client and pyparsing in one runnable file.

Usage: ``python make_zipapp.py [OUTPUT]`` (``make dist``), then on any machine with
Python 3.9 or later and nothing installed::

    python3 bluserver.pyz -p 1982 -n 2

Why a zipapp and not a wheel: bluserver is a few flat modules, and some of them have
generic names.  A wheel would install top-level modules called ``client`` and
``worker`` into site-packages, where they shadow or are shadowed by anyone else's
``client.py``; renaming them into a package would make the reference code harder to
read.  A zipapp keeps the modules as they are and out of every shared namespace: the
archive is put at the front of ``sys.path`` only while it runs.  It also needs no pip
and no network on the target, because pyparsing (pure Python, ``python_requires>=3.9``)
travels inside it.

The archive holds, at its root::

    __main__.py                   runs bluserver.main()
    bluserver.py worker.py ...    the runtime: every top-level module but the tests
    pyparsing/                    copied from the pyparsing this interpreter imports
    pyparsing-LICENSE             pyparsing's MIT licence, which must go with its copies

Worker processes work from inside the archive whatever the default multiprocessing
start method: they are always forked (lesson.FORK), and inherit the modules the server
imported from the zip.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import zipapp
from collections.abc import Sequence
from pathlib import Path

import pyparsing

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = ROOT / "dist" / "bluserver.pyz"
# The runtime: every module at the top of the checkout but the tests (test_*.py, conftest.py).
MODULES = sorted(
    path.name
    for path in ROOT.glob("*.py")
    if not path.name.startswith("test_") and path.name != "conftest.py"
)
INTERPRETER = "/usr/bin/env python3"
MAIN = '''\
"""Entry point of bluserver.pyz: ``python3 bluserver.pyz --help``."""

import sys

import bluserver

if __name__ == "__main__":
    sys.exit(bluserver.main())
'''


def pyparsing_license(package: Path) -> Path | None:
    """The LICENSE file in the installed pyparsing's .dist-info, if there is one."""
    for dist_info in sorted(package.parent.glob("pyparsing-*.dist-info")):
        for candidate in (dist_info / "licenses" / "LICENSE", dist_info / "LICENSE"):
            if candidate.is_file():
                return candidate
    return None


def stage(staging: Path) -> None:
    """Fill the empty directory staging with what the archive holds."""
    for module in MODULES:
        shutil.copy2(ROOT / module, staging / module)
    (staging / "__main__.py").write_text(MAIN, encoding="utf-8")
    package = Path(pyparsing.__file__).parent
    shutil.copytree(
        package, staging / "pyparsing", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    license_file = pyparsing_license(package)
    if license_file is not None:
        shutil.copy2(license_file, staging / "pyparsing-LICENSE")


def build(output: Path = DEFAULT_OUTPUT) -> Path:
    """Write the zipapp to output (creating its directory) and return output."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bluserver-zipapp-") as staging:
        stage(Path(staging))
        zipapp.create_archive(staging, output, interpreter=INTERPRETER, compressed=True)
    return output


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make_zipapp.py", description=__doc__.splitlines()[0])
    parser.add_argument(
        "output",
        nargs="?",
        type=Path,
        default=DEFAULT_OUTPUT,
        help="where to write the archive (default: dist/bluserver.pyz)",
    )
    output = build(parser.parse_args(argv).output)
    print(
        f"make_zipapp: wrote {output} ({output.stat().st_size / 1024:.0f} KiB, "
        f"pyparsing {pyparsing.__version__})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
