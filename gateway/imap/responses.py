"""Pure parsing of IMAP server responses into typed records (RFC 9051, RFC 6154, RFC 2177).

Pure: no I/O, no clock, no logging. Input is what aioimaplib 2.0.3 hands
back: a list of response lines (bytes, untagged ``* `` prefix already
removed; the tagged completion text last) with each literal as a
``bytearray`` right after the line that announced it. FETCH, LIST and
other structured data go through imapclient 4.1.0's tested
``response_parser`` (its lexer handles quoting, literals and nesting),
never through a home-made parser.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from imapclient import imap_utf7
from imapclient.exceptions import ProtocolError
from imapclient.response_parser import parse_fetch_response, parse_response

from ingest.types import Uid, UidValidity

Line = bytes | bytearray
"""One element of an aioimaplib ``Response.lines``: a line, or a literal's bytes."""

AUTHENTICATION_FAILED = b"[AUTHENTICATIONFAILED]"
"""RFC 5530 response code of a rejected login (an expired OAuth token, a wrong password)."""

GMAIL_EXTENSION = "X-GM-EXT-1"
"""Capability of Gmail's IMAP extensions (X-GM-MSGID, X-GM-THRID)."""

FOLDER_ROLES = {"inbox": None, "sent": b"\\Sent", "all": b"\\All"}
"""Folder role → RFC 6154 special-use attribute (INBOX is named, not flagged)."""

_CODE = re.compile(rb"\[(UIDVALIDITY|UIDNEXT|HIGHESTMODSEQ) (\d+)\]", re.IGNORECASE)
_EXISTS = re.compile(rb"^(\d+) EXISTS", re.IGNORECASE)
_FETCH_PREFIX = re.compile(rb"^(\d+) FETCH ", re.IGNORECASE)
_FETCH_DATA = re.compile(rb"^\d+ \(")
_SEARCH = re.compile(rb"^SEARCH\b(.*)$", re.IGNORECASE)


