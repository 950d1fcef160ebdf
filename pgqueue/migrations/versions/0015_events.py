"""Delivery events: an outbox of every state change of a message, and tenants' webhooks

- pgqueue.events, partitioned by day on `at` like job_history (the same functions create
  and drop the partitions of both), read in (tx, id) order: see pgqueue/schema.py;
- jobs.event_tx and job_history.event_tx: the order key of the message's latest event;
- pgqueue.event_tx(prev): the order key of an event written now, never below prev;
- pgqueue.events_horizon(): events with a key below it belong to finished transactions
  only, so the feed hands out nothing that a running transaction could still precede;
- tenants.webhook_url and webhook_secret, webhook_state (a cursor per tenant) and
  webhook_dead_letters;
- the group roles get what they need of these (pgqueue.apply_roles).

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

TZ = sa.TIMESTAMP(timezone=True)

# (old, new) fragments of pgqueue.apply_roles' body (migration 0011).
GRANTS = (
    (
        "pgqueue.early_statuses, pgqueue.suppressions '",
        "pgqueue.early_statuses, pgqueue.suppressions, pgqueue.events, '"
        "\n                        'pgqueue.webhook_state, pgqueue.webhook_dead_letters '",
    ),
    (
        "pgqueue.early_statuses, pgqueue.workers TO %I'",
        "pgqueue.early_statuses, pgqueue.workers, pgqueue.events, '"
        "\n                        'pgqueue.webhook_state, pgqueue.webhook_dead_letters TO %I'",
    ),
)

PARTITIONS = """
    CREATE OR REPLACE FUNCTION pgqueue.ensure_history_partitions(days_ahead integer DEFAULT 3)
    RETURNS integer LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgqueue
    AS $$
    -- Creates the daily partitions of {tables} from today (UTC) to days_ahead.
    -- A day that already has rows in the default partition is left there: creating
    -- its partition would fail, and the rows are still found and still retained.
    DECLARE
        day date;
        created integer := 0;
        tbl record;
        part text;
        found_rows boolean;
    BEGIN
        FOR tbl IN SELECT * FROM (VALUES {values}) AS t(name, key) LOOP
            FOR day IN SELECT generate_series((now() AT TIME ZONE 'UTC')::date,
                                              (now() AT TIME ZONE 'UTC')::date + days_ahead,
                                              interval '1 day')::date
            LOOP
                part := tbl.name || '_p' || to_char(day, 'YYYYMMDD');
                CONTINUE WHEN to_regclass('pgqueue.' || part) IS NOT NULL;
                EXECUTE format('SELECT EXISTS (SELECT 1 FROM pgqueue.%I WHERE %I >= %L '
                               'AND %I < %L)', tbl.name || '_pdefault', tbl.key,
                               day::timestamp AT TIME ZONE 'UTC', tbl.key,
                               (day + 1)::timestamp AT TIME ZONE 'UTC')
                    INTO found_rows;
                CONTINUE WHEN found_rows;
                EXECUTE format(
                    'CREATE TABLE pgqueue.%I PARTITION OF pgqueue.%I '
                    'FOR VALUES FROM (%L) TO (%L)',
                    part, tbl.name, day::timestamp AT TIME ZONE 'UTC',
                    (day + 1)::timestamp AT TIME ZONE 'UTC');
                created := created + 1;
            END LOOP;
        END LOOP;
        RETURN created;
    END $$;

    CREATE OR REPLACE FUNCTION pgqueue.drop_history_partitions(older_than timestamptz)
    RETURNS integer LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgqueue
    AS $$
    -- Retention: drops every day partition of {tables} that ends at or before
    -- older_than, and deletes the default partitions' rows from before it.
    DECLARE
        part record;
        tbl record;
        dropped integer := 0;
    BEGIN
        FOR tbl IN SELECT * FROM (VALUES {values}) AS t(name, key) LOOP
            FOR part IN
                SELECT c.relname
                FROM pg_inherits i
                JOIN pg_class c ON c.oid = i.inhrelid
                JOIN pg_class p ON p.oid = i.inhparent
                JOIN pg_namespace n ON n.oid = p.relnamespace
                WHERE n.nspname = 'pgqueue' AND p.relname = tbl.name
                  AND c.relname ~ ('^' || tbl.name || '_p[0-9]{{8}}$')
                  AND (to_date(right(c.relname, 8), 'YYYYMMDD') + 1)::timestamp
                      AT TIME ZONE 'UTC' <= older_than
            LOOP
                EXECUTE format('DROP TABLE pgqueue.%I', part.relname);
                dropped := dropped + 1;
            END LOOP;
            EXECUTE format('DELETE FROM pgqueue.%I WHERE %I < %L',
                           tbl.name || '_pdefault', tbl.key, older_than);
        END LOOP;
        RETURN dropped;
    END $$;
