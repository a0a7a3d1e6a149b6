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


class RowBuffer:
    """Rows held back and inserted later with one executemany per table (a batch's rows).

    For rows nothing in the same transaction reads before ``flush`` (a
    message's participants, attachments, sync-log rows, thread instances
    when every reader flushes first…): a group-commit
    batch adds them per message and flushes once, so a table costs one
    statement per batch instead of one per message. Tables are flushed in
    the order they were first added to; every row's parents must already be
    inserted (foreign keys are checked per statement).
    """

    def __init__(self) -> None:
        self._rows: dict[tuple[type[Base], bool], list[dict[str, Any]]] = {}
        self.conversation_ids: dict[int, int] = {}
        """contact id -> conversation id, as found or created in this transaction
        (conversations are never deleted while it runs)."""

    def add(
        self, model: type[Base], rows: Sequence[dict[str, Any]], *, ignore_duplicates: bool = False
    ) -> None:
        """Hold ``rows`` for ``model``'s table until ``flush``.

        With ``ignore_duplicates`` they are inserted by ``insert_ignoring_duplicates``.
        """
        if rows:
            self._rows.setdefault((model, ignore_duplicates), []).extend(rows)

    def flush(self, session: Session) -> None:
        """Insert every held row (one executemany per table), then forget them."""
        held, self._rows = self._rows, {}
        for (model, ignore_duplicates), rows in held.items():
            if ignore_duplicates:
                insert_ignoring_duplicates(session, model, rows)
            else:
                insert_rows(session, model, rows)


def insert_or_hold(
    session: Session, model: type[Base], rows: Sequence[dict[str, Any]], held: RowBuffer | None
) -> None:
    """Insert ``rows`` now, or hold them in ``held`` for its ``flush`` when one is given."""
    if held is None:
        insert_rows(session, model, rows)
    else:
        held.add(model, rows)
