"""Issue 17, items 4, 7 and 8: the HTTP server's limits, tenants' Twilio auth tokens
encrypted at rest, and API tokens that can expire, be revoked and not be guessed fast.

Each test here failed on the code before the fix: a 40 KB header got 200, a half-sent
head or body held its connection (a slow body ended in 503 database_unavailable), the
auth token was stored as given and there was no key to rotate, there was no `token
list|revoke` and no expiry, and failed authentications were not limited.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.fernet import Fernet
from psycopg_pool import AsyncConnectionPool

from pgqueue import admin, cli
from pgqueue.config import Settings
from pgqueue.credentials import UNDECRYPTABLE, Keyring
from pgqueue.db import as_url
from pgqueue.dispatcher import DispatcherConfig
from pgqueue.http import create_app
from pgqueue.http.auth import AuthFailures
from pgqueue.providers.default import default_provider
from pgqueue.worker import Worker
from tests.db.test_api import PUBLIC, _signed
from tests.support.fake_twilio import FakeTwilio
from tests.support.helpers import ACCOUNT, add_tenants, phone, send, wait_until_drained
from tests.support.serve import serving

TWILIO_TOKEN = "twilio-auth-token-0123456789"
KEY1 = Fernet.generate_key().decode()
KEY2 = Fernet.generate_key().decode()
FAST_HTTP = {"PGQUEUE_HTTP_HEADER_TIMEOUT": "1", "PGQUEUE_HTTP_BODY_TIMEOUT": "1"}


# -- item 4: the HTTP server's limits ------------------------------------------------------


async def _raw(port: int, data: bytes, *, wait_s: float = 5.0) -> tuple[bytes, bool]:
    """Send `data` on a fresh connection and read until the server closes it or
    `wait_s` passes: (what came back, whether the server closed the connection)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        received = b""
        try:
            async with asyncio.timeout(wait_s):
                while chunk := await reader.read(65536):
                    received += chunk
        except TimeoutError:
            return received, False
        except ConnectionError:
            pass
        return received, True
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def _error(answer: bytes) -> str:
    """The error code of the API's JSON answer."""
    return str(json.loads(answer.partition(b"\r\n\r\n")[2])["error"])


def _port(client: httpx.AsyncClient) -> int:
    port = client.base_url.port
    assert port is not None
    return port


