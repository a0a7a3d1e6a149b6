"""CRM sends through a generic IMAP/SMTP mailbox (password), and the sends whose outcome is unknown.

Issue 5: R1, R12 and R18 on the password path; a failed Sent APPEND after
the 250 (the send stays ``sent``, the failure is recorded); a reply lost
after the end of the data (never resent blindly); a retry that waits out
its backoff. Real Dovecot (password users, PLAIN/LOGIN) and the testbed
submission server (PLAIN/LOGIN after TLS); SQLite in ``tmp_path``.
"""

from __future__ import annotations

import asyncio
import secrets
import ssl
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import sqlalchemy as sa

from gateway.config import Security
from gateway.mailboxes import ImapServer
from gateway.outbound import OUTCOME_UNKNOWN, SendRequest
from gateway.smtp import sender as smtp_sender
from ingest.types import Provider
from storage.blobs import BlobStore
from storage.db import Database
from storage.migrate import upgrade
from storage.models.enums import OutboundState
from storage.repos import outbound as repo
from storage.repos.directory import add_subaccount, add_user
from tests.integration.send_env import (
    SUBACCOUNT,
    USER_EMAIL,
    SendEnv,
    add_recipient,
    build,
    connect,
)
from tests.integration.test_imap_sync import wait_until
from tests.integration.test_round_trip import (  # noqa: F401  (trip is a fixture)
    RoundTrip,
    count,
    send_while_offline,
    sent_copy_fetched,
    trip,
)
from tests.testbed.dovecot import Dovecot
from tests.testbed.oauth_server import OAuthProvider
from tests.testbed.plugin import TestbedUser, make_user
from tests.testbed.submission import SubmissionServer
from tests.testbed.tokens import TokenKeys

pytestmark = pytest.mark.integration

LOST_REPLY_TIMEOUT_SECONDS = 1.0


# ------------------------------------------------------------------ helpers


def password_user(dovecot: Dovecot, keys: TokenKeys, *, sent_folder: str | None) -> TestbedUser:
    """A fresh generic IMAP user; with ``sent_folder`` created (found by its usual name)."""
    user = make_user(dovecot, keys, None, password=secrets.token_urlsafe(12))
    if sent_folder is not None:
        with dovecot.imap_session(user.address) as client:
            client.create_folder(sent_folder)
    return user


def imap_server(dovecot: Dovecot, submission: SubmissionServer, user: TestbedUser) -> ImapServer:
    assert dovecot.ports is not None
    return ImapServer(
        imap_host="127.0.0.1",
        imap_port=dovecot.ports.imap,
        imap_security=Security.STARTTLS,
        smtp_host="127.0.0.1",
        smtp_port=submission.port,
        smtp_security=Security.STARTTLS,
        username=user.address,
    )


def copies(dovecot: Dovecot, user: TestbedUser, folder: str, message_id: str) -> list[Any]:
    """FLAGS of every message in ``folder`` whose Message-ID is ``message_id``."""
    with dovecot.imap_session(user.address) as client:
        client.select_folder(folder, readonly=True)
        uids = client.search(["HEADER", "Message-ID", message_id])
        return [v[b"FLAGS"] for v in client.fetch(uids, ["FLAGS"]).values()]


def sent_for(submission: SubmissionServer, message_id: str) -> list[Any]:
    return [t for t in submission.transactions if message_id.encode() in t.content]


@pytest.fixture
async def database(tmp_path: Path) -> AsyncIterator[tuple[Database, BlobStore]]:
    url = f"sqlite:///{tmp_path / 'mailgate.db'}"
    await asyncio.to_thread(upgrade, url)
    db = Database(url)
    sub_id = await db.run(add_subaccount, SUBACCOUNT)
    await db.run(add_user, USER_EMAIL, "CRM User", [sub_id])
    yield db, BlobStore(tmp_path / "blobs")
    await db.close()


