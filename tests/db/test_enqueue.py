"""Enqueue against a real PostgreSQL: heads, order, idempotency, all-or-nothing batches."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from pgqueue.db import connect
from pgqueue.enqueue import BatchValidationError, enqueue_whatsapp_send, enqueue_whatsapp_send_batch
from pgqueue.errors import ValidationError
from pgqueue.models import Message
from tests.support.helpers import add_tenants, phone, send


async def rows(conn: Any, query: str, *params: Any) -> list[dict[str, Any]]:
    cur = await conn.execute(query, params)
    return await cur.fetchall()


async def test_first_message_of_a_conversation_is_its_head(conn: Any) -> None:
    await add_tenants(conn, 1)
    a = await send(conn, "t0", 1)
    b = await send(conn, "t0", 1)
    c = await send(conn, "t0", 2)
    assert (a.ahead, b.ahead, c.ahead) == (0, 1, 0)
    assert a.state == "waiting" and not a.duplicate
    heads = await rows(conn, "SELECT id FROM pgqueue.jobs WHERE is_head ORDER BY id")
    assert [r["id"] for r in heads] == [a.job_id, c.job_id]
    conv = await rows(conn, "SELECT conversation, pending FROM pgqueue.conversations ORDER BY 1")
    assert [(r["conversation"], r["pending"]) for r in conv] == [
        (f"t0:{phone(1)}", 2),
        (f"t0:{phone(2)}", 1),
    ]


async def test_idempotency_key_returns_the_first_job(conn: Any) -> None:
    await add_tenants(conn, 2)
    first = await send(conn, "t0", 1, idempotency_key="order-42")
    again = await send(conn, "t0", 1, text="other text", idempotency_key="order-42")
    other_tenant = await send(conn, "t1", 1, idempotency_key="order-42")
    assert again.job_id == first.job_id and again.duplicate
    assert other_tenant.job_id != first.job_id
    assert len(await rows(conn, "SELECT id FROM pgqueue.jobs")) == 2
    # Still found after the job finished and moved to history.
    await conn.execute(
        "WITH d AS (DELETE FROM pgqueue.jobs WHERE id = %s RETURNING *) "
        "INSERT INTO pgqueue.job_history (id, seq, queue, tenant_id, conversation, to_number, "
        "body, idempotency_key, max_attempts, state) "
        "SELECT id, seq, queue, tenant_id, conversation, to_number, body, idempotency_key, "
        "max_attempts, 'completed' FROM d",
        (first.job_id,),
    )
    later = await send(conn, "t0", 1, idempotency_key="order-42")
    assert later.job_id == first.job_id and later.duplicate


async def test_concurrent_same_key_makes_one_job(db_url: str, conn: Any) -> None:
    await add_tenants(conn, 1)
    conns = [await connect(db_url) for _ in range(6)]
    try:
        results = await asyncio.gather(*(send(c, "t0", 1, idempotency_key="same") for c in conns))
    finally:
        for c in conns:
            await c.close()
    assert len({r.job_id for r in results}) == 1
    assert len(await rows(conn, "SELECT id FROM pgqueue.jobs")) == 1


async def test_concurrent_enqueues_to_one_conversation_keep_one_head(
    db_url: str, conn: Any
) -> None:
    await add_tenants(conn, 1)
    conns = [await connect(db_url) for _ in range(8)]
    try:
        await asyncio.gather(
            *(send(c, "t0", 7, text=f"{i}-{j}") for i, c in enumerate(conns) for j in range(10))
        )
    finally:
        for c in conns:
            await c.close()
    jobs = await rows(conn, "SELECT id, seq, is_head FROM pgqueue.jobs ORDER BY seq")
    assert len(jobs) == 80
    assert [j["is_head"] for j in jobs] == [True] + [False] * 79
    conv = await rows(conn, "SELECT pending FROM pgqueue.conversations")
    assert conv == [{"pending": 80}]


async def test_batch_is_all_or_nothing(conn: Any) -> None:
    await add_tenants(conn, 1)
    good = [Message(tenant_id="t0", phone_number=phone(i), text="x") for i in range(5)]
    bad = Message(tenant_id="t0", phone_number="12345", text="x")
    with pytest.raises(BatchValidationError) as e:
        await enqueue_whatsapp_send_batch(conn, [*good, bad])
    assert e.value.index == 5 and e.value.code == "invalid_phone_number"
    assert "messages[5]" in e.value.message
    with pytest.raises(BatchValidationError) as e2:
        await enqueue_whatsapp_send_batch(
            conn, [*good, Message(tenant_id="nope", phone_number=phone(1), text="x")]
        )
    assert e2.value.code == "unknown_tenant" and e2.value.index == 5
    assert await rows(conn, "SELECT id FROM pgqueue.jobs") == []
    assert await rows(conn, "SELECT * FROM pgqueue.conversations") == []


async def test_batch_keeps_order_heads_and_idempotency(conn: Any) -> None:
    await add_tenants(conn, 2)
    await send(conn, "t0", 1, idempotency_key="k-old")
    msgs = [
        Message(tenant_id="t0", phone_number=phone(1), text="a"),  # behind the existing job
        Message(tenant_id="t0", phone_number=phone(2), text="b"),
        Message(tenant_id="t0", phone_number=phone(2), text="c"),
        Message(tenant_id="t1", phone_number=phone(2), text="d", idempotency_key="k1"),
        Message(tenant_id="t1", phone_number=phone(3), text="e", idempotency_key="k1"),
        Message(tenant_id="t0", phone_number=phone(1), text="f", idempotency_key="k-old"),
    ]
    out = await enqueue_whatsapp_send_batch(conn, msgs)
    assert [o.ahead for o in out[:4]] == [1, 0, 1, 0]
    assert out[4].job_id == out[3].job_id and out[4].duplicate
    assert out[5].duplicate
    jobs = await rows(conn, "SELECT body, is_head FROM pgqueue.jobs ORDER BY seq")
    assert [(j["body"], j["is_head"]) for j in jobs] == [
        ("hello", True),
        ("a", False),
        ("b", True),
        ("c", False),
        ("d", True),
    ]


async def test_unknown_tenant_and_suppressed_number(conn: Any) -> None:
    await add_tenants(conn, 1)
    with pytest.raises(ValidationError) as e:
        await send(conn, "ghost", 1)
    assert e.value.code == "unknown_tenant"
    await conn.execute(
        "INSERT INTO pgqueue.suppressions (tenant_id, phone_number, reason_code) "
        "VALUES ('t0', %s, '21610')",
        (phone(9),),
    )
    with pytest.raises(ValidationError) as e:
        await send(conn, "t0", 9)
    assert e.value.code == "number_suppressed" and "21610" in e.value.message
    with pytest.raises(BatchValidationError) as e:
        await enqueue_whatsapp_send_batch(
            conn, [Message(tenant_id="t0", phone_number=phone(9), text="x")]
        )
    assert e.value.code == "number_suppressed"
    assert await rows(conn, "SELECT id FROM pgqueue.jobs") == []
    assert await rows(conn, "SELECT * FROM pgqueue.conversations") == []


async def test_send_at_priority_and_message_type(conn: Any) -> None:
    await add_tenants(conn, 1)
    later = datetime.now(UTC) + timedelta(minutes=5)
    d = await send(conn, "t0", 1, send_at=later)
    assert d.state == "delayed"
    await send(conn, "t0", 2, message_type="customer_service")
    await send(conn, "t0", 3, message_type="marketing")
    await send(conn, "t0", 4, message_type="marketing", priority=-3)
    await send(conn, "t0", 5, message_type="unknown_kind")
    got = await rows(conn, "SELECT priority, state FROM pgqueue.jobs ORDER BY seq")
    assert [g["priority"] for g in got] == [0, 10, 5, -3, 0]
    assert got[0]["state"] == "delayed"


async def test_enqueue_notifies_the_queue(db_url: str, conn: Any) -> None:
    await add_tenants(conn, 1)
    listener = await psycopg.AsyncConnection.connect(db_url, autocommit=True)
    try:
        await listener.execute('LISTEN "pgqueue_whatsapp-send"')
        await send(conn, "t0", 1)
        got = [n async for n in listener.notifies(timeout=2.0, stop_after=1)]
        assert len(got) == 1
    finally:
        await listener.close()


async def test_pool_source_works(pool: Any, conn: Any) -> None:
    await add_tenants(conn, 1)
    r = await enqueue_whatsapp_send(
        pool, Message(tenant_id="t0", phone_number=phone(1), text="via pool")
    )
    assert r.job_id > 0
