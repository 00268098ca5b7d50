"""WattTime v3 as a forecast source (protocols.md §3): login, bearer tokens, scopes and units, on loopback."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

import carbonaware_core
from tests.fake_providers import (
    LBS_PER_MWH_IN_G_PER_KWH,
    WT_BASIC,
    WT_PASSWORD,
    WT_TOKEN_PREFIX,
    FakeWattTime,
    Planner,
    assert_no_secrets,
    fake_clock,
    install,
    oracle,
    path_of,
    query_params,
    slots,
)
from tests.loopback import FakeClock, LoopbackServer, Reply

UTC = timezone.utc
NOW = datetime(2025, 6, 1, 12, 20, tzinfo=UTC)
WINDOW = timedelta(hours=6)
DURATION = timedelta(minutes=30)
FIVE = timedelta(minutes=5)


def moer_values(count: int = 288) -> list[float]:
    """lbs/MWh every five minutes from NOW; a valley from 15:00 to 15:30 (indices 32..37)."""
    return [400.5 if 32 <= i < 38 else 900.25 + 10 * (i % 7) for i in range(count)]


@pytest.fixture(autouse=True)
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    return fake_clock(monkeypatch, NOW)


@pytest.fixture
def wt(server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> FakeWattTime:
    fake = FakeWattTime(server, slots(NOW, FIVE, moer_values()), regions=("CAISO_NORTH", "DE", "PJM_DC_OK"))
    install(fake, monkeypatch)
    return fake


SETTINGS = {"source": "watttime", "now": NOW, "timeout": 5.0, "provider": "aws", "region": "us-west-1"}


PLANNER = Planner(WINDOW, DURATION, SETTINGS)
plan = PLANNER.plan


def delay_logged(caplog: pytest.LogCaptureFixture, **options: object) -> tuple[carbonaware_core.Plan, list[str]]:
    result, records = PLANNER.delay_logged(caplog, **options)
    return result, [r.getMessage() for r in records]


# ---- happy path ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("client", ["requests", "urllib"])
def test_login_then_forecast_and_units(wt: FakeWattTime, monkeypatch: pytest.MonkeyPatch, client: str) -> None:
    monkeypatch.setenv("CARBONAWARE_HTTP_CLIENT", client)
    result = plan()

    assert len(wt.logins) == 1
    login = wt.logins[0]
    assert login.method == "GET" and path_of(login) == "/login" and query_params(login) == {}
    assert login.headers["authorization"] == f"Basic {WT_BASIC}"
    assert len(wt.calls) == 1
    forecast = wt.calls[0]
    assert forecast.method == "GET" and path_of(forecast) == "/v3/forecast"
    assert query_params(forecast) == {"region": "CAISO_NORTH", "signal_type": "co2_moer", "horizon_hours": "24"}
    assert forecast.headers["authorization"] == f"Bearer {WT_TOKEN_PREFIX}-1"

    expected = oracle(wt.intervals(), NOW, WINDOW, DURATION)
    assert expected.start == datetime(2025, 6, 1, 15, 0, tzinfo=UTC)
    assert result.reason == "optimal"
    assert result.source == "watttime"
    assert result.start == expected.start
    assert result.expected == pytest.approx(400.5 * LBS_PER_MWH_IN_G_PER_KWH)
    assert result.now == pytest.approx(expected.now_value(LBS_PER_MWH_IN_G_PER_KWH))
    assert result.savings == pytest.approx(1 - 400.5 / expected.now_value())
    assert result.unit == "gCO2/kWh (marginal)"
    assert result.grid_zone == "CAISO_NORTH"


@pytest.mark.parametrize(
    ("options", "env", "region"),
    [
        ({"provider": "aws", "region": "eu-central-1"}, {}, "DE"),  # table: eu-central-1 -> DE -> DE
        ({"source": "watttime:PJM_DC_OK"}, {}, "PJM_DC_OK"),
        ({}, {"WATTTIME_REGION": "PJM_DC_OK"}, "PJM_DC_OK"),
    ],
)
def test_the_region_asked_for(
    wt: FakeWattTime, monkeypatch: pytest.MonkeyPatch, options: dict[str, str], env: dict[str, str], region: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = plan(**options)
    assert query_params(wt.calls[0])["region"] == region
    assert result.reason == "optimal"
    assert result.grid_zone == region


def test_a_zone_without_a_watttime_region_asks_nothing(wt: FakeWattTime) -> None:
    result = plan(provider="gcp", region="us-central1")  # US-CENT-SWPP has no WattTime region in the table
    assert wt.logins == [] and wt.calls == []
    assert result.reason == "source-failed"
    assert "WATTTIME_REGION" in result.detail


@pytest.mark.parametrize(
    ("window", "duration", "hours"),
    [
        (timedelta(hours=2), timedelta(minutes=30), 6),
        (timedelta(hours=6), timedelta(minutes=30), 24),
        (timedelta(hours=30), timedelta(hours=1), 72),
    ],
)
def test_horizon_hours(wt: FakeWattTime, window: timedelta, duration: timedelta, hours: int) -> None:
    wt.points = slots(NOW, FIVE, [500.0] * (80 * 12))
    plan(window=window, duration=duration)
    assert query_params(wt.calls[0])["horizon_hours"] == str(hours)


@pytest.mark.parametrize(("units", "factor"), [("g_co2_per_kwh", 1.0), ("kg_co2_per_mwh", 1.0)])
def test_metric_units_are_not_converted(wt: FakeWattTime, units: str, factor: float) -> None:
    wt.units = units
    result = plan()
    assert result.expected == pytest.approx(400.5 * factor)


def test_a_coarser_period_is_honoured(wt: FakeWattTime) -> None:
    wt.period = timedelta(minutes=15)
    wt.points = slots(NOW, wt.period, [700, 650, 600, 900, 300, 900, *[800] * 90])
    result = plan(duration=timedelta(minutes=20))
    expected = oracle(wt.intervals(), NOW, WINDOW, timedelta(minutes=20))
    assert result.start == expected.start == NOW + timedelta(minutes=55)  # 5 min of 900, 15 of 300
    assert result.expected == pytest.approx(expected.value(LBS_PER_MWH_IN_G_PER_KWH))


# ---- tokens ----------------------------------------------------------------------------------------------------


def test_the_token_is_reused_across_plans(wt: FakeWattTime, clock: FakeClock) -> None:
    first = plan()
    clock.advance(carbonaware_core.SOURCES["watttime"].ttl + 1)  # the forecast is stale, the token is not
    second = plan()
    assert len(wt.calls) == 2
    assert len(wt.logins) == 1
    assert {c.headers["authorization"] for c in wt.calls} == {f"Bearer {WT_TOKEN_PREFIX}-1"}
    assert first.reason == second.reason == "optimal"


def test_the_token_is_renewed_before_it_expires(wt: FakeWattTime, clock: FakeClock) -> None:
    plan()
    clock.advance(25 * 60 + 1)  # tokens live ~30 minutes; the library keeps them ~25
    plan()
    assert len(wt.logins) == 2
    assert wt.calls[-1].headers["authorization"] == f"Bearer {WT_TOKEN_PREFIX}-2"


def test_a_stale_token_is_replaced_once(wt: FakeWattTime, clock: FakeClock) -> None:
    plan()
    wt.invalidate_tokens()  # the server forgot the first token early
    clock.advance(carbonaware_core.SOURCES["watttime"].ttl + 1)
    result = plan()
    assert len(wt.logins) == 2
    assert [c.headers["authorization"] for c in wt.calls] == [
        f"Bearer {WT_TOKEN_PREFIX}-1",
        f"Bearer {WT_TOKEN_PREFIX}-1",
        f"Bearer {WT_TOKEN_PREFIX}-2",
    ]
    assert result.reason == "optimal"


def test_a_forecast_that_keeps_refusing_does_not_loop(
    wt: FakeWattTime, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    wt.fault = Reply(401, {"error": "Unauthorized"})
    result, lines = delay_logged(caplog)
    assert len(wt.logins) == 2 and len(wt.calls) == 2  # one re-login, then give up
    assert result.reason == "source-failed" and result.start == NOW
    assert "HTTP 401" in result.detail
    assert len(lines) == 1 and "HTTP 401" in lines[0]
    clock.advance(carbonaware_core.FAILURE_TTL_SECONDS - 1)
    again = plan()
    assert again.reason == "source-failed"
    assert len(wt.logins) == 2 and len(wt.calls) == 2  # the failure is remembered


def test_wrong_credentials(wt: FakeWattTime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("WATTTIME_PASSWORD", WT_PASSWORD + "-old")
    result, lines = delay_logged(caplog)
    assert len(wt.logins) == 1 and wt.calls == []
    assert result.reason == "source-failed"
    assert "login refused" in result.detail and "HTTP 403" in result.detail
    assert len(lines) == 1 and "login refused" in lines[0]
    with pytest.raises(AssertionError):  # the wrong password contains the secret, so a leak would be caught
        assert_no_secrets(WT_PASSWORD + "-old")


def test_missing_credentials_ask_nothing(wt: FakeWattTime, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATTTIME_PASSWORD")
    result = plan()
    assert wt.logins == [] and wt.calls == []
    assert "WATTTIME_USERNAME and WATTTIME_PASSWORD" in result.detail


def test_a_region_outside_the_plan(wt: FakeWattTime, caplog: pytest.LogCaptureFixture) -> None:
    result, lines = delay_logged(caplog, region="us-east-1")  # -> US-MIDA-PJM -> PJM_DC, not in the free plan
    assert {query_params(c)["region"] for c in wt.calls} == {"PJM_DC"}
    assert len(wt.calls) == 1 and len(wt.logins) == 1  # a scope refusal is final: no re-login, no second ask
    assert result.reason == "source-failed"
    assert "Invalid scope" in result.detail and "PJM_DC" in result.detail
    assert len(lines) == 1 and "Invalid scope" in lines[0]


def test_a_login_without_a_token(wt: FakeWattTime) -> None:
    wt.login_fault = Reply(200, {"message": "ok"})
    result = plan()
    assert wt.calls == []
    assert result.reason == "source-failed" and "no token" in result.detail


def test_a_rate_limited_login_is_remembered(wt: FakeWattTime, clock: FakeClock) -> None:
    wt.login_fault = Reply(429, {"error": "Too many logins"}, {"Retry-After": "60"})
    first = plan()
    assert "429" in first.detail and len(wt.logins) == 1
    wt.login_fault = None
    clock.advance(59)
    assert plan().reason == "source-failed"
    assert len(wt.logins) == 1 and wt.calls == []
    clock.advance(2)
    assert plan().reason == "optimal"
    assert len(wt.logins) == 2 and len(wt.calls) == 1


@pytest.mark.parametrize(
    "meta",
    [
        {"data_point_period_seconds": 300, "units": "percent"},
        {"data_point_period_seconds": 300, "units": "lbs_co2_per_kwh"},
        {"data_point_period_seconds": 0, "units": "lbs_co2_per_mwh"},
        {"data_point_period_seconds": "300", "units": "lbs_co2_per_mwh"},
    ],
)
def test_unexpected_units_or_period(
    wt: FakeWattTime, caplog: pytest.LogCaptureFixture, meta: dict[str, object]
) -> None:
    data = [{"point_time": (NOW + i * FIVE).isoformat(), "value": v} for i, v in enumerate(moer_values(100))]
    wt.fault = Reply(200, {"data": data, "meta": {"region": "CAISO_NORTH", **meta}})
    result, lines = delay_logged(caplog)
    assert result.reason == "source-failed" and result.start == NOW
    assert "units" in result.detail or "data_point_period_seconds" in result.detail
    assert len(lines) == 1


def test_credentials_never_travel_over_plain_http_to_another_host(
    wt: FakeWattTime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATTTIME_API_URL", "http://api.watttime.invalid")
    result = plan()
    assert result.reason == "source-failed" and "plain HTTP" in result.detail
    assert wt.logins == []


@pytest.mark.parametrize("client", ["requests", "urllib"])
def test_a_token_no_header_can_carry_never_reaches_the_log(
    wt: FakeWattTime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, client: str
) -> None:
    monkeypatch.setenv("CARBONAWARE_HTTP_CLIENT", client)
    wt.login_fault = Reply(200, {"token": f"{WT_TOKEN_PREFIX}-broken\nsecond-line"})
    result, lines = delay_logged(caplog)  # asserts that no secret appears in any log line or the plan
    assert result.reason == "source-failed" and result.start == NOW
    assert len(lines) == 1


@pytest.mark.parametrize("client", ["requests", "urllib"])
def test_a_password_the_login_echoes_never_reaches_the_log(
    wt: FakeWattTime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, client: str
) -> None:
    monkeypatch.setenv("CARBONAWARE_HTTP_CLIENT", client)
    wt.login_fault = Reply(500, {"error": f"bad credentials: password {WT_PASSWORD} rejected"})
    result, _lines = delay_logged(caplog)  # asserts that no secret appears in any log line or the plan
    assert result.reason == "source-failed" and "HTTP 500" in result.detail
    assert "password *** rejected" in result.detail
