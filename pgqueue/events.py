"""Delivery events: every state change of a message, as tenants read them.

The statements that change a message write its event in the same transaction
(queries.sql: enqueue, claim, completion, expiry, cancel, provider callbacks), so an
event exists exactly when its change committed. Readers follow a tenant's feed with a
cursor, `<tx>-<id>`, opaque to them: the feed's order is (tx, id), and a read returns
only events of transactions that have all ended (pgqueue.events_horizon), so what
commits later always sorts after every cursor already handed out: following the feed
from a cursor never skips an event, and a message's events come in the order they
happened (pgqueue.event_tx). Delivery to a reader is at least once: a reader that
loses its place reads again from the last cursor it kept.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

from pgqueue import queries
from pgqueue.errors import ValidationError

MAX_LIMIT = 1000
MAX_WAIT_S = 30.0
# How often a long poll looks again: an index probe each time, and events are held back
# only while an older transaction runs, which in pgqueue lasts milliseconds.
POLL_S = 0.1
_CURSOR = re.compile(r"(\d{1,19})-(\d{1,19})")


@dataclass(frozen=True, order=True)
class Cursor:
    tx: int
    id: int

    def __str__(self) -> str:
        return f"{self.tx}-{self.id}"


START = Cursor(0, 0)


def parse_cursor(text: str | None) -> Cursor:
    """A cursor as the feed handed it out; none (or empty) is the start of the feed."""
    if not text:
        return START
    match = _CURSOR.fullmatch(text)
    if match is None or max(int(match[1]), int(match[2])) >= 2**63:
        raise ValidationError(
            "after must be a cursor of the feed (a nextCursor it returned), or empty",
            field="after",
        )
    return Cursor(int(match[1]), int(match[2]))


def as_json(row: queries.Row) -> dict[str, Any]:
    """An event as the feed and webhooks show it (camelCase, ISO times, no empty fields)."""
    event: dict[str, Any] = {
        "cursor": str(Cursor(row["tx"], row["id"])),
        "id": row["id"],
        "type": row["kind"],
        "jobId": row["job_id"],
        "at": row["at"].isoformat(),
    }
    optional = {
        "attempt": row["attempt"],
        "sid": row["sid"],
        "errorCode": row["code"],
        "errorMessage": row["message"],
        "runAt": row["run_at"].isoformat() if row["run_at"] is not None else None,
    }
    event.update({k: v for k, v in optional.items() if v is not None})
    return event


async def read(
    conn: queries.Conn, tenant_id: str, after: Cursor, *, limit: int = 100
) -> list[queries.Row]:
    """The tenant's events after `after`, oldest first."""
    params = {"tenant_id": tenant_id, "tx": after.tx, "id": after.id, "limit": limit}
    return await queries.fetch_all(conn, "events_after", params)


async def wait_for(
    db: Callable[[], AbstractAsyncContextManager[queries.Conn]],
    tenant_id: str,
    after: Cursor,
    *,
    limit: int,
    wait_s: float,
) -> list[queries.Row]:
    """`read`, again until an event is readable or `wait_s` (at most MAX_WAIT_S) has
    passed: a long poll. Each look takes a connection from `db` and gives it back, so a
    waiting reader holds none."""
    deadline = time.monotonic() + min(max(wait_s, 0.0), MAX_WAIT_S)
    while True:
        async with db() as conn:
            rows = await read(conn, tenant_id, after, limit=limit)
        left = deadline - time.monotonic()
        if rows or left <= 0:
            return rows
        await asyncio.sleep(min(POLL_S, left))


def next_cursor(rows: list[queries.Row], after: Cursor) -> Cursor:
    return Cursor(rows[-1]["tx"], rows[-1]["id"]) if rows else after


async def of_job(
    conn: queries.Conn, job_id: int, tenant_id: str | None = None
) -> list[queries.Row]:
    """One message's events, oldest first."""
    return await queries.fetch_all(conn, "job_events", {"job_id": job_id, "tenant_id": tenant_id})
