"""Settle sends whose outcome is unknown (a crash, a lost reply) against the Sent folder.

Edge module. A ``Settler`` chooses, per send, which commit settles it:
``sent`` (found in the Sent folder), queued again (absent, and the absence
proves it was not accepted), or ``failed`` / ``outcome_unknown`` (nobody
can tell). It does not submit, retry nor say what ``sent`` or ``failed``
write (``gateway.outbound`` supplies those commits), and never resends.

Crash policy (``reconcile``, docs/sending.md "Crash policy"): a row found
in ``sending`` at start-up is looked up in the mailbox's Sent folder by
Message-ID (``UID SEARCH HEADER Message-ID``, RFC 9051 §6.4.4): found →
``sent``; absent → queued again (due now) for Gmail and Outlook, which file
the Sent copy themselves when they accept. A relay send has no Sent folder
to ask, a mailbox without a \\Sent folder (RFC 6154) cannot tell, and a
generic IMAP send absent from Sent proves nothing (its copy is ours to
APPEND after the 250, which the crash may have come before), so all three
are ``failed`` with ``outcome_unknown`` rather than risk a second copy
(issue 5: a crash "does not send twice"). A row whose mailbox or IMAP
server cannot be reached now stays ``sending`` for the next start-up.

A reply lost after the end of the data (``OutcomeUnknown``,
docs/sending.md "Reply lost after DATA") is settled the same way at once
(``reply_lost``); an IMAP error during that search gives up
(``outcome_unknown``) instead of waiting for a restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime

from sqlalchemy.orm import Session

from gateway import outbound_routes as routes
from gateway.errors import TransientError
from gateway.mailboxes import MailboxError
from gateway.outbound_run import Commit, SentCommit, TargetOf
from gateway.sent_folder import sent_copy_exists
from gateway.smtp.sender import OutcomeUnknown, SubmitResult
from storage.blobs import BlobStore
from storage.db import Database
from storage.repos import outbound as repo

log = logging.getLogger(__name__)

GiveUpCommit = Callable[[repo.OutboundRecord, str], Commit]
"""``give_up(record, error)``: the commit of ``failed`` / ``outcome_unknown`` with ``error``."""


class Settler:
    """Settle the sends whose outcome is unknown; one per ``OutboundService``.

    Args:
        db: the process's database.
        blobs: where each send's composed bytes are (the conversation copy
            of a send found in Sent).
        target, sent, give_up: from ``OutboundService`` (``gateway.outbound_run``'s
            ``TargetOf`` and ``SentCommit``, and ``GiveUpCommit`` above).
        clock: aware UTC now.
    """

    def __init__(
        self,
        db: Database,
        blobs: BlobStore,
        *,
        target: TargetOf,
        sent: SentCommit,
        give_up: GiveUpCommit,
        clock: Callable[[], datetime],
    ) -> None:
        """Keep the collaborators; nothing is read or opened here."""
        self._db = db
        self._blobs = blobs
        self._target = target
        self._sent = sent
        self._give_up = give_up
        self._clock = clock

    async def reconcile(self) -> int:
        """Settle every send left in ``sending`` by a crash; return how many were settled.

        Per row (module docstring): relay → ``failed``/``outcome_unknown``;
        mailbox → the Sent folder is searched: found → ``sent``, absent →
        queued again (due now), no \\Sent folder → ``outcome_unknown``. A
        row whose mailbox or IMAP server cannot be reached now
        (``TransientError``, ``OSError``, ``MailboxError``) is left
        ``sending`` for the next start and not counted (logged
        ``reconcile deferred``).
        """
        settled = 0
        for record in await self._db.read(repo.in_sending):
            try:
                settled += await self._reconcile_one(record)
            except (TransientError, OSError, MailboxError):
                log.warning("reconcile deferred", extra={"message_id": record.message_id})
        return settled

    async def _reconcile_one(self, record: repo.OutboundRecord) -> int:
        if record.route != repo.ROUTE_MAILBOX:
            error = "crashed during a relay send; not resent to avoid a second copy"
            await self._db.run(self._give_up(record, error), self._clock())
            return 1
        commit = await self.settle(record, await self._target(record), reply_lost=False)
        await self._db.run(commit, self._clock())
        return 1

    async def reply_lost(
        self, record: repo.OutboundRecord, target: routes.Target, exc: OutcomeUnknown
    ) -> Commit:
        """Return the commit that settles a lost reply now (``SendRun``'s ``unknown``).

        Args:
            record: the ``sending`` row whose end-of-data reply was lost.
            target: its server and IMAP access.
            exc: what the submission raised; its text goes into ``last_error``
                when the Sent folder cannot be searched.

        Returns:
            ``settle(…, reply_lost=True)``'s commit; when the search fails
            (``TransientError``, ``OSError``) the ``outcome_unknown`` commit
            instead (at most once), never raised.
        """
        try:
            return await self.settle(record, target, reply_lost=True)
        except (TransientError, OSError) as search_exc:
            log.warning(
                "Sent folder not searched after a lost reply",
                extra={"message_id": record.message_id, "reason": type(search_exc).__name__},
            )
            error = f"{exc}; Sent folder not searched ({type(search_exc).__name__})"
            return self._give_up(record, error)

    async def settle(
        self, record: repo.OutboundRecord, target: routes.Target, *, reply_lost: bool
    ) -> Commit:
        """Return the commit that settles a send whose outcome is unknown.

        Args:
            record: the ``sending`` row.
            target: its server and IMAP access.
            reply_lost: True when the end of the data was written and the
                reply lost (not a crash at an unknown point).

        Returns:
            A commit (``commit(session, now)``): ``sent`` (found in Sent,
            reply ``250 reconciled: found in Sent``), queued again due at
            ``now`` (absent from a provider-filed Sent folder), or
            ``outcome_unknown`` (no search access, no \\Sent folder, or a
            send whose Sent copy is ours to APPEND). Nothing is written until
            it is run.

        Raises:
            TransientError: the Sent folder could not be searched.
        """
        access = target.search_access
        if access is None:
            return self._give_up(record, "relay send: nothing to ask")
        found = await asyncio.to_thread(sent_copy_exists, access, record.message_id)
        if found:
            content = await asyncio.to_thread(self._blobs.get, record.raw_sha256 or "")
            result = SubmitResult(
                code=250, reply="reconciled: found in Sent", provider_message_id=None
            )
            return self._sent(record, content, result, None)
        if found is None:
            return self._give_up(record, "no \\Sent folder to ask; not resent")
        if target.append_access is not None:
            event = "reply lost after DATA" if reply_lost else "crashed while sending"
            error = f"{event}; the Sent copy is ours to APPEND, so its absence proves nothing"
            return self._give_up(record, f"{error}; not resent")
        return _requeue_commit(record, reply_lost=reply_lost)


def _requeue_commit(record: repo.OutboundRecord, *, reply_lost: bool) -> Commit:
    def requeue(session: Session, now: datetime) -> None:
        reason = "reply lost after DATA" if reply_lost else "requeued after crash"
        error = f"{reason}; not in the Sent folder"
        repo.schedule_retry(session, record.id, now, next_attempt_at=now, error=error)

    return requeue
