"""sandbox_messages.started_at: when the simulated send began (the demo's verdicts)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "sandbox_messages",
        sa.Column(
            "started_at",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        schema="pgqueue",
    )


def downgrade() -> None:
    op.drop_column("sandbox_messages", "started_at", schema="pgqueue")
