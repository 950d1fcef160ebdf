"""Dispatch figures of pgqueue (issue #3): rate precision, throughput beside PgQueuer and
Procrastinate, claim latency at 1,000 vs 1,000,000 queued jobs, pickup latency, fairness
and worker memory.

    .venv/bin/python bench/dispatch.py [FIGURE ...] [--database-url URL] [--runs N] [--quick]

FIGURE is any of rate, throughput, claim, pickup, fairness, memory (default: all of them,
in that order). Every figure is printed with its target and PASS or MISS.

1. rate: 3 worker processes (recording provider, 150 ms per send), 2,400 messages over
   30 tenants x 10 conversations already queued, default limits (80/s, global 20,
   tenant 5). From the provider's start timestamps: the most starts in any 1-second
   window (sliding, exact), the mean rate (starts - 1) / (last start - first start), and
   the min / max of the per-second histogram (whole seconds from the first start).
2. throughput: limits lifted (rate 1e6/s, global 1000, tenant 1000), provider that
   returns at once (bench/noop_worker.py), 20,000 jobs queued over 10 tenants x 200
   conversations; 1 and 2 worker processes of concurrency 20. Jobs/s from the first
   start to the last completion, both read from pgqueue.job_history (started_at,
   finished_at). PgQueuer 1.6 (one worker, batch_size 10, max_concurrent_tasks 20) and
   Procrastinate 3.10 (one worker, concurrency 20) process 20,000 no-op jobs in the same
   run, each in a fresh process: first handler call to the worker's return.
3. claim: queries.claim_jobs (+ queries.cycle releasing what it claimed, not timed, so
   the state resets) timed many times on one connection with 1,000 queued jobs (100
   tenants x 10 conversations x 1) and with 1,000,000 (100 tenants x 1,000
   conversations x 10), rows built by INSERT ... SELECT generate_series exactly as
   enqueue_batch would leave them (conversation rows with pending, one head each). Rate
   lifted so every claim gets its 10 jobs; global 20, tenant 5. Plus EXPLAIN (ANALYZE,
   BUFFERS) of claim_jobs at the large size (rolled back).
4. pickup: one idle worker (recording provider, no latency), 500 messages enqueued 10 ms
   apart with enqueue_whatsapp_send; latency = the provider's start timestamp - the
   enqueue call's start timestamp. The rate limit is lifted for this figure: 100
   messages/s would exceed the default 80/s and measure queueing, not pickup.
5. fairness: one tenant with 3,000 messages queued (300 conversations), ten tenants
   each sending one message a second for 20 s to new conversations; one worker,
   provider latency 150 ms, default limits. p95 enqueue -> provider start of the ten
   tenants' messages. A second row repeats it with the big tenant allowed 20 sends in
   flight, so it alone fills the global limit and the 80/s rate.
6. memory: one worker (no-op provider, concurrency 20): RSS idle, then peak while it
   drains 20,000 jobs (sampled every 20 ms with psutil, and the kernel's VmHWM). Taken
   from figure 2's 1-worker runs when both are measured (idle = registered, every tenant
   paused, 20,000 jobs queued); alone, it runs its own: 3 s idle on an empty queue, then
   20,000 jobs enqueued in batches of 1,000 while it drains.

Everything with --runs 3 takes over 15 minutes; on a shared 2-core machine run it in
parts of a few minutes each: `rate pickup`, `throughput memory --runs 1`, `claim`,
`fairness`. The header names the commit measured and the machine's idle share.

Each measurement starts from emptied tables, VACUUM ANALYZE and CHECKPOINT (after the
backlog is in). pgqueue works in a scratch database `bench_dispatch`, the peers in their
own; all are dropped at the end. Worker logs go to a temporary directory (printed).
Needs the `bench` extra for the peers: pip install -e '.[bench]'.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    median,
    percentile,
    progress,
    redact,
    render_table,
    scratch_database,
    server_facts,
    server_url,
)
from _dispatch_common import (
    DEFAULT_LIMITS,
    LIFTED_LIMITS,
    QUEUE,
    ROOT,
    TEXT,
    Limits,
    OthersCpu,
    PgqueueDb,
    backlog,
    io_stalled_s,
    load_note,
    noop_worker,
    phone,
    recording_worker,
    settle,
    sleep_until,
    tenant_name,
    truncate_all,
    workers,
)

FIGURES = ("rate", "throughput", "claim", "pickup", "fairness", "memory")


@dataclass
class Line:
    """One printed figure: what, the value, the target and whether it was met."""

    figure: str
    value: str
    target: str = ""
    ok: bool | None = None

    @property
    def verdict(self) -> str:
        return "" if self.ok is None else ("PASS" if self.ok else "MISS")


@dataclass
class Section:
    title: str
    lines: list[Line] = field(default_factory=list)
    details: list[str] = field(default_factory=list)


@dataclass
class Ctx:
    args: argparse.Namespace
    db: PgqueueDb
    tmp: Path
    peer_urls: dict[str, str]
    notes: set[str] = field(default_factory=set)
    # RSS of the 1-worker throughput runs (figure 6 reuses them when both are measured).
    memory: list[dict[str, float]] = field(default_factory=list)

    def path(self, name: str) -> Path:
        return self.tmp / name


def fmt(value: float, digits: int = 0) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:,.{digits}f}"


def spacing_ms(rate: float) -> float:
    """The claim's slot spacing at this rate: 1 / (headroom x rate)."""
    from pgqueue import queries

    return 1000.0 / (getattr(queries, "RATE_HEADROOM", 0.98) * rate)


def count_reslots(logs: Sequence[Path]) -> int:
    """Sends that missed their rate slot and took a new one (the dispatcher logs each)."""
    return sum(p.read_text().count("rate slot missed") for p in logs if p.exists())


def runs_note(values: Sequence[float], digits: int = 0, unit: str = "") -> str:
    return " / ".join(fmt(v, digits) + unit for v in values)


# -- 1. rate precision -------------------------------------------------------------------


