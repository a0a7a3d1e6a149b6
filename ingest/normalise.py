"""Comparison forms of header values: addresses, Message-IDs, dates.

Pure: no I/O, no clock, no logging. Functions never raise on bad header text;
what is wrong is returned as ``Defect`` values next to the result.

Addresses use ``email.utils.getaddresses`` (fast, tolerant) and then reject
any result that may have lost or merged an address, in the spirit of the
CPython fix for CVE-2023-27043 (``strict=True`` from 3.11.10/3.12.6, absent
from our 3.11.7): unbalanced comments, an addr-spec that is not one
``local@domain``, or an ``@`` of the input that no returned address accounts
for make the whole header yield nothing plus a ``bad_address`` defect.
``email.headerregistry`` was measured as too slow on large headers
(0.9 s for one 1,000-recipient header; see docs/parser.md).
"""

from __future__ import annotations

import re
import unicodedata
from datetime import UTC, datetime
from email.utils import getaddresses, parsedate_to_datetime
from encodings import idna as stdlib_idna

from ingest.charsets import decode_words
from ingest.types import Address, AddressKey, Defect, MessageId

BAD_ADDRESS = "bad_address"
"""Defect kind: an address header that could not be parsed without guessing."""

MALFORMED_MESSAGE_ID = "malformed_message_id"
"""Defect kind: a msg-id that is not ``<left@right>`` (RFC 5322 §3.6.4)."""

NAIVE_DATE = "naive_date"
"""Defect kind: a Date with ``-0000`` or no zone; read as UTC (RFC 5322 §3.3)."""

BAD_DATE = "bad_date"
"""Defect kind: a Date header that could not be parsed."""

_BRACKETED = re.compile(r"<([^<>]*)>")
_COMMENT = re.compile(r"\((?:[^()\\]|\\.)*\)")
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
_DOMAIN_LITERAL = re.compile(r"\[[^\[\]\s]*\]")
_DOT_ATOM_DOMAIN = re.compile(r"[^\s()<>\[\]@,;:\\\"]+")
_ADDR_FORBIDDEN = re.compile(r"[\s<>()\[\],;]")
_SIMPLE_SPEC = r"[^\s\"(),:;<>@\[\]\\]+@[^\s\"(),:;<>@\[\]\\]+"
_SIMPLE_MAILBOX = re.compile(
    rf"\s*(?:(?:\"((?:[^\"\\]|\\.)*)\"|([^\"(),:;<>@\[\]\\]*?))\s*<({_SIMPLE_SPEC})>"
    rf"|({_SIMPLE_SPEC}))\s*"
)
_SIMPLE_PIECE = re.compile(r'(?:"(?:[^"\\]|\\.)*"|[^,"])+')
_NOT_SIMPLE = re.compile(r'[("\\:]')
_QUOTED_PAIR = re.compile(r"\\(.)")


def address_key(addr_spec: str) -> AddressKey:
    """Return the comparison form of an addr-spec.

    The local part is NFC-normalised and casefolded (RFC 5321 §2.4 lets it be
    case-sensitive; mail systems we meet are not). The domain loses a
    trailing dot, its ``xn--`` labels are decoded to Unicode (IDNA, RFC 5891
    §5 via ``encodings.idna``), then it is NFC-normalised and casefolded.

    Args:
        addr_spec: ``local@domain``; the split is on the last ``@``. A value
            without ``@`` is normalised as a whole.

    Returns:
        The key, e.g. ``"jörg@bücher.example"``; never raises.
    """
    if addr_spec.isascii():
        lower = addr_spec.lower()
        if "xn--" not in lower:
            # ASCII fast path: NFC is the identity, casefold equals lower.
            return AddressKey(lower.strip().rstrip("."))
    local, at, domain = addr_spec.strip().rpartition("@")
    if not at:
        return AddressKey(unicodedata.normalize("NFC", addr_spec.strip()).casefold())
    domain = domain.rstrip(".")
    if not domain.startswith("["):
        domain = ".".join(_label_to_unicode(label) for label in domain.split("."))
    local = unicodedata.normalize("NFC", local).casefold()
    domain = unicodedata.normalize("NFC", domain).casefold()
    return AddressKey(f"{local}@{domain}")


def _label_to_unicode(label: str) -> str:
    """Decode one ``xn--`` label (IDNA ToUnicode); other labels pass unchanged."""
    if not label[:4].lower() == "xn--":
        return label
    try:
        return stdlib_idna.ToUnicode(label)
    except UnicodeError:
        return label


def _balanced(value: str) -> bool:
    """Return whether parentheses outside quoted strings balance (RFC 5322 §3.2.2)."""
    if "(" not in value and ")" not in value:
        return True  # the loop below would never leave depth 0
    depth = 0
    escaped = False
    for char in _QUOTED.sub("", value):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                return False
    return depth == 0


