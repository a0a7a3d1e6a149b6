"""Alembic environment for mailgate: runs migrations on SQLite (sync) or PostgreSQL (async).

Configured programmatically by ``storage.migrate`` (no alembic.ini needed):
the database URL comes from ``config.attributes["database_url"]``, or an
open sync ``Connection`` from ``config.attributes["connection"]``.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

import sqlalchemy as sa
from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlalchemy import pool
from sqlalchemy.engine import Connection

from storage.db import is_sqlite, make_engine, make_sqlite_engine
from storage.models import Base, UtcDateTime

config = context.config
target_metadata = Base.metadata


def render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    """Render our column types as plain SQLAlchemy types in migration scripts.

    Migrations must not import the models (they change over time):
    ``UtcDateTime`` is ``sa.DateTime(timezone=True)`` in the database and the
    non-native enums are ``sa.String(32)``.
    """
    if type_ == "type" and isinstance(obj, UtcDateTime):
        return "sa.DateTime(timezone=True)"
    if type_ == "type" and isinstance(obj, sa.Enum):
        return f"sa.String(length={obj.length})"
    return False


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_item=render_item,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )


def do_run_migrations(connection: Connection) -> None:
    """Run the migrations on an open sync connection."""
    _configure(connection)
    with context.begin_transaction():
        context.run_migrations()


def run_sqlite_migrations(database_url: str) -> None:
    """Open the sync SQLite engine (stdlib driver) for ``database_url`` and migrate."""
    engine = make_sqlite_engine(database_url, poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            do_run_migrations(connection)
    finally:
        engine.dispose()


async def run_async_migrations(database_url: str) -> None:
    """Open the async PostgreSQL engine for ``database_url`` and run the migrations."""
    engine = make_engine(database_url, poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(do_run_migrations)
    finally:
        await engine.dispose()


def run_migrations_online() -> None:
    """Run migrations on the given connection, or on a fresh engine."""
    connection = config.attributes.get("connection")
    if connection is not None:
        do_run_migrations(connection)
        return
    database_url = config.attributes.get("database_url") or config.get_main_option("sqlalchemy.url")
    if not database_url:
        raise RuntimeError("no database URL given to the Alembic environment")
    if is_sqlite(database_url):
        run_sqlite_migrations(database_url)
    else:
        asyncio.run(run_async_migrations(database_url))


if context.is_offline_mode():
    raise RuntimeError("mailgate migrations run online only (storage.migrate.upgrade)")
run_migrations_online()
