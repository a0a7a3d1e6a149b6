"""apply_decision on SQLite and PostgreSQL: store once, link, thread, merge, refuse, log."""

from __future__ import annotations

import asyncio
import hashlib
import threading

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import Session

from ingest.types import (
    Decision,
    ImapOrigin,
    InstanceState,
    LogEntry,
    MailboxId,
    MailboxState,
    MessageId,
    Outcome,
    ParticipantRole,
    Provider,
    Refusal,
    ThreadOrigin,
    Uid,
    UidValidity,
)
from storage.blobs import BlobStore
from storage.db import Database, make_engine
from storage.models import (
    Contact,
    Conversation,
    ConversationMessage,
    KnownMessageId,
    Mailbox,
    Message,
    MessageAttachment,
    MessageLocation,
    MessageParticipant,
    MessageReference,
    SyncedThread,
    SyncLogEntry,
    ThreadInstance,
)
from storage.repos.directory import add_contact, add_subaccount, add_user
from storage.repos.messages import DUPLICATE_RULE, add_provider_message_id, apply_decision

from .storage_builders import (
    addr,
    attachment,
    decision,
    join_thread,
    new_thread,
    prepared,
    stored_log,
    to_contact,
    to_new_contact,
)


def _count(session: Session, column: sa.ColumnElement[int]) -> int:
    return int(session.scalar(sa.select(sa.func.count(column))) or 0)


def _world(session: Session) -> tuple[int, int, int]:
    """Sub-account A with user ann and contact bob assigned to her."""
    a = add_subaccount(session, "A")
    ann = add_user(session, "ann@example.org", "Ann", [a])
    bob = add_contact(session, a, "bob@example.com", assigned_user_email="ann@example.org")
    return a, ann, bob


async def test_r1_new_thread_stores_message_rows_blobs_and_log(
    db: Database, blobs: BlobStore
) -> None:
    def check(session: Session) -> None:
        a, _, bob = _world(session)
        payload = b"%PDF-1.4 fake"
        prep = prepared(
            "new@x",
            references=["older@x"],
            from_=addr("ann@example.org", "Ann"),
            to=[addr("bob@example.com", "Bob")],
            attachments=[attachment(payload, "q.pdf", "application/pdf")],
        )
        pk = apply_decision(
            session,
            decision(
                prep,
                conversations=[to_contact(a, bob, "R1")],
                thread=new_thread(ThreadOrigin.CRM),
                log=stored_log(a),
            ),
            blobs,
        )
        assert pk is not None
        message = session.get_one(Message, pk)
        thread = session.get_one(SyncedThread, message.thread_id)
        assert thread.origin is ThreadOrigin.CRM
        assert blobs.get(message.raw_sha256) == prep.raw.raw
        assert message.raw_sha256 == prep.raw.sha256
        assert message.date_at == prep.parsed.date_at
        instance = session.scalar(sa.select(ThreadInstance))
        assert instance is not None
        assert (instance.thread_id, instance.subaccount_id, instance.state) == (
            thread.id,
            a,
            InstanceState.ACTIVE,
        )
        link = session.scalar(sa.select(ConversationMessage))
        assert link is not None and link.message_pk == pk and link.rule == "R1"
        ids = (session.execute(sa.select(KnownMessageId.message_id, KnownMessageId.kind))).all()
        assert [i for i, _ in ids] == ["new@x"]
        refs = list(session.scalars(sa.select(MessageReference.referenced_message_id)))
        assert refs == ["older@x"]
        att = session.scalar(sa.select(MessageAttachment))
        assert att is not None and blobs.get(att.sha256) == payload
        assert att.sha256 == hashlib.sha256(payload).hexdigest()
        log = list(session.scalars(sa.select(SyncLogEntry)))
        assert [(r.outcome, r.message_pk, r.message_id, r.subaccount_id) for r in log] == [
            (Outcome.STORED, pk, "new@x", a)
        ]

    await db.run(check)


async def test_r9_message_for_two_contacts_is_stored_once_and_linked_twice(
    db: Database, blobs: BlobStore
) -> None:
    def check(session: Session) -> None:
        a, _, bob = _world(session)
        carol = add_contact(session, a, "carol@example.com", assigned_user_email="ann@example.org")
        prep = prepared("r9@x", to=[addr("bob@example.com")], cc=[addr("carol@example.com")])
        pk = apply_decision(
            session,
            decision(prep, conversations=[to_contact(a, bob, "R9"), to_contact(a, carol, "R9")]),
            blobs,
        )
        assert _count(session, Message.id) == 1
        links = (session.execute(sa.select(ConversationMessage.message_pk))).scalars().all()
        assert links == [pk, pk]
        assert _count(session, Conversation.id) == 2
        assert _count(session, ThreadInstance.id) == 1

    await db.run(check)


