"""Message repository: apply a ``Decision`` (store once, link to conversations, log).

Edge module: sync writes on a caller's ``Session`` plus blob-store writes
(fsync: call from a worker thread, as ``storage.db.Database`` does); never
commits. The caller commits, and only then acknowledges (SMTP 250 or the
IMAP checkpoint: BEHAVIOUR.md "Never"). Rows hanging off a message go in
with one executemany ``INSERT`` per table (Core, no ORM unit of work), so
a stored message costs about ten statements.

Races: two transactions storing the same message (same identity key, R12)
both pass ``load_facts``; the second fails with ``sqlalchemy.exc.IntegrityError``
on ``uq_messages_identity_key`` at its INSERT or at commit. The same holds
for two first messages creating one conversation. The caller rolls back
and runs the pipeline again: the retry sees ``duplicate_of``. Blobs
written before the failure are harmless (content-addressed).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

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
from storage.blobs import BlobWriter
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
from storage.repos.facts import load_facts, resolve_sync_address
from storage.repos.inserts import (
    RowBuffer,
    insert_ignoring_duplicates,
    insert_or_hold,
    insert_rows,
    table_of,
)
from storage.repos.sync_log import LogContext, add_log_rows
from storage.repos.threads import ensure_instances, resolve_thread

DUPLICATE_RULE = "R12"
"""Rule of the default log row for a duplicate without one in ``Decision.log``."""

_INSERT_MESSAGE = table_of(Message).insert().returning(table_of(Message).c.id)
_INSERT_CONTACT = table_of(Contact).insert().returning(table_of(Contact).c.id)
_INSERT_CONVERSATION = table_of(Conversation).insert().returning(table_of(Conversation).c.id)
_CONVERSATIONS = sa.select(Conversation.contact_id, Conversation.id).where(
    Conversation.contact_id.in_(sa.bindparam("contact_ids", expanding=True))
)

__all__ = [
    "ConversationView",
    "add_provider_message_id",
    "apply_decision",
    "conversation_view",
    "load_facts",
    "resolve_sync_address",
]


def apply_decision(
    session: Session, decision: Decision, blobs: BlobWriter, held: RowBuffer | None = None
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

    Blob writes fsync: call this from a worker thread, not the event loop.

    With ``held`` (a group-commit batch), the rows nothing reads before the
    batch ends (ids, references, participants, attachments, conversation
    links, sync log) are held there; the caller flushes it before COMMIT,
    and before loading facts that may match the held ids or references.

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
        add_log_rows(session, context, _with_default(decision.log, default), held)
        return None
    if decision.duplicate_of is not None:
        pk = decision.duplicate_of
        _add_location(session, pk, prepared.raw.provenance, held)
        default = LogEntry(rule=DUPLICATE_RULE, reason="already stored", outcome=Outcome.DUPLICATE)
        add_log_rows(
            session, replace(context, message_pk=pk), _with_default(decision.log, default), held
        )
        return pk
    raw_sha256 = blobs.put(prepared.raw.raw)
    if not decision.stores:
        add_log_rows(session, replace(context, raw_sha256=raw_sha256), decision.log, held)
        return None
    pk = _store(session, decision, blobs, raw_sha256, held)
    add_log_rows(session, replace(context, message_pk=pk), decision.log, held)
    return pk


def add_provider_message_id(session: Session, message_pk: MessagePk, message_id: MessageId) -> None:
    """Record a Message-ID a provider gave a sent message (R11, Exchange rewrite).

    Replies citing either id then join the thread. Idempotent.
    """
    exists = session.scalar(
        sa.select(KnownMessageId.id).where(
            KnownMessageId.message_pk == message_pk, KnownMessageId.message_id == message_id
        )
    )
    if exists is None:
        insert_rows(
            session,
            KnownMessageId,
            [{"message_pk": message_pk, "message_id": message_id, "kind": MessageIdKind.PROVIDER}],
        )


def _store(
    session: Session, decision: Decision, blobs: BlobWriter, raw_sha256: str, held: RowBuffer | None
) -> MessagePk:
    prepared = decision.prepared
    parsed = prepared.parsed
    if decision.thread is None:
        raise ValueError("a decision that stores a message must name its thread")
    provenance = prepared.raw.provenance
    x_gm_thrid = provenance.x_gm_thrid if isinstance(provenance, ImapOrigin) else None
    thread_id = resolve_thread(session, decision.thread, x_gm_thrid, held)
    attachment_shas = [blobs.put(a.payload) for a in parsed.attachments]
    row = {
        "identity_key": prepared.identity.key,
        "message_id": parsed.message_id,
        "header_digest": prepared.identity.header_digest,
        "thread_id": thread_id,
        "direction": decision.direction,
        "source": decision.source,
        "subject": parsed.subject,
        "date_at": parsed.date_at,
        "raw_sha256": raw_sha256,
        "size_bytes": len(prepared.raw.raw),
        "raw_message_id": parsed.raw_message_id,
        "raw_in_reply_to": parsed.raw_in_reply_to,
        "raw_references": parsed.raw_references,
        "text_body": parsed.text_body,
        "html_body": parsed.html_body,
    }
    if held is None:
        pk = MessagePk(session.connection().execute(_INSERT_MESSAGE, row).scalar_one())
    else:
        pk = MessagePk(held.allocate(session, Message))
        held.add(Message, [{"id": pk, **row}])
    _add_children(session, decision, pk, attachment_shas, held)
    _add_location(session, pk, provenance, held)
    _link_conversations(session, decision, pk, thread_id, held)
    return pk


def _add_children(
    session: Session,
    decision: Decision,
    pk: MessagePk,
    attachment_shas: list[str],
    held: RowBuffer | None,
) -> None:
    """Ids, references, participants and attachments: one executemany per table."""
    parsed = decision.prepared.parsed
    if parsed.message_id is not None:
        insert_or_hold(
            session,
            KnownMessageId,
            [{"message_pk": pk, "message_id": parsed.message_id, "kind": MessageIdKind.OWN}],
            held,
        )
    insert_or_hold(
        session,
        MessageReference,
        [
            {"message_pk": pk, "referenced_message_id": mid, "position": i}
            for i, mid in enumerate(decision.prepared.links.ancestors)
        ],
        held,
    )
    insert_or_hold(
        session,
        MessageParticipant,
        participant_rows(pk, parsed.participants.all(), decision.extra_bcc),
        held,
    )
    insert_or_hold(
        session,
        MessageAttachment,
        [
            {
                "message_pk": pk,
                "position": i,
                "filename": a.filename,
                "content_type": a.content_type,
                "disposition": a.disposition,
                "content_id": a.content_id,
                "size_bytes": a.size_bytes,
                "sha256": sha,
            }
            for i, (a, sha) in enumerate(zip(parsed.attachments, attachment_shas, strict=True))
        ],
        held,
    )


def participant_rows(
    pk: MessagePk, participants: tuple[Participant, ...], extra_bcc: tuple[Address, ...]
) -> list[dict[str, Any]]:
    """Participant rows (``MessageParticipant`` attribute dicts) in header order.

    ``position`` counts within each role (R8); ``extra_bcc`` addresses not
    already in Bcc are appended as bcc (R14).
    """
    bcc_keys = {p.address.address_key for p in participants if p.role is ParticipantRole.BCC}
    extra = tuple(
        Participant(role=ParticipantRole.BCC, address=a)
        for a in extra_bcc
        if a.address_key not in bcc_keys
    )
    counts: dict[ParticipantRole, int] = {}
    rows: list[dict[str, Any]] = []
    for participant in participants + extra:
        position = counts.get(participant.role, 0)
        counts[participant.role] = position + 1
        rows.append(
            {
                "message_pk": pk,
                "role": participant.role,
                "position": position,
                "display_name": participant.address.display_name,
                "addr_spec": participant.address.addr_spec,
                "address_key": participant.address.address_key,
            }
        )
    return rows


def _link_conversations(
    session: Session,
    decision: Decision,
    pk: MessagePk,
    thread_id: ThreadId,
    held: RowBuffer | None,
) -> None:
    """Link the message into each target's conversation once (R9), then ensure instances (R4)."""
    contacts: dict[int, tuple[int, str]] = {}  # contact_id -> (subaccount_id, rule); first wins
    for target in decision.conversations:
        if target.contact_id is not None:
            contact_id = target.contact_id
        elif target.new_contact is not None:
            contact_id = _get_or_create_contact(session, target.new_contact)
        else:
            raise ValueError("conversation target names neither a contact nor a new contact")
        contacts.setdefault(contact_id, (target.subaccount_id, target.rule))
    conversations = _get_or_create_conversations(
        session, {c: sub for c, (sub, _) in contacts.items()}, held
    )
    insert_or_hold(
        session,
        ConversationMessage,
        [
            {"conversation_id": conversations[contact_id], "message_pk": pk, "rule": rule}
            for contact_id, (_, rule) in contacts.items()
        ],
        held,
    )
    ensure_instances(session, thread_id, {t.subaccount_id for t in decision.conversations}, held)


