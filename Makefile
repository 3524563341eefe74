# Quick start: `make run` (set up, bootstrap, run the stack) and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install run test status clean

# The venv is rebuilt when the pins change; requirements*.lock pin the whole tree.
$(BIN)/ingest: pyproject.toml requirements.lock requirements-test.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.lock -r requirements-test.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

install: $(BIN)/ingest

# Creates databases, migrates, declares queues, then runs the Prefect server, the worker and
# the consumers in the foreground (Ctrl-C stops everything). UI: http://127.0.0.1:4200
run: install
	$(BIN)/ingest up

# Unit tests and tests against the real PostgreSQL, RabbitMQ and a Prefect server and
# worker the tests start themselves.
test: install
	$(BIN)/python -m pytest

status: install
	$(BIN)/ingest status

clean:
	rm -rf $(VENV) .run .pytest_cache *.egg-info
