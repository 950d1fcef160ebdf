"""The schema's single source: SQLAlchemy Core tables, Alembic's target.

Invariants live here as constraints and partial unique indexes, so the database refuses a
state that would break a guarantee instead of trusting every code path to avoid it:

* one head per conversation (G1): `jobs_one_head_per_conversation`;
* one send in flight per conversation (G1): `jobs_one_active_per_conversation`;
* sends in flight (G2, G3) are never a stored counter that could drift: claims count
  the active jobs themselves;
* an active job always carries its claim token (fencing).

Finished jobs leave `jobs` for `job_history`, partitioned by day on `finished_at`, so the
live table stays small and retention is `DROP TABLE` of old partitions.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Double,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Sequence,
    SmallInteger,
    Table,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, TIMESTAMP, UUID

SCHEMA = "pgqueue"
metadata = MetaData(schema=SCHEMA)

TZ = TIMESTAMP(timezone=True)
NOW = text("now()")

job_seq = Sequence("job_seq", metadata=metadata, schema=SCHEMA)
event_seq = Sequence("event_seq", metadata=metadata, schema=SCHEMA)

queues = Table(
    "queues",
    metadata,
    Column("name", Text, primary_key=True),
    Column("global_concurrency", Integer, nullable=False, server_default=text("20")),
    Column("tenant_concurrency", Integer, nullable=False, server_default=text("5")),
    Column("rate_per_second", Double, nullable=False, server_default=text("80")),
    # GCRA state: the earliest moment the next send may start (G4). Pushed forward on
    # every claim and by a provider's 429, so it also is the bucket's pause.
    Column("rate_tat", TZ, nullable=False, server_default=NOW),
    # The slots handed out that are still to come (or less than a spacing ago), in
    # order: a claim may give a slot between two of them, a spacing away from both
    # (pgqueue.pace_free), so a sender's slot near now is not held behind a later one
    # an earlier claim gave. No slot before rate_floor (a provider's 429).
    Column(
        "rate_booked",
        ARRAY(TZ),
        nullable=False,
        server_default=text("'{}'::timestamptz[]"),
    ),
    Column("rate_floor", TZ),
    Column("retention_days", Integer, nullable=False, server_default=text("7")),
    Column(
        "message_type_priorities",
        JSONB,
        nullable=False,
        server_default=text(
            """'{"customer_service": 10, "marketing": 5, "notification": 0}'::jsonb"""
        ),
    ),
    # Seconds a message of a type may wait before it is worth nothing (expires_at for a
    # message that gives none), e.g. {"marketing": 3600}; a type not named never expires.
    Column("message_type_ttls", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("created_at", TZ, nullable=False, server_default=NOW),
    Column("updated_at", TZ, nullable=False, server_default=NOW),
    CheckConstraint("global_concurrency >= 1", name="queues_global_concurrency_positive"),
    CheckConstraint("tenant_concurrency >= 1", name="queues_tenant_concurrency_positive"),
    CheckConstraint("rate_per_second > 0", name="queues_rate_positive"),
    CheckConstraint("retention_days >= 1", name="queues_retention_positive"),
)

tenants = Table(
    "tenants",
    metadata,
    Column("id", Text, primary_key=True),
    Column("name", Text, nullable=False),
    Column("account_sid", Text, nullable=False),
    Column("auth_token", Text, nullable=False),
    # The default sender; `senders` are the tenant's other WhatsApp senders, the only
    # other values a message's fromNumber may take (a tenant never sends as another).
    Column("whatsapp_from", Text, nullable=False),
    Column("senders", ARRAY(Text), nullable=False, server_default=text("'{}'::text[]")),
    Column("max_concurrency", Integer),
    Column("rate_per_second", Double),
    Column("rate_tat", TZ, nullable=False, server_default=NOW),
    Column("paused", Boolean, nullable=False, server_default=text("false")),
    # Until then claims pass the tenant over: its WhatsApp sender rests after a limit of
    # its own at Twilio (messaging tier, its queue full), then goes on by itself.
    Column("paused_until", TZ),
    Column("pause_reason", Text),
    Column("fallback_content_sid", Text),
    Column("fallback_variable", Text),
    Column("last_served_at", TZ),
    # Where the tenant's delivery events are posted (pgqueue/webhooks.py), signed with
    # the secret (stored sealed like auth_token: pgqueue/credentials.py).
    Column("webhook_url", Text),
    Column("webhook_secret", Text),
    Column("created_at", TZ, nullable=False, server_default=NOW),
    Column("updated_at", TZ, nullable=False, server_default=NOW),
    CheckConstraint(
        "max_concurrency IS NULL OR max_concurrency >= 1", name="tenants_max_concurrency_positive"
    ),
    CheckConstraint("rate_per_second IS NULL OR rate_per_second > 0", name="tenants_rate_positive"),
)

# A row per (queue, tenant, priority) at which the tenant has a waiting head, in the
# claim's order among tenants with nothing in flight, so a claim reads the tenants that
# have work from the front of an index instead of every tenant (migration 0009 has the
# trigger that adds rows and pgqueue.prune_ready, which removes the drained ones).
ready_tenants = Table(
    "ready_tenants",
    metadata,
    Column("queue", Text, nullable=False),
    Column("tenant_id", Text, ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("priority", Integer, nullable=False),
    Column("served_at", TZ),
    Column("drained", Boolean, nullable=False, server_default=text("false")),
    PrimaryKeyConstraint("queue", "tenant_id", "priority", name="ready_tenants_pkey"),
    Index(
        "ready_tenants_claim_order",
        "queue",
        text("priority DESC"),
        text("served_at NULLS FIRST"),
        "tenant_id",
    ),
    Index("ready_tenants_drained", "queue", postgresql_where=text("drained")),
)

# Finished sends per tenant, in shards: a completion adds to the shard of its database
# session (backend pid % 16), so completions of different workers never wait for one
# another's rows. A tenant's totals are the sums over its shards.
tenant_totals = Table(
    "tenant_totals",
    metadata,
    Column("tenant_id", Text, ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("shard", SmallInteger, nullable=False),
    Column("completed", BigInteger, nullable=False, server_default=text("0")),
    Column("failed", BigInteger, nullable=False, server_default=text("0")),
    Column("expired", BigInteger, nullable=False, server_default=text("0")),
    PrimaryKeyConstraint("tenant_id", "shard", name="tenant_totals_pkey"),
)

api_tokens = Table(
    "api_tokens",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("tenant_id", Text, ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    # sha256 of the token; the token itself is shown once and never stored.
    Column("token_hash", Text, nullable=False, unique=True),
    Column("prefix", Text, nullable=False),
    Column("created_at", TZ, nullable=False, server_default=NOW),
    Column("last_used_at", TZ),
    Column("revoked_at", TZ),
    # NULL: valid until revoked (migration 0010).
    Column("expires_at", TZ),
)

# One row per conversation with unfinished jobs. Enqueue and promotion both update this
# row, so they are serialised per conversation by its row lock: the lost-promotion race
# (a completion looking for the next job while an enqueue is inserting it) cannot happen.
conversations = Table(
    "conversations",
    metadata,
    Column("queue", Text, nullable=False),
    Column("conversation", Text, nullable=False),
    Column("pending", Integer, nullable=False),
    Column("updated_at", TZ, nullable=False, server_default=NOW),
    PrimaryKeyConstraint("queue", "conversation", name="conversations_pkey"),
    CheckConstraint("pending >= 0", name="conversations_pending_nonnegative"),
)


def _message_columns(*, live: bool) -> list[Column[object]]:
    # `seq` is the enqueue order a conversation is sent in (G1, G5); a retried dead job
    # gets a new one, so `id` can stay stable.
    seq_default = text("nextval('pgqueue.job_seq')") if live else None
    return [
        Column("seq", BigInteger, nullable=False, server_default=seq_default),
        Column("queue", Text, nullable=False),
        Column("tenant_id", Text, nullable=False),
        Column("conversation", Text, nullable=False),
        Column("priority", SmallInteger, nullable=False, server_default=text("0")),
        Column("run_at", TZ, nullable=False, server_default=NOW),
        Column("to_number", Text, nullable=False),
        Column("from_number", Text),
        Column("body", Text),
        Column("content_sid", Text),
        Column("content_variables", JSONB),
        Column("message_type", Text),
        Column("idempotency_key", Text),
        Column("attempts", Integer, nullable=False, server_default=text("0")),
        Column("max_attempts", Integer, nullable=False),
        Column("last_error_code", Text),
        Column("last_error_message", Text),
        Column("provider_sid", Text),
        Column("provider_status", Text),
        Column("channel", Text),
        Column("created_at", TZ, nullable=False, server_default=NOW),
        Column("started_at", TZ),
        # Not started by then, a message is never sent: it ends `expired` (its deadline).
        Column("expires_at", TZ),
        # The order key (events.tx) of the message's latest event: its next event gets
        # at least this one, so a message's events never come out of order in the feed.
        Column("event_tx", BigInteger),
    ]


jobs = Table(
    "jobs",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    *_message_columns(live=True),
    # Only the first unfinished job of a conversation is its head; only heads are claimed.
    Column("is_head", Boolean, nullable=False),
    Column("state", Text, nullable=False, server_default=text("'waiting'")),
    # The rate-limit slot given at claim: the send must not start before it (G4).
    Column("start_at", TZ),
    Column("claim_token", UUID(as_uuid=True)),
    Column("claimed_by", Text),
    Column("lease_expires_at", TZ),
    Column("updated_at", TZ, nullable=False, server_default=NOW),
    CheckConstraint("state IN ('waiting', 'delayed', 'active')", name="jobs_state_live"),
    CheckConstraint("priority BETWEEN -100 AND 100", name="jobs_priority_range"),
    CheckConstraint("(state = 'active') = (claim_token IS NOT NULL)", name="jobs_active_has_token"),
    CheckConstraint("state <> 'active' OR is_head", name="jobs_active_is_head"),
    CheckConstraint("body IS NOT NULL OR content_sid IS NOT NULL", name="jobs_has_content"),
    # A conversation belongs to one tenant (its key starts with the tenant's id), so
    # nothing one tenant enqueues can sit in, or read the queue of, another's.
    CheckConstraint(
        "starts_with(conversation, tenant_id || ':')", name="jobs_conversation_of_tenant"
    ),
    # Every stored moment can be read back and shown (a year-1 sendAt cannot be in UTC).
    CheckConstraint("run_at BETWEEN '2000-01-01' AND '9999-01-01'", name="jobs_run_at_in_range"),
    # A head is `waiting` once it can be claimed and `delayed` until then (claims wake
    # the due ones): the claim reads only the first index, the wake-up only the second.
    Index(
        "jobs_waiting_heads",
        "queue",
        "tenant_id",
        text("priority DESC"),
        "seq",
        postgresql_where=text("is_head AND state = 'waiting'"),
    ),
    Index(
        "jobs_delayed_heads",
        "queue",
        "run_at",
        postgresql_where=text("is_head AND state = 'delayed'"),
    ),
    Index(
        "jobs_one_head_per_conversation",
        "queue",
        "conversation",
        unique=True,
        postgresql_where=text("is_head"),
    ),
    Index(
        "jobs_one_active_per_conversation",
        "queue",
        "conversation",
        unique=True,
        postgresql_where=text("state = 'active'"),
    ),
    Index("jobs_conversation_order", "queue", "conversation", "seq"),
    Index("jobs_expiring", "queue", "expires_at", postgresql_where=text("expires_at IS NOT NULL")),
    Index(
        "jobs_idempotency",
        "tenant_id",
        "idempotency_key",
        unique=True,
        postgresql_where=text("idempotency_key IS NOT NULL"),
    ),
    Index("jobs_tenant_created", "tenant_id", "created_at"),
)

job_history = Table(
    "job_history",
    metadata,
    Column("id", BigInteger, nullable=False),
    *_message_columns(live=False),
    Column("state", Text, nullable=False),
    Column("finished_at", TZ, nullable=False, server_default=NOW),
    PrimaryKeyConstraint("id", "finished_at", name="job_history_pkey"),
    CheckConstraint(
        "state IN ('completed', 'failed', 'expired')", name="job_history_state_finished"
    ),
    Index("job_history_provider_sid", "provider_sid"),
    Index(
        "job_history_idempotency",
        "tenant_id",
        "idempotency_key",
        postgresql_where=text("idempotency_key IS NOT NULL"),
    ),
    Index("job_history_failed", "queue", "finished_at", postgresql_where=text("state = 'failed'")),
    Index("job_history_tenant_finished", "tenant_id", "finished_at"),
    Index("job_history_queue_finished", "queue", "finished_at"),
    postgresql_partition_by="RANGE (finished_at)",
)

suppressions = Table(
    "suppressions",
    metadata,
    Column("tenant_id", Text, ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("phone_number", Text, nullable=False),
    Column("reason_code", Text, nullable=False),
    Column("created_at", TZ, nullable=False, server_default=NOW),
    PrimaryKeyConstraint("tenant_id", "phone_number", name="suppressions_pkey"),
)

# Status callbacks that arrived before their message's SID was committed (Twilio can
# call back within milliseconds of accepting a message, while the worker's completion is
# still on its way): held here until maintenance applies them to the finished job.
early_statuses = Table(
    "early_statuses",
    metadata,
    Column("tenant_id", Text, ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("provider_sid", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("error_code", Text),
    Column("received_at", TZ, nullable=False, server_default=NOW),
    PrimaryKeyConstraint("tenant_id", "provider_sid", name="early_statuses_pkey"),
)

workers = Table(
    "workers",
    metadata,
    Column("id", Text, primary_key=True),
    Column("queue", Text, nullable=False),
    Column("hostname", Text, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("concurrency", Integer, nullable=False),
    Column("started_at", TZ, nullable=False, server_default=NOW),
    Column("heartbeat_at", TZ, nullable=False, server_default=NOW),
)

sandbox_messages = Table(
    "sandbox_messages",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("tenant_id", Text, nullable=False),
    Column("job_id", BigInteger),
    Column("to_number", Text, nullable=False),
    Column("body", Text),
    Column("content_sid", Text),
    Column("sid", Text, nullable=False),
    # When the simulated send began; created_at is when it ended.
    Column("started_at", TZ, nullable=False, server_default=NOW),
    Column("created_at", TZ, nullable=False, server_default=NOW),
)

# Every state change of a message, written in the transaction that makes it (an outbox),
# read by tenants as a feed (GET /api/events) and posted to their webhooks. Ordered by
# (tx, id): tx is the writing transaction's id, raised to the message's previous event's
# where that is higher (jobs.event_tx), and a reader takes only the events of
# transactions older than every one still running (pgqueue.events_horizon), so no event
# can appear later behind a cursor already handed out. Partitioned by day like history.
events = Table(
    "events",
    metadata,
    Column("id", BigInteger, nullable=False, server_default=event_seq.next_value()),
    Column("tx", BigInteger, nullable=False),
    Column("at", TZ, nullable=False, server_default=text("clock_timestamp()")),
    Column("tenant_id", Text, nullable=False),
    Column("queue", Text, nullable=False),
    Column("job_id", BigInteger, nullable=False),
    Column("kind", Text, nullable=False),
    Column("attempt", Integer),
    Column("sid", Text),
    Column("code", Text),
    Column("message", Text),
    # A retry's next run; a queued message's due moment.
    Column("run_at", TZ),
    CheckConstraint(
        "kind IN ('queued', 'sending', 'sent', 'retry_scheduled', 'delivered', 'read', "
        "'failed', 'expired', 'canceled')",
        name="events_kind_known",
    ),
    Index("events_feed", "tenant_id", "tx", "id"),
    Index("events_job", "job_id", "id"),
    postgresql_partition_by="RANGE (at)",
)

# Each tenant's webhook cursor: the last event its endpoint acknowledged, and the retry
# state of the batch after it. A worker holds a tenant's row for one delivery at a time
# (lease), so its events reach the endpoint in feed order.
webhook_state = Table(
    "webhook_state",
    metadata,
    Column("tenant_id", Text, ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True),
    Column("tx", BigInteger, nullable=False, server_default=text("0")),
    Column("event_id", BigInteger, nullable=False, server_default=text("0")),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("next_attempt_at", TZ, nullable=False, server_default=NOW),
    Column("leased_by", Text),
    Column("lease_until", TZ),
    Column("last_error", Text),
    Column("delivered", BigInteger, nullable=False, server_default=text("0")),
    Column("updated_at", TZ, nullable=False, server_default=NOW),
)

# Batches a tenant's endpoint kept refusing (every attempt failed): kept with their
# events, so nothing is lost, and the cursor moves on past them.
webhook_dead_letters = Table(
    "webhook_dead_letters",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("tenant_id", Text, ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("events", JSONB, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("last_error", Text),
    Column("failed_at", TZ, nullable=False, server_default=NOW),
    Index("webhook_dead_letters_tenant", "tenant_id", "id"),
)

# Tables Alembic must not compare: the day partitions of job_history and events are
# created at run time by pgqueue.ensure_history_partitions().
RUNTIME_TABLE_PREFIXES = ("job_history_p", "events_p")
