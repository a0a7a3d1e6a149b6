"""The DATA phase of one SMTP transaction, streamed: line ends, dot-stuffing, SIZE, writing.

Edge module. ``data_chunks`` and ``normalised_size`` are pure (bytes in,
bytes or an int out); ``stream_data`` drives an open, authenticated
aiosmtplib client from ``DATA`` to the reply after the terminator, and
tells a failure before the terminator (nothing accepted) from one after
it (``ReplyLost``: the outcome is unknown). It does
not open, authenticate, reset or close sessions beyond dropping one that
fell out of step, nor classify errors (``gateway.smtp.sender`` does both).

Why: aiosmtplib 5.1.3's ``data()`` makes three whole copies of the content
(line ends, dot-stuffing, terminator) and ``sendmail`` a fourth for SIZE;
a 25 MB message cost ~122 MB there. Here the content is read through a
``memoryview`` in ``DATA_CHUNK_BYTES`` steps and written as it is produced.

Follows RFC 5321 §2.3.8 (CRLF line ends), §4.5.2 (transparency:
dot-stuffing), §4.1.1.4 (DATA, ``354``, the ``CRLF . CRLF`` terminator)
and RFC 1870 §3 (the SIZE value).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator

import aiosmtplib
from aiosmtplib.protocol import SMTPProtocol

START_MAIL_INPUT = 354
"""RFC 5321 §4.1.1.4: the reply to DATA that invites the content."""
COMPLETED = 250
"""RFC 5321 §4.1.1.4: the reply after the terminator when the message is accepted."""
DATA_CHUNK_BYTES = 64 * 1024
"""Content bytes normalised, dot-stuffed and written per step of DATA."""
_LINE_ENDINGS = re.compile(rb"\r\n|\n|\r(?!\n)")  # aiosmtplib.protocol.LINE_ENDINGS_REGEX
TERMINATOR = b".\r\n"
"""RFC 5321 §4.1.1.4: the last line of the mail data (after the content's final CRLF)."""


class ReplyLost(Exception):
    """The end of the mail data was written, but no reply came (timeout or dropped connection).

    The server may have accepted the message (RFC 5321 §4.1.1.4 and §6.1:
    the message is the server's once it answers 250, and that answer may
    be what was lost), so the outcome is unknown: a resend could deliver a
    second copy. ``__cause__`` holds the timeout or connection error.
    """


def normalised_chunks(content: bytes, chunk_bytes: int = DATA_CHUNK_BYTES) -> Iterator[bytes]:
    """Yield ``content`` with every line ending made CRLF, ending in CRLF (RFC 5321 §2.3.8).

    Lone CR and lone LF become CRLF, as ``aiosmtplib``'s
    ``normalize_message_line_endings`` does; content not ending in CRLF
    (including empty content) gets one. A CR at the end of a chunk is held
    back to the next one, so a CRLF split across chunks stays one line end.

    Args:
        content: the message; read through a ``memoryview``, never copied whole.
        chunk_bytes: how much of ``content`` each step reads (≥ 1).

    Returns:
        An iterator of non-empty chunks, each at most ``chunk_bytes`` + 1
        bytes of input long before normalisation.
    """
    view = memoryview(content)
    carry = b""
    ends_with_crlf = False
    for start in range(0, len(view), chunk_bytes):
        piece = carry + view[start : start + chunk_bytes].tobytes()
        carry = b""
        if piece.endswith(b"\r") and start + chunk_bytes < len(view):
            piece, carry = piece[:-1], b"\r"
        normalised = _LINE_ENDINGS.sub(b"\r\n", piece)
        if normalised:
            ends_with_crlf = normalised.endswith(b"\r\n")
            yield normalised
    if not ends_with_crlf:
        yield b"\r\n"


def data_chunks(content: bytes, chunk_bytes: int = DATA_CHUNK_BYTES) -> Iterator[bytes]:
    """Yield what goes on the wire after ``354``: the mail data, dot-stuffed, then ``.CRLF``.

    Follows RFC 5321 §4.5.2 (a line starting with "." gets one more "."),
    §4.1.1.4 (the data ends with CRLF "." CRLF) and §2.3.8 (CRLF line
    ends, see ``normalised_chunks``). The concatenation equals, byte for
    byte, what ``aiosmtplib.SMTP.data`` 5.1.3 writes for the same content.

    Args:
        content: the message bytes (RFC 5322).
        chunk_bytes: how much of ``content`` each chunk covers (≥ 1).

    Returns:
        An iterator of non-empty chunks; the last one is ``b".\\r\\n"``.
    """
    yield from stuffed_chunks(content, chunk_bytes)
    yield TERMINATOR


def stuffed_chunks(content: bytes, chunk_bytes: int = DATA_CHUNK_BYTES) -> Iterator[bytes]:
    """Yield ``data_chunks`` without the final ``TERMINATOR`` (RFC 5321 §4.5.2 dot-stuffing).

    Args:
        content: the message bytes (RFC 5322).
        chunk_bytes: how much of ``content`` each chunk covers (≥ 1).

    Returns:
        An iterator of non-empty chunks ending in CRLF, dot-stuffed.
    """
    at_line_start = True
    for chunk in normalised_chunks(content, chunk_bytes):
        stuffed = chunk.replace(b"\n.", b"\n..")  # every "\n" ends a line after normalising
        yield b"." + stuffed if at_line_start and chunk.startswith(b".") else stuffed
        at_line_start = chunk.endswith(b"\n")


def normalised_size(content: bytes) -> int:
    """Return the SIZE of ``content`` as transmitted, in bytes (RFC 1870 §3).

    That is the length with CRLF line ends (``normalised_chunks``), without
    dot-stuffing or the terminator. Content that is CRLF throughout and ends
    in CRLF (every composed message) is counted without a copy.
    """
    crlf = content.count(b"\r\n")
    if content.count(b"\r") == crlf == content.count(b"\n") and content.endswith(b"\r\n"):
        return len(content)
    return sum(len(chunk) for chunk in normalised_chunks(content))


async def stream_data(client: aiosmtplib.SMTP, content: bytes, timeout_seconds: float) -> str:
    """Send ``DATA``, then ``data_chunks(content)`` with flow control; return the reply text.

    RFC 5321 §4.1.1.4: ``DATA`` → ``354`` → the content → ``.CRLF`` → reply.
    Uses aiosmtplib's public ``execute_command`` and ``SMTPProtocol.write`` /
    ``read_response``. Waiting for the transport's buffer to drain uses
    ``SMTPProtocol._drain_helper``, the stdlib flow-control hook that
    aiosmtplib's ``FlowControlMixin`` keeps for exactly this (5.1.3 has no
    public streaming DATA). The reply is awaited from before the first
    chunk, so an early answer (a 552 mid-transfer) stops the writing; the
    connection is then out of step and is closed.

    Args:
        client: connected, past a successful MAIL FROM and at least one RCPT TO.
        content: the message bytes (RFC 5322), any line ends.
        timeout_seconds: limit for each drain and for the final reply.

    Returns:
        The text of the ``250`` reply (no code).

    Raises:
        aiosmtplib.SMTPDataError: DATA not answered ``354``, or the final
            reply is not ``250`` (the connection stays open and in step
            unless the reply came before the terminator).
        aiosmtplib.SMTPServerDisconnected, OSError, TimeoutError: the
            connection failed before the end of the data was written; it
            is closed (the server cannot have accepted the message).
        ReplyLost: the end of the data (``.CRLF``) was written, then the
            reply timed out or the connection failed; it is closed and the
            outcome is unknown (the server may have accepted it).
    """
    start = await client.execute_command(b"DATA")
    if start.code != START_MAIL_INPUT:
        raise aiosmtplib.SMTPDataError(start.code, start.message)
    protocol = client.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    reply = asyncio.ensure_future(protocol.read_response(timeout=None))
    ended = False  # the terminator is in the transport: the server may accept from here on
    try:
        for chunk in stuffed_chunks(content):
            if not await _write(protocol, chunk, reply, timeout_seconds):
                client.close()  # answered before the end of the data: out of step, drop it
                break
        else:
            ended = not reply.done()  # else _write writes nothing
            await _write(protocol, TERMINATOR, reply, timeout_seconds)
        response = await asyncio.wait_for(reply, timeout_seconds)
    except (TimeoutError, OSError, aiosmtplib.SMTPServerDisconnected) as exc:
        reply.cancel()
        client.close()
        if ended:
            raise ReplyLost(f"no reply after the end of the data: {type(exc).__name__}") from exc
        raise
    except BaseException:
        reply.cancel()
        client.close()
        raise
    if response.code != COMPLETED:
        raise aiosmtplib.SMTPDataError(response.code, response.message)
    return response.message


async def _write(
    protocol: SMTPProtocol,
    chunk: bytes,
    reply: asyncio.Future[aiosmtplib.SMTPResponse],
    timeout_seconds: float,
) -> bool:
    """Write ``chunk`` and wait for the buffer to drain; False (nothing written) if answered."""
    if reply.done():
        return False
    protocol.write(chunk)
    async with asyncio.timeout(timeout_seconds):
        await protocol._drain_helper()
    return True
