"""Deadlines: a message not started by its expires_at is never sent

- jobs.expires_at and job_history.expires_at (NULL: no deadline), with a partial index
  of the live jobs that have one, for the sweep that ends them (queries.sql expire_jobs);
- `expired`, a finished state of its own in job_history, counted per tenant in
  tenant_totals.expired (pgqueue.tenant_finished sums it);
- queues.message_type_ttls: seconds a message of a type may wait when it gives no
  deadline of its own, e.g. {"marketing": 3600, "notification": 600};
- pgqueue.jobs_overview shows expires_at.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

OVERVIEW = """
    CREATE OR REPLACE VIEW pgqueue.jobs_overview AS
    -- Every job, live or finished, in the old system's state words. For people and
    -- dashboards; the workers never read it.
    SELECT id, queue, tenant_id, conversation,
           CASE WHEN state = 'active' THEN 'active'
                WHEN run_at > now() THEN 'delayed'
                ELSE 'waiting' END AS state,
           is_head, priority, attempts, max_attempts, to_number, message_type,
           left(body, 40) AS body_preview, content_sid, last_error_code,
           last_error_message, provider_sid, provider_status, channel,
           created_at, run_at, started_at, NULL::timestamptz AS finished_at,
           claimed_by, lease_expires_at{expires}
    FROM pgqueue.jobs
    UNION ALL
    SELECT id, queue, tenant_id, conversation, state, false, priority, attempts,
           max_attempts, to_number, message_type, left(body, 40), content_sid,
           last_error_code, last_error_message, provider_sid, provider_status, channel,
           created_at, run_at, started_at, finished_at, NULL, NULL{expires}
    FROM pgqueue.job_history
"""

FINISHED = """
    CREATE OR REPLACE VIEW pgqueue.tenant_finished AS
    -- Each tenant's finished sends: the sums over its shards of tenant_totals. An
    -- operator's retry or clean of dead letters subtracts in a shard of its own, so
    -- a shard can go below zero; a tenant's sum of failures is never shown below it.
    SELECT tenant_id, sum(completed)::bigint AS completed,
           greatest(sum(failed), 0)::bigint AS failed{expired}
    FROM pgqueue.tenant_totals GROUP BY tenant_id
"""


def upgrade() -> None:
    for table in ("jobs", "job_history"):
        op.add_column(table, sa.Column("expires_at", sa.TIMESTAMP(timezone=True)), schema="pgqueue")
    op.create_index(
        "jobs_expiring",
        "jobs",
        ["queue", "expires_at"],
        schema="pgqueue",
        postgresql_where=sa.text("expires_at IS NOT NULL"),
    )
    op.drop_constraint("job_history_state_finished", "job_history", schema="pgqueue")
    op.create_check_constraint(
        "job_history_state_finished",
        "job_history",
        "state IN ('completed', 'failed', 'expired')",
        schema="pgqueue",
    )
    op.add_column(
        "tenant_totals",
        sa.Column("expired", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        schema="pgqueue",
    )
    op.add_column(
        "queues",
        sa.Column(
            "message_type_ttls",
            postgresql.JSONB(),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        schema="pgqueue",
    )
    op.execute(OVERVIEW.format(expires=", expires_at"))
    op.execute(FINISHED.format(expired=", sum(expired)::bigint AS expired"))


def downgrade() -> None:
    # A view cannot lose a column in place: made again without it.
    op.execute("DROP VIEW pgqueue.jobs_overview")
    op.execute(OVERVIEW.format(expires="").replace("CREATE OR REPLACE", "CREATE"))
    op.execute("DROP VIEW pgqueue.tenant_finished")
    op.execute(FINISHED.format(expired="").replace("CREATE OR REPLACE", "CREATE"))
    # Dropped and made again, the views lost their grants: give them back (migration 0011).
    op.execute("SELECT pgqueue.apply_roles(false)")
    op.drop_column("queues", "message_type_ttls", schema="pgqueue")
    op.drop_column("tenant_totals", "expired", schema="pgqueue")
    op.execute("DELETE FROM pgqueue.job_history WHERE state = 'expired'")
    op.drop_constraint("job_history_state_finished", "job_history", schema="pgqueue")
    op.create_check_constraint(
        "job_history_state_finished",
        "job_history",
        "state IN ('completed', 'failed')",
        schema="pgqueue",
    )
    op.drop_index("jobs_expiring", table_name="jobs", schema="pgqueue")
    for table in ("jobs", "job_history"):
        op.drop_column(table, "expires_at", schema="pgqueue")
