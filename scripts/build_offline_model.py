"""Build ``carbonaware_offline.json``: typical hourly carbon intensity by grid zone, for ``source="offline"``.

Run from the repository root (stdlib only):

    python scripts/build_offline_model.py [--data ../shared/data] [--years 2021 2022 2023]
        [--kind month-hour-utc|month-weekpart-hour-utc] [--significant 3 | --digits 1] [--smoothing 0.25]
        [--shrink 10] [--out carbonaware_offline.json]

Without ``--years`` each zone is built from every year it has (2021-2023 for the first 19 zones, one year for most
of the others: see ../shared/data/README.md); with it, from the listed years it has.

Input: ``<data>/electricitymaps_hourly/<ZONE>/<ZONE>_<YEAR>_hourly.csv.gz`` (Electricity Maps' free hourly
downloads, see ../shared/data/README.md). Each row is the mean intensity over the UTC hour starting at
``Datetime (UTC)``; the life-cycle (LCA) column is used because it is what Electricity Maps' API reports by default.
Rows whose value is blank are gaps (US-NW-PACW 2023 has 24) and are left out of the means; the files end lines with
LF or CRLF, which the CSV reader takes alike. The share of rows flagged ``Data Estimated`` is stored per zone, and
zones where most hours are Electricity Maps' model estimates rather than measurements are listed as such.

Output: a profile per zone: the mean of every hour falling in the same cell (month x hour of day, optionally split
into weekday/weekend), in UTC because the core looks profiles up in UTC (``carbonaware_core.profile_value``), then
blended with the same cell of the two neighbouring months (``--smoothing``, 0.25 each by default). The mean, not
the median: the planner minimises the *expected* mean intensity over the job, and the mean of a cell estimates that
expectation. Each zone also gets a minimum predicted saving below which the core does not wait (``min_savings``,
chosen by ``choose_min_saving`` on the zone's latest year with a profile of its earlier years), because a typical
day's small predicted savings often end dirtier than starting at once. The defaults (layout, smoothing, rounding)
are the ones bench/backtest.py found best on held-out years (docs/backtest.md); ``--kind month-weekpart-hour-utc
--shrink 10`` builds the weekday/weekend model measured there (a little more saving, more waits ending dirtier, twice
the file: not the default). The file is derived from ODbL data and must ship with DATA-LICENSE.md.

The building blocks are importable (the backtest trains its held-out models with them):
``load_zone_year``, ``build_profile``, ``build_model``, ``dump_model``.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data"
DEFAULT_OUT = ROOT / "carbonaware_offline.json"
DEFAULT_YEARS = (2021, 2022, 2023)  # the years of the original 19 zones; the build default is every year a zone has
# Zones without a file of their own whose profile another zone's stands in for, and why. Only where the other zone
# is the aggregate that contains them (Electricity Maps' "NO" is all of Norway: NO-NO1..NO-NO5), never a neighbour.
STAND_INS = {"NO-NO1": "NO", "NO-NO2": "NO"}
MOSTLY_ESTIMATED = 0.5  # a zone whose training hours are more than half model estimates is flagged as estimated
KINDS = ("month-hour-utc", "month-weekpart-hour-utc")
DEFAULT_KIND = "month-hour-utc"  # chosen by bench/backtest.py: see docs/backtest.md
DEFAULT_SMOOTHING = 0.25  # weight of each neighbouring month; chosen by bench/backtest.py
# weekpart layout only (``--kind month-weekpart-hour-utc --shrink 10``): measured, not the default (docs/backtest.md)
DEFAULT_SHRINK = 0.0
DEFAULT_SIGNIFICANT = 3  # significant figures kept: 53 KB for 40 zones instead of 72 KB at one decimal
UNIT = "gCO2eq/kWh"
LICENSE = "ODbL-1.0"
LICENSE_URL = "https://opendatacommons.org/licenses/odbl/1-0/"
TIME_COLUMN = "Datetime (UTC)"
ESTIMATED_COLUMN = "Data Estimated"
VALUE_MARKER = "LCA"  # the header reads "Carbon Intensity gCO₂eq/kWh (LCA)": match by substring, not by the "₂"

Row = tuple[datetime, float]


def zone_file(data_dir: Path, zone: str, year: int) -> Path:
    """Where the hourly file of one zone and year lives (the layout of shared/data)."""
    return data_dir / "electricitymaps_hourly" / zone / f"{zone}_{year}_hourly.csv.gz"


def available_zones(data_dir: Path) -> list[str]:
    """Zone keys that have at least one hourly file, sorted so every build lists them in the same order."""
    base = data_dir / "electricitymaps_hourly"
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir() if p.is_dir() and any(p.glob(f"{p.name}_*_hourly.csv.gz")))


def available_years(data_dir: Path, zone: str) -> list[int]:
    """Years with a file for ``zone``, sorted."""
    years = []
    for path in (data_dir / "electricitymaps_hourly" / zone).glob(f"{zone}_*_hourly.csv.gz"):
        middle = path.name[len(zone) + 1 : -len("_hourly.csv.gz")]
        if middle.isdigit():
            years.append(int(middle))
    return sorted(years)


@dataclass(frozen=True)
class ZoneYear:
    """One file read: the rows with a value, how many of them are flagged as estimates, how many were blank."""

    rows: list[Row]
    estimated: int = 0
    gaps: int = 0


def read_rows(text: str, where: str = "<csv>") -> ZoneYear:
    """Every row of one file. A blank value is a gap (skipped, counted); a bad time or a bad non-blank value
    raises: a build must be loud."""
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None:
        raise ValueError(f"{where}: empty file")
    try:
        time_index = header.index(TIME_COLUMN)
    except ValueError:
        raise ValueError(f"{where}: no {TIME_COLUMN!r} column in {header}") from None
    value_columns = [i for i, name in enumerate(header) if VALUE_MARKER in name]
    if len(value_columns) != 1:
        raise ValueError(f"{where}: expected one column containing {VALUE_MARKER!r}, found {len(value_columns)}")
    value_index = value_columns[0]
    estimated_index = header.index(ESTIMATED_COLUMN) if ESTIMATED_COLUMN in header else None
    rows: list[Row] = []
    estimated = gaps = 0
    for line, record in enumerate(reader, start=2):
        if not record:
            continue
        try:
            moment = datetime.strptime(record[time_index], "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc)
            text_value = record[value_index].strip()
            if not text_value:
                gaps += 1
                continue
            value = float(text_value)
        except (IndexError, ValueError) as exc:
            raise ValueError(f"{where}:{line}: {exc}") from None
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{where}:{line}: intensity {value!r} is not a finite non-negative number")
        rows.append((moment, value))
        if estimated_index is not None and record[estimated_index].strip().lower() == "true":
            estimated += 1
    return ZoneYear(rows, estimated, gaps)


def parse_rows(text: str, where: str = "<csv>") -> list[Row]:
    """(hour start in UTC, LCA intensity) for every row with a value."""
    return read_rows(text, where).rows


def read_zone_year(data_dir: Path, zone: str, year: int) -> ZoneYear:
    """One zone and year as read by ``read_rows``."""
    path = zone_file(data_dir, zone, year)
    with gzip.open(path, "rt", encoding="utf-8", newline="") as handle:
        return read_rows(handle.read(), str(path))


def load_zone_year(data_dir: Path, zone: str, year: int) -> list[Row]:
    """The hourly series of one zone and year, as (aware UTC hour start, gCO2eq/kWh) in file order, gaps left out."""
    return read_zone_year(data_dir, zone, year).rows


def cell_of(kind: str, moment: datetime) -> tuple[int, ...]:
    """Index path of the profile cell holding ``moment``: the same lookup as ``carbonaware_core.profile_value``."""
    utc = moment.astimezone(timezone.utc)
    if kind == "month-hour-utc":
        return (utc.month - 1, utc.hour)
    if kind == "month-weekpart-hour-utc":
        return (utc.month - 1, 1 if utc.weekday() >= 5 else 0, utc.hour)
    raise ValueError(f"unknown profile kind {kind!r}; expected one of {KINDS}")


def _shape(kind: str) -> tuple[int, ...]:
    return (12, 24) if kind == "month-hour-utc" else (12, 2, 24)


def _round(value: float, digits: int, significant: int | None = None) -> float | int:
    """Rounded for a small file; digits <= 0 gives integers (JSON ``123``, not ``123.0``). ``significant`` (when
    given, instead of ``digits``) keeps that many significant figures, at most as decimals: 3 keeps 687 and 23.4,
    a relative error under 0.5 % everywhere, where one decimal everywhere spends digits on 687.4 that no decision
    needs and integers everywhere would blur the 20-40 g of the hydro zones."""
    if significant is not None:
        magnitude = math.floor(math.log10(abs(value))) if value else 0
        digits = max(0, significant - 1 - magnitude)
    return round(value) if digits <= 0 else round(value, digits)


def build_profile(
    rows: Iterable[Row],
    kind: str,
    digits: int = 1,
    year_weights: Mapping[int, float] | None = None,
    smoothing: float = 0.0,
    significant: int | None = None,
    shrink: float = 0.0,
) -> list[Any]:
    """Nested lists (12 x 24, or 12 x 2 x 24) of the weighted mean intensity per cell.

    ``year_weights`` (year -> weight, default 1 for every year) lets the backtest try recency weighting; a year
    missing from it gets weight 0. ``smoothing`` is the weight given to each neighbouring month (December and
    January are neighbours), the cell's own month keeping 1 - 2 * smoothing: month edges are arbitrary and the
    daily pattern drifts smoothly with the season, so borrowing from neighbours trades a little seasonal bias for
    less noise (the backtest shows the gain). ``shrink`` (weekpart layout only) moves each weekday or weekend cell
    toward the pooled month x hour cell, keeping n / (n + shrink) of its difference, n the cell's hours: a weekend
    cell has only eight or nine hours a year, so its own mean is noisy and it borrows most (both smoothed alike
    first). Every cell must receive data, otherwise the lookup would answer a made-up number: a missing cell
    raises ValueError.
    """
    if not 0 <= smoothing < 0.5:
        raise ValueError(f"smoothing must be in [0, 0.5), got {smoothing!r}")
    if not (math.isfinite(shrink) and shrink >= 0) or (shrink and kind != "month-weekpart-hour-utc"):
        raise ValueError(f"shrink must be a finite number >= 0, for the weekpart layout only; got {shrink!r}")
    shape = _shape(kind)
    totals: dict[tuple[int, ...], list[float]] = {}
    weights: dict[tuple[int, ...], list[float]] = {}
    pooled_totals: dict[tuple[int, ...], list[float]] = {}
    pooled_weights: dict[tuple[int, ...], list[float]] = {}
    for moment, value in rows:
        weight = 1.0 if year_weights is None else float(year_weights.get(moment.astimezone(timezone.utc).year, 0.0))
        if weight <= 0:
            continue
        key = cell_of(kind, moment)
        totals.setdefault(key, []).append(weight * value)
        weights.setdefault(key, []).append(weight)
        if shrink:
            pooled = (key[0], key[-1])
            pooled_totals.setdefault(pooled, []).append(weight * value)
            pooled_weights.setdefault(pooled, []).append(weight)

    def mean_of(sums: dict[tuple[int, ...], list[float]], counts: dict[tuple[int, ...], list[float]]) -> Any:
        def mean(key: tuple[int, ...]) -> float:
            if key not in sums:
                raise ValueError(f"profile cell {key} of {kind} has no data")
            return math.fsum(sums[key]) / math.fsum(counts[key])

        def smoothed(key: tuple[int, ...]) -> float:
            if smoothing == 0:
                return mean(key)
            month, rest = key[0], key[1:]
            before, after = mean(((month - 1) % 12, *rest)), mean(((month + 1) % 12, *rest))
            return (1 - 2 * smoothing) * mean(key) + smoothing * (before + after)

        return smoothed

    own, pooled_cell = mean_of(totals, weights), mean_of(pooled_totals, pooled_weights)

    def cell_value(key: tuple[int, ...]) -> float:
        if not shrink:
            return float(own(key))
        if key not in totals:
            raise ValueError(f"profile cell {key} of {kind} has no data")
        hours = len(totals[key])
        centre = float(pooled_cell((key[0], key[-1])))
        return centre + hours / (hours + shrink) * (float(own(key)) - centre)

    def fill(prefix: tuple[int, ...]) -> list[Any]:
        if len(prefix) == len(shape) - 1:
            return [_round(cell_value((*prefix, last)), digits, significant) for last in range(shape[-1])]
        return [fill((*prefix, i)) for i in range(shape[len(prefix)])]

    return fill(())


def recency_weights(years: Sequence[int]) -> dict[int, float]:
    """Weight 2**k for the k-th oldest year: grids change (solar growth moves the daily trough), so a year counts
    as much as all older years together."""
    return {year: 2.0**k for k, year in enumerate(sorted(set(years)))}


# ---- per-zone minimum predicted saving: what the backtest knows about each zone's forecast error --------------

# (window, job) in hours: the backtest's configurations, pooled when a zone's threshold is chosen
THRESHOLD_CONFIGS = ((6.0, 1.0), (2.0, 0.5), (12.0, 4.0))
THRESHOLD_GRID = (0.0, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05)
SAVING_BUDGET = 0.01  # share of the perfect-forecast saving a zone's threshold may give up on its validation year
EVERY = 5  # every 5th hour of the validation year is a start ("now")
NEGLIGIBLE = 0.001  # carbonaware_core.NEGLIGIBLE_SAVINGS: the planner never waits for less

Outcome = tuple[float, float, float]  # (predicted saving, true saving of that choice, perfect-forecast saving)


def _core() -> Any:
    """The library's planner, imported from the repository root (the builder plans exactly as the library does)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import carbonaware_core

    return carbonaware_core


