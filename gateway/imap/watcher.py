"""The state machine that keeps one (mailbox, folder) in sync over IMAP.

Edge module: owns one ``ImapSession`` at a time and one checkpoint; it
decides nothing about routing (``gateway.intake`` → ``ingest.decide``)
and never writes message rows itself. IDLE only wakes it: data always
comes from ``UID FETCH`` starting after the checkpoint (STYLE.md §8).

States (one pass of ``run``; every arrow into ``backoff`` closes the socket)::

      ┌───────────────────────────────────────────────────────────────┐
      ▼                                                               │
    connect ──▶ authenticate ──▶ select ──▶ compare UIDVALIDITY ──▶ catch_up
      │            │  AUTHENTICATIONFAILED:     (RFC 9051 §2.3.1.1)     │ ▲
      │            │  force_refresh once,       none → baseline (R6)    ▼ │ EXISTS
      │            │  then retry login          changed → resync (R12)  idle / poll
      │            │                                                    │ renew every
      │            └── reauth_required / disconnected ──▶ finished      │ idle_renew_seconds
      └── ConnectionLost, LoginRejected, DB error ──▶ backoff ──────────┘
                          (capped, jittered; sync.reconnect_backoff_max_seconds)

First sync (no checkpoint) and UIDVALIDITY change: the checkpoint is set
just below the first message whose INTERNALDATE may be after
``connected_at`` − ``sync.backfill_days`` (UID SEARCH SINCE, one day of
margin for the server's time zone); those messages are fetched and R6
(in ``ingest``) skips the ones that are older, R12 drops what is already
stored. Nothing older is replayed as new.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Protocol

from gateway.errors import TransientError
from gateway.imap.responses import FolderInfo, SelectInfo, find_folder
from gateway.imap.session import (
    FETCH_CHUNK,
    ConnectionLost,
    Endpoint,
    ImapSession,
    LoginRejected,
)
from gateway.intake_result import IntakeResult, IntakeStatus
from gateway.mailboxes import NOT_CONNECTED, REAUTH_REQUIRED, MailboxError
from gateway.observability import Metrics
from ingest.types import ImapOrigin, MailboxId, Provider, UidValidity
from storage.db import Database
from storage.repos.folders import (
    BASELINE_RULE,
    UIDVALIDITY_RULE,
    Checkpoint,
    load_checkpoint,
    reset_checkpoint,
)
from storage.repos.mailboxes import SUSPENDED_PREFIX, record_sync, record_sync_error

log = logging.getLogger(__name__)

POLL_SECONDS = 30.0
"""NOOP interval when the server lacks IDLE (RFC 2177 absent)."""

BACKOFF_INITIAL_SECONDS = 1.0
"""First reconnect delay; doubles per failure up to ``sync.reconnect_backoff_max_seconds``."""

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

SYNC_TOUCH_SECONDS = 60.0
"""An idle renewal with nothing new writes ``last_sync_at`` at most this often."""

FOLDER_ROLES = ("inbox", "sent")
"""Roles every watched mailbox syncs (R2/R1 inbound, R5 outbound)."""


class WatcherState(StrEnum):
    """Where a watcher is (exposed for observability; values are stable)."""

    CONNECTING = "connecting"
    AUTHENTICATING = "authenticating"
    SELECTING = "selecting"
    CATCHING_UP = "catching_up"
    IDLE = "idle"
    BACKOFF = "backoff"
    NO_FOLDER = "no_folder"
    SUSPENDED = "suspended"
    FINISHED = "finished"


class FolderMissing(Exception):
    """The server has no folder for the role (e.g. a generic IMAP account without \\Sent)."""


class FolderSuspended(Exception):
    """The folder's UIDVALIDITY changed too often; it is no longer re-synced (see module doc)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class WatchTarget:
    """The provider account a watcher logs in to (one row of ``mailboxes``).

    Attributes:
        mailbox_id: the row whose credentials are used and whose id the
            checkpoint and ``ImapOrigin`` carry.
        address: login user for XOAUTH2.
        connected_at: R6 cut-off (aware UTC).
        password_login: True for generic IMAP (LOGIN), False for XOAUTH2.
    """

    mailbox_id: MailboxId
    provider: Provider
    address: str
    connected_at: datetime
    endpoint: Endpoint
    password_login: bool


