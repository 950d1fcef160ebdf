"""The claim at platform scale: it reads only tenants that have work, picks in the order
it would give over every tenant (G5, G6), and paces a tenant with a rate of its own as
exactly as the queue (G4)."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import random
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pgqueue import admin, queries
from pgqueue.db import connect
from pgqueue.dispatcher import Dispatcher, DispatcherConfig
from pgqueue.maintenance import Maintenance
from pgqueue.models import Message
from tests.support.helpers import (
    ACCOUNT,
    add_tenants,
    phone,
    running_worker,
    send,
    send_many,
    wait_until_drained,
)
from tests.support.recording import read_sends

QUEUE = "whatsapp-send"
H = queries.RATE_HEADROOM


async def q(conn: Any, query: str, *params: Any) -> list[dict[str, Any]]:
    cur = await conn.execute(query, params)
    return await cur.fetchall()


async def lift_limits(conn: Any, *, rate: float = 1e6) -> None:
    await conn.execute(
        "UPDATE pgqueue.queues SET global_concurrency = 100000, tenant_concurrency = 100000, "
        "rate_per_second = %s, rate_tat = now()",
        (rate,),
    )


async def register_idle(conn: Any, n: int) -> None:
    await conn.execute(
        "INSERT INTO pgqueue.tenants (id, name, account_sid, auth_token, whatsapp_from) "
        "SELECT 'idle' || i, 'idle' || i, %s, 'x', '+14155550100' FROM generate_series(1, %s) i",
        (ACCOUNT, n),
    )


async def heads_without_ready_row(conn: Any) -> list[dict[str, Any]]:
    """The invariant claims rely on: every waiting head has its tenant's row."""
    return await q(
        conn,
        "SELECT j.id, j.tenant_id, j.priority FROM pgqueue.jobs j "
        "WHERE j.is_head AND j.state = 'waiting' AND NOT EXISTS ("
        "SELECT 1 FROM pgqueue.ready_tenants r WHERE r.queue = j.queue "
        "AND r.tenant_id = j.tenant_id AND r.priority = j.priority)",
    )


async def _claim(conn: Any, n: int, lookahead: float, worker: str = "probe") -> list[Any]:
    params = {
        "queue": QUEUE,
        "worker_id": worker,
        "max_jobs": n,
        "lease": 60,
        "lookahead": lookahead,
        "headroom": H,
        "margin": queries.SLOT_MARGIN_S,
        "answered": [],
    }
    cur = await conn.execute(queries.sql("claim_jobs"), params)
    return await cur.fetchall()


async def probe_claim(url: str, n: int, lookahead: float = 0.05) -> tuple[list[Any], int]:
    """A claim as a worker makes it (generic plans), rolled back, and how many rows of
    pgqueue.tenants it read."""
    conn = await connect(url, application_name="pgqueue-worker:probe", generic_plans=True)
    try:
        await conn.execute("BEGIN")
        await conn.execute(queries.sql("lock_queue"), {"queue": QUEUE})
        rows = await _claim(conn, n, lookahead)
        stats = await q(
            conn,
            "SELECT seq_tup_read + coalesce(idx_tup_fetch, 0) AS n "
            "FROM pg_stat_xact_user_tables WHERE relid = 'pgqueue.tenants'::regclass",
        )
        await conn.execute("ROLLBACK")
        return rows, int(stats[0]["n"]) if stats else 0
    finally:
        await conn.close()


async def test_a_claim_reads_no_tenant_without_work(db_url: str, conn: Any) -> None:
    await add_tenants(conn, 3)
    await send_many(
        conn,
        [Message(tenant_id=f"t{i % 3}", phone_number=phone(i), text="x") for i in range(30)],
    )
    await register_idle(conn, 3000)
    await lift_limits(conn)
    await conn.execute("ANALYZE")
    rows, read = await probe_claim(db_url, 20)
    assert len(rows) == 20
    # What the claim reads of pgqueue.tenants follows the jobs it hands out (a few reads
    # each: 60 here), not the 3,000 tenants without work, which walking would read.
    assert read <= 5 * len(rows), f"the claim read {read} rows of pgqueue.tenants"


