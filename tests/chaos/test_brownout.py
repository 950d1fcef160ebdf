"""Scenario 3: the provider browns out (30 % 5xx, 429s with Retry-After) and recovers:
retries deliver everything once, in order, without breaking a limit (G1-G4, G7)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.harness import BrownoutConfig, Workload, explain, markdown, scenario_brownout


@pytest.mark.chaos
async def test_provider_brownout_then_recovery(db_url: str, tmp_path: Path) -> None:
    cfg = BrownoutConfig(workload=Workload(20, 15, 700), start_at=1.0, duration=8.0)
    result = await scenario_brownout(db_url, tmp_path, cfg)
    print(markdown(result))
    assert not result.problems, explain(result)
