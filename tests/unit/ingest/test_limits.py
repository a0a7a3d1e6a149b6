"""ingest/limits.py: R17 provider limits, refused before sending."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from ingest.limits import (
    QUOTA_WINDOW,
    RULE,
    AttachmentSize,
    LimitCode,
    SendLimits,
    SendRequestSize,
    check_limits,
    extension_of,
)

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
GMAIL = SendLimits(daily_send_limit=3, max_recipients_per_message=2, max_message_bytes=1000)
OUTLOOK = SendLimits(max_attachment_bytes=100, allowed_attachment_types=frozenset({"pdf", "txt"}))


def size(
    recipients: int = 1, message_bytes: int = 10, attachments: tuple[AttachmentSize, ...] = ()
) -> SendRequestSize:
    return SendRequestSize(
        recipient_count=recipients, message_bytes=message_bytes, attachments=attachments
    )


def test_r17_quota_refused_with_reset_time() -> None:
    sends = [NOW - timedelta(hours=h) for h in (30, 20, 10, 1)]  # 30 h ago is outside the window
    refusal = check_limits(GMAIL, size(), sends, NOW)
    assert refusal is not None
    assert refusal.rule == RULE and refusal.code == LimitCode.QUOTA_EXCEEDED
    assert refusal.limit == "daily_send_limit"
    assert refusal.resets_at == NOW - timedelta(hours=20) + QUOTA_WINDOW


def test_r17_quota_allows_below_limit() -> None:
    assert check_limits(GMAIL, size(), [NOW - timedelta(hours=1)] * 2, NOW) is None


def test_r17_quota_reset_with_excess_sends() -> None:
    sends = [NOW - timedelta(hours=h) for h in (5, 4, 3, 2, 1)]  # 5 sent, limit 3
    refusal = check_limits(GMAIL, size(), sends, NOW)
    assert refusal is not None
    assert refusal.resets_at == NOW - timedelta(hours=3) + QUOTA_WINDOW


def test_r17_recipients_per_message() -> None:
    refusal = check_limits(GMAIL, size(recipients=3), [], NOW)
    assert refusal is not None and refusal.code == LimitCode.TOO_MANY_RECIPIENTS
    assert refusal.resets_at is None


def test_r17_total_size() -> None:
    refusal = check_limits(GMAIL, size(message_bytes=1001), [], NOW)
    assert refusal is not None and refusal.code == LimitCode.MESSAGE_TOO_LARGE


def test_r17_attachment_type_and_size() -> None:
    exe = (AttachmentSize(filename="setup.EXE", size_bytes=1),)
    refusal = check_limits(OUTLOOK, size(attachments=exe), [], NOW)
    assert refusal is not None and refusal.code == LimitCode.ATTACHMENT_TYPE_NOT_ALLOWED
    big = (AttachmentSize(filename="a.PDF", size_bytes=101),)
    refusal = check_limits(OUTLOOK, size(attachments=big), [], NOW)
    assert refusal is not None and refusal.code == LimitCode.ATTACHMENT_TOO_LARGE
    ok = (AttachmentSize(filename="a.PDF", size_bytes=100),)
    assert check_limits(OUTLOOK, size(attachments=ok), [], NOW) is None


def test_r17_extension_of() -> None:
    assert extension_of("x.tar.GZ") == "gz"
    assert extension_of(".bashrc") == ""
    assert extension_of("noext") == ""
