"""The planner's regular-grid shortcuts give exactly what the general, point-by-point path gives.

Two shortcuts: ``_regular_series_arrays`` reads a gap-free grid of ForecastPoints without converting each datetime,
and ``_best_on_grid`` evaluates a whole-second grid whose step divides the job from one pass over the running
integral. Each is compared here with the general path on the same input -- bit for bit, since both are meant to
compute the very same floats -- with the shortcut switched off by patching its entry to decline.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import carbonaware_core as core
from carbonaware_core import ForecastPoint, choose_start, lowest_mean_start

BASE = datetime(2025, 6, 1, 12, 0, tzinfo=timezone.utc)
STEPS = st.sampled_from([60, 300, 900, 1800, 3600]) | st.integers(1, 7200)


@contextmanager
def declined(name: str, answer: Callable[..., Any]) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(core, name, answer)
        yield


def general_lowest(*args: float | list[float]) -> tuple[float, float] | None:
    with declined("_job_steps_on_grid", lambda *a, **k: 0):
        return lowest_mean_start(*args)  # type: ignore[arg-type]


@st.composite
def grid_runs(draw: st.DrawFn) -> tuple[list[float], list[float], list[float]]:
    """Whole-second grid intervals from one origin, some dropped (gaps), often with a first interval of another
    width (a first value carried back to now); values with near-ties."""
    step = draw(STEPS)
    origin = draw(st.integers(0, 2 * 10**9))
    count = draw(st.integers(1, 60))
    kept = draw(st.lists(st.integers(0, 9), min_size=count, max_size=count))
    values = draw(
        st.lists(
            st.integers(0, 3).map(float) | st.floats(0, 1000, allow_nan=False),
            min_size=count,
            max_size=count,
        )
    )
    starts, ends, chosen = [], [], []
    for i in range(count):
        if kept[i]:  # about one interval in ten is a gap
            starts.append(float(origin + i * step))
            ends.append(float(origin + (i + 1) * step))
            chosen.append(values[i])
    if starts and draw(st.booleans()):  # the first interval begins earlier or later than the grid says
        starts[0] = draw(st.floats(starts[0] - step, ends[0] - 1e-3))
    return starts, ends, chosen


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    run=grid_runs(),
    steps=st.integers(1, 30),
    odd_length=st.booleans(),
    earliest_offset=st.floats(-3600, 80_000),
    span=st.floats(0, 200_000),
)
@example(  # a flat series: every start ties, the earliest must win on both paths
    run=([0.0, 300.0, 600.0, 900.0], [300.0, 600.0, 900.0, 1200.0], [5.0, 5.0, 5.0, 5.0]),
    steps=1,
    odd_length=False,
    earliest_offset=0.0,
    span=900.0,
)
def test_grid_shortcut_equals_the_sweep(run, steps, odd_length, earliest_offset, span) -> None:
    starts, ends, values = run
    if not starts:
        return
    step = ends[-1] - starts[-1]
    length = steps * step + (0.5 if odd_length else 0.0)  # an odd length must leave the shortcut
    earliest = starts[0] + earliest_offset
    fast = lowest_mean_start(starts, ends, values, earliest, earliest + span, length)
    assert fast == general_lowest(starts, ends, values, earliest, earliest + span, length)


def test_grid_shortcut_is_taken_and_the_patch_declines_it() -> None:
    """Guard the comparison above: the shortcut runs on a grid, and patching really switches it off."""
    starts = [float(300 * i) for i in range(10)]
    ends = [s + 300 for s in starts]
    assert core._job_steps_on_grid(starts, ends[-1], 600.0) == 2
    assert core._job_steps_on_grid(starts, ends[-1], 650.0) == 0  # not a multiple of the step
    assert core._job_steps_on_grid([*starts[:5], 1501.0, *starts[6:]], ends[-1], 600.0) == 0  # off the grid
    calls: list[int] = []
    original = core._best_on_grid

    def counting(*args: Any) -> tuple[float, float]:
        calls.append(1)
        return original(*args)

    values = [9.0, 8, 7, 1, 1, 7, 8, 9, 9, 9]
    with declined("_best_on_grid", counting):
        assert lowest_mean_start(starts, ends, values, 0.0, 2400.0, 600.0) == (900.0, 1.0)
    assert calls == [1]
    assert general_lowest(starts, ends, values, 0.0, 2400.0, 600.0) == (900.0, 1.0)


# --------------------------------------------------------------------------------------------------------------
# Reading a series: the regular-grid reader against the point-by-point one
# --------------------------------------------------------------------------------------------------------------

PARIS = None
try:
    from zoneinfo import ZoneInfo

    PARIS = ZoneInfo("Europe/Paris")
except Exception:  # no tz database on this machine: that zone is simply not drawn
    pass

ZONES = [timezone.utc, timezone(timedelta(hours=2)), timezone(timedelta(hours=-5, minutes=-30)), None]
if PARIS is not None:
    ZONES.append(PARIS)


@st.composite
def grid_points(draw: st.DrawFn) -> list[ForecastPoint]:
    """Points on a grid, mostly as providers send them, sometimes broken in one of the ways the general path
    handles: an invalid value, a moved point, a point in another zone (same instant), an int or a bool value,
    a step with microseconds, a daylight-saving zone, naive times."""
    step = timedelta(seconds=draw(STEPS), microseconds=draw(st.sampled_from([0, 0, 0, 250_000])))
    zone = draw(st.sampled_from(ZONES))
    origin = BASE + timedelta(seconds=draw(st.integers(-(10**7), 10**7)), microseconds=draw(st.integers(0, 2)))
    start = origin.replace(tzinfo=None) if zone is None else origin.astimezone(zone)  # naive means UTC
    count = draw(st.integers(1, 40))
    values: list[Any] = draw(st.lists(st.floats(0, 1000, allow_nan=False), min_size=count, max_size=count))
    moments = [start + i * step for i in range(count + 1)]
    shared = draw(st.booleans())
    points = [
        ForecastPoint(moments[i], moments[i + 1] if shared else start + (i + 1) * step, values[i]) for i in range(count)
    ]
    flaw = draw(st.integers(0, 9))
    where = draw(st.integers(0, count - 1))
    p = points[where]
    if flaw == 1:
        points[where] = ForecastPoint(p.start, p.end, draw(st.sampled_from([math.nan, -1.0, math.inf, 2e6])))
    elif flaw == 2:
        moved = timedelta(seconds=draw(st.integers(-5, 5)))
        points[where] = ForecastPoint(p.start + moved, p.end, p.value)
    elif flaw == 3 and zone is not None:
        other = timezone(timedelta(hours=9))
        points[where] = ForecastPoint(p.start.astimezone(other), p.end.astimezone(other), p.value)
    elif flaw == 4:
        points[where] = ForecastPoint(p.start, p.end, draw(st.sampled_from([7, 0, True, False])))
    elif flaw == 5:
        draw(st.randoms(use_true_random=False)).shuffle(points)
    return points


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(points=grid_points(), now_offset=st.integers(-4000, 4000))
def test_grid_reader_equals_the_point_by_point_reader(points, now_offset) -> None:
    first = points[0].start if points[0].start.tzinfo else points[0].start.replace(tzinfo=timezone.utc)
    now = first.timestamp() + now_offset
    fast = core._series_arrays(points, now)
    with declined("_regular_series_arrays", lambda points: None):
        general = core._series_arrays(points, now)
    assert fast == general
    assert all(type(x) is float for column in fast for x in column)


def test_grid_reader_is_taken_for_a_provider_series_and_declines_the_rest() -> None:
    """Guard the comparison above: which inputs the reader takes, and that it gives the same floats."""
    points = [
        ForecastPoint(BASE + i * timedelta(minutes=5), BASE + (i + 1) * timedelta(minutes=5), 1.0) for i in range(5)
    ]
    found = core._regular_series_arrays(points)
    assert found is not None
    assert found[0] == [(BASE + i * timedelta(minutes=5)).timestamp() for i in range(5)]
    assert found[3] is True  # whole seconds
    assert core._regular_series_arrays([*points[:2], points[3]]) is None  # a gap
    assert core._regular_series_arrays([ForecastPoint(p.start, p.end, True) for p in points]) is None
    if PARIS is not None:
        paris = [ForecastPoint(p.start.astimezone(PARIS), p.end.astimezone(PARIS), p.value) for p in points]
        assert core._regular_series_arrays(paris) is None  # a daylight-saving zone: point by point


def test_grid_reader_over_a_daylight_saving_change_keeps_the_real_instants() -> None:
    """Wall-clock hours in Europe/Paris across the October change are not a grid of instants: the planner must
    see the real hour lengths (the general path), not an evenly spaced guess."""
    if PARIS is None:
        pytest.skip("no tz database")
    local = [datetime(2025, 10, 26, h, tzinfo=PARIS) for h in range(6)]  # 02:00-03:00 lasts two hours
    values = [300.0, 300.0, 100.0, 300.0, 300.0]
    points = [ForecastPoint(a, b, v) for (a, b), v in zip(itertools.pairwise(local), values, strict=True)]
    starts, ends, _ = core._series_arrays(points, local[0].timestamp())
    widths = [e - s for s, e in zip(starts, ends, strict=True)]
    assert widths == [b.timestamp() - a.timestamp() for a, b in itertools.pairwise(local)]
    assert widths[2] == 7200.0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    points=grid_points(),
    now_offset=st.integers(-4000, 4000),
    window=st.integers(0, 200_000),
    job_steps=st.integers(1, 8),
    extra=st.sampled_from([0, 0, 0, 1, 7]),
)
def test_choose_start_is_the_same_with_both_shortcuts_off(points, now_offset, window, job_steps, extra) -> None:
    first = points[0].start if points[0].start.tzinfo else points[0].start.replace(tzinfo=timezone.utc)
    now = first + timedelta(seconds=now_offset)
    duration = job_steps * (points[0].end - points[0].start) + timedelta(seconds=extra)

    def outcome() -> object:
        try:
            return choose_start(points, now, timedelta(seconds=window), duration)
        except core.SourceError as exc:
            return str(exc)

    fast = outcome()
    with declined("_regular_series_arrays", lambda points: None), declined("_job_steps_on_grid", lambda *a: 0):
        assert outcome() == fast
