"""Builders of ingest values for storage tests: Prepared and Decision, built by hand.

The values are built directly (not through ingest.pipeline) so storage tests
pin exactly what storage is given, independent of the pipeline's choices.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import UTC, datetime

from ingest.normalise import address_key
from ingest.types import (
    Address,
    Attachment,
    ContactId,
    ConversationTarget,
    Decision,
    Direction,
    Identity,
    LogEntry,
    Lookups,
    MessageId,
    MessagePk,
    NewContact,
    Outcome,
    ParsedMessage,
    Participants,
    Prepared,
    Provenance,
    RawMessage,
    Refusal,
    SmtpEnvelope,
    Source,
    SubaccountId,
    ThreadId,
    ThreadLinks,
    ThreadOrigin,
    ThreadTarget,
    UserId,
)

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def addr(addr_spec: str, name: str = "") -> Address:
    """Return an Address with its comparison key."""
    return Address(display_name=name, addr_spec=addr_spec, address_key=address_key(addr_spec))


def attachment(
    payload: bytes, filename: str = "a.txt", content_type: str = "text/plain"
) -> Attachment:
    """Return an attachment part carrying ``payload``."""
    return Attachment(
        filename=filename,
        content_type=content_type,
        disposition="attachment",
        content_id=None,
        payload=payload,
        size_bytes=len(payload),
        sha256=hashlib.sha256(payload).hexdigest(),
    )


def smtp_provenance() -> SmtpEnvelope:
    """Return an SMTP envelope as the listener would build it."""
    return SmtpEnvelope(
        envelope_sender="u@example.org",
        envelope_recipients=("u-x@bcc.example.test",),
        peer="127.0.0.1",
        helo="client",
        received_at=T0,
    )


def prepared(
    message_id: str | None,
    *,
    references: Sequence[str] = (),
    from_: Address | None = None,
    to: Sequence[Address] = (),
    cc: Sequence[Address] = (),
    bcc: Sequence[Address] = (),
    subject: str = "Hello",
    date_at: datetime | None = T0,
    attachments: Sequence[Attachment] = (),
    provenance: Provenance | None = None,
    sync_addresses: Sequence[str] = (),
    identity_key: str | None = None,
) -> Prepared:
    """Return a Prepared value for a message with these headers."""
    sender = from_ or addr("alice@example.org", "Alice")
    refs = tuple(MessageId(r) for r in references)
    raw = (
        f"Message-ID: <{message_id}>\r\nFrom: {sender.addr_spec}\r\nSubject: {subject}\r\n"
        f"References: {' '.join('<' + r + '>' for r in refs)}\r\n\r\nbody of {message_id}\r\n"
    ).encode()
    participants = Participants(from_=(sender,), to=tuple(to), cc=tuple(cc), bcc=tuple(bcc))
    parsed = ParsedMessage(
        message_id=MessageId(message_id) if message_id else None,
        raw_message_id=f"<{message_id}>" if message_id else None,
        in_reply_to=refs[-1:],
        references=refs,
        raw_in_reply_to=f"<{refs[-1]}>" if refs else None,
        raw_references=" ".join(f"<{r}>" for r in refs) or None,
        subject=subject,
        date_at=date_at,
        raw_date=None,
        participants=participants,
        text_body=f"body of {message_id}",
        html_body=None,
        attachments=tuple(attachments),
        embedded=(),
        headers=(("Subject", subject),),
        defects=(),
        size_bytes=len(raw),
    )
    key = identity_key or f"mid:{message_id}:test"
    mids = {MessageId(m) for m in (message_id, *refs) if m}
    return Prepared(
        raw=RawMessage(
            raw=raw,
            provenance=provenance or smtp_provenance(),
            sha256=hashlib.sha256(raw).hexdigest(),
        ),
        parsed=parsed,
        identity=Identity(
            key=key,
            message_id=parsed.message_id,
            header_digest=hashlib.sha256(key.encode()).hexdigest(),
        ),
        links=ThreadLinks(parent=refs[-1] if refs else None, ancestors=refs),
        forwarded=None,
        lookups=Lookups(
            address_keys=frozenset(p.address.address_key for p in participants.all()),
            own_message_id=parsed.message_id,
            message_ids=frozenset(mids),
            identity_key=key,
            sync_addresses=frozenset(sync_addresses),
        ),
    )


def to_contact(subaccount_id: int, contact_id: int, rule: str = "R2") -> ConversationTarget:
    """Return a target linking the message into an existing contact's conversation."""
    return ConversationTarget(
        subaccount_id=SubaccountId(subaccount_id),
        contact_id=ContactId(contact_id),
        new_contact=None,
        rule=rule,
        reason="test",
    )


def to_new_contact(subaccount_id: int, address: Address, user_id: int) -> ConversationTarget:
    """Return an R14 target that creates the contact first."""
    return ConversationTarget(
        subaccount_id=SubaccountId(subaccount_id),
        contact_id=None,
        new_contact=NewContact(
            subaccount_id=SubaccountId(subaccount_id),
            address=address,
            assigned_user_id=UserId(user_id),
        ),
        rule="R14",
        reason="test",
    )


def new_thread(origin: ThreadOrigin = ThreadOrigin.BCC) -> ThreadTarget:
    """Return a target starting a new synced thread."""
    return ThreadTarget(thread_id=None, origin=origin, merge_thread_ids=(), rule="R14", reason="t")


def join_thread(thread_id: int, merge: Sequence[int] = ()) -> ThreadTarget:
    """Return a target joining ``thread_id`` and folding ``merge`` into it (R11)."""
    return ThreadTarget(
        thread_id=ThreadId(thread_id),
        origin=ThreadOrigin.BCC,
        merge_thread_ids=tuple(ThreadId(t) for t in merge),
        rule="R11",
        reason="t",
    )


def stored_log(subaccount_id: int | None = None) -> tuple[LogEntry, ...]:
    """Return the log of a stored message."""
    sid = SubaccountId(subaccount_id) if subaccount_id is not None else None
    return (LogEntry(rule="R14", reason="logged", outcome=Outcome.STORED, subaccount_id=sid),)


def decision(
    prep: Prepared,
    *,
    conversations: Sequence[ConversationTarget] = (),
    thread: ThreadTarget | None = None,
    refusal: Refusal | None = None,
    duplicate_of: int | None = None,
    log: Sequence[LogEntry] = (),
    extra_bcc: Sequence[Address] = (),
    direction: Direction = Direction.OUTBOUND,
    source: Source = Source.BCC,
) -> Decision:
    """Return a Decision; ``thread`` defaults to a new thread when conversations are given."""
    if thread is None and conversations:
        thread = new_thread()
    return Decision(
        prepared=prep,
        direction=direction,
        source=source,
        refusal=refusal,
        duplicate_of=MessagePk(duplicate_of) if duplicate_of is not None else None,
        thread=thread,
        conversations=tuple(conversations),
        extra_bcc=tuple(extra_bcc),
        log=tuple(log),
        decided_at=T0,
    )
