"""Pending OAuth2 authorizations: store a ``state``, then claim it once (RFC 6749 §10.12).

Edge module: sync queries on a caller's ``Session``; never commits, never
sees a clear ``state`` value or code verifier (the caller hashes and
encrypts them).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Session

from ingest.types import MailboxId, Provider, SubaccountId, UserId
from storage.errors import StorageError
from storage.models import OAuthState

STATE_UNKNOWN = "state_unknown"
STATE_USED = "state_used"
STATE_EXPIRED = "state_expired"


class StateRejected(StorageError):
    """The callback's ``state`` is unknown, already used or expired; ``code`` says which."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PendingAuthorization:
    """A claimed authorization: what the callback needs to finish it.

    Attributes:
        user_id, subaccount_id: who started it (the state is bound to them).
        provider: ``gmail`` or ``outlook``.
        purpose: ``connect`` or ``update`` (R20).
        code_verifier_ciphertext: the PKCE verifier, encrypted.
        nonce: the OIDC nonce sent in the authorization request.
        redirect_uri: the exact redirect URI of the request (RFC 6749 §4.1.3).
        replaces_mailbox_id: the mailbox an update swaps out, or None.
    """

    user_id: UserId
    subaccount_id: SubaccountId
    provider: Provider
    purpose: str
    code_verifier_ciphertext: bytes
    nonce: str
    redirect_uri: str
    replaces_mailbox_id: MailboxId | None


def add_oauth_state(
    session: Session,
    *,
    state_sha256: str,
    pending: PendingAuthorization,
    created_at: datetime,
    expires_at: datetime,
) -> int:
    """Store a pending authorization under the hex SHA-256 of its ``state``; return the row id."""
    row = OAuthState(
        state_sha256=state_sha256,
        user_id=pending.user_id,
        subaccount_id=pending.subaccount_id,
        provider=pending.provider,
        purpose=pending.purpose,
        code_verifier_ciphertext=pending.code_verifier_ciphertext,
        nonce=pending.nonce,
        redirect_uri=pending.redirect_uri,
        replaces_mailbox_id=pending.replaces_mailbox_id,
        created_at=created_at,
        expires_at=expires_at,
    )
    session.add(row)
    session.flush()
    return row.id


def claim_oauth_state(session: Session, state_sha256: str, now: datetime) -> PendingAuthorization:
    """Mark the authorization used and return it; a state is claimed at most once.

    The row is locked (``SELECT … FOR UPDATE`` on PostgreSQL; SQLite's
    ``BEGIN IMMEDIATE`` serialises writers), so two callbacks with the same
    state cannot both succeed.

    Raises:
        StateRejected: code ``state_unknown``, ``state_used`` or ``state_expired``.
    """
    row = session.scalar(
        sa.select(OAuthState).where(OAuthState.state_sha256 == state_sha256).with_for_update()
    )
    if row is None:
        raise StateRejected("unknown authorization state", code=STATE_UNKNOWN)
    if row.used_at is not None:
        raise StateRejected("authorization state was already used", code=STATE_USED)
    if row.expires_at <= now:
        raise StateRejected("authorization state has expired", code=STATE_EXPIRED)
    row.used_at = now
    session.flush()
    return PendingAuthorization(
        user_id=UserId(row.user_id),
        subaccount_id=SubaccountId(row.subaccount_id),
        provider=row.provider,
        purpose=row.purpose,
        code_verifier_ciphertext=row.code_verifier_ciphertext,
        nonce=row.nonce,
        redirect_uri=row.redirect_uri,
        replaces_mailbox_id=(
            MailboxId(row.replaces_mailbox_id) if row.replaces_mailbox_id is not None else None
        ),
    )


def purge_oauth_states(session: Session, before: datetime) -> int:
    """Delete authorizations that expired before ``before``; return how many."""
    result = session.execute(sa.delete(OAuthState).where(OAuthState.expires_at < before))
    return int(getattr(result, "rowcount", 0) or 0)
