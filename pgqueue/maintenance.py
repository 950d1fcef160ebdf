"""Background services of a worker process; each has `run_once()` returning what it did,
so tests call it instead of sleeping.

* Rescuer: orphaned and stalled jobs back to their conversation (G9). Any worker may
  run it; the fencing in complete_jobs makes concurrent rescuers harmless, and running
  it everywhere means a dead leader does not delay a rescue.
* Maintenance (under a leader lock, one per cluster): history partitions, retention,
  forgetting dead workers and idle conversation rows, the metrics log line, and every
  few seconds the delivery statuses that arrived before their message's SID
  (pgqueue.statuses).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from psycopg_pool import AsyncConnectionPool

from pgqueue import queries
from pgqueue.completion import decide_lost
from pgqueue.dispatcher import Dispatcher
from pgqueue.metrics import queue_metrics
from pgqueue.statuses import apply_early_statuses

log = logging.getLogger("pgqueue.maintenance")
metrics_log = logging.getLogger("pgqueue.metrics")

# A constant advisory key (bigint space) for the maintenance leader.
LEADER_KEY = 0x70677175_65756501
# Jobs a sweep of deadlines ends at most (the rescuer sweeps four times a second).
EXPIRE_BATCH = 500


@dataclass(frozen=True)
class RescueReport:
    rescued: int
    dead: int


class Rescuer:
    """Finds active jobs whose worker is gone (or whose lease ran out) and puts them back."""

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        *,
        queue: str,
        grace_s: float = 10.0,
        interval_s: float = 0.25,
    ) -> None:
        self.pool = pool
        self.queue = queue
        self.grace_s = grace_s
        self.interval_s = interval_s

    async def run_once(self) -> RescueReport:
        await self.expire()
        async with self.pool.connection() as conn:
            orphans = await queries.fetch_all(
                conn, "find_orphans", {"queue": self.queue, "grace": self.grace_s}
            )
            if not orphans:
                return RescueReport(0, 0)
            decided = [
                (
                    o,
                    decide_lost(
                        attempts=o["attempts"],
                        max_attempts=o["max_attempts"],
                        code="lease-expired" if o["lease_expired"] else "worker-lost",
                        message=f"worker {o['claimed_by']} stopped before finishing the send",
                    ),
                )
                for o in orphans
            ]
            applied = await queries.complete_jobs(
                conn,
                queue=self.queue,
                outcomes=[d.as_row(o["id"], o["claim_token"]) for o, d in decided],
                conversations=[o["conversation"] for o, d in decided if d.kind == "failed"],
            )
        if applied:
            log.warning(
                "rescued %d job(s) from lost or stalled workers: %s",
                len(applied),
                ", ".join(str(r["id"]) for r in applied),
            )
        return RescueReport(len(applied), sum(1 for r in applied if r["outcome"] == "failed"))

    async def expire(self) -> int:
        """Ends the jobs whose deadline passed before they started (expire_jobs) and lets
        their conversations go on; returns how many."""
        async with self.pool.connection() as conn, conn.transaction():
            # One transaction: a conversation must never be left without its head.
            gone = await queries.fetch_all(
                conn, "expire_jobs", {"queue": self.queue, "limit": EXPIRE_BATCH}
            )
            heads = sorted({g["conversation"] for g in gone if g["is_head"]})
            if heads:
                await queries.execute(
                    conn, "promote_heads", {"queue": self.queue, "conversations": heads}
                )
                await queries.execute(conn, "notify_queue", {"queue": self.queue, "payload": None})
        for g in gone:
            log.info(
                "job %s expired before its send: not sent",
                g["id"],
                extra={"job_id": g["id"], "tenant": g["tenant_id"], "event": "expired"},
            )
        return len(gone)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.run_once()
            except Exception as e:  # the database may be restarting; try again next tick
                log.debug("rescue skipped: %s", e)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.interval_s)


@dataclass(frozen=True)
class MaintenanceReport:
    leader: bool
    partitions_created: int = 0
    partitions_dropped: int = 0
    workers_forgotten: int = 0
    conversations_forgotten: int = 0
    statuses_applied: int = 0
    ready_rows_marked: int = 0
    metrics: dict[str, Any] | None = None


class Maintenance:
    """Cluster-wide chores, done by whichever worker holds the leader lock."""

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        dispatcher: Dispatcher,
        *,
        queue: str,
        interval_s: float = 30.0,
        statuses_interval_s: float = 5.0,
    ) -> None:
        self.pool = pool
        self.dispatcher = dispatcher
        self.queue = queue
        self.interval_s = interval_s
        self.statuses_interval_s = statuses_interval_s
        self._leader = False
        dispatcher.on_reconnect(self._lost_leadership)

    async def _lost_leadership(self) -> None:
        self._leader = False

    async def _try_lead(self) -> bool:
        if self._leader:
            return True

        async def take(conn: queries.Conn) -> bool:
            row = await queries.fetch_one(conn, "take_maintenance_lead", {"key": LEADER_KEY})
            return bool(row and row["ok"])

        self._leader = bool(await self.dispatcher.with_connection(take))
        if self._leader:
            log.info("this worker leads maintenance")
        return self._leader

    async def run_once(self) -> MaintenanceReport:
        if not await self._try_lead():
            return MaintenanceReport(leader=False)
        async with self.pool.connection() as conn:
            created = await _count(conn, "ensure_history_partitions", {"days": 3})
            dropped = await _count(conn, "drop_history_partitions", {"queue": self.queue})
            workers = await queries.execute(conn, "forget_dead_workers", {"grace": 60})
            conversations = await queries.execute(conn, "forget_idle_conversations", {})
            marked = await queries.execute(conn, "mark_stale_ready", {"queue": self.queue})
            statuses = await apply_early_statuses(conn)

            metrics = await queue_metrics(conn, self.queue)
        metrics_log.info(
            "queue %s: waiting=%d active=%d completed=%d failed=%d delayed=%d tenants=%d %s",
            self.queue,
            metrics["waiting"],
            metrics["active"],
            metrics["completed"],
            metrics["failed"],
            metrics["delayed"],
            len(metrics["tenantConcurrency"]),
            " ".join(f"{t}={n}" for t, n in sorted(metrics["tenantConcurrency"].items())),
            extra={"fields": {k: v for k, v in metrics.items()}},
        )
        return MaintenanceReport(
            leader=True,
            partitions_created=created,
            partitions_dropped=dropped,
            workers_forgotten=workers,
            conversations_forgotten=conversations,
            statuses_applied=statuses,
            ready_rows_marked=marked,
            metrics=metrics,
        )

    async def apply_statuses(self) -> int | None:
        """Only the held delivery statuses (run_once does them too); None when another
        worker leads."""
        if not await self._try_lead():
            return None
        async with self.pool.connection() as conn:
            applied = await apply_early_statuses(conn)
        if applied:
            log.info("applied %d delivery status(es) that arrived before their SID", applied)
        return applied

    async def run(self, stop: asyncio.Event) -> None:
        next_run = next_statuses = time.monotonic()
        while not stop.is_set():
            now = time.monotonic()
            if now >= next_run:  # run_once applies the held statuses too
                try:
                    await self.run_once()
                except Exception as e:
                    log.warning("maintenance skipped: %s", e)
                next_run = now + self.interval_s
                next_statuses = now + self.statuses_interval_s
            elif now >= next_statuses:
                try:
                    await self.apply_statuses()
                except Exception as e:
                    log.warning("applying held delivery statuses skipped: %s", e)
                next_statuses = now + self.statuses_interval_s
            wait = max(0.0, min(next_run, next_statuses) - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=wait)


async def _count(conn: queries.Conn, name: str, params: dict[str, Any]) -> int:
    row = await queries.fetch_one(conn, name, params)
    return int(row["n"] or 0) if row is not None else 0
