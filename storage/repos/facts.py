"""Facts loader: everything ``ingest.decide`` needs from the database, in one read.

Edge module: read-only sync queries on a caller's ``Session``; at most four
statements per message, each with ``IN`` over the looked-up keys (no query
per address), and none for an empty key set: sync targets with their
mailboxes; contacts; users with their memberships; and one ``UNION ALL``
over ``messages`` for threads (with their origin), waiting children and
the duplicate; plus, for IMAP-fetched mail only, one self-join over
``mailboxes`` for the account's connections (R4). The
statements are built once at import and run on the session's connection:
building a statement costs more than running it (~100 µs against ~20 µs).
Builds ``ingest.types.Facts``; never writes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, aliased

from ingest.normalise import address_key
from ingest.types import (
    AddressKey,
    AuthResult,
    ContactFact,
    ContactId,
    Facts,
    ImapOrigin,
    Lookups,
    MailboxConnection,
    MailboxId,
    MailboxState,
    MessageId,
    MessagePk,
    Provider,
    RouteSettings,
    SubaccountId,
    SyncTarget,
    ThreadFact,
    ThreadId,
    ThreadOrigin,
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
    MessageIdKind,
    MessageReference,
    SyncedThread,
    ThreadInstance,
    User,
)
from storage.repos.directory import SYNC_LOCAL_PREFIX

SENDER_MAILBOX_STATES = (MailboxState.CONNECTED, MailboxState.REAUTH_REQUIRED)
"""Mailboxes whose address counts as the user's own for R15 (not disconnected ones)."""

CONTACT_INITIATED_DEFAULTS: Mapping[Provider, bool] = {
    Provider.GMAIL: True,
    Provider.OUTLOOK: False,
    Provider.IMAP: False,
}
"""``providers.*.contact_initiated`` defaults (R2 for gmail; R3 for outlook and imap)."""

_THREAD, _CHILD, _DUPLICATE = "t", "c", "d"
"""Row kinds of the ``messages`` UNION ALL in ``_message_facts``."""


def load_facts(
    session: Session,
    lookups: Lookups,
    *,
    aliases: Mapping[str, tuple[str, ...]],
    settings: RouteSettings,
    auth: AuthResult | None,
    bcc_domain: str | None = None,
    origin: ImapOrigin | None = None,
    contact_initiated: Mapping[Provider, bool] = CONTACT_INITIATED_DEFAULTS,
) -> Facts:
    """Load the ``Facts`` for one prepared message.

    Args:
        session: open session; only SELECTs are issued (at most four, five
            for IMAP-fetched mail).
        lookups: from ``ingest.prepare``.
        aliases: user login email -> extra allowed From addresses (R15,
            ``bcc.aliases``); keys compared by address_key.
        settings: routing switches, copied into the result.
        auth: edge-computed DKIM/SPF result, copied into the result.
        bcc_domain: when given, a sync address must also be in this domain
            (case-insensitive); when None only the local part is matched.
        origin: for IMAP-fetched mail, where it was fetched (usually
            ``prepared.raw.provenance``); loads ``mailbox_connections``.
        contact_initiated: per provider, whether contact-initiated threads
            sync (R2/R3, ``providers.*.contact_initiated``).

    Returns:
        Facts with: ``sync_targets`` sorted by sync address; ``contacts``,
        ``users``, ``threads`` and ``waiting_children`` sorted by row keys;
        ``duplicate_of`` the stored message with the same identity key, or
        the sent message whose provider-given Message-ID (R11) is this
        message's own;
        ``mailbox_connections`` (IMAP only) every connected mailbox row of
        the same provider account, one per sub-account, by sub-account.
    """
    threads, children, duplicate_of = _message_facts(session, lookups)
    if lookups.x_gm_thrid is not None:
        threads += _gmail_thread_facts(session, lookups.x_gm_thrid)
    connections = (
        _mailbox_connections(session, origin.mailbox_id, contact_initiated)
        if origin is not None
        else ()
    )
    return Facts(
        sync_targets=_sync_targets(session, lookups.sync_addresses, aliases, bcc_domain),
        contacts=_contacts(session, lookups.address_keys),
        users=_users(session, lookups.address_keys),
        threads=threads,
        waiting_children=children,
        duplicate_of=duplicate_of,
        auth=auth,
        settings=settings,
        mailbox_connections=connections,
    )


