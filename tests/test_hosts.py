"""One image, any host (INGEST_ROLES), for real: three `ingest up`, each a host of one role.

- `server`: INGEST_ROLES=server, the Prefect server requiring its auth string, the shipped
  nginx config (TLS, basic auth) in front of it; it has no RabbitMQ to reach.
- `worker-1`: INGEST_ROLES=worker; `ingest-1`: INGEST_ROLES=consumer. Both reach Prefect only
  through nginx (https, the auth string, nginx's certificate as their CA file) and the ingest
  database as a role that may read and write rows but not run DDL, so neither can have
  migrated anything; neither is given a Prefect database it could reach, nor the worker a broker.

They are started the way a deployment starts containers, the server last: the worker waits
for the API and its work pool, the consumer for the migrated database. Their API URL's port
is nginx's, taken on this machine: `ingest up` refuses a taken port for role server only.
"""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from urllib.parse import quote, urlsplit

import httpx
import pika
import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from ingest.waiting import poll
from tests.fixtures.proxy import require_program, start_nginx
from tests.fixtures.services import ADMIN_DATABASE_URL, AMQP_URL, create_database, delete_queues, drop_database
from tests.fixtures.stack import INGEST, free_port
from tests.fixtures.supervised import SupervisedStack

RECORDS = 30


class Host(SupervisedStack):
    """`ingest up` on a host of some roles."""

    def ready(self) -> bool:
        # The server host once its deployments are registered and the worker host's worker is
        # online; the others as soon as they run (what they wait for, the tests check).
        return super().ready() if "server" in self.env["INGEST_ROLES"] else True

    def health(self, **overrides: str | None) -> tuple[int, dict[str, str]]:
        """`ingest health`: its exit code and {check: "ok (..)" or "FAILED: ..."}; None unsets a variable."""
        env = {k: v for k, v in {**self.env, **overrides}.items() if v is not None}
        result = subprocess.run([INGEST, "health", "--timeout", "3"], env=env, capture_output=True, text=True,
                                timeout=60)
        return result.returncode, dict(line.split(maxsplit=1) for line in result.stdout.splitlines())

    def programs(self) -> tuple[int, dict[str, str]]:
        """`ingest ctl status`: its exit code and {process: state}."""
        result = self.ingest("ctl", "status", timeout=60)
        return result.returncode, dict(line.split()[:2] for line in result.stdout.splitlines() if len(line.split()) > 1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def closed_url(scheme: str, path: str) -> str:
    return f"{scheme}://nobody@127.0.0.1:{free_port()}/{path}"  # nothing listens there


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    nginx = require_program("nginx", "/usr/sbin/nginx")
    home = tmp_path_factory.mktemp("hosts")
    tag = uuid.uuid4().hex[:8]
    pipeline = f"hosts{tag}"
    pipelines = f'[pipelines.{pipeline}]\nsink_table = "{pipeline}"\nbackfill_cron = ""\n'
    auth = f"operator:pw-{uuid.uuid4().hex[:12]}"
    ingest_db, prefect_db = create_database("ingest_hosts"), create_database("prefect_hosts")
    app_db = rows_only_role(ingest_db, f"hosts{tag}_app")
    http_port, https_port = free_port(), free_port()
    api_through_nginx = f"https://127.0.0.1:{https_port}/api"
    common = {"INGEST_PREFECT_AUTH_STRING": auth, "INGEST_WORK_POOL": f"hosts-{tag}", "INGEST_METRICS_PORT": "0"}

    def host(name: str, roles: str, amqp_url: str, database_url: str, prefect_database_url: str,
             **extra: str) -> Host:
        (home / name).mkdir()
        return Host(home / name, name, amqp_url, database_url, prefect_database_url, pipelines, consumers=1,
                    workers=1, extra={**common, "INGEST_ROLES": roles, **extra})

    server = host("server", "server", closed_url("amqp", ""), ingest_db, prefect_db)
    proxy, cert = start_nginx(home, nginx, urlsplit(server.api_url).netloc, auth, http_port, https_port)
    remote = {"INGEST_PREFECT_API_URL": api_through_nginx, "INGEST_PREFECT_CA_FILE": str(cert)}
    worker = host("worker-1", "worker", closed_url("amqp", ""), app_db, closed_url("postgresql", "prefect"),
                  **remote)
    consumer = host("ingest-1", "consumer", AMQP_URL, app_db, closed_url("postgresql", "prefect"), **remote)
    started = []
    try:
        started += [worker.__enter__(), consumer.__enter__()]
        # Before the server host runs, what they need is down: their health says so, and the
        # consumer host's `ingest up` waits for the migrations before it starts its programs.
        before = {"worker": worker.health(), "consumer": consumer.health(), "consumer ctl": consumer.programs()}
        started.append(server.__enter__())
        yield {"server": server, "worker": worker, "consumer": consumer, "pipeline": pipeline,
               "ingest_db": ingest_db, "app_db": app_db, "proxy": proxy, "before server": before}
    finally:
        for h in (consumer, worker, server):
            if h in started:
                h.__exit__()
        proxy.stop(timeout=20)
        asyncio.run(delete_queues([pipeline, f"{pipeline}.dlq"]))
        drop_database(ingest_db)
        drop_database(prefect_db)
        with psycopg.connect(ADMIN_DATABASE_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(f"hosts{tag}_app")))


