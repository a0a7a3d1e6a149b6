"""Directory repository: sub-accounts, users with their sync addresses, contacts.

Edge module: sync queries on a caller's ``Session``. Never commits
(the caller owns the transaction); flushes so new ids are known. Addresses
are compared by ``ingest.normalise.address_key`` (R10, R15).
"""

from __future__ import annotations

import secrets
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.orm import Session

from ingest.normalise import address_key, parse_addresses
from ingest.types import ContactId, SubaccountId, UserId
from storage.errors import Conflict, NotFound
from storage.models import Contact, Membership, Subaccount, User

SYNC_TOKEN_ALPHABET = string.ascii_lowercase + "234567"
"""RFC 4648 §6 base32 alphabet, lower-cased (sync addresses are case-insensitive)."""

SYNC_TOKEN_LENGTH = 20
"""20 base32 characters = 100 bits from ``secrets``: unguessable (R14)."""

SYNC_LOCAL_PREFIX = "u-"
"""Local part of a sync address is ``u-<token>``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ImportReport:
    """Outcome of ``import_contacts``.

    Attributes:
        created: contacts created.
        skipped: rows whose address already had a contact (R10: no duplicate).
        errors: (line, reason) per rejected row, in input order; line numbers
            count a CSV header as line 1, so the first row is line 2.
    """

    created: int
    skipped: int
    errors: tuple[tuple[int, str], ...]


def new_sync_token() -> str:
    """Return a fresh sync token: ``SYNC_TOKEN_LENGTH`` chars from ``SYNC_TOKEN_ALPHABET``."""
    return "".join(secrets.choice(SYNC_TOKEN_ALPHABET) for _ in range(SYNC_TOKEN_LENGTH))


def add_subaccount(session: Session, name: str) -> SubaccountId:
    """Create a sub-account.

    Raises:
        Conflict: a sub-account called ``name`` exists.
        ValueError: ``name`` is empty.
    """
    name = name.strip()
    if not name:
        raise ValueError("sub-account name must not be empty")
    if session.scalar(sa.select(Subaccount.id).where(Subaccount.name == name)) is not None:
        raise Conflict(f"sub-account {name!r} exists")
    row = Subaccount(name=name)
    session.add(row)
    session.flush()
    return SubaccountId(row.id)


def resolve_subaccount(session: Session, ref: str) -> SubaccountId:
    """Return the id of the sub-account ``ref`` names: a numeric id, else a name.

    Raises:
        NotFound: no sub-account has that id or name.
    """
    ref = ref.strip()
    if ref.isdigit():
        found = session.scalar(sa.select(Subaccount.id).where(Subaccount.id == int(ref)))
        if found is not None:
            return SubaccountId(found)
    found = session.scalar(sa.select(Subaccount.id).where(Subaccount.name == ref))
    if found is None:
        raise NotFound(f"no sub-account {ref!r}")
    return SubaccountId(found)


def add_user(session: Session, email: str, name: str, subaccount_ids: Iterable[int]) -> UserId:
    """Create a user (or reuse one with the same address) with memberships.

    Each new membership gets a fresh sync token (R14). An existing user
    keeps its name and tokens; only missing memberships are added.

    Args:
        email: login addr-spec; compared by address_key.
        name: display name for a new user.
        subaccount_ids: sub-accounts to be a member of (may be empty).

    Returns:
        The user's id.

    Raises:
        NotFound: one of ``subaccount_ids`` does not exist.
        ValueError: ``email`` is not one address.
    """
    email = _one_addr_spec(email)
    wanted = set(subaccount_ids)
    _require_subaccounts(session, wanted)
    key = address_key(email)
    user = session.scalar(sa.select(User).where(User.email_key == key))
    if user is None:
        user = User(email=email, email_key=key, name=name)
        session.add(user)
        session.flush()
    have = set(
        session.scalars(sa.select(Membership.subaccount_id).where(Membership.user_id == user.id))
    )
    for subaccount_id in sorted(wanted - have):
        session.add(
            Membership(user_id=user.id, subaccount_id=subaccount_id, sync_token=new_sync_token())
        )
    session.flush()
    return UserId(user.id)


def add_contact(
    session: Session,
    subaccount_id: int,
    email: str,
    name: str | None = None,
    assigned_user_email: str | None = None,
) -> ContactId:
    """Create a contact in a sub-account.

    Raises:
        NotFound: the sub-account does not exist, or the assigned user is
            not a member of it.
        Conflict: a contact with this address exists there (R10: never a
            duplicate contact).
        ValueError: ``email`` is not one address.
    """
    email = _one_addr_spec(email)
    _require_subaccounts(session, {subaccount_id})
    key = address_key(email)
    if _contact_exists(session, subaccount_id, key):
        raise Conflict(f"contact {email!r} exists in sub-account {subaccount_id}")
    assigned = None
    if assigned_user_email:
        assigned = _member_user_id(session, assigned_user_email, subaccount_id)
    contact = Contact(
        subaccount_id=subaccount_id,
        email=email,
        address_key=key,
        name=name or None,
        assigned_user_id=assigned,
    )
    session.add(contact)
    session.flush()
    return ContactId(contact.id)


def import_contacts(
    session: Session, subaccount_id: int, rows: Iterable[Mapping[str, str | None]]
) -> ImportReport:
    """Create contacts from rows with keys ``email``, ``name``, ``assigned_user_email``.

    Rows whose address already has a contact in the sub-account (or came
    earlier in ``rows``) are skipped. Bad rows are reported, not raised.

    Raises:
        NotFound: the sub-account does not exist.
    """
    _require_subaccounts(session, {subaccount_id})
    created = skipped = 0
    errors: list[tuple[int, str]] = []
    for line, row in enumerate(rows, start=2):
        try:
            add_contact(
                session,
                subaccount_id,
                (row.get("email") or "").strip(),
                name=(row.get("name") or "").strip() or None,
                assigned_user_email=(row.get("assigned_user_email") or "").strip() or None,
            )
        except Conflict:
            skipped += 1
        except (NotFound, ValueError) as exc:
            errors.append((line, str(exc)))
        else:
            created += 1
    return ImportReport(created=created, skipped=skipped, errors=tuple(errors))


def sync_address(session: Session, user_email: str, subaccount_id: int, domain: str) -> str:
    """Return the user's sync address in a sub-account: ``u-<token>@<domain>`` (R14).

    Raises:
        NotFound: no such user, or the user is not a member of the sub-account.
    """
    token = session.scalar(
        sa.select(Membership.sync_token)
        .join(User, User.id == Membership.user_id)
        .where(User.email_key == address_key(user_email.strip()))
        .where(Membership.subaccount_id == subaccount_id)
    )
    if token is None:
        raise NotFound(f"{user_email!r} is not a member of sub-account {subaccount_id}")
    return f"{SYNC_LOCAL_PREFIX}{token}@{domain.lower()}"


def _one_addr_spec(value: str) -> str:
    addresses, defects = parse_addresses(value.strip())
    if len(addresses) != 1 or defects:
        raise ValueError(f"not one email address: {value!r}")
    return addresses[0].addr_spec


def _require_subaccounts(session: Session, ids: set[int]) -> None:
    if not ids:
        return
    found = set(session.scalars(sa.select(Subaccount.id).where(Subaccount.id.in_(ids))))
    missing = sorted(ids - found)
    if missing:
        raise NotFound(f"no sub-account {missing[0]}")


def _contact_exists(session: Session, subaccount_id: int, key: str) -> bool:
    query = (
        sa.select(Contact.id)
        .where(Contact.address_key == key, Contact.subaccount_id == subaccount_id)
        .limit(1)
    )
    return session.scalar(query) is not None


def _member_user_id(session: Session, email: str, subaccount_id: int) -> int:
    user_id = session.scalar(
        sa.select(User.id)
        .join(Membership, Membership.user_id == User.id)
        .where(User.email_key == address_key(email), Membership.subaccount_id == subaccount_id)
    )
    if user_id is None:
        raise NotFound(f"user {email!r} is not a member of sub-account {subaccount_id}")
    return user_id
