"""Text decoding for mail: RFC 2047 encoded-words, raw 8-bit headers, body charsets.

Pure: no I/O, no clock, no logging. Every function here returns text plus the
defects it met; none raises on bad input (a wrong charset, broken base64, an
unknown codec are data problems, recorded as ``Defect`` values).

Why not ``email.header.decode_header``: it turns unencoded non-ASCII text into
``raw-unicode-escape`` bytes of unknown charset and raises on unknown codecs;
we need both raw 8-bit text (RFC 6532 or plain broken) and encoded-words in
one value, with a defect rather than an exception.
"""

from __future__ import annotations

import binascii
import codecs
import re

import chardet

from ingest.types import Defect

UNDECODABLE_CHARSET = "undecodable_charset"
"""Defect kind: declared charset unknown or wrong; text was decoded otherwise."""

UNDECLARED_8BIT = "undeclared_8bit"
"""Defect kind: 8-bit bytes without a declared charset (RFC 2045 §5.2 says ASCII)."""

BAD_ENCODED_WORD = "bad_encoded_word"
"""Defect kind: an RFC 2047 encoded-word whose payload could not be decoded."""

_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([qQbB])\?([^?\s]*)\?=")
_WHITESPACE_ONLY = re.compile(r"[ \t\r\n]*")
_FOLD = re.compile(r"\r?\n(?=[ \t])")
_CHARSET_ALIASES = {
    "unknown-8bit": "utf-8",
    "x-unknown": "utf-8",
    "us-ascii": "ascii",
    "ks_c_5601-1987": "cp949",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "iso-8859-8-i": "iso-8859-8",
    "windows-874": "cp874",
}
# chardet 7.7 reports low confidences even for right guesses (measured:
# KOI8-R 0.36, GB18030 0.41, Windows-1253 0.21; German cp1252 text 0.04).
_CHARDET_MIN_CONFIDENCE = 0.2
# Detection cost grows with the input; 1 KB gives the same guesses as 2 KB on the corpus.
_CHARDET_SAMPLE_BYTES = 1024


def codec_for(charset: str | None) -> str | None:
    """Return the Python codec name for a MIME charset label, or None if unknown.

    Args:
        charset: a charset label as written in a MIME parameter or an
            encoded-word (case-insensitive; RFC 2231 ``*language`` suffix allowed).

    Returns:
        A codec name usable with ``bytes.decode``; None for an empty or unknown
        label. ``gb2312``/``gbk`` map to their superset ``gb18030`` and
        ``ks_c_5601-1987`` to ``cp949``, as mail clients mean them.
    """
    if not charset:
        return None
    label = charset.strip().strip("\"'").split("*", 1)[0].lower()
    label = _CHARSET_ALIASES.get(label, label)
    try:
        return codecs.lookup(label).name
    except (LookupError, ValueError):
        return None


def guess_decode(data: bytes) -> str:
    """Decode bytes of unknown charset: UTF-8 if valid, else chardet, else cp1252.

    Args:
        data: raw bytes, any length.

    Returns:
        The text; never raises (cp1252 with ``replace`` is the last resort).
    """
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    guess = chardet.detect(data[:_CHARDET_SAMPLE_BYTES])
    codec = codec_for(guess.get("encoding"))
    if codec is not None and (guess.get("confidence") or 0.0) >= _CHARDET_MIN_CONFIDENCE:
        try:
            return data.decode(codec)
        except UnicodeDecodeError:
            pass
    return data.decode("cp1252", errors="replace")


def decode_bytes(data: bytes, charset: str | None, where: str) -> tuple[str, tuple[Defect, ...]]:
    """Decode body or parameter bytes with their declared charset, falling back.

    Follows RFC 2045 §5.2 (no charset means US-ASCII) but tolerates real mail:
    8-bit data without a declaration and data that contradicts its declaration
    are decoded by ``guess_decode`` and reported.

    Args:
        data: the bytes after transfer decoding.
        charset: the declared charset label, or None.
        where: short location for defect details, e.g. ``"text/plain part 2"``.

    Returns:
        (text, defects): defects hold at most one ``undeclared_8bit`` or
        ``undecodable_charset`` entry.
    """
    codec = codec_for(charset)
    if codec is None or codec == "ascii":
        if data.isascii():
            return data.decode("ascii"), ()
        if charset is None or codec == "ascii":
            detail = f"{where}: 8-bit data declared as {charset or 'nothing'}"
            return guess_decode(data), (Defect(kind=UNDECLARED_8BIT, detail=detail),)
        detail = f"{where}: unknown charset {charset[:40]!r}"
        return guess_decode(data), (Defect(kind=UNDECODABLE_CHARSET, detail=detail),)
    try:
        return data.decode(codec), ()
    except UnicodeDecodeError:
        detail = f"{where}: data is not valid {codec}"
        return guess_decode(data), (Defect(kind=UNDECODABLE_CHARSET, detail=detail),)