async def test_r12_duplicate_writes_log_and_location_but_no_second_row(
    db: Database, blobs: BlobStore
) -> None:
    def check(session: Session) -> None:
        a, ann, bob = _world(session)
        mailbox = Mailbox(
            user_id=ann,
            subaccount_id=a,
            provider=Provider.GMAIL,
            address="ann@example.org",
            address_key="ann@example.org",
            state=MailboxState.CONNECTED,
        )
        session.add(mailbox)
        session.flush()
        first = apply_decision(
            session, decision(prepared("dup@x"), conversations=[to_contact(a, bob)]), blobs
        )
        assert first is not None
        origin = ImapOrigin(
            mailbox_id=MailboxId(mailbox.id),
            folder="INBOX",
            folder_role="inbox",
            uidvalidity=UidValidity(7),
            uid=Uid(42),
        )
        again = decision(prepared("dup@x", provenance=origin), duplicate_of=first)
        assert apply_decision(session, again, blobs) == first
        assert apply_decision(session, again, blobs) == first  # redelivery after a crash
        assert _count(session, Message.id) == 1
        locations = (
            session.execute(sa.select(MessageLocation.message_pk, MessageLocation.uid))
        ).all()
        assert locations == [(first, 42)]
        log = (
            session.execute(
                sa.select(
                    SyncLogEntry.outcome,
                    SyncLogEntry.rule,
                    SyncLogEntry.message_pk,
                    SyncLogEntry.mailbox_id,
                ).where(SyncLogEntry.outcome == Outcome.DUPLICATE)
            )
        ).all()
        assert log == [(Outcome.DUPLICATE, DUPLICATE_RULE, first, mailbox.id)] * 2

    await db.run(check)


async def test_r15_refusal_writes_only_the_log(db: Database, blobs: BlobStore) -> None:
    def check(session: Session) -> None:
        refusal = Refusal(rule="R15", reason="From is not the sync address's user")
        prep = prepared("refused@x")
        assert apply_decision(session, decision(prep, refusal=refusal), blobs) is None
        assert _count(session, Message.id) == 0
        assert not blobs.exists(prep.raw.sha256)
        rows = (
            session.execute(sa.select(SyncLogEntry.rule, SyncLogEntry.outcome, SyncLogEntry.reason))
        ).all()
        assert rows == [(refusal.rule, Outcome.REFUSED, refusal.reason)]

    await db.run(check)


async def test_unrouted_message_keeps_raw_blob_and_logs_it(db: Database, blobs: BlobStore) -> None:
    def check(session: Session) -> None:
        skip = LogEntry(rule="R2", reason="sender is not a contact", outcome=Outcome.SKIPPED)
        prep = prepared("skipped@x")
        assert apply_decision(session, decision(prep, log=[skip]), blobs) is None
        assert _count(session, Message.id) == 0
        row = session.scalar(sa.select(SyncLogEntry))
        assert row is not None and (row.rule, row.outcome) == (skip.rule, skip.outcome)
        assert row.raw_sha256 == prep.raw.sha256 and blobs.exists(prep.raw.sha256)

    await db.run(check)


async def test_r14_new_contact_created_once_and_sync_address_in_bcc(
    db: Database, blobs: BlobStore
) -> None:
    def check(session: Session) -> None:
        a, ann, _ = _world(session)
        dana = addr("Dana@Example.net", "Dana")
        sync = addr("u-abc@bcc.example.test")
        first = decision(
            prepared("b1@x", to=[dana]),
            conversations=[to_new_contact(a, dana, ann)],
            extra_bcc=[sync],
        )
        pk1 = apply_decision(session, first, blobs)
        second = decision(prepared("b2@x", to=[dana]), conversations=[to_new_contact(a, dana, ann)])
        pk2 = apply_decision(session, second, blobs)
        contacts = (
            session.execute(
                sa.select(Contact.id, Contact.email, Contact.name, Contact.assigned_user_id).where(
                    Contact.address_key == dana.address_key
                )
            )
        ).all()
        assert [(c.email, c.name, c.assigned_user_id) for c in contacts] == [
            (dana.addr_spec, "Dana", ann)
        ]
        conv_links = (
            (
                session.execute(
                    sa.select(ConversationMessage.message_pk)
                    .join(Conversation)
                    .where(Conversation.contact_id == contacts[0].id)
                )
            )
            .scalars()
            .all()
        )
        assert sorted(conv_links) == sorted([pk1, pk2])
        bcc = (
            (
                session.execute(
                    sa.select(MessageParticipant.addr_spec).where(
                        MessageParticipant.message_pk == pk1,
                        MessageParticipant.role == ParticipantRole.BCC,
                    )
                )
            )
            .scalars()
            .all()
        )
        assert bcc == [sync.addr_spec]

    await db.run(check)


