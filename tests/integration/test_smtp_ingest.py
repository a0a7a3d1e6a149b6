"""End to end: real SMTP clients → ``mailgate serve`` → ``mailgate conversation show``.

Corpus messages are sent with the user's sync address as the only envelope
recipient (a Bcc), by swaks, smtplib and aiosmtplib. Expected values are
computed with the stdlib ``email`` parser, independently of ours.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import hashlib
import re
import shutil
import smtplib
import subprocess
import urllib.request
import uuid
from email.message import EmailMessage, Message
from email.utils import getaddresses, make_msgid
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from gateway.smtp import replies
from tests.integration.conftest import REPO, Gateway, Tenant, corpus_dir, make_tenant

pytestmark = pytest.mark.integration

CORPUS_MESSAGES = (
    "enmime/mail/attachment.eml",
    "flanker/mailgun-pic.eml",
    "hyperkitty/attachment-1.eml",
    "ietf-mailarchive/attachment_windows1252.eml",
    "flanker/outlook-express.eml",
    "mikel-mail/attachment_emails/attachment_nonascii_filename.eml",
    "mimekit/tnef/ukr.eml",
    "mime4j/testmsgs/example.eml",
)
CLIENTS = ("swaks", "smtplib", "aiosmtplib")
FORWARDS = REPO / "tests" / "fixtures" / "forwards"
FIXTURE_SYNC_ADDRESS = b"u-k7q2m4x9w3r8t6y5p1zz@sync.example.net"
"""The placeholder sync address the forward fixtures are written to."""
FORWARD_ORIGINAL_SENDERS = {
    "gmail_en.eml": "tibordigana@apache.org",
    "gmail_de.eml": "herve.boutemy@free.fr",
    "outlook_desktop.eml": "lead@customer.example",
    "apple_mail.eml": "herve.boutemy@free.fr",
    "rfc822_attachment.eml": "dottedmag@dottedmag.net",
}


def _code(reply: replies.Reply) -> tuple[int, bytes]:
    return reply.code, f"{reply.status} {reply.text}".encode()


async def send(gw: Gateway, client: str, sender: str, rcpt: str, raw: bytes, tmp: Path) -> None:
    """Deliver ``raw`` to ``rcpt`` with one of the real clients; raise on refusal."""
    if client == "swaks":
        if shutil.which("swaks") is None:
            pytest.skip("swaks not installed (apt-get install swaks)")
        path = tmp / f"{uuid.uuid4().hex}.eml"
        path.write_bytes(raw)
        done = await asyncio.to_thread(
            subprocess.run,
            [
                "swaks",
                "--server",
                f"127.0.0.1:{gw.smtp_port}",
                "--from",
                sender,
                "--to",
                rcpt,
                "--data",
                f"@{path}",
                "--silent",
                "2",
            ],
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
    elif client == "smtplib":
        with smtplib.SMTP("127.0.0.1", gw.smtp_port, timeout=30) as smtp:
            assert smtp.sendmail(sender, [rcpt], raw) == {}
    else:
        await aiosmtplib.send(
            raw,
            sender=sender,
            recipients=[rcpt],
            hostname="127.0.0.1",
            port=gw.smtp_port,
            timeout=30,
        )


def conversation(gw: Gateway, tenant: Tenant, contact: str) -> dict[str, Any]:
    doc: dict[str, Any] = gw.cli("conversation", "show", contact, "--subaccount", tenant.subaccount)
    return doc


def _addrs(items: list[dict[str, str]]) -> list[str]:
    return [item["address"].lower() for item in items]


def _expected_attachments(msg: Message) -> set[str]:
    """SHA-256 of every named leaf part's decoded payload (stdlib parser)."""
    out = set()
    for part in msg.walk():
        if part.is_multipart() or not part.get_filename():
            continue
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes) and payload:
            out.add(hashlib.sha256(payload).hexdigest())
    return out


@pytest.mark.parametrize(
    "index", range(len(CORPUS_MESSAGES)), ids=[Path(p).name for p in CORPUS_MESSAGES]
)
async def test_r14_corpus_message_via_bcc_shown_once_with_participants_and_attachments(
    gateway: Gateway, index: int, tmp_path: Path
) -> None:
    raw = (corpus_dir() / "mime" / CORPUS_MESSAGES[index]).read_bytes()
    parsed = email.message_from_bytes(raw, policy=email.policy.compat32)
    [(_, sender)] = getaddresses(parsed.get_all("From", []))
    recipients = [a.lower() for _, a in getaddresses(parsed.get_all("To", []))]
    tenant = make_tenant(gateway, sender)
    await send(gateway, CLIENTS[index % len(CLIENTS)], sender, tenant.sync_address, raw, tmp_path)

    view = conversation(gateway, tenant, recipients[0])
    [message] = view["messages"]
    assert _addrs(message["from"]) == [sender.lower()]
    assert _addrs(message["to"]) == recipients
    assert tenant.sync_address in _addrs(message["bcc"])
    assert message["source"] == "bcc" and message["direction"] == "outbound"
    stored = {a["sha256"] for a in message["attachments"]}
    assert _expected_attachments(parsed) <= stored
    assert view["contact"]["assigned_user_email"].lower() == sender.lower()


