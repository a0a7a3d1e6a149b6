"""parse_message: never raises, keeps what matters, records what is wrong.

The corpus test runs once per message (ids: path relative to the corpus,
``#index`` inside an mbox); the others build small messages to pin down one
behaviour each.
"""

from __future__ import annotations

import base64
import hashlib
import random

import pytest

import ingest.parse as parse_module
from ingest.charsets import UNDECLARED_8BIT, UNDECODABLE_CHARSET, decode_header_value
from ingest.normalise import BAD_ADDRESS
from ingest.parse import DUPLICATE_HEADER, PARSE_FAILED, UNPARSEABLE, parse_message
from ingest.types import ParsedMessage

RFC822 = "message/rfc822"
TNEF = "application/ms-tnef"


def _kinds(parsed: ParsedMessage) -> set[str]:
    return {d.kind for d in parsed.defects}


def _mime(*parts: bytes, boundary: bytes = b"BOUND", ctype: bytes = b"multipart/mixed") -> bytes:
    head = (
        b"From: Ann <ann@example.org>\r\nTo: bob@example.com\r\nSubject: t\r\n"
        b"Message-ID: <m1@example.org>\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: " + ctype + b'; boundary="' + boundary + b'"\r\n\r\n'
    )
    body = b"".join(b"--" + boundary + b"\r\n" + p + b"\r\n" for p in parts)
    return head + body + b"--" + boundary + b"--\r\n"


# ------------------------------------------------------------------ corpus


def test_corpus_message_parses_without_exception(corpus_message: tuple[str, bytes]) -> None:
    """Every corpus message yields a ParsedMessage; no internal failure."""
    _name, raw = corpus_message
    parsed = parse_message(raw)
    assert isinstance(parsed, ParsedMessage)
    assert parsed.size_bytes == len(raw)
    assert not _kinds(parsed) & {PARSE_FAILED, UNPARSEABLE}
    assert parsed.message_id not in parsed.references + parsed.in_reply_to
    for attachment in parsed.attachments:
        assert attachment.sha256 == hashlib.sha256(attachment.payload).hexdigest()
        assert attachment.size_bytes == len(attachment.payload)


# --------------------------------------------------------- never raises


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x00\xff\xfe garbage",
        b"\r\n\r\n\r\n",
        b"From: \r\n\r\n",
        b"Content-Type: multipart/mixed; boundary=\r\n\r\n--\r\n--\r\n",
        b'Content-Type: text/plain; charset="utf-8\x00"\r\n\r\n\xff\xfe',
        b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!!",
    ],
)
def test_hostile_inputs_never_raise(raw: bytes) -> None:
    assert isinstance(parse_message(raw), ParsedMessage)


def test_random_bytes_never_raise() -> None:
    rng = random.Random(20260517)  # fixed seed: reproducible
    for _ in range(200):
        raw = rng.randbytes(rng.randrange(0, 400))
        assert isinstance(parse_message(raw), ParsedMessage)


def test_deep_nesting_never_raises() -> None:
    raw = b"Subject: deep\r\n"
    for level in range(300):
        raw += b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (level, level)
    raw += b"Content-Type: text/plain\r\n\r\nbottom\r\n"
    parsed = parse_message(raw)
    assert parsed.subject == "deep"


def test_huge_header_parses() -> None:
    to = ", ".join(f"user{i} <user{i}@example.org>" for i in range(5000))
    parsed = parse_message(f"To: {to}\r\nSubject: many\r\n\r\nbody".encode())
    assert len(parsed.participants.to) == 5000


def test_empty_input_is_unparseable() -> None:
    assert UNPARSEABLE in _kinds(parse_message(b""))


