"""Mailbox repository: connected accounts, their encrypted credentials and state changes (R19-R22).

Edge module: sync queries on a caller's ``Session``; never commits, never
encrypts or decrypts (credentials arrive and leave as ciphertext bytes).
Every state change writes its sync-log row and its ``mailbox.state_changed``
webhook rows in the caller's transaction.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from ingest.normalise import address_key
from ingest.types import MailboxId, MailboxState, Outcome, Provider, Source, SubaccountId, UserId
from storage.errors import NotFound
from storage.models import FolderState, Mailbox, Membership, SyncLogEntry, User, WebhookDelivery
from storage.models.enums import WebhookState

SUSPENDED_PREFIX = "suspended:"
"""Start of a ``last_error`` that a later successful sync must not clear (a folder the
IMAP watcher stopped re-syncing after repeated UIDVALIDITY changes, docs/imap.md)."""

STATE_CHANGED_EVENT = "mailbox.state_changed"
"""Webhook event name of a state change (INTERFACE.md "Webhooks")."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MailboxRecord:
    """A mailbox as the gateway sees it (no credentials).

    Attributes:
        server_settings: generic IMAP/SMTP hosts, ports, security and
            username (never a password); None for OAuth providers.
        sync_lag_seconds: how far behind the server the last IMAP sync was
            (docs/imap.md "Sync lag"): commit time − INTERNALDATE of the
            newest message stored by the last committed batch, 0.0 once a
            catch-up found nothing new; None until a message was synced.
        token_expires_at: aware UTC expiry of the stored access token, or None.
        has_credentials: whether ciphertext is stored (False once disconnected).
    """

    id: MailboxId
    user_id: UserId
    subaccount_id: SubaccountId
    provider: Provider
    address: str
    state: MailboxState
    connected_at: datetime | None
    disconnected_at: datetime | None
    last_sync_at: datetime | None
    sync_lag_seconds: float | None = None
    last_error: str | None
    token_expires_at: datetime | None
    server_settings: Mapping[str, Any] | None
    replaced_by_mailbox_id: MailboxId | None
    has_credentials: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class StateChange:
    """One mailbox state transition, as logged and emitted (payload of the webhook)."""

    mailbox_id: MailboxId
    user_id: UserId
    subaccount_id: SubaccountId
    address: str
    provider: Provider
    previous: MailboxState | None
    state: MailboxState
    rule: str
    reason: str
    at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class NewCredentials:
    """What a successful connect stores (ciphertext only)."""

    user_id: UserId
    subaccount_id: SubaccountId
    provider: Provider
    address: str
    credentials_ciphertext: bytes
    token_expires_at: datetime | None
    server_settings: Mapping[str, Any] | None = None


def _record(row: Mailbox) -> MailboxRecord:
    return MailboxRecord(
        id=MailboxId(row.id),
        user_id=UserId(row.user_id),
        subaccount_id=SubaccountId(row.subaccount_id),
        provider=row.provider,
        address=row.address,
        state=row.state,
        connected_at=row.connected_at,
        disconnected_at=row.disconnected_at,
        last_sync_at=row.last_sync_at,
        sync_lag_seconds=row.sync_lag_seconds,
        last_error=row.last_error,
        token_expires_at=row.token_expires_at,
        server_settings=dict(row.server_settings) if row.server_settings is not None else None,
        replaced_by_mailbox_id=(
            MailboxId(row.replaced_by_mailbox_id) if row.replaced_by_mailbox_id else None
        ),
        has_credentials=row.credentials_ciphertext is not None,
    )


def _row(session: Session, mailbox_id: int) -> Mailbox:
    row = session.get(Mailbox, mailbox_id, with_for_update=True)
    if row is None:
        raise NotFound(f"no mailbox {mailbox_id}")
    return row


def member_user_id(session: Session, user: str | int, subaccount_id: int) -> UserId:
    """Return the id of a user (login email or numeric id) who is a member of the sub-account.

    Raises:
        NotFound: no such user, or not a member of ``subaccount_id``.
    """
    query = sa.select(User.id).join(Membership, Membership.user_id == User.id)
    query = query.where(Membership.subaccount_id == subaccount_id)
    if isinstance(user, int):
        query = query.where(User.id == user)
    else:
        query = query.where(User.email_key == address_key(user.strip()))
    found = session.scalar(query)
    if found is None:
        raise NotFound(f"user {user!r} is not a member of sub-account {subaccount_id}")
    return UserId(found)


