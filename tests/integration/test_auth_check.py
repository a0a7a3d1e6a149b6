"""R15 with bcc.require_dmarc: DKIM and SPF checked against a real DNS server on loopback.

A dnslib server answers TXT queries for the test domains (DKIM keys under
``<selector>._domainkey``, SPF policies); dkimpy and pyspf query it through
dnspython exactly as they would query a production resolver.
"""

from __future__ import annotations

import base64
import hashlib
import json
import smtplib
from collections.abc import Iterator
from datetime import UTC, datetime

import dkim
import dns.resolver
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from dnslib import QTYPE, RR, TXT
from dnslib.server import BaseResolver, DNSServer

from gateway.auth_check import SenderAuthenticator, aligned, organisational_domain
from gateway.smtp import replies
from ingest.pipeline import prepare
from ingest.types import RawMessage, SmtpEnvelope
from tests.integration.conftest import Gateway, make_tenant

pytestmark = pytest.mark.integration


class _Zone(BaseResolver):  # type: ignore[misc]
    def __init__(self, records: dict[str, str]) -> None:
        self.records = records

    def resolve(self, request, handler):  # type: ignore[no-untyped-def]
        reply = request.reply()
        name = str(request.q.qname).rstrip(".").lower()
        if request.q.qtype == QTYPE.TXT and name in self.records:
            text = self.records[name]
            chunks = [text[i : i + 255] for i in range(0, len(text), 255)]
            reply.add_answer(RR(request.q.qname, QTYPE.TXT, rdata=TXT(chunks), ttl=60))
        return reply


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def dns_server(key: rsa.RSAPrivateKey) -> Iterator[str]:
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    p = base64.b64encode(public).decode()
    zone = _Zone(
        {
            "sel._domainkey.example.org": f"v=DKIM1; k=rsa; p={p}",
            "sel._domainkey.mail.example.org": f"v=DKIM1; k=rsa; p={p}",
            "sel._domainkey.other.test": f"v=DKIM1; k=rsa; p={p}",
            "example.org": "v=spf1 ip4:127.0.0.1 -all",
            "bounces.example.net": "v=spf1 ip4:127.0.0.1 -all",
        }
    )
    server = DNSServer(zone, port=0, address="127.0.0.1")
    server.start_thread()
    previous = dns.resolver.default_resolver
    try:
        yield f"127.0.0.1:{server.server.server_address[1]}"
    finally:
        dns.resolver.default_resolver = previous
        server.stop()
        server.server.server_close()  # dnslib leaves its UDP socket open


def message(from_addr: str = "alice@example.org", body: str = "Hello Bob.\r\n") -> bytes:
    return (
        f"From: Alice <{from_addr}>\r\nTo: bob@example.com\r\nSubject: quote\r\n"
        f"Date: Mon, 30 Nov 2026 10:00:00 +0000\r\nMessage-ID: <q1@example.org>\r\n\r\n{body}"
    ).encode()


def signed(raw: bytes, key: rsa.RSAPrivateKey, domain: str) -> bytes:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    signature = dkim.sign(raw, b"sel", domain.encode(), pem, include_headers=[b"from", b"subject"])
    return bytes(signature) + raw


async def check(raw: bytes, dns_server: str, *, sender: str, peer: str = "127.0.0.1"):  # type: ignore[no-untyped-def]
    envelope = SmtpEnvelope(
        envelope_sender=sender,
        envelope_recipients=("u-aaaaaaaaaaaaaaaaaaaa@bcc.example.test",),
        peer=peer,
        helo="mail.example.org",
        received_at=datetime(2026, 11, 30, tzinfo=UTC),
    )
    prepared = prepare(
        RawMessage(raw=raw, provenance=envelope, sha256=hashlib.sha256(raw).hexdigest())
    )
    return await SenderAuthenticator(dns_server)(prepared)


async def test_r15_dkim_signature_aligned_with_from_passes(dns_server: str, key) -> None:  # type: ignore[no-untyped-def]
    result = await check(
        signed(message(), key, "example.org"), dns_server, sender="", peer="127.0.0.9"
    )
    assert result is not None and result.dkim_aligned and not result.spf_aligned


