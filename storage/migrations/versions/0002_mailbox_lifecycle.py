"""Mailbox lifecycle (issue 3): pending OAuth authorizations and mailbox token/server columns.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 09:55:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add ``oauth_states`` and the mailbox columns for token expiry, servers and R20."""
    with op.batch_alter_table("mailboxes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("token_expires_at", sa.DateTime(timezone=True)))
        batch_op.add_column(sa.Column("server_settings", sa.JSON()))
        batch_op.add_column(sa.Column("replaced_by_mailbox_id", sa.Integer()))
        batch_op.create_foreign_key(
            batch_op.f("fk_mailboxes_replaced_by_mailbox_id_mailboxes"),
            "mailboxes",
            ["replaced_by_mailbox_id"],
            ["id"],
            ondelete="SET NULL",
        )
    op.create_table(
        "oauth_states",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("state_sha256", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("subaccount_id", sa.Integer(), nullable=False),
        sa.Column("provider", sa.String(length=32), nullable=False),
        sa.Column("purpose", sa.String(length=16), nullable=False),
        sa.Column("code_verifier_ciphertext", sa.LargeBinary(), nullable=False),
        sa.Column("nonce", sa.String(length=64), nullable=False),
        sa.Column("redirect_uri", sa.Text(), nullable=False),
        sa.Column("replaces_mailbox_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_oauth_states_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["subaccount_id"],
            ["subaccounts.id"],
            name=op.f("fk_oauth_states_subaccount_id_subaccounts"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["replaces_mailbox_id"],
            ["mailboxes.id"],
            name=op.f("fk_oauth_states_replaces_mailbox_id_mailboxes"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_oauth_states")),
        sa.UniqueConstraint("state_sha256", name=op.f("uq_oauth_states_state_sha256")),
    )
    with op.batch_alter_table("oauth_states", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_oauth_states_user_id"), ["user_id"], unique=False)


def downgrade() -> None:
    """Drop ``oauth_states`` and the added mailbox columns."""
    with op.batch_alter_table("oauth_states", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_oauth_states_user_id"))
    op.drop_table("oauth_states")
    with op.batch_alter_table("mailboxes", schema=None) as batch_op:
        batch_op.drop_constraint(
            batch_op.f("fk_mailboxes_replaced_by_mailbox_id_mailboxes"), type_="foreignkey"
        )
        batch_op.drop_column("replaced_by_mailbox_id")
        batch_op.drop_column("server_settings")
        batch_op.drop_column("token_expires_at")
