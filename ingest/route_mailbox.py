"""Routing of mail fetched from a watched mailbox (IMAP INBOX / Sent): R1-R10, R13.

Pure: no I/O, no clock, no logging. Takes the prepared message, its IMAP
location and the facts storage loaded (including every sub-account the
provider account is connected in), returns the conversations to link and
the sync-log rows. Rules run in this order for each connection:
R6 (only new mail) → thread (R11; R13 forwards start a new one) → R4
(broken instance) → join a synced thread (R1, any origin) or start one
(R2 / R5 for ``gmail`` and opted-in ``imap``; R3 refuses it otherwise),
with R7, R8, R9 and R10 deciding which contacts of the sub-account it
reaches. No contact is ever created from mailbox traffic (R2).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from ingest.forward import has_forward_prefix
from ingest.route import Route
from ingest.rules.contacts import is_user, pick_contact
from ingest.rules.threading import choose_thread
from ingest.types import (
    Address,
    AddressKey,
    ConversationTarget,
    Direction,
    Facts,
    ImapOrigin,
    InstanceState,
    LogEntry,
    MailboxConnection,
    Outcome,
    Prepared,
    ThreadLinks,
    ThreadOrigin,
    ThreadTarget,
)

SENT_ROLE = "sent"
ORIGIN_RULE = {ThreadOrigin.CRM: "R1", ThreadOrigin.MAILBOX: "R2", ThreadOrigin.BCC: "R11"}


def _direction(prepared: Prepared, origin: ImapOrigin, facts: Facts) -> Direction:
    """Sent folder, or From being the mailbox itself, means the user sent it (R5)."""
    own = {c.address_key for c in facts.mailbox_connections}
    from_self = any(a.address_key in own for a in prepared.parsed.participants.from_)
    return Direction.OUTBOUND if origin.folder_role == SENT_ROLE or from_self else Direction.INBOUND


def _counterparts(prepared: Prepared, direction: Direction, own: set[AddressKey]) -> list[Address]:
    """The other side of the conversation (R8): recipients of outbound mail,
    sender then other recipients of inbound mail; unique, mailbox excluded."""
    p = prepared.parsed.participants
    ordered = p.to + p.cc + p.bcc if direction is Direction.OUTBOUND else p.from_ + p.to + p.cc
    seen = set(own)
    out: list[Address] = []
    for address in ordered:
        if address.address_key not in seen:
            seen.add(address.address_key)
            out.append(address)
    return out


def _is_new(prepared: Prepared, origin: ImapOrigin, conn: MailboxConnection, facts: Facts) -> bool:
    """R6: the message arrived or was sent after the connection (minus backfill)."""
    when: datetime | None = origin.internal_date or prepared.parsed.date_at
    if when is None:
        return True
    return when >= conn.connected_at - timedelta(days=facts.settings.backfill_days)


def _instance_state(
    thread: ThreadTarget, facts: Facts, conn: MailboxConnection
) -> InstanceState | None:
    if thread.thread_id is None:
        return None
    states = {
        f.state
        for f in facts.threads
        if f.thread_id == thread.thread_id and f.subaccount_id == conn.subaccount_id
    }
    if not states:
        return None
    return InstanceState.BROKEN if InstanceState.BROKEN in states else InstanceState.ACTIVE


def _thread_origin(thread: ThreadTarget, facts: Facts) -> ThreadOrigin:
    found = [f.origin for f in facts.threads if f.thread_id == thread.thread_id]
    return found[0] if found else ThreadOrigin.MAILBOX


def _contacts(
    addresses: list[Address],
    facts: Facts,
    conn: MailboxConnection,
    *,
    assigned_only: bool,
    rule: str,
    reason: str,
) -> tuple[list[ConversationTarget], list[LogEntry]]:
    """Existing contacts of the connection's sub-account among ``addresses``."""
    targets: list[ConversationTarget] = []
    log: list[LogEntry] = []
    for address in addresses:
        if is_user(facts, address, conn.subaccount_id):
            continue  # R7: users are not contacts
        candidates = tuple(
            c
            for c in facts.contacts
            if c.subaccount_id == conn.subaccount_id
            and c.address_key == address.address_key
            and (not assigned_only or c.assigned_user_id == conn.user_id)
        )
        picked = pick_contact(candidates, conn.user_id)
        if picked is None:
            continue
        contact, why = picked
        if len(candidates) > 1:
            log.append(
                LogEntry(
                    rule="R10", reason=why, outcome=Outcome.LINKED, subaccount_id=conn.subaccount_id
                )
            )
        targets.append(
            ConversationTarget(
                subaccount_id=conn.subaccount_id,
                contact_id=contact.contact_id,
                new_contact=None,
                rule=rule,
                reason=reason,
            )
        )
    return targets, log


def _skip(
    rule: str, reason: str, conn: MailboxConnection
) -> tuple[list[ConversationTarget], list[LogEntry]]:
    return [], [
        LogEntry(
            rule=rule, reason=reason, outcome=Outcome.SKIPPED, subaccount_id=conn.subaccount_id
        )
    ]


