"""Owns every IMAP watcher: one per (provider account, folder role), started and stopped by state.

Edge module: creates, names and ends asyncio tasks (``imap:<mailbox_id>:<role>``);
it never talks IMAP itself (``watcher.py``) and never stores mail (the intake).

Which watchers run is a function of the ``mailboxes`` table, recomputed by
``reconcile`` at start-up and after every state change the
``MailboxService`` reports (connected, reauth_required, disconnected):

* every *connected* row is grouped by provider account (provider, address
  key). The same Gmail account connected in several sub-accounts (R4) is
  watched ONCE, through its oldest connected row; routing then fans the
  message out to every connection (``Facts.mailbox_connections``);
* each account gets one watcher per folder role (INBOX and Sent): two IMAP
  connections per account, far under Gmail's 15 (and Outlook's 20);
* a watcher whose account is no longer connected, or whose chosen row
  changed, is stopped (IDLE DONE, LOGOUT) and, if needed, a new one started.

The listener only schedules a reconcile (it never awaits a watcher): the
listener may be called from inside a watcher's own token refresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from gateway.config import Security, Settings
from gateway.imap.session import Endpoint, make_ssl_context, tls_buffer_shrink_supported
from gateway.imap.watcher import (
    FOLDER_ROLES,
    FolderWatcher,
    WatcherConfig,
    WatcherState,
    WatchTarget,
)
from gateway.intake import Intake
from gateway.intake_result import IntakeResult
from gateway.mailboxes import MailboxService
from gateway.observability import Metrics
from ingest.normalise import address_key
from ingest.types import ImapOrigin, MailboxId, MailboxState, Provider
from storage.db import Database
from storage.repos.mailboxes import MailboxRecord, StateChange

log = logging.getLogger(__name__)

STOP_TIMEOUT_SECONDS = 10.0
"""How long ``stop`` waits for a watcher's DONE + LOGOUT before cancelling it."""

CONNECT_CONCURRENCY = 16
"""Watchers connecting (TCP + TLS handshake + login) at once; the others wait their turn.

Bounds the login storm at start-up (2,000 sessions for 1,000 mailboxes)
and, with it, the peak of asyncio's 256 KiB per-handshake TLS buffers that
glibc would otherwise keep as freed-but-resident heap (docs/imap.md,
"Memory per session"), and the token refreshes a cold start may need.
Not a config key: a slot is held only for one connection's own round trips
(TCP, TLS, greeting, AUTHENTICATE, CAPABILITY: ~5 RTT), so 2,000 sessions
start in ~30 s on the loaded 2-core bench machine and in about a minute
at a provider 100 ms away."""

