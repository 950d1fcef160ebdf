"""The dispatcher in one process against a real PostgreSQL: FIFO, limits, retries."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

from pgqueue import queries
from pgqueue.db import connect
from pgqueue.models import Message
from tests.support.helpers import add_tenants, phone, running_worker, send_many, wait_until_drained
from tests.support.recording import max_overlap, read_sends


async def test_all_jobs_are_sent_once_in_conversation_order(
    db_url: str, conn: Any, tmp_path: Path
) -> None:
    tenants = await add_tenants(conn, 3)
    messages = [
        Message(tenant_id=tenants[i % 3], phone_number=phone(i % 7), text=f"m{i}")
        for i in range(60)
    ]
    await send_many(conn, messages)
    record = tmp_path / "sends.jsonl"
    async with running_worker(db_url, record, latency=(0.005, 0.02)):
        await wait_until_drained(conn, 30)
    sends = read_sends(record)
    assert sorted(s.body for s in sends) == sorted(m.text for m in messages)
    by_conv: dict[str, list[int]] = {}
    for s in sorted(sends, key=lambda s: s.start):
        by_conv.setdefault(s.conv, []).append(int(s.body[1:]))
    for order in by_conv.values():
        assert order == sorted(order)
    assert max_overlap(sends, key=lambda s: s.conv) == 1
    assert max_overlap(sends, key=lambda s: s.tenant) <= 5
    cur = await conn.execute(
        "SELECT count(*) AS n FROM pgqueue.job_history WHERE state = 'completed'"
    )
    assert (await cur.fetchone())["n"] == 60
    cur = await conn.execute("SELECT count(*) AS a FROM pgqueue.jobs WHERE state = 'active'")
    assert (await cur.fetchone())["a"] == 0
    await counters_match(conn)


async def q(conn: Any, query: str, *params: Any) -> list[dict[str, Any]]:
    cur = await conn.execute(query, params)
    return await cur.fetchall()


async def counters_match(conn: Any) -> None:
    """The stored counters equal what they count: each conversation's pending count its
    live jobs (promotion relies on it), each tenant's finished totals, summed over their
    shards, its history. (Sends in flight, G2 and G3, are counted, never stored.)"""
    rows = await q(
        conn,
        "SELECT c.conversation, c.pending, (SELECT count(*) FROM pgqueue.jobs j "
        "WHERE j.queue = c.queue AND j.conversation = c.conversation) AS real "
        "FROM pgqueue.conversations c",
    )
    assert all(r["pending"] == r["real"] for r in rows), rows
    rows = await q(
        conn,
        "SELECT t.id, (SELECT coalesce(sum(x.completed), 0) FROM pgqueue.tenant_totals x "
        "WHERE x.tenant_id = t.id) AS completed, (SELECT coalesce(sum(x.failed), 0) "
        "FROM pgqueue.tenant_totals x WHERE x.tenant_id = t.id) AS failed, "
        "(SELECT count(*) FILTER (WHERE h.state = 'completed') FROM pgqueue.job_history h "
        "WHERE h.tenant_id = t.id) AS real_completed, "
        "(SELECT count(*) FILTER (WHERE h.state = 'failed') FROM pgqueue.job_history h "
        "WHERE h.tenant_id = t.id) AS real_failed FROM pgqueue.tenants t",
    )
    assert all(
        (r["completed"], r["failed"]) == (r["real_completed"], r["real_failed"]) for r in rows
    ), rows
    # Claims find tenants through their ready rows: a waiting head without one is never sent.
    rows = await q(
        conn,
        "SELECT j.id FROM pgqueue.jobs j WHERE j.is_head AND j.state = 'waiting' "
        "AND NOT EXISTS (SELECT 1 FROM pgqueue.ready_tenants r WHERE r.queue = j.queue "
        "AND r.tenant_id = j.tenant_id AND r.priority = j.priority)",
    )
    assert rows == [], rows


async def test_retry_blocks_its_conversation_only(db_url: str, conn: Any, tmp_path: Path) -> None:
    await add_tenants(conn, 1)
    msgs = [
        Message(tenant_id="t0", phone_number=phone(1), text="a0 [transient:2]"),
        Message(tenant_id="t0", phone_number=phone(1), text="a1"),
        Message(tenant_id="t0", phone_number=phone(2), text="b0"),
        Message(tenant_id="t0", phone_number=phone(2), text="b1"),
    ]
    await send_many(conn, msgs)
    record = tmp_path / "r.jsonl"
    async with running_worker(db_url, record):
        await wait_until_drained(conn, 20)
    sends = read_sends(record)
    a = [s for s in sends if s.conv.endswith(phone(1))]
    assert [(s.body.split()[0], s.outcome) for s in a] == [
        ("a0", "transient"),
        ("a0", "transient"),
        ("a0", "ok"),
        ("a1", "ok"),
    ]
    # Backoff 200 ms, then 400 ms (G7), and a1 only after a0 finally went through (G1).
    assert a[1].start - a[0].end >= 0.19
    assert a[2].start - a[1].end >= 0.39
    assert a[3].start >= a[2].end
    b = [s for s in sends if s.conv.endswith(phone(2))]
    assert b[-1].end < a[1].start  # conversation b was not held up by a's retries
    hist = await q(conn, "SELECT body, attempts, state FROM pgqueue.job_history ORDER BY seq")
    assert hist[0]["attempts"] == 3 and hist[0]["state"] == "completed"
    await counters_match(conn)


async def test_dead_letter_does_not_block_and_keeps_the_code(
    db_url: str, conn: Any, tmp_path: Path
) -> None:
    await add_tenants(conn, 1)
    await send_many(
        conn,
        [
            Message(tenant_id="t0", phone_number=phone(1), text="x [permanent]"),
            Message(tenant_id="t0", phone_number=phone(1), text="after dead"),
            Message(tenant_id="t0", phone_number=phone(3), text="y [transient:9]"),
            Message(tenant_id="t0", phone_number=phone(3), text="after exhausted"),
        ],
    )
    record = tmp_path / "r.jsonl"
    async with running_worker(db_url, record):
        await wait_until_drained(conn, 20)
    hist = {r["body"]: r for r in await q(conn, "SELECT * FROM pgqueue.job_history")}
    assert hist["x [permanent]"]["state"] == "failed"
    assert hist["x [permanent]"]["last_error_code"] == "21211"
    assert hist["x [permanent]"]["attempts"] == 1
    assert hist["y [transient:9]"]["state"] == "failed"
    assert hist["y [transient:9]"]["attempts"] == 4  # first try + QUEUE_RETRY_ATTEMPTS (3)
    assert hist["y [transient:9]"]["last_error_code"] == "sandbox-503"
    assert hist["after dead"]["state"] == "completed"
    assert hist["after exhausted"]["state"] == "completed"
    t = await q(conn, "SELECT sum(completed) AS c, sum(failed) AS f FROM pgqueue.tenant_totals")
    assert (t[0]["c"], t[0]["f"]) == (2, 2)


async def test_tenant_limit_holds_and_is_reached(db_url: str, conn: Any, tmp_path: Path) -> None:
    await add_tenants(conn, 1, prefix="big")
    await add_tenants(conn, 1, prefix="small", max_concurrency=2)
    # Lift the rate so that pacing does not keep the limit from being reached.
    await conn.execute("UPDATE pgqueue.queues SET rate_per_second = 10000")
    await send_many(
        conn,
        [Message(tenant_id="big0", phone_number=phone(i), text=f"{i}") for i in range(40)]
        + [Message(tenant_id="small0", phone_number=phone(i), text=f"{i}") for i in range(20)],
    )
    record = tmp_path / "r.jsonl"
    async with running_worker(db_url, record, latency=(0.03, 0.05)):
        await wait_until_drained(conn, 30)
    sends = read_sends(record)
    per_tenant = {t: max_overlap([s for s in sends if s.tenant == t]) for t in ("big0", "small0")}
    assert per_tenant == {"big0": 5, "small0": 2}
    await counters_match(conn)


async def test_global_limit_holds_and_is_reached(db_url: str, conn: Any, tmp_path: Path) -> None:
    await add_tenants(conn, 6)
    await conn.execute("UPDATE pgqueue.queues SET global_concurrency = 7, rate_per_second = 10000")
    await send_many(
        conn, [Message(tenant_id=f"t{i % 6}", phone_number=phone(i), text="x") for i in range(90)]
    )
    record = tmp_path / "r.jsonl"
    async with running_worker(db_url, record, latency=(0.02, 0.04)):
        await wait_until_drained(conn, 30)
    assert max_overlap(read_sends(record)) == 7


async def test_priority_first_fifo_within(db_url: str, conn: Any, tmp_path: Path) -> None:
    await add_tenants(conn, 1)
    await send_many(
        conn,
        [
            Message(tenant_id="t0", phone_number=phone(i), text=f"low{i}", priority=-5)
            for i in range(5)
        ]
        + [Message(tenant_id="t0", phone_number=phone(10 + i), text=f"mid{i}") for i in range(5)]
        + [
            Message(tenant_id="t0", phone_number=phone(20 + i), text=f"high{i}", priority=50)
            for i in range(5)
        ]
        # G1 beats priority: the urgent one waits behind its conversation's head.
        + [Message(tenant_id="t0", phone_number=phone(0), text="urgent-behind-low0", priority=99)],
    )
    record = tmp_path / "r.jsonl"
    async with running_worker(db_url, record, concurrency=1):
        await wait_until_drained(conn, 20)
    order = [s.body for s in read_sends(record)]
    assert order[:5] == [f"high{i}" for i in range(5)]
    assert order[5:10] == [f"mid{i}" for i in range(5)]
    assert order.index("urgent-behind-low0") > order.index("low0")


async def test_fairness_a_big_backlog_does_not_delay_others(
    db_url: str, conn: Any, tmp_path: Path
) -> None:
    await add_tenants(conn, 4)
    await send_many(
        conn, [Message(tenant_id="t0", phone_number=phone(i), text=f"big{i}") for i in range(300)]
    )
    await send_many(
        conn,
        [Message(tenant_id=f"t{k}", phone_number=phone(k), text=f"small{k}") for k in (1, 2, 3)],
    )
    record = tmp_path / "r.jsonl"
    async with running_worker(db_url, record, latency=(0.01, 0.02)):
        await wait_until_drained(conn, 60)
    order = [s.body for s in read_sends(record)]
    # With t0 held to 5 in flight, the others go in the first dispatch round.
    assert max(order.index(f"small{k}") for k in (1, 2, 3)) < 10


async def test_rate_limit_window(db_url: str, conn: Any, tmp_path: Path) -> None:
    await add_tenants(conn, 10)
    await conn.execute("UPDATE pgqueue.queues SET rate_per_second = 40")
    await send_many(
        conn, [Message(tenant_id=f"t{i % 10}", phone_number=phone(i), text="x") for i in range(120)]
    )
    record = tmp_path / "r.jsonl"
    async with running_worker(db_url, record):
        await wait_until_drained(conn, 30)
    sends = read_sends(record)
    from tests.support.recording import max_starts_per_window

    assert max_starts_per_window(sends) <= 40
    span = sends[-1].start - sends[0].start
    # Paced, not starved. Only a coarse floor: the exact mean is a speed figure, measured
    # by bench/dispatch.py (a slot missed under load is skipped, not reused).
    assert 119 / span >= 0.75 * 40


async def test_throttle_pauses_the_whole_queue(db_url: str, conn: Any, tmp_path: Path) -> None:
    await add_tenants(conn, 2)
    await send_many(conn, [Message(tenant_id="t0", phone_number=phone(1), text="[throttle:1.0]")])
    record = tmp_path / "r.jsonl"
    async with running_worker(db_url, record) as w:
        import asyncio

        await asyncio.sleep(0.3)
        await send_many(
            conn, [Message(tenant_id="t1", phone_number=phone(i), text="other") for i in range(3)]
        )
        await wait_until_drained(conn, 20)
        assert w is not None
    sends = read_sends(record)
    throttled = next(s for s in sends if s.outcome == "throttle")
    others = [s for s in sends if s.body == "other"]
    assert min(s.start for s in others) >= throttled.end + 0.9


async def test_tenant_error_pauses_tenant_without_burning_retries(
    db_url: str, conn: Any, tmp_path: Path
) -> None:
    await add_tenants(conn, 2)
    await send_many(
        conn,
        [
            Message(tenant_id="t0", phone_number=phone(1), text="[tenant]"),
            Message(tenant_id="t0", phone_number=phone(2), text="t0 other"),
            Message(tenant_id="t1", phone_number=phone(1), text="t1 fine"),
        ],
    )
    record = tmp_path / "r.jsonl"
    async with running_worker(db_url, record):
        import asyncio

        for _ in range(100):
            t = await q(conn, "SELECT paused FROM pgqueue.tenants WHERE id = 't0'")
            done = await q(
                conn, "SELECT count(*) AS n FROM pgqueue.job_history WHERE tenant_id = 't1'"
            )
            if t[0]["paused"] and done[0]["n"] == 1:
                break
            await asyncio.sleep(0.05)
    tenant = (await q(conn, "SELECT paused, pause_reason FROM pgqueue.tenants WHERE id = 't0'"))[0]
    assert tenant["paused"] and "20003" in tenant["pause_reason"]
    job = (await q(conn, "SELECT attempts, state FROM pgqueue.jobs WHERE body = '[tenant]'"))[0]
    assert job["attempts"] == 0 and job["state"] == "waiting"
    await counters_match(conn)


async def test_tenant_rate_limit(db_url: str, conn: Any, tmp_path: Path) -> None:
    await add_tenants(conn, 1, rate_per_second=5)
    await add_tenants(conn, 1, prefix="free")
    await send_many(
        conn,
        [Message(tenant_id="t0", phone_number=phone(i), text="slow") for i in range(8)]
        + [Message(tenant_id="free0", phone_number=phone(i), text="fast") for i in range(8)],
    )
    record = tmp_path / "r.jsonl"
    async with running_worker(db_url, record):
        await wait_until_drained(conn, 20)
    sends = read_sends(record)
    slow = [s.start for s in sends if s.tenant == "t0"]
    assert min(b - a for a, b in itertools.pairwise(slow)) >= 0.19
    fast = [s.start for s in sends if s.tenant == "free0"]
    assert fast[-1] - fast[0] < 0.5  # only the tenant with its own rate is held back


async def test_lost_lock_connection_is_retaken_and_nothing_resent(
    db_url: str, conn: Any, tmp_path: Path
) -> None:
    await add_tenants(conn, 1)
    await send_many(
        conn, [Message(tenant_id="t0", phone_number=phone(i), text=f"m{i}") for i in range(3)]
    )
    record = tmp_path / "r.jsonl"
    async with running_worker(db_url, record, latency=(1.0, 1.0)) as worker:
        import asyncio

        while len(read_sends(record)) < 3:
            await asyncio.sleep(0.02)
        dispatcher = worker.dispatcher
        assert dispatcher is not None and dispatcher._conn is not None
        pid = dispatcher._conn.info.backend_pid
        await conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        # The worker's other connections still show it alive: no rescue meanwhile.
        from pgqueue.maintenance import Rescuer

        assert (
            await Rescuer(worker.pool, queue="whatsapp-send", grace_s=0).run_once()
        ).rescued == 0
        await wait_until_drained(conn, 20)
        assert dispatcher.stats.reconnects >= 2
    sends = read_sends(record)
    assert len(sends) == 3 and all(s.outcome == "ok" for s in sends)
    done = await q(conn, "SELECT count(*) AS n FROM pgqueue.job_history WHERE state = 'completed'")
    assert done[0]["n"] == 3
    await counters_match(conn)


async def _drain_watching_claims(
    conn: Any, worker: Any, timeout: float = 30.0
) -> tuple[int, dict[str, int]]:
    """Waits for the queue to drain; returns the most jobs the worker held at once
    (sending or claimed ahead) and the most it held per tenant that had no answer yet:
    what its claims count against the tenant's limit (G2)."""
    held = 0
    unanswered: dict[str, int] = {}
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        dispatcher = worker.dispatcher
        if dispatcher is not None:
            held = max(held, dispatcher.in_flight)
            for tenant, n in dispatcher.unanswered_by_tenant().items():
                unanswered[tenant] = max(unanswered.get(tenant, 0), n)
        cur = await conn.execute("SELECT 1 FROM pgqueue.jobs LIMIT 1")
        if await cur.fetchone() is None:
            return held, unanswered
        await asyncio.sleep(0.001)
    raise AssertionError("queue did not drain in time")


