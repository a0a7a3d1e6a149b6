"""SQLite engine setup and the aware-UTC column type (SQLite file in tmp_path)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from storage.db import SQLITE_BUSY_TIMEOUT_MS, make_engine
from storage.models import Base, Subaccount, UtcDateTime


async def test_sqlite_engine_creates_dir_and_sets_durable_pragmas(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "m.db"
    engine = make_engine(f"sqlite+aiosqlite:///{path}")
    try:
        async with engine.connect() as conn:
            journal = await conn.scalar(sa.text("PRAGMA journal_mode"))
            synchronous = await conn.scalar(sa.text("PRAGMA synchronous"))
            foreign_keys = await conn.scalar(sa.text("PRAGMA foreign_keys"))
            busy = await conn.scalar(sa.text("PRAGMA busy_timeout"))
    finally:
        await engine.dispose()
    assert path.exists()
    assert (journal, synchronous, foreign_keys, busy) == ("wal", 2, 1, SQLITE_BUSY_TIMEOUT_MS)


async def test_sqlite_returns_aware_utc_datetimes(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'm.db'}")
    paris = timezone(timedelta(hours=1))
    try:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
            await conn.execute(
                sa.insert(Subaccount).values(
                    name="A", created_at=datetime(2026, 1, 1, 13, tzinfo=paris)
                )
            )
            stored = await conn.scalar(sa.select(Subaccount.created_at))
    finally:
        await engine.dispose()
    assert stored == datetime(2026, 1, 1, 12, tzinfo=UTC)
    assert stored is not None and stored.tzinfo is UTC


def test_naive_datetime_is_refused() -> None:
    with pytest.raises(ValueError):
        UtcDateTime().process_bind_param(datetime(2026, 1, 1), sqlite.dialect())
    aware = datetime(2026, 1, 1, tzinfo=UTC)
    assert UtcDateTime().process_bind_param(aware, postgresql.dialect()) == aware
    assert UtcDateTime().process_result_value(None, sqlite.dialect()) is None
