"""R11: thread links from References / In-Reply-To and JWZ containers over sets.

Real data: the mbox archives in shared/corpus/threads, patchwork's series
mboxes and notmuch's threading cases; Pony Mail's expectations check the
Message-ID extraction per message index.
"""

from __future__ import annotations

import mailbox
import random
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

from ingest.parse import parse_message
from ingest.thread import thread_links, thread_parents
from ingest.types import MessageId, ParsedMessage, ThreadLinks

CORPUS = Path(__file__).resolve().parents[4] / "shared" / "corpus"
THREADS = CORPUS / "threads"
ARCHIVES = sorted(THREADS.glob("*.mbox")) + sorted(
    (CORPUS / "mime" / "patchwork" / "series").glob("*.mbox")
)
NOTMUCH_THREADING = CORPUS / "mime" / "notmuch" / "threading"
NOTMUCH_LOOP = CORPUS / "mime" / "notmuch" / "broken" / "loop"
PONYMAIL_EXPECTED = THREADS / "expected" / "ponymail"
SHUFFLE_SEEDS = (1, 7, 42, 2024, 65537)

pytestmark = pytest.mark.skipif(not CORPUS.is_dir(), reason="shared corpus not present")


@cache
def _archive(path: Path) -> tuple[ParsedMessage, ...]:
    """Parse every message of an mbox, in mailbox.mbox order."""
    box = mailbox.mbox(path, create=False)
    try:
        return tuple(parse_message(msg.as_bytes()) for msg in box)
    finally:
        box.close()


def _pairs(messages: tuple[ParsedMessage, ...]) -> list[tuple[MessageId, ThreadLinks]]:
    return [(m.message_id, thread_links(m)) for m in messages if m.message_id is not None]


def _eml_dir(path: Path) -> tuple[ParsedMessage, ...]:
    return tuple(parse_message(p.read_bytes()) for p in sorted(path.rglob("*.eml")))


def _msg(
    message_id: str | None,
    *,
    references: str | None = None,
    in_reply_to: str | None = None,
    extra: str = "",
) -> ParsedMessage:
    """Build a small message and parse it with the real parser."""
    lines = ["From: Alice <alice@example.org>", "To: bob@example.org", "Subject: t"]
    lines.append("Date: Fri, 17 Jun 2016 22:14:41 -0400")
    if message_id is not None:
        lines.append(f"Message-ID: <{message_id}>")
    if references is not None:
        lines.append(f"References: {references}")
    if in_reply_to is not None:
        lines.append(f"In-Reply-To: {in_reply_to}")
    if extra:
        lines.append(extra)
    return parse_message(("\r\n".join(lines) + "\r\n\r\nbody\r\n").encode())


def _links(parent: str | None, *ancestors: str) -> ThreadLinks:
    return ThreadLinks(
        parent=MessageId(parent) if parent else None,
        ancestors=tuple(MessageId(a) for a in ancestors),
    )


def _ids(*ids: str) -> list[MessageId]:
    return [MessageId(i) for i in ids]


def _walk_terminates(result: dict[MessageId, MessageId | None]) -> bool:
    for start in result:
        seen = {start}
        node = result.get(start)
        while node is not None:
            if node in seen:
                return False
            seen.add(node)
            node = result.get(node)
    return True


# ------------------------------------------------------------------ thread_links


def test_r11_links_references_then_in_reply_to() -> None:
    msg = _msg("c@x", references="<a@x> <b@x>", in_reply_to="<b@x>")
    assert thread_links(msg) == _links("b@x", "a@x", "b@x")


def test_r11_links_in_reply_to_only() -> None:
    assert thread_links(_msg("c@x", in_reply_to="<b@x>")) == _links("b@x", "b@x")


def test_r11_links_references_only_parent_is_last() -> None:
    msg = _msg("c@x", references="<a@x>\r\n\t<b@x>")
    assert thread_links(msg) == _links("b@x", "a@x", "b@x")


def test_r11_links_root_has_no_links() -> None:
    assert thread_links(_msg("a@x")) == ThreadLinks(parent=None, ancestors=())


def test_r11_links_in_reply_to_not_in_references_is_appended_as_parent() -> None:
    msg = _msg("d@x", references="<a@x> <b@x>", in_reply_to="<c@x>")
    assert thread_links(msg) == _links("c@x", "a@x", "b@x", "c@x")


def test_r11_links_in_reply_to_wins_over_out_of_order_references() -> None:
    # notmuch's parent-priority case: Debbugs writes References newest first.
    msg = _msg("gc@x", references="<child@x> <root@x>", in_reply_to="<child@x>")
    assert thread_links(msg) == _links("child@x", "root@x", "child@x")


def test_r11_links_several_in_reply_to_ids_defer_to_references() -> None:
    msg = _msg("d@x", references="<a@x> <b@x>", in_reply_to="<b@x> <z@x>")
    assert thread_links(msg) == _links("b@x", "a@x", "z@x", "b@x")


