"""BatchFacts on SQLite and PostgreSQL: a batch's facts equal what load_facts reads at that point.

Real mailing-list threads from the corpus (replies, quotes, cross-posted
participants) go through ``prepare`` → ``BatchFacts.facts`` → ``decide`` →
``apply_decision(held=...)`` in ONE transaction, in a shuffled order
(children before parents, duplicates, contacts created by earlier
messages), exactly as ``gateway.intake`` runs a batch. After every message
the facts the batch gave it are compared with a fresh ``load_facts`` that
sees every earlier write (held rows flushed first). Every corpus sender is
an alias of the user (R15 passes), so the batch creates contacts (R14) and
threads (R11) as it goes.
"""

from __future__ import annotations

import copy
import random
from contextlib import suppress
from dataclasses import replace
from datetime import UTC, datetime

import pytest
from sqlalchemy.orm import Session

from gateway.intake import raw_message
from ingest.pipeline import decide, prepare
from ingest.types import RouteSettings, SmtpEnvelope
from storage.blobs import BlobStore
from storage.db import Database
from storage.repos.batch import BatchFacts
from storage.repos.directory import add_contact, add_subaccount, add_user, sync_address
from storage.repos.facts import CONTACT_INITIATED_DEFAULTS, load_facts
from storage.repos.inserts import RowBuffer
from storage.repos.messages import apply_decision
from tests.unit.ingest.conftest import corpus_missing_message, corpus_root, read_mbox

DOMAIN = "bcc.example.test"
USER = "owner@example.org"
SETTINGS = RouteSettings(create_contacts=True, require_dmarc=False)
NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
MESSAGES = 160


def _corpus_batch(archive: str, seed: int) -> list[bytes]:
    reason = corpus_missing_message()
    if reason is not None:
        pytest.fail(reason)
    raws = read_mbox(corpus_root() / "threads" / archive)[:MESSAGES]
    raws += raws[:10]  # the same messages again: duplicates inside the batch (R12)
    random.Random(seed).shuffle(raws)
    return raws


@pytest.mark.parametrize(
    ("archive", "seed", "contacts_exist"),
    [
        ("notmuch-lkml.mbox", 1, False),
        ("notmuch-lkml.mbox", 7, True),
        ("notmuch-list.mbox", 1, False),
        ("ponymail-maven-dev-2017-11-mboxvm.mbox", 1, False),
        ("ponymail-maven-dev-2017-11-mboxvm.mbox", 5, True),
    ],
)
async def test_r11_r12_r14_batch_facts_equal_fresh_load_facts_after_each_message(
    db: Database, blobs: BlobStore, archive: str, seed: int, contacts_exist: bool
) -> None:
    raws = _corpus_batch(archive, seed)
    envelope = SmtpEnvelope(
        envelope_sender=USER,
        envelope_recipients=("u-placeholder@" + DOMAIN,),
        peer="127.0.0.1",
        helo="test",
        received_at=NOW,
    )
    recipients = {
        a.addr_spec
        for raw in raws
        for p in (prepare(raw_message(raw, envelope)),)
        for a in p.parsed.participants.to + p.parsed.participants.cc
    }

    def setup(session: Session) -> str:
        sub = add_subaccount(session, "A")
        add_user(session, USER, "Owner", [sub])
        if contacts_exist:  # then R14 creates none: most facts come from the batch's load
            for address in sorted(recipients):
                with suppress(ValueError):  # a few list headers hold no single address
                    add_contact(session, sub, address, assigned_user_email=USER)
        return sync_address(session, USER, sub, DOMAIN)

    rcpt = await db.run(setup)
    envelope = replace(envelope, envelope_recipients=(rcpt,))
    prepared = [prepare(raw_message(raw, envelope)) for raw in raws]
    senders = sorted({a.addr_spec for p in prepared for a in p.parsed.participants.from_})
    aliases = {USER: tuple(senders)}

    def run_batch(session: Session) -> tuple[int, int, int]:
        held = RowBuffer()
        batch = BatchFacts(
            session,
            [p.lookups for p in prepared],
            held=held,
            aliases=aliases,
            bcc_domain=DOMAIN,
            contact_initiated=CONTACT_INITIATED_DEFAULTS,
        )
        stored = duplicates = 0
        for index, item in enumerate(prepared):
            facts = batch.facts(index, item.lookups, settings=SETTINGS, auth=None, origin=None)
            # What load_facts would see with every earlier write in place: the held
            # rows (a copy) flushed in a savepoint that is then rolled back.
            savepoint = session.begin_nested()
            copy.deepcopy(held).flush(session)
            fresh = load_facts(
                session,
                item.lookups,
                aliases=aliases,
                settings=SETTINGS,
                auth=None,
                bcc_domain=DOMAIN,
            )
            savepoint.rollback()
            assert facts == fresh, f"message {index} ({item.parsed.message_id})"
            decision = decide(item, facts, NOW)
            apply_decision(session, decision, blobs, held)
            batch.wrote(decision)
            stored += decision.stores
            duplicates += decision.duplicate_of is not None
        held.flush(session)
        return stored, duplicates, batch.reloaded

    stored, duplicates, reloaded = await db.run(run_batch)
    print("STATS", stored, duplicates, reloaded)
    assert stored > 40
    assert duplicates >= 10
    # Both paths were exercised: facts from the batch's one load, and stale facts
    # loaded again (children before parents, contacts created, copies).
    assert reloaded >= 10
    if contacts_exist:
        assert len(raws) - reloaded >= 40