@pytest.fixture
def lossy(submission: SubmissionServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The next reply to an end of data is lost; the client gives up after 1 s.

    Both are undone after the test: ``monkeypatch`` restores the timeout and
    the ``submission`` fixture clears ``lose_next_replies``.
    """
    monkeypatch.setattr(smtp_sender, "TIMEOUT_SECONDS", LOST_REPLY_TIMEOUT_SECONDS)
    submission.lose_next_replies(1)


async def env_with_sender(
    database: tuple[Database, BlobStore],
    oauth_provider: OAuthProvider,
    dovecot: Dovecot,
    submission: SubmissionServer,
    sender: TestbedUser,
    contact: TestbedUser,
) -> SendEnv:
    """Send environment with ``sender`` connected as a generic IMAP mailbox."""
    env = build(database[0], database[1], oauth_provider, dovecot, submission)
    assert sender.password is not None
    server = imap_server(dovecot, submission, sender)
    await env.mailboxes.connect_imap(USER_EMAIL, SUBACCOUNT, server, sender.password)
    await add_recipient(env, contact)
    return env


def request(contact: TestbedUser) -> SendRequest:
    return SendRequest(
        user=USER_EMAIL,
        subaccount=SUBACCOUNT,
        to=(contact.address,),
        subject="Your quote",
        text="Hello from the CRM",
    )


async def sync_log_rules(env: SendEnv, message_id: str) -> list[tuple[str, str]]:
    def read(session: Any) -> list[tuple[str, str]]:
        rows = session.execute(
            sa.text("SELECT rule, outcome FROM sync_log WHERE message_id = :m"), {"m": message_id}
        )
        return [(r[0], r[1]) for r in rows]

    return await env.db.read(read)


# ------------------------------------------------------------ the testbed


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_testbed_submission_accepts_password_auth_after_tls_only(
    dovecot: Dovecot,
    submission: SubmissionServer,
    imap_password_user: TestbedUser,
    mechanism: str,
) -> None:
    assert imap_password_user.password is not None
    context = ssl.create_default_context(cafile=str(dovecot.ca_file))
    plain = aiosmtplib.SMTP(hostname="127.0.0.1", port=submission.port, start_tls=False)
    await plain.connect()
    try:
        await plain.ehlo()
        assert plain.supports_extension("starttls")
        assert not plain.supports_extension("auth")  # RFC 3207: AUTH only after STARTTLS
    finally:
        await _quit(plain)
    client = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=submission.port, start_tls=True, tls_context=context
    )
    await client.connect()
    try:
        await client.ehlo()
        assert {"plain", "login", "xoauth2"} <= set(client.server_auth_methods)
        auth = client.auth_plain if mechanism == "PLAIN" else client.auth_login
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as refused:
            await auth(imap_password_user.address, "wrong password")
        assert refused.value.code == 535
        answer = await auth(imap_password_user.address, imap_password_user.password)
        assert answer.code == 235
    finally:
        await _quit(client)


async def _quit(client: aiosmtplib.SMTP) -> None:
    """QUIT and wait until the socket is really closed.

    Closing a TLS transport only starts the TLS shutdown; the socket under it
    closes a few loop iterations later. A test that ends first leaves it to
    the GC, whose ResourceWarning then fails a LATER test under
    filterwarnings=error (seen once in CI: "unclosed transport" at the setup
    of the next test).
    """
    sock = client.get_transport_info("socket")
    try:
        await client.quit()
    except aiosmtplib.SMTPException:
        client.close()
    for _ in range(500):  # up to 5 s
        if sock is None or sock.fileno() == -1:
            return
        await asyncio.sleep(0.01)
    pytest.fail("the SMTP client's socket did not close within 5 s of QUIT")


# ------------------------------------------------------- R1, R12, R18 end to end


async def test_generic_imap_send_delivered_once_appended_once_synced_once(
    trip: RoundTrip,  # noqa: F811
    dovecot: Dovecot,
    submission: SubmissionServer,
    testbed_keys: TokenKeys,
) -> None:
    sender = password_user(dovecot, testbed_keys, sent_folder="Sent")
    assert sender.password is not None
    server = imap_server(dovecot, submission, sender)
    mailbox = await trip.service.connect_imap(USER_EMAIL, SUBACCOUNT, server, sender.password)
    assert mailbox.provider == Provider.IMAP
    record = await send_while_offline(trip, int(mailbox.id))
    assert record.last_error is None and record.message_pk is not None

    (tx,) = sent_for(submission, record.message_id)  # one submission
    assert tx.auth_user == sender.address and tx.auth_mechanism in ("PLAIN", "LOGIN")
    assert tx.sent_folder is None  # the server filed nothing: the copy below is ours (R18)
    assert len(copies(dovecot, trip.contact, "INBOX", record.message_id)) == 1
    (flags,) = copies(dovecot, sender, "Sent", record.message_id)
    assert b"\\Seen" in flags
    # The Sent watcher fetches our APPENDed copy and recognises the send (R12).
    await wait_until(lambda: sent_copy_fetched(trip, record.message_pk or 0), what="Sent copy")
    assert await count(trip, "SELECT COUNT(*) FROM messages") == 1


# ------------------------------------------------------------ case 1: APPEND


async def test_append_failure_after_250_still_sent_recorded_and_never_resent(
    database: Any,
    oauth_provider: OAuthProvider,
    dovecot: Dovecot,
    submission: SubmissionServer,
    testbed_keys: TokenKeys,
    imap_password_user: TestbedUser,
) -> None:
    sender = password_user(dovecot, testbed_keys, sent_folder=None)  # no Sent folder at all
    env = await env_with_sender(
        database, oauth_provider, dovecot, submission, sender, imap_password_user
    )
    record = await env.outbound.send(request(imap_password_user))
    assert record.state == OutboundState.SENT and record.error_code is None
    assert record.last_error is not None and record.last_error.startswith("R18")
    assert "NoSentFolder" in record.last_error
    assert ("R18", "skipped") in await sync_log_rules(env, record.message_id)
    assert await env.outbound.reconcile() == 0  # nothing left in ``sending``
    env.clock.advance(3600)
    assert await env.outbound.process_due() == 0
    assert len(sent_for(submission, record.message_id)) == 1
    assert len(copies(dovecot, imap_password_user, "INBOX", record.message_id)) == 1


async def test_append_connection_error_after_250_still_sent(
    database: Any,
    oauth_provider: OAuthProvider,
    dovecot: Dovecot,
    submission: SubmissionServer,
    testbed_keys: TokenKeys,
    imap_password_user: TestbedUser,
) -> None:
    sender = password_user(dovecot, testbed_keys, sent_folder="Sent")
    env = await env_with_sender(
        database, oauth_provider, dovecot, submission, sender, imap_password_user
    )

    def imap_port_closed(session: Any) -> None:  # the IMAP server goes away after connect
        session.execute(
            sa.text("UPDATE mailboxes SET server_settings = json_set(server_settings, :p, 9)"),
            {"p": "$.imap_port"},
        )

    await env.db.run(imap_port_closed)
    record = await env.outbound.send(request(imap_password_user))
    assert record.state == OutboundState.SENT
    assert record.last_error is not None and "R18" in record.last_error
    assert copies(dovecot, sender, "Sent", record.message_id) == []
    env.clock.advance(3600)
    assert await env.outbound.process_due() == 0
    assert len(sent_for(submission, record.message_id)) == 1


@pytest.mark.parametrize("sent_folder", [None, "Sent"])
async def test_generic_imap_crash_while_sending_gives_up_instead_of_resending(
    database: Any,
    oauth_provider: OAuthProvider,
    dovecot: Dovecot,
    submission: SubmissionServer,
    testbed_keys: TokenKeys,
    imap_password_user: TestbedUser,
    sent_folder: str | None,
) -> None:
    """Issue 5: a crash "does not send twice". Without a Sent folder nothing can tell;
    with one, our APPEND follows the 250, so a send absent from it may still have been
    accepted. Either way: outcome unknown, never resent."""
    sender = password_user(dovecot, testbed_keys, sent_folder=sent_folder)
    env = await env_with_sender(
        database, oauth_provider, dovecot, submission, sender, imap_password_user
    )
    record = await env.outbound.enqueue(request(imap_password_user))
    assert await env.db.run(repo.mark_sending, record.id, env.clock()) is not None
    # The process died here: after the 250 and before the APPEND, or before MAIL FROM.
    assert await env.outbound.reconcile() == 1
    done = await env.db.read(repo.get_outbound, record.id)
    assert done.state == OutboundState.FAILED and done.error_code == OUTCOME_UNKNOWN
    assert done.last_error is not None and "not resent" in done.last_error
    env.clock.advance(3600)
    assert await env.outbound.process_due() == 0
    assert sent_for(submission, record.message_id) == []


# ---------------------------------------------------------- case 2: lost reply


async def test_generic_imap_reply_lost_after_data_not_resent(
    database: Any,
    oauth_provider: OAuthProvider,
    dovecot: Dovecot,
    submission: SubmissionServer,
    testbed_keys: TokenKeys,
    imap_password_user: TestbedUser,
    lossy: None,
) -> None:
    sender = password_user(dovecot, testbed_keys, sent_folder="Sent")
    env = await env_with_sender(
        database, oauth_provider, dovecot, submission, sender, imap_password_user
    )
    record = await env.outbound.send(request(imap_password_user))
    (tx,) = sent_for(submission, record.message_id)
    assert tx.reply_lost  # the server accepted and delivered it; we never heard
    assert record.state == OutboundState.FAILED and record.error_code == OUTCOME_UNKNOWN
    assert record.attempts == 1
    env.clock.advance(3600)
    assert await env.outbound.process_due() == 0
    assert await env.outbound.reconcile() == 0
    assert len(sent_for(submission, record.message_id)) == 1
    assert len(copies(dovecot, imap_password_user, "INBOX", record.message_id)) == 1


async def test_gmail_reply_lost_after_data_settled_from_sent_folder(
    database: Any,
    oauth_provider: OAuthProvider,
    dovecot: Dovecot,
    submission: SubmissionServer,
    gmail_user: TestbedUser,
    imap_password_user: TestbedUser,
    lossy: None,
) -> None:
    env = build(database[0], database[1], oauth_provider, dovecot, submission)
    await connect(env, Provider.GMAIL, gmail_user)
    await add_recipient(env, imap_password_user)
    record = await env.outbound.send(request(imap_password_user))
    # The provider filed its Sent copy before the reply was lost: the send is found there.
    assert record.state == OutboundState.SENT, record.last_error
    assert record.message_pk is not None
    env.clock.advance(3600)
    assert await env.outbound.process_due() == 0
    assert len(sent_for(submission, record.message_id)) == 1


# ----------------------------------------------------- case 3: backoff respected


async def test_retry_not_attempted_before_its_backoff_ends(
    database: Any,
    oauth_provider: OAuthProvider,
    dovecot: Dovecot,
    submission: SubmissionServer,
    gmail_user: TestbedUser,
    imap_password_user: TestbedUser,
) -> None:
    env = build(database[0], database[1], oauth_provider, dovecot, submission)
    await connect(env, Provider.GMAIL, gmail_user)
    await add_recipient(env, imap_password_user)
    record = await env.outbound.enqueue(request(imap_password_user))
    later = env.clock() + timedelta(minutes=5)
    await env.db.run(
        repo.schedule_retry, record.id, env.clock(), next_attempt_at=later, error="421"
    )
    assert await env.db.run(repo.mark_sending, record.id, env.clock()) is None  # not due
    waiting = await env.outbound.process(record.id)  # e.g. a second HTTP background task
    assert waiting.state == OutboundState.QUEUED and waiting.attempts == 0
    assert sent_for(submission, record.message_id) == []
    env.clock.advance(301)
    done = await env.outbound.process(record.id)
    assert done.state == OutboundState.SENT and done.attempts == 1
    assert len(sent_for(submission, record.message_id)) == 1
