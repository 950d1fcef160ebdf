"""Loads queries.sql and wraps each statement in a typed function.

The SQL file is the one place to read what pgqueue asks of the database; this module
only binds parameters and shapes rows.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any, TypeAlias

import psycopg

Conn: TypeAlias = psycopg.AsyncConnection[dict[str, Any]]
Row: TypeAlias = dict[str, Any]

# Sends are paced at this share of the configured rate, so that the jitter between a
# slot and the provider seeing the request cannot push R + 1 starts into one second.
RATE_HEADROOM = 0.975

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


@cache
def statements() -> dict[str, str]:
    text = Path(__file__).with_name("queries.sql").read_text(encoding="utf-8")
    parts = _NAME.split(text)
    out: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        # Comments stay in the file for readers; the server gets the statement only.
        lines = [ln for ln in body.splitlines() if not ln.lstrip().startswith("--")]
        out[name] = "\n".join(lines).strip().rstrip(";")
    return out


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
    """Claim heads under the queue lock: lock_queue then claim_jobs in one transaction,
    sent as one pipeline (one round trip plus the commit)."""
    async with conn.pipeline(), conn.transaction():
        await conn.execute(sql("lock_queue"), {"queue": queue})
        cur = await conn.execute(
            sql("claim_jobs"),
            {
                "queue": queue,
                "worker_id": worker_id,
                "max_jobs": max_jobs,
                "lease": lease_s,
                "lookahead": lookahead_s,
                "headroom": headroom,
            },
        )
    return await cur.fetchall()


async def reslot(conn: Conn, *, queue: str, headroom: float = RATE_HEADROOM) -> float:
    """A fresh rate slot for a job that missed its own; returns its start (epoch s)."""
    row = await fetch_one(conn, "reslot", {"queue": queue, "headroom": headroom})
    return time.time() if row is None else float(row["start_at"])


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
    """Apply outcomes (dicts with id, token, outcome, delay, code, message, sid, status,
    channel) in one transaction, sent as one pipeline: side effects first (a paused
    tenant is paused before its released job is claimable again), then complete_jobs,
    then promote_heads for the conversations whose head finished.

    `conversations` may name conversations whose job turned out not to be ours any more;
    promote_heads leaves a conversation that still has its head alone. Returns the jobs
    that were still ours; the others were rescued meanwhile and are left untouched."""
    if not outcomes:
        return []

    def col(key: str) -> list[Any]:
        return [o.get(key) for o in outcomes]

    async with conn.pipeline(), conn.transaction():
        await conn.execute(sql("lock_queue"), {"queue": queue})
        for tenant_id, reason in pauses:
            await conn.execute(sql("pause_tenant"), {"tenant_id": tenant_id, "reason": reason})
        for tenant_id, phone, code in suppressions:
            await conn.execute(
                sql("suppress_number"),
                {"tenant_id": tenant_id, "phone_number": phone, "code": code},
            )
        if throttle_s:
            await conn.execute(sql("throttle_queue"), {"queue": queue, "seconds": throttle_s})
        cur = await conn.execute(
            sql("complete_jobs"),
            {
                "queue": queue,
                "ids": col("id"),
                "tokens": col("token"),
                "outcomes": col("outcome"),
                "delays": [float(o.get("delay") or 0.0) for o in outcomes],
                "codes": col("code"),
                "messages": col("message"),
                "sids": col("sid"),
                "statuses": col("status"),
                "channels": col("channel"),
            },
        )
        if conversations:
            await conn.execute(
                sql("promote_heads"), {"queue": queue, "conversations": sorted(conversations)}
            )
        if notify:
            await conn.execute(sql("notify_queue"), {"queue": queue})
    return await cur.fetchall()


async def release_locks(conn: Conn, keys: list[int]) -> None:
    if keys:
        await conn.execute(sql("release_locks"), {"keys": keys})
