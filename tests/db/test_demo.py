"""The demo end to end (API + two worker processes + sandbox), shortened, and its
verdicts computed from the database."""

from __future__ import annotations

from pathlib import Path

import pytest

from pgqueue import demo
from pgqueue.config import Settings
from pgqueue.db import as_url


@pytest.mark.slow
async def test_demo_runs_and_every_guarantee_holds(db_url: str, tmp_path: Path) -> None:
    settings = Settings(database_url=as_url(db_url), home=tmp_path)
    code = await demo.run_demo(
        settings, scenarios=None, keep_running=False, scale=0.25, watch=False
    )
    assert code == 0


async def test_verdicts_catch_a_broken_guarantee(db_url: str, tmp_path: Path) -> None:
    from pgqueue.db import connect
    from tests.support.helpers import add_tenants

    conn = await connect(db_url)
    try:
        await add_tenants(conn, 1)
        # Six sends of one tenant overlapping in time: the tenant verdict must fail.
        for i in range(6):
            await conn.execute(
                "INSERT INTO pgqueue.job_history (id, seq, queue, tenant_id, conversation, "
                "to_number, body, max_attempts, state, attempts) VALUES "
                "(%s, %s, 'q', 't0', %s, '+14155550000', 'x', 4, 'completed', 1)",
                (i + 1, i + 1, f"c{i}"),
            )
            await conn.execute(
                "INSERT INTO pgqueue.sandbox_messages (tenant_id, job_id, to_number, sid, "
                "started_at, created_at) "
                "VALUES ('t0', %s, '+1', 'SM', now(), now() + interval '1 s')",
                (i + 1,),
            )
    finally:
        await conn.close()
    verdicts = {v.name: v for v in await demo.compute_verdicts(db_url, [1, 2, 3, 4, 5, 6])}
    assert not verdicts["tenant concurrency <= 5"].held
    assert verdicts["global concurrency <= 20"].held
