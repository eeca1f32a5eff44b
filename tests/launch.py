"""Runs bluserver for the tests, under the START_METHOD and with the FAULTS the environment names.

START_METHOD sets the interpreter's default multiprocessing start method (what Python 3.14
changed); FAULTS names functions of tests/faults.py, installed before bluserver is imported.
"""

import multiprocessing
import os
import sys
from pathlib import Path

sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # after tests/, for faults

import faults

if os.environ["START_METHOD"]:
    multiprocessing.set_start_method(os.environ["START_METHOD"])
for fault in os.environ["FAULTS"].split():
    name, _, argument = fault.partition(":")
    getattr(faults, name)(argument)

import bluserver  # noqa: E402

sys.exit(bluserver.main())
