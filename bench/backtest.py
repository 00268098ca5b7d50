"""Backtest: how much of the best possible carbon saving does each way of choosing a start capture?

One command from a clean clone (stdlib only, plus the core and the model builder of this repository):

    python bench/backtest.py [--data ../shared/data] [--test-year 2023] [--every 5] [--zones DE GB ...] [--markdown]

Held-out year: the latest year each zone has (or ``--test-year``), every model trained only on the zone's years
before it; zones with a single year cannot be held out and are listed, not scored. For every zone and every
``--every``-th hour of the held-out year ("now"), and for each (window, job) configuration, a method picks a start in
[now, now + window]; its saving is (I_now - I_chosen) / I_now, where both are the TRUE mean intensity over the job
(real Electricity Maps hourly data), summed over the start hours. A wait is harmful when the job's true mean at the
chosen start is higher than at once. Methods:

- oracle: exhaustive search on the true series (independent of the planner, see ``oracle_mean``);
- planner/true: ``carbonaware_core.lowest_mean_start`` fed the true series; must equal the oracle;
- offline <variant>: a profile trained only on years BEFORE the test year, planned exactly as the library does it
  (``profile_series`` then ``choose_start``, i.e. ``_fetch_offline`` + ``_plan_from``; a sample is re-checked
  through the public ``plan_delay``), including its rule that a predicted saving under 0.1 % is no reason to wait;
- offline ... min: the shipped variant with a minimum predicted saving below which it runs at once: per zone
  ("min/zone": chosen by ``build_offline_model.choose_min_saving`` on the year before the held-out year, with a
  profile of the years before that; zones without such a year get the median of the others), or uniform 2 % / 4 %;
- yesterday: the same hours 24 h earlier as the forecast, through the same planner and decision rule;
- grid60: the offline forecast the library would have, but only starts every 60 min from now, as tools that slide
  a fixed-step window do (evaluated exactly on the step forecast, so only the candidate set differs).

Two protocols: "on the hour" (now = the start of every hour) and "random minute" (now = every hour plus a seeded
random minute, as real submissions arrive), where a fixed 60-minute grid from now cannot hit the hour boundaries.

Headline figures, over the zones where the oracle saves more than 5 %: the share of the perfect-forecast saving
(summed method savings / summed oracle savings, pooled over those zones) and the mean of the per-zone shares; and
over every scored zone, the share of waits that ended dirtier than starting at once.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for _path in (str(ROOT), str(ROOT / "scripts")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import build_offline_model as bom  # noqa: E402 - after the path set-up on purpose

import carbonaware_core as core  # noqa: E402

HOUR = 3600.0
SHARE_THRESHOLD = 0.05  # zones where the oracle saves more than this enter the headline average
TARGET_SHARE = 0.75
ORACLE_STEP_H = 0.5
PROTOCOLS = ("on-the-hour", "random-minute")


@dataclass(frozen=True)
class Config:
    """A (window, job) pair, in hours."""

    window_h: float
    job_h: float

    @property
    def label(self) -> str:
        return f"window {_hours(self.window_h)}, job {_hours(self.job_h)}"


CONFIGS = (Config(6, 1), Config(2, 0.5), Config(12, 4))


@dataclass(frozen=True)
class Variant:
    """An offline model trained on years before the test year: layout, which years, weights, smoothing, rounding."""

    name: str
    kind: str
    last_year_only: bool = False
    recency: bool = False  # weight 2**k for the k-th training year (older years count less)
    smoothing: float = 0.0  # weight of each neighbouring month
    digits: int = 1
    significant: int | None = None  # significant figures instead of digits (the shipped file's rounding)
    shrink: float = 0.0  # weekpart layout: each weekday/weekend cell shrunk toward the pooled cell (build_profile)


MH, MWH = "month-hour-utc", "month-weekpart-hour-utc"
VARIANTS = (
    Variant("mh", MH),
    Variant("mwh", MWH),
    Variant("mh-last", MH, last_year_only=True),
    Variant("mwh-last", MWH, last_year_only=True),
    Variant("mh-rw", MH, recency=True),
    Variant("mh-s", MH, smoothing=0.25),
    Variant("mwh-s", MWH, smoothing=0.25),
    Variant("mh-s-int", MH, smoothing=0.25, digits=0),
    Variant("mh-s-3sf", MH, smoothing=0.25, significant=3),
    Variant("mh-s-rw", MH, recency=True, smoothing=0.25),
    Variant("mwh-s-k10", MWH, smoothing=0.25, shrink=10),
    Variant("mwh-s-rw-k10", MWH, recency=True, smoothing=0.25, shrink=10),
    Variant("mwh-s-3sf-k10", MWH, smoothing=0.25, significant=3, shrink=10),  # build_offline_model --shrink 10
)
SHIPPED = "mh-s-3sf"  # the variant the shipped file is built like (all years); grid60 searches this forecast


def _hours(h: float) -> str:
    return f"{h:g} h" if h >= 1 else f"{h * 60:g} min"


# --------------------------------------------------------------------------------------------------------------
# Hourly step series on one timeline: the truth and every forecast of it
# --------------------------------------------------------------------------------------------------------------

Arrays = tuple[list[float], list[float], list[float]]


@dataclass(frozen=True)
class Series:
    """Hourly values from ``origin`` (epoch seconds of the first hour); prefix sums give exact job means.

    The truth and every forecast share the timeline, so a forecast for the horizon of "now" is a slice of its series.
    """

    origin: float
    values: list[float]
    prefix: list[float] = field(repr=False)

    @staticmethod
    def of(origin: float, values: list[float]) -> Series:
        prefix = [0.0]
        for v in values:
            prefix.append(prefix[-1] + v)
        return Series(origin, values, prefix)

    def integral(self, x: float) -> float:
        """Integral from the origin to x hours (continuous in x, so the rounding of floor() is harmless)."""
        k = min(max(math.floor(x), 0), len(self.values) - 1)
        return self.prefix[k] + (x - k) * self.values[k]

    def mean(self, start_h: float, length_h: float) -> float:
        """Exact mean over [start, start + length], in hours from the origin."""
        return (self.integral(start_h + length_h) - self.integral(start_h)) / length_h

    def arrays(self, now_h: float, config: Config) -> Arrays:
        """Epoch-second intervals from the hour holding now until now + window + job: what ``profile_series``
        returns for the offline source, and what an hourly provider forecast looks like."""
        first, last = math.floor(now_h), math.ceil(now_h + config.window_h + config.job_h)
        starts = [self.origin + k * HOUR for k in range(first, last)]
        return starts, [s + HOUR for s in starts], self.values[first:last]


def oracle_mean(truth: Series, now_h: float, config: Config) -> float:
    """Lowest true job mean over every start in [now, now + window], by brute force on a 30-minute grid.

    Why the grid is exhaustive: the series is a step function with steps at whole hours, so the job mean m(s) is
    continuous and piecewise linear in s, with kinks only where s or s + L crosses a whole hour, i.e. at
    s in Z or s in Z - L. For the job lengths used here (L = 0.5, 1 or 4 h) every kink is a whole or half hour.
    A linear piece attains its minimum at one of its ends, so the minimum over [now, now + window] is attained at a
    kink inside the range or at one of its two ends. Candidates: both ends, plus every half hour in between. This
    deliberately does not reuse the planner's candidate logic (boundaries minus L): it only uses the grid.
    """
    if (config.job_h / ORACLE_STEP_H) % 1:
        raise ValueError(f"the oracle grid argument needs a job length in whole half hours, not {config.job_h} h")
    first, last = now_h, now_h + config.window_h
    best = min(truth.mean(first, config.job_h), truth.mean(last, config.job_h))
    k = math.floor(first / ORACLE_STEP_H) + 1
    while k * ORACLE_STEP_H < last:
        best = min(best, truth.mean(k * ORACLE_STEP_H, config.job_h))
        k += 1
    return best


# --------------------------------------------------------------------------------------------------------------
# Methods: each returns the chosen start in hours from the timeline origin
# --------------------------------------------------------------------------------------------------------------


def plan_start(forecast: Series, now_h: float, config: Config) -> float:
    """The core planner on the forecast cut to the horizon, exactly as ``choose_start`` calls it (the first interval
    already covers now and the horizon is fully covered, so the job length is not shortened)."""
    now_e = forecast.origin + now_h * HOUR
    starts, ends, values = forecast.arrays(now_h, config)
    found = core.lowest_mean_start(starts, ends, values, now_e, now_e + config.window_h * HOUR, config.job_h * HOUR)
    if found is None:
        raise AssertionError(f"planner found no start at {now_h} h")
    return (found[0] - forecast.origin) / HOUR


def library_decision(forecast: Series, now_h: float, config: Config) -> float:
    """What the library decides on a forecast: the planner's start, unless the forecast itself says waiting saves
    less than NEGLIGIBLE_SAVINGS (then: at once) -- the core's own rule, ``carbonaware_core.decide``."""
    return thresholded_decision(forecast, now_h, config)


