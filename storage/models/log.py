"""Tables of the sync log and the quarantine (STYLE.md §7, §11).

Edge module: table definitions only, no queries (those live in repos/).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from ingest.types import Outcome, Source
from storage.models.base import Base, str_enum, utcnow


class QuarantineEntry(Base):
    """A message that crashed the pipeline (BEHAVIOUR.md "Never" list).

    Invariant: the raw bytes are in the blob store under ``raw_sha256``
    before the row commits, so a quarantined message is never lost.
    ``provenance`` is the JSON form of the SMTP envelope or IMAP origin.
    """

    __tablename__ = "quarantine"

    id: Mapped[int] = mapped_column(primary_key=True)
    raw_sha256: Mapped[str] = mapped_column(sa.String(64), index=True)
    size_bytes: Mapped[int] = mapped_column()
    provenance: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    reason: Mapped[str] = mapped_column(sa.Text)
    traceback: Mapped[str] = mapped_column(sa.Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class SyncLogEntry(Base):
    """One sync-log row: what became of a message at one target, with rule and reason.

    Append-only. ``raw_sha256`` names the raw bytes in the blob store when
    the message was not stored as a row (skipped, refused after DATA, or
    quarantined), so nothing received is lost.
    """

    __tablename__ = "sync_log"
    __table_args__ = (sa.Index("ix_sync_log_mailbox_id_at", "mailbox_id", "at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(index=True)
    mailbox_id: Mapped[int | None] = mapped_column(
        sa.ForeignKey("mailboxes.id", ondelete="SET NULL")
    )
    subaccount_id: Mapped[int | None] = mapped_column(
        sa.ForeignKey("subaccounts.id", ondelete="SET NULL")
    )
    message_pk: Mapped[int | None] = mapped_column(
        sa.ForeignKey("messages.id", ondelete="SET NULL"), index=True
    )
    message_id: Mapped[str | None] = mapped_column(sa.Text)
    source: Mapped[Source] = mapped_column(str_enum(Source))
    rule: Mapped[str] = mapped_column(sa.String(32))
    reason: Mapped[str] = mapped_column(sa.Text)
    outcome: Mapped[Outcome] = mapped_column(str_enum(Outcome))
    raw_sha256: Mapped[str | None] = mapped_column(sa.String(64))
