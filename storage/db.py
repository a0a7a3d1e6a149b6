"""Async engine and session factory for SQLite (aiosqlite) and PostgreSQL (asyncpg).

Edge module: owns connection setup only; no queries, no schema changes
(migrate.py does those). Durability matters: the gateway acknowledges SMTP
``250`` and advances IMAP checkpoints only after commit, so SQLite runs
with ``synchronous=FULL``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

SQLITE_BUSY_TIMEOUT_MS = 15_000
"""How long a SQLite writer waits for the lock before failing (milliseconds)."""

SQLITE_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=FULL",
    "PRAGMA foreign_keys=ON",
    f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}",
)
"""Run on every new SQLite connection (https://www.sqlite.org/pragma.html)."""


def make_engine(database_url: str, **engine_kwargs: Any) -> AsyncEngine:
    """Create the async engine for ``database_url``.

    For SQLite the file's parent directory is created, every connection
    runs ``SQLITE_PRAGMAS``, and every transaction starts with
    ``BEGIN IMMEDIATE``: the write lock is taken up front, so a session that
    reads facts and then writes cannot fail with SQLITE_BUSY on lock
    upgrade (writers queue for up to ``SQLITE_BUSY_TIMEOUT_MS`` instead).
    This is the recipe of SQLAlchemy's "Serializable isolation / Savepoints /
    Transactional DDL" notes for pysqlite/aiosqlite.

    Args:
        database_url: ``sqlite+aiosqlite:///path`` or
            ``postgresql+asyncpg://user@host/db``.
        **engine_kwargs: passed to ``create_async_engine`` (e.g. ``poolclass``).

    Returns:
        An ``AsyncEngine``; the caller disposes it.

    Raises:
        sqlalchemy.exc.ArgumentError: malformed URL.
        OSError: the SQLite directory cannot be created.
    """
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite":
        return create_async_engine(url, **engine_kwargs)
    database = url.database or ""
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(url, **engine_kwargs)
    event.listen(engine.sync_engine, "connect", _sqlite_on_connect)
    event.listen(engine.sync_engine, "begin", _sqlite_on_begin)
    return engine


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Autocommit at the driver level, so SQLAlchemy's "begin" hook below
    # decides how transactions start (the driver's implicit BEGIN is deferred).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        for pragma in SQLITE_PRAGMAS:
            cursor.execute(pragma)
    finally:
        cursor.close()


def _sqlite_on_begin(connection: Connection) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def make_session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Return a session factory bound to ``engine`` with ``expire_on_commit=False``.

    Repositories never commit; the caller owns the transaction
    (``async with factory() as s, s.begin(): ...``).
    """
    return async_sessionmaker(engine, expire_on_commit=False)
