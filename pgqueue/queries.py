"""Loads queries.sql and wraps each statement in a typed function.

The SQL file is the one place to read what pgqueue asks of the database; this module
only binds parameters and shapes rows.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, TypeAlias

import psycopg
from psycopg.pq import TransactionStatus
from psycopg.types.json import Jsonb

log = logging.getLogger("pgqueue.queries")

Conn: TypeAlias = psycopg.AsyncConnection[dict[str, Any]]
Row: TypeAlias = dict[str, Any]

# Sends are paced at this share of the configured rate, so that the jitter between a
# slot and the provider seeing the request cannot push R + 1 starts into one second:
# 1/h - 1 = 22.5 ms of jitter, 15 of them our own lateness (dispatcher.MAX_LATE_S), while
# the mean stays above 97.5 % of R with a few missed slots to spare.
RATE_HEADROOM = 0.978
# A tenant's own rate slot is handed out at least this far ahead (claim_jobs, reslot):
# what a claim takes to reach the worker's send, with room to spare on a busy machine.
SLOT_MARGIN_S = 0.02

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


@cache
def statements() -> dict[str, str]:
    text = Path(__file__).with_name("queries.sql").read_text(encoding="utf-8")
    parts = _NAME.split(text)
    out: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        # Comments and indentation stay in the file for readers; the server gets the
        # statement only. Short texts matter: psycopg caches the conversion of its
        # placeholders only for statements up to 4 KiB, and claim_jobs runs every turn.
        lines = [ln.strip() for ln in body.splitlines()]
        kept = [ln for ln in lines if ln and not ln.startswith("--")]
        out[name] = "\n".join(kept).rstrip(";")
    return out


def channel(queue: str) -> str:
    """The NOTIFY channel of a queue's workers, as pgqueue.channel() names it in SQL."""
    return f"pgqueue_{queue}"


def sql(name: str) -> str:
    try:
        return statements()[name]
    except KeyError:
        raise KeyError(f"no statement named {name!r} in queries.sql") from None


async def fetch_all(conn: Conn, name: str, params: dict[str, Any]) -> list[Row]:
    cur = await conn.execute(sql(name), params)
    return await cur.fetchall()


async def fetch_one(conn: Conn, name: str, params: dict[str, Any]) -> Row | None:
    cur = await conn.execute(sql(name), params)
    return await cur.fetchone()


async def execute(conn: Conn, name: str, params: dict[str, Any]) -> int:
    cur = await conn.execute(sql(name), params)
    return cur.rowcount


async def ensure_queue(conn: Conn, queue: str) -> None:
    await execute(conn, "ensure_queue", {"queue": queue})


@dataclass(frozen=True)
class Claim:
    """What a claim asks for (see claim_jobs in queries.sql)."""

    worker_id: str
    max_jobs: int
    lease_s: float
    lookahead_s: float
    headroom: float = RATE_HEADROOM
    # Claim tokens of this worker's sends that have their answers (or were given up)
    # while their outcomes wait to be written: in flight no more (G2, G3), so the claim
    # may hand their places on. A token no longer active (fenced) leaves nothing out.
    answered: Sequence[uuid.UUID] = ()


@dataclass(frozen=True)
class Outcomes:
    """Outcomes to write (dicts with id, token, outcome, delay, code, message, sid,
    status, channel) and their side effects on tenants, numbers and the queue."""

    rows: list[Row]
    conversations: list[str] = field(default_factory=list)
    pauses: Sequence[tuple[str, str]] = ()
    suppressions: Sequence[tuple[str, str, str]] = ()
    throttle_s: float | None = None
    # (tenant, seconds, reason): the tenant's sender rests that long (rest_tenant).
    rests: Sequence[tuple[str, float, str]] = ()


@dataclass
class CycleResult:
    claimed: list[Row]
    applied: list[Row]
    # Seconds until a rate slot opens / the next delayed head is due (claims only).
    rate_wait: float | None = None
    due_wait: float | None = None