def test_internal_failure_falls_back_to_headers(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(_msg: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(parse_module, "walk_message", broken)
    parsed = parse_message(b"From: a@example.org\r\nMessage-ID: <x@y>\r\n\r\nbody")
    assert PARSE_FAILED in _kinds(parsed)
    assert UNPARSEABLE not in _kinds(parsed)
    assert parsed.message_id == "x@y"
    assert [a.addr_spec for a in parsed.participants.from_] == ["a@example.org"]


def test_total_failure_is_unparseable(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(parse_module, "_build", broken)
    parsed = parse_message(b"From: a@example.org\r\n\r\nbody")
    assert {PARSE_FAILED, UNPARSEABLE} <= _kinds(parsed)


# ----------------------------------------------------------------- headers


def test_headers_decoded_once_in_order_and_ids_normalised() -> None:
    raw = (
        b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
        b"Message-ID:\r\n <Abc@Host>\r\n"
        b"In-Reply-To: <p@h>\r\n"
        b"References: <r@h>\r\n <p@h> <Abc@Host>\r\n"
        b"Date: Tue, 1 Jul 2003 10:52:37 +0200\r\n\r\nx"
    )
    parsed = parse_message(raw)
    assert parsed.subject == "Grüße"
    assert [name for name, _ in parsed.headers] == [
        "Subject",
        "Message-ID",
        "In-Reply-To",
        "References",
        "Date",
    ]
    assert parsed.message_id == "Abc@Host"
    assert parsed.raw_message_id == "<Abc@Host>"
    assert parsed.references == ("r@h", "p@h")
    assert parsed.in_reply_to == ("p@h",)
    assert parsed.date_at is not None and parsed.date_at.hour == 8


def test_headers_kept_as_read_and_every_header_defect_recorded() -> None:
    raw = (
        b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\nX-Note: a\r\n b\r\n"
        b"X-Latin: caf\xe9\r\nX-Word: =?x-unknown-cs?q?a?=\r\n\r\nx"
    )
    parsed = parse_message(raw)
    assert parsed.header("x-note") == "a\r\n b"
    assert decode_header_value(parsed.header("Subject") or "")[0] == "Grüße"
    assert decode_header_value(parsed.header("X-Latin") or "")[0] == "café"
    assert _kinds(parsed) >= {UNDECLARED_8BIT, UNDECODABLE_CHARSET}


def test_r11_several_references_headers_are_joined() -> None:
    raw = b"Message-ID: <m@h>\r\nReferences: <a@h>\r\nReferences: <b@h> <a@h>\r\n\r\nx"
    parsed = parse_message(raw)
    assert parsed.references == ("a@h", "b@h")
    assert DUPLICATE_HEADER in _kinds(parsed)


def test_raw_utf8_headers_rfc6532() -> None:
    raw = "From: Jörg <jörg@bücher.example>\r\nSubject: Grüße\r\n\r\nx".encode()
    parsed = parse_message(raw)
    assert parsed.subject == "Grüße"
    assert parsed.participants.from_[0].address_key == "jörg@bücher.example"


def test_r15_crafted_from_header_is_not_one_wrong_address() -> None:
    parsed = parse_message(b"From: a@example.org<<b@example.com>\r\n\r\nx")
    assert len(parsed.participants.from_) != 1
    assert BAD_ADDRESS in _kinds(parsed)


def test_address_headers_parsed_before_encoded_word_decoding() -> None:
    # An encoded "<" and "," must not change how the list splits (RFC 2047 §5).
    raw = b"To: =?utf-8?q?x=3C=2Cy?= <a@b.org>\r\n\r\nx"
    parsed = parse_message(raw)
    assert [(a.display_name, a.addr_spec) for a in parsed.participants.to] == [("x<,y", "a@b.org")]


# ------------------------------------------------------------------- bodies


def test_alternative_gives_text_and_html_bodies_not_attachments() -> None:
    raw = _mime(
        b"Content-Type: text/plain; charset=utf-8\r\n\r\nhello",
        b"Content-Type: text/html; charset=utf-8\r\n\r\n<p>hello</p>",
        ctype=b"multipart/alternative",
    )
    parsed = parse_message(raw)
    assert parsed.text_body == "hello"
    assert parsed.html_body == "<p>hello</p>"
    assert parsed.attachments == ()


def test_text_attachment_is_not_the_body() -> None:
    raw = _mime(
        b"Content-Type: text/plain\r\nContent-Disposition: attachment; filename=a.txt\r\n\r\nfile",
        b"Content-Type: text/plain\r\n\r\nreal body",
    )
    parsed = parse_message(raw)
    assert parsed.text_body == "real body"
    assert [(a.filename, a.disposition, a.payload) for a in parsed.attachments] == [
        ("a.txt", "attachment", b"file")
    ]


def test_undeclared_8bit_body_decoded_with_defect() -> None:
    parsed = parse_message("Subject: x\r\n\r\nGrüße".encode())
    assert parsed.text_body == "Grüße"
    assert UNDECLARED_8BIT in _kinds(parsed)


def test_wrong_declared_charset_falls_back_with_defect() -> None:
    raw = b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + "Grüße aus Köln".encode("cp1252")
    parsed = parse_message(raw)
    assert parsed.text_body is not None and parsed.text_body.startswith("Gr")
    assert UNDECODABLE_CHARSET in _kinds(parsed)


def test_base64_cte_with_trailing_space_is_decoded() -> None:
    raw = b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64 \r\n\r\naGVsbG8=\r\n"
    assert parse_message(raw).text_body == "hello"


def test_folded_quoted_boundary_is_unfolded() -> None:
    raw = (
        b'Content-Type: multipart/mixed; boundary="simple\r\n boundary"\r\n\r\n'
        b"--simple boundary\r\n\r\nfirst\r\n--simple boundary\r\n"
        b"Content-Type: image/gif\r\n\r\nGIF\r\n--simple boundary--\r\n"
    )
    parsed = parse_message(raw)
    assert parsed.text_body == "first"
    assert [a.content_type for a in parsed.attachments] == ["image/gif"]


# -------------------------------------------------------------- attachments


def test_rfc2231_filename_decoded() -> None:
    raw = _mime(
        b"Content-Type: application/pdf\r\n"
        b"Content-Disposition: attachment; filename*=UTF-8''na%C3%AFve%20r%C3%A9sum%C3%A9.pdf\r\n"
        b"\r\nPDF"
    )
    assert [a.filename for a in parse_message(raw).attachments] == ["naïve résumé.pdf"]


def test_rfc2231_continuations_decoded() -> None:
    raw = _mime(
        b"Content-Type: application/pdf\r\nContent-Disposition: attachment;\r\n"
        b" filename*0*=UTF-8''%C3%A9t%C3%A9;\r\n filename*1=.pdf\r\n\r\nPDF"
    )
    assert [a.filename for a in parse_message(raw).attachments] == ["été.pdf"]


def test_rfc2047_filename_decoded() -> None:
    raw = _mime(
        b'Content-Type: application/pdf; name="=?utf-8?B?w6l0w6kucGRm?="\r\n'
        b"Content-Disposition: attachment\r\n\r\nPDF"
    )
    assert [a.filename for a in parse_message(raw).attachments] == ["été.pdf"]


def test_raw_8bit_filename_decoded() -> None:
    raw = _mime(
        "Content-Type: application/pdf\r\nContent-Disposition: attachment; "
        'filename="Übersicht.pdf"\r\n\r\nPDF'.encode()
    )
    assert [a.filename for a in parse_message(raw).attachments] == ["Übersicht.pdf"]


def test_inline_image_with_content_id_and_decoded_payload() -> None:
    png = b"\x89PNG\r\n\x1a\n-data-"
    raw = _mime(
        b"Content-Type: text/html\r\n\r\n<img src=cid:img1>",
        b"Content-Type: image/png\r\nContent-ID: <img1@x>\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.b64encode(png),
        ctype=b"multipart/related",
    )
    (image,) = parse_message(raw).attachments
    assert (image.content_id, image.disposition, image.payload) == ("img1@x", "inline", png)
    assert image.sha256 == hashlib.sha256(png).hexdigest() and image.size_bytes == len(png)


def test_r13_message_rfc822_kept_as_embedded_and_attachment() -> None:
    inner = b"From: orig@example.net\r\nSubject: original\r\n\r\ninner body\r\n"
    raw = _mime(
        b"Content-Type: text/plain\r\n\r\nsee attached",
        b"Content-Type: message/rfc822\r\n\r\n" + inner,
    )
    parsed = parse_message(raw)
    assert parsed.text_body == "see attached"
    assert len(parsed.embedded) == 1
    (attachment,) = parsed.attachments
    assert attachment.content_type == RFC822
    assert attachment.payload == parsed.embedded[0]
    again = parse_message(parsed.embedded[0])
    assert again.subject == "original"
    assert again.text_body is not None and again.text_body.strip() == "inner body"


def test_r13_base64_encoded_message_rfc822_is_decoded() -> None:
    inner = b"From: orig@example.net\r\nSubject: enc\r\n\r\nbody\r\n"
    raw = _mime(
        b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes(inner)
    )
    parsed = parse_message(raw)
    assert parse_message(parsed.embedded[0]).subject == "enc"


def test_tnef_winmail_dat_is_an_ordinary_attachment() -> None:
    tnef = b"\x78\x9f\x3e\x22" + b"\x00" * 20
    raw = _mime(
        b"Content-Type: text/plain\r\n\r\nbody",
        b"Content-Type: application/ms-tnef; name=winmail.dat\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.b64encode(tnef),
    )
    (attachment,) = parse_message(raw).attachments
    assert (attachment.content_type, attachment.filename, attachment.payload) == (
        TNEF,
        "winmail.dat",
        tnef,
    )
