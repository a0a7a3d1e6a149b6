"""Insert helpers shared by the repositories: many rows in one statement, or ignore a duplicate.

Edge module: runs Core ``INSERT`` statements on the caller's ``Session``'s
connection (no ORM unit of work, no autoflush: flush pending ORM objects
first if a row refers to them); never commits. Rows are dicts keyed by
column name; Python-side column defaults (``created_at``) apply as usual.

``RowBuffer`` also hands out primary keys ahead of their rows
(``allocate``), so that a group-commit batch inserts its threads and
messages with one executemany each instead of one ``INSERT … RETURNING``
per message: those two statements were half of the database thread's time
under bench/bench_smtp.py (py-spy), each paying SQLAlchemy's per-statement
overhead and a GIL hand-over. Keys come from the table's own source:
``max(id) + 1`` on SQLite (every writing transaction there starts with
``BEGIN IMMEDIATE``, so no other writer can take the same key, and an
``INTEGER PRIMARY KEY`` picks ``max + 1`` itself), the column's sequence on
PostgreSQL (``nextval`` for a block at a time; unused values are gaps, as
after any rollback).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from storage.models import Base

PG_KEY_BLOCK = 64
"""Keys taken from a PostgreSQL sequence per ``nextval`` round trip (a batch's messages)."""

_TABLE_ORDER = {table.name: i for i, table in enumerate(Base.metadata.sorted_tables)}
"""Tables in foreign-key order (parents first): the order ``RowBuffer.flush`` inserts in."""


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
    foreign-key order (parents first), so a held row may name a held parent
    (a held message its held thread); any other parent must already be
    inserted (foreign keys are checked per statement).
    """

    def __init__(self) -> None:
        self._rows: dict[tuple[type[Base], bool], list[dict[str, Any]]] = {}
        self._keys: dict[str, Iterator[int]] = {}  # table -> the keys this transaction owns
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

    def allocate(self, session: Session, model: type[Base]) -> int:
        """Return a new primary key for a row of ``model`` (an integer ``id``) to hold.

        Valid only in this buffer's transaction, for rows inserted through
        this buffer (see module docstring); the transaction must write
        (SQLite: ``BEGIN IMMEDIATE``).
        """
        table = table_of(model)
        key = next(self._keys.get(table.name, iter(())), None)
        if key is None:
            self._keys[table.name] = keys = _take_keys(session, table)
            key = next(keys)
        return key

    def flush(self, session: Session) -> None:
        """Insert every held row (one executemany per table, parents first), then forget them."""
        held, self._rows = self._rows, {}
        order = sorted(held.items(), key=lambda item: _TABLE_ORDER[table_of(item[0][0]).name])
        for (model, ignore_duplicates), rows in order:
            if ignore_duplicates:
                insert_ignoring_duplicates(session, model, rows)
            else:
                insert_rows(session, model, rows)


def _take_keys(session: Session, table: sa.Table) -> Iterator[int]:
    """Keys this transaction may use for ``table``'s ``id``, ascending (never empty)."""
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        taken = connection.execute(
            sa.text(
                "SELECT nextval(pg_get_serial_sequence(:table, 'id'))"
                " FROM generate_series(1, :count)"
            ),
            {"table": table.name, "count": PG_KEY_BLOCK},
        ).scalars()
        return iter(sorted(int(key) for key in taken))
    highest = connection.execute(sa.select(sa.func.max(table.c.id))).scalar()
    return itertools.count(int(highest or 0) + 1)


def insert_or_hold(
    session: Session, model: type[Base], rows: Sequence[dict[str, Any]], held: RowBuffer | None
) -> None:
    """Insert ``rows`` now, or hold them in ``held`` for its ``flush`` when one is given."""
    if held is None:
        insert_rows(session, model, rows)
    else:
        held.add(model, rows)
