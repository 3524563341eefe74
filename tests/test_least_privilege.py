"""The production users, on the real services: RabbitMQ users from the rendered
definitions file, PostgreSQL roles from docker/postgres/init-roles.sh. Each may do what
its job needs and is refused the rest."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from urllib.parse import quote, urlsplit

import aio_pika
import pika
import psycopg
import pytest
from pika.exceptions import ChannelClosedByBroker, ProbableAuthenticationError
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from consumers import rabbitmq_definitions
from consumers.publisher import Publisher
from consumers.topology import declare_topology
from ingest.pipelines import Pipeline
from ingest.waiting import TimedOut, poll
from tests.fixtures.services import ADMIN_DATABASE_URL, AMQP_URL

REPO = Path(__file__).resolve().parents[1]
BODY = b'{"id": "1", "source": "lp", "type": "t", "occurred_at": "2024-05-01T12:00:00Z", "data": {}}'


def rabbitmqctl(*args: str) -> subprocess.CompletedProcess:
    program = shutil.which("rabbitmqctl", path=f"{os.environ.get('PATH', '')}:/usr/sbin")
    if not program:
        pytest.fail("rabbitmqctl not found: these tests import definitions into the local RabbitMQ "
                    "(install rabbitmq-server, as .ci/run expects)", pytrace=False)
    return subprocess.run([program, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def broker_users():
    """The rendered definitions, imported into the local broker; users removed afterwards."""
    tag = uuid.uuid4().hex[:8]
    pipeline = Pipeline(name=f"lp{tag}_records")
    users = {role: (f"lp{tag}-{role}", f"pw-{uuid.uuid4().hex}") for role in ("admin", "app", "producer")}
    # rabbitmqctl may run as the broker's user, who cannot enter pytest's private tmp dirs
    # (and the Debian wrapper does not pass stdin on): a readable file of its own, briefly.
    with tempfile.TemporaryDirectory() as home:
        os.chmod(home, 0o755)
        path = Path(home) / "definitions.json"
        path.write_text(json.dumps(rabbitmq_definitions.definitions([pipeline], users)))
        path.chmod(0o644)
        imported = rabbitmqctl("import_definitions", str(path))
    assert imported.returncode == 0, imported.stdout + imported.stderr
    host = urlsplit(AMQP_URL)
    urls = {role: f"amqp://{quote(name)}:{quote(pw)}@{host.hostname}:{host.port or 5672}/"
            for role, (name, pw) in users.items()}
    yield pipeline, urls
    for name, _ in users.values():
        rabbitmqctl("delete_user", name)
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    for queue in (pipeline.queue, pipeline.dlq):
        connection.channel().queue_delete(queue)
    connection.close()


def refused(url: str, action) -> bool:
    """True if the broker refuses `action(channel)` with ACCESS_REFUSED (403)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        action(channel)
        return False
    except ChannelClosedByBroker as exc:
        assert exc.reply_code == 403, exc
        return True
    finally:
        if connection.is_open:
            connection.close()


def declare_as(url: str, pipeline: Pipeline) -> None:
    """Declare the topology as bootstrap and every consumer do."""
    async def declare() -> None:
        connection = await aio_pika.connect(url)
        async with connection:
            await declare_topology(connection, [pipeline])

    asyncio.run(declare())


def received(channel, queue: str, body: bytes) -> bool:
    """Whether `body` comes out of `queue` (what comes before it is taken too) within seconds."""
    def get():
        method, _, found = channel.basic_get(queue, auto_ack=True)
        return found if method else None

    try:
        poll(get, until=lambda found: found == body, timeout=10, interval=0.1, what=queue)
    except TimedOut:
        return False
    return True


def test_app_user_declares_the_topology_and_consumes(broker_users):
    pipeline, urls = broker_users
    declare_as(urls["app"], pipeline)
    record = BODY.replace(b'"id": "1"', f'"id": "{uuid.uuid4().hex}"'.encode())
    publisher = pika.BlockingConnection(pika.URLParameters(AMQP_URL))  # a producer's record...
    channel = publisher.channel()
    channel.confirm_delivery()
    channel.basic_publish("ingest", pipeline.name, record, mandatory=True)
    publisher.close()
    connection = pika.BlockingConnection(pika.URLParameters(urls["app"]))
    channel = connection.channel()
    channel.confirm_delivery()
    assert received(channel, pipeline.queue, record)  # ...reaches the app through the declared queue
    # Dead letters, as consumers/deadletter.py publishes them, reach the declared DLQ.
    letter = record.replace(b'"type": "t"', b'"type": "dead"')
    channel.basic_publish("ingest.dlx", pipeline.name, letter, mandatory=True)
    assert received(channel, pipeline.dlq, letter)
    connection.close()


def test_producer_publishes_to_the_ingest_exchange_only(broker_users):
    pipeline, urls = broker_users
    declare_as(urls["app"], pipeline)  # the queue must exist

    async def publish() -> None:
        async with Publisher(urls["producer"], retries=0) as publisher:  # `ingest publish`'s publisher
            await publisher.publish(BODY, pipeline.name, message_id=f"lp-{uuid.uuid4().hex}")

    asyncio.run(publish())
    assert refused(urls["producer"], lambda ch: ch.basic_get(pipeline.queue))
    assert refused(urls["producer"], lambda ch: ch.basic_publish("ingest.dlx", pipeline.name, BODY))
    assert refused(urls["producer"], lambda ch: ch.queue_declare(f"{pipeline.name}-mine"))
    assert refused(urls["producer"], lambda ch: ch.exchange_declare("ingest.mine", "topic"))


