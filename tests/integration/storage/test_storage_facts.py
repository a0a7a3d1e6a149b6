"""load_facts on SQLite and PostgreSQL: each Facts field, from a few IN queries."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import Session

from ingest.normalise import address_key
from ingest.types import (
    AuthResult,
    InstanceState,
    MailboxState,
    MessageId,
    Provider,
    RouteSettings,
    ThreadFact,
    WaitingChild,
)
from storage.blobs import BlobStore
from storage.db import Database
from storage.models import Mailbox, Message, ThreadInstance
from storage.repos.directory import add_contact, add_subaccount, add_user, sync_address
from storage.repos.facts import load_facts, sync_token_of
from storage.repos.messages import apply_decision

from .storage_builders import T0, addr, decision, join_thread, prepared, stored_log, to_contact

DOMAIN = "bcc.example.test"
SETTINGS = RouteSettings(create_contacts=False, require_dmarc=True)
NO_ALIASES: dict[str, tuple[str, ...]] = {}


def _mailbox(
    session: Session,
    user_id: int,
    subaccount_id: int,
    address: str,
    state: MailboxState = MailboxState.CONNECTED,
) -> int:
    row = Mailbox(
        user_id=user_id,
        subaccount_id=subaccount_id,
        provider=Provider.GMAIL,
        address=address,
        address_key=address_key(address),
        state=state,
    )
    session.add(row)
    session.flush()
    return row.id


async def test_r15_sync_targets_resolve_token_case_insensitively_with_sender_keys(
    db: Database,
) -> None:
    def check(session: Session) -> None:
        a = add_subaccount(session, "A")
        ann = add_user(session, "ann@example.org", "Ann", [a])
        _mailbox(session, ann, a, "Ann.Work@Gmail.com")
        _mailbox(session, ann, a, "old@gmail.com", MailboxState.DISCONNECTED)
        address = sync_address(session, "ann@example.org", a, DOMAIN)
        shouted = address.upper()
        prep = prepared("m1@x", sync_addresses=[shouted.lower(), "u-unknowntoken@" + DOMAIN])
        facts = load_facts(
            session,
            prep.lookups,
            aliases={"ANN@example.org": ("ann@alias.example",)},
            settings=SETTINGS,
            auth=None,
        )
        assert len(facts.sync_targets) == 1
        target = facts.sync_targets[0]
        assert (target.user_id, target.subaccount_id, target.user_email) == (
            ann,
            a,
            "ann@example.org",
        )
        assert target.sync_address == address
        assert target.sender_keys == {"ann@example.org", "ann.work@gmail.com", "ann@alias.example"}
        assert facts.settings == SETTINGS

    await db.run(check)


async def test_sync_target_domain_checked_when_bcc_domain_given(db: Database) -> None:
    def check(session: Session) -> None:
        a = add_subaccount(session, "A")
        add_user(session, "ann@example.org", "Ann", [a])
        address = sync_address(session, "ann@example.org", a, "other.example")
        prep = prepared("m1@x", sync_addresses=[address])
        kwargs = {"aliases": NO_ALIASES, "settings": SETTINGS, "auth": None}
        assert (load_facts(session, prep.lookups, bcc_domain=DOMAIN, **kwargs)).sync_targets == ()
        assert len((load_facts(session, prep.lookups, **kwargs)).sync_targets) == 1
        assert sync_token_of("U-AbC@" + DOMAIN, DOMAIN) == "abc"
        assert sync_token_of("bob@" + DOMAIN) is None
        assert sync_token_of("u-@" + DOMAIN) is None

    await db.run(check)


async def test_r10_contacts_loaded_for_every_matching_key_including_duplicates(
    db: Database,
) -> None:
    def check(session: Session) -> None:
        a = add_subaccount(session, "A")
        b = add_subaccount(session, "B")
        ann = add_user(session, "ann@example.org", "Ann", [a])
        c1 = add_contact(session, a, "bob@example.com", assigned_user_email="ann@example.org")
        c2 = add_contact(session, b, "Bob@Example.com")
        add_contact(session, a, "carol@example.com")
        prep = prepared("m1@x", from_=addr("BOB@example.com"))
        facts = load_facts(session, prep.lookups, aliases=NO_ALIASES, settings=SETTINGS, auth=None)
        assert [(c.contact_id, c.subaccount_id, c.assigned_user_id) for c in facts.contacts] == [
            (c1, a, ann),
            (c2, b, None),
        ]
        assert all(c.updated_at.tzinfo is not None for c in facts.contacts)

    await db.run(check)


async def test_r7_users_found_by_login_and_by_mailbox_address(db: Database) -> None:
    def check(session: Session) -> None:
        a = add_subaccount(session, "A")
        b = add_subaccount(session, "B")
        ann = add_user(session, "ann@example.org", "Ann", [a, b])
        bob = add_user(session, "bob@example.org", "Bob", [b])
        _mailbox(session, bob, b, "bob.private@gmail.com")
        prep = prepared("m1@x", from_=addr("ann@example.org"), to=[addr("Bob.Private@gmail.com")])
        auth = AuthResult(dkim_aligned=True, spf_aligned=False, detail="dkim pass")
        facts = load_facts(session, prep.lookups, aliases=NO_ALIASES, settings=SETTINGS, auth=auth)
        found = {(u.user_id, u.address_key, u.subaccount_ids) for u in facts.users}
        assert found == {
            (ann, "ann@example.org", frozenset({a, b})),
            (bob, "bob.private@gmail.com", frozenset({b})),
        }
        assert facts.auth == auth

    await db.run(check)


async def test_r11_threads_and_waiting_children_and_r12_duplicate(
    db: Database, blobs: BlobStore
) -> None:
    def check(session: Session) -> None:
        a = add_subaccount(session, "A")
        b = add_subaccount(session, "B")
        ca = add_contact(session, a, "bob@example.com")
        cb = add_contact(session, b, "bob@example.com")
        # A reply stored before its parent, linked in two sub-accounts; one instance broken.
        reply = prepared("reply@x", references=["root@x", "parent@x"])
        reply_pk = apply_decision(
            session,
            decision(
                reply, conversations=[to_contact(a, ca), to_contact(b, cb)], log=stored_log(a)
            ),
            blobs,
        )
        assert reply_pk is not None
        session.execute(
            sa.update(ThreadInstance)
            .where(ThreadInstance.subaccount_id == b)
            .values(state=InstanceState.BROKEN)
        )
        thread_id = _thread_of(session, reply_pk)
        # The parent arrives: it cites root@x, and reply@x waits for it.
        parent = prepared("parent@x", references=["root@x"])
        facts = load_facts(
            session, parent.lookups, aliases=NO_ALIASES, settings=SETTINGS, auth=None
        )
        assert facts.waiting_children == (
            WaitingChild(message_pk=reply_pk, thread_id=thread_id, subaccount_id=a),
            WaitingChild(message_pk=reply_pk, thread_id=thread_id, subaccount_id=b),
        )
        assert facts.threads == ()
        assert facts.duplicate_of is None
        # A later reply citing reply@x finds its thread with both instances.
        later = prepared("later@x", references=["root@x", "parent@x", "reply@x"])
        facts = load_facts(session, later.lookups, aliases=NO_ALIASES, settings=SETTINGS, auth=None)
        assert facts.threads == (
            ThreadFact(
                message_id=MessageId("reply@x"),
                thread_id=thread_id,
                subaccount_id=a,
                state=InstanceState.ACTIVE,
            ),
            ThreadFact(
                message_id=MessageId("reply@x"),
                thread_id=thread_id,
                subaccount_id=b,
                state=InstanceState.BROKEN,
            ),
        )
        # The same reply seen again is a duplicate of the stored row.
        again = prepared("reply@x", references=["root@x", "parent@x"], date_at=T0)
        facts = load_facts(session, again.lookups, aliases=NO_ALIASES, settings=SETTINGS, auth=None)
        assert facts.duplicate_of == reply_pk

    await db.run(check)


async def test_join_thread_uses_thread_from_facts(db: Database, blobs: BlobStore) -> None:
    def check(session: Session) -> None:
        a = add_subaccount(session, "A")
        ca = add_contact(session, a, "bob@example.com")
        first = apply_decision(
            session, decision(prepared("one@x"), conversations=[to_contact(a, ca)]), blobs
        )
        assert first is not None
        thread_id = _thread_of(session, first)
        second = apply_decision(
            session,
            decision(
                prepared("two@x", references=["one@x"]),
                conversations=[to_contact(a, ca)],
                thread=join_thread(thread_id),
            ),
            blobs,
        )
        assert second is not None and _thread_of(session, second) == thread_id

    await db.run(check)


def _thread_of(session: Session, pk: int) -> int:
    thread_id = session.scalar(sa.select(Message.thread_id).where(Message.id == pk))
    assert thread_id is not None
    return thread_id
