"""The durable outbound queue: CRM sends through the user's mailbox or the relay (R1, R16-R18).

Edge service. A send is first a committed ``queued`` row (with the composed
bytes in the blob store), then ``sending`` (the attempt recorded before the
SMTP session), then ``sent`` or ``failed`` with the server's reply; see the
state diagram in ``storage/repos/outbound.py`` and docs/sending.md. It does
not compose (``ingest.compose``) nor judge limits (``ingest.limits``); a
queue run's attempts (shared SMTP sessions, rows marked ahead, their order
of commits) are ``gateway.outbound_run``'s.

Crash policy (``reconcile``) and lost replies (``OutcomeUnknown``): the
send is settled against the mailbox's Sent folder by
``gateway.outbound_settle``, never resent blindly; this module supplies
the ``sent`` and ``failed`` / ``outcome_unknown`` commits it chooses from.
"""

from __future__ import annotations

import functools
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.parser import BytesHeaderParser
from email.utils import getaddresses
from typing import Any

from sqlalchemy.orm import Session
from tenacity import RetryCallState, Retrying, wait_exponential_jitter

from gateway import outbound_routes as routes
from gateway.config import Settings
from gateway.errors import AuthError, TransientError
from gateway.mailboxes import MailboxError, MailboxService
from gateway.outbound_run import Commit, SendRun
from gateway.outbound_settle import Settler
from gateway.smtp.sender import ClientContexts, SubmitResult
from ingest.compose import Draft, OutgoingAttachment, ParentRef, compose
from ingest.limits import (
    QUOTA_WINDOW,
    AttachmentSize,
    LimitRefusal,
    SendRequestSize,
    check_limits,
)
from ingest.types import LogEntry, MessageId, Outcome, Source, SubaccountId
from storage.blobs import BlobStore
from storage.db import Database
from storage.models.enums import OutboundKind, OutboundState
from storage.repos import outbound as repo
from storage.repos import outbound_lookups as lookups
from storage.repos import outbound_quota as quota
from storage.repos.directory import resolve_subaccount
from storage.repos.mailboxes import member_user_id
from storage.repos.sync_log import LogContext, add_log_rows

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 8
RETRY_INITIAL_SECONDS = 30.0
SEND_FAILED_EVENT = "message.send_failed"
MAILBOX_NOT_CONNECTED = "mailbox_not_connected"
RELAY_NOT_CONFIGURED = "relay_not_configured"
CONTACT_NOT_FOUND = "contact_not_found"
REJECTED = "rejected"
AUTH_FAILED = "auth_failed"
OUTCOME_UNKNOWN = "outcome_unknown"
RETRIES_EXHAUSTED = "retries_exhausted"
R18 = "R18"


def _utcnow() -> datetime:
    return datetime.now(UTC)


