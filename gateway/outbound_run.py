"""One run of the outbound queue: due sends attempted in order on shared SMTP sessions.

Edge module. A ``SendRun`` owns what the sends of one run share (open
``Submissions`` by server and login, targets looked up once), each
attempt (submission, then the Sent APPEND where the provider files no
copy, R18) and the order of the database work around the attempts. It
does not decide what an outcome means (``gateway.outbound`` and
``gateway.outbound_settle`` supply the commits), nor route, compose or
reconcile.

Per send, every step committed before the next (docs/sending.md)::

    queued ──mark_sending──> sending ──MAIL FROM … DATA … reply──> Outcome.commit
                                                                  (sent | queued again | failed)

After a 250 the send is ``sent``, whatever follows: a failed Sent APPEND
(R18, generic IMAP) is logged and recorded with the ``sent`` commit, never
raised. A reply lost after the end of the data (``OutcomeUnknown``) is
settled like a crash after DATA (``unknown``: the Sent folder, else
``outcome_unknown``), never retried blindly.

Overlaps: while send N is on the wire the database thread commits send
N-1's outcome and, when send N+1 is a Gmail/Outlook **mailbox** send,
N+1's ``sending`` (marked ahead). Relay and generic IMAP sends are marked
only just before their own attempt: ``reconcile`` cannot ask a relay, nor
a mailbox without a \\Sent folder, and would give up on a send that was
never tried (``outcome_unknown``). A run that stops early (an error,
or cancellation at shutdown) releases every row it marked but did not
attempt (``release_sending``: ``queued`` again, attempt not counted)
before QUIT. A crash leaves such rows ``sending``; ``reconcile`` settles
them at start-up like any crash during an attempt.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.orm import Session

from gateway import outbound_routes as routes
from gateway.errors import AuthError, PermanentError, TransientError
from gateway.mailboxes import MailboxError
from gateway.sent_folder import append_sent_copy
from gateway.smtp.sender import ClientContexts, OutcomeUnknown, Submissions, SubmitResult
from storage.blobs import BlobStore
from storage.db import Database
from storage.repos import outbound as repo

log = logging.getLogger(__name__)

Due = tuple[int, bool]
"""``(outbound id, may be marked ahead)``, as ``repo.due_outbound_markable`` returns."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """What one attempt ended with: ``commit(session, now)`` records it (sent, retry or failed)."""

    commit: Commit
    now: datetime


Commit = Callable[[Session, datetime], None]
"""``commit(session, now)``: records one outcome in the caller's transaction."""
TargetOf = Callable[[repo.OutboundRecord], Awaitable[routes.Target]]
"""``target(record)``: server, login and IMAP access of a send (raises ``MailboxError``)."""
SentCommit = Callable[[repo.OutboundRecord, bytes, SubmitResult, str | None], Commit]
"""``sent(record, content, result, copy_error)``: the commit of an accepted send;
``copy_error`` says why the Sent copy (R18) was not filed, or is None."""
FailedCommit = Callable[[repo.OutboundRecord, Exception], Commit]
"""``failed(record, exc)``: the commit of a failed attempt (retry or give up)."""
UnknownCommit = Callable[[repo.OutboundRecord, routes.Target, OutcomeUnknown], Awaitable[Commit]]
"""``unknown(record, target, exc)``: settle a lost reply (may ask the Sent folder first)."""


