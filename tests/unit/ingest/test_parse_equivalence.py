"""Each parse shortcut in ingest gives what the stdlib path it replaces gives.

The shortcuts were written for speed (docs/parser.md, issue 2) and each
claims equality with a slower reference:

- ``parse._parse_tree`` builds the same compat32 tree as one
  ``FeedParser.feed`` of the whole text;
- ``mime_walk._plain_params`` returns ``Message.get_params()[1:]`` whenever
  it returns a list;
- ``forward._html_may_hold_marker`` answers as ``_HTML_MARKER_HINT.search``;
- ``parse._decode_headers`` skips decoding plain ASCII headers yet records
  the defects that decoding every header would record.

Inputs are the whole corpus, variants of it (CRLF, truncated, refolded,
lone CR) and generated values from fixed seeds, so a run is deterministic.
Each test asserts equality on every input and that the shortcut was taken
often enough for the check to mean something.
"""

from __future__ import annotations

import random
from email.feedparser import FeedParser
from email.message import Message
from email.policy import compat32

import pytest

from ingest.charsets import decode_header_value
from ingest.forward import _HTML_MARKER_HINT, _html_may_hold_marker
from ingest.mime_walk import _plain_params
from ingest.parse import _decode_headers, _parse_tree, parse_message
from tests.unit.ingest.conftest import corpus_messages, corpus_missing_message

PARAM_SEED = 3
HTML_SEED = 5
GENERATED_PARAM_VALUES = 20_000
GENERATED_HTML_TEXTS = 5_000


@pytest.fixture(scope="module")
def corpus_texts() -> list[str]:
    """Every corpus message as surrogate-escaped text (how ``parse`` reads it)."""
    reason = corpus_missing_message()
    if reason is not None:
        pytest.fail(reason)
    return [raw.decode("ascii", errors="surrogateescape") for raw in corpus_messages().values()]


def _feed_tree(text: str) -> Message:
    parser = FeedParser(Message, policy=compat32)
    parser.feed(text)
    return parser.close()


def _tree_signature(root: Message) -> list[tuple[object, ...]]:
    """Everything of a compat32 tree a later stage can read, part by part.

    The payload is read raw (``_payload``): ``get_payload()`` re-decodes
    8-bit text and raises on some corpus parts.
    """
    return [
        (
            type(part).__name__,
            part.policy,
            list(part.raw_items()),
            len(part._payload) if part.is_multipart() else part._payload,
            part.preamble,
            part.epilogue,
            part.get_unixfrom(),
            part.get_default_type(),
            part.get_charset(),
            [type(d).__name__ for d in part.defects],
            sorted(vars(part)),
        )
        for part in root.walk()
    ]


def _variants(text: str) -> tuple[str, ...]:
    """The text and five edits the tree shortcut must treat like the parser."""
    return (
        text,
        text.replace("\n", "\r\n"),
        text[: len(text) // 2],
        text.replace("\n\n", "\n \n", 1),  # the "empty" line holds a space
        "\n" + text,
        text.replace("\n", "\r", 3),  # lone CRs in the header block
    )


def test_parse_tree_equals_feedparser_on_corpus_and_variants(corpus_texts: list[str]) -> None:
    assert len(corpus_texts) >= 1900
    for text in corpus_texts:
        for variant in _variants(text):
            expected = _tree_signature(_feed_tree(variant))
            assert _tree_signature(_parse_tree(variant)) == expected, variant[:200]


def _corpus_content_types(texts: list[str]) -> list[str]:
    """Every Content-Type value of every part of the corpus, first-seen order."""
    found: dict[str, None] = {}
    for text in texts:
        for part in _feed_tree(text).walk():
            value = part.get("content-type")
            if value is not None:
                found[str(value)] = None
    return list(found)


def _generated_params(count: int) -> list[str]:
    """Random Content-Type-like values built from the tokens that matter."""
    tokens = (
        "text/plain", ";", " ", "\t", '"', "=", "charset", "CHARSET", "name", "utf-8",
        "<", ">", "'", "format=flowed", "\\", "*", "x", "", ";;", '"utf-8"', "Name",
        " = ", "\n ", "(c)", "=?utf-8?q?a?=",
    )  # fmt: skip
    rng = random.Random(PARAM_SEED)
    return ["".join(rng.choice(tokens) for _ in range(rng.randint(1, 9))) for _ in range(count)]


def test_plain_params_equals_get_params(corpus_texts: list[str]) -> None:
    values = _corpus_content_types(corpus_texts) + _generated_params(GENERATED_PARAM_VALUES)
    taken = 0
    for value in values:
        fast = _plain_params(value)
        if fast is None:
            continue
        msg = Message()
        msg["Content-Type"] = value
        assert fast == msg.get_params(failobj=[])[1:], value
        taken += 1
    assert taken >= len(values) // 3


def _generated_html(count: int) -> list[str]:
    """Random texts around the marker words: case, accents, near misses.

    Every other text is built from ASCII pieces only, the shortcut's case.
    """
    pieces = (
        "<p>", "</div>", " ", "\n", "--", "---", "-", "_" * 9, "_" * 10, "Begin", "BEGIN",
        "beg", "in", "Anfang", "Début", "DÉBUT", "debut", "Inicio", "İnicio", "ß", "é",
        "Forwarded message", "K", "\u212a",
    )  # fmt: skip
    ascii_pieces = tuple(p for p in pieces if p.isascii())
    rng = random.Random(HTML_SEED)
    return [
        "".join(rng.choice(ascii_pieces if i % 2 else pieces) for _ in range(rng.randint(1, 12)))
        for i in range(count)
    ]


def test_html_marker_check_equals_regex(corpus_texts: list[str]) -> None:
    bodies = [
        parsed.html_body
        for parsed in (parse_message(raw) for raw in corpus_messages().values())
        if parsed.html_body
    ]
    texts = bodies + _generated_html(GENERATED_HTML_TEXTS)
    for text in texts:
        assert _html_may_hold_marker(text) == (_HTML_MARKER_HINT.search(text) is not None), text
    assert len(bodies) >= 100
    assert sum(text.isascii() for text in texts) >= len(texts) // 3


def test_header_defects_equal_decoding_every_header(corpus_texts: list[str]) -> None:
    extra = [
        "X-Tag: =?utf-8?q?ok?=\nX-Bad: =?x-nope?q?a?=\nX-Raw: caf\udce9\n\n",
        "Thread-Topic: =?utf-8?b?!!?=\nSubject: =?utf-8?q?S=C3=A9?=\n\n",
    ]
    with_defects = 0
    for text in corpus_texts + extra:
        msg = _feed_tree(text)
        headers, _texts, defects, subject = _decode_headers(msg)
        decoded = [(name, decode_header_value(str(value))) for name, value in msg.raw_items()]
        assert headers == tuple((name, str(value)) for name, value in msg.raw_items())
        assert defects == [d for _, (_, found) in decoded for d in found]
        subjects = [text for name, (text, _) in decoded if name.lower() == "subject"]
        assert subject == (subjects[0] if subjects else "")
        with_defects += bool(defects)
    assert with_defects >= 3