async def test_claiming_ahead_never_sends_more_than_the_local_concurrency(
    db_url: str, conn: Any, tmp_path: Path
) -> None:
    # Sends faster than a turn and a lifted rate: the worker claims ahead of its free
    # slots, and the jobs claimed ahead wait for a local slot.
    await add_tenants(conn, 3, prefix="wide")
    await add_tenants(conn, 1, prefix="narrow", max_concurrency=3)
    await conn.execute(
        "UPDATE pgqueue.queues SET rate_per_second = 1000000, global_concurrency = 100,"
        " tenant_concurrency = 100"
    )
    tenants = ["wide0", "wide1", "wide2", "narrow0"]
    await send_many(
        conn,
        [Message(tenant_id=tenants[i % 4], phone_number=phone(i), text=f"{i}") for i in range(600)],
    )
    record = tmp_path / "r.jsonl"
    # Sends take a moment (they overlap), yet less than a turn.
    async with running_worker(
        db_url, record, concurrency=4, batch_size=4, claim_ahead=6, latency=(0.0003, 0.0006)
    ) as worker:
        held, unanswered = await _drain_watching_claims(conn, worker)
    sends = read_sends(record)
    assert len(sends) == 600
    assert held > 4, "the worker never claimed ahead of its free slots"
    assert worker.dispatcher is not None
    assert 4 < worker.dispatcher.stats.largest_claim <= 4 + 6, "claims of one batch only"
    assert held <= 4 + 6, "held more than its slots and claim_ahead"
    assert max_overlap(sends) <= 4
    # Jobs claimed ahead count against the tenant limit like sends in flight.
    assert unanswered["narrow0"] <= 3
    assert max_overlap([s for s in sends if s.tenant == "narrow0"]) <= 3
    await counters_match(conn)


