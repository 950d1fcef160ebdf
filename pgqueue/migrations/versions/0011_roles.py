"""Database roles with least privilege, and the inspection views they read

Everything ran as the owner of the schema, so a leaked API password could read every
tenant's credentials and drop the tables. Three group roles (NOLOGIN) now hold what each
process needs; operators make login roles members of them (`GRANT pgqueue_api TO app`):

- pgqueue_api: enqueue, read, cancel and retry jobs; record delivery statuses; look up
  API tokens. It reads tenants (a callback's signature is checked with the tenant's
  Twilio token) but cannot change them or their tokens.
- pgqueue_worker: claim, complete, retry and rescue jobs; pace the queue and its tenants;
  pause a tenant whose credentials fail; maintenance. Partitions are created and dropped
  through two SECURITY DEFINER functions, since only the owner of job_history may.
- pgqueue_inspector: the inspection views and the queue settings; never a credential,
  a token hash or a message body beyond the views' preview.

Roles belong to the cluster, not the database, so a migration never creates one: it
grants on this database to those that exist. `pgqueue roles` (a user with CREATEROLE)
creates the missing ones and grants; a later migration that adds a table grants again.

`pgqueue.tenant_active` (the design card's name) and `pgqueue.tenants_overview` (tenants
without their credentials) are the views an inspector reads besides jobs_overview.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04
"""

from __future__ import annotations

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

# Kept here (not only in the function) so the downgrade revokes exactly what was granted.
ROLES = ("pgqueue_api", "pgqueue_worker", "pgqueue_inspector")


