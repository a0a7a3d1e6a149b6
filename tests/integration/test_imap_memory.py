"""Per-session memory: the asyncio TLS read buffer is shrunk on live sessions (issue 4 item 8a).

Real Dovecot (testbed), implicit TLS and STARTTLS. These fail if the shrink
stops working, e.g. after a Python upgrade renames asyncio's private
``SSLProtocol`` attributes: every idle session would then hold 256 KiB again
(docs/imap.md, "Memory per session"). A message larger than the buffer is
fetched byte for byte, so the smaller buffer still carries multi-record reads.
"""

from __future__ import annotations

import asyncio
import os
from email.message import EmailMessage
from email.utils import make_msgid
from typing import Any

import pytest

from gateway.config import Security
from gateway.imap.session import (
    TLS_READ_BUFFER_BYTES,
    Endpoint,
    ImapSession,
    tls_buffer_shrink_supported,
)
from tests.testbed.dovecot import Dovecot
from tests.testbed.plugin import TestbedUser

pytestmark = pytest.mark.integration

ASYNCIO_DEFAULT_BUFFER_BYTES = 256 * 1024


def endpoint(dovecot: Dovecot, security: Security) -> Endpoint:
    assert dovecot.ports is not None
    port = dovecot.ports.imaps if security is Security.TLS else dovecot.ports.imap
    return Endpoint(host=dovecot.host, port=port, security=security, ca_file=dovecot.ca_file)


def big_message(to: str, size_bytes: int) -> bytes:
    """A text message of about ``size_bytes`` (random base64 body: no compression helps)."""
    msg = EmailMessage()
    msg["From"] = "contact@customer.test"
    msg["To"] = to
    msg["Subject"] = "memory"
    msg["Message-ID"] = make_msgid(domain="memory.test")
    msg.add_attachment(os.urandom(size_bytes * 3 // 4), maintype="application", subtype="x")
    return msg.as_bytes()


def read_buffer(session: ImapSession) -> Any:
    """The live connection's asyncio SSLProtocol (private: what the shrink changed)."""
    return session._proto.transport._ssl_protocol


def test_this_python_supports_the_shrink() -> None:
    assert tls_buffer_shrink_supported()
    assert TLS_READ_BUFFER_BYTES < ASYNCIO_DEFAULT_BUFFER_BYTES


@pytest.mark.parametrize("security", [Security.TLS, Security.STARTTLS])
async def test_live_session_reads_through_the_small_buffer(
    dovecot: Dovecot, gmail_user: TestbedUser, security: Security
) -> None:
    raw = big_message(gmail_user.address, 4 * TLS_READ_BUFFER_BYTES)
    uid = await asyncio.to_thread(dovecot.append, gmail_user.address, "INBOX", raw)
    session = await ImapSession.open(endpoint(dovecot, security))
    try:
        assert session.tls_read_buffer_bytes == TLS_READ_BUFFER_BYTES
        ssl_protocol = read_buffer(session)
        # What the socket transport reads into (get_buffer(-1) = "as much as you like").
        assert len(ssl_protocol.get_buffer(-1)) == TLS_READ_BUFFER_BYTES
        await session.authenticate_xoauth2(gmail_user.address, gmail_user.mint_token())
        await session.select("INBOX")
        (fetched,) = await session.fetch([uid])
        assert fetched.raw.replace(b"\r\n", b"\n") == raw.replace(b"\r\n", b"\n")
        assert session.tls_read_buffer_bytes == TLS_READ_BUFFER_BYTES
    finally:
        await session.logout()


async def test_plain_session_has_no_tls_buffer(dovecot: Dovecot) -> None:
    session = await ImapSession.open(endpoint(dovecot, Security.PLAIN))
    try:
        assert session.tls_read_buffer_bytes is None
    finally:
        await session.logout()
