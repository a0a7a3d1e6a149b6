"""Find a watcher's folder and settle its checkpoint at every SELECT (RFC 6154, RFC 9051 §2.3.1.1).

Edge helpers of ``watcher.FolderWatcher`` (the "select → compare
UIDVALIDITY" step of its state diagram): they LIST, SEARCH and (re)set the
``folder_states`` checkpoint, but never fetch or store mail and never
decide routing (R6 and R12 are applied by ``ingest`` to what is fetched).

First sync (no checkpoint) and UIDVALIDITY change: the checkpoint is set
just below the first message whose INTERNALDATE may be after
``connected_at`` − ``sync.backfill_days`` (UID SEARCH SINCE, one day of
margin for the server's time zone). Repeated UIDVALIDITY changes are
capped by ``ResetWindow`` (STYLE.md §7).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta

from gateway.imap.responses import FolderInfo, SelectInfo, find_folder
from gateway.imap.session import ImapSession
from gateway.observability import Metrics
from ingest.types import MailboxId, Provider
from storage.db import Database
from storage.repos.folders import (
    BASELINE_RULE,
    UIDVALIDITY_RULE,
    Checkpoint,
    load_checkpoint,
    reset_checkpoint,
)

log = logging.getLogger(__name__)

DEFAULT_FOLDERS: dict[Provider, dict[str, tuple[str, ...]]] = {
    Provider.GMAIL: {"sent": ("[Gmail]/Sent Mail",)},
    Provider.OUTLOOK: {"sent": ("Sent Items",)},
    Provider.IMAP: {"sent": ("Sent", "Sent Items", "Sent Messages")},
}
"""Provider default folder names, used when no folder carries the RFC 6154 flag."""

UIDVALIDITY_RESET_LIMIT = 3
"""UIDVALIDITY resets of one folder allowed per window; the next one suspends the folder."""

UIDVALIDITY_RESET_WINDOW_SECONDS = 24 * 3600.0
"""Sliding window of ``UIDVALIDITY_RESET_LIMIT`` (STYLE.md §7: no endless resync loops)."""


class FolderMissing(Exception):
    """The server has no folder for the role (e.g. a generic IMAP account without \\Sent)."""


class FolderSuspended(Exception):
    """The folder's UIDVALIDITY changed too often; it is no longer re-synced (docs/imap.md)."""


async def resolve_folder(session: ImapSession, provider: Provider, role: str) -> FolderInfo:
    """Return the folder of ``role``: RFC 6154 special-use flag first, then the provider default.

    Args:
        session: a logged-in session (one LIST is sent).
        provider: selects the ``DEFAULT_FOLDERS`` names tried after the flag.
        role: ``inbox`` (matched by name, RFC 9051 §5.1) or ``sent``.

    Raises:
        FolderMissing: no folder matches (not an error; looked for again later).
        ConnectionLost: the session ended (transient).
    """
    folders = await session.list_folders()
    found = find_folder(folders, role, DEFAULT_FOLDERS[provider].get(role, ()))
    if found is None:
        raise FolderMissing(role)
    return found


class ResetWindow:
    """UIDVALIDITY resets of one folder in a sliding window, kept in memory.

    The count survives reconnects of its watcher but not a gateway
    restart (a restart allows ``limit`` more). Each reset is one sample
    of ``mailgate_imap_uidvalidity_resets_total{provider}``.
    """

    def __init__(
        self,
        *,
        role: str,
        provider: Provider,
        limit: int = UIDVALIDITY_RESET_LIMIT,
        window_seconds: float = UIDVALIDITY_RESET_WINDOW_SECONDS,
        metrics: Metrics | None = None,
    ) -> None:
        """Build an empty window; ``limit`` resets per ``window_seconds`` are allowed."""
        self._role = role
        self._provider = provider
        self._limit = limit
        self._window_seconds = window_seconds
        self._metrics = metrics
        self._resets: deque[datetime] = deque()

    def count(self, now: datetime) -> None:
        """Count one reset at ``now`` (aware UTC); past the limit, suspend the folder.

        Raises:
            FolderSuspended: more than ``limit`` resets within
                ``window_seconds`` (this one included); the caller must
                leave the checkpoint as it was (no re-sync).
        """
        window = timedelta(seconds=self._window_seconds)
        while self._resets and now - self._resets[0] > window:
            self._resets.popleft()
        self._resets.append(now)
        if self._metrics is not None:
            self._metrics.uidvalidity_resets.labels(provider=self._provider.value).inc()
        if len(self._resets) > self._limit:
            hours = self._window_seconds / 3600
            raise FolderSuspended(
                f"{self._role}: uidvalidity changed {len(self._resets)} times in {hours:g} h"
            )


async def settle_checkpoint(
    db: Database,
    session: ImapSession,
    *,
    mailbox_id: MailboxId,
    folder: FolderInfo,
    role: str,
    info: SelectInfo,
    cutoff: datetime,
    count_reset: Callable[[], None],
    log_fields: Mapping[str, object],
) -> Checkpoint:
    """Load the folder's checkpoint; start or restart it when absent or UIDVALIDITY changed.

    Follows RFC 9051 §2.3.1.1: UIDs are only comparable under one
    UIDVALIDITY. A new checkpoint sits below the first UID received on or
    after ``cutoff``'s date, and a sync-log row says why (``BASELINE_RULE``
    "first sync", ``UIDVALIDITY_RULE`` "uidvalidity changed").

    Args:
        folder: the selected folder; ``info`` is its SELECT response.
        cutoff: aware UTC; ``connected_at`` − (``backfill_days`` + 1) days.
        count_reset: called before a UIDVALIDITY reset is written; may raise.
        log_fields: bound to the "uidvalidity changed" warning.

    Returns:
        The checkpoint now stored for (mailbox, folder) under ``info.uidvalidity``.

    Raises:
        FolderSuspended: from ``count_reset``; nothing was written.
        ConnectionLost: the session ended during the SEARCH (transient).
    """
    found = await db.read(load_checkpoint, mailbox_id, folder.name)
    if found is not None and found.uidvalidity == info.uidvalidity:
        return found
    baseline = await baseline_uid(session, info, cutoff)
    if found is None:
        rule, reason = BASELINE_RULE, "first sync: mail older than the connection is skipped"
    else:
        count_reset()
        rule, reason = UIDVALIDITY_RULE, "uidvalidity changed: re-read, copies deduplicated"
        log.warning("uidvalidity changed", extra={**log_fields, "uidvalidity": info.uidvalidity})
    return await db.run(
        reset_checkpoint,
        mailbox_id,
        folder.name,
        role,
        info.uidvalidity,
        baseline,
        rule=rule,
        reason=reason,
    )


async def baseline_uid(session: ImapSession, info: SelectInfo, cutoff: datetime) -> int:
    """Return the highest UID certainly older than ``cutoff`` (R6), or 0.

    ``UID SEARCH SINCE <cutoff date>`` (RFC 9051 §6.4.4, date only, the
    server's time zone: hence the day of margin in ``cutoff``); with no
    match, ``UIDNEXT`` − 1, else the folder's highest UID.
    """
    recent = await session.uids_received_since(cutoff.date())
    if recent:
        return int(recent[0]) - 1
    if info.uidnext is not None:
        return int(info.uidnext) - 1
    everything = await session.uids_since(1)
    return int(everything[-1]) if everything else 0
