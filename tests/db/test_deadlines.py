"""Deadlines (expiresAt / validFor / the queue's TTL per message type): a message not
started by then never reaches the provider, ends `expired`, and its conversation goes
on; one sent in time carries the time it has left to Twilio as ValidityPeriod."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from psycopg.types.json import Jsonb

from pgqueue.enqueue import validate
from pgqueue.errors import ValidationError
from pgqueue.metrics import queue_metrics
from pgqueue.models import Message
from pgqueue.statuses import apply_status
from tests.db.test_ops_cli import pgqueue
from tests.db.test_twilio_delivery import twilio_worker
from tests.support.fake_twilio import FakeTwilio
from tests.support.helpers import (
    ACCOUNT,
    add_tenants,
    phone,
    running_worker,
    send,
    wait_until_drained,
)

QUEUE = "whatsapp-send"


@pytest.fixture
def fake() -> Iterator[FakeTwilio]:
    with FakeTwilio() as f:
        f.add_account(ACCOUNT, "secret-token-t0")
        yield f


async def _states(conn: Any) -> dict[str, str]:
    cur = await conn.execute("SELECT body_preview, state FROM pgqueue.jobs_overview")
    return {r["body_preview"]: r["state"] for r in await cur.fetchall()}


async def test_an_expired_message_is_never_sent_and_its_conversation_goes_on(
    db_url: str, conn: Any, fake: FakeTwilio
) -> None:
    await add_tenants(conn, 1)
    await conn.execute(
        "UPDATE pgqueue.queues SET message_type_ttls = %s", (Jsonb({"marketing": 1}),)
    )
    # Paused, the tenant's messages wait; their deadlines do not.
    await conn.execute("UPDATE pgqueue.tenants SET paused = true")
    await send(conn, "t0", 1, text="stale", conversation_id="order-1", valid_for_s=1)
    await send(conn, "t0", 1, text="fresh", conversation_id="order-1")
    await send(conn, "t0", 1, text="later", conversation_id="order-1", valid_for_s=600)
    await send(conn, "t0", 2, text="promo", message_type="marketing")
    enqueued = time.time()
    async with twilio_worker(db_url, fake):
        await asyncio.sleep(1.6)
        assert fake.records() == []
        await conn.execute("UPDATE pgqueue.tenants SET paused = false")
        await conn.execute("SELECT pg_notify('pgqueue_whatsapp-send', '')")
        await wait_until_drained(conn, 30)
    sent = fake.sent()
    assert [r.body for r in sent] == ["fresh", "later"]
    assert await _states(conn) == {
        "stale": "expired",
        "fresh": "completed",
        "later": "completed",
        "promo": "expired",
    }
    fresh, later = sent
    assert fresh.validity_period is None
    # The time left when it went out: less than the 600 s it was given by the wait.
    assert later.validity_period is not None
    assert 1 <= int(later.validity_period) <= 600 - int(later.t - enqueued)
    assert int(later.validity_period) <= 599
    metrics = await queue_metrics(conn, QUEUE)
    assert (metrics["expired"], metrics["completed"]) == (2, 2)
    cur = await conn.execute("SELECT pending FROM pgqueue.conversations")
    assert {r["pending"] for r in await cur.fetchall()} == {0}


def test_a_deadline_must_leave_time_to_send() -> None:
    now = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
    base = Message(tenant_id="t0", phone_number=phone(1), text="hi")

    def code(**kw: Any) -> str:
        with pytest.raises(ValidationError) as caught:
            validate(Message(**{**base.__dict__, **kw}), now=now)
        return caught.value.code

    assert code(expires_at=now - timedelta(seconds=1)) == "invalid_expires_at"
    assert code(expires_at=datetime(2026, 12, 5, 12, 0)) == "invalid_expires_at"  # no zone
    assert (
        code(send_at=now + timedelta(hours=2), expires_at=now + timedelta(hours=1))
        == "invalid_expires_at"
    )
    assert code(valid_for_s=0) == "invalid_valid_for"
    assert code(expires_at=now + timedelta(hours=1), valid_for_s=60) == "invalid_expires_at"
    due = now + timedelta(hours=2)
    row = validate(Message(**{**base.__dict__, "send_at": due, "valid_for_s": 600}), now=now)
    assert row.expires_at == due + timedelta(seconds=600)


async def test_queue_ttls_per_message_type_are_set_from_the_cli(db_url: str, conn: Any) -> None:
    done = await pgqueue(
        db_url, "queue", "set", "--message-type-ttl", "marketing=3600",
        "--message-type-ttl", "notification=600",
    )  # fmt: skip
    assert done.code == 0, done.err
    assert "TTL marketing 3600 s, notification 600 s" in done.out
    done = await pgqueue(db_url, "queue", "set", "--message-type-ttl", "marketing=none")
    assert (await pgqueue(db_url, "queue", "show", "--json")).json()["message_type_ttls"] == {
        "notification": 600
    }
    refused = await pgqueue(db_url, "queue", "set", "--message-type-ttl", "marketing=0")
    assert refused.code == 2 and "marketing" in refused.err
    await add_tenants(conn, 1)
    due = datetime.now(UTC)
    job = await send(conn, "t0", 1, text="ready", message_type="notification")
    cur = await conn.execute("SELECT expires_at FROM pgqueue.jobs WHERE id = %s", (job.job_id,))
    expires_at = (await cur.fetchone())["expires_at"]
    assert timedelta(seconds=599) < expires_at - due < timedelta(seconds=602)


async def test_twilio_dropping_a_message_past_its_validity_period_makes_it_expired(
    db_url: str, conn: Any, tmp_path: Path
) -> None:
    await add_tenants(conn, 1)
    await send(conn, "t0", 1, text="too late for Twilio", valid_for_s=5)
    async with running_worker(db_url, tmp_path / "sends.jsonl"):
        await wait_until_drained(conn, 20)
    cur = await conn.execute("SELECT provider_sid FROM pgqueue.job_history")
    sid = (await cur.fetchone())["provider_sid"]
    assert (await queue_metrics(conn, QUEUE))["completed"] == 1
    update = await apply_status(
        conn, tenant_id="t0", sid=sid, status="undelivered", error_code="30036"
    )
    assert update.updated == 1
    assert await _states(conn) == {"too late for Twilio": "expired"}
    metrics = await queue_metrics(conn, QUEUE)
    assert (metrics["completed"], metrics["expired"]) == (0, 1)
