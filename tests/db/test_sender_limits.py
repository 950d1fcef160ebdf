"""WhatsApp's own limits: Twilio's 63018 (the business's messaging tier reached) rests
that tenant's sender, not the queue; its message waits without spending its attempt and
goes out by itself once the rest is over, while other tenants keep sending."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.db.test_twilio_delivery import twilio_worker
from tests.support.fake_twilio import FakeTwilio
from tests.support.helpers import ACCOUNT, add_tenants, phone, send, wait_until_drained


@pytest.fixture
def fake() -> Iterator[FakeTwilio]:
    with FakeTwilio() as f:
        f.add_account(ACCOUNT, "secret-token-t0")
        yield f


async def _job(conn: Any, job_id: int) -> dict[str, Any]:
    cur = await conn.execute("SELECT * FROM pgqueue.jobs_overview WHERE id = %s", (job_id,))
    row = await cur.fetchone()
    assert row is not None
    return dict(row)


async def test_63018_rests_only_that_sender_and_it_goes_on_by_itself(
    db_url: str, conn: Any, fake: FakeTwilio
) -> None:
    await add_tenants(conn, 2)
    # Two restaurants of one Twilio account (the fake knows one token per account).
    await conn.execute("UPDATE pgqueue.tenants SET auth_token = 'secret-token-t0'")
    fake.fail_number(phone(1), status=429, code=63018)
    limited = await send(conn, "t0", 1, text="tier reached")
    async with twilio_worker(db_url, fake):
        deadline = time.monotonic() + 20
        while not fake.records():
            assert time.monotonic() < deadline, "t0's message never reached the fake"
            await asyncio.sleep(0.05)
        other = await send(conn, "t1", 2, text="other tenant")
        while (await _job(conn, other.job_id))["state"] != "completed":
            assert time.monotonic() < deadline, "the other tenant's message was held up"
            await asyncio.sleep(0.05)
        job = await _job(conn, limited.job_id)
        assert (job["state"], job["attempts"]) == ("delayed", 0)
        cur = await conn.execute(
            "SELECT id, paused, paused_until, pause_reason FROM pgqueue.tenants ORDER BY id"
        )
        t0, t1 = await cur.fetchall()
        rest = t0["paused_until"] - datetime.now(UTC)
        assert timedelta(minutes=59) < rest <= timedelta(hours=1)
        assert t0["paused"] is False and "63018" in t0["pause_reason"]
        assert t1["paused_until"] is None
        cur = await conn.execute("SELECT rate_tat FROM pgqueue.queues")
        assert (await cur.fetchone())["rate_tat"] < datetime.now(UTC) + timedelta(seconds=5)
        assert [r.to for r in fake.records()].count(f"whatsapp:{phone(1)}") == 1
        # While it rests, the sender's other messages wait too.
        waits = await send(conn, "t0", 3, text="waits for the rest")
        await asyncio.sleep(1.0)
        assert (await _job(conn, waits.job_id))["state"] == "waiting"
        assert f"whatsapp:{phone(3)}" not in [r.to for r in fake.records()]

        # The rest is over (moved to the past here): the message goes out with no operator.
        fake.reset()
        await conn.execute(
            "UPDATE pgqueue.tenants SET paused_until = now() - interval '1 s' WHERE id = 't0'"
        )
        await conn.execute(
            "UPDATE pgqueue.jobs SET run_at = now() WHERE id = %s", (limited.job_id,)
        )
        await wait_until_drained(conn, 20)
    assert sorted(r.body or "" for r in fake.sent()) == ["tier reached", "waits for the rest"]
    assert (await _job(conn, limited.job_id))["state"] == "completed"
