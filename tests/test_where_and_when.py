"""Where and when (issue 11): several zones, allowed start windows and a finish-by deadline, planned exactly.

The property tests hand the planner random per-zone step series (random steps on a 5-minute grid, gaps, values)
through a callable source, with random windows and deadlines, and compare its (zone, start) with a brute-force scan
of every 5-minute start in every zone. Every boundary, window edge and the deadline lie on that grid and the job is
whole steps long, so the exact optimum lies on it too.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import carbonaware_core as core
from carbonaware_core import CloudZone, ForecastPoint, Place, plan_delay

UTC = timezone.utc
NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
STEP = timedelta(minutes=5)
ZONES = ("aws:eu-west-1", "aws:eu-north-1", "gcp:europe-west1", "azure:northeurope")
ROOT = Path(__file__).resolve().parent.parent

Segments = list[tuple[int, int | None]]  # (length in steps, value or None for a gap)


def series_of(segments: Segments, lead_steps: int) -> list[ForecastPoint]:
    """A step series starting ``lead_steps`` before NOW; None values are gaps (no point)."""
    points, at = [], NOW - lead_steps * STEP
    for steps, value in segments:
        end = at + steps * STEP
        if value is not None:
            points.append(ForecastPoint(at, end, float(value)))
        at = end
    return points


def per_zone_source(series: dict[str, list[ForecastPoint]]) -> Callable[..., list[ForecastPoint]]:
    def source(zone: CloudZone | None, _now: datetime, _end: datetime) -> list[ForecastPoint]:
        return series[str(zone)]

    return source


def mean_over(points: Sequence[ForecastPoint], start: datetime, end: datetime) -> float | None:
    """The exact mean over [start, end), or None when a gap interrupts it (brute force: no shared code)."""
    total, covered = 0.0, timedelta(0)
    for point in points:
        lo, hi = max(point.start, start), min(point.end, end)
        if lo < hi:
            total += point.value * (hi - lo).total_seconds()
            covered += hi - lo
    if covered < end - start:
        return None
    return total / (end - start).total_seconds()


def allowed(start: datetime, window: timedelta, windows: Sequence[tuple[datetime, datetime]],
            deadline: datetime | None, duration: timedelta) -> bool:  # fmt: skip
    if not NOW <= start <= NOW + window:
        return False
    if windows and not any(lo <= start <= hi for lo, hi in windows):
        return False
    return deadline is None or start + duration <= deadline


def brute_force(
    series: dict[str, list[ForecastPoint]],
    window: timedelta,
    windows: Sequence[tuple[datetime, datetime]],
    deadline: datetime | None,
    duration: timedelta,
) -> tuple[list[datetime], tuple[float, int, datetime] | None]:
    """Every allowed 5-minute start, and the best (mean, zone index, start): the lowest mean, then the home zone
    (index 0), then the earliest start."""
    starts = [NOW + k * STEP for k in range(int(window / STEP) + 1)]
    feasible = [s for s in starts if allowed(s, window, windows, deadline, duration)]
    best: tuple[float, int, datetime] | None = None
    for index, zone in enumerate(ZONES[: len(series)]):
        for start in feasible:
            mean = mean_over(series[zone], start, start + duration)
            if mean is None:
                continue
            tolerance = 1e-9 * max(1.0, best[0]) if best is not None else 0.0
            lower = best is None or mean < best[0] - tolerance
            if lower or (abs(mean - best[0]) <= tolerance and best[1] != 0 and (index == 0 or start < best[2])):
                best = (mean, index, start)
    return feasible, best


segments = st.lists(
    st.tuples(st.integers(1, 12), st.one_of(st.integers(0, 600), st.none(), st.integers(0, 600))),
    min_size=1,
    max_size=30,
)
window_steps = st.integers(1, 72)


@st.composite
def questions(draw: st.DrawFn) -> dict[str, object]:
    count = draw(st.integers(1, len(ZONES)))
    series = {}
    for zone in ZONES[:count]:
        lead = draw(st.integers(0, 3))
        first_value = draw(st.integers(0, 600))  # now is always covered, as a source must cover it
        series[zone] = series_of([(lead + 1, first_value), *draw(segments)], lead)
    window = draw(window_steps) * STEP
    duration = draw(st.integers(1, 24)) * STEP
    windows = [
        (NOW + a * STEP, NOW + (a + b) * STEP)
        for a, b in draw(st.lists(st.tuples(st.integers(-6, 80), st.integers(1, 30)), max_size=3))
    ]
    deadline = draw(st.one_of(st.none(), st.integers(0, 100).map(lambda k: NOW + k * STEP)))
    return {"series": series, "window": window, "duration": duration, "windows": windows, "deadline": deadline}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(questions())
def test_the_chosen_zone_and_start_is_the_brute_force_optimum(question: dict[str, object]) -> None:
    series: dict[str, list[ForecastPoint]] = question["series"]  # type: ignore[assignment]
    window: timedelta = question["window"]  # type: ignore[assignment]
    duration: timedelta = question["duration"]  # type: ignore[assignment]
    windows: list[tuple[datetime, datetime]] = question["windows"]  # type: ignore[assignment]
    deadline: datetime | None = question["deadline"]  # type: ignore[assignment]
    feasible, best = brute_force(series, window, windows, deadline, duration)
    home = core.parse_zone(ZONES[0]).cloud
    assert home is not None
    arguments = {
        "source": per_zone_source(series),
        "now": NOW,
        "zones": list(ZONES[1 : len(series)]) or None,
        "windows": windows or None,
        "deadline": deadline,
        "logger": core.logger.getChild("quiet"),
    }
    if not windows and deadline is None and len(series) == 1:
        arguments["deadline"] = NOW + window + duration  # not binding: the question still takes the joint planner
        feasible, best = brute_force(series, window, windows, arguments["deadline"], duration)  # type: ignore[arg-type]
    if not feasible:
        event("argument error")
        with pytest.raises(ValueError, match=r"deadline|windows|no window"):
            plan_delay(window, duration, home.provider, home.region, **arguments)
        return
    plan = plan_delay(window, duration, home.provider, home.region, **arguments)
    event(f"{plan.reason} in {'another' if plan.zone != home else 'the home'} zone")
    # never a start outside the allowed set, never a finish after the deadline, whatever the reason
    assert allowed(plan.start, window, windows, deadline, duration)
    if deadline is not None:
        assert plan.start + duration <= deadline
    if best is None:
        assert plan.reason == "source-failed"
        return
    mean, index, start = best
    baseline = mean_over(series[ZONES[0]], feasible[0], feasible[0] + duration)
    if plan.reason == "optimal":
        assert (str(plan.zone), plan.start) == (ZONES[index], start)
        assert plan.expected == pytest.approx(mean, rel=1e-9, abs=1e-9)
    else:
        assert plan.reason == "already-best"
        assert (str(plan.zone), plan.start) == (ZONES[0], feasible[0])  # at home, as early as allowed
        assert baseline is not None  # a saving against it was negligible or nothing beat it
        assert mean >= baseline * (1 - core.NEGLIGIBLE_SAVINGS) - 1e-9
    assert plan.now == (pytest.approx(baseline) if baseline is not None else None)
    if len(series) > 1:
        assert [a.zone for a in plan.alternatives] == list(ZONES[: len(series)])
        assert plan.to_dict()["alternatives"][index]["zone"] == ZONES[index]


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 1000),
    st.integers(1, 1000),
    st.lists(st.tuples(st.integers(-200, 1200), st.integers(-50, 400)), max_size=5),
    st.one_of(st.none(), st.integers(-100, 1500)),
    st.integers(0, 300),
)
def test_feasible_starts_are_exactly_the_allowed_set(
    earliest: int, span: int, pairs: list[tuple[int, int]], finish_by: int | None, length: int
) -> None:
    windows = [(float(a), float(a + b)) for a, b in pairs if b >= 0]
    intervals = core.feasible_starts(float(earliest), float(earliest + span), windows, finish_by, float(length))
    assert all(lo <= hi for lo, hi in intervals)
    assert all(a[1] < b[0] for a, b in itertools.pairwise(intervals))  # sorted and disjoint
    for t in range(earliest - 5, earliest + span + 6):
        inside = earliest <= t <= earliest + span
        inside = inside and (not windows or any(lo <= t <= hi for lo, hi in windows))
        inside = inside and (finish_by is None or t + length <= finish_by)
        assert any(lo <= t <= hi for lo, hi in intervals) == inside, t


def test_best_place_ties_go_home_then_to_the_earliest_start() -> None:
    assert core.best_place([(50.0, 100.0), (10.0, 100.0)]) == 0  # equal means: home, though later
    assert core.best_place([None, (50.0, 100.0), (10.0, 100.0)]) == 2  # no home: the earliest start
    assert core.best_place([(0.0, 100.0), (50.0, 99.0)]) == 1
    assert core.best_place([None, None]) is None


@pytest.mark.parametrize(
    ("now_mean", "best_mean", "at_once", "floor", "reason"),
    [
        (100.0, 50.0, False, 0.0, "optimal"),
        (100.0, 50.0, True, 0.0, "already-best"),
        (100.0, 99.95, False, 0.0, "already-best"),  # below NEGLIGIBLE_SAVINGS
        (100.0, 90.0, False, 0.2, "below-threshold"),
        (None, 90.0, False, 0.2, "below-threshold"),  # unknown saving, a floor asked for
        (None, 90.0, False, 0.0, "optimal"),
    ],
)
def test_decide_is_the_rule(now_mean: float | None, best_mean: float, at_once: bool, floor: float, reason: str) -> None:
    assert core.decide(now_mean, best_mean, at_once, floor)[0] == reason


# --------------------------------------------------------------------------------------------------------------
# Every source, one zone, windows and a deadline: offline and live-corrected too
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def flat_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An offline profile for IE: 300 every hour but June 20:00 UTC (100) and 03:00 UTC (50)."""
    june = [300.0] * 24
    june[20], june[3] = 100.0, 50.0
    profile = [june if month == 5 else [300.0] * 24 for month in range(12)]
    path = tmp_path / "offline.json"
    path.write_text(json.dumps({"kind": "month-hour-utc", "zones": {"IE": profile, "SE-SE3": [[40.0] * 24] * 12}}))
    monkeypatch.setenv("CARBONAWARE_OFFLINE_DATA", str(path))
    core._OFFLINE.clear()
    return path


