"""Electricity Maps v3 as a forecast source (protocols.md §2), against a real loopback server."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

import carbonaware_core
from carbonaware_core import CloudZone
from tests.fake_providers import (
    EM_KEY,
    FakeElectricityMaps,
    Planner,
    assert_no_secrets,
    fake_clock,
    install,
    iso_z,
    oracle,
    path_of,
    query_params,
    slots,
)
from tests.loopback import FakeClock, LoopbackServer, Reply

UTC = timezone.utc
NOW = datetime(2025, 6, 1, 12, 20, tzinfo=UTC)
HOUR0 = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
WINDOW = timedelta(hours=6)
DURATION = timedelta(minutes=30)
# 12:00 .. 11:00 next day; the lowest hour inside the window is 15:00
VALUES = [300, 280, 260, 100, 120, 400, 500, 90, *range(310, 326)]


@pytest.fixture(autouse=True)
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    return fake_clock(monkeypatch, NOW)


@pytest.fixture
def em(server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> FakeElectricityMaps:
    fake = FakeElectricityMaps(server, slots(HOUR0, timedelta(hours=1), VALUES))
    install(fake, monkeypatch)
    return fake


PLANNER = Planner(
    WINDOW, DURATION, {"source": "electricitymaps", "now": NOW, "provider": "aws", "region": "eu-central-1"}
)
plan = PLANNER.plan


def delay_logged(caplog: pytest.LogCaptureFixture, **options: object) -> tuple[carbonaware_core.Plan, list[str]]:
    """carbonaware_delay on the fake clock (a run-now plan returns at once); its log lines, all levels."""
    result, records = PLANNER.delay_logged(caplog, **options)
    return result, [r.getMessage() for r in records]


# ---- happy path ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("client", ["requests", "urllib"])
def test_request_shape_and_plan(em: FakeElectricityMaps, monkeypatch: pytest.MonkeyPatch, client: str) -> None:
    monkeypatch.setenv("CARBONAWARE_HTTP_CLIENT", client)
    result = plan()

    assert len(em.calls) == 1
    seen = em.calls[0]
    assert seen.method == "GET"
    assert path_of(seen) == "/v3/carbon-intensity/forecast"
    assert query_params(seen) == {"zone": "DE", "horizonHours": "24", "emissionFactorType": "lifecycle"}
    assert seen.headers["auth-token"] == EM_KEY
    assert "authorization" not in seen.headers

    expected = oracle(em.intervals(), NOW, WINDOW, DURATION)
    assert expected.start == datetime(2025, 6, 1, 15, 0, tzinfo=UTC)  # the oracle agrees with the eye
    assert result.reason == "optimal"
    assert result.source == "electricitymaps"
    assert result.start == expected.start
    assert result.delay == timedelta(hours=2, minutes=40)
    assert result.expected == pytest.approx(100.0)
    assert result.now == pytest.approx(300.0)
    assert result.savings == pytest.approx(200 / 300)
    assert result.unit == "gCO2eq/kWh"
    assert result.grid_zone == "DE"
    assert result.zone == CloudZone("aws", "eu-central-1")
    assert result.start.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    ("provider", "region", "zone"),
    [("aws", "eu-central-1", "DE"), ("gcp", "europe-west2", "GB"), ("azure", "westeurope", "NL")],
)
def test_zone_comes_from_the_region_table(em: FakeElectricityMaps, provider: str, region: str, zone: str) -> None:
    result = plan(provider=provider, region=region)
    assert query_params(em.calls[0])["zone"] == zone
    assert result.grid_zone == zone
    assert result.reason == "optimal"


def test_a_region_missing_from_the_table_asks_by_data_centre(em: FakeElectricityMaps) -> None:
    em.zone = "HK"  # what Electricity Maps answers for the data centre
    result = plan(provider="aws", region="ap-east-2")
    assert query_params(em.calls[0]) == {
        "dataCenterProvider": "aws",
        "dataCenterRegion": "ap-east-2",
        "horizonHours": "24",
        "emissionFactorType": "lifecycle",
    }
    assert result.grid_zone == "HK"
    assert result.reason == "optimal"


def test_an_explicit_grid_zone_wins_over_the_table(em: FakeElectricityMaps) -> None:
    result = plan(grid_zone="FR")
    assert query_params(em.calls[0])["zone"] == "FR"
    assert result.grid_zone == "FR"


def test_grid_zone_without_cloud_zone(em: FakeElectricityMaps) -> None:
    result = carbonaware_core.plan_delay(WINDOW, DURATION, source="electricitymaps", now=NOW, grid_zone="DE")
    assert query_params(em.calls[0])["zone"] == "DE"
    assert result.reason == "optimal"
    assert result.zone is None


@pytest.mark.parametrize(
    ("window", "duration", "hours"),
    [
        (timedelta(hours=1), timedelta(minutes=30), 6),
        (timedelta(hours=4), timedelta(minutes=30), 6),  # 4.5 h + the hour the forecast may start before now
        (timedelta(hours=4), timedelta(hours=1), 6),
        (timedelta(hours=5), timedelta(minutes=30), 24),
        (timedelta(hours=6), timedelta(minutes=30), 24),
        (timedelta(hours=22), timedelta(hours=1), 24),
        (timedelta(hours=22), timedelta(minutes=90), 48),
        (timedelta(hours=47), timedelta(hours=1), 72),
        (timedelta(hours=72), timedelta(minutes=30), 72),  # the most there is
    ],
)
def test_horizon_hours_is_the_smallest_that_covers(
    em: FakeElectricityMaps, window: timedelta, duration: timedelta, hours: int
) -> None:
    em.points = slots(HOUR0, timedelta(hours=1), [200.0] * 80)
    plan(window=window, duration=duration)
    assert query_params(em.calls[0])["horizonHours"] == str(hours)


def test_emission_factor_can_be_direct(em: FakeElectricityMaps, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ELECTRICITYMAPS_EMISSION_FACTOR", "direct")
    plan()
    assert query_params(em.calls[0])["emissionFactorType"] == "direct"


def test_a_forecast_shorter_than_the_window_is_planned_over_what_it_covers(em: FakeElectricityMaps) -> None:
    em.points = slots(HOUR0, timedelta(hours=1), [300, 250, 200])  # ends 15:00, the window reaches 18:20
    result = plan()
    expected = oracle(em.intervals(), NOW, WINDOW, DURATION)
    assert result.start == expected.start == datetime(2025, 6, 1, 14, 0, tzinfo=UTC)
    assert result.start + DURATION <= HOUR0 + timedelta(hours=3)
    assert result.expected == pytest.approx(expected.value())


def test_null_values_are_gaps_a_job_does_not_straddle(em: FakeElectricityMaps) -> None:
    values = [300, 280, None, 50, 290, 290, 290, 290]  # 14:00 unknown; 15:00 the best hour
    em.points = slots(HOUR0, timedelta(hours=1), values)
    result = plan(duration=timedelta(minutes=90))
    expected = oracle(em.intervals(), NOW, WINDOW, timedelta(minutes=90))
    assert result.start == expected.start
    assert result.expected == pytest.approx(expected.value())
    gap_start, gap_end = HOUR0 + timedelta(hours=2), HOUR0 + timedelta(hours=3)
    assert result.start + timedelta(minutes=90) <= gap_start or result.start >= gap_end
    assert result.start == gap_end


# ---- failures --------------------------------------------------------------------------------------------------


def test_no_key_makes_no_request(em: FakeElectricityMaps, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ELECTRICITYMAPS_API_KEY")
    result = plan()
    assert em.calls == []
    assert result.reason == "source-failed"
    assert "ELECTRICITYMAPS_API_KEY" in result.detail


def test_a_bad_key_runs_now_and_says_why_once(
    em: FakeElectricityMaps, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("ELECTRICITYMAPS_API_KEY", EM_KEY + "-revoked")
    result, lines = delay_logged(caplog)
    assert len(em.calls) == 1
    assert em.calls[0].headers["auth-token"] == EM_KEY + "-revoked"
    assert result.reason == "source-failed"
    assert result.start == NOW and result.delay == timedelta(0)
    assert "HTTP 401" in result.detail and "Invalid auth-token" in result.detail
    assert len(lines) == 1
    assert "HTTP 401" in lines[0] and "electricitymaps" in lines[0]


def test_no_forecast_access_on_this_plan(
    server: LoopbackServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    install(FakeElectricityMaps(server, slots(HOUR0, timedelta(hours=1), VALUES), forecast_access=False), monkeypatch)
    result, lines = delay_logged(caplog)
    assert result.reason == "source-failed"
    assert FakeElectricityMaps.NO_ACCESS[:40] in result.detail
    assert "no forecast access" in result.detail
    assert len(lines) == 1 and FakeElectricityMaps.NO_ACCESS[:40] in lines[0]


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"zone": "DE", "data": [{"carbonIntensity": 100, "datetime": "2025-06-01T12:00:00.000Z"}]}, "forecast"),
        ({"zone": "DE", "forecast": [{"carbonIntensity": "557", "datetime": "2025-06-01T12:00:00.000Z"}]}, "number"),
        ({"zone": "DE", "forecast": [{"carbonIntensity": 557, "datetime": "tomorrow"}]}, "datetime"),
        ({"zone": "DE", "forecast": [{"carbonIntensity": 557}]}, "datetime"),
        ({"zone": "DE", "forecast": ["557"]}, "datetime"),
        ({"zone": "DE", "forecast": []}, "empty"),
        ([{"zone": "DE"}], "forecast"),
    ],
)
def test_a_wrong_shape_falls_back(
    em: FakeElectricityMaps, caplog: pytest.LogCaptureFixture, body: object, says: str
) -> None:
    em.fault = Reply(200, body)
    result, lines = delay_logged(caplog)
    assert result.reason == "source-failed"
    assert result.start == NOW
    assert says in result.detail
    assert len(lines) == 1 and says in lines[0]


def test_a_redirect_is_not_followed_so_the_key_stays_home(em: FakeElectricityMaps, server: LoopbackServer) -> None:
    server.route("GET", "/elsewhere", Reply(200, {"zone": "DE", "forecast": []}))
    em.fault = Reply(302, b"", {"Location": f"{server.url}/elsewhere"})
    result = plan()
    assert server.requests_to("/elsewhere") == []
    assert result.reason == "source-failed"
    assert "redirect" in result.detail


def test_the_key_never_travels_over_plain_http_to_another_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ELECTRICITYMAPS_API_URL", "http://api.electricitymaps.invalid")
    monkeypatch.setenv("ELECTRICITYMAPS_API_KEY", EM_KEY)
    result = plan()
    assert result.reason == "source-failed"
    assert "plain HTTP" in result.detail
    assert_no_secrets(result.detail)


def test_updated_at_and_datetime_are_read_as_utc(em: FakeElectricityMaps) -> None:
    # Electricity Maps writes '...000Z'; the plan's start is the same instant whatever the caller's offset
    local = timezone(timedelta(hours=2))
    result = plan(now=NOW.astimezone(local))
    assert result.start == datetime(2025, 6, 1, 15, 0, tzinfo=UTC)
    assert iso_z(result.start) == "2025-06-01T15:00:00Z"


@pytest.mark.parametrize("client", ["requests", "urllib"])
@pytest.mark.parametrize("key", [EM_KEY + "\n" + EM_KEY + "-old", EM_KEY + "\nX-Extra: 1"], ids=["two-lines", "header"])
def test_a_key_no_header_can_carry_never_reaches_the_log(
    em: FakeElectricityMaps,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    client: str,
    key: str,
) -> None:
    """A key pasted with a line break (two keys, a trailing header) cannot be sent; the HTTP client's complaint
    quotes the header value, so it must not be passed on verbatim."""
    monkeypatch.setenv("CARBONAWARE_HTTP_CLIENT", client)
    monkeypatch.setenv("ELECTRICITYMAPS_API_KEY", key)
    result, lines = delay_logged(caplog)  # asserts that no secret appears in any log line or the plan
    assert result.reason == "source-failed" and result.start == NOW
    assert "electricitymaps" in result.detail
    assert len(lines) == 1
