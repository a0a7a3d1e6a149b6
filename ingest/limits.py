"""R17 provider limits on a CRM send, checked before anything is sent.

Pure: no I/O, no clock (``now`` is a parameter). The caller supplies the
times of the mailbox's sends in the last 24 hours and the composed size.

Checks, in this order (the first broken limit is reported):
``max_recipients_per_message`` → ``allowed_attachment_types`` →
``max_attachment_bytes`` → ``max_message_bytes`` → ``daily_send_limit``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

RULE = "R17"
QUOTA_WINDOW = timedelta(hours=24)


class LimitCode(StrEnum):
    """Error codes of a refused send (also the HTTP API's ``error.code``)."""

    QUOTA_EXCEEDED = "quota_exceeded"
    TOO_MANY_RECIPIENTS = "too_many_recipients"
    MESSAGE_TOO_LARGE = "message_too_large"
    ATTACHMENT_TOO_LARGE = "attachment_too_large"
    ATTACHMENT_TYPE_NOT_ALLOWED = "attachment_type_not_allowed"


@dataclass(frozen=True, slots=True, kw_only=True)
class SendLimits:
    """One provider's limits (``providers.<name>.*``); None means no limit.

    Attributes:
        allowed_attachment_types: lowercase filename extensions without the dot.
    """

    daily_send_limit: int | None = None
    max_recipients_per_message: int | None = None
    max_message_bytes: int | None = None
    max_attachment_bytes: int | None = None
    allowed_attachment_types: frozenset[str] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class AttachmentSize:
    """Name and decoded size of one attachment."""

    filename: str
    size_bytes: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SendRequestSize:
    """What R17 looks at in one send.

    Attributes:
        recipient_count: envelope recipients (To + Cc), after de-duplication.
        message_bytes: the composed RFC 5322 message as transmitted (CRLF).
        attachments: in order.
    """

    recipient_count: int
    message_bytes: int
    attachments: tuple[AttachmentSize, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitRefusal:
    """A send refused under R17.

    Attributes:
        rule: always ``R17``.
        code: which kind of limit.
        limit: the config key broken, e.g. ``daily_send_limit``.
        reason: human text naming the limit and the values.
        resets_at: for the quota, when the oldest counted send leaves the
            rolling 24 h window and one more send is allowed; else None.
    """

    rule: str
    code: LimitCode
    limit: str
    reason: str
    resets_at: datetime | None = None


def check_limits(
    limits: SendLimits,
    request: SendRequestSize,
    recent_sends_at: Iterable[datetime],
    now: datetime,
) -> LimitRefusal | None:
    """Return the first R17 limit ``request`` would break, or None.

    Args:
        limits: the provider's limits.
        request: sizes of the send.
        recent_sends_at: aware times of this mailbox's earlier sends (any
            order; those older than 24 h before ``now`` are ignored).
        now: aware current time.

    Returns:
        None when allowed, else a ``LimitRefusal``.
    """
    for check in (_recipients, _types, _attachment_sizes, _message_size):
        refusal = check(limits, request)
        if refusal is not None:
            return refusal
    return _quota(limits, recent_sends_at, now)


def extension_of(filename: str) -> str:
    """Return the lowercase extension of ``filename`` without the dot ("" if none)."""
    base = filename.rsplit("/", 1)[-1].rsplit("\\", 1)[-1]
    return base.rsplit(".", 1)[1].lower() if "." in base.strip(".") else ""


def _refusal(code: LimitCode, limit: str, reason: str) -> LimitRefusal:
    return LimitRefusal(rule=RULE, code=code, limit=limit, reason=reason)


def _recipients(limits: SendLimits, request: SendRequestSize) -> LimitRefusal | None:
    cap = limits.max_recipients_per_message
    if cap is None or request.recipient_count <= cap:
        return None
    return _refusal(
        LimitCode.TOO_MANY_RECIPIENTS,
        "max_recipients_per_message",
        f"{request.recipient_count} recipients; max_recipients_per_message is {cap}",
    )


def _types(limits: SendLimits, request: SendRequestSize) -> LimitRefusal | None:
    allowed = limits.allowed_attachment_types
    if allowed is None:
        return None
    for attachment in request.attachments:
        if extension_of(attachment.filename) not in allowed:
            return _refusal(
                LimitCode.ATTACHMENT_TYPE_NOT_ALLOWED,
                "allowed_attachment_types",
                f"attachment {attachment.filename!r}: type not in allowed_attachment_types "
                f"({', '.join(sorted(allowed))})",
            )
    return None


def _attachment_sizes(limits: SendLimits, request: SendRequestSize) -> LimitRefusal | None:
    cap = limits.max_attachment_bytes
    if cap is None:
        return None
    for attachment in request.attachments:
        if attachment.size_bytes > cap:
            return _refusal(
                LimitCode.ATTACHMENT_TOO_LARGE,
                "max_attachment_bytes",
                f"attachment {attachment.filename!r} is {attachment.size_bytes} bytes; "
                f"max_attachment_bytes is {cap}",
            )
    return None


def _message_size(limits: SendLimits, request: SendRequestSize) -> LimitRefusal | None:
    cap = limits.max_message_bytes
    if cap is None or request.message_bytes <= cap:
        return None
    return _refusal(
        LimitCode.MESSAGE_TOO_LARGE,
        "max_message_bytes",
        f"message is {request.message_bytes} bytes; max_message_bytes is {cap}",
    )


def _quota(
    limits: SendLimits, recent_sends_at: Iterable[datetime], now: datetime
) -> LimitRefusal | None:
    cap = limits.daily_send_limit
    if cap is None:
        return None
    window_start = now - QUOTA_WINDOW
    counted = sorted(at for at in recent_sends_at if window_start < at <= now)
    if len(counted) < cap:
        return None
    # One more send is allowed once len(counted) - cap + 1 of them have left the window.
    resets_at = counted[len(counted) - cap] + QUOTA_WINDOW
    return LimitRefusal(
        rule=RULE,
        code=LimitCode.QUOTA_EXCEEDED,
        limit="daily_send_limit",
        reason=f"{len(counted)} messages sent in the last 24 h; daily_send_limit is {cap}",
        resets_at=resets_at,
    )
