"""Where and when (issue 11) on a real Prefect server: a run is created for the winning zone's deployment at its
start; a deployment run hands over to another zone's deployment; the decorator and the delay task refuse zones.

The forecasts come from a per-zone series source; the core's clock is a fake one set to the next whole hour;
Prefect itself runs for real (deployments are applied to the test server; a handover flow run is executed
in-process by Prefect's own flow engine, so it is a real deployment flow run).
"""

from __future__ import annotations

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
from carbonaware_core import ForecastPoint
from tests import prefect_helpers
from tests.loopback import FakeClock

UTC = timezone.utc
START = (datetime.now(UTC) + timedelta(days=1)).replace(minute=0, second=0, microsecond=0)
HOUR = timedelta(hours=1)
WINDOW, DURATION = timedelta(hours=6), timedelta(minutes=30)
NORDIC_DIP = 2  # hours after START: eu-north-1's cleanest hour


@pytest.fixture(scope="module", autouse=True)
def prefect_server() -> Iterator[str]:
    with prefect_helpers.prefect_server() as url:
        yield url


@pytest.fixture(autouse=True)
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeClock]:
    fake = FakeClock(START)
    monkeypatch.setattr(core, "CLOCK", fake)
    core.CACHE.clear()
    cp._CONFIG_CACHE.clear()
    yield fake
    cp._CONFIG_CACHE.clear()


def per_zone(zone: Any, now: datetime, end: datetime) -> list[core.ForecastPoint]:
    """eu-west-1: 400 every hour; eu-north-1: 300, but 50 two hours after START; anything else: 900."""
    points = []
    for i in range(-1, 12):
        at = START + HOUR * i
        if str(zone) == "aws:eu-west-1":
            value = 400.0
        elif str(zone) == "aws:eu-north-1":
            value = 50.0 if i == NORDIC_DIP else 300.0
        else:
            value = 900.0
        points.append(core.ForecastPoint(at, at + HOUR, value))
    return points


def runs_of(deployment_id: Any) -> list[FlowRun]:
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))


def test_the_run_is_created_for_the_winning_zone_at_its_start() -> None:
    eu = prefect_helpers.scheduled_flow.to_deployment(name="q-eu").apply()
    nordic = prefect_helpers.scheduled_flow.to_deployment(name="q-nordic").apply()
    targets = {"aws:eu-west-1": "carbonaware-scheduled/q-eu", "aws:eu-north-1": "carbonaware-scheduled/q-nordic"}
    flow_run, plan = cp.carbonaware_run_deployment(
        targets, WINDOW, DURATION, parameters={"label": "x"}, source=per_zone, replan=False
    )
    assert (plan.reason, plan.zone, plan.start) == ("optimal", core.CloudZone("aws", "eu-north-1"), START + 2 * HOUR)
    assert plan.now == 400.0 and plan.expected == 50.0  # against eu-west-1 (the first zone) at once
    assert [a.zone for a in plan.alternatives] == ["aws:eu-west-1", "aws:eu-north-1"]
    assert flow_run.deployment_id == nordic
    assert flow_run.state is not None and flow_run.state.is_scheduled()
    assert flow_run.state.state_details.scheduled_time == plan.start
    assert flow_run.parameters == {"label": "x"} and cp.RESCHEDULED_TAG in flow_run.tags
    assert runs_of(eu) == []  # no worker of the other zone idles, no run is created there


def test_the_first_zone_is_home_and_wins_when_nothing_is_cleaner() -> None:
    eu = prefect_helpers.scheduled_flow.to_deployment(name="q-eu-2").apply()
    prefect_helpers.scheduled_flow.to_deployment(name="q-other-2").apply()
    targets = {"aws:eu-north-1": "carbonaware-scheduled/q-eu-2", "gcp:us-east1": "carbonaware-scheduled/q-other-2"}
    flow_run, plan = cp.carbonaware_run_deployment(targets, HOUR, DURATION, parameters={"label": "z"}, source=per_zone)
    assert (plan.reason, plan.zone) == ("already-best", core.CloudZone("aws", "eu-north-1"))
    assert flow_run.deployment_id == eu


def test_the_async_helper_creates_the_winners_run_too() -> None:
    import asyncio

    prefect_helpers.scheduled_flow.to_deployment(name="q-eu-3").apply()
    nordic = prefect_helpers.scheduled_flow.to_deployment(name="q-nordic-3").apply()
    targets = {
        "aws:eu-west-1": "carbonaware-scheduled/q-eu-3",
        ("aws", "eu-north-1"): "carbonaware-scheduled/q-nordic-3",
    }
    flow_run, plan = asyncio.run(
        cp.acarbonaware_run_deployment(targets, WINDOW, DURATION, parameters={"label": "a"}, source=per_zone)
    )
    assert flow_run.deployment_id == nordic and plan.start == START + 2 * HOUR
    assert flow_run.state is not None and flow_run.state.state_details.scheduled_time == plan.start


