"""States that only storage and the gateway use (the shared ones are in ingest.types).

Pure values: StrEnums holding the literal strings stored in the database.
"""

from __future__ import annotations

from enum import StrEnum


class MessageIdKind(StrEnum):
    """Why a message is known by a Message-ID (R11).

    ``own`` is the id in its header; ``provider`` is an id a provider gave it
    on submission (Exchange Online rewrites Message-ID and names the new one
    in its SMTP reply): replies citing either one join the thread.
    """

    OWN = "own"
    PROVIDER = "provider"


class OutboundKind(StrEnum):
    """Kind of a CRM send (R16): only ``individual`` goes through a mailbox."""

    INDIVIDUAL = "individual"
    BULK = "bulk"
    WORKFLOW = "workflow"


class OutboundState(StrEnum):
    """Life of a CRM send (R17: a refused send is kept as ``failed``)."""

    QUEUED = "queued"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"


class WebhookState(StrEnum):
    """Life of one webhook delivery (INTERFACE.md "Webhooks")."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"
