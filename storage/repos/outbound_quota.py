"""R17's daily quota in the outbound queue: which of a mailbox's sends count, and when.

Sync queries over a ``Session``; they only read and never commit. The
limits themselves and the ``resets_at`` arithmetic are ``ingest.limits``'s
(pure); this module only counts rows of ``outbound_messages``.
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Session

from storage.models import OutboundMessage
from storage.models.enums import OutboundState
from storage.repos.outbound import ROUTE_MAILBOX


def counted_sends_at(
    session: Session, mailbox_id: int, since: datetime, *, exclude_id: int | None = None
) -> tuple[datetime, ...]:
    """Return the times of a mailbox's sends that count against R17's daily quota.

    Counted: ``sent`` rows by ``sent_at``, and ``queued``/``sending`` rows by
    ``created_at`` (they will go out), all after ``since``. Failed ones are
    not counted.
    """
    at = sa.func.coalesce(OutboundMessage.sent_at, OutboundMessage.created_at)
    query = sa.select(at).where(
        OutboundMessage.mailbox_id == mailbox_id,
        OutboundMessage.route == ROUTE_MAILBOX,
        OutboundMessage.state != OutboundState.FAILED,
        at > since,
    )
    if exclude_id is not None:
        query = query.where(OutboundMessage.id != exclude_id)
    return tuple(session.scalars(query))


def count_sends_at(session: Session, mailbox_id: int, since: datetime, until: datetime) -> int:
    """Return how many of ``counted_sends_at``'s sends fall in ``(since, until]``.

    One ``COUNT``: the quota check loads the times only when this reaches
    the daily limit (they then give ``resets_at``); below it, loading a
    day of sends on every enqueue grew with the day's volume.
    """
    at = sa.func.coalesce(OutboundMessage.sent_at, OutboundMessage.created_at)
    count = session.scalar(
        sa.select(sa.func.count()).where(
            OutboundMessage.mailbox_id == mailbox_id,
            OutboundMessage.route == ROUTE_MAILBOX,
            OutboundMessage.state != OutboundState.FAILED,
            at > since,
            at <= until,
        )
    )
    return int(count or 0)
