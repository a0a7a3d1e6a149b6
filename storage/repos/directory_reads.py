"""Read and simple-update queries on sub-accounts, users and contacts (the HTTP API's).

Edge module: sync functions on a caller's ``Session`` (run through
``Database.run`` / ``read``), returning frozen views; never commits. The
creating functions live in ``storage.repos.directory`` and are reused; this
module keeps that one under the size guideline.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Session

from storage.errors import NotFound
from storage.models import Contact, Membership, Subaccount, User
from storage.repos.directory import SYNC_LOCAL_PREFIX, resolve_subaccount


@dataclass(frozen=True, slots=True, kw_only=True)
class SubaccountView:
    """A sub-account (tenant)."""

    id: int
    name: str
    created_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class MembershipView:
    """A user's membership: the sub-account and the user's sync (BCC) address there (R14)."""

    subaccount_id: int
    subaccount_name: str
    sync_address: str


@dataclass(frozen=True, slots=True, kw_only=True)
class UserView:
    """A user with memberships ordered by sub-account id."""

    id: int
    email: str
    name: str
    memberships: tuple[MembershipView, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class ContactView:
    """A contact; ``assigned_user_email`` None when unassigned."""

    id: int
    subaccount_id: int
    email: str
    name: str | None
    assigned_user_id: int | None
    assigned_user_email: str | None


def get_subaccount(session: Session, ref: str | int) -> SubaccountView:
    """Return the sub-account named by a numeric id or a name.

    Raises:
        NotFound: none has that id or name.
    """
    row = session.get(Subaccount, int(resolve_subaccount(session, str(ref))))
    assert row is not None  # noqa: S101 (resolve_subaccount found it in this transaction)
    return SubaccountView(id=row.id, name=row.name, created_at=row.created_at)


def list_subaccounts(session: Session) -> tuple[SubaccountView, ...]:
    """Return every sub-account, by id."""
    rows = session.scalars(sa.select(Subaccount).order_by(Subaccount.id))
    return tuple(SubaccountView(id=r.id, name=r.name, created_at=r.created_at) for r in rows)


def _memberships(session: Session, user_id: int, domain: str) -> tuple[MembershipView, ...]:
    rows = session.execute(
        sa.select(Membership.subaccount_id, Subaccount.name, Membership.sync_token)
        .join(Subaccount, Subaccount.id == Membership.subaccount_id)
        .where(Membership.user_id == user_id)
        .order_by(Membership.subaccount_id)
    )
    return tuple(
        MembershipView(
            subaccount_id=sub_id,
            subaccount_name=name,
            sync_address=f"{SYNC_LOCAL_PREFIX}{token}@{domain.lower()}",
        )
        for sub_id, name, token in rows
    )


def get_user(session: Session, user_id: int, domain: str) -> UserView:
    """Return a user with every membership; ``domain`` is ``bcc.domain``.

    Raises:
        NotFound: no user has that id.
    """
    row = session.get(User, user_id)
    if row is None:
        raise NotFound(f"no user {user_id}")
    return UserView(
        id=row.id, email=row.email, name=row.name, memberships=_memberships(session, row.id, domain)
    )


def list_users(session: Session, subaccount_id: int, domain: str) -> tuple[UserView, ...]:
    """Return the members of a sub-account, by id (each with all memberships)."""
    ids = session.scalars(
        sa.select(Membership.user_id)
        .where(Membership.subaccount_id == subaccount_id)
        .order_by(Membership.user_id)
    )
    return tuple(get_user(session, user_id, domain) for user_id in ids)


def rename_user(session: Session, user_id: int, name: str) -> None:
    """Set a user's display name.

    Raises:
        NotFound: no user has that id.
    """
    row = session.get(User, user_id)
    if row is None:
        raise NotFound(f"no user {user_id}")
    row.name = name
    session.flush()


def _contact_view(row: Contact, assigned_email: str | None) -> ContactView:
    return ContactView(
        id=row.id,
        subaccount_id=row.subaccount_id,
        email=row.email,
        name=row.name,
        assigned_user_id=row.assigned_user_id,
        assigned_user_email=assigned_email,
    )


def _contacts_query() -> sa.Select[Contact, str]:  # User.email is None when unassigned
    return sa.select(Contact, User.email).outerjoin(User, User.id == Contact.assigned_user_id)


def get_contact(session: Session, contact_id: int) -> ContactView:
    """Return one contact.

    Raises:
        NotFound: no contact has that id.
    """
    found = session.execute(_contacts_query().where(Contact.id == contact_id)).first()
    if found is None:
        raise NotFound(f"no contact {contact_id}")
    return _contact_view(found[0], found[1])


def list_contacts(
    session: Session, subaccount_id: int, *, limit: int, after_id: int = 0
) -> tuple[ContactView, ...]:
    """Return up to ``limit`` contacts of a sub-account with id > ``after_id``, by id."""
    query = (
        _contacts_query()
        .where(Contact.subaccount_id == subaccount_id, Contact.id > after_id)
        .order_by(Contact.id)
        .limit(limit)
    )
    return tuple(_contact_view(row, email) for row, email in session.execute(query))


def rename_contact(session: Session, contact_id: int, name: str | None) -> None:
    """Set (or clear, with None) a contact's display name.

    Raises:
        NotFound: no contact has that id.
    """
    row = session.get(Contact, contact_id)
    if row is None:
        raise NotFound(f"no contact {contact_id}")
    row.name = name or None
    session.flush()
