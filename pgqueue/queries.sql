-- Every runtime SQL statement of pgqueue. Each starts with `-- name: NAME` and a line of
-- purpose; pgqueue/queries.py loads them by name. Parameters are psycopg's %(name)s.
--
-- Lock order, everywhere: queues row -> tenants rows -> conversations rows -> jobs rows
-- (several job rows in id order). Claims and rescues begin by locking their queue row,
-- which serialises admission (G2, G3, G4): two claimers can never each count free slots
-- in their own snapshot and overshoot together. A worker's completions take no queue
-- lock: sends in flight are counted by the claim, not kept in counters, so they write
-- no row a claim writes. Enqueue takes only its conversation row.
-- Conversation advisory locks (session level, on each worker's lock connection) use the
-- bigint key pgqueue.lock_key(queue, conversation) (migration 0012).


-- name: ensure_queue
-- Creates the queue's settings row with the defaults (global 20, tenant 5, 80/s) once.
INSERT INTO pgqueue.queues (name) VALUES (%(queue)s) ON CONFLICT (name) DO NOTHING;


-- name: enqueue_job
-- Appends one message to the tail of its conversation in one statement. The upsert of
-- the conversation row takes that row's lock and returns the latest committed count,
-- not this statement's snapshot: the job is head exactly when it is the conversation's
-- only unfinished job, and a concurrent promotion (complete_jobs) waits for us or we
-- for it. Suppressed numbers, unknown tenants and a fromNumber that is not one of the
-- tenant's own senders insert nothing (zero rows back). The conversation key carries
-- its tenant (pgqueue.models.conversation_key), so it can only be this tenant's.
-- Without an explicit priority, the queue's message-type table gives one (G5); without
-- a deadline, its TTL table may give one, counted from when the message is due.
WITH allowed AS (
    SELECT 1
    FROM pgqueue.tenants t
    WHERE t.id = %(tenant_id)s
      AND (%(from_number)s::text IS NULL OR %(from_number)s = t.whatsapp_from
           OR %(from_number)s = ANY(t.senders))
      AND NOT EXISTS (SELECT 1 FROM pgqueue.suppressions s
                      WHERE s.tenant_id = %(tenant_id)s AND s.phone_number = %(to_number)s)
), conv AS (
    INSERT INTO pgqueue.conversations AS c (queue, conversation, pending)
    SELECT %(queue)s, %(conversation)s, 1 FROM allowed
    ON CONFLICT (queue, conversation)
    DO UPDATE SET pending = c.pending + 1, updated_at = now()
    RETURNING pending
), job AS (
    INSERT INTO pgqueue.jobs (
        queue, tenant_id, conversation, is_head, state, priority, run_at, to_number,
        from_number, body, content_sid, content_variables, message_type, idempotency_key,
        max_attempts, expires_at, event_tx)
    SELECT %(queue)s, %(tenant_id)s, %(conversation)s, conv.pending = 1,
           CASE WHEN %(run_at)s::timestamptz > now() THEN 'delayed' ELSE 'waiting' END,
           coalesce(%(priority)s::int,
                    (SELECT (q.message_type_priorities ->> %(message_type)s::text)::int
                     FROM pgqueue.queues q WHERE q.name = %(queue)s), 0),
           coalesce(%(run_at)s::timestamptz, now()), %(to_number)s,
           %(from_number)s, %(body)s, %(content_sid)s, %(content_variables)s::jsonb,
           %(message_type)s, %(idempotency_key)s, %(max_attempts)s,
           coalesce(%(expires_at)s::timestamptz,
                    coalesce(%(run_at)s::timestamptz, now())
                    + make_interval(secs => (SELECT (q.message_type_ttls
                                                     ->> %(message_type)s::text)::float8
                                             FROM pgqueue.queues q
                                             WHERE q.name = %(queue)s))),
           pgqueue.event_tx(NULL)
    FROM conv
    RETURNING id, state, run_at, created_at, tenant_id, event_tx
), event AS (
    INSERT INTO pgqueue.events (tx, tenant_id, queue, job_id, kind, run_at)
    SELECT event_tx, tenant_id, %(queue)s, id, 'queued', run_at FROM job
)
SELECT job.id, job.state, job.run_at, job.created_at, conv.pending - 1 AS ahead,
       -- Only a new head can be claimed now: the others wait for a promotion, which
       -- notifies itself. NOTIFY serialises commits, so it is not sent for nothing.
       CASE WHEN conv.pending = 1 THEN pg_notify(pgqueue.channel(%(queue)s), '') END AS notified
FROM job, conv;


-- name: enqueue_batch
-- The batch variant: all rows in one statement, so a batch is all or nothing. Rows of
-- one conversation keep their input order (`ord`); conversation rows are upserted once
-- each, in key order, so concurrent batches cannot deadlock on them.
WITH types AS (
    SELECT message_type_priorities AS priorities, message_type_ttls AS ttls
    FROM pgqueue.queues WHERE name = %(queue)s
), input AS (
    SELECT *
    FROM unnest(%(tenant_ids)s::text[], %(conversations)s::text[], %(priorities)s::int[],
                %(run_ats)s::timestamptz[], %(to_numbers)s::text[], %(from_numbers)s::text[],
                %(bodies)s::text[], %(content_sids)s::text[], %(content_variables)s::jsonb[],
                %(message_types)s::text[], %(idempotency_keys)s::text[],
                %(expires_ats)s::timestamptz[])
         WITH ORDINALITY AS i(tenant_id, conversation, priority, run_at, to_number,
                              from_number, body, content_sid, content_variables,
                              message_type, idempotency_key, expires_at, ord)
), counts AS (
    SELECT conversation, count(*)::int AS n FROM input GROUP BY conversation
), conv AS (
    INSERT INTO pgqueue.conversations AS c (queue, conversation, pending)
    SELECT %(queue)s, conversation, n FROM counts ORDER BY conversation
    ON CONFLICT (queue, conversation)
    DO UPDATE SET pending = c.pending + excluded.pending, updated_at = now()
    RETURNING conversation, pending
), numbered AS (
    SELECT input.*, conv.pending - counts.n
               + row_number() OVER (PARTITION BY input.conversation ORDER BY input.ord) AS position
    FROM input
    JOIN counts USING (conversation)
    JOIN conv USING (conversation)
), job AS (
    INSERT INTO pgqueue.jobs (
        queue, tenant_id, conversation, is_head, state, priority, run_at, to_number,
        from_number, body, content_sid, content_variables, message_type, idempotency_key,
        max_attempts, expires_at, event_tx)
    SELECT %(queue)s, tenant_id, conversation, position = 1,
           CASE WHEN run_at > now() THEN 'delayed' ELSE 'waiting' END,
           coalesce(priority, ((SELECT priorities FROM types) ->> message_type)::int, 0),
           coalesce(run_at, now()), to_number, from_number, body, content_sid,
           content_variables, message_type, idempotency_key, %(max_attempts)s,
           coalesce(expires_at, coalesce(run_at, now())
                                + make_interval(secs => ((SELECT ttls FROM types)
                                                         ->> message_type)::float8)),
           pgqueue.event_tx(NULL)
    FROM numbered
    ORDER BY ord
    RETURNING id, seq, state, run_at, created_at, conversation, tenant_id, event_tx
), event AS (
    INSERT INTO pgqueue.events (tx, tenant_id, queue, job_id, kind, run_at)
    SELECT event_tx, tenant_id, %(queue)s, id, 'queued', run_at FROM job ORDER BY seq
)
SELECT job.id, job.state, job.run_at, job.created_at,
       row_number() OVER (PARTITION BY job.conversation ORDER BY job.seq)
           + conv.pending - counts.n - 1 AS ahead,
       CASE WHEN conv.pending = counts.n THEN pg_notify(pgqueue.channel(%(queue)s), '') END
           AS notified
FROM job
JOIN conv USING (conversation)
JOIN counts USING (conversation)
ORDER BY job.seq;


-- name: enqueue_refusal
-- Says why enqueue_job inserted nothing: unknown tenant, a sender of somebody else, or
-- a suppressed number.
SELECT EXISTS (SELECT 1 FROM pgqueue.tenants WHERE id = %(tenant_id)s) AS tenant_exists,
       EXISTS (SELECT 1 FROM pgqueue.tenants
               WHERE id = %(tenant_id)s
                 AND (%(from_number)s::text IS NULL OR %(from_number)s = whatsapp_from
                      OR %(from_number)s = ANY(senders))) AS sender_allowed,
       (SELECT reason_code FROM pgqueue.suppressions
        WHERE tenant_id = %(tenant_id)s AND phone_number = %(to_number)s) AS suppressed_code;


-- name: find_idempotent
-- The job an idempotency key already names for this tenant, live or finished.
SELECT id, state, run_at, created_at, 0 AS ahead FROM pgqueue.jobs
WHERE tenant_id = %(tenant_id)s AND idempotency_key = %(idempotency_key)s
UNION ALL
SELECT id, state, run_at, created_at, 0 FROM pgqueue.job_history
WHERE tenant_id = %(tenant_id)s AND idempotency_key = %(idempotency_key)s
LIMIT 1;


-- name: lock_queue
-- Serialises admission for one queue (see the lock order above), and wakes the delayed
-- heads that have come due: `waiting` is what a claim reads (and what adds the tenant to
-- ready_tenants, by trigger), so this runs before every claim. The queue row is locked
-- first (the wake-up joins it), through the delayed heads' own index.
WITH q AS (
    SELECT name FROM pgqueue.queues WHERE name = %(queue)s FOR UPDATE
), woken AS (
    UPDATE pgqueue.jobs j SET state = 'waiting'
    FROM q
    WHERE j.queue = q.name AND j.is_head AND j.state = 'delayed'
      AND j.run_at <= (SELECT clock_timestamp())
    RETURNING 1
)
SELECT name, (SELECT count(*) FROM woken) AS woken FROM q;


-- name: claim_jobs
-- Claims up to %(max_jobs)s conversation heads and gives each its rate slot, in one
-- statement (one update a job: a second one cost the server as much as the claim).
-- Run right after lock_queue, in the same transaction, so this statement's snapshot
-- already holds every committed claim.
--  * the tenants looked at are those with sends in flight (`busy`: at most the global
--    limit's) and, from the front of ready_tenants' index (pgqueue.ready_front), the
--    first n tenants with nothing in flight that have a waiting head at their row's
--    priority, are not paused and are within their own rate: their order among
--    themselves is the claim's order (their k-th head puts them at k sends in flight,
--    behind every tenant's first), so no tenant further down can have a head among the
--    n chosen. The cost follows n and the sends in flight, not the number of tenants;
--  * each tenant is read through a LATERAL over the waiting heads' index, at most its
--    free slots (G2) and, with a rate of its own, its rate slots within the lookahead;
--  * order: priority (G5), then the tenant with the fewest sends in flight counting the
--    ones this claim hands out, then the tenant served longest ago (G6; tenants served
--    by one claim share that moment: then by id, as the index has them), then seq;
--  * at most the free global slots (G3) and the queue's rate slots within the
--    lookahead (G4);
--  * rate (G4): starts are paced by GCRA on the database clock, one every
--    1 / (h * R) seconds (h = %(headroom)s, 0.978), each job carrying the moment
--    (`start_at`) it may start. Evenly spaced starts put at most ceil(h * R * (1 s +
--    jitter)) <= R of them in any 1-second window as long as the jitter between start_at
--    and the request reaching the provider stays under 1/h - 1 = 22.5 ms, and still
--    deliver 97.8 %% of R. (A token bucket of capacity R would allow 2R in one second.)
--    A tenant with a rate r of its own is paced the same way, one start every
--    1 / (h * r) s (G4b): pgqueue.pace_free gives each job the first moment both allow,
--    taking the jobs in order of their tenants' own slots, so a far one holds no other
--    back; the queue's slots need not come in order, only a spacing apart
--    (rate_booked: those handed out and still to come), so a sender's slot near now is
--    given between the later ones an earlier claim gave. Its first slot after a pause is %(margin)s s ahead, not now: a slot of now is
--    late by the time the job reaches its worker. The dispatcher never starts a send
--    more than a few ms after its slot: a late one takes a new slot (reslot);
--  * lateness matters only while the rate can bind: in any window, the starts are at
--    most its slots (h * R + 1) plus the late ones of earlier slots, and those are jobs
--    in flight, at most the global limit G. When h * R + 1 + G <= R, no lateness can
--    break G4, and `late_ok` tells the dispatcher so (a lifted rate), except for a
--    tenant with a rate of its own;
--  * `global_free`: the global slots left free, for the dispatcher to claim ahead only
--    where that cannot crowd other workers out;
--  * the conversation's advisory lock is taken in the same transaction as the claim
--    (G9): a job is never active and committed while its owner does not hold that lock;
--  * the served tenants' ready rows move to the back (served_at) and, where this claim
--    took the last waiting head at their priority, are marked drained for prune_ready.
WITH q AS (
    SELECT name, global_concurrency, tenant_concurrency,
           rate_per_second * (1 - %(headroom)s) >= global_concurrency + 1 AS late_ok,
           clock_timestamp() AS now,
           clock_timestamp() + make_interval(secs => %(lookahead)s) AS horizon,
           clock_timestamp() + make_interval(secs => %(margin)s) AS earliest,
           greatest(rate_floor, clock_timestamp()) AS base, rate_booked, rate_tat,
           1.0 / (rate_per_second * %(headroom)s) AS spacing
    FROM pgqueue.queues WHERE name = %(queue)s
), busy AS (
    -- Sends in flight per tenant in all queues (G2, as pgqueue.tenant_in_flight counts
    -- them) and in this one (G3), counted rather than kept in counters: at most the
    -- global limits' rows, through the one-active-per-conversation index. A completion
    -- then writes no row a claim writes, and runs beside the claims instead of queueing
    -- on this lock; one committed after this snapshot is still counted (safe side).
    -- The claiming worker's sends that have their answers (%(answered)s: claim tokens)
    -- are in flight no more while their outcomes wait for its completer; told rather
    -- than written (a row version a send cost a fifth of the no-op throughput), so
    -- another worker's claim counts them until they commit (safe side).
    SELECT j.tenant_id, count(*)::int AS n, count(*) FILTER (WHERE j.queue = %(queue)s) AS here
    FROM pgqueue.jobs j
    WHERE j.state = 'active' AND j.claim_token <> ALL(%(answered)s::uuid[])
    GROUP BY j.tenant_id
), free_global AS (
    -- Never below none: another worker's answered sends, counted here, may have let it
    -- hand out their places already.
    SELECT greatest(global_concurrency - (SELECT coalesce(sum(here), 0)::int FROM busy), 0) AS n
    FROM q
), budget AS (
    SELECT least(
               %(max_jobs)s,
               (SELECT n FROM free_global),
               -- The free places between base and the horizon, at most.
               CASE WHEN base > horizon THEN 0
                    ELSE greatest(floor(extract(epoch FROM horizon - base) / spacing)::int + 1
                                  - (SELECT count(*)::int FROM unnest(rate_booked) b
                                     WHERE b > base - make_interval(secs => spacing)
                                       AND b <= horizon), 0)
               END) AS n
    FROM q
), looked_at AS (
    SELECT b.tenant_id AS id, b.n AS active, NULL::timestamptz AS served_at
    FROM busy b
    UNION ALL
    SELECT f.tenant_id, 0, f.served_at
    FROM q, pgqueue.ready_front(%(queue)s, q.horizon, (SELECT n FROM budget),
                                (SELECT coalesce(array_agg(tenant_id), '{}') FROM busy)) f
), free_tenants AS (
    SELECT l.id, l.active, coalesce(l.served_at, t.last_served_at) AS served_at,
           t.rate_per_second AS rate, t.rate_tat,
           least(coalesce(t.max_concurrency, q.tenant_concurrency) - l.active,
                 (SELECT n FROM budget),
                 CASE WHEN t.rate_per_second IS NULL THEN NULL
                      WHEN t.rate_tat > q.horizon THEN 0
                      ELSE floor(extract(epoch FROM q.horizon - greatest(t.rate_tat, q.earliest))
                                 * t.rate_per_second * %(headroom)s)::int + 1
                 END) AS free
    FROM looked_at l
    -- One lookup by key each (OFFSET 0 keeps it so): hashing the tenants table to join
    -- a claim's few would read every tenant.
    CROSS JOIN LATERAL (SELECT * FROM pgqueue.tenants x WHERE x.id = l.id OFFSET 0) t
    CROSS JOIN q
    WHERE NOT t.paused AND (t.paused_until IS NULL OR t.paused_until <= q.now)
), candidates AS (
    -- Numbered in the tenant's own order, where the index hands them over sorted: the
    -- k-th puts its tenant at active + k sends in flight.
    SELECT h.id, h.priority, h.seq, ft.active + h.k AS tenant_load, ft.served_at,
           ft.id AS tenant_id
    FROM free_tenants ft
    CROSS JOIN LATERAL (
        SELECT x.*, row_number() OVER (ORDER BY x.priority DESC, x.seq) AS k
        FROM (SELECT j.id, j.priority, j.seq
              FROM pgqueue.jobs j
              WHERE j.queue = %(queue)s AND j.tenant_id = ft.id
                AND j.is_head AND j.state = 'waiting'
                -- Past its deadline a head is never sent (expire_jobs ends it).
                AND (j.expires_at IS NULL OR j.expires_at > (SELECT now FROM q))
              ORDER BY j.priority DESC, j.seq
              -- A tenant's (n+1)-th head can never be among the n chosen: read no more.
              LIMIT greatest(ft.free, 0)) x
    ) h
), chosen AS (
    -- The n first, through a sort that keeps only n rows.
    SELECT c.id FROM candidates c
    ORDER BY c.priority DESC, c.tenant_load, c.served_at NULLS FIRST, c.tenant_id, c.seq
    LIMIT (SELECT n FROM budget)
), locked AS (
    -- Only the chosen rows are locked (candidates of other tenants stay free for other
    -- claimers); a row that changed meanwhile is skipped, never waited for.
    SELECT j.id, j.tenant_id, j.priority, j.seq
    FROM pgqueue.jobs j
    WHERE j.id IN (SELECT id FROM chosen) AND j.is_head AND j.state = 'waiting'
    FOR UPDATE OF j SKIP LOCKED
), mine AS (
    SELECT l.*, ft.rate IS NOT NULL AS rated, greatest(ft.rate_tat, q.earliest) AS rate_base,
           1.0 / (ft.rate * %(headroom)s) AS rate_spacing,
           row_number() OVER (PARTITION BY l.tenant_id ORDER BY l.priority DESC, l.seq) AS k
    FROM locked l JOIN free_tenants ft ON ft.id = l.tenant_id CROSS JOIN q
), ordered AS (
    -- In order of the tenants' own rate slots (none: first), each job with the previous
    -- one of its tenant, for pgqueue.pace_free.
    SELECT o.*, (lag(o.slot) OVER (PARTITION BY o.tenant_id ORDER BY o.slot))::int AS prev
    FROM (SELECT m.*, row_number() OVER (
                          ORDER BY CASE WHEN m.rated THEN m.rate_base + make_interval(
                                             secs => m.rate_spacing * (m.k - 1)) END
                                   NULLS FIRST, m.priority DESC, m.seq) AS slot
          FROM mine m) o
), paced AS (
    -- Gaps between booked slots arise only from tenants with a rate of their own: a
    -- claim without one takes the slots after the last (timed), as a sequence.
    SELECT CASE WHEN bool_or(o.rated) THEN pgqueue.pace_free(
               q.base, q.spacing, q.rate_booked,
               array_agg(o.prev ORDER BY o.slot),
               array_agg(CASE WHEN o.rated THEN o.rate_base END ORDER BY o.slot),
               array_agg(o.rate_spacing ORDER BY o.slot)) END AS starts
    FROM ordered o, q GROUP BY q.base, q.spacing, q.rate_booked
), timed AS MATERIALIZED (
    SELECT o.id, o.slot,
           coalesce(p.starts[o.slot], greatest(q.base, q.rate_tat)
                                      + make_interval(secs => q.spacing * (o.slot - 1))) AS start
    FROM ordered o, paced p, q
), claimed AS (
    UPDATE pgqueue.jobs j
    SET state = 'active',
        attempts = j.attempts + 1,
        claim_token = gen_random_uuid(),
        claimed_by = %(worker_id)s,
        start_at = t.start,
        started_at = coalesce(j.started_at, t.start),
        lease_expires_at = q.now + make_interval(secs => %(lease)s),
        updated_at = q.now,
        event_tx = pgqueue.event_tx(j.event_tx)
    FROM q, timed t
    WHERE j.id = t.id
    RETURNING j.*, t.slot
), sending AS (
    INSERT INTO pgqueue.events (tx, tenant_id, queue, job_id, kind, attempt, run_at)
    SELECT event_tx, tenant_id, queue, id, 'sending', attempts, start_at FROM claimed
), served AS (
    -- One update a tenant row: last served, and the next slot of its own rate.
    UPDATE pgqueue.tenants t
    SET last_served_at = q.now,
        rate_tat = CASE WHEN t.rate_per_second IS NULL THEN t.rate_tat
                        ELSE s.last_start + make_interval(
                                 secs => 1.0 / (t.rate_per_second * %(headroom)s)) END
    FROM q, (SELECT tenant_id, max(start_at) AS last_start FROM claimed GROUP BY 1) s
    WHERE t.id = s.tenant_id
), queue_rate AS (
    -- The booked slots that can still be near a new one, with this claim's.
    UPDATE pgqueue.queues qq
    SET rate_tat = greatest(qq.rate_tat, (SELECT max(start_at) FROM claimed)
                                         + make_interval(secs => q.spacing)),
        -- None left (a spacing under a microsecond rounds to none): empty, not NULL.
        rate_booked = (SELECT coalesce(array_agg(b ORDER BY b), '{}')
                       FROM (SELECT unnest(q.rate_booked) AS b
                             UNION ALL SELECT start_at FROM claimed) u
                       WHERE u.b > q.now - make_interval(secs => q.spacing))
    FROM q
    WHERE qq.name = q.name AND EXISTS (SELECT 1 FROM claimed)
), ready AS (
    UPDATE pgqueue.ready_tenants r
    SET served_at = q.now,
        drained = NOT EXISTS (SELECT 1 FROM pgqueue.jobs j
                              WHERE j.queue = r.queue AND j.tenant_id = r.tenant_id
                                AND j.priority = r.priority
                                AND j.is_head AND j.state = 'waiting'
                                AND j.id NOT IN (SELECT id FROM claimed))
    FROM q
    WHERE r.queue = %(queue)s AND r.tenant_id IN (SELECT tenant_id FROM claimed)
)
SELECT c.id, c.queue, c.tenant_id, c.conversation, c.priority, c.to_number, c.from_number,
       c.body, c.content_sid, c.content_variables, c.message_type, c.attempts,
       c.max_attempts, c.claim_token, c.start_at, c.created_at, c.expires_at,
       extract(epoch FROM c.start_at - q.now)::float8 AS start_delay,
       q.late_ok AND t.rate_per_second IS NULL AS late_ok,
       (1.0 / (t.rate_per_second * %(headroom)s))::float8 AS rate_spacing,
       (SELECT n FROM free_global) - (SELECT count(*) FROM claimed)::int AS global_free,
       t.account_sid, t.auth_token, t.whatsapp_from, t.fallback_content_sid,
       t.fallback_variable,
       pgqueue.lock_key(c.queue, c.conversation) AS lock_key,
       pg_try_advisory_lock(pgqueue.lock_key(c.queue, c.conversation)) AS locked
FROM claimed c
CROSS JOIN LATERAL (SELECT * FROM pgqueue.tenants x WHERE x.id = c.tenant_id OFFSET 0) t
CROSS JOIN q
ORDER BY c.slot;


-- name: turn_end
-- The end of a dispatcher turn, in one statement: drop the conversation locks of the
-- finished sends (their jobs stay active, and ours, until the completer commits their
-- outcomes, and the rescuer leaves a connected worker's jobs alone), wake the other
-- workers if outcomes freed anything (the payload names the sender, which ignores its
-- own wake-up), and, for a claim that came back short, say when the next rate slot opens
-- and when the next delayed head becomes due, so the worker sleeps exactly that long;
-- and drop the ready rows the claim drained (pgqueue.prune_ready: its locks are held
-- only until this transaction's commit).
-- The clock is read in a subquery so that it can bound the index scan (a bare
-- clock_timestamp() is a filter over every head).
SELECT (SELECT count(*) FILTER (WHERE pg_advisory_unlock(k))
        FROM unnest(%(release)s::bigint[]) AS k) AS released,
       CASE WHEN %(notify)s::text IS NOT NULL
            THEN pg_notify(pgqueue.channel(%(queue)s), %(notify)s::text) END AS notified,
       extract(epoch FROM q.rate_tat - clock_timestamp())::float8 AS rate_wait,
       (SELECT extract(epoch FROM min(j.run_at) - clock_timestamp())::float8
        FROM pgqueue.jobs j
        WHERE j.queue = %(queue)s AND j.is_head AND j.state = 'delayed'
          AND j.run_at > (SELECT clock_timestamp())) AS due_wait,
       pgqueue.prune_ready(%(queue)s) AS pruned
FROM pgqueue.queues q WHERE q.name = %(queue)s;


-- name: complete_jobs
-- Applies a batch of outcomes, each only if the job is still active under the claim
-- token the caller holds (a rescued or re-claimed job is never overwritten by a late
-- worker). Needs no queue lock (a rescuer runs it under one anyway). In this one
-- statement: finished jobs (completed, failed) move to job_history; retried ones stay
-- head of their conversation with a new run_at (G1: they block the later messages);
-- released ones go back without spending the attempt; the conversations' pending
-- counts and the tenants' totals move by exactly the jobs that changed. Promotion
-- follows in promote_heads.
WITH input AS (
    -- One jsonb parameter rather than nine arrays: far cheaper for the client to send.
    SELECT *
    FROM jsonb_to_recordset(%(outcomes)s::jsonb)
         AS i(id bigint, token uuid, outcome text, delay float8, code text, message text,
              sid text, status text, channel text)
), mine AS (
    -- One primary-key probe per outcome, whatever the number of jobs in flight. The
    -- LIMIT keeps the state test out of the subquery: with it inside, the planner walks
    -- the index of active jobs once per outcome instead. The token test stays inside,
    -- so an outcome that is no longer ours (rescued meanwhile) locks nothing, and rows
    -- are locked in id order: a rescuer running this same statement cannot deadlock
    -- with a completer over the same jobs.
    SELECT j.id, j.tenant_id, j.conversation, i.outcome, i.delay, i.code, i.message,
           i.sid, i.status, i.channel
    FROM (SELECT * FROM input ORDER BY id) i
    CROSS JOIN LATERAL (
        SELECT j.id, j.tenant_id, j.conversation, j.state, j.queue
        FROM pgqueue.jobs j
        WHERE j.id = i.id AND j.claim_token = i.token
        LIMIT 1
        FOR UPDATE
    ) j
    WHERE j.state = 'active' AND j.queue = %(queue)s
), finished AS (
    DELETE FROM pgqueue.jobs j
    USING mine m
    WHERE j.id = m.id AND m.outcome IN ('completed', 'failed', 'expired')
    RETURNING j.*, m.outcome, m.code AS new_code, m.message AS new_message,
              m.sid AS new_sid, m.status AS new_status, m.channel AS new_channel,
              pgqueue.event_tx(j.event_tx) AS next_event_tx
), history AS (
    INSERT INTO pgqueue.job_history (
        id, seq, queue, tenant_id, conversation, priority, run_at, to_number, from_number,
        body, content_sid, content_variables, message_type, idempotency_key, attempts,
        max_attempts, last_error_code, last_error_message, provider_sid, provider_status,
        channel, created_at, started_at, expires_at, state, finished_at, event_tx)
    SELECT id, seq, queue, tenant_id, conversation, priority, run_at, to_number,
           from_number, body, content_sid, content_variables, message_type,
           idempotency_key, attempts, max_attempts,
           coalesce(f.new_code, f.last_error_code),
           coalesce(f.new_message, f.last_error_message),
           coalesce(f.new_sid, f.provider_sid), coalesce(f.new_status, f.provider_status),
           coalesce(f.new_channel, f.channel), created_at, started_at, expires_at, f.outcome,
           clock_timestamp(), f.next_event_tx
    FROM finished f
), requeued AS (
    UPDATE pgqueue.jobs j
    SET state = CASE WHEN m.delay > 0 THEN 'delayed' ELSE 'waiting' END,
        run_at = clock_timestamp() + make_interval(secs => greatest(m.delay, 0)),
        attempts = CASE WHEN m.outcome = 'release' THEN j.attempts - 1 ELSE j.attempts END,
        last_error_code = coalesce(m.code, j.last_error_code),
        last_error_message = coalesce(m.message, j.last_error_message),
        claim_token = NULL, claimed_by = NULL, lease_expires_at = NULL, start_at = NULL,
        updated_at = clock_timestamp(), event_tx = pgqueue.event_tx(j.event_tx)
    FROM mine m
    WHERE j.id = m.id AND m.outcome IN ('retry', 'release')
    RETURNING j.id, j.tenant_id, j.attempts, j.run_at, j.event_tx, m.outcome, m.code, m.message
), event AS (
    -- The message's events of this change (a released send is queued again; its
    -- attempt was not spent), in the order of the rows locked above.
    INSERT INTO pgqueue.events (tx, tenant_id, queue, job_id, kind, attempt, sid, code,
                                message, run_at)
    SELECT f.next_event_tx, f.tenant_id, %(queue)s, f.id,
           CASE f.outcome WHEN 'completed' THEN 'sent' ELSE f.outcome END, f.attempts,
           coalesce(f.new_sid, f.provider_sid), f.new_code, f.new_message, NULL
    FROM finished f
    UNION ALL
    SELECT r.event_tx, r.tenant_id, %(queue)s, r.id,
           CASE r.outcome WHEN 'retry' THEN 'retry_scheduled' ELSE 'queued' END, r.attempts,
           NULL, r.code, r.message, r.run_at
    FROM requeued r
), totals AS (
    -- Finished sends per tenant, added to this session's shard of the totals (one of 16,
    -- by backend pid), so completions of different workers never wait for each other's
    -- rows; rows in key order, so they cannot deadlock when two sessions share a shard.
    INSERT INTO pgqueue.tenant_totals AS tt (tenant_id, shard, completed, failed, expired)
    SELECT tenant_id, pgqueue.counter_shard(),
           count(*) FILTER (WHERE outcome = 'completed'),
           count(*) FILTER (WHERE outcome = 'failed'),
           count(*) FILTER (WHERE outcome = 'expired')
    FROM finished
    GROUP BY tenant_id
    ORDER BY tenant_id
    ON CONFLICT (tenant_id, shard) DO UPDATE
    SET completed = tt.completed + excluded.completed, failed = tt.failed + excluded.failed,
        expired = tt.expired + excluded.expired
), conversation_counts AS (
    UPDATE pgqueue.conversations c
    SET pending = c.pending - x.n, updated_at = clock_timestamp()
    FROM (SELECT conversation, count(*)::int AS n FROM finished
          GROUP BY conversation ORDER BY conversation) x
    WHERE c.queue = %(queue)s AND c.conversation = x.conversation
)
SELECT m.id, m.outcome, m.conversation FROM mine m;


-- name: expire_jobs
-- Ends the live jobs of the queue whose deadline has passed before they started
-- (waiting or delayed, head or not; an active one is being sent and finishes as it
-- goes): each moves to job_history as `expired`, its conversation's pending count and
-- its tenant's totals move with it, and promote_heads follows for the conversations
-- whose head it was, so they go on with their next message. Rows a claim holds are
-- skipped (SKIP LOCKED): the claim does not take an expired head, and the next sweep
-- gets it. Through jobs_expiring, at most %(limit)s a sweep.
WITH due AS (
    SELECT j.id FROM pgqueue.jobs j
    WHERE j.queue = %(queue)s AND j.expires_at <= clock_timestamp() AND j.state <> 'active'
    ORDER BY j.expires_at, j.id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM pgqueue.jobs j USING due d
    WHERE j.id = d.id AND j.state <> 'active'
    RETURNING j.*, pgqueue.event_tx(j.event_tx) AS next_event_tx
), history AS (
    INSERT INTO pgqueue.job_history (
        id, seq, queue, tenant_id, conversation, priority, run_at, to_number, from_number,
        body, content_sid, content_variables, message_type, idempotency_key, attempts,
        max_attempts, last_error_code, last_error_message, provider_sid, provider_status,
        channel, created_at, started_at, expires_at, state, finished_at, event_tx)
    SELECT id, seq, queue, tenant_id, conversation, priority, run_at, to_number,
           from_number, body, content_sid, content_variables, message_type,
           idempotency_key, attempts, max_attempts, 'expired',
           'not sent: its deadline passed first', provider_sid, provider_status, channel,
           created_at, started_at, expires_at, 'expired', clock_timestamp(),
           next_event_tx
    FROM gone
), event AS (
    INSERT INTO pgqueue.events (tx, tenant_id, queue, job_id, kind, attempt, code, message)
    SELECT next_event_tx, tenant_id, queue, id, 'expired', attempts, 'expired',
           'not sent: its deadline passed first'
    FROM gone
), totals AS (
    INSERT INTO pgqueue.tenant_totals AS tt (tenant_id, shard, expired)
    SELECT tenant_id, pgqueue.counter_shard(), count(*) FROM gone
    GROUP BY tenant_id ORDER BY tenant_id
    ON CONFLICT (tenant_id, shard) DO UPDATE SET expired = tt.expired + excluded.expired
), conversation_counts AS (
    UPDATE pgqueue.conversations c
    SET pending = c.pending - x.n, updated_at = clock_timestamp()
    FROM (SELECT conversation, count(*)::int AS n FROM gone
          GROUP BY conversation ORDER BY conversation) x
    WHERE c.queue = %(queue)s AND c.conversation = x.conversation
)
SELECT id, tenant_id, conversation, is_head FROM gone;


-- name: promote_heads
-- Makes the next job of each conversation whose head just finished its new head. A
-- separate statement from complete_jobs on purpose: its fresh snapshot sees a job that
-- an enqueue committed while we waited for the conversation row, and the old head is
-- already gone, so the one-head-per-conversation index never sees two. One index probe
-- per conversation (LATERAL ... LIMIT 1): a hash join over the live table would cost
-- as much as the backlog.
UPDATE pgqueue.jobs j
SET is_head = true, updated_at = clock_timestamp()
FROM unnest(%(conversations)s::text[]) AS c(conversation)
CROSS JOIN LATERAL (
    SELECT n.id, n.is_head
    FROM pgqueue.jobs n
    WHERE n.queue = %(queue)s AND n.conversation = c.conversation
    ORDER BY n.seq
    LIMIT 1
) nxt
WHERE j.id = nxt.id AND NOT nxt.is_head;


-- name: retake_locks
-- After the lock connection was lost (network blip, database restart): take back the
-- conversation locks of the jobs this worker still holds under its claim tokens.
SELECT j.id, pg_try_advisory_lock(pgqueue.lock_key(j.queue, j.conversation))
           AS locked
FROM pgqueue.jobs j
WHERE j.claim_token = ANY(%(tokens)s::uuid[]) AND j.state = 'active';


-- name: unknown_claims
-- After the lock connection was lost: active jobs claimed by this worker under a token
-- it does not hold. Their claim was committed but its answer lost with the connection,
-- or (after an asynchronous failover) their outcome was committed only on the old
-- primary. The worker is alive, so find_orphans would leave them for their lease; they
-- are provably not being sent, and the worker hands them back at once.
SELECT j.id, j.claim_token, j.attempts, j.max_attempts, j.conversation
FROM pgqueue.jobs j
WHERE j.queue = %(queue)s AND j.state = 'active' AND j.claimed_by = %(worker)s
  AND j.claim_token <> ALL(%(tokens)s::uuid[]);


-- name: find_orphans
-- Active jobs whose worker is gone (G9): nobody holds the conversation lock and no
-- connection of the claiming worker exists, so its process died and its locks went with
-- it. Right after a database restart every lock is gone, so live workers get a grace
-- (%(grace)s s from the server's start) to reconnect and take theirs back. A failover
-- loses every lock too, and a promoted standby's postmaster started long before: its
-- grace runs from the promotion, when its walwriter started (visible to a superuser or
-- pg_read_all_stats), at the earliest from the last commit it replayed from the old
-- primary (visible to all). A job whose lease ran out is rescued too: its worker lives
-- but is wedged.
SELECT j.id, j.claim_token, j.attempts, j.max_attempts, j.claimed_by, j.conversation,
       j.lease_expires_at < clock_timestamp() AS lease_expired
FROM pgqueue.jobs j
WHERE j.queue = %(queue)s AND j.state = 'active'
  AND (
    j.lease_expires_at < clock_timestamp()
    OR (
      greatest(pg_postmaster_start_time(), pg_last_xact_replay_timestamp(),
               (SELECT max(w.backend_start) FROM pg_stat_activity w
                WHERE w.backend_type = 'walwriter'))
        < clock_timestamp() - make_interval(secs => %(grace)s)
      AND NOT EXISTS (
        SELECT 1 FROM pg_stat_activity a
        WHERE a.application_name = 'pgqueue-worker:' || j.claimed_by)
      AND NOT EXISTS (
        SELECT 1 FROM pg_locks l
        WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted
          AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
          AND ((l.classid::bigint << 32) | l.objid::bigint)
              = pgqueue.lock_key(j.queue, j.conversation))
    )
  );


-- name: extend_leases
-- Heartbeat: pushes out the lease of the jobs this worker is still sending.
UPDATE pgqueue.jobs
SET lease_expires_at = clock_timestamp() + make_interval(secs => %(lease)s)
WHERE claim_token = ANY(%(tokens)s::uuid[]) AND state = 'active';


-- name: throttle_queue
-- The provider said 429: no send of this queue starts before Retry-After has passed.
UPDATE pgqueue.queues
SET rate_tat = greatest(rate_tat, clock_timestamp() + make_interval(secs => %(seconds)s)),
    rate_floor = greatest(rate_floor, clock_timestamp() + make_interval(secs => %(seconds)s))
WHERE name = %(queue)s;


-- name: rest_tenant
-- The tenant's WhatsApp sender hit a limit of its own at Twilio (messaging tier, its
-- queue full): claims pass it over until paused_until, then it goes on by itself.
UPDATE pgqueue.tenants
SET paused_until = greatest(paused_until, now() + make_interval(secs => %(seconds)s)),
    pause_reason = %(reason)s, updated_at = now()
WHERE id = %(tenant_id)s;


-- name: pause_tenant
-- The tenant's own set-up is broken (bad credentials, …): its jobs wait, burning nothing.
UPDATE pgqueue.tenants
SET paused = true, pause_reason = %(reason)s, updated_at = now()
WHERE id = %(tenant_id)s;


-- name: register_worker
-- Announces a worker (for `pgqueue doctor` and the metrics); heartbeat keeps it fresh.
INSERT INTO pgqueue.workers (id, queue, hostname, pid, concurrency)
VALUES (%(id)s, %(queue)s, %(hostname)s, %(pid)s, %(concurrency)s)
ON CONFLICT (id) DO UPDATE SET heartbeat_at = now();


-- name: heartbeat_worker
UPDATE pgqueue.workers SET heartbeat_at = now() WHERE id = %(id)s;


-- name: unregister_worker
DELETE FROM pgqueue.workers WHERE id = %(id)s;


-- name: forget_dead_workers
-- Worker rows whose process has no connection left and which stopped heartbeating.
DELETE FROM pgqueue.workers w
WHERE w.heartbeat_at < now() - make_interval(secs => %(grace)s)
  AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a
                  WHERE a.application_name = 'pgqueue-worker:' || w.id);


-- name: forget_idle_conversations
-- Conversation rows with nothing pending, left alone for a while (an upsert recreates one).
DELETE FROM pgqueue.conversations
WHERE pending = 0 AND updated_at < now() - interval '10 minutes';


-- name: mark_stale_ready
-- Maintenance's safety net for ready rows that no claim or cancel marked (a job deleted
-- by hand, say): a row without a waiting head at its priority is marked drained, for
-- the next turn's prune_ready to look at again under its lock. One probe a row.
UPDATE pgqueue.ready_tenants r
SET drained = true
WHERE r.queue = %(queue)s AND NOT r.drained
  AND NOT EXISTS (SELECT 1 FROM pgqueue.jobs j
                  WHERE j.queue = r.queue AND j.tenant_id = r.tenant_id
                    AND j.priority = r.priority AND j.is_head AND j.state = 'waiting'
                  OFFSET 0);


