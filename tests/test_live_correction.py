"""Live correction: a forecast from recent actuals + the offline profile, when a forecast is refused (401/403) or
asked for as "live:<source>" -- on loopback servers speaking Electricity Maps' and NESO's wire formats, with an
offline model written for the test. Expected plans are computed here from the documented arithmetic and the
independent brute-force oracle, never by the library's own functions."""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import carbonaware_core
from carbonaware_core import Anomaly, ForecastPoint
from tests.fake_actuals import HALF, HOUR, EmActuals, NesoActuals, hourly, install
from tests.fake_providers import (
    EM_KEY,
    FakeElectricityMaps,
    Planner,
    assert_no_secrets,
    fake_clock,
    iso_z,
    oracle,
    path_of,
)
from tests.loopback import FakeClock, LoopbackServer, Reply

UTC = timezone.utc
NOW = datetime(2025, 6, 1, 12, 20, tzinfo=UTC)
HOUR0 = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
WINDOW = timedelta(hours=6)
DURATION = timedelta(hours=1)
DE = {"provider": "aws", "region": "eu-central-1"}


def typical(hour: int) -> float:
    """The test profile (UTC hour of day, every month): 300, with a shallow dip at 16:00 and a deep one at 23:00."""
    return {16: 270.0, 23: 150.0}.get(hour, 300.0)


@pytest.fixture(autouse=True)
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    return fake_clock(monkeypatch, NOW)


@pytest.fixture(autouse=True)
def model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    profile = [[typical(h) for h in range(24)] for _ in range(12)]
    document = {"format": 1, "kind": "month-hour-utc", "unit": "gCO2eq/kWh", "zones": {"DE": profile, "GB": profile}}
    path = tmp_path / "model.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    monkeypatch.setenv("CARBONAWARE_OFFLINE_DATA", str(path))
    return path


def yesterday_value(moment: datetime) -> float:
    """What was measured over the last day: 40 above typical by day, 20 below by night, except a dirty spike."""
    value = typical(moment.hour) + (40.0 if 6 <= moment.hour < 18 else -20.0)
    return value + (200.0 if moment.hour == 16 else 0.0)


def measured_day() -> dict[datetime, float | None]:
    """36 hours of measurements up to the hour under way (12:00, which the history also lists)."""
    return hourly(HOUR0 - 35 * HOUR, [yesterday_value(HOUR0 - (35 - i) * HOUR) for i in range(36)])


