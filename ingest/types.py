"""Frozen values shared by the ingest stages: the pipeline's contract.

Pure: no I/O, no clock, no logging. Everything here is an immutable value
built from bytes (``parse``), from storage (``Facts``) or by the pipeline
(``Prepared``, ``Decision``). Storage and the gateway read and build these
values; they never subclass or mutate them.

Words follow ../shared/spec/BEHAVIOUR.md and STYLE.md §3: ``message_id`` is an
RFC 5322 §3.6.4 Message-ID without angle brackets; ``message_pk`` is a row
key; ``uid`` always travels with ``folder`` and ``uidvalidity``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import NewType

MessageId = NewType("MessageId", str)
"""RFC 5322 §3.6.4 msg-id without ``<`` ``>``, whitespace removed."""

AddressKey = NewType("AddressKey", str)
"""Comparison form of an addr-spec: IDNA-decoded, NFC, casefolded (R2 words)."""

Uid = NewType("Uid", int)
UidValidity = NewType("UidValidity", int)
MailboxId = NewType("MailboxId", int)
SubaccountId = NewType("SubaccountId", int)
UserId = NewType("UserId", int)
ContactId = NewType("ContactId", int)
ThreadId = NewType("ThreadId", int)
MessagePk = NewType("MessagePk", int)


class ParticipantRole(StrEnum):
    """Header a participant was named in (RFC 5322 §3.6.2, §3.6.3)."""

    FROM = "from"
    SENDER = "sender"
    REPLY_TO = "reply_to"
    TO = "to"
    CC = "cc"
    BCC = "bcc"


class Direction(StrEnum):
    """Direction seen from the CRM user: ``outbound`` is mail the user sent."""

    INBOUND = "inbound"
    OUTBOUND = "outbound"


class Source(StrEnum):
    """Door a message came in by."""

    BCC = "bcc"
    MAILBOX = "mailbox"
    CRM = "crm"


class ThreadOrigin(StrEnum):
    """Where a synced thread started (BEHAVIOUR.md "synced thread")."""

    CRM = "crm"
    MAILBOX = "mailbox"
    BCC = "bcc"


class InstanceState(StrEnum):
    """State of a synced thread's instance in one sub-account (R4)."""

    ACTIVE = "active"
    BROKEN = "broken"


class MailboxState(StrEnum):
    """Connection state of a mailbox (R19-R22)."""

    CONNECTED = "connected"
    REAUTH_REQUIRED = "reauth_required"
    DISCONNECTED = "disconnected"


class Provider(StrEnum):
    """Mailbox provider kinds (BEHAVIOUR.md "mailbox")."""

    GMAIL = "gmail"
    OUTLOOK = "outlook"
    IMAP = "imap"


class Outcome(StrEnum):
    """What became of one message at one target, as written to the sync log."""

    STORED = "stored"
    LINKED = "linked"
    DUPLICATE = "duplicate"
    SKIPPED = "skipped"
    REFUSED = "refused"
    QUARANTINED = "quarantined"


# --------------------------------------------------------------------------- raw


@dataclass(frozen=True, slots=True, kw_only=True)
class SmtpEnvelope:
    """RFC 5321 §3.3 envelope of a message received by the SMTP listener.

    Attributes:
        envelope_sender: MAIL FROM addr-spec; "" for the null reverse-path.
        envelope_recipients: RCPT TO addr-specs in the order given, each
            already accepted as a sync address; never empty.
        peer: client IP address as text.
        helo: the client's EHLO/HELO name ("" if none).
        received_at: aware UTC time the DATA command completed.
    """

    envelope_sender: str
    envelope_recipients: tuple[str, ...]
    peer: str
    helo: str
    received_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class ImapOrigin:
    """Where an IMAP-fetched message sits (RFC 9051 §2.3.1.1).

    Attributes:
        mailbox_id: connected mailbox row key.
        folder: IMAP mailbox name as the server lists it.
        folder_role: ``inbox`` or ``sent`` (RFC 6154 special use).
        uidvalidity, uid: the message's UID within that UIDVALIDITY.
        internal_date: server INTERNALDATE, aware UTC, kept apart from Date.
        x_gm_msgid, x_gm_thrid: Gmail ids when X-GM-EXT-1 is offered.
    """

    mailbox_id: MailboxId
    folder: str
    folder_role: str
    uidvalidity: UidValidity
    uid: Uid
    internal_date: datetime | None = None
    x_gm_msgid: int | None = None
    x_gm_thrid: int | None = None


