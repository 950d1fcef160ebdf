"""A send stops counting as in flight when its worker has the answer: jobs.answered_at

Until now a send counted against its tenant's limit (G2) and the queue's (G3) from its
claim until its outcome committed, and the outcome reaches the database only after the
worker's next turn has dropped the conversation's lock and its completer has written it:
some 17 ms a send, 8 % of what a 50/s sender allowed 10 in flight may spend on each
(bench/senders.py). The turn that drops the lock now also sets answered_at, under the
queue lock, so the claim in that same turn can hand the freed place on;
pgqueue.tenant_in_flight and the claim count only the sends not yet answered.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None

VIEW = """
    CREATE OR REPLACE VIEW pgqueue.tenant_in_flight AS
    -- Each tenant's sends in flight, in all queues, as claims count them against its
    -- limit (G2): claimed and not yet answered. Tenants with none have no row.
    SELECT tenant_id, count(*)::int AS n FROM pgqueue.jobs
    WHERE state = 'active'{answered} GROUP BY tenant_id
"""


def upgrade() -> None:
    op.add_column("jobs", sa.Column("answered_at", sa.TIMESTAMP(timezone=True)), schema="pgqueue")
    op.execute(VIEW.format(answered=" AND answered_at IS NULL"))


def downgrade() -> None:
    op.execute(VIEW.format(answered=""))
    op.drop_column("jobs", "answered_at", schema="pgqueue")
