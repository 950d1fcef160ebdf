"""Count sends in flight instead of keeping counters; finished totals in shards

Claims counted free slots from tenants.active and queues.active, which every completion
had to update: so a completion took the queue lock and waited for every claim of every
worker. Claims now count the active jobs themselves (at most the global limit of rows),
and the finished totals move from the tenants rows, which claims write, to
pgqueue.tenant_totals, sharded by database session: a completion writes no row a claim
or another worker's completion writes, and runs beside them.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tenant_totals",
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("shard", sa.SmallInteger(), nullable=False),
        sa.Column("completed", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("failed", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["pgqueue.tenants.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("tenant_id", "shard", name="tenant_totals_pkey"),
        schema="pgqueue",
    )
    op.execute(
        """
        INSERT INTO pgqueue.tenant_totals (tenant_id, shard, completed, failed)
        SELECT id, 0, completed_total, failed_total FROM pgqueue.tenants
        WHERE completed_total <> 0 OR failed_total <> 0
        """
    )
    for column in ("active", "completed_total", "failed_total"):
        op.drop_column("tenants", column, schema="pgqueue")
    op.drop_column("queues", "active", schema="pgqueue")
    op.execute(
        """
        CREATE VIEW pgqueue.tenant_in_flight AS
        -- Each tenant's sends in flight, in all queues, as claims count them against its
        -- limit (G2). Tenants with none have no row.
        SELECT tenant_id, count(*)::int AS n FROM pgqueue.jobs
        WHERE state = 'active' GROUP BY tenant_id
        """
    )
    op.execute(
        """
        CREATE VIEW pgqueue.tenant_finished AS
        -- Each tenant's finished sends: the sums over its shards of tenant_totals. An
        -- operator's retry or clean of dead letters subtracts in a shard of its own, so
        -- a shard can go below zero; a tenant's sum of failures is never shown below it.
        SELECT tenant_id, sum(completed)::bigint AS completed,
               greatest(sum(failed), 0)::bigint AS failed
        FROM pgqueue.tenant_totals GROUP BY tenant_id
        """
    )


def downgrade() -> None:
    op.execute("DROP VIEW pgqueue.tenant_finished")
    op.execute("DROP VIEW pgqueue.tenant_in_flight")
    zero = sa.text("0")
    op.add_column(
        "queues",
        sa.Column("active", sa.Integer(), server_default=zero, nullable=False),
        schema="pgqueue",
    )
    op.add_column(
        "tenants",
        sa.Column("active", sa.Integer(), server_default=zero, nullable=False),
        schema="pgqueue",
    )
    for column in ("completed_total", "failed_total"):
        op.add_column(
            "tenants",
            sa.Column(column, sa.BigInteger(), server_default=zero, nullable=False),
            schema="pgqueue",
        )
    for table in ("queues", "tenants"):
        op.create_check_constraint(
            f"{table}_active_nonnegative", table, "active >= 0", schema="pgqueue"
        )
    op.execute(
        """
        UPDATE pgqueue.queues q SET active = (
            SELECT count(*) FROM pgqueue.jobs j WHERE j.queue = q.name AND j.state = 'active')
        """
    )
    op.execute(
        """
        UPDATE pgqueue.tenants t SET
            active = (SELECT count(*) FROM pgqueue.jobs j
                      WHERE j.tenant_id = t.id AND j.state = 'active'),
            completed_total = coalesce((SELECT sum(x.completed) FROM pgqueue.tenant_totals x
                                        WHERE x.tenant_id = t.id), 0),
            failed_total = greatest(coalesce((SELECT sum(x.failed) FROM pgqueue.tenant_totals x
                                              WHERE x.tenant_id = t.id), 0), 0)
        """
    )
    op.drop_table("tenant_totals", schema="pgqueue")
