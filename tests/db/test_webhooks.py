"""Tenants' webhooks: their delivery events posted, signed, to their own URL, every
event at least once and each message's in order, even through an endpoint that fails
30 % of the time; a batch the endpoint keeps refusing becomes a dead letter."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from pgqueue import admin, webhooks
from pgqueue.config import Settings
from pgqueue.credentials import Keyring
from pgqueue.dispatcher import DispatcherConfig
from pgqueue.errors import ValidationError
from pgqueue.providers.default import default_provider
from pgqueue.server import free_port
from pgqueue.webhooks import WebhookConfig, Webhooks
from pgqueue.worker import Worker
from tests.db.test_events import feed, out_of_order
from tests.support.fake_twilio import FakeTwilio
from tests.support.helpers import ACCOUNT, add_tenants, send, wait_until_drained
from tests.support.serve import ADMIN, serving

FAST = WebhookConfig(interval_s=0.05, base_backoff_s=0.02, max_backoff_s=0.1, max_attempts=50)


@dataclass
class Endpoint:
    """A tenant's webhook receiver on loopback that refuses `failing` of the requests."""

    secret: str = ""
    failing: float = 0.0
    rng: random.Random = field(default_factory=lambda: random.Random(3))
    received: list[dict[str, Any]] = field(default_factory=list)
    requests: int = 0
    refused: int = 0
    bad_signatures: int = 0
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        body = await request.read()
        if not webhooks.verify(self.secret, body, request.headers.get("Pgqueue-Signature", "")):
            self.bad_signatures += 1
            return web.Response(status=400)
        if self.rng.random() < self.failing:
            self.refused += 1
            return web.Response(status=500)
        self.received.append(json.loads(body))
        return web.Response(status=204)


