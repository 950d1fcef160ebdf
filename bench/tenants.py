"""What one claim costs the server as the number of registered tenants grows.

    .venv/bin/python bench/tenants.py [--database-url URL] [--tenants 10,1000,10000,100000]
        [--runs 3] [--samples 200] [--budget 30] [--quick] [--explain]

A claim of 20 jobs is the statements `lock_queue` then `claim_jobs` of queries.sql,
whatever they are in the tree (and `pace_claimed` after them, where the tree splits the
claim in two), sent as the dispatcher sends them: one connection, prepared statements,
generic plans. The queue's limits are lifted (global and tenant concurrency 100,000,
1e9 sends/s) so that only the shape of the data costs. For every number of registered
tenants R there are two backlogs: (a) 10 tenants have work, 10,000 jobs between them;
(b) every tenant has work, 10 jobs each, or 2 each above 10,000 tenants (200,000 jobs at
100,000). Jobs sit 2 to a conversation, all waiting and due.

Each backlog is written by set-based INSERTs, 1,000 tenants a transaction, into a
scratch database copied from one migrated to the tree's head: plain INSERTs, so any
trigger on the tables fires. It is checked against the schema's invariants (one head
per conversation, the first; pending counts), then VACUUM ANALYZEd. Autovacuum is off
in the scratch databases, so every run plans its claims on those statistics, after a
VACUUM that clears the dead rows of the previous run's claims. A timed claim is BEGIN,
the claim's statements, ROLLBACK, each a round trip timed by the client; then
pg_advisory_unlock_all(), as the conversations' advisory locks are session level and
outlive the rollback. The rollback keeps the data as it was, so every claim of a
backlog claims the same 20 jobs.

Per backlog and run: up to 10 warm-up claims, then up to --samples timed ones for p50
and p99, each phase stopping early after --budget seconds (a claim that reads every
tenant takes over a second at 100,000). With --runs N the backlogs take turns within
each run, and the table shows the median over the runs of p50 and p99, and p50 over the
base's (10 registered, 10 with work); the issue's target is at most 1.5x for every row.
A second table splits p50 by statement. --quick: 10 and 1,000 tenants, 1,000 jobs in
(a), 30 claims. --explain prints EXPLAIN (ANALYZE, BUFFERS) of claim_jobs' generic plan
for the largest backlog and for the slowest. Scratch databases are dropped at the end,
also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import cache
from typing import Any, NoReturn

import psycopg
from _common import (
    cpu_busy,
    fmt_number,
    fmt_ratio,
    median,
    percentile,
    progress,
    ratio,
    redact,
    render_table,
    scratch_database,
    server_facts,
    server_url,
)
from psycopg import sql

from pgqueue import migrate, queries

QUEUE = "whatsapp-send"
CLAIM = 20
PER_CONVERSATION = 2
BASE_TENANTS = 10
TARGET_RATIO = 1.5
TEMPLATE_DB = "bench_tenants_template"
WORKER_ID = "bench-tenants"


@dataclass(frozen=True)
class Sizes:
    """What --quick shrinks: the few-tenants backlog and the claims per measurement.

    A measurement is `warmup` claims, then `samples` timed ones, each phase cut short
    once it has run `budget_s` seconds (after at least MIN_WARMUP / MIN_SAMPLES claims):
    a claim that takes a second would otherwise make one row cost minutes."""

    few_jobs: int = 10_000
    samples: int = 200
    warmup: int = 10
    budget_s: float = 30.0


FULL = Sizes()
QUICK = Sizes(few_jobs=1_000, samples=30, warmup=3, budget_s=5.0)
# The first claim parses and plans the statements; the second runs on warm caches.
MIN_WARMUP = 2
# Fewer, and p99 is the maximum of a handful.
MIN_SAMPLES = 20


@dataclass(frozen=True)
class Backlog:
    registered: int
    with_work: int
    per_tenant: int
    # Every registered tenant has work (else only BASE_TENANTS of them), which at 10
    # registered tenants is not told by the counts alone.
    every: bool

    @property
    def jobs(self) -> int:
        return self.with_work * self.per_tenant

    @property
    def conversations_per_tenant(self) -> int:
        return self.per_tenant // PER_CONVERSATION

    @property
    def heads(self) -> int:
        return self.with_work * self.conversations_per_tenant

    @property
    def dbname(self) -> str:
        return f"bench_tenants_{self.registered}_{'all' if self.every else 'few'}"

    @property
    def is_base(self) -> bool:
        return self.registered == BASE_TENANTS and not self.every


def backlogs(registered: Sequence[int], sizes: Sizes) -> list[Backlog]:
    out = []
    for r in registered:
        out.append(Backlog(r, BASE_TENANTS, sizes.few_jobs // BASE_TENANTS, every=False))
        # 10 jobs each would be a million at 100,000 tenants: 2 each keeps the load (and
        # the run) bounded while every tenant still has a head.
        out.append(Backlog(r, r, 10 if r <= 10_000 else 2, every=True))
    return out


# -- data --------------------------------------------------------------------------------

# Tenants with work per transaction: a trigger may take a lock per tenant a statement
# touches (the ready-tenants trigger did once, and ran out the server's lock table, a
# few thousand entries, at 100,000 tenants). An enqueue batch holds at most
# pgqueue.enqueue.MAX_BATCH messages, so it never touches more tenants than this.
CHUNK_TENANTS = 1_000

TENANTS_SQL = """
INSERT INTO pgqueue.tenants (id, name, account_sid, auth_token, whatsapp_from)
SELECT 'tenant-' || lpad(i::text, 6, '0'), 'Restaurant ' || i,
       'AC' || lpad(to_hex(i), 32, '0'), 'bench-auth-token', '+1415' || (2000000 + i)
