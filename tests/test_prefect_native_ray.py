"""Issue 12, item 5: decorated tasks and the delay task on prefect-ray's ``RayTaskRunner``, which starts a real
local Ray instance (its own worker processes) for the flow run and shuts it down at the end, against a real
Prefect server and Electricity Maps on loopback.

Ray pickles each task (the settings block object with it) to worker processes it started itself; each worker
process asks the provider once and plans from its own cache after that; logs and artifacts reach the flow run
even though Ray ends its workers when the flow returns.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("prefect_ray")

import ray
from prefect import flow, get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.context import FlowRunContext
from prefect_ray import RayTaskRunner

from tests import prefect_helpers
from tests import prefect_native_helpers as helpers
from tests.fake_providers import EM_KEY, FakeElectricityMaps, assert_no_secrets, query_params, slots
from tests.loopback import serving

UTC = timezone.utc
HOUR = timedelta(hours=1)
ITEMS = 6
KEYS = ("carbonaware-on-a-ray-worker", "carbonaware-on-a-ray-worker-async", "carbonaware-delay")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def prefect_server() -> Iterator[str]:
    with prefect_helpers.prefect_server() as url:
        yield url


@pytest.fixture
def electricitymaps(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeElectricityMaps]:
    """Forecast from the current hour: dear, then cheap two hours later. The environment has no key at all; the
    Ray instance (started by the flow below) and its worker processes inherit the URL and where to note which
    process planned (``tmp_path``)."""
    this_hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    with serving() as server:
        fake = FakeElectricityMaps(server, slots(this_hour, HOUR, [500.0, 450.0, 100.0] + [500.0] * 80))
        fake.clock = lambda: datetime.now(UTC)
        monkeypatch.setenv("ELECTRICITYMAPS_API_URL", server.url)
        monkeypatch.delenv("ELECTRICITYMAPS_API_KEY", raising=False)
        monkeypatch.setenv(helpers.PLANNED_IN, str(tmp_path))
        monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")  # Ray would report usage beyond loopback
        # One node, every port on 127.0.0.1: without this Ray binds all interfaces and names the machine's address
        # (``_node_ip_address="127.0.0.1"`` is not enough: Ray replaces a loopback address by that one).
        monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        yield fake


def ray_runner() -> RayTaskRunner:
    """A local Ray instance of two CPUs, small and without a dashboard, whose workers import this
    checkout (not whatever ``carbonaware_prefect`` the environment has installed)."""
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    init = {
        "num_cpus": 2,
        "include_dashboard": False,
        "object_store_memory": 80 * 1024 * 1024,  # Ray's minimum is 75 MiB
        "runtime_env": {"env_vars": {"PYTHONPATH": path}},
    }
    return RayTaskRunner(init_kwargs=init)


@flow(name="carbonaware-on-ray", task_runner=ray_runner())
def pipeline() -> tuple[Any, str, list[tuple[int, int]], list[tuple[int, int]], dict[str, Any]]:
    """Module level: prefect-ray pickles the flow (in the run's context) along with every task."""
    ctx = FlowRunContext.get()
    assert ctx is not None and ctx.flow_run is not None
    where = ray.get(ray.remote(helpers.library_file).remote())
    results = helpers.on_a_ray_worker.map(list(range(ITEMS))).result()
    results_async = helpers.on_a_ray_worker_async.map(list(range(ITEMS))).result()
    plan = helpers.delay_on_a_ray_worker.submit().result()
    return ctx.flow_run.id, where, results, results_async, plan


def test_decorated_tasks_and_the_delay_task_run_on_ray_worker_processes(
    electricitymaps: FakeElectricityMaps, tmp_path: Path
) -> None:
    flow_run_id, where, results, results_async, plan = pipeline()
    assert where == os.path.realpath(os.path.join(ROOT, "carbonaware_prefect.py"))  # this checkout, on the workers
    assert sorted(item for item, _pid in results) == list(range(ITEMS))
    assert sorted(item for item, _pid in results_async) == list(range(ITEMS))
    assert plan["reason"] == "dry-run" and plan["source"] == "electricitymaps"
    assert plan["delay_seconds"] > 3600  # the forecast's cheap hour, planned on a worker
    # Every decision was made (and its on_plan hook called) in a worker process of Ray's, none here.
    planned_in = [int(name.split("-")[0]) for name in os.listdir(tmp_path)]
    assert len(planned_in) == 2 * ITEMS + 1
    assert {pid for _item, pid in results + results_async} <= set(planned_in)
    assert os.getpid() not in planned_in
    # Exactly one request per worker process that planned: each plans from its own cache after its first.
    assert len(electricitymaps.calls) == len(set(planned_in))
    assert {seen.headers.get("auth-token") for seen in electricitymaps.calls} == {EM_KEY}  # the pickled block's key
    assert {query_params(seen).get("zone") for seen in electricitymaps.calls} == {"DE"}  # the pickled grid zone
    with get_client(sync_client=True) as client:
        logs = [e.message for e in client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))]
        every_key = [*KEYS, *(f"{key}-decisions" for key in KEYS)]  # the markdown and the table artifacts
        with_keys = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=every_key)))
    # other tests' flows publish under the delay task's key too: only this flow run's artifacts count here
    artifacts = [a for a in with_keys if a.flow_run_id == flow_run_id]
    decisions = [line for line in logs if line.startswith("carbonaware: would wait")]
    assert len(decisions) == 2 * ITEMS + 1, logs  # every task's decision, in the flow run's logs
    assert {a.key for a in artifacts} == set(every_key), [(a.key, a.flow_run_id) for a in with_keys]
    # alike decisions of one flow run are published once per worker process, so at most one per task
    per_key = {key: sum(a.key == key for a in artifacts) for key in every_key}
    assert all(count <= (1 if key.startswith("carbonaware-delay") else ITEMS) for key, count in per_key.items())
    assert_no_secrets(*logs, *(str(a.data) for a in artifacts))
