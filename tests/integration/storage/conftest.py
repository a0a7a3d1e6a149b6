"""Fixtures for storage tests on SQLite (file in tmp_path) and PostgreSQL (throwaway database).

``database_url`` is parametrised over both backends. The PostgreSQL database
is created once per test session with a random name on 127.0.0.1:5432
(trust auth, user postgres), migrated, and dropped at the end; each test
starts from empty tables. When PostgreSQL is unreachable its tests FAIL with
a clear message, unless MAILGATE_SKIP_POSTGRES=1.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.orm import Session

from storage.blobs import BlobStore
from storage.db import Database
from storage.migrate import upgrade
from storage.models import Base

PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
PG_URL_TEMPLATE = "postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
SKIP_PG_ENV = "MAILGATE_SKIP_POSTGRES"


async def _pg_admin(sql: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A migrated throwaway PostgreSQL database for the whole session."""
    name = f"mailgate_test_{secrets.token_hex(6)}"
    try:
        asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        if os.environ.get(SKIP_PG_ENV) == "1":
            pytest.skip(f"PostgreSQL unavailable and {SKIP_PG_ENV}=1: {exc!r}")
        pytest.fail(
            f"PostgreSQL is not reachable on 127.0.0.1:5432 as user postgres ({exc!r}). "
            f"Start it, or set {SKIP_PG_ENV}=1 to skip the postgres tests.",
            pytrace=False,
        )
    url = PG_URL_TEMPLATE.format(name=name)
    try:
        upgrade(url)
        yield url
    finally:
        asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file, copied for each test (migrating once is faster)."""
    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    upgrade(f"sqlite+aiosqlite:///{path}")
    return path


@pytest.fixture(
    params=[
        pytest.param("sqlite", marks=pytest.mark.integration),
        pytest.param("postgres", marks=[pytest.mark.integration, pytest.mark.postgres]),
    ]
)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """URL of a migrated, empty database on the parametrised backend."""
    if request.param == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        path = tmp_path / "db" / "mailgate.db"
        path.parent.mkdir()
        shutil.copyfile(template, path)
        return f"sqlite+aiosqlite:///{path}"
    url: str = request.getfixturevalue("postgres_url")
    return url


def _empty_tables(session: Session) -> None:
    for table in reversed(Base.metadata.sorted_tables):  # DELETE: faster than TRUNCATE here
        session.execute(table.delete())


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    """``Database`` on ``database_url``; PostgreSQL tables are emptied first.

    Tests run their body as a sync ``check(session)`` through ``db.run``:
    one transaction, committed at the end (rolled back when it raises).
    """
    database = Database(database_url)
    if database.dialect_name == "postgresql":
        await database.run(_empty_tables)
    yield database
    await database.close()


@pytest.fixture
def blobs(tmp_path: Path) -> BlobStore:
    """A blob store in tmp_path."""
    return BlobStore(tmp_path / "blobs")
