# bluserver — `make` (or `make help`) lists the targets.
#
# Every target bootstraps its own virtualenv from the requirements files, so a fresh
# clone needs nothing but Python.  PY picks the interpreter; each gets its own venv:
#   make test PY=python3.9      (with pyenv: make test PY=$$(pyenv prefix 3.9)/bin/python)

PY ?= python3
VENV ?= $(if $(filter python3,$(PY)),.venv,.venv-$(shell $(PY) -c 'import sys; print("%d.%d" % sys.version_info[:2])'))
BIN := $(VENV)/bin
PORT ?= 1982
WORKERS ?= 2
INSTANCES ?= 3
# The container engine: podman if installed (it needs no daemon), else docker.
CONTAINER ?= $(notdir $(firstword $(shell command -v podman docker)))
CERT ?=
TLS_DIR ?= tls

.DEFAULT_GOAL := help
.PHONY: help lesson run cluster cert test coverage bench limits load trace lint dist docker-build docker-run docker-test clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-13s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(VENV)/.runtime: requirements.txt
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/.cluster: $(VENV)/.runtime requirements-cluster.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-cluster.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt requirements-cluster.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

lesson: $(VENV)/.runtime ## run the lesson alone (lesson.py) on PORT with WORKERS, logging its events; Ctrl-C stops it
	$(BIN)/python lesson.py -p $(PORT) -n $(WORKERS) -v

run: $(VENV)/.runtime ## start the server on PORT (1982) with WORKERS (2) workers per request
	$(BIN)/python bluserver.py -p $(PORT) -n $(WORKERS) -v

cluster: $(VENV)/.cluster ## HAProxy on PORT (TLS with CERT=tls/bluserver.pem) before INSTANCES (3) servers, under circusd
	sh tools/cluster.sh $(BIN) -p $(PORT) -i $(INSTANCES) -n $(WORKERS) $(if $(CERT),--cert $(CERT))

# umask 077: the key, and the .pem that holds it, are the owner's alone from the moment they
# exist (an older .pem is removed first: a file written over keeps its mode); the certificate alone is public (chmod 644), for clients to trust.
cert: ## write a self-signed certificate for localhost and 127.0.0.1: tls/bluserver.pem (with its key), .crt
	umask 077 && mkdir -p $(TLS_DIR) && rm -f $(TLS_DIR)/bluserver.* \
		&& openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj /CN=localhost \
			-addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
			-keyout $(TLS_DIR)/bluserver.key -out $(TLS_DIR)/bluserver.crt 2>/dev/null \
		&& cat $(TLS_DIR)/bluserver.crt $(TLS_DIR)/bluserver.key > $(TLS_DIR)/bluserver.pem
	rm $(TLS_DIR)/bluserver.key
	chmod 644 $(TLS_DIR)/bluserver.crt

test: $(VENV)/.dev ## run the test suite
	$(BIN)/python -m pytest

coverage: $(VENV)/.dev ## run the tests measuring every process (server, handlers, workers)
	rm -f .coverage .coverage.*
	$(BIN)/python -m coverage run -m pytest
	$(BIN)/python -m coverage combine --quiet
	$(BIN)/python -m coverage report

bench: $(VENV)/.dev ## measure evaluation and end-to-end speed and memory (tools/bench.py)
	$(BIN)/python -m tools.bench

limits: $(VENV)/.dev ## measure what OPERATIONS.md's limits promise, against real servers (tools/limits.py)
	$(BIN)/python -m tools.limits

load: $(VENV)/.dev ## 50 concurrent clients x 2,000 lines, every reply verified (tools/load.py)
	$(BIN)/python -m tools.load

trace: $(VENV)/.runtime ## one request's project functions, per process: the lesson, then the server (tools/trace.py)
	$(BIN)/python -m tools.trace

lint: $(VENV)/.dev ## ruff check, ruff format --check, mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

dist: $(VENV)/.runtime ## build dist/bluserver.pyz: the server and pyparsing in one file
	$(BIN)/python -m tools.make_zipapp

# The image's build installs from wheels downloaded here (pip cannot always reach an index from
# inside a build); the Docker format keeps its HEALTHCHECK (podman's default, OCI, drops it).
WHEELS := build/wheels
BUILD_OPTIONS := $(if $(BASE),--build-arg BASE=$(BASE)) $(if $(filter podman,$(CONTAINER)),--format docker)
DOWNLOAD := $(BIN)/python -m pip download --quiet --disable-pip-version-check -d $(WHEELS)

docker-build: $(VENV)/.runtime ## build the image `bluserver` (CONTAINER=docker|podman, BASE=python:3.12-slim)
	$(DOWNLOAD) -r requirements.txt
	$(CONTAINER) build $(BUILD_OPTIONS) -t bluserver .

docker-run: docker-build ## serve on localhost:PORT from the image (Ctrl-C drains and stops it)
	$(CONTAINER) run --rm -p 127.0.0.1:$(PORT):1982 bluserver

docker-test: $(VENV)/.runtime ## run the test suite inside the image (its `test` build stage)
	$(DOWNLOAD) -r requirements-dev.txt
	$(CONTAINER) build $(BUILD_OPTIONS) --target test -t bluserver-test .

clean: ## remove virtualenvs, caches, coverage data and dist/
	rm -rf .venv .venv-* dist build .pytest_cache .mypy_cache .ruff_cache .hypothesis htmlcov .coverage .coverage.* output.txt
	find . -name __pycache__ -prune -exec rm -rf {} +
