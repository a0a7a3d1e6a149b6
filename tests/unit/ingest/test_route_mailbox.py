"""Routing of mail fetched from a watched mailbox: R1-R10 and R13, per provider.

Values are built directly (no parser, no server) so each test pins one rule;
the IMAP watcher's integration tests drive the same decisions end to end.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from ingest.normalise import address_key
from ingest.pipeline import decide, prepare
from ingest.rules.threading import GMAIL_THREAD_HINT
from ingest.types import (
    ContactId,
    Direction,
    Facts,
    ImapOrigin,
    InstanceState,
    MailboxConnection,
    MailboxId,
    MessageId,
    MessagePk,
    Outcome,
    Provider,
    RouteSettings,
    Source,
    SubaccountId,
    ThreadFact,
    ThreadId,
    ThreadOrigin,
    Uid,
    UidValidity,
    UserFact,
)
from tests.unit.ingest.builders import ACME, ALICE, CAROL, GLOBEX, NOW, addr, contact, prepared

MAILBOX = "alice@example.com"


def conn(
    provider: Provider = Provider.GMAIL,
    subaccount_id: SubaccountId = ACME,
    *,
    contact_initiated: bool | None = None,
    mailbox_id: int = 1,
) -> MailboxConnection:
    if contact_initiated is None:
        contact_initiated = provider is Provider.GMAIL
    return MailboxConnection(
        mailbox_id=MailboxId(mailbox_id),
        subaccount_id=subaccount_id,
        user_id=ALICE,
        provider=provider,
        address_key=address_key(MAILBOX),
        connected_at=NOW - timedelta(days=1),
        contact_initiated=contact_initiated,
    )


def origin(role: str = "inbox", *, age: timedelta = timedelta(minutes=1)) -> ImapOrigin:
    return ImapOrigin(
        mailbox_id=MailboxId(1),
        folder="INBOX" if role == "inbox" else "[Gmail]/Sent Mail",
        folder_role=role,
        uidvalidity=UidValidity(7),
        uid=Uid(42),
        internal_date=NOW - age,
    )


def inbound(**kw: object):  # type: ignore[no-untyped-def]
    return prepared(
        from_=(addr("bob@example.org", "Bob"),),
        to=(addr(MAILBOX),),
        provenance=kw.pop("provenance", origin()),  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


def outbound(**kw: object):  # type: ignore[no-untyped-def]
    return prepared(
        from_=(addr(MAILBOX),),
        to=kw.pop("to", (addr("bob@example.org"),)),  # type: ignore[arg-type]
        provenance=kw.pop("provenance", origin("sent")),  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


def mfacts(*connections: MailboxConnection, **kw: object) -> Facts:
    return Facts(mailbox_connections=connections or (conn(),), **kw)  # type: ignore[arg-type]


def crm_thread(
    state: InstanceState = InstanceState.ACTIVE, subaccount_id: SubaccountId = ACME
) -> ThreadFact:
    return ThreadFact(
        message_id=MessageId("crm-1@mailgate"),
        thread_id=ThreadId(5),
        subaccount_id=subaccount_id,
        state=state,
        origin=ThreadOrigin.CRM,
    )


def linked(decision) -> list[tuple[int, int | None, str]]:  # type: ignore[no-untyped-def]
    return sorted((t.subaccount_id, t.contact_id, t.rule) for t in decision.conversations)


def skipped(decision) -> list[tuple[str, int | None]]:  # type: ignore[no-untyped-def]
    return [(e.rule, e.subaccount_id) for e in decision.log if e.outcome is Outcome.SKIPPED]


BOB = contact(1, "bob@example.org")


# --------------------------------------------------------------------- R1


def test_r1_contact_reply_to_crm_thread_syncs_for_every_provider() -> None:
    for provider in Provider:
        d = decide(
            inbound(ancestors=("crm-1@mailgate",)),
            mfacts(conn(provider), contacts=(BOB,), threads=(crm_thread(),)),
            NOW,
        )
        assert d.source is Source.MAILBOX and d.direction is Direction.INBOUND
        assert linked(d) == [(ACME, 1, "R1")], provider
        assert d.thread is not None and d.thread.thread_id == ThreadId(5)


def test_r1_user_reply_from_mail_client_syncs_as_outbound() -> None:
    d = decide(
        outbound(ancestors=("crm-1@mailgate",)),
        mfacts(conn(Provider.OUTLOOK), contacts=(BOB,), threads=(crm_thread(),)),
        NOW,
    )
    assert d.direction is Direction.OUTBOUND
    assert linked(d) == [(ACME, 1, "R1")]


def test_r1_crm_thread_reaches_unassigned_contact_too() -> None:
    unassigned = contact(1, "bob@example.org", assigned=None)
    d = decide(
        inbound(ancestors=("crm-1@mailgate",)),
        mfacts(conn(Provider.OUTLOOK), contacts=(unassigned,), threads=(crm_thread(),)),
        NOW,
    )
    assert linked(d) == [(ACME, 1, "R1")]


# --------------------------------------------------------------------- R2, R3


def test_r2_gmail_assigned_contact_starts_thread() -> None:
    d = decide(inbound(), mfacts(contacts=(BOB,)), NOW)
    assert linked(d) == [(ACME, 1, "R2")]
    assert d.thread is not None and d.thread.thread_id is None
    assert d.thread.origin is ThreadOrigin.MAILBOX


def test_r2_gmail_unassigned_contact_or_stranger_not_synced() -> None:
    for contacts in ((contact(1, "bob@example.org", assigned=CAROL),), ()):
        d = decide(inbound(), mfacts(contacts=contacts), NOW)
        assert not d.stores
        assert skipped(d) == [("R2", ACME)]


def test_r2_no_contact_is_created_from_mailbox_traffic() -> None:
    d = decide(inbound(), mfacts(settings=RouteSettings(create_contacts=True)), NOW)
    assert all(t.new_contact is None for t in d.conversations)
    assert not d.stores


def test_r3_outlook_mailbox_started_thread_never_syncs() -> None:
    for message in (inbound(), outbound()):
        d = decide(message, mfacts(conn(Provider.OUTLOOK), contacts=(BOB,)), NOW)
        assert not d.stores
        assert skipped(d) == [("R3", ACME)]


def test_r3_generic_imap_follows_outlook_unless_contact_initiated() -> None:
    d = decide(inbound(), mfacts(conn(Provider.IMAP), contacts=(BOB,)), NOW)
    assert skipped(d) == [("R3", ACME)]
    opted_in = decide(
        inbound(), mfacts(conn(Provider.IMAP, contact_initiated=True), contacts=(BOB,)), NOW
    )
    assert linked(opted_in) == [(ACME, 1, "R2")]


# --------------------------------------------------------------------- R4


def test_r4_same_gmail_in_two_subaccounts_syncs_to_each() -> None:
    both = (conn(), conn(subaccount_id=GLOBEX, mailbox_id=2))
    bob_globex = contact(2, "bob@example.org", subaccount_id=GLOBEX)
    d = decide(inbound(), mfacts(*both, contacts=(BOB, bob_globex)), NOW)
    assert linked(d) == [(ACME, 1, "R2"), (GLOBEX, 2, "R2")]


def test_r4_broken_instance_receives_nothing_more_active_one_does() -> None:
    both = (conn(), conn(subaccount_id=GLOBEX, mailbox_id=2))
    bob_globex = contact(2, "bob@example.org", subaccount_id=GLOBEX)
    threads = (crm_thread(), crm_thread(InstanceState.BROKEN, GLOBEX))
    d = decide(
        inbound(ancestors=("crm-1@mailgate",)),
        mfacts(*both, contacts=(BOB, bob_globex), threads=threads),
        NOW,
    )
    assert linked(d) == [(ACME, 1, "R1")]
    assert ("R4", GLOBEX) in skipped(d)


# --------------------------------------------------------------------- R5, R6, R7


def test_r5_gmail_sent_to_assigned_contact_starts_outbound_thread() -> None:
    d = decide(outbound(), mfacts(contacts=(BOB,)), NOW)
    assert d.direction is Direction.OUTBOUND
    assert linked(d) == [(ACME, 1, "R5")]


def test_r5_sent_to_non_contact_is_skipped() -> None:
    d = decide(outbound(to=(addr("stranger@example.net"),)), mfacts(contacts=(BOB,)), NOW)
    assert not d.stores and skipped(d) == [("R5", ACME)]


def test_r6_mail_older_than_the_connection_is_not_imported() -> None:
    old = inbound(provenance=origin(age=timedelta(days=3)))
    d = decide(old, mfacts(contacts=(BOB,)), NOW)
    assert not d.stores and skipped(d) == [("R6", ACME)]
    backfilled = decide(old, mfacts(contacts=(BOB,), settings=RouteSettings(backfill_days=7)), NOW)
    assert linked(backfilled) == [(ACME, 1, "R2")]


def test_r7_mail_from_another_user_is_not_contact_mail() -> None:
    carol = UserFact(
        user_id=CAROL,
        address_key=address_key("carol@example.com"),
        subaccount_ids=frozenset({ACME}),
    )
    message = prepared(from_=(addr("carol@example.com"),), to=(addr(MAILBOX),), provenance=origin())
    d = decide(message, mfacts(users=(carol,), contacts=(contact(3, "carol@example.com"),)), NOW)
    assert not d.stores and skipped(d) == [("R7", ACME)]


# --------------------------------------------------------------------- R8-R10


def test_r8_contact_only_in_cc_of_users_mail_is_a_recipient() -> None:
    d = decide(
        outbound(to=(addr("x@example.net"),), cc=(addr("bob@example.org"),)),
        mfacts(contacts=(BOB,)),
        NOW,
    )
    assert linked(d) == [(ACME, 1, "R5")]


def test_r8_contact_writing_to_someone_else_with_user_in_cc_follows_r2() -> None:
    message = prepared(
        from_=(addr("bob@example.org"),),
        to=(addr("someone@example.net"),),
        cc=(addr(MAILBOX),),
        provenance=origin(),
    )
    d = decide(message, mfacts(contacts=(BOB,)), NOW)
    assert linked(d) == [(ACME, 1, "R2")]


def test_r9_several_assigned_contacts_each_get_the_message_once() -> None:
    dan = contact(2, "dan@example.net")
    message = prepared(
        from_=(addr("bob@example.org"),),
        to=(addr(MAILBOX), addr("dan@example.net")),
        cc=(addr("BOB@example.org"),),
        provenance=origin(),
    )
    d = decide(message, mfacts(contacts=(BOB, dan)), NOW)
    assert linked(d) == [(ACME, 1, "R2"), (ACME, 2, "R2")]


def test_r10_duplicate_contacts_pick_assigned_most_recent() -> None:
    dupes = (
        contact(1, "bob@example.org", assigned=CAROL, age_days=0),
        contact(2, "bob@example.org", age_days=5),
        contact(3, "bob@example.org", age_days=2),
    )
    d = decide(inbound(), mfacts(contacts=dupes), NOW)
    assert [t.contact_id for t in d.conversations] == [ContactId(3)]
    assert any(e.rule == "R10" for e in d.log)


# --------------------------------------------------------------------- R12, R13


def test_r12_already_stored_copy_is_a_duplicate() -> None:
    d = decide(inbound(), mfacts(contacts=(BOB,), duplicate_of=MessagePk(9)), NOW)
    assert d.duplicate_of == MessagePk(9) and not d.stores


def test_r13_forward_from_the_mailbox_is_a_new_outbound_thread() -> None:
    fwd = outbound(ancestors=("crm-1@mailgate",), subject="Fwd: quote")
    d = decide(fwd, mfacts(contacts=(BOB,), threads=(crm_thread(),)), NOW)
    assert d.direction is Direction.OUTBOUND
    assert d.thread is not None and d.thread.thread_id is None
    assert linked(d) == [(ACME, 1, "R5")]


def test_not_connected_mailbox_syncs_nothing() -> None:
    d = decide(inbound(), Facts(contacts=(BOB,)), NOW)
    assert not d.stores and [e.rule for e in d.log] == ["R21"]


# --------------------------------------------------------------------- R11 (X-GM-THRID)


def gmail_hint(thread_id: int = 9) -> ThreadFact:
    """A thread storage found by X-GM-THRID (no Message-ID; see GMAIL_THREAD_HINT)."""
    return ThreadFact(
        message_id=GMAIL_THREAD_HINT,
        thread_id=ThreadId(thread_id),
        subaccount_id=ACME,
        state=InstanceState.ACTIVE,
        origin=ThreadOrigin.CRM,
    )


def test_r11_gmail_thread_id_joins_crm_thread_without_header_ancestor() -> None:
    d = decide(inbound(), mfacts(contacts=(BOB,), threads=(gmail_hint(),)), NOW)
    assert d.thread is not None and d.thread.thread_id == ThreadId(9)
    assert "X-GM-THRID" in d.thread.reason
    assert linked(d) == [(ACME, 1, "R1")]


def test_r11_header_ancestor_wins_over_gmail_thread_id() -> None:
    d = decide(
        inbound(ancestors=("crm-1@mailgate",)),
        mfacts(contacts=(BOB,), threads=(crm_thread(), gmail_hint())),
        NOW,
    )
    assert d.thread is not None and d.thread.thread_id == ThreadId(5)
    assert d.thread.merge_thread_ids == ()


def test_r11_gmail_thread_id_carried_into_lookups() -> None:
    thrid = 1_700_000_000_000_000_001
    raw = inbound(provenance=replace(origin(), x_gm_thrid=thrid)).raw
    assert prepare(raw).lookups.x_gm_thrid == thrid
