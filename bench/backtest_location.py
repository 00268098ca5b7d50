"""Backtest the location lever: what do time-only, location-only and time+location save, per window and job?

One command from a clean clone (stdlib only, plus the core and the model builder of this repository):

    python bench/backtest_location.py [--data ../shared/data] [--sets Europe US] [--every 1] [--markdown]

Region sets (``REGION_SETS``) are realistic groups of zones one operator could run in; each set is scored on one
year that every zone of the set has in full (the latest such year, or ``--year``), on the same hours in every zone.
For every hourly start ("now") of that year, every (window, job) configuration of ``bench/backtest.py`` and every
zone of the set as the home zone in turn, three levers choose where and when the job runs:

- time: the best start in the home zone within [now, now + window];
- location: start now, in the zone with the lowest mean over the job;
- time+location: the best (zone, start) within the window.

Each lever decides on (a) the perfect forecast (the real data: the ceiling) and (b) the offline model (a month x
hour-of-day profile, decided on the profile, scored on the real data). The per-zone search is the library's own
exact planner, ``carbonaware_core.lowest_mean_start`` (through ``backtest.plan_start``); the choice among zones is
``decide``: the lowest predicted mean, ties to the home zone then the earliest start, and on a forecast the library's
rule that a predicted saving under ``NEGLIGIBLE_SAVINGS`` (or ``--min-savings``) is no reason to wait or move.
Saving of one decision: 1 - realised / (run now in the home zone), both TRUE job means; "dirtier": the realised
mean is higher than running at once at home. Figures are the mean over start hours, then over home zones.

Out of sample: a zone with years before the test year gets the shipped profile variant trained on those years
only (``backtest.train_profiles``). A zone with no earlier year (half of the Europe set, two of the US set) gets a
leave-one-month-out profile: each month's cell is the mean of the same hour in the two neighbouring months of the
test year, so the month being decided is never seen. ``--holdout neighbour-months`` gives every zone that profile.
That profile knows the test year's level from the months around, which a profile of past years does not: it reads
a little optimistic, and a set mixing both kinds compares zones on forecasts of unequal quality (both are shown).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import backtest as bt  # noqa: E402 - after the path set-up on purpose; it puts the repo root and scripts/ on the path
import build_offline_model as bom  # noqa: E402 - on the path set by backtest
from backtest import HOUR, Config, Series  # noqa: E402

import carbonaware_core as core  # noqa: E402

REGION_SETS: dict[str, tuple[str, ...]] = {
    "Europe": ("IE", "GB", "FR", "DE", "BE", "ES", "SE-SE3", "FI"),
    "US": ("US-MIDA-PJM", "US-MIDW-MISO", "US-TEX-ERCO", "US-CAL-CISO", "US-NW-BPAT"),
    # the same without the zones that are the cleanest in nearly every hour (hydro, nuclear, west-coast solar), where
    # the location choice is a real forecast question, not "always move to Sweden / Bonneville"
    "Europe-west": ("IE", "GB", "DE", "BE", "ES"),
    "US-east": ("US-MIDA-PJM", "US-MIDW-MISO", "US-TEX-ERCO"),
}
LEVERS = ("time", "location", "time+location")
FORECASTS = ("perfect", "offline")
HOLDOUTS = ("auto", "neighbour-months")
QUICK_EVERY = 61  # --quick: every 61st hour (a prime, so the starts walk through every hour of the day)
SAMPLE_EVERY = 97  # self-checks against brute force and the one-zone library path, every 97th start
TOLERANCE = 1e-9


# --------------------------------------------------------------------------------------------------------------
# Data: one year on the same hours in every zone of a set, and an out-of-sample profile per zone
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Zone:
    """One zone of a set: the true series of the test year, the offline forecast of it and how it was trained."""

    name: str
    truth: Series
    offline: Series
    trained_on: str


def common_year(data_dir: Path, zones: Sequence[str], wanted: int | None = None) -> int:
    """The latest year every zone of the set has (or ``wanted``, if they all have it)."""
    shared: set[int] = set.intersection(*(set(bom.available_years(data_dir, zone)) for zone in zones))
    if wanted is not None:
        if wanted not in shared:
            raise ValueError(f"not every zone of {list(zones)} has {wanted}; common years: {sorted(shared)}")
        return wanted
    if not shared:
        raise ValueError(f"the zones {list(zones)} have no year in common under {data_dir}")
    return max(shared)


def hourly_series(rows: Sequence[tuple[datetime, float]], where: str) -> Series:
    """Gap-free, positive hourly values as a ``Series`` (a saving relative to zero would be undefined)."""
    for (a, _), (b, _) in itertools.pairwise(rows):
        if b - a != timedelta(hours=1):
            raise ValueError(f"{where}: the series is not gap-free hourly at {a.isoformat()}")
    if any(value <= 0 for _, value in rows):
        raise ValueError(f"{where}: an intensity <= 0 makes a relative saving undefined")
    return Series.of(rows[0][0].timestamp(), [value for _, value in rows])


def neighbour_month_rows(rows: Sequence[tuple[datetime, float]]) -> list[tuple[datetime, float]]:
    """Every row relabelled as an hour of each of its two neighbouring months (December and January of the same
    year are neighbours), so that a month x hour profile built from them never sees the month it answers for."""
    out = []
    for moment, value in rows:
        for step in (-1, 1):
            month = (moment.month - 1 + step) % 12 + 1
            out.append((datetime(moment.year, month, 1, moment.hour, tzinfo=timezone.utc), value))
    return out


def shipped_profile(rows: Sequence[tuple[datetime, float]]) -> tuple[str, Any]:
    """(kind, profile) built from ``rows`` as the shipped file is built (``backtest.SHIPPED``)."""
    shipped = next(v for v in bt.VARIANTS if v.name == bt.SHIPPED)
    profile = bom.build_profile(
        rows, shipped.kind, shipped.digits, smoothing=shipped.smoothing, significant=shipped.significant
    )
    return shipped.kind, profile


def offline_profile(
    data_dir: Path, zone: str, test_rows: Sequence[tuple[datetime, float]], holdout: str
) -> tuple[str, Any, str]:
    """(kind, profile, how it was trained) in the shipped layout, never trained on the month being decided: the
    zone's years before the test year, or (none, or ``holdout="neighbour-months"``) the test year's neighbour months
    (no month smoothing then: the neighbours are all it has)."""
    year = test_rows[0][0].year
    earlier = [y for y in bom.available_years(data_dir, zone) if y < year]
    if holdout == "auto" and earlier:
        kind, profile = shipped_profile([row for y in earlier for row in bom.load_zone_year(data_dir, zone, y)])
        return kind, profile, f"{earlier[0]}-{earlier[-1]}" if len(earlier) > 1 else str(earlier[0])
    shipped = next(v for v in bt.VARIANTS if v.name == bt.SHIPPED)
    if shipped.kind != bt.MH:
        raise ValueError(f"the neighbour-month profile needs the {bt.MH} layout, the shipped one is {shipped.kind}")
    profile = bom.build_profile(
        neighbour_month_rows(test_rows), shipped.kind, shipped.digits, significant=shipped.significant
    )
    return shipped.kind, profile, f"{year} neighbour months"


def load_set(data_dir: Path, zones: Sequence[str], year: int, holdout: str = "auto") -> list[Zone]:
    """Every zone of a set on the test year; all must cover exactly the same hours."""
    loaded = []
    for name in zones:
        rows = bom.load_zone_year(data_dir, name, year)
        truth = hourly_series(rows, f"{name} {year}")
        kind, profile, trained_on = offline_profile(data_dir, name, rows, holdout)
        loaded.append(Zone(name, truth, bt.offline_series(profile, kind, truth), trained_on))
    check_same_hours(loaded)
    return loaded


def check_same_hours(zones: Sequence[Zone]) -> None:
    """Zones are compared hour by hour: a set whose files cover different hours would compare different moments."""
    first = zones[0].truth
    for zone in zones[1:]:
        if zone.truth.origin != first.origin or len(zone.truth.values) != len(first.values):
            raise ValueError(f"{zone.name} does not cover the same hours as {zones[0].name}")


# --------------------------------------------------------------------------------------------------------------
# Decisions: the per-zone planner, then the choice among zones
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """A (zone, start) with the mean the forecast predicts for the job there and the mean it really had."""

    zone: int
    start_h: float
    predicted: float
    realised: float


def best_in_zone(index: int, forecast: Series, truth: Series, now_h: float, config: Config) -> Candidate:
    """The zone's best start by the library's planner on the forecast (``lowest_mean_start``), scored on the truth."""
    start = bt.plan_start(forecast, now_h, config)
    return Candidate(index, start, forecast.mean(start, config.job_h), truth.mean(start, config.job_h))


def at_once_in_zone(index: int, forecast: Series, truth: Series, now_h: float, config: Config) -> Candidate:
    """Starting now in the zone: the location lever's candidate, and the baseline of every saving in the home zone."""
    return Candidate(index, now_h, forecast.mean(now_h, config.job_h), truth.mean(now_h, config.job_h))


