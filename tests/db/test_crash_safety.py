"""G8/G9 against a real PostgreSQL: rescue of orphaned jobs, fencing, SIGKILL, SIGTERM."""

from __future__ import annotations

import asyncio
import itertools
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgqueue import queries
from pgqueue.db import connect, make_pool
from pgqueue.maintenance import Rescuer
from pgqueue.models import Message
from tests.support.helpers import REPO, add_tenants, phone, send, send_many, wait_until_drained
from tests.support.recording import max_overlap, read_sends


async def q(conn: Any, query: str, *params: Any) -> list[dict[str, Any]]:
    cur = await conn.execute(query, params)
    return await cur.fetchall()


async def slots_taken(conn: Any) -> tuple[int, int]:
    """Sends in flight of tenant t0 and of the queue, as claims count them (G2, G3)."""
    tenants = await queries.fetch_all(conn, "tenant_in_flight", {"queue": "whatsapp-send"})
    queue = await queries.fetch_one(conn, "api_queue_state", {"queue": "whatsapp-send"})
    assert queue is not None
    return next(t["active"] for t in tenants if t["id"] == "t0"), queue["in_flight"]


async def claim_as(url: str, worker_id: str, n: int = 5) -> tuple[Any, list[dict[str, Any]]]:
    conn = await connect(url, application_name=f"pgqueue-worker:{worker_id}")
    rows = await queries.claim_jobs(
        conn, queue="whatsapp-send", worker_id=worker_id, max_jobs=n, lease_s=60, lookahead_s=5
    )
    return conn, rows


async def test_job_of_a_dead_worker_is_rescued_at_once(db_url: str, conn: Any, pool: Any) -> None:
    await add_tenants(conn, 1)
    await send(conn, "t0", 1, text="first")
    await send(conn, "t0", 1, text="second")
    dead, claimed = await claim_as(db_url, "dead-1")
    alive, claimed_alive = await claim_as(db_url, "alive-1")
    assert [r["body"] for r in claimed] == ["first"] and claimed[0]["locked"]
    assert claimed_alive == []  # its conversation is busy: "second" is not a head
    rescuer = Rescuer(pool, queue="whatsapp-send", grace_s=0)
    assert (await rescuer.run_once()).rescued == 0  # the owner lives: nothing to do
    await dead.close()  # the process died: its connection and locks are gone
    await asyncio.sleep(0.1)
    report = await rescuer.run_once()
    assert report.rescued == 1
    job = (
        await q(
            conn,
            "SELECT state, is_head, attempts, last_error_code, claim_token "
            "FROM pgqueue.jobs WHERE body = 'first'",
        )
    )[0]
    assert (job["state"], job["is_head"], job["attempts"], job["last_error_code"]) == (
        "waiting",
        True,
        1,
        "worker-lost",
    )
    assert job["claim_token"] is None
    assert await slots_taken(conn) == (0, 0)
    # The retried job goes again, before "second" (G1 across retries).
    await alive.close()
    again_conn, again = await claim_as(db_url, "alive-2")
    assert [r["body"] for r in again] == ["first"] and again[0]["attempts"] == 2
    await again_conn.close()


async def test_grace_after_restart_protects_live_workers(db_url: str, conn: Any, pool: Any) -> None:
    await add_tenants(conn, 1)
    await send(conn, "t0", 1)
    dead, _ = await claim_as(db_url, "dead-2")
    await dead.close()
    # A huge grace stands for "the server started moments ago": nothing is rescued yet.
    assert (await Rescuer(pool, queue="whatsapp-send", grace_s=10**9).run_once()).rescued == 0
    assert (await Rescuer(pool, queue="whatsapp-send", grace_s=0).run_once()).rescued == 1


