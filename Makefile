# Quick start: `make run` (set up, bootstrap, run the stack) and `make test`.
# Python 3.13: `python3.13` on PATH, or a pyenv-installed 3.13 (whose `python3.13` shim
# refuses to run until a version is selected). Override with `make PYTHON=/path/to/python3.13`.
ifndef PYTHON
PYTHON := $(shell for candidate in python3.13 $$(pyenv root 2>/dev/null)/versions/3.13*/bin/python3.13; do \
  "$$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 13)' >/dev/null 2>&1 && { echo "$$candidate"; break; }; \
done)
endif
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install system-deps run test bench faults status clean

# The venv is rebuilt when the pins change; requirements*.lock pin the whole tree.
$(BIN)/ingest: pyproject.toml requirements.lock requirements-test.lock
	@[ -n "$(PYTHON)" ] || { echo "Python 3.13 not found: install it (python3.13 on PATH) or run make PYTHON=/path/to/python3.13" >&2; exit 1; }
	$(PYTHON) -m venv --clear $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.lock -r requirements-test.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

install: $(BIN)/ingest

# Creates databases, migrates, declares queues, then runs the Prefect server, the worker and
# the consumers in the foreground (Ctrl-C stops everything). UI: http://127.0.0.1:4200
run: install
	$(BIN)/ingest up

# nginx and Chromium, which tests/test_nginx.py runs for real (the proxy, and the UI in a
# browser): installed from the distribution's packages when missing, a no-op otherwise.
SYSTEM_TOOLS := nginx chromium
system-deps:
	@missing=""; for tool in $(SYSTEM_TOOLS); do \
	  PATH="$$PATH:/usr/sbin" command -v $$tool >/dev/null 2>&1 || missing="$$missing $$tool"; \
	done; \
	if [ -n "$$missing" ]; then \
	  sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	  echo "installing$$missing with apt-get"; \
	  $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq $$missing; \
	fi

# Unit tests and tests against the real PostgreSQL, RabbitMQ and a Prefect server and
# worker the tests start themselves, and nginx in front of one.
test: install system-deps
	$(BIN)/python -m pytest

# End-to-end throughput, latency and memory against a bare consumer, on the real stack it
# starts itself, and the Prefect-only peers; prints a table and writes bench/results.json (25 to 35 minutes).
bench: install
	$(BIN)/python -m bench.run

# Kills, restarts and outages against the real stack (supervisord, as in production) on a
# PostgreSQL and a RabbitMQ of its own; one line per scenario, exit 1 if anything was lost
# or duplicated (about 8 minutes). FAULTS_ARGS: e.g. --records 1500, --only poison.
FAULTS_ARGS ?=
faults: install
	$(BIN)/python -m faults.run $(FAULTS_ARGS)

status: install
	$(BIN)/ingest status

clean:
	rm -rf $(VENV) .run .pytest_cache *.egg-info