def decide(candidates: Sequence[Candidate], home_now: Candidate, minimum: float | None) -> Candidate:
    """The library's multi-zone rule (``carbonaware_core.best_place`` and ``decide``): the lowest predicted mean,
    ties to the home zone, then the earliest start, then the set order; with ``minimum`` (on a forecast), a predicted
    saving against running at once at home under it (or under the core's negligible saving) is no reason to wait or
    move: at once at home. Without it (the perfect forecast) any lower mean is taken."""
    home = [home_now, *(c for c in candidates if c.zone == home_now.zone)]
    others = sorted((c for c in candidates if c.zone != home_now.zone), key=lambda c: c.zone)
    places = [_best_of(home), *others]
    best = places[_best_of_index(places)]
    if minimum is None:
        return best
    reason, _saving = core.decide(home_now.predicted, best.predicted, best is home_now, minimum)
    return best if reason == "optimal" else home_now


def _best_of(candidates: Sequence[Candidate]) -> Candidate:
    return candidates[_best_of_index(candidates)]


def _best_of_index(candidates: Sequence[Candidate]) -> int:
    index = core.best_place([(c.start_h, c.predicted) for c in candidates])
    assert index is not None
    return index


# --------------------------------------------------------------------------------------------------------------
# Sweep: every start of the year, every home zone, every lever on both forecasts
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Tally:
    """Summed savings over the starts of one (home, lever, forecast), and how often the decision ended dirtier than
    running at once at home, ran in another zone, or waited."""

    total: float = 0.0
    count: int = 0
    dirtier: int = 0
    moved: int = 0
    waited: int = 0

    def add(self, chosen: Candidate, home_now: Candidate) -> float:
        saving = 1 - chosen.realised / home_now.realised
        self.total += saving
        self.count += 1
        self.dirtier += chosen.realised > home_now.realised * (1 + TOLERANCE)
        self.moved += chosen.zone != home_now.zone
        self.waited += chosen.start_h > home_now.start_h + 1e-9
        return saving

    @property
    def saving(self) -> float:
        return self.total / self.count if self.count else 0.0


