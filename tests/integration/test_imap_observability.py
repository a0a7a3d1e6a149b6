"""IMAP observability on the testbed: last sync time, last error, lag and session metrics.

Issue 4 item 6. Same in-process gateway as ``test_imap_sync.py`` (whose
fixtures and helpers are reused): a delivery must leave a recent
``mailboxes.last_sync_at`` (what ``mailgate mailbox show`` and
``GET /api/v1/users/{id}/mailbox`` print) and a lag sample in /metrics.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from gateway.imap.watcher import WatcherState
from ingest.types import Provider
from storage.repos.mailboxes import get_mailbox
from tests.integration.test_imap_sync import (
    CONTACT,
    WAIT_SECONDS,
    Env,
    connect,
    env,
    in_contact_conversation,
    message,
    wait_until,
)
from tests.testbed.dovecot import Dovecot
from tests.testbed.plugin import TestbedUser

pytestmark = pytest.mark.integration

__all__ = ["env"]  # the fixture, imported so pytest finds it here


async def test_delivery_sets_last_sync_at_and_lag_metric(
    env: Env, dovecot: Dovecot, gmail_user: TestbedUser
) -> None:
    record = await connect(env, Provider.GMAIL, gmail_user)
    before = datetime.now(UTC)
    mid, raw = message(CONTACT, gmail_user.address)
    await asyncio.to_thread(dovecot.deliver_lmtp, gmail_user.address, raw)
    await wait_until(lambda: in_contact_conversation(env, mid), what="message in conversation")

    async def lag_sampled() -> bool:
        count = env.metrics.registry.get_sample_value(
            "mailgate_sync_lag_seconds_count", {"provider": Provider.GMAIL.value}
        )
        return bool(count)

    await wait_until(lag_sampled, what="lag sample")
    shown = await env.db.read(get_mailbox, record.id)
    assert shown.last_sync_at is not None
    assert shown.last_sync_at >= before - timedelta(seconds=1)
    assert shown.last_error is None
    text = env.metrics.render().decode()
    assert 'mailgate_sync_lag_seconds_count{provider="gmail"} 1.0' in text
    idle = f'mailgate_imap_sessions{{provider="gmail",state="{WatcherState.IDLE.value}"}}'
    assert any(line.startswith(idle) and not line.endswith(" 0.0") for line in text.splitlines())
    lag = env.metrics.registry.get_sample_value(
        "mailgate_sync_lag_seconds_sum", {"provider": Provider.GMAIL.value}
    )
    assert lag is not None and 0 <= lag < WAIT_SECONDS
