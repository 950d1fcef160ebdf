"""Issue 17, items 6 and 10: the dashboard's signed links, and Twilio's status callbacks.

Each test here failed on the code before the fix: links were signed with the admin token
itself, lived as long as asked and could all retry; malformed link values answered 500;
callbacks were checked against the request's own Host header when PGQUEUE_PUBLIC_URL was
unset; and a failure reported after delivery moved the status back and suppressed the
number.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from psycopg_pool import AsyncConnectionPool
from twilio.request_validator import RequestValidator

from pgqueue import admin, cli
from pgqueue.config import Settings
from pgqueue.dashboard import MAX_TTL_S, Scope, link_key, sign, signed_query
from pgqueue.errors import PgQueueError
from pgqueue.http import create_app
from pgqueue.statuses import apply_early_statuses
from tests.db.test_api import ADMIN, PUBLIC, Api, _provider_status, _signed
from tests.support.helpers import ACCOUNT, add_tenants, phone, running_worker, wait_until_drained

DASHBOARD_KEY = "dashboard-key-for-tests-0123456789abcdef"


async def _client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    # An exception the app does not handle is answered 500 here, as a server would,
    # instead of reaching the test.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://testserver") as client,
    ):
        yield client


async def _app(pool: AsyncConnectionPool[Any], conn: Any, settings: Settings) -> AsyncIterator[Api]:
    await add_tenants(conn, 2)
    tokens = {t: await admin.create_token(conn, t) for t in ("t0", "t1")}
    async for client in _client(create_app(settings, pool)):
        yield Api(client, conn, tokens)


@pytest.fixture
async def api(pool: AsyncConnectionPool[Any], conn: Any) -> AsyncIterator[Api]:
    async for a in _app(pool, conn, Settings(admin_token=ADMIN, public_base_url=PUBLIC)):
        yield a


def _link(key: bytes, *, scope: Scope = "read", exp: int | None = None) -> str:
    expires = int(time.time()) + 600 if exp is None else exp
    return f"exp={expires}&scope={scope}&sig={sign(key, expires, scope)}"


def _is_error(r: httpx.Response, status: int) -> bool:
    """The API's error shape: JSON `{"error": code, "message": ...}` with `status`."""
    is_json = r.headers.get("content-type", "").startswith("application/json")
    return r.status_code == status and is_json and set(r.json()) == {"error", "message"}


async def _dead_letter(api: Api, db_url: str, tmp_path: Path) -> int:
    r = await api.send("t0", phoneNumber=phone(5), text="dead [permanent]")
    async with running_worker(db_url, tmp_path / "sends.jsonl"):
        await wait_until_drained(api.conn, 20)
    job = await api.client.get(f"/api/jobs/{r.json()['jobId']}", headers=api.auth())
    assert job.json()["state"] == "failed"
    return int(r.json()["jobId"])


# -- item 6: the dashboard link ------------------------------------------------------------


async def test_links_are_signed_with_a_key_of_their_own(
    pool: AsyncConnectionPool[Any], conn: Any
) -> None:
    settings = Settings(admin_token=ADMIN)
    derived = hmac.new(ADMIN.encode(), b"pgqueue dashboard link key v2", hashlib.sha256).digest()
    assert link_key(settings) == derived and derived != ADMIN.encode()
    exp = int(time.time()) + 600
    old = hmac.new(ADMIN.encode(), f"dashboard:{exp}".encode(), hashlib.sha256).hexdigest()
    async for a in _app(pool, conn, settings):
        # A link of the old kind (keyed with the admin token itself) no longer opens it,
        # whatever the message signed.
        for query in (f"exp={exp}&sig={old}", f"exp={exp}&scope=read&sig={old}"):
            assert _is_error(await a.client.get(f"/dashboard?{query}"), 401)
        assert _is_error(await a.client.get(f"/dashboard?{_link(ADMIN.encode())}"), 401)
        assert (await a.client.get(f"/dashboard?{_link(derived)}")).status_code == 200

    # PGQUEUE_DASHBOARD_KEY, when set, is the key: changing it revokes every link.
    keyed = Settings.from_env(
        {"PGQUEUE_ADMIN_TOKEN": ADMIN, "PGQUEUE_DASHBOARD_KEY": DASHBOARD_KEY}
    )
    assert link_key(keyed) == DASHBOARD_KEY.encode()
    with pytest.raises(PgQueueError, match="PGQUEUE_DASHBOARD_KEY"):
        Settings.from_env({"PGQUEUE_DASHBOARD_KEY": "short"})
    async for client in _client(create_app(keyed, pool)):
        assert _is_error(await client.get(f"/dashboard?{_link(derived)}"), 401)
        page = await client.get(f"/dashboard?{_link(DASHBOARD_KEY.encode())}")
        assert page.status_code == 200 and page.headers["referrer-policy"] == "no-referrer"
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]


