"""RowBuffer on SQLite and PostgreSQL: keys handed out ahead of their rows, parents first.

A group-commit batch holds its new threads and messages and inserts them
with one statement per table (``storage.repos.inserts``); these tests pin
what that relies on: allocated keys never collide with rows inserted the
ordinary way before or after, a held child may name a held parent whatever
order they were added in, and the rows of a flush go to the database as one
statement per table, however many there are.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import Session

from ingest.types import Direction, Source, ThreadOrigin
from storage.db import Database
from storage.models import Message, MessageParticipant, SyncedThread
from storage.repos.inserts import RowBuffer, table_of

_THREAD = table_of(SyncedThread)
_INSERT_THREAD = _THREAD.insert().returning(_THREAD.c.id)


def _thread_row(key: int | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {"origin": ThreadOrigin.CRM, "x_gm_thrid": None}
    return row if key is None else {"id": key, **row}


def _message_row(key: int, thread_id: int) -> dict[str, Any]:
    return {
        "id": key,
        "identity_key": f"identity-{key}",
        "message_id": f"<m{key}@example.test>",
        "header_digest": "0" * 64,
        "thread_id": thread_id,
        "direction": Direction.INBOUND,
        "source": Source.BCC,
        "subject": f"message {key}",
        "date_at": None,
        "raw_sha256": "1" * 64,
        "size_bytes": 100,
        "raw_message_id": None,
        "raw_in_reply_to": None,
        "raw_references": None,
        "text_body": "body",
        "html_body": None,
    }


def _insert_thread(session: Session) -> int:
    return int(session.connection().execute(_INSERT_THREAD, _thread_row()).scalar_one())


async def test_allocated_keys_never_collide_with_rows_inserted_before_or_after(
    db: Database,
) -> None:
    before = await db.run(_insert_thread)

    def batch(session: Session) -> list[int]:
        held = RowBuffer()
        keys = [held.allocate(session, SyncedThread) for _ in range(70)]  # > one PG block
        held.add(SyncedThread, [_thread_row(k) for k in keys])
        held.flush(session)
        return keys

    keys = await db.run(batch)
    after = await db.run(_insert_thread)
    assert len(set(keys)) == 70
    assert min(keys) > before
    assert after > max(keys)

    def stored(session: Session) -> set[int]:
        return set(session.scalars(sa.select(SyncedThread.id)))

    assert await db.run(stored) == {before, *keys, after}


async def test_a_second_batch_gets_keys_past_the_first(db: Database) -> None:
    def batch(session: Session) -> list[int]:
        held = RowBuffer()
        keys = [held.allocate(session, SyncedThread) for _ in range(3)]
        held.add(SyncedThread, [_thread_row(k) for k in keys])
        held.flush(session)
        return keys

    first = await db.run(batch)
    second = await db.run(batch)
    assert min(second) > max(first)


async def test_flush_inserts_a_held_parent_before_its_held_children(db: Database) -> None:
    """Foreign keys are on (SQLite ``PRAGMA foreign_keys``): the order must be parents first."""

    def batch(session: Session) -> tuple[int, int]:
        held = RowBuffer()
        # A reply to an existing thread first (messages before any held thread) …
        existing = _insert_thread(session)
        held.add(Message, [_message_row(held.allocate(session, Message), existing)])
        # … then a message starting a new thread: its thread row is added after it.
        thread_key = held.allocate(session, SyncedThread)
        message_key = held.allocate(session, Message)
        held.add(Message, [_message_row(message_key, thread_key)])
        held.add(
            MessageParticipant,
            [
                {
                    "message_pk": message_key,
                    "role": "from",
                    "position": 0,
                    "display_name": "",
                    "addr_spec": "a@example.test",
                    "address_key": "a@example.test",
                }
            ],
        )
        held.add(SyncedThread, [_thread_row(thread_key)])
        held.flush(session)
        return thread_key, message_key

    thread_key, message_key = await db.run(batch)

    def read(session: Session) -> tuple[int | None, int]:
        thread = session.scalar(sa.select(Message.thread_id).where(Message.id == message_key))
        people = session.scalar(
            sa.select(sa.func.count()).where(MessageParticipant.message_pk == message_key)
        )
        return thread, int(people or 0)

    assert await db.run(read) == (thread_key, 1)


async def test_a_flush_sends_one_statement_per_table_however_many_rows(db: Database) -> None:
    """The point of holding rows: 40 new threads and messages cost as many INSERTs as 2."""

    def batch(session: Session, size: int) -> tuple[int, int]:
        held = RowBuffer()
        for _ in range(size):
            thread = held.allocate(session, SyncedThread)
            held.add(SyncedThread, [_thread_row(thread)])
            held.add(Message, [_message_row(held.allocate(session, Message), thread)])
        inserts: list[str] = []

        def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if statement.lstrip().upper().startswith("INSERT"):
                inserts.append(statement)

        connection = session.connection()
        event.listen(connection, "before_cursor_execute", count)
        try:
            held.flush(session)
        finally:
            event.remove(connection, "before_cursor_execute", count)
        # Rows per statement: on SQLite ONE multi-row INSERT ("insertmanyvalues",
        # storage.db), not an executemany that steps (and hands back the GIL) per row.
        rows = [s.count("), (") + 1 if db.dialect_name == "sqlite" else size for s in inserts]
        return len(inserts), min(rows)

    assert await db.run(batch, 2) == (2, 2)
    assert await db.run(batch, 40) == (2, 40)

    def stored(session: Session) -> int:
        return int(session.scalar(sa.select(sa.func.count()).select_from(Message)) or 0)

    assert await db.run(stored) == 42
