"""Connection poolers (issue 20): a worker refuses a URL pooled in transaction mode,
where its session advisory locks and LISTEN would not hold, with one line naming the
fix; `pgqueue doctor` tells which URL is pooled. PgBouncer (Debian's, started here on a
port of its own in front of the test server) is the pooler."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from pgqueue import admin
from pgqueue.config import Settings
from pgqueue.db import as_url, make_pool, shares_sessions
from pgqueue.http import create_app
from tests.db.test_ops_cli import pgqueue
from tests.support.helpers import add_tenants, phone
from tests.support.pooler import Bouncer, Missing, bouncer_in_tmp


def _pgbouncer(db_url: str, mode: str) -> Iterator[Bouncer]:
    try:
        with bouncer_in_tmp(db_url, mode) as started:
            yield started
    except Missing as e:
        pytest.skip(str(e))


@pytest.fixture
def transaction_bouncer(db_url: str) -> Iterator[Bouncer]:
    yield from _pgbouncer(db_url, "transaction")


@pytest.fixture
def transaction_pooled(transaction_bouncer: Bouncer) -> str:
    return transaction_bouncer.url


@pytest.fixture
def session_bouncer(db_url: str) -> Iterator[Bouncer]:
    yield from _pgbouncer(db_url, "session")


@pytest.fixture
def session_pooled(session_bouncer: Bouncer) -> str:
    return session_bouncer.url


async def test_sessions_are_seen_shared_only_through_transaction_pooling(
    db_url: str, transaction_pooled: str, session_pooled: str
) -> None:
    assert await shares_sessions(as_url(db_url)) is False
    assert await shares_sessions(session_pooled) is False
    assert await shares_sessions(transaction_pooled) is True


def test_a_worker_refuses_a_transaction_pooled_url_in_one_line(
    db_url: str, conn: Any, transaction_pooled: str
) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PGQUEUE_")},
        "DATABASE_URL": transaction_pooled,
    }
    done = subprocess.run(
        [sys.executable, "-m", "pgqueue.worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "PGQUEUE_WORKER_DATABASE_URL" in lines[0], done.stderr
    assert "Traceback" not in done.stderr


async def test_doctor_names_the_pooled_url(db_url: str, conn: Any, transaction_pooled: str) -> None:
    worker_refused = await pgqueue(transaction_pooled, "doctor")
    pooler = [ln for ln in worker_refused.out.splitlines() if " pooler: " in ln]
    assert pooler and pooler[0].startswith("FAIL"), worker_refused.out
    assert "PGQUEUE_WORKER_DATABASE_URL" in pooler[0]
    split = await pgqueue(transaction_pooled, "doctor", PGQUEUE_WORKER_DATABASE_URL=as_url(db_url))
    pooler = [ln for ln in split.out.splitlines() if " pooler: " in ln]
    assert pooler and pooler[0].startswith("OK"), split.out
    assert "pooler: DATABASE_URL is pooled in transaction mode" in pooler[0]


async def test_the_api_works_through_transaction_pooling(
    db_url: str, conn: Any, transaction_pooled: str
) -> None:
    await add_tenants(conn, 1)
    token = await admin.create_token(conn, "t0")
    auth = {"Authorization": f"Bearer {token}"}
    # Opened by the app's lifespan, which finds the pooler and prepares nothing there:
    # psycopg would prepare each statement from its fifth run on.
    pool = make_pool(transaction_pooled, min_size=2, max_size=4)
    app = create_app(Settings(admin_token="admin-token-for-pooler-tests-0123"), pool)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as client,
    ):
        answers = [
            await client.post(
                "/api/whatsapp/send",
                json={"phoneNumber": phone(i % 3), "text": f"m{i}"},
                headers=auth,
            )
            for i in range(30)
        ]
        assert [r.status_code for r in answers] == [202] * 30, answers[-1].text
        job = await client.get(f"/api/jobs/{answers[-1].json()['jobId']}", headers=auth)
        assert job.status_code == 200 and job.json()["state"] == "waiting"
        metrics = await client.get("/api/queue/metrics", headers=auth)
        assert metrics.status_code == 200 and metrics.json()["waiting"] == 30


async def test_the_api_answers_only_503s_while_the_pooler_restarts(
    db_url: str, conn: Any, transaction_bouncer: Bouncer
) -> None:
    """Through transaction pooling, PgBouncer stopped at once and started again on the
    same port mid-load: the API answers 202 or 503 with Retry-After, never another error
    or a hang, and comes back by itself. Each message is sent until it is queued, with
    its idempotency key, so exactly one job exists per message."""
    await add_tenants(conn, 1)
    token = await admin.create_token(conn, "t0")
    auth = {"Authorization": f"Bearer {token}"}
    pool = make_pool(transaction_bouncer.url, min_size=2, max_size=4)
    app = create_app(
        Settings(admin_token="admin-token-for-pooler-tests-0123"), pool, db_timeout_s=1.0
    )
    statuses: Counter[int] = Counter()
    missing_retry_after = 0
    messages = 60
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://x", timeout=15
        ) as client,
    ):

        async def load() -> None:
            nonlocal missing_retry_after
            for i in range(messages):
                while True:
                    r = await client.post(
                        "/api/whatsapp/send",
                        json={"phoneNumber": phone(i % 5), "text": f"m{i}"},
                        headers={**auth, "Idempotency-Key": f"restart-{i}"},
                    )
                    statuses[r.status_code] += 1
                    if r.status_code == 503:
                        missing_retry_after += "retry-after" not in r.headers
                        await asyncio.sleep(0.05)
                        continue
                    break
                await asyncio.sleep(0.03)

        sending = asyncio.create_task(load())
        await asyncio.sleep(0.5)
        await asyncio.to_thread(transaction_bouncer.stop, signal.SIGTERM)
        await asyncio.sleep(1.5)
        await asyncio.to_thread(transaction_bouncer.start)
        await asyncio.wait_for(sending, 60)
    assert set(statuses) <= {202, 503}, statuses
    assert statuses[202] == messages and statuses[503] >= 1, statuses
    assert missing_retry_after == 0
    cur = await conn.execute("SELECT count(*) AS n FROM pgqueue.jobs")
    assert (await cur.fetchone())["n"] == messages
