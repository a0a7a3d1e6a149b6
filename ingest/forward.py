"""Unwrap forwarded messages: find the original sender of a forward (R13).

A message forwarded to a sync address is logged against the original
sender's contact. The original is found, in this order, in:

1. a message/rfc822 part ("forward as attachment"; not in a multipart/report
   delivery notification, whose rfc822 part is a returned message);
2. an inline forward block in the text body, then in the text derived from
   the HTML body: a marker line (Gmail's ``---------- Forwarded message
   ---------``, Apple Mail's ``Begin forwarded message:``, Outlook's
   ``-----Original Message-----`` or underscore rule, Thunderbird's, and
   their German, French, Spanish, Dutch and Italian forms) followed by a
   header block (``From:``/``Von:``/``De :``, ``Date:``/``Sent:``,
   ``Subject:``/``Betreff:``/``Objet :``, ``To:``/``An:``/``À :``, ``Cc:``);
3. Outlook's marker-less block (the HTML separator is a CSS border), only
   when the subject carries a forward prefix (``Fw:``, ``Fwd:``, ``WG:``...).

Outlook writes the same separators above quoted replies, so the markers
that do not say "forward" count only under a forward subject prefix. The
label vocabulary is kept as data in the tables below (``FORWARD_MARKERS``,
``FIELD_LABELS``, ``FORWARD_SUBJECT_PREFIXES``); docs/threading.md records
the decisions.

Pure: no I/O, no clock, no logging; never raises on a ParsedMessage.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from html.parser import HTMLParser

from ingest.charsets import decode_header_value
from ingest.normalise import normalise_message_id, parse_addresses
from ingest.parse import parse_message
from ingest.types import Address, ForwardedOriginal, ParsedMessage

# Marker lines after _marker_key(): (key, style, says_forward). Markers that
# do not say "forward" also sit above Outlook replies (see module docstring).
FORWARD_MARKERS: tuple[tuple[str, str, bool], ...] = (
    ("--- forwarded message ---", "gmail", True),
    ("--- weitergeleitete nachricht ---", "gmail", True),
    ("--- message transféré ---", "gmail", True),
    ("--- mensaje reenviado ---", "gmail", True),
    ("--- doorgestuurd bericht ---", "gmail", True),
    ("--- messaggio inoltrato ---", "gmail", True),
    ("begin forwarded message", "apple", True),
    ("anfang der weitergeleiteten nachricht", "apple", True),
    ("début du message réexpédié", "apple", True),
    ("inicio del mensaje reenviado", "apple", True),
    ("---original message---", "outlook", False),
    ("---ursprüngliche nachricht---", "outlook", False),
    ("---message d'origine---", "outlook", False),
    ("---mensaje original---", "outlook", False),
    ("--- original message ---", "generic", False),
    ("___", "outlook", False),
)

# Header-block labels (casefolded): (label, field, style hint or "").
FIELD_LABELS: tuple[tuple[str, str, str], ...] = (
    *((label, "from", "") for label in ("from", "von", "de", "van", "da", "från", "fra", "od")),
    ("date", "date", ""),
    ("datum", "date", ""),
    ("fecha", "date", ""),
    ("data", "date", ""),
    *(
        (label, "date", "outlook")
        for label in ("sent", "gesendet", "envoyé", "enviado", "verzonden", "inviato", "skickat")
    ),
    *(
        (label, "subject", "")
        for label in ("subject", "betreff", "objet", "asunto", "onderwerp", "oggetto", "assunto")
    ),
    *((label, "to", "") for label in ("to", "an", "à", "a", "para", "aan", "till", "til")),
    *((label, "cc", "") for label in ("cc", "kopie", "copie")),
    ("message-id", "message_id", ""),
)

# Subject prefixes (casefolded, before the colon) that mean "forwarded".
FORWARD_SUBJECT_PREFIXES: frozenset[str] = frozenset(
    ("fw", "fwd", "wg", "tr", "rv", "i", "enc", "doorst", "vs", "vb", "fs", "pd")
)

# Outlook names a delegate as "Sender On Behalf Of Author"; the author counts.
ON_BEHALF_MARKERS: tuple[str, ...] = ("on behalf of", "im auftrag von", "de la part de")

# Containers whose message/rfc822 parts are not forwards: delivery reports
# (RFC 6522) and digests (RFC 2046 §5.1.5).
NOT_FORWARD_CONTENT_TYPES: tuple[str, ...] = ("multipart/report", "multipart/digest")

# Local parts of senders whose attached messages are returned mail (bounces
# that do not use multipart/report).
BOUNCE_SENDER_LOCAL_PARTS: frozenset[str] = frozenset(("mailer-daemon", "postmaster"))

_LABELS = {label: (field, hint) for label, field, hint in FIELD_LABELS}
_MARKERS = {key: (style, says_forward) for key, style, says_forward in FORWARD_MARKERS}
_ON_BEHALF = re.compile(
    r"\s(?:" + "|".join(re.escape(m) for m in ON_BEHALF_MARKERS) + r")\s", re.IGNORECASE
)
_LABEL_LINE = re.compile(r"^\*?([^\W\d_][\w-]{0,15})\*?\s*:\*?\s?(.*)$")
_SUBJECT_PREFIX = re.compile(r"^\s*(?:\[[^\]]*\]\s*)?([^\W\d_]{1,6})\s*:")
_MAX_BLANKS_BEFORE_BLOCK = 3
MAX_FORWARD_HTML_CHARS = 200_000
"""Only this much of an HTML body is rendered to look for a forward block.

