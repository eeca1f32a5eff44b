# bluserver in a container: `make docker-build`, then `make docker-run` (OPERATIONS.md, "In a
# container").  The build needs no package index: pyparsing comes from wheels that
# `make docker-build` downloads on the host into build/wheels (pip download), so it builds
# offline and installs the same files every time.
#
# BASE is any Debian-like image with Python 3.9+ and its venv module.  Its Python may be
# called python3 only (Debian's own), so the image makes a virtualenv and runs its `python`.
ARG BASE=python:3.12-slim

# The runtime is every top-level module but the tests: copied with a glob, so that a new
# module needs no change here.  COPY cannot leave files out, and the test stage below needs
# the tests in the build context, so they are removed in a stage of their own whose result
# alone reaches the image.
FROM ${BASE} AS modules
WORKDIR /app
COPY *.py ./
RUN rm -f test_*.py conftest.py

FROM ${BASE} AS runtime
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN python3 -m venv "$VIRTUAL_ENV"
COPY requirements.txt /tmp/
RUN --mount=type=bind,source=build/wheels,target=/tmp/wheels \
    python -m pip install --no-index --find-links /tmp/wheels --disable-pip-version-check \
        --quiet -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt
# Handlers store results in nameless temporary files (bluserver.Slice): a directory of the
# server's own, and a volume, so that spooling stays off the container's copy-on-write layer
# and still works with `run --read-only`.
ENV TMPDIR=/var/spool/bluserver
RUN useradd --system --no-create-home --shell /usr/sbin/nologin bluserver \
    && install -d -o bluserver -g bluserver -m 0700 "$TMPDIR"
VOLUME /var/spool/bluserver
WORKDIR /app
COPY --from=modules /app/ ./
USER bluserver
EXPOSE 1982
# The server's graceful stop: it stops accepting, answers every request it holds, then exits
# 0.  Give `stop` a timeout (-t) longer than your longest request.
STOPSIGNAL SIGTERM
# The protocol's own health check: an empty request (an empty input file) gets an empty reply.
HEALTHCHECK --interval=30s --timeout=10s \
    CMD ["python", "client.py", "/dev/null", "/dev/null", "-a", "127.0.0.1", "-p", "1982", \
         "--timeout", "5"]
CMD ["python", "bluserver.py", "-a", "0.0.0.0", "-p", "1982", "-n", "2"]

# make docker-test: the test suite on the image's Python, as its user, in a copy of the
# checkout.  Of requirements-dev.txt, whose wheels make docker-test downloads, it installs
# what the suite imports: the others are lint and coverage tools, built for the host's Python.
FROM runtime AS test
USER root
RUN --mount=type=bind,source=build/wheels,target=/tmp/wheels \
    python -m pip install --no-index --find-links /tmp/wheels --disable-pip-version-check \
        --quiet pytest hypothesis simpleeval
COPY --chown=bluserver . /src
WORKDIR /src
USER bluserver
RUN python -m pytest -p no:cacheprovider

# Built when no --target is given: the runtime image.
FROM runtime
