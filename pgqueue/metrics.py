"""Queue statistics in the old system's shape (and, later, Prometheus collectors)."""

from __future__ import annotations

from typing import Any

from pgqueue import queries


async def queue_metrics(
    conn: queries.Conn, queue: str, *, tenant_id: str | None = None
) -> dict[str, Any]:
    """`waiting, active, completed, failed, delayed, tenantConcurrency,
    maxConcurrencyPerTenant`; with `tenant_id`, the tenant sees only itself."""
    counts = await queries.fetch_one(conn, "queue_counts", {"queue": queue}) or {}
    tenants = await queries.fetch_all(conn, "tenant_in_flight", {"queue": queue})
    if tenant_id is not None:
        tenants = [t for t in tenants if t["id"] == tenant_id]
    return {
        "waiting": int(counts.get("waiting") or 0),
        "active": int(counts.get("active") or 0),
        "completed": int(counts.get("completed") or 0),
        "failed": int(counts.get("failed") or 0),
        "delayed": int(counts.get("delayed") or 0),
        "tenantConcurrency": {t["id"]: int(t["active"]) for t in tenants},
        "maxConcurrencyPerTenant": int(counts.get("max_concurrency_per_tenant") or 5),
        "pausedTenants": [t["id"] for t in tenants if t["paused"]],
    }
