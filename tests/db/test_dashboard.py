"""The dashboard in a real headless Chromium (Debian's, driven by Playwright): it loads,
shows the counts the API reports, and its retry button moves a dead letter back."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pgqueue import admin
from pgqueue.config import Settings
from pgqueue.credentials import Keyring
from pgqueue.dashboard import link_key, signed_query
from pgqueue.db import as_url
from pgqueue.models import Message
from pgqueue.server import free_port
from pgqueue.webhooks import Webhooks
from tests.support.helpers import (
    REPO,
    add_tenants,
    phone,
    running_worker,
    send_many,
    wait_until_drained,
)

ADMIN = "dashboard-admin-token-0123"
KEY = link_key(Settings(admin_token=ADMIN)) or b""
CHROMIUM = "/usr/bin/chromium"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def api(db_url: str) -> Iterator[str]:
    port = _port()
    env = {**os.environ, "DATABASE_URL": as_url(db_url), "PGQUEUE_ADMIN_TOKEN": ADMIN}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgqueue.cli", "serve", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(20)


async def test_signed_link_is_required(api: str) -> None:
    async with httpx.AsyncClient(base_url=api) as client:
        assert (await client.get("/dashboard")).status_code == 401
        assert (
            await client.get("/dashboard/data?exp=9999999999&sig=" + "0" * 64)
        ).status_code == 401
        expired = signed_query(KEY, ttl_s=10, now=time.time() - 60)
        assert (await client.get("/dashboard?" + expired)).status_code == 401
        ok = await client.get("/dashboard?" + signed_query(KEY))
        assert ok.status_code == 200 and "<svg" in ok.text
        assert "://" not in ok.text  # no CDN, nothing fetched from elsewhere: works offline


@pytest.mark.skipif(
    not shutil.which(CHROMIUM),
    reason="Debian's chromium is not installed (apt-get install chromium)",
)
async def test_dashboard_in_a_browser(
    api: str, db_url: str, conn: Any, pool: Any, tmp_path: Path
) -> None:
    from playwright.async_api import async_playwright

    await add_tenants(conn, 2)
    await send_many(
        conn,
        [
            Message(tenant_id="t0", phone_number=phone(1), text="dead [permanent]"),
            Message(tenant_id="t1", phone_number=phone(2), text="fine"),
        ],
    )
    async with running_worker(db_url, tmp_path / "r.jsonl"):
        await wait_until_drained(conn, 20)
    # An endpoint nobody listens on: its refusal shows in the webhooks table.
    await admin.set_tenant(conn, "t1", webhook_url=f"http://127.0.0.1:{free_port()}/hook")
    await send_many(
        conn, [Message(tenant_id="t1", phone_number=phone(i), text="later") for i in range(3)]
    )
    hooks = Webhooks(pool, worker_id="dashboard-test", keyring=Keyring(()))
    try:
        assert await hooks.run_once() == 1 and hooks.failed == 1
    finally:
        await hooks.aclose()
    async with httpx.AsyncClient(
        base_url=api, headers={"Authorization": f"Bearer {ADMIN}"}
    ) as client:
        metrics = (await client.get("/api/queue/metrics")).json()

    async with async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            await page.goto(f"{api}/dashboard?{signed_query(KEY, scope='retry')}")
            await page.wait_for_selector('[data-state="waiting"]')
            for state in ("waiting", "completed", "failed"):
                shown = await page.inner_text(f'[data-state="{state}"] b')
                assert int(shown) == metrics[state], state
            row = page.locator("tr[data-job]")
            assert await row.count() == 1
            assert "21211" in await row.inner_text()
            hook = page.locator('tr[data-webhook="t1"]')
            assert await hook.count() == 1
            failing = int((await hook.locator("td").nth(2).inner_text()).strip())
            assert failing >= 1, "the refused webhook does not show as failing"
            await page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
            shutil.copy(tmp_path / "dashboard.png", REPO / "docs" / "dashboard.png")
            await row.locator("button").click()
            for _ in range(50):
                cur = await conn.execute(
                    "SELECT state FROM pgqueue.jobs_overview WHERE body_preview LIKE 'dead%%'"
                )
                if (await cur.fetchone())["state"] == "waiting":
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the retry button did not move the job back to waiting")
            await page.wait_for_function("document.querySelectorAll('tr[data-job]').length === 0")
        finally:
            await browser.close()
