"""Drop two indexes every send paid for: jobs_active and job_history_id

Every claim and every completion rewrites its job rows outside HOT (state and is_head
are in index predicates), so each index on pgqueue.jobs costs an insert per claim, per
promotion and per retry, and each one on job_history an insert per finished job.
jobs_one_active_per_conversation (queue, conversation) WHERE state = 'active' answers
everything jobs_active (queue) WHERE state = 'active' did; the primary key (id,
finished_at) answers everything job_history_id (id) did.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("jobs_active", table_name="jobs", schema="pgqueue")
    op.drop_index("job_history_id", table_name="job_history", schema="pgqueue")


def downgrade() -> None:
    op.create_index("job_history_id", "job_history", ["id"], unique=False, schema="pgqueue")
    op.create_index(
        "jobs_active",
        "jobs",
        ["queue"],
        unique=False,
        schema="pgqueue",
        postgresql_where=sa.text("state = 'active'"),
    )
