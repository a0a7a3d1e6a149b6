"""FolderWatcher without a server: UIDVALIDITY reset cap, lag and sync bookkeeping.

The database is a recorder of the repository calls the watcher makes;
the session is a scripted stand-in for ``ImapSession`` (no socket); the
clock is injected. No network, no SQL.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gateway.config import Security
from gateway.imap.checkpoint import FolderSuspended, ResetWindow
from gateway.imap.responses import FetchedMessage, FolderInfo
from gateway.imap.session import Endpoint
from gateway.imap.sync_status import SYNC_TOUCH_SECONDS
from gateway.imap.watcher import (
    Deliver,
    FolderWatcher,
    WatcherConfig,
    WatcherState,
    WatchTarget,
)
from gateway.intake_result import IntakeResult, IntakeStatus
from gateway.observability import Metrics
from ingest.types import ImapOrigin, MailboxId, MessagePk, Provider, Uid, UidValidity
from storage.repos.folders import Checkpoint, load_checkpoint
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


FOLDER = FolderInfo(name="Sent", wire_name="Sent", flags=frozenset({b"\\sent"}))
UIDVALIDITY = 1
CHECKPOINT_UID = 4


class RecordingDb:
    """Records ``db.run(fn, *args, **kwargs)`` calls instead of running SQL.

    ``read(load_checkpoint, ...)`` answers the folder's stored checkpoint
    (``CHECKPOINT_UID`` under ``UIDVALIDITY``); reads are not recorded.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = []

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.calls.append((fn, args, kwargs))

    async def read(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Checkpoint:
        assert fn is load_checkpoint
        return Checkpoint(
            mailbox_id=MailboxId(7),
            folder=FOLDER.name,
            folder_role="sent",
            uidvalidity=UidValidity(UIDVALIDITY),
            checkpoint_uid=Uid(CHECKPOINT_UID),
        )


class ScriptedSession:
    """Stands in for a selected ``ImapSession`` during catch-up and IDLE.

    The first ``UID SEARCH`` answers ``messages``' UIDs, later ones nothing
    new. Each IDLE moves the clock by the next of ``idle_steps`` seconds
    and reports mail (no renewal, so no re-SELECT); once the steps are used
    up it stops the watcher.
    """

    capabilities = frozenset({"IDLE"})

    def __init__(
        self, clock: Clock, idle_steps: Sequence[float], messages: Sequence[FetchedMessage] = ()
    ) -> None:
        self.clock = clock
        self.idle_steps = list(idle_steps)
        self.messages = list(messages)
        self.messages_fetchable: list[FetchedMessage] = []
        self.searches: list[int] = []
        self.watcher: FolderWatcher | None = None

    async def uids_since(self, start_uid: int) -> tuple[Uid, ...]:
        self.searches.append(start_uid)
        found = tuple(m.uid for m in self.messages)
        self.messages_fetchable, self.messages = self.messages, []
        return found

    async def fetch(self, uids: Sequence[int]) -> tuple[FetchedMessage, ...]:
        return tuple(m for m in self.messages_fetchable if m.uid in uids)

    def take_exists(self) -> bool:
        return False

    async def idle(self, renew_seconds: float) -> bool:
        if self.idle_steps:
            self.clock.now += timedelta(seconds=self.idle_steps.pop(0))
        else:
            assert self.watcher is not None
            await self.watcher.stop()
        return True


def make_watcher(
    clock: Clock, db: RecordingDb, metrics: Metrics, deliver: Deliver | None = None
) -> FolderWatcher:
    target = WatchTarget(
        mailbox_id=MailboxId(7),
        provider=Provider.GMAIL,
        address="user@example.test",
        connected_at=START,
        endpoint=Endpoint(host="127.0.0.1", port=1, security=Security.TLS),
        password_login=False,
    )

    async def not_called(messages: Any, previous_uid: int) -> list[IntakeResult]:
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
        deliver=deliver or not_called,
        config=config,
    )


