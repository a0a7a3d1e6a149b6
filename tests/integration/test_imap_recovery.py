"""IMAP sync through trouble: server restart, BYE, UIDVALIDITY change, expired token,
a burst of 100 messages, and a poison message (issue 4 items 2, 5, 7).

Same in-process gateway as ``test_imap_sync.py`` (whose fixtures and
helpers are reused), on the real testbed servers.
"""

from __future__ import annotations

import asyncio
import hashlib
from datetime import timedelta
from email.message import EmailMessage
from email.utils import make_msgid
from typing import Any

import pytest
import sqlalchemy as sa

from gateway.mailboxes import REAUTH_REQUIRED, MailboxError
from ingest.types import MailboxState, Provider
from tests.integration.test_imap_sync import (
    CONTACT,
    Env,
    all_idle,
    connect,
    env,
    in_contact_conversation,
    log_rules,
    message,
    scalar,
    stored_count,
    wait_until,
)
from tests.testbed.dovecot import Dovecot
from tests.testbed.oauth_server import OAuthProvider
from tests.testbed.plugin import TestbedUser

pytestmark = pytest.mark.integration

__all__ = ["env"]  # the fixture, imported so pytest finds it here


async def test_dovecot_restart_during_idle_recovers_and_catches_up(
    env: Env, dovecot: Dovecot, gmail_user: TestbedUser
) -> None:
    record = await connect(env, Provider.GMAIL, gmail_user)
    first, raw = message(CONTACT, gmail_user.address)
    await asyncio.to_thread(dovecot.deliver_lmtp, gmail_user.address, raw)
    await wait_until(lambda: in_contact_conversation(env, first), what="first message")
    await asyncio.to_thread(dovecot.restart)
    # Delivered right after the restart, before the watchers are back: caught up, not lost.
    second, raw = message(CONTACT, gmail_user.address)
    await asyncio.to_thread(dovecot.deliver_lmtp, gmail_user.address, raw)
    await wait_until(lambda: in_contact_conversation(env, second), what="message after restart")
    await wait_until(lambda: all_idle(env, record.id), what="watchers idle again")
    assert await stored_count(env, first) == 1
    assert await stored_count(env, second) == 1


async def test_bye_from_kick_reconnects(
    env: Env, dovecot: Dovecot, gmail_user: TestbedUser
) -> None:
    await connect(env, Provider.GMAIL, gmail_user)
    assert await asyncio.to_thread(dovecot.kick, gmail_user.address)
    mid, raw = message(CONTACT, gmail_user.address)
    await asyncio.to_thread(dovecot.deliver_lmtp, gmail_user.address, raw)
    await wait_until(lambda: in_contact_conversation(env, mid), what="message after BYE")
    assert await stored_count(env, mid) == 1


async def test_r12_uidvalidity_change_resyncs_without_duplicates(
    env: Env, dovecot: Dovecot, gmail_user: TestbedUser
) -> None:
    record = await connect(env, Provider.GMAIL, gmail_user)
    sent = gmail_user.sent_folder
    assert sent is not None
    first, first_raw = message(gmail_user.address, CONTACT, subject="Offer")
    await asyncio.to_thread(dovecot.append, gmail_user.address, sent, first_raw)
    await wait_until(lambda: in_contact_conversation(env, first), what="sent copy stored")

    def recreate_folder() -> None:
        # A deleted and recreated folder gets a new UIDVALIDITY (RFC 9051 §2.3.1.1).
        with dovecot.imap_session(gmail_user.address) as client:
            client.delete_folder(sent)
            client.create_folder(sent)

    await asyncio.to_thread(recreate_folder)
    second, second_raw = message(gmail_user.address, CONTACT, subject="Offer 2")
    await asyncio.to_thread(dovecot.append, gmail_user.address, sent, first_raw)
    await asyncio.to_thread(dovecot.append, gmail_user.address, sent, second_raw)
    await wait_until(lambda: in_contact_conversation(env, second), what="new mail after reset")
    assert await stored_count(env, first) == 1
    assert ("R12", "duplicate") in await log_rules(env, record.id)


async def test_r22_access_token_expired_mid_session_relogs_with_refreshed_token(
    env: Env, dovecot: Dovecot, oauth_provider: OAuthProvider, gmail_user: TestbedUser
) -> None:
    await connect(env, Provider.GMAIL, gmail_user)
    refreshes = oauth_provider.request_count("google", "token")
    await asyncio.to_thread(oauth_provider.expire_access_tokens, gmail_user.address)
    await asyncio.to_thread(dovecot.kick, gmail_user.address)  # next login needs a token
    mid, raw = message(CONTACT, gmail_user.address)
    await asyncio.to_thread(dovecot.deliver_lmtp, gmail_user.address, raw)
    await wait_until(lambda: in_contact_conversation(env, mid), what="message after re-login")
    assert oauth_provider.request_count("google", "token") > refreshes
    assert await stored_count(env, mid) == 1


