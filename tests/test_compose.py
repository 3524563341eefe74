"""docker/compose.yaml as a real compose implementation reads it: `docker compose config`
where docker's compose plugin is installed, else podman-compose (pinned in
requirements-test.lock). tests/test_packaging.py checks the files against each other from
the YAML alone; this checks that the YAML means to compose what that test assumes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_packaging import COMPOSE, DOCKER, ENV_EXAMPLE, REPO, SERVICES, substitute


def compose_command() -> list[str]:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    podman_compose = Path(sys.executable).parent / "podman-compose"
    if not podman_compose.exists():
        pytest.fail("no compose implementation: install the test requirements (podman-compose, with podman: "
                    "`make install system-deps`)", pytrace=False)
    return [str(podman_compose)]


def config(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`compose config` of docker/compose.yaml with this env file, and nothing from our environment."""
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    return subprocess.run([*compose_command(), "--env-file", str(env_file), "-f", str(DOCKER / "compose.yaml"),
                           "config"], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)})


def filled() -> dict[str, str]:
    """The example env file with every secret set (to `x`, as test_packaging.substitute() assumes)."""
    return {k: v or "x" for k, v in ENV_EXAMPLE.items()}


@pytest.fixture(scope="module")
def resolved(tmp_path_factory) -> dict:
    result = config(tmp_path_factory.mktemp("compose"), filled())
    assert result.returncode == 0, result.stdout + result.stderr
    return yaml.safe_load(result.stdout)


def test_the_services_are_the_files_services(resolved):
    assert set(resolved["services"]) == set(SERVICES)
    assert resolved["networks"]["backend"].get("internal") is True


def test_environments_resolve_as_the_consistency_tests_assume(resolved):
    # test_packaging.substitute() stands for compose's interpolation in the tests of that file.
    for name, service in SERVICES.items():
        expected = {k: substitute(str(v)) for k, v in service.get("environment", {}).items()}
        got = {k: str(v) for k, v in (resolved["services"][name].get("environment") or {}).items()}
        assert got == expected, name


def test_the_image_is_ours_built_from_the_dockerfile(resolved):
    ingest = resolved["services"]["ingest"]
    assert ingest["image"] == f"{ENV_EXAMPLE['INGEST_IMAGE']}:{ENV_EXAMPLE['INGEST_IMAGE_TAG']}"
    context = Path(ingest["build"]["context"])
    assert context.resolve() == REPO
    assert (context / ingest["build"]["dockerfile"]).resolve() == DOCKER / "Dockerfile"
    assert ingest["environment"]["INGEST_ROLES"] == "all"
    assert "init" not in COMPOSE["services"]["ingest"]  # tini is the image's PID 1


def test_every_secret_left_empty_is_refused(tmp_path):
    result = config(tmp_path, ENV_EXAMPLE)
    assert result.returncode != 0
    assert "set POSTGRES_PASSWORD in docker/.env" in result.stdout + result.stderr