class SendRejected(Exception):
    """A send request that cannot be queued at all (nothing is stored)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True, kw_only=True)
class SendRequest:
    """One CRM send (``mailgate send`` / ``POST /api/v1/messages``).

    Attributes:
        user, subaccount: the CRM user (email or id) and sub-account (name or id).
        to, cc: recipient addresses; ``to[0]`` is the contact (individual sends).
        in_reply_to: Message-ID (no brackets) of the message answered, or None.
        idempotency_key: a retried request with the same key returns the first row.
    """

    user: str | int
    subaccount: str | int
    to: tuple[str, ...]
    cc: tuple[str, ...] = ()
    subject: str
    text: str | None = None
    html: str | None = None
    attachments: tuple[OutgoingAttachment, ...] = ()
    kind: OutboundKind = OutboundKind.INDIVIDUAL
    in_reply_to: MessageId | None = None
    idempotency_key: str | None = None


class OutboundService:
    """Queue, send, retry and reconcile CRM sends. One instance per process.

    Args:
        db, settings, mailboxes, blobs: the process's shared objects.
        clock: aware UTC now (injected in tests).
    """

    def __init__(
        self,
        db: Database,
        settings: Settings,
        mailboxes: MailboxService,
        blobs: BlobStore,
        *,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self._db = db
        self._settings = settings
        self._mailboxes = mailboxes
        self._blobs = blobs
        self._clock = clock
        self._tls = ClientContexts()
        self._wait = wait_exponential_jitter(
            multiplier=RETRY_INITIAL_SECONDS,
            jitter=RETRY_INITIAL_SECONDS,
            max=float(settings.sync.reconnect_backoff_max_seconds),
        )
        self.webhook_urls = tuple(h.url for h in settings.webhooks if SEND_FAILED_EVENT in h.events)
        self._settler = Settler(
            db,
            blobs,
            target=self._target,
            sent=self._sent_commit,
            give_up=self._give_up_unknown_commit,
            clock=clock,
        )

    # ------------------------------------------------------------ enqueue

    async def send(self, request: SendRequest) -> repo.OutboundRecord:
        """Queue ``request`` and make the first attempt now; return the row afterwards."""
        record = await self.enqueue(request)
        if record.state == OutboundState.QUEUED and record.attempts == 0:
            record = await self.process(record.id)
        return record

    async def enqueue(self, request: SendRequest) -> repo.OutboundRecord:
        """Commit the send as ``queued`` (or ``failed`` when refused: R16, R17).

        Raises:
            SendRejected: ``contact_not_found`` (individual send to a non-contact).
            storage.errors.NotFound: unknown user or sub-account.
        """
        now = self._clock()
        return await self._db.run(self._enqueue, request, now)

    def _enqueue(self, session: Session, request: SendRequest, now: datetime) -> Any:
        if request.idempotency_key is not None:
            existing = repo.find_by_idempotency_key(session, request.idempotency_key)
            if existing is not None:
                return existing
        sub_id = resolve_subaccount(session, str(request.subaccount))
        user_id = member_user_id(session, request.user, sub_id)
        route = routes.choose_route(session, self._settings, request.kind, user_id, sub_id)
        contact_id = lookups.find_contact(session, sub_id, request.to[0]) if request.to else None
        if request.kind == OutboundKind.INDIVIDUAL and contact_id is None:
            raise SendRejected(CONTACT_NOT_FOUND, f"{request.to[:1]} is not a contact")
        raw, message_id = self._compose(session, request, user_id, route)
        refusal = self._check(session, route, request, raw, now)
        new = repo.NewOutbound(
            user_id=user_id,
            subaccount_id=sub_id,
            mailbox_id=route.mailbox.id if route.mailbox else None,
            contact_id=contact_id,
            kind=request.kind,
            route=route.name,
            idempotency_key=request.idempotency_key,
            message_id=message_id,
            recipients=_unique((*request.to, *request.cc)),
            subject=request.subject,
            raw_sha256=self._blobs.put(raw),
            state=OutboundState.FAILED if route.error or refusal else OutboundState.QUEUED,
            error_code=route.error or (refusal.code.value if refusal else None),
            last_error=route.reason or (refusal.reason if refusal else None),
            resets_at=refusal.resets_at if refusal else None,
        )
        record = repo.enqueue(session, new, now)
        if record.state == OutboundState.FAILED:
            self._emit_failed(session, record, now)
        return record

    def _compose(
        self, session: Session, request: SendRequest, user_id: int, route: routes.Route
    ) -> tuple[bytes, MessageId]:
        name, email = lookups.user_name_and_email(session, user_id)
        sender = route.mailbox.address if route.mailbox else email
        domain = sender.rpartition("@")[2] or "mailgate.invalid"
        message_id = MessageId(f"{secrets.token_hex(16)}@{domain}")
        draft = Draft(
            from_name=name,
            from_address=sender,
            to=request.to,
            cc=request.cc,
            subject=request.subject,
            text=request.text,
            html=request.html,
            attachments=request.attachments,
            message_id=message_id,
            date_at=self._clock(),
            parent=self._parent(session, request.in_reply_to),
        )
        return compose(draft), message_id

    def _parent(self, session: Session, in_reply_to: MessageId | None) -> ParentRef | None:
        if in_reply_to is None:
            return None
        parent = lookups.find_parent(session, in_reply_to)
        if parent is None:
            return ParentRef(message_id=in_reply_to)
        headers = BytesHeaderParser().parsebytes(self._blobs.get(parent.raw_sha256))
        return ParentRef(
            message_id=in_reply_to,
            references=parent.references,
            thread_index=headers.get("Thread-Index"),
        )

    def _check(
        self, session: Session, route: routes.Route, request: SendRequest, raw: bytes, now: datetime
    ) -> LimitRefusal | None:
        if route.mailbox is None:
            return None  # R17 limits are the providers'; the relay has none here
        limits = routes.limits_of(self._settings, route.mailbox.provider)
        since = now - QUOTA_WINDOW
        recent: tuple[datetime, ...] = ()  # below the cap the times change nothing
        cap = limits.daily_send_limit
        if cap is not None and quota.count_sends_at(session, route.mailbox.id, since, now) >= cap:
            recent = quota.counted_sends_at(session, route.mailbox.id, since)
        size = SendRequestSize(
            recipient_count=len(_unique((*request.to, *request.cc))),
            message_bytes=len(raw),
            attachments=tuple(
                AttachmentSize(filename=a.filename, size_bytes=len(a.payload))
                for a in request.attachments
            ),
        )
        return check_limits(limits, size, recent, now)

    # ------------------------------------------------------------ attempts

    async def process_due(self, limit: int = 100) -> int:
        """Attempt every queued send that is due, oldest first; return how many were due.

        One ``outbound_run.SendRun``: sends through the same server and
        login share one SMTP session; each keeps its own ``sending`` commit
        before its MAIL FROM and its own outcome commit after the reply,
        overlapped with the neighbouring sends' (see that module for what
        a crash or an early stop leaves behind).

        Args:
            limit: at most this many sends in this run (≥ 1).

        Raises:
            Exception: an unexpected error of one attempt stops the run
                (edge errors are outcomes, never raised).
        """
        due = await self._db.read(repo.due_outbound_markable, self._clock(), limit)
        await self._run().run(due)
        return len(due)

    async def process(self, outbound_id: int) -> repo.OutboundRecord:
        """Make one attempt of a queued send, record its outcome and return the row.

        A row that is not ``queued`` (another worker has it, or it is done)
        or not yet due (``next_attempt_at`` in the future: a retry waits
        out its backoff) is returned as it is. Raises
        ``storage.errors.NotFound`` for an unknown id.
        """
        await self._run().run(((outbound_id, False),))
        return await self._db.read(repo.get_outbound, outbound_id)

    def _run(self) -> SendRun:
        return SendRun(
            self._db,
            self._tls,
            self._blobs,
            target=self._target,
            sent=self._sent_commit,
            failed=lambda record, exc: functools.partial(
                self._failed_attempt, record=record, exc=exc
            ),
            unknown=self._settler.reply_lost,
            clock=self._clock,
        )

    def _sent_commit(
        self,
        record: repo.OutboundRecord,
        content: bytes,
        result: SubmitResult,
        copy_error: str | None,
    ) -> Commit:
        return functools.partial(
            self._finish_sent, record=record, content=content, result=result, copy_error=copy_error
        )

    async def _target(self, record: repo.OutboundRecord) -> routes.Target:
        name_email = await self._db.read(lookups.user_name_and_email, record.user_id)
        return await routes.target_of(self._settings, self._mailboxes, record, name_email[1])

    def _failed_attempt(
        self, session: Session, now: datetime, *, record: repo.OutboundRecord, exc: Exception
    ) -> None:
        log.warning(
            "send attempt failed",
            extra={"message_id": record.message_id, "reason": type(exc).__name__},
        )
        if isinstance(exc, TransientError) and record.attempts < MAX_ATTEMPTS:
            state = RetryCallState(Retrying(), None, (), {})
            state.attempt_number = record.attempts
            next_at = now + timedelta(seconds=self._wait(state))
            repo.schedule_retry(session, record.id, now, next_attempt_at=next_at, error=str(exc))
            return
        code = {TransientError: RETRIES_EXHAUSTED, AuthError: AUTH_FAILED}.get(type(exc), REJECTED)
        if isinstance(exc, MailboxError):
            code = MAILBOX_NOT_CONNECTED
        repo.mark_failed(session, record.id, now, code=code, error=str(exc), reply=str(exc))
        self._emit_failed(session, repo.get_outbound(session, record.id), now)

    def _finish_sent(
        self,
        session: Session,
        now: datetime,
        *,
        record: repo.OutboundRecord,
        content: bytes,
        result: SubmitResult,
        copy_error: str | None = None,
    ) -> None:
        message_pk = None
        if record.route == repo.ROUTE_MAILBOX and record.kind == OutboundKind.INDIVIDUAL:
            message_pk = routes.store_conversation_copy(
                session, self._blobs, record, content, result.provider_message_id, now
            )
        repo.mark_sent(
            session,
            record.id,
            now,
            reply=f"{result.code} {result.reply}",
            provider_message_id=result.provider_message_id,
            message_pk=message_pk,
            note=copy_error,
        )
        if copy_error is not None:  # R18 not met: say so where operators look (mailgate log)
            context = LogContext(
                at=now,
                source=Source.CRM,
                mailbox_id=record.mailbox_id,
                message_pk=message_pk,
                message_id=record.message_id,
                raw_sha256=record.raw_sha256,
            )
            entry = LogEntry(
                rule=R18,
                reason=copy_error,
                outcome=Outcome.SKIPPED,
                subaccount_id=SubaccountId(record.subaccount_id),
            )
            add_log_rows(session, context, (entry,))
        log.info("message sent", extra={"message_id": record.message_id})

    def _emit_failed(self, session: Session, record: repo.OutboundRecord, now: datetime) -> None:
        payload = {
            "id": record.id,
            "message_id": record.message_id,
            "user_id": record.user_id,
            "subaccount_id": record.subaccount_id,
            "code": record.error_code,
            "error": record.last_error,
        }
        repo.add_webhook_events(session, SEND_FAILED_EVENT, payload, self.webhook_urls, now)

    # ------------------------------------------------------------ restart

    async def reconcile(self) -> int:
        """Settle every send left in ``sending`` by a crash; return how many were settled.

        Per row (docs/sending.md "Crash policy"; ``gateway.outbound_settle``):
        relay → ``failed``/``outcome_unknown``; mailbox → the Sent folder is
        searched: found → ``sent``, absent → queued again (due now), no
        \\Sent folder → ``outcome_unknown``. A row whose mailbox or IMAP
        server cannot be reached now is left ``sending`` for the next start.
        """
        return await self._settler.reconcile()

    def _give_up_unknown_commit(self, record: repo.OutboundRecord, error: str) -> Commit:
        def give_up(session: Session, now: datetime) -> None:
            repo.mark_failed(session, record.id, now, code=OUTCOME_UNKNOWN, error=error)
            self._emit_failed(session, repo.get_outbound(session, record.id), now)

        return give_up


def _unique(addresses: tuple[str, ...]) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for _name, addr in getaddresses(list(addresses)):
        if addr:
            seen.setdefault(addr, None)
    return tuple(seen)
