"""Routing of mail sent to sync addresses: R4, R7, R8, R9, R10, R11, R13, R14, R15.

Values are built directly (no parser involved) so each test pins one rule.
"""

from __future__ import annotations

from ingest.normalise import address_key
from ingest.pipeline import decide
from ingest.rules.sender import RULE as R15
from ingest.types import (
    AuthResult,
    ContactId,
    Direction,
    ForwardedOriginal,
    InstanceState,
    MessageId,
    MessagePk,
    Outcome,
    RouteSettings,
    ThreadFact,
    ThreadId,
    UserFact,
    WaitingChild,
)
from tests.unit.ingest.builders import (
    ACME,
    ALICE,
    CAROL,
    GLOBEX,
    NOW,
    SYNC_ACME,
    SYNC_GLOBEX,
    addr,
    contact,
    facts,
    prepared,
    rules_logged,
    target,
)

# --------------------------------------------------------------------- R15


def test_r15_foreign_sender_refused() -> None:
    d = decide(prepared(from_=(addr("mallory@evil.test"),)), facts(), NOW)
    assert d.refusal is not None and d.refusal.rule == R15
    assert not d.stores and d.conversations == ()
    assert [e.outcome for e in d.log] == [Outcome.REFUSED]


def test_r15_alias_and_case_insensitive_sender_accepted() -> None:
    for sender in ("ALICE@Example.COM", "alice@alias.test"):
        d = decide(
            prepared(from_=(addr(sender),)), facts(contacts=(contact(1, "bob@example.org"),)), NOW
        )
        assert d.refusal is None, sender
        assert d.stores


def test_r15_two_from_addresses_refused() -> None:
    both = (addr("alice@example.com"), addr("mallory@evil.test"))
    d = decide(prepared(from_=both), facts(), NOW)
    assert d.refusal is not None and d.refusal.rule == R15


def test_r15_require_dmarc_needs_aligned_auth() -> None:
    strict = RouteSettings(require_dmarc=True)
    known = (contact(1, "bob@example.org"),)
    refused = decide(prepared(), facts(settings=strict, contacts=known), NOW)
    assert refused.refusal is not None and refused.refusal.rule == R15
    failed = AuthResult(dkim_aligned=False, spf_aligned=False, detail="dkim=fail spf=none")
    assert decide(prepared(), facts(settings=strict, auth=failed, contacts=known), NOW).refusal
    passed = AuthResult(dkim_aligned=True, spf_aligned=False, detail="dkim=pass")
    ok = decide(prepared(), facts(settings=strict, auth=passed, contacts=known), NOW)
    assert ok.refusal is None and ok.stores


# --------------------------------------------------------------------- R14


def test_r14_known_contact_gets_outbound_message_with_sync_address_in_bcc() -> None:
    d = decide(prepared(), facts(contacts=(contact(1, "bob@example.org"),)), NOW)
    assert d.direction is Direction.OUTBOUND
    assert [t.contact_id for t in d.conversations] == [ContactId(1)]
    assert [a.addr_spec for a in d.extra_bcc] == [SYNC_ACME]


def test_r14_unknown_recipient_becomes_contact_assigned_to_user() -> None:
    d = decide(prepared(), facts(), NOW)
    (t,) = d.conversations
    assert t.contact_id is None and t.new_contact is not None
    assert t.new_contact.assigned_user_id == ALICE
    assert t.new_contact.address.addr_spec == "bob@example.org"
    assert t.rule == "R14"


def test_r14_create_contacts_off_skips_and_logs() -> None:
    d = decide(prepared(), facts(settings=RouteSettings(create_contacts=False)), NOW)
    assert not d.stores and d.refusal is None
    assert [(e.rule, e.outcome) for e in d.log] == [("R14", Outcome.SKIPPED)]


def test_r14_sync_address_alone_without_forward_is_logged_not_stored() -> None:
    d = decide(prepared(to=(addr(SYNC_ACME),)), facts(), NOW)
    assert not d.stores
    assert d.log[0].outcome is Outcome.SKIPPED


# ------------------------------------------------------------------ R7-R10


def test_r7_user_recipient_is_not_a_contact() -> None:
    users = (
        UserFact(
            user_id=CAROL,
            address_key=address_key("carol@example.com"),
            subaccount_ids=frozenset({ACME}),
        ),
    )
    d = decide(prepared(to=(addr("carol@example.com"),)), facts(users=users), NOW)
    assert not d.stores
    assert ("R7", Outcome.SKIPPED) in [(e.rule, e.outcome) for e in d.log]


def test_r8_cc_and_bcc_recipients_are_treated_like_to() -> None:
    d = decide(
        prepared(to=(), cc=(addr("bob@example.org"),), bcc=(addr("dan@example.net"),)),
        facts(contacts=(contact(1, "bob@example.org"), contact(2, "dan@example.net"))),
        NOW,
    )
    assert sorted(t.contact_id for t in d.conversations if t.contact_id) == [1, 2]


def test_r9_several_contacts_one_decision_and_no_repeats() -> None:
    to = (addr("bob@example.org"), addr("BOB@example.org"), addr("dan@example.net"))
    d = decide(
        prepared(to=to),
        facts(contacts=(contact(1, "bob@example.org"), contact(2, "dan@example.net"))),
        NOW,
    )
    assert sorted(t.contact_id for t in d.conversations if t.contact_id) == [1, 2]


def test_r10_duplicate_contacts_prefers_assigned_then_most_recent() -> None:
    dupes = (
        contact(1, "bob@example.org", assigned=None, age_days=0),
        contact(2, "bob@example.org", assigned=ALICE, age_days=9),
        contact(3, "bob@example.org", assigned=ALICE, age_days=3),
    )
    d = decide(prepared(), facts(contacts=dupes), NOW)
    assert [t.contact_id for t in d.conversations] == [ContactId(3)]
    assert "R10" in rules_logged(d.log)