Clients put the forwarded header block after at most the user's short note;
rendering a 1 MB HTML body (corpus: mailparser's stress mails) cost more than
parsing the whole corpus. A block further down is not found (documented)."""
_MAX_MARKER_CHARS = 120  # longest marker line seen is ~60 chars with its dashes
_DASH_RUN = re.compile(r"-{3,}")
# Every FORWARD_MARKERS key, once a line is stripped, starts with a dash run
# and one of these words, an underscore rule, or one of these first words;
# other lines are not looked at (speed: most bodies have no marker — patch
# mails have many "---" lines — and a C-level search skips the text whole).
_MARKER_HINT = re.compile(
    r"^\s*(?:-{3,}\s*(?:forwarded|weitergeleitete|message|mensaje|doorgestuurd|messaggio"
    r"|original|urspr)|_{10,}|(?:begin|anfang|d[ée]but|inicio)\b)",
    re.I | re.M,
)
# In markup a marker line starts after tags, so nothing is anchored.
_HTML_MARKER_HINT = re.compile(r"-{3,}|_{10,}|begin|anfang|d[ée]but|inicio", re.I)
_HTML_MARKER_WORDS = ("---", "_" * 10, "begin", "anfang", "debut", "inicio")
_REQUIRED_ANY = frozenset(("subject", "date"))


@dataclass(frozen=True, slots=True)
class _Block:
    """One parsed inline header block: field -> value, and Outlook wording."""

    fields: dict[str, str]
    outlook_words: bool


def find_forwarded(parsed: ParsedMessage) -> ForwardedOriginal | None:
    """Return the original message of a forward, or None if it is not one.

    Args:
        parsed: the forwarding message as parsed.

    Returns:
        ForwardedOriginal with style ``rfc822`` (attached message),
        ``gmail``, ``apple``, ``outlook`` or ``generic`` (inline block). Its
        ``from_`` is None when the block names the sender without an
        address (Outlook for Exchange senders). None when no forward is
        found, including a ``Fwd:`` subject without any forward block.
    """
    if parsed.embedded and not _is_report(parsed):
        attached = _from_embedded(parsed.embedded[0])
        if attached is not None:
            return attached
    forward_subject = has_forward_prefix(parsed.subject)
    found = None
    if parsed.text_body:
        found = _find_inline(parsed.text_body, forward_subject=forward_subject)
        if found is not None and found.from_ is not None:
            return found
    # The HTML is read only when the text part cannot tell: there is none, or
    # the subject says "forward" (Outlook keeps the sender's address only in
    # the HTML's mailto link). Rendering every HTML body cost 40 % of prepare().
    if parsed.html_body and (not parsed.text_body or forward_subject):
        head = parsed.html_body[:MAX_FORWARD_HTML_CHARS]
        if not forward_subject and not _html_may_hold_marker(head):
            return found  # no marker anywhere in the markup: rendering cannot find one
        from_html = _find_inline(html_to_text(head), forward_subject=forward_subject)
        if from_html is not None and (from_html.from_ is not None or found is None):
            return from_html
    return found


def _html_may_hold_marker(head: str) -> bool:
    """Return whether ``_HTML_MARKER_HINT`` finds a marker in ``head``.

    For ASCII text, case-insensitive matching of these ASCII words equals a
    substring test on the lower-cased text (``début`` needs a non-ASCII
    letter), which runs in C without the regex trying six alternatives at
    every position: 1 ms instead of 14 ms per corpus pass (two 200,000
    character HTML bodies). Other text keeps the regex.
    """
    if head.isascii():
        lower = head.lower()
        return any(word in lower for word in _HTML_MARKER_WORDS)
    return _HTML_MARKER_HINT.search(head) is not None


def has_forward_prefix(subject: str) -> bool:
    """Return whether a subject starts with a forward marker (``Fwd:``, ``WG:``...).

    A leading list tag (``[list] Fwd: x``) is skipped.
    """
    match = _SUBJECT_PREFIX.match(subject)
    return match is not None and match.group(1).casefold() in FORWARD_SUBJECT_PREFIXES


def _is_report(parsed: ParsedMessage) -> bool:
    """Return whether attached messages are returned mail or digest entries.

    True for a multipart/report (RFC 6522: DSN, MDN) or multipart/digest
    top level, and for mail from MAILER-DAEMON or postmaster (an attached
    message from them is returned mail too, see ``_from_embedded``).
    """
    content_type, _defects = decode_header_value(parsed.header("Content-Type") or "")
    content_type = content_type.lower()
    if content_type.startswith(NOT_FORWARD_CONTENT_TYPES):
        return True
    return _from_bounce_sender(parsed)


def _from_bounce_sender(parsed: ParsedMessage) -> bool:
    """Return whether From is MAILER-DAEMON or postmaster."""
    return any(
        a.addr_spec.rsplit("@", 1)[0].lower() in BOUNCE_SENDER_LOCAL_PARTS
        for a in parsed.participants.from_
    )


def _from_embedded(raw: bytes) -> ForwardedOriginal | None:
    """Read the original from an attached message/rfc822 part."""
    inner = parse_message(raw)
    if _from_bounce_sender(inner) or not (inner.participants.from_ or inner.subject):
        return None
    return ForwardedOriginal(
        from_=inner.participants.from_[0] if inner.participants.from_ else None,
        to=inner.participants.to,
        cc=inner.participants.cc,
        subject=" ".join(inner.subject.split()),
        date_text=inner.raw_date,
        message_id=inner.message_id,
        style="rfc822",
    )


def _find_inline(text: str, *, forward_subject: bool) -> ForwardedOriginal | None:
    """Find the first forward block in a text body (see module docstring)."""
    if not forward_subject and _MARKER_HINT.search(text) is None:
        return None
    lines = [_clean_line(line) for line in text.splitlines()]
    for index, line in enumerate(lines):
        if _MARKER_HINT.search(line) is None:
            continue
        marker = _MARKERS.get(_marker_key(line))
        if marker is None or not (marker[1] or forward_subject):
            continue
        block = _parse_block(lines, index + 1)
        if block is not None:
            return _original(block, marker[0])
    if forward_subject:
        for index, line in enumerate(lines):
            if _label_field(line) == "from":
                block = _parse_block(lines, index)
                if block is not None and block.fields.keys() >= _REQUIRED_ANY:
                    return _original(block, "outlook" if block.outlook_words else "generic")
    return None


def _clean_line(line: str) -> str:
    """Strip a line and turn no-break spaces (French "De :") into spaces."""
    return line.replace("\u00a0", " ").replace("\u202f", " ").strip()


def _marker_key(line: str) -> str:
    """Normalise a possible marker line: dash runs to ``---``, no colon, casefolded."""
    if len(line) >= 10 and set(line) == {"_"}:
        return "___"
    if len(line) > _MAX_MARKER_CHARS:
        return ""
    key = _DASH_RUN.sub("---", " ".join(line.split())).casefold()
    return key.rstrip(" :")


def _label_field(line: str) -> str | None:
    """Return the field a ``Label: value`` line names, or None."""
    match = _LABEL_LINE.match(line)
    if match is None:
        return None
    known = _LABELS.get(match.group(1).casefold())
    return known[0] if known else None


def _parse_block(lines: list[str], start: int) -> _Block | None:
    """Parse the header block starting at or after ``start`` (blank lines skipped).

    The block ends at a line that is neither a label nor a To/Cc
    continuation, at a repeated field, or at a blank line not followed by
    another new known field. It counts only with a From field and a Subject
    or Date field.
    """
    index = start
    while index < len(lines) and not lines[index] and index - start < _MAX_BLANKS_BEFORE_BLOCK:
        index += 1
    fields: dict[str, str] = {}
    outlook_words = False
    last: str | None = None
    while index < len(lines):
        line = lines[index]
        match = _LABEL_LINE.match(line)
        known = _LABELS.get(match.group(1).casefold()) if match else None
        if known is not None and match is not None and known[0] not in fields:
            fields[known[0]] = match.group(2).strip()
            outlook_words = outlook_words or known[1] == "outlook"
            last = known[0]
        elif match is not None and known is None and fields:
            last = None  # Reply-To:, Importance:, Attachments: ... skipped
        elif not line and fields and _next_is_new_field(lines, index, fields):
            last = None
        elif line and last in ("to", "cc"):
            fields[last] = f"{fields[last]} {line}"
        else:
            break
        index += 1
    if "from" not in fields or not fields.keys() & _REQUIRED_ANY:
        return None
    return _Block(fields=fields, outlook_words=outlook_words)


def _next_is_new_field(lines: list[str], index: int, fields: dict[str, str]) -> bool:
    """Return whether the next non-blank line after ``index`` is a field not yet seen."""
    for line in lines[index + 1 :]:
        if line:
            field = _label_field(line)
            return field is not None and field not in fields
    return False


def _original(block: _Block, style: str) -> ForwardedOriginal:
    """Build the ForwardedOriginal from a parsed block."""
    fields = block.fields
    senders = _addresses(fields.get("from", ""))
    raw_id = fields.get("message_id")
    return ForwardedOriginal(
        from_=senders[0] if senders else None,
        to=_addresses(fields.get("to", "")),
        cc=_addresses(fields.get("cc", "")),
        subject=" ".join(fields.get("subject", "").split()),
        date_text=fields.get("date") or None,
        message_id=normalise_message_id(raw_id) if raw_id else None,
        style=style,
    )


def _addresses(value: str) -> tuple[Address, ...]:
    """Parse a forwarded address line, undoing the clients' decorations.

    Outlook writes ``Name [mailto:a@b]`` and ``Name <a@b<mailto:a@b>>``, and
    separates recipients with ``;``, and writes ``Delegate On Behalf Of
    Author`` (the author is kept); Gmail's plain text may bold names with
    ``*``. Name-only values give no address.
    """
    on_behalf = _ON_BEHALF.search(value)
    if on_behalf is not None:
        value = value[on_behalf.end() :]
    value = re.sub(r"<mailto:[^>]*>", "", value, flags=re.IGNORECASE)
    value = re.sub(r"\[mailto:([^\]\s]+)\]", r"<\1>", value, flags=re.IGNORECASE)
    value = re.sub(r"\*([^*]+)\*", r"\1", value).replace(";", ",")
    addresses, _defects = parse_addresses(value)
    return addresses


_BLOCK_TAGS = frozenset(
    "address article blockquote dd div dl dt footer h1 h2 h3 h4 h5 h6 header hr li "
    "ol p pre section table tbody td th thead tr ul".split()
)
_SKIP_TAGS = frozenset(("head", "script", "style", "title"))


class _TextExtractor(HTMLParser):
    """HTML to plain lines: blocks and ``<br>`` break lines, mailto links keep addresses."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.lines: list[str] = [""]
        self._skip_depth = 0
        self._mailto: list[str | None] = []
        self._link_text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP_TAGS:
            self._skip_depth += 1
        elif tag == "br":
            self.lines.append("")
        elif tag in _BLOCK_TAGS:
            self._soft_break()
        elif tag == "a":
            href = dict(attrs).get("href") or ""
            is_mailto = href.lower().startswith("mailto:")
            self._mailto.append(href[7:].split("?")[0] if is_mailto else None)
            self._link_text.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP_TAGS:
            self._skip_depth = max(0, self._skip_depth - 1)
        elif tag in _BLOCK_TAGS:
            self._soft_break()
        elif tag == "a" and self._mailto:
            address, text = self._mailto.pop(), self._link_text.pop()
            if address and address.casefold() not in text.casefold():
                self._write(f" <{address}>")

    def handle_data(self, data: str) -> None:
        if self._skip_depth:
            return
        text = re.sub(r"[ \t\r\n\f]+", " ", data)
        if self._link_text:
            self._link_text[-1] += text
        self._write(text)

    def _write(self, text: str) -> None:
        self.lines[-1] += text if self.lines[-1] else text.lstrip(" ")

    def _soft_break(self) -> None:
        if self.lines[-1].strip():
            self.lines.append("")


def html_to_text(html: str) -> str:
    """Return the visible text of an HTML body, one line per block or ``<br>``.

    Uses the stdlib ``html.parser``; entities are decoded, scripts and styles
    dropped, and ``<a href="mailto:x">Name</a>`` becomes ``Name <x>`` so that
    addresses shown only as links survive. Returns "" for "".
    """
    if not html:
        return ""
    extractor = _TextExtractor()
    extractor.feed(html)
    extractor.close()
    return "\n".join(line.strip() for line in extractor.lines)
