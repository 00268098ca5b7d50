"""The planner: exact optimum over step series, checked against a brute-force evaluation on a fine grid."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import carbonaware_core as core
from carbonaware_core import ForecastPoint, SourceError, choose_start, lowest_mean_start, plan_delay

BASE = datetime(2025, 6, 1, 12, 0, tzinfo=timezone.utc)
MINUTE = timedelta(minutes=1)
TOLERANCE = 1e-6  # relative, on means of a few hundred g/kWh


# --------------------------------------------------------------------------------------------------------------
# Series on an integer-minute lattice relative to ``now``: every candidate start the planner must consider lies on
# the lattice, so a brute force over whole minutes finds the true optimum and its earliest start exactly.
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    start: int  # minutes after now (negative: before now)
    end: int
    value: float


def _is_valid(value: float) -> bool:
    return math.isfinite(value) and value >= 0


periods = st.one_of(st.sampled_from([5, 15, 30, 60]), st.integers(1, 120))
INVALID = (math.nan, -1.0, -250.0, math.inf)


@st.composite
def series(draw: st.DrawFn) -> list[Segment]:
    """A step series around now: random period lengths, occasional gaps and invalid values (NaN, negative,
    infinite), near-ties; usually covering now, sometimes starting a little after it."""
    late = draw(st.integers(0, 4)) == 0
    cursor = draw(st.integers(1, 45)) if late else draw(st.integers(-240, 0))
    segments = []
    for _ in range(draw(st.integers(1, 16))):
        if draw(st.integers(0, 7)) == 0:
            cursor += draw(st.integers(1, 45))
        length = draw(periods)
        kind = draw(st.integers(0, 9))
        if kind == 0:
            value = draw(st.sampled_from(INVALID))
        elif kind == 1:
            value = float(draw(st.integers(0, 3)))  # near-ties
        else:
            value = float(draw(st.integers(0, 1000)))
        segments.append(Segment(cursor, cursor + length, value))
        cursor += length
    return segments


def to_points(segments: list[Segment], now: datetime) -> list[ForecastPoint]:
    return [ForecastPoint(now + s.start * MINUTE, now + s.end * MINUTE, s.value) for s in segments]


@dataclass(frozen=True)
class Truth:
    length: int  # job length actually compared (minutes), after shrinking to the covered horizon
    best: Fraction  # lowest mean over whole-minute starts in [0, window]
    earliest: int  # earliest whole-minute start with that mean
    now_mean: Fraction
    runs: list[tuple[int, int]]
    valid: list[Segment]


def brute_force(segments: list[Segment], window: int, duration: int) -> Truth | str:
    """The planner's contract evaluated naively: every whole-minute start, exact integer arithmetic."""
    valid = sorted((s for s in segments if _is_valid(s.value)), key=lambda s: s.start)
    if not valid:
        return "empty"
    if valid[-1].end <= 0:
        return "stale"
    first = valid[0]
    if 0 < first.start <= first.end - first.start:  # a first value just after now covers now
        valid[0] = Segment(0, first.end, first.value)
    runs: list[tuple[int, int]] = []
    for seg in valid:
        if runs and seg.start == runs[-1][1]:
            runs[-1] = (runs[-1][0], seg.end)
        else:
            runs.append((seg.start, seg.end))
    covering = [run for run in runs if run[0] <= 0 < run[1]]
    if not covering:
        return "uncovered"
    length = min(duration, covering[0][1])

    def integral(a: int, b: int) -> int:
        return int(sum((min(b, s.end) - max(a, s.start)) * s.value for s in valid if s.start < b and s.end > a))

    feasible = [s for s in range(window + 1) if any(lo <= s and s + length <= hi for lo, hi in runs)]
    sums = {s: integral(s, s + length) for s in feasible}
    lowest = min(sums.values())
    earliest = min(s for s in feasible if sums[s] == lowest)
    return Truth(length, Fraction(lowest, length), earliest, Fraction(sums[0], length), runs, valid)


def exact_mean(valid: list[Segment], start: Fraction, length: int) -> Fraction:
    end = start + length
    total = sum(
        ((min(end, s.end) - max(start, s.start)) * Fraction(s.value) for s in valid if s.start < end and s.end > start),
        Fraction(0),
    )
    return total / length