def rows_only_role(database_url: str, role: str) -> str:
    """A login role that may read and write the rows of every table the owner creates, and no DDL."""
    password = f"pw-{uuid.uuid4().hex}"
    name = conninfo_to_dict(database_url)["dbname"]
    with psycopg.connect(ADMIN_DATABASE_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(role), sql.Literal(password)))
        conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(name), sql.Identifier(role)))
    owner = conninfo_to_dict(database_url).get("user", "postgres")
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(sql.Identifier(role)))
        for grant in ("SELECT, INSERT, UPDATE, DELETE ON TABLES", "USAGE, SELECT ON SEQUENCES"):
            conn.execute(sql.SQL("ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA public GRANT "
                                 + grant + " TO {}").format(sql.Identifier(owner), sql.Identifier(role)))
    params = conninfo_to_dict(database_url)
    return (f"postgresql://{quote(role)}:{quote(password)}@{params.get('host', '127.0.0.1')}:"
            f"{params.get('port', 5432)}/{name}")


def all_running(host: Host) -> bool:
    code, programs = host.programs()
    return code == 0 and bool(programs) and set(programs.values()) == {"RUNNING"}


@pytest.fixture(scope="module")
def stored(hosts) -> int:
    """RECORDS published to the consumer host's queue; how many reached the sink table."""
    consumer, pipeline = hosts["consumer"], hosts["pipeline"]
    poll(lambda: all_running(consumer), timeout=300, interval=2, what="the consumer host's programs")
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for i in range(RECORDS):
            body = (f'{{"id": "{i}", "source": "hosts", "type": "t", "occurred_at": "2024-05-01T12:00:00Z", '
                    f'"data": {{"n": {i}}}}}').encode()
            channel.basic_publish("ingest", pipeline, body, pika.BasicProperties(message_id=f"hosts-{i}",
                                  delivery_mode=2), mandatory=True)
    finally:
        connection.close()

    def count() -> int:
        with psycopg.connect(hosts["ingest_db"]) as conn:
            return conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(pipeline))).fetchone()[0]

    return poll(count, until=lambda n: n >= RECORDS, timeout=300, interval=1, what="records in the sink table")


def test_records_go_from_the_consumer_host_through_nginx_to_the_worker_host_and_the_sink(hosts, stored):
    assert stored == RECORDS
    server, pipeline = hosts["server"], hosts["pipeline"]
    with psycopg.connect(hosts["ingest_db"]) as conn:
        assert conn.execute("SELECT status, count(*) FROM inbox WHERE pipeline = %s GROUP BY status",
                            (pipeline,)).fetchall() == [("done", RECORDS)]
        runs = {str(row[0]) for row in conn.execute(
            sql.SQL("SELECT flow_run_id FROM {}").format(sql.Identifier(pipeline))).fetchall()}
    # Every run the worker ran (through nginx) reported its end to the server.
    secret = server.env["INGEST_PREFECT_AUTH_STRING"]
    states = httpx.post(f"{server.api_url}/flow_runs/filter", json={}, timeout=30,
                        auth=tuple(secret.split(":", 1))).json()
    assert runs and runs <= {run["id"] for run in states}
    assert {run["state_type"] for run in states if run["id"] in runs} == {"COMPLETED"}