@pytest.fixture
def em(server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> FakeElectricityMaps:
    fake = FakeElectricityMaps(server, [], forecast_access=False)  # the free tier: no forecast
    install_env(fake.env(), monkeypatch)
    return fake


@pytest.fixture
def history(server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> EmActuals:
    fake: EmActuals = install(EmActuals(server, measured_day()), monkeypatch)
    return fake


def install_env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)


PLANNER = Planner(WINDOW, DURATION, {"source": "electricitymaps,offline", "now": NOW, **DE})
plan = PLANNER.plan


def expected_series(
    measured: dict[datetime, float | None], now: datetime = NOW
) -> list[tuple[datetime, datetime, float]]:
    """The documented arithmetic, written out: measured = the hours over by now within the last 24 h; each
    profile hour blended LIVE_YESTERDAY_WEIGHT with its measured hour a day earlier; the anomaly = mean of
    measured - blend over the last LIVE_SPAN; added with weight 0.5 ** (hours from the end of the measurements to
    the hour's midpoint / half-life)."""
    w = carbonaware_core.LIVE_YESTERDAY_WEIGHT
    half_life = carbonaware_core.LIVE_HALF_LIFE / HOUR
    span = round(carbonaware_core.LIVE_SPAN / HOUR)
    done = {t: v for t, v in measured.items() if v is not None and t + HOUR <= now and t >= now - timedelta(days=1)}
    until = max(done) + HOUR

    def blend(t: datetime) -> float:
        past = done.get(t - timedelta(days=1))
        return typical(t.hour) if past is None else (1 - w) * typical(t.hour) + w * past

    anomaly = sum(done[until - (k + 1) * HOUR] - blend(until - (k + 1) * HOUR) for k in range(span)) / span
    first = now.replace(minute=0, second=0, microsecond=0)
    out = []
    for k in range(int((WINDOW + DURATION) / HOUR) + 2):
        t = first + k * HOUR
        ahead = (t + HALF - until) / HOUR
        out.append((t, t + HOUR, max(0.0, blend(t) + anomaly * 0.5 ** (ahead / half_life))))
    return out


# ---- the automatic step: a refused forecast ---------------------------------------------------------------------


def test_refused_forecast_plans_with_recent_actuals(
    em: FakeElectricityMaps, history: EmActuals, caplog: pytest.LogCaptureFixture
) -> None:
    result = plan()

    assert len(em.calls) == 1 and len(history.calls) == 1
    assert path_of(history.calls[0]) == EmActuals.HISTORY
    assert history.calls[0].headers["auth-token"] == EM_KEY
    series = expected_series(measured_day())
    expected = oracle(series, NOW, WINDOW, DURATION)
    assert result.source == "electricitymaps+offline (live-corrected)"
    assert result.reason == "optimal"
    assert result.start == expected.start
    assert result.expected == pytest.approx(expected.value())
    assert result.now == pytest.approx(expected.now_value())
    assert result.grid_zone == "DE"
    assert result.fallbacks == ()
    assert "its forecast was refused" in result.detail and "HTTP 401" in result.detail
    assert "live-corrected" in result.detail and "(ODbL)" in result.detail
    assert result.to_dict()["source"] == "electricitymaps+offline (live-corrected)"
    _waited, lines = PLANNER.delay_logged(caplog)  # asserts no secret in any line, the detail or the dict
    assert "via electricitymaps+offline (live-corrected)" in lines[0].getMessage()


def test_the_correction_changes_the_decision(em: FakeElectricityMaps, history: EmActuals) -> None:
    """The profile alone would wait for 16:00 (270 < 300); yesterday's 16:00 spike, blended in, moves the choice."""
    offline = plan(source="offline")
    live = plan()
    assert offline.start == datetime(2025, 6, 1, 16, 0, tzinfo=UTC)
    assert live.start != offline.start
    assert live.start == oracle(expected_series(measured_day()), NOW, WINDOW, DURATION).start


@pytest.mark.parametrize("status", [401, 403])
def test_both_refusals_fall_back_to_actuals(server: LoopbackServer, history: EmActuals, status: int) -> None:
    server.route("GET", FakeElectricityMaps.PATH, Reply(status, {"message": "Your plan does not include forecast"}))
    assert plan().source == "electricitymaps+offline (live-corrected)"


def test_an_answered_forecast_is_used_as_before(
    server: LoopbackServer, history: EmActuals, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeElectricityMaps(server, [(HOUR0 + k * HOUR, 300.0 - k) for k in range(24)])
    install_env(fake.env(), monkeypatch)
    result = plan()
    assert result.source == "electricitymaps"
    assert history.calls == []


def test_other_forecast_failures_do_not_ask_for_actuals(server: LoopbackServer, history: EmActuals) -> None:
    server.route("GET", FakeElectricityMaps.PATH, Reply(500, b"Internal Server Error"))
    result = plan()
    assert result.source == "offline"
    assert history.calls == []


# ---- actuals failing too: the chain goes on ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "why"),
    [
        (Reply(500, b"Internal Server Error"), "HTTP 500"),
        (Reply(401, {"error": f"Invalid auth-token {EM_KEY}"}), "HTTP 401"),
        (Reply(200, b"{not json"), "live correction"),
        (Reply(200, {"zone": "DE", "history": []}), "no valid measurement"),
        (
            Reply(200, b'{"zone":"DE","history":[{"datetime":"2025-06-01T11:00:00Z","carbonIntensity":NaN}]}'),
            "no valid",
        ),
        (
            Reply(200, {"zone": "DE", "history": [{"datetime": "2025-06-01T11:00:00Z", "carbonIntensity": -3}]}),
            "no valid",
        ),
        (
            Reply(200, {"zone": "DE", "history": [{"datetime": "2025-06-01T13:00:00Z", "carbonIntensity": 90}]}),
            "no valid",
        ),
    ],
    ids=["500", "401-echoing-the-key", "garbage", "empty", "nan", "negative", "future-only"],
)
def test_actuals_failing_falls_back_to_offline(
    em: FakeElectricityMaps, history: EmActuals, caplog: pytest.LogCaptureFixture, fault: Reply, why: str
) -> None:
    history.fault = fault
    result, _lines = PLANNER.delay_logged(caplog)  # asserts no secret in any line, the detail or the dict
    assert result.source == "offline"
    assert result.reason == "optimal"
    (failure,) = result.fallbacks
    assert failure.startswith("electricitymaps: electricitymaps refused the key or this plan has no forecast access")
    assert "a live correction from its actuals failed too" in failure and why in failure
    assert_no_secrets(failure)


def test_stale_actuals_fall_back_to_offline(em: FakeElectricityMaps, history: EmActuals) -> None:
    """The newest measurement ended 7 h ago: yesterday's level must not pass for today's."""
    history.values = {t: v for t, v in measured_day().items() if t + HOUR <= NOW - timedelta(hours=7)}
    result = plan()
    assert result.source == "offline"
    assert "stale" in result.fallbacks[0]


def test_no_fallback_left_runs_now(em: FakeElectricityMaps, history: EmActuals) -> None:
    history.fault = Reply(500, b"down")
    result = plan(source="electricitymaps")
    assert result.reason == "source-failed" and result.delay == timedelta(0)
    assert "failed too" in result.detail


def test_a_zone_without_a_profile_cannot_be_corrected(em: FakeElectricityMaps, history: EmActuals) -> None:
    result = plan(source="electricitymaps", grid_zone="FR")
    assert result.reason == "source-failed"
    assert "does not cover FR" in result.detail
    assert history.calls == []  # the profile is checked before anything is asked


def test_actuals_are_fetched_once_per_quarter_hour(
    em: FakeElectricityMaps, history: EmActuals, clock: FakeClock
) -> None:
    plan(now=None)
    clock.advance(60)
    plan(now=None)
    assert len(history.calls) == 1
    clock.advance(15 * 60)
    plan(now=None)
    assert len(history.calls) == 2


# ---- explicit live:<source> ---------------------------------------------------------------------------------


def test_live_electricitymaps_never_asks_for_a_forecast(em: FakeElectricityMaps, history: EmActuals) -> None:
    result = plan(source="live:electricitymaps")
    assert em.calls == []
    assert result.source == "electricitymaps+offline (live-corrected)"
    assert result.start == oracle(expected_series(measured_day()), NOW, WINDOW, DURATION).start


def test_live_defaults_to_electricitymaps(em: FakeElectricityMaps, history: EmActuals) -> None:
    assert plan(source="live").source == "electricitymaps+offline (live-corrected)"


def test_live_ukgrid(server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> None:
    values: dict[datetime, tuple[float | None, float | None]] = {}
    halves = {}
    for i in range(-48, 12):
        start = HOUR0 + i * HALF
        actual = yesterday_value(start) if start + HALF <= NOW else None
        values[start] = (250.0, actual)
        if actual is not None:
            halves[start] = actual
    neso: NesoActuals = install(NesoActuals(server, values), monkeypatch)
    result = plan(source="live:ukgrid", provider="gcp", region="europe-west2")
    assert result.source == "ukgrid+offline (live-corrected)"
    assert path_of(neso.calls[0]) == "/intensity/2025-05-31T12:20Z/2025-06-01T12:20Z"
    hours = {t: v for t, v in halves.items() if t.minute == 0}  # equal halves: hourly means are the same values
    assert result.start == oracle(expected_series(dict(hours)), NOW, WINDOW, DURATION).start


def test_live_url_measurements(server: LoopbackServer) -> None:
    document = [{"start": iso_z(t), "value": v} for t, v in measured_day().items()]
    server.route("GET", "/meter.json", Reply(200, document))
    result = plan(source=f"live:url:{server.url}/meter.json", grid_zone="DE")
    assert result.source == "url+offline (live-corrected)"
    assert result.start == oracle(expected_series(measured_day()), NOW, WINDOW, DURATION).start


def test_live_of_a_source_without_actuals() -> None:
    result = plan(source="live:offline")
    assert result.reason == "source-failed"
    assert "serves no measured intensity" in result.detail


def test_a_registered_reader_and_a_refusing_forecast(monkeypatch: pytest.MonkeyPatch) -> None:
    """A user's own source: its forecast raises ForecastRefused, its reader serves measurements."""

    def refuse(query: carbonaware_core.Query) -> carbonaware_core.Forecast:
        raise carbonaware_core.ForecastRefused("no forecast on this meter")

    def reader(query: carbonaware_core.Query, start: datetime, end: datetime) -> tuple[ForecastPoint, ...]:
        return tuple(ForecastPoint(t, t + HOUR, v) for t, v in measured_day().items() if v is not None)

    carbonaware_core.register_source(carbonaware_core.Source("meter", refuse, needs_zone=False, actuals=reader))
    try:
        result = plan(source="meter")
    finally:
        carbonaware_core.SOURCES.pop("meter")
    assert result.source == "meter+offline (live-corrected)"
    assert result.start == oracle(expected_series(measured_day()), NOW, WINDOW, DURATION).start


# ---- the arithmetic, for all inputs ---------------------------------------------------------------------------

values = st.floats(min_value=0, max_value=2000, allow_nan=False)


def hourly_points(first: datetime, numbers: list[float]) -> list[ForecastPoint]:
    return [ForecastPoint(first + k * HOUR, first + (k + 1) * HOUR, v) for k, v in enumerate(numbers)]


@settings(max_examples=200, deadline=None)
@given(st.lists(values, min_size=30, max_size=30), st.floats(-500, 500), st.floats(0.5, 1000))
def test_correction_fades_toward_the_profile_and_stays_valid(numbers: list[float], shift: float, half: float) -> None:
    profile = hourly_points(HOUR0, numbers)
    anomaly = Anomaly(shift, HOUR0 + 2 * HOUR)
    corrected = carbonaware_core.live_corrected(profile, anomaly, timedelta(hours=half))
    assert [p.start for p in corrected] == [p.start for p in profile[2:]]
    previous = math.inf
    for point, original in zip(corrected, profile[2:], strict=True):
        assert point.value >= 0
        moved = abs(point.value - original.value)
        assert moved <= abs(shift) + 1e-9
        if point.value > 0 and original.value + shift * 1.0 > 0:  # not floored: the pull shrinks with the lead
            assert moved <= previous + 1e-9
            previous = moved


@settings(max_examples=60, deadline=None)
@given(st.lists(values, min_size=48, max_size=48), st.lists(values, min_size=48, max_size=48))
def test_anomaly_ignores_what_is_not_yet_measured(measured: list[float], later: list[float]) -> None:
    profile = hourly_points(HOUR0 - 24 * HOUR, [300.0] * 72)
    actuals = hourly_points(HOUR0 - 24 * HOUR, measured[:24])
    future = hourly_points(HOUR0, later)  # the hour under way and after: nowcasts and forecasts, not measurements
    plain = carbonaware_core.recent_anomaly(actuals, profile, NOW)
    mixed = carbonaware_core.recent_anomaly([*future, *actuals], profile, NOW)
    assert plain == mixed
    assert plain.measured_until == HOUR0
    span = round(carbonaware_core.LIVE_SPAN / HOUR)
    assert plain.value == pytest.approx(sum(v - 300.0 for v in measured[24 - span : 24]) / span)


@settings(max_examples=100, deadline=None)
@given(st.lists(values, min_size=48, max_size=48), st.floats(0, 1))
def test_yesterday_blend_is_a_convex_mix(numbers: list[float], weight: float) -> None:
    profile = hourly_points(HOUR0, numbers[:24])
    measured = hourly_points(HOUR0 - 24 * HOUR, numbers[24:])
    blended = carbonaware_core.blended_with_yesterday(profile, measured, weight)
    for point, mine, past in zip(blended, profile, measured, strict=True):
        low, high = sorted((mine.value, past.value))
        assert low - 1e-9 <= point.value <= high + 1e-9
        assert point.value == pytest.approx((1 - weight) * mine.value + weight * past.value)
    assert carbonaware_core.blended_with_yesterday(profile, measured, 0.0) == tuple(profile)


def test_the_anomaly_refuses_nothing_valid_or_stale() -> None:
    profile = hourly_points(HOUR0 - 24 * HOUR, [300.0] * 48)
    bad: list[Any] = [ForecastPoint(HOUR0 - HOUR, HOUR0, math.nan), ForecastPoint(HOUR0 - HOUR, HOUR0, math.inf)]
    with pytest.raises(carbonaware_core.SourceError, match="no valid measurement"):
        carbonaware_core.recent_anomaly(bad, profile, NOW)
    old = hourly_points(HOUR0 - 10 * HOUR, [100.0, 100.0])
    with pytest.raises(carbonaware_core.SourceError, match="stale"):
        carbonaware_core.recent_anomaly(old, profile, NOW)


# ---- the label reaches the Prefect artifact ---------------------------------------------------------------------


def test_the_prefect_artifact_names_the_live_correction(em: FakeElectricityMaps, history: EmActuals) -> None:
    from prefect import flow, task
    from prefect.artifacts import Artifact

    import carbonaware_prefect as cp
    from tests import prefect_helpers

    @task(name="Live Probe")
    @cp.carbonaware_delay_decorator(window=WINDOW, duration=DURATION, source="electricitymaps", now=NOW, **DE)
    def probe() -> str:
        return "ran"

    @flow
    def pipeline() -> str:
        return probe()

    with prefect_helpers.prefect_server():
        assert pipeline() == "ran"
        artifact = Artifact.get("carbonaware-live-probe")
    assert artifact is not None
    text = str(artifact.data)
    (source_row,) = [line for line in text.splitlines() if line.startswith("| Source |")]
    assert source_row.replace("\\", "") == "| Source | electricitymaps+offline (live-corrected) |"  # markdown-escaped
    assert "its forecast was refused" in text and "live-corrected" in text
    assert_no_secrets(text, str(artifact.description))


def test_the_profile_floor_applies_to_the_live_forecast(
    em: FakeElectricityMaps, history: EmActuals, model: Path
) -> None:
    """The offline model's per-zone minimum predicted saving is kept by the live forecast built on its profile."""
    document = json.loads(model.read_text(encoding="utf-8"))
    document["min_savings"] = {"default": 0.0, "by_zone": {"DE": 0.6}}
    floored = model.with_name("floored.json")
    floored.write_text(json.dumps(document), encoding="utf-8")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CARBONAWARE_OFFLINE_DATA", str(floored))
        result = plan()
    assert result.source == "electricitymaps+offline (live-corrected)"
    assert result.reason == "below-threshold" and result.delay == timedelta(0)
    assert "model's minimum for DE, 60.0%" in result.detail


@pytest.mark.parametrize("name", ["watttime", "carbonaware"])
def test_marginal_signals_are_not_mixed_into_an_average_profile(name: str) -> None:
    result = plan(source=f"live:{name}")
    assert result.reason == "source-failed"
    assert "measures marginal emissions" in result.detail


def test_a_year_long_window_stays_quick(em: FakeElectricityMaps, history: EmActuals) -> None:
    import time

    began = time.perf_counter()
    result = plan(source="live:electricitymaps", window=timedelta(days=365))
    assert result.source == "electricitymaps+offline (live-corrected)"
    assert time.perf_counter() - began < 5.0  # a generous bound on a loaded 2-core machine; typically ~0.2 s


def test_a_hanging_history_costs_one_timeout_then_offline(em: FakeElectricityMaps, history: EmActuals) -> None:
    import time

    history.fault = Reply(200, {"zone": "DE", "history": []}, delay=3.0)
    began = time.monotonic()
    result = plan(timeout=0.5)
    elapsed = time.monotonic() - began
    assert result.source == "offline"
    assert "failed too" in result.fallbacks[0]
    assert elapsed < 2.5  # one bounded request, not the server's 3 s