async def test_a_link_lives_at_most_a_week(
    api: Api, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    key = link_key(Settings(admin_token=ADMIN))
    assert key is not None
    with pytest.raises(PgQueueError):
        signed_query(key, MAX_TTL_S + 1)
    # Even a validly signed link with a far expiry is refused (a key that leaked once
    # cannot mint a link for a year), as is one that expired.
    now = int(time.time())
    for exp in (now + MAX_TTL_S + 3600, now + 365 * 86400, now - 10):
        assert _is_error(await api.client.get(f"/dashboard?{_link(key, exp=exp)}"), 401)
    assert (
        await api.client.get(f"/dashboard?{_link(key, exp=now + MAX_TTL_S)}")
    ).status_code == 200

    monkeypatch.setenv("PGQUEUE_ADMIN_TOKEN", ADMIN)
    monkeypatch.delenv("PGQUEUE_DASHBOARD_KEY", raising=False)
    for ttl in ("inf", "-inf", "nan", "0", "-1", "169", "100000000", "1e400", "twelve"):
        with pytest.raises(SystemExit) as exit_:
            cli.main(["dashboard-url", f"--ttl-hours={ttl}"])
        out, err = capsys.readouterr()
        assert exit_.value.code == 2 and out == "", ttl
        assert err.count("\n") == 1 and "--ttl-hours" in err and "Traceback" not in err, err
    for flags, scope in (([], "read"), (["--allow-retry"], "retry")):
        with pytest.raises(SystemExit) as exit_:
            cli.main(["dashboard-url", "--ttl-hours", "168", "--base-url", "http://x", *flags])
        out, _ = capsys.readouterr()
        assert exit_.value.code == 0 and f"&scope={scope}&" in out
        query = out.strip().split("?", 1)[1]
        assert (await api.client.get(f"/dashboard?{query}")).status_code == 200


async def test_a_link_only_reads_unless_signed_to_retry(
    api: Api, db_url: str, tmp_path: Path
) -> None:
    job_id = await _dead_letter(api, db_url, tmp_path)
    key = link_key(Settings(admin_token=ADMIN))
    assert key is not None
    read, retry = signed_query(key), signed_query(key, scope="retry")
    assert "scope=read" in read

    data = await api.client.get(f"/dashboard/data?{read}")
    assert data.status_code == 200 and data.json()["canRetry"] is False
    assert [f["id"] for f in data.json()["failedJobs"]] == [job_id]
    denied = await api.client.post(f"/dashboard/jobs/{job_id}/retry?{read}")
    assert _is_error(denied, 403) and denied.json()["error"] == "forbidden"
    # The scope is signed: a read link cannot be turned into a retry link.
    forged = read.replace("scope=read", "scope=retry")
    assert _is_error(await api.client.post(f"/dashboard/jobs/{job_id}/retry?{forged}"), 401)
    job = await api.client.get(f"/api/jobs/{job_id}", headers=api.auth())
    assert job.json()["state"] == "failed"

    assert (await api.client.get(f"/dashboard/data?{retry}")).json()["canRetry"] is True
    again = await api.client.post(f"/dashboard/jobs/{job_id}/retry?{retry}")
    assert again.status_code == 200 and again.json()["state"] == "waiting"
    # The admin token as a bearer header may do both.
    bearer = await api.client.get("/dashboard/data", headers=api.auth(None))
    assert bearer.json()["canRetry"] is True


MALFORMED_EXP = [
    "",
    "²",
    "\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668\u0669\u0660",
    "9" * 5000,
    "-1",
    "1e10",
    " 1",
    "0x10",
    "99999999999999",
]
MALFORMED_SIG = ["", "é" * 64, "Z" * 64, "0" * 63, "0" * 65, "A" * 64, "\x00" * 64]
MALFORMED_SCOPE = ["", "admin", "READ", "retry\x00", "é", "read,retry"]
MALFORMED_AUTH: list[bytes] = [
    b"Bearer \xc3\xa9" * 3,
    b"Bearer \xff\xfe",
    b"Bearer",
    b"Bearer ",
    b"bearer " + ADMIN.encode() + b"x",
    b"Basic YWRtaW46YWRtaW4=",
    b"\xe9\xe9",
    b"Bearer " + b"a" * 10000,
]


async def test_every_malformed_link_value_is_a_clean_4xx(api: Api) -> None:
    key = link_key(Settings(admin_token=ADMIN))
    assert key is not None
    exp = int(time.time()) + 600
    good_sig = sign(key, exp, "retry")
    queries: list[dict[str, str]] = [
        *({"exp": e, "scope": "retry", "sig": good_sig} for e in MALFORMED_EXP),
        *({"exp": str(exp), "scope": "retry", "sig": s} for s in MALFORMED_SIG),
        *({"exp": str(exp), "scope": s, "sig": good_sig} for s in MALFORMED_SCOPE),
        {"exp": str(exp), "sig": good_sig},
        {"scope": "retry", "sig": good_sig},
        {"exp": str(exp), "scope": "retry"},
    ]
    paths = [("GET", "/dashboard"), ("GET", "/dashboard/data"), ("POST", "/dashboard/jobs/1/retry")]
    for params in queries:
        for method, path in paths:
            r = await api.client.request(method, path, params=params)
            assert _is_error(r, 401), (method, path, params, r.status_code, r.text)
    for header in MALFORMED_AUTH:
        for method, path in paths:
            r = await api.client.request(method, path, headers={"Authorization": header})
            assert _is_error(r, 401), (method, path, header, r.status_code, r.text)
    # With a link that may retry, a job id that is not one is refused, not a 500.
    retry = {"exp": str(exp), "scope": "retry", "sig": good_sig}
    for job_id in ("²", "\u0661", "9" * 30, "0", "-1", "1e3"):
        r = await api.client.post(f"/dashboard/jobs/{job_id}/retry", params=retry)
        assert _is_error(r, 422) or _is_error(r, 404), (job_id, r.status_code, r.text)


# -- item 10: status callbacks --------------------------------------------------------------


async def test_status_callbacks_are_off_without_a_public_url(
    pool: AsyncConnectionPool[Any],
    conn: Any,
    db_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="pgqueue.api")
    async for a in _app(pool, conn, Settings(admin_token=ADMIN)):
        off = [r for r in caplog.records if "PGQUEUE_PUBLIC_URL" in r.getMessage()]
        assert len(off) == 1 and off[0].levelno == logging.WARNING
        assert "callbacks are off" in off[0].getMessage()
        job_id = (await a.send("t0", text="tracked")).json()["jobId"]
        async with running_worker(db_url, tmp_path / "sends.jsonl"):
            await wait_until_drained(conn, 20)
        sid = (await a.client.get(f"/api/jobs/{job_id}", headers=a.auth())).json()["providerSid"]
        # A callback the tenant's Twilio account signed for another host (another
        # deployment, another app on the same account), replayed with that Host header.
        for path in ("/api/twilio/status/t0", "/api/twilio/status"):
            url = "http://elsewhere.example" + path
            form = {
                "MessageSid": sid,
                "MessageStatus": "undelivered",
                "ErrorCode": "63024",
                "AccountSid": ACCOUNT,
            }
            signature = RequestValidator("secret-token-t0").compute_signature(url, form)
            r = await a.client.post(
                path,
                data=form,
                headers={"X-Twilio-Signature": signature, "Host": "elsewhere.example"},
            )
            assert _is_error(r, 404) and r.json()["error"] == "not_found", r.text
        assert await _provider_status(conn, sid) == ("queued", None)
        assert (await a.send("t0", text="still allowed")).status_code == 202
    assert len([r for r in caplog.records if "PGQUEUE_PUBLIC_URL" in r.getMessage()]) == 1


async def test_a_failure_after_delivery_moves_nothing_back_and_suppresses_nothing(
    api: Api, db_url: str, tmp_path: Path
) -> None:
    jobs = [
        (await api.send("t0", phoneNumber=phone(n), text="x")).json()["jobId"] for n in (1, 2, 3, 4)
    ]
    async with running_worker(db_url, tmp_path / "sends.jsonl"):
        await wait_until_drained(api.conn, 20)
    path, token = "/api/twilio/status/t0", "secret-token-t0"

    async def callback(sid: str, status: str, code: str | None = None) -> dict[str, Any]:
        form = {"MessageSid": sid, "MessageStatus": status, "AccountSid": ACCOUNT}
        if code:
            form["ErrorCode"] = code
        r = await api.client.post(path, **_signed(path, form, token))
        assert r.status_code == 200, r.text
        return dict(r.json())

    async def record_sid(job_id: int, sid: str) -> None:
        # What the send's completion does when it commits after its callbacks came.
        await api.conn.execute(
            "UPDATE pgqueue.job_history SET provider_sid = %s, provider_status = 'queued' "
            "WHERE id = %s",
            (sid, job_id),
        )

    async def suppressed(n: int) -> bool:
        r = await api.send("t0", phoneNumber=phone(n), text="again")
        return r.status_code != 202

    # Read, then failed (63024 would suppress the number): the later failure is stale.
    row = await api.client.get(f"/api/jobs/{jobs[0]}", headers=api.auth())
    sid = row.json()["providerSid"]
    assert (await callback(sid, "delivered"))["updated"] == 1
    assert (await callback(sid, "read"))["updated"] == 1
    for status in ("failed", "undelivered", "canceled"):
        assert (await callback(sid, status, "63024"))["updated"] == 0
    assert await _provider_status(api.conn, sid) == ("read", None)
    assert not await suppressed(1)

    # Both held before the SID was committed: the failure does not replace the delivery
    # (and, like any status that changes nothing, is not reported held).
    early = "SM" + "d" * 32
    assert (await callback(early, "delivered"))["held"] is True
    ignored = {"status": "ok", "updated": 0, "held": False}
    assert await callback(early, "undelivered", "63024") == ignored
    await record_sid(jobs[1], early)
    assert await apply_early_statuses(api.conn) == 1
    assert await _provider_status(api.conn, early) == ("delivered", None)
    assert not await suppressed(2)

    # The delivery held, the failure arriving once the SID is committed: still stale.
    late = "SM" + "e" * 32
    assert (await callback(late, "read"))["held"] is True
    await record_sid(jobs[2], late)
    assert await callback(late, "failed", "63024") == ignored
    assert await apply_early_statuses(api.conn) == 1
    assert await _provider_status(api.conn, late) == ("read", None)
    assert not await suppressed(3)

    # The failure held, the delivery arriving once the SID is committed: the sweep then
    # finds a delivery recorded and leaves it.
    held = "SM" + "f" * 32
    assert (await callback(held, "undelivered", "63024"))["held"] is True
    await record_sid(jobs[3], held)
    assert (await callback(held, "delivered"))["updated"] == 1
    assert await apply_early_statuses(api.conn) == 0
    assert await _provider_status(api.conn, held) == ("delivered", None)
    assert not await suppressed(4)
