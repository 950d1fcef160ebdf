"""Helpers shared by the benchmark scripts: the server, scratch databases, fresh tables,
statistics and the printed table.

Benchmarks measure pgqueue and its peers on the same server in the same run, each in a
scratch database of its own that is dropped at the end. Nothing here reads the
environment at import.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql

from pgqueue.config import Settings
from pgqueue.db import resolve_database_url, stop_embedded, with_dbname


@contextmanager
def server_url(cli_url: str | None) -> Iterator[tuple[str, str]]:
    """The server to measure on and where that choice came from.

    `--database-url`, else `DATABASE_URL`, else pgqueue's embedded server. Any database of
    that server will do: scratch databases are created beside it. An embedded server
    that this call had to start is stopped on exit; one that was running is left running.
    """
    if cli_url:
        yield cli_url, "--database-url"
        return
    env_url = os.environ.get("DATABASE_URL", "").strip()
    if env_url:
        yield env_url, "DATABASE_URL"
        return
    settings = Settings.from_env(os.environ)
    was_running = (settings.home.expanduser().resolve() / "pgdata" / "postmaster.pid").exists()
    url = resolve_database_url(settings, announce=None)
    try:
        yield url, f"embedded server in {settings.home} (no --database-url or DATABASE_URL)"
    finally:
        if not was_running:
            stop_embedded(settings.home)


def server_facts(url: str) -> dict[str, str]:
    """Version and the settings that decide what a commit costs."""
    with psycopg.connect(url, autocommit=True) as conn:
        facts: dict[str, str] = {}
        row = conn.execute("SELECT version()").fetchone()
        facts["version"] = str(row[0]) if row else "?"
        for name in ("fsync", "synchronous_commit", "shared_buffers", "max_connections"):
            row = conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()
            facts[name] = str(row[0]) if row else "?"
        return facts


def cpu_busy(seconds: float = 2.0) -> float | None:
    """Share of all CPUs busy over the next `seconds` (Linux /proc/stat; None elsewhere).

    Taken before a benchmark starts, it shows whether something else was running: the
    load average cannot, as it counts tasks waiting for I/O and lags by a minute."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return 1.0 - (idle1 - idle0) / (total1 - total0)


def redact(url: str) -> str:
    params = psycopg.conninfo.conninfo_to_dict(url)
    if params.get("password"):
        params["password"] = "***"
    return psycopg.conninfo.make_conninfo("", **{k: v for k, v in params.items() if v is not None})


def _drop(conn: psycopg.Connection[Any], dbname: str) -> None:
    # WITH (FORCE) (PostgreSQL 13+) ends sessions a crashed earlier run left behind.
    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))


@contextmanager
def scratch_database(
    url: str, dbname: str, *, keep: bool = False, template: str | None = None
) -> Iterator[str]:
    """A new database on the server of `url`, empty or a copy of `template` (a database
    nobody is connected to); dropped on exit unless `keep`."""
    create = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname))
    if template is not None:
        create += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
    with psycopg.connect(url, autocommit=True) as conn:
        _drop(conn, dbname)
        conn.execute(create)
    try:
        yield with_dbname(url, dbname)
    finally:
        if not keep:
            with psycopg.connect(url, autocommit=True) as conn:
                _drop(conn, dbname)


def fresh_tables(url: str, *, keep: Sequence[str] = ()) -> list[str]:
    """Empty every user table except `keep` (bare or schema-qualified names), then
    VACUUM ANALYZE and CHECKPOINT, so each measurement starts from the same state.

    Returns notes about steps the server refused (CHECKPOINT needs a superuser or
    pg_checkpoint)."""
    notes: list[str] = []
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            """SELECT schemaname, tablename FROM pg_tables
               WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"""
        ).fetchall()
        targets = [
            sql.Identifier(schema, table)
            for schema, table in rows
            if table not in keep and f"{schema}.{table}" not in keep
        ]
        if targets:
            conn.execute(
                sql.SQL("TRUNCATE {} RESTART IDENTITY CASCADE").format(sql.SQL(", ").join(targets))
            )
        conn.execute("VACUUM ANALYZE")
        try:
            conn.execute("CHECKPOINT")
        except psycopg.errors.InsufficientPrivilege:
            notes.append("CHECKPOINT refused (not a superuser); measured without it")
    return notes


def count_rows(url: str, table: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        name = sql.Identifier(*table.split("."))
        row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(name)).fetchone()
        return int(row[0]) if row else 0


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of unsorted values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return float(ordered[rank - 1])


def fmt_number(value: float | None, digits: int = 0) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:,.{digits}f}"


def fmt_ratio(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.2f}x"


def ratio(a: float | None, b: float | None) -> float:
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b == 0:
        return math.nan
    return a / b


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain aligned text table: first column left, the others right."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
            for i, cell in enumerate(cells)
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def progress(message: str) -> None:
    """Progress goes to stderr so stdout holds only the report."""
    print(message, file=sys.stderr, flush=True)
