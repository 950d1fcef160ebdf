"""Least-privilege database roles (migration 0011, `pgqueue roles`): the API process and a
worker run as login members of pgqueue_api and pgqueue_worker through whole message lives
(sends, retries, dead letters, suppression, a paused tenant, callbacks, cancel, retry,
maintenance), and what each role must not touch is refused by PostgreSQL itself."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import time
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgqueue import admin, cli
from pgqueue.config import Settings
from pgqueue.dashboard import dashboard_url
from pgqueue.db import as_url
from pgqueue.dispatcher import DispatcherConfig
from pgqueue.errors import PgQueueError
from pgqueue.providers.default import default_provider
from pgqueue.server import free_port
from pgqueue.worker import Worker
from tests.support.fake_twilio import FakeTwilio
from tests.support.helpers import ACCOUNT, phone
from tests.support.serve import ADMIN, serving

OTHER_ACCOUNT = "AC" + "1" * 32
VIEWS = ("jobs_overview", "tenant_active", "tenant_in_flight", "tenant_finished")


def login_of(group: str) -> str:
    return f"{group}_login_{os.getpid()}"


@contextlib.asynccontextmanager
async def logins(db_url: str, conn: Any) -> AsyncIterator[dict[str, str]]:
    """A login member of each group role (names of this process: roles are cluster-wide),
    as DSNs for db_url's database. Roles this test created are dropped afterwards."""
    before = {
        r["rolname"]
        for r in await (
            await conn.execute(
                "SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", (list(admin.ROLES),)
            )
        ).fetchall()
    }
    code = await asyncio.to_thread(
        cli.run, ["roles"], {"DATABASE_URL": as_url(db_url), "PGQUEUE_HOME": "/nonexistent"}
    )
    assert code == 0
    users = {}
    for group in admin.ROLES:
        user = login_of(group)
        await conn.execute(f'DROP ROLE IF EXISTS "{user}"')
        await conn.execute(f'CREATE ROLE "{user}" LOGIN IN ROLE {group}')
        users[group.removeprefix("pgqueue_")] = psycopg.conninfo.make_conninfo(db_url, user=user)
    try:
        yield users
    finally:
        for group in admin.ROLES:
            await conn.execute(f'DROP ROLE IF EXISTS "{login_of(group)}"')
            if group not in before:
                # Only this database holds grants to a role made here; another test's
                # database migrated meanwhile may too, and then the role stays.
                await conn.execute(f"DROP OWNED BY {group}")
                with contextlib.suppress(psycopg.errors.DependentObjectsStillExist):
                    await conn.execute(f"DROP ROLE {group}")


async def refused(dsn: str, statement: str) -> bool:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as c:
        try:
            await c.execute(statement)
        except psycopg.errors.InsufficientPrivilege:
            return True
    return False


