"""The database: one ``Database`` that runs a synchronous repository function in a transaction.

Edge module: owns connection setup and transactions only; no queries, no
schema changes (migrate.py does those). Durability matters: the gateway
acknowledges SMTP ``250`` and advances IMAP checkpoints only after commit,
so SQLite runs with ``synchronous=FULL``.

Why repositories are synchronous: an ``await session.execute(...)`` costs
about 305 µs per statement through aiosqlite (a thread hop per call) and
135 µs through asyncpg, against 18 µs for a sync ``Session`` on the stdlib
``sqlite3`` driver. A message needs ~20 statements, so ``Database.run``
makes one hop per *transaction* instead:

- SQLite: a sync engine on ``sqlite3`` driven from ONE worker thread
  (SQLite admits one writer anyway); ``run`` awaits that thread.
- PostgreSQL: SQLAlchemy's ``AsyncSession`` over asyncpg, and the sync
  function runs inside ``AsyncSession.run_sync`` (greenlet bridge).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session, sessionmaker

P = ParamSpec("P")
T = TypeVar("T")

SQLITE_BUSY_TIMEOUT_MS = 15_000
"""How long a SQLite writer waits for the lock before failing (milliseconds)."""

SQLITE_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=FULL",
    "PRAGMA foreign_keys=ON",
    f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}",
)
"""Run on every new SQLite connection (https://www.sqlite.org/pragma.html)."""

READ_ONLY_OPTION = "mailgate_read_only"
"""Execution option: a SQLite transaction that only reads starts with a deferred BEGIN."""

SQLITE_THREAD_NAME = "mailgate-sqlite"


def is_sqlite(database_url: str | URL) -> bool:
    """Return whether ``database_url`` names SQLite (any driver)."""
    return make_url(database_url).get_backend_name() == "sqlite"


def sqlite_sync_url(database_url: str | URL) -> URL:
    """Return ``database_url`` on the stdlib ``sqlite3`` driver.

    ``sqlite+aiosqlite:///p`` and ``sqlite:///p`` both become ``sqlite:///p``.

    Raises:
        ValueError: not a SQLite URL.
        sqlalchemy.exc.ArgumentError: malformed URL.
    """
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite":
        raise ValueError(f"not a SQLite URL: {url.render_as_string(hide_password=True)}")
    return url.set(drivername="sqlite")


def make_sqlite_engine(database_url: str | URL, **engine_kwargs: Any) -> Engine:
    """Create the sync SQLite engine (stdlib ``sqlite3``) for ``database_url``.

    The file's parent directory is created, every connection runs
    ``SQLITE_PRAGMAS``, and every transaction starts with ``BEGIN
    IMMEDIATE``: the write lock is taken up front, so a transaction that
    reads facts and then writes cannot fail with SQLITE_BUSY on lock
    upgrade (writers of other processes, e.g. the CLI, queue for up to
    ``SQLITE_BUSY_TIMEOUT_MS`` instead). A connection with the execution
    option ``READ_ONLY_OPTION`` starts with a deferred ``BEGIN`` (WAL
    readers never block the writer). This is the recipe of SQLAlchemy's
    "Serializable isolation / Savepoints / Transactional DDL" notes for pysqlite.

    Args:
        database_url: ``sqlite+aiosqlite:///path`` or ``sqlite:///path``.
        **engine_kwargs: passed to ``create_engine`` (e.g. ``poolclass``).

    Raises:
        ValueError: not a SQLite URL.
        OSError: the directory cannot be created.
    """
    url = sqlite_sync_url(database_url)
    database = url.database or ""
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, **engine_kwargs)
    # An executemany INSERT becomes one multi-row INSERT per 1,000 rows
    # (SQLAlchemy's "insertmanyvalues", documented on Dialect): one
    # sqlite3_step instead of one per row. Each step releases the GIL, and
    # getting it back from the event loop was two thirds of a group-commit
    # batch's insert time under bench/bench_smtp.py (py-spy --native:
    # pthread_cond_timedwait in _pysqlite_query_execute).
    engine.dialect.use_insertmanyvalues_wo_returning = True
    event.listen(engine, "connect", _sqlite_on_connect)
    event.listen(engine, "begin", _sqlite_on_begin)
    return engine


