"""Redis is only a cache: absent, unreachable or stopped mid-run, the API answers the same.

The Redis server here is one this test starts on a free port; the machine's own Redis
(6379) is never touched.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from psycopg_pool import AsyncConnectionPool

from pgqueue import admin
from pgqueue.config import Settings
from pgqueue.http import create_app
from pgqueue.http.auth import Cache
from pgqueue.server import free_port
from tests.support.helpers import add_tenants, phone

ADMIN = "admin-token-for-redis-tests-0123"


async def _client(
    pool: AsyncConnectionPool[Any], redis_url: str, **cache: Any
) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(admin_token=ADMIN, redis_url=redis_url)
    # No per-process token memory: every token check goes to Redis or the database.
    app = create_app(settings, pool, cache=Cache(redis_url, **cache), local_token_ttl_s=0)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client,
    ):
        yield client


async def _exercise(client: httpx.AsyncClient, token: str, n: int) -> float:
    """Sends and reads; returns the slowest request's seconds."""
    auth = {"Authorization": f"Bearer {token}"}
    slowest = 0.0
    for i in range(n):
        started = time.monotonic()
        r = await client.post(
            "/api/whatsapp/send", json={"phoneNumber": phone(i), "text": "x"}, headers=auth
        )
        assert r.status_code == 202, r.text
        r = await client.get("/api/queue/metrics", headers=auth)
        assert r.status_code == 200
        slowest = max(slowest, time.monotonic() - started)
    bad = await client.post(
        "/api/whatsapp/send",
        json={"phoneNumber": phone(1), "text": "x"},
        headers={"Authorization": "Bearer pgq_unknown_token_000000000000"},
    )
    assert bad.status_code == 401
    return slowest


async def test_an_unreachable_redis_changes_nothing(
    pool: AsyncConnectionPool[Any], conn: Any
) -> None:
    await add_tenants(conn, 1)
    token = await admin.create_token(conn, "t0")
    async for client in _client(pool, f"redis://127.0.0.1:{free_port()}/0"):
        slowest = await _exercise(client, token, 20)
        # One refused connection, then Redis is left alone: no request pays a timeout.
        assert slowest < 1.0
        metrics = await client.get(
            "/api/queue/metrics", headers={"Authorization": f"Bearer {token}"}
        )
        assert metrics.json()["waiting"] == 20


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError("redis-server did not start") from None
            time.sleep(0.05)
    try:
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)


async def _redis_keys(port: int) -> dict[str, str]:
    from redis.asyncio import Redis

    client = Redis(host="127.0.0.1", port=port, decode_responses=True)
    try:
        keys = [k async for k in client.scan_iter("*")]
        return {k: str(await client.get(k)) for k in keys}
    finally:
        await client.aclose()


async def test_a_redis_stopped_mid_run_changes_nothing_but_speed(
    pool: AsyncConnectionPool[Any], conn: Any, redis_server: tuple[subprocess.Popen[bytes], int]
) -> None:
    proc, port = redis_server
    await add_tenants(conn, 1)
    token = await admin.create_token(conn, "t0")
    auth = {"Authorization": f"Bearer {token}"}
    async for client in _client(pool, f"redis://127.0.0.1:{port}/0", backoff_s=0.5):
        await _exercise(client, token, 5)
        cached = await _redis_keys(port)
        digest = hashlib.sha256(token.encode()).hexdigest()
        # The token is cached under its hash, never itself.
        assert cached[f"pgqueue:token:{digest}"] == "t0"
        assert not any(token in k or token in v for k, v in cached.items())
        # The metrics answer is cached for a second: a send in between is not seen yet.
        first = (await client.get("/api/queue/metrics", headers=auth)).json()
        await client.post(
            "/api/whatsapp/send", json={"phoneNumber": phone(99), "text": "x"}, headers=auth
        )
        assert (await client.get("/api/queue/metrics", headers=auth)).json() == first
        await asyncio.sleep(1.1)
        assert (await client.get("/api/queue/metrics", headers=auth)).json()["waiting"] == 6

        proc.terminate()
        await asyncio.to_thread(proc.wait, 10)
        slowest = await _exercise(client, token, 10)
        assert slowest < 1.0
        # Without the cache the database answers, so a revoked token is refused at once.
        await conn.execute("UPDATE pgqueue.api_tokens SET revoked_at = now()")
        r = await client.get("/api/queue/metrics", headers=auth)
        assert r.status_code == 401
        admin_view = await client.get(
            "/api/queue/metrics", headers={"Authorization": f"Bearer {ADMIN}"}
        )
        assert admin_view.status_code == 200 and admin_view.json()["waiting"] == 16
