"""Issue 10 in Prefect, on a real Prefect server queried through its API: a table artifact per decision under a
stable key, ``carbonaware.decision``/``carbonaware.outcome`` events with the grid zone as resource and the runs as
related resources, outcomes (runtime) in the ledger, and ``report --prefect`` reading them back."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from uuid import UUID

import prefect.events
import pytest
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter
from prefect.events.worker import EventsWorker

import carbonaware_core as core
import carbonaware_prefect as cp
from carbonaware_core import ForecastPoint
from tests.loopback import refused_host
from tests.prefect_helpers import prefect_server

UTC = timezone.utc
HOUR = timedelta(hours=1)


@pytest.fixture(scope="module", autouse=True)
def server() -> Iterator[str]:
    with prefect_server() as url:
        yield url


def valley(zone: Any, now: datetime, end: datetime) -> list[ForecastPoint]:
    """400 g/kWh for two hours from now, then 100: waiting two hours saves three quarters."""
    start = now.replace(minute=0, second=0, microsecond=0)
    return [ForecastPoint(start + i * HOUR, start + (i + 1) * HOUR, 400.0 if i < 2 else 100.0) for i in range(12)]


def poll(read: Any, ready: Any, seconds: float = 60.0) -> Any:
    """``read()`` until ``ready(result)``: the server persists events in batches, a few seconds after they arrive."""
    deadline = time.monotonic() + seconds
    while True:
        result = read()
        if ready(result) or time.monotonic() > deadline:
            return result
        time.sleep(0.5)


def events_of(flow_run_id: Any) -> list[Any]:
    event_filter = EventFilter(
        event=EventNameFilter(name=[cp.DECISION_EVENT, cp.OUTCOME_EVENT]),
        related=EventRelatedFilter(id=[f"prefect.flow-run.{flow_run_id}"]),
    )
    with get_client(sync_client=True) as client:
        return list(client.read_events(filter=event_filter, limit=50).events)


def test_table_artifacts_events_and_outcomes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CARBONAWARE_DRY_RUN", "1")  # the plan it would follow, no wait
    ledger = str(tmp_path / "prefect.jsonl")
    settings: dict[str, Any] = {"window": timedelta(hours=6), "duration": HOUR, "source": valley, "grid_zone": "DE"}

    @task(name="proof-task")
    @cp.carbonaware_delay_decorator(power_kw=2.0, ledger=ledger, **settings)
    def job(item: int) -> int:
        return item * 2

    @task(name="proof-task")  # the same key, another decision: 3 kW
    @cp.carbonaware_delay_decorator(power_kw=3.0, ledger=ledger, **settings)
    def bigger(item: int) -> int:
        return item * 3

    @flow(name="proof-flow")
    def run() -> Any:
        from prefect.runtime import flow_run

        mapped = job.map(range(5)).result()  # five alike decisions: one artifact
        return [*mapped, bigger(1), UUID(flow_run.id)]

    *values, flow_run_id = run()
    assert values == [0, 2, 4, 6, 8, 3]
    assert cp.flush_reports(60.0)
    EventsWorker.drain_all(timeout=30.0)

    records = core.read_ledger(ledger)
    decisions = [r for r in records if r["kind"] == "decision"]
    outcomes = [r for r in records if r["kind"] == "outcome"]
    assert len(decisions) == 6 and len(outcomes) == 6
    assert {o["decision"] for o in outcomes} == {d["id"] for d in decisions}
    assert sorted(d["plan"]["avoided_g"] for d in decisions) == [600.0] * 5 + [900.0]
    assert all(d["plan"]["reason"] == "dry-run" for d in decisions)

    with get_client(sync_client=True) as client:
        key = ArtifactFilterKey(any_=["carbonaware-proof-task-decisions"])
        artifacts = [a for a in client.read_artifacts(artifact_filter=ArtifactFilter(key=key))]
        markdown = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["carbonaware-proof-task"]))
        )
    mine = [a for a in artifacts if a.flow_run_id == flow_run_id]
    assert len(mine) == 2 and all(a.type == "table" and a.task_run_id is not None for a in mine)
    rows = [(json.loads(a.data) if isinstance(a.data, str) else a.data)[0] for a in mine]
    rows.sort(key=lambda row: row["energy_kwh"])
    assert [(r["zone"], r["signal"], r["g_if_now"], r["g_at_start"], r["g_avoided"]) for r in rows] == [
        ("DE", "average", 800.0, 200.0, 600.0),
        ("DE", "average", 1200.0, 300.0, 900.0),
    ]
    assert 1 <= rows[0]["runs"] <= 5 and rows[1]["runs"] == 1
    assert {r["decision"] for r in rows} <= {d["id"] for d in decisions}
    assert len([a for a in markdown if a.flow_run_id == flow_run_id]) == 2  # the markdown ones: alike too

    found = poll(lambda: events_of(flow_run_id), lambda e: len(e) >= 12)
    names = sorted(e.event for e in found)
    assert names == [cp.DECISION_EVENT] * 6 + [cp.OUTCOME_EVENT] * 6
    task_runs = set()
    for event in found:
        assert event.resource.id == "carbonaware.grid-zone.DE"
        # ours come first; after other flows in the session Prefect may attach a stray run too (known issue)
        ours = [(r.role, r.id) for r in event.related][:2]
        assert ours[0] == ("flow-run", f"prefect.flow-run.{flow_run_id}")
        assert ours[1][0] == "task-run" and ours[1][1].startswith("prefect.task-run.")
        task_runs.add(ours[1][1])
    assert len(task_runs) == 6  # every task run, each with its decision and outcome
    outcome_events = [e for e in found if e.event == cp.OUTCOME_EVENT]
    assert {e.payload["decision"] for e in outcome_events} == {d["id"] for d in decisions}
    assert all(e.payload["status"] == "pending" and e.payload["runtime_seconds"] >= 0 for e in outcome_events)

    until = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
    assert core.main(["report", "--prefect", "--no-resolve", "--json", "--since", "1h", "--until", until]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ledger"] == "prefect"
    assert report["by_zone"]["DE"]["decisions"] >= 6  # other tests' runs may be in the same hour
    assert report["by_zone"]["DE"]["predicted_avoided_g"] >= 5 * 600.0 + 900.0


def test_a_failing_api_costs_the_work_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CARBONAWARE_DRY_RUN", "1")

    def refuse(*_: Any, **__: Any) -> None:
        raise RuntimeError("API down")

    monkeypatch.setattr(
        cp, "_configured_api_url", lambda: f"http://{refused_host()}/api"
    )  # the artifacts' API: refused
    monkeypatch.setattr(prefect.events, "emit_event", refuse)

    @task(name="proof-broken")
    @cp.carbonaware_delay_decorator(window=timedelta(hours=1), duration=HOUR, source=valley, grid_zone="DE")
    def job() -> str:
        return "ran"

    @flow(name="proof-broken-flow")
    def run() -> str:
        return job()

    assert run() == "ran"
    assert cp.flush_reports(30.0)
    warnings = [r.getMessage() for r in caplog.records if "could not" in r.getMessage()]
    assert any("could not create artifact 'carbonaware-proof-broken'" in w and "ConnectError" in w for w in warnings)
    assert any("could not emit carbonaware.decision" in w for w in warnings)


def test_the_markdown_artifact_shows_grams_only_when_known() -> None:
    now = datetime(2025, 6, 1, tzinfo=UTC)
    settings: dict[str, Any] = {"source": valley(None, now, now), "now": now, "grid_zone": "DE"}
    with_power = core.plan_delay(timedelta(hours=6), HOUR, power_kw=2.0, **settings)
    text = cp._render_markdown(with_power)
    assert "| Energy | 2 kWh (2 kW) |" in text
    assert "| Grams now / at start / avoided (average) | 800 g / 200 g / 600 g |" in text
    assert "Grams" not in cp._render_markdown(core.plan_delay(timedelta(hours=6), HOUR, **settings))


def test_the_decorator_outside_prefect_records_the_bodys_runtime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.fake_providers import fake_clock

    clock = fake_clock(monkeypatch, datetime(2025, 6, 1, 12, 0, tzinfo=UTC))
    monkeypatch.setenv("CARBONAWARE_DRY_RUN", "1")
    ledger = str(tmp_path / "plain.jsonl")

    @cp.carbonaware_delay_decorator(window=timedelta(hours=6), duration=HOUR, source=valley, grid_zone="DE",
                                    power_kw=4.0, ledger=ledger)  # fmt: skip
    def body() -> str:
        clock.advance(90.0)  # the job takes 90 s
        raise RuntimeError("the job failed")  # a failed job still ran, and drew power

    with pytest.raises(RuntimeError, match="the job failed"):
        body()
    decision, outcome = core.read_ledger(ledger)
    assert outcome["decision"] == decision["id"] and outcome["runtime_seconds"] == 90.0
    assert outcome["started"] == "2025-06-01T12:00:00Z" and outcome["energy_kwh"] == pytest.approx(0.1)
