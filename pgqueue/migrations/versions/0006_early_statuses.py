"""Hold status callbacks that arrive before their message's SID is committed

Twilio may call back within milliseconds of accepting a message, before the worker's
completion (which records the SID) has committed; such a callback used to be answered
and dropped. It is now kept in pgqueue.early_statuses until maintenance applies it.
pgqueue.provider_status_rank() orders the statuses for the callback and the sweep alike.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "early_statuses",
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("provider_sid", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("error_code", sa.Text(), nullable=True),
        sa.Column(
            "received_at",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(["tenant_id"], ["pgqueue.tenants.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("tenant_id", "provider_sid", name="early_statuses_pkey"),
        schema="pgqueue",
    )
    # Callbacks arrive out of order and may repeat: a status only moves forward.
    # 0 is a status Twilio does not send (ignored); 9 ends a message.
    op.execute(
        """
        CREATE FUNCTION pgqueue.provider_status_rank(status text)
        RETURNS integer LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
            SELECT CASE status
                WHEN 'accepted' THEN 1 WHEN 'scheduled' THEN 1 WHEN 'queued' THEN 2
                WHEN 'sending' THEN 3 WHEN 'sent' THEN 4 WHEN 'delivered' THEN 5
                WHEN 'read' THEN 6 WHEN 'failed' THEN 9 WHEN 'undelivered' THEN 9
                WHEN 'canceled' THEN 9 ELSE 0 END
        $$
        """
    )


def downgrade() -> None:
    op.execute("DROP FUNCTION pgqueue.provider_status_rank(text)")
    op.drop_table("early_statuses", schema="pgqueue")