Provenance = SmtpEnvelope | ImapOrigin


@dataclass(frozen=True, slots=True, kw_only=True)
class RawMessage:
    """RFC 5322 bytes exactly as received, plus where they came from.

    Attributes:
        raw: the message bytes (CRLF or LF line ends, unmodified).
        provenance: SMTP envelope or IMAP location.
        sha256: lowercase hex SHA-256 of ``raw``; the blob store's key.
    """

    raw: bytes
    provenance: Provenance
    sha256: str


# ------------------------------------------------------------------------ parsed


@dataclass(frozen=True, slots=True, kw_only=True)
class Defect:
    """Something wrong with a message, recorded instead of raised.

    Attributes:
        kind: short fixed name, e.g. ``malformed_message_id``,
            ``bad_address``, ``undecodable_charset``, ``parser_fallback``.
        detail: human-readable detail (never the message body).
    """

    kind: str
    detail: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Address:
    """One mailbox address (RFC 5322 §3.4).

    Attributes:
        display_name: decoded display name, "" if none.
        addr_spec: ``local@domain`` as written (domain may be Unicode).
        address_key: comparison form (see ``AddressKey``).
    """

    display_name: str
    addr_spec: str
    address_key: AddressKey


@dataclass(frozen=True, slots=True, kw_only=True)
class Participant:
    """An address together with the header it appeared in."""

    role: ParticipantRole
    address: Address


@dataclass(frozen=True, slots=True, kw_only=True)
class Participants:
    """All addresses of a message by header, each tuple in header order."""

    from_: tuple[Address, ...] = ()
    sender: tuple[Address, ...] = ()
    reply_to: tuple[Address, ...] = ()
    to: tuple[Address, ...] = ()
    cc: tuple[Address, ...] = ()
    bcc: tuple[Address, ...] = ()

    def all(self) -> tuple[Participant, ...]:
        """Return every participant, ordered from, sender, reply-to, to, cc, bcc."""
        out: list[Participant] = []
        for role, addresses in (
            (ParticipantRole.FROM, self.from_),
            (ParticipantRole.SENDER, self.sender),
            (ParticipantRole.REPLY_TO, self.reply_to),
            (ParticipantRole.TO, self.to),
            (ParticipantRole.CC, self.cc),
            (ParticipantRole.BCC, self.bcc),
        ):
            out.extend(Participant(role=role, address=a) for a in addresses)
        return tuple(out)

    def recipients(self) -> tuple[Address, ...]:
        """Return To, Cc and Bcc addresses in that order (duplicates kept)."""
        return self.to + self.cc + self.bcc