def test_argument_errors_of_the_zone_mapping_raise_before_any_call() -> None:
    with pytest.raises(TypeError, match="the candidate zones are its keys"):
        cp.carbonaware_run_deployment({"aws:eu-west-1": "a/b"}, provider="aws", region="eu-west-1")
    with pytest.raises(ValueError, match="unknown provider"):
        cp.carbonaware_run_deployment({"mars:x": "a/b"})
    with pytest.raises(TypeError, match="must be a name"):
        cp.carbonaware_run_deployment({"aws:eu-west-1": 42})
    with pytest.raises(ValueError, match="empty"):
        cp.carbonaware_run_deployment({})


@pytest.mark.parametrize("options", [{"zones": ["aws:eu-north-1"]}, {"zones": "aws:eu-north-1", "home": False}])
def test_the_decorator_and_the_delay_task_refuse_zones(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="carbonaware_run_deployment") as raised:
        cp.carbonaware_delay_decorator(WINDOW, DURATION, "aws", "eu-west-1", **options)
    assert "reschedule_current_flow_run" in str(raised.value) and "cannot move" in str(raised.value)
    with pytest.raises(ValueError, match="carbonaware_run_deployment"):
        cp.carbonaware_delay_task(WINDOW, DURATION, "aws", "eu-west-1", **options)
    # time alone stays theirs: windows and a deadline are fine
    cp.carbonaware_delay_decorator(WINDOW, DURATION, "aws", "eu-west-1", deadline=START + 3 * HOUR, now=START)


@flow(name="q-handover")
def handover_flow(label: str) -> State | str:
    handed_over = cp.reschedule_current_flow_run(
        WINDOW, DURATION, "aws", "eu-west-1", zones={"aws:eu-north-1": "q-handover/q-nordic"}, source=per_zone,
        replan=False,
    )  # fmt: skip
    return handed_over if handed_over is not None else label


def test_a_deployment_run_hands_over_to_the_cleaner_zones_deployment() -> None:
    home = handover_flow.to_deployment(name="q-home").apply()
    nordic = handover_flow.to_deployment(name="q-nordic").apply()
    with get_client(sync_client=True) as client:
        current = client.create_flow_run_from_deployment(home, parameters={"label": "y"})
    state = run_flow(handover_flow, flow_run=current, parameters={"label": "y"}, return_type="state")
    assert state.is_completed() and state.name == "Rescheduled"
    assert "in aws:eu-north-1" in str(state.message)
    [later] = runs_of(nordic)
    assert later.parameters == {"label": "y"} and cp.RESCHEDULED_TAG in later.tags
    assert later.state is not None and later.state.state_details.scheduled_time == START + 2 * HOUR
    assert [run.id for run in runs_of(home)] == [current.id]  # nothing more in the home zone
    with pytest.raises(TypeError, match="maps each zone to the deployment"):
        cp.reschedule_current_flow_run(WINDOW, DURATION, "aws", "eu-west-1", zones=["aws:eu-north-1"])


def test_the_artifact_shows_the_time_only_saving_and_every_zone_escaped() -> None:
    """Issue 11, item 3: the artifact shows the saving of moving the start alone at home beside the saving of
    moving place and start; each candidate zone with its best start. A zone name from the caller is text."""
    now = datetime(2025, 6, 1, 12, tzinfo=timezone.utc)
    hour = timedelta(hours=1)

    def source(zone: object, start: datetime, end: datetime) -> list[ForecastPoint]:
        # home: 400 now, 300 from 14:00; the other zone: 100 all day; a third answers nothing usable
        region = getattr(zone, "region", "")
        if region == "eu-west-1":
            return [ForecastPoint(now + i * hour, now + (i + 1) * hour, 400.0 if i < 2 else 300.0) for i in range(8)]
        if region == "eu_north*1":
            return [ForecastPoint(now + i * hour, now + (i + 1) * hour, 100.0) for i in range(8)]
        raise ValueError("no data <b>here</b>")

    plan = core.plan_delay(
        timedelta(hours=6), hour, "aws", "eu-west-1", zones=["aws:eu_north*1", "aws:eu-west-3"], source=source, now=now
    )
    assert str(plan.zone) == "aws:eu_north*1" and plan.time_savings == pytest.approx(0.25)
    text = cp._render_markdown(plan)
    assert "| Savings, time only in aws\\:eu-west-1 | 25.0% |" in text
    assert "| Savings | 75.0% |" in text
    assert "| aws\\:eu\\_north\\*1 (chosen) | 2025-06-01T12:00:00Z | 100.0 gCO2eq/kWh |" in text
    assert "| aws\\:eu-west-1 | 2025-06-01T14:00:00Z | 300.0 gCO2eq/kWh |" in text
    assert "aws\\:eu-west-3 | - | - |" in text and "<b>" not in text
    # one zone: no such rows, the artifact as before
    single = cp._render_markdown(core.plan_delay(timedelta(hours=6), hour, "aws", "eu-west-1", source=source, now=now))
    assert "Savings, time only" not in single and "| Best start |" not in single
