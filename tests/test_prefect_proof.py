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

import pytest
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.context import TaskRunContext
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
        related = [(r.role, r.id) for r in event.related]  # exactly the two runs: nothing Prefect adds in a run
        assert len(related) == 2 and related[0] == ("flow-run", f"prefect.flow-run.{flow_run_id}")
        assert related[1][0] == "task-run" and related[1][1].startswith("prefect.task-run.")
        task_runs.add(related[1][1])
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
    # the API the publisher sends artifacts and events to: refused
    monkeypatch.setattr(cp, "_configured_api_url", lambda: f"http://{refused_host()}/api")

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
    assert any("could not emit carbonaware.decision" in w and "ConnectError" in w for w in warnings)


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


def test_decisions_the_prefect_layer_makes_are_proved_like_the_cores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retry that runs at once, no room before a timeout, an internal error, and a wait switched off by a
    Variable: each in the ledger (with its outcome), in the table artifact and as an event, like any decision."""
    from prefect.variables import Variable

    ledger = str(tmp_path / "layer.jsonl")
    settings: dict[str, Any] = {"window": timedelta(hours=6), "duration": HOUR, "source": valley, "grid_zone": "DE"}
    attempts: list[int] = []

    @task(name="proof-retried", retries=1, retry_delay_seconds=0)
    @cp.carbonaware_delay_decorator(power_kw=2.0, ledger=ledger, **settings)
    def retried() -> int:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("first attempt fails")
        return len(attempts)

    @task(name="proof-no-room", timeout_seconds=30)  # a 1 h job cannot fit: no wait
    @cp.carbonaware_delay_decorator(power_kw=2.0, ledger=ledger, **settings)
    def no_room() -> str:
        return "ran"

    @task(name="proof-broken-settings")
    @cp.carbonaware_delay_decorator(ledger=ledger, **settings)
    def broken() -> str:
        return "ran"

    @task(name="proof-switched-off")
    @cp.carbonaware_delay_decorator(ledger=ledger, **settings)
    def switched_off() -> str:
        return "ran"

    @flow(name="proof-layer-flow")
    def run() -> Any:
        from prefect.runtime import flow_run

        return retried(), no_room(), broken(), switched_off(), UUID(flow_run.id)

    real_configure = cp._configure

    def configure(config: Any, options: Any, *args: Any) -> Any:
        ctx = TaskRunContext.get()
        if ctx is not None and ctx.task.name == "proof-broken-settings":
            raise RuntimeError("configuration broke")
        return real_configure(config, options, *args)

    monkeypatch.setenv("CARBONAWARE_DRY_RUN", "1")  # the core's own decisions: the plan, no wait
    monkeypatch.setattr(cp, "_configure", configure)
    cp._CONFIG_CACHE.clear()
    Variable.set(cp.VARIABLE_DISABLE, False, overwrite=True)
    try:
        cp._CONFIG_CACHE.clear()
        *values, flow_run_id = run()
        assert values == [2, "ran", "ran", "ran"]
        Variable.set(cp.VARIABLE_DISABLE, True, overwrite=True)
        cp._CONFIG_CACHE.clear()

        @flow(name="proof-layer-flow")
        def again() -> Any:
            from prefect.runtime import flow_run

            return switched_off(), UUID(flow_run.id)

        ran, second_flow_run_id = again()
        assert ran == "ran"
    finally:
        Variable.unset(cp.VARIABLE_DISABLE)
        cp._CONFIG_CACHE.clear()
    assert cp.flush_reports(60.0)

    records = core.read_ledger(ledger)
    decisions = {r["id"]: r["plan"] for r in records if r["kind"] == "decision"}
    outcomes = [r for r in records if r["kind"] == "outcome"]
    details = sorted((plan["reason"], plan["detail"].split(":")[0]) for plan in decisions.values())
    assert [detail for detail in details if detail[0] != "dry-run"] == [
        ("disabled", "attempt 2 of proof-retried"),
        ("disabled", "no room before the timeout for a wait and the 3600s job"),
        ("disabled", "the Prefect Variable carbonaware_disable is set"),
        ("source-failed", "internal error"),
    ], details
    assert [detail[0] for detail in details].count("dry-run") == 2  # the first attempt; switched_off before
    assert {o["decision"] for o in outcomes} == set(decisions)  # every decision's job ran: six outcomes
    assert len(outcomes) == 6
    retry = next(p for p in decisions.values() if p["detail"].startswith("attempt 2"))
    assert retry["energy_kwh"] == 2.0 and retry["avoided_g"] is None  # energy known, no forecast: grams unknown
    assert all(plan["grid_zone"] == "DE" for plan in decisions.values())  # the zone the events are about

    with get_client(sync_client=True) as client:
        keys = [f"carbonaware-proof-{name}-decisions" for name in ("retried", "no-room", "broken-settings")]
        tables = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
    mine = [a for a in tables if a.flow_run_id == flow_run_id]
    rows = [(json.loads(a.data) if isinstance(a.data, str) else a.data)[0] for a in mine]
    assert sorted(a.key for a in mine) == sorted([keys[0], *keys])  # the retried task: both attempts
    reasons = sorted(row["reason"] for row in rows)
    assert reasons == ["disabled", "disabled", "dry-run", "source-failed"]  # both attempts of the retried task
    assert {row["decision"] for row in rows} <= set(decisions)

    found = poll(lambda: events_of(flow_run_id) + events_of(second_flow_run_id), lambda e: len(e) >= 12)
    decision_events = [e for e in found if e.event == cp.DECISION_EVENT]
    assert sorted(e.payload["id"] for e in decision_events) == sorted(decisions)
    assert all(len(e.related) == 2 for e in found)


def test_one_key_per_deployment_lists_every_decision_about_it() -> None:
    """Runs of one deployment, asked for by name or by id, add to one table key's history; another deployment of
    the same flow has its own key."""
    from tests import prefect_helpers

    first_id = prefect_helpers.scheduled_flow.to_deployment(name="Proof History").apply()
    prefect_helpers.scheduled_flow.to_deployment(name="proof-other").apply()
    settings: dict[str, Any] = {"window": timedelta(hours=6), "duration": HOUR, "source": valley, "grid_zone": "DE"}

    @flow(name="proof-schedules")
    def schedules(deployment: str) -> UUID:
        from prefect.runtime import flow_run

        cp.carbonaware_run_deployment(deployment, parameters={"label": "x"}, **settings)
        return UUID(flow_run.id)

    by_name = [schedules("carbonaware-scheduled/Proof History") for _ in range(2)]
    by_id = schedules(str(first_id))
    other = schedules("carbonaware-scheduled/proof-other")
    assert cp.flush_reports(60.0)

    key = "carbonaware-deployment-carbonaware-scheduled-proof-history-decisions"
    with get_client(sync_client=True) as client:
        history = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
        others = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["carbonaware-deployment-carbonaware-scheduled-proof-other-decisions"])
            )
        )
    assert sorted(str(a.flow_run_id) for a in history) == sorted(map(str, [*by_name, by_id]))
    assert all(a.type == "table" for a in history)
    assert [a.flow_run_id for a in others] == [other]


def test_mapped_decisions_moments_apart_are_one_artifact() -> None:
    """Task runs of a ``.map`` decide moments apart: a start-now decision's start moves on and its intensities
    change in the third digit, which no artifact shows; a wait to another start is another decision."""
    base = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
    series = [ForecastPoint(base + (i - 1) * HOUR, base + i * HOUR, 300.0 + i) for i in range(12)]
    settings: dict[str, Any] = {"source": series, "grid_zone": "DE", "power_kw": 1.5}
    moments = [base + timedelta(minutes=45, seconds=s) for s in (0, 1.4, 7)]  # the job straddles 13:00
    now = [core.plan_delay(timedelta(hours=6), HOUR / 2, now=moment, **settings) for moment in moments]
    assert {plan.reason for plan in now} == {"already-best"} and len({plan.now for plan in now}) == 3
    assert len({cp._alike(plan, False) for plan in now}) == 1
    assert cp._alike(now[0], True) != cp._alike(now[0], False)  # a scheduled run's wording differs
    waits = [
        core.plan_delay(timedelta(hours=6), HOUR, source=valley(None, base + s * HOUR, base), now=base) for s in (0, 1)
    ]
    assert all(plan.waits for plan in waits) and waits[0].start != waits[1].start
    assert cp._alike(waits[0], False) != cp._alike(waits[1], False)


def test_artifact_false_switches_artifacts_and_events_off_not_the_ledger(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CARBONAWARE_DRY_RUN", "1")
    ledger = str(tmp_path / "quiet.jsonl")
    settings: dict[str, Any] = {"window": timedelta(hours=6), "duration": HOUR, "source": valley, "grid_zone": "DE"}

    @task(name="proof-quiet")
    @cp.carbonaware_delay_decorator(artifact=False, ledger=ledger, **settings)
    def quiet() -> str:
        return "ran"

    @task(name="proof-loud")  # the control: its two events show the flow run's events have arrived
    @cp.carbonaware_delay_decorator(**settings)
    def loud() -> str:
        return "ran"

    @flow(name="proof-quiet-flow")
    def run() -> Any:
        from prefect.runtime import flow_run

        return quiet(), loud(), UUID(flow_run.id)

    *values, flow_run_id = run()
    assert values == ["ran", "ran"]
    assert cp.flush_reports(60.0)
    assert [r["kind"] for r in core.read_ledger(ledger)] == ["decision", "outcome"]
    found = poll(lambda: events_of(flow_run_id), lambda e: len(e) >= 2)
    task_runs = {r.id for event in found for r in event.related if r.role == "task-run"}
    assert len(found) == 2 and len(task_runs) == 1  # the loud task's decision and outcome only


def test_the_publisher_builds_an_apis_settings_once_not_per_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building Prefect settings rereads the environment, profiles and dotenv files (tens of milliseconds): once a
    batch it was most of the publisher's CPU. Batches to the same API reuse them, still retrying a dead API once."""
    import threading

    from prefect.settings.models.root import Settings

    built: list[tuple[str, Any]] = []
    original = Settings.copy_with_update

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        settings = original(self, *args, **kwargs)
        built.append((threading.current_thread().name, settings))
        return settings

    monkeypatch.setattr(Settings, "copy_with_update", counted)
    cp._SETTINGS_FOR.clear()

    @task(name="proof-settings-once")
    @cp.carbonaware_delay_decorator(window=timedelta(hours=1), duration=HOUR, source=valley, grid_zone="DE")
    def job(i: int) -> int:
        return i

    @flow(name="proof-settings-once-flow")
    def run() -> list[int]:
        return job.map(range(3)).result()

    monkeypatch.setenv("CARBONAWARE_DRY_RUN", "1")
    for _ in range(3):  # three flow runs, each flushed: three batches at least
        assert run() == [0, 1, 2]
        assert cp.flush_reports(60.0)
    published = [settings for name, settings in built if name == "carbonaware-publisher"]
    assert len(published) == 1
    assert published[0].client.max_retries == 1
    assert published[0].api.url == cp._configured_api_url()
