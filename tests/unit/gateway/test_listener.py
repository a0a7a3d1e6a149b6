"""The SMTP listener's protocol behaviour, driven by smtplib on loopback.

The intake is replaced by plain functions here (no storage, no pipeline):
these tests check RCPT filtering, size limits, long lines, 8-bit data,
STARTTLS and the reply catalogue. End-to-end behaviour is in
tests/integration/test_smtp_*.py.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import smtplib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.config import make_settings
from gateway.intake_result import IntakeResult, IntakeStatus
from gateway.smtp import replies
from gateway.smtp.listener import BccHandler, SmtpListener, looks_like_sync_address, start_smtp
from ingest.types import Refusal, SmtpEnvelope

DOMAIN = "bcc.test.localhost"
GOOD = f"u-{'a' * 20}@{DOMAIN}"
UNKNOWN_MEMBER = f"u-{'b' * 20}@{DOMAIN}"
USER = "alice@example.org"
FOREIGN = "mallory@example.net"


def _code(reply: replies.Reply) -> tuple[int, bytes]:
    return reply.code, f"{reply.status} {reply.text}".encode()


class Recorder:
    """Stands in for the intake: records what DATA handed over."""

    def __init__(self) -> None:
        self.received: list[tuple[bytes, SmtpEnvelope]] = []
        self.fail = False

    async def is_sync_address(self, address: str) -> bool:
        return address == GOOD

    async def accept(self, raw: bytes, envelope: SmtpEnvelope) -> IntakeResult:
        if self.fail:
            raise RuntimeError("secret internal detail")
        self.received.append((raw, envelope))
        if f"From: {FOREIGN}".encode() in raw:
            return IntakeResult(
                status=IntakeStatus.REFUSED,
                refusal=Refusal(rule="R15", reason="From is not the sync address's user"),
            )
        return IntakeResult(status=IntakeStatus.STORED)


def _make_cert(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def _serve(recorder: Recorder, **smtp: object) -> SmtpListener:
    settings = make_settings(smtp={"port": 0, "max_message_bytes": 64 * 1024, **smtp})
    handler = BccHandler(
        domain=DOMAIN, is_sync_address=recorder.is_sync_address, accept=recorder.accept
    )
    return await start_smtp(handler, settings.smtp)


@pytest.fixture
async def served() -> AsyncIterator[tuple[Recorder, int]]:
    recorder = Recorder()
    server = await _serve(recorder)
    port = server.sockets[0].getsockname()[1]
    yield recorder, port
    await server.drain(0)
    await server.server.wait_closed()


def _message(body: bytes, sender: str = USER) -> bytes:
    return (
        f"From: {sender}\r\nTo: bob@example.com\r\nSubject: t\r\n"
        "Message-ID: <t1@example.org>\r\n\r\n"
    ).encode() + body


def _send(port: int, raw: bytes, rcpt: str = GOOD) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        return client.sendmail(USER, [rcpt], raw)


def _error(exc_info: pytest.ExceptionInfo[smtplib.SMTPResponseException]) -> tuple[int, bytes]:
    return exc_info.value.smtp_code, exc_info.value.smtp_error


def test_sync_address_form() -> None:
    assert looks_like_sync_address(GOOD.upper().replace("BCC", "bcc"), DOMAIN.upper())
    assert not looks_like_sync_address(f"u-{'a' * 19}@{DOMAIN}", DOMAIN)
    assert not looks_like_sync_address(f"u-{'a' * 20}@other.example", DOMAIN)
    assert not looks_like_sync_address(f"u-{'1' * 20}@{DOMAIN}", DOMAIN)


async def test_unknown_recipient_refused_with_550_5_1_1(served: tuple[Recorder, int]) -> None:
    recorder, port = served
    for rcpt in (UNKNOWN_MEMBER, "bob@example.com", f"postmaster@{DOMAIN}"):
        with pytest.raises(smtplib.SMTPRecipientsRefused) as exc_info:
            await asyncio.to_thread(_send, port, _message(b"hi\r\n"), rcpt)
        assert exc_info.value.recipients[rcpt] == _code(replies.UNKNOWN_RECIPIENT)
    assert recorder.received == []


async def test_stored_message_gets_250_with_envelope(served: tuple[Recorder, int]) -> None:
    recorder, port = served
    raw = _message(b"hello\r\n")
    refused = await asyncio.to_thread(_send, port, raw)
    assert refused == {}
    [(got, envelope)] = recorder.received
    assert got == raw
    assert envelope.envelope_recipients == (GOOD,)
    assert envelope.envelope_sender == USER
    assert envelope.peer == "127.0.0.1"


async def test_too_big_refused_with_552_and_size_advertised(served: tuple[Recorder, int]) -> None:
    recorder, port = served

    def run() -> tuple[int, bytes, str]:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.ehlo()
            size = client.esmtp_features["size"]
            client.mail(USER)
            client.rcpt(GOOD)
            code, text = client.data(_message(b"x" * 70 * 1024 + b"\r\n"))
            return code, text, size

    code, text, size = await asyncio.to_thread(run)
    assert (code, text) == _code(replies.TOO_BIG)
    assert int(size) == 64 * 1024
    assert recorder.received == []


async def test_long_line_and_8bit_body_accepted(served: tuple[Recorder, int]) -> None:
    recorder, port = served
    line = b"<div>" + b"a" * 20_000 + b"</div>\r\n"
    body = line + "Grüße, naïve café\r\n".encode()
    await asyncio.to_thread(_send, port, _message(body))
    [(got, _)] = recorder.received
    assert line in got
    assert "Grüße".encode() in got


async def test_r15_refusal_replies_550_5_7_1(served: tuple[Recorder, int]) -> None:
    _, port = served
    with pytest.raises(smtplib.SMTPDataError) as exc_info:
        await asyncio.to_thread(_send, port, _message(b"hi\r\n", sender=FOREIGN))
    code, text = _error(exc_info)
    assert code == replies.SENDER_REFUSED.code
    assert text.startswith(
        f"{replies.SENDER_REFUSED.status} {replies.SENDER_REFUSED.text}".encode()
    )


async def test_failure_replies_451_without_exception_text(served: tuple[Recorder, int]) -> None:
    recorder, port = served
    recorder.fail = True
    with pytest.raises(smtplib.SMTPDataError) as exc_info:
        await asyncio.to_thread(_send, port, _message(b"hi\r\n"))
    code, text = _error(exc_info)
    assert code == replies.TEMPORARY_FAILURE.code
    assert text.startswith(replies.TEMPORARY_FAILURE.status.encode())
    assert b"secret" not in text and b"RuntimeError" not in text


async def test_require_starttls_refuses_mail_before_tls(tmp_path: Path) -> None:
    cert, key = _make_cert(tmp_path)
    recorder = Recorder()
    server = await _serve(recorder, tls_cert=str(cert), tls_key=str(key), require_starttls=True)
    port = server.sockets[0].getsockname()[1]

    def run() -> tuple[tuple[int, bytes], dict[str, tuple[int, bytes]]]:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.ehlo()
            before = client.mail(USER)
            client.rset()
            context = ssl.create_default_context(cafile=str(cert))
            context.check_hostname = False
            client.starttls(context=context)
            client.ehlo()
            return before, client.sendmail(USER, [GOOD], _message(b"tls\r\n"))

    try:
        before, refused = await asyncio.to_thread(run)
    finally:
        await server.drain(0)
        await server.server.wait_closed()
    assert before == _code(replies.STARTTLS_REQUIRED)
    assert refused == {}
    assert len(recorder.received) == 1


async def test_ehlo_offers_no_auth_and_greeting_names_no_version(
    served: tuple[Recorder, int],
) -> None:
    _, port = served

    def run() -> tuple[bytes, str]:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            code, _ = client.ehlo("client.example.org")
            assert code == 250
            return client.ehlo_resp or b"", str(client.esmtp_features)

    ehlo, features = await asyncio.to_thread(run)
    assert b"AUTH" not in ehlo.upper()
    assert "auth" not in features


async def test_shutdown_drain_finishes_data_in_flight_and_421s_idle_sessions() -> None:
    """SIGTERM path: no new mail, the message being sent gets its 250, idle ones get 421."""
    recorder = Recorder()
    gate = asyncio.Event()
    inner = recorder.accept

    async def slow_accept(raw: bytes, envelope: SmtpEnvelope) -> IntakeResult:
        gate.set()
        await asyncio.sleep(0.3)  # the intake is committing while the drain starts
        return await inner(raw, envelope)

    recorder.accept = slow_accept  # type: ignore[method-assign]
    server = await _serve(recorder)
    port = server.sockets[0].getsockname()[1]
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
    await idle_reader.readline()  # 220 greeting

    def send() -> dict[str, tuple[int, bytes]]:
        client = smtplib.SMTP("127.0.0.1", port, timeout=10)
        try:  # no QUIT: after its 250 the drain answers this session 421 too
            return client.sendmail(USER, [GOOD], _message(b"in flight\r\n"))
        finally:
            client.close()

    sending = asyncio.create_task(asyncio.to_thread(send))
    await asyncio.wait_for(gate.wait(), 10)
    await server.drain(grace_seconds=10)
    assert await sending == {}
    assert len(recorder.received) == 1
    goodbye = await asyncio.wait_for(idle_reader.readline(), 5)
    assert goodbye.startswith(str(replies.SHUTTING_DOWN.code).encode())
    idle_writer.close()
    await idle_writer.wait_closed()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
    await server.server.wait_closed()


GETADDR_ARGUMENTS = [
    "",
    "<>",
    "<a@example.org>",
    "<a@example.org> SIZE=1000 BODY=8BITMIME",
    "a@example.org",
    "a@example.org SIZE=10",
    " <a@example.org>",
    '<"quoted local"@example.org>',
    "<a.b+tag@sub.example.org>",
    "<@relay.example:a@example.org>",
    "<a@[192.0.2.1]>",
    "<a@example.org",
    "<<a@example.org>>",
    "a@example.org<<b@example.com>",
    "<a@@example.org>",
    "<a b@example.org>",
    "<" + "x" * 64 + "@example.org>",
    "<" + "x" * 65 + "@example.org>",
    "<dömäin@exämple.org> SMTPUTF8",
    "not an address",
    "<>junk",
]


@pytest.mark.parametrize("local_part_limit", [0, 64])
@pytest.mark.parametrize("arg", GETADDR_ARGUMENTS)
def test_getaddr_answers_as_aiosmtpd_does(arg: str, local_part_limit: int) -> None:
    """``MailgateSMTP._getaddr`` (no class built per call) equals aiosmtpd's own."""
    from aiosmtpd.smtp import SMTP

    from gateway.smtp.listener import MailgateSMTP

    loop = asyncio.new_event_loop()
    try:
        ours = MailgateSMTP(object(), sessions=set(), loop=loop)
        theirs = SMTP(object(), loop=loop)
        ours.local_part_limit = theirs.local_part_limit = local_part_limit
        assert type(ours)._getaddr is not SMTP._getaddr
        assert ours._getaddr(arg) == theirs._getaddr(arg)
    finally:
        loop.close()
