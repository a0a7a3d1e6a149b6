"""Schema migrations: Alembic configured in code, so it works from an installed package.

Edge module: touches the database schema only. ``upgrade`` is synchronous
(Alembic's command API): call it with ``asyncio.to_thread`` from async code,
never from a thread that runs an event loop.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.orm import Session

from storage.db import Database

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def alembic_config(database_url: str | None = None) -> Config:
    """Return an Alembic ``Config`` pointing at ``storage/migrations``.

    Args:
        database_url: URL (``sqlite+aiosqlite://…``, ``sqlite://…``,
            ``postgresql+asyncpg://…``) handed to env.py, or None to only
            read the script directory.
    """
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if database_url is not None:
        # Passed as an attribute, not a main option: configparser would
        # interpolate "%" in passwords.
        config.attributes["database_url"] = database_url
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """Apply migrations up to ``revision`` (default head).

    Args:
        database_url: SQLAlchemy URL of the database (SQLite runs on the
            stdlib driver, PostgreSQL on asyncpg).
        revision: Alembic revision target.

    Raises:
        sqlalchemy.exc.OperationalError: database unreachable (transient).
        RuntimeError: called from a thread with a running event loop.
    """
    command.upgrade(alembic_config(database_url), revision)


def head_revision() -> str:
    """Return the head revision id of the shipped migrations."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise RuntimeError("no migrations found in " + str(MIGRATIONS_DIR))
    return head


async def schema_status(db: Database) -> tuple[str | None, str]:
    """Return ``(current_revision, head_revision)`` of the database.

    ``current_revision`` is None for an empty (never migrated) database.
    The schema is up to date when both are equal.
    """
    current = await db.read(_current_revision)
    return current, head_revision()


def _current_revision(session: Session) -> str | None:
    return MigrationContext.configure(session.connection()).get_current_revision()