def _count_at(value: str) -> int:
    """Count ``@`` outside quoted strings, comments and domain literals."""
    stripped = _DOMAIN_LITERAL.sub("", _COMMENT.sub("", _QUOTED.sub("", value)))
    return stripped.count("@")


def _valid_addr_spec(addr_spec: str) -> bool:
    """Return whether ``addr_spec`` is one plausible ``local@domain``."""
    local, at, domain = addr_spec.rpartition("@")
    if not at or not local or not domain:
        return False
    if _count_at(local) or (not local.startswith('"') and _ADDR_FORBIDDEN.search(local)):
        return False
    return bool(_DOMAIN_LITERAL.fullmatch(domain) or _DOT_ATOM_DOMAIN.fullmatch(domain))


def _parse_simple(value: str) -> list[tuple[str, str]] | None:
    """Fast path for lists of ``Name <a@b>``, ``"Name" <a@b>`` and ``a@b``.

    Without comments, groups or stray quotes every comma outside a quoted
    string separates mailboxes, so a split is exact. Returns None when any
    piece is not that simple (the caller then uses the full parser).
    """
    unquoted = _QUOTED.sub("", value) if '"' in value else value
    if _NOT_SIMPLE.search(unquoted):
        return None
    if "," not in value:  # one piece: what findall would return
        pair = _simple_pair(value)
        return None if pair is None else [] if not pair[1] else [pair]
    pairs: list[tuple[str, str]] = []
    seen: dict[str, tuple[str, str]] = {}  # long lists repeat pieces
    for piece in _SIMPLE_PIECE.findall(value):
        found = seen.get(piece)
        if found is None:
            found = _simple_pair(piece)
            if found is None:
                return None
            seen[piece] = found
        if found[1]:
            pairs.append(found)
    return pairs


def _simple_pair(piece: str) -> tuple[str, str] | None:
    """Return (display name, addr-spec) of one simple piece; ("", "") for blank."""
    if piece.isspace():
        return "", ""
    match = _SIMPLE_MAILBOX.fullmatch(piece)
    if match is None:
        return None
    quoted, name, bracketed, bare = match.groups()
    if quoted is not None:
        name = _QUOTED_PAIR.sub(r"\1", quoted)
    return (" ".join(name.split()) if name else "", bracketed or bare)


def _build_addresses(pairs: list[tuple[str, str]]) -> tuple[list[Address], list[Defect]]:
    """Decode display names and compute keys for (name, addr-spec) pairs."""
    defects: list[Defect] = []
    addresses: list[Address] = []
    # Long lists repeat entries (a fuzzed 45 KB header is one address 4,096
    # times); a repeated pair reuses its value, defects included.
    seen: dict[tuple[str, str], tuple[Address, tuple[Defect, ...]]] = {}
    for pair in pairs:
        known = seen.get(pair)
        if known is None:
            name, spec = pair
            display, name_defects = decode_words(name) if "=?" in name else (name, ())
            address = Address(display_name=display, addr_spec=spec, address_key=address_key(spec))
            known = seen[pair] = (address, name_defects)
        addresses.append(known[0])
        defects.extend(known[1])
    return addresses, defects


def _split_phrase_addr(spec: str, defects: list[Defect]) -> tuple[str, str]:
    """Recover ``Name addr@host`` written without angle brackets.

    LISTSERV and old clients write it; getaddresses returns it as one
    addr-spec with spaces. When only the last word holds an ``@``, it is the
    address and the words before it the display name (reported as a defect).
    """
    words = spec.split()
    if _count_at(spec) == 1 and "@" in words[-1]:
        defects.append(Defect(kind=BAD_ADDRESS, detail="address without angle brackets"))
        return " ".join(words[:-1]), words[-1]
    return "", spec


