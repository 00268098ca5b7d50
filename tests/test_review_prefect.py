"""Review of the Prefect layer after issue 8: a hostile provider, a careless user, an impatient operator.

Real Prefect server (test harness, session scoped), real loopback servers; nothing in the network stack is mocked.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from prefect import flow, get_client, task
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

import carbonaware_core
import carbonaware_prefect as cp
from carbonaware_core import Plan
from tests import prefect_helpers as helpers
from tests.loopback import Reply, serving

ZONE = {"provider": "aws", "region": "us-east-1"}


@pytest.fixture(scope="module")
def prefect_api() -> Iterator[str]:
    with helpers.prefect_server() as url:
        yield url


def artifacts_keyed(key: str) -> list[Any]:
    with get_client(sync_client=True) as client:
        return list(client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))))


def series_with_a_gap(now: datetime) -> list[dict[str, Any]]:
    """Five-minute points rising from now on (so now is best), one of them null: a gap, as providers send."""
    return [
        {
            "start": (now + timedelta(minutes=5 * i)).isoformat(),
            "end": (now + timedelta(minutes=5 * (i + 1))).isoformat(),
            "value": None if i == 30 else 100.0 + i,
        }
        for i in range(-1, 72)
    ]


# --------------------------------------------------------------------------------------------------------------
# A gap in a provider's series must cost neither the artifact nor the user's own hook (items 4 and 17)
# --------------------------------------------------------------------------------------------------------------


def test_a_series_with_a_gap_still_gives_the_artifact_and_the_users_hook(
    prefect_api: str, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[Plan] = []
    with serving() as server:
        server.route("GET", "/forecast.json", lambda _seen: Reply(200, series_with_a_gap(datetime.now(timezone.utc))))

        @task(name="gappy-series")
        @cp.carbonaware_delay_decorator(
            window=timedelta(hours=4),
            duration=timedelta(minutes=30),
            source=f"url:{server.url}/forecast.json",
            on_plan=seen.append,
            **ZONE,
        )
        def job() -> str:
            return "ran"

        @flow
        def pipeline() -> str:
            return job()

        with caplog.at_level("WARNING", logger="carbonaware"):
            assert pipeline() == "ran"
    assert len(seen) == 1 and seen[0].reason == "already-best", seen  # the user's hook ran, once
    assert not [
        r.getMessage() for r in caplog.records if "hook failed" in r.getMessage() or "artifact" in r.getMessage()
    ]
    artifact = helpers.published_artifact("carbonaware-gappy-series")
    assert artifact is not None and artifact.data is not None
    assert "already-best" in artifact.data and "```text\ngCO2eq/kWh from url (" in artifact.data  # the chart is there


def test_any_failure_to_render_costs_one_warning_and_still_calls_the_users_hook(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_chart(plan: Plan, rows: int = 24, width: int = 40) -> str:
        raise ArithmeticError("a chart with a bug")

    monkeypatch.setattr(carbonaware_core, "render_chart", broken_chart)
    seen: list[Plan] = []
    hook = cp._artifact_hook("carbonaware-broken-chart", None, carbonaware_core.logger, seen.append)
    plan = carbonaware_core.immediate_plan("disabled", "a test", zone=carbonaware_core.CloudZone("aws", "us-east-1"))
    point = carbonaware_core.ForecastPoint(plan.start, plan.start + plan.window, 100.0)
    plan = replace(plan, forecast=(point,))  # a plan with a series to chart (none: no chart, issue 12)
    with caplog.at_level("WARNING", logger="carbonaware"):
        hook(plan)  # raises nothing
        assert cp.flush_reports(10)  # a plan that does not wait is rendered by the publisher, off the task's path
    assert seen == [plan]
    warnings = [r.getMessage() for r in caplog.records if r.name == "carbonaware"]
    assert warnings == [
        "carbonaware: could not create artifact 'carbonaware-broken-chart': ArithmeticError: a chart with a bug"
    ], warnings
