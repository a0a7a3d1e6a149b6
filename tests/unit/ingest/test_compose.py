"""ingest/compose.py: the bytes of a CRM send, re-read with our own parser."""

from __future__ import annotations

import base64
import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy
from email.message import EmailMessage

import pytest

from ingest.compose import (
    THREAD_INDEX_CHILD_BYTES,
    THREAD_INDEX_HEADER_BYTES,
    Draft,
    OutgoingAttachment,
    ParentRef,
    _marker,
    compose,
    references_for,
    sanitise_html,
    thread_index,
    thread_topic,
)
from ingest.parse import parse_message
from ingest.types import MessageId

NOW = datetime(2026, 11, 30, 10, 0, tzinfo=UTC)
MID = MessageId("crm.1.abc@mailgate.test")
PARENT = MessageId("parent@contact.test")


def draft(**overrides: object) -> Draft:
    fields: dict[str, object] = {
        "from_name": "Zoë Müller",
        "from_address": "zoe@acme.test",
        "to": ("Bob <bob@contact.test>",),
        "subject": "Quote for Müller & Co",
        "text": "Hello Bob",
        "message_id": MID,
        "date_at": NOW,
    }
    fields.update(overrides)
    return Draft(**fields)  # type: ignore[arg-type]


def reread(raw: bytes) -> EmailMessage:
    msg = message_from_bytes(raw, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def test_r1_headers_parse_back() -> None:
    raw = compose(draft(cc=("carol@contact.test",)))
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")
    parsed = parse_message(raw)
    assert parsed.message_id == MID
    assert parsed.subject == "Quote for Müller & Co"
    assert parsed.participants.from_[0].display_name == "Zoë Müller"
    assert parsed.participants.from_[0].addr_spec == "zoe@acme.test"
    assert [a.addr_spec for a in parsed.participants.to] == ["bob@contact.test"]
    assert [a.addr_spec for a in parsed.participants.cc] == ["carol@contact.test"]
    assert parsed.date_at == NOW
    assert parsed.text_body is not None and parsed.text_body.strip() == "Hello Bob"


def test_r11_reply_carries_in_reply_to_and_references() -> None:
    parent = ParentRef(message_id=PARENT, references=(MessageId("root@x.test"),))
    parsed = parse_message(compose(draft(parent=parent)))
    assert parsed.in_reply_to == (PARENT,)
    assert parsed.references == (MessageId("root@x.test"), PARENT)
    assert references_for(ParentRef(message_id=PARENT, references=(PARENT,))) == (PARENT,)


def test_html_is_sanitised_and_text_derived() -> None:
    html = '<p onclick="x()">Hi <b>Bob</b><script>alert(1)</script></p><a href="javascript:x">l</a>'
    msg = reread(compose(draft(text=None, html=html)))
    assert msg.get_content_type() == "multipart/alternative"
    plain = msg.get_body(("plain",))
    rich = msg.get_body(("html",))
    assert plain is not None and rich is not None
    html_out = rich.get_content()
    assert "script" not in html_out and "onclick" not in html_out and "javascript" not in html_out
    assert "Hi Bob" in plain.get_content()


def test_attachment_filename_rfc2231() -> None:
    name = "Angebot für Zoë – 2026.pdf"
    attachment = OutgoingAttachment(filename=name, content_type="application/pdf", payload=b"%PDF")
    raw = compose(draft(attachments=(attachment,)))
    assert b"filename*=utf-8''" in raw  # RFC 2231 §4 extended parameter
    parsed = parse_message(raw)
    assert [(a.filename, a.payload) for a in parsed.attachments] == [(name, b"%PDF")]


def test_outlook_thread_index_new_and_child() -> None:
    first = thread_index(draft())
    raw_first = base64.b64decode(first)
    assert len(raw_first) == THREAD_INDEX_HEADER_BYTES
    assert raw_first[0] == 0x01  # top byte of any FILETIME from 1972 to 2057
    later = draft(
        message_id=MessageId("reply@mailgate.test"),
        date_at=NOW + timedelta(hours=2),
        parent=ParentRef(message_id=PARENT, thread_index=first),
    )
    child = base64.b64decode(thread_index(later))
    assert len(child) == THREAD_INDEX_HEADER_BYTES + THREAD_INDEX_CHILD_BYTES
    assert child[:THREAD_INDEX_HEADER_BYTES] == raw_first
    delta_units = int.from_bytes(child[22:26], "big")
    assert delta_units == (2 * 3600 * 10_000_000) >> 18
    assert thread_topic("RE: Fwd: Re[2]: Quote") == "Quote"


def test_invalid_parent_thread_index_starts_a_new_one() -> None:
    bad = draft(parent=ParentRef(message_id=PARENT, thread_index="not base64!"))
    assert len(base64.b64decode(thread_index(bad))) == THREAD_INDEX_HEADER_BYTES


def test_compose_is_deterministic() -> None:
    assert compose(draft(html="<p>x</p>")) == compose(draft(html="<p>x</p>"))


@pytest.mark.parametrize(
    "overrides",
    [{"text": None, "html": None}, {"to": (), "cc": ()}, {"date_at": datetime(2026, 1, 1)}],
)
def test_compose_refuses_incomplete_drafts(overrides: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"\w"):
        compose(draft(**overrides))


def _email_package_bytes(d: Draft) -> bytes:
    """The message built wholly by ``EmailMessage`` (attachments held in it)."""
    streamed = compose(d)
    msg = reread(compose(replace(d, attachments=())))  # headers and bodies only
    reference = EmailMessage(policy=policy.SMTP)
    for name, value in msg.items():
        if name.lower() not in ("content-type", "content-transfer-encoding", "mime-version"):
            reference[name] = value
    reference.set_content(d.text or "")
    if d.html is not None:
        reference.set_content(_plain_of(msg))
        reference.add_alternative(sanitise_html(d.html), subtype="html")
    for a in d.attachments:
        maintype, _, subtype = a.content_type.partition("/")
        reference.add_attachment(
            a.payload,
            maintype=maintype or "application",
            subtype=subtype or "octet-stream",
            filename=a.filename,
        )
    for depth, part in enumerate(p for p in reference.walk() if p.is_multipart()):
        boundary = re.search(rb'boundary="(=_mailgate_[0-9a-f]+_)' + str(depth).encode(), streamed)
        assert boundary is not None
        part.set_boundary(boundary.group(1).decode() + str(depth))
    return reference.as_bytes(policy=policy.SMTP)


def _plain_of(msg: EmailMessage) -> str:
    body = msg.get_body(("plain",))
    assert isinstance(body, EmailMessage)
    return str(body.get_content())


@pytest.mark.parametrize("size", [0, 1, 56, 57, 58, 57_000, 57_001, 200_003])
def test_streamed_attachments_equal_the_email_package(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    attachments = (
        OutgoingAttachment(
            filename="Angebot für Zoë.pdf", content_type="application/pdf", payload=payload
        ),
        OutgoingAttachment(filename="empty.txt", content_type="text/plain", payload=b""),
        OutgoingAttachment(filename="noext", content_type="", payload=payload[::-1]),
    )
    for html in (None, "<p>Hi <script>x()</script></p>"):
        d = draft(attachments=attachments, html=html, text=None if html else "Hi\n.dot\n")
        assert compose(d) == _email_package_bytes(d)


def test_marker_inside_a_body_falls_back_to_the_email_package() -> None:
    attachment = OutgoingAttachment(
        filename="a.bin", content_type="application/pdf", payload=b"\x00" * 100
    )
    marker = base64.b64encode(_marker(MID, 0)).decode()
    d = draft(text=f"quoting\n{marker}\n", attachments=(attachment,))
    raw = compose(d)
    assert raw == _email_package_bytes(d)
    assert [a.payload for a in parse_message(raw).attachments] == [b"\x00" * 100]
