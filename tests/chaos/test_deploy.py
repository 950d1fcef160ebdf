"""Scenario 5: SIGTERM during load, as a rolling deploy does: sends in flight finish,
their outcomes are written, nothing is sent twice (G8)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.harness import DeployConfig, Workload, explain, markdown, scenario_deploy


@pytest.mark.chaos
async def test_rolling_sigterm_finishes_in_flight_sends(db_url: str, tmp_path: Path) -> None:
    cfg = DeployConfig(workload=Workload(20, 15, 450), restart_every=2.0)
    result = await scenario_deploy(db_url, tmp_path, cfg)
    print(markdown(result))
    assert not result.problems, explain(result)
    assert int(result.rows[0].measured) >= 3, "too few SIGTERMs to mean anything"
