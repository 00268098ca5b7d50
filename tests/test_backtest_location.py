"""The location backtest (bench/backtest_location.py) reports what its levers really save: on synthetic zones where
the answer is known by construction, against an independent brute force for random zones, and on a quick run over
the real data."""

from __future__ import annotations

import gzip
import importlib.util
import math
import random
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import carbonaware_core as core

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
ORIGIN = datetime(2023, 1, 1, tzinfo=timezone.utc).timestamp()
LEVERS = ("time", "location", "time+location")
needs_shared_data = pytest.mark.skipif(
    not (SHARED_DATA / "electricitymaps_hourly").is_dir(), reason="../shared/data is not present"
)


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "backtest_location_under_test", ROOT / "bench" / "backtest_location.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bl = _load()


def make_zone(name: str, truth: list[float], offline: list[float] | None = None) -> object:
    return bl.Zone(name, bl.Series.of(ORIGIN, truth), bl.Series.of(ORIGIN, offline or truth), "synthetic")


def wave(hours: int, seed: int, level: float = 300.0) -> list[float]:
    rng = random.Random(seed)
    return [level + 120 * math.sin(2 * math.pi * (k % 24) / 24) + rng.uniform(-60, 60) for k in range(hours)]


# ---- known by construction --------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", bl.bt.CONFIGS, ids=lambda c: c.label)
def test_an_always_cleaner_zone_saves_exactly_its_ratio_by_location(config: object) -> None:
    """Zone B is A times 0.4 at every hour (also in the forecast): location moves every home-A job to B and saves
    exactly 60 %; on the perfect forecast time+location saves 60 % plus 0.4 of A's time-only saving (B's best start
    is A's, at 0.4 times the mean); a home-B job never moves."""
    ratio, hours = 0.4, 24 * 10
    truth, forecast = wave(hours, 1), wave(hours, 2)
    zones = [make_zone("A", truth, forecast), make_zone("B", [ratio * v for v in truth], [ratio * v for v in forecast])]
    result = bl.run_set("AB", zones, config)
    for forecast_kind in ("perfect", "offline"):
        assert result.tally("A", "location", forecast_kind).saving == pytest.approx(1 - ratio, abs=1e-12)
        assert result.tally("A", "location", forecast_kind).moved == result.tally("A", "location", forecast_kind).count
        assert result.saving("location", forecast_kind) == pytest.approx((1 - ratio) / 2, abs=1e-12)
        for lever in LEVERS:
            assert result.tally("B", lever, forecast_kind).moved == 0
    time_only = result.tally("A", "time", "perfect").saving
    assert result.tally("A", "time+location", "perfect").saving == pytest.approx(
        1 - ratio + ratio * time_only, abs=1e-12
    )
    assert result.tally("A", "time", "perfect").saving > 0.01  # the wave leaves something to shift in time


@pytest.mark.parametrize("config", bl.bt.CONFIGS, ids=lambda c: c.label)
def test_identical_zones_never_move_ties_stay_at_home(config: object) -> None:
    truth, forecast = wave(24 * 6, 3), wave(24 * 6, 4)
    zones = [make_zone(name, truth, forecast) for name in ("A", "B", "C")]
    result = bl.run_set("same", zones, config)
    for home in ("A", "B", "C"):
        for forecast_kind in ("perfect", "offline"):
            assert all(result.tally(home, lever, forecast_kind).moved == 0 for lever in LEVERS)
            assert result.tally(home, "location", forecast_kind).saving == 0
            assert result.tally(home, "time+location", forecast_kind).saving == pytest.approx(
                result.tally(home, "time", forecast_kind).saving, abs=1e-12
            )


def candidate(zone: int, start: float, predicted: float) -> object:
    return bl.Candidate(zone, start, predicted, predicted)


def test_decide_ties_go_to_the_home_zone_then_the_earliest_start() -> None:
    home_now = candidate(1, 0.0, 100.0)
    assert bl.decide([candidate(0, 2.0, 50.0), candidate(1, 3.0, 50.0)], home_now, None).zone == 1
    chosen = bl.decide([candidate(0, 3.0, 50.0), candidate(2, 2.0, 50.0)], home_now, None)
    assert (chosen.zone, chosen.start_h) == (2, 2.0)
    assert bl.decide([candidate(0, 0.0, 100.0)], home_now, None) is home_now  # a tie with at once at home