async def rate_once(ctx: Ctx, run: int) -> dict[str, float]:
    from tests.support.recording import max_overlap, max_starts_per_window, read_sends

    q = ctx.args.quick
    per_conv = 2 if q else 8
    db = ctx.db
    db.prepare(tenants=30, limits=DEFAULT_LIMITS)
    db.pause_all(True)
    n = len(await db.enqueue(backlog(range(30), phones=10, per_conversation=per_conv)))
    ctx.notes.update(db.settle())
    record = ctx.path(f"rate-{run}.jsonl")
    with workers(
        [
            recording_worker(db.url, record, ctx.path(f"rate-{run}-w{i}.log"), latency=0.150)
            for i in range(3)
        ]
    ) as procs:
        db.wait_workers(3)
        await asyncio.sleep(0.5)
        db.pause_all(False)
        db.wait_completed(n, timeout=n / 60 + 30, procs=procs)
    sends = [s for s in read_sends(record) if s.outcome == "ok"]
    starts = sorted(s.start for s in sends)
    t0 = starts[0]
    bins = Counter(int(t - t0) for t in starts)
    full = range(int(starts[-1] - t0))  # whole seconds only; the last one is partial
    per_second = [bins.get(i, 0) for i in full] or [len(starts)]
    return {
        "sends": len(sends),
        "max_window": max_starts_per_window(sends, 1.0),
        "mean_rate": (len(starts) - 1) / (starts[-1] - t0),
        "hist_min": min(per_second),
        "hist_max": max(per_second),
        "max_gap_ms": max(b - a for a, b in itertools.pairwise(starts)) * 1000,
        "overlap_global": max_overlap(sends),
        "overlap_tenant": max_overlap(sends, key=lambda s: s.tenant),
        "overlap_conv": max_overlap(sends, key=lambda s: s.conv),
        "pids": len({p for p in _pids(record)}),
        "reslots": count_reslots([ctx.path(f"rate-{run}-w{i}.log") for i in range(3)]),
    }


def _pids(record: Path) -> list[int]:
    return [json.loads(line)["pid"] for line in record.read_text().splitlines()]


async def fig_rate(ctx: Ctx) -> Section:
    runs = []
    for r in range(ctx.args.runs):
        progress(f"rate: run {r + 1}/{ctx.args.runs} ({load_note()})")
        runs.append(await rate_once(ctx, r))
    med = {k: median([x[k] for x in runs]) for k in runs[0]}
    worst_window = max(x["max_window"] for x in runs)
    worst_mean = min(x["mean_rate"] for x in runs)
    s = Section(
        f"1. rate precision: {int(med['sends']):,} messages over 30 tenants, 3 worker "
        f"processes, provider 150 ms, {DEFAULT_LIMITS.describe()}"
    )
    s.lines += [
        Line(
            "most starts in any 1-s window (worst run)",
            fmt(worst_window),
            "≤ 80",
            worst_window <= 80,
        ),
        Line(
            "mean rate over the run, /s (worst run)", fmt(worst_mean, 1), "≥ 78", worst_mean >= 78
        ),
        Line(
            "per-second histogram min / max (median)",
            f"{fmt(med['hist_min'])} / {fmt(med['hist_max'])}",
        ),
        Line(
            "sends in flight at once: queue / tenant / conversation (worst run)",
            " / ".join(
                fmt(max(x[k] for x in runs))
                for k in ("overlap_global", "overlap_tenant", "overlap_conv")
            ),
            "≤ 20 / 5 / 1",
            max(x["overlap_global"] for x in runs) <= 20
            and max(x["overlap_tenant"] for x in runs) <= 5
            and max(x["overlap_conv"] for x in runs) <= 1,
        ),
    ]
    s.details.append(
        "runs: max window "
        + runs_note([x["max_window"] for x in runs])
        + "; mean rate "
        + runs_note([x["mean_rate"] for x in runs], 2)
        + "; histogram min/max "
        + " / ".join(f"{x['hist_min']:.0f}-{x['hist_max']:.0f}" for x in runs)
        + "; largest gap between starts "
        + runs_note([x["max_gap_ms"] for x in runs], 0, " ms")
        + f" (slot spacing {spacing_ms(DEFAULT_LIMITS.rate):.2f} ms)"
        + "; sends that took a new slot "
        + runs_note([x["reslots"] for x in runs])
        + "; provider saw "
        + runs_note([x["pids"] for x in runs])
        + " worker pids"
    )
    return s


# -- 2. throughput -----------------------------------------------------------------------

TP_TENANTS, TP_PHONES = 10, 200


async def pgqueue_throughput(ctx: Ctx, n_workers: int, jobs: int, run: int) -> dict[str, float]:
    db = ctx.db
    per_conv = max(jobs // (TP_TENANTS * TP_PHONES), 1)
    db.prepare(tenants=TP_TENANTS, limits=LIFTED_LIMITS)
    db.pause_all(True)
    n = len(await db.enqueue(backlog(range(TP_TENANTS), TP_PHONES, per_conv)))
    ctx.notes.update(db.settle())
    logs = [ctx.path(f"tp-{n_workers}w-{run}-{i}.log") for i in range(n_workers)]
    # One worker runs in lock-step with its database session: say where a turn goes.
    turn_times = ctx.path(f"tp-{n_workers}w-{run}-turns.json") if n_workers == 1 else None
    with workers([noop_worker(db.url, log, turn_times=turn_times) for log in logs]) as procs:
        db.wait_workers(n_workers)
        rss = RssSampler(procs[0].pid) if n_workers == 1 else None
        await asyncio.sleep(2.0 if rss else 0.5)
        if rss:
            rss.start()  # idle until the tenants are let go
        cpu = CpuSplit([p.pid for p in procs], db.worker_backends)
        db.pause_all(False)
        try:
            db.wait_completed(n, timeout=300, procs=procs, interval=0.2)
        finally:
            if rss:
                ctx.memory.append(rss.stop())
        workers_s, backends_s = cpu.used()
    row = db.sql(
        "SELECT count(*), extract(epoch FROM max(finished_at) - min(started_at))::float8,"
        " count(*) FILTER (WHERE state <> 'completed') FROM pgqueue.job_history"
    )[0]
    if row[0] != n or row[2]:
        raise RuntimeError(
            f"pgqueue: {row[0]} jobs in history, {row[2]} not completed; expected {n}"
        )
    reslots = count_reslots(logs)
    turns = (
        json.loads(turn_times.read_text()) if turn_times is not None and turn_times.exists() else {}
    )
    return {
        **turns,
        "jobs": n,
        "seconds": row[1],
        "rate": n / row[1],
        "reslots": reslots,
        "worker_ms": workers_s * 1000 / n * 20,
        "backend_ms": backends_s * 1000 / n * 20,
    }


class CpuSplit:
    """CPU time the worker processes and their database sessions (this machine's
    server only) use from now on: where a turn's time goes, in a figure less noisy
    than a rate. Sessions are listed again at the end: a worker opens its completion
    connection at its first completion, after the start. One that ends before the end
    (a reconnect) is left out: none does in a drain that finishes."""

    def __init__(self, workers: Sequence[int], backends: Callable[[], Sequence[int]]) -> None:
        self._workers = list(workers)
        self._backends = backends
        self._start = self._cpu(self._workers), self._cpu(backends())

    @staticmethod
    def _cpu(pids: Sequence[int]) -> dict[int, float]:
        import psutil

        times = {}
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                t = psutil.Process(pid).cpu_times()
                times[pid] = t.user + t.system
        return times

    def used(self) -> tuple[float, float]:
        """Seconds of CPU since the start: worker processes, database sessions."""
        ends = self._cpu(self._workers), self._cpu(self._backends())
        w, b = (
            sum(t - start.get(pid, 0.0) for pid, t in end.items())
            for start, end in zip(self._start, ends, strict=True)
        )
        return w, b


def _asyncpg_params(url: str) -> dict[str, Any]:
    import psycopg

    p = psycopg.conninfo.conninfo_to_dict(url)
    return {
        "host": p.get("host"),
        "port": int(str(p["port"])) if p.get("port") else None,
        "user": p.get("user"),
        "password": p.get("password"),
        "database": p.get("dbname"),
    }


def _procrastinate_app(url: str) -> Any:
    import logging

    import procrastinate

    logging.getLogger("procrastinate").setLevel(logging.ERROR)
    return procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))


