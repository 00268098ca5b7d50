"""Issue 12, item 5: decorated tasks and the delay task on prefect-dask's DaskTaskRunner, with a real
``distributed.LocalCluster`` of worker processes, against a real Prefect server and Electricity Maps on loopback.

The settings (a ``CarbonAwareSettings`` block object holding the key) travel pickled with the task; each worker
process asks the provider once and plans from its own cache after that; logs and artifacts reach the flow run.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

pytest.importorskip("prefect_dask")

from prefect import flow, get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.context import FlowRunContext
from prefect_dask import DaskTaskRunner

from tests import prefect_helpers
from tests import prefect_native_helpers as helpers
from tests.fake_providers import EM_KEY, FakeElectricityMaps, assert_no_secrets, slots
from tests.loopback import serving

UTC = timezone.utc
HOUR = timedelta(hours=1)
ITEMS = 6


@pytest.fixture(scope="module", autouse=True)
def prefect_server() -> Iterator[str]:
    with prefect_helpers.prefect_server() as url:
        yield url


@pytest.fixture
def electricitymaps(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeElectricityMaps]:
    """Forecast from the current hour: dear, then cheap two hours later. The environment has no key at all, and
    the worker processes (started by the flow below) inherit the URL."""
    this_hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    with serving() as server:
        fake = FakeElectricityMaps(server, slots(this_hour, HOUR, [500.0, 450.0, 100.0] + [500.0] * 80))
        fake.clock = lambda: datetime.now(UTC)
        monkeypatch.setenv("ELECTRICITYMAPS_API_URL", server.url)
        monkeypatch.delenv("ELECTRICITYMAPS_API_KEY", raising=False)
        yield fake


def test_decorated_tasks_and_the_delay_task_run_on_dask_worker_processes(electricitymaps: FakeElectricityMaps) -> None:
    cluster = {"n_workers": 2, "threads_per_worker": 1, "processes": True, "host": "127.0.0.1"}
    runner = DaskTaskRunner(cluster_kwargs={**cluster, "dashboard_address": None})  # loopback only

    @flow(name="carbonaware-on-dask", task_runner=runner)
    def pipeline() -> tuple[Any, list[tuple[int, int]], dict[str, Any], bool]:
        ctx = FlowRunContext.get()
        assert ctx is not None and ctx.flow_run is not None
        results = helpers.on_a_worker_with_block.map(list(range(ITEMS))).result()
        plan = helpers.delay_on_a_worker.submit().result()
        return ctx.flow_run.id, results, plan, helpers.sends_reports_before_returning.submit().result()

    import os

    flow_run_id, results, plan, sends_before_returning = pipeline()
    assert sends_before_returning  # a worker process may be ended early: its runs send their reports at their end
    pids = {pid for _item, pid in results}
    assert sorted(item for item, _pid in results) == list(range(ITEMS))
    assert os.getpid() not in pids and len(pids) >= 1  # ran in worker processes, not here
    assert plan["reason"] == "dry-run" and plan["source"] == "electricitymaps"
    assert plan["delay_seconds"] > 3600  # the forecast's cheap hour, planned on a worker
    # One request per worker process that planned: the tasks' processes, plus the delay task's if another.
    headers = [seen.headers.get("auth-token") for seen in electricitymaps.calls]
    assert headers and set(headers) == {EM_KEY}  # the pickled block's key reached the provider
    assert len(headers) <= 2  # two worker processes: never one request per task
    with get_client(sync_client=True) as client:
        logs = [e.message for e in client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))]
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["carbonaware-on-a-worker-with-block"]))
        )
    decisions = [line for line in logs if line.startswith("carbonaware: would wait")]
    assert len(decisions) == ITEMS + 1, logs  # every task's decision, in the flow run's logs
    assert {a.flow_run_id for a in artifacts} == {flow_run_id}
    # alike decisions of one flow run are published once per worker process (issue 10: one artifact per decision,
    # not per mapped task run), so at least one and at most one per task
    assert 1 <= len(artifacts) <= ITEMS, [a.description for a in artifacts]
    assert_no_secrets(*logs, *(str(a.data) for a in artifacts))


def test_in_the_flows_own_process_reports_stay_off_the_runs_path() -> None:
    """Only runs that a distributed runner sent to another process send their reports before returning; tasks in
    the flow's own threads (and direct calls) leave them to the background publisher."""

    @flow(name="carbonaware-threads")
    def threads() -> tuple[bool, bool]:
        return helpers.sends_reports_before_returning.submit().result(), helpers.sends_reports_before_returning()

    assert threads() == (False, False)
