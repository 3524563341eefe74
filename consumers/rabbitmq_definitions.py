"""RabbitMQ users and permissions, least privilege, as a definitions file the broker loads
at boot: `python -m consumers.rabbitmq_definitions OUT [--owner UID:GID]`.

Generated rather than checked in because it must hold password hashes (from the
environment, never from the repository) and because the queue permissions name the
pipelines of pipelines.toml. Topology is not in it: code declares that (consumers/topology.py).

Users (names and passwords from RABBITMQ_{ADMIN,APP,PRODUCER}_{USER,PASSWORD}):
- admin: operators; the management UI; re-driving dead letters by hand.
- app: the `ingest` container. Declares the topology at bootstrap and in every consumer
  (configure), binds queues (write on queues, read on exchanges), consumes its queues and
  DLQs (read), publishes dead letters to ingest.dlx (write). It may not publish to
  `ingest`: that is what producers do.
- producer: upstream systems. Writes to the `ingest` exchange and nothing else, and
  may read and configure nothing.
`guest` is not among them: nothing outside local development uses it.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import secrets
import sys
from pathlib import Path

from ingest.pipelines import DEAD_LETTER_EXCHANGE, EXCHANGE, Pipeline

VHOST = "/"
NOTHING = "^$"


def password_hash(password: str) -> str:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt + sha256(salt + password))."""
    salt = secrets.token_bytes(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def exactly(*names: str) -> str:
    """A permission regex matching these resource names and no other."""
    return "^(?:" + "|".join(re.escape(n) for n in sorted(set(names))) + ")$"


def definitions(pipelines: list[Pipeline], users: dict[str, tuple[str, str]]) -> dict:
    """`users`: role (admin, app, producer) -> (name, password)."""
    queues = [name for p in pipelines for name in (p.queue, p.dlq)]
    exchanges = [EXCHANGE, DEAD_LETTER_EXCHANGE]
    permissions = {
        "admin": (".*", ".*", ".*"),
        "app": (exactly(*exchanges, *queues), exactly(DEAD_LETTER_EXCHANGE, *queues), exactly(*exchanges, *queues)),
        "producer": (NOTHING, exactly(EXCHANGE), NOTHING),
    }
    # `management` lets the app read queue statistics (unacked counts for `ingest status`)
    # of the vhost it has permissions in, and nothing else of the management API.
    tags = {"admin": ["administrator"], "app": ["management"], "producer": []}
    return {
        "users": [
            {"name": name, "password_hash": password_hash(password),
             "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": tags[role]}
            for role, (name, password) in users.items()
        ],
        "vhosts": [{"name": VHOST}],
        "permissions": [
            {"user": users[role][0], "vhost": VHOST, "configure": c, "write": w, "read": r}
            for role, (c, w, r) in permissions.items() if role in users
        ],
    }


def users_from_environment(environ=os.environ) -> dict[str, tuple[str, str]]:
    users, missing = {}, []
    for role, default_name in (("admin", "admin"), ("app", "ingest"), ("producer", "producer")):
        password = environ.get(f"RABBITMQ_{role.upper()}_PASSWORD", "")
        if not password:
            missing.append(f"RABBITMQ_{role.upper()}_PASSWORD")
        users[role] = (environ.get(f"RABBITMQ_{role.upper()}_USER", default_name), password)
    if missing:
        raise SystemExit(f"set {', '.join(missing)}: every RabbitMQ user needs a password")
    return users


def main(argv: list[str] | None = None) -> None:
    from ingest.pipelines import load_pipelines
    from ingest.settings import get_settings

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--owner", help="UID:GID to give the file (the broker's user)")
    args = parser.parse_args(argv)
    pipelines = list(load_pipelines(get_settings().pipelines_file).values())
    text = json.dumps(definitions(pipelines, users_from_environment()), indent=2)
    # Password hashes: readable by the broker's user only.
    args.out.unlink(missing_ok=True)
    fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    if args.owner:
        uid, gid = (int(x) for x in args.owner.split(":"))
        os.chown(args.out, uid, gid)
    print(f"wrote {args.out}: users {', '.join(u['name'] for u in json.loads(text)['users'])}", file=sys.stderr)


if __name__ == "__main__":
    main()
