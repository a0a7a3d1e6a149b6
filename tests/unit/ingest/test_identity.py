"""R12: one identity for every copy of a message, another for a reused Message-ID.

Copies are built from real corpus messages the way transport changes them
(Sent-folder copy with Bcc, BCC-delivered copy with trace headers, CRLF
redelivery, refolded headers); list and archive copies come from the corpus
itself (notmuch duplicates, Pony Mail's three archivers, LKML).
"""

from __future__ import annotations

import mailbox
import re
from collections import defaultdict
from functools import cache
from pathlib import Path

import pytest

from ingest.identity import (
    DIGEST_KEY_PREFIX,
    MID_DIGEST_HEX_CHARS,
    MID_KEY_PREFIX,
    identify,
    subject_core,
)
from ingest.parse import parse_message
from ingest.types import ParsedMessage

CORPUS = Path(__file__).resolve().parents[4] / "shared" / "corpus"
THREADS = CORPUS / "threads"
PONYMAIL = CORPUS / "mime" / "ponymail"
NOTMUCH_DUPLICATES = CORPUS / "mime" / "notmuch" / "duplicate"
SAMPLE_ARCHIVE = THREADS / "notmuch-list.mbox"
SHA256_HEX_CHARS = 64

pytestmark = pytest.mark.skipif(not CORPUS.is_dir(), reason="shared corpus not present")

DELIVERY_TRACE = (
    b"Return-Path: <dana.seller@example.com>\n"
    b"Delivered-To: u-k7q2m4x9w3r8t6y5p1zz@sync.example.net\n"
    b"Received: from mail.example.com (mail.example.com [192.0.2.10])\n"
    b"\tby mx.sync.example.net (Postfix) with ESMTPS id 4F1B2C3D4E\n"
    b"\tfor <u-k7q2m4x9w3r8t6y5p1zz@sync.example.net>; Mon,  4 Dec 2017 10:12:46 +0100\n"
    b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.com; s=s1;\n"
    b"\th=from:to:subject:date:message-id; bh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=;\n"
    b"\tb=dGhpcyBpcyBub3QgYSByZWFsIHNpZ25hdHVyZQ==\n"
    b"Authentication-Results: mx.sync.example.net; dkim=pass header.d=example.com\n"
    b"X-Original-To: u-k7q2m4x9w3r8t6y5p1zz@sync.example.net\n"
)


@cache
def _mbox_raw(path: Path) -> tuple[bytes, ...]:
    box = mailbox.mbox(path, create=False)
    try:
        return tuple(msg.as_bytes() for msg in box)
    finally:
        box.close()


def _key(raw: bytes) -> str:
    return identify(parse_message(raw)).key


def _split(raw: bytes) -> tuple[bytes, bytes]:
    head, sep, body = raw.replace(b"\r\n", b"\n").partition(b"\n\n")
    return head + b"\n", sep[1:] + body


def _sent_copy(raw: bytes) -> bytes:
    """The sender's Sent-folder copy: same headers plus Bcc."""
    head, body = _split(raw)
    return head + b"Bcc: Boss <boss@example.com>, u-k7q2m4x9w3r8t6y5p1zz@sync.example.net\n" + body


def _delivered_copy(raw: bytes) -> bytes:
    """The BCC-delivered copy: no Bcc, trace and authentication headers on top."""
    head, body = _split(raw)
    return DELIVERY_TRACE + head + body


def _crlf_copy(raw: bytes) -> bytes:
    """An SMTP redelivery: the same message with CRLF line ends."""
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _refolded_copy(raw: bytes) -> bytes:
    """A copy whose Subject an MTA folded at another place."""
    return re.sub(rb"(?m)^(Subject: \S+) ", rb"\1\n  ", raw.replace(b"\r\n", b"\n"), count=1)


def _replace_header(raw: bytes, name: bytes, value: bytes) -> bytes:
    head, body = _split(raw)
    pattern = rb"(?mi)^" + re.escape(name) + rb":.*\n(?:[ \t].*\n)*"
    new_head, count = re.subn(pattern, name + b": " + value + b"\n", head, count=1)
    assert count == 1
    return new_head + body


def _drop_header(raw: bytes, name: bytes) -> bytes:
    head, body = _split(raw)
    return re.sub(rb"(?mi)^" + re.escape(name) + rb":.*\n(?:[ \t].*\n)*", b"", head) + body


# --------------------------------------------------------------- same message


@pytest.mark.parametrize("index", range(len(_mbox_raw(SAMPLE_ARCHIVE))))
def test_r12_copies_of_one_message_share_the_key(index: int) -> None:
    raw = _mbox_raw(SAMPLE_ARCHIVE)[index]
    key = _key(raw)
    assert key.startswith(MID_KEY_PREFIX)
    for copy in (_sent_copy, _delivered_copy, _crlf_copy, _refolded_copy):
        assert _key(copy(raw)) == key, copy.__name__
    assert _key(_crlf_copy(_delivered_copy(raw))) == _key(_sent_copy(raw))


def test_r12_notmuch_list_copies_with_rewritten_subjects_share_the_key() -> None:
    groups: dict[str, set[str]] = defaultdict(set)
    for path in sorted(NOTMUCH_DUPLICATES.glob("msg-*.eml")):
        group = path.stem.rsplit("-", 1)[0]
        groups[group].add(_key(path.read_bytes()))
    assert len(groups) == 3
    assert all(len(keys) == 1 for keys in groups.values()), groups
    assert len(set().union(*groups.values())) == 3