async def test_r22_invalid_grant_then_reconnect_syncs_mail_from_meanwhile_once(
    env: Env, dovecot: Dovecot, oauth_provider: OAuthProvider, gmail_user: TestbedUser
) -> None:
    """Consent revoked → reauth_required, watchers stop; mail that arrives meanwhile
    syncs exactly once after the user reconnects the same address (R22, R6, R12)."""
    record = await connect(env, Provider.GMAIL, gmail_user)
    before_mid, before_raw = message(CONTACT, gmail_user.address)
    await asyncio.to_thread(dovecot.deliver_lmtp, gmail_user.address, before_raw)
    await wait_until(lambda: in_contact_conversation(env, before_mid), what="first message")

    await asyncio.to_thread(oauth_provider.revoke_grant, gmail_user.address)
    with pytest.raises(MailboxError) as refused:
        await env.service.refresh(record.id)
    assert refused.value.code == REAUTH_REQUIRED
    assert (await env.service.get(record.id)).state is MailboxState.REAUTH_REQUIRED

    async def watchers_stopped() -> bool:
        return not [s for s in env.supervisor.status() if s.mailbox_id == record.id]

    await wait_until(watchers_stopped, what="watchers stopped on reauth_required")
    meanwhile_mid, meanwhile_raw = message(CONTACT, gmail_user.address)
    await asyncio.to_thread(dovecot.deliver_lmtp, gmail_user.address, meanwhile_raw)

    env.clock.offset = timedelta(minutes=5)  # the user comes back later than the mail
    again = await connect(env, Provider.GMAIL, gmail_user)
    assert again.id == record.id  # same row: checkpoints resume
    await wait_until(
        lambda: in_contact_conversation(env, meanwhile_mid), what="mail from meanwhile synced"
    )
    after_mid, after_raw = message(CONTACT, gmail_user.address)
    await asyncio.to_thread(dovecot.deliver_lmtp, gmail_user.address, after_raw)
    await wait_until(lambda: in_contact_conversation(env, after_mid), what="mail after reconnect")
    for mid in (before_mid, meanwhile_mid, after_mid):
        assert await stored_count(env, mid) == 1, mid
    assert ("R22", "skipped") in await log_rules(env, record.id)


async def test_burst_of_100_stored_once_in_arrival_order(
    env: Env, dovecot: Dovecot, gmail_user: TestbedUser
) -> None:
    await connect(env, Provider.GMAIL, gmail_user)
    burst = [message(CONTACT, gmail_user.address, subject=f"n{i}") for i in range(100)]

    def deliver_all() -> None:
        for _mid, raw in burst:
            dovecot.deliver_lmtp(gmail_user.address, raw)

    await asyncio.to_thread(deliver_all)
    ids = [mid for mid, _raw in burst]

    async def all_stored() -> bool:
        count = await scalar(env, "SELECT COUNT(*) FROM messages")
        return int(count) >= len(ids)

    await wait_until(all_stored, what="100 messages stored", within_seconds=60.0)

    def read(session: Any) -> list[str]:
        return [
            r[0] for r in session.execute(sa.text("SELECT message_id FROM messages ORDER BY id"))
        ]

    assert await env.db.read(read) == ids


def poison_message(payload: bytes) -> tuple[str, bytes]:
    msg = EmailMessage()
    mid = make_msgid(domain="customer.test")
    msg["From"] = CONTACT
    msg["To"] = "someone@example.test"
    msg["Subject"] = "Invoice"
    msg["Message-ID"] = mid
    msg.set_content("See attached.\n")
    msg.add_attachment(payload, maintype="application", subtype="pdf", filename="x.pdf")
    return mid.strip("<>"), msg.as_bytes()


def poison_for(address: str, other_raw: bytes) -> tuple[str, bytes, str]:
    """A message with an attachment whose blob fan-out prefix no raw message shares."""
    for attempt in range(1000):
        payload = b"%PDF-1.4 poison " + str(attempt).encode()
        prefix = hashlib.sha256(payload).hexdigest()[:2]
        mid, raw = poison_message(payload)
        raw = raw.replace(b"someone@example.test", address.encode())
        raws = (raw, other_raw)
        if all(hashlib.sha256(r).hexdigest()[:2] != prefix for r in raws):
            return mid, raw, prefix
    raise AssertionError("no suitable payload")


async def test_poison_message_quarantined_and_sync_goes_on(
    env: Env, dovecot: Dovecot, gmail_user: TestbedUser
) -> None:
    """A message whose storage fails (its attachment blob cannot be written) is quarantined."""
    record = await connect(env, Provider.GMAIL, gmail_user)
    after_mid, after_raw = message(CONTACT, gmail_user.address)
    poison_mid, poison_raw, prefix = poison_for(gmail_user.address, after_raw)
    # A file where the attachment blob's fan-out directory must go: its put raises OSError.
    (env.blobs.root / prefix).parent.mkdir(parents=True, exist_ok=True)
    (env.blobs.root / prefix).write_bytes(b"")
    await asyncio.to_thread(dovecot.deliver_lmtp, gmail_user.address, poison_raw)
    await asyncio.to_thread(dovecot.deliver_lmtp, gmail_user.address, after_raw)
    await wait_until(lambda: in_contact_conversation(env, after_mid), what="mail after poison")
    assert await stored_count(env, poison_mid) == 0
    provenance = await scalar(env, "SELECT provenance FROM quarantine")
    assert '"kind": "imap"' in provenance and '"uid": 1' in provenance
    assert ("quarantine", "quarantined") in await log_rules(env, record.id)
    checkpoint = await scalar(
        env,
        "SELECT checkpoint_uid FROM folder_states WHERE mailbox_id = :b AND folder = 'INBOX'",
        b=record.id,
    )
    assert checkpoint == 2