def thresholded_decision(forecast: Series, now_h: float, config: Config, minimum: float = 0.0) -> float:
    """``library_decision`` with a minimum predicted saving (the planner's below-threshold rule)."""
    start = plan_start(forecast, now_h, config)
    at_once, chosen = forecast.mean(now_h, config.job_h), forecast.mean(start, config.job_h)
    return start if _waits(at_once, chosen, start <= now_h, minimum) else now_h


def grid_start(forecast: Series, now_h: float, config: Config, step_h: float = 1.0) -> float:
    """Fixed-step search as tools that slide a window do: starts now, now + step, ... up to now + window, each
    scored exactly on the same step forecast; the earliest of the lowest means wins."""
    best_k, best = 0, math.inf
    for k in range(int(config.window_h / step_h + 1e-9) + 1):
        mean = forecast.mean(now_h + k * step_h, config.job_h)
        if k == 0 or mean < best - 1e-9 * max(1.0, abs(best)):  # strictly lower: ties keep the earliest start
            best_k, best = k, mean
    return now_h + best_k * step_h


def offline_series(profile: Any, kind: str, timeline: Series) -> Series:
    """The offline model's value for every hour of the timeline, looked up with the core's ``profile_value``."""
    values = [
        core.profile_value(profile, kind, datetime.fromtimestamp(timeline.origin + k * HOUR, timezone.utc))
        for k in range(len(timeline.values))
    ]
    return Series.of(timeline.origin, values)


def library_start(profile: Any, kind: str, origin: float, now_h: float, config: Config) -> float:
    """What the library itself computes with ``source="offline"`` (``_fetch_offline`` then ``_plan_from``):
    ``profile_series`` over the horizon, then ``choose_start``; default ``min_savings`` 0 keeps its start."""
    now = datetime.fromtimestamp(origin + now_h * HOUR, timezone.utc)
    window, job = timedelta(hours=config.window_h), timedelta(hours=config.job_h)
    choice = core.choose_start(core.profile_series(profile, kind, now, now + window + job), now, window, job)
    if not _waits(choice.now_value, choice.expected, choice.start <= now.timestamp(), 0.0):
        return now_h
    return (choice.start - origin) / HOUR