def parse_addresses(value: str) -> tuple[tuple[Address, ...], tuple[Defect, ...]]:
    """Parse an address-list header value strictly (RFC 5322 §3.4).

    Group syntax is flattened (``undisclosed-recipients:;`` yields nothing
    and no defect). Display names have RFC 2047 encoded-words decoded, also
    inside quotes. A crafted value such as ``a@example.org<<b@example.com>``
    never yields a single wrong address: either every ``@`` of the input is
    accounted for by a valid address, or nothing is returned.

    Args:
        value: unfolded header text (8-bit already decoded), possibly empty.

    Returns:
        (addresses, defects): addresses in header order, duplicates kept;
        ``bad_address`` defects name what was rejected. Never raises.
    """
    if not value.strip():
        return (), ()
    simple = _parse_simple(value)
    if simple is not None:
        fast, fast_defects = _build_addresses(simple)
        return tuple(fast), tuple(fast_defects)
    if not _balanced(value):
        return (), (Defect(kind=BAD_ADDRESS, detail="unbalanced parentheses"),)
    try:
        found = getaddresses([value])
    except RecursionError:  # _parseaddr recurses per address on crafted input
        return (), (Defect(kind=BAD_ADDRESS, detail="address list too deeply nested"),)
    pairs = [(name, spec) for name, spec in found if spec]
    valid: list[tuple[str, str]] = []
    defects: list[Defect] = []
    if len(pairs) < len(found) and ":" not in value:
        # Empty results outside group syntax mean stray text such as "<<".
        defects.append(Defect(kind=BAD_ADDRESS, detail="stray text in address list"))
    for name, spec in pairs:
        if not name and " " in spec:
            name, spec = _split_phrase_addr(spec, defects)
        if _valid_addr_spec(spec):
            valid.append((name, spec))
        elif _count_at(spec):
            return (), (Defect(kind=BAD_ADDRESS, detail="unparseable address list"),)
        else:
            defects.append(Defect(kind=BAD_ADDRESS, detail="address without domain dropped"))
    addresses, name_defects = _build_addresses(valid)
    defects.extend(name_defects)
    if sum(_count_at(a.addr_spec) for a in addresses) != _count_at(value):
        return (), (Defect(kind=BAD_ADDRESS, detail="address list lost an address"),)
    return tuple(addresses), tuple(defects)


def _clean_id(token: str) -> str:
    """Strip whitespace (folding inside brackets happens) from one id."""
    return "".join(token.split())


def parse_message_ids(value: str) -> tuple[tuple[MessageId, ...], tuple[Defect, ...]]:
    """Parse the msg-ids of a Message-ID, In-Reply-To or References value.

    Follows RFC 5322 §3.6.4, tolerant as JWZ threading is: ids are taken
    from ``<...>`` wherever they occur (comments and phrases around them
    are ignored); whitespace inside is removed; case is kept. Domain
    literals (``<a@[127.0.0.1]>``) and doubled ``@`` pass as written.
    Without brackets, comment-free tokens containing ``@`` are ids; a lone
    token without ``@`` is accepted too. Ids without ``@`` get a defect.

    Args:
        value: raw or unfolded header value; several headers may be joined
            with spaces.

    Returns:
        (ids, defects): unique ids in order of first appearance.
    """
    tokens = [_clean_id(t) for t in _BRACKETED.findall(value)]
    defects: list[Defect] = []
    if not tokens:
        bare = _COMMENT.sub(" ", value).replace(",", " ").split()
        tokens = [t for t in bare if "@" in t] or (bare if len(bare) == 1 else [])
        if bare:
            defects.append(Defect(kind=MALFORMED_MESSAGE_ID, detail="msg-id without brackets"))
    ids: dict[str, None] = {}  # insertion-ordered set: long References lists
    for token in tokens:
        token = token.strip("<>")
        if not token:
            continue
        if "@" not in token or token.count("@") > 1:
            defects.append(Defect(kind=MALFORMED_MESSAGE_ID, detail="msg-id not left@right"))
        ids.setdefault(token)
    return tuple(MessageId(token) for token in ids), tuple(defects)


def normalise_message_id(value: str) -> MessageId | None:
    """Return the first msg-id in ``value`` in normal form, or None.

    Args:
        value: a Message-ID header value, e.g. ``" <Abc@Example.COM> "``.

    Returns:
        ``MessageId("Abc@Example.COM")``; None when no usable id is found.
    """
    ids, _defects = parse_message_ids(value)
    return ids[0] if ids else None


def parse_date_with_defects(value: str) -> tuple[datetime | None, tuple[Defect, ...]]:
    """Parse a Date header to aware UTC, reporting what was wrong.

    Follows RFC 5322 §3.3 through ``email.utils.parsedate_to_datetime``,
    which accepts the obsolete forms of §4.3. ``-0000`` or a missing zone
    yields a naive time, read as UTC with a ``naive_date`` defect.

    Args:
        value: the header value.

    Returns:
        (date_at, defects): ``date_at`` aware UTC or None (with ``bad_date``).
    """
    try:
        parsed = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None, (Defect(kind=BAD_DATE, detail="unparseable Date"),)
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC), (Defect(kind=NAIVE_DATE, detail="Date without zone"),)
    try:
        return parsed.astimezone(UTC), ()
    except (ValueError, OverflowError):
        return None, (Defect(kind=BAD_DATE, detail="Date out of range"),)


def parse_date(value: str) -> datetime | None:
    """Parse a Date header value to an aware UTC datetime.

    Args:
        value: header text such as ``"Tue, 1 Jul 2003 10:52:37 +0200"``.

    Returns:
        The instant in UTC; None when unparseable or out of range. A
        time without zone (or ``-0000``) is taken as UTC.
    """
    return parse_date_with_defects(value)[0]