async def cycle(
    conn: Conn,
    *,
    queue: str,
    outcomes: Outcomes | None = None,
    release: Sequence[int] = (),
    claim: Claim | None = None,
    notify: str | None = None,
    on_sent: Callable[[], None] | None = None,
    lock: bool = True,
) -> CycleResult:
    """One transaction, sent as one pipeline (one round trip plus the commit), under the
    queue lock: write outcomes, promote the next heads, drop the conversation locks of
    the finished sends, claim new heads (counting the sends the worker has the answers
    of out of the limits: Claim.answered), and say when to look again. The dispatcher runs
    one per turn of its loop (dropping locks and claiming; its completer writes most
    outcomes in cycles of their own, `lock=False`, once the locks are dropped).

    Locks are dropped before the outcomes commit on purpose: the job is still active
    (and ours) until then, and the rescuer leaves alone every job whose worker is
    connected, while a worker that sees the promoted head after that commit finds its
    lock free.
    `notify` is the payload of the wake-up sent when outcomes were written. `on_sent` runs
    once the statements are on their way, so the caller's own work overlaps the server's.

    BEGIN and COMMIT are statements of the pipeline (on an autocommit connection) rather
    than psycopg's transaction block, whose COMMIT would leave only at the pipeline's
    end: the queue lock, which every worker's turn waits for, is then held only while the
    server works, never while this process writes its log lines or waits for the CPU.

    `lock=False` leaves the queue lock alone: for outcomes only (no claim), which change
    no row a claim writes (in-flight counts are counted, not stored), so a worker's
    completions run beside the claims instead of waiting for them."""
    if claim is not None and not lock:
        raise ValueError("a claim runs under the queue lock")
    if conn.info.transaction_status != TransactionStatus.IDLE:
        raise psycopg.ProgrammingError("queries.cycle runs its own transaction")
    result = CycleResult(claimed=[], applied=[])
    try:
        async with conn.pipeline():
            await conn.execute(b"BEGIN", prepare=False)
            applied, claimed, end = await _turn(conn, queue, outcomes, release, claim, notify, lock)
            await conn.execute(b"COMMIT", prepare=False)
            if on_sent is not None:
                try:
                    on_sent()
                except Exception:  # the COMMIT is on its way: report it, undo nothing
                    log.exception("queries.cycle: on_sent failed")
    except BaseException:
        await _abandon(conn)
        raise
    if applied is not None:
        result.applied = await applied.fetchall()
    if claimed is not None:
        result.claimed = await claimed.fetchall()
    row = await end.fetchone() if end is not None else None
    if row is not None:
        result.rate_wait, result.due_wait = row["rate_wait"], row["due_wait"]
    return result


async def _abandon(conn: Conn) -> None:
    """After a failed turn: roll back what the server still holds open, so the next turn
    starts clean; a connection caught mid-command is closed (its owner reconnects)."""
    if conn.closed:
        return
    status = conn.info.transaction_status
    if status in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
        try:
            await conn.execute(b"ROLLBACK", prepare=False)
            return
        except psycopg.Error:
            pass
    elif status == TransactionStatus.IDLE:
        return
    await conn.close()


Cursor: TypeAlias = psycopg.AsyncCursor[Row]


async def _turn(
    conn: Conn,
    queue: str,
    outcomes: Outcomes | None,
    release: Sequence[int],
    claim: Claim | None,
    notify: str | None,
    lock: bool,
) -> tuple[Cursor | None, Cursor | None, Cursor | None]:
    """Queue a turn's statements in the open pipeline; returns their cursors (outcomes
    applied, jobs claimed, the turn's end: none for outcomes only)."""
    if lock:
        await conn.execute(sql("lock_queue"), {"queue": queue})
    applied = None
    if outcomes is not None and outcomes.rows:
        applied = await _write_outcomes(conn, queue, outcomes)
    claimed = None
    if claim is not None and claim.max_jobs > 0:
        claimed = await conn.execute(
            sql("claim_jobs"),
            {
                "queue": queue,
                "worker_id": claim.worker_id,
                "max_jobs": claim.max_jobs,
                "lease": claim.lease_s,
                "lookahead": claim.lookahead_s,
                "headroom": claim.headroom,
                "margin": SLOT_MARGIN_S,
                "answered": list(claim.answered),
            },
        )
    payload = notify if applied is not None else None
    if claimed is None and not release:
        # Outcomes only: nothing to unlock and no wait to compute, just the wake-up.
        if payload is not None:
            await conn.execute(sql("notify_queue"), {"queue": queue, "payload": payload})
        return applied, claimed, None
    end = await conn.execute(
        sql("turn_end"), {"queue": queue, "release": list(release), "notify": payload}
    )
    return applied, claimed, end


async def release_locks(conn: Conn, keys: Sequence[int]) -> None:
    """Drop conversation locks of answered sends outside a turn (see the statement)."""
    await execute(conn, "release_locks", {"release": list(keys)})


