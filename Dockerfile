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
# Handlers store results in nameless temporary files (lesson.Slice): a directory of the
# server's own, and a volume, so that spooling stays off the container's copy-on-write layer
# and still works with `run --read-only`.
ENV TMPDIR=/var/spool/bluserver
# Its user's and group's numbers are fixed: deploy/kubernetes.yaml names them (runAsUser), as
# the kubelet checks runAsNonRoot on a number only.
RUN groupadd --gid 10001 bluserver \
    && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin \
        bluserver \
    && install -d -o bluserver -g bluserver -m 0700 "$TMPDIR"
VOLUME /var/spool/bluserver
WORKDIR /app
COPY --from=modules /app/ ./
USER bluserver
EXPOSE 1982
# The server's graceful stop: it stops accepting, answers every request it holds, then exits
# 0.  Give `stop` a timeout (-t) longer than your longest request.
STOPSIGNAL SIGTERM
# The health check tells busy from broken. Healthy: the server answers the protocol's own
# check, an empty request (an empty input file) with an empty reply, within 5 s; or it does
# not, but holds requests: a live process whose parent is the server, PID 1 (a handler; in
# /proc/PID/stat, "PID (NAME) STATE PPID ...", a state but Z or X, zombie or dead). A
# server at --max-children answers no new connection until a request ends (the check waits
# in the listen backlog like any client): it is busy, not broken. Unhealthy: no answer and no
# request held (hung, or stuck before accepting). The trade: a server that hangs while it
# holds requests stays "healthy" until they end; a restart for it would cut them anyway.
HEALTHCHECK --interval=30s --timeout=10s \
    CMD python client.py /dev/null /dev/null -a 127.0.0.1 -p 1982 --timeout 5 \
        || grep -qs ') [^ZX] 1 ' /proc/[0-9]*/stat
CMD ["python", "bluserver.py", "-a", "0.0.0.0", "-p", "1982", "-n", "2"]

# make docker-test: the test suite on the image's Python, as its user, in a copy of the
# checkout.  Of requirements-dev.txt, whose wheels make docker-test downloads, it installs
# what the suite imports: the others are lint and coverage tools, built for the host's Python.
# The tests that run this image (and the Kubernetes manifest) with podman from the host are
# left out by name: there is no podman inside. So are HAProxy's and systemd's, by their skip.
FROM runtime AS test
USER root
RUN --mount=type=bind,source=build/wheels,target=/tmp/wheels \
    python -m pip install --no-index --find-links /tmp/wheels --disable-pip-version-check \
        --quiet pytest hypothesis simpleeval
COPY --chown=bluserver . /src
WORKDIR /src
USER bluserver
RUN python -m pytest -p no:cacheprovider \
        --ignore tests/test_container.py --ignore tests/test_kubernetes.py

# Built when no --target is given: the runtime image.
FROM runtime