def fix_8bit_header(value: str) -> tuple[str, tuple[Defect, ...]]:
    """Turn a header value read with ``surrogateescape`` into real text.

    ``email``'s compat32 parser keeps raw 8-bit header bytes as lone
    surrogates. RFC 6532 allows UTF-8 there; older clients wrote their local
    charset, which we guess.

    Args:
        value: header value as returned by ``Message.raw_items()``.

    Returns:
        (text, defects): ``undeclared_8bit`` when the bytes were not UTF-8.
    """
    if value.isascii():
        return value, ()
    data = value.encode("utf-8", errors="surrogateescape")
    try:
        return data.decode("utf-8"), ()
    except UnicodeDecodeError:
        detail = "header: 8-bit bytes that are not UTF-8"
        return guess_decode(data), (Defect(kind=UNDECLARED_8BIT, detail=detail),)


def unfold(value: str) -> str:
    """Unfold a header value (RFC 5322 §2.2.3) and trim surrounding whitespace."""
    if "\n" in value:
        if "\r" in value:
            value = _FOLD.sub("", value)
        else:  # same as _FOLD for LF-only text, 3x faster than the regex
            value = value.replace("\n ", " ").replace("\n\t", "\t")
    return value.strip()


def _word_bytes(encoding: str, text: str) -> bytes | None:
    """Return the payload bytes of one encoded-word, or None if undecodable."""
    try:
        if encoding in "bB":
            # Senders drop padding; a2b_base64 needs whole quanta.
            return binascii.a2b_base64(text + "=" * (-len(text) % 4))
        return binascii.a2b_qp(text.replace("_", " "), header=False)
    except (binascii.Error, ValueError):
        return None


def _flush(out: list[str], charset: str | None, chunk: bytearray, defects: list[Defect]) -> None:
    """Decode the pending same-charset encoded-word bytes into ``out``."""
    if charset is None or not chunk:
        return
    codec = codec_for(charset)
    data = bytes(chunk)
    if codec is None:
        defects.append(Defect(kind=UNDECODABLE_CHARSET, detail=f"header: {charset[:40]!r}"))
        out.append(guess_decode(data))
        return
    try:
        out.append(data.decode(codec))
    except UnicodeDecodeError:
        defects.append(Defect(kind=UNDECODABLE_CHARSET, detail=f"header: not valid {codec}"))
        out.append(guess_decode(data))


def decode_words(value: str) -> tuple[str, tuple[Defect, ...]]:
    """Decode RFC 2047 encoded-words anywhere in a header value.

    Follows RFC 2047 §6.2: whitespace between adjacent encoded-words is
    dropped. Adjacent words of the same charset are joined as bytes before
    decoding, so a character split across two words (RFC 2047 §5 forbids
    it, clients do it) survives. Encoded-words inside quoted strings are
    decoded too, as real clients expect.

    Args:
        value: an unfolded header value (text; 8-bit already fixed).

    Returns:
        (text, defects): text with every decodable word replaced.
    """
    if "=?" not in value:
        return value, ()
    out: list[str] = []
    defects: list[Defect] = []
    chunk = bytearray()
    charset: str | None = None
    pos = 0
    for match in _ENCODED_WORD.finditer(value):
        gap = value[pos : match.start()]
        data = _word_bytes(match.group(2), match.group(3))
        if data is None:
            defects.append(Defect(kind=BAD_ENCODED_WORD, detail="header: bad encoded-word"))
            continue
        if gap and not (charset is not None and _WHITESPACE_ONLY.fullmatch(gap)):
            _flush(out, charset, chunk, defects)
            chunk, charset = bytearray(), None
            out.append(gap)
        word_charset = match.group(1).split("*", 1)[0].lower()
        if charset is not None and word_charset != charset:
            _flush(out, charset, chunk, defects)
            chunk = bytearray()
        charset = word_charset
        chunk += data
        pos = match.end()
    _flush(out, charset, chunk, defects)
    out.append(value[pos:])
    return "".join(out), tuple(defects)


def decode_header_value(value: str) -> tuple[str, tuple[Defect, ...]]:
    """Fully decode one raw header value: 8-bit fix, unfold, encoded-words.

    Args:
        value: header value as stored by the compat32 parser.

    Returns:
        (text, defects) with the text unfolded and trimmed.
    """
    text, defects = fix_8bit_header(value)
    decoded, more = decode_words(unfold(text))
    return decoded, defects + more