async def test_a_large_or_late_head_is_refused_and_closed(
    db_url: str, conn: Any, tmp_path: Path
) -> None:
    async with serving(db_url, tmp_path, **FAST_HTTP) as (client, _proc, _log):
        port = _port(client)
        ok, _ = await _raw(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert _status(ok) == 200
        big = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n"
        answer, closed = await _raw(port, big)
        assert _status(answer) == 431 and closed
        assert _error(answer) == "headers_too_large"
        # Many headers that together pass the limit, each of them small.
        many = b"".join(b"X-H%d: %s\r\n" % (i, b"b" * 100) for i in range(400))
        answer, closed = await _raw(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
        assert _status(answer) == 431 and closed
        # Half a head, then nothing: 408 and closed once the head timeout (1 s) passes.
        started = time.monotonic()
        answer, closed = await _raw(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Half: ab")
        assert _status(answer) == 408 and closed
        assert 0.9 <= time.monotonic() - started < 4
        # A connection that sends nothing is closed without an answer.
        answer, closed = await _raw(port, b"")
        assert (answer, closed) == (b"", True)
        assert (await client.get("/healthz")).status_code == 200


async def test_a_large_or_late_body_is_refused(db_url: str, conn: Any, tmp_path: Path) -> None:
    await add_tenants(conn, 1)
    token = await admin.create_token(conn, "t0")
    head = (
        "POST /api/whatsapp/send HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {token}\r\n"
    ).encode()
    async with serving(db_url, tmp_path, **FAST_HTTP) as (client, _proc, _log):
        port = _port(client)
        # Too large by its length, and by what arrives without one.
        answer, _ = await _raw(port, head + b"Content-Length: 100000\r\n\r\n", wait_s=3)
        assert _status(answer) == 413 and _error(answer) == "body_too_large"
        chunk = b"a" * 70_000
        chunked = head + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (
            len(chunk),
            chunk,
        )
        answer, _ = await _raw(port, chunked, wait_s=3)
        assert _status(answer) == 413
        # A body that stops halfway: 408 within the body timeout (1 s), not a 503 once
        # the route's own timeout passes.
        started = time.monotonic()
        answer, closed = await _raw(port, head + b'Content-Length: 200\r\n\r\n{"phone')
        assert _status(answer) == 408 and _error(answer) == "request_timeout", answer
        assert closed and time.monotonic() - started < 4
        row = await (await conn.execute("SELECT count(*) AS n FROM pgqueue.jobs")).fetchone()
        assert row["n"] == 0


# -- item 7: tenants' Twilio auth tokens at rest --------------------------------------------


@pytest.fixture
def fake() -> Iterator[FakeTwilio]:
    with FakeTwilio() as f:
        f.add_account(ACCOUNT, TWILIO_TOKEN)
        yield f


@contextlib.asynccontextmanager
async def twilio_worker(db_url: str, fake: FakeTwilio, *keys: str) -> AsyncIterator[Worker]:
    settings = Settings(
        twilio_api_base_url=fake.base_url, backoff_delay_ms=300, send_timeout_s=2, secret_keys=keys
    )
    cfg = DispatcherConfig(backoff_ms=300, poll_interval_s=0.1, send_timeout_s=5)
    worker = Worker(settings, db_url, config=cfg, provider_factory=default_provider)
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.stop.set()
        await asyncio.wait_for(task, 30)


def _env(db_url: str, *keys: str) -> dict[str, str]:
    return {"DATABASE_URL": as_url(db_url), "PGQUEUE_SECRET_KEYS": ",".join(keys)}


async def _stored(conn: Any, tenant: str = "c0") -> str:
    cur = await conn.execute("SELECT auth_token FROM pgqueue.tenants WHERE id = %s", (tenant,))
    return str((await cur.fetchone())["auth_token"])


async def _add_sealed(conn: Any, *keys: str) -> None:
    await admin.add_tenant(
        conn,
        tenant_id="c0",
        account_sid=ACCOUNT,
        auth_token=TWILIO_TOKEN,
        whatsapp_from="+14155550100",
        keyring=Keyring(keys),
    )


async def test_tenant_add_from_stdin_stores_the_token_encrypted_and_sends_work(
    db_url: str,
    conn: Any,
    fake: FakeTwilio,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(TWILIO_TOKEN + "\n"))
    argv = ["tenant", "add", "c0", "--account-sid", ACCOUNT, "--auth-token-file", "-"]
    code = await asyncio.to_thread(cli.run, [*argv, "--from", "+14155550100"], _env(db_url, KEY1))
    assert code == 0
    stored = await _stored(conn)
    assert stored.startswith("fernet:") and TWILIO_TOKEN not in stored
    assert Keyring([KEY1]).open(stored) == TWILIO_TOKEN
    # Listings show neither the token nor its ciphertext.
    capsys.readouterr()
    assert await asyncio.to_thread(cli.run, ["tenant", "list", "--json"], _env(db_url)) == 0
    listed = capsys.readouterr().out
    assert "c0" in listed and "fernet:" not in listed and TWILIO_TOKEN not in listed
    assert "auth_token" not in listed
    # The worker decrypts it for the send: the fake Twilio checks the Basic auth.
    await send(conn, "c0", 1, text="sealed")
    async with twilio_worker(db_url, fake, KEY1):
        await wait_until_drained(conn, 20)
    assert [r.body for r in fake.sent()] == ["sealed"]
    assert not [r for r in fake.records() if r.outcome == "auth_failed"]


async def test_rotate_key_encrypts_with_the_new_key_so_the_old_one_can_go(
    db_url: str, conn: Any, fake: FakeTwilio, capsys: pytest.CaptureFixture[str]
) -> None:
    await _add_sealed(conn, KEY1)
    await add_tenants(conn, 1)  # a tenant stored before encryption: plain text
    before = await _stored(conn)
    hook = await admin.set_tenant(
        conn, "c0", webhook_url="https://hooks.example/c0", keyring=Keyring([KEY1])
    )
    rotate = ["tenant", "rotate-key"]
    assert await asyncio.to_thread(cli.run, rotate, _env(db_url, KEY2, KEY1)) == 0
    assert "2 tenant(s)" in capsys.readouterr().out
    after = await _stored(conn)
    assert after != before and Keyring([KEY2]).open(after) == TWILIO_TOKEN
    plain = await _stored(conn, "t0")
    assert Keyring([KEY2]).open(plain) == "secret-token-t0" and plain.startswith("fernet:")
    cur = await conn.execute("SELECT webhook_secret FROM pgqueue.tenants WHERE id = 'c0'")
    sealed = (await cur.fetchone())["webhook_secret"]
    assert Keyring([KEY2]).open(sealed) == hook["webhook_secret"]
    # Without KEY1 the worker still sends.
    await send(conn, "c0", 1, text="after rotation")
    async with twilio_worker(db_url, fake, KEY2):
        await wait_until_drained(conn, 20)
    assert [r.body for r in fake.sent()] == ["after rotation"]


async def test_a_worker_without_the_key_pauses_the_tenant_and_sends_nothing(
    db_url: str, conn: Any, fake: FakeTwilio
) -> None:
    await _add_sealed(conn, KEY1)
    await send(conn, "c0", 1, text="waits")
    async with twilio_worker(db_url, fake, KEY2):
        for _ in range(200):
            cur = await conn.execute(
                "SELECT paused, pause_reason FROM pgqueue.tenants WHERE id = 'c0'"
            )
            tenant = await cur.fetchone()
            if tenant["paused"]:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
    assert tenant["paused"] and UNDECRYPTABLE in tenant["pause_reason"]
    job = await (await conn.execute("SELECT attempts, state FROM pgqueue.jobs")).fetchone()
    assert (job["attempts"], job["state"]) == (0, "waiting")  # no retry spent
    assert fake.records() == []  # the ciphertext never went out as a password


async def test_direct_send_and_callback_signatures_use_the_decrypted_token(
    pool: AsyncConnectionPool[Any], conn: Any, fake: FakeTwilio
) -> None:
    await _add_sealed(conn, KEY1)
    token = await admin.create_token(conn, "c0")
    auth = {"Authorization": f"Bearer {token}"}
    path = "/api/twilio/status/c0"
    form = {"MessageSid": "SM" + "1" * 32, "MessageStatus": "delivered", "AccountSid": ACCOUNT}
    with_key = Settings(
        queue_enabled=False,
        twilio_api_base_url=fake.base_url,
        send_timeout_s=2,
        public_base_url=PUBLIC,
        secret_keys=(KEY1,),
    )
    async with _clients(create_app(with_key, pool)) as client:
        r = await client().post(
            "/api/whatsapp/send", json={"phoneNumber": phone(1), "text": "now"}, headers=auth
        )
        assert r.status_code == 200, r.text
        r = await client().post(path, **_signed(path, form, TWILIO_TOKEN))
        assert r.status_code == 200, r.text
    assert [r.body for r in fake.sent()] == ["now"]
    # An API process without the key: the callback is not taken, the send not made, and
    # neither answer carries a secret.
    without = Settings(
        queue_enabled=False,
        twilio_api_base_url=fake.base_url,
        public_base_url=PUBLIC,
    )
    async with _clients(create_app(without, pool)) as client:
        r = await client().post(path, **_signed(path, form, TWILIO_TOKEN))
        assert r.status_code == 403
        r = await client().post(
            "/api/whatsapp/send", json={"phoneNumber": phone(1), "text": "no"}, headers=auth
        )
        assert r.status_code == 502 and r.json()["providerCode"] == UNDECRYPTABLE
        assert "fernet:" not in r.text and TWILIO_TOKEN not in r.text
    assert len(fake.records()) == 1


@pytest.mark.parametrize(
    ("env", "argv", "says"),
    [
        (
            {"PGQUEUE_SECRET_KEYS": "not-a-key"},
            ["tenant", "list"],
            "PGQUEUE_SECRET_KEYS: key 1 is not a Fernet key",
        ),
        (
            {"PGQUEUE_SECRET_KEYS": KEY1},
            [
                "tenant",
                "add",
                "x",
                "--account-sid",
                ACCOUNT,
                "--from",
                "+14155550100",
                "--auth-token-file",
                "/nonexistent/token",
            ],
            "cannot read the auth token from /nonexistent/token",
        ),
        ({}, ["tenant", "rotate-key"], "PGQUEUE_SECRET_KEYS is not set"),
        ({}, ["token", "revoke", "nonsense"], "is not a token id"),
        ({}, ["token", "create", "t0", "--expires-in-days", "0"], "expires in days must be"),
    ],
)
async def test_bad_input_to_the_cli_is_one_line(
    db_url: str,
    conn: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    argv: list[str],
    says: str,
) -> None:
    await add_tenants(conn, 1)
    monkeypatch.setenv("DATABASE_URL", as_url(db_url))
    monkeypatch.delenv("PGQUEUE_SECRET_KEYS", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    with pytest.raises(SystemExit) as exited:
        await asyncio.to_thread(cli.main, argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1, err


# -- item 8: API tokens ---------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _clients(app: Any) -> AsyncIterator[Any]:
    """The app's lifespan, and a client from any address: `client("10.0.0.2")`."""
    opened: list[httpx.AsyncClient] = []

    def client(address: str = "10.0.0.1") -> httpx.AsyncClient:
        for c in opened:
            if c.headers["x-test-address"] == address:
                return c
        transport = httpx.ASGITransport(app=app, client=(address, 40000))
        c = httpx.AsyncClient(
            transport=transport, base_url="http://testserver", headers={"x-test-address": address}
        )
        opened.append(c)
        return c

    async with app.router.lifespan_context(app):
        try:
            yield client
        finally:
            for c in opened:
                await c.aclose()


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_token_list_revoke_and_expiry(
    db_url: str, pool: AsyncConnectionPool[Any], conn: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    await add_tenants(conn, 1)
    env = _env(db_url)
    create = ["token", "create", "t0", "--expires-in-days", "30"]
    assert await asyncio.to_thread(cli.run, create, env) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    other = await admin.create_token(conn, "t0")
    assert await asyncio.to_thread(cli.run, ["token", "list", "--json"], env) == 0
    listed = capsys.readouterr().out
    rows = json.loads(listed)
    assert [(r["prefix"], r["state"]) for r in rows] == [
        (token[:12], "active"),
        (other[:12], "active"),
    ]
    assert rows[0]["expires_at"] is not None and rows[1]["expires_at"] is None
    hashes = {admin.hash_token(token), admin.hash_token(other)}
    assert not any(h in listed for h in hashes) and token not in listed
    assert "token_hash" not in listed

    body = {"phoneNumber": phone(1), "text": "x"}
    async with _clients(create_app(Settings(), pool, local_token_ttl_s=0)) as client:
        assert (
            await client().post("/api/whatsapp/send", json=body, headers=_auth(token))
        ).is_success
        assert await asyncio.to_thread(cli.run, ["token", "revoke", token[:12]], env) == 0
        assert "revoked" in capsys.readouterr().out
        r = await client().post("/api/whatsapp/send", json=body, headers=_auth(token))
        assert r.status_code == 401
        assert await asyncio.to_thread(cli.run, ["token", "list", "--json"], env) == 0
        states = {r["prefix"]: r["state"] for r in json.loads(capsys.readouterr().out)}
        assert states == {token[:12]: "revoked", other[:12]: "active"}
        # Expired: refused, and no cache trusts a token past its expiry.
        await conn.execute("UPDATE pgqueue.api_tokens SET expires_at = now() - interval '1 s'")
        r = await client().post("/api/whatsapp/send", json=body, headers=_auth(other))
        assert r.status_code == 401 and r.json()["error"] == "invalid_token"
    soon = await admin.create_token(conn, "t0", expires_in_days=1)
    await conn.execute(
        "UPDATE pgqueue.api_tokens SET expires_at = now() + interval '1 s' WHERE prefix = %s",
        (soon[:12],),
    )
    async with _clients(create_app(Settings(), pool)) as client:  # the 5 s local cache
        assert (
            await client().post("/api/whatsapp/send", json=body, headers=_auth(soon))
        ).is_success
        await asyncio.sleep(1.2)
        r = await client().post("/api/whatsapp/send", json=body, headers=_auth(soon))
        assert r.status_code == 401


async def test_failed_authentications_are_throttled_per_client_address(
    pool: AsyncConnectionPool[Any], conn: Any
) -> None:
    await add_tenants(conn, 1)
    token = await admin.create_token(conn, "t0")
    settings = Settings(auth_failures_per_minute=3)
    async with _clients(create_app(settings, pool)) as client:
        for i in range(3):
            r = await client().get("/api/queue/metrics", headers=_auth(f"pgq_guess{i:040d}"))
            assert r.status_code == 401
        r = await client().get("/api/queue/metrics", headers=_auth("pgq_another-guess"))
        assert r.status_code == 429 and r.json()["error"] == "too_many_auth_failures"
        assert 55 <= int(r.headers["retry-after"]) <= 60
        # While throttled even the right token is refused: a right guess looks like a
        # wrong one.
        r = await client().get("/api/queue/metrics", headers=_auth(token))
        assert r.status_code == 429
        # Another address is not held back.
        r = await client("10.0.0.2").get("/api/queue/metrics", headers=_auth(token))
        assert r.status_code == 200


def test_auth_failures_are_forgotten_after_a_minute() -> None:
    failures = AuthFailures(2)
    failures.failed("a", 100.0)
    failures.failed("a", 110.0)
    assert failures.retry_after("a", 110.0) == pytest.approx(50.0)
    assert failures.retry_after("b", 110.0) is None
    assert failures.retry_after("a", 160.0) is None
    failures.failed("a", 161.0)
    assert failures.retry_after("a", 161.0) is None
