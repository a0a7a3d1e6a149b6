"""Thread repository: start, join and merge synced threads; their per-sub-account instances.

Edge module: sync writes on a caller's ``Session``; never commits.
Used by ``repos.messages.apply_decision`` (R4, R11) and, for the R4 claim
of a CRM reply, by ``gateway.outbound_routes``.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Session

from ingest.types import InstanceState, ThreadId, ThreadTarget
from storage.models import Message, SyncedThread, ThreadInstance
from storage.repos.inserts import RowBuffer, insert_ignoring_duplicates, table_of

_INSERT_THREAD = table_of(SyncedThread).insert().returning(table_of(SyncedThread).c.id)


def resolve_thread(
    session: Session,
    target: ThreadTarget,
    x_gm_thrid: int | None = None,
    held: RowBuffer | None = None,
) -> ThreadId:
    """Return the thread a message joins, creating and merging as ``target`` says.

    Args:
        target: join ``target.thread_id``, or start a thread with
            ``target.origin``; then fold ``target.merge_thread_ids`` into it.
        x_gm_thrid: Gmail thread id to record on a new thread, or None.
        held: a group-commit batch's rows: a new thread's row is held there
            (its key allocated ahead); a merge flushes it first.

    Returns:
        The surviving thread's id.
    """
    if target.thread_id is None:
        row = {"origin": target.origin, "x_gm_thrid": x_gm_thrid}
        if held is None:
            thread_id = ThreadId(session.connection().execute(_INSERT_THREAD, row).scalar_one())
        else:
            thread_id = ThreadId(held.allocate(session, SyncedThread))
            held.add(SyncedThread, [{"id": thread_id, **row}])
    else:
        thread_id = target.thread_id
    others = sorted({t for t in target.merge_thread_ids if t != thread_id})
    if others:
        if held is not None:
            held.flush(session)  # the merge updates and moves rows that may still be held
        merge_threads(session, thread_id, others)
    return thread_id


def merge_threads(session: Session, into: ThreadId, others: Iterable[ThreadId]) -> None:
    """Fold threads ``others`` into ``into`` (R11: a late parent links them).

    Every message of ``others`` moves to ``into``. Per sub-account, an
    instance ``into`` already has keeps its state and claim, and the
    other's instance there is dropped; an instance ``into`` lacks is moved
    over with its state. The ``others`` thread rows are then deleted.
    """
    other_ids = sorted(set(others) - {into})
    if not other_ids:
        return
    session.execute(
        sa.update(Message).where(Message.thread_id.in_(other_ids)).values(thread_id=into)
    )
    have = set(
        session.scalars(
            sa.select(ThreadInstance.subaccount_id).where(ThreadInstance.thread_id == into)
        )
    )
    moving = session.scalars(
        sa.select(ThreadInstance)
        .where(ThreadInstance.thread_id.in_(other_ids))
        .order_by(ThreadInstance.id)
    )
    for instance in moving:
        if instance.subaccount_id in have:
            session.delete(instance)
        else:
            instance.thread_id = into
            have.add(instance.subaccount_id)
    session.flush()
    session.execute(sa.delete(SyncedThread).where(SyncedThread.id.in_(other_ids)))


def ensure_instances(
    session: Session,
    thread_id: ThreadId,
    subaccount_ids: Iterable[int],
    held: RowBuffer | None = None,
) -> None:
    """Create an ``active`` instance of the thread in each sub-account lacking one.

    Existing instances are left as they are (a ``broken`` one stays broken,
    R4): one ``INSERT … ON CONFLICT DO NOTHING`` on (thread, sub-account),
    or, with ``held`` (a group-commit batch, whose facts loader flushes it
    before reading instances), held for its flush.
    """
    rows = [
        {"thread_id": thread_id, "subaccount_id": subaccount_id, "state": InstanceState.ACTIVE}
        for subaccount_id in sorted(set(subaccount_ids))
    ]
    if held is not None:
        held.add(ThreadInstance, rows, ignore_duplicates=True)
    else:
        insert_ignoring_duplicates(session, ThreadInstance, rows)


def claim_thread(session: Session, thread_id: ThreadId, subaccount_id: int, now: datetime) -> bool:
    """Let a sub-account's first CRM reply claim a thread (R4).

    Runs in the send's transaction (the one storing its conversation copy).
    When no instance of the thread is claimed yet and the sub-account's
    instance is ``active`` (created ``active`` when missing), that instance
    gets ``claimed_at = now`` and every other ``active`` instance of the
    thread becomes ``broken``: it keeps its messages and receives nothing
    more. A thread already claimed, or a ``broken`` instance, changes nothing
    (the first claim wins; a broken instance cannot claim back).

    Args:
        thread_id: the thread the CRM reply joined.
        subaccount_id: the sending sub-account.
        now: aware UTC time of the send.

    Returns:
        True when the sub-account holds the claim afterwards (new or earlier).
    """
    holder = session.scalar(
        sa.select(ThreadInstance.subaccount_id).where(
            ThreadInstance.thread_id == thread_id, ThreadInstance.claimed_at.is_not(None)
        )
    )
    if holder is not None:
        return bool(holder == subaccount_id)
    ensure_instances(session, thread_id, (subaccount_id,))
    mine = session.execute(
        sa.update(ThreadInstance)
        .where(
            ThreadInstance.thread_id == thread_id,
            ThreadInstance.subaccount_id == subaccount_id,
            ThreadInstance.state == InstanceState.ACTIVE,
        )
        .values(claimed_at=now)
    )
    if getattr(mine, "rowcount", 0) == 0:
        return False
    session.execute(
        sa.update(ThreadInstance)
        .where(
            ThreadInstance.thread_id == thread_id,
            ThreadInstance.subaccount_id != subaccount_id,
            ThreadInstance.state == InstanceState.ACTIVE,
        )
        .values(state=InstanceState.BROKEN)
    )
    return True