async def peer_install(name: str, url: str) -> None:
    if name == "PgQueuer":
        import asyncpg
        from pgqueuer.queries import Queries

        conn = await asyncpg.connect(**_asyncpg_params(url))
        try:
            await Queries.from_asyncpg_connection(conn).install()
        finally:
            await conn.close()
    else:
        app = _procrastinate_app(url)
        async with app.open_async():
            await app.schema_manager.apply_schema_async()


async def peer_enqueue(name: str, url: str, jobs: int) -> None:
    """The same 20,000 messages through the peer's batch API (1,000 per call)."""
    payloads = []
    conversations = TP_TENANTS * TP_PHONES
    for i in range(jobs):
        c = i % conversations
        payloads.append(
            {
                "tenant": tenant_name(c % TP_TENANTS),
                "to": phone(c // TP_TENANTS),
                "text": TEXT.format(i=i),
            }
        )
    if name == "PgQueuer":
        import asyncpg
        from pgqueuer.queries import Queries

        conn = await asyncpg.connect(**_asyncpg_params(url))
        try:
            q = Queries.from_asyncpg_connection(conn)
            for i in range(0, jobs, 1000):
                chunk: list[bytes | None] = [json.dumps(p).encode() for p in payloads[i : i + 1000]]
                await q.enqueue(["whatsapp_send"] * len(chunk), chunk, [0] * len(chunk))
        finally:
            await conn.close()
    else:
        app = _procrastinate_app(url)

        @app.task(name="whatsapp_send", queue=QUEUE)
        async def whatsapp_send(tenant: str, to: str, text: str) -> None:
            return None

        async with app.open_async():
            for i in range(0, jobs, 1000):
                await whatsapp_send.batch_defer_async(*payloads[i : i + 1000])


async def peer_throughput(ctx: Ctx, name: str, jobs: int) -> dict[str, float]:
    url = ctx.peer_urls[name]
    truncate_all(url)
    await peer_enqueue(name, url, jobs)
    ctx.notes.update(settle(url))
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "_peer",
        name,
        "--url",
        url,
        "--jobs",
        str(jobs),
        "--concurrency",
        "20",
    ]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    ctx.path(f"peer-{name}.log").write_text(out.stderr)
    if out.returncode != 0:
        raise RuntimeError(f"{name} worker failed ({out.returncode}): {out.stderr[-2000:]}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    if result["jobs"] != jobs:
        raise RuntimeError(f"{name}: {result['jobs']} of {jobs} jobs ran")
    return result


async def peer_worker(name: str, url: str, jobs: int, concurrency: int) -> dict[str, float]:
    """Runs in a fresh process: one worker of the peer until its queue is empty."""
    first: list[float] = []
    count = [0]
    if name == "PgQueuer":
        import asyncpg
        from pgqueuer import AsyncpgDriver, Queries, QueueManager
        from pgqueuer.types import QueueExecutionMode

        conn = await asyncpg.connect(**_asyncpg_params(url))
        qm = QueueManager(Queries(AsyncpgDriver(conn)))

        @qm.entrypoint("whatsapp_send")
        async def send(job: Any) -> None:
            if not first:
                first.append(time.time())
            count[0] += 1

        # PEERS.md: max_concurrent_tasks must be at least 2 x batch_size.
        await qm.run(
            batch_size=concurrency // 2,
            max_concurrent_tasks=concurrency,
            mode=QueueExecutionMode.drain,
        )
        end = time.time()
        left = await conn.fetchval("SELECT count(*) FROM pgqueuer")
        await conn.close()
        if left:
            raise RuntimeError(f"PgQueuer left {left} jobs in its queue")
    else:
        app = _procrastinate_app(url)

        @app.task(name="whatsapp_send", queue=QUEUE)
        async def whatsapp_send(tenant: str, to: str, text: str) -> None:
            if not first:
                first.append(time.time())
            count[0] += 1

        async with app.open_async():
            # No locks here, so wait=False cannot stop early on lock-blocked jobs.
            await app.run_worker_async(
                queues=[QUEUE], concurrency=concurrency, wait=False, install_signal_handlers=False
            )
            end = time.time()
            async with app.connector.pool.connection() as c:
                cur = await c.execute(
                    "SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'"
                )
                row = await cur.fetchone()
        if row is None or row[0] != jobs:
            raise RuntimeError(f"Procrastinate: {row} jobs succeeded, expected {jobs}")
    return {"jobs": count[0], "seconds": end - first[0], "rate": count[0] / (end - first[0])}


async def fig_throughput(ctx: Ctx) -> Section:
    jobs = 2000 if ctx.args.quick else 20_000
    systems = ["pgqueue 1 worker", "pgqueue 2 workers", *ctx.args.peers]
    rates: dict[str, list[float]] = {s: [] for s in systems}
    reslots: dict[str, list[float]] = {s: [] for s in systems if s.startswith("pgqueue")}
    cpu: dict[str, list[tuple[float, float]]] = {}
    turns: list[dict[str, float]] = []
    for r in range(ctx.args.runs):
        turn = r % len(systems)
        for sysname in systems[turn:] + systems[:turn]:
            progress(
                f"throughput: run {r + 1}/{ctx.args.runs}: {sysname}, {jobs:,} jobs ({load_note()})"
            )
            if sysname.startswith("pgqueue"):
                res = await pgqueue_throughput(ctx, int(sysname.split()[1]), jobs, r)
                reslots[sysname].append(res["reslots"])
                cpu.setdefault(sysname, []).append((res["worker_ms"], res["backend_ms"]))
                if "turns" in res:
                    turns.append(res)
            else:
                res = await peer_throughput(ctx, sysname, jobs)
            rates[sysname].append(res["rate"])
    med = {s: median(v) for s, v in rates.items()}
    s = Section(
        f"2. throughput: {jobs:,} jobs already queued ({TP_TENANTS} tenants x {TP_PHONES} "
        f"conversations for pgqueue), no-op provider, concurrency 20 per worker, pgqueue "
        f"limits lifted ({LIFTED_LIMITS.describe()})"
    )
    for sysname in systems:
        s.lines.append(Line(f"{sysname}, jobs/s", fmt(med[sysname])))
    one = med["pgqueue 1 worker"]
    targets = {"PgQueuer": 1.0, "Procrastinate": 8.0}
    for peer in ctx.args.peers:
        ratio = one / med[peer]
        s.lines.append(
            Line(
                f"pgqueue 1 worker / {peer}",
                f"{ratio:.2f}x",
                f"≥ {targets[peer]:.1f}x",
                ratio >= targets[peer],
            )
        )
        s.lines.append(
            Line(f"pgqueue 2 workers / {peer}", f"{med['pgqueue 2 workers'] / med[peer]:.2f}x")
        )
    for sysname, split in cpu.items():
        s.details.append(
            f"{sysname}: CPU per 20 jobs (one turn's worth), median: worker processes "
            f"{median([w for w, _ in split]):.2f} ms, their database sessions "
            f"{median([b for _, b in split]):.2f} ms"
        )
    if turns:
        s.details.append(
            "pgqueue 1 worker: a turn that fills its 20 slots, medians of the runs' medians: "
            f"claims {median([t['claimed'] for t in turns]):.0f} jobs, queueing its "
            f"statements {median([t['queue_ms'] for t in turns]):.2f} ms, job log lines "
            f"while the server works {median([t['on_sent_ms'] for t in turns]):.2f} ms, "
            f"waiting for the server {median([t['server_ms'] for t in turns]):.2f} ms, "
            f"between turns {median([t['between_ms'] for t in turns]):.2f} ms "
            f"({runs_note([t['turns'] for t in turns])} such turns)"
        )
    for sysname in systems:
        s.details.append(
            f"runs {sysname}: {runs_note(rates[sysname])} jobs/s"
            + (
                f"; sends that missed their rate slot and took a new one (worker logs): "
                f"{runs_note(reslots[sysname])}"
                if sysname in reslots
                else ""
            )
        )
    s.details.append(
        "reference (PEERS.md, same kind of machine): PgQueuer ~2,700/s, Procrastinate ~340/s"
    )
    return s


# -- 3. claim latency --------------------------------------------------------------------

GENERATE = """
INSERT INTO pgqueue.conversations (queue, conversation, pending)
SELECT %(queue)s, 'restaurant-' || lpad(t::text, 3, '0') || ':+1' || (4150000000 + t * 100000 + c),
       %(per_conv)s
FROM generate_series(0, %(tenants)s - 1) t, generate_series(0, %(convs)s - 1) c;

INSERT INTO pgqueue.jobs (seq, queue, tenant_id, conversation, is_head, state, priority,
                          run_at, to_number, body, max_attempts)
SELECT k * %(tenants)s * %(convs)s + t * %(convs)s + c + 1, %(queue)s,
       'restaurant-' || lpad(t::text, 3, '0'),
       'restaurant-' || lpad(t::text, 3, '0') || ':+1' || (4150000000 + t * 100000 + c),
       k = 0, 'waiting', 0, now(), '+1' || (4150000000 + t * 100000 + c),
       'Hola! Your order #' || k || ' is ready for pickup at the counter. Thank you!', 4
FROM generate_series(0, %(per_conv)s - 1) k, generate_series(0, %(tenants)s - 1) t,
     generate_series(0, %(convs)s - 1) c;

SELECT setval('pgqueue.job_seq', (SELECT max(seq) FROM pgqueue.jobs));
"""


def build_queue(ctx: Ctx, tenants: int, convs: int, per_conv: int) -> None:
    import psycopg

    limits = Limits(rate=1e6, global_concurrency=20, tenant_concurrency=5)
    ctx.db.prepare(tenants=tenants, limits=limits)
    params = {"queue": QUEUE, "tenants": tenants, "convs": convs, "per_conv": per_conv}
    with psycopg.connect(ctx.db.url, autocommit=True) as conn, conn.transaction():
        for stmt in GENERATE.split(";\n"):
            if stmt.strip():
                conn.execute(stmt, params)
    # What enqueue_batch guarantees, checked: one head per conversation, counts agree.
    heads, total, pending = ctx.db.sql(
        "SELECT count(*) FILTER (WHERE is_head), count(*),"
        " (SELECT sum(pending) FROM pgqueue.conversations) FROM pgqueue.jobs"
    )[0]
    if heads != tenants * convs or total != tenants * convs * per_conv or pending != total:
        raise RuntimeError(f"bad generated queue: {heads} heads, {total} jobs, {pending} pending")
    ctx.notes.update(ctx.db.settle())


async def time_claims(ctx: Ctx, claims: int, warmup: int = 30) -> dict[str, list[float]]:
    from pgqueue import queries
    from pgqueue.db import connect
    from pgqueue.dispatcher import DispatcherConfig

    conn = await connect(ctx.db.url, application_name="bench-claim")
    claim_s: list[float] = []
    release_s: list[float] = []
    got: list[int] = []
    horizon: list[float] = []
    clock = time.perf_counter
    try:
        for i in range(warmup + claims):
            if i % 100 == 0:
                horizon.append(float(ctx.db.scalar(HORIZON)))
            t0 = clock()
            rows = await queries.claim_jobs(
                conn,
                queue=QUEUE,
                worker_id="bench-claim",
                max_jobs=10,
                lease_s=60.0,
                lookahead_s=DispatcherConfig().lookahead_s,
            )
            t1 = clock()
            await queries.cycle(
                conn,
                queue=QUEUE,
                outcomes=queries.Outcomes(
                    [{"id": r["id"], "token": r["claim_token"], "outcome": "release"} for r in rows]
                ),
                release=[r["lock_key"] for r in rows if r["locked"]],
            )
            t2 = clock()
            if i >= warmup:
                claim_s.append(t1 - t0)
                release_s.append(t2 - t1)
                got.append(len(rows))
    finally:
        await conn.close()
    return {
        "claim": claim_s,
        "release": release_s,
        "got": [float(g) for g in got],
        "horizon": horizon,
    }


# How far another session of this database holds back the MVCC horizon (transactions):
# while it does, the dead versions of the rows every claim updates (the queue row, the
# tenants' counters) cannot be pruned and each claim walks more of them.
HORIZON = """
SELECT coalesce(max(age(backend_xmin)), 0) FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid()
  AND backend_xmin IS NOT NULL AND application_name <> 'bench-claim'
"""


def explain_claim(ctx: Ctx) -> list[str]:
    import psycopg

    from pgqueue import queries
    from pgqueue.dispatcher import DispatcherConfig

    params = {
        "queue": QUEUE,
        "worker_id": "bench-explain",
        "max_jobs": 10,
        "lease": 60.0,
        "lookahead": DispatcherConfig().lookahead_s,
        "headroom": getattr(queries, "RATE_HEADROOM", 0.98),
        # Keys a tree's claim does not read are ignored.
        "margin": getattr(queries, "SLOT_MARGIN_S", 0.02),
        "answered": [],
    }
    with psycopg.connect(ctx.db.url) as conn:
        conn.execute(queries.sql("lock_queue"), {"queue": QUEUE})
        cur = psycopg.ClientCursor(conn)
        cur.execute("EXPLAIN (ANALYZE, BUFFERS) " + queries.sql("claim_jobs"), params)
        plan = [r[0] for r in cur.fetchall()]
        conn.rollback()
    return plan


def key_plan_lines(plan: Sequence[str]) -> list[str]:
    """The lines that say how jobs are found: scans on jobs, row locks, the candidates
    CTE, planning and execution time."""
    keep = (
        "Scan using",
        "Seq Scan on jobs",
        "Bitmap Heap Scan on jobs",
        "LockRows",
        "CTE candidates",
        "CTE Scan on candidates",
        "Planning Time",
        "Execution Time",
    )
    out = []
    for i, line in enumerate(plan):
        if any(k in line for k in keep):
            out.append(line.rstrip())
            nxt = plan[i + 1] if i + 1 < len(plan) else ""
            if "Scan" in line and "Index Cond" in nxt:
                out.append(nxt.rstrip())
    indent = min((len(ln) - len(ln.lstrip()) for ln in out), default=0)
    return [ln[indent:] for ln in out]


async def fig_claim(ctx: Ctx) -> Section:
    q = ctx.args.quick
    claims = 200 if q else 1000
    shapes = [("1,000", 100, 10, 1), ("100,000" if q else "1,000,000", 100, 100 if q else 1000, 10)]
    results: dict[str, dict[str, list[float]]] = {}
    plan: list[str] = []
    for label, tenants, convs, per_conv in shapes:
        progress(
            f"claim: building {label} queued jobs ({tenants} tenants x {convs} "
            f"conversations x {per_conv})"
        )
        t0 = time.monotonic()
        build_queue(ctx, tenants, convs, per_conv)
        progress(
            f"claim: built in {time.monotonic() - t0:.0f}s; timing {claims} claims x "
            f"{ctx.args.runs} run(s) ({load_note()})"
        )
        p50s, p99s, rel = [], [], []
        got: list[float] = []
        hz: list[float] = []
        for _ in range(ctx.args.runs):
            r = await time_claims(ctx, claims)
            p50s.append(percentile(r["claim"], 50) * 1000)
            p99s.append(percentile(r["claim"], 99) * 1000)
            rel.append(percentile(r["release"], 50) * 1000)
            got += r["got"]
            hz.append(max(r["horizon"]))
        results[label] = {"p50": p50s, "p99": p99s, "release": rel, "got": got, "horizon": hz}
        if label != "1,000":
            plan = explain_claim(ctx)
            ctx.path("claim-plan.txt").write_text("\n".join(plan) + "\n")
    small, large = shapes[0][0], shapes[1][0]
    s = Section(
        f"3. claim latency: queries.claim_jobs for 10 jobs (lock_queue + claim_jobs + commit, "
        f"one connection), {claims} claims per run, each followed by an untimed release; "
        f"rate lifted, global 20, tenant 5"
    )
    for label in (small, large):
        r = results[label]
        s.lines.append(
            Line(
                f"{label} queued: claim p50 / p99, ms",
                f"{fmt(median(r['p50']), 2)} / {fmt(median(r['p99']), 2)}",
            )
        )
    r50 = median(results[large]["p50"]) / median(results[small]["p50"])
    r99 = median(results[large]["p99"]) / median(results[small]["p99"])
    s.lines.append(Line(f"p50 ratio {large} / {small}", f"{r50:.2f}x", "≤ 1.5x", r50 <= 1.5))
    s.lines.append(Line(f"p99 ratio {large} / {small}", f"{r99:.2f}x", "≤ 1.5x", r99 <= 1.5))
    for label in (small, large):
        r = results[label]
        s.details.append(
            f"{label}: runs p50 {runs_note(r['p50'], 2)} ms, p99 {runs_note(r['p99'], 2)} ms; "
            f"jobs per claim min {min(r['got']):.0f}; release+unlock p50 "
            f"{runs_note(r['release'], 2)} ms; oldest snapshot of another session in this "
            f"database, sampled every 100 claims: {runs_note(r['horizon'])} transactions old"
        )
    s.details.append(
        f"EXPLAIN (ANALYZE, BUFFERS) claim_jobs at {large} queued, key lines "
        f"(full plan: {ctx.path('claim-plan.txt')}):"
    )
    s.details += ["    " + ln for ln in key_plan_lines(plan)]
    return s


# -- 4. pickup latency -------------------------------------------------------------------


async def pickup_once(ctx: Ctx, run: int, n: int) -> dict[str, list[float]]:
    """Latencies of one run, in seconds: `total` (enqueue call start -> provider start)
    and its parts: `call` (the enqueue call itself), `to_claim` (enqueue call start ->
    the claim's started_at, on the server clock) and `claim_to_send` (started_at ->
    provider start)."""
    from pgqueue.db import connect
    from pgqueue.enqueue import enqueue_whatsapp_send
    from pgqueue.models import Message
    from tests.support.recording import read_sends

    db = ctx.db
    db.prepare(tenants=10, limits=Limits(rate=1e6, global_concurrency=20, tenant_concurrency=5))
    ctx.notes.update(db.settle())
    record = ctx.path(f"pickup-{run}.jsonl")
    started: dict[int, float] = {}
    call: list[float] = []
    warm = 20
    with workers(
        [recording_worker(db.url, record, ctx.path(f"pickup-{run}.log"), latency=0.0)]
    ) as procs:
        db.wait_workers(1)
        conn = await connect(db.url, application_name="bench-pickup")
        try:
            # Warm-up (connections, prepared statements), then the worker sits idle.
            for i in range(warm):
                await enqueue_whatsapp_send(
                    conn,
                    Message(
                        tenant_id=tenant_name(i % 10), phone_number=phone(8000 + i), text="warm-up"
                    ),
                    queue=QUEUE,
                )
                await asyncio.sleep(0.01)
            db.wait_completed(warm, timeout=30, procs=procs)
            await asyncio.sleep(1.5)
            t0 = time.time() + 0.05
            for i in range(n):
                await sleep_until(t0 + i * 0.010)
                msg = Message(
                    tenant_id=tenant_name(i % 10),
                    phone_number=phone(i % 5000),
                    text=TEXT.format(i=i),
                )
                t = time.time()
                e = await enqueue_whatsapp_send(conn, msg, queue=QUEUE)
                call.append(time.time() - t)
                started[e.job_id] = t
        finally:
            await conn.close()
        db.wait_completed(warm + n, timeout=60, procs=procs)
    sends = {s.job: s.start for s in read_sends(record) if s.job in started}
    if len(sends) != n:
        raise RuntimeError(f"pickup: {len(sends)} of {n} sends recorded")
    claimed = dict(
        db.sql(
            "SELECT id, extract(epoch FROM started_at)::float8 FROM pgqueue.job_history"
            " WHERE id = ANY(%s)",
            (list(started),),
        )
    )
    return {
        "total": [sends[j] - started[j] for j in started],
        "call": call,
        "to_claim": [claimed[j] - started[j] for j in started],
        "claim_to_send": [sends[j] - claimed[j] for j in started],
        "reslots": [float(count_reslots([ctx.path(f"pickup-{run}.log")]))],
    }


async def fig_pickup(ctx: Ctx) -> Section:
    n = 100 if ctx.args.quick else 500
    p50s, p99s, maxs = [], [], []
    parts: dict[str, list[float]] = {"call": [], "to_claim": [], "claim_to_send": []}
    reslots: list[float] = []
    for r in range(ctx.args.runs):
        progress(f"pickup: run {r + 1}/{ctx.args.runs}, {n} messages 10 ms apart ({load_note()})")
        res = await pickup_once(ctx, r, n)
        lat = res["total"]
        p50s.append(percentile(lat, 50) * 1000)
        p99s.append(percentile(lat, 99) * 1000)
        maxs.append(max(lat) * 1000)
        for k in parts:
            parts[k].append(percentile(res[k], 50) * 1000)
        reslots += res["reslots"]
    p50, p99 = median(p50s), median(p99s)
    s = Section(
        f"4. pickup latency: one idle worker, {n} messages enqueued 10 ms apart (one "
        f"enqueue_whatsapp_send each), recording provider without latency, rate lifted, "
        f"global 20, tenant 5"
    )
    s.lines += [
        Line("enqueue start -> provider start, p50, ms", fmt(p50, 2), "≤ 4", p50 <= 4),
        Line("enqueue start -> provider start, p99, ms", fmt(p99, 2), "≤ 15", p99 <= 15),
        Line("max, ms (median of runs)", fmt(median(maxs), 2)),
    ]
    s.details.append(
        f"runs: p50 {runs_note(p50s, 2)} ms; p99 {runs_note(p99s, 2)} ms; "
        f"max {runs_note(maxs, 1)} ms"
    )
    s.details.append(
        f"medians of the parts: enqueue call {runs_note(parts['call'], 2)} ms; enqueue start "
        f"-> claim (server started_at) {runs_note(parts['to_claim'], 2)} ms; claim -> "
        f"provider start {runs_note(parts['claim_to_send'], 2)} ms; sends that took a new "
        f"rate slot {runs_note(reslots)} (incl. warm-up)"
    )
    s.details.append("reference (PEERS.md): PgQueuer 7.7 / 81 ms, Procrastinate 4.6 / 16.4 ms")
    return s


# -- 5. fairness -------------------------------------------------------------------------


async def fairness_once(
    ctx: Ctx, run: int, big_concurrency: int | None, seconds: int
) -> dict[str, float]:
    from pgqueue.db import connect
    from pgqueue.enqueue import enqueue_whatsapp_send
    from pgqueue.models import Message
    from tests.support.recording import read_sends

    db = ctx.db
    db.prepare(tenants=11, limits=DEFAULT_LIMITS)
    if big_concurrency is not None:
        db.sql(
            "UPDATE pgqueue.tenants SET max_concurrency = %s WHERE id = %s",
            (big_concurrency, tenant_name(0)),
        )
    db.pause_all(True)
    await db.enqueue(backlog([0], phones=300, per_conversation=10, tag="[big] "))
    ctx.notes.update(db.settle())
    tag = f"fair-{run}-{big_concurrency or 'default'}"
    record = ctx.path(f"{tag}.jsonl")
    started: dict[int, float] = {}
    small = 10
    with workers([recording_worker(db.url, record, ctx.path(f"{tag}.log"), latency=0.150)]):
        db.wait_workers(1)
        await asyncio.sleep(0.5)
        db.pause_all(False)
        await asyncio.sleep(1.0)  # the big tenant's backlog is being worked on
        conn = await connect(db.url, application_name="bench-fairness")
        try:
            schedule = sorted(
                (k + s * 0.1, s, k) for s in range(1, small + 1) for k in range(seconds)
            )
            t0 = time.time()
            for offset, s_, k in schedule:
                await sleep_until(t0 + offset)
                msg = Message(
                    tenant_id=tenant_name(s_),
                    phone_number=phone(3000 + s_ * 100 + k),
                    text=TEXT.format(i=k),
                )
                t = time.time()
                e = await enqueue_whatsapp_send(conn, msg, queue=QUEUE)
                started[e.job_id] = t
        finally:
            await conn.close()
        deadline = time.monotonic() + 30
        while True:
            done = int(
                db.scalar(
                    "SELECT count(*) FROM pgqueue.job_history WHERE tenant_id <> %s",
                    (tenant_name(0),),
                )
            )
            if done >= len(started):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"fairness: {done}/{len(started)} small messages sent")
            time.sleep(0.1)
    sends = read_sends(record)
    lat = [s.start - started[s.job] for s in sends if s.job in started]
    window = [s for s in sends if s.tenant == tenant_name(0) and t0 <= s.start <= t0 + seconds]
    return {
        "p50": percentile(lat, 50),
        "p95": percentile(lat, 95),
        "max": max(lat),
        "n": len(lat),
        "big_rate": len(window) / seconds,
    }


