"""Deliver queued ``webhook_deliveries`` rows to the ``[[webhooks]]`` URLs, signed and retried.

Edge module: one HTTP POST per due row (httpx2). Rows are written by the
services in the same transaction as the event (durable queue); this module
only sends them. It never logs the secret or the body.

Signature: ``X-Mailgate-Signature: sha256=<hex>`` = HMAC-SHA256 of the exact
body bytes under the hook's ``secret``; ``X-Mailgate-Event`` names the event.
Row states: pending → delivered (2xx) | pending again (other answers, network
errors; capped jittered backoff) → failed after ``MAX_ATTEMPTS``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import httpx2
from sqlalchemy.orm import Session
from tenacity import RetryCallState, Retrying, wait_exponential_jitter

from gateway.config import Settings
from storage.db import Database
from storage.models.enums import WebhookState
from storage.repos import outbound as repo

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Mailgate-Signature"
EVENT_HEADER = "X-Mailgate-Event"
MAX_ATTEMPTS = 10
TIMEOUT_SECONDS = 10.0


def sign(secret: str, body: bytes) -> str:
    """Return the signature header value ``sha256=<hex>`` of ``body``."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def body_of(event: str, payload: dict[str, object]) -> bytes:
    """Return the JSON body posted for one event (compact, sorted keys, UTF-8)."""
    document = {"event": event, "data": payload}
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _utcnow() -> datetime:
    return datetime.now(UTC)


class WebhookSender:
    """Sends due deliveries; ``deliver_due`` is the scheduler's job."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        *,
        clock: Callable[[], datetime] = _utcnow,
        transport: httpx2.AsyncBaseTransport | None = None,
    ) -> None:
        self._db = db
        self._secrets = {h.url: h.secret.get_secret_value() for h in settings.webhooks}
        self._clock = clock
        self._transport = transport
        self._wait = wait_exponential_jitter(
            multiplier=5.0, max=float(settings.sync.reconnect_backoff_max_seconds), jitter=5.0
        )

    async def deliver_due(self, limit: int = 100) -> int:
        """POST every due delivery once; return how many were delivered."""
        due = await self._db.read(repo.due_webhooks, self._clock(), limit)
        delivered = 0
        async with httpx2.AsyncClient(timeout=TIMEOUT_SECONDS, transport=self._transport) as client:
            for row in due:
                error = await self._post(client, row)
                delivered += error is None
                await self._db.run(self._record, row, error)
        return delivered

    async def _post(self, client: httpx2.AsyncClient, row: repo.WebhookRecord) -> str | None:
        secret = self._secrets.get(row.url)
        if secret is None:
            return "url no longer configured"
        body = body_of(row.event, row.payload)
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(secret, body),
            EVENT_HEADER: row.event,
        }
        try:
            answer = await client.post(row.url, content=body, headers=headers)
        except httpx2.HTTPError as exc:
            return type(exc).__name__
        return None if 200 <= answer.status_code < 300 else f"HTTP {answer.status_code}"

    def _record(self, session: Session, row: repo.WebhookRecord, error: str | None) -> None:
        now = self._clock()
        attempts = row.attempts + 1
        if error is None:
            state = WebhookState.DELIVERED
        elif attempts >= MAX_ATTEMPTS or row.url not in self._secrets:
            state = WebhookState.FAILED
            log.warning("webhook given up", extra={"reason": error})
        else:
            state = WebhookState.PENDING
        retry = RetryCallState(Retrying(), None, (), {})
        retry.attempt_number = attempts
        next_at = now + timedelta(seconds=self._wait(retry))
        repo.record_webhook_attempt(
            session,
            row.id,
            state=state,
            next_attempt_at=next_at,
            error=error,
        )