async def test_no_claiming_ahead_while_the_rate_binds_or_sends_are_slow(
    db_url: str, conn: Any, tmp_path: Path
) -> None:
    await add_tenants(conn, 4)
    await conn.execute(
        "UPDATE pgqueue.queues SET global_concurrency = 100, tenant_concurrency = 100"
    )
    fast = (0.0003, 0.0006)
    cases = [
        (200, fast, 100),  # the rate can bind
        (1000000, (0.03, 0.04), 100),  # sends slower than a turn
        (1000000, fast, 30),  # claiming ahead would take half the free global slots
    ]
    for case, (rate, latency, limit) in enumerate(cases):
        await conn.execute(
            "UPDATE pgqueue.queues SET rate_per_second = %s, global_concurrency = %s",
            (rate, limit),
        )
        await send_many(
            conn,
            [Message(tenant_id=f"t{i % 4}", phone_number=phone(i), text=f"{i}") for i in range(80)],
        )
        record = tmp_path / f"r-{case}.jsonl"
        async with running_worker(
            db_url, record, concurrency=4, batch_size=4, latency=latency
        ) as worker:
            held, _ = await _drain_watching_claims(conn, worker)
        assert len(read_sends(record)) == 80
        assert held <= 4, f"claimed ahead: rate {rate}/s, sends of {latency} s, global {limit}"


