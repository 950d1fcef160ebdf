"""What a read of a tenant's event feed costs with a million events stored.

    .venv/bin/python bench/events.py [--database-url URL] [--events 1000000]
        [--tenants 1000] [--runs 3] [--reads 500]

Fills pgqueue.events of a scratch database migrated to the tree's head with --events
events (set-based INSERTs, as the queue writes them: tx rising, ids from event_seq,
spread over --tenants tenants and over today's partition), VACUUM ANALYZEs it, then
times reads as GET /api/events makes them: the statement events_after of queries.sql
on one connection with prepared statements, each a round trip timed by the client:

* `page`: 100 events after a cursor taken at random inside a random tenant's feed;
* `tail`: after the tenant's latest cursor (what a consumer that is up to date reads:
  nothing, the commonest read of a long poll);
* `limit 1000`: the largest page.

Prints p50 and p99 per kind, the median over --runs runs; the issue's target is a p99 of
at most 20 ms with 1M events.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time

import psycopg
from _common import percentile, redact, scratch_database, server_url
from _dispatch_common import PgqueueDb, settle

from pgqueue import queries
from pgqueue.db import connect

KINDS = ("queued", "sending", "sent", "delivered", "read")


def fill(url: str, n: int, tenants: int) -> None:
    """n events: each of n / 5 messages gets its five, in order, tenants round-robin. Their
    keys (tx) are below any transaction id, as those of events written long ago are, so
    every one of them is readable."""
    with psycopg.connect(url, autocommit=True) as conn:
        step = 100_000
        for start in range(0, n, step):
            conn.execute(
                """
                INSERT INTO pgqueue.events (tx, tenant_id, queue, job_id, kind, attempt, sid)
                SELECT g - %(n)s, 'tenant-' || ((g / 5) %% %(tenants)s), 'whatsapp-send',
                       g / 5, (%(kinds)s::text[])[g %% 5 + 1], 1,
                       CASE WHEN g %% 5 >= 2 THEN 'SM' || md5((g / 5)::text) END
                FROM generate_series(%(start)s::bigint, %(end)s::bigint - 1) g
                """,
                {
                    "start": start,
                    "end": min(start + step, n),
                    "n": n,
                    "tenants": tenants,
                    "kinds": list(KINDS),
                },
            )


async def measure(url: str, tenants: int, reads: int, rng: random.Random) -> dict[str, list[float]]:
    conn = await connect(url, application_name="pgqueue-api:bench-events", generic_plans=True)
    times: dict[str, list[float]] = {"page": [], "tail": [], "limit 1000": []}
    rows: dict[str, int] = dict.fromkeys(times, 0)
    try:
        cur = await conn.execute(
            "SELECT tenant_id, min(tx) AS lo, max(tx) AS hi FROM pgqueue.events GROUP BY 1"
        )
        bounds = {r["tenant_id"]: (r["lo"], r["hi"]) for r in await cur.fetchall()}
        names = sorted(bounds)

        async def read(kind: str, tenant: str, tx: int, limit: int, after_id: int = 0) -> None:
            t0 = time.perf_counter()
            got = await queries.fetch_all(
                conn,
                "events_after",
                {"tenant_id": tenant, "tx": tx, "id": after_id, "limit": limit},
            )
            times[kind].append((time.perf_counter() - t0) * 1000)
            rows[kind] += len(got)

        for _ in range(reads):
            tenant = rng.choice(names)
            lo, hi = bounds[tenant]
            await read("page", tenant, rng.randint(lo, hi), 100)
            await read("tail", tenant, hi, 100, after_id=2**62)
            await read("limit 1000", tenant, rng.randint(lo, hi), 1000)
    finally:
        await conn.close()
    print("events per read: " + ", ".join(f"{k} {n / reads:.0f}" for k, n in rows.items()))
    return times


async def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--database-url")
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--tenants", type=int, default=1000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--reads", type=int, default=500)
    args = p.parse_args()
    rng = random.Random(1)
    with server_url(args.database_url) as (url, source):
        print(f"server: {redact(url)} ({source})")
        with scratch_database(url, "bench_events") as db_url:
            PgqueueDb(db_url).install()
            started = time.monotonic()
            fill(db_url, args.events, args.tenants)
            settle(db_url)
            print(
                f"{args.events:,} events of {args.tenants:,} tenants stored in "
                f"{time.monotonic() - started:.1f} s"
            )
            runs = [await measure(db_url, args.tenants, args.reads, rng) for _ in range(args.runs)]
    print(f"read            p50 ms   p99 ms   (median of {args.runs} runs of {args.reads} reads)")
    worst = 0.0
    for kind in runs[0]:
        p50 = statistics.median(percentile(r[kind], 50) for r in runs)
        p99 = statistics.median(percentile(r[kind], 99) for r in runs)
        worst = max(worst, p99)
        print(f"{kind:14s} {p50:8.2f} {p99:8.2f}")
    print(f"worst p99: {worst:.2f} ms (target: at most 20 ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