@dataclass(frozen=True, slots=True, kw_only=True)
class Attachment:
    """A decoded attachment or inline part.

    Attributes:
        filename: decoded name (RFC 2231 / RFC 2047), None if the part has none.
        content_type: lowercase ``type/subtype``.
        disposition: ``attachment`` or ``inline``.
        content_id: Content-ID without brackets, or None.
        payload: decoded bytes (transfer encoding removed).
        size_bytes: len(payload).
        sha256: lowercase hex SHA-256 of payload.
    """

    filename: str | None
    content_type: str
    disposition: str
    content_id: str | None
    payload: bytes
    size_bytes: int
    sha256: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ParsedMessage:
    """A message after parse and normalise; never raised for bad input.

    Attributes:
        message_id: normalised Message-ID, None when missing or unusable.
        raw_message_id: the header value as received (unfolded), or None.
        in_reply_to, references: normalised ids, header order, duplicates
            removed (first kept), never containing ``message_id``.
        raw_in_reply_to, raw_references: header values as received, or None.
        subject: decoded Subject, "" if none.
        date_at: header Date in aware UTC, None if missing or unparsable.
        raw_date: the Date header as received, or None.
        participants: decoded addresses by header.
        text_body, html_body: decoded main bodies (str), None if absent.
        attachments: attachments and inline parts in MIME order; the main
            text/html bodies are not repeated here.
        embedded: raw bytes of each message/rfc822 part, MIME order.
        headers: every top-level header as (name, value), in order, the
            value as the compat32 parser read it: folded, encoded-words
            (RFC 2047) kept, 8-bit bytes as lone surrogates
            (``surrogateescape``). Only the headers above are decoded at
            parse time (their defects, and those of any 8-bit or encoded
            header, are in ``defects``); decode another with
            ``ingest.charsets.decode_header_value``.
        defects: what was wrong; empty when clean.
        size_bytes: length of the raw message.
    """

    message_id: MessageId | None
    raw_message_id: str | None
    in_reply_to: tuple[MessageId, ...]
    references: tuple[MessageId, ...]
    raw_in_reply_to: str | None
    raw_references: str | None
    subject: str
    date_at: datetime | None
    raw_date: str | None
    participants: Participants
    text_body: str | None
    html_body: str | None
    attachments: tuple[Attachment, ...]
    embedded: tuple[bytes, ...]
    headers: tuple[tuple[str, str], ...]
    defects: tuple[Defect, ...]
    size_bytes: int

    def header(self, name: str) -> str | None:
        """Return the first header called ``name`` (case-insensitive), or None.

        The value is as read (see ``headers``), not decoded.
        """
        lname = name.lower()
        for key, value in self.headers:
            if key.lower() == lname:
                return value
        return None


# ---------------------------------------------------------------------- prepared