def test_r10_none_assigned_takes_most_recently_updated() -> None:
    dupes = (
        contact(4, "bob@example.org", assigned=None, age_days=5),
        contact(5, "bob@example.org", assigned=CAROL, age_days=1),
    )
    d = decide(prepared(), facts(contacts=dupes), NOW)
    assert [t.contact_id for t in d.conversations] == [ContactId(5)]


def test_r10_contact_of_other_subaccount_is_not_used() -> None:
    other = (contact(7, "bob@example.org", subaccount_id=GLOBEX),)
    d = decide(prepared(), facts(contacts=other), NOW)
    (t,) = d.conversations
    assert t.subaccount_id == ACME and t.new_contact is not None


# --------------------------------------------------------------------- R13


def test_r13_forward_to_sync_address_goes_to_original_sender_inbound() -> None:
    original = ForwardedOriginal(
        from_=addr("bob@example.org", "Bob"),
        to=(addr("alice@example.com"),),
        cc=(),
        subject="Quote",
        date_text="Mon, 1 Jun 2026 10:00:00 +0000",
        message_id=None,
        style="gmail",
    )
    d = decide(
        prepared(to=(addr(SYNC_ACME),), forwarded=original),
        facts(contacts=(contact(1, "bob@example.org"),)),
        NOW,
    )
    assert d.direction is Direction.INBOUND
    assert [(t.contact_id, t.rule) for t in d.conversations] == [(ContactId(1), "R13")]
    assert d.extra_bcc == ()


# ------------------------------------------------------------------ R11, R4


def test_r11_reply_joins_thread_of_stored_parent() -> None:
    threads = (
        ThreadFact(
            message_id=MessageId("p@x"),
            thread_id=ThreadId(5),
            subaccount_id=ACME,
            state=InstanceState.ACTIVE,
        ),
    )
    d = decide(
        prepared(ancestors=("root@x", "p@x")),
        facts(threads=threads, contacts=(contact(1, "bob@example.org"),)),
        NOW,
    )
    assert d.thread is not None and d.thread.thread_id == ThreadId(5)
    assert d.thread.merge_thread_ids == ()


def test_r11_parent_arriving_after_reply_joins_and_merges() -> None:
    threads = (
        ThreadFact(
            message_id=MessageId("root@x"),
            thread_id=ThreadId(5),
            subaccount_id=ACME,
            state=InstanceState.ACTIVE,
        ),
    )
    waiting = (WaitingChild(message_pk=MessagePk(9), thread_id=ThreadId(8), subaccount_id=ACME),)
    d = decide(
        prepared(ancestors=("root@x",)),
        facts(threads=threads, waiting_children=waiting, contacts=(contact(1, "bob@example.org"),)),
        NOW,
    )
    assert d.thread is not None
    assert d.thread.thread_id == ThreadId(5) and d.thread.merge_thread_ids == (ThreadId(8),)


def test_r11_orphan_parent_joins_waiting_child_thread() -> None:
    waiting = (WaitingChild(message_pk=MessagePk(9), thread_id=ThreadId(8), subaccount_id=ACME),)
    d = decide(
        prepared(), facts(waiting_children=waiting, contacts=(contact(1, "bob@example.org"),)), NOW
    )
    assert d.thread is not None and d.thread.thread_id == ThreadId(8)


def test_r11_no_reference_starts_new_thread() -> None:
    d = decide(prepared(), facts(contacts=(contact(1, "bob@example.org"),)), NOW)
    assert d.thread is not None and d.thread.thread_id is None


def test_r4_broken_instance_receives_nothing_more() -> None:
    threads = (
        ThreadFact(
            message_id=MessageId("p@x"),
            thread_id=ThreadId(5),
            subaccount_id=ACME,
            state=InstanceState.BROKEN,
        ),
    )
    d = decide(
        prepared(ancestors=("p@x",)),
        facts(threads=threads, contacts=(contact(1, "bob@example.org"),)),
        NOW,
    )
    assert not d.stores
    assert ("R4", Outcome.SKIPPED) in [(e.rule, e.outcome) for e in d.log]


# --------------------------------------------------------------------- R12


def test_r12_already_stored_message_is_a_duplicate() -> None:
    d = decide(
        prepared(), facts(duplicate_of=MessagePk(3), contacts=(contact(1, "bob@example.org"),)), NOW
    )
    assert d.duplicate_of == MessagePk(3) and not d.stores
    assert [(e.rule, e.outcome) for e in d.log] == [("R12", Outcome.DUPLICATE)]


def test_r12_duplicate_from_foreign_sender_is_still_refused() -> None:
    d = decide(prepared(from_=(addr("mallory@evil.test"),)), facts(duplicate_of=MessagePk(3)), NOW)
    assert d.refusal is not None and d.duplicate_of is None


def test_two_sync_addresses_in_two_subaccounts_link_both() -> None:
    targets = (target(), target(SYNC_GLOBEX, GLOBEX))
    d = decide(
        prepared(recipients=(SYNC_ACME, SYNC_GLOBEX)),
        facts(
            sync_targets=targets,
            contacts=(
                contact(1, "bob@example.org"),
                contact(2, "bob@example.org", subaccount_id=GLOBEX),
            ),
        ),
        NOW,
    )
    assert sorted((t.subaccount_id, t.contact_id) for t in d.conversations) == [(1, 1), (2, 2)]
    assert sorted(a.addr_spec for a in d.extra_bcc) == [SYNC_ACME, SYNC_GLOBEX]