def test_r11_links_several_in_reply_to_ids_without_references_take_first() -> None:
    msg = _msg("d@x", in_reply_to="<b@x> <z@x>")
    assert thread_links(msg) == _links("b@x", "z@x", "b@x")


def test_r11_links_own_id_duplicates_and_junk_dropped() -> None:
    msg = _msg("c@x", references="<yes> <a@x> <c@x> <a@x> <b@x>", in_reply_to="<c@x>")
    assert thread_links(msg) == _links("b@x", "a@x", "b@x")


def test_r11_links_duplicate_and_malformed_headers_tolerated() -> None:
    msg = _msg(
        "c@x",
        references="<a@x> garbage <<b@x>",
        in_reply_to="",
        extra="References: <q@x>",
    )
    links = thread_links(msg)
    assert links.parent == links.ancestors[-1]
    assert MessageId("a@x") in links.ancestors


def test_r11_links_notmuch_parent_priority() -> None:
    by_id = {m.message_id: m for m in _eml_dir(NOTMUCH_THREADING / "parent-priority")}
    grand_child = thread_links(by_id[MessageId("B01-grand-child@example.org")])
    child = thread_links(by_id[MessageId("B01-child@example.org")])
    assert grand_child.parent == "B01-child@example.org"
    assert child.parent == "B00-root@example.org"
    result = thread_parents((mid, thread_links(m)) for mid, m in by_id.items() if mid)
    assert result == {
        "B00-root@example.org": None,
        "B01-child@example.org": "B00-root@example.org",
        "B01-grand-child@example.org": "B01-child@example.org",
    }


@pytest.mark.parametrize("path", ARCHIVES, ids=lambda p: p.name)
def test_r11_links_invariants_over_corpus(path: Path) -> None:
    for msg in _archive(path):
        links = thread_links(msg)
        assert len(set(links.ancestors)) == len(links.ancestors)
        assert msg.message_id not in links.ancestors
        if links.parent is None:
            assert links.ancestors == ()
        else:
            assert links.ancestors[-1] == links.parent
        assert set(links.ancestors) <= set(msg.references) | set(msg.in_reply_to)


# ----------------------------------------------------------------- thread_parents


@pytest.mark.parametrize("path", ARCHIVES, ids=lambda p: p.name)
def test_r11_parent_is_named_parent_when_present(path: Path) -> None:
    pairs = _pairs(_archive(path))
    result = thread_parents(pairs)
    assert set(result) == {mid for mid, _ in pairs}
    for mid, links in pairs:
        if links.parent in result:
            assert result[mid] == links.parent, mid
    assert _walk_terminates(result)


def test_r11_parent_present_counts_are_real() -> None:
    # Guard against a vacuous pass: the corpus must exercise present parents.
    present = 0
    for path in ARCHIVES:
        pairs = _pairs(_archive(path))
        ids = {mid for mid, _ in pairs}
        present += sum(1 for _, links in pairs if links.parent in ids)
    assert present > 500


@pytest.mark.parametrize("path", ARCHIVES, ids=lambda p: p.name)
def test_r11_missing_parents_hang_as_in_jwz(path: Path) -> None:
    pairs = _pairs(_archive(path))
    result = thread_parents(pairs)
    ids = set(result)
    cited_before: dict[MessageId, set[MessageId]] = {}
    for _, links in pairs:
        for index, mid in enumerate(links.ancestors):
            cited_before.setdefault(mid, set()).update(links.ancestors[:index])
    shared_ghosts = {v for v in result.values() if v is not None and v not in ids}
    for mid, links in pairs:
        if links.parent is None or links.parent in ids:
            continue
        got = result[mid]
        if got is None:
            continue
        if got not in ids:
            # an empty root kept by JWZ step 4: it holds two or more messages
            assert sum(1 for v in result.values() if v == got) >= 2
            assert got in shared_ghosts
        else:
            # promoted from the ghost: the ghost's chain names ``got`` above it
            assert any(got in before for before in cited_before.values()), mid


def test_r11_missing_parent_promotes_to_grandparent() -> None:
    result = thread_parents(
        [
            (MessageId("a@x"), _links(None)),
            (MessageId("c@x"), _links("b@x", "a@x", "b@x")),
        ]
    )
    assert result == {"a@x": None, "c@x": "a@x"}


def test_r11_missing_root_shared_by_two_is_kept_as_ghost() -> None:
    result = thread_parents(
        [
            (MessageId("b@x"), _links("g@x", "g@x")),
            (MessageId("c@x"), _links("g@x", "g@x")),
        ]
    )
    assert result == {"b@x": "g@x", "c@x": "g@x"}


def test_r11_missing_root_with_one_child_is_pruned() -> None:
    result = thread_parents([(MessageId("b@x"), _links("g@x", "g1@x", "g@x"))])
    assert result == {"b@x": None}