async def test_r11_parent_after_children_merges_their_threads(
    db: Database, blobs: BlobStore
) -> None:
    def check(session: Session) -> None:
        a, _, bob = _world(session)
        b = add_subaccount(session, "B")
        bob_b = add_contact(session, b, "bob@example.com")
        # Two replies to a parent not yet seen, each in its own thread.
        pk1 = apply_decision(
            session,
            decision(prepared("c1@x", references=["p@x"]), conversations=[to_contact(a, bob)]),
            blobs,
        )
        pk2 = apply_decision(
            session,
            decision(
                prepared("c2@x", references=["p@x"]),
                conversations=[to_contact(a, bob), to_contact(b, bob_b)],
            ),
            blobs,
        )
        t1 = session.scalar(sa.select(Message.thread_id).where(Message.id == pk1))
        t2 = session.scalar(sa.select(Message.thread_id).where(Message.id == pk2))
        assert t1 is not None and t2 is not None and t1 != t2
        session.execute(
            sa.update(ThreadInstance)
            .where(ThreadInstance.thread_id == t1)
            .values(state=InstanceState.BROKEN)
        )
        # The parent arrives, joins t1 and folds t2 into it.
        parent = apply_decision(
            session,
            decision(
                prepared("p@x"), conversations=[to_contact(a, bob)], thread=join_thread(t1, [t2])
            ),
            blobs,
        )
        threads = set(session.scalars(sa.select(Message.thread_id)))
        assert threads == {t1}
        assert session.get(SyncedThread, t2) is None
        instances = (
            session.execute(
                sa.select(
                    ThreadInstance.subaccount_id, ThreadInstance.state, ThreadInstance.thread_id
                ).order_by(ThreadInstance.subaccount_id)
            )
        ).all()
        # A's instance keeps t1's (broken) state; B's moves over as it was.
        assert instances == [(a, InstanceState.BROKEN, t1), (b, InstanceState.ACTIVE, t1)]
        assert parent is not None

    await db.run(check)


async def test_r11_provider_message_id_is_an_alias_of_the_sent_message(
    db: Database, blobs: BlobStore
) -> None:
    def check(session: Session) -> None:
        a, _, bob = _world(session)
        pk = apply_decision(
            session, decision(prepared("crm@x"), conversations=[to_contact(a, bob)]), blobs
        )
        assert pk is not None
        add_provider_message_id(session, pk, MessageId("AM0PR@outlook.com"))
        add_provider_message_id(session, pk, MessageId("AM0PR@outlook.com"))
        ids = sorted(
            session.scalars(
                sa.select(KnownMessageId.message_id).where(KnownMessageId.message_pk == pk)
            )
        )
        assert ids == ["AM0PR@outlook.com", "crm@x"]

    await db.run(check)


async def test_r12_concurrent_store_of_same_identity_fails_one_transaction(
    db: Database, database_url: str, blobs: BlobStore
) -> None:
    a, _, bob = await db.run(_world)
    dec = decision(prepared("race@x"), conversations=[to_contact(a, bob)])
    if db.dialect_name == "sqlite":
        await _race_on_sqlite(db, database_url, dec, blobs)
    else:
        await _race_on_postgres(database_url, dec, blobs)
    assert await db.read(_count, Message.id) == 1


async def _race_on_sqlite(db: Database, database_url: str, dec: Decision, blobs: BlobStore) -> None:
    """First transaction on ``db``'s thread stays open; the second (another connection) waits."""
    stored, release = threading.Event(), threading.Event()

    def first(session: Session) -> None:
        assert apply_decision(session, dec, blobs) is not None
        stored.set()
        release.wait(timeout=10)

    other = Database(database_url)
    try:
        first_task = asyncio.ensure_future(db.run(first))
        assert await asyncio.to_thread(stored.wait, 10)
        second_task = asyncio.ensure_future(other.run(apply_decision, dec, blobs))
        await asyncio.sleep(0.05)  # let the second transaction block on the first
        release.set()
        await first_task
        with pytest.raises(IntegrityError):
            await second_task
    finally:
        await other.close()


async def _race_on_postgres(database_url: str, dec: Decision, blobs: BlobStore) -> None:
    """The same race with two AsyncSessions (what ``Database.run`` uses on PostgreSQL)."""
    engine = make_engine(database_url)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    try:
        first = sessions()
        await first.begin()
        assert await first.run_sync(apply_decision, dec, blobs) is not None

        async def second() -> None:
            async with sessions() as s, s.begin():
                await s.run_sync(apply_decision, dec, blobs)

        task = asyncio.create_task(second())
        await asyncio.sleep(0.05)  # let the second transaction block on the first
        await first.commit()
        await first.close()
        with pytest.raises(IntegrityError):
            await task
    finally:
        await engine.dispose()