-- name: tenant_in_flight
-- Sends in flight per tenant, with each tenant's limit and pause state.
SELECT t.id, coalesce(b.n, 0) AS active,
       coalesce(t.max_concurrency, q.tenant_concurrency) AS max_concurrency,
       t.paused, t.pause_reason
FROM pgqueue.tenants t
JOIN pgqueue.queues q ON q.name = %(queue)s
LEFT JOIN pgqueue.tenant_in_flight b ON b.tenant_id = t.id
ORDER BY t.id;


-- name: batch_refusals
-- The first message of a batch that cannot be enqueued: unknown tenant, a sender that is
-- not the tenant's own, or a suppressed number.
SELECT i.ord - 1 AS index
FROM unnest(%(tenant_ids)s::text[], %(to_numbers)s::text[],
            coalesce(%(from_numbers)s::text[], '{}'))
     WITH ORDINALITY AS i(tenant_id, to_number, from_number, ord)
LEFT JOIN pgqueue.tenants t ON t.id = i.tenant_id
LEFT JOIN pgqueue.suppressions s ON s.tenant_id = i.tenant_id AND s.phone_number = i.to_number
WHERE t.id IS NULL OR s.reason_code IS NOT NULL
   OR NOT (i.from_number IS NULL OR i.from_number = t.whatsapp_from
           OR i.from_number = ANY(t.senders))
