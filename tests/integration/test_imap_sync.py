"""IMAP sync against the local provider testbed: routing rules R1-R6, R12 (issue 4 item 7).

Real servers: the testbed OAuth server (the mailbox is connected through
``MailboxService`` with the real consent flow, so every XOAUTH2 token comes
from ``MailboxService.access_token``) and the testbed Dovecot (LMTP
delivery, APPEND). The gateway side is built in-process the way
``gateway/app.py`` builds it: ``Database`` on SQLite in ``tmp_path``, the
real ``Intake`` batcher, and the ``ImapSupervisor``. Waits poll the
database with a deadline, never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography.fernet import Fernet

from gateway.config import Security, Settings, make_settings
from gateway.imap.supervisor import ImapSupervisor, contact_initiated_of
from gateway.imap.watcher import WatcherState
from gateway.intake import Intake
from gateway.mailboxes import ImapServer, MailboxService
from gateway.oauth import RetryPolicy
from gateway.observability import Metrics
from gateway.spool import Spool
from ingest.types import Direction, Provider, SubaccountId
from storage.blobs import BlobStore
from storage.db import Database
from storage.migrate import upgrade
from storage.repos.directory import add_contact, add_subaccount, add_user
from storage.repos.mailboxes import MailboxRecord
from tests.integration.test_mailbox_lifecycle import consent
from tests.testbed.dovecot import Dovecot
from tests.testbed.oauth_server import OAuthProvider
from tests.testbed.plugin import TestbedUser
from tests.testbed.settings import imap_keys, oauth_keys

pytestmark = pytest.mark.integration

PUBLIC_URL = "http://127.0.0.1:9"
RETRY = RetryPolicy(attempts=2, initial_seconds=0.01, max_seconds=0.05)
FLAVOUR = {Provider.GMAIL: "google", Provider.OUTLOOK: "microsoft"}
USER_EMAIL = "crm.user@acme.test"
CONTACT = "contact@customer.test"
WAIT_SECONDS = 15.0


class ShiftedClock:
    """Aware UTC now plus an offset a test may move forward (never a real sleep)."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


@dataclass
class Env:
    """One test's gateway: database, intake, mailbox service, supervisor, tenant."""

    db: Database
    intake: Intake
    service: MailboxService
    supervisor: ImapSupervisor
    settings: Settings
    subaccount_id: SubaccountId
    blobs: BlobStore
    clock: ShiftedClock
    metrics: Metrics


def build_settings(oauth_provider: OAuthProvider, dovecot: Dovecot) -> Settings:
    """Settings whose gmail/outlook IMAP servers are the testbed Dovecot (IMAPS)."""
    redirect = (PUBLIC_URL + "/oauth/callback",)
    providers: dict[str, Any] = {"imap": {"ca_file": str(dovecot.ca_file)}}
    for provider, flavour in FLAVOUR.items():
        client = oauth_provider.register_client(flavour, redirect)
        providers[provider.value] = {
            **oauth_keys(oauth_provider, flavour, client),
            **imap_keys(dovecot),
        }
    return make_settings(
        security={"token_key": Fernet.generate_key().decode()},
        http={"public_url": PUBLIC_URL},
        providers=providers,
        sync={"idle_renew_seconds": 30, "reconnect_backoff_max_seconds": 1},
    )


@contextlib.asynccontextmanager
async def running_gateway(tmp_path: Path, settings: Settings) -> AsyncIterator[Env]:
    """The gateway side built as ``gateway/app.py`` builds it, with one tenant.

    Database on SQLite in ``tmp_path``, the real intake batcher, the mailbox
    service (injected clock) and the IMAP supervisor; torn down in stop order.
    """
    url = f"sqlite:///{tmp_path / 'mailgate.db'}"
    await asyncio.to_thread(upgrade, url)
    db = Database(url)
    spool = Spool(tmp_path / "spool")
    await asyncio.to_thread(spool.open)
    blobs = BlobStore(tmp_path / "blobs")
    metrics = Metrics()
    intake = Intake(
        db=db,
        blobs=blobs,
        spool=spool,
        bcc=settings.bcc,
        metrics=metrics,
        contact_initiated=contact_initiated_of(settings),
        backfill_days=settings.sync.backfill_days,
    )
    intake_task = asyncio.create_task(intake.run(), name="intake")
    clock = ShiftedClock()
    service = MailboxService(db, settings, retry=RETRY, clock=clock)
    supervisor = ImapSupervisor(settings, db, service, intake, metrics=metrics)
    sub_id = await db.run(add_subaccount, "acme")
    await db.run(add_user, USER_EMAIL, "CRM User", [sub_id])
    await db.run(add_contact, sub_id, CONTACT, "Contact", USER_EMAIL)
    await supervisor.start()
    try:
        yield Env(db, intake, service, supervisor, settings, sub_id, blobs, clock, metrics)
    finally:
        await supervisor.stop()
        await intake.close()
        await intake_task
        await db.close()