@dataclass(frozen=True, slots=True, kw_only=True)
class Identity:
    """Deduplication identity of a message (R12).

    Attributes:
        key: stable text key; equal keys mean "the same message".
        message_id: the Message-ID it is based on, or None.
        header_digest: hex SHA-256 over the normalised identity headers.
    """

    key: str
    message_id: MessageId | None
    header_digest: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ThreadLinks:
    """Message-IDs a message replies to (R11).

    Attributes:
        parent: the direct parent's Message-ID, or None for a root.
        ancestors: every referenced id, oldest first, unique, never the
            message's own id; ``parent`` is its last element when set.
    """

    parent: MessageId | None
    ancestors: tuple[MessageId, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class ForwardedOriginal:
    """The original message found inside a forward (R13).

    Attributes:
        from_: the original sender, None if it could not be found.
        to, cc: original recipients, possibly empty.
        subject: original subject ("" if not found).
        date_text: the original date as written, or None.
        message_id: the original Message-ID if the forward carried it.
        style: how it was found: ``rfc822``, ``gmail``, ``outlook``,
            ``apple``, or ``generic``.
    """

    from_: Address | None
    to: tuple[Address, ...]
    cc: tuple[Address, ...]
    subject: str
    date_text: str | None
    message_id: MessageId | None
    style: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Lookups:
    """What storage must load for ``decide``, computed by ``prepare``.

    Attributes:
        address_keys: keys of every participant and forwarded original.
        own_message_id: the message's own Message-ID, or None; storage
            loads ``waiting_children`` for it (R11).
        message_ids: own id plus every referenced id.
        identity_key: to find an already stored copy (R12).
        sync_addresses: envelope recipients (lower-cased addr-specs) to
            resolve to (user, sub-account) pairs.
        x_gm_thrid: Gmail thread id of IMAP-fetched mail (X-GM-EXT-1), or
            None; storage loads the threads already carrying it (R11 hint).
    """

    address_keys: frozenset[AddressKey]
    own_message_id: MessageId | None
    message_ids: frozenset[MessageId]
    identity_key: str
    sync_addresses: frozenset[str]
    x_gm_thrid: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Prepared:
    """Result of ``ingest.prepare``: everything derivable from the bytes alone."""

    raw: RawMessage
    parsed: ParsedMessage
    identity: Identity
    links: ThreadLinks
    forwarded: ForwardedOriginal | None
    lookups: Lookups


# ------------------------------------------------------------------------- facts


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncTarget:
    """A sync address resolved to its owner (R14, R15).

    Attributes:
        sync_address: lower-cased addr-spec the mail was sent to.
        user_id, subaccount_id: the owner and the sub-account.
        user_email: the user's login address.
        sender_keys: address keys allowed in From for R15 (login email,
            connected mailbox addresses, configured aliases).
    """

    sync_address: str
    user_id: UserId
    subaccount_id: SubaccountId
    user_email: str
    sender_keys: frozenset[AddressKey]


@dataclass(frozen=True, slots=True, kw_only=True)
class ContactFact:
    """A stored contact whose address matched a lookup key."""

    contact_id: ContactId
    subaccount_id: SubaccountId
    address_key: AddressKey
    assigned_user_id: UserId | None
    updated_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class UserFact:
    """A user whose login or mailbox address matched a lookup key (R7)."""

    user_id: UserId
    address_key: AddressKey
    subaccount_ids: frozenset[SubaccountId]


@dataclass(frozen=True, slots=True, kw_only=True)
class ThreadFact:
    """A stored message of a synced thread whose Message-ID was looked up.

    Attributes:
        message_id: the stored Message-ID (or provider-rewritten alias).
        thread_id: the synced thread holding it.
        subaccount_id: one instance's sub-account.
        state: that instance's state.
        origin: where the thread started (R1 ``crm``, R2 ``mailbox``, R14 ``bcc``).
    """

    message_id: MessageId
    thread_id: ThreadId
    subaccount_id: SubaccountId
    state: InstanceState
    origin: ThreadOrigin = ThreadOrigin.BCC


@dataclass(frozen=True, slots=True, kw_only=True)
class WaitingChild:
    """A stored message that cites this message's id but whose thread lacks it."""

    message_pk: MessagePk
    thread_id: ThreadId
    subaccount_id: SubaccountId


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthResult:
    """Edge-computed sender authentication (R15 with ``require_dmarc``).

    Attributes:
        dkim_aligned: a valid DKIM signature whose d= aligns with From.
        spf_aligned: SPF pass for an envelope sender aligned with From.
        detail: short explanation for the sync log.
    """

    dkim_aligned: bool
    spf_aligned: bool
    detail: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteSettings:
    """The config switches routing depends on (``[bcc]``, ``[sync]``)."""

    create_contacts: bool = True
    require_dmarc: bool = False
    backfill_days: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class MailboxConnection:
    """One sub-account in which a watched mailbox is connected (R2-R6).

    The same provider account may be connected in several sub-accounts
    (R4); each connection is one row of ``mailboxes``.

    Attributes:
        mailbox_id, subaccount_id, user_id: the connection's keys.
        provider: ``gmail``, ``outlook`` or ``imap``.
        address_key: the mailbox address, comparison form.
        connected_at: aware UTC time the connection was made (R6).
        contact_initiated: whether contact-initiated threads sync (R2 for
            ``gmail``; ``providers.imap.contact_initiated`` for ``imap``).
    """

    mailbox_id: MailboxId
    subaccount_id: SubaccountId
    user_id: UserId
    provider: Provider
    address_key: AddressKey
    connected_at: datetime
    contact_initiated: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Facts:
    """Everything ``decide`` needs from storage and the edge, loaded in one read.

    Attributes:
        sync_targets: resolved envelope recipients, envelope order.
        contacts: contacts matching any looked-up address key.
        users: users matching any looked-up address key.
        threads: thread membership of looked-up Message-IDs.
        waiting_children: stored replies waiting for this message (R11).
        duplicate_of: row key of an already stored copy (R12), or None.
        auth: sender authentication result, None when not computed.
        settings: routing switches.
        mailbox_connections: for IMAP-fetched mail, every active connection
            of the provider account the message was fetched from (R4).
    """

    sync_targets: tuple[SyncTarget, ...] = ()
    contacts: tuple[ContactFact, ...] = ()
    users: tuple[UserFact, ...] = ()
    threads: tuple[ThreadFact, ...] = ()
    waiting_children: tuple[WaitingChild, ...] = ()
    duplicate_of: MessagePk | None = None
    auth: AuthResult | None = None
    settings: RouteSettings = field(default_factory=RouteSettings)
    mailbox_connections: tuple[MailboxConnection, ...] = ()


# ---------------------------------------------------------------------- decision


@dataclass(frozen=True, slots=True, kw_only=True)
class NewContact:
    """A contact ``apply`` must create (R14), unless it exists by then."""

    subaccount_id: SubaccountId
    address: Address
    assigned_user_id: UserId


@dataclass(frozen=True, slots=True, kw_only=True)
class ConversationTarget:
    """One conversation the message is linked into (R9: stored once).

    Attributes:
        subaccount_id: the conversation's sub-account.
        contact_id: existing contact, or None when ``new_contact`` is set.
        new_contact: contact to create first, or None.
        rule, reason: why this conversation was chosen.
    """

    subaccount_id: SubaccountId
    contact_id: ContactId | None
    new_contact: NewContact | None
    rule: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ThreadTarget:
    """The synced thread the message joins.

    Attributes:
        thread_id: existing thread to join, or None to start a new one.
        origin: origin of a new thread (ignored when joining).
        merge_thread_ids: other threads to fold into this one because this
            message links them (a parent arriving after its replies, R11).
        rule, reason: why.
    """

    thread_id: ThreadId | None
    origin: ThreadOrigin
    merge_thread_ids: tuple[ThreadId, ...]
    rule: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class LogEntry:
    """One sync-log row (STYLE.md §11: every skip or refusal writes one).

    Attributes:
        rule: rule id from BEHAVIOUR.md, e.g. ``R15``.
        reason: short human-readable explanation (no body, no subject).
        outcome: what happened.
        subaccount_id: the sub-account concerned, or None.
    """

    rule: str
    reason: str
    outcome: Outcome
    subaccount_id: SubaccountId | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Refusal:
    """Why the message as a whole is refused (nothing is stored).

    Attributes:
        rule: rule id, e.g. ``R15``.
        reason: human-readable reason, safe to send in an SMTP reply.
    """

    rule: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """Everything ``storage.apply`` must write for one message.

    Exactly one of these holds: ``refusal`` is set (store nothing but the
    log), ``duplicate_of`` is set (store nothing new but the log), or the
    message is stored once and linked to every ``conversations`` entry.
    A message routed to no conversation stores no message row; its raw
    bytes are still kept in the blob store and the log says why.

    Attributes:
        prepared: the input, carried so ``apply`` has bytes and values.
        direction, source: how the message is shown in the CRM.
        refusal: set when the message is refused (R15).
        duplicate_of: stored copy this is a duplicate of (R12).
        thread: synced thread to join or start; None when not stored.
        conversations: conversations to link, de-duplicated by contact.
        extra_bcc: addresses to add to the stored Bcc (R14: the sync address).
        log: sync-log rows, in decision order.
        decided_at: the ``now`` the decision was made at (aware UTC).
    """

    prepared: Prepared
    direction: Direction
    source: Source
    refusal: Refusal | None
    duplicate_of: MessagePk | None
    thread: ThreadTarget | None
    conversations: tuple[ConversationTarget, ...]
    extra_bcc: tuple[Address, ...]
    log: tuple[LogEntry, ...]
    decided_at: datetime

    @property
    def stores(self) -> bool:
        """Whether ``apply`` writes a new message row."""
        return self.refusal is None and self.duplicate_of is None and bool(self.conversations)
