"""The production files agree with each other and with the code: every program, path,
port and variable that docker/compose.yaml, docker/Dockerfile, supervisord.conf, the
nginx template and the CI workflows refer to exists. No Docker engine needed."""

from __future__ import annotations

import configparser
import fnmatch
import json
import re
import shlex
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import pytest
import yaml

from ingest.settings import Settings

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
COMPOSE = yaml.safe_load((DOCKER / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]
DOCKERFILE = (DOCKER / "Dockerfile").read_text()
ENV_EXAMPLE = dict(line.split("=", 1) for line in (DOCKER / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
TEMPLATE = (REPO / "nginx" / "ingest.conf.template").read_text()
REFERENCE = re.compile(r"\$\{([A-Za-z0-9_]+)(?:(:?[-?])([^}]*))?\}")


def dockerfile_instructions(name: str) -> list[str]:
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    return [line.split(None, 1)[1] for line in joined.splitlines() if line.upper().startswith(name + " ")]


def dockerfile_env() -> dict[str, str]:
    env = {}
    for instruction in dockerfile_instructions("ENV"):
        env.update(pair.split("=", 1) for pair in shlex.split(instruction))
    return env


def cli_commands() -> set[str]:
    import typer

    from ingest.cli.main import app

    return set(typer.main.get_command(app).commands)


def prefect_setting_names() -> set[str]:
    # The list Prefect itself validates environment variables against.
    from prefect.settings import Settings as PrefectSettings
    from prefect.settings.legacy import _get_valid_setting_names

    return set(_get_valid_setting_names(PrefectSettings))


def environment(service: str) -> dict[str, str]:
    return {k: str(v) for k, v in SERVICES[service].get("environment", {}).items()}


def substitute(value: str) -> str:
    """What compose makes of a value, given the .env.example values (or `x` for secrets)."""
    return REFERENCE.sub(lambda m: ENV_EXAMPLE.get(m.group(1)) or (m.group(3) if m.group(2) == ":-" else "x"), value)


# --- compose ------------------------------------------------------------------------------

def test_services_and_only_nginx_publishes_80_and_443():
    assert set(SERVICES) == {"postgres", "rabbitmq-definitions", "rabbitmq", "ingest", "nginx"}
    published = {name: s["ports"] for name, s in SERVICES.items() if s.get("ports")}
    assert list(published) == ["nginx"]
    assert sorted(p.rsplit(":", 1)[1] for p in published["nginx"]) == ["443", "80"]


def test_networks_keep_the_backend_internal():
    assert COMPOSE["networks"]["backend"]["internal"] is True
    assert SERVICES["postgres"]["networks"] == ["backend"]
    assert SERVICES["rabbitmq"]["networks"] == ["backend"]
    assert SERVICES["nginx"]["networks"] == ["frontend"]
    assert set(SERVICES["ingest"]["networks"]) == {"backend", "frontend"}
    assert SERVICES["rabbitmq-definitions"]["network_mode"] == "none"


def test_every_variable_is_defined_or_required_and_documented():
    text = (DOCKER / "compose.yaml").read_text()
    references = {m.group(1): m.group(2) for m in REFERENCE.finditer(text)}
    undocumented = [name for name, kind in references.items() if kind != ":-" and name not in ENV_EXAMPLE]
    assert undocumented == []
    # Every secret is required (compose refuses to start without it) and empty in the example.
    for name in (n for n in references if re.search(r"PASSWORD|AUTH_STRING", n)):
        assert f"${{{name}:?" in text, name
        assert ENV_EXAMPLE[name] == "", f"{name} must have no value in .env.example"
    assert sorted(set(ENV_EXAMPLE) - set(references)) == []


def test_start_order_follows_health():
    healthy = {name for name, s in SERVICES.items() if s.get("healthcheck")} | {"ingest"}  # the image's HEALTHCHECK
    assert dockerfile_instructions("HEALTHCHECK")
    for name, service in SERVICES.items():
        for dependency, condition in service.get("depends_on", {}).items():
            expected = "service_healthy" if dependency in healthy else "service_completed_successfully"
            assert condition["condition"] == expected, (name, dependency)
    assert SERVICES["nginx"]["depends_on"] == {"ingest": {"condition": "service_healthy"}}
    assert set(SERVICES["ingest"]["depends_on"]) == {"postgres", "rabbitmq"}
    assert SERVICES["rabbitmq"]["depends_on"] == {"rabbitmq-definitions": {"condition": "service_completed_successfully"}}


def test_bind_mounts_exist_and_generated_ones_come_from_the_scripts():
    generated = {"../nginx/tls": "make-cert.sh", "../nginx/htpasswd": "make-htpasswd.sh"}
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if not source.startswith("."):
                assert source in COMPOSE["volumes"], (name, source)
            elif source in generated:
                script = (REPO / "nginx" / generated[source]).read_text()
                assert Path(source).name in script, (source, "is not the script's default output")
                assert re.search(rf"^{Path(source).relative_to('..')}/?$", (REPO / ".gitignore").read_text(), re.M)
            else:
                assert (DOCKER / source).resolve().is_file(), (name, source)


def test_ingest_environment_is_valid_settings():
    env = {k: substitute(v) for k, v in environment("ingest").items()}
    fields = {f"INGEST_{name.upper()}" for name in Settings.model_fields}
    assert [k for k in env if k.startswith("INGEST_") and k not in fields] == []
    assert [k for k in env if k.startswith("PREFECT_") and k not in prefect_setting_names()] == []
    settings = Settings(**{k.removeprefix("INGEST_").lower(): v for k, v in env.items() if k.startswith("INGEST_")})
    assert settings.prefect_bind_host == "0.0.0.0"
    assert settings.prefect_auth_string is not None
    # The app's database URLs use the roles and databases the postgres init script creates.
    postgres = environment("postgres")
    for url, role in ((settings.database_url, "INGEST"), (settings.prefect_database_url, "PREFECT")):
        assert urlsplit(url).username == substitute(postgres[f"{role}_DB_USER"])
        assert urlsplit(url).path == "/" + substitute(postgres[f"{role}_DB_NAME"])
    # And the broker user whose definitions the one-shot renders.
    assert urlsplit(settings.amqp_url).username == substitute(environment("rabbitmq-definitions")["RABBITMQ_APP_USER"])


def test_one_port_for_the_prefect_server_everywhere():
    settings = Settings(prefect_api_url=substitute(environment("ingest")["INGEST_PREFECT_API_URL"]))
    port = settings.prefect_port
    assert dockerfile_instructions("EXPOSE") == [str(port)]
    assert environment("nginx")["PREFECT_UPSTREAM"] == f"ingest:{port}"


def test_nginx_gets_every_template_variable_and_its_files():
    env = environment("nginx")
    assert set(re.findall(r"\$\{([A-Z0-9_]+)\}", TEMPLATE)) == set(env)
    mounts = {PurePosixPath(v.split(":")[1]) for v in SERVICES["nginx"]["volumes"]}
    assert PurePosixPath("/etc/nginx/templates/default.conf.template") in mounts
    for key in ("NGINX_TLS_CERT", "NGINX_TLS_KEY", "NGINX_HTPASSWD"):
        path = PurePosixPath(env[key])
        assert any(path == m or m in path.parents for m in mounts), key
    assert {env["NGINX_HTTP_PORT"], env["NGINX_HTTPS_PORT"]} == {"80", "443"}


def test_rabbitmq_definitions_reach_the_broker():
    from consumers.rabbitmq_definitions import users_from_environment

    one_shot = SERVICES["rabbitmq-definitions"]
    assert one_shot["entrypoint"][:3] == ["python", "-m", "consumers.rabbitmq_definitions"]
    written = PurePosixPath(one_shot["entrypoint"][3])
    volume, target = one_shot["volumes"][0].split(":")
    broker_mount = next(v for v in SERVICES["rabbitmq"]["volumes"] if v.startswith(f"{volume}:"))
    loaded = PurePosixPath(broker_mount.split(":")[1]) / written.relative_to(target)
    conf = (DOCKER / "rabbitmq" / "rabbitmq.conf").read_text()
    assert f"load_definitions = {loaded}" in conf
    users = users_from_environment({k: substitute(v) for k, v in environment("rabbitmq-definitions").items()})
    assert set(users) == {"admin", "app", "producer"}
    assert one_shot["cap_drop"] == ["ALL"] and one_shot["cap_add"] == ["CHOWN"]


def test_postgres_init_script_gets_its_variables():
    script = (DOCKER / "postgres" / "init-roles.sh").read_text()
    used = set(re.findall(r"\$\{?([A-Z][A-Z0-9_]+)", script)) - {"POSTGRES_USER", "POSTGRES_DB"}
    assert used <= set(environment("postgres")), used - set(environment("postgres"))


# --- Dockerfile ---------------------------------------------------------------------------

def test_dockerfile_copies_what_exists_and_is_not_ignored():
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for instruction in dockerfile_instructions("COPY"):
        for source in instruction.split()[:-1]:
            assert (REPO / source).exists(), source
            assert not any(fnmatch.fnmatch(source, pattern.rstrip("/")) for pattern in ignored), source


def test_dockerfile_runs_the_same_stack_as_make_run_without_root_or_secrets():
    # tini as PID 1 (installed by apt), whatever runs the container: it reaps orphaned flow runs.
    assert [json.loads(i) for i in dockerfile_instructions("ENTRYPOINT")] == [["tini", "--", "ingest", "up"]]
    assert "tini" in " ".join(dockerfile_instructions("RUN"))
    assert "up" in cli_commands()
    # The healthcheck is `ingest health`: what the host's roles need (a worker host has no server).
    health = json.loads(dockerfile_instructions("HEALTHCHECK")[0].split("CMD", 1)[1])
    assert health[:2] == ["ingest", "health"] and "health" in cli_commands()
    assert "requirements.lock" in " ".join(dockerfile_instructions("RUN"))
    user = dockerfile_instructions("USER")[-1]
    assert user.split(":")[0].isdigit() and user.split(":")[0] != "0"
    env = dockerfile_env()
    fields = {f"INGEST_{name.upper()}" for name in Settings.model_fields}
    assert [k for k in env if k.startswith("INGEST_") and k not in fields] == []
    assert [k for k in env if k.startswith("PREFECT_") and k not in prefect_setting_names()] == []
    assert not re.search(r"PASSWORD|SECRET|TOKEN|AUTH_STRING", " ".join([*env, *dockerfile_instructions("ARG")]))
    assert "supervisord.conf" in " ".join(dockerfile_instructions("COPY"))


def test_requirements_are_pinned_exactly():
    for lock in ("requirements.lock", "requirements-test.lock"):
        lines = [l for l in (REPO / lock).read_text().splitlines() if l and not l.startswith("#")]
        assert all(re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[A-Za-z0-9_.+\-]+", l) for l in lines), lock


# --- supervisord.conf ---------------------------------------------------------------------

def test_supervisord_programs_and_variables_exist():
    from ingest.cli.up import stack_environment

    conf = configparser.RawConfigParser()
    conf.read(REPO / "supervisord.conf")
    programs = [s for s in conf.sections() if s.startswith("program:")]
    assert {p.split(":")[1] for p in programs} == {"prefect-server", "prefect-worker", "consumer"}
    commands = cli_commands()
    for section in programs:
        argv = shlex.split(conf.get(section, "command"))
        assert argv[0] == "ingest" and argv[1] in commands, argv
    expanded = set(re.findall(r"%\(ENV_([A-Z0-9_]+)\)s", (REPO / "supervisord.conf").read_text()))
    provided = set(stack_environment(Settings()))
    assert expanded <= provided, expanded - provided
    # In the image, the run directory is one its user may write.
    assert dockerfile_env()["INGEST_RUN_DIR"].startswith("/tmp/")


# --- CI/CD --------------------------------------------------------------------------------

WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.yml"))


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_secrets_are_documented_and_commands_exist(workflow):
    text = workflow.read_text()
    yaml.safe_load(text)
    readme = (REPO / "README.md").read_text()
    security = readme[readme.index("## Security"):readme.index("## Layout")]
    for secret in set(re.findall(r"secrets\.([A-Z0-9_]+)", text)) - {"GITHUB_TOKEN"}:
        assert f"`{secret}`" in security, f"secret {secret} is not documented in the README's Security section"
    for command in re.findall(r"\bingest ([a-z][a-z-]*)", text):
        assert command in cli_commands(), command


def test_workflows_build_push_and_deploy():
    assert WORKFLOWS, "no workflow in .github/workflows"
    text = "\n".join(p.read_text() for p in WORKFLOWS)
    assert "docker/Dockerfile" in text and "github.sha" in text
    # The deploy job runs `ingest bootstrap --prefect-only` in the pushed image.
    assert re.search(r"--entrypoint ingest\b", text) and "bootstrap --prefect-only" in text
    import typer

    from ingest.cli.main import app

    bootstrap = typer.main.get_command(app).commands["bootstrap"]
    assert "--prefect-only" in {opt for param in bootstrap.params for opt in param.opts}
    assert ".ci/run" in text
