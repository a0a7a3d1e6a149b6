"""apply_decision on SQLite and PostgreSQL: store once, link, thread, merge, refuse, log."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ingest.types import (
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


async def _count(session: AsyncSession, column: sa.ColumnElement[int]) -> int:
    return int(await session.scalar(sa.select(sa.func.count(column))) or 0)


async def _world(session: AsyncSession) -> tuple[int, int, int]:
    """Sub-account A with user ann and contact bob assigned to her."""
    a = await add_subaccount(session, "A")
    ann = await add_user(session, "ann@example.org", "Ann", [a])
    bob = await add_contact(session, a, "bob@example.com", assigned_user_email="ann@example.org")
    return a, ann, bob


async def test_r1_new_thread_stores_message_rows_blobs_and_log(
    session: AsyncSession, blobs: BlobStore
) -> None:
    a, _, bob = await _world(session)
    payload = b"%PDF-1.4 fake"
    prep = prepared(
        "new@x",
        references=["older@x"],
        from_=addr("ann@example.org", "Ann"),
        to=[addr("bob@example.com", "Bob")],
        attachments=[attachment(payload, "q.pdf", "application/pdf")],
    )
    pk = await apply_decision(
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
    message = await session.get_one(Message, pk)
    thread = await session.get_one(SyncedThread, message.thread_id)
    assert thread.origin is ThreadOrigin.CRM
    assert blobs.get(message.raw_sha256) == prep.raw.raw
    assert message.raw_sha256 == prep.raw.sha256
    assert message.date_at == prep.parsed.date_at
    instance = await session.scalar(sa.select(ThreadInstance))
    assert instance is not None
    assert (instance.thread_id, instance.subaccount_id, instance.state) == (
        thread.id,
        a,
        InstanceState.ACTIVE,
    )
    link = await session.scalar(sa.select(ConversationMessage))
    assert link is not None and link.message_pk == pk and link.rule == "R1"
    ids = (await session.execute(sa.select(KnownMessageId.message_id, KnownMessageId.kind))).all()
    assert [i for i, _ in ids] == ["new@x"]
    refs = list(await session.scalars(sa.select(MessageReference.referenced_message_id)))
    assert refs == ["older@x"]
    att = await session.scalar(sa.select(MessageAttachment))
    assert att is not None and blobs.get(att.sha256) == payload
    assert att.sha256 == hashlib.sha256(payload).hexdigest()
    log = list(await session.scalars(sa.select(SyncLogEntry)))
    assert [(r.outcome, r.message_pk, r.message_id, r.subaccount_id) for r in log] == [
        (Outcome.STORED, pk, "new@x", a)
    ]


async def test_r9_message_for_two_contacts_is_stored_once_and_linked_twice(
    session: AsyncSession, blobs: BlobStore
) -> None:
    a, _, bob = await _world(session)
    carol = await add_contact(
        session, a, "carol@example.com", assigned_user_email="ann@example.org"
    )
    prep = prepared("r9@x", to=[addr("bob@example.com")], cc=[addr("carol@example.com")])
    pk = await apply_decision(
        session,
        decision(prep, conversations=[to_contact(a, bob, "R9"), to_contact(a, carol, "R9")]),
        blobs,
    )
    assert await _count(session, Message.id) == 1
    links = (await session.execute(sa.select(ConversationMessage.message_pk))).scalars().all()
    assert links == [pk, pk]
    assert await _count(session, Conversation.id) == 2
    assert await _count(session, ThreadInstance.id) == 1


async def test_r12_duplicate_writes_log_and_location_but_no_second_row(
    session: AsyncSession, blobs: BlobStore
) -> None:
    a, ann, bob = await _world(session)
    mailbox = Mailbox(
        user_id=ann,
        subaccount_id=a,
        provider=Provider.GMAIL,
        address="ann@example.org",
        address_key="ann@example.org",
        state=MailboxState.CONNECTED,
    )
    session.add(mailbox)
    await session.flush()
    first = await apply_decision(
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
    assert await apply_decision(session, again, blobs) == first
    assert await apply_decision(session, again, blobs) == first  # redelivery after a crash
    assert await _count(session, Message.id) == 1
    locations = (
        await session.execute(sa.select(MessageLocation.message_pk, MessageLocation.uid))
    ).all()
    assert locations == [(first, 42)]
    log = (
        await session.execute(
            sa.select(
                SyncLogEntry.outcome,
                SyncLogEntry.rule,
                SyncLogEntry.message_pk,
                SyncLogEntry.mailbox_id,
            ).where(SyncLogEntry.outcome == Outcome.DUPLICATE)
        )
    ).all()
    assert log == [(Outcome.DUPLICATE, DUPLICATE_RULE, first, mailbox.id)] * 2


async def test_r15_refusal_writes_only_the_log(session: AsyncSession, blobs: BlobStore) -> None:
    refusal = Refusal(rule="R15", reason="From is not the sync address's user")
    prep = prepared("refused@x")
    assert await apply_decision(session, decision(prep, refusal=refusal), blobs) is None
    assert await _count(session, Message.id) == 0
    assert not blobs.exists(prep.raw.sha256)
    rows = (
        await session.execute(
            sa.select(SyncLogEntry.rule, SyncLogEntry.outcome, SyncLogEntry.reason)
        )
    ).all()
    assert rows == [(refusal.rule, Outcome.REFUSED, refusal.reason)]


async def test_unrouted_message_keeps_raw_blob_and_logs_it(
    session: AsyncSession, blobs: BlobStore
) -> None:
    skip = LogEntry(rule="R2", reason="sender is not a contact", outcome=Outcome.SKIPPED)
    prep = prepared("skipped@x")
    assert await apply_decision(session, decision(prep, log=[skip]), blobs) is None
    assert await _count(session, Message.id) == 0
    row = await session.scalar(sa.select(SyncLogEntry))
    assert row is not None and (row.rule, row.outcome) == (skip.rule, skip.outcome)
    assert row.raw_sha256 == prep.raw.sha256 and blobs.exists(prep.raw.sha256)


async def test_r14_new_contact_created_once_and_sync_address_in_bcc(
    session: AsyncSession, blobs: BlobStore
) -> None:
    a, ann, _ = await _world(session)
    dana = addr("Dana@Example.net", "Dana")
    sync = addr("u-abc@bcc.example.test")
    first = decision(
        prepared("b1@x", to=[dana]), conversations=[to_new_contact(a, dana, ann)], extra_bcc=[sync]
    )
    pk1 = await apply_decision(session, first, blobs)
    second = decision(prepared("b2@x", to=[dana]), conversations=[to_new_contact(a, dana, ann)])
    pk2 = await apply_decision(session, second, blobs)
    contacts = (
        await session.execute(
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
            await session.execute(
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
            await session.execute(
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


async def test_r11_parent_after_children_merges_their_threads(
    session: AsyncSession, blobs: BlobStore
) -> None:
    a, _, bob = await _world(session)
    b = await add_subaccount(session, "B")
    bob_b = await add_contact(session, b, "bob@example.com")
    # Two replies to a parent not yet seen, each in its own thread.
    pk1 = await apply_decision(
        session,
        decision(prepared("c1@x", references=["p@x"]), conversations=[to_contact(a, bob)]),
        blobs,
    )
    pk2 = await apply_decision(
        session,
        decision(
            prepared("c2@x", references=["p@x"]),
            conversations=[to_contact(a, bob), to_contact(b, bob_b)],
        ),
        blobs,
    )
    t1 = await session.scalar(sa.select(Message.thread_id).where(Message.id == pk1))
    t2 = await session.scalar(sa.select(Message.thread_id).where(Message.id == pk2))
    assert t1 is not None and t2 is not None and t1 != t2
    await session.execute(
        sa.update(ThreadInstance)
        .where(ThreadInstance.thread_id == t1)
        .values(state=InstanceState.BROKEN)
    )
    # The parent arrives, joins t1 and folds t2 into it.
    parent = await apply_decision(
        session,
        decision(prepared("p@x"), conversations=[to_contact(a, bob)], thread=join_thread(t1, [t2])),
        blobs,
    )
    threads = set(await session.scalars(sa.select(Message.thread_id)))
    assert threads == {t1}
    assert await session.get(SyncedThread, t2) is None
    instances = (
        await session.execute(
            sa.select(
                ThreadInstance.subaccount_id, ThreadInstance.state, ThreadInstance.thread_id
            ).order_by(ThreadInstance.subaccount_id)
        )
    ).all()
    # A's instance keeps t1's (broken) state; B's moves over as it was.
    assert instances == [(a, InstanceState.BROKEN, t1), (b, InstanceState.ACTIVE, t1)]
    assert parent is not None


async def test_r11_provider_message_id_is_an_alias_of_the_sent_message(
    session: AsyncSession, blobs: BlobStore
) -> None:
    a, _, bob = await _world(session)
    pk = await apply_decision(
        session, decision(prepared("crm@x"), conversations=[to_contact(a, bob)]), blobs
    )
    assert pk is not None
    await add_provider_message_id(session, pk, MessageId("AM0PR@outlook.com"))
    await add_provider_message_id(session, pk, MessageId("AM0PR@outlook.com"))
    ids = sorted(
        await session.scalars(
            sa.select(KnownMessageId.message_id).where(KnownMessageId.message_pk == pk)
        )
    )
    assert ids == ["AM0PR@outlook.com", "crm@x"]


async def test_r12_concurrent_store_of_same_identity_fails_one_transaction(
    session_factory: async_sessionmaker[AsyncSession], blobs: BlobStore
) -> None:
    async with session_factory() as s, s.begin():
        a, _, bob = await _world(s)
    dec = decision(prepared("race@x"), conversations=[to_contact(a, bob)])

    first = session_factory()
    await first.begin()
    assert await apply_decision(first, dec, blobs) is not None

    async def second() -> None:
        async with session_factory() as s, s.begin():
            await apply_decision(s, dec, blobs)

    task = asyncio.create_task(second())
    await asyncio.sleep(0.05)  # let the second transaction block on the first
    await first.commit()
    await first.close()
    with pytest.raises(IntegrityError):
        await task
    async with session_factory() as s:
        assert await _count(s, Message.id) == 1
