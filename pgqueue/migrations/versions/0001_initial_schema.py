"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-28 01:31:55.378661
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE SEQUENCE pgqueue.job_seq")
    op.create_table(
        "conversations",
        sa.Column("queue", sa.Text(), nullable=False),
        sa.Column("conversation", sa.Text(), nullable=False),
        sa.Column("pending", sa.Integer(), nullable=False),
        sa.Column(
            "updated_at",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint("pending >= 0", name="conversations_pending_nonnegative"),
        sa.PrimaryKeyConstraint("queue", "conversation", name="conversations_pkey"),
        schema="pgqueue",
    )
    op.create_table(
        "job_history",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("queue", sa.Text(), nullable=False),
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("conversation", sa.Text(), nullable=False),
        sa.Column("priority", sa.SmallInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column(
            "run_at",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("to_number", sa.Text(), nullable=False),
        sa.Column("from_number", sa.Text(), nullable=True),
        sa.Column("body", sa.Text(), nullable=True),
        sa.Column("content_sid", sa.Text(), nullable=True),
        sa.Column("content_variables", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("message_type", sa.Text(), nullable=True),
        sa.Column("idempotency_key", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("last_error_code", sa.Text(), nullable=True),
        sa.Column("last_error_message", sa.Text(), nullable=True),
        sa.Column("provider_sid", sa.Text(), nullable=True),
        sa.Column("provider_status", sa.Text(), nullable=True),
        sa.Column("channel", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("started_at", postgresql.TIMESTAMP(timezone=True), nullable=True),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column(
            "finished_at",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint("state IN ('completed', 'failed')", name="job_history_state_finished"),
        sa.PrimaryKeyConstraint("id", "finished_at", name="job_history_pkey"),
        schema="pgqueue",
        postgresql_partition_by="RANGE (finished_at)",
    )
    op.create_index(
        "job_history_failed",
        "job_history",
        ["queue", "finished_at"],
        unique=False,
        schema="pgqueue",
        postgresql_where=sa.text("state = 'failed'"),
    )
    op.create_index("job_history_id", "job_history", ["id"], unique=False, schema="pgqueue")
    op.create_index(
        "job_history_idempotency",
        "job_history",
        ["tenant_id", "idempotency_key"],
        unique=False,
        schema="pgqueue",
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
    )
    op.create_index(
        "job_history_provider_sid", "job_history", ["provider_sid"], unique=False, schema="pgqueue"
    )
    op.create_index(
        "job_history_tenant_finished",
        "job_history",
        ["tenant_id", "finished_at"],
        unique=False,
        schema="pgqueue",
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column(
            "seq",
            sa.BigInteger(),
            server_default=sa.text("nextval('pgqueue.job_seq')"),
            nullable=False,
        ),
        sa.Column("queue", sa.Text(), nullable=False),
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("conversation", sa.Text(), nullable=False),
        sa.Column("priority", sa.SmallInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column(
            "run_at",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("to_number", sa.Text(), nullable=False),
        sa.Column("from_number", sa.Text(), nullable=True),
        sa.Column("body", sa.Text(), nullable=True),
        sa.Column("content_sid", sa.Text(), nullable=True),
        sa.Column("content_variables", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("message_type", sa.Text(), nullable=True),
        sa.Column("idempotency_key", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("last_error_code", sa.Text(), nullable=True),
        sa.Column("last_error_message", sa.Text(), nullable=True),
        sa.Column("provider_sid", sa.Text(), nullable=True),
        sa.Column("provider_status", sa.Text(), nullable=True),
        sa.Column("channel", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("started_at", postgresql.TIMESTAMP(timezone=True), nullable=True),
        sa.Column("is_head", sa.Boolean(), nullable=False),
        sa.Column("state", sa.Text(), server_default=sa.text("'waiting'"), nullable=False),
        sa.Column("start_at", postgresql.TIMESTAMP(timezone=True), nullable=True),
        sa.Column("claim_token", sa.UUID(), nullable=True),
        sa.Column("claimed_by", sa.Text(), nullable=True),
        sa.Column("lease_expires_at", postgresql.TIMESTAMP(timezone=True), nullable=True),
        sa.Column(
            "updated_at",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "(state = 'active') = (claim_token IS NOT NULL)", name="jobs_active_has_token"
        ),
        sa.CheckConstraint("state <> 'active' OR is_head", name="jobs_active_is_head"),
        sa.CheckConstraint("state IN ('waiting', 'delayed', 'active')", name="jobs_state_live"),
        sa.CheckConstraint("body IS NOT NULL OR content_sid IS NOT NULL", name="jobs_has_content"),
        sa.CheckConstraint("priority BETWEEN -100 AND 100", name="jobs_priority_range"),
        sa.PrimaryKeyConstraint("id"),
        schema="pgqueue",
    )
    op.create_index(
        "jobs_active",
        "jobs",
        ["queue"],
        unique=False,
        schema="pgqueue",
        postgresql_where=sa.text("state = 'active'"),
    )
    op.create_index(
        "jobs_candidates",
        "jobs",
        ["queue", "tenant_id", sa.literal_column("priority DESC"), "seq"],
        unique=False,
        schema="pgqueue",
        postgresql_where=sa.text("is_head AND state <> 'active'"),
    )
    op.create_index(
        "jobs_conversation_order",
        "jobs",
        ["queue", "conversation", "seq"],
        unique=False,
        schema="pgqueue",
    )
    op.create_index(
        "jobs_heads_by_run_at",
        "jobs",
        ["queue", "run_at"],
        unique=False,
        schema="pgqueue",
        postgresql_where=sa.text("is_head AND state <> 'active'"),
    )
    op.create_index(
        "jobs_idempotency",
        "jobs",
        ["tenant_id", "idempotency_key"],
        unique=True,
        schema="pgqueue",
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
    )
    op.create_index(
        "jobs_one_active_per_conversation",
        "jobs",
        ["queue", "conversation"],
        unique=True,
        schema="pgqueue",
        postgresql_where=sa.text("state = 'active'"),
    )
    op.create_index(
        "jobs_one_head_per_conversation",
        "jobs",
        ["queue", "conversation"],
        unique=True,
        schema="pgqueue",
        postgresql_where=sa.text("is_head"),
    )
    op.create_index(
        "jobs_tenant_created", "jobs", ["tenant_id", "created_at"], unique=False, schema="pgqueue"
    )
    op.create_table(
        "queues",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("global_concurrency", sa.Integer(), server_default=sa.text("20"), nullable=False),
        sa.Column("tenant_concurrency", sa.Integer(), server_default=sa.text("5"), nullable=False),
        sa.Column("rate_per_second", sa.Double(), server_default=sa.text("80"), nullable=False),
        sa.Column(
            "rate_tat",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("active", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("retention_days", sa.Integer(), server_default=sa.text("7"), nullable=False),
        sa.Column(
            "message_type_priorities",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text(
                '\'{"customer_service": 10, "marketing": 5, "notification": 0}\'::jsonb'
            ),
            nullable=False,
        ),
        sa.Column(
            "created_at",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint("active >= 0", name="queues_active_nonnegative"),
        sa.CheckConstraint("global_concurrency >= 1", name="queues_global_concurrency_positive"),
        sa.CheckConstraint("rate_per_second > 0", name="queues_rate_positive"),
        sa.CheckConstraint("retention_days >= 1", name="queues_retention_positive"),
        sa.CheckConstraint("tenant_concurrency >= 1", name="queues_tenant_concurrency_positive"),
        sa.PrimaryKeyConstraint("name"),
        schema="pgqueue",
    )
    op.create_table(
        "sandbox_messages",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("job_id", sa.BigInteger(), nullable=True),
        sa.Column("to_number", sa.Text(), nullable=False),
        sa.Column("body", sa.Text(), nullable=True),
        sa.Column("content_sid", sa.Text(), nullable=True),
        sa.Column("sid", sa.Text(), nullable=False),
        sa.Column(
            "created_at",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id"),
        schema="pgqueue",
    )
    op.create_table(
        "tenants",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("account_sid", sa.Text(), nullable=False),
        sa.Column("auth_token", sa.Text(), nullable=False),
        sa.Column("whatsapp_from", sa.Text(), nullable=False),
        sa.Column("max_concurrency", sa.Integer(), nullable=True),
        sa.Column("rate_per_second", sa.Double(), nullable=True),
        sa.Column(
            "rate_tat",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("paused", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("pause_reason", sa.Text(), nullable=True),
        sa.Column("fallback_content_sid", sa.Text(), nullable=True),
        sa.Column("fallback_variable", sa.Text(), nullable=True),
        sa.Column("active", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("last_served_at", postgresql.TIMESTAMP(timezone=True), nullable=True),
        sa.Column("completed_total", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("failed_total", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column(
            "created_at",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint("active >= 0", name="tenants_active_nonnegative"),
        sa.CheckConstraint(
            "max_concurrency IS NULL OR max_concurrency >= 1",
            name="tenants_max_concurrency_positive",
        ),
        sa.CheckConstraint(
            "rate_per_second IS NULL OR rate_per_second > 0", name="tenants_rate_positive"
        ),
        sa.PrimaryKeyConstraint("id"),
        schema="pgqueue",
    )
    op.create_table(
        "workers",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("queue", sa.Text(), nullable=False),
        sa.Column("hostname", sa.Text(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("concurrency", sa.Integer(), nullable=False),
        sa.Column(
            "started_at",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "heartbeat_at",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id"),
        schema="pgqueue",
    )
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("token_hash", sa.Text(), nullable=False),
        sa.Column("prefix", sa.Text(), nullable=False),
        sa.Column(
            "created_at",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("last_used_at", postgresql.TIMESTAMP(timezone=True), nullable=True),
        sa.Column("revoked_at", postgresql.TIMESTAMP(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["tenant_id"], ["pgqueue.tenants.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("token_hash"),
        schema="pgqueue",
    )
    op.create_table(
        "suppressions",
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("phone_number", sa.Text(), nullable=False),
        sa.Column("reason_code", sa.Text(), nullable=False),
        sa.Column(
            "created_at",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(["tenant_id"], ["pgqueue.tenants.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("tenant_id", "phone_number", name="suppressions_pkey"),
        schema="pgqueue",
    )


def downgrade() -> None:
    op.drop_table("suppressions", schema="pgqueue")
    op.drop_table("api_tokens", schema="pgqueue")
    op.drop_table("workers", schema="pgqueue")
    op.drop_table("tenants", schema="pgqueue")
    op.drop_table("sandbox_messages", schema="pgqueue")
    op.drop_table("queues", schema="pgqueue")
    op.drop_index("jobs_tenant_created", table_name="jobs", schema="pgqueue")
    op.drop_index(
        "jobs_one_head_per_conversation",
        table_name="jobs",
        schema="pgqueue",
        postgresql_where=sa.text("is_head"),
    )
    op.drop_index(
        "jobs_one_active_per_conversation",
        table_name="jobs",
        schema="pgqueue",
        postgresql_where=sa.text("state = 'active'"),
    )
    op.drop_index(
        "jobs_idempotency",
        table_name="jobs",
        schema="pgqueue",
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
    )
    op.drop_index(
        "jobs_heads_by_run_at",
        table_name="jobs",
        schema="pgqueue",
        postgresql_where=sa.text("is_head AND state <> 'active'"),
    )
    op.drop_index("jobs_conversation_order", table_name="jobs", schema="pgqueue")
    op.drop_index(
        "jobs_candidates",
        table_name="jobs",
        schema="pgqueue",
        postgresql_where=sa.text("is_head AND state <> 'active'"),
    )
    op.drop_index(
        "jobs_active",
        table_name="jobs",
        schema="pgqueue",
        postgresql_where=sa.text("state = 'active'"),
    )
    op.drop_table("jobs", schema="pgqueue")
    op.drop_index("job_history_tenant_finished", table_name="job_history", schema="pgqueue")
    op.drop_index("job_history_provider_sid", table_name="job_history", schema="pgqueue")
    op.drop_index(
        "job_history_idempotency",
        table_name="job_history",
        schema="pgqueue",
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
    )
    op.drop_index("job_history_id", table_name="job_history", schema="pgqueue")
    op.drop_index(
        "job_history_failed",
        table_name="job_history",
        schema="pgqueue",
        postgresql_where=sa.text("state = 'failed'"),
    )
    op.drop_table("job_history", schema="pgqueue")
    op.drop_table("conversations", schema="pgqueue")
    op.execute("DROP SEQUENCE pgqueue.job_seq")
