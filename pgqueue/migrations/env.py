"""Alembic environment: the URL comes from pgqueue's Settings (or the caller), never a file.

Run by `pgqueue migrate` (pgqueue.migrate passes the URL) and by `alembic upgrade head`
with the root alembic.ini (DATABASE_URL, else the embedded server, as every command).
"""

from __future__ import annotations

from logging.config import fileConfig
from typing import Any

from alembic import context
from sqlalchemy import create_engine, pool, text

from pgqueue.config import Settings
from pgqueue.db import resolve_database_url, sqlalchemy_url
from pgqueue.schema import RUNTIME_TABLE_PREFIXES, SCHEMA, metadata

config = context.config
if config.config_file_name is not None:
    # The alembic command line: log each step as Alembic does by default.
    fileConfig(config.config_file_name, disable_existing_loggers=False)


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
