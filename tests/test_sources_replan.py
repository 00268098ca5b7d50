"""Re-planning during a long wait, on the fake clock, against a forecast provider whose answer changes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

import pytest

import carbonaware_core
from tests.fake_providers import (
    HOUR0,
    NOW,
    FakeElectricityMaps,
    Point,
    fake_clock,
    install,
    library_lines,
    oracle,
    series,
)
from tests.loopback import FakeClock, LoopbackServer, Reply

UTC = timezone.utc
WINDOW = timedelta(hours=6)
DURATION = timedelta(minutes=30)
DEADLINE = NOW + WINDOW  # 18:20
HOUR = timedelta(hours=1)


def at(hour: int, minute: int = 0) -> datetime:
    return datetime(2025, 6, 1, hour, minute, tzinfo=UTC)


def low_at(*hours: int) -> Callable[[datetime], float]:
    """An hourly forecast: 300 everywhere, 100 in the given hours (UTC, on NOW's day)."""
    return lambda moment: 100.0 if moment.hour in hours and moment.date() == NOW.date() else 300.0


def hourly(value: Callable[[datetime], float]) -> list[Point]:
    return series(HOUR, HOUR0, HOUR0 + timedelta(hours=24), value)


@pytest.fixture(autouse=True)
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    return fake_clock(monkeypatch, NOW)


@pytest.fixture
def em(server: LoopbackServer, monkeypatch: pytest.MonkeyPatch, clock: FakeClock) -> FakeElectricityMaps:
    fake = FakeElectricityMaps(server, hourly(low_at(17)))  # first answer: the best start is 17:00
    fake.clock = clock.now  # each answer starts at the hour the request is made in, as Electricity Maps' does
    return install(fake, monkeypatch)  # type: ignore[return-value]


def changes_after_first(
    fake: FakeElectricityMaps, later: list[Point] | None = None, fault: Reply | None = None
) -> None:
    """Every request after the first gets ``later`` points (or ``fault``)."""

    def on_request(number: int) -> None:
        if number >= 2:
            if later is not None:
                fake.points = later
            fake.fault = fault

    fake.on_request = on_request


def wait(caplog: pytest.LogCaptureFixture, **options: object) -> carbonaware_core.Plan:
    settings = {"source": "electricitymaps", "now": NOW, "timeout": 5.0, "provider": "aws", "region": "eu-central-1"}
    settings.update(options)
    with caplog.at_level(logging.DEBUG, logger="carbonaware"):
        return carbonaware_core.carbonaware_delay(WINDOW, DURATION, **settings)  # type: ignore[arg-type]


def test_a_fresher_forecast_moves_the_start(
    em: FakeElectricityMaps, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    changes_after_first(em, hourly(low_at(14)))
    result = wait(caplog)
    # the first re-plan runs 30 minutes in, at 12:50, over what is left of the window
    expected = oracle(em.intervals(), at(12, 50), DEADLINE - at(12, 50), DURATION)
    assert expected.start == at(14)
    assert clock.now() == at(14)  # the work starts at the new best time
    assert result.start == at(14)
    assert result.reason == "optimal" and result.source == "electricitymaps"
    assert len(em.calls) >= 2
    moved = [r.getMessage() for r in library_lines(caplog.records) if "re-planned" in r.getMessage()]
    assert len(moved) == 1 and "2025-06-01T17:00:00Z" in moved[0] and "2025-06-01T14:00:00Z" in moved[0]


def test_a_later_best_time_never_passes_the_deadline(
    em: FakeElectricityMaps, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    # the new forecast falls all evening: the cheapest hours lie after 18:20, the end of the original window
    falling = hourly(lambda moment: 400.0 - 20 * ((moment - HOUR0) // HOUR))
    changes_after_first(em, falling)
    result = wait(caplog)
    expected = oracle(em.intervals(), at(12, 50), DEADLINE - at(12, 50), DURATION)
    assert expected.start == at(18)
    assert clock.now() == result.start == at(18)
    assert clock.now() <= DEADLINE
    assert all(s <= carbonaware_core.WAIT_CHUNK_SECONDS for s in clock.sleeps)


def test_a_failed_re_plan_keeps_the_start(
    em: FakeElectricityMaps, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    changes_after_first(em, fault=Reply(503, "Service Unavailable", {"Content-Type": "text/plain"}))
    result = wait(caplog)
    assert len(em.calls) >= 2  # it did try again
    assert clock.now() == result.start == at(17)
    assert result.reason == "optimal" and result.source == "electricitymaps"
    kept = [r for r in library_lines(caplog.records) if "keeping the start" in r.getMessage()]
    assert kept and all(r.levelno <= logging.INFO for r in kept)


def test_replan_off_asks_once(em: FakeElectricityMaps, clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    changes_after_first(em, hourly(low_at(14)))
    result = wait(caplog, replan=False)
    assert len(em.calls) == 1
    assert clock.now() == result.start == at(17)


def test_short_waits_do_not_re_plan_by_default(
    em: FakeElectricityMaps, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    em.points = hourly(low_at(13))  # best start 13:00: a 40-minute wait
    changes_after_first(em, hourly(low_at(12)))
    result = wait(caplog)
    assert len(em.calls) == 1
    assert clock.now() == result.start == at(13)


def test_replan_every_sets_the_interval(
    em: FakeElectricityMaps, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    changes_after_first(em, hourly(low_at(17)))  # unchanged forecast: count the re-plans
    seen_at: list[datetime] = []
    em.on_request = lambda _number: seen_at.append(clock.now())
    wait(caplog, replan_every=timedelta(hours=1))
    # 12:20 plan, then 13:20, 14:20, 15:20, 16:20 (more than a minute before 17:00)
    assert seen_at == [at(12, 20), at(13, 20), at(14, 20), at(15, 20), at(16, 20)]


def test_async_waits_re_plan_too(em: FakeElectricityMaps, clock: FakeClock) -> None:
    changes_after_first(em, hourly(low_at(14)))
    result = asyncio.run(
        carbonaware_core.carbonaware_delay_async(
            WINDOW, DURATION, source="electricitymaps", now=NOW, timeout=5.0, provider="aws", region="eu-central-1"
        )
    )
    assert clock.now() == result.start == at(14)
    assert clock.asleeps and not clock.sleeps
