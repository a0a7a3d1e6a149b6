"""Round trips of issue 5 item 7: CRM send, Sent copy, replies both ways (R1, R11, R12).

One gateway in-process, as ``gateway/app.py`` wires it: ``Database`` on
SQLite in ``tmp_path``, the real ``Intake``, the ``MailboxService`` (real
OAuth2 consent on the testbed server), the ``ImapSupervisor`` watching the
user's INBOX and Sent folder on the testbed Dovecot, and the
``OutboundService`` submitting to the testbed submission server, which
delivers to the contact and files the sender's Sent copy as Gmail and
Exchange do. The watchers are offline during the send and restarted after
it, so the Sent copy is always fetched after the conversation copy is
committed (the order that needs R12's recognition); waits poll the
database with a deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet

from gateway.config import Settings, make_settings
from gateway.imap.supervisor import ImapSupervisor, contact_initiated_of
from gateway.intake import Intake
from gateway.mailboxes import MailboxService
from gateway.observability import Metrics
from gateway.outbound import OutboundService, SendRequest
from gateway.spool import Spool
from ingest.types import Direction, Provider
from storage.blobs import BlobStore
from storage.db import Database
from storage.migrate import upgrade
from storage.models.enums import OutboundState
from storage.repos import outbound as repo
from storage.repos.directory import add_contact, add_subaccount, add_user
from tests.integration.send_env import FLAVOUR, PUBLIC_URL, USER_EMAIL, provider_settings
from tests.integration.test_imap_sync import (
    RETRY,
    all_idle,
    in_contact_conversation,
    message,
    scalar,
    wait_until,
)
from tests.integration.test_mailbox_lifecycle import consent
from tests.testbed.dovecot import Dovecot
from tests.testbed.oauth_server import OAuthProvider
from tests.testbed.plugin import TestbedUser
from tests.testbed.submission import SubmissionServer

pytestmark = pytest.mark.integration

SUBACCOUNT = "acme"
SUBJECT = "Your quote"


@dataclass
class RoundTrip:
    """The gateway of one test, and the contact (a testbed user, so delivery works)."""

    db: Database
    intake: Intake
    service: MailboxService
    outbound: OutboundService
    supervisor: ImapSupervisor
    contact: TestbedUser
    settings: Settings


@pytest.fixture
async def trip(
    tmp_path: Path,
    oauth_provider: OAuthProvider,
    dovecot: Dovecot,
    submission: SubmissionServer,
    imap_password_user: TestbedUser,
) -> AsyncIterator[RoundTrip]:
    url = f"sqlite:///{tmp_path / 'mailgate.db'}"
    await asyncio.to_thread(upgrade, url)
    db = Database(url)
    redirect = (PUBLIC_URL + "/oauth/callback",)
    clients = {p: oauth_provider.register_client(f, redirect) for p, f in FLAVOUR.items()}
    settings = make_settings(
        security={"token_key": Fernet.generate_key().decode()},
        http={"public_url": PUBLIC_URL},
        providers=provider_settings(oauth_provider, dovecot, submission, clients, {}),
        sync={"idle_renew_seconds": 30, "reconnect_backoff_max_seconds": 1},
    )
    spool = Spool(tmp_path / "spool")
    await asyncio.to_thread(spool.open)
    blobs = BlobStore(tmp_path / "blobs")
    intake = Intake(
        db=db,
        blobs=blobs,
        spool=spool,
        bcc=settings.bcc,
        metrics=Metrics(),
        contact_initiated=contact_initiated_of(settings),
        backfill_days=settings.sync.backfill_days,
    )
    intake_task = asyncio.create_task(intake.run(), name="intake")
    service = MailboxService(db, settings, retry=RETRY)
    outbound = OutboundService(db, settings, service, blobs)
    sub_id = await db.run(add_subaccount, SUBACCOUNT)
    await db.run(add_user, USER_EMAIL, "CRM User", [sub_id])
    await db.run(add_contact, sub_id, imap_password_user.address, "Bob Contact", USER_EMAIL)
    supervisor = ImapSupervisor(settings, db, service, intake)
    env = RoundTrip(db, intake, service, outbound, supervisor, imap_password_user, settings)
    await env.supervisor.start()
    try:
        yield env
    finally:
        await env.supervisor.stop()
        await intake.close()
        await intake_task
        await db.close()


async def connect(env: RoundTrip, provider: Provider, user: TestbedUser) -> int:
    """Connect ``user``'s mailbox (real consent); wait until INBOX and Sent are IDLE."""
    request = await env.service.start_authorization(USER_EMAIL, SUBACCOUNT, provider)
    query = await asyncio.to_thread(consent, request.url, user.address)
    record = await env.service.finish_authorization(query["state"], code=query["code"])
    await wait_until(lambda: all_idle(env, record.id), what="watchers idle")  # type: ignore[arg-type]
    return int(record.id)


