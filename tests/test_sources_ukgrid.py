"""The NESO Carbon Intensity API (Great Britain) as a forecast source (protocols.md §4), on loopback."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import carbonaware_core
from tests.fake_providers import (
    FakeNeso,
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
HALF0 = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
HALF = timedelta(minutes=30)
WINDOW = timedelta(hours=6)
DURATION = timedelta(minutes=45)
# 96 half hours from 12:00; the cheapest hour inside the window starts at 15:00
VALUES = [250 - (i % 4) * 5 if i not in (6, 7) else 60 + 20 * (i - 6) for i in range(96)]
GB_ZONE = {"provider": "gcp", "region": "europe-west2"}


@pytest.fixture(autouse=True)
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    return fake_clock(monkeypatch, NOW)


@pytest.fixture
def neso(server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> FakeNeso:
    fake = FakeNeso(server, slots(HALF0, HALF, VALUES))
    install(fake, monkeypatch)
    return fake


plan = Planner(WINDOW, DURATION, {"source": "ukgrid", "now": NOW, **GB_ZONE}).plan


def check_plan(result: carbonaware_core.Plan, fake: FakeNeso, now: datetime = NOW) -> None:
    expected = oracle(fake.intervals(), now, WINDOW, DURATION)
    assert result.start == expected.start
    assert result.expected == pytest.approx(expected.value())
    assert result.now == pytest.approx(expected.now_value())
    assert result.unit == "gCO2/kWh"
    assert result.grid_zone == "GB"
    assert result.source.startswith("ukgrid")


# ---- national and regional -------------------------------------------------------------------------------------


@pytest.mark.parametrize("client", ["requests", "urllib"])
def test_national_forecast(neso: FakeNeso, monkeypatch: pytest.MonkeyPatch, client: str) -> None:
    monkeypatch.setenv("CARBONAWARE_HTTP_CLIENT", client)
    result = plan()
    assert len(neso.calls) == 1
    seen = neso.calls[0]
    assert seen.method == "GET"
    assert path_of(seen) == "/intensity/2025-06-01T12:20Z/fw48h"
    assert query_params(seen) == {}
    assert result.reason == "optimal"
    assert result.start == datetime(2025, 6, 1, 15, 0, tzinfo=UTC)
    assert result.expected == pytest.approx((60 * 30 + 80 * 15) / 45)
    check_plan(result, neso)


def test_no_cloud_zone_is_needed(neso: FakeNeso) -> None:
    result = carbonaware_core.plan_delay(WINDOW, DURATION, source="ukgrid", now=NOW, timeout=5.0)
    assert path_of(neso.calls[0]) == "/intensity/2025-06-01T12:20Z/fw48h"
    assert result.reason == "optimal"
    check_plan(result, neso)


@pytest.mark.parametrize("shape", ["object", "list"])
def test_regional_by_postcode_from_the_environment(neso: FakeNeso, monkeypatch: pytest.MonkeyPatch, shape: str) -> None:
    neso.regional_shape = shape
    monkeypatch.setenv("CARBONAWARE_UK_POSTCODE", "rg10 6xx")  # a full postcode: only the outward code is sent
    result = plan()
    assert path_of(neso.calls[0]) == "/regional/intensity/2025-06-01T12:20Z/fw48h/postcode/RG10"
    assert result.reason == "optimal"
    check_plan(result, neso)


@pytest.mark.parametrize("shape", ["object", "list"])
@pytest.mark.parametrize(
    ("spec", "path"),
    [
        ("ukgrid:12", "/regional/intensity/2025-06-01T12:20Z/fw48h/regionid/12"),
        ("ukgrid:SW1A", "/regional/intensity/2025-06-01T12:20Z/fw48h/postcode/SW1A"),
    ],
)
def test_regional_from_the_source_spec(neso: FakeNeso, shape: str, spec: str, path: str) -> None:
    neso.regional_shape = shape
    result = plan(source=spec)
    assert path_of(neso.calls[0]) == path
    assert result.reason == "optimal"
    assert result.source == spec.partition(":")[0]
    check_plan(result, neso)


def test_the_spec_wins_over_the_environment(neso: FakeNeso, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARBONAWARE_UK_POSTCODE", "RG10")
    plan(source="ukgrid:13")
    assert path_of(neso.calls[0]).endswith("/regionid/13")


def test_not_a_postcode_asks_nothing(neso: FakeNeso, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARBONAWARE_UK_POSTCODE", "NOT-A-POSTCODE")
    result = plan()
    assert neso.calls == []
    assert result.reason == "source-failed" and "postcode" in result.detail


@pytest.mark.parametrize(
    "where",
    [{"provider": "aws", "region": "us-east-1"}, {"grid_zone": "FR"}, {"provider": "gcp", "region": "europe-west3"}],
)
def test_refuses_zones_outside_great_britain(neso: FakeNeso, where: dict[str, str]) -> None:
    options = {"source": "ukgrid", "now": NOW, "timeout": 5.0, **where}
    result = carbonaware_core.plan_delay(WINDOW, DURATION, **options)  # type: ignore[arg-type]
    assert neso.calls == []
    assert result.reason == "source-failed"
    assert "Great Britain only" in result.detail


@pytest.mark.parametrize(
    "where",
    [{"provider": "aws", "region": "eu-west-2"}, {"provider": "azure", "region": "uksouth"}, {"grid_zone": "GB"}],
)
def test_accepts_zones_in_great_britain(neso: FakeNeso, where: dict[str, str]) -> None:
    options = {"source": "ukgrid", "now": NOW, "timeout": 5.0, **where}
    result = carbonaware_core.plan_delay(WINDOW, DURATION, **options)  # type: ignore[arg-type]
    assert len(neso.calls) == 1
    assert result.reason == "optimal"


@pytest.mark.parametrize(("status", "code"), [(400, "400 Bad Request"), (500, "500 Internal Server Error")])
def test_neso_error_bodies(neso: FakeNeso, caplog: pytest.LogCaptureFixture, status: int, code: str) -> None:
    neso.fault = FakeNeso.error(status, "Something went wrong")
    caplog.set_level(logging.DEBUG, logger="carbonaware")
    result = carbonaware_core.carbonaware_delay(WINDOW, DURATION, source="ukgrid", now=NOW, timeout=5.0, **GB_ZONE)
    assert result.reason == "source-failed" and result.start == NOW
    assert f"HTTP {status}" in result.detail and code in result.detail
    lines = [r.getMessage() for r in library_lines(caplog.records)]
    assert len(lines) == 1 and f"HTTP {status}" in lines[0]
    assert_no_secrets(*lines, json.dumps(result.to_dict()))


def test_null_forecasts_are_gaps(neso: FakeNeso) -> None:
    values: list[float | None] = list(VALUES)
    values[6] = None  # 15:00-15:30 unknown
    neso.points = slots(HALF0, HALF, values)
    result = plan()
    check_plan(result, neso)
    assert not (result.start < HALF0 + 7 * HALF and result.start + DURATION > HALF0 + 6 * HALF)


def test_a_regional_answer_without_a_series_falls_back(neso: FakeNeso) -> None:
    neso.fault = Reply(200, {"data": {"regionid": 12, "shortname": "South England"}})
    result = plan(source="ukgrid:12")
    assert result.reason == "source-failed" and "ukgrid" in result.detail


# ---- every 'now' asks for the right half hour ----------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    now=st.datetimes(
        min_value=datetime(2020, 1, 1),
        max_value=datetime(2035, 12, 31),
        timezones=st.sampled_from([UTC, timezone(timedelta(hours=1)), timezone(timedelta(hours=-9, minutes=-30))]),
    ).map(lambda moment: moment.replace(second=0, microsecond=0)),
    regional=st.booleans(),
)
def test_the_path_carries_now_in_utc_to_the_minute(neso: FakeNeso, now: datetime, regional: bool) -> None:
    carbonaware_core.clear_cache()
    neso.calls.clear()
    utc_now = now.astimezone(UTC)
    first = utc_now.replace(minute=0 if utc_now.minute < 30 else 30)
    neso.points = slots(first, HALF, [200 + (i * 37) % 90 for i in range(96)])
    result = plan(now=now, source="ukgrid:7" if regional else "ukgrid")
    stamp = utc_now.strftime("%Y-%m-%dT%H:%MZ")
    wanted = f"/regional/intensity/{stamp}/fw48h/regionid/7" if regional else f"/intensity/{stamp}/fw48h"
    assert [path_of(c) for c in neso.calls] == [wanted]
    expected = oracle(neso.intervals(), utc_now, WINDOW, DURATION)
    assert result.start == expected.start
    assert result.delay == expected.start - utc_now
