"""Database on SQLite (pragmas, URL forms, commit/rollback) and the aware-UTC column type."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from storage.db import SQLITE_BUSY_TIMEOUT_MS, Database, sqlite_sync_url
from storage.models import Base, Subaccount, UtcDateTime


def _pragmas(session: Session) -> tuple[object, ...]:
    return tuple(
        session.scalar(sa.text(f"PRAGMA {name}"))
        for name in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
    )


@pytest.mark.parametrize("scheme", ["sqlite+aiosqlite", "sqlite"])
async def test_sqlite_database_creates_dir_and_sets_durable_pragmas(
    tmp_path: Path, scheme: str
) -> None:
    path = tmp_path / "nested" / "dir" / "m.db"
    db = Database(f"{scheme}:///{path}")
    try:
        pragmas = await db.run(_pragmas)
    finally:
        await db.close()
    assert path.exists()
    assert pragmas == ("wal", 2, 1, SQLITE_BUSY_TIMEOUT_MS)


def _create_and_read_back(session: Session, created_at: datetime) -> datetime | None:
    Base.metadata.create_all(session.connection())
    session.execute(sa.insert(Subaccount).values(name="A", created_at=created_at))
    return session.scalar(sa.select(Subaccount.created_at))


async def test_sqlite_returns_aware_utc_datetimes(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'm.db'}")
    paris = timezone(timedelta(hours=1))
    try:
        stored = await db.run(_create_and_read_back, datetime(2026, 1, 1, 13, tzinfo=paris))
    finally:
        await db.close()
    assert stored == datetime(2026, 1, 1, 12, tzinfo=UTC)
    assert stored is not None and stored.tzinfo is UTC


def _fail_after_insert(session: Session) -> None:
    session.execute(sa.insert(Subaccount).values(name="B"))
    raise RuntimeError("boom")


def _names(session: Session) -> list[str]:
    return list(session.scalars(sa.select(Subaccount.name).order_by(Subaccount.name)))


async def test_run_commits_on_return_and_rolls_back_on_exception(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'm.db'}")
    try:
        await db.run(_create_and_read_back, datetime(2026, 1, 1, tzinfo=UTC))
        with pytest.raises(RuntimeError):
            await db.run(_fail_after_insert)
        names = await db.read(_names)
    finally:
        await db.close()
    assert names == ["A"]


def test_sqlite_url_is_translated_to_the_stdlib_driver() -> None:
    assert str(sqlite_sync_url("sqlite+aiosqlite:////d/m.db")) == "sqlite:////d/m.db"
    assert str(sqlite_sync_url("sqlite:///m.db")) == "sqlite:///m.db"
    with pytest.raises(ValueError):
        sqlite_sync_url("postgresql+asyncpg://u@h/db")


def test_naive_datetime_is_refused() -> None:
    with pytest.raises(ValueError):
        UtcDateTime().process_bind_param(datetime(2026, 1, 1), sqlite.dialect())
    aware = datetime(2026, 1, 1, tzinfo=UTC)
    assert UtcDateTime().process_bind_param(aware, postgresql.dialect()) == aware
    assert UtcDateTime().process_result_value(None, sqlite.dialect()) is None
