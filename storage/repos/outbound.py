"""Repository of the outbound queue (CRM sends) and the webhook delivery queue.

Sync functions over a ``Session``; they never commit (``Database.run`` does).
States of a send (``OutboundState``)::

    queued ──(attempt recorded, before MAIL FROM)──> sending ──> sent
      ^                                                  │
      ├──── transient failure (next_attempt_at) ─────────┤
      └──── release_sending (marked ahead, never tried) ─┤
                                                         └──> failed (permanent, R17, R16)

Invariant: a row in ``sending`` after a restart had its attempt recorded but
its outcome not; ``gateway.outbound`` reconciles it before any resend.

R17's quota counts are in ``outbound_quota``; what a send reads from other
tables (contact, parent message, user) is in ``outbound_lookups``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from ingest.types import MessageId, Provider
from storage.errors import NotFound
from storage.models import (
    Mailbox,
    OutboundMessage,
    WebhookDelivery,
)
from storage.models.enums import OutboundKind, OutboundState, WebhookState

ROUTE_MAILBOX = "mailbox"
ROUTE_RELAY = "relay"


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboundRecord:
    """One CRM send as the gateway sees it.

    Attributes:
        recipients: envelope recipients (To then Cc), addr-specs, unique.
        route: ``mailbox`` or ``relay`` (None before routing: never stored so).
        raw_sha256: the composed bytes in the blob store (resent unchanged).
    """

    id: int
    user_id: int
    subaccount_id: int
    mailbox_id: int | None
    contact_id: int | None
    kind: OutboundKind
    state: OutboundState
    route: str | None
    idempotency_key: str | None
    message_id: MessageId
    provider_message_id: MessageId | None
    recipients: tuple[str, ...]
    subject: str
    raw_sha256: str | None
    attempts: int
    next_attempt_at: datetime | None
    error_code: str | None
    last_error: str | None
    last_reply: str | None
    resets_at: datetime | None
    sent_at: datetime | None
    message_pk: int | None
    created_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class NewOutbound:
    """A send to enqueue (state ``queued``, or ``failed`` when refused up front)."""

    user_id: int
    subaccount_id: int
    mailbox_id: int | None
    contact_id: int | None
    kind: OutboundKind
    route: str | None
    idempotency_key: str | None
    message_id: MessageId
    recipients: tuple[str, ...]
    subject: str
    raw_sha256: str | None
    state: OutboundState = OutboundState.QUEUED
    error_code: str | None = None
    last_error: str | None = None
    resets_at: datetime | None = None


def _record(row: OutboundMessage) -> OutboundRecord:
    return OutboundRecord(
        id=row.id,
        user_id=row.user_id,
        subaccount_id=row.subaccount_id,
        mailbox_id=row.mailbox_id,
        contact_id=row.contact_id,
        kind=OutboundKind(row.kind),
        state=OutboundState(row.state),
        route=row.route,
        idempotency_key=row.idempotency_key,
        message_id=MessageId(row.message_id),
        provider_message_id=MessageId(row.provider_message_id) if row.provider_message_id else None,
        recipients=tuple(str(r) for r in row.recipients),
        subject=row.subject,
        raw_sha256=row.raw_sha256,
        attempts=row.attempts,
        next_attempt_at=row.next_attempt_at,
        error_code=row.error_code,
        last_error=row.last_error,
        last_reply=row.last_reply,
        resets_at=row.resets_at,
        sent_at=row.sent_at,
        message_pk=row.message_pk,
        created_at=row.created_at,
    )


def _row(session: Session, outbound_id: int) -> OutboundMessage:
    row = session.get(OutboundMessage, outbound_id)
    if row is None:
        raise NotFound(f"outbound message {outbound_id} not found")
    return row


def get_outbound(session: Session, outbound_id: int) -> OutboundRecord:
    """Return one send (raises ``NotFound``)."""
    return _record(_row(session, outbound_id))


def find_by_idempotency_key(session: Session, key: str) -> OutboundRecord | None:
    """Return the send created with ``key``, or None."""
    row = session.scalar(sa.select(OutboundMessage).where(OutboundMessage.idempotency_key == key))
    return _record(row) if row is not None else None


def enqueue(session: Session, new: NewOutbound, now: datetime) -> OutboundRecord:
    """Insert a send and return it; ``next_attempt_at`` = ``now`` for a queued one.

    The caller checks ``find_by_idempotency_key`` first in the same
    transaction; a concurrent duplicate fails on the unique key
    (``IntegrityError``) and the caller re-reads.
    """
    row = OutboundMessage(
        user_id=new.user_id,
        subaccount_id=new.subaccount_id,
        mailbox_id=new.mailbox_id,
        contact_id=new.contact_id,
        kind=new.kind,
        state=new.state,
        route=new.route,
        idempotency_key=new.idempotency_key,
        message_id=new.message_id,
        recipients=list(new.recipients),
        subject=new.subject,
        raw_sha256=new.raw_sha256,
        attempts=0,
        next_attempt_at=now if new.state == OutboundState.QUEUED else None,
        error_code=new.error_code,
        last_error=new.last_error,
        resets_at=new.resets_at,
        created_at=now,
        updated_at=now,
    )
    session.add(row)
    session.flush()
    return _record(row)


def mark_sending(session: Session, outbound_id: int, now: datetime) -> OutboundRecord | None:
    """Record an attempt (state ``sending``, attempts + 1) before SMTP DATA.

    One conditional UPDATE: only a ``queued`` row whose ``next_attempt_at``
    ≤ ``now`` is taken, so a send put back for a retry never goes out
    before its backoff ends, whoever asks (``process(id)`` included).

    Returns:
        The row as marked, or None when it is not ``queued`` (another
        worker took it, or it is done) or not yet due.
    """
    done = session.execute(
        sa.update(OutboundMessage)
        .where(
            OutboundMessage.id == outbound_id,
            OutboundMessage.state == OutboundState.QUEUED,
            OutboundMessage.next_attempt_at <= now,
        )
        .values(
            state=OutboundState.SENDING,
            attempts=OutboundMessage.attempts + 1,
            updated_at=now,
        )
    )
    if done.rowcount != 1:  # type: ignore[attr-defined]
        return None
    return get_outbound(session, outbound_id)


def mark_sent(
    session: Session,
    outbound_id: int,
    now: datetime,
    *,
    reply: str,
    provider_message_id: MessageId | None,
    message_pk: int | None,
    note: str | None = None,
) -> None:
    """Record acceptance by the server (state ``sent``, ``sent_at`` = now).

    Args:
        note: kept in ``last_error`` of the ``sent`` row (``error_code``
            stays None): what went wrong after the acceptance, e.g. the
            Sent copy that could not be filed (R18); None clears it.
    """
    row = _row(session, outbound_id)
    row.state = OutboundState.SENT
    row.sent_at = now
    row.last_reply = reply
    row.provider_message_id = provider_message_id
    row.message_pk = message_pk
    row.next_attempt_at = None
    row.last_error = note
    row.error_code = None
    row.updated_at = now


def mark_failed(
    session: Session,
    outbound_id: int,
    now: datetime,
    *,
    code: str,
    error: str,
    reply: str | None = None,
) -> None:
    """Give up on a send (state ``failed``): kept with its code and error (R17: never lost)."""
    row = _row(session, outbound_id)
    row.state = OutboundState.FAILED
    row.error_code = code
    row.last_error = error
    row.last_reply = reply
    row.next_attempt_at = None
    row.updated_at = now


def release_sending(session: Session, outbound_id: int, now: datetime) -> None:
    """Undo ``mark_sending`` of a send whose attempt never started (``sending → queued``).

    For a send marked ahead of its turn when the run stopped before its
    MAIL FROM: the attempt is not counted, ``next_attempt_at`` is kept.
    """
    session.execute(
        sa.update(OutboundMessage)
        .where(OutboundMessage.id == outbound_id, OutboundMessage.state == OutboundState.SENDING)
        .values(
            state=OutboundState.QUEUED,
            attempts=OutboundMessage.attempts - 1,
            updated_at=now,
        )
    )


def schedule_retry(
    session: Session,
    outbound_id: int,
    now: datetime,
    *,
    next_attempt_at: datetime,
    error: str,
    reply: str | None = None,
) -> None:
    """Put a send back in ``queued`` after a transient failure."""
    row = _row(session, outbound_id)
    row.state = OutboundState.QUEUED
    row.next_attempt_at = next_attempt_at
    row.last_error = error
    row.last_reply = reply
    row.updated_at = now


def due_outbound(session: Session, now: datetime, limit: int = 100) -> tuple[int, ...]:
    """Return ids of queued sends whose ``next_attempt_at`` ≤ ``now``, oldest first."""
    return tuple(
        session.scalars(
            sa.select(OutboundMessage.id)
            .where(
                OutboundMessage.state == OutboundState.QUEUED,
                OutboundMessage.next_attempt_at <= now,
            )
            .order_by(OutboundMessage.next_attempt_at, OutboundMessage.id)
            .limit(limit)
        )
    )


FILES_OWN_SENT_COPY = (Provider.GMAIL, Provider.OUTLOOK)
"""Providers that file the Sent copy themselves (R18): their Sent folder always tells."""


def due_outbound_markable(
    session: Session, now: datetime, limit: int = 100
) -> tuple[tuple[int, bool], ...]:
    """Return ``(id, may be marked ahead)`` of queued sends due at ``now``, oldest first.

    Same rows and order as ``due_outbound``. A send may be marked
    ``sending`` ahead of its turn only when ``reconcile`` could tell, after
    a crash, that it was never submitted: a mailbox send whose provider
    files its own Sent copy (``FILES_OWN_SENT_COPY``). Relay sends have
    nothing to ask and generic IMAP mailboxes may have no \\Sent folder:
    both would turn a crash before the attempt into ``outcome_unknown``.
    """
    rows = session.execute(
        sa.select(OutboundMessage.id, OutboundMessage.route, Mailbox.provider)
        .outerjoin(Mailbox, Mailbox.id == OutboundMessage.mailbox_id)
        .where(
            OutboundMessage.state == OutboundState.QUEUED,
            OutboundMessage.next_attempt_at <= now,
        )
        .order_by(OutboundMessage.next_attempt_at, OutboundMessage.id)
        .limit(limit)
    )
    return tuple(
        (row.id, row.route == ROUTE_MAILBOX and row.provider in FILES_OWN_SENT_COPY) for row in rows
    )


def in_sending(session: Session) -> tuple[OutboundRecord, ...]:
    """Return every send left in ``sending`` (to reconcile after a restart)."""
    rows = session.scalars(
        sa.select(OutboundMessage)
        .where(OutboundMessage.state == OutboundState.SENDING)
        .order_by(OutboundMessage.id)
    )
    return tuple(_record(r) for r in rows)


# ------------------------------------------------------------------ webhooks


@dataclass(frozen=True, slots=True, kw_only=True)
class WebhookRecord:
    """One pending webhook call."""

    id: int
    event: str
    payload: dict[str, Any]
    url: str
    attempts: int


def add_webhook_events(
    session: Session, event: str, payload: dict[str, Any], urls: Sequence[str], now: datetime
) -> None:
    """Queue one ``pending`` delivery of ``event`` per URL (nothing when ``urls`` is empty)."""
    for url in urls:
        session.add(
            WebhookDelivery(
                event=event,
                payload=payload,
                url=url,
                attempts=0,
                next_attempt_at=now,
                state=WebhookState.PENDING,
                created_at=now,
            )
        )


def due_webhooks(session: Session, now: datetime, limit: int = 100) -> tuple[WebhookRecord, ...]:
    """Return pending deliveries due at ``now``, oldest first."""
    rows = session.scalars(
        sa.select(WebhookDelivery)
        .where(
            WebhookDelivery.state == WebhookState.PENDING, WebhookDelivery.next_attempt_at <= now
        )
        .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
        .limit(limit)
    )
    return tuple(
        WebhookRecord(
            id=r.id, event=r.event, payload=dict(r.payload), url=r.url, attempts=r.attempts
        )
        for r in rows
    )


def record_webhook_attempt(
    session: Session,
    delivery_id: int,
    *,
    state: WebhookState,
    next_attempt_at: datetime,
    error: str | None,
) -> None:
    """Record one delivery attempt: ``delivered``, ``failed``, or ``pending`` again."""
    row = session.get(WebhookDelivery, delivery_id)
    if row is None:
        raise NotFound(f"webhook delivery {delivery_id} not found")
    row.attempts += 1
    row.state = state
    row.next_attempt_at = next_attempt_at
    row.last_error = error
