"""Dead letters: retry to the tail of the conversation, clean, tenant scoping."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pgqueue import jobs
from pgqueue.errors import NotFoundError, ValidationError
from pgqueue.models import Message
from tests.helpers import add_tenants, phone, running_worker, send_many, wait_until_drained

Q = "whatsapp-send"


async def test_retry_and_clean_dead_letters(db_url: str, conn: Any, tmp_path: Path) -> None:
    await add_tenants(conn, 2)
    await send_many(
        conn,
        [
            Message(tenant_id="t0", phone_number=phone(1), text="dead [permanent]"),
            Message(tenant_id="t1", phone_number=phone(1), text="dead too [permanent]"),
        ],
    )
    record = tmp_path / "r.jsonl"
    async with running_worker(db_url, record):
        await wait_until_drained(conn, 20)
    failed = await jobs.list_jobs(conn, queue=Q, state="failed")
    assert len(failed) == 2
    t0_job = next(j for j in failed if j["tenant_id"] == "t0")
    # Tenant scope: t1 cannot see or retry t0's job.
    with pytest.raises(NotFoundError):
        await jobs.get_job(conn, t0_job["id"], tenant_id="t1")
    with pytest.raises(NotFoundError):
        await jobs.retry_job(conn, t0_job["id"], queue=Q, tenant_id="t1")
    # A retry while the conversation has a newer message: it goes behind it.
    await send_many(conn, [Message(tenant_id="t0", phone_number=phone(1), text="newer")])
    revived = await jobs.retry_job(conn, t0_job["id"], queue=Q, tenant_id="t0")
    assert revived["state"] == "waiting" and revived["attempts"] == 0 and not revived["is_head"]
    with pytest.raises(ValidationError):
        await jobs.retry_job(conn, t0_job["id"], queue=Q)  # not failed any more
    t = await (
        await conn.execute("SELECT failed_total FROM pgqueue.tenants WHERE id = 't0'")
    ).fetchone()
    assert t["failed_total"] == 0
    assert await jobs.clean_failed(conn, queue=Q, tenant_id="t0") == 0
    assert await jobs.clean_failed(conn, queue=Q) == 1
    assert await jobs.list_jobs(conn, queue=Q, state="failed") == []
    with pytest.raises(ValidationError):
        await jobs.list_jobs(conn, queue=Q, state="lost")
