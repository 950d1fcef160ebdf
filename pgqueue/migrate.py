"""Alembic, driven from code: `pgqueue migrate` and the tests use these.

The migrations are package data (pgqueue/migrations), so an installed wheel carries
them; the root alembic.ini names the same location for `alembic upgrade head`.
"""

from __future__ import annotations

from importlib import resources

import psycopg
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, pool

from pgqueue.db import sqlalchemy_url
from pgqueue.errors import ConfigError
from pgqueue.schema import RUNTIME_TABLE_PREFIXES, SCHEMA, metadata

# Alembic's package-resource form: the `migrations` folder of the installed pgqueue.
SCRIPT_LOCATION = "pgqueue:migrations"


def alembic_config(database_url: str) -> Config:
    if not (resources.files("pgqueue") / "migrations" / "env.py").is_file():
        raise ConfigError("this pgqueue installation has no migrations: reinstall pgqueue")
    cfg = Config()
    cfg.set_main_option("script_location", SCRIPT_LOCATION)
    cfg.attributes["database_url"] = database_url
    return cfg


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(database_url), revision)


def head_revision() -> str | None:
    script = ScriptDirectory.from_config(alembic_config("postgresql://unused"))
    return script.get_current_head()


def current_revision(database_url: str) -> str | None:
    try:
        with psycopg.connect(database_url) as conn:
            row = conn.execute("SELECT version_num FROM pgqueue.alembic_version").fetchone()
    except psycopg.errors.UndefinedTable:
        return None
    return str(row[0]) if row else None


def is_at_head(database_url: str) -> bool:
    return current_revision(database_url) == head_revision()


def compare_with_schema(database_url: str) -> list[object]:
    """Differences between the migrated database and schema.py (empty = no drift)."""

    def include_object(obj: object, name: str | None, type_: str, *_: object) -> bool:
        if type_ == "table" and name and name.startswith(RUNTIME_TABLE_PREFIXES):
            return False
        return not (type_ == "table" and name == "alembic_version")

    engine = create_engine(sqlalchemy_url(database_url), poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(
                conn,
                opts={
                    "include_schemas": True,
                    "include_object": include_object,
                    "include_name": lambda name, type_, parent: type_ != "schema" or name == SCHEMA,
                    "target_metadata": metadata,
                },
            )
            return list(compare_metadata(ctx, metadata))
    finally:
        engine.dispose()
