"""DATA streaming in gateway.smtp.data: the bytes aiosmtplib 5.1.3 writes (RFC 5321 §4.5.2)."""

from __future__ import annotations

import random

import pytest
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings

from gateway.smtp.data import data_chunks, normalised_chunks, normalised_size


def aiosmtplib_data(content: bytes) -> bytes:
    """What ``SMTPProtocol.execute_data_command`` writes after the 354 reply."""
    return PERIOD_REGEX.sub(b"..", normalize_message_line_endings(content)) + b".\r\n"


TRICKY = {
    "empty": b"",
    "dot_only": b".",
    "leading_dot": b".hidden\r\nbody\r\n",
    "dot_line": b"a\r\n.\r\nb\r\n",
    "double_dots": b"..\r\n...\r\n",
    "bare_lf": b"a\n.b\nc",
    "bare_cr": b"a\r.b\rc\r",
    "mixed": b"a\r\n\n\r\r\n.\n\r.",
    "no_final_newline": b"Subject: x\r\n\r\nlast line",
    "crlf_only": b"\r\n",
    "cr_at_end": b"abc\r",
    "lf_dot_at_end": b"abc\n.",
    "terminator_inside": b"x\r\n.\r\n.\r\ny",
}


@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 5, 64 * 1024])
@pytest.mark.parametrize("name", sorted(TRICKY))
def test_data_chunks_equal_aiosmtplib(name: str, chunk_bytes: int) -> None:
    content = TRICKY[name]
    assert b"".join(data_chunks(content, chunk_bytes)) == aiosmtplib_data(content)


@pytest.mark.parametrize("chunk_bytes", [4, 5])
def test_crlf_split_across_chunks_stays_one_line_end(chunk_bytes: int) -> None:
    # "abc\r" | "\n.x": the CR ends one chunk, the LF and the dot start the next
    content = b"abc\r\n.x\r\n"
    chunks = list(normalised_chunks(content, chunk_bytes))
    assert b"".join(chunks) == content
    assert b"".join(data_chunks(content, chunk_bytes)) == b"abc\r\n..x\r\n.\r\n"


def test_dot_at_chunk_start_mid_line_is_not_stuffed() -> None:
    assert b"".join(data_chunks(b"ab.c\r\n", 2)) == b"ab.c\r\n.\r\n"
    assert b"".join(data_chunks(b"ab\r\n.c\r\n", 4)) == b"ab\r\n..c\r\n.\r\n"


def test_random_content_equal_aiosmtplib() -> None:
    rng = random.Random(5321)
    alphabet = b".\r\nab"
    for _ in range(400):
        content = bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 60)))
        for chunk_bytes in (1, 3, 7, 16):
            got = b"".join(data_chunks(content, chunk_bytes))
            assert got == aiosmtplib_data(content), (content, chunk_bytes)
            size = sum(len(c) for c in normalised_chunks(content, chunk_bytes))
            assert size == len(normalize_message_line_endings(content))


@pytest.mark.parametrize("name", sorted(TRICKY))
def test_normalised_size_is_rfc1870_size(name: str) -> None:
    content = TRICKY[name]
    assert normalised_size(content) == len(normalize_message_line_endings(content))


def test_large_message_streams_in_bounded_chunks() -> None:
    line = b".dotted line of a composed message\r\n"
    content = line * 50_000
    chunks = list(data_chunks(content))
    assert b"".join(chunks) == aiosmtplib_data(content)
    assert len(chunks) > 20
    assert max(len(c) for c in chunks) <= 2 * 64 * 1024 + 1
