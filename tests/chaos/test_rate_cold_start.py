"""G4 at the provider when a worker starts on a backlog (found by the overload scenario).

A fresh `pgqueue worker` claims its first batch with start moments 12.7 ms apart
(GCRA, 1 / (0.985 x 80) s), then its first Twilio send blocks the event loop for
~75-120 ms: the SDK imports its Api v2010 domain lazily on the first `client.messages`
(measured: `from twilio.rest import Client` 120 ms, first `.messages` 74 ms). Every
claimed job whose start moment passes meanwhile starts at once when the loop is free,
so the provider sees a burst of ~8 requests inside the 1-second window that also holds
the next 79 paced starts. queries.sql (claim_jobs) budgets 15 ms of jitter between
start_at and the request reaching the provider; the first send alone exceeds it. This
happens at every worker start on a backlog: deploy, crash restart, scale-out.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from tests.support.harness import (
    Workload,
    add_tenants,
    analyse,
    cluster,
    enqueue_direct,
    plan,
    read_records,
    wait_drained,
)


@pytest.mark.chaos
async def test_a_fresh_worker_on_a_backlog_stays_within_80_starts_a_second(
    db_url: str, tmp_path: Path
) -> None:
    planned = plan(Workload(20, 10, 240))
    await add_tenants(db_url, 20)
    await enqueue_direct(db_url, planned)
    # Short provider latency: neither the tenant nor the global limit binds, only 80/s.
    async with cluster(tmp_path, db_url, workers=1, latency="0.02:0.04") as c:
        await wait_drained(db_url, len(planned), 60)
    recs = read_records(c.record)
    f = analyse(recs, planned, c.wire)
    assert not f.lost and not f.duplicates
    together = sum(1 for a, b in itertools.pairwise(recs) if b.t - a.t < 0.001)
    assert f.max_starts_1s <= 80, (
        f"{f.max_starts_1s} provider requests in one second {f.starts_at} ({f.starts_note}; "
        f"{f.loop_max_starts_1s} at the fake's loop); {together} arrived within 1 ms of the "
        "previous one (started together after the first send blocked the loop)"
    )