def test_offline_source_keeps_to_the_windows_and_the_deadline(flat_offline: Path) -> None:
    night = (NOW.replace(hour=22), NOW.replace(hour=22) + timedelta(hours=8))  # 22:00 .. 06:00
    plan = plan_delay(timedelta(hours=18), timedelta(hours=1), "aws", "eu-west-1", source="offline", now=NOW,
                      windows=[night])  # fmt: skip
    assert (plan.reason, plan.start, plan.expected) == ("optimal", NOW.replace(day=2, hour=3), 50.0)
    assert plan.now == 300.0  # the baseline: home at the earliest allowed start, 22:00
    assert "inside the allowed windows" in plan.detail
    finish = NOW.replace(day=2, hour=2)  # the 03:00 hour no longer finishes in time; 20:00 is not allowed
    plan = plan_delay(timedelta(hours=18), timedelta(hours=1), "aws", "eu-west-1", source="offline", now=NOW,
                      windows=[night], deadline=finish)  # fmt: skip
    assert (plan.reason, plan.start, plan.delay) == ("already-best", night[0], timedelta(hours=10))
    assert plan.waits  # the earliest allowed start lies ahead: the waiter waits for it
    assert plan.start + plan.duration <= finish
    plan = plan_delay(timedelta(hours=18), timedelta(hours=1), "aws", "eu-west-1", source="offline", now=NOW,
                      deadline=NOW.replace(hour=21))  # fmt: skip
    assert plan.start == NOW.replace(hour=20)


