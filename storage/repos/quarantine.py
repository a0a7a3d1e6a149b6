"""Quarantine repository: keep a message that crashed the pipeline (BEHAVIOUR.md "Never").

Edge module: writes the raw bytes to the blob store, then a quarantine row
and a sync-log row on the caller's session; never commits. After the
caller commits, the message may be acknowledged: nothing is lost.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from ingest.types import ImapOrigin, LogEntry, Outcome, Provenance, RawMessage, Source
from storage.blobs import BlobWriter
from storage.models import QuarantineEntry, utcnow
from storage.repos.sync_log import LogContext, add_log_rows

QUARANTINE_RULE = "quarantine"
"""Rule string of the sync-log row a quarantine writes (no BEHAVIOUR.md rule id fits)."""


def quarantine_message(
    session: Session,
    raw: RawMessage,
    reason: str,
    traceback_text: str,
    blobs: BlobWriter,
) -> int:
    """Store ``raw`` in quarantine and log it with outcome ``quarantined``.

    Args:
        raw: the bytes and provenance exactly as received.
        reason: short fixed reason (e.g. the exception class), no body text.
        traceback_text: formatted traceback for the operator.
        blobs: where the raw bytes go (fsynced before the rows are added).

    Returns:
        The quarantine row key.

    Raises:
        OSError: the blob could not be written (nothing was added).
    """
    sha256 = blobs.put(raw.raw)
    row = QuarantineEntry(
        raw_sha256=sha256,
        size_bytes=len(raw.raw),
        provenance=provenance_json(raw.provenance),
        reason=reason,
        traceback=traceback_text,
    )
    session.add(row)
    context = LogContext(
        at=utcnow(),
        source=source_of(raw.provenance),
        mailbox_id=raw.provenance.mailbox_id if isinstance(raw.provenance, ImapOrigin) else None,
        raw_sha256=sha256,
    )
    add_log_rows(
        session,
        context,
        (LogEntry(rule=QUARANTINE_RULE, reason=reason, outcome=Outcome.QUARANTINED),),
    )
    session.flush()
    return row.id


def source_of(provenance: Provenance) -> Source:
    """Return the door a message came in by: IMAP is ``mailbox``, SMTP is ``bcc``."""
    return Source.MAILBOX if isinstance(provenance, ImapOrigin) else Source.BCC


def provenance_json(provenance: Provenance) -> dict[str, Any]:
    """Return ``provenance`` as a JSON object with a ``kind`` of ``smtp`` or ``imap``."""
    fields: dict[str, Any] = {
        name: getattr(provenance, name) for name in provenance.__dataclass_fields__
    }
    for name, value in fields.items():
        if isinstance(value, datetime):
            fields[name] = value.isoformat()
        elif isinstance(value, tuple):
            fields[name] = list(value)
    fields["kind"] = "imap" if isinstance(provenance, ImapOrigin) else "smtp"
    return fields
