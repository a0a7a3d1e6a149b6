"""Sync-log repository: append rows and list them (the product's "why" trail, STYLE.md §11).

Edge module: sync queries on a caller's ``Session``; never commits.
The log is append-only: rows are never updated or deleted here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Session

from ingest.types import LogEntry, MailboxId, MessageId, MessagePk, Outcome, Source, SubaccountId
from storage.models import SyncLogEntry
from storage.repos.inserts import RowBuffer, insert_or_hold

DEFAULT_LIST_LIMIT = 1000
"""Most rows ``list_sync_log`` returns unless told otherwise."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncLogRow:
    """One sync-log row as shown by ``mailgate log``.

    Attributes:
        id: row key (increasing in write order).
        at: aware UTC time of the decision.
        mailbox_id, subaccount_id, message_pk: what it concerns, each or None.
        message_id: the message's Message-ID, or None.
        source: door it came in by.
        rule, reason: rule id from BEHAVIOUR.md (or ``quarantine``) and why.
        outcome: what happened.
        raw_sha256: blob of the raw bytes when no message row holds them.
    """

    id: int
    at: datetime
    mailbox_id: MailboxId | None
    subaccount_id: SubaccountId | None
    message_pk: MessagePk | None
    message_id: MessageId | None
    source: Source
    rule: str
    reason: str
    outcome: Outcome
    raw_sha256: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class LogContext:
    """What every log row of one message shares."""

    at: datetime
    source: Source
    mailbox_id: int | None = None
    message_pk: int | None = None
    message_id: str | None = None
    raw_sha256: str | None = None


def add_log_rows(
    session: Session,
    context: LogContext,
    entries: tuple[LogEntry, ...],
    held: RowBuffer | None = None,
) -> None:
    """Insert one sync-log row per entry, in order (one executemany; nothing when empty).

    With ``held``, the rows are held there for its ``flush`` instead.
    """
    insert_or_hold(
        session,
        SyncLogEntry,
        [
            {
                "at": context.at,
                "mailbox_id": context.mailbox_id,
                "subaccount_id": entry.subaccount_id,
                "message_pk": context.message_pk,
                "message_id": context.message_id,
                "source": context.source,
                "rule": entry.rule,
                "reason": entry.reason,
                "outcome": entry.outcome,
                "raw_sha256": context.raw_sha256,
            }
            for entry in entries
        ],
        held,
    )


def list_sync_log(
    session: Session,
    mailbox_id: int | None = None,
    since: datetime | None = None,
    limit: int = DEFAULT_LIST_LIMIT,
) -> list[SyncLogRow]:
    """Return the newest ``limit`` rows, newest last.

    Args:
        mailbox_id: only rows of this mailbox, or all when None.
        since: only rows with ``at >= since`` (aware), or all when None.
        limit: at most this many rows (≥ 1).
    """
    query = sa.select(SyncLogEntry)
    if mailbox_id is not None:
        query = query.where(SyncLogEntry.mailbox_id == mailbox_id)
    if since is not None:
        query = query.where(SyncLogEntry.at >= since)
    rows = list(session.scalars(query.order_by(SyncLogEntry.id.desc()).limit(limit)))
    rows.reverse()
    return [_row(r) for r in rows]


def _row(r: SyncLogEntry) -> SyncLogRow:
    return SyncLogRow(
        id=r.id,
        at=r.at,
        mailbox_id=MailboxId(r.mailbox_id) if r.mailbox_id is not None else None,
        subaccount_id=SubaccountId(r.subaccount_id) if r.subaccount_id is not None else None,
        message_pk=MessagePk(r.message_pk) if r.message_pk is not None else None,
        message_id=MessageId(r.message_id) if r.message_id is not None else None,
        source=r.source,
        rule=r.rule,
        reason=r.reason,
        outcome=r.outcome,
        raw_sha256=r.raw_sha256,
    )
