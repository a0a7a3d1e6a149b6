"""Message repository: apply a ``Decision`` (store once, link to conversations, log).

Edge module: async writes on a caller's ``AsyncSession`` plus blob-store
writes; never commits. The caller commits, and only then acknowledges
(SMTP 250 or the IMAP checkpoint: BEHAVIOUR.md "Never").

Races: two transactions storing the same message (same identity key, R12)
both pass ``load_facts``; the second fails with ``sqlalchemy.exc.IntegrityError``
on ``uq_messages_identity_key`` at flush or commit. The same holds for two
first messages creating one conversation or thread instance. The caller
rolls back and runs the pipeline again: the retry sees ``duplicate_of``.
Blobs written before the failure are harmless (content-addressed).
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import replace

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from ingest.types import (
    Address,
    ContactId,
    Decision,
    ImapOrigin,
    LogEntry,
    MessageId,
    MessagePk,
    NewContact,
    Outcome,
    Participant,
    ParticipantRole,
    Provenance,
    ThreadId,
)
from storage.blobs import BlobStore
from storage.models import (
    Contact,
    Conversation,
    ConversationMessage,
    KnownMessageId,
    Message,
    MessageAttachment,
    MessageIdKind,
    MessageLocation,
    MessageParticipant,
    MessageReference,
)
from storage.repos.conversations import ConversationView, conversation_view
from storage.repos.facts import load_facts
from storage.repos.sync_log import LogContext, add_log_rows
from storage.repos.threads import ensure_instances, resolve_thread

DUPLICATE_RULE = "R12"
"""Rule of the default log row for a duplicate without one in ``Decision.log``."""

__all__ = [
    "ConversationView",
    "add_provider_message_id",
    "apply_decision",
    "conversation_view",
    "load_facts",
]


async def apply_decision(
    session: AsyncSession, decision: Decision, blobs: BlobStore
) -> MessagePk | None:
    """Write what ``decision`` says, in the caller's transaction.

    - refusal (R15): only sync-log rows (one ``refused`` row at least); no blob.
    - duplicate (R12): sync-log rows against the stored copy, and its IMAP
      location; returns ``duplicate_of``.
    - stored (``decision.stores``): raw blob and attachment blobs, then the
      thread (started, joined, merged), message, ids, references,
      participants (+ ``extra_bcc`` as bcc, R14), attachments, new contacts
      (R14; an existing contact with that key is reused, R10), conversations,
      thread instances (R4), links (R9: one row, many links), log rows.
    - otherwise: the raw blob (nothing received is lost) and log rows that
      name it; returns None.

    Returns:
        The stored (or already stored) message's key, or None.

    Raises:
        sqlalchemy.exc.IntegrityError: a concurrent transaction stored the
            same identity first (see module docstring); transient.
        OSError: blob store failure; transient.
        ValueError: an inconsistent decision (a bug in ``decide``).
    """
    prepared = decision.prepared
    context = LogContext(
        at=decision.decided_at,
        source=decision.source,
        mailbox_id=_mailbox_id(prepared.raw.provenance),
        message_id=prepared.parsed.message_id,
    )
    if decision.refusal is not None:
        default = LogEntry(
            rule=decision.refusal.rule, reason=decision.refusal.reason, outcome=Outcome.REFUSED
        )
        add_log_rows(session, context, _with_default(decision.log, default))
        await session.flush()
        return None
    if decision.duplicate_of is not None:
        pk = decision.duplicate_of
        await _add_location(session, pk, prepared.raw.provenance)
        default = LogEntry(rule=DUPLICATE_RULE, reason="already stored", outcome=Outcome.DUPLICATE)
        context = replace(context, message_pk=pk)
        add_log_rows(session, context, _with_default(decision.log, default))
        await session.flush()
        return pk
    raw_sha256 = await asyncio.to_thread(blobs.put, prepared.raw.raw)
    if not decision.stores:
        add_log_rows(session, replace(context, raw_sha256=raw_sha256), decision.log)
        await session.flush()
        return None
    pk = await _store(session, decision, blobs, raw_sha256)
    add_log_rows(session, replace(context, message_pk=pk), decision.log)
    await session.flush()
    return pk


async def add_provider_message_id(
    session: AsyncSession, message_pk: MessagePk, message_id: MessageId
) -> None:
    """Record a Message-ID a provider gave a sent message (R11, Exchange rewrite).

    Replies citing either id then join the thread. Idempotent.
    """
    exists = await session.scalar(
        sa.select(KnownMessageId.id).where(
            KnownMessageId.message_pk == message_pk, KnownMessageId.message_id == message_id
        )
    )
    if exists is None:
        session.add(
            KnownMessageId(
                message_pk=message_pk, message_id=message_id, kind=MessageIdKind.PROVIDER
            )
        )
        await session.flush()


async def _store(
    session: AsyncSession, decision: Decision, blobs: BlobStore, raw_sha256: str
) -> MessagePk:
    prepared = decision.prepared
    parsed = prepared.parsed
    if decision.thread is None:
        raise ValueError("a decision that stores a message must name its thread")
    provenance = prepared.raw.provenance
    x_gm_thrid = provenance.x_gm_thrid if isinstance(provenance, ImapOrigin) else None
    thread_id = await resolve_thread(session, decision.thread, x_gm_thrid)
    attachment_shas = [await asyncio.to_thread(blobs.put, a.payload) for a in parsed.attachments]
    message = Message(
        identity_key=prepared.identity.key,
        message_id=parsed.message_id,
        header_digest=prepared.identity.header_digest,
        thread_id=thread_id,
        direction=decision.direction,
        source=decision.source,
        subject=parsed.subject,
        date_at=parsed.date_at,
        raw_sha256=raw_sha256,
        size_bytes=len(prepared.raw.raw),
        raw_message_id=parsed.raw_message_id,
        raw_in_reply_to=parsed.raw_in_reply_to,
        raw_references=parsed.raw_references,
        text_body=parsed.text_body,
        html_body=parsed.html_body,
    )
    session.add(message)
    await session.flush()
    pk = MessagePk(message.id)
    _add_children(session, decision, pk, attachment_shas)
    await _add_location(session, pk, provenance)
    await _link_conversations(session, decision, pk, thread_id)
    return pk


def _add_children(
    session: AsyncSession, decision: Decision, pk: MessagePk, attachment_shas: list[str]
) -> None:
    parsed = decision.prepared.parsed
    if parsed.message_id is not None:
        session.add(
            KnownMessageId(message_pk=pk, message_id=parsed.message_id, kind=MessageIdKind.OWN)
        )
    session.add_all(
        MessageReference(message_pk=pk, referenced_message_id=mid, position=i)
        for i, mid in enumerate(decision.prepared.links.ancestors)
    )
    session.add_all(participant_rows(pk, parsed.participants.all(), decision.extra_bcc))
    session.add_all(
        MessageAttachment(
            message_pk=pk,
            position=i,
            filename=a.filename,
            content_type=a.content_type,
            disposition=a.disposition,
            content_id=a.content_id,
            size_bytes=a.size_bytes,
            sha256=sha,
        )
        for i, (a, sha) in enumerate(zip(parsed.attachments, attachment_shas, strict=True))
    )


def participant_rows(
    pk: MessagePk, participants: tuple[Participant, ...], extra_bcc: tuple[Address, ...]
) -> list[MessageParticipant]:
    """Rows in header order; ``position`` counts within each role (R8)."""
    bcc_keys = {p.address.address_key for p in participants if p.role is ParticipantRole.BCC}
    extra = tuple(
        Participant(role=ParticipantRole.BCC, address=a)
        for a in extra_bcc
        if a.address_key not in bcc_keys
    )
    counts: dict[ParticipantRole, int] = {}
    rows: list[MessageParticipant] = []
    for participant in participants + extra:
        position = counts.get(participant.role, 0)
        counts[participant.role] = position + 1
        rows.append(
            MessageParticipant(
                message_pk=pk,
                role=participant.role,
                position=position,
                display_name=participant.address.display_name,
                addr_spec=participant.address.addr_spec,
                address_key=participant.address.address_key,
            )
        )
    return rows


async def _link_conversations(
    session: AsyncSession, decision: Decision, pk: MessagePk, thread_id: ThreadId
) -> None:
    linked: set[int] = set()
    for target in decision.conversations:
        if target.contact_id is not None:
            contact_id = target.contact_id
        elif target.new_contact is not None:
            contact_id = await _get_or_create_contact(session, target.new_contact)
        else:
            raise ValueError("conversation target names neither a contact nor a new contact")
        conversation_id = await _get_or_create_conversation(
            session, target.subaccount_id, contact_id
        )
        if conversation_id not in linked:
            linked.add(conversation_id)
            session.add(
                ConversationMessage(
                    conversation_id=conversation_id, message_pk=pk, rule=target.rule
                )
            )
    await ensure_instances(session, thread_id, {t.subaccount_id for t in decision.conversations})


async def _get_or_create_contact(session: AsyncSession, new: NewContact) -> ContactId:
    """Reuse the R10 choice among contacts with this key, else create one (R14)."""
    key = new.address.address_key
    await _advisory_lock(session, f"contact:{new.subaccount_id}:{key}")
    existing = await session.scalar(
        sa.select(Contact.id)
        .where(Contact.subaccount_id == new.subaccount_id, Contact.address_key == key)
        .order_by(
            sa.case((Contact.assigned_user_id == new.assigned_user_id, 0), else_=1),
            Contact.updated_at.desc(),
            Contact.id.desc(),
        )
        .limit(1)
    )
    if existing is not None:
        return ContactId(existing)
    contact = Contact(
        subaccount_id=new.subaccount_id,
        email=new.address.addr_spec,
        address_key=key,
        name=new.address.display_name or None,
        assigned_user_id=new.assigned_user_id,
    )
    session.add(contact)
    await session.flush()
    return ContactId(contact.id)


async def _get_or_create_conversation(
    session: AsyncSession, subaccount_id: int, contact_id: int
) -> int:
    found = await session.scalar(
        sa.select(Conversation.id).where(Conversation.contact_id == contact_id)
    )
    if found is not None:
        return found
    conversation = Conversation(subaccount_id=subaccount_id, contact_id=contact_id)
    session.add(conversation)
    await session.flush()
    return conversation.id


async def _add_location(session: AsyncSession, pk: MessagePk, provenance: Provenance) -> None:
    """Record where an IMAP copy sits (R12: many locations, one message); idempotent."""
    if not isinstance(provenance, ImapOrigin):
        return
    where = (
        MessageLocation.mailbox_id == provenance.mailbox_id,
        MessageLocation.folder == provenance.folder,
        MessageLocation.uidvalidity == provenance.uidvalidity,
        MessageLocation.uid == provenance.uid,
    )
    if await session.scalar(sa.select(MessageLocation.id).where(*where)) is not None:
        return
    session.add(
        MessageLocation(
            message_pk=pk,
            mailbox_id=provenance.mailbox_id,
            folder=provenance.folder,
            uidvalidity=provenance.uidvalidity,
            uid=provenance.uid,
        )
    )


async def _advisory_lock(session: AsyncSession, name: str) -> None:
    """Serialise get-or-create of ``name`` across PostgreSQL transactions.

    SQLite needs nothing: every transaction starts with BEGIN IMMEDIATE.
    The lock is released at commit or rollback.
    """
    if session.get_bind().dialect.name != "postgresql":
        return
    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
    await session.execute(sa.select(sa.func.pg_advisory_xact_lock(key)))


def _mailbox_id(provenance: Provenance) -> int | None:
    return provenance.mailbox_id if isinstance(provenance, ImapOrigin) else None


def _with_default(log: tuple[LogEntry, ...], default: LogEntry) -> tuple[LogEntry, ...]:
    """``log``, plus ``default`` when no entry has its outcome (every refusal is logged)."""
    if any(entry.outcome == default.outcome for entry in log):
        return log
    return (*log, default)