async def test_late_completion_after_rescue_is_fenced(db_url: str, conn: Any, pool: Any) -> None:
    await add_tenants(conn, 1)
    await send(conn, "t0", 1)
    late, rows = await claim_as(db_url, "slow-1")
    await conn.execute("UPDATE pgqueue.jobs SET lease_expires_at = now() - interval '1 second'")
    assert (await Rescuer(pool, queue="whatsapp-send", grace_s=0).run_once()).rescued == 1
    new_owner, rows2 = await claim_as(db_url, "fast-1")
    # The wedged worker still holds the conversation lock: the new claim must not send.
    assert rows2 and not rows2[0]["locked"]
    applied = await queries.complete_jobs(
        late,
        queue="whatsapp-send",
        outcomes=[
            {
                "id": rows[0]["id"],
                "token": rows[0]["claim_token"],
                "outcome": "completed",
                "sid": "SMlate",
            }
        ],
        conversations=[rows[0]["conversation"]],
    )
    assert applied == []  # the old token no longer owns the job
    job = (await q(conn, "SELECT state, claim_token, provider_sid FROM pgqueue.jobs"))[0]
    assert job["state"] == "active" and job["claim_token"] == rows2[0]["claim_token"]
    assert job["provider_sid"] is None
    assert await slots_taken(conn) == (1, 1)
    await late.close()
    await new_owner.close()


