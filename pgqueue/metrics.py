"""Queue statistics in the old system's shape, for the API, the CLI and the metrics log.

The numbers cost the same with a million finished jobs as with none: live states are
counted on the small live table and finished ones come from the tenants' counters
(see the API section of queries.sql). `failed` is the dead letters still kept: the
counter goes up when a job dies and down when one is retried or cleaned.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from psycopg_pool import AsyncConnectionPool

from pgqueue import queries
from pgqueue.config import Settings
from pgqueue.db import connect, resolve_database_url
from pgqueue.errors import NotFoundError


async def queue_metrics(
    conn: queries.Conn, queue: str, *, tenant_id: str | None = None
) -> dict[str, Any]:
    """`waiting, active, completed, failed, delayed, expired, tenantConcurrency,
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
            "expired": int(row.get("expired") or 0),
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
        "expired": int(one["expired"]),
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


# -- Prometheus: the queue as the database sees it, at scrape time --------------------


async def queue_snapshot(conn: queries.Conn, queue: str) -> dict[str, Any]:
    params = {"queue": queue, "tenant_id": None}
    return {
        "counts": await queries.fetch_one(conn, "api_queue_counts", params) or {},
        "state": await queries.fetch_one(conn, "api_queue_state", params),
        "tenants": await queries.fetch_all(conn, "api_tenants", params),
        "failures": await queries.fetch_all(conn, "api_recent_failures", params),
        "retrying": await queries.fetch_all(conn, "api_retrying_by_code", params),
        "webhooks": await queries.fetch_all(conn, "api_webhooks", params),
    }


class SnapshotCollector:
    """The queue as the database sees it at scrape time (all processes, all hosts)."""

    def __init__(self, snapshot: dict[str, Any], queue: str) -> None:
        self.snapshot = snapshot
        self.queue = queue

    @classmethod
    def registry(cls, snapshot: dict[str, Any], queue: str) -> Any:
        reg = CollectorRegistry(auto_describe=False)
        reg.register(cls(snapshot, queue))
        return reg

    def collect(self) -> Any:
        q = self.queue
        counts = self.snapshot["counts"]
        depth = GaugeMetricFamily("pgqueue_jobs", "Live jobs by state", labels=["queue", "state"])
        for state in ("waiting", "delayed", "active"):
            depth.add_metric([q, state], float(counts.get(state) or 0))
        yield depth

        sends = CounterMetricFamily(
            "pgqueue_sends_completed",
            "Messages the provider accepted, per tenant",
            labels=["queue", "tenant"],
        )
        expired = CounterMetricFamily(
            "pgqueue_sends_expired",
            "Messages never sent because their deadline passed first, per tenant",
            labels=["queue", "tenant"],
        )
        dead = GaugeMetricFamily(
            "pgqueue_dead_letters",
            "Failed jobs kept (dead letters), per tenant",
            labels=["queue", "tenant"],
        )
        in_flight = GaugeMetricFamily(
            "pgqueue_tenant_in_flight", "Sends in flight per tenant", labels=["queue", "tenant"]
        )
        limit = GaugeMetricFamily(
            "pgqueue_tenant_max_concurrency",
            "Sends in flight allowed per tenant",
            labels=["queue", "tenant"],
        )
        paused = GaugeMetricFamily(
            "pgqueue_tenant_paused", "1 when the tenant is paused", labels=["queue", "tenant"]
        )
        for t in self.snapshot["tenants"]:
            labels = [q, str(t["id"])]
            sends.add_metric(labels, float(t["completed_total"]))
            dead.add_metric(labels, float(t["failed_total"]))
            expired.add_metric(labels, float(t["expired_total"]))
            in_flight.add_metric(labels, float(t["active"]))
            limit.add_metric(labels, float(t["max_concurrency"] or 0))
            paused.add_metric(labels, 1.0 if t["paused"] else 0.0)
        yield from (sends, expired, dead, in_flight, limit, paused)

        failures = GaugeMetricFamily(
            "pgqueue_failures_last_hour",
            "Jobs that died in the last hour, by error code",
            labels=["queue", "code"],
        )
        for f in self.snapshot["failures"]:
            failures.add_metric([q, str(f["code"])], float(f["n"]))
        yield failures
        retrying = GaugeMetricFamily(
            "pgqueue_jobs_retrying",
            "Live jobs waiting for a retry, by the error code of their last attempt",
            labels=["queue", "code"],
        )
        for r in self.snapshot["retrying"]:
            retrying.add_metric([q, str(r["code"])], float(r["n"]))
        yield retrying
        hooks: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "delivered": CounterMetricFamily(
                "pgqueue_webhook_events_delivered",
                "Delivery events a tenant's webhook endpoint acknowledged",
                labels=["tenant"],
            ),
            "dead": GaugeMetricFamily(
                "pgqueue_webhook_dead_letters",
                "Batches of events a tenant's endpoint kept refusing (kept, not posted again)",
                labels=["tenant"],
            ),
            "attempts": GaugeMetricFamily(
                "pgqueue_webhook_failed_attempts",
                "Attempts in a row the tenant's endpoint has refused (0: healthy)",
                labels=["tenant"],
            ),
        }
        for w in self.snapshot.get("webhooks", []):
            for key, family in hooks.items():
                family.add_metric([w["tenant_id"]], float(w[key]))
        yield from hooks.values()

        state = self.snapshot["state"]
        if state is None:
            return
        for name, help_text, key in (
            ("pgqueue_queue_in_flight", "Sends in flight in the whole queue", "in_flight"),
            (
                "pgqueue_queue_max_in_flight",
                "Sends in flight allowed in the queue",
                "global_concurrency",
            ),
            ("pgqueue_rate_limit_per_second", "Send starts allowed per second", "rate_per_second"),
            (
                "pgqueue_rate_booked_ahead_seconds",
                "How far ahead of now send starts are booked (a provider 429 pushes it out)",
                "rate_ahead_s",
            ),
            ("pgqueue_workers", "Workers that sent a heartbeat in the last minute", "workers"),
            (
                "pgqueue_oldest_due_waiting_seconds",
                "Age of the oldest message that is due and not yet sent",
                "oldest_due_s",
            ),
        ):
            gauge = GaugeMetricFamily(name, help_text, labels=["queue"])
            gauge.add_metric([q], float(state.get(key) or 0.0))
            yield gauge
        bucket = GaugeMetricFamily(
            "pgqueue_rate_bucket_level",
            "Send starts already booked ahead of now (rate_per_second x booked seconds)",
            labels=["queue"],
        )
        bucket.add_metric(
            [q], float(state.get("rate_ahead_s") or 0.0) * float(state["rate_per_second"])
        )
        yield bucket
