"""DATA streamed by gateway.smtp.data, seen on the wire of a raw loopback SMTP server.

The server below records the exact bytes between ``354`` and the
terminator, so the comparison with aiosmtplib's own ``sendmail`` is byte
for byte (aiosmtpd would un-stuff the dots first). RFC 5321 §4.5.2, §3.3.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiosmtplib
import pytest

from gateway.config import Security
from gateway.errors import PermanentError, TransientError
from gateway.smtp.sender import ClientContexts, OutcomeUnknown, SmtpServer, Submissions, submit
from ingest.types import MessageId

pytestmark = pytest.mark.integration

SENDER = "crm.user@acme.test"
RECIPIENT = "bob@contact.test"
REFUSED = "nobody@contact.test"
MID = MessageId("stream.1@acme.test")


@dataclass
class RawSmtp:
    """A minimal SMTP server: EHLO (SIZE), MAIL, RCPT (refuses ``REFUSED``), DATA, RSET, QUIT."""

    port: int = 0
    connections: int = 0
    data: list[bytes] = field(default_factory=list)
    commands: list[bytes] = field(default_factory=list)
    drop: str | None = None  # "mid_data": close after 1 KB of data; "after_data": no reply

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.write(b"220 raw.test ESMTP\r\n")
        while line := await reader.readline():
            verb = line.split(b" ", 1)[0].strip().upper()
            self.commands.append(line.rstrip(b"\r\n"))
            if verb == b"EHLO":
                writer.write(b"250-raw.test\r\n250 SIZE 100000000\r\n")
            elif verb == b"RCPT" and REFUSED.encode() in line:
                writer.write(b"550 5.1.1 no such user\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                await writer.drain()
                if self.drop == "mid_data":
                    await reader.readexactly(1024)
                    break
                self.data.append(await reader.readuntil(b"\r\n.\r\n"))
                if self.drop == "after_data":  # accepted, but the 250 is lost
                    break
                writer.write(b"250 2.0.0 queued\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                break
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()
        writer.close()


@pytest.fixture
async def raw_smtp() -> AsyncIterator[RawSmtp]:
    server = RawSmtp()
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0, limit=2**26)
    server.port = listener.sockets[0].getsockname()[1]
    async with listener:
        yield server


def _server(raw: RawSmtp) -> SmtpServer:
    return SmtpServer(host="127.0.0.1", port=raw.port, security=Security.PLAIN)


CONTENTS = {
    "dots_and_bare_line_ends": b"Subject: x\r\n\r\n.first\n..second\r.third\r\n.\r\nlast",
    "large_with_dots_at_chunk_borders": b"".join(
        (b"." if i % 7 == 0 else b"") + os.urandom(50).hex().encode() + b"\r\n"
        for i in range(30_000)
    ),
    "binary_like": bytes(range(256)) * 1000,
}


@pytest.mark.parametrize("name", sorted(CONTENTS))
async def test_wire_bytes_equal_aiosmtplib_sendmail(raw_smtp: RawSmtp, name: str) -> None:
    content = CONTENTS[name]
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=raw_smtp.port, start_tls=False)
    async with client:
        await client.sendmail(SENDER, [RECIPIENT], content)
    result = await submit(
        _server(raw_smtp),
        None,
        envelope_sender=SENDER,
        envelope_recipients=(RECIPIENT,),
        content=content,
        message_id=MID,
    )
    assert result.code == 250
    theirs, ours = raw_smtp.data
    assert ours == theirs
    mail_commands = [c for c in raw_smtp.commands if c.upper().startswith(b"MAIL")]
    assert mail_commands[0].lower() == mail_commands[1].lower()  # same SIZE= (RFC 1870)


async def test_one_connection_carries_several_sends_and_survives_a_refusal(
    raw_smtp: RawSmtp,
) -> None:
    submissions = Submissions(ClientContexts())
    try:
        for i in range(3):
            await submissions.send(
                _server(raw_smtp),
                None,
                envelope_sender=SENDER,
                envelope_recipients=(RECIPIENT,),
                content=f"Subject: {i}\r\n\r\nbody {i}\r\n".encode(),
                message_id=MID,
            )
        with pytest.raises(PermanentError):
            await submissions.send(
                _server(raw_smtp),
                None,
                envelope_sender=SENDER,
                envelope_recipients=(REFUSED,),
                content=b"Subject: refused\r\n\r\nx\r\n",
                message_id=MID,
            )
        partly = await submissions.send(
            _server(raw_smtp),
            None,
            envelope_sender=SENDER,
            envelope_recipients=(RECIPIENT, REFUSED),
            content=b"Subject: partly\r\n\r\ny\r\n",
            message_id=MID,
        )
    finally:
        await submissions.close()
    assert raw_smtp.connections == 1
    assert len(raw_smtp.data) == 4
    assert b"RSET" in raw_smtp.commands  # after the refused transaction
    assert REFUSED in partly.reply
    assert raw_smtp.commands[-1] == b"QUIT"


async def test_connection_lost_after_the_terminator_is_outcome_unknown(raw_smtp: RawSmtp) -> None:
    raw_smtp.drop = "after_data"
    with pytest.raises(OutcomeUnknown):
        await submit(
            _server(raw_smtp),
            None,
            envelope_sender=SENDER,
            envelope_recipients=(RECIPIENT,),
            content=b"Subject: lost\r\n\r\nbody\r\n",
            message_id=MID,
        )
    assert len(raw_smtp.data) == 1  # the server had the whole message


async def test_connection_lost_before_the_terminator_is_transient(raw_smtp: RawSmtp) -> None:
    raw_smtp.drop = "mid_data"
    content = b"Subject: big\r\n\r\n" + b"x" * 998 * 1024 + b"\r\n" * 20_000
    with pytest.raises(TransientError):
        await submit(
            _server(raw_smtp),
            None,
            envelope_sender=SENDER,
            envelope_recipients=(RECIPIENT,),
            content=content * 20,
            message_id=MID,
        )
    assert raw_smtp.data == []