def test_decide_runs_at_once_at_home_when_the_predicted_saving_is_under_the_minimum() -> None:
    home_now = candidate(0, 0.0, 100.0)
    elsewhere = candidate(1, 0.0, 95.0)  # predicts 5 %
    assert bl.decide([elsewhere], home_now, 0.06) is home_now
    assert bl.decide([elsewhere], home_now, 0.04) is elsewhere
    assert bl.decide([elsewhere], home_now, None) is elsewhere


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.floats(1, 1000), st.floats(1, 1000)), min_size=1, max_size=6
    ),  # (predicted, start) per candidate
    st.integers(0, 5),
    st.floats(1, 1000),
    st.one_of(st.none(), st.floats(0, 0.5)),
)
def test_decide_picks_the_lowest_prediction_or_at_once_at_home(
    pairs: list[tuple[float, float]], home: int, now_value: float, minimum: float | None
) -> None:
    candidates = [candidate(z, start, predicted) for z, (predicted, start) in enumerate(pairs)]
    home_now = candidate(home, 0.0, now_value)
    chosen = bl.decide(candidates, home_now, minimum)
    assert chosen is home_now or chosen in candidates
    lowest = min(now_value, *(c.predicted for c in candidates))
    floor = None if minimum is None else max(minimum, core.NEGLIGIBLE_SAVINGS)  # the library's rule
    if floor is None or (now_value - lowest) / now_value >= floor * (1 + 1e-9) + 1e-12:
        assert chosen.predicted <= lowest * (1 + 1e-9)
    if chosen is not home_now:
        assert minimum is None or (now_value - chosen.predicted) / now_value >= minimum


# ---- random zones against an independent brute force -------------------------------------------------------------


def brute_force_savings(zones: list[object], config: object, home: int) -> dict[str, float]:
    """Perfect-forecast mean savings per lever by exhaustive search on a 30-minute grid (exact for hourly steps and
    job lengths in whole half hours: the job mean is piecewise linear with kinks on that grid)."""
    length, window = config.job_h, config.window_h
    totals = dict.fromkeys(LEVERS, 0.0)
    hours = bl.starts(len(zones[0].truth.values), config, 1)
    grid = [k / 2 for k in range(int(window * 2) + 1)]
    for i in hours:
        now = zones[home].truth.mean(i, length)
        best_time = min(zones[home].truth.mean(i + d, length) for d in grid)
        best_location = min(z.truth.mean(i, length) for z in zones)
        best_both = min(z.truth.mean(i + d, length) for z in zones for d in grid)
        for lever, value in zip(LEVERS, (best_time, best_location, best_both), strict=True):
            totals[lever] += 1 - value / now
    return {lever: total / len(hours) for lever, total in totals.items()}


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(2, 4), st.integers(0, 10**6))
def test_random_zones_match_the_brute_force_and_keep_the_orderings(count: int, seed: int) -> None:
    rng = random.Random(seed)
    hours = 40
    zones = [
        make_zone(
            f"Z{z}",
            [rng.uniform(10, 800) for _ in range(hours)],
            [rng.uniform(10, 800) for _ in range(hours)],
        )
        for z in range(count)
    ]
    for config in bl.bt.CONFIGS:
        result = bl.run_set("random", zones, config)
        assert bl.check_sample(zones, config, every=1) > 0
        for home in range(count):
            name = f"Z{home}"
            expected = brute_force_savings(zones, config, home)
            for lever in LEVERS:
                assert result.tally(name, lever, "perfect").saving == pytest.approx(expected[lever], abs=1e-9)
                assert result.tally(name, lever, "perfect").dirtier == 0
                assert result.tally(name, lever, "offline").saving <= expected[lever] + 1e-12
            perfect = {lever: result.tally(name, lever, "perfect").saving for lever in LEVERS}
            assert perfect["time+location"] >= max(perfect["time"], perfect["location"]) - 1e-12
            for forecast in ("perfect", "offline"):
                assert result.tally(name, "time", forecast).moved == 0
                assert result.tally(name, "location", forecast).waited == 0
        for lever in LEVERS:
            assert result.saving(lever, "perfect") >= result.saving(lever, "offline") - 1e-12