FROM generate_series(0, %(registered)s::int - 1) i
"""

# The tenants with work are spread over the registered ones (every step-th id), so they
# are not all at one end of the tenants' primary key.
WORK = """
SELECT 'tenant-' || lpad((w * %(step)s)::text, 6, '0') AS tenant_id,
       '+1415555' || lpad((1000 + c)::text, 4, '0') AS phone, w, c, k
FROM generate_series(%(first)s::int, %(last)s::int) w,
     generate_series(0, %(conversations)s::int - 1) c,
     generate_series(1, %(per_conversation)s::int) k
"""

CONVERSATIONS_SQL = f"""
INSERT INTO pgqueue.conversations (queue, conversation, pending)
SELECT %(queue)s, tenant_id || ':' || phone, count(*)
FROM ({WORK}) work
GROUP BY tenant_id, phone
ORDER BY 2
"""

# Conversation rows first, then jobs, as enqueue writes them. Inserted in the order many
# restaurants would send (consecutive jobs in different conversations) within each
# chunk of tenants, which is the order of `seq`: the first job of each conversation is
# its head.
JOBS_SQL = f"""
INSERT INTO pgqueue.jobs (queue, tenant_id, conversation, is_head, state, priority, run_at,
                          to_number, body, message_type, max_attempts)
SELECT %(queue)s, tenant_id, tenant_id || ':' || phone, k = 1, 'waiting', 0,
       now() - interval '1 minute', phone,
       'Hola! Your order #' || w || '-' || c || '-' || k || ' is ready for pickup.',
       'notification', 4
FROM ({WORK}) work
ORDER BY k, c, w
"""

LIFT_LIMITS_SQL = """
UPDATE pgqueue.queues
SET global_concurrency = 100000, tenant_concurrency = 100000, rate_per_second = 1e9,
    rate_tat = now()
WHERE name = %(queue)s
"""

# Whatever maintains the tables (this script or a trigger), the claim must see the
# invariants enqueue and promotion keep: else the figure measures another queue.
CHECK_SQL = """
SELECT (SELECT count(*) FROM pgqueue.tenants) AS tenants,
       (SELECT count(*) FROM pgqueue.jobs WHERE state = 'waiting' AND run_at <= now()) AS due,
       (SELECT count(*) FROM (
            SELECT is_head, row_number() OVER (PARTITION BY queue, conversation
                                                ORDER BY seq) AS position
            FROM pgqueue.jobs) j
        WHERE is_head <> (position = 1)) AS wrong_heads,
       (SELECT count(*) FROM pgqueue.conversations c
        FULL JOIN (SELECT queue, conversation, count(*) AS n FROM pgqueue.jobs
                   GROUP BY queue, conversation) j USING (queue, conversation)
        WHERE c.pending IS DISTINCT FROM j.n) AS wrong_pending