def _job_mean(prefix: Sequence[float], start: float, length: float) -> float:
    """Exact mean of an hourly step series (prefix sums) over [start, start + length], in hours from its origin."""

    def integral(x: float) -> float:
        k = min(max(math.floor(x), 0), len(prefix) - 2)
        return prefix[k] + (x - k) * (prefix[k + 1] - prefix[k])

    return (integral(start + length) - integral(start)) / length


def decision_outcomes(
    profile: Any,
    kind: str,
    truth: Sequence[Row],
    every: int = EVERY,
    configs: Sequence[tuple[float, float]] = THRESHOLD_CONFIGS,
) -> list[Outcome]:
    """Plan every ``every``-th hour of ``truth`` on ``profile`` (the offline forecast) with the library's planner,
    for each (window, job) of ``configs`` (in hours), and score the choice on the true series. Hours whose horizon
    meets a gap are skipped. The perfect-forecast saving is the planner's own answer on the true series (exact: the
    planner finds the lowest mean of a step series, tested against brute force in bench/backtest.py)."""
    return [outcome for _, _, outcome in decision_records(profile, kind, truth, every, configs)]


def decision_records(
    profile: Any,
    kind: str,
    truth: Sequence[Row],
    every: int = EVERY,
    configs: Sequence[tuple[float, float]] = THRESHOLD_CONFIGS,
) -> list[tuple[datetime, float, Outcome]]:
    """``decision_outcomes``, each with the moment it was planned at and the planned delay in hours (0 when it
    starts at once): a rule may depend on the hour of day or on how far ahead the forecast had to look."""
    core = _core()
    if not truth:
        return []
    origin = truth[0][0]
    index = {round((moment - origin).total_seconds() / 3600): value for moment, value in truth}
    count = max(index) + 1
    values = [index.get(k, math.nan) for k in range(count)]
    forecast = [core.profile_value(profile, kind, origin + k * (truth[1][0] - truth[0][0])) for k in range(count)]
    gaps = [k for k, v in enumerate(values) if math.isnan(v)]
    filled = [0.0 if math.isnan(v) else v for v in values]
    true_prefix, forecast_prefix = [0.0], [0.0]
    for a, b in zip(filled, forecast, strict=True):
        true_prefix.append(true_prefix[-1] + a)
        forecast_prefix.append(forecast_prefix[-1] + b)
    hours = [float(k) for k in range(count)]
    ends = [k + 1.0 for k in range(count)]
    step = truth[1][0] - truth[0][0] if len(truth) > 1 else timedelta(hours=1)
    outcomes: list[tuple[datetime, float, Outcome]] = []
    for window, job in configs:
        span = math.ceil(window + job)
        for now in range(0, count - span, every):
            if any(now <= g < now + span for g in gaps):
                continue
            cut = slice(now, now + span)
            planned = core.lowest_mean_start(hours[cut], ends[cut], forecast[cut], now, now + window, job)
            perfect = core.lowest_mean_start(hours[cut], ends[cut], filled[cut], now, now + window, job)
            at_once, predicted_at_once = _job_mean(true_prefix, now, job), _job_mean(forecast_prefix, now, job)
            predicted = (predicted_at_once - planned[1]) / predicted_at_once
            start = planned[0] if predicted >= NEGLIGIBLE else float(now)
            chosen = _job_mean(true_prefix, start, job)
            outcome = (predicted, (at_once - chosen) / at_once, (at_once - perfect[1]) / at_once)
            outcomes.append((origin + now * step, start - now, outcome))
    return outcomes


