"""Thread repository: start, join and merge synced threads; their per-sub-account instances.

Edge module: async writes on a caller's ``AsyncSession``; never commits.
Used by ``repos.messages.apply_decision`` (R4, R11).
"""

from __future__ import annotations

from collections.abc import Iterable

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from ingest.types import InstanceState, ThreadId, ThreadTarget
from storage.models import Message, SyncedThread, ThreadInstance


async def resolve_thread(
    session: AsyncSession, target: ThreadTarget, x_gm_thrid: int | None = None
) -> ThreadId:
    """Return the thread a message joins, creating and merging as ``target`` says.

    Args:
        target: join ``target.thread_id``, or start a thread with
            ``target.origin``; then fold ``target.merge_thread_ids`` into it.
        x_gm_thrid: Gmail thread id to record on a new thread, or None.

    Returns:
        The surviving thread's id.
    """
    if target.thread_id is None:
        row = SyncedThread(origin=target.origin, x_gm_thrid=x_gm_thrid)
        session.add(row)
        await session.flush()
        thread_id = ThreadId(row.id)
    else:
        thread_id = target.thread_id
    others = sorted({t for t in target.merge_thread_ids if t != thread_id})
    if others:
        await merge_threads(session, thread_id, others)
    return thread_id


async def merge_threads(session: AsyncSession, into: ThreadId, others: Iterable[ThreadId]) -> None:
    """Fold threads ``others`` into ``into`` (R11: a late parent links them).

    Every message of ``others`` moves to ``into``. Per sub-account, an
    instance ``into`` already has keeps its state and claim, and the
    other's instance there is dropped; an instance ``into`` lacks is moved
    over with its state. The ``others`` thread rows are then deleted.
    """
    other_ids = sorted(set(others) - {into})
    if not other_ids:
        return
    await session.execute(
        sa.update(Message).where(Message.thread_id.in_(other_ids)).values(thread_id=into)
    )
    have = set(
        await session.scalars(
            sa.select(ThreadInstance.subaccount_id).where(ThreadInstance.thread_id == into)
        )
    )
    moving = await session.scalars(
        sa.select(ThreadInstance)
        .where(ThreadInstance.thread_id.in_(other_ids))
        .order_by(ThreadInstance.id)
    )
    for instance in moving:
        if instance.subaccount_id in have:
            await session.delete(instance)
        else:
            instance.thread_id = into
            have.add(instance.subaccount_id)
    await session.flush()
    await session.execute(sa.delete(SyncedThread).where(SyncedThread.id.in_(other_ids)))


async def ensure_instances(
    session: AsyncSession, thread_id: ThreadId, subaccount_ids: Iterable[int]
) -> None:
    """Create an ``active`` instance of the thread in each sub-account lacking one.

    Existing instances are left as they are (a ``broken`` one stays broken, R4).
    """
    wanted = set(subaccount_ids)
    if not wanted:
        return
    have = set(
        await session.scalars(
            sa.select(ThreadInstance.subaccount_id).where(ThreadInstance.thread_id == thread_id)
        )
    )
    for subaccount_id in sorted(wanted - have):
        session.add(
            ThreadInstance(
                thread_id=thread_id, subaccount_id=subaccount_id, state=InstanceState.ACTIVE
            )
        )
    await session.flush()