"""


def load(url: str, backlog: Backlog) -> float:
    """Writes the backlog into the migrated database at `url`; returns the seconds it took."""
    params = {
        "queue": QUEUE,
        "registered": backlog.registered,
        "with_work": backlog.with_work,
        "step": backlog.registered // backlog.with_work,
        "conversations": backlog.conversations_per_tenant,
        "per_conversation": PER_CONVERSATION,
    }
    t0 = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(queries.sql("ensure_queue"), params)
        conn.execute(LIFT_LIMITS_SQL, params)
        conn.execute(TENANTS_SQL, params)
        conn.execute("ANALYZE")
        for chunk, first in enumerate(range(0, backlog.with_work, CHUNK_TENANTS), start=1):
            last = min(first + CHUNK_TENANTS, backlog.with_work) - 1
            with conn.transaction():
                conn.execute(CONVERSATIONS_SQL, {**params, "first": first, "last": last})
                conn.execute(JOBS_SQL, {**params, "first": first, "last": last})
            # Statistics that follow the tables' growth within a factor of 2, as
            # autovacuum's would: a trigger planned for the empty tables of the template
            # (a scan per inserted row) made 100 chunks take minutes instead of seconds.
            if chunk & (chunk - 1) == 0:
                conn.execute("ANALYZE")
        row = conn.execute(CHECK_SQL).fetchone()
        if row is None or row != (backlog.registered, backlog.jobs, 0, 0):
            raise RuntimeError(
                f"{backlog.dbname}: tenants, due jobs, wrong heads, wrong pending counts = "
                f"{row}, expected {(backlog.registered, backlog.jobs, 0, 0)}"
            )
        # VACUUM as well: it sets the visibility map, which index-only scans rely on, as
        # autovacuum would have on a settled table.
        conn.execute("VACUUM ANALYZE")
    return time.perf_counter() - t0


# Autovacuum counts rolled-back claims as changes: it would ANALYZE the tables in the
# middle of a row's claims, a later connection would then plan the claim on other figures
# (seen: another plan, 3x faster, at 1,000 tenants), and each row's result would depend
# on when it fired. Statistics are the ones taken after loading, for every run.
NO_AUTOVACUUM_SQL = """
SELECT format('ALTER TABLE %I.%I SET (autovacuum_enabled = false)', n.nspname, c.relname)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'pgqueue' AND c.relkind = 'r'
"""


def freeze_statistics(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for (statement,) in conn.execute(NO_AUTOVACUUM_SQL).fetchall():
            conn.execute(statement)


def settle(url: str) -> None:
    """Dead row versions of earlier claims gone, statistics left as they are."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM")


# -- measurement -------------------------------------------------------------------------


def connect(url: str) -> psycopg.Connection[Any]:
    # As the dispatcher's lock connection, which sends the claims: generic plans.
    conn = psycopg.connect(url, autocommit=True, application_name="pgqueue-worker:bench-tenants")
    conn.execute("SET plan_cache_mode = force_generic_plan")
    return conn


def rollback(conn: psycopg.Connection[Any]) -> None:
    """ROLLBACK behind psycopg's back. psycopg answers every ROLLBACK it sees with
    DEALLOCATE ALL (a rolled-back DDL could leave its statements stale; none runs here),
    so each claim would be parsed and planned again: the dispatcher, which commits,
    plans its claim once per connection."""
    result = conn.pgconn.exec_(b"ROLLBACK")
    if result.status != psycopg.pq.ExecStatus.COMMAND_OK:
        raise psycopg.OperationalError(f"ROLLBACK failed: {conn.pgconn.error_message!r}")


def claim_statements() -> list[str]:
    """The statements of one claim, as the tree's queries.sql has them."""
    names = ["lock_queue", "claim_jobs"]
    # A claim split in two, claim_jobs taking the jobs and pace_claimed giving them their
    # rate slots (and returning them), is timed whole: the dispatcher sends both.
    if "pace_claimed" in queries.statements():
        names.append("pace_claimed")
    return names