def start_worker(url: str, record: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.support.worker_harness",
            "--url",
            url,
            "--record",
            str(record),
            *extra,
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def test_sigkill_mid_send_frees_everything_within_a_second(
    db_url: str, conn: Any, tmp_path: Path
) -> None:
    await add_tenants(conn, 1)
    await send(conn, "t0", 1, text="slow one")
    await send(conn, "t0", 1, text="next in conversation")
    record = tmp_path / "r.jsonl"
    victim = start_worker(db_url, record, "--latency", "30", "30", "--grace", "0")
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not read_sends(record):
            await asyncio.sleep(0.05)
        assert read_sends(record), "the worker never started the send"
        assert await slots_taken(conn) == (1, 1)
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    killed_at = time.monotonic()
    rescuer_pool = make_pool(db_url)
    await rescuer_pool.open()
    try:
        rescuer = Rescuer(rescuer_pool, queue="whatsapp-send", grace_s=0)
        while (await rescuer.run_once()).rescued == 0:
            assert time.monotonic() - killed_at < 1.0
            await asyncio.sleep(0.05)
    finally:
        await rescuer_pool.close()
    assert time.monotonic() - killed_at < 1.0
    assert await slots_taken(conn) == (0, 0)
    assert not (await q(conn, "SELECT 1 FROM pgqueue.jobs WHERE state = 'active'"))
    # A fresh worker sends it again, then the next one: nothing lost.
    record2 = tmp_path / "r2.jsonl"
    w = start_worker(db_url, record2)
    try:
        await wait_until_drained(conn, 30)
    finally:
        w.send_signal(signal.SIGTERM)
        assert w.wait(30) == 0
    assert [s.body for s in read_sends(record2)] == ["slow one", "next in conversation"]


async def test_sigterm_drains_in_flight_sends(db_url: str, conn: Any, tmp_path: Path) -> None:
    await add_tenants(conn, 4)
    await send_many(
        conn,
        [Message(tenant_id=f"t{i % 4}", phone_number=phone(i), text=f"m{i}") for i in range(40)],
    )
    record = tmp_path / "r.jsonl"
    w = start_worker(db_url, record, "--latency", "0.4", "0.6")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(read_sends(record)) < 5:
        await asyncio.sleep(0.05)
    w.send_signal(signal.SIGTERM)
    assert w.wait(30) == 0
    sends = read_sends(record)
    assert sends and all(s.outcome == "ok" for s in sends)  # none cut short
    done = await q(conn, "SELECT count(*) AS n FROM pgqueue.job_history WHERE state = 'completed'")
    assert done[0]["n"] == len(sends)  # every finished send was written: none re-sent
    assert not await q(conn, "SELECT 1 FROM pgqueue.jobs WHERE state = 'active'")
    left = await q(conn, "SELECT count(*) AS n FROM pgqueue.jobs")
    assert left[0]["n"] == 40 - len(sends)
    assert max_overlap(sends) <= 20


async def test_worker_waits_for_an_unreachable_database_and_stops_cleanly() -> None:
    import socket

    from pgqueue.config import Settings
    from pgqueue.worker import Worker

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = Worker(Settings(), f"postgresql://postgres@127.0.0.1:{port}/x?connect_timeout=1")
    task = asyncio.create_task(worker.run())
    await asyncio.sleep(1.5)
    assert not task.done()  # still trying, not crashed
    worker.stop.set()
    assert await asyncio.wait_for(task, 10) == 0


async def held_locks(conn: Any, backend_pid: int) -> int:
    rows = await q(
        conn,
        "SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' AND granted AND pid = %s",
        backend_pid,
    )
    return int(rows[0]["n"])


async def test_a_turn_completes_a_head_and_claims_its_successor_under_one_lock(
    db_url: str, conn: Any
) -> None:
    """The dispatcher's turn writes an outcome, promotes the next message, claims it and
    drops the finished send's lock in one transaction. Session locks count: the
    conversation must stay locked while its new head is in flight, and be free after."""
    await add_tenants(conn, 1)
    await send(conn, "t0", 1, text="first")
    await send(conn, "t0", 1, text="second")
    worker, claimed = await claim_as(db_url, "turns-1")
    pid = worker.info.backend_pid
    assert [r["body"] for r in claimed] == ["first"] and claimed[0]["locked"]
    first = claimed[0]
    claim = queries.Claim("turns-1", max_jobs=5, lease_s=60, lookahead_s=5)
    done = queries.Outcomes(
        [{"id": first["id"], "token": first["claim_token"], "outcome": "completed", "sid": "SM1"}],
        [first["conversation"]],
    )
    turn = await queries.cycle(
        worker, queue="whatsapp-send", outcomes=done, release=[first["lock_key"]], claim=claim
    )
    assert [r["id"] for r in turn.applied] == [first["id"]]
    assert [r["body"] for r in turn.claimed] == ["second"] and turn.claimed[0]["locked"]
    assert await held_locks(conn, pid) == 1  # the conversation is still held, once
    second = turn.claimed[0]
    done = queries.Outcomes(
        [
            {
                "id": second["id"],
                "token": second["claim_token"],
                "outcome": "completed",
                "sid": "SM2",
            }
        ],
        [second["conversation"]],
    )
    turn = await queries.cycle(
        worker, queue="whatsapp-send", outcomes=done, release=[second["lock_key"]], claim=claim
    )
    assert turn.claimed == [] and await held_locks(conn, pid) == 0
    counts = await q(conn, "SELECT sum(completed) AS completed FROM pgqueue.tenant_totals")
    assert await slots_taken(conn) == (0, 0) and counts[0]["completed"] == 2
    await worker.close()


async def test_the_queue_lock_is_released_while_the_worker_still_works_on_its_turn(
    db_url: str, conn: Any
) -> None:
    """Every worker's turn waits for the queue lock, so a turn holds it only while the
    server works: its COMMIT is sent before the worker's own work (the job log) starts."""
    await add_tenants(conn, 1)
    await send(conn, "t0", 1)
    worker = await connect(db_url, application_name="pgqueue-worker:lock-hold")
    other = psycopg.connect(db_url, autocommit=True)
    waited: list[float] = []

    def meanwhile() -> None:
        # Blocks this event loop, as a slow log write or a CPU-starved process would.
        started = time.monotonic()
        while time.monotonic() - started < 2.0:
            try:
                with other.transaction():
                    other.execute(
                        "SELECT 1 FROM pgqueue.queues WHERE name = 'whatsapp-send' "
                        "FOR UPDATE NOWAIT"
                    )
                break
            except psycopg.errors.LockNotAvailable:
                time.sleep(0.005)
        waited.append(time.monotonic() - started)

    try:
        claim = queries.Claim("lock-hold", max_jobs=5, lease_s=60, lookahead_s=5)
        turn = await queries.cycle(worker, queue="whatsapp-send", claim=claim, on_sent=meanwhile)
        assert len(turn.claimed) == 1
        assert waited and waited[0] < 1.0, f"queue lock held for {waited[0]:.2f} s"
    finally:
        other.close()
        await worker.close()


async def test_outcomes_are_written_while_a_claim_holds_the_queue_lock(
    db_url: str, conn: Any
) -> None:
    """A completion changes no row a claim writes (sends in flight are counted, not kept
    in counters), so a worker's completer neither takes nor waits for the queue lock:
    outcomes are written, and the next message promoted, beside another worker's claim."""
    await add_tenants(conn, 1)
    await send(conn, "t0", 1, text="first")
    await send(conn, "t0", 1, text="second")
    worker, claimed = await claim_as(db_url, "beside-1")
    completer = await connect(db_url, application_name="pgqueue-worker:beside-1:completer")
    claimer = await connect(db_url)
    await claimer.execute("BEGIN")
    await claimer.execute(queries.sql("lock_queue"), {"queue": "whatsapp-send"})
    try:
        done = queries.Outcomes(
            [{"id": claimed[0]["id"], "token": claimed[0]["claim_token"], "outcome": "completed"}],
            [claimed[0]["conversation"]],
        )
        async with asyncio.timeout(5):
            turn = await queries.cycle(
                completer, queue="whatsapp-send", outcomes=done, notify="beside-1", lock=False
            )
        assert [r["id"] for r in turn.applied] == [claimed[0]["id"]]
        head = await q(conn, "SELECT body FROM pgqueue.jobs WHERE is_head")
        assert [r["body"] for r in head] == ["second"]
        # The queue lock is still the claimer's.
        with pytest.raises(psycopg.errors.LockNotAvailable):
            await conn.execute("SELECT 1 FROM pgqueue.queues FOR UPDATE NOWAIT")
    finally:
        await claimer.execute("ROLLBACK")
        for c in (claimer, completer, worker):
            await c.close()
    totals = await q(conn, "SELECT sum(completed) AS completed FROM pgqueue.tenant_totals")
    assert totals[0]["completed"] == 1


async def test_a_failed_turn_is_rolled_back_and_the_next_one_runs(db_url: str, conn: Any) -> None:
    await add_tenants(conn, 1)
    await send(conn, "t0", 1)
    worker, claimed = await claim_as(db_url, "failing-1")
    bad = queries.Outcomes(
        [{"id": claimed[0]["id"], "token": "not-a-uuid", "outcome": "completed"}]
    )
    with pytest.raises(psycopg.errors.InvalidTextRepresentation):
        await queries.cycle(worker, queue="whatsapp-send", outcomes=bad)
    assert worker.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    # Nothing of it stayed: the queue row is free and the job still ours and active.
    await conn.execute("SELECT 1 FROM pgqueue.queues FOR UPDATE NOWAIT")
    job = (await q(conn, "SELECT state FROM pgqueue.jobs WHERE id = %s", claimed[0]["id"]))[0]
    assert job["state"] == "active"
    good = queries.Outcomes(
        [{"id": claimed[0]["id"], "token": claimed[0]["claim_token"], "outcome": "completed"}],
        [claimed[0]["conversation"]],
    )
    turn = await queries.cycle(worker, queue="whatsapp-send", outcomes=good)
    assert [r["id"] for r in turn.applied] == [claimed[0]["id"]]
    await worker.close()


async def test_missed_slots_are_replaced_by_consecutive_new_ones(conn: Any) -> None:
    await conn.execute("UPDATE pgqueue.queues SET rate_per_second = 10, rate_tat = now()")
    spacing = 1 / (10 * queries.RATE_HEADROOM)
    slots = await queries.reslot(conn, queue="whatsapp-send", tenants=["t0"] * 3)
    assert len(slots) == 3 and slots[0] >= time.time() - 1
    gaps = [b - a for a, b in itertools.pairwise(slots)]
    assert gaps == pytest.approx([spacing] * 2, abs=1e-5)
    # The next ones start after those three: no slot is handed out twice.
    later = await queries.reslot(conn, queue="whatsapp-send", tenants=["t0"])
    assert later[0] >= slots[2] + spacing - 1e-6


async def test_lateness_is_forgiven_only_where_it_cannot_break_the_rate(
    db_url: str, conn: Any
) -> None:
    """A late start bunches with later slots; that can only put R + 1 starts into a
    second while h * R + 1 + G > R (G late jobs at most: the ones in flight)."""
    await add_tenants(conn, 1)
    for to in range(4):
        await send(conn, "t0", to)
    seen = {}
    for rate in (80, 900, 1000, 1_000_000):
        await conn.execute(
            "UPDATE pgqueue.queues SET rate_per_second = %s, global_concurrency = 20", (rate,)
        )
        worker, rows = await claim_as(db_url, f"late-{rate}", n=1)
        seen[rate] = rows[0]["late_ok"]
        await worker.close()  # the job stays active; the next claim takes another head
    assert seen == {80: False, 900: False, 1000: True, 1_000_000: True}
