"""Operations on jobs for people: look up, list, cancel, retry dead letters, clean them.

Shared by the API and the CLI; a tenant scope (`tenant_id`) hides other tenants' jobs
entirely (another tenant's id is simply not found).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from pgqueue import queries
from pgqueue.errors import NotFoundError, ValidationError
from pgqueue.logs import job_log
from pgqueue.models import JobState

MAX_LIST = 1000


async def get_job(
    conn: queries.Conn, job_id: int, *, tenant_id: str | None = None
) -> dict[str, Any]:
    row = await queries.fetch_one(conn, "get_job", {"id": job_id, "tenant_id": tenant_id})
    if row is None:
        raise NotFoundError(f"no job {job_id}")
    return row


async def list_jobs(
    conn: queries.Conn,
    *,
    queue: str,
    state: str | None = None,
    tenant_id: str | None = None,
    conversation: str | None = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    if state is not None and state not in {s.value for s in JobState}:
        raise ValidationError(
            f"state must be one of {', '.join(s.value for s in JobState)}", field="state"
        )
    if not 1 <= limit <= MAX_LIST:
        raise ValidationError(f"limit must be from 1 to {MAX_LIST}", field="limit")
    return await queries.fetch_all(
        conn,
        "list_jobs",
        {
            "queue": queue,
            "state": state,
            "tenant_id": tenant_id,
            "conversation": conversation,
            "limit": limit,
        },
    )


async def retry_failed(
    conn: queries.Conn,
    *,
    queue: str,
    ids: list[int] | None = None,
    tenant_id: str | None = None,
) -> list[int]:
    """Move dead letters back to the queue (to the tail of their conversations).
    `ids=None` retries every dead letter (of the tenant, if given)."""
    rows = await queries.fetch_all(
        conn, "retry_failed", {"queue": queue, "ids": ids, "tenant_id": tenant_id}
    )
    return [int(r["id"]) for r in rows]


async def retry_job(
    conn: queries.Conn, job_id: int, *, queue: str, tenant_id: str | None = None
) -> dict[str, Any]:
    job = await get_job(conn, job_id, tenant_id=tenant_id)
    if job["state"] != "failed":
        raise ValidationError(
            f"job {job_id} is {job['state']}; only failed jobs can be retried",
            code="not_failed",
            field="id",
        )
    await retry_failed(conn, queue=queue, ids=[job_id], tenant_id=tenant_id)
    return await get_job(conn, job_id, tenant_id=tenant_id)


async def cancel_job(
    conn: queries.Conn, job_id: int, *, queue: str, tenant_id: str | None = None
) -> dict[str, Any]:
    """Take back a message that has not started: it is deleted, and its conversation's
    next message moves up (G1: nothing overtakes anything). A message being sent or
    already finished cannot be canceled. Returns the job as it was."""
    job = await get_job(conn, job_id, tenant_id=tenant_id)
    if job["queue"] != queue:
        raise NotFoundError(f"no job {job_id} in queue {queue}")
    params = {"id": job_id, "queue": queue, "tenant_id": tenant_id}
    row = None
    if job["state"] in (JobState.WAITING, JobState.DELAYED):
        try:
            async with conn.transaction():
                await queries.fetch_one(conn, "lock_job_conversation", params)
                row = await queries.fetch_one(conn, "cancel_job", params)
                if row is not None and row["canceled"] and row["was_head"]:
                    await queries.execute(
                        conn,
                        "promote_heads",
                        {"queue": queue, "conversations": [row["conversation"]]},
                    )
                    await queries.execute(conn, "notify_queue", {"queue": queue, "payload": ""})
        except psycopg.errors.LockNotAvailable:
            raise ValidationError(
                f"job {job_id} is being claimed or finished right now; only waiting or "
                "delayed jobs can be canceled",
                code="not_cancelable",
                field="id",
            ) from None
    if row is None or not row["canceled"]:
        # Claimed (active) or finished meanwhile: say what it is now.
        now = await get_job(conn, job_id, tenant_id=tenant_id)
        state = now["state"]
        raise ValidationError(
            f"job {job_id} is {state}; only waiting or delayed jobs can be canceled",
            code="not_cancelable",
            field="id",
        )
    job_log.info(
        "job %s canceled",
        job_id,
        extra={"fields": {"event": "canceled", "job_id": job_id, "tenant": job["tenant_id"]}},
    )
    return job


async def clean_failed(
    conn: queries.Conn,
    *,
    queue: str,
    older_than: datetime | None = None,
    tenant_id: str | None = None,
) -> int:
    row = await queries.fetch_one(
        conn,
        "clean_failed",
        {"queue": queue, "older_than": older_than, "tenant_id": tenant_id},
    )
    return int(row["deleted"]) if row else 0


_AGE = re.compile(r"(\d{1,6})\s*([smhdw])", re.ASCII)
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_MAX_AGE = timedelta(days=36500)


def parse_older_than(
    text: str, *, now: datetime | None = None, field: str = "older_than"
) -> datetime:
    """`7d`, `12h`, `30m`, `90s`, `2w` ago, or an ISO 8601 moment with a zone."""
    now = now or datetime.now(UTC)
    raw = text.strip()
    m = _AGE.fullmatch(raw.lower())
    if m:
        age = timedelta(seconds=int(m.group(1)) * _UNIT_S[m.group(2)])
        return now - min(age, _MAX_AGE)
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise ValidationError(
            f"{field} must be an age such as 7d, 12h, 30m, 90s, 2w, or an ISO 8601 time "
            "with a zone (2026-01-31T00:00:00Z)",
            code="invalid_older_than",
            field=field,
        )
    return moment
