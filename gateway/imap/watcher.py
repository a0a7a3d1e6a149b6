"""The state machine that keeps one (mailbox, folder) in sync over IMAP.

Edge module: owns one ``ImapSession`` at a time and one checkpoint; it
decides nothing about routing (``gateway.intake`` → ``ingest.decide``)
and never writes message rows itself. IDLE only wakes it: data always
comes from ``UID FETCH`` starting after the checkpoint (STYLE.md §8).
Folder discovery and the checkpoint at SELECT are in ``checkpoint.py``,
``last_sync_at``/lag/error bookkeeping in ``sync_status.py``.

States (one pass of ``run``; every arrow into ``backoff`` closes the socket)::

      ┌───────────────────────────────────────────────────────────────┐
      ▼                                                               │
    connect ──▶ authenticate ──▶ select ──▶ compare UIDVALIDITY ──▶ catch_up
      │            │  AUTHENTICATIONFAILED:     (RFC 9051 §2.3.1.1)     │ ▲
      │            │  force_refresh once,       none → baseline (R6)    ▼ │ EXISTS
      │            │  then retry login          changed → resync (R12)  idle / poll
      │            │                            too often → suspended   │ renew every
      │            │                                                    │ idle_renew_seconds
      │            └── reauth_required / disconnected ──▶ finished      │ (→ select again)
      └── ConnectionLost, LoginRejected, DB error ──▶ backoff ──────────┘
                          (capped, jittered; sync.reconnect_backoff_max_seconds)

No folder for the role: state ``no_folder``, looked for again every
``idle_renew_seconds``. First sync and UIDVALIDITY change: the checkpoint
is set just below the backfill window (``checkpoint.py``); R6 (in
``ingest``) skips the older messages fetched, R12 drops what is already
stored, so nothing older is replayed as new.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Protocol

from gateway.errors import TransientError
from gateway.imap.checkpoint import (
    UIDVALIDITY_RESET_LIMIT,
    UIDVALIDITY_RESET_WINDOW_SECONDS,
    FolderMissing,
    FolderSuspended,
    ResetWindow,
    resolve_folder,
    settle_checkpoint,
)
from gateway.imap.responses import FetchedMessage, FolderInfo
from gateway.imap.session import (
    FETCH_CHUNK,
    ConnectionLost,
    Endpoint,
    ImapSession,
    LoginRejected,
)
from gateway.imap.sync_status import SyncStatus
from gateway.intake_result import IntakeResult
from gateway.mailboxes import NOT_CONNECTED, REAUTH_REQUIRED, MailboxError
from gateway.observability import Metrics
from ingest.types import ImapOrigin, MailboxId, Provider, UidValidity
from storage.db import Database
from storage.repos.folders import load_checkpoint
from storage.repos.mailboxes import SUSPENDED_PREFIX

log = logging.getLogger(__name__)

POLL_SECONDS = 30.0
"""NOOP interval when the server lacks IDLE (RFC 2177 absent)."""

BACKOFF_INITIAL_SECONDS = 1.0
"""First reconnect delay; doubles per failure up to ``sync.reconnect_backoff_max_seconds``."""

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
        self._db = db
        self._credentials = credentials
        self._deliver = deliver
        self._config = config
        self._session: ImapSession | None = None
        self._stopping = False
        self._stopped = asyncio.Event()
        self._failures = 0
        self._folder: FolderInfo | None = None
        self._resets = ResetWindow(
            role=role,
            provider=target.provider,
            limit=config.uidvalidity_reset_limit,
            window_seconds=config.uidvalidity_reset_window_seconds,
            metrics=config.metrics,
        )
        self._status = SyncStatus(
            db=db,
            mailbox_id=target.mailbox_id,
            provider=target.provider,
            clock=config.clock,
            metrics=config.metrics,
        )

    @property
    def last_error(self) -> str | None:
        """The last backoff or suspension reason; None after a successful sync."""
        return self._status.last_error

    @property
    def last_sync_at(self) -> datetime | None:
        """Aware UTC time of the last ``last_sync_at`` write, or None."""
        return self._status.last_sync_at

    @property
    def last_lag_seconds(self) -> float | None:
        """Lag (seconds) of the last chunk that stored a message, or None."""
        return self._status.last_lag_seconds

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
        error = f"{type(exc).__name__}: {exc}"
        cap = self._config.backoff_max_seconds
        delay = min(cap, BACKOFF_INITIAL_SECONDS * 2**self._failures)
        delay *= self._config.rng.uniform(0.5, 1.0)
        self._failures = min(self._failures + 1, 30)
        log.warning("imap reconnect", extra={**self.log_fields, "reason": error})
        await self._status.fail(error, self.log_fields)
        await self._pause(delay)

    async def _suspend(self, exc: FolderSuspended) -> None:
        """Stop syncing this folder until the gateway restarts; the mailbox shows why."""
        self.state = WatcherState.SUSPENDED
        error = f"{SUSPENDED_PREFIX} {exc}"
        log.error("imap folder suspended", extra={**self.log_fields, "reason": error})
        await self._status.fail(error, self.log_fields)
        await self._close()

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
        """Connect, log in, SELECT, then sync until the session ends or ``stop``."""
        self.state = WatcherState.CONNECTING
        async with self._connect_slot():
            if self._stopping:
                return  # stopped while waiting for a slot: do not connect at all
            session = await ImapSession.open(self.target.endpoint)
            self._session = session
            self.state = WatcherState.AUTHENTICATING
            await self._authenticate(session)
        self.state = WatcherState.SELECTING
        folder = await resolve_folder(session, self.target.provider, self.role)
        self._folder = folder
        uidvalidity = await self._select(session, folder)
        self._failures = 0
        await self._status.touch(force=True, lag_seconds=None)
        await self._sync_folder(session, folder, uidvalidity)

    async def _sync_folder(
        self, session: ImapSession, folder: FolderInfo, uidvalidity: int
    ) -> None:
        """Catch up, then IDLE (or poll) for mail; SELECT again at every renewal."""
        while not self._stopping:
            self.state = WatcherState.CATCHING_UP
            delivered = await self._catch_up(session, folder, uidvalidity)
            # A pass that fetched nothing means this folder is level with the
            # server: its lag is 0 (written at most once a minute, like the time).
            await self._status.touch(force=False, lag_seconds=None if delivered else 0.0)
            if session.take_exists() or self._stopping:
                continue
            self.state = WatcherState.IDLE
            if not await self._wait_for_mail(session) and not self._stopping:
                # Renewal: SELECT again, so a UIDVALIDITY change is seen (RFC 9051 §2.3.1.1).
                uidvalidity = await self._select(session, folder)

    async def _select(self, session: ImapSession, folder: FolderInfo) -> int:
        """SELECT and settle the checkpoint for its UIDVALIDITY; return the UIDVALIDITY."""
        info = await session.select(folder.wire_name)
        await settle_checkpoint(
            self._db,
            session,
            mailbox_id=self.target.mailbox_id,
            folder=folder,
            role=self.role,
            info=info,
            cutoff=self.target.connected_at - timedelta(days=self._config.backfill_days + 1),
            count_reset=lambda: self._resets.count(self._config.clock()),
            log_fields=self.log_fields,
        )
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

    async def _catch_up(self, session: ImapSession, folder: FolderInfo, uidvalidity: int) -> bool:
        """UID FETCH everything after the stored checkpoint, chunk by chunk, into the intake.

        The intake advances the stored checkpoint in each message's own
        transaction; the checkpoint is re-read here every time, so a chain
        that stopped short is fetched again (R12 drops what was stored).
        After each committed chunk, ``last_sync_at`` is written, with
        ``sync_lag_seconds`` when the chunk stored a message (else None:
        the stored lag is left alone).

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
            messages = self._with_origins(fetched, folder, uidvalidity)
            if messages:
                results = await self._deliver(messages, position)
                delivered = True
                lag = self._status.observe_lag(messages, results)
                await self._status.touch(force=True, lag_seconds=lag)
                position = int(messages[-1][1].uid)
        return delivered

    def _with_origins(
        self, fetched: Sequence[FetchedMessage], folder: FolderInfo, uidvalidity: int
    ) -> list[tuple[bytes, ImapOrigin]]:
        """Pair each fetched message's raw bytes with its provenance, in fetch order."""
        return [
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

    async def _wait_for_mail(self, session: ImapSession) -> bool:
        """IDLE until mail, or renew; NOOP polling when the server lacks IDLE.

        Returns:
            True when the server reported new mail, False on a renewal.
        """
        if "IDLE" in session.capabilities:
            return await session.idle(self._config.idle_renew_seconds)
        await self._pause(min(POLL_SECONDS, self._config.idle_renew_seconds))
        return await session.noop()