# ---- data handling -------------------------------------------------------------------------------------------------


def year_rows(year: int, seed: int) -> list[tuple[datetime, float]]:
    rng = random.Random(seed)
    first = datetime(year, 1, 1, tzinfo=timezone.utc)
    hours = int((datetime(year + 1, 1, 1, tzinfo=timezone.utc) - first).total_seconds() // 3600)
    return [(first + timedelta(hours=k), rng.uniform(50, 500)) for k in range(hours)]


def test_the_neighbour_month_profile_never_sees_the_month_it_answers_for() -> None:
    rows = year_rows(2022, 5)
    _, profile, _ = bl.offline_profile(Path("/nonexistent"), "X", rows, "neighbour-months")
    march_changed = [(moment, value * 3 if moment.month == 3 else value) for moment, value in rows]
    _, changed, _ = bl.offline_profile(Path("/nonexistent"), "X", march_changed, "neighbour-months")
    assert changed[2] == profile[2]  # March: unchanged
    assert changed[1] != profile[1] and changed[3] != profile[3]  # February and April borrow from March
    for month, hour in ((0, 0), (2, 13), (11, 23)):  # January and December are neighbours
        around = {(month - 1) % 12, (month + 1) % 12}
        neighbours = [v for m, v in rows if m.hour == hour and m.month - 1 in around]
        assert len(neighbours) > 50
        assert profile[month][hour] == pytest.approx(sum(neighbours) / len(neighbours), rel=5e-3)  # 3 sig. figures


def test_zones_must_cover_the_same_hours_without_gaps(tmp_path: Path) -> None:
    a = make_zone("A", wave(48, 1))
    shifted = bl.Zone("B", bl.Series.of(ORIGIN + 3600, wave(48, 2)), bl.Series.of(ORIGIN + 3600, wave(48, 2)), "s")
    with pytest.raises(ValueError, match="same hours"):
        bl.check_same_hours([a, shifted])
    rows = year_rows(2022, 6)[:100]
    with pytest.raises(ValueError, match="gap-free"):
        bl.hourly_series(rows[:40] + rows[41:], "X")
    with pytest.raises(ValueError, match="<= 0"):
        bl.hourly_series([*rows[:10], (rows[10][0], 0.0)], "X")
    for zone, years in (("A", (2021, 2022)), ("B", (2022, 2023))):
        folder = tmp_path / "electricitymaps_hourly" / zone
        folder.mkdir(parents=True)
        for year in years:
            with gzip.open(folder / f"{zone}_{year}_hourly.csv.gz", "wt") as handle:
                handle.write("")
    assert bl.common_year(tmp_path, ["A", "B"]) == 2022
    with pytest.raises(ValueError, match="2023"):
        bl.common_year(tmp_path, ["A", "B"], 2023)


# ---- the real data, quick ------------------------------------------------------------------------------------------


@needs_shared_data
def test_a_quick_run_on_the_real_data_keeps_the_invariants(capsys: pytest.CaptureFixture[str]) -> None:
    assert bl.main(["--quick", "--sets", "Europe", "US"]) == 0
    printed = capsys.readouterr().out
    for name in ("Europe, 2022", "US, 2023"):
        assert name in printed
    args = bl._parser().parse_args(["--quick", "--sets", "Europe-west", "US-east", "--holdout", "neighbour-months"])
    results, checked = bl.run(args)
    assert checked > 0
    for group in results.values():
        assert {r.config for r in group} == set(bl.bt.CONFIGS)
        for result in group:
            assert all("neighbour months" in how for how in result.trained_on.values())
            perfect = {lever: result.saving(lever, "perfect") for lever in LEVERS}
            assert perfect["time+location"] >= max(perfect["time"], perfect["location"])
            assert perfect["location"] > 0  # these grids differ: some hour is cleaner elsewhere
            for lever in LEVERS:
                assert perfect[lever] >= result.saving(lever, "offline")
                assert result.share(lever, "perfect", "dirtier") == 0
            assert len(bl.set_table([result], markdown=True)) == 2 + len(LEVERS)
