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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
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

_THREAD, _CHILD, _DUPLICATE, _PROVIDER_ID = "t", "c", "d", "p"
"""Row kinds of the ``messages`` UNION ALL in ``_message_facts``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class FactRows:
    """What the database holds for one message's ``Lookups`` (``Facts`` minus edge inputs).

    Attributes:
        sync_targets: sorted by sync address.
        contacts: sorted by contact id.
        users: sorted by (user id, address key).
        threads: sorted by (thread id, sub-account id, Message-ID).
        waiting_children: sorted by (message key, sub-account id).
        duplicate_of: see ``load_facts``.
    """

    sync_targets: tuple[SyncTarget, ...]
    contacts: tuple[ContactFact, ...]
    users: tuple[UserFact, ...]
    threads: tuple[ThreadFact, ...]
    waiting_children: tuple[WaitingChild, ...]
    duplicate_of: MessagePk | None


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
            for IMAP-fetched mail, six with an X-GM-THRID).
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
    (rows,) = load_fact_rows(session, (lookups,), aliases=aliases, bcc_domain=bcc_domain)
    connections = (
        mailbox_connections(session, origin.mailbox_id, contact_initiated)
        if origin is not None
        else ()
    )
    return facts_of(session, rows, lookups, settings=settings, auth=auth, connections=connections)


def load_fact_rows(
    session: Session,
    lookups: Sequence[Lookups],
    *,
    aliases: Mapping[str, tuple[str, ...]],
    bcc_domain: str | None = None,
) -> list[FactRows]:
    """Load the ``FactRows`` of several messages with the statements of one (a batch).

    At most four SELECTs in all, each with ``IN`` over the union of the
    messages' keys; each message then gets exactly the rows its own keys
    match, in the orders ``FactRows`` states, as if loaded alone.

    Args:
        lookups: one per message, in batch order.
        aliases, bcc_domain: as for ``load_facts``.

    Returns:
        One ``FactRows`` per entry of ``lookups``, in the same order.
    """
    sync_addresses = {a for item in lookups for a in item.sync_addresses}
    keys = frozenset(k for item in lookups for k in item.address_keys)
    targets = _sync_targets(session, sync_addresses, aliases, bcc_domain)
    contacts = _contacts(session, keys)
    users = _users(session, keys)
    messages = _message_facts(session, lookups)
    out: list[FactRows] = []
    for item, (threads, children, duplicate_of) in zip(lookups, messages, strict=True):
        own_addresses = {a.strip().lower() for a in item.sync_addresses}
        out.append(
            FactRows(
                sync_targets=tuple(t for t in targets if t.sync_address in own_addresses),
                contacts=tuple(c for c in contacts if c.address_key in item.address_keys),
                users=tuple(u for u in users if u.address_key in item.address_keys),
                threads=threads,
                waiting_children=children,
                duplicate_of=duplicate_of,
            )
        )
    return out


def facts_of(
    session: Session,
    rows: FactRows,
    lookups: Lookups,
    *,
    settings: RouteSettings,
    auth: AuthResult | None,
    connections: tuple[MailboxConnection, ...],
) -> Facts:
    """Complete ``rows`` into ``Facts``: edge inputs, and X-GM-THRID threads (one SELECT
    when ``lookups.x_gm_thrid`` is set)."""
    threads = rows.threads
    if lookups.x_gm_thrid is not None:
        threads += _gmail_thread_facts(session, lookups.x_gm_thrid)
    return Facts(
        sync_targets=rows.sync_targets,
        contacts=rows.contacts,
        users=rows.users,
        threads=threads,
        waiting_children=rows.waiting_children,
        duplicate_of=rows.duplicate_of,
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


def mailbox_connections(
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


_MessageFacts = tuple[tuple[ThreadFact, ...], tuple[WaitingChild, ...], MessagePk | None]


def _message_facts(session: Session, lookups: Sequence[Lookups]) -> list[_MessageFacts]:
    """Per message: threads holding its ids, children citing it (R11), its duplicate (R12).

    One ``UNION ALL`` statement (``_MESSAGE_FACTS``) for all messages; none
    when there is no key at all. Each row names the key it matched, so
    each message gets the rows of its own keys. An empty key matches no row.
    """
    ids = sorted({m for item in lookups for m in item.message_ids})
    owns = sorted({item.own_message_id for item in lookups if item.own_message_id})
    identities = sorted({item.identity_key for item in lookups if item.identity_key})
    threads: dict[str, set[ThreadFact]] = defaultdict(set)
    children: dict[str, set[WaitingChild]] = defaultdict(set)
    by_identity: dict[str, MessagePk] = {}
    by_provider_id: dict[str, MessagePk] = {}
    if ids or owns or identities:
        params = {"ids": ids, "owns": owns, "identities": identities}
        rows = session.connection().execute(_MESSAGE_FACTS, params)
        for kind, key, pk, thread_id, subaccount_id, state, origin in rows:
            if kind == _THREAD:
                threads[key].add(
                    ThreadFact(
                        message_id=MessageId(key),
                        thread_id=ThreadId(thread_id),
                        subaccount_id=SubaccountId(subaccount_id),
                        state=state,
                        origin=ThreadOrigin(origin),
                    )
                )
            elif kind == _CHILD:
                children[key].add(
                    WaitingChild(
                        message_pk=MessagePk(pk),
                        thread_id=ThreadId(thread_id),
                        subaccount_id=SubaccountId(subaccount_id),
                    )
                )
            elif kind == _DUPLICATE:
                by_identity[key] = MessagePk(pk)
            else:
                by_provider_id[key] = MessagePk(pk)
    out: list[_MessageFacts] = []
    for item in lookups:
        own = item.own_message_id or ""
        found = {fact for mid in item.message_ids for fact in threads.get(mid, ())}
        duplicate_of = by_identity.get(item.identity_key) if item.identity_key else None
        if duplicate_of is None and own:
            duplicate_of = by_provider_id.get(own)
        out.append(
            (
                tuple(sorted(found, key=lambda f: (f.thread_id, f.subaccount_id, f.message_id))),
                tuple(sorted(children.get(own, ()), key=lambda c: (c.message_pk, c.subaccount_id))),
                duplicate_of,
            )
        )
    return out


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
    .where(MessageReference.referenced_message_id.in_(sa.bindparam("owns", expanding=True)))
    .distinct(),
    # The stored copy with the same identity key.
    sa.select(
        sa.literal_column(f"'{_DUPLICATE}'"),
        Message.identity_key,
        Message.id,
        Message.thread_id,
        sa.null(),
        sa.null(),
        sa.null(),
    ).where(Message.identity_key.in_(sa.bindparam("identities", expanding=True))),
    # A sent message whose provider rewrote its Message-ID (Exchange, R11): the
    # Sent-folder copy carries the provider's id as its own (R12).
    sa.select(
        sa.literal_column(f"'{_PROVIDER_ID}'"),
        KnownMessageId.message_id,
        KnownMessageId.message_pk,
        sa.null(),
        sa.null(),
        sa.null(),
        sa.null(),
    ).where(
        KnownMessageId.message_id.in_(sa.bindparam("owns", expanding=True)),
        KnownMessageId.kind == MessageIdKind.PROVIDER,
    ),
)
"""Rows ``(kind, key, pk, thread_id, subaccount_id, state, origin)``: ``key`` is the
Message-ID (thread, child and provider-id rows) or identity key (duplicate rows) the
row matched; ``origin`` (the synced thread's, R1/R2) is set on thread rows only."""

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