class ResponseError(ValueError):
    """A server response could not be parsed (a protocol error, not bad mail)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SelectInfo:
    """What SELECT said about a folder (RFC 9051 §6.3.2, §7.1).

    Attributes:
        uidvalidity: the folder's UIDVALIDITY.
        uidnext: the predicted next UID, or None when the server omitted it.
        exists: number of messages.
        highestmodseq: CONDSTORE HIGHESTMODSEQ (RFC 7162), or None.
    """

    uidvalidity: UidValidity
    uidnext: Uid | None
    exists: int
    highestmodseq: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class FolderInfo:
    """One LIST entry (RFC 9051 §7.3.1, RFC 6154 attributes).

    Attributes:
        name: decoded folder name (modified UTF-7 decoded, RFC 9051 §5.1.3).
        wire_name: the name as sent on the wire, for SELECT.
        flags: attributes, lower-cased bytes such as ``b"\\\\sent"``.
    """

    name: str
    wire_name: str
    flags: frozenset[bytes]


@dataclass(frozen=True, slots=True, kw_only=True)
class FetchedMessage:
    """One message of a UID FETCH (RFC 9051 §7.5.2).

    Attributes:
        uid: the message's UID.
        raw: BODY[] exactly as sent.
        internal_date: INTERNALDATE, aware UTC, or None.
        x_gm_msgid, x_gm_thrid: Gmail ids when requested and given.
    """

    uid: Uid
    raw: bytes
    internal_date: datetime | None
    x_gm_msgid: int | None = None
    x_gm_thrid: int | None = None


def parse_select(lines: Sequence[Line]) -> SelectInfo:
    """Read UIDVALIDITY, UIDNEXT, EXISTS and HIGHESTMODSEQ from a SELECT response.

    Raises:
        ResponseError: no UIDVALIDITY (RFC 9051 §6.3.2 makes it mandatory).
    """
    codes: dict[bytes, int] = {}
    exists = 0
    for line in lines:
        if isinstance(line, bytearray):
            continue
        for name, value in _CODE.findall(line):
            codes[name.upper()] = int(value)
        if match := _EXISTS.match(line):
            exists = int(match.group(1))
    if b"UIDVALIDITY" not in codes:
        raise ResponseError("SELECT response without UIDVALIDITY")
    uidnext = codes.get(b"UIDNEXT")
    return SelectInfo(
        uidvalidity=UidValidity(codes[b"UIDVALIDITY"]),
        uidnext=Uid(uidnext) if uidnext is not None else None,
        exists=exists,
        highestmodseq=codes.get(b"HIGHESTMODSEQ"),
    )


def has_exists(lines: Sequence[Line]) -> bool:
    """Return whether any line is an untagged ``n EXISTS`` (new mail may have arrived)."""
    return any(not isinstance(line, bytearray) and _EXISTS.match(line) for line in lines)


def is_bye(line: Line) -> bool:
    """Return whether an untagged line (``* `` removed) is BYE (RFC 9051 §7.1.5)."""
    return bytes(line[:3]).upper() == b"BYE"


def is_auth_failure(lines: Sequence[Line]) -> bool:
    """Return whether a NO to LOGIN/AUTHENTICATE carries ``[AUTHENTICATIONFAILED]`` (RFC 5530)."""
    return any(AUTHENTICATION_FAILED in bytes(line).upper() for line in lines)


def parse_list(lines: Sequence[Line]) -> tuple[FolderInfo, ...]:
    """Parse the LIST lines aioimaplib returns (``(\\\\Flags) "/" name`` each).

    Follows RFC 9051 §7.3.1; names in modified UTF-7 are decoded. Lines
    that are not LIST data (the completion text) are ignored.

    Returns:
        Folders in server order.
    """
    out: list[FolderInfo] = []
    for item in _imaplib_form(lines):
        head = item[0] if isinstance(item, tuple) else item
        if not head.startswith(b"("):
            continue
        try:
            flags, _delimiter, name = parse_response([item])
        except (ProtocolError, ValueError):
            raise ResponseError("unparseable LIST line") from None
        raw_name = name if isinstance(name, bytes) else str(name).encode()
        wire = raw_name.decode("ascii", "replace")
        out.append(
            FolderInfo(
                name=imap_utf7.decode(raw_name),
                wire_name=wire,
                flags=frozenset(bytes(f).lower() for f in flags),
            )
        )
    return tuple(out)


def find_folder(
    folders: Sequence[FolderInfo], role: str, default_names: Sequence[str]
) -> FolderInfo | None:
    """Pick the folder for a role: INBOX by name; others by RFC 6154 flag, then by name.

    Args:
        folders: from ``parse_list``.
        role: a key of ``FOLDER_ROLES``.
        default_names: provider default names tried when no folder has the flag.
    """
    if role == "inbox":
        return next((f for f in folders if f.name.upper() == "INBOX"), None)
    flag = FOLDER_ROLES[role]
    if flag is not None:
        found = next((f for f in folders if flag.lower() in f.flags), None)
        if found is not None:
            return found
    for name in default_names:
        found = next((f for f in folders if f.name == name), None)
        if found is not None:
            return found
    return None


def parse_search(lines: Sequence[Line]) -> tuple[Uid, ...]:
    """Return the UIDs of a UID SEARCH response (RFC 9051 §7.3.4), ascending.

    aioimaplib hands over the untagged ``SEARCH`` data without its name
    (``b"1 2 3"``); a line that still has it is accepted too. The last line
    (the tagged completion text) is ignored.
    """
    found: set[int] = set()
    for line in lines[:-1]:
        if isinstance(line, bytearray):
            continue
        if match := _SEARCH.match(line):
            line = match.group(1)
        tokens = line.split()
        if tokens and all(t.isdigit() for t in tokens):
            found.update(int(t) for t in tokens)
    return tuple(Uid(n) for n in sorted(found))


def parse_fetch(lines: Sequence[Line]) -> tuple[FetchedMessage, ...]:
    """Parse a UID FETCH of ``(UID INTERNALDATE BODY.PEEK[] [X-GM-MSGID X-GM-THRID])``.

    Uses imapclient's ``parse_fetch_response``. Unsolicited FETCH data
    without a body (flag updates, RFC 9051 §7.5.2) is dropped.

    Returns:
        Messages in ascending UID order, unique by UID.

    Raises:
        ResponseError: the FETCH data is malformed.
    """
    data = [item for item in _imaplib_form(lines) if _is_fetch(item)]
    if not data:
        return ()
    try:
        parsed = parse_fetch_response(data, normalise_times=False, uid_is_key=True)
    except (ProtocolError, ValueError) as exc:
        raise ResponseError(f"unparseable FETCH response: {exc}") from None
    out: dict[int, FetchedMessage] = {}
    for uid, fields in parsed.items():
        body = fields.get(b"BODY[]")
        if not isinstance(body, bytes):
            continue
        when = fields.get(b"INTERNALDATE")
        out[uid] = FetchedMessage(
            uid=Uid(uid),
            raw=body,
            internal_date=when.astimezone(UTC) if isinstance(when, datetime) else None,
            x_gm_msgid=_int_or_none(fields.get(b"X-GM-MSGID")),
            x_gm_thrid=_int_or_none(fields.get(b"X-GM-THRID")),
        )
    return tuple(out[k] for k in sorted(out))


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) else None


def _is_fetch(item: bytes | tuple[bytes, bytes]) -> bool:
    """FETCH data (``n (``), or the rest of its line after a literal; not EXISTS etc."""
    head = item[0] if isinstance(item, tuple) else item
    return bool(_FETCH_DATA.match(head)) or head.startswith((b")", b" "))


def _imaplib_form(lines: Sequence[Line]) -> list[bytes | tuple[bytes, bytes]]:
    """Regroup aioimaplib lines the way imaplib returns them: ``(line, literal)`` tuples.

    ``n FETCH (`` becomes ``n (`` (imaplib strips the response name).
    """
    out: list[bytes | tuple[bytes, bytes]] = []
    for line in lines:
        if isinstance(line, bytearray):
            if not out or isinstance(out[-1], tuple):
                raise ResponseError("literal without an announcing line")
            out[-1] = (out[-1], bytes(line))
            continue
        out.append(_FETCH_PREFIX.sub(rb"\1 ", bytes(line), count=1))
    return out