@dataclass
class SetResult:
    """One region set and configuration: a tally per (home zone, lever, forecast)."""

    name: str
    year: int
    config: Config
    zones: list[str]
    trained_on: dict[str, str]
    tallies: dict[tuple[str, str, str], Tally] = field(default_factory=dict)

    def tally(self, home: str, lever: str, forecast: str) -> Tally:
        return self.tallies.setdefault((home, lever, forecast), Tally())

    def saving(self, lever: str, forecast: str) -> float:
        """Mean over home zones of the mean saving over start hours."""
        return sum(self.tally(home, lever, forecast).saving for home in self.zones) / len(self.zones)

    def share(self, lever: str, forecast: str, attribute: str) -> float:
        """Mean over home zones of the share of decisions with ``attribute`` (dirtier, moved, waited)."""
        tallies = [self.tally(home, lever, forecast) for home in self.zones]
        return sum(float(getattr(t, attribute)) / t.count for t in tallies if t.count) / len(tallies)


def starts(hours: int, config: Config, every: int) -> range:
    """Every ``every``-th hour whose job can still finish inside the data, however long it waits."""
    return range(0, hours - int(config.window_h + config.job_h + 0.999), every)


def zone_choices(
    zones: Sequence[Zone], config: Config, hours: range
) -> dict[str, list[list[tuple[Candidate, Candidate]]]]:
    """Per forecast, per zone, per start: (best start in the zone, at once in the zone). Home-independent, so the
    planner runs once per zone and start, not once per home."""
    out: dict[str, list[list[tuple[Candidate, Candidate]]]] = {}
    for forecast in FORECASTS:
        out[forecast] = [
            [
                (
                    best_in_zone(z, _forecast(zone, forecast), zone.truth, float(i), config),
                    at_once_in_zone(z, _forecast(zone, forecast), zone.truth, float(i), config),
                )
                for i in hours
            ]
            for z, zone in enumerate(zones)
        ]
    return out


