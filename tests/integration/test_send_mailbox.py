"""CRM sends through the testbed (issue 5): R1, R11, R12, R16, R17, R21, retries, crashes.

Real OAuth2 server, Dovecot and submission server; SQLite in ``tmp_path``.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from aiosmtpd.controller import Controller
from aiosmtpd.handlers import Sink

from gateway.outbound import MAILBOX_NOT_CONNECTED, SendRequest
from ingest.compose import OutgoingAttachment
from ingest.limits import QUOTA_WINDOW, LimitCode
from ingest.types import Direction, MessageId, Provider, Source
from storage.blobs import BlobStore
from storage.db import Database
from storage.migrate import upgrade
from storage.models.enums import OutboundKind, OutboundState
from storage.repos import outbound as repo
from storage.repos import outbound_lookups as lookups
from storage.repos.conversations import conversation_view
from storage.repos.directory import add_subaccount, add_user
from tests.integration.send_env import (
    SUBACCOUNT,
    USER_EMAIL,
    SendEnv,
    add_recipient,
    build,
    connect,
)
from tests.testbed.dovecot import Dovecot
from tests.testbed.netutil import free_ports
from tests.testbed.oauth_server import OAuthProvider
from tests.testbed.plugin import TestbedUser
from tests.testbed.submission import SubmissionServer

pytestmark = pytest.mark.integration


@pytest.fixture
async def database(tmp_path: Path) -> AsyncIterator[tuple[Database, BlobStore]]:
    url = f"sqlite:///{tmp_path / 'mailgate.db'}"
    await asyncio.to_thread(upgrade, url)
    db = Database(url)
    sub_id = await db.run(add_subaccount, SUBACCOUNT)
    await db.run(add_user, USER_EMAIL, "CRM User", [sub_id])
    yield db, BlobStore(tmp_path / "blobs")
    await db.close()


async def make_env(
    database: tuple[Database, BlobStore],
    oauth_provider: OAuthProvider,
    dovecot: Dovecot,
    submission: SubmissionServer,
    **kw: Any,
) -> SendEnv:
    db, blobs = database
    return build(db, blobs, oauth_provider, dovecot, submission, **kw)


def inbox_message_ids(dovecot: Dovecot, user: TestbedUser, folder: str = "INBOX") -> list[bytes]:
    with dovecot.imap_session(user.address) as client:
        client.select_folder(folder, readonly=True)
        uids = client.search(["ALL"])
        fetched = client.fetch(uids, ["BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"])
        return [v[b"BODY[HEADER.FIELDS (MESSAGE-ID)]"].strip() for v in fetched.values()]


def request(contact: TestbedUser, **kw: Any) -> SendRequest:
    fields: dict[str, Any] = {
        "user": USER_EMAIL,
        "subaccount": SUBACCOUNT,
        "to": (contact.address,),
        "subject": "Your quote",
        "text": "Hello from the CRM",
    }
    fields.update(kw)
    return SendRequest(**fields)


def sent_for(submission: SubmissionServer, message_id: str) -> list[Any]:
    return [t for t in submission.transactions if message_id.encode() in t.content]


@pytest.mark.parametrize("provider", [Provider.GMAIL, Provider.OUTLOOK])
async def test_r1_send_through_mailbox_delivered_filed_and_in_conversation(
    database: Any,
    oauth_provider: OAuthProvider,
    dovecot: Dovecot,
    submission: SubmissionServer,
    imap_password_user: TestbedUser,
    provider: Provider,
    request: pytest.FixtureRequest,
) -> None:
    sender = request.getfixturevalue("gmail_user" if provider is Provider.GMAIL else "outlook_user")
    env = await make_env(database, oauth_provider, dovecot, submission)
    await connect(env, provider, sender)
    await add_recipient(env, imap_password_user)
    record = await env.outbound.send(request_(imap_password_user))
    assert record.state == OutboundState.SENT, record.last_error
    assert record.route == repo.ROUTE_MAILBOX
    (tx,) = sent_for(submission, record.message_id)
    assert tx.auth_user == sender.address
    assert tx.delivered_to == (imap_password_user.address,)
    expected = f"<{record.message_id}>".encode()
    assert any(expected in h for h in inbox_message_ids(dovecot, imap_password_user))
    assert any(expected in h for h in inbox_message_ids(dovecot, sender, sender.sent_folder))
    view = await env.db.read(conversation_view, 1, imap_password_user.address)
    (message,) = view.messages
    assert message.direction == Direction.OUTBOUND and message.source == Source.CRM
    assert message.message_id == record.message_id
    assert message.id == record.message_pk


request_ = request


async def test_r11_exchange_rewritten_message_id_both_ids_stored(
    database: Any,
    oauth_provider: OAuthProvider,
    dovecot: Dovecot,
    submission: SubmissionServer,
    outlook_user: TestbedUser,
    imap_password_user: TestbedUser,
) -> None:
    env = await make_env(database, oauth_provider, dovecot, submission)
    await connect(env, Provider.OUTLOOK, outlook_user)
    await add_recipient(env, imap_password_user)
    submission.rewrite_message_id = True
    record = await env.outbound.send(request_(imap_password_user))
    assert record.state == OutboundState.SENT
    (tx,) = [t for t in submission.transactions if t.message_id == record.provider_message_id]
    assert record.provider_message_id is not None
    ids = await env.db.read(
        lambda s: sorted(
            tuple(r)
            for r in s.execute(
                sa.text("SELECT message_id, kind FROM message_ids WHERE message_pk = :pk"),
                {"pk": record.message_pk},
            )
        )
    )
    assert sorted(ids) == sorted([(record.message_id, "own"), (tx.message_id, "provider")])
    parent = await env.db.read(lookups.find_parent, MessageId(tx.message_id))
    assert parent is not None and parent.message_pk == record.message_pk


async def test_r17_quota_exhaustion_refused_with_reset_time(
    database: Any,
    oauth_provider: OAuthProvider,
    dovecot: Dovecot,
    submission: SubmissionServer,
    gmail_user: TestbedUser,
    imap_password_user: TestbedUser,
) -> None:
    limits = {"gmail": {"daily_send_limit": 2}}
    env = await make_env(database, oauth_provider, dovecot, submission, limits=limits)
    await connect(env, Provider.GMAIL, gmail_user)
    await add_recipient(env, imap_password_user)
    first = await env.outbound.send(request_(imap_password_user))
    env.clock.advance(60)
    second = await env.outbound.send(request_(imap_password_user))
    third = await env.outbound.send(request_(imap_password_user))
    assert (first.state, second.state) == (OutboundState.SENT, OutboundState.SENT)
    assert third.state == OutboundState.FAILED
    assert third.error_code == LimitCode.QUOTA_EXCEEDED
    assert third.resets_at == first.sent_at + QUOTA_WINDOW  # type: ignore[operator]
    assert sent_for(submission, third.message_id) == []
    assert len(sent_for(submission, first.message_id)) == 1


async def test_r17_outlook_attachment_type_and_size(
    database: Any,
    oauth_provider: OAuthProvider,
    dovecot: Dovecot,
    submission: SubmissionServer,
    outlook_user: TestbedUser,
    imap_password_user: TestbedUser,
) -> None:
    env = await make_env(database, oauth_provider, dovecot, submission)
    await connect(env, Provider.OUTLOOK, outlook_user)
    await add_recipient(env, imap_password_user)
    exe = OutgoingAttachment(
        filename="tool.exe", content_type="application/x-msdownload", payload=b"MZ"
    )
    big = OutgoingAttachment(
        filename="big.pdf", content_type="application/pdf", payload=b"x" * (3 * 1024 * 1024 + 1)
    )
    ok = OutgoingAttachment(
        filename="Angebot Zoë.pdf", content_type="application/pdf", payload=b"%PDF"
    )
    refused_type = await env.outbound.send(request_(imap_password_user, attachments=(exe,)))
    refused_size = await env.outbound.send(request_(imap_password_user, attachments=(big,)))
    accepted = await env.outbound.send(request_(imap_password_user, attachments=(ok,)))
    assert refused_type.error_code == LimitCode.ATTACHMENT_TYPE_NOT_ALLOWED
    assert refused_size.error_code == LimitCode.ATTACHMENT_TOO_LARGE
    assert accepted.state == OutboundState.SENT
    assert sent_for(submission, refused_type.message_id) == []
    assert sent_for(submission, refused_size.message_id) == []


async def test_r21_no_mailbox_and_no_relay_fails_mailbox_not_connected(
    database: Any,
    oauth_provider: OAuthProvider,
    dovecot: Dovecot,
    submission: SubmissionServer,
    imap_password_user: TestbedUser,
) -> None:
    env = await make_env(database, oauth_provider, dovecot, submission)
    await add_recipient(env, imap_password_user)
    record = await env.outbound.send(request_(imap_password_user))
    assert record.state == OutboundState.FAILED
    assert record.error_code == MAILBOX_NOT_CONNECTED
    stored = await env.db.read(repo.get_outbound, record.id)  # kept, never dropped
    assert stored.state == OutboundState.FAILED
    hooks = await env.db.read(
        lambda s: s.execute(sa.text("SELECT event FROM webhook_deliveries")).scalars().all()
    )
    assert hooks == ["message.send_failed"]


async def test_r16_bulk_goes_through_relay_and_creates_no_thread(
    database: Any,
    oauth_provider: OAuthProvider,
    dovecot: Dovecot,
    submission: SubmissionServer,
    gmail_user: TestbedUser,
    imap_password_user: TestbedUser,
) -> None:
    class Recorder(Sink):
        def __init__(self) -> None:
            self.messages: list[bytes] = []

        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            self.messages.append(bytes(envelope.original_content or b""))
            return "250 2.0.0 OK"

    handler = Recorder()
    (port,) = free_ports(1)
    relay = Controller(handler, hostname="127.0.0.1", port=port)
    relay.start()
    try:
        env = await make_env(
            database,
            oauth_provider,
            dovecot,
            submission,
            relay={"host": "127.0.0.1", "port": port, "security": "plain"},
        )
        await connect(env, Provider.GMAIL, gmail_user)
        record = await env.outbound.send(request_(imap_password_user, kind=OutboundKind.BULK))
    finally:
        relay.stop()
    assert record.state == OutboundState.SENT and record.route == repo.ROUTE_RELAY
    assert len(handler.messages) == 1 and record.message_id.encode() in handler.messages[0]
    assert sent_for(submission, record.message_id) == []
    threads = await env.db.read(
        lambda s: s.execute(sa.text("SELECT count(*) FROM synced_threads")).scalar_one()
    )
    assert threads == 0


async def test_transient_421_then_success_sent_once(
    database: Any,
    oauth_provider: OAuthProvider,
    dovecot: Dovecot,
    submission: SubmissionServer,
    gmail_user: TestbedUser,
    imap_password_user: TestbedUser,
) -> None:
    env = await make_env(database, oauth_provider, dovecot, submission)
    await connect(env, Provider.GMAIL, gmail_user)
    await add_recipient(env, imap_password_user)
    submission.fail_next(1, 421)
    record = await env.outbound.send(request_(imap_password_user))
    assert record.state == OutboundState.QUEUED and record.attempts == 1
    assert record.last_error is not None and "421" in record.last_error
    assert await env.outbound.process_due() == 0  # not due yet
    env.clock.advance(3600)
    assert await env.outbound.process_due() == 1
    done = await env.db.read(repo.get_outbound, record.id)
    assert done.state == OutboundState.SENT and done.attempts == 2
    assert len(sent_for(submission, record.message_id)) == 1


async def test_crash_after_data_reconciled_without_second_copy(
    database: Any,
    oauth_provider: OAuthProvider,
    dovecot: Dovecot,
    submission: SubmissionServer,
    gmail_user: TestbedUser,
    imap_password_user: TestbedUser,
) -> None:
    from gateway.smtp.sender import submit

    env = await make_env(database, oauth_provider, dovecot, submission)
    await connect(env, Provider.GMAIL, gmail_user)
    await add_recipient(env, imap_password_user)
    record = await env.outbound.enqueue(request_(imap_password_user))
    sending = await env.db.run(repo.mark_sending, record.id, env.clock())
    assert sending is not None
    # The attempt goes through SMTP, then the process dies before the ``sent`` update.
    target = await env.outbound._target(sending)
    await submit(
        target.server,
        target.login,
        envelope_sender=target.envelope_sender,
        envelope_recipients=sending.recipients,
        content=env.blobs.get(sending.raw_sha256 or ""),
        message_id=sending.message_id,
    )
    assert await env.outbound.reconcile() == 1
    assert await env.outbound.process_due() == 0
    done = await env.db.read(repo.get_outbound, record.id)
    assert done.state == OutboundState.SENT and done.message_pk is not None
    assert len(sent_for(submission, record.message_id)) == 1


async def test_crash_before_data_requeued_and_sent_once(
    database: Any,
    oauth_provider: OAuthProvider,
    dovecot: Dovecot,
    submission: SubmissionServer,
    gmail_user: TestbedUser,
    imap_password_user: TestbedUser,
) -> None:
    env = await make_env(database, oauth_provider, dovecot, submission)
    await connect(env, Provider.GMAIL, gmail_user)
    await add_recipient(env, imap_password_user)
    record = await env.outbound.enqueue(request_(imap_password_user))
    await env.db.run(repo.mark_sending, record.id, env.clock())
    assert await env.outbound.reconcile() == 1
    assert (await env.db.read(repo.get_outbound, record.id)).state == OutboundState.QUEUED
    assert await env.outbound.process_due() == 1
    assert len(sent_for(submission, record.message_id)) == 1


async def test_idempotency_key_sends_once(
    database: Any,
    oauth_provider: OAuthProvider,
    dovecot: Dovecot,
    submission: SubmissionServer,
    gmail_user: TestbedUser,
    imap_password_user: TestbedUser,
) -> None:
    env = await make_env(database, oauth_provider, dovecot, submission)
    await connect(env, Provider.GMAIL, gmail_user)
    await add_recipient(env, imap_password_user)
    first = await env.outbound.send(request_(imap_password_user, idempotency_key="k-1"))
    again = await env.outbound.send(request_(imap_password_user, idempotency_key="k-1"))
    assert again.id == first.id and again.state == OutboundState.SENT
    assert len(sent_for(submission, first.message_id)) == 1


@pytest.mark.parametrize("provider", [Provider.GMAIL, Provider.OUTLOOK])
async def test_r18_provider_files_the_sent_copy_and_we_add_none(
    database: Any,
    oauth_provider: OAuthProvider,
    dovecot: Dovecot,
    submission: SubmissionServer,
    imap_password_user: TestbedUser,
    provider: Provider,
    request: pytest.FixtureRequest,
) -> None:
    """R18: Gmail and Outlook save the sent message themselves: exactly one Sent copy."""
    sender = request.getfixturevalue("gmail_user" if provider is Provider.GMAIL else "outlook_user")
    env = await make_env(database, oauth_provider, dovecot, submission)
    await connect(env, provider, sender)
    await add_recipient(env, imap_password_user)
    record = await env.outbound.send(request_(imap_password_user))
    assert record.state == OutboundState.SENT, record.last_error
    expected = f"<{record.message_id}>".encode()
    in_sent = [h for h in inbox_message_ids(dovecot, sender, sender.sent_folder) if expected in h]
    assert len(in_sent) == 1


async def test_process_due_run_stopped_requeues_the_send_marked_ahead(
    database: Any,
    oauth_provider: OAuthProvider,
    dovecot: Dovecot,
    submission: SubmissionServer,
    gmail_user: TestbedUser,
    imap_password_user: TestbedUser,
) -> None:
    env = await make_env(database, oauth_provider, dovecot, submission)
    await connect(env, Provider.GMAIL, gmail_user)
    await add_recipient(env, imap_password_user)
    first, second, third = [
        await env.outbound.enqueue(request_(imap_password_user, subject=f"Quote {i}"))
        for i in range(3)
    ]
    env.blobs.path(second.raw_sha256 or "").unlink()  # the run stops at the second send
    with pytest.raises(FileNotFoundError):
        await env.outbound.process_due()
    rows = [await env.db.read(repo.get_outbound, r.id) for r in (first, second, third)]
    assert [(r.state, r.attempts) for r in rows] == [
        (OutboundState.SENT, 1),  # its outcome was committed while the second one started
        (OutboundState.SENDING, 1),  # attempt recorded, outcome unknown: reconcile's case
        (OutboundState.QUEUED, 0),  # marked ahead during the second send, released
    ]
    assert await env.outbound.process_due() == 1
    done = await env.db.read(repo.get_outbound, third.id)
    assert done.state == OutboundState.SENT and done.attempts == 1
    assert [len(sent_for(submission, r.message_id)) for r in rows] == [1, 0, 1]


async def test_attempt_cancelled_while_marking_leaves_the_send_queued(
    database: Any,
    tmp_path: Path,
    oauth_provider: OAuthProvider,
    dovecot: Dovecot,
    submission: SubmissionServer,
    gmail_user: TestbedUser,
    imap_password_user: TestbedUser,
) -> None:
    """A run stopped (cancelled: shutdown) before MAIL FROM leaves no row ``sending``.

    ``mark_sending`` runs on the database thread and commits even when the
    awaiting task is cancelled; the run must still release the row, or a
    restart would take a never-tried send for a crash during its attempt.
    """
    env = await make_env(database, oauth_provider, dovecot, submission)
    await connect(env, Provider.GMAIL, gmail_user)
    await add_recipient(env, imap_password_user)
    record = await env.outbound.enqueue(request_(imap_password_user))
    lock = sqlite3.connect(tmp_path / "mailgate.db", isolation_level=None)
    try:
        lock.execute("BEGIN IMMEDIATE")  # mark_sending waits for this write lock (busy_timeout)
        attempt = asyncio.create_task(env.outbound.process(record.id))
        await asyncio.sleep(0.2)
        attempt.cancel()
    finally:
        lock.rollback()
        lock.close()
    with pytest.raises(asyncio.CancelledError):
        await attempt
    row = await env.db.read(repo.get_outbound, record.id)
    assert (row.state, row.attempts) == (OutboundState.QUEUED, 0)
    assert sent_for(submission, record.message_id) == []
