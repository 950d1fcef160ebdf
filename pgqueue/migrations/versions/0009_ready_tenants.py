"""Ready tenants: a claim reads the tenants that have work, not every tenant

A claim walked every row of pgqueue.tenants under the queue lock and probed each for
heads, so its cost (and every worker's wait for the lock) grew with the number of
tenants registered, not with the work. `pgqueue.ready_tenants` holds a row per
(queue, tenant, priority) at which the tenant has a waiting head, indexed in the claim's
order among tenants with nothing in flight (priority, then served longest ago): a claim
reads it from the front until it has the tenants it needs.

The rows are kept by the database itself, so no code path can forget one: a trigger on
pgqueue.jobs adds the row for every head that becomes waiting (insert, promotion, retry,
release, revival, a delayed head coming due); a claim marks the rows of the tenants it
served `drained` when it took their last waiting head at that priority, and
pgqueue.prune_ready() deletes a drained row only after looking again under an exclusive
advisory lock that every adding transaction holds shared (see prune_ready for why).

A head's `state` now says whether it can be claimed: `delayed` heads become `waiting`
when due (woken by every claim, in lock_queue), which is what adds their tenant.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

# The advisory locks that keep a head from losing its tenant's row (see prune_ready):
# two-key locks ('pgqr', bucket), a key space of their own, apart from the conversation
# locks' single bigint keys. A (queue, tenant) maps to one of 16 buckets, so that a
# statement adding heads for thousands of tenants holds 16 locks at most, not one per
# tenant (the server's lock table has room for 64 per connection).
READY_LOCK = "1885762418, hashtext({queue} || chr(31) || {tenant}) & 15"


def upgrade() -> None:
    lock_new = READY_LOCK.format(queue="x.queue", tenant="x.tenant_id")
    lock_ready = READY_LOCK.format(queue="r.queue", tenant="r.tenant_id")
    op.create_table(
        "ready_tenants",
        sa.Column("queue", sa.Text(), nullable=False),
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("served_at", sa.DateTime(timezone=True)),
        sa.Column("drained", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["pgqueue.tenants.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("queue", "tenant_id", "priority", name="ready_tenants_pkey"),
        schema="pgqueue",
    )
    op.execute(
        "CREATE INDEX ready_tenants_claim_order ON pgqueue.ready_tenants "
        "(queue, priority DESC, served_at NULLS FIRST, tenant_id)"
    )
    op.execute("CREATE INDEX ready_tenants_drained ON pgqueue.ready_tenants (queue) WHERE drained")
    op.execute("DROP INDEX pgqueue.jobs_candidates")
    op.execute("DROP INDEX pgqueue.jobs_heads_by_run_at")
    # Heads already due but still marked delayed would be claimable only once woken; wake
    # them here so the backfill below sees them.
    op.execute(
        "UPDATE pgqueue.jobs SET state = 'waiting' "
        "WHERE is_head AND state = 'delayed' AND run_at <= now()"
    )
    op.execute(
        "CREATE INDEX jobs_waiting_heads ON pgqueue.jobs "
        "(queue, tenant_id, priority DESC, seq) WHERE is_head AND state = 'waiting'"
    )
    op.execute(
        "CREATE INDEX jobs_delayed_heads ON pgqueue.jobs (queue, run_at) "
        "WHERE is_head AND state = 'delayed'"
    )
    op.execute(
        """
        INSERT INTO pgqueue.ready_tenants (queue, tenant_id, priority, served_at)
        SELECT DISTINCT j.queue, j.tenant_id, j.priority, t.last_served_at
        FROM pgqueue.jobs j JOIN pgqueue.tenants t ON t.id = j.tenant_id
        WHERE j.is_head AND j.state = 'waiting'
        """
    )
    op.execute(
        f"""
        CREATE FUNCTION pgqueue.note_ready_heads() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            -- Shared, so enqueues never wait for each other; prune_ready takes it
            -- exclusively, never waiting. Taken before the row is looked for.
            PERFORM pg_advisory_xact_lock_shared({lock_new})
            FROM (SELECT DISTINCT queue, tenant_id FROM new_rows
                  WHERE is_head AND state = 'waiting') x;
            -- A fresh snapshot (a new statement of a volatile function): a row pruned
            -- before the lock was granted is seen gone. Looked for before inserting, so
            -- that a row a claim is updating is not waited for.
            -- Each looked up by key (OFFSET 0 keeps the lookups per row): the planner
            -- knows nothing of new_rows and would rather hash all of ready_tenants and
            -- tenants, on every statement that makes a head waiting.
            INSERT INTO pgqueue.ready_tenants (queue, tenant_id, priority, served_at)
            SELECT n.queue, n.tenant_id, n.priority,
                   (SELECT t.last_served_at FROM pgqueue.tenants t WHERE t.id = n.tenant_id)
            FROM (SELECT DISTINCT queue, tenant_id, priority FROM new_rows
                  WHERE is_head AND state = 'waiting') n
            WHERE NOT EXISTS (SELECT 1 FROM pgqueue.ready_tenants r
                              WHERE r.queue = n.queue AND r.tenant_id = n.tenant_id
                                AND r.priority = n.priority OFFSET 0)
            ON CONFLICT DO NOTHING;
            RETURN NULL;
        END $$
        """
    )
    for event in ("INSERT", "UPDATE"):
        op.execute(
            f"CREATE TRIGGER jobs_ready_after_{event.lower()} AFTER {event} ON pgqueue.jobs "
            "REFERENCING NEW TABLE AS new_rows "
            "FOR EACH STATEMENT EXECUTE FUNCTION pgqueue.note_ready_heads()"
        )
    op.execute(
        f"""
        CREATE FUNCTION pgqueue.prune_ready(p_queue text) RETURNS integer
        LANGUAGE plpgsql AS $$
        DECLARE
            locked text[];
            pruned integer;
        BEGIN
            -- A drained row is gone only if no waiting head exists. Looking in this
            -- statement's snapshot is not enough: a head committed after it but before
            -- the delete would be left without its row, never claimed. So: first the
            -- exclusive lock (never waited for: a busy bucket is looked at next time),
            -- then a new snapshot, which sees every head committed before the lock, while
            -- a head added after it waits for our commit and then finds the row gone.
            SELECT array_agg(r.tenant_id) INTO locked
            FROM pgqueue.ready_tenants r
            WHERE r.queue = p_queue AND r.drained
              AND pg_try_advisory_xact_lock({lock_ready});
            IF locked IS NULL THEN
                RETURN 0;
            END IF;
            DELETE FROM pgqueue.ready_tenants r
            WHERE r.queue = p_queue AND r.drained AND r.tenant_id = ANY (locked)
              AND NOT EXISTS (SELECT 1 FROM pgqueue.jobs j
                              WHERE j.queue = r.queue AND j.tenant_id = r.tenant_id
                                AND j.priority = r.priority
                                AND j.is_head AND j.state = 'waiting' OFFSET 0);
            GET DIAGNOSTICS pruned = ROW_COUNT;
            UPDATE pgqueue.ready_tenants r SET drained = false
            WHERE r.queue = p_queue AND r.drained AND r.tenant_id = ANY (locked);
            RETURN pruned;
        END $$
        """
    )

    op.execute(
        """
        CREATE FUNCTION pgqueue.ready_front(p_queue text, p_horizon timestamptz,
                                            p_n integer, p_busy text[])
        RETURNS TABLE (tenant_id text, served_at timestamptz)
        -- A claim's worth of rows: planned as 1,000 (the default), the claim would hash
        -- all of pgqueue.tenants to join them.
        LANGUAGE plpgsql STABLE ROWS 20 AS $$
        -- The first p_n tenants of ready_tenants' index order (priority, then served
        -- longest ago) that have nothing in flight (p_busy), are not paused, are within
        -- their own rate by p_horizon and have a waiting head at their row's priority
        -- (a row at a lower one than their best is skipped: the best comes first). A
        -- loop over the index, so the cost follows the rows read up to the p_n-th: as a
        -- query, the planner reads every row and sorts them where it deems that cheaper.
        DECLARE
            r record;
            left_n integer := p_n;
        BEGIN
            IF left_n <= 0 THEN
                RETURN;
            END IF;
            FOR r IN SELECT x.tenant_id, x.priority, x.served_at
                     FROM pgqueue.ready_tenants x WHERE x.queue = p_queue
                     ORDER BY x.priority DESC, x.served_at NULLS FIRST, x.tenant_id
            LOOP
                CONTINUE WHEN r.tenant_id = ANY (p_busy);
                CONTINUE WHEN NOT EXISTS (SELECT 1 FROM pgqueue.tenants t
                                          WHERE t.id = r.tenant_id AND NOT t.paused
                                            AND t.rate_tat <= p_horizon);
                CONTINUE WHEN r.priority IS DISTINCT FROM (
                    SELECT j.priority FROM pgqueue.jobs j
                    WHERE j.queue = p_queue AND j.tenant_id = r.tenant_id
                      AND j.is_head AND j.state = 'waiting'
                    ORDER BY j.priority DESC, j.seq LIMIT 1);
                tenant_id := r.tenant_id;
                served_at := r.served_at;
                RETURN NEXT;
                left_n := left_n - 1;
                EXIT WHEN left_n = 0;
            END LOOP;
        END $$
        """
    )
    op.execute(
        """
        CREATE FUNCTION pgqueue.pace(first_start timestamptz, spacing float8, prev integer[],
                                     tenant_base timestamptz[], tenant_spacing float8[])
        RETURNS timestamptz[]
        LANGUAGE plpgsql IMMUTABLE AS $$
        -- The start of each job, in the order given: one `spacing` after the previous
        -- start (the queue's rate, from `first_start` on), and, for a job whose tenant has a
        -- rate of its own, at its tenant's base or one `tenant_spacing` after the start
        -- of that tenant's previous job (`prev`, its position here), whichever is later.
        -- Both limits hold exactly, whatever the order; claims give the jobs in order of
        -- their tenants' slots so that a far one does not hold the others back.
        DECLARE
            starts timestamptz[] := '{}';
            s timestamptz := first_start - make_interval(secs => spacing);
        BEGIN
            FOR i IN 1 .. coalesce(cardinality(tenant_base), 0) LOOP
                s := greatest(s + make_interval(secs => spacing),
                              CASE WHEN prev[i] IS NULL THEN tenant_base[i]
                                   ELSE starts[prev[i]]
                                        + make_interval(secs => tenant_spacing[i]) END);
                starts[i] := s;
            END LOOP;
            RETURN starts;
        END $$
        """
    )


def downgrade() -> None:
    op.execute(
        "DROP FUNCTION pgqueue.pace(timestamptz, float8, integer[], timestamptz[], float8[])"
    )
    op.execute("DROP FUNCTION pgqueue.ready_front(text, timestamptz, integer, text[])")
    op.execute("DROP FUNCTION pgqueue.prune_ready(text)")
    for event in ("insert", "update"):
        op.execute(f"DROP TRIGGER jobs_ready_after_{event} ON pgqueue.jobs")
    op.execute("DROP FUNCTION pgqueue.note_ready_heads()")
    op.execute("DROP INDEX pgqueue.jobs_delayed_heads")
    op.execute("DROP INDEX pgqueue.jobs_waiting_heads")
    op.execute(
        "CREATE INDEX jobs_candidates ON pgqueue.jobs (queue, tenant_id, priority DESC, seq) "
        "WHERE is_head AND state <> 'active'"
    )
    op.execute(
        "CREATE INDEX jobs_heads_by_run_at ON pgqueue.jobs (queue, run_at) "
        "WHERE is_head AND state <> 'active'"
    )
    op.drop_table("ready_tenants", schema="pgqueue")
