"""A worker tells its claim which of its sends have their answers: jobs.answered_at goes

Migration 0016 wrote answered_at on every finished send, under the queue lock, so that
the claim in the same turn could hand the place on: a second row version a send, which
cost a fifth of the no-op throughput. The claim now takes the claim tokens of the
worker's own answered sends whose outcomes are not yet written, and counts them out of
G2 and G3; pgqueue.tenant_in_flight again counts every active job (what every other
worker's claim counts: the safe side).

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None

VIEW = """
    CREATE OR REPLACE VIEW pgqueue.tenant_in_flight AS
    -- Each tenant's sends in flight, in all queues, as claims count them against its
    -- limit (G2). Tenants with none have no row.
    SELECT tenant_id, count(*)::int AS n FROM pgqueue.jobs
    WHERE state = 'active'{answered} GROUP BY tenant_id
"""


def upgrade() -> None:
    # The view reads the column: it goes first.
    op.execute(VIEW.format(answered=""))
    op.drop_column("jobs", "answered_at", schema="pgqueue")


def downgrade() -> None:
    op.add_column("jobs", sa.Column("answered_at", sa.TIMESTAMP(timezone=True)), schema="pgqueue")
    op.execute(VIEW.format(answered=" AND answered_at IS NULL"))