def _start_thread(
    prepared: Prepared,
    facts: Facts,
    conn: MailboxConnection,
    direction: Direction,
    own: set[AddressKey],
) -> tuple[list[ConversationTarget], list[LogEntry]]:
    """R2 (inbound) / R5 (outbound): a new thread with assigned contacts, or R3."""
    if not conn.contact_initiated:
        return _skip("R3", f"{conn.provider} mailbox: only threads started from the CRM sync", conn)
    if direction is Direction.OUTBOUND:
        targets, log = _contacts(
            _counterparts(prepared, direction, own),
            facts,
            conn,
            assigned_only=True,
            rule="R5",
            reason="sent from the mailbox to a contact assigned to the user; new thread",
        )
        return (
            (targets, log)
            if targets
            else _skip("R5", "no recipient is a contact assigned to the user", conn)
        )
    senders = prepared.parsed.participants.from_
    if senders and is_user(facts, senders[0], conn.subaccount_id):
        return _skip("R7", "sender is a user of the sub-account, not a contact", conn)
    first, _ = _contacts(
        list(senders[:1]),
        facts,
        conn,
        assigned_only=True,
        rule="R2",
        reason="sender is an assigned contact",
    )
    if not first:
        return _skip("R2", "sender is not a contact assigned to the mailbox's user", conn)
    # R8/R9: the sender's conversation, and every other assigned contact on the message.
    return _contacts(
        _counterparts(prepared, direction, own),
        facts,
        conn,
        assigned_only=True,
        rule="R2",
        reason="contact-initiated thread with an assigned contact",
    )


def _for_connection(
    prepared: Prepared,
    origin: ImapOrigin,
    facts: Facts,
    conn: MailboxConnection,
    thread: ThreadTarget,
    direction: Direction,
) -> tuple[list[ConversationTarget], list[LogEntry]]:
    own = {c.address_key for c in facts.mailbox_connections}
    if not _is_new(prepared, origin, conn, facts):
        return _skip("R6", "older than the mailbox connection; history is not imported", conn)
    state = _instance_state(thread, facts, conn)
    if state is InstanceState.BROKEN:
        return _skip(
            "R4", "thread instance in this sub-account is broken; receives nothing more", conn
        )
    if state is InstanceState.ACTIVE:
        rule = ORIGIN_RULE[_thread_origin(thread, facts)]
        if direction is Direction.OUTBOUND and rule == "R2":
            rule = "R5"
        targets, log = _contacts(
            _counterparts(prepared, direction, own),
            facts,
            conn,
            assigned_only=False,
            rule=rule,
            reason="belongs to a synced thread",
        )
        return (
            (targets, log)
            if targets
            else _skip(rule, "no contact of the sub-account on this message", conn)
        )
    return _start_thread(prepared, facts, conn, direction, own)


def route_mailbox(prepared: Prepared, facts: Facts, origin: ImapOrigin) -> Route:
    """Route a message fetched from a watched mailbox folder.

    Follows BEHAVIOUR.md R1-R10 and R13 (see the module docstring for the
    order). A forward sent from the mailbox (``Fwd:`` subject) never joins
    the thread it quotes: it is a new outbound message (R13).

    Args:
        prepared: the prepared message; its provenance is ``origin``.
        facts: loaded for ``prepared.lookups``; ``mailbox_connections``
            lists every active connection of the account (R4).
        origin: mailbox, folder, folder role (``inbox`` / ``sent``), UID.

    Returns:
        A Route (never a refusal: mailbox traffic is skipped, not refused).
    """
    direction = _direction(prepared, origin, facts)
    thread = choose_thread(prepared.links, facts, ThreadOrigin.MAILBOX)
    if direction is Direction.OUTBOUND and has_forward_prefix(prepared.parsed.subject):
        thread = choose_thread(ThreadLinks(parent=None, ancestors=()), facts, ThreadOrigin.MAILBOX)
    if not facts.mailbox_connections:
        log = (
            LogEntry(rule="R21", reason="the mailbox is not connected", outcome=Outcome.SKIPPED),
        )
        return Route(
            refusal=None, direction=direction, thread=None, conversations=(), extra_bcc=(), log=log
        )
    targets: list[ConversationTarget] = []
    log_rows: list[LogEntry] = []
    for conn in sorted(facts.mailbox_connections, key=lambda c: c.subaccount_id):
        found, entries = _for_connection(prepared, origin, facts, conn, thread, direction)
        targets.extend(found)
        log_rows.extend(entries)
    unique = tuple({(t.subaccount_id, t.contact_id): t for t in targets}.values())
    log_rows.extend(
        LogEntry(
            rule=t.rule, reason=t.reason, outcome=Outcome.STORED, subaccount_id=t.subaccount_id
        )
        for t in unique
    )
    return Route(
        refusal=None,
        direction=direction,
        thread=thread if unique else None,
        conversations=unique,
        extra_bcc=(),
        log=tuple(log_rows),
    )