class SendRun:
    """The sends of one queue run, attempted one after another; use once.

    A target (server, login, mailbox state check) is looked up once per
    (route, mailbox, user) and run; a run lasts seconds, and a mailbox
    disconnected meanwhile fails at the server (AUTH) like any other.

    Args:
        db: the process's database (SQLite: one thread, calls in order).
        tls: shared TLS client contexts.
        blobs: where each send's composed bytes are (read, resent unchanged).
        target, sent, failed, unknown: from ``OutboundService`` (see the aliases above).
        clock: aware UTC now.
    """

    def __init__(
        self,
        db: Database,
        tls: ClientContexts,
        blobs: BlobStore,
        *,
        target: TargetOf,
        sent: SentCommit,
        failed: FailedCommit,
        unknown: UnknownCommit,
        clock: Callable[[], datetime],
    ) -> None:
        """Start with no connection, no target and nothing marked."""
        self._db = db
        self._blobs = blobs
        self._target_of = target
        self._sent = sent
        self._failed = failed
        self._unknown = unknown
        self._clock = clock
        self._submissions = Submissions(tls)
        self._targets: dict[tuple[str | None, int | None, int], routes.Target] = {}
        self._marking: dict[int, asyncio.Future[repo.OutboundRecord | None]] = {}

    async def run(self, due: Sequence[Due]) -> None:
        """Attempt each of ``due`` in order, commit every outcome, then QUIT every session.

        Args:
            due: ``(id, may be marked ahead)`` pairs, oldest first; a row no longer
                ``queued`` when its turn comes (another worker took it) is
                skipped.

        Raises:
            Exception: an unexpected error of one attempt (e.g. its blob is
                missing) stops the run: that row stays ``sending`` for
                ``reconcile``, earlier outcomes are committed and the row
                marked ahead is released. ``CancelledError`` likewise.
        """
        outcome: Outcome | None = None
        try:
            for index, (outbound_id, _ahead) in enumerate(due):
                previous, outcome = outcome, None  # _attempt commits it, even when it raises
                outcome = await self._attempt(outbound_id, previous, _mark_ahead(due, index))
        finally:
            await self._end(outcome)

    async def _attempt(
        self, outbound_id: int, previous: Outcome | None, premark: int | None
    ) -> Outcome | None:
        """``queued → sending`` committed, then one submission; return the outcome to commit.

        Meanwhile, on the database thread and in this order: ``previous``
        (the last send's outcome) is committed, then ``premark``'s
        ``sending``; both are awaited before returning. Returns None when
        the row was not ``queued`` (another worker took it).
        """
        marking = self._marking.pop(outbound_id, None) or self._mark(outbound_id)
        committing = (
            asyncio.ensure_future(self._db.run(previous.commit, previous.now))
            if previous is not None
            else None
        )
        outcome: Outcome | None = None
        try:
            record = await self._marked(outbound_id, marking)
            if premark is not None:
                self._marking[premark] = self._mark(premark)
            if record is not None:
                outcome = await self._submit(record)
        finally:
            if committing is not None:
                try:
                    await asyncio.shield(committing)
                except BaseException:
                    if outcome is not None:  # this send's outcome is not lost with the other
                        await self._db.run(outcome.commit, outcome.now)
                    raise
        return outcome

    async def _marked(
        self, outbound_id: int, marking: asyncio.Future[repo.OutboundRecord | None]
    ) -> repo.OutboundRecord | None:
        """Await ``marking``; if this task is cancelled meanwhile, leave it to ``_end``.

        ``mark_sending`` commits on the database thread even when its awaiter
        is cancelled, so the mark is shielded and handed back: ``_end``
        waits for it and releases the row (no MAIL FROM was sent).
        """
        try:
            return await asyncio.shield(marking)
        except asyncio.CancelledError:
            self._marking[outbound_id] = marking
            raise

    async def _submit(self, record: repo.OutboundRecord) -> Outcome:
        """Submit a ``sending`` row, APPEND the Sent copy if needed; return the outcome.

        Edge errors (``TransientError``, ``PermanentError``, ``AuthError``,
        ``MailboxError``) become the failed outcome, a lost reply
        (``OutcomeUnknown``) the ``unknown`` settlement; after a 250 the
        outcome is ``sent`` whatever the APPEND does. Anything else (a
        missing blob) propagates and stops the run.
        """
        content = await asyncio.to_thread(self._blobs.get, record.raw_sha256 or "")
        try:
            target = await self._target(record)
            try:
                result = await self._submissions.send(
                    target.server,
                    target.login,
                    envelope_sender=target.envelope_sender,
                    envelope_recipients=record.recipients,
                    content=content,
                    message_id=record.message_id,
                )
            except OutcomeUnknown as exc:
                return Outcome(commit=await self._unknown(record, target, exc), now=self._clock())
        except (TransientError, PermanentError, AuthError, MailboxError) as exc:
            return Outcome(commit=self._failed(record, exc), now=self._clock())
        copy_error = await self._append_copy(record, target, content)
        return Outcome(commit=self._sent(record, content, result, copy_error), now=self._clock())

    async def _append_copy(
        self, record: repo.OutboundRecord, target: routes.Target, content: bytes
    ) -> str | None:
        """APPEND the Sent copy where the provider files none (R18); return why it failed, or None.

        Runs after the 250: the message is delivered, so no error may stop
        the ``sent`` commit (else the row stays ``sending`` and ``reconcile``,
        not finding the copy, would send it again). Not retried: a lost
        APPEND answer could leave two copies, and the send is already stored
        in the conversation (docs/sending.md).
        """
        if target.append_access is None:
            return None
        try:
            await asyncio.to_thread(append_sent_copy, target.append_access, content, self._clock())
        except Exception as exc:  # any failure: the 250 stands (see above)
            log.warning(
                "Sent copy not filed",
                extra={"message_id": record.message_id, "reason": type(exc).__name__},
                exc_info=True,
            )
            return f"R18: Sent copy not filed: {type(exc).__name__}: {exc}"
        return None

    async def _target(self, record: repo.OutboundRecord) -> routes.Target:
        key = (record.route, record.mailbox_id, record.user_id)
        target = self._targets.get(key)
        if target is None:
            target = self._targets[key] = await self._target_of(record)
        return target

    def _mark(self, outbound_id: int) -> asyncio.Future[repo.OutboundRecord | None]:
        return asyncio.ensure_future(self._db.run(repo.mark_sending, outbound_id, self._clock()))

    async def _end(self, outcome: Outcome | None) -> None:
        """Commit the last outcome, queue again any send marked but not attempted, QUIT."""
        try:
            if outcome is not None:
                await self._db.run(outcome.commit, outcome.now)
        finally:
            try:
                for outbound_id, marking in self._marking.items():
                    if await marking is not None:
                        await self._db.run(repo.release_sending, outbound_id, self._clock())
            finally:
                await self._submissions.close()


def _mark_ahead(due: Sequence[Due], index: int) -> int | None:
    """Return the id to mark while ``due[index]`` is on the wire: the next, if it may be."""
    following = due[index + 1] if index + 1 < len(due) else None
    return following[0] if following and following[1] else None
