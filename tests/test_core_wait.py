"""The wait: bounded by the window on the wall clock, in short chunks, interruptible, and async-friendly."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest

import carbonaware_core as core
from carbonaware_core import ForecastPoint, carbonaware_delay, carbonaware_delay_async
from tests.fake_providers import fake_clock
from tests.loopback import FakeClock, HostedScheduler, serving

BASE = datetime(2025, 6, 1, 12, 0, tzinfo=timezone.utc)
HOUR = timedelta(hours=1)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    return fake_clock(monkeypatch, BASE)


@pytest.fixture
def scheduler(monkeypatch: pytest.MonkeyPatch, clock: FakeClock) -> Iterator[HostedScheduler]:
    with serving(poll_interval=0.02) as server:
        monkeypatch.setenv("CARBONAWARE_SCHEDULER_BASE_URL", server.url)
        yield HostedScheduler(server, clock=clock.time, ideal_after=timedelta(hours=2))


def trough_at(offset: timedelta, *, low: float = 100.0, high: float = 400.0):
    """A series source with one low hour starting at BASE + ``offset`` (a fixed moment, as in a real forecast)."""
    begin, finish = BASE + offset, BASE + offset + HOUR

    def series(zone: core.CloudZone | None, start: datetime, end: datetime) -> list[ForecastPoint]:
        cuts = sorted({start, end, *(t for t in (begin, finish) if start < t < end)})
        return [ForecastPoint(a, b, low if begin <= a < finish else high) for a, b in itertools.pairwise(cuts)]

    return series


def test_sleeps_until_the_planned_start_in_short_chunks(clock: FakeClock) -> None:
    plan = carbonaware_delay(6 * HOUR, timedelta(minutes=30), "aws", "us-east-1", source=trough_at(2 * HOUR))
    assert (plan.reason, plan.delay, plan.start) == ("optimal", 2 * HOUR, BASE + 2 * HOUR)
    assert clock.now() == plan.start  # woke exactly at the start
    assert math.isclose(sum(clock.sleeps), 7200.0)
    assert all(0 < s <= core.WAIT_CHUNK_SECONDS for s in clock.sleeps)
    assert len(clock.sleeps) == math.ceil(7200 / core.WAIT_CHUNK_SECONDS)


def test_no_wait_when_now_is_best(clock: FakeClock) -> None:
    plan = carbonaware_delay(6 * HOUR, timedelta(minutes=30), "aws", "us-east-1", source=trough_at(timedelta(0)))
    assert (plan.reason, plan.delay) == ("already-best", timedelta(0))
    assert clock.sleeps == []


def test_never_past_the_window_even_if_a_source_says_later(clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    def fetch(query: core.Query) -> core.Decision:
        return core.Decision(start=query.now + 10 * HOUR, expected=100.0, now=400.0, savings=0.75)

    monkeypatch.setitem(core.SOURCES, "late", core.Source("late", fetch, cache_key=None))
    plan = carbonaware_delay(HOUR, timedelta(minutes=30), "aws", "us-east-1", source="late")
    assert plan.start <= BASE + HOUR
    assert clock.now() <= BASE + HOUR
    assert math.isclose(sum(clock.sleeps), 3600.0)


def test_time_spent_planning_counts_against_the_window(clock: FakeClock) -> None:
    """The window bounds the wall-clock wait from the call, however long planning itself took."""

    def slow(zone, start, end):
        clock.advance(40 * 60)  # the source took 40 minutes (a hung connection, a slow proxy...)
        return trough_at(timedelta(minutes=50))(zone, start, end)

    plan = carbonaware_delay(HOUR, timedelta(minutes=30), "aws", "us-east-1", source=slow)
    assert plan.delay == timedelta(minutes=50)
    assert clock.now() == BASE + timedelta(minutes=50)  # 40 planning + 10 waiting, not 40 + 50
    assert math.isclose(sum(clock.sleeps), 600.0)


def test_planning_longer_than_the_window_means_no_wait_at_all(clock: FakeClock) -> None:
    def hung(zone, start, end):
        clock.advance(3 * 3600)
        return trough_at(timedelta(minutes=30))(zone, start, end)

    carbonaware_delay(HOUR, timedelta(minutes=30), "aws", "us-east-1", source=hung)
    assert clock.sleeps == []


class LaggingClock(FakeClock):
    """Five seconds pass between reading the time and reading the date, as planning work does in real life."""

    def now(self) -> datetime:
        self.advance(5.0)
        return super().now()


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_a_live_wait_never_starts_before_the_planned_moment(
    monkeypatch: pytest.MonkeyPatch, asynchronous: bool
) -> None:
    """The plan's own ``now`` is read after the call began; the start is a real moment, not a delay from the call."""
    clock = LaggingClock(BASE)
    monkeypatch.setattr(core, "CLOCK", clock)
    args = (6 * HOUR, timedelta(minutes=30), "aws", "us-east-1")
    source = changing(trough_at(5 * HOUR), trough_at(timedelta(minutes=40)))  # the re-plan moves the start too
    if asynchronous:
        plan = asyncio.run(carbonaware_delay_async(*args, source=source))
    else:
        plan = carbonaware_delay(*args, source=source)
    assert len(source.calls) >= 2
    assert plan.start == BASE + timedelta(minutes=40)
    assert math.isclose(clock.time(), plan.start.timestamp(), abs_tol=1e-3)  # not five seconds early


