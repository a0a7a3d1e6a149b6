"""Where a CRM send goes (R16, R21), how to reach it, and its conversation copy (R1).

Edge helpers of ``gateway.outbound``: route choice inside the enqueue
transaction, SMTP/IMAP targets from the config and the mailbox service, and
the ``Decision`` that stores a mailbox send in the contact's conversation.
They do not send, retry or commit.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass, replace
from datetime import datetime
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32

from sqlalchemy.orm import Session

from gateway.config import ProviderSettings, Security, Settings
from gateway.mailboxes import MailboxService
from gateway.sent_folder import ImapAccess
from gateway.smtp.sender import Login, OAuthLogin, PasswordLogin, SmtpServer
from ingest.limits import SendLimits
from ingest.pipeline import prepare
from ingest.types import (
    Attachment,
    ContactId,
    ConversationTarget,
    Decision,
    Direction,
    LogEntry,
    MailboxState,
    MessageId,
    MessagePk,
    Outcome,
    Prepared,
    Provider,
    RawMessage,
    SmtpEnvelope,
    Source,
    SubaccountId,
    ThreadId,
    ThreadOrigin,
    ThreadTarget,
)
from storage.blobs import BlobStore
from storage.models.enums import OutboundKind
from storage.repos import outbound as repo
from storage.repos import outbound_lookups as lookups
from storage.repos.mailboxes import MailboxRecord, active_mailbox
from storage.repos.messages import add_provider_message_id, apply_decision
from storage.repos.threads import claim_thread

CRM_PEER = "crm"
R1 = "R1"
R16 = "R16"
R21 = "R21"


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    """The chosen way out: ``mailbox`` (with the mailbox) or ``relay``; or an error code."""

    name: str
    mailbox: MailboxRecord | None = None
    error: str | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """Everything one attempt needs.

    Attributes:
        append_access: IMAP access to APPEND the Sent copy (generic IMAP only, R18).
        search_access: IMAP access to look for the Sent copy (reconcile).
    """

    server: SmtpServer
    login: Login
    envelope_sender: str
    append_access: ImapAccess | None
    search_access: ImapAccess | None


def choose_route(
    session: Session, settings: Settings, kind: OutboundKind, user_id: int, subaccount_id: int
) -> Route:
    """Return the route of a send (R16: bulk/workflow → relay; R21: no mailbox → relay or error)."""
    relay = settings.relay.host is not None
    if kind != OutboundKind.INDIVIDUAL:
        if relay:
            return Route(name=repo.ROUTE_RELAY)
        return Route(
            name=repo.ROUTE_RELAY, error="relay_not_configured", reason=f"{R16}: no [relay]"
        )
    mailbox = active_mailbox(session, user_id, subaccount_id)
    if mailbox is not None and mailbox.state == MailboxState.CONNECTED:
        return Route(name=repo.ROUTE_MAILBOX, mailbox=mailbox)
    if relay:
        return Route(name=repo.ROUTE_RELAY)
    state = mailbox.state.value if mailbox else "never connected"
    return Route(
        name=repo.ROUTE_MAILBOX,
        mailbox=None,
        error="mailbox_not_connected",
        reason=f"{R21}: mailbox {state} and no [relay] configured",
    )


def provider_settings(settings: Settings, provider: Provider) -> ProviderSettings:
    """Return ``providers.<provider>``."""
    section: ProviderSettings = getattr(settings.providers, provider.value)
    return section


def limits_of(settings: Settings, provider: Provider) -> SendLimits:
    """Return R17's limits of ``providers.<provider>``."""
    section = provider_settings(settings, provider)
    types = section.allowed_attachment_types
    return SendLimits(
        daily_send_limit=section.daily_send_limit,
        max_recipients_per_message=section.max_recipients_per_message,
        max_message_bytes=section.max_message_bytes,
        max_attachment_bytes=section.max_attachment_bytes,
        allowed_attachment_types=frozenset(t.lower() for t in types) if types is not None else None,
    )


async def target_of(
    settings: Settings, mailboxes: MailboxService, record: repo.OutboundRecord, user_email: str
) -> Target:
    """Return the SMTP server, login and IMAP access of one queued send.

    Relay sends (R16) use ``[relay]`` with the user's login email as
    envelope sender; mailbox sends use the mailbox's provider settings
    (XOAUTH2 for Gmail/Outlook, a password for generic IMAP, R1).

    Raises:
        MailboxError: the mailbox is no longer connected (``not_connected``, ``reauth_required``).
    """
    if record.route != repo.ROUTE_MAILBOX or record.mailbox_id is None:
        return _relay_target(settings, user_email)
    mailbox = await mailboxes.get(record.mailbox_id)
    if mailbox.provider == Provider.IMAP:
        return await _password_target(settings, mailboxes, mailbox)
    return await _oauth_target(settings, mailboxes, mailbox)


