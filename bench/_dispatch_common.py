"""Helpers of bench/dispatch.py: a pgqueue scratch database with its tenants and limits,
backlogs, worker processes and the waits between them.

Workers are real processes: `tests.support.worker_harness` (the production worker with the
recording provider, which writes each send's start and end to a JSONL file) and
`bench/noop_worker.py` (the production worker with a provider that returns at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parent.parent
QUEUE = "whatsapp-send"
TEXT = "Hola! Your order #{i} is ready for pickup at the counter. Thank you!"


@dataclass(frozen=True)
class Limits:
    """A row of pgqueue.queues: what G2, G3 and G4 allow."""

    rate: float = 80.0
    global_concurrency: int = 20
    tenant_concurrency: int = 5

    def describe(self) -> str:
        return (
            f"rate {self.rate:g}/s, global {self.global_concurrency}, "
            f"tenant {self.tenant_concurrency}"
        )


DEFAULT_LIMITS = Limits()
LIFTED_LIMITS = Limits(rate=1e6, global_concurrency=1000, tenant_concurrency=1000)


def is_local(url: str) -> bool:
    """Whether the server of `url` runs on this machine (its processes can be measured)."""
    host = str(psycopg.conninfo.conninfo_to_dict(url).get("host") or "")
    return host in ("", "localhost", "127.0.0.1", "::1") or host.startswith("/")


def tenant_name(t: int) -> str:
    return f"restaurant-{t:03d}"


def phone(n: int) -> str:
    """A valid E.164 number for 0 <= n < 9000 (+1 415 555 1000 .. 9999)."""
    if not 0 <= n < 9000:
        raise ValueError(f"phone index {n} out of range")
    return f"+1415555{1000 + n:04d}"


def backlog(
    tenants: Sequence[int],
    phones: int,
    per_conversation: int,
    *,
    first_phone: int = 0,
    tag: str = "",
) -> list[Any]:
    """Messages for `phones` conversations of each tenant, `per_conversation` each, in the
    order many restaurants would send them: consecutive messages go to different
    conversations."""
    from pgqueue.models import Message

    out = []
    i = 0
    for _ in range(per_conversation):
        for p in range(phones):
            for t in tenants:
                out.append(
                    Message(
                        tenant_id=tenant_name(t),
                        phone_number=phone(first_phone + p),
                        text=tag + TEXT.format(i=i),
                    )
                )
                i += 1
    return out


class PgqueueDb:
    """pgqueue in a scratch database: migrated once; each measurement starts from
    `prepare()` (empty live and history tables, exactly the figure's tenants, counters at
    zero, the figure's limits), then `settle()` once the backlog is in."""

    def __init__(self, url: str) -> None:
        self.url = url

    def install(self) -> None:
        from pgqueue import migrate

        migrate.upgrade(self.url)

    def sql(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def scalar(self, query: str, params: Any = None) -> Any:
        rows = self.sql(query, params)
        return rows[0][0] if rows else None

    def prepare(self, tenants: int, limits: Limits) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(
                "TRUNCATE pgqueue.jobs, pgqueue.job_history, pgqueue.conversations, "
                "pgqueue.workers, pgqueue.sandbox_messages, pgqueue.suppressions"
            )
            conn.execute("DELETE FROM pgqueue.tenants WHERE id >= %s", (tenant_name(tenants),))
            have = {r[0] for r in conn.execute("SELECT id FROM pgqueue.tenants").fetchall()}
            for t in range(tenants):
                if tenant_name(t) in have:
                    continue
                conn.execute(
                    "INSERT INTO pgqueue.tenants (id, name, account_sid, auth_token, whatsapp_from)"
                    " VALUES (%s, %s, %s, %s, %s)",
                    (
                        tenant_name(t),
                        tenant_name(t),
                        "AC" + f"{t:032x}",
                        "bench-auth-token",
                        f"+1415556{t:04d}",
                    ),
                )
            conn.execute(
                "UPDATE pgqueue.tenants SET last_served_at = NULL, rate_tat = now(),"
                " paused = false, pause_reason = NULL, max_concurrency = NULL,"
                " rate_per_second = NULL"
            )
            conn.execute("DELETE FROM pgqueue.tenant_totals")
            conn.execute(
                "INSERT INTO pgqueue.queues (name) VALUES (%s) ON CONFLICT (name) DO NOTHING",
                (QUEUE,),
            )
            conn.execute(
                "UPDATE pgqueue.queues SET rate_tat = now(), rate_per_second = %s,"
                " global_concurrency = %s, tenant_concurrency = %s WHERE name = %s",
                (limits.rate, limits.global_concurrency, limits.tenant_concurrency, QUEUE),
            )

    def settle(self) -> list[str]:
        return settle(self.url)

    def pause_all(self, paused: bool) -> None:
        """Hold every tenant (workers start, claim nothing) or let them all go at once."""
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute("UPDATE pgqueue.tenants SET paused = %s", (paused,))
            conn.execute("SELECT pg_notify('pgqueue_' || %s, '')", (QUEUE,))

    async def enqueue(self, messages: Sequence[Any], batch: int = 1000) -> list[int]:
        from pgqueue.db import connect
        from pgqueue.enqueue import enqueue_whatsapp_send_batch

        conn = await connect(self.url, application_name="bench-enqueue")
        ids: list[int] = []
        try:
            for i in range(0, len(messages), batch):
                done = await enqueue_whatsapp_send_batch(conn, messages[i : i + batch], queue=QUEUE)
                ids.extend(e.job_id for e in done)
        finally:
            await conn.close()
        return ids

    def completed(self) -> int:
        return int(self.scalar("SELECT coalesce(sum(completed), 0) FROM pgqueue.tenant_totals"))

    def worker_backends(self) -> list[int]:
        """The server processes of the workers' connections, if the server runs here."""
        if not is_local(self.url):
            return []
        rows = self.sql(
            "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'pgqueue-worker:%%'"
        )
        return [r[0] for r in rows]

    def live_workers(self) -> int:
        return int(self.scalar("SELECT count(*) FROM pgqueue.workers"))

    def wait_completed(
        self,
        n: int,
        timeout: float,
        procs: Sequence[subprocess.Popen[bytes]],
        interval: float = 0.1,
    ) -> float:
        """Poll until `n` jobs completed; returns the wall time it took. Raises if a
        worker exits early or the timeout passes."""
        start = time.monotonic()
        while True:
            done = self.completed()
            if done >= n:
                return time.monotonic() - start
            for p in procs:
                if p.poll() is not None:
                    raise RuntimeError(
                        f"worker {p.pid} exited with {p.returncode} after {done} jobs"
                    )
            if time.monotonic() - start > timeout:
                raise RuntimeError(f"timed out after {timeout:.0f}s with {done}/{n} jobs completed")
            time.sleep(interval)

    def wait_workers(self, n: int, timeout: float = 30.0) -> None:
        start = time.monotonic()
        while self.live_workers() < n:
            if time.monotonic() - start > timeout:
                raise RuntimeError(f"only {self.live_workers()}/{n} workers registered")
            time.sleep(0.05)


def settle(url: str) -> list[str]:
    """VACUUM ANALYZE and CHECKPOINT: what every measurement starts from."""
    notes: list[str] = []
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
        try:
            conn.execute("CHECKPOINT")
        except psycopg.errors.InsufficientPrivilege:
            notes.append("CHECKPOINT refused (not a superuser); measured without it")
    return notes


def truncate_all(url: str) -> None:
    """Empty every user table (a peer's scratch database)."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables"
            " WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
        ).fetchall()
        if rows:
            conn.execute("TRUNCATE " + ", ".join(r[0] for r in rows) + " RESTART IDENTITY CASCADE")


# -- worker processes --------------------------------------------------------------------


def recording_worker(
    url: str, record: Path, log: Path, *, latency: float, concurrency: int = 20
) -> subprocess.Popen[bytes]:
    """The production worker with the recording provider (tests/support/worker_harness.py)."""
    return _spawn(
        [
            sys.executable,
            "-m",
            "tests.support.worker_harness",
            "--url",
            url,
            "--record",
            str(record),
            "--latency",
            str(latency),
            str(latency),
            "--concurrency",
            str(concurrency),
        ],
        log,
    )


def noop_worker(
    url: str, log: Path, *, concurrency: int = 20, turn_times: Path | None = None
) -> subprocess.Popen[bytes]:
    """The production worker with a provider that returns at once (bench/noop_worker.py);
    with `turn_times`, it writes there where its full turns' time went."""
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "noop_worker.py"),
        "--url",
        url,
        "--concurrency",
        str(concurrency),
    ]
    if turn_times is not None:
        cmd += ["--turn-times", str(turn_times)]
    return _spawn(cmd, log)