def _waits(at_once: float, chosen: float, start_is_now: bool, minimum: float) -> bool:
    """The library's rule, called rather than copied: waiting must save more than NEGLIGIBLE_SAVINGS and at least
    ``minimum`` (an unknown saving -- a zero intensity at once -- is no reason to wait either)."""
    reason, savings = core.decide(at_once, chosen, start_is_now, minimum)
    return reason == "optimal" and savings is not None


# --------------------------------------------------------------------------------------------------------------
# One zone: load, train on years before the test year, sweep every hour of the test year
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Tally:
    """Sum of per-start savings, how often the method fell short of the oracle, waited, and waited for worse."""

    total: float = 0.0
    below_oracle: int = 0
    waits: int = 0
    harmful: int = 0

    def add(self, saving: float, shortfall: bool, waited: bool = False) -> None:
        self.total += saving
        self.below_oracle += shortfall
        self.waits += waited
        self.harmful += waited and saving < 0


@dataclass
class ZoneResult:
    zone: str
    year: int
    protocol: str
    config: Config
    hours: int
    tallies: dict[str, Tally]
    example_miss: str = ""

    def saving(self, method: str) -> float:
        return self.tallies[method].total / self.hours

    def harmful(self, method: str) -> float:
        tally = self.tallies[method]
        return tally.harmful / tally.waits if tally.waits else 0.0


def train_profiles(data_dir: Path, zone: str, test_year: int) -> dict[str, tuple[str, Any]]:
    """Every variant's profile from the years strictly before ``test_year`` (never the test year itself)."""
    years = [y for y in bom.available_years(data_dir, zone) if y < test_year]
    if not years:
        raise ValueError(f"{zone}: no training year before {test_year}")
    rows_by_year = {y: bom.load_zone_year(data_dir, zone, y) for y in years}
    profiles = {}
    for variant in VARIANTS:
        used = years[-1:] if variant.last_year_only else years
        rows = [row for y in used for row in rows_by_year[y]]
        weights = bom.recency_weights(used) if variant.recency else None
        profile = bom.build_profile(
            rows,
            variant.kind,
            variant.digits,
            weights,
            smoothing=variant.smoothing,
            significant=variant.significant,
            shrink=variant.shrink,
        )
        profiles[variant.name] = (variant.kind, profile)
    return profiles


def load_truth(data_dir: Path, zone: str, test_year: int) -> tuple[Series, int]:
    """The test year, preceded by the previous year when present (the 'yesterday' forecast needs the day before);
    returns the truth and the index of the test year's first hour."""
    before = test_year - 1 in bom.available_years(data_dir, zone)
    rows = (bom.load_zone_year(data_dir, zone, test_year - 1) if before else []) + bom.load_zone_year(
        data_dir, zone, test_year
    )
    for (a, _), (b, _) in itertools.pairwise(rows):
        if b - a != timedelta(hours=1):
            raise ValueError(f"{zone}: the series is not gap-free hourly at {a.isoformat()}")
    first_test = next(i for i, (moment, _) in enumerate(rows) if moment.year == test_year)
    return Series.of(rows[0][0].timestamp(), [v for _, v in rows]), first_test


def now_offsets(protocol: str, count: int, zone: str) -> list[float]:
    """Hours after the hour start at which 'now' falls: 0, or a seeded random whole minute (same for every config)."""
    if protocol == "on-the-hour":
        return [0.0] * count
    rng = random.Random(f"backtest-{zone}")
    return [rng.randrange(60) / 60 for _ in range(count)]


UNIFORM_MINIMUMS = (0.02, 0.04)


def run_zone(args: tuple[Path, str, int, tuple[str, ...], float, int]) -> list[ZoneResult]:
    """All configurations and protocols for one zone (zones are independent: one task each)."""
    data_dir, zone, test_year, protocols, zone_minimum, every = args
    truth, first_test = load_truth(data_dir, zone, test_year)
    profiles = train_profiles(data_dir, zone, test_year)
    offline = {name: offline_series(profile, kind, truth) for name, (kind, profile) in profiles.items()}
    yesterday = Series.of(truth.origin, [math.nan] * 24 + truth.values[:-24])
    _check_library_path(zone, profiles[SHIPPED], offline[SHIPPED], truth, first_test)
    _check_oracle(zone, truth, first_test)
    results = []
    for protocol in protocols:
        offsets = now_offsets(protocol, len(truth.values), zone)
        for config in CONFIGS:
            methods: dict[str, Callable[[float], float]] = {"planner/true": partial(plan_start, truth, config=config)}
            if protocol == "on-the-hour":
                for name, series in offline.items():
                    methods[f"offline {name}"] = partial(library_decision, series, config=config)
                shipped = offline[SHIPPED]
                methods[f"offline {SHIPPED} min/zone"] = partial(
                    thresholded_decision, shipped, config=config, minimum=zone_minimum
                )
                for minimum in UNIFORM_MINIMUMS:
                    methods[f"offline {SHIPPED} min {minimum:.0%}"] = partial(
                        thresholded_decision, shipped, config=config, minimum=minimum
                    )
                methods["yesterday"] = partial(library_decision, yesterday, config=config)
            else:
                methods[f"offline {SHIPPED}"] = partial(library_decision, offline[SHIPPED], config=config)
                methods["grid60/true"] = partial(grid_start, truth, config=config)
            methods[f"grid60 {SHIPPED}"] = partial(grid_start, offline[SHIPPED], config=config)
            results.append(_sweep(zone, protocol, config, truth, first_test, offsets, methods, every))
    return results


