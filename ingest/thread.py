"""Thread links from References / In-Reply-To, and JWZ containers over a set (R11).

``thread_links`` reads one parsed message and says which Message-IDs it
replies to; ``thread_parents`` runs the container steps of Jamie Zawinski's
threading algorithm (https://www.jwz.org/doc/threading.html, steps 1-4)
over a set of messages and says which message each one hangs under.
Subject grouping (JWZ step 5) is left out on purpose: R11 forbids joining
threads by subject. The decisions are explained in docs/threading.md.

Pure: no I/O, no clock, no logging. Malformed ids were already dropped by
``ingest.normalise`` and recorded in ``ParsedMessage.defects``; nothing here
raises on bad mail.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from itertools import pairwise

from ingest.types import MessageId, ParsedMessage, ThreadLinks


def thread_links(parsed: ParsedMessage) -> ThreadLinks:
    """Return the Message-IDs a message replies to.

    Follows RFC 5322 §3.6.4 and JWZ's linking step 1, with notmuch's
    "parent priority": a sane In-Reply-To (exactly one id) names the direct
    parent even when References ends with another id, because some agents
    (Debbugs) write References out of order, and others truncate it. With
    no usable In-Reply-To the last References id is the parent (JWZ); with
    several In-Reply-To ids and no References, the first one (JWZ).

    Args:
        parsed: parsed message; ``references`` and ``in_reply_to`` in header
            order, already normalised (no brackets, duplicates removed).

    Returns:
        ThreadLinks(parent, ancestors): ``ancestors`` holds every References
        id in header order, then In-Reply-To ids not already named, with the
        parent moved to the end; unique, never ``parsed.message_id``.
        ``parent`` is ``ancestors[-1]``, or None (and ancestors empty) for a
        root. Missing, empty or malformed headers simply give fewer ids;
        ids without ``@`` (not msg-ids under RFC 5322 §3.6.4) are dropped.
    """
    own = parsed.message_id
    refs = _unique(mid for mid in parsed.references if _usable(mid, own))
    irt = _unique(mid for mid in parsed.in_reply_to if _usable(mid, own))
    parent = _choose_parent(refs, irt)
    if parent is None:
        return ThreadLinks(parent=None, ancestors=())
    extra = tuple(mid for mid in irt if mid not in refs)
    ancestors = (*(mid for mid in refs + extra if mid != parent), parent)
    return ThreadLinks(parent=parent, ancestors=ancestors)


def _usable(mid: MessageId, own: MessageId | None) -> bool:
    """Keep ids that are not the message's own and have the ``@`` of RFC 5322 §3.6.4.

    Junk such as ``References: <yes>`` (a gateway bug seen in the LKML
    archive) would otherwise become one ghost root that merges unrelated
    threads.
    """
    return mid != own and "@" in mid


def _choose_parent(refs: tuple[MessageId, ...], irt: tuple[MessageId, ...]) -> MessageId | None:
    """Pick the direct parent: sane In-Reply-To, else last reference, else first IRT."""
    if len(irt) == 1:
        return irt[0]
    if refs:
        return refs[-1]
    if irt:
        return irt[0]
    return None


def _unique(ids: Iterable[MessageId]) -> tuple[MessageId, ...]:
    """Return ``ids`` without repeats, first occurrence kept, order preserved."""
    return tuple(dict.fromkeys(ids))


def thread_parents(
    messages: Iterable[tuple[MessageId, ThreadLinks]],
) -> dict[MessageId, MessageId | None]:
    """Thread a set of messages with JWZ's containers; return each one's parent.

    Follows JWZ steps 1-4 (id table, linking, root set, pruning of empty
    containers) without subject grouping. Two changes make the result
    independent of arrival order, which JWZ's first-come linking is not:

    1. Every message's own parent claim (``links.parent``, JWZ step 1C) is
       applied before any References chain of another message (step 1B),
       both in Message-ID order; a link that would close a loop is skipped.
    2. A Message-ID given more than once keeps the links with the longest
       ancestor chain (ties: the smallest chain in sort order).

    Args:
        messages: (message_id, links) pairs in any order; ids of messages
            that lack one must be synthesised by the caller.

    Returns:
        One entry per distinct input id. The value is the message's parent
        in the pruned JWZ tree:

        * its named parent when that message is in the set (unless that
          link would close a loop);
        * when the named parent is absent (a ghost container), the nearest
          present ancestor above the ghost, as JWZ's step 4 promotes the
          children of empty containers;
        * a ghost id (not an input id) when the message hangs under an
          empty root container shared by two or more top-level messages,
          which JWZ keeps so that they stay one thread;
        * None for a root.

        Following values from any id always ends at None; no loops.
    """
    links_by_id = _canonical(messages)
    order = sorted(links_by_id)
    parent_of: dict[MessageId, MessageId] = {}
    for mid in order:
        claim = links_by_id[mid].parent
        if claim is not None:
            _link(parent_of, child=mid, parent=claim)
    for mid in order:
        chain = links_by_id[mid].ancestors
        for older, newer in pairwise(chain):
            if newer not in parent_of:
                _link(parent_of, child=newer, parent=older)
    return _prune(parent_of, present=frozenset(order))


def _canonical(
    messages: Iterable[tuple[MessageId, ThreadLinks]],
) -> dict[MessageId, ThreadLinks]:
    """Keep one ThreadLinks per id, chosen independently of input order."""
    out: dict[MessageId, ThreadLinks] = {}
    for mid, links in messages:
        kept = out.get(mid)
        if kept is None or _rank(links) < _rank(kept):
            out[mid] = links
    return out


def _rank(links: ThreadLinks) -> tuple[int, tuple[MessageId, ...]]:
    """Sort key for duplicate links: the smallest key wins (longest chain first)."""
    return (-len(links.ancestors), links.ancestors)


def _link(parent_of: dict[MessageId, MessageId], *, child: MessageId, parent: MessageId) -> None:
    """Set ``child``'s container parent unless that would close a loop (JWZ 1B/1C)."""
    if child == parent or _is_ancestor(parent_of, ancestor=child, of=parent):
        return
    parent_of[child] = parent


def _is_ancestor(
    parent_of: Mapping[MessageId, MessageId], *, ancestor: MessageId, of: MessageId
) -> bool:
    """Return whether ``ancestor`` is ``of`` or above it in the container tree."""
    node: MessageId | None = of
    while node is not None:
        if node == ancestor:
            return True
        node = parent_of.get(node)
    return False


def _prune(
    parent_of: Mapping[MessageId, MessageId], *, present: frozenset[MessageId]
) -> dict[MessageId, MessageId | None]:
    """Apply JWZ step 4 (drop empty containers, promote their children).

    Empty containers below another container vanish and their children move
    up; an empty root survives only with two or more children left.
    """
    nearest: dict[MessageId, MessageId | None] = {}
    top_ghost: dict[MessageId, MessageId] = {}
    for mid in present:
        node = parent_of.get(mid)
        last_ghost: MessageId | None = None
        while node is not None and node not in present:
            last_ghost = node
            node = parent_of.get(node)
        nearest[mid] = node
        if node is None and last_ghost is not None:
            top_ghost[mid] = last_ghost
    children_count: dict[MessageId, int] = {}
    for ghost in top_ghost.values():
        children_count[ghost] = children_count.get(ghost, 0) + 1
    for mid, ghost in top_ghost.items():
        if children_count[ghost] >= 2:
            nearest[mid] = ghost
    return nearest
