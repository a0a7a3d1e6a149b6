"""Facts loader: everything ``ingest.decide`` needs from the database, in one read.

Edge module: read-only async queries on a caller's ``AsyncSession``; one
query per kind of fact, each with ``IN`` over the looked-up keys (no query
per address). Builds ``ingest.types.Facts``; never writes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from ingest.normalise import address_key
from ingest.types import (
    AddressKey,
    AuthResult,
    ContactFact,
    ContactId,
    Facts,
    Lookups,
    MailboxState,
    MessageId,
    MessagePk,
    RouteSettings,
    SubaccountId,
    SyncTarget,
    ThreadFact,
    ThreadId,
    UserFact,
    UserId,
    WaitingChild,
)
from storage.models import (
    Contact,
    KnownMessageId,
    Mailbox,
    Membership,
    Message,
    MessageReference,
    ThreadInstance,
    User,
)
from storage.repos.directory import SYNC_LOCAL_PREFIX

SENDER_MAILBOX_STATES = (MailboxState.CONNECTED, MailboxState.REAUTH_REQUIRED)
"""Mailboxes whose address counts as the user's own for R15 (not disconnected ones)."""


async def load_facts(
    session: AsyncSession,
    lookups: Lookups,
    *,
    aliases: Mapping[str, tuple[str, ...]],
    settings: RouteSettings,
    auth: AuthResult | None,
    bcc_domain: str | None = None,
) -> Facts:
    """Load the ``Facts`` for one prepared message.

    Args:
        session: open session; only SELECTs are issued.
        lookups: from ``ingest.prepare``.
        aliases: user login email -> extra allowed From addresses (R15,
            ``bcc.aliases``); keys compared by address_key.
        settings: routing switches, copied into the result.
        auth: edge-computed DKIM/SPF result, copied into the result.
        bcc_domain: when given, a sync address must also be in this domain
            (case-insensitive); when None only the local part is matched.

    Returns:
        Facts with: ``sync_targets`` sorted by sync address; ``contacts``,
        ``users``, ``threads`` and ``waiting_children`` sorted by row keys;
        ``duplicate_of`` the stored message with the same identity key.
    """
    return Facts(
        sync_targets=await _sync_targets(session, lookups.sync_addresses, aliases, bcc_domain),
        contacts=await _contacts(session, lookups.address_keys),
        users=await _users(session, lookups.address_keys),
        threads=await _threads(session, lookups.message_ids),
        waiting_children=await _waiting_children(session, lookups.own_message_id),
        duplicate_of=await _duplicate_of(session, lookups.identity_key),
        auth=auth,
        settings=settings,
    )


def sync_token_of(sync_address: str, bcc_domain: str | None = None) -> str | None:
    """Return the lower-cased token of ``u-<token>@domain``, or None if it is not one."""
    local, at, domain = sync_address.strip().rpartition("@")
    if not at or not local:
        return None
    if bcc_domain is not None and domain.lower() != bcc_domain.lower():
        return None
    local = local.lower()
    if not local.startswith(SYNC_LOCAL_PREFIX) or len(local) == len(SYNC_LOCAL_PREFIX):
        return None
    return local[len(SYNC_LOCAL_PREFIX) :]


async def _sync_targets(
    session: AsyncSession,
    sync_addresses: Iterable[str],
    aliases: Mapping[str, tuple[str, ...]],
    bcc_domain: str | None,
) -> tuple[SyncTarget, ...]:
    by_token: dict[str, list[str]] = defaultdict(list)
    for sync_address in sorted(sync_addresses):
        token = sync_token_of(sync_address, bcc_domain)
        if token is not None:
            by_token[token].append(sync_address.strip().lower())
    if not by_token:
        return ()
    rows = (
        await session.execute(
            sa.select(Membership.sync_token, Membership.subaccount_id, User.id, User.email)
            .join(User, User.id == Membership.user_id)
            .where(Membership.sync_token.in_(by_token))
        )
    ).all()
    mailbox_keys = await _mailbox_keys(session, {row.id for row in rows})
    alias_keys = _alias_keys(aliases)
    targets: list[SyncTarget] = []
    for token, subaccount_id, user_id, email in rows:
        key = address_key(email)
        sender_keys = {key, *mailbox_keys.get(user_id, ()), *alias_keys.get(key, ())}
        targets.extend(
            SyncTarget(
                sync_address=sync_address,
                user_id=UserId(user_id),
                subaccount_id=SubaccountId(subaccount_id),
                user_email=email,
                sender_keys=frozenset(sender_keys),
            )
            for sync_address in by_token[token]
        )
    return tuple(sorted(targets, key=lambda target: target.sync_address))


