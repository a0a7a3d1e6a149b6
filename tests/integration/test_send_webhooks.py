"""gateway/webhooks.py: signed POSTs from the durable queue, retried until delivered."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import threading
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from gateway.config import make_settings
from gateway.webhooks import EVENT_HEADER, SIGNATURE_HEADER, WebhookSender, body_of
from storage.db import Database
from storage.migrate import upgrade
from storage.models.enums import WebhookState
from storage.repos import outbound as repo

pytestmark = pytest.mark.integration
SECRET = "hook-secret"
EVENT = "message.send_failed"


class Hook(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[bytes, dict[str, str]]]] = []
    fail_next = 0

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if Hook.fail_next:
            Hook.fail_next -= 1
            self.send_response(503)
        else:
            Hook.received.append((body, dict(self.headers)))
            self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        return


@pytest.fixture
def hook_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hooks"
    server.shutdown()
    server.server_close()


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    url = f"sqlite:///{tmp_path / 'mailgate.db'}"
    await asyncio.to_thread(upgrade, url)
    database = Database(url)
    yield database
    await database.close()


async def test_webhook_signed_and_retried_until_delivered(db: Database, hook_url: str) -> None:
    settings = make_settings(webhooks=[{"url": hook_url, "secret": SECRET, "events": [EVENT]}])
    now = [datetime.now(UTC)]
    sender = WebhookSender(db, settings, clock=lambda: now[0])
    payload = {"id": 7, "code": "quota_exceeded"}
    await db.run(repo.add_webhook_events, EVENT, payload, [hook_url], now[0])
    Hook.received.clear()
    Hook.fail_next = 1
    assert await sender.deliver_due() == 0  # 503: stays pending with a later attempt
    assert await sender.deliver_due() == 0  # not due yet
    now[0] += timedelta(hours=1)
    assert await sender.deliver_due() == 1
    ((body, headers),) = Hook.received
    assert body == body_of(EVENT, payload)
    expected = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert headers[SIGNATURE_HEADER] == f"sha256={expected}"
    assert headers[EVENT_HEADER] == EVENT
    left = await db.read(repo.due_webhooks, now[0] + timedelta(days=1))
    assert left == ()
    states = await db.read(
        lambda s: [
            r.state for r in s.query(__import__("storage.models", fromlist=["x"]).WebhookDelivery)
        ]
    )
    assert states == [WebhookState.DELIVERED]