def close(a: float | Fraction, b: float | Fraction) -> bool:
    return abs(float(a) - float(b)) <= TOLERANCE * max(1.0, abs(float(b)))


# --------------------------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------------------------


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    segments=series(),
    window=st.integers(1, 480),
    duration=st.integers(1, 240),
    seconds=st.integers(0, 59),
    shuffle=st.randoms(use_true_random=False),
)
@example(  # a flat series: every start ties, the earliest (now) must win
    segments=[Segment(-30, 600, 200.0)], window=300, duration=30, seconds=0, shuffle=None
)
@example(  # two equally good troughs: the first must win
    segments=[Segment(0, 60, 300.0), Segment(60, 90, 100.0), Segment(90, 150, 300.0), Segment(150, 180, 100.0)],
    window=170,
    duration=30,
    seconds=7,
    shuffle=None,
)
def test_planner_matches_brute_force(segments, window, duration, seconds, shuffle) -> None:
    now = BASE + timedelta(seconds=seconds)
    points = to_points(segments, now)
    if shuffle is not None:
        shuffle.shuffle(points)  # providers are sorted, user files need not be
    truth = brute_force(segments, window, duration)
    if isinstance(truth, str):
        with pytest.raises(SourceError):
            choose_start(points, now, window * MINUTE, duration * MINUTE)
        return

    choice = choose_start(points, now, window * MINUTE, duration * MINUTE)
    t0 = now.timestamp()
    start = Fraction((choice.start - t0) / 60)  # minutes after now, exactly as the float says

    # the job length compared is the requested one, shrunk only to the covered horizon
    assert close(choice.length / 60, truth.length)
    # never a start outside [now, now + window]
    assert -1e-6 <= start <= window + 1e-6
    # feasible: [start, start + length] lies inside one gap-free run of valid data
    assert any(lo - 1e-6 <= start and start + truth.length <= hi + 1e-6 for lo, hi in truth.runs)
    # optimal: no whole-minute start is better (the lattice holds every candidate, so this is the true optimum)
    achieved = exact_mean(truth.valid, start, truth.length)
    assert float(achieved) <= float(truth.best) + TOLERANCE * max(1.0, float(truth.best))
    # the reported mean is the real mean at the reported start, and the "now" mean is the real one
    assert close(choice.expected, achieved)
    assert close(choice.now_value, truth.now_mean)
    # ties go to the earliest start: nothing earlier than the chosen start reaches the optimum
    assert start <= truth.earliest + Fraction(1, 10**6)


@settings(max_examples=200, deadline=None)
@given(segments=series(), window=st.integers(1, 480), duration=st.integers(1, 240), min_savings=st.floats(0, 0.9))
def test_plan_delay_over_any_series_is_a_valid_plan(segments, window, duration, min_savings) -> None:
    """Whatever the series, plan_delay answers a plan inside the window, never an exception."""
    now = BASE
    plan = plan_delay(
        window * MINUTE,
        duration * MINUTE,
        "aws",
        "us-east-1",
        source=to_points(segments, now),
        now=now,
        min_savings=min_savings,
    )
    assert now <= plan.start <= now + window * MINUTE
    assert plan.delay == plan.start - now
    json.dumps(plan.to_dict())
    truth = brute_force(segments, window, duration)
    if isinstance(truth, str):
        assert (plan.reason, plan.delay) == ("source-failed", timedelta(0))
        return
    assert plan.now is not None and close(plan.now, truth.now_mean)
    gain = (truth.now_mean - truth.best) / truth.now_mean if truth.now_mean > 0 else Fraction(0)
    negligible = core.NEGLIGIBLE_SAVINGS  # less than this is no reason to wait
    if truth.earliest == 0 or gain < negligible - 1e-9:
        assert plan.reason == "already-best" and plan.delay == timedelta(0)
    elif abs(gain - negligible) <= 1e-9:
        return  # on the boundary, float rounding decides
    elif gain < min_savings - 1e-9:
        assert plan.reason == "below-threshold" and plan.delay == timedelta(0)
        assert plan.expected is not None and close(plan.expected, plan.now)
    elif gain > min_savings + 1e-9:
        assert plan.reason == "optimal" and plan.delay > timedelta(0)
        assert plan.expected is not None and close(plan.expected, truth.best)
        assert plan.savings is not None and close(plan.savings, gain)


