"""Pure helpers of storage: sync tokens (R14), sync-address parsing, provenance JSON."""

from __future__ import annotations

from datetime import UTC, datetime

from ingest.normalise import address_key
from ingest.types import (
    Address,
    ImapOrigin,
    MailboxId,
    Participant,
    ParticipantRole,
    SmtpEnvelope,
    Source,
    Uid,
    UidValidity,
)
from storage.repos.directory import SYNC_TOKEN_ALPHABET, SYNC_TOKEN_LENGTH, new_sync_token
from storage.repos.facts import sync_token_of
from storage.repos.messages import participant_rows
from storage.repos.quarantine import provenance_json, source_of

AT = datetime(2026, 3, 1, tzinfo=UTC)


def _addr(spec: str) -> Address:
    return Address(display_name="", addr_spec=spec, address_key=address_key(spec))


def test_r14_sync_token_has_100_bits_of_lowercase_base32() -> None:
    tokens = {new_sync_token() for _ in range(200)}
    assert len(tokens) == 200
    assert len(SYNC_TOKEN_ALPHABET) ** SYNC_TOKEN_LENGTH == 2**100
    assert all(len(t) == SYNC_TOKEN_LENGTH and set(t) <= set(SYNC_TOKEN_ALPHABET) for t in tokens)


def test_sync_token_of_matches_local_part_case_insensitively() -> None:
    assert sync_token_of("U-ABC234@Bcc.Example.test") == "abc234"
    assert sync_token_of("u-abc@bcc.example.test", "BCC.example.test") == "abc"
    assert sync_token_of("u-abc@other.example", "bcc.example.test") is None
    assert sync_token_of("user@bcc.example.test") is None
    assert sync_token_of("u-abc") is None


def test_r14_extra_bcc_added_once_with_positions_per_role() -> None:
    sync = _addr("u-abc@bcc.example.test")
    participants = (
        Participant(role=ParticipantRole.FROM, address=_addr("ann@example.org")),
        Participant(role=ParticipantRole.TO, address=_addr("b@example.com")),
        Participant(role=ParticipantRole.TO, address=_addr("c@example.com")),
        Participant(role=ParticipantRole.BCC, address=sync),
    )
    rows = participant_rows(1, participants, (sync, _addr("d@example.com")))  # type: ignore[arg-type]
    assert [(r["role"], r["position"], r["addr_spec"]) for r in rows] == [
        (ParticipantRole.FROM, 0, "ann@example.org"),
        (ParticipantRole.TO, 0, "b@example.com"),
        (ParticipantRole.TO, 1, "c@example.com"),
        (ParticipantRole.BCC, 0, sync.addr_spec),
        (ParticipantRole.BCC, 1, "d@example.com"),
    ]


def test_provenance_json_is_plain_json_with_kind() -> None:
    smtp = SmtpEnvelope(
        envelope_sender="",
        envelope_recipients=("u-x@b.test",),
        peer="127.0.0.1",
        helo="h",
        received_at=AT,
    )
    imap = ImapOrigin(
        mailbox_id=MailboxId(3),
        folder="INBOX",
        folder_role="inbox",
        uidvalidity=UidValidity(9),
        uid=Uid(4),
    )
    assert provenance_json(smtp) == {
        "kind": "smtp",
        "envelope_sender": "",
        "envelope_recipients": ["u-x@b.test"],
        "peer": "127.0.0.1",
        "helo": "h",
        "received_at": AT.isoformat(),
    }
    assert provenance_json(imap)["kind"] == "imap" and provenance_json(imap)["uid"] == 4
    assert (source_of(smtp), source_of(imap)) == (Source.BCC, Source.MAILBOX)
