"""SQLAlchemy 2 models of every mailgate table; ``Base.metadata`` is the schema.

Edge module. Models never leave ``storage`` (STYLE.md §5): repositories
return ``ingest.types`` values or small frozen dataclasses.
"""

from __future__ import annotations

from storage.models.base import Base, UtcDateTime, utcnow
from storage.models.directory import Contact, Conversation, Membership, Subaccount, User
from storage.models.enums import MessageIdKind, OutboundKind, OutboundState, WebhookState
from storage.models.log import QuarantineEntry, SyncLogEntry
from storage.models.mailboxes import (
    FolderState,
    Mailbox,
    MessageLocation,
    OutboundMessage,
    WebhookDelivery,
)
from storage.models.messages import (
    ConversationMessage,
    KnownMessageId,
    Message,
    MessageAttachment,
    MessageParticipant,
    MessageReference,
    SyncedThread,
    ThreadInstance,
)
from storage.models.oauth import OAuthState

__all__ = [
    "Base",
    "Contact",
    "Conversation",
    "ConversationMessage",
    "FolderState",
    "KnownMessageId",
    "Mailbox",
    "Membership",
    "Message",
    "MessageAttachment",
    "MessageIdKind",
    "MessageLocation",
    "MessageParticipant",
    "MessageReference",
    "OAuthState",
    "OutboundKind",
    "OutboundMessage",
    "OutboundState",
    "QuarantineEntry",
    "Subaccount",
    "SyncLogEntry",
    "SyncedThread",
    "ThreadInstance",
    "User",
    "UtcDateTime",
    "WebhookDelivery",
    "WebhookState",
    "utcnow",
]
