"""Folder checkpoints: per (mailbox, folder) UIDVALIDITY and the highest durable UID.

Edge module: sync statements on a caller's ``Session``; never commits. The
invariant of ``folder_states`` (see ``storage.models.FolderState``): every
UID ≤ ``checkpoint_uid`` in (folder, uidvalidity) is durably stored, or
durably logged as skipped, duplicate or quarantined. The intake advances
the checkpoint in the SAME transaction as the message rows
(``advance_checkpoint``), so a crash never leaves the checkpoint past a
message that is not stored (BEHAVIOUR.md "Never"). RFC 9051 §2.3.1.1: a
UID is only meaningful with its UIDVALIDITY; a different UIDVALIDITY
invalidates every stored UID of the folder (``reset_checkpoint``).
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.orm import Session

from ingest.types import LogEntry, MailboxId, Outcome, Source, Uid, UidValidity
from storage.models import FolderState, utcnow
from storage.repos.sync_log import LogContext, add_log_rows

UIDVALIDITY_RULE = "R12"
"""Rule of the sync-log row written when a folder's UIDVALIDITY changes (resync, dedup)."""

BASELINE_RULE = "R6"
"""Rule of the sync-log row written when a first sync skips the folder's history."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Checkpoint:
    """Sync position of one folder.

    Attributes:
        uidvalidity: the folder's UIDVALIDITY the UIDs belong to.
        checkpoint_uid: highest UID durably handled; 0 = none yet.
    """

    mailbox_id: MailboxId
    folder: str
    folder_role: str
    uidvalidity: UidValidity
    checkpoint_uid: Uid


def load_checkpoint(session: Session, mailbox_id: int, folder: str) -> Checkpoint | None:
    """Return the folder's checkpoint, or None when it was never synced (or was dropped, R21)."""
    row = session.execute(
        sa.select(
            FolderState.folder_role, FolderState.uidvalidity, FolderState.checkpoint_uid
        ).where(FolderState.mailbox_id == mailbox_id, FolderState.folder == folder)
    ).first()
    if row is None or row.uidvalidity is None:
        return None
    return Checkpoint(
        mailbox_id=MailboxId(mailbox_id),
        folder=folder,
        folder_role=row.folder_role,
        uidvalidity=UidValidity(row.uidvalidity),
        checkpoint_uid=Uid(row.checkpoint_uid or 0),
    )


def reset_checkpoint(
    session: Session,
    mailbox_id: int,
    folder: str,
    folder_role: str,
    uidvalidity: int,
    baseline_uid: int,
    *,
    rule: str,
    reason: str,
) -> Checkpoint:
    """Start (or restart) a folder at ``baseline_uid`` under a new UIDVALIDITY.

    Used on the first sync of a folder (``baseline_uid`` = the highest UID
    older than the connection, R6) and after a UIDVALIDITY change (RFC 9051
    §2.3.1.1; the folder is re-read and R12 deduplicates). Writes one
    sync-log row saying why.

    Args:
        baseline_uid: every UID ≤ it is declared handled (history, R6); ≥ 0.
        rule: ``BASELINE_RULE`` (first sync) or ``UIDVALIDITY_RULE`` (resync).
        reason: short text for the sync-log row (no subject, no address).

    Returns:
        The new checkpoint.
    """
    values = {
        "folder_role": folder_role,
        "uidvalidity": uidvalidity,
        "checkpoint_uid": baseline_uid,
        "updated_at": utcnow(),
    }
    updated = session.execute(
        sa.update(FolderState)
        .where(FolderState.mailbox_id == mailbox_id, FolderState.folder == folder)
        .values(**values)
    )
    if updated.rowcount == 0:  # type: ignore[attr-defined]
        session.add(FolderState(mailbox_id=mailbox_id, folder=folder, **values))
    add_log_rows(
        session,
        LogContext(at=utcnow(), source=Source.MAILBOX, mailbox_id=mailbox_id),
        (LogEntry(rule=rule, reason=reason, outcome=Outcome.SKIPPED),),
    )
    session.flush()
    return Checkpoint(
        mailbox_id=MailboxId(mailbox_id),
        folder=folder,
        folder_role=folder_role,
        uidvalidity=UidValidity(uidvalidity),
        checkpoint_uid=Uid(baseline_uid),
    )


def advance_checkpoint(
    session: Session,
    mailbox_id: int,
    folder: str,
    uidvalidity: int,
    uid: int,
    previous_uid: int,
) -> bool:
    """Move the checkpoint to ``uid`` in the caller's transaction, if that keeps the invariant.

    The watcher fetches ``UID FETCH checkpoint+1:*`` in ascending UID order,
    so the UIDs it hands over form a chain; ``previous_uid`` is the UID
    fetched just before ``uid`` (or the checkpoint it started from). The
    checkpoint moves only when it is already at or past ``previous_uid``
    (everything before ``uid`` is durable) and still below ``uid``, and
    only under the same UIDVALIDITY: a failed earlier message therefore
    holds every later one back (they are fetched again and deduplicated,
    R12), and a replay never moves it backwards.

    Returns:
        Whether the checkpoint moved.
    """
    result = session.execute(
        sa.update(FolderState)
        .where(
            FolderState.mailbox_id == mailbox_id,
            FolderState.folder == folder,
            FolderState.uidvalidity == uidvalidity,
            FolderState.checkpoint_uid >= previous_uid,
            FolderState.checkpoint_uid < uid,
        )
        .values(checkpoint_uid=uid, updated_at=utcnow())
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]