def test_live_corrected_source_keeps_to_the_windows(
    flat_offline: Path, server: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.fake_providers import fake_clock
    from tests.loopback import LoopbackServer, Reply, Seen

    assert isinstance(server, LoopbackServer)
    fake_clock(monkeypatch, NOW)
    stamp = "%Y-%m-%dT%H:00:00.000Z"
    measured = [
        {"zone": "IE", "carbonIntensity": 320.0, "datetime": (NOW - timedelta(hours=h)).strftime(stamp)}
        for h in range(24, 0, -1)
    ]

    def history(seen: Seen) -> Reply:
        return Reply(200, {"zone": "IE", "history": measured})

    server.route("GET", "/v3/carbon-intensity/history", history)
    monkeypatch.setenv("ELECTRICITYMAPS_API_URL", server.url)
    monkeypatch.setenv("ELECTRICITYMAPS_API_KEY", "k")
    window = (NOW.replace(hour=18), NOW.replace(hour=23))
    plan = plan_delay(timedelta(hours=12), timedelta(hours=1), "aws", "eu-west-1", source="live", now=NOW,
                      windows=[window])  # fmt: skip
    assert plan.source.endswith("(live-corrected)"), plan.detail
    assert plan.reason == "optimal" and plan.start == NOW.replace(hour=20)
    assert window[0] <= plan.start <= window[1]


# --------------------------------------------------------------------------------------------------------------
# Argument errors raise at once
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"zones": ["mars:olympus-1"]}, ValueError, "unknown provider 'mars'"),
        ({"zones": ["eu-west-1"]}, ValueError, "unknown zone 'eu-west-1'"),
        ({"zones": ["grid:"]}, ValueError, "unknown zone"),
        ({"zones": ["grid:not a zone"]}, ValueError, "unknown grid zone"),
        ({"zones": []}, ValueError, "zones is empty"),
        ({"zones": [42]}, TypeError, "a zone is"),
        ({"home": False}, ValueError, "home=False leaves no candidate"),
        ({"home": "no"}, TypeError, "home must be"),
        ({"windows": []}, ValueError, "windows is empty"),
        ({"windows": [(NOW.replace(tzinfo=None), NOW + timedelta(hours=1))]}, ValueError, "timezone-aware"),
        ({"windows": [(NOW + timedelta(hours=2), NOW + timedelta(hours=1))]}, ValueError, "empty or inverted"),
        ({"windows": [(NOW + timedelta(hours=1), NOW + timedelta(hours=1))]}, ValueError, "empty or inverted"),
        ({"windows": [(NOW + timedelta(hours=7), NOW + timedelta(hours=9))]}, ValueError, "wholly outside"),
        ({"windows": [(NOW - timedelta(hours=3), NOW - timedelta(hours=1))]}, ValueError, "wholly outside"),
        ({"windows": [NOW]}, TypeError, "a window is"),
        ({"windows": "tonight"}, TypeError, "windows must be"),
        ({"deadline": NOW.replace(tzinfo=None)}, ValueError, "timezone-aware"),
        ({"deadline": NOW + timedelta(minutes=20)}, ValueError, "leaves no room"),
        (
            {"deadline": NOW + timedelta(hours=2), "windows": [(NOW + timedelta(hours=3), NOW + timedelta(hours=4))]},
            ValueError,
            "no window allows",
        ),
    ],
)
def test_argument_errors_raise_at_once(options: dict[str, object], error: type[Exception], match: str) -> None:
    for entry in (plan_delay, core.carbonaware_delay):
        with pytest.raises(error, match=match):
            entry(timedelta(hours=6), timedelta(minutes=30), "aws", "eu-west-1", now=NOW, source="offline", **options)


