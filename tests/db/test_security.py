"""Tenants are sealed from each other: what one tenant sends never touches another's queue."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from pgqueue import admin
from pgqueue.config import Settings
from pgqueue.http import create_app
from tests.db.test_api import ADMIN, PUBLIC, Api, _client
from tests.db.test_ops_cli import pgqueue
from tests.support.helpers import ACCOUNT, phone

SENDER = {"ta": "+14155550101", "tb": "+14155550102"}
FAR = (datetime.now(UTC) + timedelta(days=300)).isoformat()


@pytest.fixture
async def sealed(pool: AsyncConnectionPool[Any], conn: Any) -> AsyncIterator[Api]:
    for tenant, sender in SENDER.items():
        await admin.add_tenant(
            conn,
            tenant_id=tenant,
            account_sid=ACCOUNT,
            auth_token="secret-" + tenant,
            whatsapp_from=sender,
        )
    tokens = {t: await admin.create_token(conn, t) for t in SENDER}
    settings = Settings(admin_token=ADMIN, public_base_url=PUBLIC)
    async for client in _client(create_app(settings, pool)):
        yield Api(client, conn, tokens)


async def test_a_conversation_id_cannot_reach_into_another_tenants_conversation(
    sealed: Api,
) -> None:
    # The attack: "tb:<number>" is what tb's default conversation for that number would be
    # keyed as, were keys not qualified by the sender's own tenant.
    for forged in (f"tb:{phone(77)}", phone(77), f"tb:tb:{phone(77)}"):
        r = await sealed.send("ta", phoneNumber=phone(77), conversationId=forged, sendAt=FAR)
        assert r.status_code == 202, r.text
    victim = await sealed.send("tb", phoneNumber=phone(77))
    assert victim.status_code == 202, victim.text
    assert victim.json()["queuePosition"] == {"state": "waiting", "ahead": 0}
    rows = await (
        await sealed.conn.execute("SELECT tenant_id, conversation FROM pgqueue.jobs ORDER BY id")
    ).fetchall()
    assert all(r["conversation"].startswith(r["tenant_id"] + ":") for r in rows)
    assert [r["tenant_id"] for r in rows].count("tb") == 1
    # The batch endpoint's answer tells nothing about the other tenant's conversations.
    batch = await sealed.client.post(
        "/api/whatsapp/send/batch",
        json={"messages": [{"phoneNumber": phone(78), "text": "x", "conversationId": forged}]},
        headers=sealed.auth("ta"),
    )
    assert batch.status_code == 202, batch.text
    assert batch.json()["jobs"][0]["queuePosition"]["ahead"] == 1  # only ta's own job with that id
    job = await sealed.client.get(f"/api/jobs/{victim.json()['jobId']}", headers=sealed.auth("tb"))
    assert job.json()["conversationId"] == phone(77)


async def test_the_database_refuses_a_conversation_key_outside_its_tenant(sealed: Api) -> None:
    r = await sealed.send("tb", phoneNumber=phone(1))
    with pytest.raises(psycopg.errors.CheckViolation):
        await sealed.conn.execute(
            "UPDATE pgqueue.jobs SET conversation = 'ta:' || conversation WHERE id = %s",
            (r.json()["jobId"],),
        )


async def test_from_number_must_be_one_of_the_tenants_senders(sealed: Api) -> None:
    stolen = f"whatsapp:{SENDER['tb']}"
    r = await sealed.send("ta", fromNumber=stolen)
    assert (r.status_code, r.json()["error"], r.json()["field"]) == (
        422,
        "unknown_sender",
        "fromNumber",
    ), r.text
    batch = await sealed.client.post(
        "/api/whatsapp/send/batch",
        json={
            "messages": [
                {"phoneNumber": phone(1), "text": "fine"},
                {"phoneNumber": phone(2), "text": "stolen", "fromNumber": SENDER["tb"]},
            ]
        },
        headers=sealed.auth("ta"),
    )
    assert (batch.status_code, batch.json()["error"], batch.json()["index"]) == (
        422,
        "unknown_sender",
        1,
    ), batch.text
    assert await sealed.live_jobs() == 0

    own = await sealed.send("ta", fromNumber=f"whatsapp:{SENDER['ta']}")
    assert own.status_code == 202, own.text
    await admin.set_tenant(sealed.conn, "ta", add_senders=["+14155550199"])
    assert (await sealed.send("ta", fromNumber="whatsapp:+14155550199")).status_code == 202
    await admin.set_tenant(sealed.conn, "ta", remove_senders=["+14155550199"])
    gone = await sealed.send("ta", fromNumber="whatsapp:+14155550199")
    assert gone.json()["error"] == "unknown_sender"


async def test_from_number_is_checked_on_a_direct_send_too(
    pool: AsyncConnectionPool[Any], sealed: Api
) -> None:
    settings = Settings(admin_token=ADMIN, public_base_url=PUBLIC, queue_enabled=False)
    async for client in _client(create_app(settings, pool)):
        r = await client.post(
            "/api/whatsapp/send",
            json={"phoneNumber": phone(1), "text": "x", "fromNumber": SENDER["tb"]},
            headers=sealed.auth("ta"),
        )
        assert (r.status_code, r.json()["error"]) == (422, "unknown_sender"), r.text


@pytest.mark.parametrize(
    "send_at",
    ["0001-01-01T00:00:00+01:00", "0001-01-01T00:00:00Z", "1970-01-01T00:00:00Z"],
)
async def test_a_send_at_out_of_range_is_refused_and_stores_nothing(
    db_url: str, sealed: Api, send_at: str
) -> None:
    r = await sealed.send("ta", sendAt=send_at)
    assert (r.status_code, r.json()["error"], r.json()["field"]) == (
        422,
        "invalid_send_at",
        "sendAt",
    ), r.text
    assert await sealed.live_jobs() == 0
    ok = await sealed.send("ta", sendAt=(datetime.now(UTC) - timedelta(hours=1)).isoformat())
    assert ok.status_code == 202, ok.text
    shown = await sealed.client.get(f"/api/jobs/{ok.json()['jobId']}", headers=sealed.auth("ta"))
    assert shown.status_code == 200
    listed = await pgqueue(db_url, "jobs", "list")
    assert listed.code == 0 and "Traceback" not in listed.err
    with pytest.raises(psycopg.errors.CheckViolation):
        await sealed.conn.execute(
            "UPDATE pgqueue.jobs SET run_at = '0001-01-01Z' WHERE id = %s", (ok.json()["jobId"],)
        )


async def test_tenant_senders_from_the_cli(db_url: str, sealed: Api) -> None:
    added = await pgqueue(
        db_url, "tenant", "add", "tc", "--account-sid", ACCOUNT, "--auth-token", "x" * 32,
        "--from", "+14155550103", "--sender", "+14155550104", "--sender", "+14155550105",
    )  # fmt: skip
    assert added.code == 0, added.err
    listed = await pgqueue(db_url, "tenant", "list")
    assert "+14155550104" in listed.out and "+14155550105" in listed.out
    bad = await pgqueue(db_url, "tenant", "set", "tc", "--remove-sender", "+14155550103")
    assert bad.code != 0 and "Traceback" not in bad.err and "+14155550103" in bad.err