@cache
def claim_params() -> dict[str, Any]:
    """The parameters of the claim's statements, as queries._turn gives them."""
    params: dict[str, Any] = {
        "queue": QUEUE,
        "worker_id": WORKER_ID,
        "max_jobs": CLAIM,
        "lease": 60.0,
        "lookahead": 0.05,
        "headroom": queries.RATE_HEADROOM,
        # The worker's own sends answered and not yet written: none here (a tree whose
        # claim has no such parameter ignores it).
        "answered": [],
    }
    # Where the tree's claim keeps its first rate slot this far ahead of now.
    margin = getattr(queries, "SLOT_MARGIN_S", None)
    if margin is not None:
        params["margin"] = margin
    # Said before any backlog is built, rather than as psycopg's error minutes later.
    for name in claim_statements():
        missing = set(_param_order(queries.sql(name))) - params.keys()
        if missing:
            raise RuntimeError(
                f"{name} takes {', '.join(sorted(missing))}, which this benchmark does not "
                "give: see queries._turn and add it to claim_params()"
            )
    return params


CLAIMED_SQL = "SELECT count(*) FROM pgqueue.jobs WHERE state = 'active' AND claimed_by = %s"


@dataclass(frozen=True)
class Sample:
    """One claim: client-side ms from BEGIN to ROLLBACK, and of each claim statement."""

    total_ms: float
    statement_ms: dict[str, float]
    claimed: int


def claim_once(conn: psycopg.Connection[Any]) -> Sample:
    """One claim, rolled back. The jobs are counted in the database, so that what a claim
    statement returns does not matter; that count is left out of the time."""
    steps: dict[str, float] = {}
    t0 = time.perf_counter()
    conn.execute("BEGIN")
    try:
        for name in claim_statements():
            s0 = time.perf_counter()
            cur = conn.execute(queries.sql(name), claim_params(), prepare=True)
            if cur.description is not None:
                cur.fetchall()
            steps[name] = (time.perf_counter() - s0) * 1000
        t1 = time.perf_counter()
        row = conn.execute(CLAIMED_SQL, (WORKER_ID,)).fetchone()
    finally:
        t2 = time.perf_counter()
        rollback(conn)
    total = (t1 - t0 + time.perf_counter() - t2) * 1000
    conn.execute("SELECT pg_advisory_unlock_all()")
    return Sample(total, steps, int(row[0]) if row else 0)


def measure(url: str, backlog: Backlog, sizes: Sizes) -> list[Sample]:
    """The timed claims of one run (see Sizes for how many)."""
    expected = min(CLAIM, backlog.heads)
    settle(url)

    def claims(conn: psycopg.Connection[Any], most: int, least: int) -> list[Sample]:
        samples: list[Sample] = []
        start = time.monotonic()
        while len(samples) < most and (
            len(samples) < least or time.monotonic() - start < sizes.budget_s
        ):
            sample = claim_once(conn)
            if sample.claimed != expected:
                raise RuntimeError(
                    f"{backlog.dbname}: claimed {sample.claimed} jobs, expected {expected}: "
                    "the limits are not lifted or the backlog is not claimable"
                )
            samples.append(sample)
        return samples

    with connect(url) as conn:
        claims(conn, sizes.warmup, min(MIN_WARMUP, sizes.warmup))
        return claims(conn, sizes.samples, min(MIN_SAMPLES, sizes.samples))


def explain(url: str) -> str:
    """EXPLAIN (ANALYZE, BUFFERS) of claim_jobs as the dispatcher runs it: the generic
    plan of its prepared statement, after lock_queue, rolled back; planned as a run's
    claims are, on a fresh connection after `settle`."""
    settle(url)
    with connect(url) as conn:
        # Prepare the claim through psycopg, as the benchmark does, then execute that very
        # statement under EXPLAIN: same text, same parameter types, same generic plan.
        claim_once(conn)
        names = conn.execute(
            "SELECT name, cardinality(parameter_types) FROM pg_prepared_statements"
            " WHERE statement = %s",
            (_as_prepared(queries.sql("claim_jobs")),),
        ).fetchall()
        if len(names) != 1:
            raise RuntimeError("the prepared claim_jobs was not found in pg_prepared_statements")
        name, n_params = names[0]
        values = [claim_params()[p] for p in _param_order(queries.sql("claim_jobs"))]
        if n_params != len(values):
            raise RuntimeError(f"claim_jobs takes {n_params} parameters, expected {len(values)}")
        query = sql.SQL("EXPLAIN (ANALYZE, BUFFERS) EXECUTE {}({})").format(
            sql.Identifier(name), sql.SQL(", ").join(sql.Literal(v) for v in values)
        )
        conn.execute("BEGIN")
        try:
            conn.execute(queries.sql("lock_queue"), claim_params())
            plan = [str(r[0]) for r in conn.execute(query).fetchall()]
        finally:
            rollback(conn)
        conn.execute("SELECT pg_advisory_unlock_all()")
    return "\n".join(plan)