def _check_library_path(
    zone: str, shipped: tuple[str, Any], series: Series, truth: Series, first_test: int, every: int = 101
) -> None:
    """The precomputed forecast slices must decide exactly what ``profile_series`` + ``choose_start`` decide."""
    kind, profile = shipped
    for i in range(first_test + 24, len(truth.values) - 24, every):
        for config in CONFIGS:
            for offset in (0.0, 0.35):
                fast = library_decision(series, i + offset, config)
                slow = library_start(profile, kind, truth.origin, i + offset, config)
                if abs(fast - slow) > 1e-6:
                    raise AssertionError(f"{zone} hour {i}: backtest path {fast} h, library {slow} h")


def _check_oracle(zone: str, truth: Series, first_test: int, every: int = 211) -> None:
    """Empirical guard for the grid argument in ``oracle_mean``: a one-minute grid never finds anything lower."""
    for i in range(first_test + 24, len(truth.values) - 24, every):
        for config in CONFIGS:
            now_h = i + (i % 60) / 60
            steps = round(config.window_h * 60)
            finest = min(truth.mean(now_h + k / 60, config.job_h) for k in range(steps + 1))
            if finest < oracle_mean(truth, now_h, config) - 1e-9 * finest:
                raise AssertionError(f"{zone} hour {i}: a one-minute grid beats the 30-minute oracle")


def _sweep(
    zone: str,
    protocol: str,
    config: Config,
    truth: Series,
    first_test: int,
    offsets: Sequence[float],
    methods: dict[str, Callable[[float], float]],
    every: int = 1,
) -> ZoneResult:
    tallies = {"oracle": Tally(), **{name: Tally() for name in methods}}
    horizon = config.window_h + config.job_h
    hours, example = 0, ""
    for i in range(max(first_test, 24), len(truth.values), every):
        now_h = i + offsets[i]
        if now_h + horizon > len(truth.values):
            break  # the job would run past the end of the data
        at_once = truth.mean(now_h, config.job_h)
        best = oracle_mean(truth, now_h, config)
        tallies["oracle"].add((at_once - best) / at_once, False)
        for name, choose in methods.items():
            start = choose(now_h)
            if not now_h - 1e-6 <= start <= now_h + config.window_h + 1e-6:
                raise AssertionError(f"{name} chose {start} h outside [{now_h}, {now_h + config.window_h}]")
            chosen = truth.mean(start, config.job_h)
            if chosen < best - 1e-9 * best:
                raise AssertionError(f"{name} beat the oracle at {zone} hour {i}: the oracle is not exhaustive")
            shortfall = chosen > best + 1e-9 * best
            tallies[name].add((at_once - chosen) / at_once, shortfall, start > now_h + 1e-9)
            if name == "planner/true" and shortfall and not example:
                example = f"{zone} {protocol} {config.label} now={now_h} h: planner {chosen} vs oracle {best}"
        hours += 1
    year = datetime.fromtimestamp(truth.origin + first_test * HOUR, timezone.utc).year
    return ZoneResult(zone, year, protocol, config, hours, tallies, example)


# --------------------------------------------------------------------------------------------------------------
# Live correction (issue 9 item 7): the offline profile corrected by the hours measured before now
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LiveSetting:
    """The library's ``LIVE_YESTERDAY_WEIGHT`` (share of the same hour yesterday blended into the profile),
    ``LIVE_HALF_LIFE`` (the recent anomaly halves every that many hours ahead) and ``LIVE_SPAN`` (the anomaly is
    the mean over the last that many measured hours)."""

    half_life_h: float
    span_h: float
    yesterday: float

    @property
    def label(self) -> str:
        fading = "no fading" if math.isinf(self.half_life_h) else f"half-life {_hours(self.half_life_h)}"
        return f"yesterday {self.yesterday:g}, {fading}, span {_hours(self.span_h)}"


LIVE_GRID = tuple(
    LiveSetting(h, s, y) for h in (12, 24, 48, 96, math.inf) for y in (0.0, 0.15, 0.25, 0.35) for s in (1, 3)
)
LIVE_EVERY = 10  # validation scores every 10th hour: the grid has 40 settings
LIVE_METHODS = ("offline", "live-corrected", "live, no minimum", "yesterday")


def live_series(offline: Series, truth: Series, now_h: float, config: Config, setting: LiveSetting) -> Series:
    """The live-corrected forecast made at ``now_h``, as a short series from the hour holding now.

    Measured: the hours that are over by now (the hour under way is a nowcast, not a measurement), i.e. up to
    floor(now) -- and, as the library fetches, only the last 24 of them. Each profile hour whose hour a day earlier
    was measured is blended with it (weight ``yesterday``); the anomaly is the mean of truth - blend over the last
    ``span_h`` measured hours, added with weight 0.5 ** (hours from the end of the measurements to each hour's
    midpoint / half-life), floored at 0 -- ``carbonaware_core.blended_with_yesterday``, ``recent_anomaly`` and
    ``live_corrected`` (``check_live_path`` compares them)."""
    first, last = math.floor(now_h), math.ceil(now_h + config.window_h + config.job_h)
    span, w = round(setting.span_h), setting.yesterday

    def blend(k: int) -> float:
        measured = first - 24 <= k - 24 < first
        return (1 - w) * offline.values[k] + w * truth.values[k - 24] if measured and w else offline.values[k]

    anomaly = sum(truth.values[k] - blend(k) for k in range(first - span, first)) / span
    values = [
        max(0.0, blend(k) + anomaly * core.anomaly_weight(k + 0.5 - first, setting.half_life_h))
        for k in range(first, last)
    ]
    return Series.of(offline.origin + first * HOUR, values)


