"""Delivery events (pgqueue.events): every state change of a message is an event written
in the change's own transaction, and a tenant's feed hands them out gapless, in each
message's order, under concurrent workers and a SIGKILL."""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgqueue import admin, events, jobs
from pgqueue.errors import ValidationError
from pgqueue.statuses import apply_status
from tests.db.test_twilio_delivery import twilio_worker
from tests.support.fake_twilio import FakeTwilio
from tests.support.harness import (
    Workload,
    cluster,
    enqueue_direct,
    plan,
    tenant_id,
    wait_drained,
)
from tests.support.harness import (
    add_tenants as add_harness_tenants,
)
from tests.support.helpers import ACCOUNT, add_tenants, phone, send, wait_until_drained
from tests.support.serve import ADMIN, serving

QUEUE = "whatsapp-send"
# What may follow what in one message's life (None: its first event).
NEXT = {
    None: {"queued"},
    "queued": {"sending", "canceled", "expired"},
    "sending": {"sent", "retry_scheduled", "queued", "failed", "expired"},
    "retry_scheduled": {"sending", "expired", "canceled"},
    "sent": {"delivered", "read", "failed", "expired"},
    "delivered": {"read", "failed"},
    "read": set(),
    "failed": {"queued", "delivered", "read"},
    "expired": set(),
    "canceled": set(),
}


@pytest.fixture
def fake() -> Iterator[FakeTwilio]:
    with FakeTwilio() as f:
        f.add_account(ACCOUNT, "secret-token-t0")
        yield f


async def feed(conn: Any, tenant: str, after: events.Cursor = events.START) -> list[Any]:
    out: list[Any] = []
    while True:
        rows = await events.read(conn, tenant, after, limit=1000)
        if not rows:
            return out
        out += rows
        after = events.next_cursor(rows, after)