GMAIL_THREAD_HINT = MessageId("")
"""``ThreadFact.message_id`` of a thread found by X-GM-THRID rather than a Message-ID
(equal to ``ingest.rules.threading.GMAIL_THREAD_HINT``)."""


def _gmail_thread_facts(session: Session, x_gm_thrid: int) -> tuple[ThreadFact, ...]:
    """Instances of synced threads already carrying this Gmail thread id (R11 hint).

    One SELECT. Each fact's ``message_id`` is ``GMAIL_THREAD_HINT`` (""),
    which no header ancestor can equal: ``choose_thread`` uses these facts
    only when no stored ancestor or waiting child names a thread.

    Returns:
        Facts sorted by (thread_id, subaccount_id); empty when none.
    """
    rows = session.execute(
        sa.select(
            SyncedThread.id, ThreadInstance.subaccount_id, ThreadInstance.state, SyncedThread.origin
        )
        .join(ThreadInstance, ThreadInstance.thread_id == SyncedThread.id)
        .where(SyncedThread.x_gm_thrid == x_gm_thrid)
        .order_by(SyncedThread.id, ThreadInstance.subaccount_id)
    )
    return tuple(
        ThreadFact(
            message_id=GMAIL_THREAD_HINT,
            thread_id=ThreadId(thread_id),
            subaccount_id=SubaccountId(subaccount_id),
            state=state,
            origin=ThreadOrigin(origin),
        )
        for thread_id, subaccount_id, state, origin in rows
    )


def _mailbox_connections(
    session: Session, mailbox_id: int, contact_initiated: Mapping[Provider, bool]
) -> tuple[MailboxConnection, ...]:
    """Connected rows of the provider account ``mailbox_id`` belongs to (R4), one per sub-account.

    One SELECT (a self-join on provider and address key). When two rows
    share a sub-account (two users connecting the same address), the
    oldest row wins.
    """
    by_subaccount: dict[int, MailboxConnection] = {}
    rows = session.connection().execute(_CONNECTIONS, {"mailbox_id": mailbox_id})
    for mid, subaccount_id, user_id, provider, key, connected_at in rows:
        if connected_at is None or subaccount_id in by_subaccount:
            continue
        kind = Provider(provider)
        by_subaccount[subaccount_id] = MailboxConnection(
            mailbox_id=MailboxId(mid),
            subaccount_id=SubaccountId(subaccount_id),
            user_id=UserId(user_id),
            provider=kind,
            address_key=AddressKey(key),
            # INTERNALDATE has whole seconds (RFC 9051 §9 date-time): compare at that
            # resolution, or mail arriving in the connection's own second is "older".
            connected_at=connected_at.replace(microsecond=0),
            contact_initiated=contact_initiated.get(kind, False),
        )
    return tuple(by_subaccount[k] for k in sorted(by_subaccount))


def resolve_sync_address(
    session: Session,
    address: str,
    domain: str | None,
    *,
    aliases: Mapping[str, tuple[str, ...]] | None = None,
) -> SyncTarget | None:
    """Return the membership a sync address names (the SMTP listener's RCPT check, R14).

    One SELECT (none when ``address`` is not of the form ``u-<token>@domain``).

    Args:
        address: addr-spec as given in RCPT TO; compared case-insensitively.
        domain: the BCC domain the address must be in, or None for any.
        aliases: as for ``load_facts``; only changes ``sender_keys``.

    Returns:
        The target (``sync_address`` lower-cased), or None when no
        membership has that token.
    """
    targets = _sync_targets(session, (address,), aliases or {}, domain)
    return targets[0] if targets else None


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


def _sync_targets(
    session: Session,
    sync_addresses: Iterable[str],
    aliases: Mapping[str, tuple[str, ...]],
    bcc_domain: str | None,
) -> tuple[SyncTarget, ...]:
    """Memberships by token, each with its user's sender mailboxes (one outer join)."""
    by_token: dict[str, list[str]] = defaultdict(list)
    for sync_address in sorted(sync_addresses):
        token = sync_token_of(sync_address, bcc_domain)
        if token is not None:
            by_token[token].append(sync_address.strip().lower())
    if not by_token:
        return ()
    rows = session.connection().execute(_SYNC_TARGETS, {"tokens": sorted(by_token)})
    members: dict[tuple[str, int, int, str], set[AddressKey]] = defaultdict(set)
    for token, subaccount_id, user_id, email, mailbox_key in rows:
        keys = members[token, subaccount_id, user_id, email]
        if mailbox_key is not None:
            keys.add(AddressKey(mailbox_key))
    alias_keys = _alias_keys(aliases)
    targets: list[SyncTarget] = []
    for (token, subaccount_id, user_id, email), mailbox_keys in members.items():
        key = address_key(email)
        sender_keys = {key, *mailbox_keys, *alias_keys.get(key, ())}
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


