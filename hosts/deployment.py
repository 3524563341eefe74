"""A deployment of several hosts from one image, on a podman network of its own.

This machine plays the parts the official postgres, rabbitmq and nginx images would play
in docker/compose.yaml: a private PostgreSQL (roles and databases from
docker/postgres/init-roles.sh), a private RabbitMQ (users from the rendered definitions)
and nginx with the shipped config, all listening on the network's gateway address only.
The hosts are containers of the image, each with its roles:

    server     role server: the Prefect server, behind nginx
    worker-N   role worker: Prefect workers, reaching the API through nginx only
    ingest-N   role consumer: consumers, reaching the API through nginx only

Every host reaches PostgreSQL and RabbitMQ by URL, as in production; this machine reaches
the broker, the databases and the Prefect API directly, to publish and to count.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from consumers import rabbitmq_definitions
from faults.audit import Observer
from faults.services import PrivatePostgres, PrivateRabbit
from hosts.podman import Podman
from ingest.pipelines import Pipeline, load_pipelines
from tests.fixtures.proxy import start_nginx
from tests.fixtures.stack import Process, free_port

REPO = Path(__file__).resolve().parents[1]
PREFECT_PORT = 4200
NGINX = "nginx"  # the name hosts know nginx by (its certificate is made for it)
MOUNTED = "/etc/ingest"  # where hosts find the pipelines file and nginx's certificate

# Batches small enough that 5,000 records make a few dozen flow runs, spread over the workers.
PIPELINE = """
[pipelines.hosts]
sink_table = "hosts"
granularity = "chunk"
chunk_size = 100
task_retry_delay_seconds = 1
backfill_cron = ""
[pipelines.hosts.batch]
max_records = 250
max_linger_ms = 2000
"""

ADDRESSES = {"anchor": 2, "server": 10}  # worker-N: 20 + N, ingest-N: 30 + N


def address(host: str) -> int:
    if host in ADDRESSES:
        return ADDRESSES[host]
    kind, n = host.rsplit("-", 1)
    return {"worker": 20, "ingest": 30}[kind] + int(n)


def password() -> str:
    return secrets.token_hex(16)


@dataclass
class Deployment:
    home: Path
    image: str
    podman: Podman
    worker_flow_runs: int = 2
    auth: tuple[str, str] = ("operator", "")
    processes: list[Process] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.auth = (self.auth[0], password())
        self.db_passwords = {"ingest": password(), "prefect": password()}
        self.broker_users = {role: (name, password()) for role, name in
                             (("admin", "admin"), ("app", "ingest"), ("producer", "producer"))}
        self.pipelines_file = self.home / "pipelines.toml"
        self.pipelines_file.write_text(PIPELINE)
        self.pipelines_file.chmod(0o644)
        self.pipeline: Pipeline = load_pipelines(self.pipelines_file)["hosts"]

    # --- what this machine provides -------------------------------------------------------

    def start_network(self) -> None:
        """The network, and a container that holds it up: podman creates the bridge, and with
        it the gateway address the services listen on, only once a container joins."""
        self.podman.create_network()
        self.podman.run("anchor", self.image, address("anchor"), {}, entrypoint=["sleep", "infinity"])
        self.podman.pin_bridge_address()

    def start_services(self) -> None:
        gateway, subnet = self.podman.gateway, self.podman.subnet
        self.postgres = PrivatePostgres(self.home, listen=(gateway,),
                                        hba=(f"host all all {subnet} scram-sha-256",)).start()
        subprocess.run(["bash", str(REPO / "docker" / "postgres" / "init-roles.sh")], check=True,
                       capture_output=True, env={
                           **os.environ, "PGHOST": str(self.postgres.dir), "PGPORT": str(self.postgres.port),
                           "INGEST_DB_PASSWORD": self.db_passwords["ingest"],
                           "PREFECT_DB_PASSWORD": self.db_passwords["prefect"]})
        self.rabbit = PrivateRabbit(self.home, listen=gateway).start()
        definitions = self.home / "definitions.json"
        definitions.write_text(json.dumps(rabbitmq_definitions.definitions([self.pipeline], self.broker_users)))
        self.rabbit.import_definitions(definitions)
        nginx = shutil.which("nginx", path=f"{os.environ.get('PATH', '')}:/usr/sbin")
        if not nginx:
            raise RuntimeError("nginx not found: `make system-deps` installs it")
        self.nginx_port = free_port()
        process, self.cert = start_nginx(
            self.home, nginx, f"{self.podman.address(address('server'))}:{PREFECT_PORT}", ":".join(self.auth),
            free_port(), self.nginx_port, address=gateway, names=(NGINX,))
        self.processes.append(process)

    def database_url(self, role: str, database: str) -> str:
        return (f"postgresql://{role}:{self.db_passwords[role]}@{self.podman.gateway}:{self.postgres.port}"
                f"/{database}")

    def amqp_url(self, role: str) -> str:
        name, secret = self.broker_users[role]
        return f"amqp://{name}:{secret}@{self.podman.gateway}:{self.rabbit.port}/"

    @property
    def api_url(self) -> str:
        """The Prefect API as this machine calls it: the server host directly."""
        return f"http://{self.podman.address(address('server'))}:{PREFECT_PORT}/api"

    @property
    def public_api_url(self) -> str:
        """The Prefect API as the other hosts call it: through nginx."""
        return f"https://{NGINX}:{self.nginx_port}/api"

    def observer(self) -> Observer:
        return Observer(self.amqp_url("admin"), self.rabbit.management_url,
                        f"{self.postgres.url}/ingest", self.api_url, api_auth=self.auth)

    # --- the hosts ------------------------------------------------------------------------

    def environment(self, roles: str) -> dict[str, str]:
        """What an operator would put in the host's environment file for these roles: the
        URLs of what the roles need to reach (README, Roles), and nothing more."""
        env = {
            "INGEST_ROLES": roles,
            "INGEST_DATABASE_URL": self.database_url("ingest", "ingest"),
            "INGEST_PREFECT_AUTH_STRING": ":".join(self.auth),
            "INGEST_PIPELINES_FILE": f"{MOUNTED}/pipelines.toml",
            "INGEST_METRICS_PORT": "0",
            "INGEST_CONSUMERS": "1",
            # Recover within seconds, not the production defaults' tens of seconds.
            "INGEST_STUCK_BATCH_SECONDS": "5",
            "INGEST_SUBMIT_MAX_BACKOFF_SECONDS": "5",
            "INGEST_ABANDONED_RUN_SECONDS": "30",
        }
        if roles == "server":
            return env | {
                "INGEST_PREFECT_DATABASE_URL": self.database_url("prefect", "prefect"),
                "INGEST_PREFECT_API_URL": f"http://127.0.0.1:{PREFECT_PORT}/api",
                "INGEST_PREFECT_SERVER_HOST": "0.0.0.0",
                "PREFECT_UI_API_URL": self.public_api_url,
            }
        if roles == "consumer":
            env["INGEST_AMQP_URL"] = self.amqp_url("app")
        return env | {
            "INGEST_PREFECT_API_URL": self.public_api_url,
            "INGEST_PREFECT_CA_FILE": f"{MOUNTED}/tls.crt",
            "INGEST_WORKER_FLOW_RUNS": str(self.worker_flow_runs),
        }

    def start_host(self, host: str, roles: str) -> str:
        volumes = [f"{self.pipelines_file}:{MOUNTED}/pipelines.toml:ro"]
        if roles != "server":
            volumes.append(f"{self.cert}:{MOUNTED}/tls.crt:ro")
        return self.podman.run(host, self.image, address(host), self.environment(roles), tuple(volumes),
                               hosts={NGINX: self.podman.gateway})

    def stop(self) -> None:
        """Everything, whatever state it is in: containers and network, then the services."""
        self.podman.remove()
        for process in self.processes:
            process.stop(timeout=20)
        for service in ("rabbit", "postgres"):
            if hasattr(self, service):
                getattr(self, service).remove()
