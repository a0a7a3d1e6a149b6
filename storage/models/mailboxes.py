"""Tables of connected mailboxes, IMAP sync state, CRM sends and webhook deliveries.

Edge module: table definitions only, no queries (those live in repos/).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from ingest.types import MailboxState, Provider
from storage.models.base import Base, str_enum, utcnow
from storage.models.enums import OutboundKind, OutboundState, WebhookState


class Mailbox(Base):
    """A user's connected email account in one sub-account (R19-R22).

    Invariants: ``credentials_ciphertext`` is encrypted with
    ``security.token_key`` and never clear text (Never list); it is None
    once disconnected (R21). ``address_key`` is the comparison form of
    ``address``, used for R7 and R15 lookups.
    """

    __tablename__ = "mailboxes"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id", ondelete="CASCADE"), index=True)
    subaccount_id: Mapped[int] = mapped_column(
        sa.ForeignKey("subaccounts.id", ondelete="CASCADE"), index=True
    )
    provider: Mapped[Provider] = mapped_column(str_enum(Provider))
    address: Mapped[str] = mapped_column(sa.String(320))
    address_key: Mapped[str] = mapped_column(sa.String(320), index=True)
    state: Mapped[MailboxState] = mapped_column(str_enum(MailboxState))
    credentials_ciphertext: Mapped[bytes | None] = mapped_column(sa.LargeBinary)
    connected_at: Mapped[datetime | None] = mapped_column()
    disconnected_at: Mapped[datetime | None] = mapped_column()
    last_sync_at: Mapped[datetime | None] = mapped_column()
    last_error: Mapped[str | None] = mapped_column(sa.Text)
    # Migration 0005 (issue 4 item 6): commit time − INTERNALDATE of the newest
    # message the last IMAP batch stored, 0 after a catch-up that found nothing
    # new; NULL until a message was synced (docs/imap.md "Sync lag").
    sync_lag_seconds: Mapped[float | None] = mapped_column(sa.Float)
    # Migration 0002 (issue 3): when the stored access token expires (None for
    # passwords); generic IMAP/SMTP server settings (hosts, ports, security,
    # username; never the password); the mailbox that replaced this one (R20).
    token_expires_at: Mapped[datetime | None] = mapped_column()
    server_settings: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)
    replaced_by_mailbox_id: Mapped[int | None] = mapped_column(
        sa.ForeignKey("mailboxes.id", ondelete="SET NULL")
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class FolderState(Base):
    """IMAP sync checkpoint of one (mailbox, folder) (RFC 9051 §2.3.1.1).

    Invariant: every UID ≤ ``checkpoint_uid`` in (folder, uidvalidity) is
    durably stored (or durably logged as skipped/quarantined); the
    checkpoint only moves in the same transaction as those rows, and is
    reset when the server reports a different UIDVALIDITY.
    """

    __tablename__ = "folder_states"
    __table_args__ = (sa.UniqueConstraint("mailbox_id", "folder"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    mailbox_id: Mapped[int] = mapped_column(sa.ForeignKey("mailboxes.id", ondelete="CASCADE"))
    folder: Mapped[str] = mapped_column(sa.String(1000))
    folder_role: Mapped[str] = mapped_column(sa.String(32))
    uidvalidity: Mapped[int | None] = mapped_column(sa.BigInteger)
    checkpoint_uid: Mapped[int | None] = mapped_column(sa.BigInteger)
    highestmodseq: Mapped[int | None] = mapped_column(sa.BigInteger)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class MessageLocation(Base):
    """Where a stored message was seen over IMAP (R12: many locations, one message)."""

    __tablename__ = "message_locations"
    __table_args__ = (sa.UniqueConstraint("mailbox_id", "folder", "uidvalidity", "uid"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    message_pk: Mapped[int] = mapped_column(
        sa.ForeignKey("messages.id", ondelete="CASCADE"), index=True
    )
    mailbox_id: Mapped[int] = mapped_column(sa.ForeignKey("mailboxes.id", ondelete="CASCADE"))
    folder: Mapped[str] = mapped_column(sa.String(1000))
    uidvalidity: Mapped[int] = mapped_column(sa.BigInteger)
    uid: Mapped[int] = mapped_column(sa.BigInteger)


class OutboundMessage(Base):
    """A send requested by the CRM (R1, R16, R17).

    Invariants: a refused or failed send stays as ``failed`` with
    ``last_error`` (never lost, R17); ``idempotency_key`` (when given) is
    unique, so a repeated API call does not send twice.
    """

    __tablename__ = "outbound_messages"
    __table_args__ = (
        sa.Index("ix_outbound_messages_state_next_attempt_at", "state", "next_attempt_at"),
        sa.Index("ix_outbound_messages_mailbox_id_sent_at", "mailbox_id", "sent_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id", ondelete="CASCADE"), index=True)
    subaccount_id: Mapped[int] = mapped_column(
        sa.ForeignKey("subaccounts.id", ondelete="CASCADE"), index=True
    )
    mailbox_id: Mapped[int | None] = mapped_column(
        sa.ForeignKey("mailboxes.id", ondelete="SET NULL"), index=True
    )
    kind: Mapped[OutboundKind] = mapped_column(str_enum(OutboundKind))
    state: Mapped[OutboundState] = mapped_column(str_enum(OutboundState))
    idempotency_key: Mapped[str | None] = mapped_column(sa.String(200), unique=True)
    message_id: Mapped[str] = mapped_column(sa.Text, index=True)
    provider_message_id: Mapped[str | None] = mapped_column(sa.Text)
    recipients: Mapped[list[Any]] = mapped_column(sa.JSON)
    subject: Mapped[str] = mapped_column(sa.Text)
    raw_sha256: Mapped[str | None] = mapped_column(sa.String(64))
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column()
    last_error: Mapped[str | None] = mapped_column(sa.Text)
    # Migration 0004 (issue 5, docs/sending.md): the contact written to; how it
    # left (``mailbox`` or ``relay``); the R17/R16 error code; the server's last
    # reply; when the quota resets; when it was accepted (R17 rolling 24 h);
    # the message row stored in the conversation (R1).
    contact_id: Mapped[int | None] = mapped_column(
        sa.ForeignKey("contacts.id", ondelete="SET NULL")
    )
    route: Mapped[str | None] = mapped_column(sa.String(32))
    error_code: Mapped[str | None] = mapped_column(sa.String(64))
    last_reply: Mapped[str | None] = mapped_column(sa.Text)
    resets_at: Mapped[datetime | None] = mapped_column()
    sent_at: Mapped[datetime | None] = mapped_column()
    message_pk: Mapped[int | None] = mapped_column(
        sa.ForeignKey("messages.id", ondelete="SET NULL")
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class WebhookDelivery(Base):
    """One webhook event to one URL, retried with backoff until delivered or failed."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        sa.Index("ix_webhook_deliveries_state_next_attempt_at", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    event: Mapped[str] = mapped_column(sa.String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    url: Mapped[str] = mapped_column(sa.Text)
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime] = mapped_column()
    state: Mapped[WebhookState] = mapped_column(str_enum(WebhookState))
    last_error: Mapped[str | None] = mapped_column(sa.Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