"""

BOTH = "('job_history', 'finished_at'), ('events', 'at')"
HISTORY = "('job_history', 'finished_at')"


def _regrant(pairs: tuple[tuple[str, str], ...]) -> None:
    for old, new in pairs:
        op.execute(
            f"""
            DO $$
            DECLARE body text := pg_get_functiondef('pgqueue.apply_roles(boolean)'::regprocedure);
            BEGIN
                IF position($old${old}$old$ IN body) = 0 THEN
                    RAISE EXCEPTION 'pgqueue.apply_roles does not grant %', $old${old}$old$;
                END IF;
                EXECUTE replace(body, $old${old}$old$, $new${new}$new$);
            END $$
            """
        )
    op.execute("SELECT pgqueue.apply_roles(false)")


def upgrade() -> None:
    op.execute("CREATE SEQUENCE pgqueue.event_seq")
    op.create_table(
        "events",
        sa.Column(
            "id",
            sa.BigInteger(),
            server_default=sa.text("nextval('pgqueue.event_seq'::regclass)"),
            nullable=False,
        ),
        sa.Column("tx", sa.BigInteger(), nullable=False),
        sa.Column("at", TZ, server_default=sa.text("clock_timestamp()"), nullable=False),
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("queue", sa.Text(), nullable=False),
        sa.Column("job_id", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("attempt", sa.Integer()),
        sa.Column("sid", sa.Text()),
        sa.Column("code", sa.Text()),
        sa.Column("message", sa.Text()),
        sa.Column("run_at", TZ),
        sa.CheckConstraint(
            "kind IN ('queued', 'sending', 'sent', 'retry_scheduled', 'delivered', 'read', "
            "'failed', 'expired', 'canceled')",
            name="events_kind_known",
        ),
        schema="pgqueue",
        postgresql_partition_by="RANGE (at)",
    )
    op.create_index("events_feed", "events", ["tenant_id", "tx", "id"], schema="pgqueue")
    op.create_index("events_job", "events", ["job_id", "id"], schema="pgqueue")
    op.execute("CREATE TABLE pgqueue.events_pdefault PARTITION OF pgqueue.events DEFAULT")
    for table in ("jobs", "job_history"):
        op.add_column(table, sa.Column("event_tx", sa.BigInteger()), schema="pgqueue")
    op.add_column("tenants", sa.Column("webhook_url", sa.Text()), schema="pgqueue")
    op.add_column("tenants", sa.Column("webhook_secret", sa.Text()), schema="pgqueue")
    op.create_table(
        "webhook_state",
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("tx", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("event_id", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("next_attempt_at", TZ, server_default=sa.text("now()"), nullable=False),
        sa.Column("leased_by", sa.Text()),
        sa.Column("lease_until", TZ),
        sa.Column("last_error", sa.Text()),
        sa.Column("delivered", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("updated_at", TZ, server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["pgqueue.tenants.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("tenant_id"),
        schema="pgqueue",
    )
    op.create_table(
        "webhook_dead_letters",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("events", postgresql.JSONB(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text()),
        sa.Column("failed_at", TZ, server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["pgqueue.tenants.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        schema="pgqueue",
    )
    op.create_index(
        "webhook_dead_letters_tenant",
        "webhook_dead_letters",
        ["tenant_id", "id"],
        schema="pgqueue",
    )
    op.execute(
        """
        CREATE FUNCTION pgqueue.event_tx(prev bigint) RETURNS bigint
        LANGUAGE sql VOLATILE PARALLEL UNSAFE AS $$
            -- This transaction's id, or the message's previous event's key where that is
            -- higher: a transaction can take its id before it reads the change it follows
            -- (read committed), and its event must still sort after that change's.
            SELECT greatest(pg_current_xact_id()::text::bigint, prev)
        $$
        """
    )
    op.execute(
        """
        CREATE FUNCTION pgqueue.events_horizon() RETURNS bigint
        LANGUAGE sql STABLE AS $$
            -- Every transaction with an id below it has ended (committed or not), as seen
            -- by the calling statement's snapshot; an event key is at least its writer's
            -- id, so the events below it are all the ones there will ever be.
            SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint
        $$
        """
    )
    op.execute(
        """
        CREATE FUNCTION pgqueue.status_event(status text) RETURNS text
        LANGUAGE sql IMMUTABLE AS $$
            -- The event a provider's status callback makes, if any: what reached the
            -- customer, and a delivery that failed after the provider took the message.
            SELECT CASE WHEN status IN ('delivered', 'read') THEN status
                        WHEN status IN ('failed', 'undelivered') THEN 'failed'
                        WHEN status = 'canceled' THEN 'canceled' END
        $$
        """
    )
    op.execute(PARTITIONS.format(tables="job_history and events", values=BOTH))
    op.execute("SELECT pgqueue.ensure_history_partitions(3)")
    _regrant(GRANTS)


def downgrade() -> None:
    _regrant(tuple((new, old) for old, new in GRANTS))
    op.execute(PARTITIONS.format(tables="job_history", values=HISTORY))
    op.execute("DROP FUNCTION pgqueue.status_event(text)")
    op.execute("DROP FUNCTION pgqueue.events_horizon()")
    op.execute("DROP FUNCTION pgqueue.event_tx(bigint)")
    op.drop_table("webhook_dead_letters", schema="pgqueue")
    op.drop_table("webhook_state", schema="pgqueue")
    op.drop_column("tenants", "webhook_secret", schema="pgqueue")
    op.drop_column("tenants", "webhook_url", schema="pgqueue")
    for table in ("jobs", "job_history"):
        op.drop_column(table, "event_tx", schema="pgqueue")
    op.drop_table("events", schema="pgqueue")
    op.execute("DROP SEQUENCE pgqueue.event_seq")
