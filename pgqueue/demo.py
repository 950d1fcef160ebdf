"""`pgqueue demo`: the queue at work on the embedded PostgreSQL, judged by its own data.

Starts the API and two workers (sandbox provider: 100-300 ms per send, a few transient
failures, one invalid number), replays the old system's six load scenarios through the
HTTP API, shows a live view, and ends with a verdict per guarantee computed from the
database (what the sandbox provider recorded and where every job ended), not assumed.
Exit code 0 only if every guarantee held. Ctrl-C stops everything it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from pgqueue import admin, migrate, queries
from pgqueue.config import Settings
from pgqueue.db import as_url, connect, resolve_database_url
from pgqueue.errors import PgQueueError
from pgqueue.metrics import queue_metrics
from pgqueue.server import free_port

DEMO_QUEUE = "pgqueue-demo"
TENANTS = [
    f"demo-{name}"
    for name in (
        "pizza",
        "sushi",
        "tacos",
        "curry",
        "pho",
        "bagels",
        "falafel",
        "ramen",
        "bbq",
        "salads",
    )
]
INVALID_NUMBER = "+14155550999"
ACCOUNT_SID = "AC" + "d" * 32


@dataclass
class Scenario:
    name: str
    title: str
    messages: list[tuple[str, str, str]]  # (tenant, phone, text)
    # Sent one after the other (keeps a conversation's order) or spaced by `every` s.
    sequential: bool = False
    every: float = 0.0


def _phone(n: int) -> str:
    return f"+1415555{n % 10000:04d}"


def build_scenarios(scale: float) -> list[Scenario]:
    def n(count: int) -> int:
        return max(2, round(count * scale))

    out = [
        Scenario(
            "burst",
            "burst of 100",
            [(TENANTS[i % 10], _phone(1000 + i % 40), f"burst {i}") for i in range(n(100))],
        ),
        Scenario(
            "one-tenant",
            "50 from one tenant",
            [(TENANTS[0], _phone(2000 + i), f"one tenant {i}") for i in range(n(50))],
        ),
        Scenario(
            "conversation",
            "20 in one conversation",
            [(TENANTS[1], _phone(3000), f"conversation {i}") for i in range(n(20))],
            sequential=True,
        ),
        Scenario(
            "ten-tenants",
            "100 across 10 tenants",
            [(TENANTS[i % 10], _phone(4000 + i), f"ten tenants {i}") for i in range(n(100))],
        ),
        Scenario(
            "sustained",
            "10/s for 5 s",
            [(TENANTS[i % 5], _phone(5000 + i % 7), f"sustained {i}") for i in range(n(50))],
            every=0.1,
        ),
        Scenario(
            "rate",
            "150 for the rate limit",
            [(TENANTS[i % 10], _phone(6000 + i), f"rate {i}") for i in range(n(150))],
        ),
    ]
    # One message to a number the sandbox rejects: it must end in the dead letters.
    out[0].messages.append((TENANTS[2], INVALID_NUMBER, "to an invalid number"))
    return out


@dataclass
class Progress:
    scenario: str = ""
    sent: int = 0
    total: int = 0
    accepted: list[int] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


class Processes:
    """The API and workers this demo started; stopped on exit whatever happens."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Any] = []

    def start(self, args: list[str], env: dict[str, str], log_path: str) -> subprocess.Popen[bytes]:
        log = open(log_path, "ab")  # noqa: SIM115 - lives as long as the child
        self.logs.append(log)
        proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", "pgqueue.cli", *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # our Ctrl-C is ours to forward, not theirs
        )
        self.procs.append(proc)
        return proc

    def stop(self, timeout: float = 40.0) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.1, deadline - time.monotonic()))
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in self.logs:
            log.close()


async def _setup(url: str) -> dict[str, str]:
    """Demo tenants (created once) with a fresh token each; returns tenant -> token."""
    conn = await connect(url, application_name="pgqueue-demo")
    try:
        await admin.set_queue(
            conn, DEMO_QUEUE, global_concurrency=20, tenant_concurrency=5, rate_per_second=80
        )
        tokens: dict[str, str] = {}
        for i, tenant in enumerate(TENANTS):
            existing = await queries.fetch_one(conn, "admin_tenants", {"id": tenant})
            if existing is None:
                await admin.add_tenant(
                    conn,
                    tenant_id=tenant,
                    account_sid=ACCOUNT_SID,
                    auth_token="sandbox-token-not-secret",  # noqa: S106 - sandbox only
                    whatsapp_from=_phone(9000 + i),
                    name=tenant.removeprefix("demo-").title(),
                )
            else:
                await admin.set_tenant(conn, tenant, paused=False)
            tokens[tenant] = await admin.create_token(conn, tenant)
        return tokens
    finally:
        await conn.close()


