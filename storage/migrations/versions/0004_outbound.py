"""Outbound queue (issue 5): contact, route, error code, reply, quota reset and send times.

Revision ID: 0004
Revises: 0002
Create Date: 2026-11-30 10:45:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add the ``outbound_messages`` columns of docs/sending.md and the R17 quota index."""
    with op.batch_alter_table("outbound_messages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("contact_id", sa.Integer()))
        batch_op.add_column(sa.Column("route", sa.String(32)))
        batch_op.add_column(sa.Column("error_code", sa.String(64)))
        batch_op.add_column(sa.Column("last_reply", sa.Text()))
        batch_op.add_column(sa.Column("resets_at", sa.DateTime(timezone=True)))
        batch_op.add_column(sa.Column("sent_at", sa.DateTime(timezone=True)))
        batch_op.add_column(sa.Column("message_pk", sa.Integer()))
        batch_op.create_foreign_key(
            batch_op.f("fk_outbound_messages_contact_id_contacts"),
            "contacts",
            ["contact_id"],
            ["id"],
            ondelete="SET NULL",
        )
        batch_op.create_foreign_key(
            batch_op.f("fk_outbound_messages_message_pk_messages"),
            "messages",
            ["message_pk"],
            ["id"],
            ondelete="SET NULL",
        )
        batch_op.create_index(
            "ix_outbound_messages_mailbox_id_sent_at", ["mailbox_id", "sent_at"], unique=False
        )


def downgrade() -> None:
    """Drop what ``upgrade`` added."""
    with op.batch_alter_table("outbound_messages", schema=None) as batch_op:
        batch_op.drop_index("ix_outbound_messages_mailbox_id_sent_at")
        batch_op.drop_constraint(
            batch_op.f("fk_outbound_messages_message_pk_messages"), type_="foreignkey"
        )
        batch_op.drop_constraint(
            batch_op.f("fk_outbound_messages_contact_id_contacts"), type_="foreignkey"
        )
        for column in (
            "message_pk",
            "sent_at",
            "resets_at",
            "last_reply",
            "error_code",
            "route",
            "contact_id",
        ):
            batch_op.drop_column(column)
