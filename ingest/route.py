"""Routing of mail sent to a sync address: R7, R8-R10, R13-R15 (and R4, R11).

Pure: no I/O, no clock, no logging. Takes the prepared message and the facts
storage loaded, returns the conversations to link and the sync-log rows.

``route_sync_address`` applies the rules in a fixed order: sender check
(R15) → forward or recipients (R13 / R14, with R7 and R10 per address) →
thread (R11) → closed instances (R4).
"""

from __future__ import annotations

from dataclasses import dataclass

from ingest.normalise import address_key
from ingest.rules.contacts import route_address
from ingest.rules.sender import RULE as SENDER_RULE
from ingest.rules.sender import check_sender
from ingest.rules.threading import broken_subaccounts, choose_thread
from ingest.types import (
    Address,
    AddressKey,
    ConversationTarget,
    Direction,
    Facts,
    LogEntry,
    Outcome,
    Prepared,
    Refusal,
    SyncTarget,
    ThreadOrigin,
    ThreadTarget,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    """Where a message to a sync address goes.

    Attributes:
        refusal: set when no sync target accepts the message (R15).
        direction: ``outbound`` for R14 (the user's own mail), ``inbound``
            for R13 (a forward of mail the user received).
        thread: the thread to join or start; None when nothing is stored.
        conversations: targets, unique per (sub-account, contact).
        extra_bcc: sync addresses to show in Bcc (R14).
        log: sync-log rows in decision order.
    """

    refusal: Refusal | None
    direction: Direction
    thread: ThreadTarget | None
    conversations: tuple[ConversationTarget, ...]
    extra_bcc: tuple[Address, ...]
    log: tuple[LogEntry, ...]


def _sync_address(target: SyncTarget) -> Address:
    return Address(
        display_name="",
        addr_spec=target.sync_address,
        address_key=address_key(target.sync_address),
    )


def _other_recipients(
    prepared: Prepared, target: SyncTarget, skip: frozenset[AddressKey]
) -> tuple[Address, ...]:
    """To, Cc and Bcc minus sync addresses and the user's own addresses, unique."""
    seen: set[AddressKey] = set(skip) | set(target.sender_keys)
    out: list[Address] = []
    for address in prepared.parsed.participants.recipients():
        if address.address_key in seen:
            continue
        seen.add(address.address_key)
        out.append(address)
    return tuple(out)


def _targets_for(
    prepared: Prepared, facts: Facts, target: SyncTarget, sync_keys: frozenset[AddressKey]
) -> tuple[Direction, tuple[ConversationTarget, ...], tuple[LogEntry, ...]]:
    """R13 or R14 for one accepted sync target."""
    recipients = _other_recipients(prepared, target, sync_keys)
    forwarded = prepared.forwarded
    addresses: tuple[Address, ...]
    if not recipients and forwarded is not None and forwarded.from_ is not None:
        rule, direction, addresses = "R13", Direction.INBOUND, (forwarded.from_,)
    elif recipients:
        rule, direction, addresses = "R14", Direction.OUTBOUND, recipients
    else:
        why = "no recipient besides the sync address and no forwarded original found"
        entry = LogEntry(
            rule="R13" if forwarded is not None else "R14",
            reason=why,
            outcome=Outcome.SKIPPED,
            subaccount_id=target.subaccount_id,
        )
        return Direction.OUTBOUND, (), (entry,)
    create = facts.settings.create_contacts
    targets: list[ConversationTarget] = []
    log: list[LogEntry] = []
    for address in addresses:
        choice = route_address(
            facts,
            address,
            subaccount_id=target.subaccount_id,
            user_id=target.user_id,
            rule=rule,
            create=create,
        )
        log.extend(choice.log)
        if choice.target is not None:
            targets.append(choice.target)
    return direction, tuple(targets), tuple(log)


def _unique(targets: list[ConversationTarget]) -> tuple[ConversationTarget, ...]:
    """Drop repeated (sub-account, contact) pairs, first kept (R9: linked once)."""
    seen: set[tuple[int, object]] = set()
    out: list[ConversationTarget] = []
    for t in targets:
        who: object = t.contact_id if t.contact_id is not None else None
        if t.new_contact is not None:
            who = ("new", t.new_contact.address.address_key)
        key = (t.subaccount_id, who)
        if key not in seen:
            seen.add(key)
            out.append(t)
    return tuple(out)


def _close_broken(
    thread: ThreadTarget, facts: Facts, targets: tuple[ConversationTarget, ...]
) -> tuple[tuple[ConversationTarget, ...], tuple[LogEntry, ...]]:
    """Leave out sub-accounts whose thread instance is broken (R4)."""
    broken = broken_subaccounts(thread, facts)
    kept = tuple(t for t in targets if t.subaccount_id not in broken)
    log = tuple(
        LogEntry(
            rule="R4",
            reason="thread instance in this sub-account is broken; receives nothing more",
            outcome=Outcome.SKIPPED,
            subaccount_id=s,
        )
        for s in sorted({t.subaccount_id for t in targets if t.subaccount_id in broken})
    )
    return kept, log


def route_sync_address(prepared: Prepared, facts: Facts) -> Route:
    """Route a message received at one or more sync addresses.

    Follows BEHAVIOUR.md R15 (sender check per sync target), R13 (a forward
    sent to the sync address alone is logged against the original sender),
    R14 (the user's mail with the sync address in To/Cc/Bcc is outbound to
    every other recipient, contacts created when allowed), R7, R8 (Cc and
    Bcc recipients count like To), R9, R10, R11 and R4.

    Args:
        prepared: the prepared message; its provenance is an SMTP envelope.
        facts: facts loaded for ``prepared.lookups``; ``sync_targets`` lists
            the resolved envelope recipients.

    Returns:
        A Route. ``refusal`` is set when no target accepts the message; the
        SMTP listener then answers 550 5.7.1 with the refusal's reason.
    """
    verdicts = tuple(check_sender(prepared.parsed, facts, t) for t in facts.sync_targets)
    accepted = tuple(v.target for v in verdicts if v.accepted)
    log = [
        LogEntry(
            rule=SENDER_RULE,
            reason=v.reason,
            outcome=Outcome.REFUSED,
            subaccount_id=v.target.subaccount_id,
        )
        for v in verdicts
        if not v.accepted
    ]
    if not accepted:
        reason = verdicts[0].reason if verdicts else "no sync address among the recipients"
        return Route(
            refusal=Refusal(rule=SENDER_RULE, reason=reason),
            direction=Direction.OUTBOUND,
            thread=None,
            conversations=(),
            extra_bcc=(),
            log=tuple(log),
        )
    sync_keys = frozenset(address_key(t.sync_address) for t in facts.sync_targets)
    direction = Direction.OUTBOUND
    targets: list[ConversationTarget] = []
    for target in accepted:
        direction, found, entries = _targets_for(prepared, facts, target, sync_keys)
        targets.extend(found)
        log.extend(entries)
    thread = choose_thread(prepared.links, facts, ThreadOrigin.BCC)
    kept, closed = _close_broken(thread, facts, _unique(targets))
    log.extend(closed)
    log.extend(
        LogEntry(
            rule=t.rule, reason=t.reason, outcome=Outcome.STORED, subaccount_id=t.subaccount_id
        )
        for t in kept
    )
    shown = {a.address_key for a in prepared.parsed.participants.bcc}
    extra_bcc = tuple(
        _sync_address(t)
        for t in accepted
        if direction is Direction.OUTBOUND and address_key(t.sync_address) not in shown
    )
    return Route(
        refusal=None,
        direction=direction,
        thread=thread if kept else None,
        conversations=kept,
        extra_bcc=extra_bcc,
        log=tuple(log),
    )
