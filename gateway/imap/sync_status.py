"""One watcher's sync bookkeeping: ``last_sync_at``, ``sync_lag_seconds`` and ``last_error``.

Edge helper of ``watcher.FolderWatcher``: keeps the values in memory (for
``ImapSupervisor.status``) and writes them to the ``mailboxes`` row
(``record_sync``, ``record_sync_error``) and the lag histogram. It never
talks IMAP and never decides when a sync happened; the watcher tells it.
See docs/imap.md "Observability" and "Sync lag".
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime

from gateway.intake_result import IntakeResult, IntakeStatus
from gateway.observability import Metrics
from ingest.types import ImapOrigin, MailboxId, Provider
from storage.db import Database
from storage.repos.mailboxes import record_sync, record_sync_error

log = logging.getLogger(__name__)

SYNC_TOUCH_SECONDS = 60.0
"""A catch-up with nothing new writes ``last_sync_at`` (and lag 0.0) at most this often."""


class SyncStatus:
    """``last_sync_at``, ``last_lag_seconds`` and ``last_error`` of one watcher.

    Attributes:
        last_sync_at: aware UTC time of the last ``record_sync`` write, or None.
        last_lag_seconds: lag (seconds, ≥ 0) of the last chunk that stored a
            message with an INTERNALDATE, or None; 0.0 is not copied here
            after a quiet catch-up (it is the stored column's value only).
        last_error: the last backoff or suspension reason; None after a sync.
    """

    def __init__(
        self,
        *,
        db: Database,
        mailbox_id: MailboxId,
        provider: Provider,
        clock: Callable[[], datetime],
        metrics: Metrics | None,
    ) -> None:
        """Build empty bookkeeping for the ``mailboxes`` row ``mailbox_id``."""
        self.last_sync_at: datetime | None = None
        self.last_lag_seconds: float | None = None
        self.last_error: str | None = None
        self._db = db
        self._mailbox_id = mailbox_id
        self._provider = provider
        self._clock = clock
        self._metrics = metrics

    async def touch(self, *, force: bool, lag_seconds: float | None) -> None:
        """Write ``last_sync_at`` (and clear the error) after a commit or a quiet catch-up.

        Args:
            force: write even if the last write is under ``SYNC_TOUCH_SECONDS`` old.
            lag_seconds: the mailbox's ``sync_lag_seconds`` to store with it
                (docs/imap.md "Sync lag"): the lag of a committed chunk, 0.0
                after a catch-up that found nothing new, None to leave the
                stored value alone (after SELECT, a chunk that stored nothing).

        Raises:
            Whatever ``Database.run`` raises (the watcher backs off).
        """
        now = self._clock()
        last = self.last_sync_at
        if not force and last is not None and (now - last).total_seconds() < SYNC_TOUCH_SECONDS:
            return
        await self._db.run(record_sync, self._mailbox_id, at=now, lag_seconds=lag_seconds)
        self.last_sync_at = now
        self.last_error = None

    async def fail(self, error: str, log_fields: Mapping[str, object]) -> None:
        """Remember ``error`` and store it in ``mailboxes.last_error``, best effort.

        Never raises: the database may be what failed (logged as a warning).
        """
        self.last_error = error
        try:
            await self._db.run(record_sync_error, self._mailbox_id, error)
        except Exception:
            log.warning("could not store imap error", extra=dict(log_fields), exc_info=True)

    def observe_lag(
        self, messages: Sequence[tuple[bytes, ImapOrigin]], results: Sequence[IntakeResult]
    ) -> float | None:
        """Observe lag = commit time − INTERNALDATE of each newly stored message (seconds).

        Every stored message with an INTERNALDATE (RFC 9051 §2.3.3) is one
        sample of ``mailgate_sync_lag_seconds{provider}``; duplicates and
        skipped messages are not (R6 skips old mail on purpose).

        Args:
            messages: the committed chunk, in UID order.
            results: the intake's result per message, same order.

        Returns:
            The chunk's lag for ``mailboxes.sync_lag_seconds``: that of its
            newest stored message (latest INTERNALDATE), ≥ 0; None when the
            chunk stored nothing with an INTERNALDATE.
        """
        now = self._clock()
        newest: float | None = None
        for (_raw, origin), result in zip(messages, results, strict=False):
            if result.status is not IntakeStatus.STORED or origin.internal_date is None:
                continue
            lag = max(0.0, (now - origin.internal_date).total_seconds())
            newest = lag if newest is None else min(newest, lag)
            if self._metrics is not None:
                self._metrics.sync_lag_seconds.labels(provider=self._provider.value).observe(lag)
        if newest is not None:
            self.last_lag_seconds = newest
        return newest