def _forecast(zone: Zone, forecast: str) -> Series:
    return zone.truth if forecast == "perfect" else zone.offline


def run_set(name: str, zones: Sequence[Zone], config: Config, every: int = 1, min_savings: float = 0.0) -> SetResult:
    """Every start, home zone, lever and forecast of one set and configuration, with the invariants checked."""
    hours = starts(len(zones[0].truth.values), config, every)
    year = datetime.fromtimestamp(zones[0].truth.origin + HOUR * len(zones[0].truth.values) / 2, timezone.utc).year
    result = SetResult(name, year, config, [z.name for z in zones], {z.name: z.trained_on for z in zones})
    choices = zone_choices(zones, config, hours)
    minimums = {"perfect": None, "offline": max(core.NEGLIGIBLE_SAVINGS, min_savings)}
    for home, home_zone in enumerate(zones):
        for k in range(len(hours)):
            home_true_now = choices["perfect"][home][k][1]
            realised: dict[tuple[str, str], float] = {}
            for forecast in FORECASTS:
                per_zone = [zone[k] for zone in choices[forecast]]
                home_now = per_zone[home][1]
                levers = {
                    "time": decide([per_zone[home][0]], home_now, minimums[forecast]),
                    "location": decide([at_once for _, at_once in per_zone], home_now, minimums[forecast]),
                    "time+location": decide([best for best, _ in per_zone], home_now, minimums[forecast]),
                }
                for lever, chosen in levers.items():
                    result.tally(home_zone.name, lever, forecast).add(chosen, home_true_now)
                    realised[lever, forecast] = chosen.realised
            check_invariants(realised, f"{name} {config.label} home {home_zone.name} start {hours[k]}")
    return result


def check_invariants(realised: dict[tuple[str, str], float], where: str) -> None:
    """Per decision: on the perfect forecast time+location is at least as clean as either lever alone, and no
    lever does better on the offline forecast than on the perfect one (the perfect one is the minimum)."""
    slack = 1 + TOLERANCE
    best = realised["time+location", "perfect"]
    if best > min(realised["time", "perfect"], realised["location", "perfect"]) * slack:
        raise AssertionError(f"{where}: perfect time+location {best} is dirtier than a single lever")
    for lever in LEVERS:
        if realised[lever, "perfect"] > realised[lever, "offline"] * slack:
            raise AssertionError(f"{where}: the offline {lever} decision beat the perfect one")