def live_decision(offline: Series, truth: Series, now_h: float, config: Config, setting: LiveSetting) -> float:
    """What the library decides on the live-corrected forecast (planner + negligible-saving rule), in timeline
    hours."""
    forecast = live_series(offline, truth, now_h, config, setting)
    first = math.floor(now_h)
    return first + library_decision(forecast, now_h - first, config)


def live_thresholded(
    offline: Series, truth: Series, now_h: float, config: Config, setting: LiveSetting, minimum: float
) -> float:
    """``live_decision`` with the offline model's per-zone minimum predicted saving, as the library applies it to
    the live forecast (``Forecast.min_savings`` of the profile it corrects)."""
    forecast = live_series(offline, truth, now_h, config, setting)
    first = math.floor(now_h)
    return first + thresholded_decision(forecast, now_h - first, config, minimum)


def check_live_path(offline: Series, truth: Series, first_test: int, setting: LiveSetting, every: int = 173) -> int:
    """The fast path above must decide what the core's ``recent_anomaly`` + ``live_corrected`` + ``choose_start``
    decide on the same measurements and profile. Returns the number of decisions compared."""
    compared = 0

    def points(series: Series, lo: int, hi: int) -> list[core.ForecastPoint]:
        at = partial(datetime.fromtimestamp, tz=timezone.utc)
        return [
            core.ForecastPoint(at(series.origin + k * HOUR), at(series.origin + (k + 1) * HOUR), series.values[k])
            for k in range(lo, hi)
        ]

    for i in range(first_test + 24, len(truth.values) - 24, every):
        for config in CONFIGS:
            for offset in (0.0, 0.4):
                now_h = i + offset
                now = datetime.fromtimestamp(truth.origin + now_h * HOUR, timezone.utc)
                window, job = timedelta(hours=config.window_h), timedelta(hours=config.job_h)
                horizon = math.ceil(now_h + config.window_h + config.job_h)
                profile = points(offline, i - 24, horizon)
                measured = core.measured_by(points(truth, i - 24, i + 1), now)
                blended = core.blended_with_yesterday(profile, measured, setting.yesterday)
                anomaly = core.recent_anomaly(measured, blended, now, span=timedelta(hours=setting.span_h))
                fading = timedelta(hours=setting.half_life_h) if math.isfinite(setting.half_life_h) else timedelta.max
                corrected = core.live_corrected(blended, anomaly, fading)
                choice = core.choose_start(corrected, now, window, job)
                waits = _waits(choice.now_value, choice.expected, choice.start <= now.timestamp(), 0.0)
                slow = (choice.start - truth.origin) / HOUR if waits else now_h
                fast = live_decision(offline, truth, now_h, config, setting)
                if abs(fast - slow) > 1e-6:
                    raise AssertionError(f"hour {i}+{offset}: live fast path {fast} h, library {slow} h")
                compared += 1
    return compared


def yesterday_series(truth: Series) -> Series:
    """Yesterday as the forecast: each hour's value is the true value 24 h earlier."""
    return Series.of(truth.origin, [math.nan] * 24 + truth.values[:-24])


def run_zone_live(
    args: tuple[Path, str, int, float, int, tuple[LiveSetting, ...], str],
) -> list[ZoneResult]:
    """Offline (the shipped variant with its per-zone minimum, as the library plans), live-corrected and
    yesterday-as-forecast for one zone, every configuration, "now" on the hour. ``mode`` "test": the held-out year
    with the profile of the years before it and ``settings[0]``; "validate": the year before the held-out year with
    the profile of the years before that, one method per setting (the held-out year is never read)."""
    data_dir, zone, test_year, zone_minimum, every, settings, mode = args
    truth, first_test = load_truth(data_dir, zone, test_year)
    kind, profile = train_profiles(data_dir, zone, test_year)[SHIPPED]
    offline = offline_series(profile, kind, truth)
    offsets = now_offsets("on-the-hour", len(truth.values), zone)
    if mode == "test":
        check_live_path(offline, truth, first_test, settings[0])
    results = []
    for config in CONFIGS:
        methods: dict[str, Callable[[float], float]] = {}
        if mode == "test":
            methods["offline"] = partial(thresholded_decision, offline, config=config, minimum=zone_minimum)
            methods["live-corrected"] = partial(
                live_thresholded, offline, truth, config=config, setting=settings[0], minimum=zone_minimum
            )
            methods["live, no minimum"] = partial(live_decision, offline, truth, config=config, setting=settings[0])
            methods["yesterday"] = partial(library_decision, yesterday_series(truth), config=config)
        else:
            for setting in settings:
                methods[setting.label] = partial(live_decision, offline, truth, config=config, setting=setting)
        results.append(_sweep(zone, "on-the-hour", config, truth, first_test, offsets, methods, every))
    return results


def validation_years(data_dir: Path, zones: Sequence[str], tests: dict[str, int | None]) -> dict[str, int]:
    """Per zone, the year the live setting is chosen on: the one before its held-out year, if that one has an
    earlier year to train its profile on (zones with fewer than three years have none)."""
    chosen = {}
    for zone in zones:
        test = tests.get(zone)
        if test is not None and held_out_year(data_dir, zone, test - 1) is not None:
            chosen[zone] = test - 1
    return chosen