@pytest.fixture
async def env(
    tmp_path: Path, oauth_provider: OAuthProvider, dovecot: Dovecot
) -> AsyncIterator[Env]:
    async with running_gateway(tmp_path, build_settings(oauth_provider, dovecot)) as gateway:
        yield gateway


async def connect(env: Env, provider: Provider, user: TestbedUser) -> MailboxRecord:
    """Connect ``user``'s mailbox through the real OAuth flow; wait until both folders IDLE."""
    request = await env.service.start_authorization(USER_EMAIL, "acme", provider)
    query = await asyncio.to_thread(consent, request.url, user.address)
    record = await env.service.finish_authorization(query["state"], code=query["code"])
    await wait_until(lambda: all_idle(env, record.id), what="watchers idle")
    return record


async def all_idle(env: Env, mailbox_id: int) -> bool:
    """Both watchers idle (a Sent watcher may have no folder: generic IMAP, INBOX only)."""
    states = {s.folder_role: s.state for s in env.supervisor.status() if s.mailbox_id == mailbox_id}
    return states.get("inbox") is WatcherState.IDLE and states.get("sent") in (
        WatcherState.IDLE,
        WatcherState.NO_FOLDER,
    )


async def wait_until(
    check: Callable[[], Awaitable[bool]], *, what: str, within_seconds: float = WAIT_SECONDS
) -> None:
    """Poll ``check`` every 50 ms until it is true; fail after ``within_seconds``."""
    deadline = time.monotonic() + within_seconds
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def message(
    sender: str,
    to: str,
    *,
    message_id: str | None = None,
    in_reply_to: str | None = None,
    subject: str = "Quote request",
    date: datetime | None = None,
) -> tuple[str, bytes]:
    """Return (Message-ID without brackets, RFC 5322 bytes)."""
    msg = EmailMessage()
    mid = message_id or make_msgid(domain="customer.test")
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = format_datetime(date or datetime.now(UTC))
    msg["Message-ID"] = mid
    if in_reply_to:
        msg["In-Reply-To"] = f"<{in_reply_to}>"
        msg["References"] = f"<{in_reply_to}>"
    msg.set_content("Hello,\nplease send a quote.\n")
    return mid.strip("<>"), msg.as_bytes()


async def scalar(env: Env, sql: str, **params: Any) -> Any:
    def read(session: Any) -> Any:
        return session.execute(sa.text(sql), params).scalar()

    return await env.db.read(read)


async def stored_count(env: Env, message_id: str) -> int:
    return int(
        await scalar(env, "SELECT COUNT(*) FROM messages WHERE message_id = :m", m=message_id)
    )


async def in_contact_conversation(env: Env, message_id: str, contact: str = CONTACT) -> bool:
    found = await scalar(
        env,
        "SELECT COUNT(*) FROM conversation_messages cm"
        " JOIN messages m ON m.id = cm.message_pk"
        " JOIN conversations c ON c.id = cm.conversation_id"
        " JOIN contacts k ON k.id = c.contact_id"
        " WHERE m.message_id = :m AND k.address_key = :k",
        m=message_id,
        k=contact,
    )
    return bool(found)


async def log_rules(env: Env, mailbox_id: int) -> list[tuple[str, str]]:
    def read(session: Any) -> list[tuple[str, str]]:
        rows = session.execute(
            sa.text("SELECT rule, outcome FROM sync_log WHERE mailbox_id = :b ORDER BY id"),
            {"b": mailbox_id},
        )
        return [(r[0], r[1]) for r in rows]

    return await env.db.read(read)


# ---------------------------------------------------------------------- rules


async def test_r2_gmail_contact_mail_arrives_in_conversation(
    env: Env, dovecot: Dovecot, gmail_user: TestbedUser
) -> None:
    record = await connect(env, Provider.GMAIL, gmail_user)
    mid, raw = message(CONTACT, gmail_user.address)
    await asyncio.to_thread(dovecot.deliver_lmtp, gmail_user.address, raw)
    await wait_until(lambda: in_contact_conversation(env, mid), what="message in conversation")
    assert await stored_count(env, mid) == 1
    assert ("R2", "stored") in await log_rules(env, record.id)