def _spawn(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)


def stop_workers(procs: Sequence[subprocess.Popen[bytes]], timeout: float = 20.0) -> None:
    """SIGTERM (the worker drains and exits 0), then SIGKILL whatever is left."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        if p.poll() is None:
            p.kill()
            p.wait()


@contextlib.contextmanager
def workers(procs: list[subprocess.Popen[bytes]]) -> Any:
    try:
        yield procs
    finally:
        stop_workers(procs)


async def sleep_until(t: float) -> None:
    delay = t - time.time()
    if delay > 0:
        await asyncio.sleep(delay)


def load_note(seconds: float = 1.0) -> str:
    """How idle the machine is right now (anyone's processes count): a 1-second sample."""
    import psutil

    idle = psutil.cpu_times_percent(interval=seconds).idle
    return f"machine {idle:.0f}% idle over {seconds:g} s, {os.cpu_count()} cores"


def io_stalled_s() -> float | None:
    """Seconds in which every runnable task on this machine waited for the disk
    (/proc/pressure/io, "full"), since boot; None where the kernel does not say. A
    commit's WAL flush waits through such a stall with the queue lock held, so every
    worker's turn waits too: gaps in the starts that no code on the CPU explains."""
    try:
        for line in Path("/proc/pressure/io").read_text().splitlines():
            if line.startswith("full"):
                return int(line.rsplit("total=", 1)[1]) / 1e6
    except (OSError, ValueError, IndexError):
        return None
    return None


class OthersCpu:
    """CPU used on this machine by everything that is not this benchmark, sampled once a
    second: the machine's busy time minus this process, its children (the workers) and
    the PostgreSQL backends of the benchmark's databases (their process titles name the
    database). Other people's work on a shared 2-core machine is what skews a run."""

    def __init__(self, db_prefix: str) -> None:
        import threading

        self.db_prefix = db_prefix
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._others = 0.0
        self._elapsed = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _mine(self) -> dict[int, float]:
        import psutil

        me = psutil.Process()
        procs = [me, *me.children(recursive=True)]
        for p in psutil.process_iter(["name", "cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if cmd.startswith("postgres: ") and f" {self.db_prefix}" in cmd:
                procs.append(p)
        out: dict[int, float] = {}
        for p in procs:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                out[p.pid] = t.user + t.system
        return out

    def _run(self) -> None:
        import psutil

        def busy() -> float:
            t = psutil.cpu_times()
            return t.user + t.system + t.nice + t.irq + t.softirq

        prev_busy, prev_mine, prev_t = busy(), self._mine(), time.monotonic()
        while not self._stop.wait(1.0):
            now_busy, now_mine, now_t = busy(), self._mine(), time.monotonic()
            mine = sum(v - prev_mine.get(pid, 0.0) for pid, v in now_mine.items())
            with self._lock:
                self._others += max(now_busy - prev_busy - mine, 0.0)
                self._elapsed += now_t - prev_t
            prev_busy, prev_mine, prev_t = now_busy, now_mine, now_t

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def mark(self) -> tuple[float, float]:
        with self._lock:
            return self._others, self._elapsed

    @staticmethod
    def share(start: tuple[float, float], end: tuple[float, float]) -> float:
        """Others' CPU between two marks, in cores (1.0 = one core busy all the time)."""
        elapsed = end[1] - start[1]
        return (end[0] - start[0]) / elapsed if elapsed > 0 else float("nan")
