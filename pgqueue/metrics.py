"""Queue statistics in the old system's shape, for the API, the CLI and the metrics log.

The numbers cost the same with a million finished jobs as with none: live states are
counted on the small live table and finished ones come from the tenants' counters
(see the API section of queries.sql). `failed` is the dead letters still kept: the
counter goes up when a job dies and down when one is retried or cleaned.
"""

from __future__ import annotations

from typing import Any

from psycopg_pool import AsyncConnectionPool

from pgqueue import queries
from pgqueue.config import Settings
from pgqueue.db import connect, resolve_database_url
from pgqueue.errors import NotFoundError


async def queue_metrics(
    conn: queries.Conn, queue: str, *, tenant_id: str | None = None
) -> dict[str, Any]:
    """`waiting, active, completed, failed, delayed, tenantConcurrency,
    maxConcurrencyPerTenant, pausedTenants`. With `tenant_id` every number is that
    tenant's own (its jobs, its counters, its limit); an unknown tenant is NotFoundError."""
    if tenant_id is None:
        row = await queries.fetch_one(conn, "api_queue_counts", {"queue": queue}) or {}
        return {
            "waiting": int(row.get("waiting") or 0),
            "active": int(row.get("active") or 0),
            "completed": int(row.get("completed") or 0),
            "failed": int(row.get("failed") or 0),
            "delayed": int(row.get("delayed") or 0),
            "tenantConcurrency": {
                str(k): int(v) for k, v in sorted((row.get("tenant_concurrency") or {}).items())
            },
            "maxConcurrencyPerTenant": int(row.get("max_concurrency_per_tenant") or 5),
            "pausedTenants": list(row.get("paused_tenants") or []),
        }
    one = await queries.fetch_one(
        conn, "api_tenant_counts", {"queue": queue, "tenant_id": tenant_id}
    )
    if one is None:
        raise NotFoundError(f"no tenant {tenant_id!r}")
    return {
        "waiting": int(one["waiting"]),
        "active": int(one["active"]),
        "completed": int(one["completed"]),
        "failed": int(one["failed"]),
        "delayed": int(one["delayed"]),
        "tenantConcurrency": {tenant_id: int(one["in_flight"])},
        "maxConcurrencyPerTenant": int(one["max_concurrency_per_tenant"] or 5),
        "pausedTenants": [tenant_id] if one["paused"] else [],
    }


async def get_queue_metrics(
    source: queries.Conn | AsyncConnectionPool[Any] | str | None = None,
    *,
    queue: str | None = None,
    tenant_id: str | None = None,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """The numbers of `GET /api/queue/metrics`, for Python callers.

    `source` is a connection, a pool or a database URL; without one the URL comes from
    the environment (DATABASE_URL, else the embedded server) like every command's.
    `queue` defaults to WHATSAPP_SEND_QUEUE_NAME.
    """
    if settings is None:
        settings = Settings.from_env()
    name = queue or settings.queue_name
    if isinstance(source, AsyncConnectionPool):
        async with source.connection() as conn:
            return await queue_metrics(conn, name, tenant_id=tenant_id)
    if source is None or isinstance(source, str):
        url = source or resolve_database_url(settings, announce=None)
        conn = await connect(url, application_name="pgqueue-metrics")
        try:
            return await queue_metrics(conn, name, tenant_id=tenant_id)
        finally:
            await conn.close()
    return await queue_metrics(source, name, tenant_id=tenant_id)