def choose_live_setting(results: Sequence[ZoneResult]) -> tuple[LiveSetting, list[tuple[LiveSetting, float]]]:
    """The setting with the largest share of the summed perfect saving over every validation zone and
    configuration (ties: the earlier in LIVE_GRID). Returns it and every setting's share."""
    oracle = sum(r.tallies["oracle"].total for r in results)
    shares = [(s, sum(r.tallies[s.label].total for r in results) / oracle) for s in LIVE_GRID]
    best = max(shares, key=lambda pair: pair[1])
    return best[0], shares


def live_table(results: Sequence[ZoneResult], markdown: bool) -> list[str]:
    """Per zone and configuration: each method's share of the perfect-forecast saving and its harmful waits; then
    the pooled share over the zones where the oracle saves > 5 %, their mean share, and harmful waits pooled."""
    header = ["zone", "test year"]
    for config in CONFIGS:
        header += [f"{_hours(config.window_h)}/{_hours(config.job_h)} oracle %"]
        header += [f"{m} share (harm)" for m in LIVE_METHODS]
    by_zone: dict[str, dict[Config, ZoneResult]] = {}
    for r in results:
        by_zone.setdefault(r.zone, {})[r.config] = r
    rows = []
    for zone in sorted(by_zone):
        row = [zone, str(next(iter(by_zone[zone].values())).year)]
        for config in CONFIGS:
            r = by_zone[zone][config]
            oracle = r.saving("oracle")
            row.append(f"{100 * oracle:.1f}")
            for m in LIVE_METHODS:
                share = f"{100 * r.saving(m) / oracle:.1f}" if oracle > 0 else "-"
                row.append(f"{share} ({100 * r.harmful(m):.0f})")
        rows.append(row)
    for name, value in (("share of summed saving", share_of_mean), ("mean of zone shares", mean_share)):
        row = [f"{name}, oracle > 5 %", ""]
        for config in CONFIGS:
            strong = _strong([r for r in results if r.config == config])
            row.append(f"n={len(strong)}")
            row += [f"{100 * value(strong, m):.1f}" if strong else "-" for m in LIVE_METHODS]
        rows.append(row)
    row = ["harmful waits %, all zones", ""]
    for config in CONFIGS:
        group = [r for r in results if r.config == config]
        row.append(f"n={len(group)}")
        row += [f"{100 * harmful_share(group, m):.1f}" for m in LIVE_METHODS]
    rows.append(row)
    return _render(header, rows, markdown)


# --------------------------------------------------------------------------------------------------------------
# Cross-check: the fast path above is what the public API decides
# --------------------------------------------------------------------------------------------------------------


def check_public_api(data_dir: Path, zone: str, test_year: int, samples: int = 72) -> int:
    """Plan ``samples`` hours through ``plan_delay(source="offline")`` with the held-out model installed via
    CARBONAWARE_OFFLINE_DATA, and compare with ``library_start``. Returns the number of hours compared."""
    truth, first_test = load_truth(data_dir, zone, test_year)
    kind, profile = train_profiles(data_dir, zone, test_year)[SHIPPED]
    document = {"format": 1, "kind": kind, "unit": bom.UNIT, "zones": {zone: profile}}
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.json")
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(document, handle)
        saved = os.environ.get("CARBONAWARE_OFFLINE_DATA")
        os.environ["CARBONAWARE_OFFLINE_DATA"] = path
        try:
            compared = 0
            for config in CONFIGS:
                for i in range(first_test + 24 * 40, first_test + 24 * 40 + samples):
                    now_h = i + 0.25 * (i % 4)
                    now = datetime.fromtimestamp(truth.origin + now_h * HOUR, timezone.utc)
                    plan = core.plan_delay(
                        timedelta(hours=config.window_h),
                        timedelta(hours=config.job_h),
                        provider="gcp",
                        region="europe-west2",
                        source="offline",
                        grid_zone=zone,
                        now=now,
                    )
                    expected = library_start(profile, kind, truth.origin, now_h, config)
                    got = (plan.start.timestamp() - truth.origin) / HOUR
                    if plan.source != "offline" or abs(got - expected) > 1e-6:
                        raise AssertionError(f"plan_delay chose {plan} but the backtest path chose {expected} h")
                    compared += 1
        finally:
            if saved is None:
                os.environ.pop("CARBONAWARE_OFFLINE_DATA", None)
            else:
                os.environ["CARBONAWARE_OFFLINE_DATA"] = saved
    return compared


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------


def _cell(result: ZoneResult, method: str) -> str:
    oracle, saving = result.saving("oracle"), result.saving(method)
    share = f"{100 * saving / oracle:.1f}" if oracle > 0 else "-"
    return f"{100 * saving:.1f} ({share}; {100 * result.harmful(method):.0f})"


def _strong(results: Sequence[ZoneResult]) -> list[ZoneResult]:
    return [r for r in results if r.saving("oracle") > SHARE_THRESHOLD]


def mean_share(strong: Sequence[ZoneResult], method: str) -> float:
    """The mean over zones of (method saving / oracle saving)."""
    return sum(r.saving(method) / r.saving("oracle") for r in strong) / len(strong)


def share_of_mean(strong: Sequence[ZoneResult], method: str) -> float:
    """The headline: summed method savings / summed oracle savings over the zones (every start hour counts once)."""
    return sum(r.tallies[method].total for r in strong) / sum(r.tallies["oracle"].total for r in strong)


def harmful_share(results: Sequence[ZoneResult], method: str) -> float:
    """Waits that ended dirtier than starting at once, as a share of all waits, pooled over the zones."""
    waits = sum(r.tallies[method].waits for r in results)
    return sum(r.tallies[method].harmful for r in results) / waits if waits else 0.0