def test_app_user_may_not_publish_records_or_touch_other_queues(broker_users):
    pipeline, urls = broker_users
    assert refused(urls["app"], lambda ch: ch.basic_publish("ingest", pipeline.name, BODY))
    assert refused(urls["app"], lambda ch: ch.queue_declare("someone-elses-queue"))
    assert refused(urls["app"], lambda ch: ch.basic_get("someone-elses-queue"))


def test_wrong_password_is_refused_and_guest_is_not_defined(broker_users):
    pipeline, urls = broker_users
    names = [u["name"] for u in rabbitmq_definitions.definitions([pipeline], {"app": ("a", "b")})["users"]]
    assert "guest" not in names
    with pytest.raises(ProbableAuthenticationError):
        pika.BlockingConnection(pika.URLParameters(urls["producer"].replace("pw-", "wrong-", 1)))


# --- PostgreSQL ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def database_roles():
    tag = uuid.uuid4().hex[:8]
    names = {"INGEST_DB_USER": f"lp{tag}_ingest", "INGEST_DB_NAME": f"lp{tag}_ingest",
             "PREFECT_DB_USER": f"lp{tag}_prefect", "PREFECT_DB_NAME": f"lp{tag}_prefect"}
    passwords = {"INGEST_DB_PASSWORD": f"pw-{uuid.uuid4().hex}", "PREFECT_DB_PASSWORD": f"pw-{uuid.uuid4().hex}"}
    admin = conninfo_to_dict(ADMIN_DATABASE_URL)
    # The postgres image runs the script with POSTGRES_USER/POSTGRES_DB over its socket;
    # here the libpq variables point psql at the test server.
    env = {**os.environ, **names, **passwords, "POSTGRES_USER": admin.get("user", "postgres"),
           "POSTGRES_DB": admin.get("dbname", "postgres"), "PGHOST": admin.get("host", "127.0.0.1"),
           "PGPORT": str(admin.get("port", 5432)), **({"PGPASSWORD": admin["password"]} if "password" in admin else {})}
    created = subprocess.run(["bash", str(REPO / "docker/postgres/init-roles.sh")], env=env,
                             capture_output=True, text=True, timeout=120)
    assert created.returncode == 0, created.stderr

    def url(role: str) -> str:
        return make_conninfo(ADMIN_DATABASE_URL, user=names[f"{role}_DB_USER"], password=passwords[f"{role}_DB_PASSWORD"],
                             dbname=names[f"{role}_DB_NAME"])

    yield {"ingest": url("INGEST"), "prefect": url("PREFECT")}
    with psycopg.connect(ADMIN_DATABASE_URL, autocommit=True) as conn:
        for key in ("INGEST", "PREFECT"):
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(names[f"{key}_DB_NAME"])))
        for key in ("INGEST", "PREFECT"):
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(names[f"{key}_DB_USER"])))


def as_url(conninfo: str) -> str:
    p = conninfo_to_dict(conninfo)
    return (f"postgresql://{quote(p['user'])}:{quote(p['password'])}@{p.get('host', '127.0.0.1')}:"
            f"{p.get('port', 5432)}/{p['dbname']}")


def test_app_role_migrates_its_database_and_nothing_else(database_roles):
    from ingest.cli.bootstrap import prepare_storage
    from ingest.settings import Settings

    ingest_url = as_url(database_roles["ingest"])
    prefect_db = conninfo_to_dict(database_roles["prefect"])["dbname"]
    # The roles and databases exist; the Prefect one is not the app role's to open.
    with pytest.raises(psycopg.OperationalError, match="permission denied"):
        psycopg.connect(make_conninfo(database_roles["ingest"], dbname=prefect_db), connect_timeout=10)
    # The bootstrap's storage step: finds its database, migrates, creates the sink table.
    prepare_storage(Settings(database_url=ingest_url, prefect_database_url=ingest_url), [Pipeline(name="records")])
    with psycopg.connect(database_roles["ingest"], autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM inbox").fetchone() == (0,)
        for statement in ("CREATE DATABASE lp_not_allowed", "CREATE ROLE lp_not_allowed"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)


def test_prefect_role_runs_prefect_migrations(database_roles, tmp_path):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "INGEST_"))},
           "PREFECT_HOME": str(tmp_path),
           "PREFECT_SERVER_DATABASE_CONNECTION_URL": as_url(database_roles["prefect"]).replace(
               "postgresql://", "postgresql+asyncpg://", 1)}
    upgraded = subprocess.run([str(Path(sys.executable).parent / "prefect"), "server", "database", "upgrade", "-y"],
                              env=env, capture_output=True, text=True, timeout=600)
    assert upgraded.returncode == 0, upgraded.stdout[-3000:] + upgraded.stderr[-3000:]
    with psycopg.connect(database_roles["prefect"]) as conn:
        assert conn.execute("SELECT to_regclass('flow_run') IS NOT NULL").fetchone() == (True,)
        assert conn.execute("SELECT count(*) FROM pg_extension WHERE extname = 'pg_trgm'").fetchone() == (1,)
