"""Migrations on a SQLite file in tmp_path: upgrade, status, downgrade to nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy.orm import Session

from storage.db import Database
from storage.migrate import alembic_config, head_revision, schema_status, upgrade
from storage.models import Base


def _tables(session: Session) -> set[str]:
    return set(sa.inspect(session.connection()).get_table_names())


@pytest.mark.parametrize("scheme", ["sqlite+aiosqlite", "sqlite"])
async def test_upgrade_status_and_downgrade_on_fresh_sqlite(tmp_path: Path, scheme: str) -> None:
    url = f"{scheme}:///{tmp_path / 'data' / 'm.db'}"
    db = Database(url)
    try:
        assert await schema_status(db) == (None, head_revision())
        await asyncio.to_thread(upgrade, url)
        assert await schema_status(db) == (head_revision(), head_revision())
        assert set(Base.metadata.tables) <= await db.read(_tables)
        await asyncio.to_thread(command.downgrade, alembic_config(url), "base")
        assert await db.read(_tables) == {"alembic_version"}
    finally:
        await db.close()
