"""IMAP observability on the testbed: last sync time, last error, lag and session metrics.

Issue 4 item 6. Same in-process gateway as ``test_imap_sync.py`` (whose
fixtures and helpers are reused): a delivery must leave a recent
``mailboxes.last_sync_at`` and a plausible ``sync_lag_seconds`` (what
``mailgate mailbox show --json`` and ``GET /api/v1/users/{id}/mailbox``
print) and a lag sample in /metrics; a backlog caught up after the
watchers were stopped must show its lag (docs/imap.md "Sync lag").
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from gateway.http.api_mailbox import mailbox_json
from gateway.imap.supervisor import ImapSupervisor
from gateway.imap.watcher import WatcherState
from ingest.types import Provider
from storage.models import Mailbox
from storage.repos.mailboxes import get_mailbox
from tests.integration.conftest import mailgate_command, subprocess_env
from tests.integration.test_imap_sync import (
    CONTACT,
    WAIT_SECONDS,
    Env,
    all_idle,
    connect,
    env,
    in_contact_conversation,
    message,
    stored_count,
    wait_until,
)
from tests.testbed.dovecot import Dovecot
from tests.testbed.plugin import TestbedUser

pytestmark = pytest.mark.integration

__all__ = ["env"]  # the fixture, imported so pytest finds it here


PLAUSIBLE_LAG_SECONDS = 5.0
"""LMTP delivery → IDLE EXISTS → UID FETCH → commit on the loopback testbed, plus
INTERNALDATE's whole-second truncation: well under this on a loaded machine."""


def mailbox_show(tmp_path: Path, mailbox_id: int) -> dict[str, Any]:
    """Run ``mailgate mailbox show ID --json`` on the test gateway's SQLite database."""
    config = tmp_path / "cli.toml"
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'mailgate.db'}"  # running_gateway's file
    config.write_text(
        "[storage]\n"
        f"database_url = {json.dumps(database_url)}\n"
        f"data_dir = {json.dumps(str(tmp_path / 'cli-data'))}\n",
        encoding="utf-8",
    )
    done = subprocess.run(
        [*mailgate_command(), "mailbox", "show", str(mailbox_id), "--json", "-c", str(config)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


async def test_delivery_sets_last_sync_at_and_lag_metric(
    env: Env, dovecot: Dovecot, gmail_user: TestbedUser, tmp_path: Path
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
    assert shown.sync_lag_seconds is not None
    assert 0 <= shown.sync_lag_seconds < PLAUSIBLE_LAG_SECONDS
    assert shown.sync_lag_seconds == pytest.approx(lag)  # one message: the histogram's only sample
    assert mailbox_json(shown)["sync_lag_seconds"] == shown.sync_lag_seconds  # the API body
    cli = await asyncio.to_thread(mailbox_show, tmp_path, record.id)
    assert cli["sync_lag_seconds"] == shown.sync_lag_seconds
    assert cli["last_sync_at"] == shown.last_sync_at.isoformat()


async def test_backlog_caught_up_after_restart_shows_its_lag(
    env: Env, dovecot: Dovecot, gmail_user: TestbedUser, tmp_path: Path
) -> None:
    record = await connect(env, Provider.GMAIL, gmail_user)
    assert (await env.db.read(get_mailbox, record.id)).sync_lag_seconds is None  # nothing synced
    await env.supervisor.stop()
    now = datetime.now(UTC)
    # Say it was connected an hour ago, so R6 keeps a backlog received 20 and 10
    # minutes ago (the OAuth testbed rejects an id_token from a shifted clock).
    await env.db.run(
        lambda session: session.execute(
            sa.update(Mailbox)
            .where(Mailbox.id == record.id)
            .values(connected_at=now - timedelta(hours=1))
        )
    )
    backlog = [message(CONTACT, gmail_user.address, subject=f"Backlog {i}") for i in (20, 10)]

    def append_backlog() -> None:
        with dovecot.imap_session(gmail_user.address) as client:
            for minutes, (_mid, raw) in zip((20, 10), backlog, strict=True):
                client.append("INBOX", raw, msg_time=now - timedelta(minutes=minutes))

    await asyncio.to_thread(append_backlog)
    env.supervisor = ImapSupervisor(
        env.settings, env.db, env.service, env.intake, metrics=env.metrics
    )
    await env.supervisor.start()

    async def backlog_stored() -> bool:
        return all([await stored_count(env, mid) == 1 for mid, _raw in backlog])

    await wait_until(backlog_stored, what="backlog stored")
    await wait_until(lambda: all_idle(env, record.id), what="watchers idle again")
    shown = await env.db.read(get_mailbox, record.id)
    # The newest backlog message (10 min old) sets it; the oldest (20 min) would say 1200.
    assert shown.sync_lag_seconds is not None
    assert 600 <= shown.sync_lag_seconds < 600 + WAIT_SECONDS + PLAUSIBLE_LAG_SECONDS
    cli = await asyncio.to_thread(mailbox_show, tmp_path, record.id)
    assert cli["sync_lag_seconds"] == shown.sync_lag_seconds
    assert cli["state"] == "connected" and cli["last_error"] is None

    mid, raw = message(CONTACT, gmail_user.address, subject="Live again")
    await asyncio.to_thread(dovecot.deliver_lmtp, gmail_user.address, raw)
    await wait_until(lambda: in_contact_conversation(env, mid), what="live message stored")

    async def lag_back_to_seconds() -> bool:
        live = await env.db.read(get_mailbox, record.id)
        lag = live.sync_lag_seconds
        return lag is not None and 0 <= lag < PLAUSIBLE_LAG_SECONDS

    # The watcher writes the lag in its own transaction after the chunk's commit,
    # so the message can be visible a moment before its lag is.
    await wait_until(lag_back_to_seconds, what="sync_lag_seconds back to seconds")
