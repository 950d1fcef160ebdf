"""The API as users run it: a real `pgqueue serve` process (uvicorn) on a free port."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgqueue import admin, migrate
from pgqueue.db import with_dbname
from pgqueue.server import free_port
from tests.support.fake_twilio import FakeTwilio
from tests.support.helpers import add_tenants, phone
from tests.support.serve import ADMIN, serving

REPO = Path(__file__).resolve().parents[2]


async def test_serve_answers_over_http_and_stops_cleanly_on_sigterm(
    db_url: str, conn: Any, tmp_path: Path
) -> None:
    await add_tenants(conn, 2)
    token = await admin.create_token(conn, "t0")
    auth = {"Authorization": f"Bearer {token}"}
    async with serving(db_url, tmp_path) as (client, proc, log):
        assert (await client.get("/readyz")).json()["status"] == "ready"
        r = await client.post(
            "/api/whatsapp/send", json={"phoneNumber": phone(1), "text": "hola"}, headers=auth
        )
        assert r.status_code == 202, r.text
        job_id = r.json()["jobId"]
        # 50 at once over real sockets: all accepted, in order within the conversation.
        answers = await asyncio.gather(
            *(
                client.post(
                    "/api/whatsapp/send",
                    json={"phoneNumber": phone(2), "text": f"m{i}"},
                    headers=auth,
                )
                for i in range(50)
            )
        )
        assert sorted(a.json()["queuePosition"]["ahead"] for a in answers) == list(range(50))
        job = (await client.get(f"/api/jobs/{job_id}", headers=auth)).json()
        assert job["state"] == "waiting"
        other = await client.get(
            f"/api/jobs/{job_id}", headers={"Authorization": f"Bearer {ADMIN}x"}
        )
        assert other.status_code == 401
        metrics = (await client.get("/api/queue/metrics", headers=auth)).json()
        assert metrics["waiting"] == 51 and metrics["tenantConcurrency"] == {"t0": 0}
        everyone = await client.get(
            "/api/queue/metrics", headers={"Authorization": f"Bearer {ADMIN}"}
        )
        assert set(everyone.json()["tenantConcurrency"]) == {"t0", "t1"}
        bad = await client.post(
            "/api/whatsapp/send",
            content=b'{"phoneNumber": ',
            headers={**auth, "Content-Type": "application/json"},
        )
        assert bad.status_code == 400
        big = await client.post(
            "/api/whatsapp/send",
            content=b"{" + b" " * (70 * 1024) + b"}",
            headers={**auth, "Content-Type": "application/json"},
        )
        assert big.status_code == 413
        assert "pgqueue_jobs" in (await client.get("/metrics")).text

        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 15) == 0
    output = log.read_text()
    assert token not in output and ADMIN not in output and "Traceback" not in output


async def test_a_database_that_goes_away_gives_503s_not_500s_or_hangs(
    server_url: str, tmp_path: Path
) -> None:
    name = f"pgqueue_api_gone_{os.getpid()}"
    with psycopg.connect(server_url, autocommit=True) as admin_conn:
        admin_conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin_conn.execute(f'CREATE DATABASE "{name}"')
    url = with_dbname(server_url, name)
    try:
        await asyncio.to_thread(migrate.upgrade, url)
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as c:
            await add_tenants(c, 1)
            token = await admin.create_token(c, "t0")
        auth = {"Authorization": f"Bearer {token}"}
        async with serving(url, tmp_path) as (client, proc, log):
            r = await client.post(
                "/api/whatsapp/send", json={"phoneNumber": phone(1), "text": "x"}, headers=auth
            )
            assert r.status_code == 202
            with psycopg.connect(server_url, autocommit=True) as admin_conn:
                admin_conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
            for path in ("/api/queue/metrics", "/api/jobs/1", "/readyz"):
                started = time.monotonic()
                r = await client.get(path, headers=auth)
                assert r.status_code == 503, (path, r.text)
                assert r.json()["error"] in ("database_unavailable", "not_ready")
                assert time.monotonic() - started < 7
            r = await client.post(
                "/api/whatsapp/send", json={"phoneNumber": phone(1), "text": "x"}, headers=auth
            )
            assert r.status_code == 503 and "retry-after" in r.headers
            assert (await client.get("/healthz")).status_code == 200
            assert proc.poll() is None
        assert "Traceback" not in log.read_text()
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin_conn:
            admin_conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def fake() -> Iterator[FakeTwilio]:
    with FakeTwilio(latency=0.01) as server:
        yield server


async def test_direct_send_with_the_queue_disabled(
    db_url: str, conn: Any, tmp_path: Path, fake: FakeTwilio
) -> None:
    await add_tenants(conn, 1)
    fake.add_account("AC" + "0" * 32, "secret-token-t0")
    token = await admin.create_token(conn, "t0")
    auth = {"Authorization": f"Bearer {token}"}
    async with serving(
        db_url,
        tmp_path,
        WHATSAPP_SEND_QUEUE_ENABLED="false",
        TWILIO_API_BASE_URL=fake.base_url,
        PGQUEUE_SEND_TIMEOUT="3",
    ) as (client, _, log):
        r = await client.post(
            "/api/whatsapp/send", json={"phoneNumber": phone(1), "text": "right now"}, headers=auth
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["status"], body["message"], body["channel"]) == (
            "ok",
            "Successfully sent",
            "freeform",
        )
        assert body["sid"] == fake.sent()[0].sid
        template = "HX" + "c" * 32
        r = await client.post(
            "/api/whatsapp/send",
            json={"phoneNumber": phone(2), "contentSid": template, "contentVariables": {"1": "A"}},
            headers=auth,
        )
        assert r.json()["channel"] == "template"
        assert fake.sent()[1].content_sid == template
        fake.fail_next(1, status=400, code=63016)
        r = await client.post(
            "/api/whatsapp/send", json={"phoneNumber": phone(3), "text": "late"}, headers=auth
        )
        assert r.status_code == 422 and r.json()["providerCode"] == "63016"
        fake.hang_next(1)
        started = time.monotonic()
        r = await client.post(
            "/api/whatsapp/send", json={"phoneNumber": phone(4), "text": "slow"}, headers=auth
        )
        assert r.status_code == 503 and time.monotonic() - started < 10
    row = await (await conn.execute("SELECT count(*) AS n FROM pgqueue.jobs")).fetchone()
    assert row["n"] == 0
    assert "secret-token-t0" not in log.read_text()


async def test_a_status_twilio_posts_before_its_own_answer_is_not_lost(
    db_url: str, conn: Any, tmp_path: Path
) -> None:
    """Twilio may call back before the worker has even read the 201 that carries the SID.
    The fake posts "delivered" to the real API process before it answers; every message
    must still end up delivered (held, then applied by the worker's maintenance)."""
    from pgqueue.config import Settings
    from pgqueue.dispatcher import DispatcherConfig
    from pgqueue.worker import Worker, default_provider
    from tests.support.helpers import ACCOUNT, wait_until_drained

    await add_tenants(conn, 1)
    token = await admin.create_token(conn, "t0")
    auth = {"Authorization": f"Bearer {token}"}
    port = free_port()
    public = f"http://127.0.0.1:{port}"
    with FakeTwilio(callbacks=("delivered",)) as twilio:
        twilio.add_account(ACCOUNT, "secret-token-t0")
        async with serving(db_url, tmp_path, port=port, PGQUEUE_PUBLIC_URL=public) as (
            client,
            _,
            log,
        ):
            for i in range(12):
                r = await client.post(
                    "/api/whatsapp/send",
                    json={"phoneNumber": phone(i % 4), "text": f"m{i}"},
                    headers=auth,
                )
                assert r.status_code == 202, r.text
            settings = Settings(twilio_api_base_url=twilio.base_url, public_base_url=public)
            worker = Worker(
                settings,
                db_url,
                config=DispatcherConfig(poll_interval_s=0.1),
                provider_factory=default_provider,
            )
            task = asyncio.create_task(worker.run())
            try:
                await wait_until_drained(conn, 12)
                deadline = time.monotonic() + 15  # maintenance applies them every 5 s
                while True:
                    cur = await conn.execute(
                        "SELECT provider_status, count(*) AS n FROM pgqueue.job_history GROUP BY 1"
                    )
                    statuses = {r["provider_status"]: r["n"] for r in await cur.fetchall()}
                    if statuses == {"delivered": 12} or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.2)
            finally:
                worker.stop.set()
                await asyncio.wait_for(task, 30)
        assert statuses == {"delivered": 12}
        # Each callback reached the API before the worker knew its SID, and was accepted.
        assert twilio.callback_answers == [200] * 12
        assert "Traceback" not in log.read_text()
