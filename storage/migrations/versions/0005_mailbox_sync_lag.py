"""Mailbox sync lag (issue 4 item 6): ``mailboxes.sync_lag_seconds``.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 12:45:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add ``mailboxes.sync_lag_seconds`` (NULL: nothing synced yet; docs/imap.md)."""
    with op.batch_alter_table("mailboxes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("sync_lag_seconds", sa.Float()))


def downgrade() -> None:
    """Drop what ``upgrade`` added."""
    with op.batch_alter_table("mailboxes", schema=None) as batch_op:
        batch_op.drop_column("sync_lag_seconds")