async def _post_all(
    client: httpx.AsyncClient, scenario: Scenario, tokens: dict[str, str], progress: Progress
) -> None:
    progress.scenario, progress.sent, progress.total = scenario.title, 0, len(scenario.messages)

    async def post(tenant: str, phone: str, text: str) -> None:
        r = await client.post(
            "/api/whatsapp/send",
            json={"phoneNumber": phone, "text": text},
            headers={"Authorization": f"Bearer {tokens[tenant]}"},
        )
        progress.sent += 1
        if r.status_code == 202:
            progress.accepted.append(int(r.json()["jobId"]))
        else:
            progress.refused.append(f"{r.status_code} {r.text[:120]}")

    if scenario.sequential or scenario.every:
        for m in scenario.messages:
            await post(*m)
            if scenario.every:
                await asyncio.sleep(scenario.every)
    else:
        limit = asyncio.Semaphore(20)

        async def bounded(m: tuple[str, str, str]) -> None:
            async with limit:
                await post(*m)

        await asyncio.gather(*(bounded(m) for m in scenario.messages))


async def _wait_http(client: httpx.AsyncClient, path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if (await client.get(path)).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise PgQueueError(f"the demo API did not become ready in {timeout:.0f}s")
        await asyncio.sleep(0.2)


@dataclass(frozen=True)
class Verdict:
    name: str
    held: bool
    detail: str


async def compute_verdicts(url: str, ids: list[int]) -> list[Verdict]:
    conn = await connect(url, application_name="pgqueue-demo")
    try:
        row = await queries.fetch_one(conn, "demo_verdict", {"ids": ids})
    finally:
        await conn.close()
    if row is None:
        raise PgQueueError("no verdict row")
    lost = len(ids) - int(row["finished"]) - int(row["unfinished"])
    return [
        Verdict(
            "nothing lost",
            lost == 0 and row["unfinished"] == 0,
            f"{len(ids)} accepted, {row['finished']} finished, {lost} lost",
        ),
        Verdict(
            "FIFO per conversation",
            row["fifo_violations"] == 0,
            f"{row['fifo_violations']} out-of-order or overlapping sends",
        ),
        Verdict(
            "tenant concurrency <= 5",
            row["max_tenant"] <= 5,
            f"max {row['max_tenant']} in flight for one tenant",
        ),
        Verdict(
            "global concurrency <= 20",
            row["max_global"] <= 20,
            f"max {row['max_global']} in flight",
        ),
        Verdict(
            "rate <= 80 starts in any 1 s",
            row["max_per_second"] <= 80,
            f"max {row['max_per_second']} starts in a 1-s window",
        ),
        Verdict(
            "transient failures retried",
            row["retried"] > 0,
            f"{row['retried']} delivered after a retry",
        ),
        Verdict(
            "invalid number dead with its code",
            "21211" in (row["dead_codes"] or ""),
            f"dead-letter codes: {row['dead_codes'] or 'none'}",
        ),
    ]


def _view(metrics: dict[str, Any], progress: Progress, rate: float) -> Any:
    counts = Table.grid(padding=(0, 3))
    for key in ("waiting", "active", "delayed", "completed", "failed"):
        counts.add_column(key)
    counts.add_row(
        *(
            f"[bold]{key}[/] {metrics[key]}"
            for key in ("waiting", "active", "delayed", "completed", "failed")
        )
    )
    tenants = Table("tenant", "in flight", "limit", box=None)
    limit = metrics["maxConcurrencyPerTenant"]
    for tenant, n in sorted(metrics["tenantConcurrency"].items()):
        if tenant.startswith("demo-"):
            tenants.add_row(tenant, "█" * n + f" {n}", str(limit))
    filled = round(40 * progress.sent / max(progress.total, 1))
    bar = "[green]" + "█" * filled + "[/][dim]" + "░" * (40 - filled) + "[/]"
    return Panel(
        Group(
            f"scenario: [bold]{progress.scenario}[/]  {progress.sent}/{progress.total}",
            bar,
            counts,
            f"sends/s (last second): [bold]{rate:.0f}[/]",
            tenants,
        ),
        title="pgqueue demo",
    )


async def _sends_last_second(conn: Any) -> float:
    row = await queries.fetch_one(conn, "demo_sends_last_second", {})
    return float(row["n"]) if row else 0.0


async def _watch(url: str, progress: Progress, until: Callable[[], Awaitable[bool]]) -> None:
    console = Console()
    conn = await connect(url, application_name="pgqueue-demo")
    try:
        with Live(console=console, refresh_per_second=4, transient=False) as live:
            while True:
                metrics = await queue_metrics(conn, DEMO_QUEUE)
                live.update(_view(metrics, progress, await _sends_last_second(conn)))
                if await until():
                    return
                await asyncio.sleep(0.25)
    finally:
        await conn.close()


async def run_demo(
    settings: Settings,
    *,
    scenarios: list[str] | None,
    keep_running: bool,
    scale: float,
    watch: bool = True,
) -> int:
    url = resolve_database_url(settings)
    migrate.upgrade(url)
    tokens = await _setup(url)
    port = free_port()
    home = settings.home.resolve()
    env = {
        **os.environ,
        "DATABASE_URL": as_url(url),
        "WHATSAPP_SEND_QUEUE_NAME": DEMO_QUEUE,
        "PGQUEUE_PROVIDER": "sandbox",
        "PGQUEUE_SANDBOX_LATENCY_MS": "100-300",
        # A short run sends fewer messages: fail more of them so retries still show.
        "PGQUEUE_SANDBOX_FAILURE_PERCENT": "4" if scale >= 1 else "10",
        "PGQUEUE_SANDBOX_INVALID_NUMBERS": INVALID_NUMBER,
        "QUEUE_BACKOFF_DELAY": "500",
        "WHATSAPP_SEND_QUEUE_ENABLED": "true",
    }
    chosen = [s for s in build_scenarios(scale) if not scenarios or s.name in scenarios]
    if not chosen:
        names = ", ".join(s.name for s in build_scenarios(1.0))
        raise PgQueueError(f"no such scenario; choose from: {names}")
    procs = Processes()
    progress = Progress()
    try:
        procs.start(["serve", "--port", str(port)], env, str(home / "demo-api.log"))
        for i in range(2):
            procs.start(["worker"], env, str(home / f"demo-worker-{i}.log"))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            await _wait_http(client, "/readyz", 60)
            print(f"pgqueue demo: API on http://127.0.0.1:{port}, 2 workers, sandbox provider")

            async def traffic() -> None:
                for s in chosen:
                    await _post_all(client, s, tokens, progress)

            sender = asyncio.create_task(traffic())
            started = time.monotonic()

            async def finished() -> bool:
                if not sender.done():
                    return False
                conn = await connect(url)
                try:
                    row = await queries.fetch_one(
                        conn, "demo_jobs_live", {"ids": progress.accepted}
                    )
                finally:
                    await conn.close()
                return bool(row and row["n"] == 0) or time.monotonic() - started > 170

            if watch:
                await _watch(url, progress, finished)
            else:
                while not await finished():
                    await asyncio.sleep(0.25)
            await sender
        verdicts = await compute_verdicts(url, progress.accepted)
        _print_verdicts(verdicts, progress)
        ok = all(v.held for v in verdicts) and not progress.refused
        if keep_running:
            print(f"still running: API on http://127.0.0.1:{port} — Ctrl-C to stop")
            await _watch(url, progress, _never)
        return 0 if ok else 1
    finally:
        procs.stop()


async def _never() -> bool:
    return False


def _print_verdicts(verdicts: list[Verdict], progress: Progress) -> None:
    print()
    table = Table("guarantee", "held", "measured", title="verdicts (from the database)")
    for v in verdicts:
        table.add_row(v.name, "[green]yes[/]" if v.held else "[red]NO[/]", v.detail)
    Console().print(table)
    if progress.refused:
        print(f"{len(progress.refused)} request(s) refused, first: {progress.refused[0]}")


def main(
    settings: Settings, *, scenarios: list[str] | None, keep_running: bool, scale: float
) -> int:
    try:
        return asyncio.run(
            run_demo(settings, scenarios=scenarios, keep_running=keep_running, scale=scale)
        )
    except KeyboardInterrupt:
        print("pgqueue demo: stopped")
        return 130