async def test_the_claim_picks_what_the_order_over_every_tenant_picks(
    db_url: str, conn: Any
) -> None:
    """A model of G5/G6 over every tenant, against the claim that reads only the front of
    ready_tenants: the same jobs, for every claim size, for random loads, priorities,
    pauses and service times."""
    rng = random.Random(7)
    await lift_limits(conn)
    await conn.execute("UPDATE pgqueue.queues SET tenant_concurrency = 4")
    tenants = await add_tenants(conn, 120)
    base = datetime.now(UTC) - timedelta(hours=1)
    to = itertools.count()
    for t in tenants:
        for _ in range(rng.randrange(0, 4)):
            await send(conn, t, next(to), priority=rng.choice([0, 0, 0, 5, 10]))
    heads = await q(conn, "SELECT id, tenant_id FROM pgqueue.jobs WHERE is_head")
    for h in rng.sample(heads, len(heads) // 4):  # in flight already
        await conn.execute(
            "UPDATE pgqueue.jobs SET state = 'active', claim_token = gen_random_uuid() "
            "WHERE id = %s",
            (h["id"],),
        )
    for t in tenants:
        served = None if rng.random() < 0.2 else base + timedelta(seconds=rng.randrange(3600))
        await conn.execute(
            "UPDATE pgqueue.tenants SET last_served_at = %s, paused = %s, max_concurrency = %s "
            "WHERE id = %s",
            (served, rng.random() < 0.1, rng.choice([None, 1, 2, 3]), t),
        )
        await conn.execute(
            "UPDATE pgqueue.ready_tenants SET served_at = %s WHERE tenant_id = %s", (served, t)
        )
    trows = {r["id"]: r for r in await q(conn, "SELECT * FROM pgqueue.tenants")}
    jobs = await q(conn, "SELECT id, tenant_id, priority, seq, state, is_head FROM pgqueue.jobs")
    keys = []
    for t, row in trows.items():
        if row["paused"]:
            continue
        active = sum(1 for j in jobs if j["tenant_id"] == t and j["state"] == "active")
        free = (row["max_concurrency"] or 4) - active
        mine = sorted(
            (j for j in jobs if j["tenant_id"] == t and j["is_head"] and j["state"] == "waiting"),
            key=lambda j: (-j["priority"], j["seq"]),
        )[: max(free, 0)]
        served = row["last_served_at"]
        for k, j in enumerate(mine, 1):
            order = (served is not None, served or base, t)
            keys.append(((-j["priority"], active + k, *order, j["seq"]), j["id"]))
    keys.sort()
    for n in (1, 3, 7, 20, 60):
        rows, _ = await probe_claim(db_url, n)
        assert sorted(r["id"] for r in rows) == sorted(i for _, i in keys[:n]), n


async def test_ready_rows_follow_every_way_a_head_becomes_waiting(db_url: str, conn: Any) -> None:
    await add_tenants(conn, 2)
    worker = await connect(db_url, application_name="pgqueue-worker:w", generic_plans=True)
    claim = queries.Claim(worker_id="w", max_jobs=10, lease_s=60, lookahead_s=0.05)

    async def rows() -> set[tuple[str, int, bool]]:
        found = await q(conn, "SELECT tenant_id, priority, drained FROM pgqueue.ready_tenants")
        return {(r["tenant_id"], r["priority"], r["drained"]) for r in found}

    try:
        await send(conn, "t0", 1, text="a")
        await send(conn, "t0", 1, text="b")
        later = datetime.now(UTC) + timedelta(hours=1)
        await send(conn, "t1", 2, text="later", send_at=later)
        assert await rows() == {("t0", 0, False)}  # a delayed head is not ready
        first = await queries.cycle(worker, queue=QUEUE, claim=claim)
        assert [r["body"] for r in first.claimed] == ["a"]
        assert await rows() == set()  # its last waiting head taken: pruned at the turn's end
        done = queries.Outcomes(
            [{"id": first.claimed[0]["id"], "token": first.claimed[0]["claim_token"],
              "outcome": "completed"}],
            [first.claimed[0]["conversation"]],
        )  # fmt: skip
        await queries.cycle(worker, queue=QUEUE, outcomes=done, lock=False)
        assert await rows() == {("t0", 0, False)}  # "b" promoted
        await conn.execute("UPDATE pgqueue.jobs SET run_at = now() WHERE tenant_id = 't1'")
        second = await queries.cycle(worker, queue=QUEUE, claim=claim)
        # Woken when due, then claimed in the same turn with "b".
        assert sorted(r["body"] for r in second.claimed) == ["b", "later"]
        retry = queries.Outcomes(
            [{"id": r["id"], "token": r["claim_token"], "outcome": "retry",
              "delay": 3600 if r["body"] == "later" else 0} for r in second.claimed],
        )  # fmt: skip
        await queries.cycle(worker, queue=QUEUE, outcomes=retry, lock=False)
        assert await rows() == {("t0", 0, False)}  # retried now: ready; in an hour: not
        b = (await q(conn, "SELECT id FROM pgqueue.jobs WHERE body = 'b'"))[0]["id"]
        await send(conn, "t0", 3, text="c", priority=5)
        assert await rows() == {("t0", 0, False), ("t0", 5, False)}
        await conn.execute("BEGIN")
        await queries.fetch_all(conn, "lock_job_conversation", {"id": b, "queue": QUEUE,
                                                                "tenant_id": None})  # fmt: skip
        cancel = {"id": b, "queue": QUEUE, "tenant_id": None}
        assert (await queries.fetch_one(conn, "cancel_job", cancel) or {})["canceled"]
        await conn.execute("COMMIT")
        assert await rows() == {("t0", 0, True), ("t0", 5, False)}
        third = await queries.cycle(worker, queue=QUEUE, claim=claim)
        assert [r["body"] for r in third.claimed] == ["c"]
        assert await rows() == set()
        assert await heads_without_ready_row(conn) == []
    finally:
        await worker.close()


async def test_enqueues_racing_claims_leave_no_head_behind(db_url: str, conn: Any) -> None:
    """New heads committed while a claim prunes the tenant's row: none may lose it."""
    await add_tenants(conn, 1)
    await lift_limits(conn)
    worker = await connect(db_url, application_name="pgqueue-worker:w", generic_plans=True)
    claim = queries.Claim(worker_id="w", max_jobs=3, lease_s=60, lookahead_s=0.05)
    total = 4 * 60
    sent = 0

    async def enqueue(k: int) -> None:
        c = await connect(db_url)
        try:
            for i in range(60):
                await send(c, "t0", k * 1000 + i)
        finally:
            await c.close()

    enqueuers = asyncio.gather(*(enqueue(k) for k in range(4)))
    try:
        deadline = asyncio.get_running_loop().time() + 60
        while sent < total and asyncio.get_running_loop().time() < deadline:
            turn = await queries.cycle(worker, queue=QUEUE, claim=claim)
            if turn.claimed:
                done = queries.Outcomes(
                    [{"id": r["id"], "token": r["claim_token"], "outcome": "completed"}
                     for r in turn.claimed],
                    sorted({r["conversation"] for r in turn.claimed}),
                )  # fmt: skip
                await queries.cycle(worker, queue=QUEUE, outcomes=done, lock=False)
                sent += len(turn.claimed)
            else:
                await asyncio.sleep(0.001)
        await enqueuers
        assert sent == total, f"{total - sent} heads were never claimed"
        assert await heads_without_ready_row(conn) == []
    finally:
        await worker.close()


# -- a tenant's own rate ---------------------------------------------------------------


def gaps(starts: list[datetime]) -> list[float]:
    return [(b - a).total_seconds() for a, b in itertools.pairwise(sorted(starts))]


async def test_queue_slots_fill_gaps_and_stay_a_spacing_apart(conn: Any) -> None:
    # G4 holds for any set of starts a spacing apart, in whatever order they are given:
    # random booked slots, random jobs (some of tenants with rates of their own).
    rng = random.Random(7)
    for _ in range(30):
        spacing = rng.choice([0.01, 0.1, 1.0])
        booked = sorted({rng.randrange(0, 40) * spacing / 2 for _ in range(rng.randrange(8))})
        booked = [b for i, b in enumerate(booked) if i == 0 or b - booked[i - 1] >= spacing]
        n = rng.randrange(1, 12)
        tenants = [rng.choice(["a", "b", None]) for _ in range(n)]
        last: dict[str, int] = {}
        prev: list[int | None] = []
        for i, t in enumerate(tenants, start=1):
            prev.append(last.get(t) if t else None)
            if t:
                last[t] = i
        # One base per tenant, as claims give it (its rate_tat, or the margin ahead).
        bases = {t: rng.randrange(0, 20) * spacing for t in ("a", "b")}
        base = [bases[t] if t else None for t in tenants]
        tenant_spacing = [3 * spacing if t else None for t in tenants]
        rows = await q(
            conn,
            "SELECT array(SELECT extract(epoch FROM x - 'epoch'::timestamptz)::float8 "
            "FROM unnest(pgqueue.pace_free('epoch'::timestamptz, %s, "
            "(SELECT coalesce(array_agg('epoch'::timestamptz + make_interval(secs => b)), "
            "'{}') FROM unnest(%s::float8[]) b), %s::int[], "
            "(SELECT array_agg('epoch'::timestamptz + make_interval(secs => b) ORDER BY o) "
            "FROM unnest(%s::float8[]) WITH ORDINALITY u(b, o)), %s::float8[])) x) AS s",
            spacing,
            booked,
            prev,
            base,
            tenant_spacing,
        )
        starts = rows[0]["s"]
        every = sorted(booked + starts)
        assert min((b - a for a, b in itertools.pairwise(every)), default=spacing) >= (
            spacing - 1e-6
        ), (booked, starts)
        for i, t in enumerate(tenants):
            if t:
                assert starts[i] >= bases[t] - 1e-6
                if prev[i] is not None:
                    assert starts[i] - starts[prev[i] - 1] >= 3 * spacing - 1e-6
    # The earliest gap is taken: between two booked slots two spacings apart, not after.
    rows = await q(
        conn,
        "SELECT array(SELECT extract(epoch FROM x - 'epoch'::timestamptz)::float8 FROM "
        "unnest(pgqueue.pace_free('epoch'::timestamptz, 1, ARRAY['epoch'::timestamptz, "
        "'epoch'::timestamptz + interval '2 s'], ARRAY[NULL]::int[], "
        "ARRAY[NULL]::timestamptz[], ARRAY[NULL]::float8[])) x) AS s",
    )
    assert rows[0]["s"] == [1.0]


async def test_a_senders_slot_near_now_is_not_held_behind_a_later_one(
    db_url: str, conn: Any
) -> None:
    # An earlier claim gave another sender a slot 0.3 s ahead: the queue's next slot in
    # sequence would come after it, but t0's own slot is due now and the queue's rate
    # has room before that one.
    await add_tenants(conn, 1)
    await lift_limits(conn, rate=100)
    await admin.set_tenant(conn, "t0", rate_per_second=10)
    await conn.execute(
        "UPDATE pgqueue.queues SET rate_tat = clock_timestamp() + interval '0.31 s', "
        "rate_booked = ARRAY[clock_timestamp() + interval '0.3 s']"
    )
    await send(conn, "t0", 1)
    worker = await connect(db_url, application_name="pgqueue-worker:w", generic_plans=True)
    try:
        claim = queries.Claim(worker_id="w", max_jobs=5, lease_s=60, lookahead_s=0.2)
        (job,) = (await queries.cycle(worker, queue=QUEUE, claim=claim)).claimed
        assert job["start_delay"] < 0.1, f"slot {job['start_delay']:.3f} s ahead"
    finally:
        await worker.close()


async def test_a_workers_answered_send_frees_its_place_for_its_claim(
    db_url: str, conn: Any
) -> None:
    # G2 counts sends in flight at the provider: once a worker has the answer, the
    # outcome still waiting for its completer must not hold the tenant's place in that
    # worker's claims; another worker's claim still counts it (it cannot know).
    await add_tenants(conn, 1)
    await lift_limits(conn)
    await admin.set_tenant(conn, "t0", max_concurrency=1)
    await send_many(
        conn, [Message(tenant_id="t0", phone_number=phone(i), text="x") for i in range(2)]
    )
    worker = await connect(db_url, application_name="pgqueue-worker:w", generic_plans=True)
    try:
        claim = queries.Claim(worker_id="w", max_jobs=5, lease_s=60, lookahead_s=0.2)
        (first,) = (await queries.cycle(worker, queue=QUEUE, claim=claim)).claimed
        assert (await queries.cycle(worker, queue=QUEUE, claim=claim)).claimed == []
        other = dataclasses.replace(claim, worker_id="w2")
        assert (await queries.cycle(worker, queue=QUEUE, claim=other)).claimed == []
        told = dataclasses.replace(claim, answered=[first["claim_token"]])
        turn = await queries.cycle(worker, queue=QUEUE, claim=told)
        assert [r["tenant_id"] for r in turn.claimed] == ["t0"]
        # The first is still active: its outcome is not yet written.
        rows = await q(conn, "SELECT state FROM pgqueue.jobs WHERE id = %s", first["id"])
        assert rows == [{"state": "active"}]
    finally:
        await worker.close()


async def test_a_claim_after_another_workers_answered_sends_hands_out_nothing(
    db_url: str, conn: Any
) -> None:
    # A worker that handed on the global place of its answered send leaves more active
    # jobs than the limit for every other worker's claim to count: those claim nothing
    # (G3), and must not fail (a negative count of free places).
    await add_tenants(conn, 2)
    await lift_limits(conn)
    await conn.execute("UPDATE pgqueue.queues SET global_concurrency = 1")
    await send_many(
        conn, [Message(tenant_id=f"t{i % 2}", phone_number=phone(i), text="x") for i in range(4)]
    )
    worker = await connect(db_url, application_name="pgqueue-worker:w", generic_plans=True)
    try:
        claim = queries.Claim(worker_id="w", max_jobs=5, lease_s=60, lookahead_s=0.2)
        (first,) = (await queries.cycle(worker, queue=QUEUE, claim=claim)).claimed
        told = dataclasses.replace(claim, answered=[first["claim_token"]])
        assert len((await queries.cycle(worker, queue=QUEUE, claim=told)).claimed) == 1
        other = dataclasses.replace(claim, worker_id="w2")
        for _ in range(2):
            assert (await queries.cycle(worker, queue=QUEUE, claim=other)).claimed == []
    finally:
        await worker.close()


async def test_a_fast_sender_gets_several_jobs_a_claim_at_its_own_pace(
    db_url: str, conn: Any
) -> None:
    await add_tenants(conn, 2)
    await lift_limits(conn, rate=1000)
    await admin.set_tenant(conn, "t0", rate_per_second=50)
    await send_many(
        conn,
        [
            Message(tenant_id=t, phone_number=phone(i), text="x")
            for i in range(40)
            for t in ("t0", "t1")
        ],
    )
    worker = await connect(db_url, application_name="pgqueue-worker:w", generic_plans=True)
    try:
        claim = queries.Claim(worker_id="w", max_jobs=60, lease_s=60, lookahead_s=0.2)
        first = (await queries.cycle(worker, queue=QUEUE, claim=claim)).claimed
        mine = [r["start_at"] for r in first if r["tenant_id"] == "t0"]
        # Its slots within the lookahead: one a margin ahead, then one every 1 / (h * 50) s.
        assert len(mine) == int((0.2 - queries.SLOT_MARGIN_S) * 50 * H) + 1
        assert min(gaps(mine)) >= 1 / (50 * H) - 1e-6
        assert max(gaps(mine)) <= 1 / (50 * H) + 2e-3
        # The queue's own pace holds for every start, the tenant's or not.
        assert min(gaps([r["start_at"] for r in first])) >= 1 / (1000 * H) - 1e-6
        later = queries.Claim(worker_id="w", max_jobs=60, lease_s=60, lookahead_s=1.0)
        second = (await queries.cycle(worker, queue=QUEUE, claim=later)).claimed
        again = [r["start_at"] for r in second if r["tenant_id"] == "t0"]
        assert again and min(again) >= max(mine) + timedelta(seconds=1 / (50 * H) - 1e-6)
        # A missed slot is taken again at the tenant's pace too.
        slots = await queries.reslot(worker, queue=QUEUE, tenants=["t0", "t1", "t0"])
        last = max(again).timestamp()
        assert slots[0] >= last + 1 / (50 * H) - 1e-6
        assert slots[2] - slots[0] >= 1 / (50 * H) - 1e-6
    finally:
        await worker.close()


async def test_missed_slots_of_several_senders_take_the_nearest_free_slots(
    db_url: str, conn: Any
) -> None:
    # Sends that miss their slots together share a reslot, in the order they missed:
    # two of each sender, interleaved. Each sender's second comes one spacing after its
    # first; no sender's second may hold the others back, nor the queue's next slot.
    await add_tenants(conn, 5)
    await lift_limits(conn, rate=1000)
    for t in range(5):
        await admin.set_tenant(conn, f"t{t}", rate_per_second=10)
    worker = await connect(db_url, application_name="pgqueue-worker:w", generic_plans=True)
    try:
        before = time.time()
        tenants = [f"t{t}" for t in range(5) for _ in range(2)]
        slots = await queries.reslot(worker, queue=QUEUE, tenants=tenants)
        spacing = 1 / (10 * H)
        for t in range(5):
            first, second = slots[2 * t], slots[2 * t + 1]
            assert second - first >= spacing - 1e-6
        latest = before + queries.SLOT_MARGIN_S + spacing + 0.05
        assert max(slots) <= latest, f"a slot {max(slots) - before:.3f} s ahead"
        rows = await q(
            conn, "SELECT extract(epoch FROM rate_tat)::float8 AS tat FROM pgqueue.queues"
        )
        assert rows[0]["tat"] <= latest + 1 / (1000 * H), "the queue's next slot held back"
    finally:
        await worker.close()


async def test_a_missed_slot_that_is_still_the_senders_last_is_taken_back(
    db_url: str, conn: Any
) -> None:
    # Nothing went out in a missed slot: when no later slot of its sender was handed out,
    # the job starts again as soon as it can, not a spacing after the slot it missed;
    # once a later slot was handed out, it goes after that one (G4b either way).
    await add_tenants(conn, 2)
    await lift_limits(conn, rate=1000)
    for t in ("t0", "t1"):
        await admin.set_tenant(conn, t, rate_per_second=2)
    await send_many(
        conn,
        [
            Message(tenant_id=t, phone_number=phone(i), text="x")
            for i in range(3)
            for t in ("t0", "t1")
        ],
    )
    spacing = 1 / (2 * H)
    worker = await connect(db_url, application_name="pgqueue-worker:w", generic_plans=True)
    try:
        # One slot of one sender (its last), two of the other (a spacing apart).
        one = queries.Claim(worker_id="w", max_jobs=1, lease_s=60, lookahead_s=0.05)
        (only,) = (await queries.cycle(worker, queue=QUEUE, claim=one)).claimed
        two = queries.Claim(worker_id="w", max_jobs=2, lease_s=60, lookahead_s=0.8)
        pair = (await queries.cycle(worker, queue=QUEUE, claim=two)).claimed
        assert {only["tenant_id"]} | {r["tenant_id"] for r in pair} == {"t0", "t1"}
        assert [r["tenant_id"] for r in pair] == [pair[0]["tenant_id"]] * 2
        alone, paired = only["tenant_id"], pair[0]["tenant_id"]
        await asyncio.sleep(queries.SLOT_MARGIN_S + 0.02)  # both first slots are missed
        missed = [only["start_at"].timestamp(), pair[0]["start_at"].timestamp()]
        before = time.time()
        back, after = await queries.reslot(
            worker, queue=QUEUE, tenants=[alone, paired], missed=missed
        )
        assert back - before <= queries.SLOT_MARGIN_S + 0.2, (
            f"the sender's last slot, missed, came back {back - missed[0]:.3f} s after it"
        )
        assert back >= missed[0]
        last = pair[1]["start_at"].timestamp()
        assert after >= last + spacing - 1e-6, "a missed slot taken back before a later one"
        rows = await q(
            conn,
            "SELECT id, extract(epoch FROM rate_tat)::float8 AS tat FROM pgqueue.tenants "
            "ORDER BY id",
        )
        tat = {r["id"]: r["tat"] for r in rows}
        assert abs(tat[alone] - (back + spacing)) < 1e-5
        assert abs(tat[paired] - (after + spacing)) < 1e-5
    finally:
        await worker.close()


async def test_a_rate_lifted_past_a_microsecond_spacing_keeps_claiming(
    db_url: str, conn: Any
) -> None:
    # At 1e9/s a slot's spacing rounds to no time at all, so a slot of now is no longer
    # near a new one: the queue's list of booked slots must stay a list, not NULL.
    await add_tenants(conn, 2)
    await lift_limits(conn, rate=1e9)
    await send_many(
        conn, [Message(tenant_id=f"t{i % 2}", phone_number=phone(i), text="x") for i in range(8)]
    )
    worker = await connect(db_url, application_name="pgqueue-worker:w", generic_plans=True)
    try:
        claim = queries.Claim(worker_id="w", max_jobs=1, lease_s=60, lookahead_s=0.2)
        claimed = 0
        for _ in range(8):
            claimed += len((await queries.cycle(worker, queue=QUEUE, claim=claim)).claimed)
        assert claimed == 8
        assert await queries.reslot(worker, queue=QUEUE, tenants=["t0", "t1"])
        rows = await q(conn, "SELECT rate_booked IS NOT NULL AS listed FROM pgqueue.queues")
        assert rows == [{"listed": True}]
    finally:
        await worker.close()


async def test_a_reslot_that_waits_for_a_claim_paces_after_the_claims_slots(
    db_url: str, conn: Any
) -> None:
    # A single statement reads with the snapshot it took before it waited for the queue
    # lock: a reslot queued behind a claim would pace from the tenant's slot as it was
    # before that claim, and hand out a slot next to one the claim gave (G4b).
    await add_tenants(conn, 1)
    await lift_limits(conn, rate=1000)
    await admin.set_tenant(conn, "t0", rate_per_second=10)
    claimer = await connect(db_url, application_name="pgqueue-worker:a")
    missed = await connect(db_url, application_name="pgqueue-worker:b", generic_plans=True)
    try:
        await claimer.execute("BEGIN")
        await claimer.execute("SELECT 1 FROM pgqueue.queues WHERE name = %s FOR UPDATE", (QUEUE,))
        # What a claim of two t0 jobs, 0.3 s ahead, does to the tenant's row.
        await claimer.execute(
            "UPDATE pgqueue.tenants SET rate_tat = clock_timestamp() + interval '0.3 s' "
            "+ make_interval(secs => 1 / (10 * %s::float8)) WHERE id = 't0'",
            (H,),
        )
        reslot = asyncio.create_task(queries.reslot(missed, queue=QUEUE, tenants=["t0"]))
        for _ in range(100):
            waiting = await q(
                conn,
                "SELECT 1 FROM pg_stat_activity "
                "WHERE application_name = 'pgqueue-worker:b' AND wait_event_type = 'Lock'",
            )
            if waiting:
                break
            await asyncio.sleep(0.02)
        assert waiting, "the reslot never waited for the queue lock"
        cur = await claimer.execute(
            "SELECT extract(epoch FROM rate_tat)::float8 AS tat "
            "FROM pgqueue.tenants WHERE id = 't0'"
        )
        tat = (await cur.fetchone())["tat"]
        await claimer.execute("COMMIT")
        (slot,) = await asyncio.wait_for(reslot, 10)
        assert slot >= tat - 1e-6, f"reslot gave {tat - slot:.3f} s before the claim's next slot"
    finally:
        await claimer.close()
        await missed.close()


async def test_a_send_finished_between_paced_turns_is_written_before_the_next_turn(
    db_url: str, conn: Any, tmp_path: Path
) -> None:
    # A paced worker turns at most every paced_turn_gap_s. A send that finishes meanwhile
    # counts in flight for every other worker's claims until its outcome commits: its
    # lock is dropped and the completer writes it at once, not at the next turn.
    await add_tenants(conn, 1)
    await lift_limits(conn, rate=1000)
    await admin.set_tenant(conn, "t0", rate_per_second=1)
    await send_many(
        conn, [Message(tenant_id="t0", phone_number=phone(i), text="x") for i in range(2)]
    )
    gap = 3.0
    async with running_worker(
        db_url, tmp_path / "sends.jsonl", latency=(0.05, 0.05), paced_turn_gap_s=gap
    ):
        deadline = time.monotonic() + 10
        rows: list[dict[str, Any]] = []
        while not rows and time.monotonic() < deadline:
            rows = await q(
                conn,
                "SELECT extract(epoch FROM finished_at - started_at)::float8 AS took "
                "FROM pgqueue.job_history",
            )
            await asyncio.sleep(0.02)
    assert rows, "no send finished"
    assert rows[0]["took"] < gap / 3, (
        f"written {rows[0]['took']:.2f} s after its start: it waited for the next turn"
    )


async def test_a_senders_rate_holds_in_every_second(db_url: str, conn: Any, tmp_path: Path) -> None:
    await add_tenants(conn, 2)
    await lift_limits(conn, rate=1000)
    await conn.execute("UPDATE pgqueue.queues SET tenant_concurrency = 20")
    await admin.set_tenant(conn, "t0", rate_per_second=10)
    await send_many(
        conn,
        [Message(tenant_id="t0", phone_number=phone(i % 15), text=f"m{i}") for i in range(35)]
        + [Message(tenant_id="t1", phone_number=phone(i), text="other") for i in range(40)],
    )
    record = tmp_path / "sends.jsonl"
    async with running_worker(db_url, record, latency=(0.02, 0.05), lookahead_s=0.2):
        await wait_until_drained(conn, 60)
    starts = sorted(s.start for s in read_sends(record) if s.tenant == "t0")
    assert len(starts) == 35
    # At most 10 in any second: the 11th start after any start comes more than 1 s later.
    closest = min(b - a for a, b in zip(starts, starts[10:], strict=False))
    assert closest > 1.0, f"11 starts of a 10/s sender within {closest:.3f} s"


async def test_maintenance_marks_rows_left_without_a_head(
    db_url: str, conn: Any, pool: Any
) -> None:
    await add_tenants(conn, 2)
    await send(conn, "t0", 1)
    await send(conn, "t1", 2)
    await conn.execute("DELETE FROM pgqueue.jobs WHERE tenant_id = 't0'")  # by hand
    dispatcher = Dispatcher(db_url, provider=None, config=DispatcherConfig())  # type: ignore[arg-type]
    try:
        report = await Maintenance(pool, dispatcher, queue=QUEUE).run_once()
        assert report.leader and report.ready_rows_marked == 1
        claim = queries.Claim(worker_id="w", max_jobs=1, lease_s=60, lookahead_s=0.05)
        worker = await connect(db_url, application_name="pgqueue-worker:w", generic_plans=True)
        try:
            await queries.cycle(worker, queue=QUEUE, claim=claim)
        finally:
            await worker.close()
        # t0's row pruned; t1's drained by the claim that took its head, and pruned too.
        assert await q(conn, "SELECT tenant_id FROM pgqueue.ready_tenants") == []
    finally:
        await dispatcher.close()