def get_mailbox(session: Session, mailbox_id: int) -> MailboxRecord:
    """Return one mailbox.

    Raises:
        NotFound: no mailbox has that id.
    """
    row = session.get(Mailbox, mailbox_id)
    if row is None:
        raise NotFound(f"no mailbox {mailbox_id}")
    return _record(row)


def list_mailboxes(
    session: Session, *, user_id: int | None = None, subaccount_id: int | None = None
) -> tuple[MailboxRecord, ...]:
    """Return mailboxes (optionally of one user and/or sub-account), by id."""
    query = sa.select(Mailbox).order_by(Mailbox.id)
    if user_id is not None:
        query = query.where(Mailbox.user_id == user_id)
    if subaccount_id is not None:
        query = query.where(Mailbox.subaccount_id == subaccount_id)
    return tuple(_record(row) for row in session.scalars(query))


def active_mailbox(session: Session, user_id: int, subaccount_id: int) -> MailboxRecord | None:
    """Return the user's mailbox in the sub-account that is not disconnected (newest), or None."""
    row = session.scalar(
        sa.select(Mailbox)
        .where(
            Mailbox.user_id == user_id,
            Mailbox.subaccount_id == subaccount_id,
            Mailbox.state != MailboxState.DISCONNECTED,
        )
        .order_by(Mailbox.id.desc())
        .limit(1)
    )
    return _record(row) if row is not None else None


def load_credentials(session: Session, mailbox_id: int) -> tuple[MailboxRecord, bytes | None]:
    """Return the mailbox and its credential ciphertext (None once disconnected).

    Raises:
        NotFound: no mailbox has that id.
    """
    row = session.get(Mailbox, mailbox_id)
    if row is None:
        raise NotFound(f"no mailbox {mailbox_id}")
    return _record(row), row.credentials_ciphertext


def due_for_refresh(session: Session, expiring_before: datetime) -> tuple[MailboxId, ...]:
    """Return connected mailboxes whose access token expires before ``expiring_before``, by id."""
    query = (
        sa.select(Mailbox.id)
        .where(
            Mailbox.state == MailboxState.CONNECTED,
            Mailbox.token_expires_at.is_not(None),
            Mailbox.token_expires_at < expiring_before,
            Mailbox.credentials_ciphertext.is_not(None),
        )
        .order_by(Mailbox.token_expires_at)
    )
    return tuple(MailboxId(i) for i in session.scalars(query))


def store_tokens(
    session: Session, mailbox_id: int, ciphertext: bytes, token_expires_at: datetime | None
) -> bool:
    """Replace a connected mailbox's credentials after a refresh.

    Returns:
        False (and nothing written) when the mailbox is no longer connected:
        a refresh that raced with a disconnect must not bring tokens back.
    """
    row = _row(session, mailbox_id)
    if row.state != MailboxState.CONNECTED:
        return False
    row.credentials_ciphertext = ciphertext
    row.token_expires_at = token_expires_at
    row.last_error = None
    return True


