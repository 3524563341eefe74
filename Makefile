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

.PHONY: install system-deps run test bench faults image image-test status clean

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
# browser), and podman (with runc) and debootstrap, which `make image-test` builds and runs
# the image with: installed from the distribution's packages when missing, a no-op otherwise.
SYSTEM_TOOLS := nginx chromium podman runc debootstrap
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
# starts itself, and the Prefect-only peers; prints a table and writes bench/results.json (20 to 45 minutes).
bench: install
	$(BIN)/python -m bench.run

# Kills, restarts and outages against the real stack (supervisord, as in production) on a
# PostgreSQL and a RabbitMQ of its own; one line per scenario, exit 1 if anything was lost
# or duplicated (about 8 minutes). FAULTS_ARGS: e.g. --records 1500, --only poison.
FAULTS_ARGS ?=
faults: install
	$(BIN)/python -m faults.run $(FAULTS_ARGS)

# The image (docker/Dockerfile), tagged with the commit (plus -dirty with uncommitted
# changes), built by docker when its engine runs, else by podman. Its base: pulled, or, where
# no registry answers, built from Debian's packages by docker/base-image.sh (needs root).
# Behind a TLS-intercepting proxy the build trusts the CA file this host's pip is configured
# with (PIP_CERT, or pip's `cert` setting): mounted as a build secret for the install only.
IMAGE ?= ingest
IMAGE_TAG ?= $(shell git describe --always --dirty --abbrev=40 --exclude='*' 2>/dev/null || echo local)
BASE_IMAGE ?= debian:trixie-slim
ENGINE ?= $(shell if docker info >/dev/null 2>&1; then echo docker; elif command -v podman >/dev/null 2>&1; then echo podman; fi)
PIP_CA ?= $(or $(PIP_CERT),$(shell python3 -m pip config get global.cert 2>/dev/null))
PIP_INDEX ?= $(or $(PIP_INDEX_URL),$(shell python3 -m pip config get global.index-url 2>/dev/null))
# Each asked once (a `?=` default would be asked again at every use).
IMAGE_TAG := $(IMAGE_TAG)
ENGINE := $(ENGINE)
PIP_CA := $(PIP_CA)
PIP_INDEX := $(PIP_INDEX)
# podman: runc (crun, Debian's default, refuses hybrid cgroup hosts) and the docker image
# format (the OCI format has no HEALTHCHECK).
comma := ,
CONTAINER = $(if $(filter podman,$(ENGINE)),podman --runtime runc,$(ENGINE))
BUILD_FLAGS = $(if $(filter podman,$(ENGINE)),--format docker) \
  $(if $(PIP_CA),--secret id=pip-ca$(comma)src=$(PIP_CA) --build-arg PIP_CERT=/run/secrets/pip-ca) \
  $(if $(PIP_INDEX),--build-arg PIP_INDEX_URL=$(PIP_INDEX))
image:
	@[ -n "$(ENGINE)" ] || { echo "make image needs docker (with a running engine) or podman" >&2; exit 1; }
	@$(ENGINE) image inspect $(BASE_IMAGE) >/dev/null 2>&1 || $(ENGINE) pull $(BASE_IMAGE) \
	  || { echo "$(BASE_IMAGE) cannot be pulled: building it from Debian's packages"; ENGINE=$(ENGINE) sh docker/base-image.sh $(BASE_IMAGE); }
	$(CONTAINER) build -f docker/Dockerfile $(BUILD_FLAGS) --build-arg BASE_IMAGE=$(BASE_IMAGE) \
	  --build-arg VCS_REF=$(IMAGE_TAG) -t $(IMAGE):$(IMAGE_TAG) .
	@echo "built $(IMAGE):$(IMAGE_TAG)"

# The image as a deployment of several hosts on a podman network of its own, with its own
# PostgreSQL, RabbitMQ and nginx (hosts/run.py): server, two workers and a consumer host,
# 5,000 records, a worker host killed during a run; one summary line (about 10 minutes).
image-test: ENGINE = podman
image-test: install system-deps image
	$(BIN)/python -m hosts.run --image $(IMAGE):$(IMAGE_TAG) $(if $(PIP_CA),--build-ca $(PIP_CA))

status: install
	$(BIN)/ingest status

clean:
	rm -rf $(VENV) .run .pytest_cache *.egg-info
