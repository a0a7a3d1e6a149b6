"""``WatcherConfig.connect_slots`` bounds how many watchers connect at once (login storm).

A real loopback TCP server that accepts and never greets holds every
connect in ``ImapSession.open`` until the command timeout; it records how
many connections are open at the same moment. No IMAP server, no SQL (the
database is a recorder).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from gateway.config import Security
from gateway.imap.session import Endpoint
from gateway.imap.watcher import FolderWatcher, WatcherConfig, WatchTarget
from gateway.intake_result import IntakeResult
from ingest.types import MailboxId, Provider

WATCHERS = 10
SLOTS = 3


class SilentServer:
    """Accepts TCP connections, never writes; tracks the peak of simultaneous ones."""

    def __init__(self) -> None:
        self.open_now = 0
        self.peak = 0
        self.accepted = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open_now += 1
        self.accepted += 1
        self.peak = max(self.peak, self.open_now)
        try:
            await reader.read()  # until the client closes
        finally:
            self.open_now -= 1
            writer.close()


class RecordingDb:
    """Records ``db.run`` calls (the watchers' error bookkeeping) instead of running SQL."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.calls.append((fn, args))


async def no_delivery(messages: Any, previous_uid: int) -> list[IntakeResult]:
    raise AssertionError("never reached: no greeting, no login")


async def short_sleep(seconds: float) -> None:
    await asyncio.sleep(0.01)


async def peak_connections(slots: asyncio.Semaphore | None) -> SilentServer:
    silent = SilentServer()
    server = await asyncio.start_server(silent.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    endpoint = Endpoint(host="127.0.0.1", port=port, security=Security.PLAIN, timeout_seconds=0.3)
    config = WatcherConfig(sleep=short_sleep, connect_slots=slots)
    watchers = [
        FolderWatcher(
            target=WatchTarget(
                mailbox_id=MailboxId(i),
                provider=Provider.IMAP,
                address=f"user{i}@example.test",
                connected_at=datetime(2026, 1, 5, tzinfo=UTC),
                endpoint=endpoint,
                password_login=True,
            ),
            role="inbox",
            db=RecordingDb(),  # type: ignore[arg-type]
            credentials=None,  # type: ignore[arg-type]
            deliver=no_delivery,
            config=config,
        )
        for i in range(WATCHERS)
    ]
    tasks = [asyncio.create_task(w.run()) for w in watchers]
    await asyncio.sleep(1.0)  # a few rounds of connect, time out, back off
    for watcher in watchers:
        await watcher.stop()
    await asyncio.wait_for(asyncio.gather(*tasks), 5.0)
    server.close()
    await server.wait_closed()
    return silent


async def test_connect_slots_bound_simultaneous_connects() -> None:
    silent = await peak_connections(asyncio.Semaphore(SLOTS))
    assert silent.accepted > SLOTS  # the slots were handed on, not held forever
    assert silent.peak == SLOTS


async def test_without_slots_every_watcher_connects_at_once() -> None:
    silent = await peak_connections(None)
    assert silent.peak == WATCHERS