def _simple(tenant: Tenant, to: str, body: str = "hello\n", **headers: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = headers.pop("From", tenant.user_email)
    msg["To"] = to
    msg["Subject"] = headers.pop("Subject", "integration test")
    msg["Message-ID"] = make_msgid(domain="it.example.org")
    msg.set_content(body)
    return msg.as_bytes(policy=email.policy.SMTP)


def _rejections(gateway: Gateway, code: str) -> float:
    """``mailgate_smtp_rejections_total{code=…}`` from the gateway's /metrics (0 if absent)."""
    url = f"http://127.0.0.1:{gateway.http_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    pattern = rf'^mailgate_smtp_rejections_total\{{code="{code}"\}} (\S+)$'
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_unknown_recipient_refused_550_5_1_1(gateway: Gateway, tenant: Tenant) -> None:
    bogus = re.sub(r"u-[a-z2-7]+", "u-" + "a" * 20, tenant.sync_address)
    before = _rejections(gateway, "550")
    for rcpt in (bogus, "someone@example.com"):
        with smtplib.SMTP("127.0.0.1", gateway.smtp_port, timeout=30) as smtp:
            smtp.ehlo()
            smtp.mail(tenant.user_email)
            assert smtp.rcpt(rcpt) == _code(replies.UNKNOWN_RECIPIENT)
    # A sysadmin sees refusals that never became messages (docs/operations.md).
    assert _rejections(gateway, "550") == before + 2


def test_too_large_refused_552(gateway: Gateway, tenant: Tenant) -> None:
    raw = _simple(tenant, "big@example.com", ("y" * 998 + "\n") * 3 * 1024)
    before = _rejections(gateway, "552")
    with smtplib.SMTP("127.0.0.1", gateway.smtp_port, timeout=60) as smtp:
        smtp.ehlo()
        smtp.mail(tenant.user_email)
        smtp.rcpt(tenant.sync_address)
        assert smtp.data(raw) == _code(replies.TOO_BIG)
    assert _rejections(gateway, "552") == before + 1
    assert (
        gateway.cli(
            "conversation",
            "show",
            "big@example.com",
            "--subaccount",
            tenant.subaccount,
            check=False,
        )["error"]["code"]
        == "not_found"
    )


def test_r15_foreign_sender_refused_with_5xx_and_nothing_stored(
    gateway: Gateway, tenant: Tenant
) -> None:
    raw = _simple(tenant, "victim@example.com", From="mallory@evil.example")
    with smtplib.SMTP("127.0.0.1", gateway.smtp_port, timeout=30) as smtp:
        with pytest.raises(smtplib.SMTPDataError) as exc_info:
            smtp.sendmail("mallory@evil.example", [tenant.sync_address], raw)
    assert exc_info.value.smtp_code == replies.SENDER_REFUSED.code
    assert exc_info.value.smtp_error.startswith(replies.SENDER_REFUSED.status.encode())
    doc = gateway.cli(
        "conversation", "show", "victim@example.com", "--subaccount", tenant.subaccount, check=False
    )
    assert doc["error"]["code"] == "not_found"
    rules = [row["rule"] for row in gateway.cli("log")["entries"] if row["outcome"] == "refused"]
    assert "R15" in rules


async def test_r12_same_message_twice_stored_once(gateway: Gateway, tenant: Tenant) -> None:
    raw = _simple(tenant, "twice@example.com")
    for _ in range(2):
        await aiosmtplib.send(
            raw,
            sender=tenant.user_email,
            recipients=[tenant.sync_address],
            hostname="127.0.0.1",
            port=gateway.smtp_port,
        )
    assert len(conversation(gateway, tenant, "twice@example.com")["messages"]) == 1


def test_r14_non_contact_recipient_created_and_assigned(gateway: Gateway, tenant: Tenant) -> None:
    with smtplib.SMTP("127.0.0.1", gateway.smtp_port, timeout=30) as smtp:
        smtp.sendmail(
            tenant.user_email,
            [tenant.sync_address],
            _simple(tenant, "New Person <new.person@example.com>"),
        )
    view = conversation(gateway, tenant, "new.person@example.com")
    assert view["contact"]["assigned_user_email"] == tenant.user_email
    assert len(view["messages"]) == 1


def test_long_line_and_8bit_body_accepted(gateway: Gateway, tenant: Tenant) -> None:
    line = "<div>" + "a" * 20_000 + "</div>"
    raw = (
        f"From: {tenant.user_email}\r\nTo: wide@example.com\r\nSubject: wide\r\n"
        f"Message-ID: {make_msgid(domain='it.example.org')}\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        f"{line}\r\n<p>Grüße aus Köln</p>\r\n"
    ).encode()
    with smtplib.SMTP("127.0.0.1", gateway.smtp_port, timeout=30) as smtp:
        assert smtp.sendmail(tenant.user_email, [tenant.sync_address], raw) == {}
    [message] = conversation(gateway, tenant, "wide@example.com")["messages"]
    assert message["subject"] == "wide"


@pytest.mark.parametrize("name", sorted(FORWARD_ORIGINAL_SENDERS))
def test_r13_forward_logged_against_original_sender(gateway: Gateway, name: str) -> None:
    path = FORWARDS / name
    if not path.exists():
        pytest.skip(f"forward fixture {name} not written yet")
    raw = path.read_bytes()
    # The fixtures share Message-IDs; give each delivery its own (R12 is tested apart).
    raw = re.sub(rb"(?mi)^Message-ID:.*$", f"Message-ID: {make_msgid()}".encode(), raw, count=1)
    parsed = email.message_from_bytes(raw, policy=email.policy.compat32)
    [(_, forwarder)] = getaddresses(parsed.get_all("From", []))
    tenant = make_tenant(gateway, forwarder)
    raw = raw.replace(FIXTURE_SYNC_ADDRESS, tenant.sync_address.encode())
    original = FORWARD_ORIGINAL_SENDERS[name]
    gateway.cli(
        "contact", "add", original, "--subaccount", tenant.subaccount, "--assign", forwarder
    )
    with smtplib.SMTP("127.0.0.1", gateway.smtp_port, timeout=30) as smtp:
        assert smtp.sendmail(forwarder, [tenant.sync_address], raw) == {}
    assert len(conversation(gateway, tenant, original)["messages"]) == 1
