"""What each statement of a dispatcher turn costs the server (issue #3's throughput work).

    .venv/bin/python bench/turn_cost.py [--database-url URL] [--turns N] [--batch K ...]

Builds the throughput figure's backlog (20,000 jobs, 10 tenants x 200 conversations x
10, limits lifted) in a scratch database, then, for each batch size K (default 1 and
20), runs N turns (default 300) by hand on one connection, statement by statement in
the order queries.cycle sends them: lock_queue, complete_jobs and promote_heads for
the K jobs the previous turn claimed (all completed), claim_jobs for K more, turn_end,
COMMIT. Every batch size starts from a copy of the same backlog. After the turns, the
rest of a message's life on the server: enqueue_batch of 100 new messages (20 times),
and a delivered status callback (api_provider_status) for each of 200 sent messages;
the last line sums one message's server CPU: enqueue + claim and completion (a turn of
K / K) + its callback. Run it from two checkouts (PYTHONPATH=<other checkout>) to size
what a change costs per message.

Prints per statement the median wall time seen by the client and the mean CPU time of
the server process, read from /proc/PID/schedstat, which counts nanoseconds on the CPU
(the server must run on this machine; elsewhere only wall times are printed). The first
20 turns of each size are left out. Comparing sizes splits a turn's server time into a
cost per turn and a cost per job: (T(K) - T(1)) / (K - 1) per job.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import redact, scratch_database, server_url
from _dispatch_common import LIFTED_LIMITS, QUEUE, PgqueueDb, backlog, is_local, tenant_name
from psycopg.types.json import Jsonb

from pgqueue import queries
from pgqueue.db import connect
from pgqueue.enqueue import enqueue_whatsapp_send_batch

TENANTS, PHONES, PER_CONVERSATION = 10, 200, 10
SKIP = 20  # warm-up turns left out of the figures
CALLBACKS, ENQUEUES = 200, 20
PER_ENQUEUE = 100
# The backlog, built once; each batch size measures a copy of it.
TEMPLATE_DB = "bench_turn_cost_base"


def server_cpu(pid: int) -> Callable[[], float] | None:
    """Seconds the server process `pid` has spent on a CPU, if this machine can tell."""
    path = Path(f"/proc/{pid}/schedstat")

    def read() -> float:
        return int(path.read_text().split()[0]) / 1e9

    try:
        read()
    except (OSError, ValueError, IndexError):
        return None
    return read


async def measure(url: str, batch: int, turns: int) -> dict[str, tuple[float, float | None]]:
    """Median wall ms and mean server CPU ms of each statement over `turns` turns."""
    # Connected as the dispatcher connects its lock connection.
    conn = await connect(url, application_name="pgqueue-worker:turn-cost", generic_plans=True)
    wall: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    row = await (await conn.execute("SELECT pg_backend_pid() AS pid")).fetchone()
    clock = server_cpu(row["pid"]) if row is not None and is_local(url) else None

    async def timed(name: str, run: Any) -> Any:
        c0 = clock() if clock else 0.0
        t0 = time.perf_counter()
        result = await run
        wall.setdefault(name, []).append((time.perf_counter() - t0) * 1000)
        if clock:
            cpu.setdefault(name, []).append((clock() - c0) * 1000)
        return result

    async def statement(name: str, params: dict[str, Any]) -> list[queries.Row]:
        async def run() -> list[queries.Row]:
            cur = await conn.execute(queries.sql(name), params)
            return await cur.fetchall() if cur.description else []

        rows: list[queries.Row] = await timed(name, run())
        return rows

    claimed: list[queries.Row] = []
    sids: list[str] = []
    try:
        for _ in range(turns):
            await timed("BEGIN", conn.execute("BEGIN"))
            await statement("lock_queue", {"queue": QUEUE})
            if claimed:
                outcomes = [
                    {
                        "id": r["id"],
                        "token": str(r["claim_token"]),
                        "outcome": "completed",
                        "delay": 0.0,
                        "sid": "SM" + uuid.uuid4().hex,
                        "status": "queued",
                        "channel": "freeform",
                    }
                    for r in claimed
                ]
                sids += [o["sid"] for o in outcomes]
                await statement("complete_jobs", {"queue": QUEUE, "outcomes": Jsonb(outcomes)})
                conversations = sorted({r["conversation"] for r in claimed})
                await statement("promote_heads", {"queue": QUEUE, "conversations": conversations})
            claimed = await statement(
                "claim_jobs",
                {
                    "queue": QUEUE,
                    "worker_id": "turn-cost",
                    "max_jobs": batch,
                    "lease": 60.0,
                    "lookahead": 0.05,
                    "headroom": queries.RATE_HEADROOM,
                    "margin": queries.SLOT_MARGIN_S,
                    # A tree before Claim.answered reads no such key (psycopg ignores it).
                    "answered": [],
                },
            )
            await statement(
                "turn_end",
                {"queue": QUEUE, "release": [r["lock_key"] for r in claimed], "notify": None},
            )
            await timed("COMMIT", conn.execute("COMMIT"))
            if len(claimed) < batch:
                raise RuntimeError(f"the backlog ran out after claiming {len(claimed)}")
        for sid in sids[-(SKIP + CALLBACKS) :]:
            await statement(
                "api_provider_status",
                {
                    "tenant_id": tenant_name(0),
                    "sid": sid,
                    "status": "delivered",
                    "error_code": None,
                },
            )
        for i in range(SKIP + ENQUEUES):
            more = backlog([0], 100, 1, first_phone=PHONES + 100 * i, tag=f"e{i}-")
            await timed("enqueue_batch", enqueue_whatsapp_send_batch(conn, more))
    finally:
        await conn.close()
    return {
        name: (
            statistics.median(values[SKIP:]),
            statistics.mean(cpu[name][SKIP:]) if name in cpu else None,
        )
        for name, values in wall.items()
    }


async def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--database-url")
    p.add_argument("--turns", type=int, default=300)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 20])
    p.add_argument(
        "--setup-sql",
        help="SQL run on the backlog before measuring (to size a schema change before"
        " writing its migration)",
    )
    args = p.parse_args()
    if max(args.batch) * args.turns > TENANTS * PHONES * PER_CONVERSATION:
        p.error("the backlog holds 20,000 jobs: fewer turns or smaller batches")
    with server_url(args.database_url) as (url, source):
        print(f"server: {redact(url)} ({source})")
        with scratch_database(url, TEMPLATE_DB) as base:
            db = PgqueueDb(base)
            db.install()
            db.prepare(TENANTS, LIFTED_LIMITS)
            await db.enqueue(backlog(range(TENANTS), PHONES, PER_CONVERSATION))
            if args.setup_sql:
                db.sql(args.setup_sql)
            db.settle()
            results = {}
            for batch in args.batch:
                with scratch_database(url, "bench_turn_cost", template=TEMPLATE_DB) as copy:
                    results[batch] = await measure(copy, batch, args.turns)
    names = list(results[args.batch[0]])
    header = "statement      " + "".join(
        f"   {b:>2} jobs: wall ms / server CPU ms" for b in results
    )
    print(header)
    for name in names:
        cells = []
        for batch in results:
            w, c = results[batch].get(name, (float("nan"), None))
            cells.append(f"{w:>25.2f} / {c:.3f}" if c is not None else f"{w:>25.2f} /   n/a")
        print(f"{name:15s}" + "".join(cells))
    life = ("enqueue_batch", "api_provider_status")
    for batch, stats in results.items():
        total = [c for name, (_, c) in stats.items() if c is not None and name not in life]
        if total:
            print(f"server CPU per turn of {batch} job(s): {sum(total):.2f} ms")
            enqueue, callback = stats["enqueue_batch"][1], stats["api_provider_status"][1]
            if enqueue is not None and callback is not None:
                per = enqueue / PER_ENQUEUE + sum(total) / batch + callback
                print(
                    f"server CPU per message ({batch} a turn): {per:.3f} ms = enqueue "
                    f"{enqueue / PER_ENQUEUE:.3f} + turn {sum(total) / batch:.3f} + "
                    f"callback {callback:.3f}"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
