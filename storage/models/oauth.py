"""Table of pending OAuth2 authorizations (the ``state`` parameter, RFC 6749 §10.12).

Edge module: table definitions only, no queries (those live in repos/).
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from ingest.types import Provider
from storage.models.base import Base, str_enum, utcnow


class OAuthState(Base):
    """One authorization started for a user in a sub-account (R19, R20).

    Invariants: only the SHA-256 of the ``state`` value is stored
    (``state_sha256``, hex), so a database reader cannot replay a pending
    authorization; ``code_verifier_ciphertext`` (RFC 7636 §4.1) is encrypted
    with ``security.token_key``. A row is used at most once: ``used_at`` is
    set in the same transaction that checks it, and a row past
    ``expires_at`` is refused. ``purpose`` is ``connect`` or ``update``;
    ``replaces_mailbox_id`` is the mailbox an update swaps out (R20).
    """

    __tablename__ = "oauth_states"

    id: Mapped[int] = mapped_column(primary_key=True)
    state_sha256: Mapped[str] = mapped_column(sa.String(64), unique=True)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id", ondelete="CASCADE"), index=True)
    subaccount_id: Mapped[int] = mapped_column(sa.ForeignKey("subaccounts.id", ondelete="CASCADE"))
    provider: Mapped[Provider] = mapped_column(str_enum(Provider))
    purpose: Mapped[str] = mapped_column(sa.String(16))
    code_verifier_ciphertext: Mapped[bytes] = mapped_column(sa.LargeBinary)
    nonce: Mapped[str] = mapped_column(sa.String(64))
    redirect_uri: Mapped[str] = mapped_column(sa.Text)
    replaces_mailbox_id: Mapped[int | None] = mapped_column(
        sa.ForeignKey("mailboxes.id", ondelete="SET NULL")
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()
    used_at: Mapped[datetime | None] = mapped_column()