def test_zone_forms() -> None:
    assert core.parse_zone("AWS: eu-west-1 ") == Place(CloudZone("aws", "eu-west-1"))
    assert core.parse_zone(("gcp", "europe-west1")) == Place(CloudZone("gcp", "europe-west1"))
    assert core.parse_zone("grid:FR") == Place(grid="FR")
    assert str(Place(grid="FR")) == "grid:FR"
    assert core.zones_option("aws:eu-west-1, grid:DE") == (Place(CloudZone("aws", "eu-west-1")), Place(grid="DE"))
    assert core.zones_option(("azure", "northeurope")) == (Place(CloudZone("azure", "northeurope")),)


def test_home_false_plans_over_the_given_zones_only(flat_offline: Path) -> None:
    plan = plan_delay(timedelta(hours=6), timedelta(hours=1), "aws", "eu-west-1", source="offline", now=NOW,
                      zones=["aws:eu-north-1"], home=False)  # fmt: skip
    assert plan.zone == CloudZone("aws", "eu-north-1") and plan.grid_zone == "SE-SE3"
    assert plan.alternatives == ()  # one candidate: a one-zone plan
    assert plan.reason == "already-best" and plan.expected == 40.0


def test_a_grid_zone_candidate_is_planned_by_its_grid(flat_offline: Path) -> None:
    plan = plan_delay(timedelta(hours=18), timedelta(hours=1), "aws", "eu-north-1", source="offline", now=NOW,
                      zones=["grid:IE"])  # fmt: skip
    assert [a.zone for a in plan.alternatives] == ["aws:eu-north-1", "grid:IE"]
    assert (plan.zone, plan.grid_zone, plan.expected) == (CloudZone("aws", "eu-north-1"), "SE-SE3", 40.0)
    assert plan.reason == "already-best"  # 40 at once at home beats IE's best hour, 50
    plan = plan_delay(timedelta(hours=18), timedelta(hours=1), "aws", "eu-west-1", source="offline", now=NOW,
                      zones=["grid:SE-SE3"])  # fmt: skip
    assert (plan.zone, plan.grid_zone, plan.start, plan.expected) == (None, "SE-SE3", NOW, 40.0)
    assert plan.reason == "optimal" and plan.savings == pytest.approx(1 - 40 / 300)  # moving place, not time
    assert plan.time_savings == pytest.approx(1 - 50 / 300)  # IE alone would wait for 03:00
    described = core.describe(plan)
    assert "time only, in aws:eu-west-1: -83.3%" in described