def kinds_by_job(rows: list[Any]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = defaultdict(list)
    for r in rows:
        out[r["job_id"]].append(r["kind"])
    return out


def out_of_order(by_job: dict[int, list[str]]) -> list[str]:
    bad = []
    for job, kinds in by_job.items():
        before: str | None = None
        for kind in kinds:
            if kind not in NEXT[before]:
                bad.append(f"job {job}: {kind} after {before} in {kinds}")
                break
            before = kind
    return bad


async def test_every_state_change_is_an_event_in_the_order_it_happened(
    db_url: str, conn: Any, fake: FakeTwilio
) -> None:
    await add_tenants(conn, 2)
    fake.fail_next(1, status=503, code=20503, to=phone(2))  # a retry, then sent
    fake.fail_number(phone(3), code=21211)  # failed for good
    delivered = await send(conn, "t0", 1, text="a")
    retried = await send(conn, "t0", 2, text="b")
    failed = await send(conn, "t0", 3, text="c")
    head = await send(conn, "t0", 4, text="d", conversation_id="x")
    canceled = await send(conn, "t0", 4, text="e", conversation_id="x")
    expired = await send(conn, "t0", 5, text="f", valid_for_s=1)
    other = await send(conn, "t1", 6, text="g")
    # No worker runs yet: these never start.
    await jobs.cancel_job(conn, canceled.job_id, queue=QUEUE, tenant_id="t0")
    await jobs.cancel_job(conn, other.job_id, queue=QUEUE, tenant_id="t1")
    await asyncio.sleep(1.2)
    async with twilio_worker(db_url, fake):
        await wait_until_drained(conn, 30)
    job = await jobs.get_job(conn, delivered.job_id)
    for status in ("delivered", "read"):
        await apply_status(
            conn, tenant_id="t0", sid=job["provider_sid"], status=status, error_code=None
        )
    t0 = kinds_by_job(await feed(conn, "t0"))
    t1 = kinds_by_job(await feed(conn, "t1"))
    assert t0[delivered.job_id] == ["queued", "sending", "sent", "delivered", "read"]
    assert t0[retried.job_id] == ["queued", "sending", "retry_scheduled", "sending", "sent"]
    assert t0[failed.job_id] == ["queued", "sending", "failed"]
    assert t0[head.job_id] == ["queued", "sending", "sent"]
    assert t0[canceled.job_id] == ["queued", "canceled"]
    assert t0[expired.job_id] == ["queued", "expired"]
    assert t1 == {other.job_id: ["queued", "canceled"]}
    # A tenant's feed holds its own messages only.
    assert not set(t0) & set(t1)
    [sent] = [
        r for r in await feed(conn, "t0") if r["job_id"] == delivered.job_id and r["kind"] == "sent"
    ]
    assert sent["sid"] == job["provider_sid"] and sent["attempt"] == 1
    shown = await events.of_job(conn, delivered.job_id, "t0")
    assert [r["kind"] for r in shown] == t0[delivered.job_id]
    assert await events.of_job(conn, delivered.job_id, "t1") == []


async def test_a_change_that_rolls_back_leaves_no_event(conn: Any) -> None:
    await add_tenants(conn, 1)
    kept = await send(conn, "t0", 1)
    with pytest.raises(RuntimeError):
        async with conn.transaction():
            await send(conn, "t0", 2)
            raise RuntimeError("the caller gives up")
    assert [r["job_id"] for r in await feed(conn, "t0")] == [kept.job_id]


async def test_an_event_of_a_running_transaction_holds_back_the_ones_after_it(
    db_url: str, conn: Any
) -> None:
    """The feed's gaplessness itself: an event that commits after a later-numbered one
    must not be skipped by a reader that saw the later one first."""
    await add_tenants(conn, 1)
    first = await send(conn, "t0", 1)
    async with await psycopg.AsyncConnection.connect(
        db_url, autocommit=True, row_factory=psycopg.rows.dict_row
    ) as slow:
        async with slow.transaction():
            # Takes its transaction id and event id now, commits last.
            await send(slow, "t0", 2, text="slow")
            after_it = await send(conn, "t0", 3)
            seen = [r["job_id"] for r in await feed(conn, "t0")]
            # The later one is committed but held back behind the running transaction.
            assert seen == [first.job_id]
            assert after_it.job_id not in seen
        everything = await feed(conn, "t0")
    slow_job = [r["job_id"] for r in everything if r["job_id"] not in (first.job_id,)]
    assert len(everything) == 3
    assert after_it.job_id in slow_job


async def test_a_change_made_by_an_older_transaction_still_follows_the_one_it_saw(
    db_url: str, conn: Any
) -> None:
    """A transaction may take its id before the change it acts on commits (read
    committed): its event must still come after that change's in the feed."""
    await add_tenants(conn, 1)
    async with (
        await psycopg.AsyncConnection.connect(
            db_url, autocommit=True, row_factory=psycopg.rows.dict_row
        ) as older,
        older.transaction(),
    ):
        await older.execute("SELECT pg_current_xact_id()")
        job = await send(conn, "t0", 1)
        await jobs.cancel_job(older, job.job_id, queue=QUEUE, tenant_id="t0")
    assert [r["kind"] for r in await feed(conn, "t0")] == ["queued", "canceled"]


def test_a_cursor_that_is_not_the_feeds_is_refused() -> None:
    assert events.parse_cursor(None) == events.START
    assert events.parse_cursor("12-34") == events.Cursor(12, 34)
    for bad in ("12", "a-b", "-1-2", "1-2-3", "9" * 20 + "-1"):
        with pytest.raises(ValidationError) as e:
            events.parse_cursor(bad)
        assert e.value.field == "after"


@pytest.mark.chaos
async def test_the_feed_is_gapless_and_ordered_per_message_under_three_workers_and_a_sigkill(
    db_url: str, tmp_path: Path
) -> None:
    workload = Workload(4, 12, 480, seed=7)
    planned = plan(workload)
    await add_harness_tenants(db_url, workload.tenants)
    tenants = [tenant_id(i) for i in range(workload.tenants)]
    seen: dict[str, list[Any]] = {t: [] for t in tenants}
    done = asyncio.Event()

    async def follow(tenant: str) -> None:
        # A reader that keeps only its cursor, as a platform's consumer would.
        async with await psycopg.AsyncConnection.connect(
            db_url, autocommit=True, row_factory=psycopg.rows.dict_row
        ) as reader:
            after = events.START
            while True:
                finished = done.is_set()
                rows = await events.read(reader, tenant, after, limit=50)
                seen[tenant] += rows
                after = events.next_cursor(rows, after)
                if finished and not rows:
                    return
                await asyncio.sleep(random.uniform(0.0, 0.005))

    readers = [asyncio.create_task(follow(t)) for t in tenants]
    async with cluster(tmp_path, db_url, workers=3, latency="0.02:0.08") as c:
        await enqueue_direct(db_url, planned[: len(planned) // 2])
        drained = asyncio.create_task(wait_drained(db_url, len(planned), 120))
        await asyncio.sleep(1.0)
        await enqueue_direct(db_url, planned[len(planned) // 2 :])
        await asyncio.sleep(1.0)
        victim = c.workers[0]
        victim.send(signal.SIGKILL)
        await victim.wait(10)
        c.retire(victim)
        c.start_worker()
        await drained
    done.set()
    await asyncio.wait_for(asyncio.gather(*readers), 60)
    async with await psycopg.AsyncConnection.connect(
        db_url, autocommit=True, row_factory=psycopg.rows.dict_row
    ) as conn:
        stored = {t: await feed(conn, t) for t in tenants}
        cur = await conn.execute("SELECT id, state FROM pgqueue.job_history")
        final = {r["id"]: r["state"] for r in await cur.fetchall()}
    for t in tenants:
        # Gapless: what the live reader collected is every event there is, in order.
        assert [r["id"] for r in seen[t]] == [r["id"] for r in stored[t]], t
    by_job = kinds_by_job([r for t in tenants for r in stored[t]])
    assert out_of_order(by_job) == []
    assert len(final) == len(planned)
    last = {job: kinds[-1] for job, kinds in by_job.items()}
    assert {job: {"completed": "sent"}.get(s, s) for job, s in final.items()} == last


async def test_the_feed_over_http_pages_and_long_polls(
    db_url: str, conn: Any, tmp_path: Path
) -> None:
    await add_tenants(conn, 2)
    token = await admin.create_token(conn, "t0")
    async with serving(db_url, tmp_path) as (http, _, _):
        auth = {"Authorization": f"Bearer {token}"}
        jobs_sent = [(await send(conn, "t0", i)).job_id for i in range(3)]
        await send(conn, "t1", 9)
        page = (await http.get("/api/events", params={"limit": 2}, headers=auth)).json()
        assert [e["jobId"] for e in page["events"]] == jobs_sent[:2]
        assert {e["type"] for e in page["events"]} == {"queued"}
        rest = (
            await http.get("/api/events", params={"after": page["nextCursor"]}, headers=auth)
        ).json()
        assert [e["jobId"] for e in rest["events"]] == jobs_sent[2:]
        # Nothing new: a long poll waits, and answers when an event comes.
        started = time.monotonic()
        poll = asyncio.create_task(
            http.get("/api/events", params={"after": rest["nextCursor"], "wait": 10}, headers=auth)
        )
        await asyncio.sleep(0.5)
        late = await send(conn, "t0", 5)
        answer = (await poll).json()
        assert [e["jobId"] for e in answer["events"]] == [late.job_id]
        assert 0.5 <= time.monotonic() - started < 5
        empty = await http.get(
            "/api/events", params={"after": answer["nextCursor"], "wait": 0.3}, headers=auth
        )
        assert empty.json() == {"events": [], "nextCursor": answer["nextCursor"]}
        bad = await http.get("/api/events", params={"after": "x"}, headers=auth)
        assert bad.status_code == 422 and bad.json()["field"] == "after"
        other = await http.get("/api/events", params={"tenant": "t1"}, headers=auth)
        assert other.status_code == 403
        admin_needs_one = await http.get(
            "/api/events", headers={"Authorization": f"Bearer {ADMIN}"}
        )
        assert admin_needs_one.status_code == 422
        as_admin = await http.get(
            "/api/events", params={"tenant": "t1"}, headers={"Authorization": f"Bearer {ADMIN}"}
        )
        assert [e["type"] for e in as_admin.json()["events"]] == ["queued"]
