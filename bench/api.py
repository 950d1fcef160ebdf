"""The HTTP API under load: enqueue throughput and latency, and the metrics endpoint with a
million finished jobs in history.

    .venv/bin/python bench/api.py [--database-url URL] [--clients 50] [--duration 20]
                                  [--rate 800] [--history 1000000] [--json FILE]

1. Enqueue, as fast as possible: `--clients` keep-alive connections each POST
   /api/whatsapp/send in a loop for `--duration` seconds (after `--warmup`) against one
   `pgqueue serve` process (one uvicorn worker). Each client waits for its answer, so
   latency here is clients / throughput (Little's law), not the server's own speed.
2. Enqueue, paced: the same clients send `--rate` requests/s in all on a fixed
   schedule; latency counts from when a request was due (no coordinated omission).
   This is the run the latency target is about.
   Messages spread over 10 tenants (one token each) and 2,000 conversations. Both runs
   report requests/s, p50/p99/max, non-202 answers and the API process's CPU time per
   request (a figure that other load on the machine disturbs less than latency).
3. Metrics: `--history` finished jobs are written straight into pgqueue.job_history
   (INSERT ... SELECT generate_series into its partitions), the tenants' counters set to
   match, then GET /api/queue/metrics is timed one request at a time, for the admin and
   a tenant view: first with the enqueue runs' backlog still live (no worker drained
   it), then with the queue empty. Redis is not used: every answer is the database's.

Everything runs in a scratch database (`pgqueue_bench_api`) on the server of
--database-url (else DATABASE_URL, else the embedded server), dropped at the end. The
load generator is a minimal HTTP/1.1 client on asyncio streams in this process, so
client, API and PostgreSQL share the machine's cores: the figures include that.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
from _common import (
    fmt_number,
    percentile,
    progress,
    redact,
    render_table,
    scratch_database,
    server_facts,
    server_url,
)

from pgqueue import migrate
from pgqueue.admin import hash_token

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/support: the launchers and helpers the tests use too

from pgqueue.server import free_port  # noqa: E402
from tests.support.serve import start_serve, stop_serve  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DBNAME = "pgqueue_bench_api"
ADMIN = "bench-admin-token-0123456789abcdef"
TENANTS = 10
PHONES = 200
TEXT = "Hola! Your order #{n} is ready for pickup at the counter. Thank you!"


# -- set-up ------------------------------------------------------------------------------


def prepare(url: str) -> dict[str, str]:
    """Migrate, add the tenants and one token each; returns tenant -> token."""
    migrate.upgrade(url)
    tokens = {}
    with psycopg.connect(url, autocommit=True) as conn:
        for i in range(TENANTS):
            tenant = f"bench-{i}"
            conn.execute(
                "INSERT INTO pgqueue.tenants (id, name, account_sid, auth_token, whatsapp_from) "
                "VALUES (%s, %s, %s, %s, '+14155550100')",
                (tenant, tenant, "AC" + "0" * 32, "bench-auth-token"),
            )
            token = f"pgq_bench_token_{i:02d}_" + "x" * 24
            conn.execute(
                "INSERT INTO pgqueue.api_tokens (tenant_id, token_hash, prefix) "
                "VALUES (%s, %s, %s)",
                (tenant, hash_token(token), token[:12]),
            )
            tokens[tenant] = token
    return tokens


def fill_history(url: str, n: int) -> float:
    """`n` finished jobs in history (2 % dead letters), and the tenants' counters to match."""
    started = time.monotonic()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pgqueue.ensure_history_partitions(3)")
        conn.execute(
            """
            INSERT INTO pgqueue.job_history (
                id, seq, queue, tenant_id, conversation, priority, run_at, to_number, body,
                attempts, max_attempts, last_error_code, provider_sid, provider_status,
                channel, created_at, started_at, state, finished_at)
            SELECT g + 1000000000, g + 1000000000, 'whatsapp-send', 'bench-' || (g %% 10),
                   'bench-' || (g %% 10) || ':+1415555' || lpad((g %% 2000)::text, 4, '0'),
                   0, now() - interval '1 hour', '+1415555' || lpad((g %% 2000)::text, 4, '0'),
                   'history', 1, 4,
                   CASE WHEN g %% 50 = 0 THEN '21211' END,
                   'SM' || md5(g::text),
                   CASE WHEN g %% 50 = 0 THEN NULL ELSE 'delivered' END,
                   'freeform', now() - interval '1 hour', now() - interval '1 hour',
                   CASE WHEN g %% 50 = 0 THEN 'failed' ELSE 'completed' END,
                   now() - make_interval(secs => g %% 3000)
            FROM generate_series(1, %s) AS g
            """,
            (n,),
        )
        conn.execute(
            """
            INSERT INTO pgqueue.tenant_totals (tenant_id, shard, completed, failed)
            SELECT tenant_id, 0, count(*) FILTER (WHERE state = 'completed'),
                   count(*) FILTER (WHERE state = 'failed')
            FROM pgqueue.job_history GROUP BY tenant_id
            ON CONFLICT (tenant_id, shard) DO UPDATE
            SET completed = excluded.completed, failed = excluded.failed
            """
        )
        conn.execute("VACUUM ANALYZE")
    return time.monotonic() - started


