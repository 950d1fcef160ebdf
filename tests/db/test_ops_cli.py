"""`pgqueue jobs | stats | doctor | suppression`, run as the commands people type."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from pgqueue import admin
from pgqueue.config import Settings
from pgqueue.db import as_url
from pgqueue.http import create_app
from pgqueue.metrics import get_queue_metrics
from pgqueue.models import Message
from tests.support.helpers import (
    add_tenants,
    phone,
    running_worker,
    send,
    send_many,
    wait_until_drained,
)

REPO = Path(__file__).resolve().parents[2]
ADMIN = "admin-token-for-cli-tests-0123456"


CLI = [sys.executable, "-m", "pgqueue.cli"]


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


async def pgqueue(db_url: str, *argv: str, **env: str) -> Result:
    environ = {
        **{k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")},
        "DATABASE_URL": as_url(db_url) if "://" not in db_url else db_url,
        "COLUMNS": "200",
        **env,
    }
    done = await asyncio.to_thread(
        subprocess.run,
        [*CLI, *argv],
        cwd=REPO,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return Result(done.returncode, done.stdout, done.stderr)


async def test_jobs_list_show_retry_and_clean(db_url: str, conn: Any, tmp_path: Path) -> None:
    await add_tenants(conn, 2)
    await send_many(
        conn,
        [
            Message(tenant_id="t0", phone_number=phone(1), text="dead [permanent]"),
            Message(tenant_id="t0", phone_number=phone(2), text="fine"),
            Message(tenant_id="t1", phone_number=phone(1), text="dead too [permanent]"),
        ],
    )
    async with running_worker(db_url, tmp_path / "sends.jsonl"):
        await wait_until_drained(conn, 20)
    waiting = await send(conn, "t1", 3, text="later")

    everything = (await pgqueue(db_url, "jobs", "list", "--json")).json()
    assert sorted(j["state"] for j in everything) == ["completed", "failed", "failed", "waiting"]
    failed = (await pgqueue(db_url, "jobs", "list", "--state", "failed", "--json")).json()
    assert {j["tenantId"] for j in failed} == {"t0", "t1"}
    t1 = (await pgqueue(db_url, "jobs", "list", "--tenant", "t1", "--limit", "1", "--json")).json()
    assert [j["id"] for j in t1] == [waiting.job_id]
    conv = f"t0:{phone(2)}"
    by_conv = (await pgqueue(db_url, "jobs", "list", "--conversation", conv, "--json")).json()
    assert [j["state"] for j in by_conv] == ["completed"]
    table = await pgqueue(db_url, "jobs", "list")
    assert table.code == 0 and "jobs of whatsapp-send" in table.out and "21211" in table.out

    dead = next(j for j in failed if j["tenantId"] == "t0")["id"]
    shown = (await pgqueue(db_url, "jobs", "show", str(dead), "--json")).json()
    assert shown["lastErrorCode"] == "21211" and shown["attempts"] == 1
    assert [e["type"] for e in shown["events"]] == ["queued", "sending", "failed"]
    assert shown["events"][-1]["errorCode"] == "21211"
    text = (await pgqueue(db_url, "jobs", "show", str(dead))).out
    assert "lastErrorMessage" in text and "sending" in text
    missing = await pgqueue(db_url, "jobs", "show", "999999")
    assert missing.code == 2 and "no job 999999" in missing.err

    assert (await pgqueue(db_url, "jobs", "retry")).code == 2
    assert (await pgqueue(db_url, "jobs", "retry", "1", "--failed")).code == 2
    retried = await pgqueue(db_url, "jobs", "retry", str(dead))
    assert retried.code == 0 and "queued again" in retried.out
    again = await pgqueue(db_url, "jobs", "retry", str(dead))
    assert again.code == 2 and "only failed jobs" in again.err
    none = await pgqueue(db_url, "jobs", "retry", "--failed", "--tenant", "t0")
    assert none.out.startswith("0 failed job(s)")

    recent = await pgqueue(db_url, "jobs", "clean", "--state", "failed", "--older-than", "7d")
    assert recent.out.startswith("0 failed job(s) deleted")
    bad = await pgqueue(db_url, "jobs", "clean", "--state", "failed", "--older-than", "soon")
    assert bad.code == 2 and "older_than" in bad.err
    assert (await pgqueue(db_url, "jobs", "clean", "--state", "waiting")).code == 2
    cleaned = await pgqueue(db_url, "jobs", "clean", "--state", "failed", "--tenant", "t1")
    assert cleaned.out.startswith("1 failed job(s) deleted")

    canceled = await pgqueue(db_url, "jobs", "cancel", str(waiting.job_id))
    assert canceled.code == 0 and "canceled (it was waiting)" in canceled.out
    again = await pgqueue(db_url, "jobs", "cancel", str(waiting.job_id))
    assert again.code == 2 and f"no job {waiting.job_id}" in again.err
    finished = await pgqueue(db_url, "jobs", "cancel", str(by_conv[0]["id"]))
    assert finished.code == 2 and "only waiting or delayed jobs" in finished.err


async def test_stats_and_get_queue_metrics_give_the_endpoints_numbers(
    db_url: str, pool: AsyncConnectionPool[Any], conn: Any
) -> None:
    await add_tenants(conn, 2)
    token = await admin.create_token(conn, "t1")
    for i in range(3):
        await send(conn, "t0", i)
    await send(conn, "t1", 1)
    # Totals are kept in shards, one per database session that finished sends.
    await conn.execute(
        "INSERT INTO pgqueue.tenant_totals (tenant_id, shard, completed)"
        " VALUES ('t0', 3, 3), ('t0', 7, 1)"
    )

    app = create_app(Settings(admin_token=ADMIN), pool)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        everyone = await client.get(
            "/api/queue/metrics", headers={"Authorization": f"Bearer {ADMIN}"}
        )
        mine = await client.get("/api/queue/metrics", headers={"Authorization": f"Bearer {token}"})
    assert await get_queue_metrics(pool) == everyone.json()
    assert await get_queue_metrics(conn, tenant_id="t1") == mine.json()
    assert everyone.json()["waiting"] == 4 and mine.json()["waiting"] == 1
    assert await get_queue_metrics(as_url(db_url)) == everyone.json()

    assert (await pgqueue(db_url, "stats", "--json")).json() == everyone.json()
    assert (await pgqueue(db_url, "stats", "--json", "--tenant", "t1")).json() == mine.json()
    table = await pgqueue(db_url, "stats")
    assert table.code == 0 and "queue whatsapp-send" in table.out and "tenants" in table.out
    watched = await pgqueue(
        db_url, "stats", "--watch", "--json", "--count", "3", "--interval", "0.05"
    )
    lines = [json.loads(line) for line in watched.out.splitlines()]
    assert len(lines) == 3 and all(line["waiting"] == 4 for line in lines)
    live = await pgqueue(db_url, "stats", "--watch", "--count", "2", "--interval", "0.05")
    assert live.code == 0 and "waiting" in live.out


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _lines(result: Result) -> dict[str, list[str]]:
    by_check: dict[str, list[str]] = {}
    for line in result.out.splitlines():
        status, rest = line.split(None, 1)
        name = rest.split(":", 1)[0]
        by_check.setdefault(name, []).append(f"{status} {rest}")
    return by_check


async def test_doctor_says_ok_or_what_to_do(db_url: str, conn: Any, tmp_path: Path) -> None:
    await add_tenants(conn, 2)
    unhealthy = await pgqueue(db_url, "doctor")
    assert unhealthy.code == 1
    checks = _lines(unhealthy)
    assert checks["database"][0].startswith("OK") and checks["migrations"][0].startswith("OK")
    assert checks["workers"][0].startswith("FAIL") and "pgqueue worker" in checks["workers"][0]
    assert checks["tenants"] == ["OK tenants: none paused"]
    assert checks["redis"][0].startswith("OK")
    assert checks["node"] == ["OK node: primary, no standby streaming from it"]
    assert checks["pooler"][0].startswith("OK pooler: none in transaction mode")

    async with running_worker(db_url, tmp_path / "sends.jsonl"):
        await asyncio.sleep(0.5)
        healthy = await pgqueue(db_url, "doctor")
        assert healthy.code == 0, healthy.out
        assert "1 alive" in _lines(healthy)["workers"][0]
        assert " since " in _lines(healthy)["workers"][0]

        await admin.set_tenant(conn, "t1", paused=True)
        redis = f"redis://127.0.0.1:{_closed_port()}/0"
        sick = await pgqueue(db_url, "doctor", REDIS_URL=redis)
        assert sick.code == 1
        checks = _lines(sick)
        assert (
            checks["tenants"][0].startswith("FAIL")
            and "tenant set t1 --resume" in checks["tenants"][0]
        )
        assert checks["redis"][0].startswith("FAIL") and "unset REDIS_URL" in checks["redis"][0]
        await admin.set_tenant(conn, "t1", paused=False)

    # A job active under a worker that is gone and whose lease ran out.
    job = await send(conn, "t0", 1)
    await conn.execute(
        "UPDATE pgqueue.jobs SET state = 'active', claim_token = gen_random_uuid(), "
        "claimed_by = 'ghost', lease_expires_at = now() - interval '1 minute' WHERE id = %s",
        (job.job_id,),
    )
    stuck = _lines(await pgqueue(db_url, "doctor"))
    assert stuck["active jobs"][0].startswith("FAIL")
    assert "1 held by no live worker" in stuck["active jobs"][0]

    await conn.execute("UPDATE pgqueue.alembic_version SET version_num = '0001'")
    old = await pgqueue(db_url, "doctor")
    assert old.code == 1 and "run `pgqueue migrate`" in _lines(old)["migrations"][0]

    gone = await pgqueue(
        f"postgresql://postgres@127.0.0.1:{_closed_port()}/postgres",
        "doctor",
        REDIS_URL="redis://:hunter2-secret@127.0.0.1:1/0",
    )
    assert "hunter2-secret" not in gone.out
    assert gone.code == 1
    assert _lines(gone)["database"][0].startswith("FAIL database: cannot connect")


async def test_suppression_list_and_remove(db_url: str, conn: Any) -> None:
    await add_tenants(conn, 2)
    for tenant, n in (("t0", 1), ("t0", 2), ("t1", 1)):
        await conn.execute(
            "INSERT INTO pgqueue.suppressions (tenant_id, phone_number, reason_code) "
            "VALUES (%s, %s, '21610')",
            (tenant, phone(n)),
        )
    listed = (await pgqueue(db_url, "suppression", "list", "--json")).json()
    assert len(listed) == 3
    only_t1 = (await pgqueue(db_url, "suppression", "list", "t1", "--json")).json()
    assert [(r["tenant_id"], r["phone_number"]) for r in only_t1] == [("t1", phone(1))]
    table = await pgqueue(db_url, "suppression", "list")
    assert "21610" in table.out and phone(2) in table.out

    removed = await pgqueue(db_url, "suppression", "remove", "t0", f"whatsapp:{phone(1)}")
    assert removed.code == 0 and "may receive messages" in removed.out
    assert (await send(conn, "t0", 1)).job_id > 0
    again = await pgqueue(db_url, "suppression", "remove", "t0", phone(1))
    assert again.code == 2 and "is not suppressed" in again.err
    invalid = await pgqueue(db_url, "suppression", "remove", "t0", "12")
    assert invalid.code == 2


@pytest.mark.parametrize("argv", [["jobs"], ["jobs", "show", "x"], ["suppression", "remove", "t0"]])
async def test_usage_errors_exit_2(db_url: str, argv: list[str]) -> None:
    assert (await pgqueue(db_url, *argv)).code == 2


async def test_a_database_without_the_schema_gets_one_line_naming_migrate(server_url: str) -> None:
    name = f"pgqueue_unmigrated_{os.getpid()}"
    with psycopg.connect(server_url, autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}"')
        c.execute(f'CREATE DATABASE "{name}"')
    try:
        url = psycopg.conninfo.make_conninfo(server_url, dbname=name)
        for argv in (["queue", "show"], ["jobs", "list"], ["tenant", "list"]):
            done = await pgqueue(url, *argv)
            assert done.code == 2, (argv, done)
            assert done.err.strip().endswith("run `pgqueue migrate`"), (argv, done.err)
            assert len(done.err.strip().splitlines()) == 1, done.err
        migrated = await pgqueue(url, "migrate")
        assert migrated.code == 0, migrated
        assert (await pgqueue(url, "queue", "show")).code == 0
    finally:
        with psycopg.connect(server_url, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
