"""The lesson alone: bluserver.BluServer, its RequestHandler and Slice, with none of the armour
(serving.py, guard.py, supervise.py), serving with socketserver's own serve_forever.

test_bluserver.py runs the protocol's cases against it, so that the code the README walks
through is proven to serve, and not only the server composed over it.  Started like
bluserver.py (tests/harness.py's ServerProcess, ``command=``); SIGTERM ends it.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's modules

import bluserver

options = bluserver.parse_args(sys.argv[1:])
with bluserver.BluServer(options) as server:
    bluserver.announce(server)
    server.serve_forever()
