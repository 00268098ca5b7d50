"""The Green Software Foundation Carbon Aware SDK WebAPI as a forecast source (protocols.md §5), on loopback."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import carbonaware_core
from tests.fake_providers import (
    FakeGsf,
    Planner,
    assert_no_secrets,
    fake_clock,
    install,
    library_lines,
    oracle,
    path_of,
    query_params,
    slots,
)
from tests.loopback import FakeClock, LoopbackServer, Reply

UTC = timezone.utc
NOW = datetime(2025, 6, 1, 12, 20, tzinfo=UTC)
FIVE = timedelta(minutes=5)
WINDOW = timedelta(hours=6)
DURATION = timedelta(minutes=30)
# every five minutes from 12:20 for 8 hours; a valley 16:10-16:40 (indices 46..51)
VALUES = [448.45 if 46 <= i < 52 else 532.02 + (i % 5) * 3.5 for i in range(96)]
ZONE = {"provider": "azure", "region": "eastus"}


@pytest.fixture(autouse=True)
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    return fake_clock(monkeypatch, NOW)


@pytest.fixture
def gsf(server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> FakeGsf:
    fake = FakeGsf(server, slots(NOW, FIVE, VALUES))
    install(fake, monkeypatch)
    return fake


plan = Planner(WINDOW, DURATION, {"source": "gsf", "now": NOW, **ZONE}).plan


@pytest.mark.parametrize("client", ["requests", "urllib"])
def test_request_shape_and_plan(gsf: FakeGsf, monkeypatch: pytest.MonkeyPatch, client: str) -> None:
    monkeypatch.setenv("CARBONAWARE_HTTP_CLIENT", client)
    result = plan()
    assert len(gsf.calls) == 1
    seen = gsf.calls[0]
    assert seen.method == "GET" and path_of(seen) == "/emissions/forecasts/current"
    # only the location: windowSize would return rolling means (averaged twice by any planner), and a
    # dataStartAt/dataEndAt outside the SDK's forecast answers 400; the planner trims the raw ticks itself
    assert query_params(seen) == {"location": "eastus"}
    expected = oracle(gsf.intervals(), NOW, WINDOW, DURATION)
    assert expected.start == datetime(2025, 6, 1, 16, 10, tzinfo=UTC)
    assert result.reason == "optimal" and result.source == "gsf"
    assert result.start == expected.start
    assert result.expected == pytest.approx(448.45)
    assert result.now == pytest.approx(expected.now_value())
    assert result.unit == "gCO2eq/kWh"
    assert result.grid_zone == "eastus"


@pytest.mark.parametrize(
    ("shape", "optimal_key"),
    [("list", "optimalDataPoints"), ("list", "optimalDataPoint"), ("object", "optimalDataPoints")],
)
def test_older_servers_and_answer_shapes(gsf: FakeGsf, shape: str, optimal_key: str) -> None:
    gsf.shape, gsf.optimal_key = shape, optimal_key
    result = plan()
    assert result.reason == "optimal"
    assert result.start == oracle(gsf.intervals(), NOW, WINDOW, DURATION).start


@pytest.mark.parametrize(
    ("options", "env", "location"),
    [
        ({"source": "gsf:westus"}, {}, "westus"),
        ({}, {"CARBONAWARE_SDK_LOCATION": "northeurope"}, "northeurope"),
        ({"provider": "azure", "region": "uksouth"}, {}, "uksouth"),
    ],
)
def test_the_location_asked_for(
    gsf: FakeGsf, monkeypatch: pytest.MonkeyPatch, options: dict[str, str], env: dict[str, str], location: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = plan(**options)
    assert query_params(gsf.calls[0])["location"] == location
    assert result.grid_zone == location


def test_without_a_location_nothing_is_asked(gsf: FakeGsf) -> None:
    result = carbonaware_core.plan_delay(WINDOW, DURATION, source="gsf", now=NOW, timeout=5.0)
    assert gsf.calls == []
    assert result.reason in ("source-failed", "no-zone")
    assert "CARBONAWARE_SDK_LOCATION" in result.detail


def test_without_a_server_nothing_is_asked(gsf: FakeGsf, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CARBONAWARE_SDK_URL")
    result = plan()
    assert gsf.calls == []
    assert result.reason == "source-failed" and "CARBONAWARE_SDK_URL" in result.detail


@pytest.mark.parametrize("duration", [timedelta(minutes=90), timedelta(seconds=20), timedelta(hours=30)])
def test_no_window_size_and_no_time_bounds_are_sent(gsf: FakeGsf, duration: timedelta) -> None:
    """Bug caught: ``windowSize=<job>`` made the SDK answer rolling means that the planner averaged again."""
    result = plan(duration=duration)
    assert query_params(gsf.calls[0]) == {"location": "eastus"}
    assert result.reason in ("optimal", "already-best")


def test_one_answer_serves_callers_with_other_windows_and_jobs(gsf: FakeGsf) -> None:
    first = plan()
    second = plan(window=timedelta(hours=2), duration=timedelta(minutes=10))
    assert len(gsf.calls) == 1  # the question names only the location
    assert first.start == oracle(gsf.intervals(), NOW, WINDOW, DURATION).start
    assert second.start == oracle(gsf.intervals(), NOW, timedelta(hours=2), timedelta(minutes=10)).start


# ---- the SDK's rolling means, replayed; a real 48 h series ---------------------------------------------------------

# Electricity Maps, Germany (DE), hourly LCA carbon intensity in gCO2eq/kWh from 2023-10-03 00:00 UTC for 48 h,
# from the Electricity Maps Data Portal's free 2023 download (ODbL; credit: Electricity Maps). Served as the SDK's
# forecast (Electricity Maps data source, hourly ticks).
DE_20231003 = [
    261.64, 231.4, 199.31, 190.65, 172.01, 167.62, 152.68, 141.5, 133.81, 127.83, 126.85, 131.22,
    133.63, 144.48, 167.22, 202.81, 229.33, 242.64, 229.2, 222.97, 225.94, 233.47, 236.46, 234.26,
    244.54, 245.03, 244.83, 246.37, 256.11, 280.15, 275.58, 250.71, 227.61, 220.28, 214.08, 212.96,
    216.16, 240.66, 273.49, 323.55, 347.72, 343.4, 340.39, 329.01, 315.41, 308.18, 297.55, 292.55,
]  # fmt: skip
DE_START = datetime(2023, 10, 3, tzinfo=UTC)
HOUR = timedelta(hours=1)


def test_the_fake_replays_the_sdks_rolling_average(server: LoopbackServer) -> None:
    """The SDK's own documented example (EmissionsDataExtensions.RollingAverage): 5-minute ticks
    [10, 20, 30, 40, 5] with a 10-minute window are [15, 25, 35, 22.5], each lasting 10 minutes, 5 minutes apart."""
    import json
    import urllib.request

    fake = FakeGsf(server, slots(NOW, FIVE, [10, 20, 30, 40, 5]))
    with urllib.request.urlopen(f"{server.url}{FakeGsf.PATH}?location=eastus&windowSize=10") as answer:
        [document] = json.load(answer)
    items = document["forecastData"]
    assert [item["value"] for item in items] == [15, 25, 35, 22.5]
    assert {item["duration"] for item in items} == {10}
    assert [item["timestamp"] for item in items] == [(NOW + i * FIVE).isoformat() for i in range(4)]
    assert document["optimalDataPoints"][0]["value"] == 15
    with urllib.request.urlopen(f"{server.url}{FakeGsf.PATH}?location=eastus") as answer:
        [raw] = json.load(answer)
    assert [item["value"] for item in raw["forecastData"]] == [10, 20, 30, 40, 5]
    assert fake.calls and {item["duration"] for item in raw["forecastData"]} == {5}


def test_a_real_48h_series_gets_the_exact_optimum_and_savings(
    server: LoopbackServer, monkeypatch: pytest.MonkeyPatch, clock: FakeClock
) -> None:
    """Bug caught: the SDK's rolling means over the job, averaged again, started an hour early (08:00 instead of
    09:00) and understated the saving (37.8 % instead of 44.3 %)."""
    install(FakeGsf(server, slots(DE_START, HOUR, DE_20231003), period=HOUR), monkeypatch)
    window, duration = timedelta(hours=12), timedelta(hours=3)
    result = carbonaware_core.plan_delay(window, duration, source="gsf:DE", now=DE_START, timeout=5.0)
    series = [(DE_START + i * HOUR, DE_START + (i + 1) * HOUR, v) for i, v in enumerate(DE_20231003)]
    expected = oracle(series, DE_START, window, duration)
    assert result.reason == "optimal"
    assert result.start == expected.start == DE_START + 9 * HOUR
    assert result.expected == pytest.approx(expected.value())
    assert result.now == pytest.approx(expected.now_value())
    assert result.savings == pytest.approx(1 - expected.value() / expected.now_value())
    assert result.savings == pytest.approx(0.4426, abs=1e-4)
    assert "reaches only" not in result.detail  # 48 h of data cover the 15 h asked about


def test_a_window_past_the_sdks_forecast_plans_over_what_it_has(
    server: LoopbackServer, monkeypatch: pytest.MonkeyPatch, clock: FakeClock
) -> None:
    """Bug caught: dataEndAt (now + window + job, up to the hour) past the SDK's ~24 h answered 400: no plan."""
    day = DE_20231003[:24]
    install(FakeGsf(server, slots(DE_START, HOUR, day), period=HOUR), monkeypatch)
    window, duration = timedelta(hours=30), timedelta(hours=3)
    result = carbonaware_core.plan_delay(window, duration, source="gsf:DE", now=DE_START, timeout=5.0)
    series = [(DE_START + i * HOUR, DE_START + (i + 1) * HOUR, v) for i, v in enumerate(day)]
    expected = oracle(series, DE_START, window, duration)
    assert result.reason == "optimal" and result.source == "gsf"
    assert result.start == expected.start
    assert result.savings == pytest.approx(1 - expected.value() / expected.now_value())
    # the plan says how far it could see: data to 24:00, so no start after 21:00 was compared
    assert "the forecast reaches only 2023-10-04T00:00:00Z (24h00m ahead)" in result.detail
    assert "starts after 2023-10-03T21:00:00Z were not compared" in result.detail