async def test_r3_outlook_mailbox_thread_not_synced(
    env: Env, dovecot: Dovecot, outlook_user: TestbedUser
) -> None:
    record = await connect(env, Provider.OUTLOOK, outlook_user)
    mid, raw = message(CONTACT, outlook_user.address)
    await asyncio.to_thread(dovecot.deliver_lmtp, outlook_user.address, raw)

    async def logged() -> bool:
        return ("R3", "skipped") in await log_rules(env, record.id)

    await wait_until(logged, what="R3 sync-log row")
    assert await stored_count(env, mid) == 0


@pytest.mark.parametrize("provider", [Provider.GMAIL, Provider.OUTLOOK])
async def test_r1_reply_to_crm_thread_syncs(
    env: Env, dovecot: Dovecot, provider: Provider, request: pytest.FixtureRequest
) -> None:
    user = request.getfixturevalue("gmail_user" if provider is Provider.GMAIL else "outlook_user")
    record = await connect(env, provider, user)
    crm_mid = await store_crm_message(env, user.address)
    mid, raw = message(CONTACT, user.address, in_reply_to=crm_mid, subject="Re: Quote")
    await asyncio.to_thread(dovecot.deliver_lmtp, user.address, raw)
    await wait_until(lambda: in_contact_conversation(env, mid), what="reply in conversation")
    assert ("R1", "stored") in await log_rules(env, record.id)


async def store_crm_message(env: Env, mailbox_address: str) -> str:
    """Store a CRM-origin thread (R1) directly through storage, as the CRM sender would."""
    from ingest.pipeline import prepare
    from ingest.types import (
        ConversationTarget,
        Decision,
        Direction,
        RawMessage,
        SmtpEnvelope,
        Source,
        ThreadOrigin,
        ThreadTarget,
    )
    from storage.repos.messages import apply_decision

    mid, raw = message(mailbox_address, CONTACT, subject="Quote")
    envelope = SmtpEnvelope(
        envelope_sender=mailbox_address,
        envelope_recipients=(CONTACT,),
        peer="127.0.0.1",
        helo="crm",
        received_at=datetime.now(UTC),
    )
    sha256 = hashlib.sha256(raw).hexdigest()
    prepared = prepare(RawMessage(raw=raw, provenance=envelope, sha256=sha256))
    contact_id = await scalar(env, "SELECT id FROM contacts WHERE address_key = :k", k=CONTACT)
    decision = Decision(
        prepared=prepared,
        direction=Direction.OUTBOUND,
        source=Source.CRM,
        refusal=None,
        duplicate_of=None,
        thread=ThreadTarget(
            thread_id=None, origin=ThreadOrigin.CRM, merge_thread_ids=(), rule="R1", reason="crm"
        ),
        conversations=(
            ConversationTarget(
                subaccount_id=env.subaccount_id,
                contact_id=contact_id,
                new_contact=None,
                rule="R1",
                reason="sent from the CRM",
            ),
        ),
        extra_bcc=(),
        log=(),
        decided_at=datetime.now(UTC),
    )
    await env.db.run(apply_decision, decision, env.blobs)
    return mid


async def test_r5_sent_folder_copy_syncs_outbound(
    env: Env, dovecot: Dovecot, gmail_user: TestbedUser
) -> None:
    record = await connect(env, Provider.GMAIL, gmail_user)
    assert gmail_user.sent_folder is not None
    mid, raw = message(gmail_user.address, CONTACT, subject="Our offer")
    await asyncio.to_thread(dovecot.append, gmail_user.address, gmail_user.sent_folder, raw)
    await wait_until(lambda: in_contact_conversation(env, mid), what="sent copy in conversation")
    direction = await scalar(env, "SELECT direction FROM messages WHERE message_id = :m", m=mid)
    assert direction == Direction.OUTBOUND.value
    assert ("R5", "stored") in await log_rules(env, record.id)


async def test_r6_mail_before_connect_not_imported(
    env: Env, dovecot: Dovecot, gmail_user: TestbedUser
) -> None:
    old_mid, old_raw = message(CONTACT, gmail_user.address, subject="Old")
    received = datetime.now(UTC) - timedelta(hours=1)

    def append_old() -> None:
        with dovecot.imap_session(gmail_user.address) as client:
            client.append("INBOX", old_raw, msg_time=received)

    await asyncio.to_thread(append_old)
    record = await connect(env, Provider.GMAIL, gmail_user)
    new_mid, new_raw = message(CONTACT, gmail_user.address, subject="New")
    await asyncio.to_thread(dovecot.deliver_lmtp, gmail_user.address, new_raw)
    await wait_until(lambda: in_contact_conversation(env, new_mid), what="new mail stored")
    assert await stored_count(env, old_mid) == 0
    assert ("R6", "skipped") in await log_rules(env, record.id)