def test_r11_notmuch_ghost_root() -> None:
    messages = _eml_dir(NOTMUCH_THREADING / "ghost-root")
    parents = thread_parents((m.message_id, thread_links(m)) for m in messages if m.message_id)
    result: dict[str, MessageId | None] = {str(k): v for k, v in parents.items()}
    assert result["001-child@example.org"] == "000-real-root@example.org"
    assert result["001-grand-child@example.org"] == "001-child@example.org"
    assert result["001-grand-child2@example.org"] == "001-child@example.org"
    assert result["001-great-grand-child@example.org"] == "001-grand-child@example.org"
    # In-Reply-To names a message that does not exist: the ghost hangs under
    # the last present reference, and the ghost is pruned (JWZ step 4).
    assert result["001-fake-message-root@example.org"] == "001-child@example.org"
    # The RT ticket id never arrives: its two messages share a kept ghost root.
    ticket = "RT-Ticket-33575@xxxxxxx-xxxxxxxxxxxxxxxxx-xxxxxxxxx-xxxxxxxxx.de"
    assert result["87bmc6lp3h.fsf@len.workgroup"] == ticket
    resolved = [m.message_id for m in messages if "Resolved" in m.subject and m.message_id]
    assert len(resolved) == 1 and result[str(resolved[0])] == ticket


def test_r11_loop_is_broken_deterministically() -> None:
    messages = _eml_dir(NOTMUCH_LOOP)
    pairs = [(m.message_id, thread_links(m)) for m in messages if m.message_id]
    result = thread_parents(pairs)
    assert _walk_terminates(result)
    assert result == thread_parents(reversed(pairs))
    cyclic = thread_parents(
        [(MessageId("a@x"), _links("b@x", "b@x")), (MessageId("b@x"), _links("a@x", "a@x"))]
    )
    assert cyclic == {"a@x": "b@x", "b@x": None}


def test_r11_duplicate_id_keeps_longest_chain_in_any_order() -> None:
    short = (MessageId("c@x"), _links("b@x", "b@x"))
    long = (MessageId("c@x"), _links("b@x", "a@x", "b@x"))
    root = (MessageId("a@x"), _links(None))
    assert thread_parents([short, long, root]) == thread_parents([long, root, short])
    assert thread_parents([short, long, root])[MessageId("c@x")] == "a@x"


@pytest.mark.parametrize("path", ARCHIVES, ids=lambda p: p.name)
def test_r11_result_independent_of_arrival_order(path: Path) -> None:
    pairs = _pairs(_archive(path))
    expected = thread_parents(pairs)
    for seed in SHUFFLE_SEEDS:
        shuffled = pairs[:]
        random.Random(seed).shuffle(shuffled)
        assert thread_parents(shuffled) == expected, seed
    assert thread_parents(reversed(pairs)) == expected


def _present_pairs() -> Iterator[
    tuple[tuple[MessageId, ThreadLinks], tuple[MessageId, ThreadLinks]]
]:
    for path in ARCHIVES:
        pairs = dict(_pairs(_archive(path)))
        for mid, links in pairs.items():
            if links.parent in pairs and links.parent is not None:
                yield (mid, links), (links.parent, pairs[links.parent])


def test_r11_reply_arriving_before_parent_is_linked() -> None:
    count = 0
    for child, parent in _present_pairs():
        before = thread_parents([child, parent])
        after = thread_parents([parent, child])
        assert before == after
        assert before[child[0]] == parent[0]
        count += 1
    assert count > 500


# --------------------------------------------------------------------- Pony Mail


_PONY_MBOX = re.compile(r"^  corpus/(\S+\.mbox):$", re.MULTILINE)
_PONY_ENTRY = re.compile(r"^  - index: (\d+)\n    message-id: (.*)$", re.MULTILINE)


def _ponymail_expectations() -> list[tuple[Path, dict[int, str]]]:
    """Read (mbox, {index: message-id}) from Pony Mail's yaml (fixed layout).

    The files hold one mbox each; ``message-id`` is ``<id>`` or ``''``.
    Read with two regular expressions so the tests need no YAML package.
    """
    out = []
    for path in sorted(PONYMAIL_EXPECTED.glob("*.yaml")):
        text = path.read_text()
        names = _PONY_MBOX.findall(text)
        assert len(names) == 1, path.name
        mbox = THREADS / ("ponymail-" + names[0])
        entries = {int(i): v.strip().strip("'") for i, v in _PONY_ENTRY.findall(text)}
        if mbox.exists():
            out.append((mbox, entries))
    return out


def test_r11_ponymail_message_ids_match_per_index() -> None:
    expectations = _ponymail_expectations()
    assert len(expectations) == 3
    checked = 0
    for mbox, entries in expectations:
        messages = _archive(mbox)
        assert sorted(entries) == list(range(len(messages)))
        for index, expected in entries.items():
            got = messages[index].message_id
            assert got == (expected[1:-1] if expected else None), (mbox.name, index)
            checked += 1
    assert checked == 411
