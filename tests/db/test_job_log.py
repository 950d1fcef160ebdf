"""The job log lines a worker writes: one per event, as the old system had them."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from pgqueue.logs import JsonFormatter, PlainFormatter
from tests.support.helpers import add_tenants, running_worker, send, wait_until_drained


def job_events(caplog: pytest.LogCaptureFixture) -> list[tuple[logging.LogRecord, dict[str, Any]]]:
    return [(r, r.fields) for r in caplog.records if r.name == "pgqueue.jobs"]


async def test_each_job_event_has_its_line(
    db_url: str, conn: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    await add_tenants(conn, 1)
    long_text = "Hola! " + "x" * 500
    ok = await send(conn, "t0", 1, text=long_text)
    flaky = await send(conn, "t0", 2, text="flaky [transient:1]")
    dead = await send(conn, "t0", 3, text="dead [permanent]")
    async with running_worker(db_url, tmp_path / "r.jsonl"):
        await wait_until_drained(conn, 20)
    events = job_events(caplog)

    def of(job_id: int) -> list[str]:
        return [f["event"] for _, f in events if f["job_id"] == job_id]

    assert of(ok.job_id) == ["processing", "completed"]
    assert of(flaky.job_id) == ["processing", "retry", "processing", "completed"]
    assert of(dead.job_id) == ["processing", "failed"]
    by_event = {(f["job_id"], f["event"]): (r, f) for r, f in events}
    record, completed = by_event[(ok.job_id, "completed")]
    assert completed["sid"].startswith("SM") and record.levelno == logging.INFO
    record, retry = by_event[(flaky.job_id, "retry")]
    assert retry["delay_s"] > 0 and retry["code"] and record.levelno == logging.WARNING
    assert "retry scheduled in" in record.getMessage()
    _, failed = by_event[(dead.job_id, "failed")]
    assert failed["code"] == "21211"
    # No text unless PGQUEUE_LOG_PREVIEW asks for a preview; never the tenant's secret.
    _, processing = by_event[(ok.job_id, "processing")]
    assert "preview" not in processing and processing["attempt"] == 1
    for fmt in (PlainFormatter(), JsonFormatter()):
        lines = [fmt.format(r) for r, _ in events]
        assert all("\n" not in line for line in lines)
        assert not any("x" * 100 in line or "secret-token" in line for line in lines)
    line = json.loads(JsonFormatter().format(by_event[(dead.job_id, "failed")][0]))
    assert (line["event"], line["code"], line["level"]) == ("failed", "21211", "warning")
    # Lines are written after their events, but carry the events' times, in order.
    times = [r.created for r, f in events if f["job_id"] == flaky.job_id]
    assert times == sorted(times)


async def test_a_send_in_flight_has_its_line_before_it_ends(
    db_url: str, conn: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The lines are buffered while the worker waits for the database; a slow send must
    not hold its 'processing' line back until the next turn."""
    caplog.set_level(logging.INFO)
    await add_tenants(conn, 1)
    job = await send(conn, "t0", 1, text="slow")
    # One slot: no turn runs while the send is in flight.
    async with running_worker(db_url, tmp_path / "r.jsonl", concurrency=1, latency=(2.0, 2.0)):
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            if any(f["event"] == "processing" for _, f in job_events(caplog)):
                break
            await asyncio.sleep(0.02)
        cur = await conn.execute("SELECT state FROM pgqueue.jobs WHERE id = %s", (job.job_id,))
        assert (await cur.fetchone())["state"] == "active"  # still sending
        assert [f["job_id"] for _, f in job_events(caplog)] == [job.job_id]
        await wait_until_drained(conn, 20)
    assert [f["event"] for _, f in job_events(caplog)] == ["processing", "completed"]
