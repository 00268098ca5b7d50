"""Issue 10: realised outcomes from measured history (Electricity Maps, NESO, WattTime /v3/historical) on loopback
servers speaking each provider's format; late data stays pending; failures end as a labelled offline estimate;
``report`` completes pending outcomes and its totals match an independent sum."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

import carbonaware_core as core
from carbonaware_core import ForecastPoint, Source, SourceError
from tests.fake_providers import (
    LBS_PER_MWH_IN_G_PER_KWH,
    FakeWattTime,
    assert_no_secrets,
    fake_clock,
    query_params,
)
from tests.fake_providers import install as install_provider
from tests.loopback import FakeClock, LoopbackServer, Reply, Seen
from tests.test_sources_actuals import EmActuals, NesoActuals, install

UTC = timezone.utc
NOW = datetime(2025, 6, 1, 12, 20, tzinfo=UTC)
HOUR0 = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)
HALF = timedelta(minutes=30)
CALLED = HOUR0 - 10 * HOUR  # 02:00, when the caller asked
MEASURED = {CALLED + i * HOUR: v for i, v in enumerate([300.0, 280.0, 120.0, 90.0, 200.0, 250.0])}


@pytest.fixture(autouse=True)
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    return fake_clock(monkeypatch, NOW)


def planned(now: datetime = CALLED, grid_zone: str = "DE", power_kw: float | None = 2.0, **options: Any) -> core.Plan:
    """A plan made at ``now`` that waits two hours (a forecast valley at +2 h)."""
    forecast = [ForecastPoint(now + i * HOUR, now + (i + 1) * HOUR, 50.0 if i == 2 else 400.0) for i in range(8)]
    settings: dict[str, Any] = {"source": forecast, "now": now, "grid_zone": grid_zone, "power_kw": power_kw}
    settings.update(options)
    result = core.plan_delay(timedelta(hours=6), HOUR, **settings)
    assert result.delay == 2 * HOUR
    return result


def weighted(values: dict[datetime, float], period: timedelta, start: datetime, end: datetime) -> float:
    """Independent time-weighted mean over [start, end) of step values, by the minute."""
    minutes = int((end - start) / timedelta(minutes=1))
    samples = []
    for m in range(minutes):
        moment = start + timedelta(minutes=m)
        slot = max(k for k in values if k <= moment)
        assert moment < slot + period
        samples.append(values[slot])
    return sum(samples) / len(samples)


# ---- Electricity Maps -----------------------------------------------------------------------------------------


@pytest.fixture
def em(server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> EmActuals:
    return install(EmActuals(server, dict(MEASURED)), monkeypatch)


def test_measured_outcome_from_electricitymaps_history(em: EmActuals, tmp_path: Path) -> None:
    plan = planned()
    started = CALLED + 2 * HOUR + HALF  # half an hour late: the realised run straddles two hours
    outcome = core.record_outcome(plan, started, started + HOUR, ledger=tmp_path / "l.jsonl")
    assert outcome.status == "pending" and outcome.decision == plan.id
    done = core.resolve_outcome(outcome, timeout=5.0)

    actual = weighted(MEASURED, HOUR, started, started + HOUR)  # 105
    counterfactual = weighted(MEASURED, HOUR, CALLED, CALLED + HOUR)  # 300
    assert done.status == "measured" and done.source == "electricitymaps"
    assert done.actual == pytest.approx(actual) and done.counterfactual == pytest.approx(counterfactual)
    assert done.emissions_g == pytest.approx(actual * 2.0) and done.emissions_now_g == pytest.approx(600.0)
    assert done.avoided_g == pytest.approx((counterfactual - actual) * 2.0)
    assert done.savings == pytest.approx((counterfactual - actual) / counterfactual)
    assert query_params(em.calls[0])["zone"] == "DE"
    record = done.to_record()
    assert record["signal"] == "average" and record["status"] == "measured" and record["decision"] == plan.id


def test_a_worse_realised_start_gives_negative_savings(em: EmActuals) -> None:
    plan = planned()
    started = CALLED + 4 * HOUR  # started later than planned: 200 against 300 at once
    done = core.resolve_outcome(core.record_outcome(plan, started, started + HOUR))
    assert done.savings == pytest.approx((300 - 200) / 300)
    em.values[CALLED] = 150.0  # now the counterfactual hour was cleaner than the realised one
    core.clear_cache()
    done = core.resolve_outcome(core.record_outcome(plan, started, started + HOUR))
    assert done.savings is not None and done.savings < 0 and done.avoided_g == pytest.approx((150 - 200) * 2.0)


def test_late_data_stays_pending_then_completes(em: EmActuals, clock: FakeClock) -> None:
    late_called = HOUR0 - 3 * HOUR
    plan = planned(now=late_called)
    started = late_called + 2 * HOUR
    outcome = core.record_outcome(plan, started, started + HOUR)
    for offset in range(-3, 0):
        em.values.pop(HOUR0 + offset * HOUR, None)
    em.values[late_called] = 310.0  # the counterfactual hour is published, the run's is not
    pending = core.resolve_outcome(outcome, timeout=5.0)
    assert pending.status == "pending" and "not all of the run is published yet" in pending.detail
    em.values[started] = 95.0  # published late
    done = core.resolve_outcome(pending, timeout=5.0)
    assert (done.status, done.actual, done.counterfactual) == ("measured", 95.0, 310.0)


def test_a_failing_source_stays_pending_then_becomes_a_labelled_estimate(
    em: EmActuals, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    em.fault = Reply(500, {"error": "down"})
    plan = planned()
    started = CALLED + 2 * HOUR
    outcome = core.record_outcome(plan, started, started + HOUR)
    pending = core.resolve_outcome(outcome, timeout=5.0)
    assert pending.status == "pending" and "electricitymaps" in pending.detail
    clock.advance(core.OUTCOME_PATIENCE.total_seconds())
    estimate = core.resolve_outcome(pending, timeout=5.0)
    assert estimate.status == "estimate" and estimate.source == "offline"
    assert "estimate from the offline model" in estimate.detail and "HTTP 500" in estimate.detail
    model = core.offline_model()
    typical = core.profile_series(model["zones"]["DE"], model["kind"], CALLED, CALLED + 4 * HOUR)
    assert estimate.actual == pytest.approx(core.interval_mean(typical, started, started + HOUR))
    assert estimate.counterfactual == pytest.approx(core.interval_mean(typical, CALLED, CALLED + HOUR))
    assert_no_secrets(estimate.detail, pending.detail, *(r.getMessage() for r in caplog.records))


def test_final_resolution_of_an_unknown_zone_stays_pending(em: EmActuals) -> None:
    em.fault = Reply(404, {"error": "zone unknown"})
    plan = planned(grid_zone="XX-NOWHERE")
    outcome = core.record_outcome(plan, CALLED + 2 * HOUR, CALLED + 3 * HOUR)
    still = core.resolve_outcome(outcome, timeout=5.0, final=True)
    assert still.status == "pending" and "no estimate either" in still.detail


def test_no_source_answers_without_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ELECTRICITYMAPS_API_KEY", raising=False)
    outcome = core.record_outcome(planned(), CALLED + 2 * HOUR, CALLED + 3 * HOUR)
    assert core.resolve_outcome(outcome, timeout=1.0).status == "pending"


def test_a_broken_reader_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(*_: Any) -> Any:
        raise RuntimeError("reader bug")

    broken = Source("electricitymaps", lambda q: core.Forecast(()), actuals=explode)
    monkeypatch.setitem(core.SOURCES, "electricitymaps", broken)
    outcome = core.record_outcome(planned(), CALLED + 2 * HOUR, CALLED + 3 * HOUR)
    assert "reader bug" in core.resolve_outcome(outcome, timeout=1.0).detail


# ---- NESO -------------------------------------------------------------------------------------------------------


def test_measured_outcome_from_neso_actuals(server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> None:
    values: dict[datetime, tuple[float | None, float | None]] = {}
    halves: dict[datetime, float] = {}
    for i in range(16):
        moment = CALLED + i * HALF
        halves[moment] = 200.0 - 10 * i
        values[moment] = (999.0, halves[moment])  # forecasts must not be read as measurements
    neso = install(NesoActuals(server, values), monkeypatch)
    plan = planned(grid_zone="GB")
    started = CALLED + 2 * HOUR + timedelta(minutes=10)
    done = core.resolve_outcome(core.record_outcome(plan, started, started + HOUR), timeout=5.0)
    assert done.status == "measured" and done.source == "ukgrid" and neso.calls
    assert done.actual == pytest.approx(weighted(halves, HALF, started, started + HOUR))
    assert done.counterfactual == pytest.approx(weighted(halves, HALF, CALLED, CALLED + HOUR))


def test_neso_is_never_asked_about_another_grid(server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> None:
    neso = install(NesoActuals(server, {CALLED: (1.0, 1.0)}), monkeypatch)
    core.resolve_outcome(core.record_outcome(planned(grid_zone="DE"), CALLED, CALLED + HOUR), timeout=1.0)
    assert neso.calls == []


# ---- WattTime /v3/historical ----------------------------------------------------------------------------------


class WattTimeHistory(FakeWattTime):
    """Adds ``GET /v3/historical?region=&start=&end=&signal_type=co2_moer`` (the forecast's shape, past periods)."""

    def __init__(self, server: LoopbackServer, moer: dict[datetime, float]) -> None:
        super().__init__(server)
        self.moer = moer
        self.history_calls: list[Seen] = []
        server.route("GET", "/v3/historical", self._historical)

    def _historical(self, seen: Seen) -> Reply:
        self.history_calls.append(seen)
        refused = self.refuse(seen)
        if refused is not None:
            return refused
        params = query_params(seen)
        first, last = (datetime.fromisoformat(params[k].replace("Z", "+00:00")) for k in ("start", "end"))
        data = [{"point_time": t.isoformat(), "value": v} for t, v in sorted(self.moer.items()) if first <= t < last]
        meta = {"data_point_period_seconds": 300, "region": params["region"], "signal_type": "co2_moer",
                "units": "lbs_co2_per_mwh"}  # fmt: skip
        return Reply(200, {"data": data, "meta": meta})


def test_measured_outcome_from_watttime_historical(server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> None:
    five = timedelta(minutes=5)
    moer = {CALLED + i * five: 1000.0 - 3 * i for i in range(12 * 5)}
    wt = install_provider(WattTimeHistory(server, moer), monkeypatch)
    plan = replace(planned(grid_zone="US-CAL-CISO"), source="watttime")  # as if WattTime had planned it
    started = CALLED + 2 * HOUR
    done = core.resolve_outcome(core.record_outcome(plan, started, started + HOUR), timeout=5.0)
    assert done.status == "measured" and done.source == "watttime" and done.unit == "gCO2/kWh (marginal)"
    grams = {t: v * LBS_PER_MWH_IN_G_PER_KWH for t, v in moer.items()}
    assert done.actual == pytest.approx(weighted(grams, five, started, started + HOUR))
    assert done.counterfactual == pytest.approx(weighted(grams, five, CALLED, CALLED + HOUR))
    assert done.to_record()["signal"] == "marginal"
    (call,) = wt.history_calls
    assert query_params(call)["region"] == "CAISO_NORTH" and query_params(call)["signal_type"] == "co2_moer"
    assert_no_secrets(done.detail)


def test_watttime_history_out_of_scope_is_a_source_error(
    server: LoopbackServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_provider(WattTimeHistory(server, {}), monkeypatch)
    monkeypatch.setenv("WATTTIME_REGION", "PJM_DC")  # a free account's scope is CAISO_NORTH
    with pytest.raises(SourceError, match=r"refused the history for PJM_DC \(HTTP 403"):
        core.fetch_actuals("watttime", None, CALLED, CALLED + HOUR, timeout=5.0)


def test_watttime_history_empty_is_a_source_error(server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> None:
    install_provider(WattTimeHistory(server, {}), monkeypatch)
    with pytest.raises(SourceError):
        core.fetch_actuals("watttime", None, CALLED, CALLED + HOUR, grid_zone="US-CAL-CISO", timeout=5.0)


# ---- record_outcome's arguments ---------------------------------------------------------------------------------


def test_record_outcome_argument_errors() -> None:
    plan = planned()
    with pytest.raises(ValueError, match="aware"):
        core.record_outcome(plan, datetime(2025, 1, 1), NOW)
    with pytest.raises(ValueError, match="before"):
        core.record_outcome(plan, NOW, NOW - HOUR)


def test_record_outcome_never_fetches(server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> None:
    em = install(EmActuals(server, dict(MEASURED)), monkeypatch)
    core.record_outcome(planned(), CALLED + 2 * HOUR, CALLED + 3 * HOUR)
    assert em.calls == []


# ---- report -----------------------------------------------------------------------------------------------------


def test_report_completes_pending_outcomes_and_sums_match(
    em: EmActuals, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "report.jsonl"
    runs = [(CALLED, 2 * HOUR), (CALLED, 4 * HOUR), (CALLED + HOUR, HOUR)]
    for called, late in runs:
        plan = planned(now=called, ledger=path)
        core.record_outcome(plan, called + late, called + late + HOUR, ledger=path)
    planned(now=CALLED, grid_zone="XX-NOWHERE", ledger=path)  # no outcome recorded for this one
    planned(now=NOW - timedelta(days=40), ledger=path)  # outside the period
    assert core.main(["report", "--ledger", str(path), "--json", "--until", "2025-06-01T12:20:00Z"]) == 0
    report = json.loads(capsys.readouterr().out)

    records = core.read_ledger(str(path))
    completed = [r for r in records if r["kind"] == "outcome" and r["status"] == "measured"]
    assert len(completed) == 3  # written back: the next report need not ask
    expected_realised = 0.0
    negative = 0
    for called, late in runs:
        actual = MEASURED[called + late]
        now_value = MEASURED[called]
        expected_realised += (now_value - actual) * 2.0
        negative += actual > now_value
    in_period = [r for r in records if r["kind"] == "decision" and r["called_at"] >= "2025-05-02"]
    total = report["total"]
    assert total["decisions"] == len(in_period) == 4
    assert total["waits"] == 4 and total["hours_waited"] == pytest.approx(8.0)
    assert total["predicted_avoided_g"] == pytest.approx(sum(r["plan"]["avoided_g"] for r in in_period), abs=0.1)
    assert total["measured_avoided_g"] == pytest.approx(expected_realised, abs=0.1)
    assert total["outcomes_measured"] == 3 and total["outcomes_pending"] == 0
    assert total["negative_share"] == pytest.approx(negative / 3, abs=1e-4)
    assert total["kwh"] == pytest.approx(3 * 2.0 + 2.0)  # three measured runs of an hour, one planned hour
    assert set(report["by_zone"]) == {"DE", "XX-NOWHERE"} and report["by_zone"]["DE"]["decisions"] == 3
    assert report["by_source"]["series"]["decisions"] == 4
    assert report["by_day"] == [{"day": "2025-06-01", "measured_avoided_g": pytest.approx(expected_realised, abs=0.1),
                                 "estimated_avoided_g": 0.0}]  # fmt: skip

    em.fault = Reply(500, {"error": "down"})  # a second report reads the completed records, asks nothing
    calls = len(em.calls)
    assert core.main(["report", "--ledger", str(path), "--until", "2025-06-01T12:20:00Z"]) == 0
    text = capsys.readouterr().out
    assert len(em.calls) == calls
    assert "total" in text and "zone DE" in text and "2025-06-01" in text and "#" in text


def test_report_without_a_ledger_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    assert core.main(["report"]) == 2
    assert "no ledger" in capsys.readouterr().err


def test_report_of_a_bad_period_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        core.main(["report", "--ledger", str(tmp_path / "x"), "--since", "yesterday-ish"])
    assert exit_info.value.code == 2


def test_report_skips_damage_and_foreign_zones_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "odd.jsonl"
    plan = planned(grid_zone="DE\x1b[2J\u202e", ledger=path)
    path.write_bytes(path.read_bytes() + b"{garbage\n")
    core.record_outcome(plan, CALLED + 2 * HOUR, CALLED + 3 * HOUR, ledger=path)
    assert core.main(["report", "--ledger", str(path), "--no-resolve", "--until", "2025-06-01T12:20:00Z"]) == 0
    text = capsys.readouterr().out
    assert "\x1b" not in text and "\u202e" not in text and "zone DE?" in text


def test_zone_with_history_sources_order() -> None:
    outcome = core.record_outcome(planned(grid_zone="GB"), CALLED, CALLED + HOUR)
    assert core._history_candidates(outcome) == ["electricitymaps", "ukgrid", "watttime"]
    wt = replace(outcome, planned_source="watttime")
    assert core._history_candidates(wt)[0] == "watttime"
    de = core.record_outcome(planned(grid_zone="DE"), CALLED, CALLED + HOUR)
    assert "ukgrid" not in core._history_candidates(de)
