"""A silently dead link during IDLE: no FIN, no RST, just nothing (issue 4 item 7).

A small TCP proxy sits between the watchers and the testbed Dovecot's IMAPS
port (TLS passes through it untouched). "Pausing" it black-holes every
connection it holds: bytes from either side are read and dropped, and the
sockets stay open, so neither end ever sees EOF or a reset. The watcher
only learns that the link is dead when its IDLE renewal's ``DONE`` gets no
answer (``session.DONE_TIMEOUT_SECONDS``, at most a quarter of the renewal,
so IDLE + DONE end within the renewal interval), then it reconnects through
the proxy (new connections are forwarded again) and catches up from its
checkpoint.

Same in-process gateway as ``test_imap_sync.py`` (its helpers are reused),
with a short IDLE renewal so the test runs in seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gateway.config import Settings
from ingest.types import Provider
from tests.integration.test_imap_sync import (
    CONTACT,
    Env,
    build_settings,
    connect,
    in_contact_conversation,
    message,
    running_gateway,
    stored_count,
    wait_until,
)
from tests.testbed.dovecot import Dovecot
from tests.testbed.oauth_server import OAuthProvider
from tests.testbed.plugin import TestbedUser

pytestmark = pytest.mark.integration

RENEW_SECONDS = 3
"""``sync.idle_renew_seconds`` here (the config's floor is 30 s; set below it on purpose)."""

MARGIN_SECONDS = 6.0
"""Backoff (≤ 1 s), reconnect, login, catch-up and commit on a busy 2-core machine."""

CHUNK = 65536


@dataclass(eq=False)
class _Link:
    """One proxied connection: the watcher's side and Dovecot's side."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    dead: bool = False
    client_closed: asyncio.Event = field(default_factory=asyncio.Event)


class BlackHoleProxy:
    """A TCP forwarder on 127.0.0.1 whose live connections can be made silently dead.

    ``black_hole()`` marks every current connection dead (bytes dropped both
    ways, sockets kept open) and holds new connections until ``resume_new()``.
    """

    def __init__(self, target_port: int) -> None:
        self._target_port = target_port
        self._server: asyncio.Server | None = None
        self._forwarding = asyncio.Event()
        self._forwarding.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.links: list[_Link] = []
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in self.links:
            link.client.close()
            link.upstream.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def black_hole(self) -> list[_Link]:
        """Make every current connection silently dead; hold new ones. Returns the dead links."""
        self._forwarding.clear()
        for link in self.links:
            link.dead = True
        return list(self.links)

    def resume_new(self) -> None:
        """Forward new connections again (the dead ones stay dead)."""
        self._forwarding.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._forwarding.wait()
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target_port)
        link = _Link(client=writer, upstream=up_writer)
        self.links.append(link)
        for source, sink, from_client in ((reader, up_writer, True), (up_reader, writer, False)):
            task = asyncio.create_task(self._pump(link, source, sink, from_client=from_client))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(
        self,
        link: _Link,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        *,
        from_client: bool,
    ) -> None:
        try:
            while data := await source.read(CHUNK):
                if not link.dead:
                    sink.write(data)
                    await sink.drain()
        except OSError:
            pass
        if from_client:
            link.client_closed.set()
        if not link.dead:  # a live link passes the close on; a dead one never does
            sink.close()


@pytest.fixture
async def proxy(dovecot: Dovecot) -> AsyncIterator[BlackHoleProxy]:
    assert dovecot.ports is not None
    forwarder = BlackHoleProxy(dovecot.ports.imaps)
    await forwarder.start()
    try:
        yield forwarder
    finally:
        await forwarder.close()


def proxied_settings(settings: Settings, port: int) -> Settings:
    """``settings`` with Gmail's IMAP port on the proxy and a short IDLE renewal.

    ``model_copy`` skips validation: the renewal is below the config's 30 s floor.
    """
    gmail = settings.providers.gmail.model_copy(update={"imap_port": port})
    providers = settings.providers.model_copy(update={"gmail": gmail})
    sync = settings.sync.model_copy(update={"idle_renew_seconds": RENEW_SECONDS})
    return settings.model_copy(update={"providers": providers, "sync": sync})


@pytest.fixture
async def proxied_env(
    tmp_path: Path,
    oauth_provider: OAuthProvider,
    dovecot: Dovecot,
    proxy: BlackHoleProxy,
) -> AsyncIterator[Env]:
    settings = proxied_settings(build_settings(oauth_provider, dovecot), proxy.port)
    async with running_gateway(tmp_path, settings) as gateway:
        yield gateway


async def test_dead_link_without_fin_noticed_within_renew_interval(
    proxied_env: Env, proxy: BlackHoleProxy, dovecot: Dovecot, gmail_user: TestbedUser
) -> None:
    env = proxied_env
    await connect(env, Provider.GMAIL, gmail_user)
    opened = len(proxy.links)
    assert opened >= 2  # INBOX and Sent watchers, both through the proxy

    started = time.monotonic()
    dead = proxy.black_hole()
    mid, raw = message(CONTACT, gmail_user.address)
    await asyncio.to_thread(dovecot.deliver_lmtp, gmail_user.address, raw)
    proxy.resume_new()

    # The renewal (IDLE + the unanswered DONE, ≤ RENEW) + reconnect and catch-up.
    limit = RENEW_SECONDS + MARGIN_SECONDS
    await wait_until(
        lambda: in_contact_conversation(env, mid),
        what="message after dead link",
        within_seconds=limit,
    )
    took = time.monotonic() - started
    assert took < limit
    assert len(proxy.links) > opened  # the watchers reconnected through the proxy
    assert all(link.dead for link in dead)

    async def watcher_dropped_dead_sockets() -> bool:
        return all(link.client_closed.is_set() for link in dead)

    # The watchers closed the silent sockets themselves: the proxy never closed them.
    await wait_until(watcher_dropped_dead_sockets, what="dead sockets closed", within_seconds=limit)
    assert await stored_count(env, mid) == 1