def test_the_sdks_400_for_bounds_outside_its_forecast_is_replayed(server: LoopbackServer) -> None:
    import urllib.error
    import urllib.request

    FakeGsf(server, slots(DE_START, HOUR, DE_20231003[:24]), period=HOUR)
    late = "2023-10-04T06:00:00Z"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(
            f"{server.url}{FakeGsf.PATH}?location=DE&dataStartAt=2023-10-03T00:00:00Z&dataEndAt={late}"
        )
    assert refused.value.code == 400
    assert "dataEndAt" in refused.value.read().decode()


def test_a_validation_error(gsf: FakeGsf, caplog: pytest.LogCaptureFixture) -> None:
    gsf.fault = FakeGsf.validation_error("location", "The location field is required.")
    caplog.set_level(logging.DEBUG, logger="carbonaware")
    result = carbonaware_core.carbonaware_delay(WINDOW, DURATION, source="gsf", now=NOW, timeout=5.0, **ZONE)
    assert result.reason == "source-failed" and result.start == NOW
    assert "HTTP 400" in result.detail
    lines = [r.getMessage() for r in library_lines(caplog.records)]
    assert len(lines) == 1 and "HTTP 400" in lines[0]
    assert_no_secrets(*lines)


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ([], "forecastData"),
        ([{"location": "eastus", "optimalDataPoints": []}], "forecastData"),
        ({"forecastData": "none"}, "forecastData"),
        ([{"forecastData": [{"timestamp": "2025-06-01T12:20:00+00:00", "value": "high", "duration": 5}]}], "number"),
        ([{"forecastData": [{"time": "2025-06-01T12:20:00+00:00", "value": 500, "duration": 5}]}], "timestamp"),
    ],
)
def test_wrong_shapes_fall_back(gsf: FakeGsf, body: object, says: str) -> None:
    gsf.fault = Reply(200, body)
    result = plan()
    assert result.reason == "source-failed" and result.start == NOW
    assert says in result.detail


