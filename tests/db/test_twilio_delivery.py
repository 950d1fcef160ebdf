"""The worker delivering through the real Twilio SDK to a fake Twilio on loopback:
each error class ends in the right job state (issue 4, G7)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from pgqueue import cli
from pgqueue.config import Settings
from pgqueue.db import as_url
from pgqueue.dispatcher import DispatcherConfig
from pgqueue.errors import ValidationError
from pgqueue.providers.default import default_provider
from pgqueue.worker import Worker
from tests.support.fake_twilio import FakeTwilio
from tests.support.helpers import ACCOUNT, add_tenants, phone, send, wait_until_drained

TEMPLATE = "HX" + "c" * 32


@pytest.fixture
def fake() -> Iterator[FakeTwilio]:
    with FakeTwilio() as f:
        f.add_account(ACCOUNT, "secret-token-t0")
        yield f


@contextlib.asynccontextmanager
async def twilio_worker(db_url: str, fake: FakeTwilio) -> AsyncIterator[Worker]:
    settings = Settings(twilio_api_base_url=fake.base_url, backoff_delay_ms=300, send_timeout_s=2)
    cfg = DispatcherConfig(backoff_ms=300, poll_interval_s=0.1, send_timeout_s=5)
    worker = Worker(settings, db_url, config=cfg, provider_factory=default_provider)
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.stop.set()
        await asyncio.wait_for(task, 30)


async def history(conn: Any) -> dict[str, dict[str, Any]]:
    cur = await conn.execute("SELECT * FROM pgqueue.job_history")
    return {r["body"]: r for r in await cur.fetchall()}


async def test_error_classes_end_in_the_right_state(
    db_url: str, conn: Any, fake: FakeTwilio, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await add_tenants(conn, 1)
    await conn.execute(
        "UPDATE pgqueue.tenants SET fallback_content_sid = %s, fallback_variable = '1'", (TEMPLATE,)
    )
    fake.fail_number(phone(2), status=400, code=21211)
    fake.fail_number(phone(3), status=400, code=63016)
    fake.fail_number(phone(4), status=400, code=21610)
    fake.fail_next(1, status=500, code=20500, to=phone(5))
    await send(conn, "t0", 1, text="plain")
    await send(conn, "t0", 2, text="invalid number")
    await send(conn, "t0", 3, text="outside window")
    await send(conn, "t0", 4, text="unsubscribed")
    await send(conn, "t0", 5, text="flaky")
    async with twilio_worker(db_url, fake):
        await wait_until_drained(conn, 30)
    h = await history(conn)
    sids = {r.sid for r in fake.sent()}
    assert h["plain"]["state"] == "completed" and h["plain"]["provider_sid"] in sids
    assert h["plain"]["channel"] == "freeform"
    assert (h["invalid number"]["state"], h["invalid number"]["last_error_code"]) == (
        "failed",
        "21211",
    )
    assert h["unsubscribed"]["last_error_code"] == "21610"
    flaky = h["flaky"]
    assert flaky["state"] == "completed" and flaky["attempts"] == 2
    tries = [r for r in fake.records() if (r.to or "").endswith(phone(5))]
    assert tries[1].t - tries[0].t_end >= 0.29  # QUEUE_BACKOFF_DELAY honoured
    # The fallback template is refused too (the number fails every send): dead, with
    # the window's code.
    window = h["outside window"]
    assert (window["state"], window["last_error_code"]) == ("failed", "63016")
    # Suppression: a later enqueue to the unsubscribed number is refused, not sent.
    with pytest.raises(ValidationError) as e:
        await send(conn, "t0", 4, text="again")
    assert e.value.code == "number_suppressed"
    # Never a secret in the logs.
    assert "secret-token-t0" not in caplog.text


async def test_template_fallback_outside_the_window(
    db_url: str, conn: Any, fake: FakeTwilio
) -> None:
    await add_tenants(conn, 1)
    await conn.execute(
        "UPDATE pgqueue.tenants SET fallback_content_sid = %s, fallback_variable = '1'", (TEMPLATE,)
    )
    fake.fail_next(1, status=400, code=63016, to=phone(3))
    await send(conn, "t0", 3, text="order ready")
    async with twilio_worker(db_url, fake):
        await wait_until_drained(conn, 20)
    h = await history(conn)
    assert h["order ready"]["state"] == "completed"
    assert h["order ready"]["channel"] == "template"
    last = fake.sent()[-1]
    assert last.content_sid == TEMPLATE and "order ready" in (last.content_variables or "")


async def test_bad_credentials_pause_the_tenant_until_resumed(
    db_url: str, conn: Any, fake: FakeTwilio, monkeypatch: pytest.MonkeyPatch
) -> None:
    await add_tenants(conn, 2)
    fake.add_account(ACCOUNT, "a-different-token")  # t0's token is now wrong
    await send(conn, "t0", 1, text="t0 message")
    async with twilio_worker(db_url, fake):
        for _ in range(200):
            cur = await conn.execute(
                "SELECT paused, pause_reason FROM pgqueue.tenants WHERE id = 't0'"
            )
            t = await cur.fetchone()
            if t["paused"]:
                break
            await asyncio.sleep(0.05)
        assert t["paused"] and "20003" in t["pause_reason"]
        await asyncio.sleep(0.5)  # paused: no further attempts burn retries
        cur = await conn.execute("SELECT attempts, state FROM pgqueue.jobs")
        job = await cur.fetchone()
        assert (job["attempts"], job["state"]) == (0, "waiting")
        assert len([r for r in fake.records() if r.outcome == "auth_failed"]) == 1
        # The operator fixes the token and resumes the tenant from the CLI.
        fake.add_account(ACCOUNT, "secret-token-t0")
        monkeypatch.setenv("DATABASE_URL", as_url(db_url))
        assert await asyncio.to_thread(cli.run, ["tenant", "set", "t0", "--resume"]) == 0
        await wait_until_drained(conn, 20)
    assert (await history(conn))["t0 message"]["state"] == "completed"


async def test_429_retry_after_pauses_the_queue(db_url: str, conn: Any, fake: FakeTwilio) -> None:
    await add_tenants(conn, 1)
    fake.fail_next(1, status=429, code=20429, retry_after=1, to=phone(1))
    await send(conn, "t0", 1, text="throttled")
    async with twilio_worker(db_url, fake):
        await fake.wait_for(1)
        await send(conn, "t0", 2, text="other")
        await wait_until_drained(conn, 20)
    recs = fake.records()
    first = recs[0]
    assert first.status == 429
    assert min(r.t for r in recs[1:]) >= first.t_end + 0.95  # the whole queue waited
    h = await history(conn)
    assert h["throttled"]["attempts"] == 2