ORDER BY i.ord
LIMIT 1;


-- name: suppress_number
-- The provider said this number must not be messaged by this tenant again (unsubscribed,
-- blocked): later enqueues to it are refused instead of sent.
INSERT INTO pgqueue.suppressions (tenant_id, phone_number, reason_code)
VALUES (%(tenant_id)s, %(phone_number)s, %(code)s)
ON CONFLICT (tenant_id, phone_number) DO NOTHING;


-- name: release_locks
-- Between a worker's paced turns: drops the conversation locks of sends that have their
-- answers, so that its completer can write their outcomes now rather than after the
-- next turn (until then every other worker's claims count them in flight, G2/G3).
-- Session locks, no transaction and no queue lock: the jobs stay active, and ours,
-- until the completer commits them, exactly as after a turn that dropped them.
SELECT count(*) FILTER (WHERE pg_advisory_unlock(k)) AS released
FROM unnest(%(release)s::bigint[]) AS k;


-- name: notify_queue
-- Wakes the queue's workers (slots freed, tenant resumed, job retried by an operator).
-- The payload names the worker that sent it (it ignores its own), or is empty.
SELECT pg_notify(pgqueue.channel(%(queue)s), coalesce(%(payload)s::text, ''));


-- name: get_job
-- One job, live or finished, in the old system's state words (tenant-scoped when given).
SELECT * FROM pgqueue.jobs_overview
WHERE id = %(id)s AND (%(tenant_id)s::text IS NULL OR tenant_id = %(tenant_id)s)
LIMIT 1;


-- name: list_jobs
-- Newest first; every filter optional. Live jobs come from the small live table, the
-- finished ones from history (bounded by the limit).
SELECT * FROM pgqueue.jobs_overview
WHERE (%(state)s::text IS NULL OR state = %(state)s)
  AND (%(tenant_id)s::text IS NULL OR tenant_id = %(tenant_id)s)
  AND (%(conversation)s::text IS NULL OR conversation = %(conversation)s)
  AND queue = %(queue)s
ORDER BY created_at DESC, id DESC
LIMIT %(limit)s;


-- name: retry_failed
-- Dead letters back to the queue: each goes to the tail of its conversation (a new seq,
-- like a new message) with its attempts reset; it is head only if the conversation has
-- nothing else pending. Conversation rows are taken in key order, so concurrent retries
-- and enqueues cannot deadlock.
WITH dead AS (
    DELETE FROM pgqueue.job_history h
    WHERE h.state = 'failed' AND h.queue = %(queue)s
      AND (%(ids)s::bigint[] IS NULL OR h.id = ANY(%(ids)s::bigint[]))
      AND (%(tenant_id)s::text IS NULL OR h.tenant_id = %(tenant_id)s)
    RETURNING h.*
), counts AS (
    SELECT conversation, count(*)::int AS n FROM dead GROUP BY conversation
), conv AS (
    INSERT INTO pgqueue.conversations AS c (queue, conversation, pending)
    SELECT %(queue)s, conversation, n FROM counts ORDER BY conversation
    ON CONFLICT (queue, conversation)
    DO UPDATE SET pending = c.pending + excluded.pending, updated_at = now()
    RETURNING conversation, pending
), numbered AS (
    SELECT dead.*, conv.pending - counts.n
               + row_number() OVER (PARTITION BY dead.conversation ORDER BY dead.seq) AS position
    FROM dead JOIN counts USING (conversation) JOIN conv USING (conversation)
), revived AS (
    INSERT INTO pgqueue.jobs (
        id, queue, tenant_id, conversation, is_head, state, priority, run_at, to_number,
        from_number, body, content_sid, content_variables, message_type, idempotency_key,
        attempts, max_attempts, last_error_code, last_error_message, created_at, event_tx)
    SELECT id, queue, tenant_id, conversation, position = 1, 'waiting', priority, now(),
           to_number, from_number, body, content_sid, content_variables, message_type,
           idempotency_key, 0, max_attempts, last_error_code, last_error_message, created_at,
           pgqueue.event_tx(event_tx)
    FROM numbered
    ORDER BY seq
    RETURNING id, tenant_id, run_at, event_tx
), event AS (
    INSERT INTO pgqueue.events (tx, tenant_id, queue, job_id, kind, run_at)
    SELECT event_tx, tenant_id, %(queue)s, id, 'queued', run_at FROM revived
), failed_counts AS (
    INSERT INTO pgqueue.tenant_totals AS tt (tenant_id, shard, failed)
    SELECT tenant_id, pgqueue.counter_shard(), -count(*) FROM revived
    GROUP BY tenant_id ORDER BY tenant_id
    ON CONFLICT (tenant_id, shard) DO UPDATE SET failed = tt.failed + excluded.failed
)
SELECT id, pg_notify(pgqueue.channel(%(queue)s), '') AS notified FROM revived;


-- name: lock_job_conversation
-- Cancel, first step: the conversation row of a live job, locked before the job itself,
-- in the order enqueue and completion take them (conversation, then its jobs), so a
-- cancel cannot deadlock with a worker promoting the job it cancels.
SELECT c.conversation
FROM pgqueue.conversations c
WHERE (c.queue, c.conversation) = (
    SELECT j.queue, j.conversation FROM pgqueue.jobs j
    WHERE j.id = %(id)s AND j.queue = %(queue)s
      AND (%(tenant_id)s::text IS NULL OR j.tenant_id = %(tenant_id)s))
FOR UPDATE OF c;


-- name: cancel_job
-- Cancel, second step: a live job that no worker holds is deleted, and its
-- conversation's count of live jobs goes down. An active job is left alone: the provider
-- may already have it. `was_head`: the caller promotes the conversation's next message
-- (promote_heads) in the same transaction. The job row is locked first, so a claim
-- either took it before (state active: refused) or can no longer take it. NOWAIT: a row
-- somebody else holds is being claimed or completed (a completion locks its job before
-- the conversation row this cancel holds, so waiting could deadlock); the caller refuses.
WITH target AS (
    SELECT j.id, j.conversation, j.state, j.is_head
    FROM pgqueue.jobs j
    WHERE j.id = %(id)s AND j.queue = %(queue)s
      AND (%(tenant_id)s::text IS NULL OR j.tenant_id = %(tenant_id)s)
    FOR UPDATE NOWAIT
), gone AS (
    DELETE FROM pgqueue.jobs j
    USING target t
    WHERE j.id = t.id AND t.state <> 'active'
    RETURNING j.id, j.conversation, j.tenant_id, j.priority, j.is_head, j.state,
              j.attempts, j.event_tx
), event AS (
    INSERT INTO pgqueue.events (tx, tenant_id, queue, job_id, kind, attempt)
    SELECT pgqueue.event_tx(g.event_tx), g.tenant_id, %(queue)s, g.id, 'canceled', g.attempts
    FROM gone g
), pending AS (
    UPDATE pgqueue.conversations c
    SET pending = c.pending - 1, updated_at = now()
    FROM gone g
    WHERE c.queue = %(queue)s AND c.conversation = g.conversation
), drained AS (
    -- Maybe its tenant's last waiting head at that priority: the next turn looks.
    UPDATE pgqueue.ready_tenants r
    SET drained = true
    FROM gone g
    WHERE g.is_head AND g.state = 'waiting' AND r.queue = %(queue)s
      AND r.tenant_id = g.tenant_id AND r.priority = g.priority
)
SELECT t.id, t.conversation, t.state, t.is_head AS was_head,
       EXISTS (SELECT 1 FROM gone) AS canceled
FROM target t;


-- name: clean_failed
-- Deletes dead letters (optionally only older ones, or one tenant's).
WITH gone AS (
    DELETE FROM pgqueue.job_history h
    WHERE h.state = 'failed' AND h.queue = %(queue)s
      AND (%(older_than)s::timestamptz IS NULL OR h.finished_at < %(older_than)s)
      AND (%(tenant_id)s::text IS NULL OR h.tenant_id = %(tenant_id)s)
    RETURNING h.tenant_id
), failed_counts AS (
    INSERT INTO pgqueue.tenant_totals AS tt (tenant_id, shard, failed)
    SELECT tenant_id, pgqueue.counter_shard(), -count(*) FROM gone
    GROUP BY tenant_id ORDER BY tenant_id
    ON CONFLICT (tenant_id, shard) DO UPDATE SET failed = tt.failed + excluded.failed
)
SELECT count(*) AS deleted FROM gone;


-- name: record_sandbox_message
-- What the sandbox provider "sent", for the demo and for anyone without Twilio.
INSERT INTO pgqueue.sandbox_messages
    (tenant_id, job_id, to_number, body, content_sid, sid, started_at)
VALUES (%(tenant_id)s, %(job_id)s, %(to_number)s, %(body)s, %(content_sid)s, %(sid)s,
        %(started_at)s);


-- =====================================================================================
-- === API ===
-- Statements of the HTTP API (pgqueue/api.py), the operations CLI (pgqueue/ops_cli.py)
-- and the queue statistics (pgqueue/metrics.py). Every count here is cheap on purpose:
-- live states are counted on the small live table, finished ones come from the tenants'
-- counters (pgqueue.tenant_finished, the sums of tenant_totals' shards); nothing counts over
-- job_history, so the answer costs the same with a million finished jobs as with none.
-- =====================================================================================


-- name: api_queue_counts
-- The old system's metrics for the whole queue, in one round trip: live counts, the
-- tenants' finished counters, sends in flight per tenant and the paused tenants. The
-- live table is read once with two filters (waiting is the rest): its cost grows with
-- the backlog of unsent messages, never with history.
SELECT
  c.total - c.active - c.delayed AS waiting, c.active, c.delayed,
  (SELECT coalesce(sum(f.completed), 0) FROM pgqueue.tenant_finished f) AS completed,
  (SELECT coalesce(sum(f.failed), 0) FROM pgqueue.tenant_finished f) AS failed,
  (SELECT coalesce(sum(f.expired), 0) FROM pgqueue.tenant_finished f) AS expired,
  (SELECT coalesce(jsonb_object_agg(t.id, coalesce(b.n, 0)), '{}'::jsonb)
   FROM pgqueue.tenants t
   LEFT JOIN pgqueue.tenant_in_flight b ON b.tenant_id = t.id) AS tenant_concurrency,
  (SELECT coalesce(array_agg(t.id ORDER BY t.id), '{}') FROM pgqueue.tenants t
   WHERE t.paused) AS paused_tenants,
  (SELECT q.tenant_concurrency FROM pgqueue.queues q WHERE q.name = %(queue)s)
      AS max_concurrency_per_tenant
FROM (
    SELECT count(*) AS total,
           count(*) FILTER (WHERE j.state = 'active') AS active,
           count(*) FILTER (WHERE j.state <> 'active' AND j.run_at > now()) AS delayed
    FROM pgqueue.jobs j
    WHERE j.queue = %(queue)s
) c;


-- name: api_tenant_counts
-- The same numbers for one tenant only (what a tenant token may see): its live jobs
-- through the tenant index, its own counters, its own concurrency limit. No row when
-- the tenant does not exist.
SELECT c.total - c.active - c.delayed AS waiting, c.active, c.delayed,
       coalesce(f.completed, 0) AS completed, coalesce(f.failed, 0) AS failed,
       coalesce(f.expired, 0) AS expired, c.active AS in_flight,
       coalesce(t.max_concurrency, q.tenant_concurrency) AS max_concurrency_per_tenant,
       t.paused
FROM pgqueue.tenants t
LEFT JOIN pgqueue.queues q ON q.name = %(queue)s
CROSS JOIN LATERAL (
    SELECT count(*) AS total,
           count(*) FILTER (WHERE j.state = 'active') AS active,
           count(*) FILTER (WHERE j.state <> 'active' AND j.run_at > now()) AS delayed
    FROM pgqueue.jobs j
    WHERE j.tenant_id = t.id AND j.queue = %(queue)s
) c
LEFT JOIN pgqueue.tenant_finished f ON f.tenant_id = t.id
WHERE t.id = %(tenant_id)s;


-- name: api_tenants
-- Per tenant: sends in flight against its limit, pause state and finished counters
-- (the Prometheus endpoint and `pgqueue stats`). Never the auth token.
SELECT t.id, coalesce(b.n, 0) AS active,
       coalesce(t.max_concurrency, q.tenant_concurrency) AS max_concurrency,
       t.paused, t.pause_reason, coalesce(f.completed, 0) AS completed_total,
       coalesce(f.failed, 0) AS failed_total, coalesce(f.expired, 0) AS expired_total,
       t.updated_at
FROM pgqueue.tenants t
LEFT JOIN pgqueue.queues q ON q.name = %(queue)s
LEFT JOIN pgqueue.tenant_in_flight b ON b.tenant_id = t.id
LEFT JOIN pgqueue.tenant_finished f ON f.tenant_id = t.id
WHERE %(tenant_id)s::text IS NULL OR t.id = %(tenant_id)s
ORDER BY t.id;


-- name: api_queue_state
-- The queue's limits and coordination state: sends in flight, the rate limiter's
-- position (rate_tat ahead of now = starts already booked, or a provider's 429 pause),
-- live workers (a heartbeat within a minute) and the oldest due message still waiting.
SELECT q.name,
       (SELECT count(*) FROM pgqueue.jobs j WHERE j.queue = q.name AND j.state = 'active')
           AS in_flight,
       q.global_concurrency, q.tenant_concurrency,
       q.rate_per_second,
       greatest(extract(epoch FROM q.rate_tat - clock_timestamp()), 0)::float8
           AS rate_ahead_s,
       (SELECT count(*) FROM pgqueue.workers w
        WHERE w.queue = q.name AND w.heartbeat_at > now() - interval '1 minute') AS workers,
       (SELECT extract(epoch FROM clock_timestamp() - min(j.run_at))::float8
        FROM pgqueue.jobs j
        WHERE j.queue = q.name AND j.is_head AND j.state <> 'active'
          AND j.run_at <= now()) AS oldest_due_s
FROM pgqueue.queues q
WHERE q.name = %(queue)s;


-- name: api_recent_failures
-- Dead letters of the last hour by error code, read through the failed-jobs partial
-- index and capped at the newest 10,000, so a flood of failures cannot slow a scrape.
SELECT coalesce(f.last_error_code, 'unknown') AS code, count(*) AS n
FROM (SELECT h.last_error_code
      FROM pgqueue.job_history h
      WHERE h.queue = %(queue)s AND h.state = 'failed'
        AND h.finished_at > now() - interval '1 hour'
      ORDER BY h.finished_at DESC
      LIMIT 10000) f
GROUP BY 1
ORDER BY 1;


-- name: api_retrying_by_code
-- Live jobs waiting for a retry, by the error code of their last attempt.
SELECT j.last_error_code AS code, count(*) AS n
FROM pgqueue.jobs j
WHERE j.queue = %(queue)s AND j.state <> 'active' AND j.attempts > 0
  AND j.last_error_code IS NOT NULL
GROUP BY 1
ORDER BY 1;


-- name: api_tenant_credentials
-- What a direct send (queue disabled) and a status callback's signature check need.
-- The auth token leaves the database only for these two and never reaches a response.
SELECT t.id, t.account_sid, t.auth_token, t.whatsapp_from, t.fallback_content_sid,
       t.fallback_variable, t.paused, t.pause_reason
FROM pgqueue.tenants t
WHERE t.id = %(tenant_id)s;


-- name: api_tenants_by_account
-- Status callbacks posted without a tenant in the URL: the tenants that use the
-- callback's Twilio account (the signature then says which one sent it).
SELECT t.id, t.auth_token
FROM pgqueue.tenants t
WHERE t.account_sid = %(account_sid)s
ORDER BY t.id
LIMIT 50;


-- name: api_provider_status
-- A Twilio status callback for one of this tenant's messages. Callbacks arrive out of
-- order and may repeat, so the status only moves forward (pgqueue.provider_status_rank:
-- accepted/scheduled < queued < sending < sent < delivered < read; failed, undelivered
-- and canceled end it, but only while no delivery is recorded: one reported after
-- delivered or read moves nothing back and suppresses no number). A repeat or a late,
-- older status changes nothing. The error code of a failed delivery is kept. Only
-- finished jobs carry a SID (the completion that records it moves the job to history in
-- one transaction), found through history's provider_sid index. A SID found nowhere may
-- belong to a send whose completion has not committed yet: the status is held (`held`)
-- for apply_early_statuses, and a delivery held so counts as recorded.
WITH incoming AS (
    SELECT %(status)s::text AS status, pgqueue.provider_status_rank(%(status)s) AS rank
    WHERE pgqueue.provider_status_rank(%(status)s) > 0
), finished AS (
    UPDATE pgqueue.job_history h
    SET provider_status = i.status,
        last_error_code = CASE WHEN i.rank = pgqueue.failed_rank() THEN coalesce(%(error_code)s, h.last_error_code)
                               ELSE h.last_error_code END,
        event_tx = pgqueue.event_tx(h.event_tx)
    FROM incoming i
    WHERE h.provider_sid = %(sid)s AND h.tenant_id = %(tenant_id)s
      AND pgqueue.provider_status_rank(h.provider_status)
          < CASE WHEN i.rank = pgqueue.failed_rank() THEN pgqueue.delivered_rank() ELSE i.rank END
      AND NOT (i.rank = pgqueue.failed_rank() AND EXISTS (
          SELECT FROM pgqueue.early_statuses e
          WHERE e.tenant_id = %(tenant_id)s AND e.provider_sid = %(sid)s
            AND pgqueue.provider_status_rank(e.status) >= pgqueue.delivered_rank()
            AND pgqueue.provider_status_rank(e.status) < pgqueue.failed_rank()))
    RETURNING h.id, h.to_number, h.tenant_id, h.queue, h.attempts, h.provider_sid,
              h.provider_status, h.last_error_code, h.event_tx
), event AS (
    INSERT INTO pgqueue.events (tx, tenant_id, queue, job_id, kind, attempt, sid, code)
    SELECT event_tx, tenant_id, queue, id, pgqueue.status_event(provider_status), attempts,
           provider_sid, CASE WHEN pgqueue.status_event(provider_status) = 'failed'
                              THEN last_error_code END
    FROM finished WHERE pgqueue.status_event(provider_status) IS NOT NULL
), held AS (
    INSERT INTO pgqueue.early_statuses AS e (tenant_id, provider_sid, status, error_code)
    SELECT %(tenant_id)s, %(sid)s, i.status, CASE WHEN i.rank = pgqueue.failed_rank() THEN %(error_code)s END
    FROM incoming i
    WHERE NOT EXISTS (SELECT FROM pgqueue.job_history h
                      WHERE h.provider_sid = %(sid)s AND h.tenant_id = %(tenant_id)s)
    ON CONFLICT (tenant_id, provider_sid) DO UPDATE
    SET status = excluded.status, error_code = coalesce(excluded.error_code, e.error_code)
    WHERE pgqueue.provider_status_rank(e.status)
          < CASE WHEN pgqueue.provider_status_rank(excluded.status) = pgqueue.failed_rank()
                 THEN pgqueue.delivered_rank()
                 ELSE pgqueue.provider_status_rank(excluded.status) END
    RETURNING e.provider_sid
)
SELECT id, to_number, false AS held FROM finished
UNION ALL
SELECT NULL, NULL, true FROM held;


-- name: expired_at_provider
-- Twilio dropped a sent message because its ValidityPeriod ran out before delivery
-- (30036): it ends `expired`, as it would have here, and its tenant's totals move from
-- completed to expired.
WITH turned AS (
    UPDATE pgqueue.job_history h
    SET state = 'expired', event_tx = pgqueue.event_tx(h.event_tx)
    WHERE h.provider_sid = %(sid)s AND h.tenant_id = %(tenant_id)s AND h.state = 'completed'
    RETURNING h.id, h.tenant_id, h.queue, h.attempts, h.provider_sid, h.event_tx
), event AS (
    INSERT INTO pgqueue.events (tx, tenant_id, queue, job_id, kind, attempt, sid, code, message)
    SELECT event_tx, tenant_id, queue, id, 'expired', attempts, provider_sid, '30036',
           'its validity period ran out at the provider'
    FROM turned
)
INSERT INTO pgqueue.tenant_totals AS tt (tenant_id, shard, completed, expired)
SELECT tenant_id, pgqueue.counter_shard(), -count(*), count(*) FROM turned GROUP BY tenant_id
ON CONFLICT (tenant_id, shard) DO UPDATE
SET completed = tt.completed + excluded.completed, expired = tt.expired + excluded.expired;


-- name: apply_early_statuses
-- Maintenance: the held callbacks (api_provider_status) whose message has finished
-- meanwhile move its status forward, as a callback arriving then would have; they are
-- then forgotten, as are those no message claimed within %(max_age)s seconds (a SID
-- pgqueue never recorded: another system's message on the same account, or a send
-- whose worker died before its completion, which was sent again under a new SID).
WITH matched AS (
    SELECT e.tenant_id, e.provider_sid, e.status, e.error_code, h.id, h.finished_at
    FROM pgqueue.early_statuses e
    JOIN pgqueue.job_history h ON h.provider_sid = e.provider_sid AND h.tenant_id = e.tenant_id
), applied AS (
    UPDATE pgqueue.job_history h
    SET provider_status = m.status,
        last_error_code = CASE WHEN pgqueue.provider_status_rank(m.status)
                                    = pgqueue.failed_rank()
                               THEN coalesce(m.error_code, h.last_error_code)
                               ELSE h.last_error_code END,
        event_tx = pgqueue.event_tx(h.event_tx)
    FROM matched m
    WHERE h.id = m.id AND h.finished_at = m.finished_at
      AND pgqueue.provider_status_rank(h.provider_status)
          < CASE WHEN pgqueue.provider_status_rank(m.status) = pgqueue.failed_rank()
                 THEN pgqueue.delivered_rank()
                 ELSE pgqueue.provider_status_rank(m.status) END
    RETURNING h.id, h.tenant_id, h.to_number, h.provider_status, h.last_error_code,
              h.provider_sid AS sid, h.queue, h.attempts, h.event_tx
), event AS (
    INSERT INTO pgqueue.events (tx, tenant_id, queue, job_id, kind, attempt, sid, code)
    SELECT event_tx, tenant_id, queue, id, pgqueue.status_event(provider_status), attempts,
           sid, CASE WHEN pgqueue.status_event(provider_status) = 'failed'
                     THEN last_error_code END
    FROM applied WHERE pgqueue.status_event(provider_status) IS NOT NULL
), forgotten AS (
    DELETE FROM pgqueue.early_statuses e
    WHERE EXISTS (SELECT FROM matched m
                  WHERE m.tenant_id = e.tenant_id AND m.provider_sid = e.provider_sid)
       OR e.received_at < clock_timestamp() - make_interval(secs => %(max_age)s)
)
SELECT id, tenant_id, to_number, provider_status, last_error_code, sid FROM applied;


-- name: api_schema_version
-- The migration the database is at (readiness: it must be the code's head).
SELECT version_num FROM pgqueue.alembic_version;


-- name: api_workers
-- Registered workers of the queue, and whether their process still holds a connection
-- (the lock connection is named pgqueue-worker:<id>): `pgqueue doctor`.
SELECT w.id, w.hostname, w.pid, w.concurrency, w.started_at, w.heartbeat_at,
       EXISTS (SELECT 1 FROM pg_stat_activity a
               WHERE a.application_name = 'pgqueue-worker:' || w.id) AS connected
FROM pgqueue.workers w
WHERE w.queue = %(queue)s
ORDER BY w.started_at;


-- name: api_paused_tenants
-- Tenants whose jobs wait because an operator or a provider error paused them.
SELECT t.id, t.pause_reason, t.updated_at
FROM pgqueue.tenants t
WHERE t.paused
ORDER BY t.id;


-- name: api_suppressions
-- Numbers a tenant may not message any more (unsubscribed, blocked), newest first.
SELECT s.tenant_id, s.phone_number, s.reason_code, s.created_at
FROM pgqueue.suppressions s
WHERE %(tenant_id)s::text IS NULL OR s.tenant_id = %(tenant_id)s
ORDER BY s.created_at DESC, s.tenant_id, s.phone_number
LIMIT %(limit)s;


-- name: api_unsuppress
-- The customer opted in again: the number may be messaged by this tenant.
DELETE FROM pgqueue.suppressions
WHERE tenant_id = %(tenant_id)s AND phone_number = %(phone_number)s
RETURNING tenant_id, phone_number, reason_code;


-- name: api_tenant_for_token
-- The tenant of an API token (looked up by its sha256; revoked and expired tokens have
-- none), and for how many more seconds it is valid (NULL: until revoked), so that no
-- cache trusts it past its expiry. The last-use stamp is written at most once a minute
-- per token: a write on every request would make all requests with one token queue on
-- that row's lock and on a WAL flush.
WITH token AS (
    SELECT a.id, a.tenant_id, a.last_used_at, a.expires_at
    FROM pgqueue.api_tokens a
    WHERE a.token_hash = %(token_hash)s AND a.revoked_at IS NULL
      AND (a.expires_at IS NULL OR a.expires_at > now())
), touched AS (
    UPDATE pgqueue.api_tokens a SET last_used_at = now()
    FROM token t
    WHERE a.id = t.id AND (t.last_used_at IS NULL OR t.last_used_at < now() - interval '1 minute')
)
SELECT tenant_id, extract(epoch FROM expires_at - now())::float8 AS valid_s FROM token;


-- name: reslot
-- Claimed jobs missed their start slots (their worker's event loop was busy): they take
-- the next free slots instead of starting late and crowding the slots after them (G4),
-- one per job of %(tenants)s, returned in that order, paced like a claim (pgqueue.pace_free)
-- by the queue's rate and by the rate of each job's tenant where it has one, and, like a
-- claim, in order of the tenants' own slots, so that a tenant's second job, a tenant
-- spacing after its first, is not placed before another tenant's first. Runs after
-- lock_queue in the same transaction (queries.reslot), so that it reads the slots the
-- claims before it committed; then the tenants' rows are locked (the lock order above).
-- A missed slot of a tenant's own rate (%(missed)s: epoch s; NULL for a slot taken again
-- after a pause) that is still the tenant's last is taken back: nothing went out in it,
-- so the tenant's next start need only come a spacing after the one before it, and the
-- job starts as soon as it can (the margin from now) rather than a spacing after the
-- slot it missed. A 10/s sender's miss then costs the miss and this round trip, some
-- 40 ms, not 102. Where a later slot was handed out already (a fast sender), the job
-- goes after the tenant's last, as before.
WITH q AS (
    SELECT name, greatest(rate_floor, clock_timestamp()) AS base, rate_booked,
           clock_timestamp() AS now, 1.0 / (rate_per_second * %(headroom)s) AS spacing
    FROM pgqueue.queues WHERE name = %(queue)s
), w AS (
    SELECT i.tenant_id, i.ord,
           row_number() OVER (PARTITION BY i.tenant_id ORDER BY i.ord) AS k,
           CASE WHEN t.rate_per_second IS NULL THEN NULL
                -- The missed slot is still the tenant's last (to 5 µs: it came back
                -- through a float) and this job is the tenant's only one here; had a
                -- later slot been handed out, rate_tat would be two spacings past it.
                WHEN i.missed IS NOT NULL
                     AND count(*) OVER (PARTITION BY i.tenant_id) = 1
                     AND t.rate_tat <= to_timestamp(i.missed) + make_interval(
                                          secs => 1.0 / (t.rate_per_second * %(headroom)s)
                                                  + 5e-6)
                THEN greatest(to_timestamp(i.missed),
                              clock_timestamp() + make_interval(secs => %(margin)s))
                ELSE greatest(t.rate_tat, clock_timestamp() + make_interval(secs => %(margin)s))
           END AS rate_base,
           1.0 / (t.rate_per_second * %(headroom)s) AS rate_spacing
    FROM unnest(%(tenants)s::text[], %(missed)s::float8[]) WITH ORDINALITY
         AS i(tenant_id, missed, ord)
    LEFT JOIN pgqueue.tenants t ON t.id = i.tenant_id
), slotted AS (
    SELECT w.*, row_number() OVER (
                    ORDER BY w.rate_base + make_interval(secs => w.rate_spacing * (w.k - 1))
                             NULLS FIRST, w.ord) AS slot
    FROM w
), ordered AS (
    SELECT s.*, (lag(s.slot) OVER (PARTITION BY s.tenant_id ORDER BY s.slot))::int AS prev
    FROM slotted s
), paced AS (
    SELECT pgqueue.pace_free(q.base, q.spacing, q.rate_booked,
                             array_agg(o.prev ORDER BY o.slot),
                             array_agg(o.rate_base ORDER BY o.slot),
                             array_agg(o.rate_spacing ORDER BY o.slot)) AS starts,
           q.spacing, q.rate_booked, q.now
    FROM ordered o, q GROUP BY q.base, q.spacing, q.rate_booked, q.now
), queue_tat AS (
    UPDATE pgqueue.queues qq
    SET rate_tat = greatest(qq.rate_tat, (SELECT max(x) FROM unnest(p.starts) x)
                                         + make_interval(secs => p.spacing)),
        -- None left (a spacing under a microsecond rounds to none): empty, not NULL.
        rate_booked = (SELECT coalesce(array_agg(b ORDER BY b), '{}')
                       FROM (SELECT unnest(p.rate_booked) AS b
                             UNION ALL SELECT unnest(p.starts)) u
                       WHERE u.b > p.now - make_interval(secs => p.spacing))
    FROM paced p
    WHERE qq.name = %(queue)s
), tenant_tat AS (
    UPDATE pgqueue.tenants t
    SET rate_tat = s.last + make_interval(secs => s.rate_spacing)
    FROM (SELECT o.tenant_id, max(p.starts[o.slot]) AS last, min(o.rate_spacing) AS rate_spacing
          FROM ordered o, paced p WHERE o.rate_base IS NOT NULL GROUP BY o.tenant_id) s
    WHERE t.id = s.tenant_id
)
SELECT extract(epoch FROM p.starts[o.slot])::float8 AS start_at
FROM ordered o, paced p
ORDER BY o.ord;


-- === Dashboard ===

-- name: dashboard_throughput
-- Finished sends per 10-second bucket over the last 15 minutes (the chart), from the
-- (queue, finished_at) index, so the cost follows the window, not the history.
SELECT floor(extract(epoch FROM finished_at) / 10)::bigint * 10 AS bucket,
       count(*) FILTER (WHERE state = 'completed') AS completed,
       count(*) FILTER (WHERE state = 'failed') AS failed
FROM pgqueue.job_history
WHERE queue = %(queue)s AND finished_at > now() - interval '15 minutes'
GROUP BY 1
ORDER BY 1;


-- name: dashboard_failed
-- The newest dead letters with their provider codes, for the retry buttons.
SELECT id, tenant_id, to_number, last_error_code, last_error_message, attempts, finished_at
FROM pgqueue.job_history
WHERE queue = %(queue)s AND state = 'failed'
ORDER BY finished_at DESC
LIMIT %(limit)s;


-- name: dashboard_queue
-- Limits and the rate clock: a rate_tat ahead of now is the wait for the next send slot
-- (long after a 429).
SELECT global_concurrency, tenant_concurrency, rate_per_second,
       (SELECT count(*) FROM pgqueue.jobs j WHERE j.queue = %(queue)s AND j.state = 'active')
           AS active,
       extract(epoch FROM rate_tat - clock_timestamp())::float8 AS rate_wait,
       (SELECT count(*) FROM pgqueue.workers w WHERE w.queue = %(queue)s) AS workers
FROM pgqueue.queues WHERE name = %(queue)s;


-- name: apply_roles
-- `pgqueue roles`: the group roles' grants on this database (migration 0011), creating
-- the missing roles when asked (the caller needs CREATEROLE for that).
SELECT role, state FROM pgqueue.apply_roles(%(create)s);


-- name: role_members
-- The login roles that are members of each group role, for `pgqueue roles`.
SELECT g.rolname AS role,
       coalesce(array_agg(m.rolname ORDER BY m.rolname) FILTER (WHERE m.rolname IS NOT NULL),
                '{}') AS members
FROM pg_roles g
LEFT JOIN pg_auth_members am ON am.roleid = g.oid
LEFT JOIN pg_roles m ON m.oid = am.member
WHERE g.rolname = ANY(%(roles)s)
GROUP BY g.rolname;


-- name: take_maintenance_lead
-- One worker of all leads maintenance: the one whose lock connection holds this session
-- lock (it goes with the connection, so a dead leader's successor takes over).
SELECT pg_try_advisory_lock(%(key)s) AS ok;


-- name: ensure_history_partitions
-- History partitions for the next days (SECURITY DEFINER: the worker role may not CREATE).
SELECT pgqueue.ensure_history_partitions(%(days)s) AS n;


-- name: drop_history_partitions
-- History partitions older than the queue's retention.
SELECT pgqueue.drop_history_partitions(
           now() - make_interval(days => (SELECT retention_days FROM pgqueue.queues
                                          WHERE name = %(queue)s))) AS n;


-- name: admin_tenants
-- Tenants as operators see them, one (`id`) or all: never the auth token; sends in
-- flight and finished ones from the views that count and sum them.
SELECT t.id, t.name, t.account_sid, t.whatsapp_from, t.senders, t.max_concurrency,
       t.rate_per_second, t.paused, t.paused_until, t.pause_reason, t.fallback_content_sid,
       t.fallback_variable, coalesce(f.n, 0) AS active, t.last_served_at,
       coalesce(d.completed, 0) AS completed_total, coalesce(d.failed, 0) AS failed_total,
       t.webhook_url, w.delivered AS webhook_delivered, w.attempts AS webhook_attempts,
       w.next_attempt_at AS webhook_next_attempt_at, w.last_error AS webhook_last_error,
       t.created_at
FROM pgqueue.tenants t
LEFT JOIN pgqueue.tenant_in_flight f ON f.tenant_id = t.id
LEFT JOIN pgqueue.tenant_finished d ON d.tenant_id = t.id
LEFT JOIN pgqueue.webhook_state w ON w.tenant_id = t.id
WHERE %(id)s::text IS NULL OR t.id = %(id)s
ORDER BY t.id;


-- name: admin_add_tenant
-- A new tenant; no row back when the id is taken.
INSERT INTO pgqueue.tenants (id, name, account_sid, auth_token, whatsapp_from, senders,
                             max_concurrency, rate_per_second)
VALUES (%(id)s, %(name)s, %(account_sid)s, %(auth_token)s, %(whatsapp_from)s,
        %(senders)s, %(max_concurrency)s, %(rate_per_second)s)
ON CONFLICT (id) DO NOTHING
RETURNING id;


-- name: admin_set_tenant
-- Changes the columns named in %(set)s (others keep their values; a named column given
-- NULL goes back to its default: the queue's limit, no own rate, no fallback).
UPDATE pgqueue.tenants SET
    name = CASE WHEN 'name' = ANY(%(set)s) THEN %(name)s ELSE name END,
    account_sid = CASE WHEN 'account_sid' = ANY(%(set)s) THEN %(account_sid)s
                       ELSE account_sid END,
    auth_token = CASE WHEN 'auth_token' = ANY(%(set)s) THEN %(auth_token)s ELSE auth_token END,
    whatsapp_from = CASE WHEN 'whatsapp_from' = ANY(%(set)s) THEN %(whatsapp_from)s
                         ELSE whatsapp_from END,
    senders = CASE WHEN 'senders' = ANY(%(set)s) THEN %(senders)s::text[] ELSE senders END,
    max_concurrency = CASE WHEN 'max_concurrency' = ANY(%(set)s) THEN %(max_concurrency)s::int
                           ELSE max_concurrency END,
    rate_per_second = CASE WHEN 'rate_per_second' = ANY(%(set)s)
                           THEN %(rate_per_second)s::float8 ELSE rate_per_second END,
    fallback_content_sid = CASE WHEN 'fallback_content_sid' = ANY(%(set)s)
                                THEN %(fallback_content_sid)s ELSE fallback_content_sid END,
    fallback_variable = CASE WHEN 'fallback_variable' = ANY(%(set)s)
                             THEN %(fallback_variable)s ELSE fallback_variable END,
    paused = CASE WHEN 'paused' = ANY(%(set)s) THEN %(paused)s::boolean ELSE paused END,
    pause_reason = CASE WHEN 'paused' = ANY(%(set)s) THEN %(pause_reason)s
                        ELSE pause_reason END,
    webhook_url = CASE WHEN 'webhook_url' = ANY(%(set)s) THEN %(webhook_url)s ELSE webhook_url END,
    webhook_secret = CASE WHEN 'webhook_secret' = ANY(%(set)s) THEN %(webhook_secret)s
                          ELSE webhook_secret END,
    updated_at = now()
WHERE id = %(id)s
RETURNING id;


-- name: admin_webhook_start
-- A tenant's webhook cursor, made when its first URL is set: the endpoint gets the
-- events from then on, not the tenant's whole past.
INSERT INTO pgqueue.webhook_state (tenant_id, tx, event_id)
SELECT %(id)s, coalesce(e.tx, 0), coalesce(e.id, 0)
FROM (SELECT 1) one
LEFT JOIN LATERAL (SELECT tx, id FROM pgqueue.events
                   WHERE tenant_id = %(id)s AND tx < pgqueue.events_horizon()
                   ORDER BY tx DESC, id DESC LIMIT 1) e ON true
ON CONFLICT (tenant_id) DO NOTHING;


-- name: notify_all_queues
-- Wakes every queue's workers (a tenant resumed: its jobs are claimable again).
SELECT pg_notify(pgqueue.channel(name), '') FROM pgqueue.queues;


-- name: admin_create_token
-- A tenant's API token: only its hash and its first 12 characters are stored.
INSERT INTO pgqueue.api_tokens (tenant_id, token_hash, prefix, expires_at)
VALUES (%(tenant_id)s, %(token_hash)s, %(prefix)s,
        now() + make_interval(days => %(expires_in_days)s));


-- name: admin_tokens
-- API tokens as `token list` shows them (never the hash), of one tenant or all, or those
-- one reference names: its id, its prefix or its hash.
SELECT id, prefix, tenant_id, created_at, expires_at, last_used_at, revoked_at,
       CASE WHEN revoked_at IS NOT NULL THEN 'revoked'
            WHEN expires_at <= now() THEN 'expired' ELSE 'active' END AS state
FROM pgqueue.api_tokens
WHERE (%(tenant)s::text IS NULL OR tenant_id = %(tenant)s)
  AND (%(id)s::bigint IS NULL OR id = %(id)s)
  AND (%(prefix)s::text IS NULL OR prefix = %(prefix)s)
  AND (%(token_hash)s::text IS NULL OR token_hash = %(token_hash)s)
ORDER BY tenant_id, id;


-- name: admin_revoke_token
-- Revokes a token at once; one revoked already keeps its moment.
UPDATE pgqueue.api_tokens SET revoked_at = coalesce(revoked_at, now())
WHERE id = %(id)s
RETURNING id, prefix, tenant_id, revoked_at;


-- name: admin_lock_auth_tokens
-- Every tenant's stored auth token and webhook secret, rows locked for `tenant rotate-key`.
SELECT id, auth_token, webhook_secret FROM pgqueue.tenants ORDER BY id FOR NO KEY UPDATE;


-- name: admin_store_auth_token
UPDATE pgqueue.tenants
SET auth_token = %(auth_token)s, webhook_secret = %(webhook_secret)s, updated_at = now()
WHERE id = %(id)s;


-- name: admin_queue
-- A queue's limits, with its sends in flight.
SELECT name, global_concurrency, tenant_concurrency, rate_per_second, retention_days,
       message_type_priorities, message_type_ttls,
       (SELECT count(*) FROM pgqueue.jobs j
        WHERE j.queue = queues.name AND j.state = 'active')::int AS active
FROM pgqueue.queues WHERE name = %(queue)s;


-- name: admin_set_queue
-- Changes the limits given (NULL: unchanged).
UPDATE pgqueue.queues SET
    global_concurrency = coalesce(%(global_concurrency)s::int, global_concurrency),
    tenant_concurrency = coalesce(%(tenant_concurrency)s::int, tenant_concurrency),
    rate_per_second = coalesce(%(rate_per_second)s::float8, rate_per_second),
    retention_days = coalesce(%(retention_days)s::int, retention_days),
    message_type_priorities = coalesce(%(message_type_priorities)s::jsonb,
                                       message_type_priorities),
    message_type_ttls = CASE WHEN %(message_type_ttls)s::jsonb IS NULL THEN message_type_ttls
                             ELSE jsonb_strip_nulls(message_type_ttls
                                                    || %(message_type_ttls)s::jsonb) END,
    updated_at = now()
WHERE name = %(queue)s;


-- name: server_version
SELECT current_setting('server_version') AS v;


-- name: backend_pid
-- The server session serving this connection (a pooler may hand it to others between
-- transactions: db.shares_sessions).
SELECT pg_backend_pid() AS pid;


-- name: node_role
-- What this node is: a primary (and the standbys streaming from it, the synchronous
-- ones among them) or a standby in recovery (and its WAL receiver's state). Without
-- pg_monitor, pg_stat_replication shows the rows but not every column: counts suffice.
SELECT pg_is_in_recovery() AS standby,
       (SELECT count(*) FROM pg_stat_replication)::int AS standbys,
       (SELECT count(*) FROM pg_stat_replication
        WHERE sync_state IN ('sync', 'quorum'))::int AS synchronous,
       (SELECT status FROM pg_stat_wal_receiver LIMIT 1) AS receiving;


-- name: demo_verdict
-- The demo's verdict on the sends it made through the sandbox: lost, FIFO, limits, rate.
WITH sends AS (
    SELECT s.job_id, s.tenant_id, s.started_at, s.created_at AS ended_at, h.conversation, h.seq
    FROM pgqueue.sandbox_messages s
    JOIN pgqueue.job_history h ON h.id = s.job_id AND h.state = 'completed'
    WHERE s.job_id = ANY(%(ids)s)
), edges AS (
    SELECT tenant_id, started_at AS t, 1 AS d FROM sends
    UNION ALL SELECT tenant_id, ended_at, -1 FROM sends
), running AS (
    SELECT tenant_id, sum(d) OVER (PARTITION BY tenant_id ORDER BY t, d
                                   ROWS UNBOUNDED PRECEDING) AS n_tenant,
           sum(d) OVER (ORDER BY t, d ROWS UNBOUNDED PRECEDING) AS n_global
    FROM edges
), fifo AS (
    SELECT count(*) FILTER (WHERE seq < prev_seq OR started_at < prev_end) AS violations
    FROM (SELECT seq, started_at,
                 lag(seq) OVER w AS prev_seq, lag(ended_at) OVER w AS prev_end
          FROM sends WINDOW w AS (PARTITION BY conversation ORDER BY started_at)) x
), windows AS (
    SELECT (SELECT count(*) FROM sends b
            WHERE b.started_at >= a.started_at
              AND b.started_at < a.started_at + interval '1 second') AS n
    FROM sends a
)
SELECT
  (SELECT count(*) FROM sends) AS delivered,
  (SELECT violations FROM fifo) AS fifo_violations,
  (SELECT coalesce(max(n_tenant), 0) FROM running) AS max_tenant,
  (SELECT coalesce(max(n_global), 0) FROM running) AS max_global,
  (SELECT coalesce(max(n), 0) FROM windows) AS max_per_second,
  (SELECT count(*) FROM pgqueue.job_history
   WHERE id = ANY(%(ids)s) AND state = 'completed' AND attempts > 1) AS retried,
  (SELECT count(*) FROM pgqueue.job_history WHERE id = ANY(%(ids)s)) AS finished,
  (SELECT count(*) FROM pgqueue.jobs WHERE id = ANY(%(ids)s)) AS unfinished,
  (SELECT string_agg(DISTINCT last_error_code, ',') FROM pgqueue.job_history
   WHERE id = ANY(%(ids)s) AND state = 'failed') AS dead_codes;


-- name: demo_sends_last_second
SELECT count(*) AS n FROM pgqueue.sandbox_messages
WHERE started_at > clock_timestamp() - interval '1 second';


-- name: demo_jobs_live
-- How many of these jobs are still live (not yet finished).
SELECT count(*) AS n FROM pgqueue.jobs WHERE id = ANY(%(ids)s);


-- =====================================================================================
-- === Events ===
-- The feed of a tenant's delivery events (GET /api/events, the webhooks). A cursor is
-- (tx, id), the feed's order (pgqueue/schema.py events).
-- =====================================================================================


-- name: events_after
-- A tenant's events after a cursor, in feed order, through events_feed: only those below
-- pgqueue.events_horizon(), i.e. of transactions that have all ended, so an event that
-- commits later can never sort before what this read hands out (gapless).
SELECT e.id, e.tx, e.at, e.job_id, e.kind, e.attempt, e.sid, e.code, e.message, e.run_at
FROM pgqueue.events e
WHERE e.tenant_id = %(tenant_id)s AND (e.tx, e.id) > (%(tx)s::bigint, %(id)s::bigint)
  AND e.tx < pgqueue.events_horizon()
ORDER BY e.tx, e.id
LIMIT %(limit)s;


-- name: job_events
-- One message's events, oldest first (jobs show), through events_job.
SELECT e.id, e.tx, e.at, e.job_id, e.kind, e.attempt, e.sid, e.code, e.message, e.run_at
FROM pgqueue.events e
WHERE e.job_id = %(job_id)s AND (%(tenant_id)s::text IS NULL OR e.tenant_id = %(tenant_id)s)
ORDER BY e.tx, e.id;


-- name: webhook_take
-- Up to %(limit)s tenants whose endpoint is due and has events waiting, leased to this
-- worker for %(lease)s seconds: one delivery per tenant at a time, so its events arrive
-- in feed order. A lease that ran out (its worker died) is taken over.
WITH due AS (
    SELECT w.tenant_id
    FROM pgqueue.webhook_state w
    JOIN pgqueue.tenants t ON t.id = w.tenant_id
    WHERE t.webhook_url IS NOT NULL AND w.next_attempt_at <= clock_timestamp()
      AND (w.lease_until IS NULL OR w.lease_until < clock_timestamp())
      AND EXISTS (SELECT 1 FROM pgqueue.events e
                  WHERE e.tenant_id = w.tenant_id AND (e.tx, e.id) > (w.tx, w.event_id)
                    AND e.tx < pgqueue.events_horizon())
    ORDER BY w.next_attempt_at
    LIMIT %(limit)s
    FOR UPDATE OF w SKIP LOCKED
)
UPDATE pgqueue.webhook_state w
SET leased_by = %(worker_id)s, lease_until = clock_timestamp() + make_interval(secs => %(lease)s)
FROM due, pgqueue.tenants t
WHERE w.tenant_id = due.tenant_id AND t.id = w.tenant_id
RETURNING w.tenant_id, w.tx, w.event_id, w.attempts, t.webhook_url, t.webhook_secret;


-- name: webhook_done
-- The leased batch was acknowledged (or, %(dead)s, given up on and kept as a dead
-- letter with its events): the cursor moves past it and the lease ends. Nothing changes
-- when the lease is no longer ours.
WITH state AS (
    UPDATE pgqueue.webhook_state w
    SET tx = %(tx)s, event_id = %(id)s, attempts = 0, next_attempt_at = clock_timestamp(),
        leased_by = NULL, lease_until = NULL,
        last_error = CASE WHEN %(dead)s THEN %(error)s END,
        delivered = w.delivered + CASE WHEN %(dead)s THEN 0 ELSE %(n)s END,
        updated_at = clock_timestamp()
    WHERE w.tenant_id = %(tenant_id)s AND w.leased_by = %(worker_id)s
    RETURNING w.tenant_id
)
INSERT INTO pgqueue.webhook_dead_letters (tenant_id, events, attempts, last_error)
SELECT tenant_id, %(events)s::jsonb, %(attempts)s, %(error)s FROM state WHERE %(dead)s;


-- name: webhook_failed
-- The endpoint refused or did not answer: the same batch is tried again after %(delay)s s.
UPDATE pgqueue.webhook_state w
SET attempts = w.attempts + 1,
    next_attempt_at = clock_timestamp() + make_interval(secs => %(delay)s),
    leased_by = NULL, lease_until = NULL, last_error = %(error)s,
    updated_at = clock_timestamp()
WHERE w.tenant_id = %(tenant_id)s AND w.leased_by = %(worker_id)s;


-- name: webhook_release
-- A worker that stops hands back its leases: the batches it was posting go to the next
-- worker now instead of when the leases would have run out (at least once either way).
UPDATE pgqueue.webhook_state
SET leased_by = NULL, lease_until = NULL, updated_at = clock_timestamp()
WHERE leased_by = %(worker_id)s;


-- name: webhook_dead_letters
-- Batches a tenant's endpoint kept refusing, newest first.
SELECT d.id, d.tenant_id, d.events, d.attempts, d.last_error, d.failed_at
FROM pgqueue.webhook_dead_letters d
WHERE %(tenant_id)s::text IS NULL OR d.tenant_id = %(tenant_id)s
ORDER BY d.id DESC
LIMIT %(limit)s;


-- name: api_webhooks
-- Each tenant with a webhook: events acknowledged, dead letters, refusals in a row.
SELECT w.tenant_id, w.delivered, w.attempts,
       (SELECT count(*) FROM pgqueue.webhook_dead_letters d
        WHERE d.tenant_id = w.tenant_id) AS dead
FROM pgqueue.webhook_state w
JOIN pgqueue.tenants t ON t.id = w.tenant_id
WHERE t.webhook_url IS NOT NULL AND (%(tenant_id)s::text IS NULL OR w.tenant_id = %(tenant_id)s)
ORDER BY w.tenant_id;


-- name: webhook_target
-- Where and with what secret a tenant's events are posted.
SELECT id, webhook_url, webhook_secret FROM pgqueue.tenants WHERE id = %(tenant_id)s;