def save_connected(
    session: Session,
    new: NewCredentials,
    *,
    now: datetime,
    webhook_urls: tuple[str, ...],
) -> tuple[MailboxRecord, tuple[StateChange, ...]]:
    """Make the user's mailbox for ``new.address`` connected; swap out any other one (R19, R20).

    Reconnecting the same (user, sub-account, provider, address) reuses the
    row, so per-folder checkpoints resume after ``reauth_required`` (R22).
    After a disconnect, the checkpoints are dropped instead: R21 says mail
    that arrived while disconnected is not synced, so the IMAP watcher
    starts from the folder's current end. Every other mailbox of the user
    in the sub-account that is not disconnected is disconnected in this
    same transaction (R20: no moment with none, never two active).

    Returns:
        The connected mailbox and the state changes written (connect first).
    """
    key = address_key(new.address)
    row = session.scalar(
        sa.select(Mailbox).where(
            Mailbox.user_id == new.user_id,
            Mailbox.subaccount_id == new.subaccount_id,
            Mailbox.provider == new.provider,
            Mailbox.address_key == key,
        )
    )
    previous: MailboxState | None = None
    if row is None:
        row = Mailbox(
            user_id=new.user_id,
            subaccount_id=new.subaccount_id,
            provider=new.provider,
            address=new.address,
            address_key=key,
            state=MailboxState.CONNECTED,
        )
        session.add(row)
    else:
        previous = row.state
        if previous == MailboxState.DISCONNECTED:
            session.execute(sa.delete(FolderState).where(FolderState.mailbox_id == row.id))
    row.state = MailboxState.CONNECTED
    row.credentials_ciphertext = new.credentials_ciphertext
    row.token_expires_at = new.token_expires_at
    row.server_settings = dict(new.server_settings) if new.server_settings is not None else None
    # R22: a reconnect after reauth_required resumes where sync stopped, so
    # mail that arrived meanwhile must still pass R6; keep the first
    # connection time. Only a new row or one coming back from a disconnect
    # (R21: what arrived meanwhile is not synced) starts from now.
    if previous != MailboxState.REAUTH_REQUIRED or row.connected_at is None:
        row.connected_at = now
    row.disconnected_at = None
    row.last_error, row.replaced_by_mailbox_id = None, None
    session.flush()
    change = _change(row, previous, "R19", "mailbox connected", now)
    changes = [change]
    _log_change(session, change, webhook_urls)
    changes += _replace_others(session, row, now, webhook_urls)
    return _record(row), tuple(changes)


def _replace_others(
    session: Session, new_row: Mailbox, now: datetime, webhook_urls: tuple[str, ...]
) -> list[StateChange]:
    others = session.scalars(
        sa.select(Mailbox).where(
            Mailbox.user_id == new_row.user_id,
            Mailbox.subaccount_id == new_row.subaccount_id,
            Mailbox.id != new_row.id,
            Mailbox.state != MailboxState.DISCONNECTED,
        )
    ).all()
    changes = []
    for other in others:
        other.replaced_by_mailbox_id = new_row.id
        reason = f"replaced by mailbox {new_row.id} (update email)"
        changes.append(_disconnect_row(session, other, "R20", reason, now, webhook_urls))
    return changes


def disconnect_mailbox(
    session: Session, mailbox_id: int, *, now: datetime, webhook_urls: tuple[str, ...]
) -> tuple[MailboxRecord, StateChange | None, bytes | None]:
    """Disconnect a mailbox (R21): credentials deleted, messages and checkpoints kept.

    Returns:
        The mailbox, the state change (None when it was already
        disconnected) and the credential ciphertext that was deleted (for
        revocation at the provider after commit), or None.

    Raises:
        NotFound: no mailbox has that id.
    """
    row = _row(session, mailbox_id)
    if row.state == MailboxState.DISCONNECTED:
        return _record(row), None, None
    old = row.credentials_ciphertext
    change = _disconnect_row(session, row, "R21", "mailbox disconnected", now, webhook_urls)
    return _record(row), change, old


def mark_reauth_required(
    session: Session,
    mailbox_id: int,
    *,
    reason: str,
    now: datetime,
    webhook_urls: tuple[str, ...],
) -> StateChange | None:
    """Move a connected mailbox to ``reauth_required`` (R22); tokens are dropped, data kept.

    Returns:
        The state change, or None when the mailbox was not connected.

    Raises:
        NotFound: no mailbox has that id.
    """
    row = _row(session, mailbox_id)
    if row.state != MailboxState.CONNECTED:
        return None
    previous = row.state
    row.state = MailboxState.REAUTH_REQUIRED
    row.credentials_ciphertext = None
    row.token_expires_at = None
    row.last_error = reason
    session.flush()
    change = _change(row, previous, "R22", reason, now)
    _log_change(session, change, webhook_urls)
    return change


