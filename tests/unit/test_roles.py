"""INGEST_ROLES: what a host runs. Parsing, and what each role gets from `ingest up`
(bootstrap steps, supervisord programs) and from `ingest health` (checks)."""

from __future__ import annotations

import os
import subprocess
from itertools import combinations

import pytest

from ingest.cli.bootstrap import before_programs, once_programs_run
from ingest.cli.health import checks_for
from ingest.cli.up import program_processes, stack_environment
from ingest.settings import ROLES, Settings
from tests.fixtures.stack import INGEST, free_port

EVERY_SUBSET = [frozenset(c) for n in (1, 2, 3) for c in combinations(ROLES, n)]


@pytest.mark.parametrize("value, roles", [
    ("server", {"server"}),
    ("worker,consumer", {"worker", "consumer"}),
    (" consumer , server ", {"server", "consumer"}),
    ("consumer,worker,server", set(ROLES)),
    ("worker,worker", {"worker"}),
    ("all", set(ROLES)),
    (" all ", set(ROLES)),
    ("", set(ROLES)),
])
def test_roles_parse(value, roles):
    assert Settings(roles=value).roles == roles


def test_roles_default_to_all(monkeypatch):
    monkeypatch.delenv("INGEST_ROLES", raising=False)
    assert Settings().roles == set(ROLES)
    monkeypatch.setenv("INGEST_ROLES", "worker, consumer")
    assert Settings().roles == {"worker", "consumer"}


@pytest.mark.parametrize("value, bad", [
    ("servers", "'servers'"),
    ("server,Worker", "'Worker'"),
    ("server,", "''"),
    ("all,server", "'all'"),
    ("server;worker", "'server;worker'"),
])
def test_anything_else_is_refused_at_start_naming_it_and_the_allowed_roles(value, bad, tmp_path):
    # Were the value accepted, `ingest up` would stop at its first step, on a database that is not there.
    nowhere = free_port()
    env = {**os.environ, "INGEST_ROLES": value, "INGEST_RUN_DIR": str(tmp_path),
           "INGEST_DATABASE_URL": f"postgresql://nobody@127.0.0.1:{nowhere}/ingest",
           "INGEST_PREFECT_DATABASE_URL": f"postgresql://nobody@127.0.0.1:{nowhere}/prefect",
           "INGEST_AMQP_URL": f"amqp://nobody@127.0.0.1:{nowhere}/",
           "INGEST_PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api"}
    for command in (["up"], ["health"]):
        result = subprocess.run([INGEST, *command], env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, result.stdout + result.stderr
        assert result.stderr == (f"error: INGEST_ROLES: unknown role(s) {bad} in {value!r}; allowed: a "
                                 "comma-separated list of server, worker, consumer, or all\n")


def names(steps) -> list[str]:
    return [step.__name__ for step in steps]


@pytest.mark.parametrize("roles, before, after", [
    # Only the server creates databases and migrates, and registers with its own Prefect server.
    ({"server"}, ["prepare_storage"], ["register_with_prefect"]),
    # A worker prepares nothing: its program waits for the API and the work pool.
    ({"worker"}, [], []),
    # A consumer waits for the migrated database, then declares its queues.
    ({"consumer"}, ["wait_for_storage", "declare_queues"], []),
    ({"worker", "consumer"}, ["wait_for_storage", "declare_queues"], []),
    (set(ROLES), ["prepare_storage", "wait_for_storage", "declare_queues"], ["register_with_prefect"]),
])
def test_bootstrap_steps_of_each_role(roles, before, after):
    assert names(before_programs(frozenset(roles))) == before
    assert names(once_programs_run(frozenset(roles))) == after


@pytest.mark.parametrize("roles", EVERY_SUBSET, ids=lambda r: ",".join(sorted(r)))
def test_only_the_server_role_migrates(roles):
    migrates = "prepare_storage" in names(before_programs(roles) + once_programs_run(roles))
    assert migrates == ("server" in roles)


@pytest.mark.parametrize("value, processes", [
    ("server", {"prefect-server": 1, "prefect-worker": 0, "consumer": 0}),
    ("worker", {"prefect-server": 0, "prefect-worker": 3, "consumer": 0}),
    ("consumer", {"prefect-server": 0, "prefect-worker": 0, "consumer": 5}),
    ("worker,consumer", {"prefect-server": 0, "prefect-worker": 3, "consumer": 5}),
    ("all", {"prefect-server": 1, "prefect-worker": 3, "consumer": 5}),
])
def test_programs_of_each_role(value, processes):
    settings = Settings(roles=value, workers=3, consumers=5)
    assert program_processes(settings) == processes
    env = stack_environment(settings)
    assert [env[f"NUMPROCS_{p}"] for p in ("PREFECT_SERVER", "PREFECT_WORKER", "CONSUMER")] == [
        str(n) for n in processes.values()]


@pytest.mark.parametrize("value, checks", [
    ("server", ["prefect-db", "prefect-api"]),
    ("worker", ["postgresql", "prefect-api", "work-pool"]),
    ("consumer", ["rabbitmq", "postgresql", "prefect-api"]),
    ("all", ["rabbitmq", "postgresql", "prefect-db", "prefect-api", "work-pool"]),
])
def test_health_checks_of_each_role(value, checks):
    assert checks_for(Settings(roles=value).roles) == checks


def test_the_ca_file_reaches_prefects_clients(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_SSL_CERT_FILE", raising=False)
    assert "PREFECT_API_SSL_CERT_FILE" not in Settings().prefect_environment()
    ca = tmp_path / "tls.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    assert Settings(prefect_ca_file=ca).prefect_environment()["PREFECT_API_SSL_CERT_FILE"] == str(ca)
    # Prefect's own variable, set alone, is what ingest's probes trust too.
    monkeypatch.setenv("PREFECT_API_SSL_CERT_FILE", str(ca))
    assert Settings().prefect_ca_file == ca


def test_a_missing_ca_file_is_refused_at_start(tmp_path):
    env = {**os.environ, "INGEST_PREFECT_CA_FILE": str(tmp_path / "missing.crt")}
    result = subprocess.run([INGEST, "health"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("error: INGEST_PREFECT_CA_FILE: "), result.stderr
