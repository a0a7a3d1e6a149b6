"""FolderWatcher without a server: UIDVALIDITY reset cap, lag and sync bookkeeping.

The database is a recorder of the repository calls the watcher makes;
the clock is injected. No network, no SQL.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gateway.config import Security
from gateway.imap.session import Endpoint
from gateway.imap.watcher import (
    FolderSuspended,
    FolderWatcher,
    WatcherConfig,
    WatcherState,
    WatchTarget,
)
from gateway.intake_result import IntakeResult, IntakeStatus
from gateway.observability import Metrics
from ingest.types import ImapOrigin, MailboxId, MessagePk, Provider, Uid, UidValidity
from storage.repos.mailboxes import SUSPENDED_PREFIX, record_sync, record_sync_error

START = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
LIMIT = 3
WINDOW_SECONDS = 3600.0


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


class RecordingDb:
    """Records ``db.run(fn, *args, **kwargs)`` calls instead of running SQL."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = []

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.calls.append((fn, args, kwargs))


def make_watcher(clock: Clock, db: RecordingDb, metrics: Metrics) -> FolderWatcher:
    target = WatchTarget(
        mailbox_id=MailboxId(7),
        provider=Provider.GMAIL,
        address="user@example.test",
        connected_at=START,
        endpoint=Endpoint(host="127.0.0.1", port=1, security=Security.TLS),
        password_login=False,
    )

    async def deliver(messages: Any, previous_uid: int) -> list[IntakeResult]:
        raise AssertionError("not called")

    config = WatcherConfig(
        uidvalidity_reset_limit=LIMIT,
        uidvalidity_reset_window_seconds=WINDOW_SECONDS,
        metrics=metrics,
        clock=clock,
    )
    return FolderWatcher(
        target=target,
        role="sent",
        db=db,  # type: ignore[arg-type]
        credentials=None,  # type: ignore[arg-type]
        deliver=deliver,
        config=config,
    )


def resets_total(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value(
        "mailgate_imap_uidvalidity_resets_total", {"provider": Provider.GMAIL.value}
    )


def test_uidvalidity_resets_past_limit_in_window_suspend_the_folder() -> None:
    clock, db, metrics = Clock(), RecordingDb(), Metrics()
    watcher = make_watcher(clock, db, metrics)
    for _ in range(LIMIT):
        watcher._count_reset()
        clock.now += timedelta(minutes=1)
    with pytest.raises(FolderSuspended):
        watcher._count_reset()
    assert resets_total(metrics) == LIMIT + 1


def test_uidvalidity_resets_spread_beyond_window_are_allowed() -> None:
    clock, db, metrics = Clock(), RecordingDb(), Metrics()
    watcher = make_watcher(clock, db, metrics)
    for _ in range(LIMIT * 3):
        watcher._count_reset()  # never raises: older resets leave the window
        clock.now += timedelta(seconds=WINDOW_SECONDS / LIMIT + 1)
    assert resets_total(metrics) == LIMIT * 3


async def test_suspended_folder_stops_and_stores_error() -> None:
    clock, db, metrics = Clock(), RecordingDb(), Metrics()
    watcher = make_watcher(clock, db, metrics)
    passes = 0

    async def too_many_resets() -> None:
        nonlocal passes
        passes += 1
        raise FolderSuspended("sent: uidvalidity changed 4 times")

    watcher._connected_pass = too_many_resets  # type: ignore[method-assign]
    await watcher.run()
    assert passes == 1  # no reconnect, no re-sync
    assert watcher.state is WatcherState.SUSPENDED
    assert watcher.last_error is not None and watcher.last_error.startswith(SUSPENDED_PREFIX)
    assert [(fn, args) for fn, args, _ in db.calls] == [
        (record_sync_error, (MailboxId(7), watcher.last_error))
    ]


async def test_lag_observed_for_stored_messages_and_sync_time_written() -> None:
    clock, db, metrics = Clock(), RecordingDb(), Metrics()
    watcher = make_watcher(clock, db, metrics)
    origins = [
        ImapOrigin(
            mailbox_id=MailboxId(7),
            folder="Sent",
            folder_role="sent",
            uidvalidity=UidValidity(1),
            uid=Uid(uid),
            internal_date=START - timedelta(seconds=2),
        )
        for uid in (1, 2)
    ]
    results = [
        IntakeResult(status=IntakeStatus.STORED, message_pk=MessagePk(1)),
        IntakeResult(status=IntakeStatus.DUPLICATE, message_pk=MessagePk(1)),
    ]
    watcher._observe_lag([(b"", o) for o in origins], results)
    await watcher._touch(force=True)
    labels = {"provider": Provider.GMAIL.value}
    get = metrics.registry.get_sample_value
    assert get("mailgate_sync_lag_seconds_count", labels) == 1  # the duplicate is not counted
    assert get("mailgate_sync_lag_seconds_sum", labels) == pytest.approx(2.0)
    assert watcher.last_lag_seconds == pytest.approx(2.0)
    assert db.calls == [(record_sync, (MailboxId(7),), {"at": START})]