def test_a_clock_jump_ends_the_wait(clock: FakeClock) -> None:
    """Wall clock, not a countdown: after a suspend/resume the wait ends at the planned moment, not later."""
    calls = []

    def suspended(seconds: float) -> None:
        calls.append(seconds)
        if len(calls) == 3:
            clock.advance(3 * 3600)  # the machine slept through the planned start

    clock.on_sleep = suspended
    carbonaware_delay(6 * HOUR, timedelta(minutes=30), "aws", "us-east-1", source=trough_at(2 * HOUR))
    assert len(calls) == 3


# --------------------------------------------------------------------------------------------------------------
# Re-planning during long waits: the start may move, never past the window
# --------------------------------------------------------------------------------------------------------------


def changing(*sources):
    """A source that answers with the first series, then (on every later call) with the second."""
    calls: list[datetime] = []

    def series(zone, start, end):
        calls.append(start)
        return (sources[0] if len(calls) == 1 else sources[1])(zone, start, end)

    series.calls = calls  # type: ignore[attr-defined]
    return series


def test_replan_moves_the_start_to_a_fresher_trough(clock: FakeClock) -> None:
    source = changing(trough_at(5 * HOUR), trough_at(timedelta(minutes=40)))
    plan = carbonaware_delay(6 * HOUR, timedelta(minutes=30), "aws", "us-east-1", source=source)
    assert len(source.calls) >= 2  # it looked again during the 5 h wait
    assert clock.now() == BASE + timedelta(minutes=40)
    assert plan.start == BASE + timedelta(minutes=40)


