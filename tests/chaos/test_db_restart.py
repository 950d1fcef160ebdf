"""Scenario 2: restart PostgreSQL mid-run (G8): workers and API reconnect by themselves,
and while the database is away the API answers 503 with Retry-After, never a 500 or a
hang. The server restarted is this test's own, never the session's."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.harness import (
    PrivateServer,
    RestartConfig,
    Workload,
    explain,
    markdown,
    scenario_restart,
)


@pytest.mark.chaos
async def test_database_restart_mid_run(private_server: PrivateServer, tmp_path: Path) -> None:
    cfg = RestartConfig(
        workload=Workload(10, 10, 800), burst=100, burst_every=1.0, down_at=3.0, down_for=6.0
    )
    result = await scenario_restart(private_server, tmp_path, cfg)
    print(markdown(result))
    assert not result.problems, explain(result)
