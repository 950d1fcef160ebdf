"""Conversations belong to their tenant; a tenant's senders; stored moments in range

A conversation was keyed by (queue, conversationId) as the client sent it, so one
tenant could put a message into another's conversation and hold it back (G1 made every
later message of that conversation wait behind it). The stored key now starts with the
tenant's id (`tenant:conversationId`, what the default `tenant:+E164` already was), and
the database refuses any other (`jobs_conversation_of_tenant`). Existing keys are
qualified, which splits a conversation two tenants shared into one per tenant: heads and
the conversations' pending counts are computed again.

Run it with the workers stopped (as every migration here): the advisory lock of a
conversation is keyed by its name, so a send in flight across the rename would look
orphaned to the rescuer and be sent again (at-least-once, never lost).

Also: `tenants.senders`, the other WhatsApp senders a message's fromNumber may name;
and `jobs_run_at_in_range`, so every stored moment can be read back (a `sendAt` of year 1
with a positive offset was stored and then broke every listing).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "tenants",
        sa.Column(
            "senders",
            postgresql.ARRAY(sa.Text()),
            server_default=sa.text("'{}'::text[]"),
            nullable=False,
        ),
        schema="pgqueue",
    )
    op.execute(
        """
        UPDATE pgqueue.job_history SET conversation = tenant_id || ':' || conversation
        WHERE NOT starts_with(conversation, tenant_id || ':')
        """
    )
    op.execute(
        """
        UPDATE pgqueue.job_history SET run_at = created_at
        WHERE run_at < '2000-01-01' OR run_at > '9999-01-01'
        """
    )
    op.execute(
        """
        UPDATE pgqueue.jobs SET run_at = now()
        WHERE run_at < '2000-01-01' OR run_at > '9999-01-01'
        """
    )
    # Heads first: a qualified key may meet the tenant's own key of the same name.
    op.execute("UPDATE pgqueue.jobs SET is_head = false WHERE is_head AND state <> 'active'")
    op.execute(
        """
        UPDATE pgqueue.jobs SET conversation = tenant_id || ':' || conversation
        WHERE NOT starts_with(conversation, tenant_id || ':')
        """
    )
    op.execute(
        """
        UPDATE pgqueue.jobs j SET is_head = true
        FROM (SELECT DISTINCT ON (queue, conversation) id, is_head
              FROM pgqueue.jobs
              ORDER BY queue, conversation, state = 'active' DESC, seq) first
        WHERE j.id = first.id AND NOT first.is_head
        """
    )
    op.execute("DELETE FROM pgqueue.conversations")
    op.execute(
        """
        INSERT INTO pgqueue.conversations (queue, conversation, pending)
        SELECT queue, conversation, count(*) FROM pgqueue.jobs
        GROUP BY queue, conversation ORDER BY queue, conversation
        """
    )
    op.create_check_constraint(
        "jobs_conversation_of_tenant",
        "jobs",
        "starts_with(conversation, tenant_id || ':')",
        schema="pgqueue",
    )
    op.create_check_constraint(
        "jobs_run_at_in_range",
        "jobs",
        "run_at BETWEEN '2000-01-01' AND '9999-01-01'",
        schema="pgqueue",
    )


def downgrade() -> None:
    # Qualified keys stay: to the older code they are conversation names like any other.
    op.drop_constraint("jobs_run_at_in_range", "jobs", schema="pgqueue")
    op.drop_constraint("jobs_conversation_of_tenant", "jobs", schema="pgqueue")
    op.drop_column("tenants", "senders", schema="pgqueue")