_PLACEHOLDER = re.compile(r"%%|%\((\w+)\)s")


def _param_order(text: str) -> list[str]:
    """Named parameters in psycopg's order: $1 is the first one to appear, and so on."""
    return list(dict.fromkeys(m.group(1) for m in _PLACEHOLDER.finditer(text) if m.group(1)))


def _as_prepared(text: str) -> str:
    """The statement text psycopg sends to the server for `text`."""
    order = {name: i for i, name in enumerate(_param_order(text), start=1)}

    def sub(m: re.Match[str]) -> str:
        return "%" if m.group(1) is None else f"${order[m.group(1)]}"

    return _PLACEHOLDER.sub(sub, text)


# -- report ------------------------------------------------------------------------------


@dataclass
class Figures:
    p50_ms: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)
    claims: list[int] = field(default_factory=list)
    # Each run's p50 of each claim statement, by name.
    statement_p50_ms: dict[str, list[float]] = field(default_factory=dict)

    def add(self, samples: Sequence[Sample]) -> None:
        self.p50_ms.append(percentile([s.total_ms for s in samples], 50))
        self.p99_ms.append(percentile([s.total_ms for s in samples], 99))
        self.claims.append(len(samples))
        for name in samples[0].statement_ms:
            p50 = percentile([s.statement_ms[name] for s in samples], 50)
            self.statement_p50_ms.setdefault(name, []).append(p50)


def report(items: Sequence[Backlog], figs: dict[Backlog, Figures]) -> str:
    base = next((b for b in items if b.is_base), None)
    base_p50 = median(figs[base].p50_ms) if base is not None else None
    headers = [
        "tenants registered",
        "with work",
        "jobs",
        "claim p50 ms",
        "claim p99 ms",
        "p50 / base",
        "claims per run",
    ]
    rows = []
    for b in items:
        p50 = median(figs[b].p50_ms)
        r = ratio(p50, base_p50)
        verdict = "" if b.is_base else (" ok" if r <= TARGET_RATIO else " MISSED")
        rows.append(
            [
                fmt_number(b.registered),
                fmt_number(b.with_work) + (" (all)" if b.every else ""),
                fmt_number(b.jobs) + (f" ({b.per_tenant} each)" if b.every else ""),
                fmt_number(p50, 2),
                fmt_number(median(figs[b].p99_ms), 2),
                "base" if b.is_base else fmt_ratio(r) + verdict,
                fmt_number(min(figs[b].claims)),
            ]
        )
    return render_table(headers, rows)


def statements_table(items: Sequence[Backlog], figs: dict[Backlog, Figures]) -> str:
    """Where the claim's time goes: p50 of each statement (round trip included)."""
    names = claim_statements()
    rows = [
        [
            fmt_number(b.registered),
            "all" if b.every else fmt_number(b.with_work),
            *(fmt_number(median(figs[b].statement_p50_ms.get(n, [])), 2) for n in names),
        ]
        for b in items
    ]
    return render_table(["tenants registered", "with work", *(f"{n} p50 ms" for n in names)], rows)


# -- main --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--database-url", help="any database of the server to measure on")
    p.add_argument(
        "--tenants",
        default=None,
        help="registered tenant counts, comma-separated (default 10,1000,10000,100000;"
        " 10,1000 with --quick); 10, the base, is always measured",
    )
    p.add_argument("--runs", type=int, default=None, help="default 3 (1 with --quick)")
    p.add_argument("--samples", type=int, default=None, help="claims timed per run (200)")
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds after which a row's warm-up or timed claims stop early (30)",
    )
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    p.add_argument(
        "--explain",
        action="store_true",
        help="EXPLAIN the claim of the largest backlog and of the slowest",
    )
    args = p.parse_args(argv)
    default = "10,1000" if args.quick else "10,1000,10000,100000"
    try:
        counts = sorted({int(x) for x in (args.tenants or default).split(",") if x.strip()})
    except ValueError:
        p.error(f"--tenants takes whole numbers separated by commas, not {args.tenants!r}")
    if any(n < BASE_TENANTS or n > 999_999 for n in counts):
        p.error(f"--tenants: each count must be from {BASE_TENANTS} to 999,999")
    args.counts = sorted({BASE_TENANTS, *counts})
    args.runs = args.runs or (1 if args.quick else 3)
    base = QUICK if args.quick else FULL
    args.sizes = Sizes(
        base.few_jobs, args.samples or base.samples, base.warmup, args.budget or base.budget_s
    )
    if args.runs < 1 or args.sizes.samples < 1 or args.sizes.budget_s <= 0:
        p.error("--runs, --samples and --budget must be positive")
    return args