def test_single_zone_plans_are_unchanged(flat_offline: Path) -> None:
    plain = plan_delay(timedelta(hours=18), timedelta(hours=1), "aws", "eu-west-1", source="offline", now=NOW)
    assert "alternatives" not in plain.to_dict() and plain.alternatives == ()
    assert plain.detail.startswith("best start in the next 18h00m")


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------


def test_cli_plans_zones_windows_and_a_deadline_offline_on_the_embedded_model() -> None:
    command = [
        sys.executable, "-m", "carbonaware_core", "plan", "--json", "--quiet", "--source", "offline",
        "--provider", "aws", "--region", "eu-west-1", "--zones", "aws:eu-north-1,grid:FR",
        "--now", "2025-06-01T12:00Z", "--window", "12h", "--duration", "1h",
        "--windows", "2025-06-01T14:00Z/2025-06-01T20:00Z,2025-06-01T22:00Z/2025-06-02T02:00Z",
        "--deadline", "2025-06-02T01:00Z",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert [a["zone"] for a in document["alternatives"]] == ["aws:eu-west-1", "aws:eu-north-1", "grid:FR"]
    start = datetime.fromisoformat(document["start"].replace("Z", "+00:00"))
    assert (NOW.replace(hour=14) <= start <= NOW.replace(hour=20)) or (
        NOW.replace(hour=22) <= start <= NOW.replace(day=2, hour=0)  # a 1 h job finishing by 01:00
    )
    best = min(document["alternatives"], key=lambda a: a["mean"])
    assert document["expected"] == best["mean"]
    assert document["zone"] == dict(zip(("provider", "region"), best["zone"].split(":"), strict=True))
    text = subprocess.run(command[:4] + command[6:], capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
    assert "zones compared (home first; time only in aws:eu-west-1" in text.stdout
    assert "<- chosen" in text.stdout


def test_cli_rejects_a_bad_window() -> None:
    command = [sys.executable, "-m", "carbonaware_core", "plan", "--source", "offline", "--windows", "2025-06-01"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
    assert done.returncode == 2 and "START/END" in done.stderr


def test_all_names_every_public_name() -> None:
    """``__all__`` is the vendored file's contract: every public name defined in the core, and nothing else."""
    import types

    defined = {
        name
        for name, value in vars(core).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)
        and name != "TYPE_CHECKING"
        and (getattr(value, "__module__", "carbonaware_core") == "carbonaware_core" or not callable(value))
        and name != "annotations"
    }
    assert set(core.__all__) - {"SeriesCallable", "ActualsReader"} == defined - {"SeriesCallable", "ActualsReader"}
    assert len(core.__all__) == len(set(core.__all__))


@pytest.mark.parametrize("asynchronous", [False, True])
def test_the_wait_keeps_to_the_windows(flat_offline: Path, monkeypatch: pytest.MonkeyPatch, asynchronous: bool) -> None:
    """A wait with windows sleeps until the chosen start even when that start is "already-best" (the earliest
    allowed), and never past it; the replay clock is the fake one, so the sleeps are what the wait asked for."""
    import asyncio

    from tests.fake_providers import fake_clock

    clock = fake_clock(monkeypatch, NOW)
    window = (NOW + timedelta(hours=2), NOW + timedelta(hours=3))  # 14:00 .. 15:00, flat 300: the earliest wins
    arguments: dict[str, object] = {"source": "offline", "windows": [window], "replan": False}
    if asynchronous:
        plan = asyncio.run(core.carbonaware_delay_async(timedelta(hours=6), timedelta(hours=1), "aws", "eu-west-1",
                                                        **arguments))  # fmt: skip
        slept = sum(clock.asleeps)
    else:
        plan = core.carbonaware_delay(timedelta(hours=6), timedelta(hours=1), "aws", "eu-west-1", **arguments)
        slept = sum(clock.sleeps)
    assert (plan.reason, plan.start) == ("already-best", window[0])
    assert slept == pytest.approx(2 * 3600, abs=1.0)
    assert clock.now() >= window[0]
