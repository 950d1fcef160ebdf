"""history partitions, the default queue, the jobs_overview view

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A default partition so that no finished job is ever refused (G8) even if
    # maintenance has not created the day's partition yet.
    op.execute("CREATE TABLE pgqueue.job_history_pdefault PARTITION OF pgqueue.job_history DEFAULT")
    op.execute(
        """
        CREATE FUNCTION pgqueue.ensure_history_partitions(days_ahead integer DEFAULT 3)
        RETURNS integer LANGUAGE plpgsql AS $$
        -- Creates the daily partitions of job_history from today (UTC) to days_ahead.
        -- A day that already has rows in the default partition is left there: creating
        -- its partition would fail, and the rows are still found and still retained.
        DECLARE
            day date;
            created integer := 0;
            part text;
        BEGIN
            FOR day IN SELECT generate_series((now() AT TIME ZONE 'UTC')::date,
                                              (now() AT TIME ZONE 'UTC')::date + days_ahead,
                                              interval '1 day')::date
            LOOP
                part := 'job_history_p' || to_char(day, 'YYYYMMDD');
                CONTINUE WHEN to_regclass('pgqueue.' || part) IS NOT NULL;
                CONTINUE WHEN EXISTS (
                    SELECT 1 FROM pgqueue.job_history_pdefault
                    WHERE finished_at >= (day::timestamp AT TIME ZONE 'UTC')
                      AND finished_at < ((day + 1)::timestamp AT TIME ZONE 'UTC'));
                EXECUTE format(
                    'CREATE TABLE pgqueue.%I PARTITION OF pgqueue.job_history '
                    'FOR VALUES FROM (%L) TO (%L)',
                    part, day::timestamp AT TIME ZONE 'UTC',
                    (day + 1)::timestamp AT TIME ZONE 'UTC');
                created := created + 1;
            END LOOP;
            RETURN created;
        END $$
        """
    )
    op.execute(
        """
        CREATE FUNCTION pgqueue.drop_history_partitions(older_than timestamptz)
        RETURNS integer LANGUAGE plpgsql AS $$
        -- Retention: drops every day partition that ends at or before older_than, and
        -- deletes the default partition's rows that finished before it.
        DECLARE
            part record;
            dropped integer := 0;
        BEGIN
            FOR part IN
                SELECT c.relname
                FROM pg_inherits i
                JOIN pg_class c ON c.oid = i.inhrelid
                JOIN pg_class p ON p.oid = i.inhparent
                JOIN pg_namespace n ON n.oid = p.relnamespace
                WHERE n.nspname = 'pgqueue' AND p.relname = 'job_history'
                  AND c.relname ~ '^job_history_p[0-9]{8}$'
                  AND (to_date(substr(c.relname, 14), 'YYYYMMDD') + 1)::timestamp
                      AT TIME ZONE 'UTC' <= older_than
            LOOP
                EXECUTE format('DROP TABLE pgqueue.%I', part.relname);
                dropped := dropped + 1;
            END LOOP;
            DELETE FROM pgqueue.job_history_pdefault WHERE finished_at < older_than;
            RETURN dropped;
        END $$
        """
    )
    op.execute("SELECT pgqueue.ensure_history_partitions(3)")
    op.execute("INSERT INTO pgqueue.queues (name) VALUES ('whatsapp-send') ON CONFLICT DO NOTHING")
    op.execute(
        """
        CREATE VIEW pgqueue.jobs_overview AS
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
               claimed_by, lease_expires_at
        FROM pgqueue.jobs
        UNION ALL
        SELECT id, queue, tenant_id, conversation, state, false, priority, attempts,
               max_attempts, to_number, message_type, left(body, 40), content_sid,
               last_error_code, last_error_message, provider_sid, provider_status, channel,
               created_at, run_at, started_at, finished_at, NULL, NULL
        FROM pgqueue.job_history
        """
    )


def downgrade() -> None:
    op.execute("DROP VIEW pgqueue.jobs_overview")
    op.execute("DELETE FROM pgqueue.queues WHERE name = 'whatsapp-send'")
    op.execute("DROP FUNCTION pgqueue.drop_history_partitions(timestamptz)")
    op.execute("DROP FUNCTION pgqueue.ensure_history_partitions(integer)")
    op.execute(
        """
        DO $$
        DECLARE part record;
        BEGIN
            FOR part IN SELECT c.relname FROM pg_inherits i
                JOIN pg_class c ON c.oid = i.inhrelid
                JOIN pg_class p ON p.oid = i.inhparent
                JOIN pg_namespace n ON n.oid = p.relnamespace
                WHERE n.nspname = 'pgqueue' AND p.relname = 'job_history'
            LOOP
                EXECUTE format('DROP TABLE pgqueue.%I', part.relname);
            END LOOP;
        END $$
        """
    )
