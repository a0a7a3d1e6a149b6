"""The conversation copy of a CRM send is prepared without a full re-parse (R1, R12).

Pure: ``gateway.outbound_routes.prepare_sent`` against ``ingest.prepare`` on
composed messages; no servers.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import pytest

from gateway.outbound_routes import prepare_sent
from ingest.compose import Draft, OutgoingAttachment, compose
from ingest.pipeline import prepare
from ingest.types import MessageId, RawMessage, SmtpEnvelope

NOW = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)
ATTACHMENTS = (
    OutgoingAttachment(
        filename="Angébot 2026.pdf", content_type="application/pdf", payload=bytes(range(256)) * 999
    ),
    OutgoingAttachment(filename="notes.txt", content_type="text/plain", payload=b".a\r\n.b\n"),
    OutgoingAttachment(filename="empty.bin", content_type="application/octet-stream", payload=b""),
)


def raw_message(**kw: object) -> RawMessage:
    fields: dict[str, object] = {
        "from_name": "CRM User",
        "from_address": "crm.user@acme.test",
        "to": ("bob@example.com",),
        "cc": ("carol@example.com",),
        "subject": "Your quote ü",
        "text": "Hello\n.line with a dot\n",
        "html": "<p>Hello</p>",
        "attachments": ATTACHMENTS,
        "message_id": MessageId("0123abcd@acme.test"),
        "date_at": NOW,
        "parent": None,
    }
    fields.update(kw)
    content = compose(Draft(**fields))  # type: ignore[arg-type]
    envelope = SmtpEnvelope(
        envelope_sender="",
        envelope_recipients=("bob@example.com", "carol@example.com"),
        peer="crm",
        helo="",
        received_at=NOW,
    )
    sha = hashlib.sha256(content).hexdigest()
    return RawMessage(raw=content, provenance=envelope, sha256=sha)


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"html": None},
        {"attachments": ()},
        {"attachments": ATTACHMENTS[:1], "html": None},
    ],
)
def test_r12_prepare_sent_equals_full_prepare(variant: dict[str, object]) -> None:
    raw = raw_message(**variant)
    assert prepare_sent(raw) == prepare(raw)


def test_r1_prepare_sent_keeps_complete_raw_and_attachment_digests() -> None:
    raw = raw_message()
    prepared = prepare_sent(raw)
    assert prepared.raw is raw
    assert [a.sha256 for a in prepared.parsed.attachments] == [
        hashlib.sha256(a.payload).hexdigest() for a in ATTACHMENTS
    ]
    assert prepared.parsed.size_bytes == len(raw.raw)


def test_r1_prepare_sent_parses_only_a_skeleton(monkeypatch: pytest.MonkeyPatch) -> None:
    """The full parse is what cost ~193 MB for a 25 MB send: only headers and bodies are parsed."""
    raw = raw_message()
    seen: list[int] = []

    def spy(message: RawMessage) -> object:
        seen.append(len(message.raw))
        return prepare(message)

    monkeypatch.setattr("gateway.outbound_routes.prepare", spy)
    prepare_sent(raw)
    assert seen and seen[0] < len(raw.raw) - sum(len(a.payload) for a in ATTACHMENTS)