async def test_one_claim_spreads_over_tenants_by_the_sends_it_hands_out(
    db_url: str, conn: Any
) -> None:
    # G6 inside a single claim: each job a claim hands a tenant counts as in flight for
    # that tenant's next one, so two idle tenants share a claim of 4; and priority comes
    # before fewer sends in flight (G5).
    await add_tenants(conn, 3)
    await conn.execute("UPDATE pgqueue.queues SET rate_per_second = 1000000")
    await send_many(
        conn,
        [Message(tenant_id="t0", phone_number=phone(i), text=f"a{i}") for i in range(10)]
        + [Message(tenant_id="t1", phone_number=phone(i), text=f"b{i}") for i in range(10)],
    )
    worker = await connect(db_url, application_name="pgqueue-worker:order")
    try:

        async def claim(n: int) -> list[str]:
            rows = await queries.claim_jobs(
                worker,
                queue="whatsapp-send",
                worker_id="order",
                max_jobs=n,
                lease_s=60,
                lookahead_s=5,
            )
            return [r["body"] for r in rows]

        assert sorted(await claim(4)) == ["a0", "a1", "b0", "b1"]
        await send_many(
            conn,
            [
                Message(tenant_id="t0", phone_number=phone(50), text="urgent", priority=5),
                Message(tenant_id="t2", phone_number=phone(51), text="c0"),
            ],
        )
        # t0 has 2 in flight, t2 none: t0's higher priority still goes first, then t2.
        assert await claim(1) == ["urgent"]
        assert await claim(1) == ["c0"]
    finally:
        await worker.close()


async def test_a_job_claimed_ahead_and_cut_short_by_a_drain_goes_back_unspent() -> None:
    # A job claimed ahead waits for a local slot; a drain that cancels it there must
    # still hand it back (released, the attempt not spent) like a send it cut short.
    from pgqueue.dispatcher import Dispatcher, DispatcherConfig, _InFlight
    from tests.db.test_providers import make_job

    dispatcher = Dispatcher("postgresql://unused", provider=None, config=DispatcherConfig())  # type: ignore[arg-type]
    for _ in range(dispatcher.config.concurrency):
        await dispatcher._sending.acquire()  # every local slot busy
    entry = _InFlight(make_job(late_ok=True))
    task = asyncio.create_task(dispatcher._send(entry))
    await asyncio.sleep(0.01)
    assert not task.done(), "the send did not wait for a local slot"
    task.cancel()
    await task
    assert entry.outcome is not None
    assert (entry.outcome.kind, entry.outcome.code) == ("release", "worker-shutdown")
    assert dispatcher._done == [entry]
