"""Scenario 6: primary failover (issue 20). A streaming-replication pair of the test's
own; the API and two workers on a multi-host URL (target_session_attrs=read-write); mid-run
the primary is stopped with `pg_ctl -m immediate` and the standby promoted. Nobody restarts
a process: the workers and the API find the new primary by themselves, the workers take
their conversation locks back there within the rescuers' grace (so nothing is sent twice),
and the API answers 503 with Retry-After in between.

With a synchronous standby nothing is lost and nothing duplicated. With an asynchronous
one, fed through a link that stalls for the last second before the crash, what the
primary committed in that second is gone: enqueues answered 202 then are lost (the client
was told "queued"), and claims or outcomes committed then are undone, so those messages are
sent again. The test checks that nothing else breaks: every loss and every duplicate is
one of those."""

from __future__ import annotations

import asyncio
from pathlib import Path

import psycopg
import pytest

from pgqueue.db import StandbyConnection, connect, connection_lost
from tests.support.harness import FailoverConfig, explain, markdown, scenario_failover
from tests.support.replication import ReplicationPair


@pytest.mark.chaos
async def test_failover_synchronous_standby(tmp_path: Path) -> None:
    result = await scenario_failover(tmp_path, FailoverConfig(synchronous=True))
    print(markdown(result))
    assert not result.problems, explain(result)
    assert not result.figures.lost and not result.figures.duplicates, explain(result)


@pytest.mark.chaos
async def test_failover_asynchronous_standby_loses_only_unreplicated_commits(
    tmp_path: Path,
) -> None:
    result = await scenario_failover(tmp_path, FailoverConfig(synchronous=False))
    print(markdown(result))
    assert not result.problems, explain(result)


@pytest.mark.chaos
async def test_a_connection_on_a_standby_is_dropped_like_a_lost_one() -> None:
    """What a worker does with a connection that lands on a node in recovery (a URL
    without target_session_attrs, or a pooler still pointing at the old node): refused at
    connect time, and every error such a node gives (LISTEN, a write) counts as a lost
    connection, so the worker drops it and connects again instead of keeping it."""
    pair = ReplicationPair(synchronous=False)
    try:
        await asyncio.to_thread(pair.start)
        await asyncio.to_thread(pair.create_database, "standby_check")
        await asyncio.to_thread(pair.wait_replayed)
        standby = pair.standby.url("standby_check")
        with pytest.raises(StandbyConnection):
            await connect(standby, primary=True)
        conn = await connect(standby)
        try:
            for statement in ("LISTEN pgqueue_whatsapp_send", "DELETE FROM pgqueue.jobs"):
                with pytest.raises(psycopg.Error) as caught:
                    await conn.execute(statement)
                assert connection_lost(caught.value), caught.value
        finally:
            await conn.close()
        # A primary's own errors are not mistaken for a lost connection.
        primary = await connect(pair.primary.url("standby_check"), primary=True)
        try:
            with pytest.raises(psycopg.Error) as caught:
                await primary.execute("SELECT * FROM pgqueue.no_such_table")
            assert not connection_lost(caught.value)
        finally:
            await primary.close()
    finally:
        await asyncio.to_thread(pair.cleanup)