CONNECTIONS_PER_ACCOUNT = len(FOLDER_ROLES)
"""IMAP connections one provider account uses (Gmail allows 15 per account)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class WatcherStatus:
    """One watcher as shown by observability (``mailgate mailbox show``, /metrics)."""

    mailbox_id: MailboxId
    provider: Provider
    folder_role: str
    state: WatcherState
    last_error: str | None
    last_sync_at: datetime | None
    last_lag_seconds: float | None


def contact_initiated_of(settings: Settings) -> Mapping[Provider, bool]:
    """``providers.*.contact_initiated`` per provider, for ``Intake(contact_initiated=...)``."""
    providers = settings.providers
    return {
        Provider.GMAIL: providers.gmail.contact_initiated,
        Provider.OUTLOOK: providers.outlook.contact_initiated,
        Provider.IMAP: providers.imap.contact_initiated,
    }


def endpoint_of(settings: Settings, record: MailboxRecord) -> Endpoint | None:
    """Where a mailbox's IMAP server is: ``providers.<p>``, or the row's server settings.

    Returns:
        None when no host is configured (the mailbox cannot be watched).
    """
    section = getattr(settings.providers, record.provider.value)
    if record.provider is Provider.IMAP:
        server = record.server_settings or {}
        if not server.get("imap_host"):
            return None
        return Endpoint(
            host=str(server["imap_host"]),
            port=int(server.get("imap_port", 993)),
            security=Security(server.get("imap_security", Security.TLS.value)),
            ca_file=section.ca_file,
        )
    if not section.imap_host:
        return None
    return Endpoint(
        host=section.imap_host,
        port=section.imap_port,
        security=section.imap_security,
        ca_file=section.ca_file,
    )


def choose_targets(
    settings: Settings, records: Sequence[MailboxRecord]
) -> dict[tuple[MailboxId, str], WatchTarget]:
    """Return the watchers that should run: one per (account, role), through the oldest row (R4)."""
    chosen: dict[tuple[Provider, str], MailboxRecord] = {}
    for record in sorted(records, key=lambda r: r.id):
        if record.state != MailboxState.CONNECTED or record.connected_at is None:
            continue
        chosen.setdefault((record.provider, address_key(record.address)), record)
    targets: dict[tuple[MailboxId, str], WatchTarget] = {}
    for record in chosen.values():
        endpoint = endpoint_of(settings, record)
        if endpoint is None or record.connected_at is None:
            log.warning("mailbox has no imap server", extra={"mailbox_id": record.id})
            continue
        target = WatchTarget(
            mailbox_id=record.id,
            provider=record.provider,
            address=record.address,
            connected_at=record.connected_at,
            endpoint=endpoint,
            password_login=record.provider is Provider.IMAP,
        )
        for role in FOLDER_ROLES:
            targets[record.id, role] = target
    return targets


class ImapSupervisor:
    """Starts, stops and restarts the IMAP watchers of every connected mailbox.

    Wiring (``gateway/app.py``): build after the intake and the mailbox
    service, ``await start()`` after ``intake.run`` is running, and
    ``await stop()`` after the SMTP listener stopped and before
    ``intake.close()``.
    """

    def __init__(
        self,
        settings: Settings,
        db: Database,
        service: MailboxService,
        intake: Intake,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        """Wire the supervisor; nothing runs before ``start``.

        ``metrics`` (the process's ``Metrics``) receives the watchers' lag
        and UIDVALIDITY-reset samples, and ``mailgate_imap_sessions`` is
        recomputed from ``status()`` at every render.
        """
        self._settings = settings
        self._db = db
        self._service = service
        self._intake = intake
        self._config = WatcherConfig(
            idle_renew_seconds=float(settings.sync.idle_renew_seconds),
            backoff_max_seconds=float(settings.sync.reconnect_backoff_max_seconds),
            backfill_days=settings.sync.backfill_days,
            metrics=metrics,
            sleep=sleep,
            rng=rng or random.Random(),  # noqa: S311 (jitter, not security)
            connect_slots=asyncio.Semaphore(CONNECT_CONCURRENCY),
        )
        self._watchers: dict[tuple[MailboxId, str], tuple[FolderWatcher, asyncio.Task[None]]] = {}
        self._lock = asyncio.Lock()
        self._pending: set[asyncio.Task[None]] = set()
        self._contexts: dict[Path | None, ssl.SSLContext] = {}
        self._stopped = False
        if metrics is not None:
            metrics.add_refresher(lambda: self._publish_sessions(metrics))

    async def start(self) -> None:
        """Start watchers for every connected mailbox and follow state changes."""
        if not tls_buffer_shrink_supported():
            log.warning(
                "asyncio TLS read buffer cannot be shrunk on this Python:"
                " each TLS session keeps 256 KiB (docs/imap.md)"
            )
        self._service.add_listener(self._on_change)
        await self.reconcile()

    async def stop(self) -> None:
        """Stop every watcher (IDLE DONE, LOGOUT); return when all have ended."""
        self._stopped = True
        for task in list(self._pending):
            task.cancel()
        async with self._lock:
            await self._stop_many(list(self._watchers))

    def status(self) -> tuple[WatcherStatus, ...]:
        """Every running watcher's state, by mailbox and role."""
        return tuple(
            WatcherStatus(
                mailbox_id=key[0],
                provider=watcher.target.provider,
                folder_role=key[1],
                state=watcher.state,
                last_error=watcher.last_error,
                last_sync_at=watcher.last_sync_at,
                last_lag_seconds=watcher.last_lag_seconds,
            )
            for key, (watcher, _task) in sorted(self._watchers.items())
        )

    def _publish_sessions(self, metrics: Metrics) -> None:
        """Set ``mailgate_imap_sessions{provider,state}`` (every pair, zeros included)."""
        counts = {(p, s): 0 for p in Provider for s in WatcherState}
        for status in self.status():
            counts[status.provider, status.state] += 1
        for (provider, state), count in counts.items():
            metrics.imap_sessions.labels(provider=provider.value, state=state.value).set(count)

    async def reconcile(self) -> None:
        """Make the running watchers match the connected mailboxes (see module docstring)."""
        async with self._lock:
            if self._stopped:
                return
            targets = choose_targets(self._settings, await self._service.list())
            gone = [
                key
                for key, (watcher, task) in self._watchers.items()
                if targets.get(key) != watcher.target or task.done()
            ]
            await self._stop_many(gone)
            for key, target in targets.items():
                if key not in self._watchers:
                    self._start(key, target)

    async def _on_change(self, change: StateChange) -> None:
        """MailboxService listener: schedule a reconcile (never await a watcher here)."""
        if self._stopped:
            return
        task = asyncio.create_task(self.reconcile(), name=f"imap:reconcile:{change.mailbox_id}")
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def _start(self, key: tuple[MailboxId, str], target: WatchTarget) -> None:
        ca_file = target.endpoint.ca_file
        if ca_file not in self._contexts:
            self._contexts[ca_file] = make_ssl_context(ca_file)
        endpoint = replace(target.endpoint, ssl_context=self._contexts[ca_file])
        watcher = FolderWatcher(
            target=replace(target, endpoint=endpoint),
            role=key[1],
            db=self._db,
            credentials=self._service,
            deliver=self._deliver,
            config=self._config,
        )
        name = f"imap:{key[0]}:{key[1]}"
        self._watchers[key] = (watcher, asyncio.create_task(watcher.run(), name=name))
        log.info("imap watcher started", extra={"mailbox_id": key[0], "folder": key[1]})

    async def _deliver(
        self, messages: Sequence[tuple[bytes, ImapOrigin]], previous_uid: int
    ) -> list[IntakeResult]:
        return await self._intake.accept_fetched_many(messages, previous_uid=previous_uid)

    async def _stop_many(self, keys: Sequence[tuple[MailboxId, str]]) -> None:
        entries = [self._watchers.pop(key) for key in keys if key in self._watchers]
        for watcher, _task in entries:
            await watcher.stop()
        tasks = [task for _watcher, task in entries]
        if not tasks:
            return
        _done, late = await asyncio.wait(tasks, timeout=STOP_TIMEOUT_SECONDS)
        for task in late:
            task.cancel()
        for task in late:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for watcher, _task in entries:
            log.info("imap watcher stopped", extra=watcher.log_fields)