def test_replan_never_goes_past_the_window(clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    answers = iter([2 * HOUR] + [10 * HOUR] * 100)

    def fetch(query: core.Query) -> core.Decision:
        return core.Decision(start=query.now + next(answers), expected=100.0, now=400.0, savings=0.75)

    monkeypatch.setitem(core.SOURCES, "drifting", core.Source("drifting", fetch, cache_key=None))
    carbonaware_delay(3 * HOUR, timedelta(minutes=30), "aws", "us-east-1", source="drifting")
    assert clock.now() <= BASE + 3 * HOUR


def test_a_failed_replan_keeps_the_start(clock: FakeClock) -> None:
    def broken(zone, start, end):
        raise core.SourceError("forecast service down")

    source = changing(trough_at(2 * HOUR), broken)
    plan = carbonaware_delay(6 * HOUR, timedelta(minutes=30), "aws", "us-east-1", source=source)
    assert len(source.calls) >= 2
    assert clock.now() == BASE + 2 * HOUR
    assert plan.start == BASE + 2 * HOUR


# --------------------------------------------------------------------------------------------------------------
# Switches
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["1", "true", "yes"])
def test_disable_makes_no_request_and_never_waits(
    value: str, scheduler: HostedScheduler, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    monkeypatch.setenv("CARBONAWARE_DISABLE", value)
    caplog.set_level(logging.INFO)
    with serving(poll_interval=0.02) as metadata:
        monkeypatch.setenv("CARBONAWARE_METADATA_HOST", metadata.host)
        plan = carbonaware_delay(6 * HOUR, timedelta(minutes=30))  # no zone: not even detection may run
        assert metadata.seen == []
    assert (plan.reason, plan.delay, plan.start) == ("disabled", timedelta(0), BASE)
    assert scheduler.calls == []
    assert clock.sleeps == [] and clock.asleeps == []
    plan = carbonaware_delay(6 * HOUR, timedelta(minutes=30), "aws", "us-east-1")
    assert plan.reason == "disabled" and scheduler.calls == []


def test_disable_async(scheduler: HostedScheduler, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARBONAWARE_DISABLE", "1")
    plan = asyncio.run(carbonaware_delay_async(6 * HOUR, timedelta(minutes=30), "aws", "us-east-1"))
    assert plan.reason == "disabled"
    assert scheduler.calls == [] and clock.asleeps == [] and clock.sleeps == []


def test_dry_run_plans_logs_and_returns_at_once(
    scheduler: HostedScheduler, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CARBONAWARE_DRY_RUN", "1")
    caplog.set_level(logging.INFO)
    plan = carbonaware_delay(6 * HOUR, timedelta(minutes=30), "aws", "us-east-1")
    assert plan.reason == "dry-run"
    assert plan.start == BASE + 2 * HOUR and plan.delay == 2 * HOUR  # what it would have done
    assert len(scheduler.calls) == 1  # it did plan
    assert clock.sleeps == []  # but did not wait
    [line] = [r.getMessage() for r in caplog.records if r.name == "carbonaware"]
    assert "would wait 2h00m" in line and "2025-06-01T14:00:00Z" in line


def test_dry_run_async(scheduler: HostedScheduler, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARBONAWARE_DRY_RUN", "true")
    plan = asyncio.run(carbonaware_delay_async(6 * HOUR, timedelta(minutes=30), "aws", "us-east-1"))
    assert plan.reason == "dry-run" and plan.delay == 2 * HOUR
    assert clock.asleeps == [] and clock.sleeps == []


# --------------------------------------------------------------------------------------------------------------
# Interruption
# --------------------------------------------------------------------------------------------------------------


def test_keyboard_interrupt_during_the_wait_propagates_promptly(clock: FakeClock) -> None:
    calls = []

    def interrupt(seconds: float) -> None:
        calls.append(seconds)
        if len(calls) == 3:
            raise KeyboardInterrupt

    clock.on_sleep = interrupt
    with pytest.raises(KeyboardInterrupt):
        carbonaware_delay(6 * HOUR, timedelta(minutes=30), "aws", "us-east-1", source=trough_at(2 * HOUR))
    assert len(calls) == 3  # not one more sleep after the interrupt
    assert clock.now() < BASE + timedelta(seconds=3 * core.WAIT_CHUNK_SECONDS)


def test_cancelling_the_async_wait(clock: FakeClock) -> None:
    async def main() -> tuple[bool, int]:
        task = asyncio.create_task(
            carbonaware_delay_async(6 * HOUR, timedelta(minutes=30), "aws", "us-east-1", source=trough_at(2 * HOUR))
        )
        while len(clock.asleeps) < 5:
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return task.cancelled(), len(clock.asleeps)

    cancelled, sleeps = asyncio.run(main())
    assert cancelled
    assert sleeps <= 6
    assert clock.now() < BASE + HOUR


# --------------------------------------------------------------------------------------------------------------
# Async: the event loop keeps running
# --------------------------------------------------------------------------------------------------------------


def test_async_uses_asleep_not_the_blocking_sleep(clock: FakeClock) -> None:
    clock.sleep = lambda seconds: pytest.fail("the async wait called the blocking sleep")  # type: ignore[method-assign]
    plan = asyncio.run(
        carbonaware_delay_async(6 * HOUR, timedelta(minutes=30), "aws", "us-east-1", source=trough_at(HOUR))
    )
    assert plan.delay == HOUR
    assert math.isclose(sum(clock.asleeps), 3600.0)
    assert all(0 < s <= core.WAIT_CHUNK_SECONDS for s in clock.asleeps)


def test_async_wait_never_blocks_the_event_loop() -> None:
    """Real clock: a slow (blocking) source and a one-second wait, while another coroutine keeps ticking."""

    def slow_source(zone, start, end):
        time.sleep(0.3)  # a blocking network call inside the source
        return [
            ForecastPoint(start, start + timedelta(seconds=1), 500.0),
            ForecastPoint(start + timedelta(seconds=1), end, 100.0),
        ]

    async def main() -> tuple[core.Plan, list[float], float]:
        ticks: list[float] = []
        stop = asyncio.Event()

        async def ticker() -> None:
            while not stop.is_set():
                ticks.append(time.monotonic())
                await asyncio.sleep(0.01)

        ticking = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        began = time.monotonic()
        plan = await carbonaware_delay_async(
            timedelta(minutes=5), timedelta(minutes=30), "aws", "us-east-1", source=slow_source
        )
        elapsed = time.monotonic() - began
        stop.set()
        await ticking
        return plan, ticks, elapsed

    plan, ticks, elapsed = asyncio.run(main())
    assert plan.reason == "optimal"
    assert timedelta(seconds=0.9) <= plan.delay <= timedelta(seconds=1)
    assert 1.0 <= elapsed < 2.5  # planning (0.3 s) plus up to a second of waiting
    assert len(ticks) >= 60  # about 130 if nothing blocks; a blocked loop would tick a handful of times
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    assert max(gaps) < 0.25  # never held up by the 0.3 s blocking source, nor by a sleep


# --------------------------------------------------------------------------------------------------------------
# Reporting around the wait
# --------------------------------------------------------------------------------------------------------------


def test_on_plan_hook_and_custom_logger(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    seen: list[core.Plan] = []
    custom = logging.getLogger("my.flow")
    plan = carbonaware_delay(
        6 * HOUR, timedelta(minutes=30), "aws", "us-east-1", source=trough_at(HOUR), on_plan=seen.append, logger=custom
    )
    assert seen == [plan]
    [record] = [r for r in caplog.records if r.name in ("my.flow", "carbonaware")]
    assert record.name == "my.flow"
    assert "waiting 1h00m" in record.getMessage()


def test_a_failing_on_plan_hook_does_not_break_the_work(clock: FakeClock, caplog) -> None:
    caplog.set_level(logging.INFO)

    def broken(plan: core.Plan) -> None:
        raise RuntimeError("dashboard down")

    plan = carbonaware_delay(
        6 * HOUR, timedelta(minutes=30), "aws", "us-east-1", source=trough_at(HOUR), on_plan=broken
    )
    assert plan.delay == HOUR
    assert math.isclose(sum(clock.sleeps), 3600.0)
    assert any("on_plan hook failed" in r.getMessage() and "dashboard down" in r.getMessage() for r in caplog.records)


def test_a_source_raising_anything_runs_now(clock: FakeClock, caplog) -> None:
    caplog.set_level(logging.INFO)

    def broken(zone, start, end):
        raise RuntimeError("bug in user code")

    plan = carbonaware_delay(6 * HOUR, timedelta(minutes=30), "aws", "us-east-1", source=broken)
    assert (plan.reason, plan.delay) == ("source-failed", timedelta(0))
    assert "bug in user code" in plan.detail
    assert clock.sleeps == []


def test_no_zone_runs_now_with_one_warning(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    plan = carbonaware_delay(6 * HOUR, timedelta(minutes=30))  # nothing detected: refused metadata host
    assert (plan.reason, plan.delay, plan.zone) == ("no-zone", timedelta(0), None)
    [record] = [r for r in caplog.records if r.name == "carbonaware"]
    assert record.levelno == logging.WARNING
    assert clock.sleeps == []
