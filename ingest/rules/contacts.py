"""R7, R10 and R14: which contact of a sub-account an address belongs to.

Pure: no I/O, no clock. Works on the contacts and users that storage loaded
for the message's address keys.
"""

from __future__ import annotations

from dataclasses import dataclass

from ingest.types import (
    Address,
    ContactFact,
    ConversationTarget,
    Facts,
    LogEntry,
    NewContact,
    Outcome,
    SubaccountId,
    UserId,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class ContactChoice:
    """Where one address goes in one sub-account.

    Attributes:
        target: the conversation to link, or None when the address is skipped.
        log: sync-log rows explaining the choice (R7, R10, R14), possibly empty.
    """

    target: ConversationTarget | None
    log: tuple[LogEntry, ...]


def is_user(facts: Facts, address: Address, subaccount_id: SubaccountId) -> bool:
    """Return whether ``address`` belongs to a user of the sub-account (R7)."""
    return any(
        u.address_key == address.address_key and subaccount_id in u.subaccount_ids
        for u in facts.users
    )


def pick_contact(
    candidates: tuple[ContactFact, ...], user_id: UserId
) -> tuple[ContactFact, str] | None:
    """Choose among contacts sharing one address (R10).

    Args:
        candidates: contacts of one sub-account with the same address key.
        user_id: the mailbox's (or sync address's) user.

    Returns:
        (contact, reason), or None when ``candidates`` is empty. The one
        assigned to ``user_id`` wins; among several (or none assigned), the
        most recently updated, then the lowest id for a stable result.
    """
    if not candidates:
        return None
    assigned = tuple(c for c in candidates if c.assigned_user_id == user_id)
    pool = assigned or candidates
    chosen = sorted(pool, key=lambda c: (-c.updated_at.timestamp(), c.contact_id))[0]
    if len(candidates) == 1:
        return chosen, "contact matched by address"
    why = "assigned to the user" if assigned else "none assigned to the user"
    return chosen, (
        f"{len(candidates)} contacts share the address; chose contact "
        f"{chosen.contact_id} ({why}, most recently updated)"
    )


def route_address(
    facts: Facts,
    address: Address,
    *,
    subaccount_id: SubaccountId,
    user_id: UserId,
    rule: str,
    create: bool,
) -> ContactChoice:
    """Route one address to a conversation in one sub-account.

    Applies R7 (users are not contacts), R10 (duplicate contacts) and, when
    ``create`` is set, R14 (create the missing contact, assigned to the user).

    Args:
        facts: loaded contacts and users.
        address: the participant to route.
        subaccount_id: the sub-account whose conversations are considered.
        user_id: the user whose mail this is.
        rule: the rule that brings this address in (``R13``, ``R14``).
        create: whether a missing contact may be created.

    Returns:
        A ContactChoice; ``target`` None means skipped, with the reason logged.
    """
    if is_user(facts, address, subaccount_id):
        return ContactChoice(
            target=None,
            log=(
                LogEntry(
                    rule="R7",
                    reason="address belongs to a user of the sub-account, not a contact",
                    outcome=Outcome.SKIPPED,
                    subaccount_id=subaccount_id,
                ),
            ),
        )
    candidates = tuple(
        c
        for c in facts.contacts
        if c.subaccount_id == subaccount_id and c.address_key == address.address_key
    )
    picked = pick_contact(candidates, user_id)
    if picked is not None:
        contact, reason = picked
        log: tuple[LogEntry, ...] = ()
        if len(candidates) > 1:
            log = (
                LogEntry(
                    rule="R10", reason=reason, outcome=Outcome.LINKED, subaccount_id=subaccount_id
                ),
            )
        target = ConversationTarget(
            subaccount_id=subaccount_id,
            contact_id=contact.contact_id,
            new_contact=None,
            rule=rule,
            reason=reason,
        )
        return ContactChoice(target=target, log=log)
    if not create:
        return ContactChoice(
            target=None,
            log=(
                LogEntry(
                    rule=rule,
                    reason="address is not a contact and bcc.create_contacts is false",
                    outcome=Outcome.SKIPPED,
                    subaccount_id=subaccount_id,
                ),
            ),
        )
    new = NewContact(subaccount_id=subaccount_id, address=address, assigned_user_id=user_id)
    target = ConversationTarget(
        subaccount_id=subaccount_id,
        contact_id=None,
        new_contact=new,
        rule=rule,
        reason="contact created from mail to the sync address, assigned to the user",
    )
    return ContactChoice(target=target, log=())
