"""What a CRM send reads outside the outbound queue: its contact, its parent, its user.

Sync queries over a ``Session`` for composing and routing a send (R10
contact choice, R11 reply headers, R12 identity of the conversation copy);
they only read and never commit. The queue's own rows are
``storage.repos.outbound``'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.orm import Session

from ingest.normalise import address_key
from ingest.types import MessageId
from storage.errors import NotFound
from storage.models import Contact, KnownMessageId, Message, MessageReference, User


def find_contact(session: Session, subaccount_id: int, email: str) -> int | None:
    """Return the contact of ``email`` in the sub-account (R10: assigned, then newest), or None."""
    return session.scalar(
        sa.select(Contact.id)
        .where(Contact.subaccount_id == subaccount_id, Contact.address_key == address_key(email))
        .order_by(Contact.assigned_user_id.is_(None), Contact.updated_at.desc(), Contact.id.desc())
        .limit(1)
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class ParentMessage:
    """A stored message a CRM send replies to (R11).

    Attributes:
        references: the ids it cites, oldest first (``message_references``).
    """

    message_pk: int
    message_id: MessageId
    thread_id: int
    references: tuple[MessageId, ...]
    raw_sha256: str


def find_parent(session: Session, message_id: MessageId) -> ParentMessage | None:
    """Return the stored message known by ``message_id`` (own or provider id), or None."""
    row = session.execute(
        sa.select(Message.id, Message.message_id, Message.thread_id, Message.raw_sha256)
        .join(KnownMessageId, KnownMessageId.message_pk == Message.id)
        .where(KnownMessageId.message_id == message_id)
        .order_by(Message.id)
        .limit(1)
    ).first()
    if row is None:
        return None
    refs = session.scalars(
        sa.select(MessageReference.referenced_message_id)
        .where(MessageReference.message_pk == row.id)
        .order_by(MessageReference.position)
    )
    return ParentMessage(
        message_pk=row.id,
        message_id=MessageId(row.message_id or message_id),
        thread_id=row.thread_id,
        references=tuple(MessageId(r) for r in refs),
        raw_sha256=row.raw_sha256,
    )


def message_by_identity(session: Session, identity_key: str) -> int | None:
    """Return the pk of the stored message with ``identity_key`` (R12), or None."""
    return session.scalar(sa.select(Message.id).where(Message.identity_key == identity_key))


def user_name_and_email(session: Session, user_id: int) -> tuple[str, str]:
    """Return ``(name, email)`` of a user (raises ``NotFound``)."""
    row = session.get(User, user_id)
    if row is None:
        raise NotFound(f"user {user_id} not found")
    return row.name, row.email