@settings(max_examples=300, deadline=None)
@given(
    values=st.lists(st.floats(0, 1000, allow_nan=False), min_size=1, max_size=12),
    widths=st.lists(st.floats(0.5, 100), min_size=12, max_size=12),
    earliest=st.floats(-50, 600),
    span=st.floats(0, 600),
    length=st.floats(0.1, 300),
)
def test_lowest_mean_start_beats_a_fine_grid(values, widths, earliest, span, length) -> None:
    """Arbitrary real boundaries: the exact answer is at least as good as every point of a 0.1 s grid."""
    starts, ends, t = [], [], 0.0
    for width in widths[: len(values)]:
        starts.append(t)
        t += width
        ends.append(t)
    latest = earliest + span
    found = lowest_mean_start(starts, ends, values, earliest, latest, length)

    def mean(s: float) -> float:
        return (
            sum(max(0.0, min(e, s + length) - max(b, s)) * v for b, e, v in zip(starts, ends, values, strict=True))
            / length
        )

    lo, hi = max(earliest, starts[0]), min(latest, ends[-1] - length)  # feasible starts of one gap-free run
    if lo > hi:
        assert found is None
        return
    grid = [lo + i * 0.1 for i in range(int((hi - lo) / 0.1) + 1)] + [hi]
    assert found is not None
    start, best = found
    assert lo - 1e-9 <= start <= hi + 1e-9
    assert math.isclose(best, mean(start), rel_tol=1e-9, abs_tol=1e-6)
    assert all(best <= mean(s) + 1e-6 * max(1.0, mean(s)) for s in grid)


# --------------------------------------------------------------------------------------------------------------
# Examples
# --------------------------------------------------------------------------------------------------------------


def hourly(now: datetime, *intensities: float, offset: timedelta = timedelta(0)) -> list[ForecastPoint]:
    first = now + offset
    return [
        ForecastPoint(first + i * timedelta(hours=1), first + (i + 1) * timedelta(hours=1), v)
        for i, v in enumerate(intensities)
    ]


def plan(points: list[ForecastPoint], **options: object) -> core.Plan:
    window = options.pop("window", timedelta(hours=6))
    duration = options.pop("duration", timedelta(minutes=30))
    return plan_delay(window, duration, "aws", "us-east-1", source=points, now=BASE, **options)


def test_trough_is_found_and_reported() -> None:
    result = plan(hourly(BASE, 400, 300, 120, 350, 420, 410, 400))
    assert result.reason == "optimal"
    assert result.start == BASE + timedelta(hours=2)
    assert result.delay == timedelta(hours=2)
    assert result.now == pytest.approx(400)
    assert result.expected == pytest.approx(120)
    assert result.savings == pytest.approx(0.7)
    assert result.source == "series"
    assert result.zone == core.CloudZone("aws", "us-east-1")


def test_job_straddling_a_boundary_is_averaged_exactly() -> None:
    # a 90-minute job: starting at 1:30 covers 30 min of 300 then 60 min of 60 -> (150 + 60) / 1.5 = 140;
    # starting at 2:00 covers 60 of 60 and 30 of 500 -> 206.7; the best is 1:30
    result = plan(hourly(BASE, 400, 300, 60, 500, 500, 500, 500, 500), duration=timedelta(minutes=90))
    assert result.start == BASE + timedelta(hours=1, minutes=30)
    assert result.expected == pytest.approx((0.5 * 300 + 1 * 60) / 1.5)


