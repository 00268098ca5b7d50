"""Issue 12, item 3: carbon-aware recurring deployments, end to end with a real ``serve`` runner on a real server.

A run is created as Prefect's scheduler creates a cron run (``Scheduled`` at the cron time); the runner starts it
in a subprocess; the flow (one decorator line) hands over to a run scheduled at the best start, which the same
runner starts then. The hosted scheduler on loopback decides; nothing in the network stack is mocked.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from prefect import get_client
from prefect.artifacts import Artifact
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, LogFilter, LogFilterFlowRunId
from prefect.client.schemas.objects import FlowRun
from prefect.runner import Runner
from prefect.states import Scheduled

import carbonaware_prefect as cp
from tests import prefect_helpers
from tests import prefect_native_helpers as helpers
from tests.loopback import LoopbackServer, Reply, Seen, serving
from tests.prefect_helpers import wait_for

UTC = timezone.utc
OFFSET = 8.0  # seconds from the request to the scheduler's ideal start: room for the runner to pick the run up


@pytest.fixture(scope="module", autouse=True)
def prefect_server() -> Iterator[str]:
    with prefect_helpers.prefect_server() as url:
        yield url


class Scheduler:
    """The hosted scheduler: the ideal start is ``OFFSET`` seconds after each request."""

    def __init__(self, server: LoopbackServer) -> None:
        self.server, self.ideals = server, []  # type: ignore[var-annotated]

    def __call__(self, seen: Seen) -> Reply:
        ideal = datetime.now(UTC) + timedelta(seconds=OFFSET)
        self.ideals.append(ideal)
        body = {
            "ideal": {"time": ideal.isoformat(), "zone": seen.json()["zones"][0], "co2_intensity": 500.0},
            "naive_case": {"time": seen.json()["windows"][0]["start"], "co2_intensity": 800.0},
            "carbon_savings": {"vs_naive_case": 37.5},
        }
        return Reply(200, body)


@pytest.fixture(scope="module")
def scheduler_server() -> Iterator[Scheduler]:
    with serving() as server:
        answer = Scheduler(server)
        server.route("POST", "/v0/schedule/", answer)
        yield answer


@pytest.fixture
def scheduler(scheduler_server: Scheduler, monkeypatch: pytest.MonkeyPatch) -> Scheduler:
    """Each test's environment (conftest isolates it per test) points the runs' subprocesses at the scheduler."""
    monkeypatch.setenv("CARBONAWARE_SCHEDULER_BASE_URL", scheduler_server.server.url)
    return scheduler_server


@pytest.fixture(scope="module")
def served(scheduler_server: Scheduler) -> Iterator[dict[str, Any]]:
    """One runner serving the three recurring flows (each deployment with a yearly cron schedule, so that the
    scheduler service creates no run near now); deployment ids by flow name."""
    loop = asyncio.new_event_loop()
    runner = Runner(query_seconds=1, prefetch_seconds=30, pause_on_shutdown=False)
    ids: dict[str, Any] = {}
    ready = threading.Event()

    async def main() -> None:
        for flow_obj in (helpers.nightly, helpers.nightly_async, helpers.nightly_no_source):
            deployment = await flow_obj.ato_deployment(name="nightly", cron="0 1 1 1 *")
            ids[flow_obj.name] = await runner.aadd_deployment(deployment)
        ready.set()
        await runner.start()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(90), "the runner did not register the deployments"
    yield ids
    asyncio.run_coroutine_threadsafe(runner.astop(), loop).result(timeout=30)
    thread.join(timeout=30)


def cron_run(deployment_id: Any, label: str, at: datetime) -> FlowRun:
    """A run as the scheduler creates it from the cron schedule: Scheduled at the cron time."""
    with get_client(sync_client=True) as client:
        return client.create_flow_run_from_deployment(
            deployment_id, parameters={"label": label}, state=Scheduled(scheduled_time=at)
        )


def runs_of(deployment_id: Any, label: str) -> list[FlowRun]:
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
    return sorted((r for r in runs if r.parameters.get("label") == label), key=lambda r: r.created or datetime.min)


def finished(deployment_id: Any, label: str, count: int) -> Callable[[], list[FlowRun] | None]:
    def check() -> list[FlowRun] | None:
        runs = runs_of(deployment_id, label)
        done = [r for r in runs if r.state is not None and r.state.is_final()]
        return runs if len(runs) == count and len(done) == count else None

    return check


def logs_of(flow_run_id: Any) -> list[str]:
    with get_client(sync_client=True) as client:
        return [
            entry.message for entry in client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        ]


@pytest.mark.parametrize(
    "name, artifact",
    [
        ("carbonaware-nightly", "carbonaware-deployment-carbonaware-nightly-nightly"),
        ("carbonaware-nightly-async", "nightly-async"),
    ],
)
def test_a_cron_run_hands_over_and_the_successor_runs_at_the_planned_start(
    served: dict[str, Any], scheduler: Scheduler, name: str, artifact: str
) -> None:
    asked_before = len(scheduler.ideals)
    first = cron_run(served[name], f"hand-{name}", datetime.now(UTC))
    cron, successor = wait_for(finished(served[name], f"hand-{name}", 2), 120, "the cron run and its successor")
    assert cron.id == first.id and cron.state.name == "Rescheduled" and cron.state.is_completed()
    assert cp.RESCHEDULED_TAG not in cron.tags and cp.RESCHEDULED_TAG in successor.tags
    assert successor.parameters == {"label": f"hand-{name}"} and successor.state.name == "Completed"
    planned = scheduler.ideals[asked_before]
    assert len(scheduler.ideals) == asked_before + 1  # the successor did not plan again
    assert successor.expected_start_time is not None
    assert abs(successor.expected_start_time.timestamp() - planned.timestamp()) < 1.0
    assert successor.start_time is not None and successor.start_time.timestamp() >= planned.timestamp() - 0.6
    decision = Artifact.get(artifact)
    assert decision is not None and "run scheduled" in str(decision.description)
    assert any("handed over to flow run" in line for line in logs_of(cron.id))


def test_every_source_failing_runs_the_cron_run_at_once(served: dict[str, Any], scheduler: Scheduler) -> None:
    deployment = served["carbonaware-nightly-no-source"]
    cron_run(deployment, "down", datetime.now(UTC))
    (only,) = wait_for(finished(deployment, "down", 1), 90, "the cron run")
    assert only.state.name == "Completed" and cp.RESCHEDULED_TAG not in only.tags
    lines = wait_for(lambda: [line for line in logs_of(only.id) if "source-failed" in line], 20, "the failure line")
    assert "every forecast source is down" in lines[0]


def test_a_run_started_after_its_margin_runs_at_once(served: dict[str, Any], scheduler: Scheduler) -> None:
    asked_before = len(scheduler.ideals)
    late = datetime.now(UTC) - helpers.WINDOW - timedelta(minutes=1)  # the runner was down through the margin
    cron_run(served["carbonaware-nightly"], "late", late)
    (only,) = wait_for(finished(served["carbonaware-nightly"], "late", 1), 90, "the late cron run")
    assert only.state.name == "Completed"
    assert len(scheduler.ideals) == asked_before  # nothing planned: the margin was over
    late_lines = lambda: [line for line in logs_of(only.id) if "after its scheduled time" in line]  # noqa: E731
    lines = wait_for(late_lines, 20, "the reason")
    assert "at the end of its 5m00s window" in lines[0]