@pytest.mark.parametrize(
    "pattern",
    ["maven_duplicates_2017_*.mbox", "maven-dev-2017-11-124652-*.mbox", "ponymail-dev-108*.mbox"],
)
def test_r12_archive_exports_of_one_message_share_the_key(pattern: str) -> None:
    exports = [[_key(raw) for raw in _mbox_raw(p)] for p in sorted(PONYMAIL.glob(pattern))]
    assert len(exports) >= 2
    assert all(keys == exports[0] for keys in exports)


@pytest.mark.parametrize("path", sorted(THREADS.glob("*.mbox")), ids=lambda p: p.name)
def test_r12_archive_copies_merge_and_distinct_messages_do_not(path: Path) -> None:
    parsed = [parse_message(raw) for raw in _mbox_raw(path)]
    with_id = [p for p in parsed if p.message_id is not None]
    keys = {identify(p).key for p in with_id}
    assert len(keys) == len({p.message_id for p in with_id})


# ------------------------------------------------------------ reused Message-ID


def _reference_message() -> bytes:
    return _mbox_raw(SAMPLE_ARCHIVE)[0]


@pytest.mark.parametrize(
    ("header", "value"),
    [
        (b"From", b"Mallory <mallory@example.net>"),
        (b"Date", b"Tue, 17 Nov 2009 22:28:37 +0600"),
        (b"Subject", b"[notmuch] [PATCH 1/2] Something else entirely"),
    ],
)
def test_r12_reused_message_id_with_other_content_gets_another_key(
    header: bytes, value: bytes
) -> None:
    raw = _reference_message()
    original, reused = (
        identify(parse_message(raw)),
        identify(parse_message(_replace_header(raw, header, value))),
    )
    assert reused.message_id == original.message_id
    assert reused.key != original.key
    assert reused.key.startswith(f"{MID_KEY_PREFIX}{original.message_id}:")


def test_r12_same_instant_in_another_zone_is_the_same_date() -> None:
    raw = _reference_message()
    shifted = _replace_header(raw, b"Date", b"Tue, 17 Nov 2009 15:28:37 +0000")
    assert _key(shifted) == _key(raw)


def test_r12_key_shape_with_message_id() -> None:
    ident = identify(parse_message(_reference_message()))
    assert ident.message_id is not None
    assert len(ident.header_digest) == SHA256_HEX_CHARS
    assert ident.key == (
        f"{MID_KEY_PREFIX}{ident.message_id}:{ident.header_digest[:MID_DIGEST_HEX_CHARS]}"
    )


# --------------------------------------------------------------- no Message-ID


def _without_id() -> bytes:
    return _drop_header(_reference_message(), b"Message-ID")


def test_r12_without_message_id_key_is_full_digest() -> None:
    ident = identify(parse_message(_without_id()))
    assert ident.message_id is None
    assert ident.key == DIGEST_KEY_PREFIX + ident.header_digest
    assert len(ident.header_digest) == SHA256_HEX_CHARS


def test_r12_without_message_id_copies_share_the_key() -> None:
    raw = _without_id()
    key = _key(raw)
    for copy in (_sent_copy, _delivered_copy, _crlf_copy):
        assert _key(copy(raw)) == key, copy.__name__


def test_r12_without_message_id_other_body_gets_another_key() -> None:
    head, body = _split(_without_id())
    assert _key(head + b"\n" + body) != _key(head + b"\nA different body.\n")


def test_r12_without_message_id_other_recipient_gets_another_key() -> None:
    raw = _without_id()
    assert _key(_replace_header(raw, b"To", b"someone@example.org")) != _key(raw)


def test_r12_corpus_messages_without_message_id_stay_distinct() -> None:
    parsed = [parse_message(p.read_bytes()) for p in sorted((CORPUS / "mime").rglob("*.eml"))]
    no_id = [p for p in parsed if p.message_id is None]
    assert len(no_id) > 20
    by_key: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for p in no_id:
        # Line ends and trailing blanks are transport detail (stalwart's
        # malformed/002 and 006 differ only by the final newline).
        by_key[identify(p).key].add((p.subject, " ".join((p.text_body or "").split())))
    assert all(len(contents) == 1 for contents in by_key.values())


# --------------------------------------------------------------------- stability


def _all_corpus_raw() -> list[bytes]:
    raws = [p.read_bytes() for p in sorted((CORPUS / "mime").rglob("*.eml"))]
    for path in sorted(CORPUS.rglob("*.mbox")):
        raws.extend(_mbox_raw(path))
    return raws


def test_r12_identity_stable_on_reparse_over_whole_corpus() -> None:
    raws = _all_corpus_raw()
    assert len(raws) > 1800
    for raw in raws:
        first: ParsedMessage = parse_message(raw)
        assert identify(first) == identify(parse_message(raw))


# ------------------------------------------------------------------ subject core


@pytest.mark.parametrize(
    ("subject", "core"),
    [
        ("[Pkg-emacsen-addons] Bug#916805: Increase severity", "increase severity"),
        ("Bug#691896: [87ea161] Fix committed", "fix committed"),
        ("Re: Bug#695159: debian-el:  loose\tfiles", "debian-el: loose files"),
        ("AW: WG: Angebot", "angebot"),
        ("Re[2]: Hello", "hello"),
        ("Réunion", "réunion"),
        ("", ""),
    ],
)
def test_r12_subject_core_drops_transport_decorations(subject: str, core: str) -> None:
    assert subject_core(subject) == core