def _alias_keys(aliases: Mapping[str, tuple[str, ...]]) -> dict[AddressKey, set[AddressKey]]:
    out: dict[AddressKey, set[AddressKey]] = defaultdict(set)
    for login, extra in aliases.items():
        out[address_key(login.strip())].update(address_key(a.strip()) for a in extra)
    return out


def _contacts(session: Session, keys: frozenset[AddressKey]) -> tuple[ContactFact, ...]:
    if not keys:
        return ()
    rows = session.connection().execute(_CONTACTS, {"keys": sorted(keys)})
    return tuple(
        ContactFact(
            contact_id=ContactId(contact_id),
            subaccount_id=SubaccountId(subaccount_id),
            address_key=AddressKey(key),
            assigned_user_id=UserId(assigned) if assigned else None,
            updated_at=updated_at,
        )
        for contact_id, subaccount_id, key, assigned, updated_at in rows
    )


def _users(session: Session, keys: frozenset[AddressKey]) -> tuple[UserFact, ...]:
    """Users whose login (email_key) or any mailbox address matches (R7), with memberships."""
    if not keys:
        return ()
    rows = session.connection().execute(_USERS, {"keys": sorted(keys)})
    memberships: dict[tuple[int, str], set[SubaccountId]] = defaultdict(set)
    for user_id, key, subaccount_id in rows:
        held = memberships[user_id, key]
        if subaccount_id is not None:
            held.add(SubaccountId(subaccount_id))
    return tuple(
        UserFact(
            user_id=UserId(uid),
            address_key=AddressKey(key),
            subaccount_ids=frozenset(memberships[uid, key]),
        )
        for uid, key in sorted(memberships)
    )


def _message_facts(
    session: Session, lookups: Lookups
) -> tuple[tuple[ThreadFact, ...], tuple[WaitingChild, ...], MessagePk | None]:
    """Threads holding the looked-up ids, children citing this message (R11), duplicate (R12).

    One ``UNION ALL`` statement (``_MESSAGE_FACTS``); none when there is no
    key at all. A part whose key is empty matches no row.
    """
    if not (lookups.message_ids or lookups.own_message_id or lookups.identity_key):
        return (), (), None
    params = {
        "ids": sorted(lookups.message_ids),
        "own": lookups.own_message_id,
        "identity": lookups.identity_key,
    }
    threads: set[ThreadFact] = set()
    children: set[WaitingChild] = set()
    duplicate_of: MessagePk | None = None
    rows = session.connection().execute(_MESSAGE_FACTS, params)
    for kind, mid, pk, thread_id, subaccount_id, state, origin in rows:
        if kind == _THREAD:
            threads.add(
                ThreadFact(
                    message_id=MessageId(mid),
                    thread_id=ThreadId(thread_id),
                    subaccount_id=SubaccountId(subaccount_id),
                    state=state,
                    origin=ThreadOrigin(origin),
                )
            )
        elif kind == _CHILD:
            children.add(
                WaitingChild(
                    message_pk=MessagePk(pk),
                    thread_id=ThreadId(thread_id),
                    subaccount_id=SubaccountId(subaccount_id),
                )
            )
        else:
            duplicate_of = MessagePk(pk)
    return (
        tuple(sorted(threads, key=lambda f: (f.thread_id, f.subaccount_id, f.message_id))),
        tuple(sorted(children, key=lambda c: (c.message_pk, c.subaccount_id))),
        duplicate_of,
    )


