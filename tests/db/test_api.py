"""The HTTP API through its ASGI app (httpx.ASGITransport) on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from psycopg_pool import AsyncConnectionPool
from twilio.request_validator import RequestValidator

from pgqueue import admin, queries
from pgqueue.config import Settings
from pgqueue.db import connect, make_pool
from pgqueue.dispatcher import Dispatcher, DispatcherConfig
from pgqueue.http import create_app
from pgqueue.maintenance import Maintenance
from pgqueue.statuses import apply_early_statuses
from tests.support.fake_twilio import FakeTwilio
from tests.support.helpers import ACCOUNT, add_tenants, phone, running_worker, wait_until_drained

ADMIN = "admin-token-for-tests-0123456789"
PUBLIC = "https://queue.example.com"
TEMPLATE = "HX" + "a" * 32
# sendAt may be at most a year ahead.
TOMORROW = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Api:
    client: httpx.AsyncClient
    conn: Any
    tokens: dict[str, str]

    def auth(self, tenant: str | None = "t0") -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN if tenant is None else self.tokens[tenant]}"}

    async def send(self, tenant: str = "t0", **body: Any) -> httpx.Response:
        body.setdefault("phoneNumber", phone(1))
        body.setdefault("text", "hello")
        return await self.client.post("/api/whatsapp/send", json=body, headers=self.auth(tenant))

    async def live_jobs(self) -> int:
        row = await (await self.conn.execute("SELECT count(*) AS n FROM pgqueue.jobs")).fetchone()
        return int(row["n"])


async def _client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://testserver"
        ) as client,
    ):
        yield client


@pytest.fixture
async def api(pool: AsyncConnectionPool[Any], conn: Any) -> AsyncIterator[Api]:
    await add_tenants(conn, 2)
    tokens = {t: await admin.create_token(conn, t) for t in ("t0", "t1")}
    settings = Settings(admin_token=ADMIN, public_base_url=PUBLIC)
    async for client in _client(create_app(settings, pool)):
        yield Api(client, conn, tokens)


# -- sending ---------------------------------------------------------------------------


async def test_send_queues_and_reports_the_position_in_the_conversation(api: Api) -> None:
    first = await api.send(text="one")
    assert first.status_code == 202, first.text
    body = first.json()
    assert body["status"] == "queued" and body["message"]
    assert body["queuePosition"] == {"state": "waiting", "ahead": 0}
    assert body["duplicate"] is False
    assert first.headers["location"] == f"/api/jobs/{body['jobId']}"
    second = (await api.send(text="two")).json()
    assert second["queuePosition"] == {"state": "waiting", "ahead": 1}
    other = (await api.send(phoneNumber=phone(2))).json()
    assert other["queuePosition"]["ahead"] == 0

    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    delayed = await api.send(phoneNumber=phone(3), sendAt=later)
    assert delayed.json()["queuePosition"] == {"state": "delayed", "ahead": 0}
    zulu = await api.send(phoneNumber=phone(4), sendAt=TOMORROW)
    assert zulu.status_code == 202

    job = (await api.client.get(f"/api/jobs/{body['jobId']}", headers=api.auth())).json()
    assert job["tenantId"] == "t0" and job["phoneNumber"] == phone(1)
    assert job["conversationId"] == phone(1) and job["state"] == "waiting"


async def test_templates_message_types_and_explicit_fields(api: Api) -> None:
    r = await api.send(
        text=None,
        contentSid=TEMPLATE,
        contentVariables={"1": "Ana", "2": 3},
        conversationId="order-77",
        messageType="marketing",
        fromNumber="whatsapp:+14155550100",
    )
    assert r.status_code == 202, r.text
    job = (await api.client.get(f"/api/jobs/{r.json()['jobId']}", headers=api.auth())).json()
    assert job["contentSid"] == TEMPLATE and job["conversationId"] == "order-77"
    assert job["messageType"] == "marketing" and job["priority"] == 5
    explicit = await api.send(phoneNumber=phone(9), messageType="marketing", priority=-3)
    job = (await api.client.get(f"/api/jobs/{explicit.json()['jobId']}", headers=api.auth())).json()
    assert job["priority"] == -3


async def test_idempotency_key_in_the_body_or_the_header_returns_the_first_job(api: Api) -> None:
    first = (await api.send(idempotencyKey="order-1")).json()
    again = (await api.send(idempotencyKey="order-1", text="changed")).json()
    assert again["jobId"] == first["jobId"] and again["duplicate"] is True
    by_header = await api.client.post(
        "/api/whatsapp/send",
        json={"phoneNumber": phone(1), "text": "x"},
        headers={**api.auth(), "Idempotency-Key": "order-1"},
    )
    assert by_header.json()["jobId"] == first["jobId"]
    # Keys are per tenant.
    other = (await api.send("t1", idempotencyKey="order-1")).json()
    assert other["jobId"] != first["jobId"] and other["duplicate"] is False
    clash = await api.client.post(
        "/api/whatsapp/send",
        json={"phoneNumber": phone(1), "text": "x", "idempotencyKey": "a"},
        headers={**api.auth(), "Idempotency-Key": "b"},
    )
    assert clash.status_code == 422 and clash.json()["field"] == "idempotencyKey"
    assert await api.live_jobs() == 2


def _raw(body: str) -> dict[str, Any]:
    return {"content": body, "headers": {"Content-Type": "application/json"}}


BAD_REQUESTS: list[tuple[str, dict[str, Any], int, str, str | None]] = [
    ("malformed json", _raw('{"phoneNumber": '), 400, "invalid_json", None),
    ("empty body", _raw(""), 400, "invalid_json", None),
    ("NaN", _raw('{"phoneNumber": "+14155550001", "priority": NaN}'), 400, "invalid_json", None),
    ("not an object", {"json": ["+14155550001"]}, 422, "invalid_type", "body"),
    (
        "unknown field",
        {"json": {"phoneNumber": "+14155550001", "txt": "x"}},
        422,
        "unknown_field",
        "txt",
    ),
    (
        "wrong type",
        {"json": {"phoneNumber": 14155550001, "text": "x"}},
        422,
        "invalid_type",
        "phoneNumber",
    ),
    (
        "bool priority",
        {"json": {"phoneNumber": "+14155550001", "text": "x", "priority": True}},
        422,
        "invalid_type",
        "priority",
    ),
    (
        "float priority",
        {"json": {"phoneNumber": "+14155550001", "text": "x", "priority": 1.5}},
        422,
        "invalid_type",
        "priority",
    ),
    (
        "priority range",
        {"json": {"phoneNumber": "+14155550001", "text": "x", "priority": 101}},
        422,
        "invalid_priority",
        "priority",
    ),
    (
        "invalid number",
        {"json": {"phoneNumber": "+1415", "text": "x"}},
        422,
        "invalid_phone_number",
        "phoneNumber",
    ),
    ("missing number", {"json": {"text": "x"}}, 422, "invalid_phone_number", "phoneNumber"),
    (
        "empty text",
        {"json": {"phoneNumber": "+14155550001", "text": "  "}},
        422,
        "invalid_text",
        "text",
    ),
    (
        "long text",
        {"json": {"phoneNumber": "+14155550001", "text": "x" * 1601}},
        422,
        "text_too_long",
        "text",
    ),
    ("no content", {"json": {"phoneNumber": "+14155550001"}}, 422, "missing_content", "text"),
    (
        "NUL",
        {"json": {"phoneNumber": "+14155550001", "text": "a\x00b"}},
        422,
        "invalid_characters",
        "text",
    ),
    (
        "lone surrogate",
        _raw('{"phoneNumber": "+14155550001", "text": "\\ud800"}'),
        422,
        "invalid_characters",
        "text",
    ),
    (
        "bad template",
        {"json": {"phoneNumber": "+14155550001", "contentSid": "HX1"}},
        422,
        "invalid_content_sid",
        "contentSid",
    ),
    (
        "infinite variable",
        _raw(
            '{"phoneNumber": "+14155550001", "contentSid": "'
            + TEMPLATE
            + '", "contentVariables": {"1": 1e999}}'
        ),
        422,
        "invalid_content_variables",
        "contentVariables",
    ),
    (
        "naive sendAt",
        {"json": {"phoneNumber": "+14155550001", "text": "x", "sendAt": "2030-01-01T10:00:00"}},
        422,
        "invalid_send_at",
        "sendAt",
    ),
    (
        "garbage sendAt",
        {"json": {"phoneNumber": "+14155550001", "text": "x", "sendAt": "tomorrow"}},
        422,
        "invalid_send_at",
        "sendAt",
    ),
    (
        "impossible date",
        {"json": {"phoneNumber": "+14155550001", "text": "x", "sendAt": "2030-02-30T10:00:00Z"}},
        422,
        "invalid_send_at",
        "sendAt",
    ),
    (
        "bad message type",
        {"json": {"phoneNumber": "+14155550001", "text": "x", "messageType": "Bulk Mail"}},
        422,
        "invalid_message_type",
        "messageType",
    ),
    ("form body", {"data": {"phoneNumber": "+14155550001"}}, 415, "unsupported_media_type", None),
]


@pytest.mark.parametrize(
    ("kwargs", "status", "code", "field"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
async def test_bad_input_is_a_json_4xx_and_never_reaches_the_database(
    api: Api, kwargs: dict[str, Any], status: int, code: str, field: str | None
) -> None:
    kwargs = dict(kwargs)
    headers = {**api.auth(), **kwargs.pop("headers", {})}
    r = await api.client.post("/api/whatsapp/send", headers=headers, **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == code and body["message"]
    assert body.get("field") == field
    assert "Traceback" not in r.text and api.tokens["t0"] not in r.text
    assert await api.live_jobs() == 0


async def test_bodies_over_64_kib_are_refused_by_length_and_by_what_arrives(api: Api) -> None:
    big = json.dumps({"phoneNumber": phone(1), "text": "x" * 70_000})
    r = await api.client.post(
        "/api/whatsapp/send",
        content=big,
        headers={**api.auth(), "Content-Type": "application/json"},
    )
    assert r.status_code == 413 and r.json()["error"] == "body_too_large"

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked
        for _ in range(20):
            yield b" " * 4096

    r = await api.client.post(
        "/api/whatsapp/send",
        content=chunks(),
        headers={**api.auth(), "Content-Type": "application/json"},
    )
    assert r.status_code == 413
    lying = await api.client.post(
        "/api/whatsapp/send",
        content=big,
        headers={**api.auth(), "Content-Type": "application/json", "Content-Length": "10"},
    )
    assert lying.status_code in (400, 413)
    assert await api.live_jobs() == 0


async def test_tokens(api: Api) -> None:
    r = await api.client.post("/api/whatsapp/send", json={"phoneNumber": phone(1), "text": "x"})
    assert r.status_code == 401 and r.json()["error"] == "missing_token"
    assert r.headers["www-authenticate"] == "Bearer"
    for header in ("Bearer nope", "Basic abc", "Bearer pgq_" + "x" * 40, "Bearer"):
        r = await api.client.post(
            "/api/whatsapp/send",
            json={"phoneNumber": phone(1), "text": "x"},
            headers={"Authorization": header},
        )
        assert r.status_code == 401, header
        assert r.json()["error"] in ("invalid_token", "missing_token")
    r = await api.send(None)
    assert r.status_code == 403 and r.json()["error"] == "tenant_token_required"
    await api.conn.execute(
        "UPDATE pgqueue.api_tokens SET revoked_at = now() WHERE tenant_id = 't1'"
    )
    assert (await api.send("t1")).status_code == 401
    assert await api.live_jobs() == 0


async def test_a_revoked_token_stops_working_within_the_local_ttl(
    pool: AsyncConnectionPool[Any], conn: Any
) -> None:
    await add_tenants(conn, 1)
    token = await admin.create_token(conn, "t0")
    headers = {"Authorization": f"Bearer {token}"}
    body = {"phoneNumber": phone(1), "text": "x"}
    async for client in _client(create_app(Settings(), pool, local_token_ttl_s=0.3)):
        assert (await client.post("/api/whatsapp/send", json=body, headers=headers)).is_success
        await conn.execute("UPDATE pgqueue.api_tokens SET revoked_at = now()")
        assert (await client.post("/api/whatsapp/send", json=body, headers=headers)).is_success
        await asyncio.sleep(0.35)
        r = await client.post("/api/whatsapp/send", json=body, headers=headers)
        assert r.status_code == 401


async def test_unknown_query_parameters_are_refused(api: Api) -> None:
    r = await api.client.get("/api/queue/metrics?tenat=t0", headers=api.auth())
    assert (r.status_code, r.json()["error"], r.json()["field"]) == (
        422,
        "unknown_parameter",
        "tenat",
    )
    r = await api.client.get("/api/queue/metrics?tenant=", headers=api.auth())
    assert (r.status_code, r.json()["field"]) == (422, "tenant")
    assert (await api.client.get("/healthz?probe=1")).status_code == 200


async def test_a_suppressed_number_is_refused(api: Api) -> None:
    await api.conn.execute(
        "INSERT INTO pgqueue.suppressions (tenant_id, phone_number, reason_code) "
        "VALUES ('t0', %s, '21610')",
        (phone(5),),
    )
    r = await api.send(phoneNumber=phone(5))
    assert r.status_code == 422
    assert r.json()["error"] == "number_suppressed" and r.json()["field"] == "phoneNumber"
    assert (await api.send("t1", phoneNumber=phone(5))).status_code == 202


async def test_batch_is_all_or_nothing(api: Api) -> None:
    url = "/api/whatsapp/send/batch"
    messages = [
        {"phoneNumber": phone(1), "text": "a"},
        {"phoneNumber": phone(1), "text": "b"},
        {"phoneNumber": phone(2), "contentSid": TEMPLATE, "idempotencyKey": "k"},
    ]
    r = await api.client.post(url, json={"messages": messages}, headers=api.auth())
    assert r.status_code == 202, r.text
    results = r.json()["jobs"]
    assert [j["queuePosition"]["ahead"] for j in results] == [0, 1, 0]
    assert len({j["jobId"] for j in results}) == 3

    bad = [*messages[:2], {"phoneNumber": "+1", "text": "c"}]
    r = await api.client.post(url, json={"messages": bad}, headers=api.auth())
    assert r.status_code == 422
    assert (r.json()["index"], r.json()["field"]) == (2, "messages[2].phoneNumber")
    typed = [messages[0], {"phoneNumber": phone(3), "text": 5}]
    r = await api.client.post(url, json={"messages": typed}, headers=api.auth())
    assert (r.status_code, r.json()["index"], r.json()["field"]) == (422, 1, "messages[1].text")
    too_many = [{"phoneNumber": phone(i), "text": "x"} for i in range(1001)]
    r = await api.client.post(url, json={"messages": too_many}, headers=api.auth())
    assert (r.status_code, r.json()["error"]) == (422, "batch_too_large")
    for body in ({"messages": []}, {"messages": {}}, {"msgs": []}, []):
        r = await api.client.post(url, json=body, headers=api.auth())
        assert r.status_code == 422, body
    assert await api.live_jobs() == 3

    full = [{"phoneNumber": phone(i), "text": "y" * 100} for i in range(1000)]
    r = await api.client.post(url, json={"messages": full}, headers=api.auth())
    assert r.status_code == 202 and len(r.json()["jobs"]) == 1000
    assert await api.live_jobs() == 1003


# -- metrics, jobs -----------------------------------------------------------------------


async def test_queue_metrics_admin_sees_all_a_tenant_only_itself(api: Api) -> None:
    for i in range(3):
        await api.send("t0", phoneNumber=phone(i))
    await api.send("t1", phoneNumber=phone(1), sendAt=TOMORROW)
    await api.conn.execute(
        "INSERT INTO pgqueue.tenant_totals (tenant_id, shard, completed, failed)"
        " VALUES ('t1', 1, 5, 2), ('t1', 9, 2, 0)"
    )
    everything = (await api.client.get("/api/queue/metrics", headers=api.auth(None))).json()
    assert everything["waiting"] == 3 and everything["delayed"] == 1
    assert (everything["completed"], everything["failed"], everything["active"]) == (7, 2, 0)
    assert everything["tenantConcurrency"] == {"t0": 0, "t1": 0}
    assert everything["maxConcurrencyPerTenant"] == 5

    mine = (await api.client.get("/api/queue/metrics", headers=api.auth("t0"))).json()
    assert (mine["waiting"], mine["delayed"], mine["completed"], mine["failed"]) == (3, 0, 0, 0)
    assert mine["tenantConcurrency"] == {"t0": 0}
    theirs = (await api.client.get("/api/queue/metrics", headers=api.auth("t1"))).json()
    assert (theirs["waiting"], theirs["delayed"], theirs["completed"]) == (0, 1, 7)
    await admin.set_tenant(api.conn, "t1", max_concurrency=2)
    theirs = (await api.client.get("/api/queue/metrics", headers=api.auth("t1"))).json()
    assert theirs["maxConcurrencyPerTenant"] == 2

    one = await api.client.get("/api/queue/metrics?tenant=t1", headers=api.auth(None))
    assert one.json()["tenantConcurrency"] == {"t1": 0}
    snoop = await api.client.get("/api/queue/metrics?tenant=t1", headers=api.auth("t0"))
    assert snoop.status_code == 403
    missing = await api.client.get("/api/queue/metrics?tenant=nobody", headers=api.auth(None))
    assert missing.status_code == 404
    assert (await api.client.get("/api/queue/metrics")).status_code == 401


async def test_jobs_are_tenant_scoped_and_dead_letters_can_be_retried_and_cleaned(
    api: Api, db_url: str, tmp_path: Path
) -> None:
    dead = (await api.send("t0", text="dies [permanent]")).json()["jobId"]
    theirs = (await api.send("t1", text="dies too [permanent]")).json()["jobId"]
    ok = (await api.send("t0", phoneNumber=phone(2), text="fine")).json()["jobId"]
    async with running_worker(db_url, tmp_path / "sends.jsonl"):
        await wait_until_drained(api.conn, 20)

    job = (await api.client.get(f"/api/jobs/{dead}", headers=api.auth())).json()
    assert job["state"] == "failed" and job["lastErrorCode"] == "21211"
    assert job["attempts"] == 1 and job["finishedAt"] is not None
    done = (await api.client.get(f"/api/jobs/{ok}", headers=api.auth())).json()
    assert done["state"] == "completed" and done["providerSid"].startswith("SM")
    for path in (
        f"/api/jobs/{theirs}",
        "/api/jobs/999999",
        "/api/jobs/abc",
        "/api/jobs/-1",
        f"/api/jobs/{2**63}",
        "/api/jobs/0",
    ):
        r = await api.client.get(path, headers=api.auth())
        assert (r.status_code, r.json()["error"]) == (404, "not_found"), path
    assert (await api.client.get(f"/api/jobs/{theirs}", headers=api.auth(None))).status_code == 200

    assert (
        await api.client.post(f"/api/jobs/{theirs}/retry", headers=api.auth())
    ).status_code == 404
    not_failed = await api.client.post(f"/api/jobs/{ok}/retry", headers=api.auth())
    assert (not_failed.status_code, not_failed.json()["error"]) == (409, "not_failed")
    retried = await api.client.post(f"/api/jobs/{dead}/retry", headers=api.auth())
    assert retried.status_code == 200 and retried.json()["state"] == "waiting"
    assert retried.json()["attempts"] == 0

    r = await api.client.delete("/api/jobs", headers=api.auth())
    assert (r.status_code, r.json()["field"]) == (422, "state")
    r = await api.client.delete("/api/jobs?state=waiting", headers=api.auth())
    assert r.json()["error"] == "invalid_state"
    r = await api.client.delete("/api/jobs?state=failed&olderThan=soon", headers=api.auth())
    assert (r.status_code, r.json()["field"]) == (422, "olderThan")
    r = await api.client.delete("/api/jobs?state=failed&olderThan=7d", headers=api.auth("t1"))
    assert r.json() == {"deleted": 0}
    r = await api.client.delete("/api/jobs?state=failed&tenant=t1", headers=api.auth("t0"))
    assert r.status_code == 403
    r = await api.client.delete("/api/jobs?state=failed", headers=api.auth("t0"))
    assert r.json() == {"deleted": 0}  # t0's dead letter was retried; t1's is not t0's
    r = await api.client.delete(
        "/api/jobs?state=failed&olderThan=2000-01-01T00:00:00Z", headers=api.auth(None)
    )
    assert r.json() == {"deleted": 0}
    r = await api.client.delete("/api/jobs?state=failed", headers=api.auth("t1"))
    assert r.json() == {"deleted": 1}


async def test_a_job_that_has_not_started_can_be_canceled(api: Api) -> None:
    first = (await api.send(text="one")).json()["jobId"]
    second = (await api.send(text="two")).json()["jobId"]
    r = await api.client.delete(f"/api/jobs/{first}", headers=api.auth("t1"))
    assert r.status_code == 404  # another tenant's job
    r = await api.client.delete(f"/api/jobs/{first}", headers=api.auth())
    assert r.status_code == 200 and r.json() == {"jobId": first, "status": "canceled"}
    assert (await api.client.get(f"/api/jobs/{first}", headers=api.auth())).status_code == 404
    head = await (
        await api.conn.execute("SELECT is_head FROM pgqueue.jobs WHERE id = %s", (second,))
    ).fetchone()
    assert head["is_head"]  # the next message moved up
    claimed = await queries.claim_jobs(
        api.conn, queue="whatsapp-send", worker_id="w", max_jobs=1, lease_s=60, lookahead_s=5
    )
    assert [c["id"] for c in claimed] == [second]
    r = await api.client.delete(f"/api/jobs/{second}", headers=api.auth(None))
    assert r.status_code == 409 and r.json()["error"] == "not_cancelable"
    r = await api.client.delete("/api/jobs/abc", headers=api.auth())
    assert (r.status_code, r.json()["error"]) == (404, "not_found")  # as GET answers


# -- Twilio status callbacks -------------------------------------------------------------


def _signed(path: str, form: dict[str, str], token: str) -> dict[str, Any]:
    signature = RequestValidator(token).compute_signature(PUBLIC + path, form)
    return {"data": form, "headers": {"X-Twilio-Signature": signature}}


async def _provider_status(conn: Any, sid: str) -> tuple[str | None, str | None]:
    row = await (
        await conn.execute(
            "SELECT provider_status, last_error_code FROM pgqueue.job_history "
            "WHERE provider_sid = %s",
            (sid,),
        )
    ).fetchone()
    return row["provider_status"], row["last_error_code"]


async def test_status_callbacks_are_signed_move_forward_only_and_repeat_safely(
    api: Api, db_url: str, tmp_path: Path
) -> None:
    job_id = (await api.send("t0", text="tracked")).json()["jobId"]
    await api.send("t0", phoneNumber=phone(2), text="blocked later")
    async with running_worker(db_url, tmp_path / "sends.jsonl"):
        await wait_until_drained(api.conn, 20)
    job = (await api.client.get(f"/api/jobs/{job_id}", headers=api.auth())).json()
    sid, path = job["providerSid"], "/api/twilio/status/t0"
    token = "secret-token-t0"  # tests.support.helpers gives each tenant this auth token

    async def callback(status: str, *, code: str | None = None, sign: str = token) -> int:
        form = {"MessageSid": sid, "MessageStatus": status, "AccountSid": ACCOUNT}
        if code:
            form["ErrorCode"] = code
        r = await api.client.post(path, **_signed(path, form, sign))
        return r.status_code if r.status_code != 200 else r.json()["updated"]

    # Unsigned, wrongly signed, signed by another tenant's token, or for another tenant.
    form = {"MessageSid": sid, "MessageStatus": "read"}
    assert (await api.client.post(path, data=form)).status_code == 403
    assert await callback("read", sign="secret-token-t1") == 403
    assert (
        await api.client.post(path, data=form, headers={"X-Twilio-Signature": "x"})
    ).status_code == 403
    other = "/api/twilio/status/t1"
    r = await api.client.post(other, **_signed(other, form, "secret-token-t1"))
    assert r.json()["updated"] == 0  # t1 cannot touch t0's message
    unknown = "/api/twilio/status/nobody"
    assert (await api.client.post(unknown, **_signed(unknown, form, token))).status_code == 403
    assert await _provider_status(api.conn, sid) == ("queued", None)

    assert await callback("delivered") == 1
    assert await callback("sent") == 0  # late and older: ignored
    assert await callback("delivered") == 0  # repeat
    assert await _provider_status(api.conn, sid) == ("delivered", None)
    assert await callback("read") == 1
    assert await callback("bogus") == 0

    # A failure reported after delivery moves nothing back (tests/db/test_security_http.py).
    assert await callback("failed", code="30008") == 0
    assert await _provider_status(api.conn, sid) == ("read", None)

    # A delivery that fails because the customer blocked us suppresses the number. Without
    # the tenant in the URL, the account and the signature say which tenant.
    row = await (
        await api.conn.execute(
            "SELECT provider_sid FROM pgqueue.job_history WHERE to_number = %s", (phone(2),)
        )
    ).fetchone()
    sid = row["provider_sid"]
    bare = "/api/twilio/status"
    form = {
        "MessageSid": sid,
        "MessageStatus": "undelivered",
        "AccountSid": ACCOUNT,
        "ErrorCode": "63024",
    }
    r = await api.client.post(bare, **_signed(bare, form, token))
    assert r.json()["updated"] == 1
    assert await _provider_status(api.conn, sid) == ("undelivered", "63024")
    assert await callback("read") == 0  # failed is final
    assert (await api.send("t0", phoneNumber=phone(2))).json()["error"] == "number_suppressed"


async def test_a_status_that_arrives_before_the_sid_is_committed_is_held_then_applied(
    api: Api, db_url: str, pool: AsyncConnectionPool[Any]
) -> None:
    # Twilio calls back within milliseconds of accepting a send; the worker's completion,
    # which records the SID, may commit after that. Played here statement by statement:
    # claim, callback, completion, maintenance.
    first = (await api.send("t0", text="early")).json()["jobId"]
    blocked = (await api.send("t0", phoneNumber=phone(2), text="blocked")).json()["jobId"]
    worker = await connect(db_url, application_name="pgqueue-worker:early")
    dispatcher = Dispatcher(db_url, provider=None, config=DispatcherConfig())  # type: ignore[arg-type]
    try:
        claimed = await queries.claim_jobs(
            worker, queue="whatsapp-send", worker_id="early", max_jobs=5, lease_s=60, lookahead_s=5
        )
        assert {r["id"] for r in claimed} == {first, blocked}
        path, token = "/api/twilio/status/t0", "secret-token-t0"
        sids = {first: "SM" + "e" * 32, blocked: "SM" + "b" * 32}

        async def callback(sid: str, status: str, code: str | None = None) -> dict[str, Any]:
            form = {"MessageSid": sid, "MessageStatus": status, "AccountSid": ACCOUNT}
            if code:
                form["ErrorCode"] = code
            r = await api.client.post(path, **_signed(path, form, token))
            assert r.status_code == 200, r.text
            return dict(r.json())

        assert await callback(sids[first], "delivered") == {
            "status": "ok",
            "updated": 0,
            "held": True,
        }
        assert (await callback(sids[first], "sent"))["held"] is False  # older: changes nothing
        assert (await callback(sids[blocked], "undelivered", "63024"))["held"] is True
        assert (await callback("SM" + "0" * 32, "read"))["held"] is True  # never ours

        await queries.complete_jobs(
            worker,
            queue="whatsapp-send",
            outcomes=[
                {
                    "id": r["id"],
                    "token": r["claim_token"],
                    "outcome": "completed",
                    "sid": sids[r["id"]],
                    "status": "queued",
                }
                for r in claimed
            ],
            conversations=sorted({r["conversation"] for r in claimed}),
        )
        assert await _provider_status(api.conn, sids[first]) == ("queued", None)

        report = await Maintenance(pool, dispatcher, queue="whatsapp-send").run_once()
        assert report.leader and report.statuses_applied == 2
        assert await _provider_status(api.conn, sids[first]) == ("delivered", None)
        assert await _provider_status(api.conn, sids[blocked]) == ("undelivered", "63024")
        refused = await api.send("t0", phoneNumber=phone(2))
        assert refused.json()["error"] == "number_suppressed"
        # Applied statuses are forgotten; the SID nobody recorded waits for its age limit.
        held = "SELECT provider_sid FROM pgqueue.early_statuses ORDER BY provider_sid"
        rows = await (await api.conn.execute(held)).fetchall()
        assert [r["provider_sid"] for r in rows] == ["SM" + "0" * 32]
        assert await apply_early_statuses(api.conn, max_age_s=0) == 0
        assert await (await api.conn.execute(held)).fetchall() == []
        # A callback once the SID is there updates at once, as before.
        assert await callback(sids[first], "read") == {"status": "ok", "updated": 1, "held": False}
    finally:
        await worker.close()
        await dispatcher.close()


# -- operations --------------------------------------------------------------------------


async def test_health_readiness_openapi_and_prometheus(api: Api) -> None:
    assert (await api.client.get("/healthz")).json() == {"status": "ok"}
    ready = await api.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    await api.conn.execute("UPDATE pgqueue.alembic_version SET version_num = '0001'")
    stale = await api.client.get("/readyz")
    assert stale.status_code == 503 and "pgqueue migrate" in stale.json()["message"]

    spec = (await api.client.get("/openapi.json")).json()
    assert spec["openapi"].startswith("3.")
    for path in (
        "/api/whatsapp/send",
        "/api/whatsapp/send/batch",
        "/api/queue/metrics",
        "/api/jobs",
        "/api/jobs/{job_id}",
        "/api/jobs/{job_id}/retry",
        "/api/twilio/status/{tenant}",
        "/metrics",
        "/healthz",
        "/readyz",
    ):
        assert path in spec["paths"], path

    await api.send("t0")
    await api.send("t1", sendAt=TOMORROW)
    await api.conn.execute(
        "INSERT INTO pgqueue.workers (id, queue, hostname, pid, concurrency) "
        "VALUES ('w1', 'whatsapp-send', 'h', 1, 20)"
    )
    text = (await api.client.get("/metrics")).text
    assert 'pgqueue_jobs{queue="whatsapp-send",state="waiting"} 1.0' in text
    assert 'pgqueue_jobs{queue="whatsapp-send",state="delayed"} 1.0' in text
    assert 'pgqueue_tenant_in_flight{queue="whatsapp-send",tenant="t0"} 0.0' in text
    assert 'pgqueue_workers{queue="whatsapp-send"} 1.0' in text
    assert "pgqueue_rate_bucket_level" in text and "pgqueue_sends_completed_total" in text
    assert (
        'pgqueue_http_requests_total{method="POST",route="/api/whatsapp/send",status="202"}' in text
    )


async def test_metrics_ask_for_their_token_once_one_is_set(
    pool: AsyncConnectionPool[Any],
) -> None:
    # /metrics names every tenant and its volume: PGQUEUE_METRICS_TOKEN closes it.
    scrape = "metrics-token-for-tests-0123"
    settings = Settings(admin_token=ADMIN, metrics_token=scrape)
    async for client in _client(create_app(settings, pool)):

        async def status(token: str | None, client: httpx.AsyncClient = client) -> int:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            r = await client.get("/metrics", headers=headers)
            if r.status_code != 200:
                assert r.json()["error"] == "invalid_token"
                assert r.headers["www-authenticate"] == "Bearer"
            return r.status_code

        assert await status(None) == 401
        assert await status("wrong-token-of-the-same-length") == 401
        assert await status(scrape) == 200
        assert await status(ADMIN) == 200
        r = await client.get("/metrics", headers={"Authorization": f"Basic {scrape}"})
        assert r.status_code == 401
        assert (await client.get("/healthz")).status_code == 200  # only /metrics


async def test_unknown_routes_and_methods_answer_json(api: Api) -> None:
    r = await api.client.get("/nope")
    assert (r.status_code, r.json()["error"]) == (404, "not_found")
    r = await api.client.get("/api/whatsapp/send")
    assert (r.status_code, r.json()["error"]) == (405, "method_not_allowed")
    assert "POST" in r.headers["allow"]


# -- the database or the provider away -----------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def unreachable() -> AsyncIterator[httpx.AsyncClient]:
    url = f"postgresql://postgres@127.0.0.1:{_closed_port()}/postgres?connect_timeout=1"
    pool = make_pool(url, min_size=1, max_size=2)  # opened (and closed) by the lifespan
    app = create_app(Settings(admin_token=ADMIN), pool, db_timeout_s=1.0)
    async for client in _client(app):
        yield client


async def test_an_unreachable_database_is_a_quick_503_with_retry_after(
    unreachable: httpx.AsyncClient,
) -> None:
    token = {"Authorization": "Bearer pgq_" + "x" * 40}
    for method, path, kwargs in (
        ("POST", "/api/whatsapp/send", {"json": {"phoneNumber": phone(1), "text": "x"}}),
        ("GET", "/api/queue/metrics", {}),
        ("GET", "/api/jobs/1", {}),
        ("GET", "/metrics", {}),
    ):
        started = time.monotonic()
        r = await unreachable.request(method, path, headers=token, **kwargs)
        assert r.status_code == 503, (path, r.text)
        assert r.json()["error"] == "database_unavailable"
        assert int(r.headers["retry-after"]) >= 1
        assert time.monotonic() - started < 4
    assert (await unreachable.get("/healthz")).status_code == 200
    r = await unreachable.get("/readyz")
    assert r.status_code == 503 and r.json()["error"] == "not_ready"
    # The admin token needs no database; its routes still say 503, not 500.
    r = await unreachable.get("/api/queue/metrics", headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 503


@pytest.fixture
def fake() -> Iterator[FakeTwilio]:
    with FakeTwilio() as server:
        yield server


async def test_direct_send_when_the_queue_is_disabled(
    pool: AsyncConnectionPool[Any], conn: Any, fake: FakeTwilio
) -> None:
    await add_tenants(conn, 1)
    token = await admin.create_token(conn, "t0")
    settings = Settings(queue_enabled=False, twilio_api_base_url=fake.base_url, send_timeout_s=2)
    headers = {"Authorization": f"Bearer {token}"}
    async for client in _client(create_app(settings, pool)):
        r = await client.post(
            "/api/whatsapp/send", json={"phoneNumber": phone(1), "text": "now"}, headers=headers
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["status"] == "ok" and body["message"] == "Successfully sent"
        assert body["channel"] == "freeform" and body["sid"].startswith("SM")
        assert fake.sent()[0].body == "now" and fake.sent()[0].to == f"whatsapp:{phone(1)}"

        fake.fail_next(1, status=400, code=21211)
        r = await client.post(
            "/api/whatsapp/send", json={"phoneNumber": phone(2), "text": "x"}, headers=headers
        )
        assert (r.status_code, r.json()["error"], r.json()["providerCode"]) == (
            422,
            "send_failed",
            "21211",
        )
        fake.fail_next(1, status=400, code=21610)
        r = await client.post(
            "/api/whatsapp/send", json={"phoneNumber": phone(3), "text": "x"}, headers=headers
        )
        assert r.status_code == 422
        r = await client.post(
            "/api/whatsapp/send", json={"phoneNumber": phone(3), "text": "x"}, headers=headers
        )
        assert r.json()["error"] == "number_suppressed"
        fake.fail_next(1, status=503, code=20503, retry_after=7)
        r = await client.post(
            "/api/whatsapp/send", json={"phoneNumber": phone(4), "text": "x"}, headers=headers
        )
        assert r.status_code == 503 and r.headers["retry-after"] == "7"
        fake.fail_next(1, status=401, code=20003)
        r = await client.post(
            "/api/whatsapp/send", json={"phoneNumber": phone(4), "text": "x"}, headers=headers
        )
        assert r.status_code == 502 and "secret-token-t0" not in r.text
        r = await client.post(
            "/api/whatsapp/send/batch",
            json={"messages": [{"phoneNumber": phone(1), "text": "x"}]},
            headers=headers,
        )
        assert r.status_code == 409
    row = await (await conn.execute("SELECT count(*) AS n FROM pgqueue.jobs")).fetchone()
    assert row["n"] == 0


async def test_direct_send_through_the_sandbox(pool: AsyncConnectionPool[Any], conn: Any) -> None:
    await add_tenants(conn, 1)
    token = await admin.create_token(conn, "t0")
    settings = Settings(queue_enabled=False, provider="sandbox", sandbox_latency_s=(0.0, 0.0))
    async for client in _client(create_app(settings, pool)):
        r = await client.post(
            "/api/whatsapp/send",
            json={"phoneNumber": phone(1), "contentSid": TEMPLATE},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert r.status_code == 200, r.text
        assert r.json()["channel"] == "template"
    row = await (
        await conn.execute("SELECT sid, to_number FROM pgqueue.sandbox_messages")
    ).fetchone()
    assert (row["sid"], row["to_number"]) == (r.json()["sid"], phone(1))