async def test_r15_dkim_of_a_subdomain_is_relaxed_aligned(dns_server: str, key) -> None:  # type: ignore[no-untyped-def]
    raw = signed(message(), key, "mail.example.org")
    result = await check(raw, dns_server, sender="", peer="127.0.0.9")
    assert result is not None and result.dkim_aligned


async def test_r15_dkim_of_another_domain_is_not_aligned(dns_server: str, key) -> None:  # type: ignore[no-untyped-def]
    raw = signed(message(), key, "other.test")
    result = await check(raw, dns_server, sender="", peer="127.0.0.9")
    assert result is not None and not result.dkim_aligned
    assert "other.test:pass" in result.detail


async def test_r15_tampered_body_fails_dkim(dns_server: str, key) -> None:  # type: ignore[no-untyped-def]
    raw = signed(message(), key, "example.org").replace(b"Hello Bob.", b"Pay Mallory.")
    result = await check(raw, dns_server, sender="", peer="127.0.0.9")
    assert result is not None and not result.dkim_aligned
    assert "example.org:fail" in result.detail


async def test_r15_spf_pass_for_aligned_envelope_sender(dns_server: str) -> None:
    result = await check(message(), dns_server, sender="alice@example.org")
    assert result is not None and result.spf_aligned and not result.dkim_aligned


async def test_r15_spf_fail_from_an_unlisted_ip(dns_server: str) -> None:
    result = await check(message(), dns_server, sender="alice@example.org", peer="127.0.0.2")
    assert result is not None and not result.spf_aligned
    assert "spf=fail" in result.detail


async def test_r15_spf_pass_for_unaligned_envelope_sender_does_not_count(dns_server: str) -> None:
    result = await check(message(), dns_server, sender="b@bounces.example.net")
    assert result is not None and not result.spf_aligned
    assert "spf=pass" in result.detail


def test_organisational_domain_uses_public_suffix_list() -> None:
    assert organisational_domain("mail.example.co.uk") == "example.co.uk"
    assert organisational_domain("Example.ORG.") == "example.org"
    assert organisational_domain("localhost") == "localhost"
    assert aligned("a.example.co.uk", "b.example.co.uk")
    assert not aligned("example.co.uk", "other.co.uk")
    assert not aligned("", "example.org")


@pytest.fixture
def strict_gateway(dns_server: str, tmp_path) -> Iterator[Gateway]:  # type: ignore[no-untyped-def]
    """``mailgate serve`` with ``bcc.require_dmarc`` on, resolving through the test DNS."""
    gw = Gateway(root=tmp_path, database_url=f"sqlite+aiosqlite:///{tmp_path / 'm.db'}")
    gw.write_config()
    with gw.config.open("a") as config:  # [bcc] is the config's last table
        config.write(f"require_dmarc = true\ndns_server = {json.dumps(dns_server)}\n")
    gw.start()
    try:
        yield gw
    finally:
        gw.stop()


def test_r15_require_dmarc_end_to_end_refuses_unauthenticated_and_accepts_signed(
    strict_gateway: Gateway,
    key,  # type: ignore[no-untyped-def]
) -> None:
    tenant = make_tenant(strict_gateway, "alice@example.org")
    with smtplib.SMTP("127.0.0.1", strict_gateway.smtp_port, timeout=30) as client:
        # No signature, envelope sender of another domain: SPF cannot align.
        with pytest.raises(smtplib.SMTPDataError) as refused:
            client.sendmail("b@bounces.example.net", [tenant.sync_address], message())
        assert refused.value.smtp_code == replies.SENDER_REFUSED.code
        raw = signed(message(body="Signed.\r\n"), key, "example.org")
        assert client.sendmail("b@bounces.example.net", [tenant.sync_address], raw) == {}
    doc = strict_gateway.cli(
        "conversation", "show", "bob@example.com", "--subaccount", tenant.subaccount
    )
    assert [m["message_id"] for m in doc["messages"]] == ["q1@example.org"]
    log = strict_gateway.cli("log")
    assert any(row["rule"] == "R15" and row["outcome"] == "refused" for row in log["entries"])
