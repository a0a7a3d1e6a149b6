"""R11 and R4: which synced thread a message joins, and which instances are closed.

Pure: no I/O, no clock. Uses the thread links computed from the headers and
the thread membership that storage loaded for those Message-IDs.
"""

from __future__ import annotations

from ingest.types import (
    Facts,
    InstanceState,
    MessageId,
    SubaccountId,
    ThreadId,
    ThreadLinks,
    ThreadOrigin,
    ThreadTarget,
)

GMAIL_THREAD_HINT = MessageId("")
"""``ThreadFact.message_id`` of a thread storage found by Gmail's X-GM-THRID (no header)."""


def _gmail_hint_threads(facts: Facts) -> tuple[ThreadId, ...]:
    """Threads found by X-GM-THRID, lowest id first, unique."""
    return tuple(sorted({f.thread_id for f in facts.threads if f.message_id == GMAIL_THREAD_HINT}))


def _ancestor_threads(links: ThreadLinks, facts: Facts) -> tuple[ThreadId, ...]:
    """Threads of stored ancestors, nearest ancestor first, unique."""
    by_id: dict[str, list[ThreadId]] = {}
    for fact in facts.threads:
        by_id.setdefault(fact.message_id, []).append(fact.thread_id)
    out: list[ThreadId] = []
    for message_id in reversed(links.ancestors):
        for thread_id in sorted(set(by_id.get(message_id, ()))):
            if thread_id not in out:
                out.append(thread_id)
    return tuple(out)


def choose_thread(links: ThreadLinks, facts: Facts, origin: ThreadOrigin) -> ThreadTarget:
    """Choose the synced thread for a message (R11).

    Follows RFC 5322 §3.6.4: a message joins the thread of the nearest
    ancestor named in References / In-Reply-To that is stored. When no
    ancestor is stored but stored replies cite this message (they arrived
    first), it joins their thread. Failing both, a stored thread with the
    same Gmail X-GM-THRID (facts with ``message_id`` ``GMAIL_THREAD_HINT``)
    is joined: Gmail's own threading, used only as a hint. Every other thread it links is merged
    into the chosen one. Subjects are never compared.

    Args:
        links: the message's ancestors, oldest first.
        facts: ``threads`` and ``waiting_children`` as loaded by storage.
        origin: the origin a new thread gets.

    Returns:
        A ThreadTarget with rule ``R11``; ``thread_id`` None means a new thread.
    """
    linked = list(_ancestor_threads(links, facts))
    for child in sorted(facts.waiting_children, key=lambda c: c.message_pk):
        if child.thread_id not in linked:
            linked.append(child.thread_id)
    hinted = _gmail_hint_threads(facts)
    if not linked and hinted:
        return ThreadTarget(
            thread_id=hinted[0],
            origin=origin,
            merge_thread_ids=(),
            rule="R11",
            reason="no stored ancestor; joins the stored thread with the same Gmail X-GM-THRID",
        )
    if not linked:
        return ThreadTarget(
            thread_id=None,
            origin=origin,
            merge_thread_ids=(),
            rule="R11",
            reason="no stored message is named in In-Reply-To or References; new thread",
        )
    chosen, merged = linked[0], tuple(linked[1:])
    reason = "joins the thread of a stored message it replies to"
    if not _ancestor_threads(links, facts):
        reason = "stored replies cite this message; joins their thread"
    if merged:
        reason += f"; merges {len(merged)} other thread(s) it links"
    return ThreadTarget(
        thread_id=chosen, origin=origin, merge_thread_ids=merged, rule="R11", reason=reason
    )


def broken_subaccounts(thread: ThreadTarget, facts: Facts) -> frozenset[SubaccountId]:
    """Sub-accounts whose instance of the chosen thread is ``broken`` (R4).

    A broken instance keeps what it has and receives nothing more.

    Args:
        thread: the chosen thread target.
        facts: thread facts with per-instance state.

    Returns:
        The sub-account ids to leave out; empty for a new thread.
    """
    if thread.thread_id is None:
        return frozenset()
    return frozenset(
        f.subaccount_id
        for f in facts.threads
        if f.thread_id == thread.thread_id and f.state is InstanceState.BROKEN
    )