def _relay_target(settings: Settings, user_email: str) -> Target:
    relay = settings.relay
    login: Login = None
    if relay.username is not None:
        password = relay.password.get_secret_value() if relay.password else ""
        login = PasswordLogin(username=relay.username, password=password)
    server = SmtpServer(
        host=relay.host or "", port=relay.port, security=relay.security, ca_file=relay.ca_file
    )
    return Target(
        server=server,
        login=login,
        envelope_sender=user_email,
        append_access=None,
        search_access=None,
    )


async def _oauth_target(
    settings: Settings, mailboxes: MailboxService, mailbox: MailboxRecord
) -> Target:
    section = provider_settings(settings, mailbox.provider)
    mailbox_id = mailbox.id

    async def token(force: bool) -> str:
        return await mailboxes.access_token(mailbox_id, force_refresh=force)

    server = SmtpServer(
        host=section.smtp_host or "",
        port=section.smtp_port,
        security=section.smtp_security,
        ca_file=section.ca_file,
    )
    search = ImapAccess(
        host=section.imap_host or "",
        port=section.imap_port,
        security=section.imap_security,
        ca_file=section.ca_file,
        username=mailbox.address,
        token=await token(False),
    )
    return Target(
        server=server,
        login=OAuthLogin(username=mailbox.address, token=token),
        envelope_sender=mailbox.address,
        append_access=None,  # Gmail and Outlook file their own Sent copy (R18)
        search_access=search,
    )


async def _password_target(
    settings: Settings, mailboxes: MailboxService, mailbox: MailboxRecord
) -> Target:
    username, password = await mailboxes.password_credentials(mailbox.id)
    server_settings = dict(mailbox.server_settings or {})
    ca_file = settings.providers.imap.ca_file
    server = SmtpServer(
        host=str(server_settings.get("smtp_host", "")),
        port=int(server_settings.get("smtp_port", 587)),
        security=Security(server_settings.get("smtp_security", Security.STARTTLS.value)),
        ca_file=ca_file,
    )
    access = ImapAccess(
        host=str(server_settings.get("imap_host", "")),
        port=int(server_settings.get("imap_port", 993)),
        security=Security(server_settings.get("imap_security", Security.TLS.value)),
        ca_file=ca_file,
        username=username,
        password=password,
    )
    return Target(
        server=server,
        login=PasswordLogin(username=username, password=password),
        envelope_sender=mailbox.address,
        append_access=access,
        search_access=access,
    )


def store_conversation_copy(
    session: Session,
    blobs: BlobStore,
    record: repo.OutboundRecord,
    content: bytes,
    provider_message_id: MessageId | None,
    now: datetime,
) -> int | None:
    """Store a mailbox send in the contact's conversation as outbound, origin ``crm`` (R1).

    Runs in the caller's transaction (the one that marks the row ``sent``).
    Both Message-IDs — ours and the provider's rewrite — are recorded (R11).
    A copy already stored (the watcher saw the Sent copy first) is reused (R12).
    A reply in a stored thread claims it for the sending sub-account (R4:
    ``storage.repos.threads.claim_thread``; the other instances break).

    Returns:
        The message pk, or None when the send has no contact.
    """
    if record.contact_id is None:
        return None
    envelope = SmtpEnvelope(
        envelope_sender="",
        envelope_recipients=record.recipients,
        peer=CRM_PEER,
        helo="",
        received_at=now,
    )
    prepared = prepare_sent(
        RawMessage(raw=content, provenance=envelope, sha256=record.raw_sha256 or _sha256(content))
    )
    parent_thread = _parent_thread(session, prepared)
    pk = lookups.message_by_identity(session, prepared.identity.key)
    if pk is None:
        pk = apply_decision(session, _decision(prepared, record, parent_thread, now), blobs)
    if pk is not None and provider_message_id is not None:
        add_provider_message_id(session, MessagePk(pk), provider_message_id)
    if parent_thread is not None:
        claim_thread(session, parent_thread, record.subaccount_id, now)  # R4
    return pk