def table(results: Sequence[ZoneResult], markdown: bool) -> list[str]:
    """One configuration and protocol: a row per zone, then the figures over the zones where the oracle saves > 5 %
    (pooled share, mean of shares) and the harmful share over every zone."""
    methods = [m for m in results[0].tallies if m != "oracle"]
    header = ["zone", "test year", "starts", "oracle", *methods]
    rows = []
    for r in sorted(results, key=lambda r: r.zone):
        rows.append(
            [r.zone, str(r.year), str(r.hours), f"{100 * r.saving('oracle'):.1f}", *[_cell(r, m) for m in methods]]
        )
    strong = _strong(results)
    if strong:
        pooled = [f"{100 * share_of_mean(strong, m):.1f}" for m in methods]
        means = [f"{100 * mean_share(strong, m):.1f}" for m in methods]
        rows.append([f"share of summed saving, oracle > 5 % (n={len(strong)})", "", "", "100", *pooled])
        rows.append([f"mean of zone shares, oracle > 5 % (n={len(strong)})", "", "", "100", *means])
    rows.append(
        [
            f"harmful waits %, all zones (n={len(results)})",
            "",
            "",
            "0",
            *[f"{100 * harmful_share(results, m):.1f}" for m in methods],
        ]
    )
    return _render(header, rows, markdown)


def _render(header: list[str], rows: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        lines = [
            "| " + " | ".join(header) + " |",
            "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|",
        ]
        return lines + ["| " + " | ".join(row) + " |" for row in rows]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    return [fmt.format(*header), *(fmt.format(*row) for row in rows)]


def summary(results: Sequence[ZoneResult], protocols: Sequence[str]) -> list[str]:
    """Per protocol and configuration: every method's share of the summed perfect saving and its harmful waits."""
    lines = []
    for protocol in protocols:
        for config in CONFIGS:
            group = [r for r in results if r.config == config and r.protocol == protocol]
            strong = _strong(group)
            where = f"{config.label}, now {protocol.replace('-', ' ')}"
            if not strong:
                lines.append(f"{where}: no zone where the oracle saves more than 5 %")
                continue
            methods = [m for m in group[0].tallies if m != "oracle"]
            parts = [
                f"{m} {100 * share_of_mean(strong, m):.1f} (harmful {100 * harmful_share(group, m):.1f})"
                for m in methods
            ]
            lines.append(
                f"{where} ({len(strong)} of {len(group)} zones), % of the summed oracle saving: " + ", ".join(parts)
            )
    return lines


def evaluate_live(
    pool: ProcessPoolExecutor,
    data_dir: Path,
    scored: Sequence[str],
    tests: dict[str, int | None],
    minimums: dict[str, float],
    every: int,
) -> tuple[LiveSetting, list[tuple[LiveSetting, float]], list[ZoneResult]]:
    """Choose the live setting on validation years (every zone's year before its held-out year), then score
    offline, live-corrected and yesterday on the held-out years with it."""
    years = validation_years(data_dir, scored, tests)
    work = [(data_dir, zone, year, 0.0, LIVE_EVERY, LIVE_GRID, "validate") for zone, year in years.items()]
    validation = [r for rs in pool.map(run_zone_live, work) for r in rs]
    setting, shares = choose_live_setting(validation)
    work = [(data_dir, zone, tests[zone] or 0, minimums[zone], every, (setting,), "test") for zone in scored]
    return setting, shares, [r for rs in pool.map(run_zone_live, work) for r in rs]


def live_report(
    setting: LiveSetting, shares: Sequence[tuple[LiveSetting, float]], results: Sequence[ZoneResult], h: str, md: bool
) -> list[str]:
    shipped = LiveSetting(
        core.LIVE_HALF_LIFE.total_seconds() / 3600, core.LIVE_SPAN.total_seconds() / 3600, core.LIVE_YESTERDAY_WEIGHT
    )
    ranked = sorted(shares, key=lambda pair: -pair[1])
    out = ["", f"{h}Offline vs live-corrected vs yesterday (now on the hour)", ""]
    out.append(
        f"- live setting chosen on validation years (each zone's year before its held-out year, profile of the "
        f"years before that, every {LIVE_EVERY}th hour, all three configurations pooled): {setting.label}; "
        f"the library ships {shipped.label}" + (" (the same)" if shipped == setting else " (DIFFERENT: update it)")
    )
    out.append(
        "- validation share of the perfect saving, best five: "
        + ", ".join(f"{s.label} {100 * v:.1f}" for s, v in ranked[:5])
        + f"; worst: {ranked[-1][0].label} {100 * ranked[-1][1]:.1f}"
    )
    out.append(
        "- offline: the shipped profile variant with its per-zone minimum predicted saving (as the library plans); "
        "live-corrected: that profile corrected by the hours measured before now, with the same per-zone minimum "
        "(as the library plans it); live, no minimum: without it; yesterday: the true values 24 h earlier; "
        "cells: share of the perfect-forecast saving, % (harmful waits, % of waits)"
    )
    out.append("")
    return out + live_table(results, md)


def live_summary(results: Sequence[ZoneResult]) -> list[str]:
    lines = []
    for config in CONFIGS:
        group = [r for r in results if r.config == config]
        strong = _strong(group)
        if not strong:
            continue
        parts = [
            f"{m} {100 * share_of_mean(strong, m):.1f} (harmful {100 * harmful_share(group, m):.1f})"
            for m in LIVE_METHODS
        ]
        lines.append(f"{config.label} ({len(strong)} of {len(group)} zones), now on the hour: " + ", ".join(parts))
    return lines


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        if names:
            cpu = f"{names[0]} x {len(names)}"
    except OSError:
        pass
    return f"{platform.system()} {platform.release()}, {cpu}, Python {platform.python_version()}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=bom.DEFAULT_DATA, help="shared data folder (default %(default)s)")
    parser.add_argument("--test-year", type=int, help="held-out year for every zone (default: each zone's latest year)")
    parser.add_argument("--every", type=int, default=5, help="score every n-th hour of the held-out year (default 5)")
    parser.add_argument("--zones", nargs="+", help="zone keys (default: every zone in the data)")
    parser.add_argument(
        "--protocols", nargs="+", choices=PROTOCOLS, default=list(PROTOCOLS), help="when 'now' falls in each hour"
    )
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes (default 2)")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.add_argument(
        "--live-only", action="store_true", help="only the offline / live-corrected / yesterday comparison"
    )
    return parser


