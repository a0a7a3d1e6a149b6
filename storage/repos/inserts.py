"""Insert helpers shared by the repositories: many rows in one statement, or ignore a duplicate.

Edge module: runs Core ``INSERT`` statements on the caller's ``Session``'s
connection (no ORM unit of work, no autoflush: flush pending ORM objects
first if a row refers to them); never commits. Rows are dicts keyed by
column name; Python-side column defaults (``created_at``) apply as usual.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from storage.models import Base


def table_of(model: type[Base]) -> sa.Table:
    """Return the Core ``Table`` of a mapped class (statements on it skip the ORM layer)."""
    return cast(sa.Table, model.__table__)


def insert_rows(session: Session, model: type[Base], rows: Sequence[dict[str, Any]]) -> None:
    """Insert ``rows`` into ``model``'s table with one executemany; nothing when empty."""
    if rows:
        session.connection().execute(table_of(model).insert(), list(rows))


def insert_ignoring_duplicates(
    session: Session, model: type[Base], rows: Sequence[dict[str, Any]]
) -> None:
    """Insert ``rows``, skipping any that would break a unique constraint.

    ``INSERT … ON CONFLICT DO NOTHING`` (PostgreSQL ≥ 9.5, SQLite ≥ 3.24):
    a get-or-create in one statement, safe against concurrent writers.
    """
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    session.connection().execute(insert(table_of(model)).on_conflict_do_nothing(), list(rows))