def prepare_sent(raw: RawMessage) -> Prepared:
    """``ingest.prepare`` for a message we composed, without a full parse of its attachments.

    The bytes are split at the top-level ``multipart/mixed`` boundary
    (RFC 2046 §5.1.1; ``ingest.compose`` writes CRLF and the bodies before the
    attachments). Each base64 attachment part (not ``message/*``) keeps its
    headers but gets a short placeholder body; that skeleton goes through
    ``prepare``, so the participants, bodies, ids, identity (R12) and the
    attachments' names and types are exactly what a full parse gives. Each
    placeholder payload is then replaced by the attachment decoded straight
    from the original bytes (``binascii.a2b_base64`` over a ``memoryview``:
    one copy, the decoded bytes). ``raw`` stays the complete message.

    Peak memory is about the decoded attachments plus the small skeleton,
    where a full parse of a 25 MB message peaked near 193 MB (bench_send).
    Anything else (no boundary, another top-level type) takes ``prepare``.
    """
    content = raw.raw
    head_end = content.find(b"\r\n\r\n")
    head = BytesHeaderParser(policy=compat32).parsebytes(content[: head_end + 4])
    boundary = head.get_boundary()
    if head_end < 0 or head.get_content_type() != "multipart/mixed" or not boundary:
        return prepare(raw)
    split = _skeleton(content, head_end, b"\r\n--" + boundary.encode("ascii", "replace"))
    if split is None:
        return prepare(raw)
    skeleton_bytes, decoded = split
    skeleton = prepare(replace(raw, raw=skeleton_bytes))
    attachments = tuple(_restored(a, decoded) for a in skeleton.parsed.attachments)
    parsed = replace(skeleton.parsed, attachments=attachments, size_bytes=len(content))
    return replace(skeleton, raw=raw, parsed=parsed)


def _skeleton(
    content: bytes, head_end: int, delimiter: bytes
) -> tuple[bytes, dict[bytes, bytes]] | None:
    """Split at ``delimiter``; return (skeleton bytes, placeholder → decoded), None if malformed."""
    start = content.find(delimiter, head_end)
    if start < 0:
        return None
    view = memoryview(content)
    pieces, decoded = [content[:start]], dict[bytes, bytes]()
    while not content.startswith(b"--", start + len(delimiter)):
        end = content.find(delimiter, start + len(delimiter))
        if end < 0:
            return None
        body = content.find(b"\r\n\r\n", start + len(delimiter), end) + 4
        headers = content.find(b"\r\n", start + 2) + 2  # after the delimiter line
        part = BytesHeaderParser(policy=compat32).parsebytes(content[headers:body])
        if body > 3 and _strippable(part):
            marker = f"mailgate-placeholder-{len(decoded)}".encode()
            decoded[marker] = binascii.a2b_base64(view[body:end])
            pieces += [content[start:body], base64.b64encode(marker) + b"\r\n"]
        else:
            pieces.append(content[start:end])
        start = end
    pieces.append(content[start:])
    return b"".join(pieces), decoded


def _strippable(part: Message) -> bool:
    disposition = (part.get("Content-Disposition") or "").split(";")[0].strip().lower()
    encoding = (part.get("Content-Transfer-Encoding") or "").strip().lower()
    return (
        disposition == "attachment"
        and encoding == "base64"
        and part.get_content_maintype() not in ("message", "multipart")
    )


def _restored(attachment: Attachment, decoded: dict[bytes, bytes]) -> Attachment:
    payload = decoded.get(attachment.payload)
    if payload is None:
        return attachment
    return replace(attachment, payload=payload, size_bytes=len(payload), sha256=_sha256(payload))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _parent_thread(session: Session, prepared: Prepared) -> ThreadId | None:
    """The stored thread the send answers: its nearest stored ancestor's (R11)."""
    for mid in reversed(prepared.links.ancestors):  # the direct parent first
        parent = lookups.find_parent(session, mid)
        if parent is not None:
            return ThreadId(parent.thread_id)
    return None


def _decision(
    prepared: Prepared, record: repo.OutboundRecord, thread_id: ThreadId | None, now: datetime
) -> Decision:
    subaccount = SubaccountId(record.subaccount_id)
    reason = "sent from the CRM through the user's mailbox"
    return Decision(
        prepared=prepared,
        direction=Direction.OUTBOUND,
        source=Source.CRM,
        refusal=None,
        duplicate_of=None,
        thread=ThreadTarget(
            thread_id=thread_id,
            origin=ThreadOrigin.CRM,
            merge_thread_ids=(),
            rule=R1,
            reason=reason,
        ),
        conversations=(
            ConversationTarget(
                subaccount_id=subaccount,
                contact_id=ContactId(record.contact_id or 0),
                new_contact=None,
                rule=R1,
                reason=reason,
            ),
        ),
        extra_bcc=(),
        log=(LogEntry(rule=R1, reason=reason, outcome=Outcome.STORED, subaccount_id=subaccount),),
        decided_at=now,
    )
