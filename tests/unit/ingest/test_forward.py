"""R13: the original sender of a forwarded message.

Fixtures in tests/fixtures/forwards/ mimic what each client writes
(Gmail multipart/alternative with quoted-printable text and HTML, Outlook's
Word HTML with ``<b>From:</b>``, Outlook on the web's underscore rule,
Apple Mail's ``Begin forwarded message:``), wrapping the headers of real
corpus messages; real corpus forwards are checked too.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pytest

from ingest.forward import find_forwarded, has_forward_prefix, html_to_text
from ingest.parse import parse_message
from ingest.types import ParsedMessage

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "forwards"
CORPUS = Path(__file__).resolve().parents[4] / "shared" / "corpus"

RFC822 = "rfc822"
GMAIL = "gmail"
OUTLOOK = "outlook"
APPLE = "apple"

TIBOR = "tibordigana@apache.org"
SWAPNIL = "swapnilmmane@apache.org"
HERVE = "herve.boutemy@free.fr"
JEAN = "jean.dupont@client.example.fr"
LEAD = "lead@customer.example"
MIKHAIL = "dottedmag@dottedmag.net"
MAVEN_SUBJECT = "Re: Problem to download dependency on Ubuntu"
GRADUATION_SUBJECT = "Re: Graduation or..?"
RESOLVER_SUBJECT = "Re: Maven resolver branch consolidation"
DEVIS_SUBJECT = "Devis 2018"
PRICING_SUBJECT = "Pricing for 2018"
NOTMUCH_SUBJECT = "[notmuch] [PATCH 1/2] Close message file after parsing message headers"


class Expected(NamedTuple):
    style: str
    sender: str | None
    subject: str


FORWARDS = {
    "gmail_en.eml": Expected(GMAIL, TIBOR, MAVEN_SUBJECT),
    "gmail_html_only.eml": Expected(GMAIL, SWAPNIL, GRADUATION_SUBJECT),
    "gmail_de.eml": Expected(GMAIL, HERVE, RESOLVER_SUBJECT),
    "gmail_fr.eml": Expected(GMAIL, JEAN, DEVIS_SUBJECT),
    "outlook_desktop.eml": Expected(OUTLOOK, LEAD, PRICING_SUBJECT),
    "outlook_html_only.eml": Expected(OUTLOOK, LEAD, PRICING_SUBJECT),
    "outlook_web.eml": Expected(OUTLOOK, LEAD, PRICING_SUBJECT),
    "outlook_original_message.eml": Expected(OUTLOOK, LEAD, PRICING_SUBJECT),
    "outlook_name_only.eml": Expected(OUTLOOK, LEAD, PRICING_SUBJECT),
    "outlook_no_address.eml": Expected(OUTLOOK, None, PRICING_SUBJECT),
    "apple_mail.eml": Expected(APPLE, HERVE, RESOLVER_SUBJECT),
    "apple_de_html_only.eml": Expected(APPLE, JEAN, DEVIS_SUBJECT),
    "rfc822_attachment.eml": Expected(RFC822, MIKHAIL, NOTMUCH_SUBJECT),
}
NOT_FORWARDS = ("fwd_subject_no_block.eml", "outlook_reply_not_forward.eml")

# Real forwards in the corpus: file -> (style, original sender).
CORPUS_FORWARDS = {
    "mime/mikel-mail/mime_emails/raw_email2.eml": (GMAIL, "xxxxxxxx@xxx.com"),
    "mime/flanker/multi-received-headers.eml": (GMAIL, "hello@example.com"),
    "mime/hyperkitty/attachment-3.eml": (GMAIL, "geoffrey.roucourt@gmail.com"),
    "mime/ietf-mailarchive/mail_external_body-2.eml": (OUTLOOK, "Internet-Drafts@ietf.org"),
    "mime/mime4j/misc/sampleMail.eml": (RFC822, "aduprat@linagora.com"),
}
TALON_REPLIES = CORPUS / "mime" / "talon" / "standard_replies"


def _parse(name: str) -> ParsedMessage:
    return parse_message((FIXTURES / name).read_bytes())


@pytest.mark.parametrize("name", sorted(FORWARDS))
def test_r13_original_sender_and_subject_per_client(name: str) -> None:
    expected = FORWARDS[name]
    found = find_forwarded(_parse(name))
    assert found is not None
    assert found.style == expected.style
    assert found.subject == expected.subject
    if expected.sender is None:
        assert found.from_ is None
    else:
        assert found.from_ is not None
        assert found.from_.address_key == expected.sender.casefold()


@pytest.mark.parametrize("name", NOT_FORWARDS)
def test_r13_no_forward_block_gives_none(name: str) -> None:
    assert find_forwarded(_parse(name)) is None


def test_r13_fixtures_are_what_the_clients_send() -> None:
    gmail = _parse("gmail_en.eml")
    assert gmail.text_body is not None and gmail.html_body is not None
    assert "gmail_quote" in gmail.html_body
    outlook = _parse("outlook_html_only.eml")
    assert outlook.text_body is None and outlook.html_body is not None
    assert "<b>Sent:</b>" in outlook.html_body
    assert b"quoted-printable" in (FIXTURES / "apple_mail.eml").read_bytes()


def test_r13_recipients_and_date_are_kept() -> None:
    found = find_forwarded(_parse("outlook_desktop.eml"))
    assert found is not None
    assert [a.addr_spec for a in found.cc] == [
        "purchasing@customer.example",
        "ops@customer.example",
    ]
    assert [a.addr_spec for a in found.to] == ["dana.seller@example.com"]
    assert found.date_text == "Monday, December 4, 2017 10:12 AM"
    html_only = find_forwarded(_parse("gmail_html_only.eml"))
    assert html_only is not None
    assert [a.addr_spec for a in html_only.cc] == ["dev@ponymail.apache.org"]


def test_r13_attached_message_keeps_its_message_id() -> None:
    found = find_forwarded(_parse("rfc822_attachment.eml"))
    assert found is not None
    assert found.message_id == "1258471718-6781-1-git-send-email-dottedmag@dottedmag.net"


@pytest.mark.parametrize("relative", sorted(CORPUS_FORWARDS))
def test_r13_real_corpus_forwards(relative: str) -> None:
    path = CORPUS / relative
    if not path.exists():
        pytest.skip("shared corpus not present")
    style, sender = CORPUS_FORWARDS[relative]
    found = find_forwarded(parse_message(path.read_bytes()))
    assert found is not None
    assert found.style == style
    assert found.from_ is not None and found.from_.addr_spec == sender


@pytest.mark.skipif(not TALON_REPLIES.is_dir(), reason="shared corpus not present")
def test_r13_replies_from_every_client_are_not_forwards() -> None:
    replies = sorted(TALON_REPLIES.glob("*.eml"))
    assert len(replies) >= 10
    for path in replies:
        assert find_forwarded(parse_message(path.read_bytes())) is None, path.name


@pytest.mark.skipif(not TALON_REPLIES.is_dir(), reason="shared corpus not present")
def test_r13_outlook_block_counts_under_a_forward_subject() -> None:
    raw = (TALON_REPLIES / "outlook.eml").read_bytes()
    assert find_forwarded(parse_message(raw)) is None
    found = find_forwarded(parse_message(raw.replace(b"Subject: Test", b"Subject: FW: Test", 1)))
    assert found is not None
    assert found.style == OUTLOOK
    assert found.from_ is not None and found.from_.addr_spec == "xxx@xxx.mailgun.org"
    assert found.subject == "The manager has commented on your Loop"


@pytest.mark.skipif(not CORPUS.is_dir(), reason="shared corpus not present")
def test_r13_bounces_and_digests_are_not_forwards() -> None:
    for relative in (
        "mime/flufl-bounce/postfix_01.eml",
        "mime/flufl-bounce/simple_01.eml",
        "mime/cpython/msg_28.eml",
        "mime/cpython/msg_34.eml",
    ):
        assert find_forwarded(parse_message((CORPUS / relative).read_bytes())) is None, relative


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        ("Fwd: x", True),
        ("FW: x", True),
        ("WG: Angebot", True),
        ("TR : Devis", True),
        ("[list] Fwd: x", True),
        ("Re: x", False),
        ("Forward planning", False),
        ("", False),
    ],
)
def test_r13_forward_subject_prefix(subject: str, expected: bool) -> None:
    assert has_forward_prefix(subject) is expected


def test_r13_html_to_text_keeps_mailto_addresses_and_drops_styles() -> None:
    html = (
        "<html><head><style>p{color:red}</style></head><body>"
        '<p><b>From:</b> <a href="mailto:a@example.org">Ann</a><br>'
        "<b>To:</b> B &lt;<a href='mailto:b@example.org'>b@example.org</a>&gt;</p>"
        "<div>x&nbsp;y</div></body></html>"
    )
    assert html_to_text(html).splitlines() == [
        "From: Ann <a@example.org>",
        "To: B <b@example.org>",
        "x\u00a0y",
    ]


def _with_attached_message(content_type: bytes) -> bytes:
    return (
        b"From: a@example.com\r\nSubject: Fwd: hi\r\nMIME-Version: 1.0\r\n"
        b"Content-Type:" + content_type + b'\r\n boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain\r\n\r\nsee below\r\n"
        b"--b\r\nContent-Type: message/rfc822\r\n\r\n"
        b"From: orig@example.org\r\nSubject: hi\r\n\r\nbody\r\n--b--\r\n"
    )


def test_r13_folded_report_content_type_is_read_decoded() -> None:
    """Content-Type is kept as read (folded); the report check unfolds it (RFC 6522)."""
    report = parse_message(_with_attached_message(b"\r\n Multipart/Report;\r\n report-type=x;"))
    assert "\n" in (report.header("Content-Type") or "")
    assert find_forwarded(report) is None
    mixed = find_forwarded(parse_message(_with_attached_message(b"\r\n multipart/mixed;")))
    assert mixed is not None and mixed.from_ is not None
    assert mixed.from_.addr_spec == "orig@example.org"