# -- the server --------------------------------------------------------------------------


def start_server(url: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    try:
        return start_serve(url, port, log, {"PGQUEUE_ADMIN_TOKEN": ADMIN})
    except RuntimeError as e:
        raise SystemExit(str(e)) from None


# -- a minimal HTTP/1.1 client -------------------------------------------------------------


class Connection:
    """One keep-alive connection; a request is written whole and its answer read whole.
    Kept this small so the load generator takes little of the CPU it shares."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)

    async def request(
        self, method: str, path: str, headers: dict[str, str], body: bytes = b""
    ) -> tuple[int, bytes]:
        assert self.reader is not None and self.writer is not None
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        head += f"Content-Length: {len(body)}\r\n\r\n"
        self.writer.write(head.encode() + body)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        status = int(raw[9:12])
        length = 0
        for line in raw.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        payload = await self.reader.readexactly(length) if length else b""
        return status, payload

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()


async def enqueue_load(
    port: int, tokens: list[str], clients: int, duration: float, warmup: float
) -> dict[str, Any]:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    counter = 0
    measuring = False
    stop_at = 0.0

    async def client(i: int) -> None:
        nonlocal counter
        conn = Connection(port)
        await conn.open()
        token = tokens[i % len(tokens)]
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        try:
            while time.monotonic() < stop_at:
                counter += 1
                n = counter
                body = json.dumps(
                    {"phoneNumber": f"+1415555{(n % PHONES) + 1000:04d}", "text": TEXT.format(n=n)}
                ).encode()
                started = time.perf_counter()
                status, _ = await conn.request("POST", "/api/whatsapp/send", headers, body)
                elapsed = time.perf_counter() - started
                if measuring:
                    latencies.append(elapsed)
                    statuses[status] = statuses.get(status, 0) + 1
        finally:
            await conn.close()

    stop_at = time.monotonic() + warmup + duration
    tasks = [asyncio.create_task(client(i)) for i in range(clients)]
    await asyncio.sleep(warmup)
    measuring = True
    measured_from = time.monotonic()
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - measured_from
    return {
        "sent": counter,
        "requests": len(latencies),
        "seconds": elapsed,
        "rps": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "max_ms": max(latencies) * 1000,
        "statuses": statuses,
    }


async def paced_load(
    port: int, tokens: list[str], clients: int, rate: float, duration: float, warmup: float
) -> dict[str, Any]:
    """Open loop: `rate` requests/s in all, spread evenly over the clients. Latency counts
    from when a request was due, not when it went out, so a slow answer that delays the
    next request of its client is charged to it (no coordinated omission)."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    late = 0
    last_done = 0.0
    sent = 0
    interval = clients / rate
    start = time.perf_counter() + 0.1
    measure_from = start + warmup
    end = measure_from + duration

    async def client(i: int) -> None:
        nonlocal late, last_done, sent
        conn = Connection(port)
        await conn.open()
        headers = {
            "Authorization": f"Bearer {tokens[i % len(tokens)]}",
            "Content-Type": "application/json",
        }
        due = start + interval * i / clients
        n = i
        try:
            while due < end:
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                n += clients
                body = json.dumps(
                    {"phoneNumber": f"+1415555{(n % PHONES) + 1000:04d}", "text": TEXT.format(n=n)}
                ).encode()
                status, _ = await conn.request("POST", "/api/whatsapp/send", headers, body)
                sent += 1
                done = time.perf_counter()
                if due >= measure_from:
                    last_done = max(last_done, done)
                    latencies.append(done - due)
                    statuses[status] = statuses.get(status, 0) + 1
                    if done > due + interval:
                        late += 1
                due += interval
        finally:
            await conn.close()

    await asyncio.gather(*(client(i) for i in range(clients)))
    return {
        "sent": sent,
        "requests": len(latencies),
        "rate": rate,
        # Answers per second actually delivered: a server that falls behind takes longer
        # than `duration` to answer what was due in it.
        "rps": len(latencies) / max(last_done - measure_from, duration),
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "max_ms": max(latencies) * 1000,
        "statuses": statuses,
        "late": late,
    }


async def metrics_latency(port: int, token: str, n: int) -> dict[str, Any]:
    conn = Connection(port)
    await conn.open()
    latencies = []
    body = b""
    try:
        headers = {"Authorization": f"Bearer {token}"}
        for _ in range(20):  # warm-up
            await conn.request("GET", "/api/queue/metrics", headers)
        for _ in range(n):
            started = time.perf_counter()
            status, body = await conn.request("GET", "/api/queue/metrics", headers)
            latencies.append(time.perf_counter() - started)
            if status != 200:
                raise SystemExit(f"metrics answered {status}: {body[:200]!r}")
    finally:
        await conn.close()
    return {
        "requests": n,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "max_ms": max(latencies) * 1000,
        "answer": json.loads(body),
    }


def drain(url: str) -> None:
    """The queue as after its backlog was sent (history untouched): a bench shortcut."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DELETE FROM pgqueue.jobs")
        conn.execute("DELETE FROM pgqueue.conversations")
        conn.execute("VACUUM ANALYZE pgqueue.jobs, pgqueue.conversations")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def count(url: str, query: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(query).fetchone()
        return int(row[0]) if row else 0


# -- main ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--database-url", help="any database of the server to use")
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--duration", type=float, default=20.0, help="seconds measured")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--rate", type=float, default=800.0, help="requests/s of the paced run")
    p.add_argument("--history", type=int, default=1_000_000, help="finished jobs in history")
    p.add_argument("--metrics-requests", type=int, default=1000)
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--keep", action="store_true", help="keep the scratch database")
    args = p.parse_args(argv)
    command = "python bench/api.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))

    load_before = os.getloadavg()[0]
    with server_url(args.database_url) as (base_url, source):
        facts = server_facts(base_url)
        progress(f"server: {redact(base_url)} ({source}); scratch database {DBNAME}")
        with scratch_database(base_url, DBNAME, keep=args.keep) as url:
            tokens = prepare(url)
            port = free_port()
            log = Path(f"/tmp/pgqueue-bench-api-{os.getpid()}.log")
            proc = start_server(url, port, log)
            try:
                progress(f"enqueue: {args.clients} clients for {args.duration:g} s ...")
                cpu = cpu_seconds(proc.pid)
                load = asyncio.run(
                    enqueue_load(
                        port, list(tokens.values()), args.clients, args.duration, args.warmup
                    )
                )
                load["server_cpu_ms"] = (cpu_seconds(proc.pid) - cpu) * 1000 / load["sent"]
                progress(
                    f"enqueue: {args.rate:g} requests/s paced over {args.clients} clients "
                    f"for {args.duration:g} s ..."
                )
                cpu = cpu_seconds(proc.pid)
                paced = asyncio.run(
                    paced_load(
                        port,
                        list(tokens.values()),
                        args.clients,
                        args.rate,
                        args.duration,
                        args.warmup,
                    )
                )
                paced["server_cpu_ms"] = (cpu_seconds(proc.pid) - cpu) * 1000 / paced["sent"]
                live = count(url, "SELECT count(*) FROM pgqueue.jobs")
                progress(f"history: writing {args.history:,} finished jobs ...")
                fill_s = fill_history(url, args.history)
                in_history = count(url, "SELECT count(*) FROM pgqueue.job_history")
                progress("metrics: timing GET /api/queue/metrics ...")
                views = {}
                for backlog in (True, False):
                    if not backlog:
                        drain(url)
                    for who, token in (("admin", ADMIN), ("tenant", tokens["bench-3"])):
                        views[(backlog, who)] = asyncio.run(
                            metrics_latency(port, token, args.metrics_requests)
                        )
            finally:
                stop_serve(proc)
            server_log = log.read_text()
            log.unlink(missing_ok=True)

    print(f"pgqueue API benchmark: {command}")
    print(
        f"server: PostgreSQL {facts['version'].split(' on ')[0]}, synchronous_commit="
        f"{facts['synchronous_commit']}, fsync={facts['fsync']}; {os.cpu_count()} CPUs shared "
        "by the load generator, one uvicorn worker and PostgreSQL"
    )
    print(
        f"machine load average (1 min) before {load_before:.2f}, after "
        f"{os.getloadavg()[0]:.2f}: anything else running shares these CPUs"
    )
    print()

    def row(name: str, key: str, digits: int, target_max: str, target_paced: str) -> list[str]:
        return [
            name,
            fmt_number(load[key], digits),
            target_max,
            fmt_number(paced[key], digits),
            target_paced,
        ]

    print(
        render_table(
            [
                "POST /api/whatsapp/send",
                "as fast as possible",
                "target",
                f"paced at {args.rate:g}/s",
                "target",
            ],
            [
                [
                    "clients (keep-alive connections)",
                    str(args.clients),
                    "50",
                    str(args.clients),
                    "50",
                ],
                [
                    "requests measured",
                    fmt_number(load["requests"]),
                    "",
                    fmt_number(paced["requests"]),
                    "",
                ],
                [
                    "answered 202",
                    fmt_number(load["statuses"].get(202, 0)),
                    "all",
                    fmt_number(paced["statuses"].get(202, 0)),
                    "all",
                ],
                row("requests/s", "rps", 0, ">= 800", ">= 800"),
                row("p50 ms", "p50_ms", 1, "", ""),
                row("p99 ms", "p99_ms", 1, "", "<= 25"),
                row("max ms", "max_ms", 1, "", ""),
                row("API process CPU ms per request", "server_cpu_ms", 2, "", ""),
            ],
        )
    )
    print(
        "\n(as fast as possible, each client waits for its answer before the next request, "
        "so its latency is clients / throughput; paced, latency counts from when a request "
        f"was due, and {paced['late']} of them answered later than the next one was due)"
    )
    for name, run in (("as fast as possible", load), ("paced", paced)):
        if set(run["statuses"]) - {202}:
            print(f"other answers ({name}): {run['statuses']}")
    print()

    def cells(key: str, digits: int = 2) -> list[str]:
        return [
            fmt_number(views[(b, w)][key], digits)
            for b in (True, False)
            for w in ("admin", "tenant")
        ]

    print(
        render_table(
            ["GET /api/queue/metrics", "admin", "tenant", "admin", "tenant", "target"],
            [
                ["finished jobs in history", *[fmt_number(in_history)] * 4, "1,000,000"],
                ["live jobs", fmt_number(live), fmt_number(live), "0", "0", ""],
                ["requests (one at a time)", *cells("requests", 0), ""],
                ["p50 ms", *cells("p50_ms"), ""],
                ["p99 ms", *cells("p99_ms"), "< 20"],
                ["max ms", *cells("max_ms"), ""],
            ],
        )
    )
    print(
        f"\n(first two columns: with the enqueue runs' {live:,} unsent messages still live, "
        "as under a backlog with no worker; last two: the same history, the queue empty. "
        f"History written in {fill_s:.1f} s. Admin answer with the backlog: "
        f"{json.dumps(views[(True, 'admin')]['answer'])})"
    )
    if "Traceback" in server_log:
        print("\nthe server logged a traceback:\n" + server_log[-3000:])
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "command": command,
                    "enqueue": load,
                    "metrics": {
                        f"{'backlog' if b else 'empty'}_{w}": v for (b, w), v in views.items()
                    },
                    "history": in_history,
                    "live": live,
                },
                indent=2,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
