"""Shared helpers for the database tests: tenants, messages, running workers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from pgqueue import admin
from pgqueue.config import Settings
from pgqueue.dispatcher import DispatcherConfig
from pgqueue.enqueue import enqueue_whatsapp_send, enqueue_whatsapp_send_batch
from pgqueue.models import Enqueued, Message
from pgqueue.worker import Worker
from tests.support.recording import RecordingProvider

REPO = Path(__file__).resolve().parents[2]
ACCOUNT = "AC" + "0" * 32


def phone(n: int) -> str:
    return f"+1415555{n % 10000:04d}"


async def add_tenants(conn: Any, n: int, *, prefix: str = "t", **kw: Any) -> list[str]:
    ids = []
    for i in range(n):
        tid = f"{prefix}{i}"
        await admin.add_tenant(
            conn,
            tenant_id=tid,
            account_sid=ACCOUNT,
            auth_token="secret-token-" + tid,
            whatsapp_from="+14155550100",
            **kw,
        )
        ids.append(tid)
    return ids


async def send(conn: Any, tenant: str, to: int, text: str = "hello", **kw: Any) -> Enqueued:
    return await enqueue_whatsapp_send(
        conn, Message(tenant_id=tenant, phone_number=phone(to), text=text, **kw)
    )


async def send_many(conn: Any, messages: list[Message]) -> list[Enqueued]:
    out: list[Enqueued] = []
    for i in range(0, len(messages), 1000):
        out += await enqueue_whatsapp_send_batch(conn, messages[i : i + 1000])
    return out


async def wait_until_drained(
    conn: Any, timeout: float = 60.0, queue: str = "whatsapp-send"
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cur = await conn.execute(
            "SELECT count(*) AS n FROM pgqueue.jobs WHERE queue = %s", (queue,)
        )
        row = await cur.fetchone()
        if row["n"] == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("queue did not drain in time")


@contextlib.asynccontextmanager
async def running_worker(
    url: str,
    record: Path,
    *,
    concurrency: int = 20,
    latency: tuple[float, float] = (0.0, 0.0),
    settings: Settings | None = None,
    **config: Any,
) -> AsyncIterator[Worker]:
    settings = settings or Settings(backoff_delay_ms=200)
    cfg = DispatcherConfig(
        concurrency=concurrency, backoff_ms=settings.backoff_delay_ms, poll_interval_s=0.2, **config
    )
    worker = Worker(
        settings,
        url,
        config=cfg,
        provider_factory=lambda s, p: RecordingProvider(record, latency=latency),
        drain_timeout_s=10,
    )
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.stop.set()
        await asyncio.wait_for(task, 30)


def headers_made_invalid(case: Any) -> bool:
    """Whether schemathesis made this case's headers invalid on purpose: a harness that
    puts a valid token on every request undoes that, and the request is negative no more."""
    meta = case.meta
    return meta is not None and any(
        location == "header" and info.mode.is_negative for location, info in meta.components.items()
    )