def test_point_durations_are_honoured(gsf: FakeGsf) -> None:
    # a server with 60-minute points: the job must be compared over hours, not five-minute slices
    hourly = [
        {"timestamp": (NOW + timedelta(hours=h)).isoformat(), "duration": 60, "value": v}
        for h, v in enumerate([500, 400, 100, 450, 450, 450, 450, 450])
    ]
    gsf.fault = Reply(200, [{"location": "eastus", "forecastData": hourly}])
    result = plan(duration=timedelta(minutes=90))
    series = [(NOW + timedelta(hours=h), NOW + timedelta(hours=h + 1), float(p["value"])) for h, p in enumerate(hourly)]
    expected = oracle(series, NOW, WINDOW, timedelta(minutes=90))
    assert result.start == expected.start
    assert result.expected == pytest.approx(expected.value())


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    values=st.lists(st.integers(50, 600), min_size=12, max_size=72),
    window_minutes=st.integers(5, 240),
    duration_minutes=st.integers(1, 120),
)
def test_any_sdk_forecast_is_planned_at_the_exact_optimum(
    server: LoopbackServer,
    monkeypatch: pytest.MonkeyPatch,
    values: list[int],
    window_minutes: int,
    duration_minutes: int,
) -> None:
    """Whatever its ticks (even too few for the window), the plan over the SDK's forecast is the brute-force
    optimum over the raw series: same start, same expected and now means."""
    carbonaware_core.clear_cache()
    fake = install(FakeGsf(server, slots(NOW, FIVE, values)), monkeypatch)
    window, duration = timedelta(minutes=window_minutes), timedelta(minutes=duration_minutes)
    result = plan(window=window, duration=duration)
    expected = oracle(fake.intervals(), NOW, window, duration)
    assert result.reason in ("optimal", "already-best"), result.detail
    saving = 1 - expected.value() / expected.now_value() if expected.now_value() else 0.0
    if expected.waits and saving >= carbonaware_core.NEGLIGIBLE_SAVINGS:
        assert (result.reason, result.start) == ("optimal", expected.start)
        assert result.expected == pytest.approx(expected.value())
    elif not expected.waits:
        assert result.start == NOW
    assert result.now == pytest.approx(expected.now_value())
