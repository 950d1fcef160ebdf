"""The dispatcher in one process against a real PostgreSQL: FIFO, limits, retries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pgqueue.models import Message
from tests.helpers import add_tenants, phone, running_worker, send_many, wait_until_drained
from tests.recording import max_overlap, read_sends


async def test_all_jobs_are_sent_once_in_conversation_order(db_url: str, conn: Any, tmp_path: Path) -> None:
    tenants = await add_tenants(conn, 3)
    messages = [
        Message(tenant_id=tenants[i % 3], phone_number=phone(i % 7), text=f"m{i}")
        for i in range(60)
    ]
    await send_many(conn, messages)
    record = tmp_path / "sends.jsonl"
    async with running_worker(db_url, record, latency=(0.005, 0.02)):
        await wait_until_drained(conn, 30)
    sends = read_sends(record)
    assert sorted(s.body for s in sends) == sorted(m.text for m in messages)
    by_conv: dict[str, list[int]] = {}
    for s in sorted(sends, key=lambda s: s.start):
        by_conv.setdefault(s.conv, []).append(int(s.body[1:]))
    for order in by_conv.values():
        assert order == sorted(order)
    assert max_overlap(sends, key=lambda s: s.conv) == 1
    assert max_overlap(sends, key=lambda s: s.tenant) <= 5
    cur = await conn.execute("SELECT count(*) AS n FROM pgqueue.job_history WHERE state = 'completed'")
    assert (await cur.fetchone())["n"] == 60
    cur = await conn.execute("SELECT sum(active) AS a FROM pgqueue.tenants")
    assert (await cur.fetchone())["a"] == 0