class Credentials(Protocol):
    """What a watcher needs from ``MailboxService`` (a structural subset of it)."""

    async def access_token(self, mailbox_id: int, *, force_refresh: bool = False) -> str:
        """See ``MailboxService.access_token``."""

    async def password_credentials(self, mailbox_id: int) -> tuple[str, str]:
        """See ``MailboxService.password_credentials``."""


Deliver = Callable[[Sequence[tuple[bytes, ImapOrigin]], int], Awaitable[list[IntakeResult]]]
"""``Intake.accept_fetched_many(messages, previous_uid=...)`` as a positional callable."""


@dataclass(frozen=True, slots=True, kw_only=True)
class WatcherConfig:
    """Timing (``[sync]``), limits, metrics and the injected clock, sleep and randomness.

    ``connect_slots`` (shared by every watcher of one supervisor) bounds how
    many watchers connect + handshake + log in at once; None: no bound.
    """

    idle_renew_seconds: float = 600.0
    backoff_max_seconds: float = 300.0
    backfill_days: int = 0
    uidvalidity_reset_limit: int = UIDVALIDITY_RESET_LIMIT
    uidvalidity_reset_window_seconds: float = UIDVALIDITY_RESET_WINDOW_SECONDS
    metrics: Metrics | None = None
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    rng: random.Random = field(default_factory=random.Random)
    connect_slots: asyncio.Semaphore | None = field(default=None, compare=False)