def _get_or_create_contact(session: Session, new: NewContact) -> ContactId:
    """Reuse the R10 choice among contacts with this key, else create one (R14)."""
    key = new.address.address_key
    _advisory_lock(session, f"contact:{new.subaccount_id}:{key}")
    existing = session.scalar(
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
    created = (
        session.connection()
        .execute(
            _INSERT_CONTACT,
            {
                "subaccount_id": new.subaccount_id,
                "email": new.address.addr_spec,
                "address_key": key,
                "name": new.address.display_name or None,
                "assigned_user_id": new.assigned_user_id,
            },
        )
        .scalar_one()
    )
    return ContactId(created)


def _get_or_create_conversations(
    session: Session, contacts: dict[int, int], held: RowBuffer | None
) -> dict[int, int]:
    """Return contact_id -> conversation id for ``contacts`` (contact_id -> subaccount_id).

    One SELECT for those not already in ``held.conversation_ids`` (a batch
    remembers them); an INSERT … RETURNING only for contacts without one
    (a concurrent creator makes this transaction fail: see module docstring).
    """
    known = held.conversation_ids if held is not None else {}
    found = {c: known[c] for c in contacts if c in known}
    wanted = sorted(set(contacts) - set(found))
    if not wanted:
        return found
    found.update(conversation_ids(session, wanted))
    for contact_id in sorted(set(contacts) - set(found)):
        found[contact_id] = (
            session.connection()
            .execute(
                _INSERT_CONVERSATION,
                {"subaccount_id": contacts[contact_id], "contact_id": contact_id},
            )
            .scalar_one()
        )
    known.update(found)
    return found


def conversation_ids(session: Session, contact_ids: Iterable[int]) -> dict[int, int]:
    """Return contact id -> conversation id for those of ``contact_ids`` that have one.

    One SELECT (none for an empty ``contact_ids``); at most one conversation
    per contact (unique constraint).
    """
    wanted = sorted(set(contact_ids))
    if not wanted:
        return {}
    rows = session.connection().execute(_CONVERSATIONS, {"contact_ids": wanted})
    return {contact_id: conversation_id for contact_id, conversation_id in rows}


def _add_location(
    session: Session, pk: MessagePk, provenance: Provenance, held: RowBuffer | None
) -> None:
    """Record where an IMAP copy sits (R12: many locations, one message); idempotent.

    One ``INSERT … ON CONFLICT DO NOTHING`` on the location's unique key,
    or held in ``held`` for its flush.
    """
    if not isinstance(provenance, ImapOrigin):
        return
    rows = [
        {
            "message_pk": pk,
            "mailbox_id": provenance.mailbox_id,
            "folder": provenance.folder,
            "uidvalidity": provenance.uidvalidity,
            "uid": provenance.uid,
        }
    ]
    if held is None:
        insert_ignoring_duplicates(session, MessageLocation, rows)
    else:
        held.add(MessageLocation, rows, ignore_duplicates=True)


def _advisory_lock(session: Session, name: str) -> None:
    """Serialise get-or-create of ``name`` across PostgreSQL transactions.

    SQLite needs nothing: every transaction starts with BEGIN IMMEDIATE.
    The lock is released at commit or rollback.
    """
    if session.get_bind().dialect.name != "postgresql":
        return
    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
    session.execute(sa.select(sa.func.pg_advisory_xact_lock(key)))


def _mailbox_id(provenance: Provenance) -> int | None:
    return provenance.mailbox_id if isinstance(provenance, ImapOrigin) else None


def _with_default(log: tuple[LogEntry, ...], default: LogEntry) -> tuple[LogEntry, ...]:
    """``log``, plus ``default`` when no entry has its outcome (every refusal is logged)."""
    if any(entry.outcome == default.outcome for entry in log):
        return log
    return (*log, default)
