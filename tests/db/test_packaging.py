"""pgqueue as users deploy it: the wheel carries its migrations, and the root alembic.ini
migrates with DATABASE_URL.

The wheel is built from this tree and installed, at the versions in constraints.txt, into
a fresh venv in a temporary directory; its commands then run from outside the tree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pgqueue import migrate
from pgqueue.db import as_url, with_dbname

ROOT = Path(__file__).resolve().parents[2]
MIGRATIONS = ROOT / "pgqueue" / "migrations"


def _run(
    cmd: list[str], *, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = _env() if env is None else env
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout}\n{out.stderr}"
    return out


def _env(**extra: str) -> dict[str, str]:
    """This environment without what would leak the tree or the session into a command."""
    leaks = ("PYTHON", "VIRTUAL_ENV", "PGQUEUE_", "DATABASE_URL")
    return {k: v for k, v in os.environ.items() if not k.startswith(leaks)} | extra


@pytest.fixture(scope="module")
def outside() -> Iterator[Path]:
    """A directory outside the tree (not under pytest's basetemp: concurrent sessions prune
    each other's)."""
    tmp = Path(tempfile.mkdtemp(prefix="pgqueue-packaging-"))
    yield tmp
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def wheel_venv(outside: Path) -> Path:
    """The bin/ directory of a fresh venv holding only the wheel and its runtime deps."""
    # Built from a copy of what the Dockerfile copies: a build in the tree itself would
    # share build/ with any concurrent build.
    src = outside / "src"
    shutil.copytree(ROOT / "pgqueue", src / "pgqueue", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip"]
    _run([*pip, "wheel", "-q", "--no-deps", "-w", str(outside / "dist"), str(src)], cwd=outside)
    (wheel,) = (outside / "dist").glob("pgqueue-*.whl")

    shipped = set(zipfile.ZipFile(wheel).namelist())
    tracked = {
        p.relative_to(ROOT).as_posix()
        for p in MIGRATIONS.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert tracked <= shipped, f"the wheel lacks {sorted(tracked - shipped)}"

    venv = outside / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=outside)
    python = venv / "bin" / "python"
    constraints = ROOT / "constraints.txt"
    _run(
        [*pip, "--python", str(python), "install", "-q", "-c", str(constraints), str(wheel)],
        cwd=outside,
    )
    where = _run([str(python), "-c", "import pgqueue; print(pgqueue.__file__)"], cwd=outside)
    assert Path(where.stdout.strip()).is_relative_to(venv), f"pgqueue from {where.stdout}"
    return venv / "bin"


@pytest.fixture
def scratch_url(server_url: str) -> Iterator[str]:
    """An empty database on the test server, as the postgresql:// URL DATABASE_URL takes."""
    name = f"pgqueue_pkg_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_url, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    try:
        yield as_url(with_dbname(server_url, name))
    finally:
        with psycopg.connect(server_url, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_the_wheel_migrates_outside_the_tree(
    wheel_venv: Path, scratch_url: str, outside: Path
) -> None:
    env = _env(DATABASE_URL=scratch_url, PGQUEUE_HOME=str(outside / "home"))
    out = _run([str(wheel_venv / "pgqueue"), "migrate"], cwd=outside, env=env)
    head = migrate.head_revision()
    assert head is not None and f"database at migration {head}" in out.stdout
    assert migrate.current_revision(scratch_url) == head
    assert migrate.compare_with_schema(scratch_url) == []


@pytest.mark.parametrize("install", ["wheel", "source"])
def test_alembic_upgrade_head_from_the_repository_root(
    install: str, wheel_venv: Path, scratch_url: str, outside: Path
) -> None:
    # The wheel's alembic (its pgqueue's migrations), or this tree's: `python -m alembic`
    # puts the root on sys.path.
    alembic = {
        "wheel": [str(wheel_venv / "alembic")],
        "source": [sys.executable, "-m", "alembic"],
    }[install]
    env = _env(DATABASE_URL=scratch_url, PGQUEUE_HOME=str(outside / "home"))
    out = _run([*alembic, "upgrade", "head"], cwd=ROOT, env=env)
    head = migrate.head_revision()
    # alembic.ini's logging: each step is reported, as Alembic users expect.
    assert "Running upgrade  -> 0001" in out.stderr and f"-> {head}," in out.stderr
    assert migrate.current_revision(scratch_url) == head