def held_out_year(data_dir: Path, zone: str, wanted: int | None) -> int | None:
    """The zone's test year: ``wanted`` or its latest year, provided it has an earlier year to train on."""
    years = bom.available_years(data_dir, zone)
    year = wanted if wanted is not None else (years[-1] if years else None)
    return year if year in years and any(y < year for y in years) else None


def zone_minimum(args: tuple[Path, str, int]) -> float | None:
    """The per-zone minimum predicted saving the backtest may use for ``test_year``: chosen on the latest year
    before it, with a profile of the years before that (the test year is never seen); None if there is none."""
    data_dir, zone, test_year = args
    earlier = [y for y in bom.available_years(data_dir, zone) if y < test_year]
    if not earlier:
        return None
    shipped = next(v for v in VARIANTS if v.name == SHIPPED)
    return bom.validated_min_saving(data_dir, zone, earlier[-1], shipped.kind, shipped.smoothing, shipped.significant)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    started = time.perf_counter()
    zones = args.zones or bom.available_zones(args.data)
    tests = {zone: held_out_year(args.data, zone, args.test_year) for zone in zones}
    scored = [zone for zone in zones if tests[zone] is not None]
    skipped = [zone for zone in zones if tests[zone] is None]
    if not scored:
        print(f"no zone under {args.data} has a held-out year with an earlier year to train on", file=sys.stderr)
        return 1
    with ProcessPoolExecutor(max_workers=max(1, min(args.jobs, len(scored)))) as pool:
        found = dict(zip(scored, pool.map(zone_minimum, [(args.data, z, tests[z]) for z in scored]), strict=True))
        validated = {zone: value for zone, value in found.items() if value is not None}
        default = bom.default_min_saving(validated)
        minimums = {zone: validated.get(zone, default) for zone in scored}
        work = [
            (args.data, zone, tests[zone], tuple(args.protocols), minimums[zone], args.every)
            for zone in scored
            if tests[zone] is not None
        ]
        results = [r for rs in pool.map(run_zone, work) for r in rs] if not args.live_only else []
        live_setting, live_shares, live_results = evaluate_live(pool, args.data, scored, tests, minimums, args.every)
    first = scored[0]
    api_checked = check_public_api(args.data, first, tests[first] or 0) if not args.live_only else 0
    elapsed = time.perf_counter() - started

    out: list[str] = []
    h = "## " if args.markdown else "== "
    held = "each zone's latest year" if args.test_year is None else str(args.test_year)
    out.append(f"{'# ' if args.markdown else ''}Backtest, held-out year: {held}")
    out.append("")
    out.append(f"- machine: {machine()}")
    out.append(f"- command: python bench/backtest.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    out.append(f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; run time {elapsed:.0f} s")
    out.append(
        f"- zones scored: {len(scored)} (offline models trained on each zone's years before its held-out year only); "
        f"not held out (one year, nothing earlier to train on): {', '.join(skipped) or 'none'}"
    )
    out.append(f"- starts: every {args.every}th hour of the held-out year")
    shown = ", ".join(f"{zone} {100 * minimums[zone]:g}" for zone in scored)
    out.append(
        f"- min/zone (%), chosen on the year before the held-out year: {shown}; default for zones without one "
        f"(median of the others): {100 * default:g}"
    )
    if not args.live_only:
        checked = f"{api_checked} plan_delay(source='offline') decisions match the fast path"
        out.append(f"- public-API cross-check: {checked}")
    out.append(
        "- cells: mean saving % vs starting at once (share of the oracle's saving, %; harmful waits, % of waits)"
    )
    for protocol in args.protocols if results else ():
        for config in CONFIGS:
            group = [r for r in results if r.protocol == protocol and r.config == config]
            out.append("")
            out.append(f"{h}{config.label}, now {protocol.replace('-', ' ')}")
            out.append("")
            out.extend(table(group, args.markdown))
    out.extend(live_report(live_setting, live_shares, live_results, h, args.markdown))
    misses = [r for r in results if r.tallies["planner/true"].below_oracle]
    out.append("")
    out.append(f"{h}Summary")
    out.append("")
    if misses:
        count = sum(r.tallies["planner/true"].below_oracle for r in misses)
        out.append(f"- PLANNER BUG: planner/true fell short of the oracle {count} times, e.g. {misses[0].example_miss}")
    else:
        out.append("- planner/true equals the oracle at every start hour, every zone, every configuration")
    out.extend(f"- {line}" for line in summary(results, args.protocols) if results)
    out.extend(f"- {line}" for line in live_summary(live_results))
    print("\n".join(out))
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