def _terminated(signum: int, frame: object) -> NoReturn:
    # Unwind like Ctrl-C, so the scratch databases are dropped on `kill` too.
    raise KeyboardInterrupt


def run(args: argparse.Namespace, url: str, source: str) -> int:
    claim_params()
    busy = cpu_busy()
    facts = server_facts(url)
    items = backlogs(args.counts, args.sizes)
    figs = {b: Figures() for b in items}
    plans: list[tuple[str, Backlog, str]] = []
    with ExitStack() as stack:
        progress(f"migrating the template database {TEMPLATE_DB}")
        template = stack.enter_context(scratch_database(url, TEMPLATE_DB))
        migrate.upgrade(template)
        freeze_statistics(template)
        urls: dict[Backlog, str] = {}
        for b in items:
            urls[b] = stack.enter_context(scratch_database(url, b.dbname, template=TEMPLATE_DB))
            seconds = load(urls[b], b)
            progress(f"{b.dbname}: {b.registered:,} tenants, {b.jobs:,} jobs in {seconds:.1f} s")
        for r in range(1, args.runs + 1):
            # Backlogs take turns within each run, so the machine's drift hits them alike.
            for b in items:
                figs[b].add(measure(urls[b], b, args.sizes))
                progress(
                    f"run {r}/{args.runs} {b.dbname}: p50 {figs[b].p50_ms[-1]:.2f} ms,"
                    f" p99 {figs[b].p99_ms[-1]:.2f} ms"
                )
        if args.explain:
            largest = max(items, key=lambda b: (b.registered, b.jobs))
            slowest = max(items, key=lambda b: median(figs[b].p50_ms))
            plans.append(("largest", largest, explain(urls[largest])))
            if slowest != largest:
                plans.append(("slowest", slowest, explain(urls[slowest])))

    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    print(f"command: {command}")
    print(f"server:  {redact(url)} ({source})")
    print(f"         {facts['version']}")
    print(
        f"         fsync={facts['fsync']} synchronous_commit={facts['synchronous_commit']} "
        f"shared_buffers={facts['shared_buffers']}"
    )
    busy_text = "unknown" if busy is None else f"{busy:.0%}"
    print(
        f"machine: {os.cpu_count()} CPUs, {busy_text} busy in the 2 s before the start"
        + (" - something else was running: figures may be high" if (busy or 0) > 0.1 else "")
    )
    print(
        f"claim:   {' + '.join(claim_statements())} of {CLAIM} jobs, rolled back; "
        "limits lifted; "
        f"{PER_CONVERSATION} jobs per conversation; up to {args.sizes.samples} timed claims "
        f"per run after up to {args.sizes.warmup} warm-up, or {args.sizes.budget_s:g} s of "
        f"each; median of {args.runs} run(s)"
    )
    print()
    print(report(items, figs))
    print()
    if any(b.per_tenant != 10 for b in items if b.every):
        print(
            "note: above 10,000 registered tenants, 'all with work' gives each tenant 2 jobs "
            "(1 conversation), not 10: 200,000 jobs at 100,000 tenants."
        )
    print(f"target: p50 at most {TARGET_RATIO}x the base (10 registered, 10 with work)")
    print()
    print(statements_table(items, figs))
    if args.runs > 1:
        print("runs (p50 ms of each run):")
        for b in items:
            print(f"  {b.dbname:<28} " + " / ".join(fmt_number(v, 2) for v in figs[b].p50_ms))
    for which, b, text in plans:
        print()
        print(
            f"EXPLAIN (ANALYZE, BUFFERS) of claim_jobs (generic plan), the {which} backlog: "
            f"{b.registered:,} registered, {b.with_work:,} with work, {b.jobs:,} jobs:"
        )
        print(text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _terminated)
    with server_url(args.database_url) as (url, source):
        return run(args, url, source)


if __name__ == "__main__":
    raise SystemExit(main())
