"""Tables of stored mail: synced threads, messages and what hangs off a message.

Edge module: table definitions only, no queries (those live in repos/).
Raw bytes and attachment payloads are not here: they live in the blob
store under their SHA-256 (``raw_sha256``, ``attachments.sha256``).
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from ingest.types import Direction, InstanceState, ParticipantRole, Source, ThreadOrigin
from storage.models.base import Base, str_enum, utcnow
from storage.models.enums import MessageIdKind

MESSAGE_FK = "messages.id"


class SyncedThread(Base):
    """A thread the gateway mirrors (BEHAVIOUR.md "synced thread").

    ``x_gm_thrid`` is Gmail's thread id when the thread was seen over
    X-GM-EXT-1. When a late parent links two threads (R11) one is folded into
    the other and the folded row is deleted.
    """

    __tablename__ = "synced_threads"

    id: Mapped[int] = mapped_column(primary_key=True)
    origin: Mapped[ThreadOrigin] = mapped_column(str_enum(ThreadOrigin))
    x_gm_thrid: Mapped[int | None] = mapped_column(sa.BigInteger, index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ThreadInstance(Base):
    """A synced thread's presence in one sub-account (R4).

    Invariants: one per (thread, sub-account); a ``broken`` instance keeps
    its messages and receives nothing more of the thread; ``claimed_at`` is
    set on the instance whose sub-account first replied from the CRM.
    """

    __tablename__ = "thread_instances"
    __table_args__ = (sa.UniqueConstraint("thread_id", "subaccount_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    thread_id: Mapped[int] = mapped_column(sa.ForeignKey("synced_threads.id", ondelete="CASCADE"))
    subaccount_id: Mapped[int] = mapped_column(
        sa.ForeignKey("subaccounts.id", ondelete="CASCADE"), index=True
    )
    state: Mapped[InstanceState] = mapped_column(str_enum(InstanceState))
    claimed_at: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Message(Base):
    """One stored message (R9, R12: stored once, linked to many conversations).

    Invariants: ``identity_key`` is unique (R12), so a second copy can only
    be a sync-log ``duplicate`` row; ``raw_sha256`` names the exact received
    bytes in the blob store; every message belongs to one synced thread.
    """

    __tablename__ = "messages"

    id: Mapped[int] = mapped_column(primary_key=True)
    identity_key: Mapped[str] = mapped_column(sa.Text, unique=True)
    message_id: Mapped[str | None] = mapped_column(sa.Text, index=True)
    header_digest: Mapped[str] = mapped_column(sa.String(64))
    thread_id: Mapped[int] = mapped_column(sa.ForeignKey("synced_threads.id"), index=True)
    direction: Mapped[Direction] = mapped_column(str_enum(Direction))
    source: Mapped[Source] = mapped_column(str_enum(Source))
    subject: Mapped[str] = mapped_column(sa.Text)
    date_at: Mapped[datetime | None] = mapped_column()
    raw_sha256: Mapped[str] = mapped_column(sa.String(64), index=True)
    size_bytes: Mapped[int] = mapped_column()
    raw_message_id: Mapped[str | None] = mapped_column(sa.Text)
    raw_in_reply_to: Mapped[str | None] = mapped_column(sa.Text)
    raw_references: Mapped[str | None] = mapped_column(sa.Text)
    text_body: Mapped[str | None] = mapped_column(sa.Text)
    html_body: Mapped[str | None] = mapped_column(sa.Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class KnownMessageId(Base):
    """Every Message-ID a stored message is known by (R11: own and provider-given)."""

    __tablename__ = "message_ids"

    id: Mapped[int] = mapped_column(primary_key=True)
    message_pk: Mapped[int] = mapped_column(
        sa.ForeignKey(MESSAGE_FK, ondelete="CASCADE"), index=True
    )
    message_id: Mapped[str] = mapped_column(sa.Text, index=True)
    kind: Mapped[MessageIdKind] = mapped_column(str_enum(MessageIdKind))


class MessageReference(Base):
    """A Message-ID a stored message cites (R11), kept to link a late parent.

    ``position`` is the index in ``ThreadLinks.ancestors`` (oldest first; the
    direct parent is the highest position).
    """

    __tablename__ = "message_references"

    id: Mapped[int] = mapped_column(primary_key=True)
    message_pk: Mapped[int] = mapped_column(
        sa.ForeignKey(MESSAGE_FK, ondelete="CASCADE"), index=True
    )
    referenced_message_id: Mapped[str] = mapped_column(sa.Text, index=True)
    position: Mapped[int] = mapped_column()


class MessageParticipant(Base):
    """One address of a stored message with its header role (R8), header order."""

    __tablename__ = "participants"

    id: Mapped[int] = mapped_column(primary_key=True)
    message_pk: Mapped[int] = mapped_column(
        sa.ForeignKey(MESSAGE_FK, ondelete="CASCADE"), index=True
    )
    role: Mapped[ParticipantRole] = mapped_column(str_enum(ParticipantRole))
    position: Mapped[int] = mapped_column()
    display_name: Mapped[str] = mapped_column(sa.Text)
    addr_spec: Mapped[str] = mapped_column(sa.String(320))
    address_key: Mapped[str] = mapped_column(sa.String(320), index=True)


class MessageAttachment(Base):
    """An attachment or inline part of a stored message; bytes in the blob store."""

    __tablename__ = "attachments"

    id: Mapped[int] = mapped_column(primary_key=True)
    message_pk: Mapped[int] = mapped_column(
        sa.ForeignKey(MESSAGE_FK, ondelete="CASCADE"), index=True
    )
    position: Mapped[int] = mapped_column()
    filename: Mapped[str | None] = mapped_column(sa.Text)
    content_type: Mapped[str] = mapped_column(sa.String(255))
    disposition: Mapped[str] = mapped_column(sa.String(32))
    content_id: Mapped[str | None] = mapped_column(sa.Text)
    size_bytes: Mapped[int] = mapped_column()
    sha256: Mapped[str] = mapped_column(sa.String(64), index=True)


class ConversationMessage(Base):
    """Link of a stored message into a conversation (R9). One per pair."""

    __tablename__ = "conversation_messages"
    __table_args__ = (sa.UniqueConstraint("conversation_id", "message_pk"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    conversation_id: Mapped[int] = mapped_column(
        sa.ForeignKey("conversations.id", ondelete="CASCADE")
    )
    message_pk: Mapped[int] = mapped_column(
        sa.ForeignKey(MESSAGE_FK, ondelete="CASCADE"), index=True
    )
    rule: Mapped[str] = mapped_column(sa.String(32))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