def threshold_effect(outcomes: Sequence[Outcome], threshold: float) -> tuple[float, float, int]:
    """With a minimum predicted saving: (share of the perfect-forecast saving kept, share of waits that ended
    dirtier than starting at once, number of waits)."""
    floor = max(threshold, NEGLIGIBLE)
    perfect = math.fsum(o[2] for o in outcomes)
    waits = [o[1] for o in outcomes if o[0] >= floor]
    kept = math.fsum(waits) / perfect if perfect > 0 else 0.0
    harmful = sum(1 for r in waits if r < 0) / len(waits) if waits else 0.0
    return kept, harmful, len(waits)


def choose_min_saving(
    outcomes: Sequence[Outcome], budget: float = SAVING_BUDGET, grid: Sequence[float] = THRESHOLD_GRID
) -> float:
    """The threshold on ``grid`` with the fewest harmful waits (share of waits ending dirtier) among those
    giving up at most ``budget`` of the perfect-forecast saving against no threshold; ties keep the lowest. Chosen
    per zone because forecast error differs per zone: where a typical day predicts well, a threshold costs saving
    and buys little; where it predicts badly, small predicted savings are mostly noise."""
    base = threshold_effect(outcomes, 0.0)[0]
    best, best_harm = 0.0, math.inf
    for threshold in grid:
        kept, harmful, _ = threshold_effect(outcomes, threshold)
        if base - kept <= budget + 1e-12 and harmful < best_harm - 1e-12:
            best, best_harm = threshold, harmful
    return best


