"""R4 claim: the first CRM reply in a thread held by several sub-accounts keeps it for one.

Real OAuth2 server, Dovecot and submission server (testbed); SQLite in ``tmp_path``.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from gateway.outbound import SendRequest
from ingest.pipeline import prepare
from ingest.types import (
    ContactId,
    ConversationTarget,
    Decision,
    Direction,
    InstanceState,
    MessageId,
    Provider,
    RawMessage,
    SmtpEnvelope,
    Source,
    SubaccountId,
    ThreadId,
    ThreadOrigin,
    ThreadTarget,
)
from storage.blobs import BlobStore
from storage.db import Database
from storage.migrate import upgrade
from storage.models.enums import OutboundState
from storage.repos.directory import add_contact, add_subaccount, add_user
from storage.repos.messages import apply_decision
from storage.repos.threads import claim_thread
from tests.integration.send_env import SUBACCOUNT, USER_EMAIL, SendEnv, build, connect
from tests.integration.test_imap_sync import message
from tests.testbed.dovecot import Dovecot
from tests.testbed.oauth_server import OAuthProvider
from tests.testbed.plugin import TestbedUser
from tests.testbed.submission import SubmissionServer

pytestmark = pytest.mark.integration

OTHER = "beta"


@pytest.fixture
async def env(
    tmp_path: Path, oauth_provider: OAuthProvider, dovecot: Dovecot, submission: SubmissionServer
) -> AsyncIterator[SendEnv]:
    url = f"sqlite:///{tmp_path / 'mailgate.db'}"
    await asyncio.to_thread(upgrade, url)
    db = Database(url)
    subs = [await db.run(add_subaccount, name) for name in (SUBACCOUNT, OTHER)]
    await db.run(add_user, USER_EMAIL, "CRM User", subs)
    yield build(db, BlobStore(tmp_path / "blobs"), oauth_provider, dovecot, submission)
    await db.close()


async def store_in_both(env: SendEnv, contact: str, mailbox: str) -> str:
    """Store a contact's message as one thread with an instance in each sub-account (R4)."""
    mid, raw = message(contact, mailbox, subject="Quote request")
    envelope = SmtpEnvelope(
        envelope_sender=contact,
        envelope_recipients=(mailbox,),
        peer="127.0.0.1",
        helo="test",
        received_at=datetime.now(UTC),
    )
    prepared = prepare(
        RawMessage(raw=raw, provenance=envelope, sha256=hashlib.sha256(raw).hexdigest())
    )
    targets = []
    for sub_id in (1, 2):
        contact_id = await env.db.run(add_contact, sub_id, contact, "Bob Contact", USER_EMAIL)
        targets.append(
            ConversationTarget(
                subaccount_id=SubaccountId(sub_id),
                contact_id=ContactId(int(contact_id)),
                new_contact=None,
                rule="R4",
                reason="assigned contact in both sub-accounts",
            )
        )
    decision = Decision(
        prepared=prepared,
        direction=Direction.INBOUND,
        source=Source.MAILBOX,
        refusal=None,
        duplicate_of=None,
        thread=ThreadTarget(
            thread_id=None, origin=ThreadOrigin.MAILBOX, merge_thread_ids=(), rule="R2", reason="t"
        ),
        conversations=tuple(targets),
        extra_bcc=(),
        log=(),
        decided_at=datetime.now(UTC),
    )
    await env.db.run(apply_decision, decision, env.blobs)
    return mid


async def instances(env: SendEnv) -> dict[int, tuple[str, bool]]:
    def read(session: Any) -> dict[int, tuple[str, bool]]:
        rows = session.execute(
            sa.text("SELECT subaccount_id, state, claimed_at FROM thread_instances")
        )
        return {int(r[0]): (str(r[1]), r[2] is not None) for r in rows}

    return dict(await env.db.read(read))


async def test_r4_first_crm_reply_claims_thread_other_instances_broken(
    env: SendEnv, gmail_user: TestbedUser, imap_password_user: TestbedUser
) -> None:
    await connect(env, Provider.GMAIL, gmail_user)
    parent = await store_in_both(env, imap_password_user.address, gmail_user.address)
    before = await instances(env)
    assert before == {
        1: (InstanceState.ACTIVE.value, False),
        2: (InstanceState.ACTIVE.value, False),
    }
    record = await env.outbound.send(
        SendRequest(
            user=USER_EMAIL,
            subaccount=SUBACCOUNT,
            to=(imap_password_user.address,),
            subject="Re: Quote request",
            text="Here it is",
            in_reply_to=MessageId(parent),
        )
    )
    assert record.state == OutboundState.SENT, record.last_error
    assert await instances(env) == {
        1: (InstanceState.ACTIVE.value, True),
        2: (InstanceState.BROKEN.value, False),
    }
    # the first claim wins: a later CRM reply in the broken sub-account changes nothing
    thread_id = ThreadId(
        await env.db.read(
            lambda s: s.execute(
                sa.text("SELECT DISTINCT thread_id FROM thread_instances")
            ).scalar_one()
        )
    )
    now = datetime.now(UTC)
    assert await env.db.run(claim_thread, thread_id, 2, now) is False
    assert await env.db.run(claim_thread, thread_id, 1, now) is True
    assert await instances(env) == {
        1: (InstanceState.ACTIVE.value, True),
        2: (InstanceState.BROKEN.value, False),
    }