async def test_roles_command_reports_and_is_idempotent(
    db_url: str, conn: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    async with logins(db_url, conn) as users:
        capsys.readouterr()
        env = {"DATABASE_URL": as_url(db_url), "PGQUEUE_HOME": "/nonexistent"}
        assert await asyncio.to_thread(cli.run, ["roles", "--no-create"], env) == 0
        out = capsys.readouterr().out
        for group in admin.ROLES:
            assert f"{group}: granted ({login_of(group)})" in out
        # Anyone but the owner gets one line naming who may, not a silent no-op.
        env = {"DATABASE_URL": as_url(users["worker"]), "PGQUEUE_HOME": "/nonexistent"}
        with pytest.raises(PgQueueError, match="only the owner of schema pgqueue"):
            await asyncio.to_thread(cli.run, ["roles"], env)


async def test_api_and_worker_run_with_least_privilege(
    db_url: str, conn: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    await admin.add_tenant(
        conn,
        tenant_id="t0",
        account_sid=ACCOUNT,
        auth_token="secret-token-t0",
        whatsapp_from="+14155550100",
    )
    # t1's credentials are wrong at the provider: the worker must be able to pause it.
    await admin.add_tenant(
        conn,
        tenant_id="t1",
        account_sid=OTHER_ACCOUNT,
        auth_token="wrong-token-t1",
        whatsapp_from="+14155550101",
    )
    tokens = {t: await admin.create_token(conn, t) for t in ("t0", "t1")}
    port = free_port()
    public = f"http://127.0.0.1:{port}"
    async with logins(db_url, conn) as users:
        with FakeTwilio(callbacks=("sent", "delivered", "read")) as twilio:
            twilio.add_account(ACCOUNT, "secret-token-t0")
            twilio.fail_number(phone(3), status=400, code=21211)
            twilio.fail_number(phone(4), status=400, code=21610)
            twilio.fail_next(1, status=500, code=20500, to=phone(5))
            async with serving(users["api"], tmp_path, port=port, PGQUEUE_PUBLIC_URL=public) as (
                client,
                _,
                log,
            ):
                t0 = {"Authorization": f"Bearer {tokens['t0']}"}
                t1 = {"Authorization": f"Bearer {tokens['t1']}"}
                for i in range(6):
                    r = await client.post(
                        "/api/whatsapp/send",
                        json={"phoneNumber": phone(i), "text": f"m{i}"},
                        headers=t0,
                    )
                    assert r.status_code == 202, r.text
                r = await client.post(
                    "/api/whatsapp/send/batch",
                    json={
                        "messages": [{"phoneNumber": phone(9), "text": f"b{i}"} for i in range(3)]
                    },
                    headers=t0,
                )
                assert r.status_code == 202, r.text
                later = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).isoformat()
                r = await client.post(
                    "/api/whatsapp/send",
                    json={"phoneNumber": phone(7), "text": "later", "sendAt": later},
                    headers=t0,
                )
                delayed = r.json()["jobId"]
                assert (await client.delete(f"/api/jobs/{delayed}", headers=t0)).status_code == 200
                r = await client.post(
                    "/api/whatsapp/send", json={"phoneNumber": phone(8), "text": "t1"}, headers=t1
                )
                assert r.status_code == 202, r.text

                settings = Settings(
                    twilio_api_base_url=twilio.base_url,
                    public_base_url=public,
                    backoff_delay_ms=200,
                )
                worker = Worker(
                    settings,
                    users["worker"],
                    config=DispatcherConfig(poll_interval_s=0.1, backoff_ms=200),
                    provider_factory=default_provider,
                    rescue_grace_s=0.5,
                )
                task = asyncio.create_task(worker.run())
                try:
                    deadline = time.monotonic() + 30
                    while True:
                        cur = await conn.execute(
                            "SELECT count(*) FILTER (WHERE provider_status = 'read') AS read, "
                            "count(*) FILTER (WHERE state = 'failed') AS failed "
                            "FROM pgqueue.job_history"
                        )
                        row = await cur.fetchone()
                        paused = await (
                            await conn.execute("SELECT paused FROM pgqueue.tenants WHERE id = 't1'")
                        ).fetchone()
                        if (row["read"], row["failed"], paused["paused"]) == (7, 2, True):
                            break
                        assert time.monotonic() < deadline, (dict(row), paused)
                        await asyncio.sleep(0.1)
                finally:
                    worker.stop.set()
                    await asyncio.wait_for(task, 30)

                # The API reads and retries a dead letter, cleans failures, serves metrics
                # and the dashboard, all as pgqueue_api.
                cur = await conn.execute(
                    "SELECT id FROM pgqueue.job_history WHERE last_error_code = '21211'"
                )
                dead = (await cur.fetchone())["id"]
                assert (await client.get(f"/api/jobs/{dead}", headers=t0)).status_code == 200
                r = await client.post(f"/api/jobs/{dead}/retry", headers=t0)
                assert r.status_code in (200, 202), r.text
                r = await client.delete("/api/jobs?state=failed", headers=t0)
                assert r.status_code == 200, r.text
                r = await client.get("/api/queue/metrics", headers=t0)
                assert r.status_code == 200, r.text
                admin_auth = {"Authorization": f"Bearer {ADMIN}"}
                assert (await client.get("/metrics", headers=admin_auth)).status_code == 200
                link = urllib.parse.urlsplit(
                    dashboard_url(Settings(admin_token=ADMIN), public, 600)
                )
                r = await client.get(f"/dashboard/data?{link.query}")
                assert r.status_code == 200, r.text
                served = log.read_text()
            assert "permission denied" not in served and "Traceback" not in served

        # The worker's maintenance ran at its start as pgqueue_worker; its partitions
        # go through the owner's functions.
        assert not [r for r in caplog.records if "permission denied" in r.getMessage()], [
            r.getMessage() for r in caplog.records
        ]
        async with await psycopg.AsyncConnection.connect(users["worker"], autocommit=True) as w:
            await w.execute("SELECT pgqueue.ensure_history_partitions(6)")
            await w.execute("SELECT pgqueue.drop_history_partitions(now() - interval '400 days')")
        cur = await conn.execute("SELECT count(*) AS n FROM pgqueue.suppressions")
        assert (await cur.fetchone())["n"] == 1

        # What each role must not do.
        for role, statement in [
            ("api", "UPDATE pgqueue.tenants SET auth_token = 'x'"),
            ("api", "DELETE FROM pgqueue.api_tokens"),
            ("api", "UPDATE pgqueue.api_tokens SET revoked_at = NULL"),
            ("api", "DROP TABLE pgqueue.jobs"),
            ("api", "SELECT pgqueue.drop_history_partitions(now())"),
            ("worker", "SELECT token_hash FROM pgqueue.api_tokens"),
            ("worker", "UPDATE pgqueue.tenants SET auth_token = 'x'"),
            ("worker", "DELETE FROM pgqueue.job_history"),
            ("worker", "CREATE TABLE pgqueue.x (i int)"),
            ("inspector", "SELECT auth_token FROM pgqueue.tenants"),
            ("inspector", "SELECT account_sid FROM pgqueue.tenants"),
            ("inspector", "SELECT token_hash FROM pgqueue.api_tokens"),
            ("inspector", "SELECT body FROM pgqueue.jobs"),
            ("inspector", "SELECT body FROM pgqueue.job_history"),
            ("inspector", "UPDATE pgqueue.queues SET rate_per_second = 1000"),
        ]:
            assert await refused(users[role], statement), (role, statement)

        # What the inspector reads: the views, without a credential among their columns.
        async with await psycopg.AsyncConnection.connect(users["inspector"], autocommit=True) as i:
            for view in (*VIEWS, "tenants_overview", "queues"):
                cur = await i.execute(f"SELECT * FROM pgqueue.{view}")
                await cur.fetchall()
                names = {c.name for c in cur.description or []}
                assert not names & {"auth_token", "account_sid", "token_hash"}, view
            cur = await i.execute(
                "SELECT active, paused FROM pgqueue.tenant_active WHERE tenant_id = 't1'"
            )
            assert await cur.fetchone() == (0, True)
