"""Build ``carbonaware_offline.json``: typical hourly carbon intensity by grid zone, for ``source="offline"``.

Run from the repository root (stdlib only):

    python scripts/build_offline_model.py [--data ../shared/data] [--years 2021 2022 2023]
        [--kind month-hour-utc|month-weekpart-hour-utc] [--digits 1] [--smoothing 0.25]
        [--out carbonaware_offline.json]

Input: ``<data>/electricitymaps_hourly/<ZONE>/<ZONE>_<YEAR>_hourly.csv.gz`` (Electricity Maps' free hourly
downloads, see ../shared/data/README.md). Each row is the mean intensity over the UTC hour starting at
``Datetime (UTC)``; the life-cycle (LCA) column is used because it is what Electricity Maps' API reports by default.

Output: a profile per zone: the mean of every hour falling in the same cell (month x hour of day, optionally split
into weekday/weekend), in UTC because the core looks profiles up in UTC (``carbonaware_core.profile_value``), then
blended with the same cell of the two neighbouring months (``--smoothing``, 0.25 each by default). The mean, not
the median: the planner minimises the *expected* mean intensity over the job, and the mean of a cell estimates that
expectation. The defaults (layout, smoothing, rounding) are the ones bench/backtest.py found best on held-out years
(docs/backtest.md). The file is derived from ODbL data and must ship with DATA-LICENSE.md.

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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data"
DEFAULT_OUT = ROOT / "carbonaware_offline.json"
DEFAULT_YEARS = (2021, 2022, 2023)
KINDS = ("month-hour-utc", "month-weekpart-hour-utc")
DEFAULT_KIND = "month-hour-utc"  # chosen by bench/backtest.py: see docs/backtest.md
DEFAULT_SMOOTHING = 0.25  # weight of each neighbouring month; chosen by bench/backtest.py
UNIT = "gCO2eq/kWh"
LICENSE = "ODbL-1.0"
LICENSE_URL = "https://opendatacommons.org/licenses/odbl/1-0/"
TIME_COLUMN = "Datetime (UTC)"
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


def parse_rows(text: str, where: str = "<csv>") -> list[Row]:
    """(hour start in UTC, LCA intensity) for every row; a bad time or value raises: a build must be loud."""
    reader = csv.reader(io.StringIO(text))
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
    rows: list[Row] = []
    for line, record in enumerate(reader, start=2):
        if not record:
            continue
        try:
            moment = datetime.strptime(record[time_index], "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc)
            value = float(record[value_index])
        except (IndexError, ValueError) as exc:
            raise ValueError(f"{where}:{line}: {exc}") from None
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{where}:{line}: intensity {value!r} is not a finite non-negative number")
        rows.append((moment, value))
    return rows


def load_zone_year(data_dir: Path, zone: str, year: int) -> list[Row]:
    """The hourly series of one zone and year, as (aware UTC hour start, gCO2eq/kWh) in file order."""
    path = zone_file(data_dir, zone, year)
    with gzip.open(path, "rt", encoding="utf-8", newline="") as handle:
        return parse_rows(handle.read(), str(path))


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


def _round(value: float, digits: int) -> float | int:
    """Rounded for a small file; digits <= 0 gives integers (JSON ``123``, not ``123.0``)."""
    return round(value) if digits <= 0 else round(value, digits)


def build_profile(
    rows: Iterable[Row],
    kind: str,
    digits: int = 1,
    year_weights: Mapping[int, float] | None = None,
    smoothing: float = 0.0,
) -> list[Any]:
    """Nested lists (12 x 24, or 12 x 2 x 24) of the weighted mean intensity per cell.

    ``year_weights`` (year -> weight, default 1 for every year) lets the backtest try recency weighting; a year
    missing from it gets weight 0. ``smoothing`` is the weight given to each neighbouring month (December and
    January are neighbours), the cell's own month keeping 1 - 2 * smoothing: month edges are arbitrary and the
    daily pattern drifts smoothly with the season, so borrowing from neighbours trades a little seasonal bias for
    less noise (the backtest shows the gain). Every cell must receive data, otherwise the lookup would answer a
    made-up number: a missing cell raises ValueError.
    """
    if not 0 <= smoothing < 0.5:
        raise ValueError(f"smoothing must be in [0, 0.5), got {smoothing!r}")
    shape = _shape(kind)
    totals: dict[tuple[int, ...], list[float]] = {}
    weights: dict[tuple[int, ...], list[float]] = {}
    for moment, value in rows:
        weight = 1.0 if year_weights is None else float(year_weights.get(moment.astimezone(timezone.utc).year, 0.0))
        if weight <= 0:
            continue
        key = cell_of(kind, moment)
        totals.setdefault(key, []).append(weight * value)
        weights.setdefault(key, []).append(weight)

    def mean(key: tuple[int, ...]) -> float:
        if key not in totals:
            raise ValueError(f"profile cell {key} of {kind} has no data")
        return math.fsum(totals[key]) / math.fsum(weights[key])

    def smoothed(key: tuple[int, ...]) -> float:
        if smoothing == 0:
            return mean(key)
        month, rest = key[0], key[1:]
        before, after = mean(((month - 1) % 12, *rest)), mean(((month + 1) % 12, *rest))
        return (1 - 2 * smoothing) * mean(key) + smoothing * (before + after)

    def fill(prefix: tuple[int, ...]) -> list[Any]:
        if len(prefix) == len(shape) - 1:
            return [_round(smoothed((*prefix, last)), digits) for last in range(shape[-1])]
        return [fill((*prefix, i)) for i in range(shape[len(prefix)])]

    return fill(())


def recency_weights(years: Sequence[int]) -> dict[int, float]:
    """Weight 2**k for the k-th oldest year: grids change (solar growth moves the daily trough), so a year counts
    as much as all older years together."""
    return {year: 2.0**k for k, year in enumerate(sorted(set(years)))}


def attribution(years: Sequence[int]) -> str:
    """The credit ODbL requires, naming the years actually used."""
    span = f"{min(years)}-{max(years)}" if len(set(years)) > 1 else f"{years[0]}"
    return (
        f"Contains data from Electricity Maps (https://www.electricitymaps.com), {span} free hourly data, "
        "made available under the Open Database License (ODbL) v1.0"
    )


def build_model(
    data_dir: Path,
    zones: Sequence[str],
    years: Sequence[int],
    kind: str = DEFAULT_KIND,
    digits: int = 1,
    smoothing: float = DEFAULT_SMOOTHING,
) -> dict[str, Any]:
    """The whole document the core reads (``carbonaware_core.offline_model``), one profile per zone."""
    if kind not in KINDS:
        raise ValueError(f"unknown profile kind {kind!r}; expected one of {KINDS}")
    if not zones or not years:
        raise ValueError("need at least one zone and one year")
    profiles = {}
    for zone in sorted(set(zones)):
        rows = [row for year in sorted(set(years)) for row in load_zone_year(data_dir, zone, year)]
        profiles[zone] = build_profile(rows, kind, digits, smoothing=smoothing)
    statistic = "mean of each UTC cell over the training years"
    if smoothing:
        statistic += f", blended with the same cell of each neighbouring month at weight {smoothing:g}"
    return {
        "format": 1,
        "kind": kind,
        "unit": UNIT,
        "signal": "life-cycle (LCA), consumption-based (flow-traced) hourly carbon intensity",
        "statistic": statistic,
        "month_smoothing": smoothing,
        "license": LICENSE,
        "license_url": LICENSE_URL,
        "attribution": attribution(sorted(set(years))),
        "notice": "See DATA-LICENSE.md: this file is ODbL-1.0, the code is Apache-2.0",
        "built_by": "scripts/build_offline_model.py",
        "training_years": sorted(set(years)),
        "zones": profiles,
    }


def dump_model(model: Mapping[str, Any]) -> str:
    """Compact, key-sorted JSON: the same inputs always give the same bytes."""
    return json.dumps(model, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False) + "\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="shared data folder (default %(default)s)")
    parser.add_argument("--years", type=int, nargs="+", default=list(DEFAULT_YEARS), help="training years")
    parser.add_argument("--zones", nargs="+", help="zone keys (default: every zone in the data)")
    parser.add_argument("--kind", choices=KINDS, default=DEFAULT_KIND, help="profile layout (default %(default)s)")
    parser.add_argument("--digits", type=int, default=1, help="decimals kept; 0 writes integers (default 1)")
    parser.add_argument(
        "--smoothing", type=float, default=DEFAULT_SMOOTHING, help="weight of each neighbouring month (default 0.25)"
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
        model = build_model(args.data, zones, args.years, args.kind, args.digits, args.smoothing)
    except (OSError, ValueError) as exc:
        print(f"build failed: {exc}", file=sys.stderr)
        return 1
    text = dump_model(model)
    args.out.write_text(text, encoding="ascii", newline="\n")
    print(f"wrote {args.out} ({len(text.encode())} bytes, {len(zones)} zones, {args.kind}, years {args.years})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
