"""Every tunable of the system, in one place, read from `INGEST_*` environment variables.

Defaults work on a single machine with PostgreSQL and RabbitMQ on loopback and no
configuration at all; production sets the URLs (and secrets) through the environment.
"""

from __future__ import annotations

import base64
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import Field, FilePath, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# What a host may run (INGEST_ROLES): the Prefect server, Prefect workers (with their fork
# server), consumers. What each role starts, bootstraps and checks: README, "Roles".
ROLES = ("server", "worker", "consumer")


def parse_roles(value: str) -> frozenset[str]:
    """`server,worker` (spaces allowed, any order) as a set; `all` or nothing: every role."""
    if value.strip() in ("", "all"):
        return frozenset(ROLES)
    names = [name.strip() for name in value.split(",")]
    unknown = [name for name in names if name not in ROLES]
    if unknown:
        raise ValueError(f"unknown role(s) {', '.join(map(repr, unknown))} in {value!r}; allowed: a "
                         f"comma-separated list of {', '.join(ROLES)}, or all")
    return frozenset(names)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INGEST_", extra="ignore")

    amqp_url: str = Field(
        "amqp://guest:guest@127.0.0.1:5672/",
        description="RabbitMQ connection URL (consumers, publisher, status, bootstrap).",
    )
    rabbitmq_management_url: str | None = Field(
        "http://127.0.0.1:15672",
        description="RabbitMQ management API, used by `ingest status` for unacked counts when reachable.",
    )
    database_url: str = Field(
        "postgresql://postgres@127.0.0.1:5432/ingest",
        description="PostgreSQL database holding the inbox, the batches and the sink tables.",
    )
    prefect_database_url: str = Field(
        "postgresql://postgres@127.0.0.1:5432/prefect",
        description="PostgreSQL database of the Prefect server's own state.",
    )
    prefect_api_url: str = Field(
        "http://127.0.0.1:4200/api",
        description="Prefect API that every process calls; the server started by `ingest up` listens on its port.",
    )
    prefect_server_host: str | None = Field(
        None,
        description="Interface the Prefect server binds to; default: the host of prefect_api_url. "
        "In a container 0.0.0.0, so that a proxy in another container reaches it while the "
        "processes beside it keep calling 127.0.0.1.",
    )
    prefect_ca_file: FilePath | None = Field(
        default_factory=lambda: os.environ.get("PREFECT_API_SSL_CERT_FILE") or None,
        validate_default=True,
        description="PEM file of the CA (or the self-signed certificate) that the Prefect API's TLS certificate "
        "must chain to, e.g. nginx's tls.crt on a host that reaches the API through it; it replaces the public "
        "CAs for calls to the API. Sets PREFECT_API_SSL_CERT_FILE, which Prefect's clients (HTTP and websockets) "
        "read; `ingest health` and the waits of `ingest up` use it too. Default: PREFECT_API_SSL_CERT_FILE if "
        "set, else the public CAs (a certificate from a public CA needs nothing).",
    )
    prefect_auth_string: SecretStr | None = Field(
        None,
        description="`user:password` the Prefect API requires (PREFECT_SERVER_API_AUTH_STRING for the server) and "
        "every process sends (PREFECT_API_AUTH_STRING). nginx's htpasswd holds the same user and password, "
        "because Prefect's clients send it as HTTP basic auth. Unset: the API is open (local development).",
    )
    pipelines_file: Path = Field(
        PROJECT_ROOT / "pipelines.toml",
        description="The pipeline config: queues, deployments and schedules are generated from it.",
    )
    roles: Annotated[frozenset[str], NoDecode] = Field(
        frozenset(ROLES),
        description="What this host runs, a comma-separated list of server (the Prefect server), worker "
        "(Prefect workers and their fork server) and consumer (the consumers); all (the default): every one. "
        "`ingest up` starts only their programs and bootstrap steps; `ingest health` checks what they need.",
    )
    work_pool: str = Field("ingest", description="Prefect process work pool the deployments run on.")
    # Each consumer process has its own budget of runs per pipeline (max_runs_per_second):
    # two at 20 records/s made 2 runs a second, a whole 2-core machine, and records waited
    # 6 to 8 s for a worker's slot. More processes add throughput only with more cores.
    consumers: int = Field(1, ge=1, description="Consumer processes started by `ingest up`; each makes up to "
                           "max_runs_per_second flow runs of each pipeline: add them with cores.")
    warm_flow_runs: bool = Field(
        True,
        description="Fork flow-run processes from a process that has imported Prefect and the flows "
        "(flows/forkserver.py) instead of starting each from scratch: about 1.3 s of CPU less per run.",
    )
    metrics_port: int = Field(
        9400, ge=0, description="Consumers serve Prometheus metrics on this port plus their index "
        "(INGEST_CONSUMER_INDEX); 0: no metrics."
    )
    consumer_index: int = Field(0, ge=0, description="Set by supervisord for each consumer process (process_num).")
    workers: int = Field(
        1, ge=1, description="Prefect worker processes started by `ingest up`; more hosts can add their own."
    )
    worker_flow_runs: int = Field(
        4, ge=1, description="Flow runs one worker runs at once; more wait, Scheduled, for a free slot. Each run "
        "holds up to 8 PostgreSQL connections, and on a few cores more runs at once only share them."
    )
    prefect_event_history: bool = Field(
        False, description="Store Prefect's events for the UI's Event Feed. Off by default: per-record task runs "
        "send the Prefect server three events each, storing them takes 20 to 35% of its CPU, and under load "
        "its in-memory event bus drops them when the store falls behind. Flow and task runs are recorded either way."
    )
    max_message_bytes: int = Field(
        1024 * 1024, ge=1, description="Larger messages are dead-lettered as `too_large`."
    )
    consumer_max_held_bytes: int = Field(
        256 * 1024 * 1024, ge=1, description="Bytes of message bodies one consumer process holds at most (delivered "
        "and not yet settled: waiting, batched, being committed), shared equally by the pipelines it consumes, each "
        "part at least twice max_message_bytes. The broker's prefetch counts messages, so each pipeline takes them in "
        "windows of about half its part in messages of max_message_bytes (consumers/credit.py); with messages near "
        "the size limit, the bound also makes its batches' size."
    )
    worker_poll_seconds: float = Field(
        2.0, gt=0, description="How often the Prefect worker polls for scheduled runs, each poll one query on the "
        "Prefect server. The fallback only: a worker learns of the runs consumers create at once, by a PostgreSQL "
        "NOTIFY (flows/worker.py); polling finds the others (replays, schedules, the UI), and all of them while "
        "its listener is disconnected."
    )
    early_flow_runs: bool = Field(
        True, description="Create a batch's flow run as the batch starts to fill (if it fills within 5 s at "
        "most), so that the run starts meanwhile and waits for the batch's commit: a record then waits for its "
        "batch or for its run's start, not for both. Each such run holds a worker's slot while it waits."
    )
    submit_timeout_seconds: float = Field(
        10.0, gt=0, description="Time limit for one flow-run creation call to Prefect."
    )
    submit_max_backoff_seconds: float = Field(
        30.0, gt=0, description="Longest wait between retries of a batch whose run could not be created."
    )
    stuck_batch_seconds: float = Field(
        15.0,
        gt=0,
        description="A pending batch untouched this long (its consumer died) is submitted by any consumer.",
    )
    abandoned_run_seconds: float = Field(
        300.0,
        gt=0,
        description="A flow run still Pending this long was claimed by a worker that died before starting it "
        "(Prefect never recovers such a run): consumers schedule it again. Runs start in seconds.",
    )
    run_dir: Path = Field(
        PROJECT_ROOT / ".run", description="Where `ingest up` keeps supervisord's socket and pid file."
    )
    log_level: str = Field("INFO", description="Log level of consumers and commands.")

    @field_validator("consumer_max_held_bytes")
    @classmethod
    def _holds_a_message(cls, value: int, info) -> int:
        largest = info.data.get("max_message_bytes")  # validated before: it is defined above
        if largest is not None and value < 2 * largest:
            raise ValueError(f"INGEST_CONSUMER_MAX_HELD_BYTES ({value}) must be at least twice INGEST_MAX_MESSAGE_BYTES "
                             f"({largest}): a consumer holds a message being settled while it takes the next")
        return value

    @field_validator("database_url", "prefect_database_url")
    @classmethod
    def _postgres_url(cls, value: str) -> str:
        if not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a URL like postgresql://user:password@host:5432/database")
        return value

    @field_validator("roles", mode="before")
    @classmethod
    def _roles(cls, value: object) -> object:
        return parse_roles(value) if isinstance(value, str) else value

    @property
    def prefect_host(self) -> str:
        return urlsplit(self.prefect_api_url).hostname or "127.0.0.1"

    @property
    def prefect_bind_host(self) -> str:
        return self.prefect_server_host or self.prefect_host

    @property
    def prefect_port(self) -> int:
        return urlsplit(self.prefect_api_url).port or 4200

    @property
    def prefect_server_database_url(self) -> str:
        """The Prefect server speaks asyncpg through SQLAlchemy."""
        return "postgresql+asyncpg://" + self.prefect_database_url.split("://", 1)[1]

    def prefect_environment(self) -> dict[str, str]:
        """PREFECT_* variables for every process: INGEST_* settings are the one source of truth."""
        return {
            "PREFECT_API_URL": self.prefect_api_url,
            "PREFECT_SERVER_API_HOST": self.prefect_bind_host,
            "PREFECT_SERVER_API_PORT": str(self.prefect_port),
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": self.prefect_server_database_url,
            "PREFECT_WORKER_QUERY_SECONDS": str(self.worker_poll_seconds),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            # Prometheus metrics of the server (flow runs by state, ...) at <API URL>/metrics.
            "PREFECT_SERVER_METRICS_ENABLED": "true",
            # Prefect's defaults (5 s to connect, 10 s a statement) fail API calls, and with
            # them flow runs, whenever the host is briefly saturated, e.g. by a burst of runs.
            "PREFECT_SERVER_DATABASE_CONNECTION_TIMEOUT": "30",
            "PREFECT_SERVER_DATABASE_TIMEOUT": "30",
            # While its database restarts, the server answers 500. A flow run that had stored
            # its records then failed to report Completed, and its worker to report it
            # Crashed: it stayed Running for good. Prefect's clients retry 500 too, with
            # backoff (2, 4, 8, ... s; see below); creating a run is idempotent (the batch id is the key).
            "PREFECT_CLIENT_RETRY_EXTRA_CODES": "500",
            # Prefect's 5 retries back off for 62 s in all: a flow run that lost its server
            # for 60 s (our fault suite's outage) ran out of them before the server was back,
            # could not report its end, and stayed Running for good. 7 retries ride out
            # about 4 minutes (2 s, doubling). A process that never reached the server is not
            # retried on a refused connection (Prefect's rule), so commands still fail fast.
            "PREFECT_CLIENT_MAX_RETRIES": "7",
            # The server records task runs from their state events. One transaction per event
            # (Prefect's default) records about 16 task runs a second here: far behind a
            # `record` batch, so its event queue fills and further events, with the task runs
            # the UI shows per record, are dropped. In batches it keeps up; the UI shows them
            # at most a second late.
            "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "100",
            "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "1",
            "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED": str(self.prefect_event_history).lower(),
            **({"PREFECT_API_SSL_CERT_FILE": str(self.prefect_ca_file)} if self.prefect_ca_file else {}),
            **self._prefect_auth_environment(),
        }

    def _prefect_auth_environment(self) -> dict[str, str]:
        # Only when set: an empty PREFECT_SERVER_API_AUTH_STRING would still turn the check on.
        auth = self.prefect_auth_string.get_secret_value() if self.prefect_auth_string else ""
        if not auth:
            return {}
        token = base64.b64encode(auth.encode()).decode()
        return {
            "PREFECT_SERVER_API_AUTH_STRING": auth,
            "PREFECT_API_AUTH_STRING": auth,
            # Prefect's HTTP client and its events-in socket send the auth string as a basic-auth
            # header, but its other websockets (events and logs out, task-run subscriptions, the
            # worker channel) send it only inside the connection, after the handshake, which
            # nginx's basic auth has already refused: this header goes with every handshake.
            "PREFECT_CLIENT_CUSTOM_HEADERS": json.dumps({"Authorization": f"Basic {token}"}),
        }


@lru_cache
def get_settings() -> Settings:
    return Settings()