async def send_while_offline(env: RoundTrip, mailbox_id: int) -> repo.OutboundRecord:
    """Send from the CRM with the watchers stopped, then restart them (a reconnect)."""
    await env.supervisor.stop()
    record = await env.outbound.send(
        SendRequest(
            user=USER_EMAIL,
            subaccount=SUBACCOUNT,
            to=(env.contact.address,),
            subject=SUBJECT,
            text="Hello from the CRM",
        )
    )
    assert record.state == OutboundState.SENT, record.last_error
    env.supervisor = ImapSupervisor(env.settings, env.db, env.service, env.intake)
    await env.supervisor.start()
    await wait_until(lambda: all_idle(env, mailbox_id), what="watchers idle again")  # type: ignore[arg-type]
    return record


async def count(env: RoundTrip, sql: str, **params: Any) -> int:
    return int(await scalar(env, sql, **params))  # type: ignore[arg-type]


async def sent_copy_fetched(env: RoundTrip, message_pk: int) -> bool:
    """The watcher recorded an IMAP location against the stored send (R12 duplicate)."""
    found = await count(
        env, "SELECT COUNT(*) FROM message_locations WHERE message_pk = :p", p=message_pk
    )
    return found >= 1


async def thread_of(env: RoundTrip, message_id: str) -> int | None:
    found = await scalar(
        env,  # type: ignore[arg-type]
        "SELECT thread_id FROM messages WHERE message_id = :m",
        m=message_id,
    )
    return None if found is None else int(found)


async def contact_replies(env: RoundTrip, dovecot: Dovecot, user: TestbedUser, cited: str) -> str:
    """LMTP a contact reply citing ``cited`` into the user's INBOX; wait until it is synced."""
    mid, raw = message(
        env.contact.address, user.address, in_reply_to=cited, subject="Re: " + SUBJECT
    )
    await asyncio.to_thread(dovecot.deliver_lmtp, user.address, raw)
    await wait_until(
        lambda: in_contact_conversation(env, mid, env.contact.address),  # type: ignore[arg-type]
        what="contact reply in conversation",
    )
    return mid


async def user_replies_from_client(
    env: RoundTrip, dovecot: Dovecot, user: TestbedUser, cited: str
) -> str:
    """APPEND the user's own reply (mail client) to the Sent folder; wait until it is synced."""
    assert user.sent_folder is not None
    mid, raw = message(
        user.address, env.contact.address, in_reply_to=cited, subject="Re: " + SUBJECT
    )
    await asyncio.to_thread(dovecot.append, user.address, user.sent_folder, raw, ("\\Seen",))
    await wait_until(
        lambda: in_contact_conversation(env, mid, env.contact.address),  # type: ignore[arg-type]
        what="client reply in conversation",
    )
    return mid


@pytest.mark.parametrize("provider", [Provider.GMAIL, Provider.OUTLOOK])
async def test_r1_r12_round_trip_send_sent_copy_and_replies_one_thread(
    trip: RoundTrip, dovecot: Dovecot, provider: Provider, request: pytest.FixtureRequest
) -> None:
    user = request.getfixturevalue("gmail_user" if provider is Provider.GMAIL else "outlook_user")
    mailbox_id = await connect(trip, provider, user)
    record = await send_while_offline(trip, mailbox_id)
    assert record.message_pk is not None
    await wait_until(lambda: sent_copy_fetched(trip, record.message_pk or 0), what="Sent copy")
    assert await count(trip, "SELECT COUNT(*) FROM messages") == 1  # R12: one row
    crm_thread = await thread_of(trip, record.message_id)
    assert crm_thread is not None

    reply = await contact_replies(trip, dovecot, user, record.message_id)
    assert await thread_of(trip, reply) == crm_thread  # R1
    own = await user_replies_from_client(trip, dovecot, user, record.message_id)
    assert await thread_of(trip, own) == crm_thread
    direction = await scalar(trip, "SELECT direction FROM messages WHERE message_id = :m", m=own)  # type: ignore[arg-type]
    assert direction == Direction.OUTBOUND.value
    assert await count(trip, "SELECT COUNT(*) FROM messages") == 3


async def test_r11_r12_exchange_rewritten_id_round_trip(
    trip: RoundTrip, dovecot: Dovecot, submission: SubmissionServer, outlook_user: TestbedUser
) -> None:
    mailbox_id = await connect(trip, Provider.OUTLOOK, outlook_user)
    submission.rewrite_message_id = True
    record = await send_while_offline(trip, mailbox_id)
    assert record.provider_message_id is not None
    assert record.provider_message_id != record.message_id
    assert record.message_pk is not None
    await wait_until(lambda: sent_copy_fetched(trip, record.message_pk or 0), what="Sent copy")
    # R12: the Sent copy carries the provider's id and is recognised as the send.
    assert await count(trip, "SELECT COUNT(*) FROM messages") == 1
    assert (
        await count(
            trip,
            "SELECT COUNT(*) FROM messages WHERE message_id = :m",
            m=record.provider_message_id,
        )
        == 0
    )
    crm_thread = await thread_of(trip, record.message_id)
    reply = await contact_replies(trip, dovecot, outlook_user, record.provider_message_id)
    assert await thread_of(trip, reply) == crm_thread  # R11: the rewritten id threads
    assert await count(trip, "SELECT COUNT(*) FROM messages") == 2
