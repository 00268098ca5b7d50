"""The Green Software Foundation Carbon Aware SDK WebAPI as a forecast source (protocols.md §5), on loopback."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone

import pytest

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
    assert query_params(seen) == {
        "location": "eastus",
        "dataStartAt": "2025-06-01T12:20:00Z",
        "dataEndAt": "2025-06-01T19:00:00Z",  # finish-by: now + window + duration (18:50), up to the hour
        "windowSize": "30",
    }
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


@pytest.mark.parametrize(("duration", "minutes"), [(timedelta(minutes=90), "90"), (timedelta(seconds=20), "1")])
def test_window_size_is_the_job_in_minutes(gsf: FakeGsf, duration: timedelta, minutes: str) -> None:
    plan(duration=duration)
    assert query_params(gsf.calls[0])["windowSize"] == minutes


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