class FolderWatcher:
    """Keeps one folder role of one provider account in sync until stopped."""

    def __init__(
        self,
        *,
        target: WatchTarget,
        role: str,
        db: Database,
        credentials: Credentials,
        deliver: Deliver,
        config: WatcherConfig,
    ) -> None:
        """Build a watcher; ``run`` it as a named task (``imap:<mailbox_id>:<role>``)."""
        self.target = target
        self.role = role
        self.state = WatcherState.CONNECTING
        self.last_error: str | None = None
        self.last_sync_at: datetime | None = None
        self._db = db
        self._credentials = credentials
        self._deliver = deliver
        self._config = config
        self._session: ImapSession | None = None
        self._stopping = False
        self._stopped = asyncio.Event()
        self._failures = 0
        self._folder: FolderInfo | None = None
        self._resets: deque[datetime] = deque()
        self.last_lag_seconds: float | None = None

    @property
    def log_fields(self) -> dict[str, object]:
        """Fields bound to every log line of this watcher (STYLE.md §11)."""
        folder = self._folder.name if self._folder else self.role
        return {"mailbox_id": self.target.mailbox_id, "folder": folder}

    async def run(self) -> None:
        """Connect, sync and wait for mail until ``stop`` or a terminal mailbox state."""
        while not self._stopping:
            try:
                await self._connected_pass()
            except FolderSuspended as exc:
                await self._suspend(exc)
                break
            except FolderMissing:
                # Not an error: look again after a renewal interval (the user may create it).
                self.state = WatcherState.NO_FOLDER
                await self._close()
                await self._pause(self._config.idle_renew_seconds)
            except MailboxError as exc:
                if exc.code in (REAUTH_REQUIRED, NOT_CONNECTED):
                    log.info("watcher finished", extra={**self.log_fields, "reason": exc.code})
                    break
                await self._backoff(exc)
            except (TransientError, LoginRejected, OSError) as exc:
                await self._backoff(exc)
            except Exception as exc:  # a bug or a database failure: keep the mailbox alive
                log.error("watcher failed", extra=self.log_fields, exc_info=True)
                await self._backoff(exc)
            finally:
                await self._close()
        if self.state is not WatcherState.SUSPENDED:
            self.state = WatcherState.FINISHED

    async def stop(self) -> None:
        """Ask the watcher to end: IDLE DONE, LOGOUT, then ``run`` returns."""
        self._stopping = True
        self._stopped.set()
        session = self._session
        if session is not None:
            session.wake()

    async def _close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.logout()

    async def _backoff(self, exc: BaseException) -> None:
        """Capped, jittered exponential backoff ("full jitter" on the upper half)."""
        if self._stopping:
            return
        self.state = WatcherState.BACKOFF
        self.last_error = f"{type(exc).__name__}: {exc}"
        cap = self._config.backoff_max_seconds
        delay = min(cap, BACKOFF_INITIAL_SECONDS * 2**self._failures)
        delay *= self._config.rng.uniform(0.5, 1.0)
        self._failures = min(self._failures + 1, 30)
        log.warning("imap reconnect", extra={**self.log_fields, "reason": self.last_error})
        await self._store_error(self.last_error)
        await self._pause(delay)

    async def _suspend(self, exc: FolderSuspended) -> None:
        """Stop syncing this folder until the gateway restarts; the mailbox shows why."""
        self.state = WatcherState.SUSPENDED
        self.last_error = f"{SUSPENDED_PREFIX} {exc}"
        log.error("imap folder suspended", extra={**self.log_fields, "reason": self.last_error})
        await self._close()
        await self._store_error(self.last_error)

    async def _store_error(self, error: str) -> None:
        """Best effort: the database may be what failed."""
        try:
            await self._db.run(record_sync_error, self.target.mailbox_id, error)
        except Exception:
            log.warning("could not store imap error", extra=self.log_fields, exc_info=True)

    async def _touch(self, *, force: bool, lag_seconds: float | None = None) -> None:
        """Write ``last_sync_at`` (and clear the error) after a commit or a quiet catch-up.

        Args:
            force: write even if the last write is under ``SYNC_TOUCH_SECONDS`` old.
            lag_seconds: the mailbox's ``sync_lag_seconds`` to store with it
                (docs/imap.md "Sync lag"): the lag of a committed batch, 0.0
                after a catch-up that found nothing new, None to leave the
                stored value alone (after SELECT, before any catch-up).
        """
        now = self._config.clock()
        last = self.last_sync_at
        if not force and last is not None and (now - last).total_seconds() < SYNC_TOUCH_SECONDS:
            return
        if lag_seconds is None:
            await self._db.run(record_sync, self.target.mailbox_id, at=now)
        else:
            await self._db.run(record_sync, self.target.mailbox_id, at=now, lag_seconds=lag_seconds)
        self.last_sync_at = now
        self.last_error = None

    async def _pause(self, seconds: float) -> None:
        """The injected sleep, cut short by ``stop``."""
        sleeper = asyncio.ensure_future(self._config.sleep(seconds))
        stopper = asyncio.ensure_future(self._stopped.wait())
        try:
            await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            stopper.cancel()

    @contextlib.asynccontextmanager
    async def _connect_slot(self) -> AsyncIterator[None]:
        """Hold one of the supervisor's ``connect_slots`` (no-op when unbounded)."""
        slots = self._config.connect_slots
        if slots is None:
            yield
            return
        async with slots:
            yield

    async def _connected_pass(self) -> None:
        self.state = WatcherState.CONNECTING
        async with self._connect_slot():
            if self._stopping:
                return  # stopped while waiting for a slot: do not connect at all
            session = await ImapSession.open(self.target.endpoint)
            self._session = session
            self.state = WatcherState.AUTHENTICATING
            await self._authenticate(session)
        self.state = WatcherState.SELECTING
        folder = await self._resolve_folder(session)
        uidvalidity = await self._select(session, folder)
        self._failures = 0
        await self._touch(force=True)
        while not self._stopping:
            self.state = WatcherState.CATCHING_UP
            delivered = await self._catch_up(session, folder, uidvalidity)
            # A pass that fetched nothing means this folder is level with the
            # server: its lag is 0 (written at most once a minute, like the time).
            await self._touch(force=False, lag_seconds=None if delivered else 0.0)
            if session.take_exists() or self._stopping:
                continue
            self.state = WatcherState.IDLE
            if not await self._wait_for_mail(session) and not self._stopping:
                # Renewal: SELECT again, so a UIDVALIDITY change is seen (RFC 9051 §2.3.1.1).
                uidvalidity = await self._select(session, folder)

    async def _select(self, session: ImapSession, folder: FolderInfo) -> int:
        """SELECT and settle the checkpoint for its UIDVALIDITY; return the UIDVALIDITY."""
        info = await session.select(folder.wire_name)
        await self._checkpoint(session, folder, info)
        return int(info.uidvalidity)

    async def _authenticate(self, session: ImapSession) -> None:
        """Log in with a fresh token; on AUTHENTICATIONFAILED refresh once and retry.

        A second rejection raises ``LoginRejected`` (backoff). The refresh itself
        decides re-authorisation: ``invalid_grant`` → ``reauth_required`` (R22).
        """
        mailbox_id = self.target.mailbox_id
        if self.target.password_login:
            user, password = await self._credentials.password_credentials(mailbox_id)
            await session.login(user, password)
            return
        token = await self._credentials.access_token(mailbox_id)
        try:
            await session.authenticate_xoauth2(self.target.address, token)
        except LoginRejected:
            log.warning("imap token rejected; refreshing", extra=self.log_fields)
            token = await self._credentials.access_token(mailbox_id, force_refresh=True)
            await session.authenticate_xoauth2(self.target.address, token)

    async def _resolve_folder(self, session: ImapSession) -> FolderInfo:
        """RFC 6154 special-use flag first, then the provider's default name."""
        folders = await session.list_folders()
        defaults = DEFAULT_FOLDERS[self.target.provider].get(self.role, ())
        found = find_folder(folders, self.role, defaults)
        if found is None:
            raise FolderMissing(self.role)
        self._folder = found
        return found

    async def _checkpoint(
        self, session: ImapSession, folder: FolderInfo, info: SelectInfo
    ) -> Checkpoint:
        """Load the checkpoint; start or restart it when absent or UIDVALIDITY changed."""
        mailbox_id = self.target.mailbox_id
        found = await self._db.read(load_checkpoint, mailbox_id, folder.name)
        if found is not None and found.uidvalidity == info.uidvalidity:
            return found
        baseline = await self._baseline(session, info)
        if found is None:
            rule, reason = BASELINE_RULE, "first sync: mail older than the connection is skipped"
        else:
            self._count_reset()
            rule, reason = UIDVALIDITY_RULE, "uidvalidity changed: re-read, copies deduplicated"
            log.warning(
                "uidvalidity changed",
                extra={**self.log_fields, "uidvalidity": info.uidvalidity},
            )
        return await self._db.run(
            reset_checkpoint,
            mailbox_id,
            folder.name,
            self.role,
            info.uidvalidity,
            baseline,
            rule=rule,
            reason=reason,
        )

    def _count_reset(self) -> None:
        """Count a UIDVALIDITY reset; past the limit within the window, suspend the folder.

        Raises:
            FolderSuspended: more than ``uidvalidity_reset_limit`` resets in
                ``uidvalidity_reset_window_seconds`` (this one included);
                the checkpoint is left as it was (no re-sync).
        """
        now = self._config.clock()
        window = timedelta(seconds=self._config.uidvalidity_reset_window_seconds)
        while self._resets and now - self._resets[0] > window:
            self._resets.popleft()
        self._resets.append(now)
        if self._config.metrics is not None:
            self._config.metrics.uidvalidity_resets.labels(
                provider=self.target.provider.value
            ).inc()
        if len(self._resets) > self._config.uidvalidity_reset_limit:
            hours = self._config.uidvalidity_reset_window_seconds / 3600
            raise FolderSuspended(
                f"{self.role}: uidvalidity changed {len(self._resets)} times in {hours:g} h"
            )

    async def _baseline(self, session: ImapSession, info: SelectInfo) -> int:
        """Highest UID certainly older than the connection (R6), or 0."""
        cutoff = self.target.connected_at - timedelta(days=self._config.backfill_days + 1)
        recent = await session.uids_received_since(cutoff.date())
        if recent:
            return int(recent[0]) - 1
        if info.uidnext is not None:
            return int(info.uidnext) - 1
        everything = await session.uids_since(1)
        return int(everything[-1]) if everything else 0

    async def _catch_up(self, session: ImapSession, folder: FolderInfo, uidvalidity: int) -> bool:
        """UID FETCH everything after the stored checkpoint, chunk by chunk, into the intake.

        The intake advances the stored checkpoint in each message's own
        transaction; the checkpoint is re-read here every time, so a chain
        that stopped short is fetched again (R12 drops what was stored).
        After each committed chunk, ``last_sync_at`` and (when the chunk
        stored a message) ``sync_lag_seconds`` are written.

        Returns:
            True when at least one message was fetched and delivered.

        Raises:
            ConnectionLost: the checkpoint was reset meanwhile (re-SELECT).
        """
        stored = await self._db.read(load_checkpoint, self.target.mailbox_id, folder.name)
        if stored is None or stored.uidvalidity != uidvalidity:
            raise ConnectionLost("checkpoint changed under the watcher")
        position = int(stored.checkpoint_uid)
        uids = await session.uids_since(position + 1)
        delivered = False
        for start in range(0, len(uids), FETCH_CHUNK):
            if self._stopping:
                return delivered
            fetched = await session.fetch(uids[start : start + FETCH_CHUNK])
            messages = [
                (
                    m.raw,
                    ImapOrigin(
                        mailbox_id=self.target.mailbox_id,
                        folder=folder.name,
                        folder_role=self.role,
                        uidvalidity=UidValidity(uidvalidity),
                        uid=m.uid,
                        internal_date=m.internal_date,
                        x_gm_msgid=m.x_gm_msgid,
                        x_gm_thrid=m.x_gm_thrid,
                    ),
                )
                for m in fetched
            ]
            if messages:
                results = await self._deliver(messages, position)
                delivered = True
                lag = self._observe_lag(messages, results)
                await self._touch(force=True, lag_seconds=lag)
                position = int(messages[-1][1].uid)
        return delivered

    def _observe_lag(
        self, messages: Sequence[tuple[bytes, ImapOrigin]], results: Sequence[IntakeResult]
    ) -> float | None:
        """Observe lag = commit time − INTERNALDATE of each newly stored message (seconds).

        Every stored message with an INTERNALDATE (RFC 9051 §2.3.3) is one
        sample of ``mailgate_sync_lag_seconds{provider}``; duplicates and
        skipped messages are not (R6 skips old mail on purpose).

        Returns:
            The batch's lag for ``mailboxes.sync_lag_seconds``: that of its
            newest stored message (latest INTERNALDATE), ≥ 0; None when the
            batch stored nothing with an INTERNALDATE.
        """
        now = self._config.clock()
        metrics = self._config.metrics
        newest: float | None = None
        for (_raw, origin), result in zip(messages, results, strict=False):
            if result.status is not IntakeStatus.STORED or origin.internal_date is None:
                continue
            lag = max(0.0, (now - origin.internal_date).total_seconds())
            newest = lag if newest is None else min(newest, lag)
            if metrics is not None:
                metrics.sync_lag_seconds.labels(provider=self.target.provider.value).observe(lag)
        if newest is not None:
            self.last_lag_seconds = newest
        return newest

    async def _wait_for_mail(self, session: ImapSession) -> bool:
        """IDLE until mail, or renew; NOOP polling when the server lacks IDLE.

        Returns:
            True when the server reported new mail, False on a renewal.
        """
        if "IDLE" in session.capabilities:
            return await session.idle(self._config.idle_renew_seconds)
        await self._pause(min(POLL_SECONDS, self._config.idle_renew_seconds))
        return await session.noop()