def validated_min_saving(
    data_dir: Path,
    zone: str,
    validation_year: int,
    kind: str,
    smoothing: float,
    significant: int | None,
    shrink: float = DEFAULT_SHRINK,
) -> float | None:
    """A zone's threshold chosen on ``validation_year`` with a profile trained only on the zone's earlier years
    (never the other way); None when the zone has no earlier year."""
    earlier = [year for year in available_years(data_dir, zone) if year < validation_year]
    if not earlier:
        return None
    rows = [row for year in earlier for row in load_zone_year(data_dir, zone, year)]
    profile = build_profile(rows, kind, 1, smoothing=smoothing, significant=significant, shrink=shrink)
    return choose_min_saving(decision_outcomes(profile, kind, load_zone_year(data_dir, zone, validation_year)))


def default_min_saving(chosen: Mapping[str, float]) -> float:
    """For zones that cannot be validated (one year of data): the median of the validated zones' thresholds
    (the lower middle value for an even count, so the rule never invents a value off the grid)."""
    values = sorted(chosen.values())
    return values[(len(values) - 1) // 2] if values else 0.0


def attribution(years: Sequence[int]) -> str:
    """The credit ODbL requires, naming the years actually used."""
    span = f"{min(years)}-{max(years)}" if len(set(years)) > 1 else f"{years[0]}"
    return (
        f"Contains data from Electricity Maps (https://www.electricitymaps.com), {span} free hourly data, "
        "made available under the Open Database License (ODbL) v1.0"
    )


def zone_years(data_dir: Path, zone: str, years: Sequence[int] | None) -> list[int]:
    """The training years of one zone: every year it has, or those of ``years`` it has."""
    have = available_years(data_dir, zone)
    return have if years is None else [year for year in have if year in set(years)]


def build_model(
    data_dir: Path,
    zones: Sequence[str],
    years: Sequence[int] | None = None,
    kind: str = DEFAULT_KIND,
    digits: int = 1,
    smoothing: float = DEFAULT_SMOOTHING,
    significant: int | None = DEFAULT_SIGNIFICANT,
    min_savings: bool = True,
    shrink: float = DEFAULT_SHRINK,
) -> dict[str, Any]:
    """The whole document the core reads (``carbonaware_core.offline_model``), one profile per zone.

    ``years=None`` trains each zone on every year it has; a list restricts each zone to the listed years it has.
    A zone left with no year raises (a build names exactly what it ships). ``min_savings`` adds each zone's
    validated minimum predicted saving (``choose_min_saving``), which the core applies to offline plans."""
    if kind not in KINDS:
        raise ValueError(f"unknown profile kind {kind!r}; expected one of {KINDS}")
    if not zones or (years is not None and not years):
        raise ValueError("need at least one zone and one year")
    profiles = {}
    info: dict[str, dict[str, Any]] = {}
    for zone in sorted(set(zones)):
        chosen = zone_years(data_dir, zone, years)
        if not chosen:
            raise ValueError(f"{zone}: no hourly file for the years {sorted(set(years or ()))}")
        read = [read_zone_year(data_dir, zone, year) for year in chosen]
        rows = [row for part in read for row in part.rows]
        profiles[zone] = build_profile(rows, kind, digits, smoothing=smoothing, significant=significant, shrink=shrink)
        estimated = sum(part.estimated for part in read) / len(rows)
        info[zone] = {"years": chosen, "estimated_share": round(estimated, 3), "gap_hours": sum(p.gaps for p in read)}
    used = sorted({year for zone_info in info.values() for year in zone_info["years"]})
    validated = {}
    if min_savings:
        for zone, zone_info in info.items():
            found = validated_min_saving(data_dir, zone, zone_info["years"][-1], kind, smoothing, significant, shrink)
            if found is not None:
                validated[zone] = found
    statistic = "mean of each UTC cell over the zone's training years"
    if smoothing:
        statistic += f", blended with the same cell of each neighbouring month at weight {smoothing:g}"
    if shrink:
        statistic += f", each weekday/weekend cell shrunk toward the pooled cell by n/(n+{shrink:g}), n its hours"
    document: dict[str, Any] = {
        "format": 1,
        "kind": kind,
        "unit": UNIT,
        "signal": "life-cycle (LCA), consumption-based (flow-traced) hourly carbon intensity",
        "statistic": statistic,
        "month_smoothing": smoothing,
        "rounding": f"{significant} significant figures" if significant is not None else f"{digits} decimals",
        "license": LICENSE,
        "license_url": LICENSE_URL,
        "attribution": attribution(used),
        "notice": "See DATA-LICENSE.md: this file is ODbL-1.0, the code is Apache-2.0",
        "built_by": "scripts/build_offline_model.py",
        "training_years": used,
        "zone_info": info,
        "estimated_zones": sorted(z for z, i in info.items() if i["estimated_share"] > MOSTLY_ESTIMATED),
        "zones": profiles,
        "stand_ins": {
            zone: whole for zone, whole in sorted(STAND_INS.items()) if whole in profiles and zone not in profiles
        },
    }
    if min_savings:
        document["min_savings"] = {
            "by_zone": validated,
            "default": default_min_saving(validated),
            "rule": (
                "per zone, the minimum predicted saving with the fewest waits ending dirtier than starting at once, "
                f"giving up at most {SAVING_BUDGET:.0%} of the perfect-forecast saving, chosen on the zone's latest "
                "year with a profile of its earlier years (scripts/build_offline_model.py choose_min_saving); "
                "default: the median, for zones with one year"
            ),
        }
    return document


def dump_model(model: Mapping[str, Any]) -> str:
    """Compact, key-sorted JSON: the same inputs always give the same bytes."""
    return json.dumps(model, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False) + "\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="shared data folder (default %(default)s)")
    parser.add_argument("--years", type=int, nargs="+", help="training years (default: every year each zone has)")
    parser.add_argument("--zones", nargs="+", help="zone keys (default: every zone in the data)")
    parser.add_argument("--kind", choices=KINDS, default=DEFAULT_KIND, help="profile layout (default %(default)s)")
    parser.add_argument(
        "--significant", type=int, default=DEFAULT_SIGNIFICANT, help="significant figures kept (default %(default)s)"
    )
    parser.add_argument("--digits", type=int, help="decimals kept instead; 0 writes integers")
    parser.add_argument(
        "--smoothing", type=float, default=DEFAULT_SMOOTHING, help="weight of each neighbouring month (default 0.25)"
    )
    parser.add_argument(
        "--shrink", type=float, default=DEFAULT_SHRINK, help="weekpart layout: shrinkage toward the pooled cell"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output file (default %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    zones = args.zones or available_zones(args.data)
    if not zones:
        print(f"no zones found under {args.data / 'electricitymaps_hourly'}", file=sys.stderr)
        return 1
    try:
        significant = None if args.digits is not None else args.significant
        digits = 1 if args.digits is None else args.digits
        model = build_model(
            args.data, zones, args.years, args.kind, digits, args.smoothing, significant, shrink=args.shrink
        )
    except (OSError, ValueError) as exc:
        print(f"build failed: {exc}", file=sys.stderr)
        return 1
    text = dump_model(model)
    args.out.write_text(text, encoding="ascii", newline="\n")
    years = model["training_years"]
    print(f"wrote {args.out} ({len(text.encode())} bytes, {len(zones)} zones, {args.kind}, years {years})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
