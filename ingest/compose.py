"""Build the RFC 5322 bytes of a message sent from the CRM (R1, R16).

Pure: no I/O, no clock, no randomness. The Message-ID, the Date and every
other variable input are parameters, so the same ``Draft`` always gives the
same bytes (the outbound queue stores them before the first attempt, and a
retry resends exactly those bytes).

Structure (RFC 2046)::

    multipart/mixed                      (only with attachments)
      multipart/alternative              (only when there is HTML)
        text/plain                       (given, or derived from the HTML)
        text/html                        (sanitised with nh3 / Ammonia)
      application/… ; filename*=utf-8''… (RFC 2231, one per attachment)

Outlook threading: Outlook and Exchange group a conversation by the
``Thread-Index`` header (MS-OXOMSG §2.2.1.3, PidTagConversationIndex: a
22-byte header block — the top 6 bytes of a FILETIME and a GUID — plus one
5-byte child block per reply) and show ``Thread-Topic`` (the subject without
reply prefixes). A reply extends the parent's Thread-Index by one child
block, so Outlook files it in the parent's conversation; when the parent has
none, a new index is started and Exchange links by In-Reply-To/References.
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy
from email.headerregistry import Address as HeaderAddress
from email.message import EmailMessage
from email.utils import format_datetime, getaddresses

import nh3

from ingest.forward import html_to_text
from ingest.types import MessageId

THREAD_INDEX_HEADER_BYTES = 22
THREAD_INDEX_CHILD_BYTES = 5
_FILETIME_EPOCH_OFFSET_SECONDS = 11_644_473_600  # 1601-01-01 → 1970-01-01
_FILETIME_TICKS_PER_SECOND = 10_000_000
_BASE64_BLOCK_BYTES = 57 * 1000  # whole 76-character lines (RFC 2045 §6.8)
_REPLY_PREFIX = re.compile(r"^\s*((re|fw|fwd|aw|wg|sv|vs)\s*(\[\d+\])?\s*:\s*)+", re.I)


@dataclass(frozen=True, slots=True, kw_only=True)
class OutgoingAttachment:
    """One file to attach.

    Attributes:
        filename: the name shown to the recipient (any Unicode; encoded per RFC 2231).
        content_type: ``maintype/subtype``; ``application/octet-stream`` when unknown.
        payload: the file's bytes.
    """

    filename: str
    content_type: str
    payload: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class ParentRef:
    """What a reply needs of the message it answers (RFC 5322 §3.6.4).

    Attributes:
        message_id: the parent's Message-ID, no angle brackets.
        references: the parent's References, oldest first.
        thread_index: the parent's raw ``Thread-Index`` value (base64), or None.
    """

    message_id: MessageId
    references: tuple[MessageId, ...] = ()
    thread_index: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Draft:
    """Everything that goes into one composed message.

    Attributes:
        from_name: the user's display name ("" for none).
        from_address: the mailbox (or relay sender) addr-spec.
        to, cc: recipients as ``"Name <addr>"`` or bare addr-specs, header order.
        subject: the subject, Unicode (RFC 2047-encoded on output when needed).
        text, html: the bodies; at least one must be given. HTML is sanitised.
        attachments: in the order they are shown.
        message_id: our Message-ID, no angle brackets (made by the caller).
        date_at: aware datetime for the Date header.
        parent: the message replied to, or None for a new thread.
    """

    from_name: str
    from_address: str
    to: tuple[str, ...]
    cc: tuple[str, ...] = ()
    subject: str
    text: str | None = None
    html: str | None = None
    attachments: tuple[OutgoingAttachment, ...] = ()
    message_id: MessageId
    date_at: datetime
    parent: ParentRef | None = None


def compose(draft: Draft) -> bytes:
    """Return the RFC 5322 bytes (CRLF line ends) of ``draft``.

    Follows RFC 5322 §3.6 (header fields), RFC 2046 (multipart), RFC 2047
    (encoded words for non-ASCII names and subjects) and RFC 2231
    (attachment filenames), through ``email.message.EmailMessage`` and
    ``email.policy.SMTP``.

    Memory: the email package builds the message with a short marker in
    place of each attachment; the base64 of each payload (RFC 2045 §6.8,
    76-character lines, as ``email.contentmanager`` writes it) is then
    streamed into one output buffer, 57 KiB of payload at a time. The
    result is the very bytes ``EmailMessage.as_bytes`` gives for the full
    message, at about one copy of the output instead of four (a 25 MB
    message: 103 MB → ~27 MB; bench/bench_send.py).

    Raises:
        ValueError: neither text nor HTML given, no recipient, or a naive date.
    """
    if draft.text is None and draft.html is None:
        raise ValueError("a message needs a text or an HTML body")
    if not draft.to and not draft.cc:
        raise ValueError("a message needs at least one recipient")
    if draft.date_at.tzinfo is None:
        raise ValueError("date_at must be timezone-aware")
    markers = tuple(_marker(draft.message_id, i) for i in range(len(draft.attachments)))
    skeleton = _build(draft, markers).as_bytes(policy=policy.SMTP)
    out = io.BytesIO()
    position = 0
    for marker, attachment in zip(markers, draft.attachments, strict=True):
        line = b"\r\n" + base64.b64encode(marker) + b"\r\n"
        at = skeleton.find(line, position)
        if at < 0 or skeleton.find(line, at + len(line)) >= 0:  # not exactly once: a body holds it
            return _build(draft, tuple(a.payload for a in draft.attachments)).as_bytes(
                policy=policy.SMTP
            )
        out.write(skeleton[position : at + 2])
        write_base64_lines(out, attachment.payload)
        position = at + len(line)
    out.write(skeleton[position:])
    return out.getvalue()  # BytesIO hands over its buffer: no copy


def write_base64_lines(out: io.BytesIO, payload: bytes) -> None:
    """Write ``payload`` as base64 lines of 76 characters, each ending in CRLF.

    Exactly what ``email.contentmanager.set_bytes_content`` (policy
    ``SMTP``, ``max_line_length`` 78 → 57 bytes a line) puts in a body
    (RFC 2045 §6.8); an empty payload writes nothing. Encodes 1000 lines
    at a time from a ``memoryview``, so no copy of the whole payload is made.
    """
    view = memoryview(payload)
    for start in range(0, len(view), _BASE64_BLOCK_BYTES):
        encoded = base64.encodebytes(view[start : start + _BASE64_BLOCK_BYTES])
        out.write(encoded.replace(b"\n", b"\r\n"))


def _marker(message_id: str, index: int) -> bytes:
    digest = hashlib.sha256(f"{message_id}/{index}".encode()).hexdigest()[:32]
    return f"mailgate-attachment-{index}-{digest}".encode("ascii")


def _build(draft: Draft, payloads: tuple[bytes, ...]) -> EmailMessage:
    msg = EmailMessage(policy=policy.SMTP)
    _set_headers(msg, draft)
    _set_body(msg, draft)
    for attachment, payload in zip(draft.attachments, payloads, strict=True):
        maintype, _, subtype = attachment.content_type.partition("/")
        msg.add_attachment(
            payload,
            maintype=maintype or "application",
            subtype=subtype or "octet-stream",
            filename=attachment.filename,
        )
    _set_boundaries(msg, draft.message_id)
    return msg


def sanitise_html(html: str) -> str:
    """Return ``html`` with scripts, event handlers and unsafe URLs removed (nh3 defaults)."""
    return nh3.clean(html)


def thread_topic(subject: str) -> str:
    """Return the subject without reply/forward prefixes (Outlook's Thread-Topic)."""
    return _REPLY_PREFIX.sub("", subject).strip()


def references_for(parent: ParentRef) -> tuple[MessageId, ...]:
    """Return a reply's References: the parent's References, then the parent's id.

    Follows RFC 5322 §3.6.4; duplicates are dropped, first occurrence kept.
    """
    seen: dict[MessageId, None] = {}
    for mid in (*parent.references, parent.message_id):
        seen.setdefault(mid, None)
    return tuple(seen)


def thread_index(draft: Draft) -> str:
    """Return the base64 ``Thread-Index`` for ``draft`` (MS-OXOMSG §2.2.1.3).

    A new thread gets a 22-byte header block: the top 48 bits of the
    FILETIME of ``date_at`` and a GUID derived from the Message-ID (so no
    randomness is needed). A reply to a parent with a valid Thread-Index
    appends a 5-byte child block: delta code 0 and the time since the
    header's time in units of 2**18 ticks (or code 1 and 2**23 ticks when
    that overflows 31 bits), then a nibble derived from the Message-ID and
    a 4-bit sequence.
    """
    digest = hashlib.sha256(draft.message_id.encode("utf-8")).digest()
    now_ticks = _filetime(draft.date_at)
    parent = _decode_index(draft.parent.thread_index) if draft.parent else None
    if parent is None:
        header = (now_ticks >> 16).to_bytes(6, "big") + digest[:16]
        return base64.b64encode(header).decode("ascii")
    header_ticks = int.from_bytes(parent[:6], "big") << 16
    delta = max(0, now_ticks - header_ticks)
    if delta >> 18 < 1 << 31:
        value = delta >> 18
    else:
        value = (1 << 31) | ((delta >> 23) & ((1 << 31) - 1))
    child = value.to_bytes(4, "big") + bytes([(digest[0] & 0xF0) | (len(parent) // 5 & 0x0F)])
    return base64.b64encode(parent + child).decode("ascii")


def _decode_index(value: str | None) -> bytes | None:
    if not value:
        return None
    try:
        raw = base64.b64decode("".join(value.split()), validate=True)
    except ValueError:
        return None
    if len(raw) < THREAD_INDEX_HEADER_BYTES:
        return None
    if (len(raw) - THREAD_INDEX_HEADER_BYTES) % THREAD_INDEX_CHILD_BYTES:
        return None
    return raw


def _filetime(at: datetime) -> int:
    seconds = at.astimezone(UTC).timestamp() + _FILETIME_EPOCH_OFFSET_SECONDS
    return int(seconds * _FILETIME_TICKS_PER_SECOND)


def _set_headers(msg: EmailMessage, draft: Draft) -> None:
    msg["From"] = HeaderAddress(display_name=draft.from_name, addr_spec=draft.from_address)
    if draft.to:
        msg["To"] = _addresses(draft.to)
    if draft.cc:
        msg["Cc"] = _addresses(draft.cc)
    msg["Subject"] = draft.subject
    msg["Date"] = format_datetime(draft.date_at)
    msg["Message-ID"] = f"<{draft.message_id}>"
    if draft.parent is not None:
        msg["In-Reply-To"] = f"<{draft.parent.message_id}>"
        msg["References"] = " ".join(f"<{m}>" for m in references_for(draft.parent))
    msg["Thread-Topic"] = thread_topic(draft.subject)
    msg["Thread-Index"] = thread_index(draft)


def _addresses(values: tuple[str, ...]) -> tuple[HeaderAddress, ...]:
    return tuple(
        HeaderAddress(display_name=name, addr_spec=addr)
        for name, addr in getaddresses(list(values))
        if addr
    )


def _set_boundaries(msg: EmailMessage, message_id: str) -> None:
    # The email package draws boundaries from ``random``; derive them from
    # the Message-ID instead so that compose() is a pure function.
    seed = hashlib.sha256(message_id.encode("utf-8")).hexdigest()[:24]
    for depth, part in enumerate(p for p in msg.walk() if p.is_multipart()):
        part.set_boundary(f"=_mailgate_{seed}_{depth}")


def _set_body(msg: EmailMessage, draft: Draft) -> None:
    html = sanitise_html(draft.html) if draft.html is not None else None
    text = draft.text if draft.text is not None else html_to_text(html or "")
    msg.set_content(text)
    if html is not None:
        msg.add_alternative(html, subtype="html")
