"""Directory repository on SQLite and PostgreSQL: sub-accounts, users, contacts, sync addresses."""

from __future__ import annotations

import re

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from storage.db import Database
from storage.errors import Conflict, NotFound
from storage.models import Contact, Membership
from storage.repos.directory import (
    SYNC_LOCAL_PREFIX,
    SYNC_TOKEN_ALPHABET,
    SYNC_TOKEN_LENGTH,
    add_contact,
    add_subaccount,
    add_user,
    import_contacts,
    resolve_subaccount,
    sync_address,
)

BCC_DOMAIN = "bcc.example.test"
TOKEN_RE = re.compile(f"[{SYNC_TOKEN_ALPHABET}]{{{SYNC_TOKEN_LENGTH}}}")


async def test_add_subaccount_twice_is_conflict(db: Database) -> None:
    def check(session: Session) -> None:
        add_subaccount(session, "Acme")
        with pytest.raises(Conflict) as info:
            add_subaccount(session, "Acme")
        assert info.value.code == Conflict.default_code

    await db.run(check)


async def test_resolve_subaccount_by_id_and_name(db: Database) -> None:
    def check(session: Session) -> None:
        acme = add_subaccount(session, "Acme")
        other = add_subaccount(session, "Other")
        assert resolve_subaccount(session, str(acme)) == acme
        assert resolve_subaccount(session, "Other") == other
        with pytest.raises(NotFound):
            resolve_subaccount(session, "Nobody")
        with pytest.raises(NotFound):
            resolve_subaccount(session, "999999")

    await db.run(check)


async def test_r14_add_user_gives_one_unguessable_token_per_membership(
    db: Database,
) -> None:
    def check(session: Session) -> None:
        a = add_subaccount(session, "A")
        b = add_subaccount(session, "B")
        user = add_user(session, "Ann@Example.org", "Ann", [a, b])
        tokens = list(session.scalars(sa.select(Membership.sync_token)))
        assert len(tokens) == 2 and len(set(tokens)) == 2
        assert all(TOKEN_RE.fullmatch(t) for t in tokens)
        address = sync_address(session, "ann@example.org", a, BCC_DOMAIN)
        local, _, domain = address.partition("@")
        assert domain == BCC_DOMAIN
        assert local.startswith(SYNC_LOCAL_PREFIX) and local[len(SYNC_LOCAL_PREFIX) :] in tokens
        # Adding the same user again adds missing memberships and keeps tokens.
        c = add_subaccount(session, "C")
        assert add_user(session, "ann@EXAMPLE.org", "Other name", [a, c]) == user
        assert sync_address(session, "ann@example.org", a, BCC_DOMAIN) == address
        assert len(list(session.scalars(sa.select(Membership.id)))) == 3

    await db.run(check)


async def test_sync_address_without_membership_is_not_found(db: Database) -> None:
    def check(session: Session) -> None:
        a = add_subaccount(session, "A")
        b = add_subaccount(session, "B")
        add_user(session, "ann@example.org", "Ann", [a])
        with pytest.raises(NotFound):
            sync_address(session, "ann@example.org", b, BCC_DOMAIN)
        with pytest.raises(NotFound):
            sync_address(session, "nobody@example.org", a, BCC_DOMAIN)

    await db.run(check)


async def test_add_user_unknown_subaccount_is_not_found(db: Database) -> None:
    def check(session: Session) -> None:
        with pytest.raises(NotFound):
            add_user(session, "ann@example.org", "Ann", [424242])

    await db.run(check)


async def test_r10_add_contact_never_duplicates_an_address(db: Database) -> None:
    def check(session: Session) -> None:
        a = add_subaccount(session, "A")
        b = add_subaccount(session, "B")
        add_contact(session, a, "Bob@Example.com", name="Bob")
        with pytest.raises(Conflict):
            add_contact(session, a, "bob@example.COM")
        add_contact(session, b, "bob@example.com")  # another sub-account: allowed
        rows = (session.execute(sa.select(Contact.subaccount_id, Contact.address_key))).all()
        assert sorted(rows) == [(a, "bob@example.com"), (b, "bob@example.com")]

    await db.run(check)


async def test_add_contact_assigned_user_must_be_member(db: Database) -> None:
    def check(session: Session) -> None:
        a = add_subaccount(session, "A")
        b = add_subaccount(session, "B")
        ann = add_user(session, "ann@example.org", "Ann", [a])
        contact = add_contact(session, a, "bob@example.com", assigned_user_email="ANN@example.org")
        assert (
            session.scalar(sa.select(Contact.assigned_user_id).where(Contact.id == contact)) == ann
        )
        with pytest.raises(NotFound):
            add_contact(session, b, "bob@example.com", assigned_user_email="ann@example.org")

    await db.run(check)


async def test_import_contacts_reports_created_skipped_and_errors(db: Database) -> None:
    def check(session: Session) -> None:
        a = add_subaccount(session, "A")
        add_user(session, "ann@example.org", "Ann", [a])
        add_contact(session, a, "old@example.com")
        rows = [
            {"email": "new@example.com", "name": "New", "assigned_user_email": "ann@example.org"},
            {"email": "OLD@example.com", "name": "", "assigned_user_email": ""},
            {"email": "not an address", "name": "X", "assigned_user_email": None},
            {"email": "new@example.com", "name": "again", "assigned_user_email": None},
            {"email": "x@example.com", "name": "", "assigned_user_email": "stranger@example.org"},
        ]
        report = import_contacts(session, a, rows)
        assert (report.created, report.skipped) == (1, 2)
        assert [line for line, _ in report.errors] == [4, 6]
        keys = sorted(session.scalars(sa.select(Contact.address_key)))
        assert keys == ["new@example.com", "old@example.com"]

    await db.run(check)
