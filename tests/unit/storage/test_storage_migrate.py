"""Migrations on a SQLite file in tmp_path: upgrade, status, downgrade to nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import sqlalchemy as sa
from alembic import command

from storage.db import make_engine
from storage.migrate import alembic_config, head_revision, schema_status, upgrade
from storage.models import Base


async def test_upgrade_status_and_downgrade_on_fresh_sqlite(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'data' / 'm.db'}"
    engine = make_engine(url)
    try:
        assert await schema_status(engine) == (None, head_revision())
        await asyncio.to_thread(upgrade, url)
        assert await schema_status(engine) == (head_revision(), head_revision())
        async with engine.connect() as conn:
            tables = set(await conn.run_sync(lambda c: sa.inspect(c).get_table_names()))
        assert set(Base.metadata.tables) <= tables
        await asyncio.to_thread(command.downgrade, alembic_config(url), "base")
        async with engine.connect() as conn:
            tables = set(await conn.run_sync(lambda c: sa.inspect(c).get_table_names()))
        assert tables == {"alembic_version"}
    finally:
        await engine.dispose()