@contextlib.asynccontextmanager
async def endpoint(**kw: Any) -> AsyncIterator[Endpoint]:
    ep = Endpoint(**kw)
    app = web.Application()
    app.router.add_post("/hook", ep.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    ep.url = f"http://127.0.0.1:{port}/hook"
    try:
        yield ep
    finally:
        await runner.cleanup()


def _events(ep: Endpoint) -> list[dict[str, Any]]:
    return [e for batch in ep.received for e in batch["events"]]


async def test_an_endpoint_failing_30_percent_of_the_time_still_gets_every_event_in_order(
    db_url: str, conn: Any
) -> None:
    await add_tenants(conn, 2)
    with FakeTwilio() as fake:
        fake.add_account(ACCOUNT, "secret-token-t0")
        async with endpoint(failing=0.3) as ep:
            tenant = await admin.set_tenant(conn, "t0", webhook_url=ep.url)
            ep.secret = tenant["webhook_secret"]
            assert ep.secret.startswith("whsec_")
            for i in range(60):
                await send(conn, "t0", i % 7, text=f"m{i}", conversation_id=f"c{i % 7}")
            settings = Settings(twilio_api_base_url=fake.base_url, backoff_delay_ms=300)
            cfg = DispatcherConfig(backoff_ms=300, poll_interval_s=0.1)
            # Two workers: both deliver webhooks, one batch per tenant at a time.
            workers = [
                Worker(
                    settings,
                    db_url,
                    config=cfg,
                    provider_factory=default_provider,
                    webhook_config=dataclasses.replace(FAST, batch=7),
                )
                for _ in range(2)
            ]
            tasks = [asyncio.create_task(w.run()) for w in workers]
            try:
                await wait_until_drained(conn, 60)
                expected = await feed(conn, "t0")
                for _ in range(300):
                    got = {e["id"] for e in _events(ep)}
                    if got >= {r["id"] for r in expected}:
                        break
                    await asyncio.sleep(0.05)
            finally:
                for w in workers:
                    w.stop.set()
                await asyncio.wait_for(asyncio.gather(*tasks), 30)
    assert ep.refused > 0 and ep.bad_signatures == 0
    delivered = _events(ep)
    assert {e["id"] for e in delivered} == {r["id"] for r in expected}
    # In feed order, each message's in the order it happened (a batch posted again after
    # a refusal repeats what it held, nothing more).
    first_seen: list[int] = list(dict.fromkeys(e["id"] for e in delivered))
    assert first_seen == [r["id"] for r in expected]
    by_job: dict[int, list[str]] = {}
    for e in delivered:
        kinds = by_job.setdefault(e["jobId"], [])
        if not kinds or kinds[-1] != e["type"]:
            kinds.append(e["type"])
    assert out_of_order(by_job) == []
    assert {e["type"] for e in delivered} >= {"queued", "sending", "sent"}
    state = await admin.get_tenant(conn, "t0")
    assert state["webhook_delivered"] == len(expected)


async def test_a_batch_the_endpoint_keeps_refusing_becomes_a_dead_letter(
    db_url: str, conn: Any, pool: Any, tmp_path: Path
) -> None:
    await add_tenants(conn, 1)
    async with endpoint(failing=1.0) as ep:
        ep.secret = (await admin.set_tenant(conn, "t0", webhook_url=ep.url))["webhook_secret"]
        jobs_sent = [(await send(conn, "t0", i)).job_id for i in range(3)]
        hooks = Webhooks(
            pool,
            worker_id="test-worker",
            keyring=Keyring(()),
            config=dataclasses.replace(FAST, max_attempts=3),
        )
        try:
            for _ in range(100):
                await hooks.run_once()
                if hooks.dead:
                    break
                await asyncio.sleep(0.05)
        finally:
            await hooks.aclose()
        assert hooks.dead == 1 and ep.refused == 3
        # The cursor moved past it: nothing more is posted.
        assert await hooks.run_once() == 0
        # A worker that stops hands its leases back at once.
        await conn.execute(
            "UPDATE pgqueue.webhook_state SET leased_by = 'test-worker', "
            "lease_until = now() + interval '30 s'"
        )
        await hooks.aclose()
        cur = await conn.execute("SELECT leased_by, lease_until FROM pgqueue.webhook_state")
        assert await cur.fetchall() == [{"leased_by": None, "lease_until": None}]
        async with serving(db_url, tmp_path) as (http, _, _):
            auth = {"Authorization": f"Bearer {ADMIN}"}
            answer = await http.get(
                "/api/webhook/dead-letters", params={"tenant": "t0"}, headers=auth
            )
            assert answer.status_code == 200
            [dead] = answer.json()["deadLetters"]
            assert [e["jobId"] for e in dead["events"]] == jobs_sent
            assert dead["attempts"] == 3 and dead["lastError"] == "HTTP 500"
            metrics = (await http.get("/metrics", headers=auth)).text
            assert 'pgqueue_webhook_dead_letters{tenant="t0"} 1.0' in metrics
            assert 'pgqueue_webhook_events_delivered_total{tenant="t0"} 0.0' in metrics
            # The test endpoint posts one signed request and says how it was answered.
            ep.failing = 0.0
            tested = await http.post("/api/webhook/test", params={"tenant": "t0"}, headers=auth)
            assert tested.json() == {"url": ep.url, "delivered": True, "status": 204, "error": None}
            assert ep.received[-1]["test"] is True
            none = await http.post("/api/webhook/test", params={"tenant": "t1"}, headers=auth)
            assert none.status_code in (404, 409)


async def test_a_signature_is_checked_over_body_secret_and_time() -> None:
    body = b'{"events":[]}'
    header = webhooks.sign("s3cret", body, at=1_000_000)
    assert webhooks.verify("s3cret", body, header, now=1_000_010)
    assert not webhooks.verify("other", body, header, now=1_000_010)
    assert not webhooks.verify("s3cret", body + b" ", header, now=1_000_010)
    assert not webhooks.verify("s3cret", body, header, now=1_000_000 + 301)
    assert not webhooks.verify("s3cret", body, "t=x,v1=y")


async def test_a_webhook_url_that_is_not_http_is_refused_and_none_removes_it(conn: Any) -> None:
    await add_tenants(conn, 1)
    for bad in ("ftp://example.com/x", "not a url", "http://"):
        with pytest.raises(ValidationError) as e:
            await admin.set_tenant(conn, "t0", webhook_url=bad)
        assert e.value.field == "webhook_url"
    first = await admin.set_tenant(conn, "t0", webhook_url="https://hooks.example/a")
    again = await admin.set_tenant(conn, "t0", webhook_url="https://hooks.example/b")
    assert first["webhook_secret"] and again["webhook_secret"] is None  # kept
    gone = await admin.set_tenant(conn, "t0", webhook_url=None)
    assert gone["webhook_url"] is None
