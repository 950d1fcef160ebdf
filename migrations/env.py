"""Alembic environment: the URL comes from pgqueue's Settings (or the caller), never a file."""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy import create_engine, pool, text

from pgqueue.config import Settings
from pgqueue.db import resolve_database_url, sqlalchemy_url
from pgqueue.schema import RUNTIME_TABLE_PREFIXES, SCHEMA, metadata

config = context.config


def include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    if type_ == "table" and name and name.startswith(RUNTIME_TABLE_PREFIXES):
        return False
    return not (type_ == "table" and name == "alembic_version")


def run_migrations_online() -> None:
    url = config.attributes.get("database_url") or resolve_database_url(Settings.from_env())
    engine = create_engine(sqlalchemy_url(url), poolclass=pool.NullPool)
    with engine.connect() as connection:
        connection.execute(text(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))
        connection.commit()
        context.configure(
            connection=connection,
            target_metadata=metadata,
            version_table_schema=SCHEMA,
            include_schemas=True,
            include_object=include_object,
            include_name=lambda name, type_, parent: type_ != "schema" or name == SCHEMA,
            compare_server_default=False,
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    raise SystemExit("pgqueue migrations run online only: pgqueue migrate")
run_migrations_online()