async def fig_fairness(ctx: Ctx) -> Section:
    seconds = 5 if ctx.args.quick else 20
    s = Section(
        f"5. fairness: tenant {tenant_name(0)} has 3,000 messages queued (300 conversations); "
        f"ten other tenants send 1 message/s each for {seconds} s to new conversations; one "
        f"worker, provider 150 ms, {DEFAULT_LIMITS.describe()}"
    )
    for big in (None, 20):
        res = []
        for r in range(ctx.args.runs):
            progress(
                f"fairness (big tenant concurrency {big or 'default'}): run "
                f"{r + 1}/{ctx.args.runs} ({load_note()})"
            )
            res.append(await fairness_once(ctx, r, big, seconds))
        p95 = median([x["p95"] for x in res])
        label = (
            "default limits (big tenant 5 in flight)"
            if big is None
            else f"big tenant allowed {big} in flight (fills global and rate)"
        )
        s.lines.append(Line(f"{label}: small tenants p95, s", fmt(p95, 3), "≤ 1.0", p95 <= 1.0))
        s.details.append(
            f"{label}: p50 {runs_note([x['p50'] for x in res], 3)} s, "
            f"p95 {runs_note([x['p95'] for x in res], 3)} s, "
            f"max {runs_note([x['max'] for x in res], 3)}"
            f" s over {res[0]['n']:.0f} messages; big tenant kept sending at "
            f"{runs_note([x['big_rate'] for x in res], 1)}/s meanwhile"
        )
    return s