def test_partial_coverage_compares_only_the_covered_part() -> None:
    points = [
        ForecastPoint(BASE, BASE + timedelta(minutes=20), 300.0),
        ForecastPoint(BASE + timedelta(minutes=20), BASE + timedelta(minutes=40), 100.0),
    ]
    choice = choose_start(points, BASE, timedelta(hours=6), timedelta(hours=2))
    assert choice.length == pytest.approx(40 * 60)  # the job shrinks to the 40 covered minutes
    assert choice.start == pytest.approx(BASE.timestamp())  # and only "now" fits a 40-minute job
    result = plan(points, duration=timedelta(hours=2))
    assert result.reason == "already-best"
    assert "covered part" in result.detail
    assert result.now == pytest.approx(200.0)


def test_series_starting_a_little_after_now_is_carried_back() -> None:
    points = hourly(BASE, 250, 90, 400, 400, 400, 400, 400, offset=timedelta(minutes=7))
    result = plan(points)
    assert result.now == pytest.approx(250.0)  # the first value covers [now, now + 7 min)
    assert result.start == BASE + timedelta(hours=1, minutes=7)
    assert result.reason == "optimal"


def test_series_starting_beyond_one_period_after_now_fails_open() -> None:
    result = plan(hourly(BASE, 100, 100, 100, offset=timedelta(minutes=90)))
    assert (result.reason, result.delay) == ("source-failed", timedelta(0))
    assert "does not cover now" in result.detail


def test_stale_series_entirely_in_the_past_runs_now() -> None:
    result = plan(hourly(BASE, 50, 60, 70, offset=-timedelta(hours=5)))
    assert (result.reason, result.delay, result.start) == ("source-failed", timedelta(0), BASE)
    assert "stale" in result.detail
    assert result.expected is None and result.now is None and result.savings is None


def test_empty_series_runs_now() -> None:
    result = plan([])
    assert (result.reason, result.delay, result.start) == ("source-failed", timedelta(0), BASE)
    assert "empty" in result.detail


def test_series_of_only_invalid_values_runs_now() -> None:
    result = plan(hourly(BASE, math.nan, -5, math.inf))
    assert (result.reason, result.delay) == ("source-failed", timedelta(0))


def test_invalid_value_is_a_gap_the_job_cannot_span() -> None:
    # the 10 at 3:00 would be best, but NaN at 2:00 and 4:00 leaves a one-hour island: a 2 h job cannot use it
    points = hourly(BASE, 300, 300, math.nan, 10, math.nan, 200, 200, 200, 200)
    result = plan(points, duration=timedelta(hours=2))
    assert result.start == BASE + timedelta(hours=5)
    assert result.expected == pytest.approx(200)
    result = plan(points, duration=timedelta(hours=1))
    assert result.start == BASE + timedelta(hours=3)


def test_overlapping_points_are_cut_at_the_later_start() -> None:
    points = [
        ForecastPoint(BASE, BASE + timedelta(hours=2), 400.0),
        ForecastPoint(BASE + timedelta(hours=1), BASE + timedelta(hours=3), 100.0),
    ]
    result = plan(points, duration=timedelta(hours=1))
    assert result.start == BASE + timedelta(hours=1)
    assert result.expected == pytest.approx(100.0)
    assert result.now == pytest.approx(400.0)


@pytest.mark.parametrize(
    ("min_savings", "reason", "delay"),
    [
        (0.0, "optimal", timedelta(hours=1)),
        (0.09, "optimal", timedelta(hours=1)),
        (0.11, "below-threshold", timedelta(0)),
        (0.5, "below-threshold", timedelta(0)),
    ],
)
def test_min_savings_is_respected(min_savings: float, reason: str, delay: timedelta) -> None:
    result = plan(hourly(BASE, 100, 90, 100, 100, 100, 100, 100), min_savings=min_savings)
    assert (result.reason, result.delay) == (reason, delay)
    if reason == "below-threshold":
        assert result.start == BASE and result.savings == 0.0
        assert result.expected == pytest.approx(100.0)
        assert "below min_savings" in result.detail


def test_already_best_when_now_is_the_minimum() -> None:
    result = plan(hourly(BASE, 80, 120, 200, 90, 300, 150, 100))
    assert (result.reason, result.delay, result.start) == ("already-best", timedelta(0), BASE)
    assert result.savings == 0.0
    assert result.expected == pytest.approx(80) and result.now == pytest.approx(80)


