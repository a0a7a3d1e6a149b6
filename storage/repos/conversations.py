"""Conversation view: a contact's timeline as shown by ``mailgate conversation show``.

Edge module: read-only queries on a caller's ``Session``;
returns frozen dataclasses (models never leave storage, STYLE.md §5).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Session

from ingest.normalise import address_key
from ingest.types import (
    ContactId,
    Direction,
    MessageId,
    MessagePk,
    ParticipantRole,
    Source,
    ThreadId,
)
from storage.errors import NotFound
from storage.models import (
    Contact,
    Conversation,
    ConversationMessage,
    Message,
    MessageAttachment,
    MessageParticipant,
    User,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class AddressView:
    """One participant: display name ("" if none) and addr-spec."""

    name: str
    address: str


@dataclass(frozen=True, slots=True, kw_only=True)
class AttachmentView:
    """One attachment: decoded file name (or None), type, size in bytes, blob key."""

    name: str | None
    content_type: str
    size_bytes: int
    sha256: str


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageView:
    """One message of a conversation; address tuples in header order (R8)."""

    id: MessagePk
    direction: Direction
    source: Source
    date: datetime | None
    from_: tuple[AddressView, ...]
    to: tuple[AddressView, ...]
    cc: tuple[AddressView, ...]
    bcc: tuple[AddressView, ...]
    subject: str
    message_id: MessageId | None
    thread_id: ThreadId
    attachments: tuple[AttachmentView, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class ContactView:
    """The conversation's contact; ``assigned_user_email`` None when unassigned."""

    id: ContactId
    email: str
    name: str | None
    assigned_user_email: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class ConversationView:
    """A contact and its messages, oldest first (header Date, else stored time; then id)."""

    contact: ContactView
    messages: tuple[MessageView, ...]


def conversation_view(session: Session, subaccount_id: int, contact_email: str) -> ConversationView:
    """Return the conversation of the contact with ``contact_email`` in a sub-account.

    When several contacts share the address (imported duplicates), the R10
    choice is shown: an assigned contact before an unassigned one, then the
    most recently updated, then the highest id. Each message appears once
    (R9), however many rules linked it.

    Raises:
        NotFound: no contact with that address in the sub-account.
    """
    row = (
        session.execute(
            sa.select(Contact, User.email)
            .outerjoin(User, User.id == Contact.assigned_user_id)
            .where(
                Contact.subaccount_id == subaccount_id,
                Contact.address_key == address_key(contact_email.strip()),
            )
            .order_by(
                Contact.assigned_user_id.is_(None), Contact.updated_at.desc(), Contact.id.desc()
            )
            .limit(1)
        )
    ).first()
    if row is None:
        raise NotFound(f"no contact {contact_email!r} in sub-account {subaccount_id}")
    contact, assigned_email = row
    view = ContactView(
        id=ContactId(contact.id),
        email=contact.email,
        name=contact.name,
        assigned_user_email=assigned_email,
    )
    return ConversationView(contact=view, messages=_messages(session, contact.id))


def _messages(session: Session, contact_id: int) -> tuple[MessageView, ...]:
    messages = list(
        session.scalars(
            sa.select(Message)
            .join(ConversationMessage, ConversationMessage.message_pk == Message.id)
            .join(Conversation, Conversation.id == ConversationMessage.conversation_id)
            .where(Conversation.contact_id == contact_id)
            .distinct()
        )
    )
    messages.sort(key=lambda m: (m.date_at or m.created_at, m.id))
    pks = [m.id for m in messages]
    addresses = _addresses(session, pks)
    attachments = _attachments(session, pks)
    return tuple(
        MessageView(
            id=MessagePk(m.id),
            direction=m.direction,
            source=m.source,
            date=m.date_at,
            from_=addresses[m.id, ParticipantRole.FROM],
            to=addresses[m.id, ParticipantRole.TO],
            cc=addresses[m.id, ParticipantRole.CC],
            bcc=addresses[m.id, ParticipantRole.BCC],
            subject=m.subject,
            message_id=MessageId(m.message_id) if m.message_id else None,
            thread_id=ThreadId(m.thread_id),
            attachments=attachments[m.id],
        )
        for m in messages
    )


def _addresses(
    session: Session, pks: list[int]
) -> defaultdict[tuple[int, ParticipantRole], tuple[AddressView, ...]]:
    out: defaultdict[tuple[int, ParticipantRole], tuple[AddressView, ...]] = defaultdict(tuple)
    if not pks:
        return out
    rows = session.scalars(
        sa.select(MessageParticipant)
        .where(MessageParticipant.message_pk.in_(pks))
        .order_by(
            MessageParticipant.message_pk, MessageParticipant.role, MessageParticipant.position
        )
    )
    for p in rows:
        key = (p.message_pk, p.role)
        out[key] = (*out[key], AddressView(name=p.display_name, address=p.addr_spec))
    return out


def _attachments(session: Session, pks: list[int]) -> defaultdict[int, tuple[AttachmentView, ...]]:
    out: defaultdict[int, tuple[AttachmentView, ...]] = defaultdict(tuple)
    if not pks:
        return out
    rows = session.scalars(
        sa.select(MessageAttachment)
        .where(MessageAttachment.message_pk.in_(pks))
        .order_by(MessageAttachment.message_pk, MessageAttachment.position)
    )
    for a in rows:
        view = AttachmentView(
            name=a.filename, content_type=a.content_type, size_bytes=a.size_bytes, sha256=a.sha256
        )
        out[a.message_pk] = (*out[a.message_pk], view)
    return out
