"""Scenario 1: SIGKILL a random worker every few seconds and start a new one (G8, G9)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.harness import KillConfig, Workload, explain, markdown, scenario_kill


@pytest.mark.chaos
async def test_sigkill_random_workers_loses_nothing_and_breaks_no_limit(
    db_url: str, tmp_path: Path
) -> None:
    # bench/chaos.py runs the full size (1,500 messages); this one keeps the file ~1 min.
    cfg = KillConfig(workload=Workload(20, 15, 900), workers=4, kill_every=(1.5, 3.0))
    result = await scenario_kill(db_url, tmp_path, cfg)
    print(markdown(result))
    assert not result.problems, explain(result)
    kills = int(result.rows[0].measured)
    assert kills >= 3, "the scenario ended before it killed anything much"
