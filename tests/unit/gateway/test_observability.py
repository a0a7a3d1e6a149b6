"""Protocol loggers never write credentials (STYLE.md §8)."""

from __future__ import annotations

import base64
import io
import logging

from gateway.observability import RedactingFilter, setup_logging

TOKEN = "ya29.a0AfH6SMBx" + "Q" * 120


def test_authenticate_and_login_lines_are_redacted() -> None:
    blob = base64.b64encode(f"user=a@b.test\x01auth=Bearer {TOKEN}\x01\x01".encode()).decode()
    record = logging.LogRecord(
        "aioimaplib.aioimaplib",
        logging.DEBUG,
        __file__,
        1,
        "Sending : %s",
        (f"A1 AUTHENTICATE XOAUTH2 {blob}",),
        None,
    )
    assert RedactingFilter().filter(record)
    assert TOKEN not in record.getMessage() and blob not in record.getMessage()
    assert "AUTHENTICATE XOAUTH2 [redacted]" in record.getMessage()
    login = logging.LogRecord(
        "imapclient.imaplib", logging.DEBUG, __file__, 1, "> A2 LOGIN bob s3cret", None, None
    )
    RedactingFilter().filter(login)
    assert "s3cret" not in login.getMessage()


def test_other_loggers_untouched_and_protocol_debug_suppressed() -> None:
    stream = io.StringIO()
    setup_logging(logging.DEBUG, json_lines=True)
    root = logging.getLogger()
    root.handlers[0].setStream(stream)  # type: ignore[attr-defined]
    try:
        logging.getLogger("aioimaplib.aioimaplib").debug("A1 AUTHENTICATE XOAUTH2 %s", "x" * 60)
        logging.getLogger("aioimaplib.aioimaplib").info("A1 LOGIN bob secret")
        logging.getLogger("gateway.test").info("message stored")
    finally:
        setup_logging(logging.INFO)
    written = stream.getvalue()
    assert "x" * 60 not in written and "secret" not in written
    assert "LOGIN [redacted]" in written
    assert "message stored" in written