# --------------------------------------------------------------------------------------------------------------
# Cross-checks on a sample: an independent brute force, and the library's one-zone decision
# --------------------------------------------------------------------------------------------------------------


def check_sample(zones: Sequence[Zone], config: Config, every: int = SAMPLE_EVERY) -> int:
    """On every ``every``-th start: the perfect time+location mean equals the minimum over zones of
    ``backtest.oracle_mean`` (a 30-minute brute force that shares no code with the planner), and the offline
    time-only decision equals ``backtest.library_decision`` (the library's one-zone path). Returns the checks made."""
    checked = 0
    for i in starts(len(zones[0].truth.values), config, every):
        now = float(i)
        brute = min(bt.oracle_mean(zone.truth, now, config) for zone in zones)
        for home in range(len(zones)):
            home_now = at_once_in_zone(home, zones[home].truth, zones[home].truth, now, config)
            per_zone = [best_in_zone(z, zone.truth, zone.truth, now, config) for z, zone in enumerate(zones)]
            chosen = decide(per_zone, home_now, None)
            if abs(chosen.realised - brute) > TOLERANCE * brute:
                raise AssertionError(f"start {i}: time+location {chosen.realised}, brute force {brute}")
            zone = zones[home]
            offline_now = at_once_in_zone(home, zone.offline, zone.truth, now, config)
            best = best_in_zone(home, zone.offline, zone.truth, now, config)
            mine = decide([best], offline_now, core.NEGLIGIBLE_SAVINGS).start_h
            library = bt.library_decision(zone.offline, now, config)
            if abs(mine - library) > 1e-9:
                raise AssertionError(f"{zone.name} start {i}: decide chose {mine} h, the library {library} h")
            checked += 2
    return checked


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------


def set_table(results: Sequence[SetResult], markdown: bool) -> list[str]:
    """One set: a row per (configuration, lever); savings % (mean over homes), the offline share of the perfect
    saving, and the offline decisions that ended dirtier than at once at home, ran elsewhere, or waited."""
    header = [
        "window, job",
        "lever",
        "perfect %",
        "offline %",
        "offline / perfect %",
        "dirtier %",
        "moved %",
        "waited %",
    ]
    rows = []
    for result in results:
        for lever in LEVERS:
            perfect, offline = result.saving(lever, "perfect"), result.saving(lever, "offline")
            rows.append(
                [
                    f"{bt._hours(result.config.window_h)}, {bt._hours(result.config.job_h)}",
                    lever,
                    f"{100 * perfect:.1f}",
                    f"{100 * offline:.1f}",
                    f"{100 * offline / perfect:.0f}" if perfect > 0 else "-",
                    f"{100 * result.share(lever, 'offline', 'dirtier'):.1f}",
                    f"{100 * result.share(lever, 'offline', 'moved'):.0f}",
                    f"{100 * result.share(lever, 'offline', 'waited'):.0f}",
                ]
            )
    return bt._render(header, rows, markdown)