def make_engine(database_url: str | URL, **engine_kwargs: Any) -> AsyncEngine:
    """Create the async PostgreSQL engine (asyncpg) for ``database_url``.

    Args:
        database_url: ``postgresql+asyncpg://user@host/db``.
        **engine_kwargs: passed to ``create_async_engine``.

    Raises:
        ValueError: a SQLite URL (use ``make_sqlite_engine``).
        sqlalchemy.exc.ArgumentError: malformed URL.
    """
    if is_sqlite(database_url):
        raise ValueError("SQLite runs on the sync engine: use make_sqlite_engine")
    return create_async_engine(database_url, **engine_kwargs)


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
    if connection.get_execution_options().get(READ_ONLY_OPTION):
        connection.exec_driver_sql("BEGIN")
    else:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


class Database:
    """Owns the engine(s) and runs sync functions ``fn(session, ...)`` in one transaction each.

    SQLite: every call runs on one dedicated worker thread, in arrival
    order; PostgreSQL: calls run concurrently on the event loop's pool.
    Sessions use ``expire_on_commit=False``; repositories never commit.

    Args:
        database_url: ``sqlite+aiosqlite:///path``, ``sqlite:///path`` or
            ``postgresql+asyncpg://user@host/db``.

    Raises:
        sqlalchemy.exc.ArgumentError: malformed URL.
        OSError: the SQLite directory cannot be created.
    """

    def __init__(self, database_url: str) -> None:
        self.url = make_url(database_url)
        self.dialect_name = self.url.get_backend_name()
        self._executor: ThreadPoolExecutor | None = None
        self._engine: Engine | None = None
        self._async_engine: AsyncEngine | None = None
        if self.dialect_name == "sqlite":
            self._engine = make_sqlite_engine(self.url)
            self._sessions = sessionmaker(self._engine, expire_on_commit=False)
            self._read_sessions = sessionmaker(
                self._engine.execution_options(**{READ_ONLY_OPTION: True}),
                expire_on_commit=False,
            )
            self._executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=SQLITE_THREAD_NAME
            )
        else:
            self._async_engine = make_engine(self.url)
            self._async_sessions = async_sessionmaker(self._async_engine, expire_on_commit=False)

    @property
    def runs_in_thread(self) -> bool:
        """Whether ``run`` calls its function on the database thread (SQLite), where it
        may block; on PostgreSQL it runs on the event loop and must not block."""
        return self._executor is not None

    async def run(
        self, fn: Callable[Concatenate[Session, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Call ``fn(session, *args, **kwargs)`` in a new transaction and commit it.

        Returns:
            What ``fn`` returned, after the commit is durable.

        Raises:
            Exception: whatever ``fn`` or the commit raised, after rollback
                (e.g. ``sqlalchemy.exc.IntegrityError``, ``OperationalError``
                when the database is unreachable or locked: transient).
        """
        if self._executor is not None:
            call = functools.partial(self._run_sqlite, fn, False, *args, **kwargs)
            return await asyncio.get_running_loop().run_in_executor(self._executor, call)
        async with self._async_sessions() as session:
            try:
                result = await session.run_sync(fn, *args, **kwargs)
                await session.commit()
            except BaseException:
                await session.rollback()
                raise
            return result

    async def read(
        self, fn: Callable[Concatenate[Session, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Like ``run`` for a function that only reads (SQLite: deferred BEGIN, no write lock)."""
        if self._executor is not None:
            call = functools.partial(self._run_sqlite, fn, True, *args, **kwargs)
            return await asyncio.get_running_loop().run_in_executor(self._executor, call)
        return await self.run(fn, *args, **kwargs)

    async def close(self) -> None:
        """Dispose of the connections (SQLite: on its thread, then stop the thread)."""
        if self._executor is not None and self._engine is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._engine.dispose)
            self._executor.shutdown(wait=False)
        if self._async_engine is not None:
            await self._async_engine.dispose()

    def _run_sqlite(
        self,
        fn: Callable[Concatenate[Session, P], T],
        read_only: bool,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        factory = self._read_sessions if read_only else self._sessions
        with factory() as session, session.begin():
            return fn(session, *args, **kwargs)