def resets_total(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value(
        "mailgate_imap_uidvalidity_resets_total", {"provider": Provider.GMAIL.value}
    )


def make_resets(metrics: Metrics) -> ResetWindow:
    return ResetWindow(
        role="sent",
        provider=Provider.GMAIL,
        limit=LIMIT,
        window_seconds=WINDOW_SECONDS,
        metrics=metrics,
    )


def test_uidvalidity_resets_past_limit_in_window_suspend_the_folder() -> None:
    clock, metrics = Clock(), Metrics()
    resets = make_resets(metrics)
    for _ in range(LIMIT):
        resets.count(clock.now)
        clock.now += timedelta(minutes=1)
    with pytest.raises(FolderSuspended):
        resets.count(clock.now)
    assert resets_total(metrics) == LIMIT + 1


def test_uidvalidity_resets_spread_beyond_window_are_allowed() -> None:
    clock, metrics = Clock(), Metrics()
    resets = make_resets(metrics)
    for _ in range(LIMIT * 3):
        resets.count(clock.now)  # never raises: older resets leave the window
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
    lag = watcher._status.observe_lag([(b"", o) for o in origins], results)
    await watcher._status.touch(force=True, lag_seconds=lag)
    labels = {"provider": Provider.GMAIL.value}
    get = metrics.registry.get_sample_value
    assert get("mailgate_sync_lag_seconds_count", labels) == 1  # the duplicate is not counted
    assert get("mailgate_sync_lag_seconds_sum", labels) == pytest.approx(2.0)
    assert watcher.last_lag_seconds == pytest.approx(2.0)
    assert db.calls == [(record_sync, (MailboxId(7),), {"at": START, "lag_seconds": 2.0})]
    assert watcher.last_sync_at == START


def sync_calls(db: RecordingDb) -> list[dict[str, Any]]:
    """The keyword arguments of every ``record_sync(mailbox 7, ...)`` call, in order."""
    assert all(fn is record_sync and args == (MailboxId(7),) for fn, args, _ in db.calls)
    return [kwargs for _, _, kwargs in db.calls]


async def test_quiet_catch_up_writes_lag_zero_at_most_every_touch_interval() -> None:
    clock, db, metrics = Clock(), RecordingDb(), Metrics()
    watcher = make_watcher(clock, db, metrics)
    # Three quiet passes: at START, START + 30 s (under the interval), START + 61 s.
    session = ScriptedSession(clock, idle_steps=[30.0, 31.0])
    session.watcher = watcher
    await watcher._status.touch(force=True, lag_seconds=None)  # as after SELECT
    await watcher._sync_folder(session, FOLDER, UIDVALIDITY)  # type: ignore[arg-type]
    assert 61.0 > SYNC_TOUCH_SECONDS > 30.0
    assert session.searches == [CHECKPOINT_UID + 1] * 3
    assert sync_calls(db) == [
        {"at": START, "lag_seconds": None},
        {"at": START + timedelta(seconds=61), "lag_seconds": 0.0},
    ]
    assert watcher.last_sync_at == START + timedelta(seconds=61)
    assert watcher.last_lag_seconds is None  # only a stored message sets it


async def test_chunk_of_only_duplicates_leaves_stored_lag_alone() -> None:
    clock, db, metrics = Clock(), RecordingDb(), Metrics()
    delivered: list[tuple[list[int], int]] = []

    async def all_duplicates(messages: Any, previous_uid: int) -> list[IntakeResult]:
        delivered.append(([int(o.uid) for _, o in messages], previous_uid))
        clock.now += timedelta(seconds=SYNC_TOUCH_SECONDS + 1)  # the commit took a while
        return [IntakeResult(status=IntakeStatus.DUPLICATE, message_pk=MessagePk(1))] * len(
            messages
        )

    watcher = make_watcher(clock, db, metrics, deliver=all_duplicates)
    labels = {"provider": Provider.GMAIL.value}
    metrics.sync_lag_seconds.labels(**labels)  # the series exists with count 0
    fetched = [
        FetchedMessage(uid=Uid(uid), raw=b"x", internal_date=START - timedelta(hours=1))
        for uid in (5, 6)
    ]
    session = ScriptedSession(clock, idle_steps=[], messages=fetched)
    session.watcher = watcher
    await watcher._sync_folder(session, FOLDER, UIDVALIDITY)  # type: ignore[arg-type]
    assert delivered == [([5, 6], CHECKPOINT_UID)]
    after_commit = START + timedelta(seconds=SYNC_TOUCH_SECONDS + 1)
    # The chunk's write keeps the stored lag (None), and the pass fetched
    # something, so it is not "level with the server" (no 0.0 either).
    assert sync_calls(db) == [{"at": after_commit, "lag_seconds": None}]
    assert watcher.last_lag_seconds is None
    assert metrics.registry.get_sample_value("mailgate_sync_lag_seconds_count", labels) == 0