def home_table(results: Sequence[SetResult], markdown: bool) -> list[str]:
    """One set, per home zone: every lever's perfect / offline saving %, per configuration."""
    header = ["home", "window, job", *(f"{lever} perfect / offline %" for lever in LEVERS)]
    rows = []
    for home in results[0].zones:
        for result in results:
            cells = [
                f"{100 * result.tally(home, lever, 'perfect').saving:.1f} / "
                f"{100 * result.tally(home, lever, 'offline').saving:.1f}"
                for lever in LEVERS
            ]
            rows.append([home, f"{bt._hours(result.config.window_h)}, {bt._hours(result.config.job_h)}", *cells])
    return bt._render(header, rows, markdown)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=bom.DEFAULT_DATA, help="shared data folder (default %(default)s)")
    parser.add_argument(
        "--sets",
        nargs="+",
        choices=list(REGION_SETS),
        default=list(REGION_SETS),
        help="named region sets (default all)",
    )
    parser.add_argument(
        "--set",
        dest="extra",
        action="append",
        type=region_set,
        default=[],
        metavar="NAME=ZONE,ZONE,...",
        help="one more region set (repeatable)",
    )
    parser.add_argument("--year", type=int, help="test year for every set (default: the latest its zones share)")
    parser.add_argument("--every", type=int, default=1, help="score every n-th hour of the year (default 1)")
    parser.add_argument("--holdout", choices=HOLDOUTS, default="auto", help="how the offline profile is trained")
    parser.add_argument(
        "--min-savings", type=float, default=0.0, help="offline: minimum predicted saving to wait or move (default 0)"
    )
    parser.add_argument("--per-home", action="store_true", help="also print the figures per home zone")
    parser.add_argument("--quick", action="store_true", help=f"a test-sized run: one start every {QUICK_EVERY} h")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    return parser


def region_set(text: str) -> tuple[str, tuple[str, ...]]:
    """``NAME=ZONE,ZONE,...`` from the command line."""
    name, _, zones = text.partition("=")
    members = tuple(zone.strip() for zone in zones.split(",") if zone.strip())
    if not name or len(members) < 2:
        raise argparse.ArgumentTypeError(f"expected NAME=ZONE,ZONE,... with two zones or more, got {text!r}")
    return name, members


def run(args: argparse.Namespace) -> tuple[dict[str, list[SetResult]], int]:
    """Every set and configuration, plus the sampled cross-checks; returns the results and how many checks ran."""
    every = QUICK_EVERY if args.quick else args.every
    results: dict[str, list[SetResult]] = {}
    checked = 0
    for name, members in [*((name, REGION_SETS[name]) for name in args.sets), *args.extra]:
        zones = load_set(args.data, members, common_year(args.data, members, args.year), args.holdout)
        results[name] = [run_set(name, zones, config, every, args.min_savings) for config in bt.CONFIGS]
        checked += sum(check_sample(zones, config, SAMPLE_EVERY * (4 if args.quick else 1)) for config in bt.CONFIGS)
    return results, checked


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    started = time.perf_counter()
    results, checked = run(args)
    elapsed = time.perf_counter() - started
    h = "## " if args.markdown else "== "
    every = QUICK_EVERY if args.quick else args.every
    out = [f"{'# ' if args.markdown else ''}Backtest of the location lever", ""]
    out.append(f"- machine: {bt.machine()}")
    out.append(f"- command: python bench/backtest_location.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    out.append(f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; run time {elapsed:.0f} s")
    out.append(
        f"- starts: one every {every} h through the test year, now on the hour; every zone of a set as home in turn; "
        f"figures are means over the starts, then over the home zones"
    )
    out.append(
        f"- offline: decided on the profile, scored on the real data; a predicted saving under "
        f"{100 * max(core.NEGLIGIBLE_SAVINGS, args.min_savings):g} % runs at once at home"
    )
    out.append(
        f"- cross-checks: {checked} sampled decisions equal a 30-minute brute force (perfect time+location) and "
        f"the library's one-zone path (offline time-only); per-decision invariants held at every start"
    )
    out.append(
        "- columns: saving % vs running at once at home, perfect forecast and offline model; offline / perfect; "
        "offline decisions that ended dirtier than at once at home, ran in another zone, waited"
    )
    for name, group in results.items():
        first = group[0]
        trained = ", ".join(f"{zone} {first.trained_on[zone]}" for zone in first.zones)
        out += ["", f"{h}{name}, {first.year}: {', '.join(first.zones)}", "", f"- offline trained on: {trained}", ""]
        out += set_table(group, args.markdown)
        if args.per_home:
            out += ["", *home_table(group, args.markdown)]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