async def _mailbox_keys(session: AsyncSession, user_ids: set[int]) -> dict[int, set[AddressKey]]:
    out: dict[int, set[AddressKey]] = defaultdict(set)
    if not user_ids:
        return out
    rows = await session.execute(
        sa.select(Mailbox.user_id, Mailbox.address_key).where(
            Mailbox.user_id.in_(user_ids), Mailbox.state.in_(SENDER_MAILBOX_STATES)
        )
    )
    for user_id, key in rows:
        out[user_id].add(AddressKey(key))
    return out


def _alias_keys(aliases: Mapping[str, tuple[str, ...]]) -> dict[AddressKey, set[AddressKey]]:
    out: dict[AddressKey, set[AddressKey]] = defaultdict(set)
    for login, extra in aliases.items():
        out[address_key(login.strip())].update(address_key(a.strip()) for a in extra)
    return out


async def _contacts(session: AsyncSession, keys: frozenset[AddressKey]) -> tuple[ContactFact, ...]:
    if not keys:
        return ()
    rows = await session.scalars(
        sa.select(Contact).where(Contact.address_key.in_(keys)).order_by(Contact.id)
    )
    return tuple(
        ContactFact(
            contact_id=ContactId(c.id),
            subaccount_id=SubaccountId(c.subaccount_id),
            address_key=AddressKey(c.address_key),
            assigned_user_id=UserId(c.assigned_user_id) if c.assigned_user_id else None,
            updated_at=c.updated_at,
        )
        for c in rows
    )


async def _users(session: AsyncSession, keys: frozenset[AddressKey]) -> tuple[UserFact, ...]:
    """Users whose login (email_key) or any mailbox address matches (R7)."""
    if not keys:
        return ()
    by_login = sa.select(User.id, User.email_key.label("key")).where(User.email_key.in_(keys))
    by_mailbox = sa.select(Mailbox.user_id, Mailbox.address_key).where(
        Mailbox.address_key.in_(keys)
    )
    matches = {(uid, key) for uid, key in await session.execute(sa.union(by_login, by_mailbox))}
    if not matches:
        return ()
    memberships: dict[int, set[SubaccountId]] = defaultdict(set)
    for user_id, subaccount_id in await session.execute(
        sa.select(Membership.user_id, Membership.subaccount_id).where(
            Membership.user_id.in_({uid for uid, _ in matches})
        )
    ):
        memberships[user_id].add(SubaccountId(subaccount_id))
    return tuple(
        UserFact(
            user_id=UserId(uid),
            address_key=AddressKey(key),
            subaccount_ids=frozenset(memberships[uid]),
        )
        for uid, key in sorted(matches)
    )


async def _threads(session: AsyncSession, ids: frozenset[MessageId]) -> tuple[ThreadFact, ...]:
    if not ids:
        return ()
    rows = await session.execute(
        sa.select(
            KnownMessageId.message_id,
            Message.thread_id,
            ThreadInstance.subaccount_id,
            ThreadInstance.state,
        )
        .join(Message, Message.id == KnownMessageId.message_pk)
        .join(ThreadInstance, ThreadInstance.thread_id == Message.thread_id)
        .where(KnownMessageId.message_id.in_(ids))
        .distinct()
    )
    facts = {
        ThreadFact(
            message_id=MessageId(mid),
            thread_id=ThreadId(thread_id),
            subaccount_id=SubaccountId(subaccount_id),
            state=state,
        )
        for mid, thread_id, subaccount_id, state in rows
    }
    return tuple(sorted(facts, key=lambda f: (f.thread_id, f.subaccount_id, f.message_id)))


async def _duplicate_of(session: AsyncSession, identity_key: str) -> MessagePk | None:
    pk = await session.scalar(sa.select(Message.id).where(Message.identity_key == identity_key))
    return MessagePk(pk) if pk is not None else None


async def _waiting_children(
    session: AsyncSession, own_message_id: MessageId | None
) -> tuple[WaitingChild, ...]:
    """Stored messages citing ``own_message_id``, one per (message, instance) (R11)."""
    if own_message_id is None:
        return ()
    rows = await session.execute(
        sa.select(Message.id, Message.thread_id, ThreadInstance.subaccount_id)
        .join(MessageReference, MessageReference.message_pk == Message.id)
        .join(ThreadInstance, ThreadInstance.thread_id == Message.thread_id)
        .where(MessageReference.referenced_message_id == own_message_id)
        .distinct()
        .order_by(Message.id, ThreadInstance.subaccount_id)
    )
    return tuple(
        WaitingChild(
            message_pk=MessagePk(pk),
            thread_id=ThreadId(thread_id),
            subaccount_id=SubaccountId(subaccount_id),
        )
        for pk, thread_id, subaccount_id in rows
    )
