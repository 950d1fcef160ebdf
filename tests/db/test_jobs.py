"""Dead letters: retry to the tail of the conversation, clean, tenant scoping; canceling
messages that have not started."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import pytest

from pgqueue import jobs, queries
from pgqueue.db import connect
from pgqueue.errors import NotFoundError, ValidationError
from pgqueue.models import Message
from tests.support.helpers import add_tenants, phone, running_worker, send_many, wait_until_drained
from tests.support.recording import read_sends

Q = "whatsapp-send"


async def test_retry_and_clean_dead_letters(db_url: str, conn: Any, tmp_path: Path) -> None:
    await add_tenants(conn, 2)
    await send_many(
        conn,
        [
            Message(tenant_id="t0", phone_number=phone(1), text="dead [permanent]"),
            Message(tenant_id="t1", phone_number=phone(1), text="dead too [permanent]"),
        ],
    )
    record = tmp_path / "r.jsonl"
    async with running_worker(db_url, record):
        await wait_until_drained(conn, 20)
    failed = await jobs.list_jobs(conn, queue=Q, state="failed")
    assert len(failed) == 2
    t0_job = next(j for j in failed if j["tenant_id"] == "t0")
    # Tenant scope: t1 cannot see or retry t0's job.
    with pytest.raises(NotFoundError):
        await jobs.get_job(conn, t0_job["id"], tenant_id="t1")
    with pytest.raises(NotFoundError):
        await jobs.retry_job(conn, t0_job["id"], queue=Q, tenant_id="t1")
    # A retry while the conversation has a newer message: it goes behind it.
    await send_many(conn, [Message(tenant_id="t0", phone_number=phone(1), text="newer")])
    revived = await jobs.retry_job(conn, t0_job["id"], queue=Q, tenant_id="t0")
    assert revived["state"] == "waiting" and revived["attempts"] == 0 and not revived["is_head"]
    with pytest.raises(ValidationError):
        await jobs.retry_job(conn, t0_job["id"], queue=Q)  # not failed any more
    t = await (
        await conn.execute(
            "SELECT sum(failed) AS failed_total FROM pgqueue.tenant_totals WHERE tenant_id = 't0'"
        )
    ).fetchone()
    assert t["failed_total"] == 0
    assert await jobs.clean_failed(conn, queue=Q, tenant_id="t0") == 0
    assert await jobs.clean_failed(conn, queue=Q) == 1
    assert await jobs.list_jobs(conn, queue=Q, state="failed") == []
    with pytest.raises(ValidationError):
        await jobs.list_jobs(conn, queue=Q, state="lost")


async def _live(conn: Any, conversation: str) -> list[tuple[str, bool]]:
    cur = await conn.execute(
        "SELECT body, is_head FROM pgqueue.jobs WHERE conversation = %s ORDER BY seq",
        (conversation,),
    )
    return [(r["body"], r["is_head"]) for r in await cur.fetchall()]


async def test_cancel_takes_back_a_message_and_the_next_moves_up(
    db_url: str, conn: Any, tmp_path: Path
) -> None:
    await add_tenants(conn, 2)
    done = await send_many(
        conn, [Message(tenant_id="t0", phone_number=phone(1), text=t) for t in "abcd"]
    )
    a, b, c, d = (e.job_id for e in done)
    conversation = f"t0:{phone(1)}"
    with pytest.raises(NotFoundError):  # another tenant's job is not found
        await jobs.cancel_job(conn, a, queue=Q, tenant_id="t1")
    with pytest.raises(NotFoundError):  # nor one of another queue
        await jobs.cancel_job(conn, a, queue="other-queue")
    assert (await jobs.cancel_job(conn, b, queue=Q, tenant_id="t0"))["body_preview"] == "b"
    assert await _live(conn, conversation) == [("a", True), ("c", False), ("d", False)]
    await jobs.cancel_job(conn, a, queue=Q)  # the head: c moves up
    assert await _live(conn, conversation) == [("c", True), ("d", False)]
    pending = await (
        await conn.execute(
            "SELECT pending FROM pgqueue.conversations WHERE conversation = %s", (conversation,)
        )
    ).fetchone()
    assert pending["pending"] == 2
    with pytest.raises(NotFoundError):
        await jobs.cancel_job(conn, a, queue=Q)  # gone

    # Being sent: refused, and the send goes on.
    worker = await connect(db_url, application_name="pgqueue-worker:cancel")
    claimed = await queries.claim_jobs(
        worker, queue=Q, worker_id="cancel", max_jobs=5, lease_s=60, lookahead_s=5
    )
    assert [r["id"] for r in claimed] == [c]
    with pytest.raises(ValidationError) as refused:
        await jobs.cancel_job(conn, c, queue=Q)
    assert refused.value.code == "not_cancelable" and "active" in refused.value.message
    # The statement itself refuses too (a claim may win the race after the state check).
    row = await queries.fetch_one(conn, "cancel_job", {"id": c, "queue": Q, "tenant_id": None})
    assert row is not None and row["state"] == "active" and not row["canceled"]
    await worker.close()  # its process dies: the rescuer gives c back

    record = tmp_path / "sends.jsonl"
    async with running_worker(db_url, record):
        await wait_until_drained(conn, 20)
    sent = [s.body for s in read_sends(record) if s.outcome == "ok"]
    assert sent == ["c", "d"]  # a and b never went out; c before d
    with pytest.raises(ValidationError) as finished:
        await jobs.cancel_job(conn, d, queue=Q)
    assert finished.value.code == "not_cancelable" and "completed" in finished.value.message


async def test_a_cancel_meeting_a_held_job_row_refuses_at_once(db_url: str, conn: Any) -> None:
    """A job row somebody else holds is being claimed or completed: the cancel, which
    already holds the conversation row that a completion takes after its job rows,
    refuses instead of waiting (waiting could deadlock)."""
    await add_tenants(conn, 1)
    done = await send_many(conn, [Message(tenant_id="t0", phone_number=phone(1), text="a")])
    holder = await connect(db_url)
    await holder.execute("BEGIN")
    await holder.execute("SELECT 1 FROM pgqueue.jobs WHERE id = %s FOR UPDATE", (done[0].job_id,))
    try:
        with pytest.raises(ValidationError) as refused:
            async with asyncio.timeout(3):
                await jobs.cancel_job(conn, done[0].job_id, queue=Q)
        assert refused.value.code == "not_cancelable"
    finally:
        await holder.execute("ROLLBACK")
        await holder.close()
    await jobs.cancel_job(conn, done[0].job_id, queue=Q)  # free again: canceled


async def test_cancels_racing_a_running_worker_keep_fifo_and_never_send_a_canceled_job(
    db_url: str, conn: Any, tmp_path: Path
) -> None:
    """Cancels lock the conversation before the job, as enqueue and completion do: no
    deadlock with a worker promoting the job being canceled, and a cancel that returns
    means the message is never sent."""
    await add_tenants(conn, 3)
    messages = [
        Message(tenant_id=f"t{k % 3}", phone_number=phone(k), text=f"{k}:{i}")
        for i in range(8)
        for k in range(9)
    ]
    done = await send_many(conn, messages)
    ids = [e.job_id for e in done]
    rng = random.Random(7)
    record = tmp_path / "sends.jsonl"
    canceled: set[str] = set()
    refused = 0
    async with running_worker(db_url, record, latency=(0.005, 0.02)):
        for job_id in rng.sample(ids, len(ids) // 2):
            try:
                job = await jobs.cancel_job(conn, job_id, queue=Q)
                canceled.add(job["body_preview"])
            except ValidationError:
                refused += 1  # already being sent or sent
            await asyncio.sleep(rng.uniform(0, 0.01))
        await wait_until_drained(conn, 30)
    sends = [s for s in read_sends(record) if s.outcome == "ok"]
    sent = [s.body for s in sends]
    assert canceled and not canceled & set(sent)
    assert len(sent) == len(ids) - len(canceled)
    for k in range(9):  # each conversation still in enqueue order
        order = [int(b.split(":")[1]) for b in sent if b.startswith(f"{k}:")]
        assert order == sorted(order)
    left = await (await conn.execute("SELECT count(*) AS n FROM pgqueue.jobs")).fetchone()
    assert left["n"] == 0