def _disconnect_row(
    session: Session,
    row: Mailbox,
    rule: str,
    reason: str,
    now: datetime,
    webhook_urls: tuple[str, ...],
) -> StateChange:
    previous = row.state
    row.state = MailboxState.DISCONNECTED
    row.credentials_ciphertext = None
    row.token_expires_at = None
    row.disconnected_at = now
    session.flush()
    change = _change(row, previous, rule, reason, now)
    _log_change(session, change, webhook_urls)
    return change


def _change(
    row: Mailbox, previous: MailboxState | None, rule: str, reason: str, now: datetime
) -> StateChange:
    return StateChange(
        mailbox_id=MailboxId(row.id),
        user_id=UserId(row.user_id),
        subaccount_id=SubaccountId(row.subaccount_id),
        address=row.address,
        provider=row.provider,
        previous=previous,
        state=row.state,
        rule=rule,
        reason=reason,
        at=now,
    )


def state_change_payload(change: StateChange) -> dict[str, Any]:
    """Return the JSON body of a ``mailbox.state_changed`` webhook (INTERFACE.md)."""
    return {
        "event": STATE_CHANGED_EVENT,
        "mailbox_id": change.mailbox_id,
        "user_id": change.user_id,
        "subaccount_id": change.subaccount_id,
        "address": change.address,
        "provider": change.provider.value,
        "previous_state": change.previous.value if change.previous is not None else None,
        "state": change.state.value,
        "rule": change.rule,
        "reason": change.reason,
        "at": change.at.isoformat(),
    }


def _log_change(session: Session, change: StateChange, webhook_urls: tuple[str, ...]) -> None:
    """Write the sync-log row and one pending webhook delivery per subscribed URL."""
    session.add(
        SyncLogEntry(
            at=change.at,
            mailbox_id=change.mailbox_id,
            subaccount_id=change.subaccount_id,
            source=Source.MAILBOX,
            rule=change.rule,
            reason=f"{change.state.value}: {change.reason}",
            # No Outcome member names a state change; "skipped" says that
            # sync of this mailbox stops (or, for R19, carries no message).
            outcome=Outcome.SKIPPED,
        )
    )
    payload = state_change_payload(change)
    session.add_all(
        WebhookDelivery(
            event=STATE_CHANGED_EVENT,
            payload=payload,
            url=url,
            next_attempt_at=change.at,
            state=WebhookState.PENDING,
        )
        for url in webhook_urls
    )


def record_sync(
    session: Session, mailbox_id: int, *, at: datetime, lag_seconds: float | None = None
) -> None:
    """Note a successful sync of a connected mailbox: ``last_sync_at`` = ``at``, error cleared.

    Called by the IMAP watcher after a fetched batch committed (and once
    after each successful (re)connect), so ``last_sync_at`` is the time of
    the last commit, at batch granularity. Rows that are not connected are
    left alone (a ``reauth_required`` reason must survive), and so is an
    error starting with ``SUSPENDED_PREFIX`` (another folder's watcher
    succeeding does not make a suspended folder healthy).

    Args:
        at: aware UTC time of the commit.
        lag_seconds: new ``sync_lag_seconds`` (≥ 0; see ``MailboxRecord``),
            or None to keep the stored one. Negative values (a server
            clock ahead of ours) are stored as 0.
    """
    values: dict[str, Any] = {
        "last_sync_at": at,
        "last_error": sa.case(
            (Mailbox.last_error.like(f"{SUSPENDED_PREFIX}%"), Mailbox.last_error), else_=None
        ),
    }
    if lag_seconds is not None:
        values["sync_lag_seconds"] = max(0.0, lag_seconds)
    session.execute(
        sa.update(Mailbox)
        .where(Mailbox.id == mailbox_id, Mailbox.state == MailboxState.CONNECTED)
        .values(values)
    )


def record_sync_error(session: Session, mailbox_id: int, error: str) -> None:
    """Store the watcher's last connection, login or sync error of a connected mailbox.

    Args:
        error: short text (exception class and message, or a cap reason);
            never a token, body or subject. Truncated to 500 characters.
    """
    session.execute(
        sa.update(Mailbox)
        .where(Mailbox.id == mailbox_id, Mailbox.state == MailboxState.CONNECTED)
        .values(last_error=error[:500])
    )