def upgrade() -> None:
    op.execute(
        """
        CREATE VIEW pgqueue.tenant_active AS
        -- Sends in flight per tenant (G2's counter) beside the tenant's own limit (NULL:
        -- the queue's tenant default). Every tenant has a row.
        SELECT t.id AS tenant_id, coalesce(f.n, 0) AS active,
               t.max_concurrency, t.paused
        FROM pgqueue.tenants t
        LEFT JOIN pgqueue.tenant_in_flight f ON f.tenant_id = t.id
        """
    )
    op.execute(
        """
        CREATE VIEW pgqueue.tenants_overview AS
        -- A tenant's settings and pacing (rate_tat: when its next send may start), with
        -- neither the Twilio auth token nor the account SID.
        SELECT id, name, whatsapp_from, senders, max_concurrency, rate_per_second,
               rate_tat, paused, pause_reason, last_served_at, created_at, updated_at
        FROM pgqueue.tenants
        """
    )
    # The worker creates and drops history partitions; PostgreSQL lets only the owner of
    # job_history do that, so the functions run as their owner. search_path is pinned so
    # a caller cannot slip in objects of its own.
    for signature in (
        "ensure_history_partitions(integer)",
        "drop_history_partitions(timestamptz)",
    ):
        op.execute(
            f"ALTER FUNCTION pgqueue.{signature} SECURITY DEFINER "
            "SET search_path = pg_catalog, pgqueue"
        )
        op.execute(f"REVOKE EXECUTE ON FUNCTION pgqueue.{signature} FROM PUBLIC")
    op.execute(
        """
        CREATE FUNCTION pgqueue.apply_roles(create_missing boolean DEFAULT false)
        RETURNS TABLE (role text, state text) LANGUAGE plpgsql AS $$
        -- Grants on this database to the group roles, creating the missing ones first
        -- when asked. Safe to run again: a GRANT that exists changes nothing.
        DECLARE
            r text;
        BEGIN
            -- A GRANT by anyone else only warns that nothing was granted.
            IF NOT pg_has_role((SELECT nspowner FROM pg_namespace WHERE nspname = 'pgqueue'),
                               'USAGE') THEN
                RAISE EXCEPTION 'only the owner of schema pgqueue can grant on it'
                    USING ERRCODE = 'insufficient_privilege';
            END IF;
            FOREACH r IN ARRAY ARRAY['pgqueue_api', 'pgqueue_worker', 'pgqueue_inspector']
            LOOP
                role := r;
                IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
                    state := 'granted';
                ELSIF create_missing THEN
                    BEGIN
                        EXECUTE format('CREATE ROLE %I NOLOGIN', r);
                    EXCEPTION WHEN duplicate_object OR unique_violation THEN
                        NULL;  -- another database's migration made it a moment ago
                    END;
                    state := 'created';
                ELSE
                    state := 'missing';
                    RETURN NEXT;
                    CONTINUE;
                END IF;
                EXECUTE format('GRANT USAGE ON SCHEMA pgqueue TO %I', r);
                EXECUTE format('GRANT SELECT ON pgqueue.jobs_overview, pgqueue.tenant_active, '
                               'pgqueue.tenant_in_flight, pgqueue.tenant_finished, '
                               'pgqueue.tenants_overview, pgqueue.queues, '
                               'pgqueue.alembic_version TO %I', r);
                IF r = 'pgqueue_api' THEN
                    EXECUTE format(
                        'GRANT SELECT, INSERT, UPDATE, DELETE ON pgqueue.jobs, '
                        'pgqueue.job_history, pgqueue.conversations, pgqueue.ready_tenants, '
                        'pgqueue.tenant_totals, pgqueue.early_statuses, pgqueue.suppressions '
                        'TO %I', r);
                    EXECUTE format('GRANT SELECT, INSERT ON pgqueue.sandbox_messages TO %I', r);
                    EXECUTE format('GRANT SELECT ON pgqueue.tenants, pgqueue.workers, '
                                   'pgqueue.api_tokens TO %I', r);
                    EXECUTE format('GRANT UPDATE (last_used_at) ON pgqueue.api_tokens TO %I',
                                   r);
                ELSIF r = 'pgqueue_worker' THEN
                    EXECUTE format(
                        'GRANT SELECT, INSERT, UPDATE, DELETE ON pgqueue.jobs, '
                        'pgqueue.conversations, pgqueue.ready_tenants, pgqueue.tenant_totals, '
                        'pgqueue.early_statuses, pgqueue.workers TO %I', r);
                    EXECUTE format('GRANT SELECT, INSERT, UPDATE ON pgqueue.job_history TO %I',
                                   r);
                    EXECUTE format('GRANT SELECT, INSERT ON pgqueue.suppressions, '
                                   'pgqueue.sandbox_messages TO %I', r);
                    EXECUTE format('GRANT INSERT, UPDATE ON pgqueue.queues TO %I', r);
                    EXECUTE format('GRANT SELECT ON pgqueue.tenants TO %I', r);
                    EXECUTE format('GRANT UPDATE (rate_tat, last_served_at, paused, '
                                   'pause_reason, updated_at) ON pgqueue.tenants TO %I', r);
                    EXECUTE format('GRANT EXECUTE ON FUNCTION '
                                   'pgqueue.ensure_history_partitions(integer), '
                                   'pgqueue.drop_history_partitions(timestamptz) TO %I', r);
                END IF;
                IF r <> 'pgqueue_inspector' THEN
                    EXECUTE format('GRANT USAGE ON ALL SEQUENCES IN SCHEMA pgqueue TO %I', r);
                END IF;
                RETURN NEXT;
            END LOOP;
        END $$
        """
    )
    op.execute("SELECT * FROM pgqueue.apply_roles()")


def downgrade() -> None:
    # The roles stay: they belong to the cluster, and another database may use them.
    for role in ROLES:
        op.execute(
            f"""
            DO $$ BEGIN
                IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{role}') THEN
                    REVOKE ALL ON ALL TABLES IN SCHEMA pgqueue FROM {role};
                    REVOKE ALL ON ALL SEQUENCES IN SCHEMA pgqueue FROM {role};
                    REVOKE ALL ON ALL FUNCTIONS IN SCHEMA pgqueue FROM {role};
                    REVOKE USAGE ON SCHEMA pgqueue FROM {role};
                END IF;
            END $$
            """
        )
    op.execute("DROP FUNCTION pgqueue.apply_roles(boolean)")
    for signature in (
        "ensure_history_partitions(integer)",
        "drop_history_partitions(timestamptz)",
    ):
        op.execute(f"GRANT EXECUTE ON FUNCTION pgqueue.{signature} TO PUBLIC")
        op.execute(f"ALTER FUNCTION pgqueue.{signature} SECURITY INVOKER RESET search_path")
    op.execute("DROP VIEW pgqueue.tenants_overview")
    op.execute("DROP VIEW pgqueue.tenant_active")
