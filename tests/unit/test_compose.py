"""docker-compose.yml and the Dockerfile: valid for Compose, and the stack DESIGN.md names.

`docker compose config` validates without a Docker engine, so it runs wherever the
docker CLI has the compose plugin or Debian's docker-compose is installed (.ci/run
installs it); elsewhere that test is skipped and the file is still checked by parsing it
(PyYAML if it happens to be installed, plain text otherwise).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
SERVICES = ("postgres", "redis", "migrate", "api", "worker")


def _compose_cli() -> list[str]:
    """`docker compose`, else Debian's `docker-compose` (Compose v1, which validates the
    same file), or skip saying what is missing."""
    docker = shutil.which("docker")
    reason = "the docker CLI is not installed"
    if docker is not None:
        try:
            probe = subprocess.run(
                [docker, "compose", "version"], capture_output=True, text=True, timeout=30
            )
        except subprocess.TimeoutExpired:
            reason = "`docker compose version` did not answer within 30 s"
        else:
            if probe.returncode == 0:
                return [docker, "compose"]
            lines = (probe.stderr or probe.stdout).strip().splitlines()
            reason = "the docker CLI has no compose plugin (`docker compose version`: " + (
                f"{lines[0]})" if lines else f"exit {probe.returncode})"
            )
    v1 = shutil.which("docker-compose")
    if v1 is not None:
        return [v1]
    pytest.skip(f"{reason}, and docker-compose is not installed either")


def test_compose_config_is_valid() -> None:
    cli = _compose_cli()
    result = subprocess.run(
        [*cli, "-f", str(COMPOSE), "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"docker compose config failed:\n{result.stderr}"


def _parsed() -> dict[str, Any] | None:
    try:
        import yaml
    except ImportError:
        return None
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _top_level_services(text: str) -> list[str]:
    """Service names: keys indented once under the top-level `services:` key."""
    block = re.search(r"^services:\s*\n(.*?)(?=^\S|\Z)", text, re.MULTILINE | re.DOTALL)
    assert block, "docker-compose.yml has no top-level services: key"
    return re.findall(r"^  ([A-Za-z0-9._-]+):", block.group(1), re.MULTILINE)


def test_compose_declares_the_stack() -> None:
    text = COMPOSE.read_text(encoding="utf-8")
    assert sorted(_top_level_services(text)) == sorted(SERVICES)
    assert "postgresql://postgres:postgres@postgres:5432/pgqueue" in text

    data = _parsed()
    if data is None:
        # No YAML parser installed: the text checks are all there is.
        for needle in (
            "image: postgres:16",
            "condition: service_healthy",
            "condition: service_completed_successfully",
            '"pgqueue", "migrate"',
            '"pgqueue", "worker"',
            '"serve", "--host", "0.0.0.0", "--port", "8000"',
        ):
            assert needle in text, f"docker-compose.yml lacks {needle!r}"
        return

    services = data["services"]
    assert sorted(services) == sorted(SERVICES)
    postgres = services["postgres"]
    assert postgres["image"].startswith("postgres:16")
    assert "healthcheck" in postgres

    migrate = services["migrate"]
    assert migrate["command"] == ["pgqueue", "migrate"]
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"

    expected = {
        "api": ["pgqueue", "serve", "--host", "0.0.0.0", "--port", "8000"],
        "worker": ["pgqueue", "worker"],
    }
    for name, command in expected.items():
        service = services[name]
        assert service["command"] == command
        assert service["depends_on"]["migrate"]["condition"] == "service_completed_successfully"

    for name in ("migrate", "api", "worker"):
        service = services[name]
        assert service.get("build") == ".", f"{name} must be built from the repo's Dockerfile"
        env = service["environment"]
        assert env["DATABASE_URL"] == "postgresql://postgres:postgres@postgres:5432/pgqueue"
        for key in ("REDIS_URL", "PGQUEUE_PROVIDER", "PGQUEUE_ADMIN_TOKEN"):
            assert key in env, f"{name} does not set {key}"


def test_dockerfile_installs_the_wheel_at_the_pinned_versions() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.MULTILINE)
    # The image runs the wheel (migrations inside it as package data), not the source tree.
    assert "pip wheel --no-deps" in text
    assert re.search(r"pip install -c constraints\.txt .*/wheels/pgqueue-\*\.whl", text)
    assert "pip install -e" not in text
    ignored = {
        line.strip().strip("/")
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    for needed in ("pgqueue", "pyproject.toml", "README.md", "constraints.txt", "alembic.ini"):
        assert needed not in ignored, f".dockerignore leaves {needed} out of the image"
