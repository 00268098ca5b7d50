"""Where and when (issue 11) on a real Prefect server, attacked: a zone mapping naming a deployment that does not
exist must fail at once, whichever zone would win, never only on the day that zone wins."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

import carbonaware_core as core
import carbonaware_prefect as cp
from tests import prefect_helpers
from tests.loopback import FakeClock

UTC = timezone.utc
START = (datetime.now(UTC) + timedelta(days=1)).replace(minute=0, second=0, microsecond=0)
HOUR = timedelta(hours=1)


@pytest.fixture(scope="module", autouse=True)
def prefect_server() -> Iterator[str]:
    with prefect_helpers.prefect_server() as url:
        yield url


@pytest.fixture(autouse=True)
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeClock]:
    fake = FakeClock(START)
    monkeypatch.setattr(core, "CLOCK", fake)
    core.CACHE.clear()
    yield fake


def home_cleanest(zone: Any, now: datetime, end: datetime) -> list[core.ForecastPoint]:
    """eu-west-1 at 100 every hour, anything else at 900: the home zone wins, at once."""
    value = 100.0 if str(zone) == "aws:eu-west-1" else 900.0
    return [core.ForecastPoint(START + HOUR * i, START + HOUR * (i + 1), value) for i in range(-1, 12)]


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_zone_mapping_naming_a_missing_deployment_fails_at_once_whichever_zone_wins(asynchronous: bool) -> None:
    eu = prefect_helpers.scheduled_flow.to_deployment(name=f"rv-eu-{asynchronous}").apply()
    targets = {"aws:eu-west-1": eu, "aws:eu-north-1": "carbonaware-scheduled/rv-no-such-deployment"}
    call = cp.acarbonaware_run_deployment if asynchronous else cp.carbonaware_run_deployment
    seen: list[core.Plan] = []
    with pytest.raises(ValueError, match="rv-no-such-deployment") as raised:
        outcome = call(
            targets, timedelta(hours=6), HOUR, parameters={"label": "x"}, source=home_cleanest, on_plan=seen.append
        )
        if asynchronous:
            asyncio.run(outcome)
    assert "aws:eu-north-1" in str(raised.value)
    assert seen == []  # an argument error: raised before any plan