_SYNC_TARGETS = (
    sa.select(
        Membership.sync_token,
        Membership.subaccount_id,
        User.id,
        User.email,
        Mailbox.address_key,
    )
    .join(User, User.id == Membership.user_id)
    .outerjoin(
        Mailbox,
        sa.and_(Mailbox.user_id == User.id, Mailbox.state.in_(SENDER_MAILBOX_STATES)),
    )
    .where(Membership.sync_token.in_(sa.bindparam("tokens", expanding=True)))
)

_CONTACTS = (
    sa.select(
        Contact.id,
        Contact.subaccount_id,
        Contact.address_key,
        Contact.assigned_user_id,
        Contact.updated_at,
    )
    .where(Contact.address_key.in_(sa.bindparam("keys", expanding=True)))
    .order_by(Contact.id)
)

_USER_MATCHES = sa.union(
    sa.select(User.id.label("user_id"), User.email_key.label("key")).where(
        User.email_key.in_(sa.bindparam("keys", expanding=True))
    ),
    sa.select(Mailbox.user_id, Mailbox.address_key).where(
        Mailbox.address_key.in_(sa.bindparam("keys", expanding=True))
    ),
).subquery()

_USERS = sa.select(
    _USER_MATCHES.c.user_id, _USER_MATCHES.c.key, Membership.subaccount_id
).outerjoin(Membership, Membership.user_id == _USER_MATCHES.c.user_id)

_MESSAGE_FACTS: sa.CompoundSelect[*tuple[Any, ...]] = sa.union_all(
    # Threads holding the looked-up ids, with their instances (first: its types win).
    sa.select(
        sa.literal_column(f"'{_THREAD}'").label("kind"),
        KnownMessageId.message_id,
        KnownMessageId.message_pk,
        Message.thread_id,
        ThreadInstance.subaccount_id,
        ThreadInstance.state,
        SyncedThread.origin,
    )
    .join(Message, Message.id == KnownMessageId.message_pk)
    .join(ThreadInstance, ThreadInstance.thread_id == Message.thread_id)
    .join(SyncedThread, SyncedThread.id == Message.thread_id)
    .where(KnownMessageId.message_id.in_(sa.bindparam("ids", expanding=True)))
    .distinct(),
    # Stored messages citing this message, one per (message, instance).
    sa.select(
        sa.literal_column(f"'{_CHILD}'"),
        MessageReference.referenced_message_id,
        Message.id,
        Message.thread_id,
        ThreadInstance.subaccount_id,
        ThreadInstance.state,
        sa.null(),
    )
    .join(MessageReference, MessageReference.message_pk == Message.id)
    .join(ThreadInstance, ThreadInstance.thread_id == Message.thread_id)
    .where(MessageReference.referenced_message_id == sa.bindparam("own"))
    .distinct(),
    # The stored copy with the same identity key.
    sa.select(
        sa.literal_column(f"'{_DUPLICATE}'"),
        Message.message_id,
        Message.id,
        Message.thread_id,
        sa.null(),
        sa.null(),
        sa.null(),
    ).where(Message.identity_key == sa.bindparam("identity")),
    # A sent message whose provider rewrote its Message-ID (Exchange, R11): the
    # Sent-folder copy carries the provider's id as its own (R12).
    sa.select(
        sa.literal_column(f"'{_DUPLICATE}'"),
        KnownMessageId.message_id,
        KnownMessageId.message_pk,
        sa.null(),
        sa.null(),
        sa.null(),
        sa.null(),
    ).where(
        KnownMessageId.message_id == sa.bindparam("own"),
        KnownMessageId.kind == MessageIdKind.PROVIDER,
    ),
)
"""Rows ``(kind, message_id, pk, thread_id, subaccount_id, state, origin)``; an empty key
matches none; ``origin`` (the synced thread's, R1/R2) is set on thread rows only."""

_PEER = aliased(Mailbox)

_CONNECTIONS = (
    sa.select(
        Mailbox.id,
        Mailbox.subaccount_id,
        Mailbox.user_id,
        Mailbox.provider,
        Mailbox.address_key,
        Mailbox.connected_at,
    )
    .join(
        _PEER,
        sa.and_(_PEER.provider == Mailbox.provider, _PEER.address_key == Mailbox.address_key),
    )
    .where(_PEER.id == sa.bindparam("mailbox_id"), Mailbox.state == MailboxState.CONNECTED)
    .order_by(Mailbox.id)
)
"""Connected mailbox rows sharing provider and address with the fetched-from row (R4)."""
