"""The ingest pipeline: ``prepare`` (bytes → values) and ``decide`` (values → decision).

Pure: no I/O, no clock, no logging, no async. Composition only: each stage
lives in its own module (parse, identity, thread, forward, route). Every door
(SMTP listener, IMAP watcher, CRM send) calls these two functions through
``gateway/intake.py``; see docs/architecture.md.
"""

from __future__ import annotations

from datetime import datetime

from ingest.forward import find_forwarded
from ingest.identity import identify
from ingest.parse import parse_message
from ingest.route import Route, route_sync_address
from ingest.route_mailbox import route_mailbox
from ingest.thread import thread_links
from ingest.types import (
    AddressKey,
    Decision,
    Facts,
    ForwardedOriginal,
    ImapOrigin,
    LogEntry,
    Lookups,
    MessageId,
    Outcome,
    ParsedMessage,
    Prepared,
    RawMessage,
    SmtpEnvelope,
    Source,
    ThreadLinks,
)


def _lookups(
    raw: RawMessage,
    parsed: ParsedMessage,
    identity_key: str,
    links: ThreadLinks,
    forwarded: ForwardedOriginal | None,
) -> Lookups:
    people = parsed.participants
    # The six tuples Participants.all() wraps, without building a Participant each.
    keys: set[AddressKey] = {
        a.address_key
        for group in (
            people.from_,
            people.sender,
            people.reply_to,
            people.to,
            people.cc,
            people.bcc,
        )
        for a in group
    }
    if forwarded is not None:
        keys.update(a.address_key for a in forwarded.to + forwarded.cc)
        if forwarded.from_ is not None:
            keys.add(forwarded.from_.address_key)
    message_ids: set[MessageId] = set(links.ancestors)
    if parsed.message_id is not None:
        message_ids.add(parsed.message_id)
    sync_addresses: frozenset[str] = frozenset()
    if isinstance(raw.provenance, SmtpEnvelope):
        sync_addresses = frozenset(r.lower() for r in raw.provenance.envelope_recipients)
    return Lookups(
        address_keys=frozenset(keys),
        own_message_id=parsed.message_id,
        message_ids=frozenset(message_ids),
        identity_key=identity_key,
        sync_addresses=sync_addresses,
        x_gm_thrid=raw.provenance.x_gm_thrid if isinstance(raw.provenance, ImapOrigin) else None,
    )


def _may_be_forward_to_sync_address(raw: RawMessage, parsed: ParsedMessage) -> bool:
    """Whether R13 can apply: the message is addressed to no one but the sync address.

    Forward detection (``ingest.forward``) reads bodies and renders HTML, the
    costliest stage after parsing. R13 needs it only for mail whose To, Cc
    and Bcc hold nothing but envelope recipients (the sync addresses) and
    the sender's own addresses; every other message is the user's own mail
    (R14) and its forward blocks do not matter.
    """
    if not isinstance(raw.provenance, SmtpEnvelope):
        return False
    own = {r.lower() for r in raw.provenance.envelope_recipients}
    own.update(a.address_key for a in parsed.participants.from_)
    return all(
        a.address_key in own or a.addr_spec.lower() in own for a in parsed.participants.recipients()
    )


def prepare(raw: RawMessage) -> Prepared:
    """Parse, normalise, identify and link one message.

    Args:
        raw: the received bytes and their provenance.

    Returns:
        A Prepared value with the Lookups storage must load. Never raises
        for bad mail: defects are recorded in ``prepared.parsed.defects``.
    """
    parsed = parse_message(raw.raw)
    identity = identify(parsed)
    links = thread_links(parsed)
    forwarded = find_forwarded(parsed) if _may_be_forward_to_sync_address(raw, parsed) else None
    return Prepared(
        raw=raw,
        parsed=parsed,
        identity=identity,
        links=links,
        forwarded=forwarded,
        lookups=_lookups(raw, parsed, identity.key, links, forwarded),
    )


def decide(prepared: Prepared, facts: Facts, now: datetime) -> Decision:
    """Decide what to store and where, with a rule id and reason for each choice.

    Mail received at a sync address (SMTP envelope) is routed by
    ``ingest.route.route_sync_address`` (R13-R15); mail fetched from a
    watched mailbox (IMAP origin) by ``ingest.route_mailbox.route_mailbox``
    (R1-R10, R13).

    Args:
        prepared: output of ``prepare``.
        facts: loaded by storage for ``prepared.lookups`` in one read.
        now: aware UTC time of the decision (injected; never read here).

    Returns:
        A Decision. A refused message (R15) stores nothing but the log; a
        message already stored (R12) that passes R15 is a duplicate and is
        only logged.

    """
    provenance = prepared.raw.provenance
    route: Route
    if isinstance(provenance, ImapOrigin):
        route, source = route_mailbox(prepared, facts, provenance), Source.MAILBOX
    else:
        route, source = route_sync_address(prepared, facts), Source.BCC
    if route.refusal is None and facts.duplicate_of is not None:
        return Decision(
            prepared=prepared,
            direction=route.direction,
            source=source,
            refusal=None,
            duplicate_of=facts.duplicate_of,
            thread=None,
            conversations=(),
            extra_bcc=(),
            log=(
                LogEntry(
                    rule="R12",
                    reason="the same message is already stored",
                    outcome=Outcome.DUPLICATE,
                ),
            ),
            decided_at=now,
        )
    return Decision(
        prepared=prepared,
        direction=route.direction,
        source=source,
        refusal=route.refusal,
        duplicate_of=None,
        thread=route.thread,
        conversations=route.conversations,
        extra_bcc=route.extra_bcc,
        log=route.log,
        decided_at=now,
    )
