"""Tables of the CRM directory: sub-accounts, users, memberships, contacts, conversations.

Edge module: table definitions only, no queries (those live in repos/).
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from storage.models.base import Base, utcnow


class Subaccount(Base):
    """A CRM tenant ("location"). Invariant: ``name`` is unique."""

    __tablename__ = "subaccounts"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class User(Base):
    """A CRM user. Invariant: one row per ``email_key`` (address_key of email)."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(sa.String(320))
    email_key: Mapped[str] = mapped_column(sa.String(320), unique=True)
    name: Mapped[str] = mapped_column(sa.String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Membership(Base):
    """A user's membership of a sub-account, carrying the sync address token (R14).

    Invariants: one row per (user, sub-account); ``sync_token`` is 20
    lowercase base32 characters (100 bits from ``secrets``), unique, and is
    the local part ``u-<token>`` of the user's sync address there.
    """

    __tablename__ = "memberships"
    __table_args__ = (sa.UniqueConstraint("user_id", "subaccount_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id", ondelete="CASCADE"))
    subaccount_id: Mapped[int] = mapped_column(
        sa.ForeignKey("subaccounts.id", ondelete="CASCADE"), index=True
    )
    sync_token: Mapped[str] = mapped_column(sa.String(32), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Contact(Base):
    """A person in one sub-account (BEHAVIOUR.md "contact").

    ``address_key`` is NOT unique: imports may bring duplicates, and R10
    picks among them (assigned to the mailbox's user, then most recently
    updated). mailgate itself never creates a second contact for a key.
    """

    __tablename__ = "contacts"
    __table_args__ = (
        sa.Index("ix_contacts_address_key_subaccount_id", "address_key", "subaccount_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    subaccount_id: Mapped[int] = mapped_column(sa.ForeignKey("subaccounts.id", ondelete="CASCADE"))
    email: Mapped[str] = mapped_column(sa.String(320))
    address_key: Mapped[str] = mapped_column(sa.String(320))
    name: Mapped[str | None] = mapped_column(sa.String(200))
    assigned_user_id: Mapped[int | None] = mapped_column(
        sa.ForeignKey("users.id", ondelete="SET NULL"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Conversation(Base):
    """The per-contact timeline in a sub-account. Invariant: one per contact."""

    __tablename__ = "conversations"

    id: Mapped[int] = mapped_column(primary_key=True)
    subaccount_id: Mapped[int] = mapped_column(
        sa.ForeignKey("subaccounts.id", ondelete="CASCADE"), index=True
    )
    contact_id: Mapped[int] = mapped_column(
        sa.ForeignKey("contacts.id", ondelete="CASCADE"), unique=True
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
