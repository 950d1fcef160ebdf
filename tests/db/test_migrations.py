"""Migrations replay up and down, and the result is exactly schema.py."""

from __future__ import annotations

import uuid

import psycopg

from pgqueue import migrate
from pgqueue.db import with_dbname


def test_migrations_match_schema_and_replay_down_and_up(server_url: str) -> None:
    name = f"pgqueue_mig_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_url, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    url = with_dbname(server_url, name)
    try:
        migrate.upgrade(url)
        assert migrate.is_at_head(url)
        assert migrate.compare_with_schema(url) == []
        migrate.downgrade(url, "base")
        with psycopg.connect(url) as c:
            left = c.execute(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = 'pgqueue' AND table_name <> 'alembic_version'"
            ).fetchall()
        assert left == []
        migrate.upgrade(url)
        assert migrate.compare_with_schema(url) == []
    finally:
        with psycopg.connect(server_url, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_drift_is_detected(db_url: str) -> None:
    # The comparison itself must be able to fail: drop a column schema.py declares.
    with psycopg.connect(db_url, autocommit=True) as c:
        c.execute("ALTER TABLE pgqueue.jobs DROP COLUMN start_at")
    assert migrate.compare_with_schema(db_url) != []


def test_history_partitions_are_created_and_dropped(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as c:
        # Two more days for each of job_history and events.
        assert c.execute("SELECT pgqueue.ensure_history_partitions(5)").fetchone() == (4,)
        for table in ("job_history", "events"):
            parts = c.execute(
                "SELECT count(*) FROM pg_inherits WHERE inhparent = %s::regclass",
                (f"pgqueue.{table}",),
            ).fetchone()
            assert parts == (7,)  # six days and the default
        dropped = c.execute(
            "SELECT pgqueue.drop_history_partitions(now() + interval '3 days')"
        ).fetchone()
        assert dropped is not None and dropped[0] >= 4