async def claim_jobs(
    conn: Conn,
    *,
    queue: str,
    worker_id: str,
    max_jobs: int,
    lease_s: float,
    lookahead_s: float,
    headroom: float = RATE_HEADROOM,
) -> list[Row]:
    """Claim heads under the queue lock, in a transaction of its own."""
    claim = Claim(worker_id, max_jobs, lease_s, lookahead_s, headroom)
    return (await cycle(conn, queue=queue, claim=claim)).claimed


async def reslot(
    conn: Conn,
    *,
    queue: str,
    tenants: Sequence[str],
    missed: Sequence[float | None] | None = None,
    headroom: float = RATE_HEADROOM,
) -> list[float]:
    """Fresh rate slots for jobs that missed their own, one per job of `tenants` (each
    job's tenant, in order); returns their starts (epoch s). `missed`: the slot each job
    missed (epoch s), None for one taken again for another reason; a tenant's missed
    slot that is still its last is taken back (see the statement).

    The queue lock is taken by a statement of its own, in one pipeline with the reslot:
    a statement reads with the snapshot it took before it waited for a lock, so a reslot
    that locked the queue itself, queued behind a claim, would pace from the tenants'
    slots as they were before that claim and hand out a slot beside one the claim gave."""
    if conn.info.transaction_status != TransactionStatus.IDLE:
        raise psycopg.ProgrammingError("queries.reslot runs its own transaction")
    params = {
        "queue": queue,
        "tenants": list(tenants),
        "missed": list(missed) if missed is not None else [None] * len(tenants),
        "headroom": headroom,
        "margin": SLOT_MARGIN_S,
    }
    try:
        async with conn.pipeline():
            await conn.execute(b"BEGIN", prepare=False)
            await conn.execute(sql("lock_queue"), {"queue": queue})
            cur = await conn.execute(sql("reslot"), params)
            await conn.execute(b"COMMIT", prepare=False)
    except BaseException:
        await _abandon(conn)
        raise
    rows = await cur.fetchall()
    if len(rows) != len(tenants):  # the queue row is gone: nothing paces them any more
        return [time.time()] * len(tenants)
    return [float(r["start_at"]) for r in rows]


async def complete_jobs(
    conn: Conn,
    *,
    queue: str,
    outcomes: list[Row],
    conversations: list[str],
    pauses: Sequence[tuple[str, str]] = (),
    suppressions: Sequence[tuple[str, str, str]] = (),
    throttle_s: float | None = None,
    notify: bool = True,
) -> list[Row]:
    """Apply outcomes in a transaction of their own (see `cycle`). Returns the jobs that
    were still ours; the others were rescued meanwhile and are left untouched."""
    batch = Outcomes(outcomes, conversations, pauses, suppressions, throttle_s)
    done = await cycle(conn, queue=queue, outcomes=batch, notify="" if notify else None)
    return done.applied


async def _write_outcomes(conn: Conn, queue: str, outcomes: Outcomes) -> psycopg.AsyncCursor[Row]:
    """Queue the outcome statements in the open pipeline: side effects first (a paused
    tenant is paused before its released job is claimable again), then complete_jobs,
    then promote_heads for the conversations whose head finished. `conversations` may
    name conversations whose job turned out not to be ours any more; promote_heads
    leaves a conversation that still has its head alone."""
    for tenant_id, reason in outcomes.pauses:
        await conn.execute(sql("pause_tenant"), {"tenant_id": tenant_id, "reason": reason})
    for tenant_id, seconds, reason in outcomes.rests:
        await conn.execute(
            sql("rest_tenant"), {"tenant_id": tenant_id, "seconds": seconds, "reason": reason}
        )
    for tenant_id, phone, code in outcomes.suppressions:
        await conn.execute(
            sql("suppress_number"),
            {"tenant_id": tenant_id, "phone_number": phone, "code": code},
        )
    if outcomes.throttle_s:
        await conn.execute(sql("throttle_queue"), {"queue": queue, "seconds": outcomes.throttle_s})
    rows = [
        {**o, "token": str(o["token"]), "delay": float(o.get("delay") or 0.0)}
        for o in outcomes.rows
    ]
    cur = await conn.execute(sql("complete_jobs"), {"queue": queue, "outcomes": Jsonb(rows)})
    if outcomes.conversations:
        await conn.execute(
            sql("promote_heads"),
            {"queue": queue, "conversations": sorted(outcomes.conversations)},
        )
    return cur