def test_flat_series_ties_go_to_now() -> None:
    result = plan(hourly(BASE, 200, 200, 200, 200, 200, 200, 200, 200))
    assert (result.reason, result.delay) == ("already-best", timedelta(0))


def test_equal_troughs_prefer_the_first() -> None:
    result = plan(hourly(BASE, 300, 50, 300, 50, 300, 50, 300))
    assert result.start == BASE + timedelta(hours=1)


def test_start_is_never_outside_the_window_even_if_the_trough_is() -> None:
    result = plan(hourly(BASE, 300, 290, 280, 270, 5, 5, 5), window=timedelta(hours=2))
    assert result.start == BASE + timedelta(hours=2)
    assert result.expected == pytest.approx(280)


def test_lowest_mean_start_none_when_no_start_fits() -> None:
    assert lowest_mean_start([0.0], [100.0], [5.0], 0.0, 50.0, 200.0) is None
    assert lowest_mean_start([], [], [], 0.0, 50.0, 10.0) is None
    # two runs with a gap: only the second is long enough
    found = lowest_mean_start([0.0, 200.0], [100.0, 600.0], [1.0, 9.0], 0.0, 1000.0, 150.0)
    assert found == (200.0, pytest.approx(9.0))


def test_timestamps_in_other_timezones_are_the_same_instants() -> None:
    plus2 = timezone(timedelta(hours=2))
    points = [
        ForecastPoint(
            (BASE + timedelta(hours=i)).astimezone(plus2), (BASE + timedelta(hours=i + 1)).astimezone(plus2), v
        )
        for i, v in enumerate([300, 100, 300, 300, 300, 300, 300])
    ]
    result = plan(points)
    assert result.start == BASE + timedelta(hours=1)


def test_big_series_is_planned_quickly() -> None:
    """O(n log n): a week of 5-minute points (2,016) with a 48 h window plans in well under a second."""
    import random
    import time

    rng = random.Random(7)
    points = [
        ForecastPoint(BASE + i * 5 * MINUTE, BASE + (i + 1) * 5 * MINUTE, rng.uniform(50, 500)) for i in range(7 * 288)
    ]
    began = time.perf_counter()
    choice = choose_start(points, BASE, timedelta(hours=48), timedelta(hours=3))
    assert time.perf_counter() - began < 0.5
    assert BASE.timestamp() <= choice.start <= BASE.timestamp() + 48 * 3600


def test_brute_force_helper_is_not_vacuous() -> None:
    """Guard the oracle itself: a hand-computed case."""
    truth = brute_force([Segment(0, 60, 300.0), Segment(60, 120, 100.0)], window=90, duration=30)
    assert isinstance(truth, Truth)
    assert (truth.earliest, truth.best, truth.now_mean) == (60, 100, 300)
    assert brute_force([Segment(-90, -30, 5.0)], 60, 30) == "stale"
    assert brute_force([Segment(40, 70, 5.0)], 60, 30) == "uncovered"
    assert brute_force([Segment(10, 100, 5.0)], 60, 30) != "uncovered"  # carried back


@pytest.fixture
def non_utc_machine() -> Iterator[None]:
    """The process's local time zone is UTC+05:30, as on a laptop or a VM in India."""
    import os
    import time

    saved = os.environ.get("TZ")
    os.environ["TZ"] = "Asia/Kolkata"
    time.tzset()
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = saved
        time.tzset()


def test_naive_datetimes_in_a_user_series_are_utc_not_local_time(non_utc_machine) -> None:
    """parse_datetime reads naive times as UTC; points from a user's callable must not mean something else on a
    machine whose local zone is not UTC (or else be refused with a clear message)."""
    naive = [
        ForecastPoint(datetime(2025, 6, 1, 12 + i), datetime(2025, 6, 1, 13 + i), v)
        for i, v in enumerate([300, 300, 50, 300, 300, 300, 300])
    ]
    result = plan(naive)
    if result.reason == "source-failed":
        assert "naive" in result.detail or "timezone" in result.detail
    else:
        assert (result.reason, result.start) == ("optimal", BASE + timedelta(hours=2))
