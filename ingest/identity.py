"""Deduplication identity of a message (R12).

The same message seen again (its Sent-folder copy, the BCC-delivered copy,
INBOX and All Mail, a reconnect, an SMTP redelivery, a mailing-list copy)
must get the same key; two different messages that reuse one Message-ID
must not. The key is the Message-ID plus a short digest of the few header
fields that survive transport unchanged: the From address keys, the Date
in UTC to the second, and the Subject stripped of the tags and prefixes
that lists and bug trackers add. Without a Message-ID, the digest covers
more headers and the body text. docs/threading.md gives the reasons and
the corpus figures.

Pure: no I/O, no clock, no logging. Never raises on a ParsedMessage.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable

from ingest.types import Address, Identity, ParsedMessage

DIGEST_VERSION = "r12v1"
"""Changes whenever the digest input changes, so old and new keys never meet."""

MID_DIGEST_HEX_CHARS = 16
"""Hex characters of the digest kept in a Message-ID based key (64 bits)."""

MID_KEY_PREFIX = "mid:"
DIGEST_KEY_PREFIX = "digest:"

# Leading subject decorations that transport adds or removes: list tags
# ("[Pkg-emacsen-addons] "), Debbugs' "Bug#916805: ", reply/forward markers
# that trackers strip ("Re: ", "AW: ", "Fwd: ").
_SUBJECT_DECORATION = re.compile(
    r"""^(?:
        \[[^\]]*\]                                  # [list-tag]
      | bug\s*\#\s*\d+\s*:                          # Debbugs
      | (?:re|aw|sv|vs|antw|odp|fwd?|wg|tr|rv)      # reply / forward markers
        (?:\[\d+\]|\^\d+)?\s*:
    )\s*""",
    re.IGNORECASE | re.VERBOSE,
)


def identify(parsed: ParsedMessage) -> Identity:
    """Return the deduplication identity of a parsed message (R12).

    With a Message-ID the key is ``mid:<message_id>:<16 hex>``, the hex
    being the start of a SHA-256 over the From address keys (sorted), the
    Date in UTC to the second and the subject core (see ``subject_core``).
    Transport headers (Received, Return-Path, DKIM, Delivered-To), Bcc,
    To/Cc and the body are left out, so every delivered or stored copy of
    one message agrees, while a reused Message-ID on a different message
    (other sender, time or subject) gives another key.

    Without a Message-ID the key is ``digest:<64 hex>``, over the same
    fields plus the To and Cc address keys and a hash of the decoded
    content (bodies, attachments), so two distinct id-less messages with
    equal headers do not merge.

    Args:
        parsed: the parsed message.

    Returns:
        Identity(key, message_id, header_digest); ``header_digest`` is the
        full 64-character lowercase hex digest the key was built from.
        Equal keys mean "the same message"; the key is a pure function of
        the parsed values, so it is stable when the bytes are re-parsed.
    """
    fields = _header_fields(parsed)
    if parsed.message_id is None:
        fields += (
            ("to", _address_keys(parsed.participants.to)),
            ("cc", _address_keys(parsed.participants.cc)),
            ("body", _body_hash(parsed)),
        )
        digest = _digest(fields)
        return Identity(key=DIGEST_KEY_PREFIX + digest, message_id=None, header_digest=digest)
    digest = _digest(fields)
    key = f"{MID_KEY_PREFIX}{parsed.message_id}:{digest[:MID_DIGEST_HEX_CHARS]}"
    return Identity(key=key, message_id=parsed.message_id, header_digest=digest)


def subject_core(subject: str) -> str:
    """Return the subject without the decorations that transport changes.

    Leading list tags (``[list] ``), Debbugs markers (``Bug#123: ``) and
    reply/forward prefixes (``Re:``, ``AW:``, ``Fwd:``; repeated) are
    removed, whitespace is collapsed, the text is NFC-normalised and
    casefolded. Words inside the subject are kept.

    Args:
        subject: decoded Subject header, "" when absent.

    Returns:
        The comparison form; "" for an empty or all-decoration subject.
    """
    text = " ".join(unicodedata.normalize("NFC", subject).split())
    while True:
        stripped = _SUBJECT_DECORATION.sub("", text, count=1)
        if stripped == text:
            break
        text = stripped
    return text.casefold()


def _header_fields(parsed: ParsedMessage) -> tuple[tuple[str, str], ...]:
    """Return the identity fields every copy of a message shares."""
    if parsed.date_at is not None:
        date_at = parsed.date_at
        # Header dates have whole seconds; replace() is only needed otherwise.
        date_text = (date_at.replace(microsecond=0) if date_at.microsecond else date_at).isoformat()
    else:
        date_text = "raw:" + " ".join((parsed.raw_date or "").split())
    return (
        ("v", DIGEST_VERSION),
        ("from", _address_keys(parsed.participants.from_)),
        ("date", date_text),
        ("subject", subject_core(parsed.subject)),
    )


def _address_keys(addresses: Iterable[Address]) -> str:
    """Return the sorted, unique address keys joined by commas."""
    return ",".join(sorted({str(a.address_key) for a in addresses}))


def _body_hash(parsed: ParsedMessage) -> str:
    """Hash the decoded content: text and HTML bodies, attachments, embedded messages.

    Bodies have line ends and trailing blanks normalised; attachments and
    embedded messages count by their SHA-256, in MIME order. Transport
    leaves all of these unchanged, so every copy agrees.
    """
    parts = [
        "text:" + _normalise_body(parsed.text_body),
        "html:" + _normalise_body(parsed.html_body),
        "attachments:" + ",".join(a.sha256 for a in parsed.attachments),
        "embedded:" + ",".join(hashlib.sha256(raw).hexdigest() for raw in parsed.embedded),
    ]
    return hashlib.sha256("\n".join(parts).encode("utf-8", "surrogatepass")).hexdigest()


def _normalise_body(body: str | None) -> str:
    """Return a body with LF line ends, no trailing blanks, no edge blank lines."""
    if body is None:
        return "-"
    lines = [line.rstrip() for line in body.replace("\r\n", "\n").split("\n")]
    return "\n".join(lines).strip("\n")


def _digest(fields: Iterable[tuple[str, str]]) -> str:
    """SHA-256 over ``name=value`` lines; newlines in values are escaped."""
    lines = (f"{name}={value.replace(chr(10), chr(92) + 'n')}" for name, value in fields)
    return hashlib.sha256("\n".join(lines).encode("utf-8", "surrogatepass")).hexdigest()