# -- 6. memory ---------------------------------------------------------------------------


def _vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


class RssSampler:
    """A worker's RSS: `idle` when started, then sampled every 20 ms until `stop()`, plus
    the kernel's high-water mark (VmHWM) at the end."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.proc = psutil.Process(pid)
        self.samples: list[int] = []
        self.idle = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.idle = max(self.proc.memory_info().rss for _ in range(3))
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.proc.memory_info().rss)
            time.sleep(0.02)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        mb = 1024 * 1024
        return {
            "idle": self.idle / mb,
            "peak": max(self.samples, default=0) / mb,
            "hwm": _vm_hwm(self.proc.pid) / mb,
        }


async def memory_once(ctx: Ctx, run: int, jobs: int) -> dict[str, float]:
    db = ctx.db
    db.prepare(tenants=TP_TENANTS, limits=LIFTED_LIMITS)
    ctx.notes.update(db.settle())
    msgs = backlog(range(TP_TENANTS), TP_PHONES, max(jobs // (TP_TENANTS * TP_PHONES), 1))
    with workers([noop_worker(db.url, ctx.path(f"memory-{run}.log"))]) as procs:
        db.wait_workers(1)
        await asyncio.sleep(3.0)
        rss = RssSampler(procs[0].pid)
        rss.start()
        try:
            await db.enqueue(msgs)
            db.wait_completed(len(msgs), timeout=300, procs=procs, interval=0.2)
        finally:
            result = rss.stop()
    return result


async def fig_memory(ctx: Ctx) -> Section:
    jobs = 2000 if ctx.args.quick else 20_000
    res = list(ctx.memory)
    if res:
        how = (
            f"the 1-worker runs of figure 2: idle for 2 s with {jobs:,} jobs queued "
            f"and every tenant paused, then draining them"
        )
    else:
        how = f"idle for 3 s, then draining {jobs:,} jobs enqueued while it runs"
        for r in range(ctx.args.runs):
            progress(f"memory: run {r + 1}/{ctx.args.runs}, {jobs:,} jobs ({load_note()})")
            res.append(await memory_once(ctx, r, jobs))
    idle, peak, hwm = (median([x[k] for x in res]) for k in ("idle", "peak", "hwm"))
    s = Section(
        f"6. memory: one worker process (no-op provider, concurrency 20, limits lifted), "
        f"measured in {how}"
    )
    s.lines += [
        Line("RSS idle, MB", fmt(idle, 1), "≤ 60", idle <= 60),
        Line("RSS peak while draining (sampled every 20 ms), MB", fmt(peak, 1), "≤ 60", peak <= 60),
        Line("VmHWM (kernel's peak RSS of the process), MB", fmt(hwm, 1), "≤ 60", hwm <= 60),
    ]
    s.details.append(
        "runs: idle "
        + runs_note([x["idle"] for x in res], 1)
        + " MB; peak "
        + runs_note([x["peak"] for x in res], 1)
        + " MB; VmHWM "
        + runs_note([x["hwm"] for x in res], 1)
        + " MB"
    )
    return s


RUNNERS = {
    "rate": fig_rate,
    "throughput": fig_throughput,
    "claim": fig_claim,
    "pickup": fig_pickup,
    "fairness": fig_fairness,
    "memory": fig_memory,
}

# -- report ------------------------------------------------------------------------------


def code_state() -> str:
    """The commit measured, and whether pgqueue/ differed from it."""

    def git(*a: str) -> str:
        out = subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=False)
        return out.stdout.rstrip("\n")

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "pgqueue", "migrations").splitlines()
    changed = ", ".join(line[3:] for line in dirty)
    return f"commit {head}" + (f" + uncommitted changes in {changed}" if dirty else " (clean)")


def print_report(sections: Sequence[Section], header: Sequence[str]) -> None:
    for line in header:
        print(line)
    for s in sections:
        print()
        print(s.title)
        print(
            render_table(
                ["figure", "value", "target", "verdict"],
                [[ln.figure, ln.value, ln.target, ln.verdict] for ln in s.lines],
            )
        )
        for d in s.details:
            print(f"  {d}")
    judged = [(s.title.split(":")[0], ln) for s in sections for ln in s.lines if ln.ok is not None]
    if judged:
        print()
        print(
            f"summary: {sum(1 for _, ln in judged if ln.ok)} PASS, "
            f"{sum(1 for _, ln in judged if not ln.ok)} MISS"
            + "".join(
                f"\n  MISS {fig}: {ln.figure} = {ln.value} (target {ln.target})"
                for fig, ln in judged
                if not ln.ok
            )
        )


async def run(args: argparse.Namespace) -> int:
    # The recording provider and the harness live in tests/.
    sys.path.insert(0, str(ROOT))
    tmp = Path(tempfile.mkdtemp(prefix="pgqueue-dispatch-"))
    started = time.monotonic()
    sections: list[Section] = []
    with server_url(args.database_url) as (url, source), ExitStack() as stack:
        facts = server_facts(url)
        progress(f"server: {redact(url)} ({source}); logs and records in {tmp}")
        pg_url = stack.enter_context(
            scratch_database(url, "bench_dispatch", keep=args.keep_databases)
        )
        db = PgqueueDb(pg_url)
        db.install()
        peer_urls: dict[str, str] = {}
        if "throughput" in args.figures:
            for peer in args.peers:
                peer_urls[peer] = stack.enter_context(
                    scratch_database(
                        url, f"bench_dispatch_{peer.lower()}", keep=args.keep_databases
                    )
                )
                await peer_install(peer, peer_urls[peer])
        ctx = Ctx(args=args, db=db, tmp=tmp, peer_urls=peer_urls)
        loads = [load_note()]
        others = OthersCpu("bench_dispatch")
        others.start()
        for name in args.figures:
            mark, io_before = others.mark(), io_stalled_s()
            section = await RUNNERS[name](ctx)
            share = OthersCpu.share(mark, others.mark())
            if not math.isnan(share):  # nan: measured within another figure (memory)
                section.details.append(
                    f"other processes on the machine (not this benchmark) used {share:.2f} "
                    f"of the 2 cores on average during this figure"
                )
                io_after = io_stalled_s()
                if io_before is not None and io_after is not None:
                    section.details.append(
                        "every task on the machine waited for the disk (/proc/pressure/io "
                        f"full) {(io_after - io_before) * 1000:.0f} ms in all during this "
                        f"figure, over {others.mark()[1] - mark[1]:.0f} s"
                    )
            sections.append(section)
        others.stop()
        loads.append(load_note())
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    header = [
        f"command: {command}",
        f"code:    {code_state()}",
        f"server:  {redact(url)} ({source})",
        f"         {facts['version']}",
        f"         fsync={facts['fsync']} synchronous_commit={facts['synchronous_commit']} "
        f"shared_buffers={facts['shared_buffers']}",
        f"machine: {loads[0]} before the first figure, {loads[1]} after the last; took "
        f"{time.monotonic() - started:.0f} s",
        f"runs:    {args.runs} per figure (tables show the median unless they say worst run)"
        + ("; --quick: smaller workloads, not the issue's figures" if args.quick else ""),
    ]
    print_report(sections, header)
    for note in sorted(ctx.notes):
        print(f"note: {note}")
    if args.keep_logs:
        print(f"worker logs and send records kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if all(ln.ok is not False for s in sections for ln in s.lines) else 1


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument(
        "figures",
        nargs="*",
        metavar="FIGURE",
        help="any of " + ", ".join(FIGURES) + " (default: all)",
    )
    p.add_argument(
        "--database-url",
        help="server to measure on (default: DATABASE_URL, else the embedded server)",
    )
    p.add_argument("--runs", type=int, default=None, help="runs per figure, median (default 3)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: small workloads, 1 run (not the issue's figures)",
    )
    p.add_argument(
        "--peers",
        default="PgQueuer,Procrastinate",
        help="peers in the throughput figure (comma-separated; '' for none)",
    )
    p.add_argument("--keep-logs", action="store_true", help="keep worker logs and send records")
    p.add_argument("--keep-databases", action="store_true", help="do not drop scratch databases")
    args = p.parse_args(argv)
    unknown = [f for f in args.figures if f not in FIGURES]
    if unknown:
        p.error(f"unknown figure(s) {', '.join(unknown)}; choose from {', '.join(FIGURES)}")
    args.figures = [f for f in FIGURES if f in args.figures] or list(FIGURES)
    args.runs = args.runs or (1 if args.quick else 3)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    peers = {"pgqueuer": "PgQueuer", "procrastinate": "Procrastinate"}
    names = [x.strip().lower() for x in args.peers.split(",") if x.strip()]
    if any(x not in peers for x in names):
        p.error("--peers: choose from PgQueuer, Procrastinate")
    args.peers = [peers[x] for x in names]
    return args


def peer_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="dispatch.py _peer")
    p.add_argument("name", choices=["PgQueuer", "Procrastinate"])
    p.add_argument("--url", required=True)
    p.add_argument("--jobs", type=int, required=True)
    p.add_argument("--concurrency", type=int, default=20)
    a = p.parse_args(argv)
    result = asyncio.run(peer_worker(a.name, a.url, a.jobs, a.concurrency))
    print(json.dumps(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_peer"]:
        return peer_main(argv[1:])
    return asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
