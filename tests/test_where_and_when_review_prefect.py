"""Where and when (issue 11) on a real Prefect server, attacked: a zone mapping naming a deployment that does not
exist must fail at once, whichever zone would win, never only on the day that zone wins."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from prefect import flow, get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.client.schemas.objects import FlowRun, State
from prefect.flow_engine import run_flow

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


def runs_of(deployment_id: Any) -> list[FlowRun]:
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))


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


def nordic_dip(zone: Any, now: datetime, end: datetime) -> list[core.ForecastPoint]:
    """eu-north-1: 300, but 50 two hours after START; anything else: 900."""
    points = []
    for i in range(-1, 12):
        value = (50.0 if i == 2 else 300.0) if str(zone) == "aws:eu-north-1" else 900.0
        points.append(core.ForecastPoint(START + HOUR * i, START + HOUR * (i + 1), value))
    return points


HANDOVER_ZONES: dict[str, str] = {}  # set by each test before its flow runs


@flow(name="rv-handover")
def handover_elsewhere_only(label: str) -> State | str:
    handed_over = cp.reschedule_current_flow_run(
        timedelta(hours=6), HOUR, "aws", "eu-west-1", zones=dict(HANDOVER_ZONES), home=False, source=nordic_dip,
        replan=False,
    )  # fmt: skip
    return handed_over if handed_over is not None else label


@pytest.mark.parametrize("others", [["gcp:us-east1"], []])
def test_with_home_false_the_run_goes_to_the_winning_zone_even_when_it_is_listed_first(others: list[str]) -> None:
    """home=False: the current zone is no candidate, so whichever listed zone wins -- the first one too, or the only
    one -- gets the run; it must never be rescheduled in the current zone."""
    suffix = len(others)
    here = handover_elsewhere_only.to_deployment(name=f"rv-here-{suffix}").apply()
    nordic = handover_elsewhere_only.to_deployment(name=f"rv-nordic-{suffix}").apply()
    HANDOVER_ZONES.clear()
    HANDOVER_ZONES["aws:eu-north-1"] = f"rv-handover/rv-nordic-{suffix}"
    for zone in others:
        HANDOVER_ZONES[zone] = f"rv-handover/rv-here-{suffix}"  # would be wrong anyway: it never wins
    with get_client(sync_client=True) as client:
        current = client.create_flow_run_from_deployment(here, parameters={"label": "y"})
    state = run_flow(handover_elsewhere_only, flow_run=current, parameters={"label": "y"}, return_type="state")
    assert state.is_completed() and state.name == "Rescheduled"
    [later] = runs_of(nordic)
    assert later.state is not None and later.state.state_details.scheduled_time == START + 2 * HOUR
    assert [run.id for run in runs_of(here)] == [current.id]  # nothing more in the current zone


def test_a_settings_block_still_applies_to_a_plan_with_a_deadline(caplog: pytest.LogCaptureFixture) -> None:
    """The block's options are checked on their own: a deadline a few hours away (checked already, with the real
    window and job) must not make the block "not used" -- which would silently drop its keys and threshold."""
    eu = prefect_helpers.scheduled_flow.to_deployment(name="rv-block").apply()
    block = cp.CarbonAwareSettings(min_savings=0.9)  # waiting saves 5/6 here: below the block's threshold
    flow_run, plan = cp.carbonaware_run_deployment(
        "carbonaware-scheduled/rv-block", timedelta(hours=6), HOUR, "aws", "eu-north-1",
        parameters={"label": "b"}, source=nordic_dip, deadline=START + 4 * HOUR, settings=block,
    )  # fmt: skip
    assert "not used" not in caplog.text
    assert plan.reason == "below-threshold" and flow_run.deployment_id == eu


def nightly_windows() -> Iterator[tuple[datetime, datetime]]:
    """Allowed starts as a generator (read once): three to four hours after START only."""
    yield (START + 3 * HOUR, START + 4 * HOUR)


def test_windows_from_a_generator_hold_for_a_created_run() -> None:
    """The Prefect layer checks its arguments and then plans: a generator read by the check must not leave the plan
    with no windows ("windows is empty"), nor with none of the caller's rule of when work may run."""
    prefect_helpers.scheduled_flow.to_deployment(name="rv-gen").apply()
    _, plan = cp.carbonaware_run_deployment(
        "carbonaware-scheduled/rv-gen", timedelta(hours=6), HOUR, "aws", "eu-north-1", parameters={"label": "g"},
        source=nordic_dip, windows=nightly_windows(),
    )  # fmt: skip
    assert (plan.reason, plan.start) == ("already-best", START + 3 * HOUR)  # not 2 h: outside the windows


def test_windows_from_a_generator_hold_for_a_decorated_flow() -> None:
    seen: list[core.Plan] = []

    @flow(name="rv-decorated-gen")
    @cp.carbonaware_delay_decorator(timedelta(hours=6), HOUR, "aws", "eu-north-1", source=nordic_dip,
                                    windows=nightly_windows(), on_plan=seen.append, replan=False)  # fmt: skip
    def decorated() -> str:
        return "done"

    assert decorated() == "done" and decorated() == "done"  # each call plans with the caller's windows
    assert [plan.start for plan in seen] == [START + 3 * HOUR] * 2
    assert all(plan.reason == "already-best" for plan in seen)  # the earliest allowed start is the best one
