"""Builders of ingest values for routing tests: no parser, one rule per test."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from ingest.normalise import address_key
from ingest.types import (
    Address,
    ContactFact,
    ContactId,
    Facts,
    ForwardedOriginal,
    Identity,
    Lookups,
    MessageId,
    ParsedMessage,
    Participants,
    Prepared,
    Provenance,
    RawMessage,
    SmtpEnvelope,
    SubaccountId,
    SyncTarget,
    ThreadLinks,
    UserId,
)

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
ACME, GLOBEX = SubaccountId(1), SubaccountId(2)
ALICE, CAROL = UserId(10), UserId(11)
SYNC_ACME = "u-aaaaaaaaaaaaaaaaaaaa@bcc.example.test"
SYNC_GLOBEX = "u-bbbbbbbbbbbbbbbbbbbb@bcc.example.test"


def addr(spec: str, name: str = "") -> Address:
    return Address(display_name=name, addr_spec=spec, address_key=address_key(spec))


def target(sync_address: str = SYNC_ACME, subaccount_id: SubaccountId = ACME) -> SyncTarget:
    return SyncTarget(
        sync_address=sync_address,
        user_id=ALICE,
        subaccount_id=subaccount_id,
        user_email="alice@example.com",
        sender_keys=frozenset({address_key("alice@example.com"), address_key("alice@alias.test")}),
    )


def contact(
    cid: int,
    spec: str,
    *,
    subaccount_id: SubaccountId = ACME,
    assigned: UserId | None = ALICE,
    age_days: int = 1,
) -> ContactFact:
    return ContactFact(
        contact_id=ContactId(cid),
        subaccount_id=subaccount_id,
        address_key=address_key(spec),
        assigned_user_id=assigned,
        updated_at=NOW - timedelta(days=age_days),
    )


def prepared(
    *,
    from_: tuple[Address, ...] = (addr("alice@example.com", "Alice"),),
    to: tuple[Address, ...] = (addr("bob@example.org", "Bob"),),
    cc: tuple[Address, ...] = (),
    bcc: tuple[Address, ...] = (),
    ancestors: tuple[str, ...] = (),
    forwarded: ForwardedOriginal | None = None,
    recipients: tuple[str, ...] = (SYNC_ACME,),
    subject: str = "t",
    provenance: Provenance | None = None,
) -> Prepared:
    raw_bytes = b"Subject: t\r\n\r\nbody\r\n"
    parsed = ParsedMessage(
        message_id=MessageId("m1@example.com"),
        raw_message_id="<m1@example.com>",
        in_reply_to=tuple(MessageId(a) for a in ancestors[-1:]),
        references=tuple(MessageId(a) for a in ancestors),
        raw_in_reply_to=None,
        raw_references=None,
        subject=subject,
        date_at=NOW,
        raw_date=None,
        participants=Participants(from_=from_, to=to, cc=cc, bcc=bcc),
        text_body="body",
        html_body=None,
        attachments=(),
        embedded=(),
        headers=(("Subject", "t"),),
        defects=(),
        size_bytes=len(raw_bytes),
    )
    envelope = SmtpEnvelope(
        envelope_sender="alice@example.com",
        envelope_recipients=recipients,
        peer="127.0.0.1",
        helo="client.example.com",
        received_at=NOW,
    )
    links = ThreadLinks(
        parent=MessageId(ancestors[-1]) if ancestors else None,
        ancestors=tuple(MessageId(a) for a in ancestors),
    )
    return Prepared(
        raw=RawMessage(
            raw=raw_bytes,
            provenance=provenance or envelope,
            sha256=hashlib.sha256(raw_bytes).hexdigest(),
        ),
        parsed=parsed,
        identity=Identity(key="mid:m1@example.com", message_id=parsed.message_id, header_digest=""),
        links=links,
        forwarded=forwarded,
        lookups=Lookups(
            address_keys=frozenset(),
            own_message_id=parsed.message_id,
            message_ids=frozenset(),
            identity_key="mid:m1@example.com",
            sync_addresses=frozenset(recipients),
        ),
    )


def facts(**kw: object) -> Facts:
    base = Facts(sync_targets=(target(),))
    return replace(base, **kw)  # type: ignore[arg-type]


def rules_logged(decision_log: tuple[object, ...]) -> list[str]:
    return [entry.rule for entry in decision_log]  # type: ignore[attr-defined]
