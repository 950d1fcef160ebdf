"""job_history (queue, finished_at): sends per interval for the dashboard's chart

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "job_history_queue_finished",
        "job_history",
        ["queue", "finished_at"],
        unique=False,
        schema="pgqueue",
    )


def downgrade() -> None:
    op.drop_index("job_history_queue_finished", table_name="job_history", schema="pgqueue")
