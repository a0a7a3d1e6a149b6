"""The value ``intake.accept`` returns; shared by the intake and its doors.

Kept apart from ``intake.py`` so the SMTP listener (and its unit tests)
need neither storage nor the pipeline. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from ingest.types import MessagePk, Refusal


class IntakeStatus(StrEnum):
    """What became of an accepted message (all acknowledged except ``refused``)."""

    STORED = "stored"
    DUPLICATE = "duplicate"
    UNROUTED = "unrouted"
    REFUSED = "refused"
    QUARANTINED = "quarantined"


@dataclass(frozen=True, slots=True, kw_only=True)
class IntakeResult:
    """Outcome of ``accept``, known only after the commit.

    Attributes:
        status: see ``IntakeStatus``.
        message_pk: stored row (or the copy it duplicates), else None.
        refusal: the refusal (rule, reason) when ``status`` is ``refused``.
    """

    status: IntakeStatus
    message_pk: MessagePk | None = None
    refusal: Refusal | None = None
