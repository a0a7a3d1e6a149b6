"""Walk a parsed MIME tree into main bodies, attachments and embedded messages.

Pure: no I/O, no clock, no logging. Input is a tree built by ``email``'s
compat32 parser; output is decoded text and ``Attachment`` values. Nothing
here raises on bad MIME: broken parts become defects or empty payloads.

Rules (RFC 2045-2046, RFC 2183, RFC 2387):

- The text body is the first ``text/plain`` leaf not marked attachment and
  without a filename; the HTML body the first such ``text/html``. Inside
  ``multipart/alternative`` both may come from different alternatives.
- ``message/rfc822`` (and RFC 6532 ``message/global``) parts are not
  descended into: their bytes go to ``embedded`` and they are listed as an
  attachment whose payload is the embedded message.
- Every other leaf is an attachment or inline part, in MIME order. A part
  without Content-Disposition is ``inline`` when it is ``text/*`` or has a
  Content-ID, else ``attachment``. A multipart whose delimiter is never
  found is read as ``text/plain``. ``application/ms-tnef`` (winmail.dat) is an
  ordinary attachment.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from email.generator import BytesGenerator
from email.message import Message
from email.parser import BytesParser
from email.policy import Compat32
from email.utils import collapse_rfc2231_value, unquote
from io import BytesIO

from ingest.charsets import decode_bytes, decode_words, fix_8bit_header, unfold
from ingest.types import Attachment, Defect

MIME_STRUCTURE = "mime_structure"
"""Defect kind: the MIME structure was broken (class name of email's defect)."""

_EMBEDDED_TYPES = frozenset({"message/rfc822", "message/global"})
_MAX_DEPTH = 64
_PARAM_HEADERS = frozenset({"content-type", "content-disposition"})
_ENCODED_TRANSFER = frozenset({"base64", "quoted-printable"})


class _VerbatimHeaders(Compat32):
    """compat32 that writes header values exactly as parsed (folds kept).

    The stock ``fold_binary`` rebuilds every value through ``email.header``
    (measured: 60 % of the time spent serialising embedded messages) and
    may re-fold it; we want the original bytes back.
    """

    def fold_binary(self, name: str, value: str) -> bytes:
        """Return ``name: value`` and a line end, 8-bit bytes restored."""
        return f"{name}: {value}{self.linesep}".encode("utf-8", errors="surrogateescape")


_VERBATIM = _VerbatimHeaders()


@dataclass(frozen=True, slots=True, kw_only=True)
class WalkResult:
    """What a MIME tree holds apart from the top-level headers.

    Attributes:
        text_body, html_body: decoded main bodies, None when absent.
        attachments: attachments and inline parts in MIME order.
        embedded: raw bytes of message/rfc822 parts, MIME order.
        defects: structure and charset problems met on the way.
    """

    text_body: str | None
    html_body: str | None
    attachments: tuple[Attachment, ...]
    embedded: tuple[bytes, ...]
    defects: tuple[Defect, ...]


@dataclass(slots=True)
class _Walk:
    """Mutable accumulator for one walk (private; frozen result is ``WalkResult``)."""

    text_body: str | None = None
    html_body: str | None = None
    attachments: list[Attachment] = field(default_factory=list)
    embedded: list[bytes] = field(default_factory=list)
    defects: list[Defect] = field(default_factory=list)


def walk_message(msg: Message) -> WalkResult:
    """Collect bodies, attachments and embedded messages of a parsed message.

    Args:
        msg: root of a compat32 ``email.message.Message`` tree.

    Returns:
        A ``WalkResult``; parts nested deeper than 64 levels are skipped
        with a ``mime_structure`` defect.
    """
    acc = _Walk()
    _visit(msg, acc, 0)
    return WalkResult(
        text_body=acc.text_body,
        html_body=acc.html_body,
        attachments=tuple(acc.attachments),
        embedded=tuple(acc.embedded),
        defects=tuple(acc.defects),
    )


def _visit(part: Message, acc: _Walk, depth: int) -> None:
    """Visit one part and, for multiparts, its children in order."""
    if part.defects:
        acc.defects.extend(
            Defect(kind=MIME_STRUCTURE, detail=type(d).__name__) for d in part.defects
        )
    if depth > _MAX_DEPTH:
        acc.defects.append(Defect(kind=MIME_STRUCTURE, detail="nesting too deep"))
        return
    content_type = part.get_content_type()
    # get_payload() without decode=True would decode with the declared
    # charset and raise on a label like "utf-8\\0"; only ask for lists.
    if part.is_multipart():
        payload: list[Message] | None = _children(part)
    elif content_type.startswith("multipart/"):
        payload = _refold_multipart(part)
    else:
        payload = None
    if content_type in _EMBEDDED_TYPES:
        _add_embedded(part, acc)
    elif payload is not None:
        if content_type.startswith("multipart/") or not payload:
            for child in payload:
                _visit(child, acc, depth + 1)
        else:
            _add_attachment(part, content_type, _serialise_blocks(payload), acc)
    else:
        if content_type.startswith("multipart/"):
            # No delimiter found (RFC 2046 §5.1.1): clients show such a body
            # as plain text, and so do we.
            content_type = "text/plain"
        if not _take_body(part, content_type, acc):
            _add_attachment(part, content_type, _leaf_bytes(part), acc)


def _children(part: Message) -> list[Message]:
    """Return the sub-parts of a multipart or message/* part, in order."""
    payload = part.get_payload()
    return [child for child in payload if isinstance(child, Message)]


def _refold_multipart(part: Message) -> list[Message] | None:
    """Re-split a multipart whose quoted boundary was folded (RFC 5322 §3.2.2).

    ``boundary="simple\\r\\n boundary"`` means ``simple boundary`` once
    unfolded; compat32 compares it folded, finds no delimiter and keeps the
    whole body as text. Returns the children, or None when not applicable.
    """
    boundary = part.get_boundary()
    if not boundary or "\n" not in boundary:
        return None
    body = part.get_payload()
    if not isinstance(body, str):
        return None
    head = f'Content-Type: {part.get_content_type()}; boundary="{unfold(boundary)}"\n\n'
    data = (head + body).encode("utf-8", errors="surrogateescape")
    reparsed = BytesParser(policy=_VERBATIM).parsebytes(data)
    return _children(reparsed) if reparsed.is_multipart() else None


def _serialise_blocks(blocks: list[Message]) -> bytes:
    """Serialise header blocks of message/delivery-status and the like."""
    return b"\n".join(_as_bytes(block) for block in blocks)


def _as_bytes(msg: Message) -> bytes:
    """Serialise a sub-message without re-folding or ``>From`` mangling."""
    try:
        fast = _fast_bytes(msg)
    except UnicodeError:  # the generator below raises or copes the same way
        fast = None
    if fast is not None:
        return fast
    out = BytesIO()
    BytesGenerator(out, mangle_from_=False, policy=_VERBATIM).flatten(msg)
    return out.getvalue()


def _fast_bytes(msg: Message) -> bytes | None:
    """Serialise ``msg`` exactly as ``BytesGenerator`` with ``_VERBATIM`` would.

    Covers leaves with text payloads, multiparts with a boundary and
    ``message/*`` containers (not delivery-status); returns None for
    anything else, and the caller uses the generator (its per-part buffers,
    clones and policy swaps made up most of the serialising time). Checked
    byte-equal to the generator on every part of the corpus it covers.
    """
    payload = getattr(msg, "_payload", None)
    maintype, _, subtype = msg.get_content_type().partition("/")
    body: bytes | None
    if maintype == "multipart":
        body = _fast_multipart(msg, payload)
    elif maintype == "message":
        if subtype != "delivery-status" and isinstance(payload, list) and payload:
            body = _fast_bytes(payload[0])
        else:
            body = None
    elif payload is None:
        body = b""
    else:
        body = _lines(payload) if isinstance(payload, str) else None
    if body is None:
        return None
    head = b"".join(_VERBATIM.fold_binary(k, v) for k, v in msg.raw_items())
    return head + b"\n" + body


def _lines(text: str) -> bytes:
    """Return ``text`` with every line end made LF (``Generator._write_lines``).

    ``str.replace`` gives what ``email.generator.NLCRE`` gives (CRLF first, then a
    lone CR; LF stays) at a fraction of the cost; most parts hold no CR.
    """
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text.encode("ascii", errors="surrogateescape")


def _fast_multipart(msg: Message, payload: object) -> bytes | None:
    """Serialise a multipart body like ``Generator._handle_multipart``, or None."""
    subparts = [] if payload is None else payload
    boundary = msg.get_boundary()
    if not isinstance(subparts, list) or not boundary:
        return None
    texts = [_fast_bytes(part) for part in subparts]
    delimiter = f"--{boundary}".encode("ascii", errors="surrogateescape")
    out = [] if msg.preamble is None else [_lines(msg.preamble), b"\n"]
    out.append(delimiter + b"\n")
    for index, text in enumerate(texts):
        if text is None:
            return None
        out.append(text if index == 0 else b"\n" + delimiter + b"\n" + text)
    out.append(b"\n" + delimiter + b"--\n")
    if msg.epilogue is not None:
        out.append(_lines(msg.epilogue))
    return b"".join(out)


def _leaf_bytes(part: Message) -> bytes:
    """Return a leaf's payload with its transfer encoding removed."""
    cte = part.get("content-transfer-encoding")
    if cte is not None and str(cte) != str(cte).strip():
        # compat32 compares the raw value: "base64 " (sent by real clients)
        # would leave the payload encoded. Decode a trimmed copy instead.
        copy = Message()
        copy["Content-Transfer-Encoding"] = str(cte).strip()
        copy.set_payload(part.get_payload())
        part = copy
    data = part.get_payload(decode=True)
    return data if isinstance(data, bytes) else b""


def _body_charset(part: Message) -> tuple[bool, str | None]:
    """Return (usable as main body, declared charset) reading each header once.

    A part is not a main body when its Content-Disposition says
    ``attachment`` or names a file, or its Content-Type has a ``name``.
    """
    disposition = part.get("content-disposition")
    if disposition is not None:
        text = str(disposition).lower()
        if text.lstrip().startswith("attachment") or "filename" in text:
            return False, None
    charset: str | None = None
    content_type = part.get("content-type")
    if content_type is None:
        return True, None
    params = _plain_params(str(content_type))
    if params is None:
        params = part.get_params(failobj=[])[1:]
    for key, value in params:
        if key == "name":
            return False, None
        if key == "charset" and charset is None:
            charset = str(collapse_rfc2231_value(value))
    return True, charset


def _plain_params(value: str) -> list[tuple[str, str]] | None:
    """Return ``get_params()[1:]`` of a Content-Type value without escapes, or None.

    Without backslashes, RFC 2231 ``*`` names and a ``;`` inside quotes,
    ``email.message``'s parameter split is a split on ``;`` and its
    decode/quote/unquote round trip leaves ``email.utils.unquote(value)``;
    this does the same in one pass (``get_params`` took 2 % of prepare()).
    None for anything else: the caller uses ``get_params``.
    """
    if "\\" in value or "*" in value:
        return None
    segments = value.split(";")
    if any(segment.count('"') % 2 for segment in segments):
        return None
    params: list[tuple[str, str]] = []
    for segment in segments[1:]:
        name, equals, text = segment.partition("=")
        if equals:
            params.append((name.strip().lower(), unquote(text.strip())))
        else:
            params.append((segment.strip(), ""))
    return params


def _take_body(part: Message, content_type: str, acc: _Walk) -> bool:
    """Use a text leaf as main body when it is the first of its kind."""
    if content_type == "text/plain" and acc.text_body is None:
        slot = "text_body"
    elif content_type == "text/html" and acc.html_body is None:
        slot = "html_body"
    else:
        return False
    usable, charset = _body_charset(part)
    if not usable:
        return False
    text, defects = decode_bytes(_leaf_bytes(part), charset, content_type)
    acc.defects.extend(defects)
    setattr(acc, slot, text)
    return True


def _add_embedded(part: Message, acc: _Walk) -> None:
    """Keep a message/rfc822 part as raw bytes and as an attachment."""
    payload = _children(part) if part.is_multipart() else None
    cte = str(part.get("content-transfer-encoding", "")).strip().lower()
    if cte in _ENCODED_TRANSFER and isinstance(payload, list) and payload:
        # Non-standard (RFC 2046 §5.2.1) but sent: the parser read the encoded
        # text as a message; re-serialise it and undo the transfer encoding.
        copy = Message()
        copy["Content-Transfer-Encoding"] = cte
        copy.set_payload(_as_bytes(payload[0]).decode("ascii", errors="replace"))
        raw = _leaf_bytes(copy)
    elif isinstance(payload, list):
        raw = b"".join(_as_bytes(m) for m in payload[:1])
    else:
        raw = _leaf_bytes(part)
    acc.embedded.append(raw)
    _add_attachment(part, part.get_content_type(), raw, acc)


def _param_values(part: Message) -> list[tuple[str, str]]:
    """Return the raw Content-Type and Content-Disposition headers, in order."""
    return [(k, str(v)) for k, v in part.raw_items() if k.lower() in _PARAM_HEADERS]


def _param_stand_in(
    part: Message, raw: list[tuple[str, str]]
) -> tuple[Message, tuple[Defect, ...]]:
    """Return ``part``, or a stand-in whose 8-bit parameter headers are text.

    compat32 hands out raw 8-bit header values as ``Header`` objects whose
    ``str`` turns each byte into U+FFFD, so ``get_filename`` would lose a raw
    UTF-8 or Latin-1 filename. The stand-in carries the repaired ``raw``
    values (from ``_param_values``).
    """
    if all(v.isascii() for _, v in raw):
        return part, ()
    stand_in = Message()
    defects: tuple[Defect, ...] = ()
    for key, value in raw:
        text, found = fix_8bit_header(value)
        stand_in[key] = text
        defects += found
    return stand_in, defects


def _filename(part: Message) -> tuple[str | None, tuple[Defect, ...]]:
    """Return the decoded filename (RFC 2231, RFC 2047, raw 8-bit)."""
    raw = _param_values(part)
    if all(value.isascii() and "name" not in value.lower() for _, value in raw):
        # Neither a ``filename`` nor a ``name`` parameter can be there
        # (email compares parameter names lower-cased).
        return None, ()
    source, defects = _param_stand_in(part, raw)
    name = source.get_filename() or source.get_param("name")
    if name is None:
        return None, ()
    text, more = fix_8bit_header(collapse_rfc2231_value(name))
    defects += more
    decoded, more = decode_words(unfold(text))
    return decoded, defects + more


def _content_id(part: Message) -> str | None:
    """Return the Content-ID without angle brackets (RFC 2392), or None."""
    value = part.get("content-id")
    if value is None:
        return None
    cid = unfold(str(value)).strip().strip("<>").strip()
    return cid or None


def _add_attachment(part: Message, content_type: str, payload: bytes, acc: _Walk) -> None:
    """Append one attachment or inline part built from ``part``."""
    filename, defects = _filename(part)
    content_id = _content_id(part)
    disposition = part.get_content_disposition()
    if disposition not in ("attachment", "inline"):
        # RFC 2183 §2 leaves it to the reader; text parts and parts with a
        # Content-ID (RFC 2387 related parts) are shown inline by clients.
        inline = content_id is not None or content_type.startswith("text/")
        disposition = "inline" if inline else "attachment"
    acc.defects.extend(defects)
    acc.attachments.append(
        Attachment(
            filename=filename,
            content_type=content_type,
            disposition=disposition,
            content_id=content_id,
            payload=payload,
            size_bytes=len(payload),
            sha256=hashlib.sha256(payload).hexdigest(),
        )
    )