def test_each_host_runs_only_the_programs_of_its_roles(hosts, stored):
    assert hosts["server"].programs() == (0, {"prefect-server": "RUNNING"})
    assert hosts["worker"].programs() == (0, {"prefect-worker:prefect-worker-0": "RUNNING"})
    assert hosts["consumer"].programs() == (0, {"consumer:consumer-0": "RUNNING"})


def test_only_the_server_host_migrated_and_only_the_consumer_host_declared_queues(hosts, stored):
    # The role the worker and the consumer hosts use could not have run the migrations...
    with psycopg.connect(hosts["app_db"], autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE TABLE hosts_not_allowed (id int)")
    # ...and their `ingest up` did not try: what each host's bootstrap logged.
    server, worker, consumer = (hosts[h].log() for h in ("server", "worker", "consumer"))
    assert "migrations: " in server and "sink tables: " in server and "deployments: " in server
    assert "topology: " not in server
    for log in (worker, consumer):
        assert "migrations: " not in log and "sink tables: " not in log and "deployments: " not in log
    assert "ingest database migrated" in consumer and "topology: " in consumer
    assert "topology: " not in worker and "ingest database migrated" not in worker


def test_before_the_server_runs_the_other_hosts_wait_and_are_unhealthy(hosts):
    before = hosts["before server"]
    code, lines = before["worker"]
    assert code == 1 and list(lines) == ["postgresql", "prefect-api", "work-pool"], lines
    assert lines["postgresql"].startswith("FAILED: migrations not applied yet: 0001_"), lines
    assert lines["prefect-api"].startswith("FAILED: health check answered HTTP 502"), lines  # nginx, no upstream
    code, lines = before["consumer"]
    assert code == 1 and list(lines) == ["rabbitmq", "postgresql", "prefect-api"], lines
    assert lines["rabbitmq"].startswith("ok") and lines["postgresql"].startswith("FAILED: migrations not applied")
    code, programs = before["consumer ctl"]
    assert code != 0 and not any(state == "RUNNING" for state in programs.values()), programs  # no supervisord yet
    assert "ingest database migrated" in hosts["consumer"].log()  # it went on once the server had migrated


def test_health_on_each_host_checks_what_its_roles_need(hosts, stored):
    expected = {"server": ["prefect-db", "prefect-api"],
                "worker": ["postgresql", "prefect-api", "work-pool"],
                "consumer": ["rabbitmq", "postgresql", "prefect-api"]}
    for name, checks in expected.items():
        code, lines = hosts[name].health()
        assert (code, list(lines)) == (0, checks), (name, lines)
        assert all(line.startswith("ok") for line in lines.values()), (name, lines)


def test_health_fails_naming_what_a_role_needs(hosts, stored):
    server, worker, consumer = hosts["server"], hosts["worker"], hosts["consumer"]
    code, lines = server.health(INGEST_PREFECT_DATABASE_URL=closed_url("postgresql", "prefect"))
    assert code == 1 and lines["prefect-db"].startswith("FAILED: ") and lines["prefect-api"].startswith("ok")
    code, lines = consumer.health(INGEST_AMQP_URL=closed_url("amqp", ""))
    assert code == 1 and lines["rabbitmq"].startswith("FAILED: ") and lines["postgresql"].startswith("ok")
    # Without the CA file, nginx's certificate is not trusted.
    code, lines = worker.health(INGEST_PREFECT_CA_FILE=None)
    assert code == 1 and "CERTIFICATE_VERIFY_FAILED" in lines["prefect-api"], lines
    # A wrong auth string: nginx refuses.
    code, lines = worker.health(INGEST_PREFECT_AUTH_STRING="operator:wrong")
    assert code == 1, lines
    assert lines["prefect-api"].startswith("FAILED: health check answered HTTP 401"), lines
    assert lines["work-pool"].startswith("FAILED: reading work pool"), lines
    assert lines["postgresql"].startswith("ok"), lines


def test_health_fails_on_the_remote_hosts_when_nginx_is_down(hosts, stored):
    hosts["proxy"].stop(timeout=20)
    for name in ("worker", "consumer"):
        code, lines = hosts[name].health()
        assert code == 1 and lines["prefect-api"].startswith("FAILED: "), (name, lines)
        assert lines["postgresql"].startswith("ok"), (name, lines)
    # The server host reaches its server directly: still healthy.
    assert hosts["server"].health()[0] == 0
