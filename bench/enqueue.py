"""Enqueue throughput and latency of pgqueue, PgQueuer and Procrastinate, side by side.

    .venv/bin/python bench/enqueue.py [--database-url URL] [--runs 3] [--quick] [--json FILE]

Figures, each the median of --runs runs, for every system on the same server in the
same run (the systems take turns within each run, so drift hits them alike):

1. one awaited call per message, N messages in sequence -> messages/s;
2. the batch API, B batches of S messages -> messages/s;
3. p50 / p99 latency of one call, from the calls of each run of figure 1.

The messages are alike for every system: 200 conversations (10 tenants x 20 phone
numbers), short text. pgqueue gets `Message`s and validates them (E.164 parsing is
part of its cost); PgQueuer gets a JSON payload per job; Procrastinate gets task
kwargs and a `lock` per conversation (its per-key serial order, what pgqueue's
conversations give). Each system works in a scratch database of its own, dropped at the
end; every measurement starts from emptied tables, VACUUM ANALYZE and CHECKPOINT, after
a short warm-up on the same connection.

Needs the `bench` extra: pip install -e '.[bench]'.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import shlex
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    count_rows,
    cpu_busy,
    fmt_number,
    fmt_ratio,
    fresh_tables,
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

QUEUE = "whatsapp-send"
TEXT = "Hola! Your order #{i} is ready for pickup at the counter. Thank you!"
WARMUP = 20


@dataclass(frozen=True)
class Workload:
    sequential: int
    batches: int
    batch_size: int
    tenants: int
    phones: int

    @property
    def conversations(self) -> int:
        return self.tenants * self.phones

    def spec(self, i: int) -> tuple[str, str, str]:
        """Tenant, phone number and text of message i; consecutive messages go to
        different conversations, as they would from many restaurants at once."""
        conv = i % self.conversations
        tenant = f"restaurant-{conv // self.phones:03d}"
        # +1 415 555 1000.. : valid for phonenumbers (checked at start), one per conversation.
        phone = f"+1415555{1000 + conv:04d}"
        return tenant, phone, TEXT.format(i=i)


@dataclass
class Figures:
    sequential_rates: list[float] = field(default_factory=list)
    batch_rates: list[float] = field(default_factory=list)
    p50_ms: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        return {
            "sequential_per_s": median(self.sequential_rates),
            "batch_per_s": median(self.batch_rates),
            "p50_ms": median(self.p50_ms),
            "p99_ms": median(self.p99_ms),
        }


class System:
    """One queue under test: how to install it, and its enqueue calls on an open session."""

    name = ""
    dbname = ""
    jobs_table = ""
    keep: tuple[str, ...] = ()

    def __init__(self, workload: Workload) -> None:
        self.workload = workload

    async def install(self, url: str) -> None:
        raise NotImplementedError

    async def open(self, url: str) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    def inputs(self, indexes: range) -> list[Any]:
        """What a caller has in hand before calling enqueue (built outside the timing)."""
        raise NotImplementedError

    async def one(self, item: Any) -> None:
        raise NotImplementedError

    async def many(self, items: Sequence[Any]) -> None:
        raise NotImplementedError


class Pgqueue(System):
    name = "pgqueue"
    dbname = "bench_pgqueue"
    jobs_table = "pgqueue.jobs"
    keep = ("pgqueue.tenants", "pgqueue.queues", "pgqueue.alembic_version")

    async def install(self, url: str) -> None:
        from pgqueue import admin, migrate, queries
        from pgqueue.db import connect

        await asyncio.to_thread(migrate.upgrade, url)
        conn = await connect(url)
        try:
            await queries.ensure_queue(conn, QUEUE)
            for t in range(self.workload.tenants):
                await admin.add_tenant(
                    conn,
                    tenant_id=f"restaurant-{t:03d}",
                    account_sid="AC" + f"{t:032x}",
                    auth_token="bench-auth-token",
                    whatsapp_from=f"+1415555{t:04d}",
                )
        finally:
            await conn.close()

    async def open(self, url: str) -> None:
        from pgqueue.db import connect
        from pgqueue.enqueue import enqueue_whatsapp_send, enqueue_whatsapp_send_batch

        self.conn = await connect(url, application_name="bench-pgqueue")
        self._one = enqueue_whatsapp_send
        self._many = enqueue_whatsapp_send_batch

    async def close(self) -> None:
        await self.conn.close()

    def inputs(self, indexes: range) -> list[Any]:
        from pgqueue.models import Message

        out = []
        for i in indexes:
            tenant, phone, text = self.workload.spec(i)
            out.append(Message(tenant_id=tenant, phone_number=phone, text=text))
        return out

    async def one(self, item: Any) -> None:
        await self._one(self.conn, item, queue=QUEUE)

    async def many(self, items: Sequence[Any]) -> None:
        await self._many(self.conn, items, queue=QUEUE)


def _asyncpg_params(url: str) -> dict[str, Any]:
    import psycopg

    p = psycopg.conninfo.conninfo_to_dict(url)
    return {
        "host": p.get("host"),
        "port": int(p["port"]) if p.get("port") else None,
        "user": p.get("user"),
        "password": p.get("password"),
        "database": p.get("dbname"),
    }


class Pgqueuer(System):
    name = "PgQueuer"
    dbname = "bench_pgqueuer"
    jobs_table = "pgqueuer"
    entrypoint = "whatsapp_send"

    async def install(self, url: str) -> None:
        import asyncpg
        from pgqueuer.queries import Queries

        conn = await asyncpg.connect(**_asyncpg_params(url))
        try:
            await Queries.from_asyncpg_connection(conn).install()
        finally:
            await conn.close()

    async def open(self, url: str) -> None:
        import asyncpg
        from pgqueuer.queries import Queries

        self.conn = await asyncpg.connect(**_asyncpg_params(url))
        self.queries = Queries.from_asyncpg_connection(self.conn)

    async def close(self) -> None:
        await self.conn.close()

    def inputs(self, indexes: range) -> list[Any]:
        out = []
        for i in indexes:
            tenant, phone, text = self.workload.spec(i)
            out.append(json.dumps({"tenant": tenant, "to": phone, "text": text}).encode())
        return out

    async def one(self, item: Any) -> None:
        await self.queries.enqueue(self.entrypoint, item)

    async def many(self, items: Sequence[Any]) -> None:
        n = len(items)
        await self.queries.enqueue([self.entrypoint] * n, list(items), [0] * n)


class Procrastinate(System):
    name = "Procrastinate"
    dbname = "bench_procrastinate"
    jobs_table = "procrastinate_jobs"

    def _app(self, url: str) -> Any:
        import procrastinate

        # Its warning about an App built in __main__ concerns workers importing tasks,
        # not deferring; without it stderr stays readable. Its info lines are off anyway.
        logging.getLogger("procrastinate").setLevel(logging.ERROR)

        app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))

        @app.task(name="whatsapp_send", queue=QUEUE)
        async def whatsapp_send(tenant: str, to: str, text: str) -> None:
            return None

        self.task = whatsapp_send
        return app

    async def install(self, url: str) -> None:
        app = self._app(url)
        async with app.open_async():
            await app.schema_manager.apply_schema_async()

    async def open(self, url: str) -> None:
        self.app = self._app(url)
        await self.app.open_async()

    async def close(self) -> None:
        await self.app.close_async()

    def inputs(self, indexes: range) -> list[Any]:
        out = []
        for i in indexes:
            tenant, phone, text = self.workload.spec(i)
            out.append((f"{tenant}:{phone}", {"tenant": tenant, "to": phone, "text": text}))
        return out

    async def one(self, item: Any) -> None:
        lock, kwargs = item
        await self.task.configure(lock=lock).defer_async(**kwargs)

    async def many(self, items: Sequence[Any]) -> None:
        # Task.batch_defer_async gives every job the same lock; jobs of different
        # conversations need the job manager's batch call (see PEERS.md).
        jobs = [self.task.configure(lock=lock).make_new_job(**kwargs) for lock, kwargs in items]
        await self.app.job_manager.batch_defer_jobs_async(jobs)


SYSTEMS: dict[str, type[System]] = {
    "pgqueue": Pgqueue,
    "pgqueuer": Pgqueuer,
    "procrastinate": Procrastinate,
}


async def warm_up(system: System) -> None:
    """Prepared statements, caches and imports, before the tables are emptied."""
    await system.many(system.inputs(range(10**7, 10**7 + WARMUP)))
    for item in system.inputs(range(2 * 10**7, 2 * 10**7 + WARMUP)):
        await system.one(item)


async def measure_sequential(
    system: System, url: str, n: int, notes: set[str]
) -> tuple[float, list[float]]:
    await system.open(url)
    try:
        await warm_up(system)
        items = system.inputs(range(n))
        notes.update(fresh_tables(url, keep=system.keep))
        latencies: list[float] = []
        clock = time.perf_counter
        start = clock()
        for item in items:
            t0 = clock()
            await system.one(item)
            latencies.append(clock() - t0)
        elapsed = clock() - start
    finally:
        await system.close()
    check_count(system, url, n)
    return n / elapsed, latencies


async def measure_batch(
    system: System, url: str, batches: int, size: int, notes: set[str]
) -> float:
    await system.open(url)
    try:
        await warm_up(system)
        chunks = [system.inputs(range(b * size, (b + 1) * size)) for b in range(batches)]
        notes.update(fresh_tables(url, keep=system.keep))
        start = time.perf_counter()
        for chunk in chunks:
            await system.many(chunk)
        elapsed = time.perf_counter() - start
    finally:
        await system.close()
    check_count(system, url, batches * size)
    return batches * size / elapsed


def check_count(system: System, url: str, expected: int) -> None:
    """Every measured call must have left exactly one job behind."""
    found = count_rows(url, system.jobs_table)
    if found != expected:
        raise SystemExit(f"{system.name}: expected {expected} jobs after the run, found {found}")


def check_workload(workload: Workload) -> None:
    from pgqueue.enqueue import normalize_phone

    for i in range(workload.conversations):
        _, phone, _ = workload.spec(i)
        if normalize_phone(phone) != phone:
            raise SystemExit(f"bench bug: {phone} is not a valid E.164 number")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument(
        "--database-url",
        help="server to measure on (default: DATABASE_URL, else the embedded server)",
    )
    p.add_argument("--runs", type=int, default=None, help="runs per figure (median; default 3)")
    p.add_argument(
        "-n",
        "--messages",
        type=int,
        default=None,
        help="messages in the one-call-each run (default 5000)",
    )
    p.add_argument("--batches", type=int, default=None, help="batches (default 20)")
    p.add_argument("--batch-size", type=int, default=None, help="messages per batch (default 1000)")
    p.add_argument("--tenants", type=int, default=10)
    p.add_argument("--phones", type=int, default=20, help="phone numbers per tenant")
    p.add_argument(
        "--systems",
        default="pgqueue,pgqueuer,procrastinate",
        help="comma-separated subset of: " + ", ".join(SYSTEMS),
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke run: 500 messages, 5 x 200 batches, 1 run"
    )
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    p.add_argument("--keep-databases", action="store_true", help="do not drop scratch databases")
    args = p.parse_args(argv)
    quick = args.quick
    args.runs = args.runs or (1 if quick else 3)
    args.messages = args.messages or (500 if quick else 5000)
    args.batches = args.batches or (5 if quick else 20)
    args.batch_size = args.batch_size or (200 if quick else 1000)
    names = [s.strip().lower() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in names if s not in SYSTEMS]
    if unknown or not names:
        p.error(f"--systems: unknown {', '.join(unknown) or '(none given)'}")
    args.systems = names
    if min(args.runs, args.messages, args.batches, args.batch_size, args.tenants, args.phones) < 1:
        p.error("counts must be at least 1")
    from pgqueue.enqueue import MAX_BATCH

    if args.batch_size > MAX_BATCH:
        p.error(f"--batch-size: pgqueue takes at most {MAX_BATCH} messages per batch")
    if args.tenants * args.phones > 9000:
        p.error("at most 9000 conversations (phone numbers +14155551000..+14155559999)")
    return args


TARGETS = {
    "sequential": "≥ 1.00x PgQueuer",
    "batch": "≥ 20,000/s",
    "p99": "≤ 5 ms",
}


def verdicts(figs: dict[str, dict[str, float]]) -> dict[str, str]:
    ours = figs.get("pgqueue")
    if ours is None:
        return {}
    out: dict[str, str] = {}
    peer = figs.get("PgQueuer")
    if peer is not None:
        r = ratio(ours["sequential_per_s"], peer["sequential_per_s"])
        out["sequential"] = "-" if math.isnan(r) else ("met" if r >= 1.0 else "MISSED")
    out["batch"] = "met" if ours["batch_per_s"] >= 20_000 else "MISSED"
    out["p99"] = "met" if ours["p99_ms"] <= 5.0 else "MISSED"
    return out


def report(
    args: argparse.Namespace,
    workload: Workload,
    figs: dict[str, dict[str, float]],
    runs: dict[str, Figures],
) -> str:
    names = [SYSTEMS[s].name for s in args.systems]
    peers = [n for n in names if n != "pgqueue"]
    headers = ["figure", *names]
    if "pgqueue" in names:
        headers += [f"pgqueue / {p}" for p in peers]
    headers += ["target", "verdict"]
    verdict = verdicts(figs)
    lines = [
        (
            "sequential",
            f"one call each ({workload.sequential:,} msgs), msg/s",
            "sequential_per_s",
            0,
        ),
        ("batch", f"batch ({workload.batches} x {workload.batch_size:,}), msg/s", "batch_per_s", 0),
        ("p50", "one call, p50 latency, ms", "p50_ms", 2),
        ("p99", "one call, p99 latency, ms", "p99_ms", 2),
    ]
    rows = []
    for key, label, metric, digits in lines:
        row = [label] + [fmt_number(figs[n][metric], digits) for n in names]
        if "pgqueue" in names:
            row += [fmt_ratio(ratio(figs["pgqueue"][metric], figs[p][metric])) for p in peers]
        row += [TARGETS.get(key, ""), verdict.get(key, "")]
        rows.append(row)
    out = [render_table(headers, rows), ""]
    out.append("runs (each value is one run; the table shows their median):")
    for n in names:
        f = runs[n]
        out.append(
            f"  {n:<13} one call each: "
            + " / ".join(fmt_number(v) for v in f.sequential_rates)
            + "   batch: "
            + " / ".join(fmt_number(v) for v in f.batch_rates)
            + "   p99 ms: "
            + " / ".join(fmt_number(v, 2) for v in f.p99_ms)
        )
    out.append(
        "ratios are pgqueue's figure over the peer's: above 1 is better for msg/s, "
        "below 1 is better for latency."
    )
    return "\n".join(out)


async def run(args: argparse.Namespace) -> int:
    workload = Workload(
        sequential=args.messages,
        batches=args.batches,
        batch_size=args.batch_size,
        tenants=args.tenants,
        phones=args.phones,
    )
    check_workload(workload)
    with server_url(args.database_url) as (url, source):
        return await measure_all(args, workload, url, source)


async def measure_all(args: argparse.Namespace, workload: Workload, url: str, source: str) -> int:
    busy = cpu_busy()
    facts = server_facts(url)
    systems = [SYSTEMS[s](workload) for s in args.systems]
    runs = {s.name: Figures() for s in systems}
    notes: set[str] = set()

    with ExitStack() as stack:
        urls: dict[str, str] = {}
        for s in systems:
            progress(f"installing {s.name} in scratch database {s.dbname}")
            urls[s.name] = stack.enter_context(
                scratch_database(url, s.dbname, keep=args.keep_databases)
            )
            await s.install(urls[s.name])
        for r in range(1, args.runs + 1):
            # Systems take turns inside each run, so slow drift of the machine is shared,
            # and who goes first rotates from run to run.
            turn = (r - 1) % len(systems)
            order = systems[turn:] + systems[:turn]
            for s in order:
                progress(f"run {r}/{args.runs}: {s.name}, one call each x {workload.sequential}")
                rate, lat = await measure_sequential(s, urls[s.name], workload.sequential, notes)
                runs[s.name].sequential_rates.append(rate)
                runs[s.name].p50_ms.append(percentile(lat, 50) * 1000)
                runs[s.name].p99_ms.append(percentile(lat, 99) * 1000)
            for s in order:
                progress(
                    f"run {r}/{args.runs}: {s.name}, {workload.batches} batches "
                    f"x {workload.batch_size}"
                )
                runs[s.name].batch_rates.append(
                    await measure_batch(
                        s, urls[s.name], workload.batches, workload.batch_size, notes
                    )
                )

    figs = {name: f.summary() for name, f in runs.items()}
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
        + (" - something else was running: figures may be low" if (busy or 0) > 0.1 else "")
    )
    print(
        f"workload: {workload.conversations} conversations ({workload.tenants} tenants x "
        f"{workload.phones} numbers), median of {args.runs} run(s), one connection per system"
    )
    print()
    print(report(args, workload, figs, runs))
    for note in sorted(notes):
        print(f"note: {note}")

    if args.json:
        payload = {
            "command": command,
            "server_version": facts["version"],
            "server_settings": facts,
            "cpu_busy_before_start": busy,
            "workload": workload.__dict__,
            "runs": args.runs,
            "figures": figs,
            "per_run": {name: f.__dict__ for name, f in runs.items()},
            "targets": verdicts(figs),
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return asyncio.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