async def test_r12_same_message_in_inbox_sent_and_reappended_stored_once(
    env: Env, dovecot: Dovecot, gmail_user: TestbedUser
) -> None:
    """One message seen three times (INBOX, Sent, re-APPENDed with a new UID) is one row."""
    await connect(env, Provider.GMAIL, gmail_user)
    assert gmail_user.sent_folder is not None
    mid, raw = message(CONTACT, gmail_user.address)
    await asyncio.to_thread(dovecot.deliver_lmtp, gmail_user.address, raw)
    await asyncio.to_thread(dovecot.append, gmail_user.address, gmail_user.sent_folder, raw)
    await asyncio.to_thread(dovecot.append, gmail_user.address, "INBOX", raw)

    async def three_locations() -> bool:
        found = await scalar(
            env,
            "SELECT COUNT(*) FROM message_locations l JOIN messages m ON m.id = l.message_pk"
            " WHERE m.message_id = :m",
            m=mid,
        )
        return int(found) == 3

    await wait_until(three_locations, what="three IMAP locations")
    assert await stored_count(env, mid) == 1


async def test_r1_generic_imap_starttls_login_reply_to_crm_thread_syncs(
    env: Env, dovecot: Dovecot, imap_password_user: TestbedUser
) -> None:
    """Generic IMAP: LOGIN with a password over STARTTLS; a reply to a CRM thread syncs (R1)."""
    assert imap_password_user.password is not None
    server = ImapServer(
        imap_host="127.0.0.1",
        imap_port=dovecot.ports.imap,
        imap_security=Security.STARTTLS,
        smtp_host="127.0.0.1",
        smtp_port=9,
        smtp_security=Security.STARTTLS,
        username=imap_password_user.address,
    )
    record = await env.service.connect_imap(USER_EMAIL, "acme", server, imap_password_user.password)
    await wait_until(lambda: all_idle(env, record.id), what="watchers idle")
    crm_mid = await store_crm_message(env, imap_password_user.address)
    mid, raw = message(CONTACT, imap_password_user.address, in_reply_to=crm_mid)
    await asyncio.to_thread(dovecot.deliver_lmtp, imap_password_user.address, raw)
    await wait_until(lambda: in_contact_conversation(env, mid), what="reply in conversation")
    started, started_raw = message(CONTACT, imap_password_user.address, subject="New topic")
    await asyncio.to_thread(dovecot.deliver_lmtp, imap_password_user.address, started_raw)

    async def r3_logged() -> bool:
        return ("R3", "skipped") in await log_rules(env, record.id)

    await wait_until(r3_logged, what="R3 for a mailbox-started thread")
    assert await stored_count(env, started) == 0


async def test_r4_same_gmail_in_two_subaccounts_one_watcher_copies_to_each(
    env: Env, dovecot: Dovecot, gmail_user: TestbedUser
) -> None:
    beta = await env.db.run(add_subaccount, "beta")
    await env.db.run(add_user, USER_EMAIL, "CRM User", [beta])
    await env.db.run(add_contact, beta, CONTACT, "Contact", USER_EMAIL)
    first = await connect(env, Provider.GMAIL, gmail_user)
    request = await env.service.start_authorization(USER_EMAIL, "beta", Provider.GMAIL)
    query = await asyncio.to_thread(consent, request.url, gmail_user.address)
    await env.service.finish_authorization(query["state"], code=query["code"])
    await asyncio.sleep(0.1)  # let the reconcile the connect scheduled run
    assert {s.mailbox_id for s in env.supervisor.status()} == {first.id}
    mid, raw = message(CONTACT, gmail_user.address)
    await asyncio.to_thread(dovecot.deliver_lmtp, gmail_user.address, raw)

    async def linked_twice() -> bool:
        found = await scalar(
            env,
            "SELECT COUNT(*) FROM conversation_messages cm JOIN messages m"
            " ON m.id = cm.message_pk WHERE m.message_id = :m",
            m=mid,
        )
        return int(found) == 2

    await wait_until(linked_twice, what="one message in both sub-accounts' conversations")
    assert await stored_count(env, mid) == 1
