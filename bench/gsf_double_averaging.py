"""What averaging the Carbon Aware SDK's rolling means a second time cost, measured on real grid data.

Asked with ``windowSize=<job>``, the SDK answers rolling means over the job (one per data tick, each lasting the job;
EmissionsDataExtensions.RollingAverage in Green-Software-Foundation/carbon-aware-sdk). Before issue 9 the library
planned over those as if they were the forecast, i.e. averaged them again. This replays both paths with the
library's own planner on Electricity Maps' hourly data (treated as a perfect hourly forecast, as the SDK would serve
it), every 5th hour of a year:

- raw: the ticks themselves (what the library asks for now) -- the exact optimum;
- rolled: the SDK's rolling means up to ``dataEndAt`` = now + window + job (rounded up to the hour), planned over.

Reported per zone: how often the start differs, the saving each path reports, and the saving the rolled path's
start really achieves. Usage: ``python bench/gsf_double_averaging.py [--window-hours 12] [--job-hours 3]``.
Data: ../shared/data/electricitymaps_hourly (ODbL, Electricity Maps).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import carbonaware_core as core  # noqa: E402

DATA = REPO_ROOT.parent / "shared" / "data" / "electricitymaps_hourly"
HOUR = timedelta(hours=1)


def hourly(zone: str, year: int) -> tuple[datetime, list[float]]:
    path = DATA / zone / f"{zone}_{year}_hourly.csv.gz"
    with gzip.open(path, "rt", encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(io.StringIO(handle.read())))
    column = next(name for name in rows[0] if "LCA" in name)
    first = datetime.fromisoformat(rows[0]["Datetime (UTC)"]).replace(tzinfo=timezone.utc)
    return first, [float(row[column]) if row[column] else float("nan") for row in rows]


def rolled(values: list[float], start: int, count: int, hours: int) -> list[tuple[int, float]]:
    """(tick, mean over [tick, tick + hours)) for ``count`` ticks from ``start``: the SDK's rolling means."""
    return [(i, sum(values[i : i + hours]) / hours) for i in range(start, start + count)]


def mean(values: list[float], start: int, hours: int) -> float:
    return sum(values[start : start + hours]) / hours


def measure(zone: str, year: int, window_h: int, job_h: int) -> dict[str, float]:
    first, values = hourly(zone, year)
    window, job = window_h * HOUR, job_h * HOUR
    differs = decisions = 0
    said_raw = said_rolled = got_rolled = worst = 0.0
    for now_index in range(0, len(values) - window_h - 2 * job_h - 1, 5):
        if any(v != v for v in values[now_index : now_index + window_h + 2 * job_h]):  # NaN: a gap in the data
            continue
        now = first + now_index * HOUR
        raw_points = [
            core.ForecastPoint(first + i * HOUR, first + (i + 1) * HOUR, values[i])
            for i in range(now_index, now_index + window_h + job_h)
        ]
        exact = core.choose_start(raw_points, now, window, job)
        # the SDK's answer to windowSize=job, dataEndAt=now+window+job: means that end by dataEndAt
        means = rolled(values, now_index, window_h + 1, job_h)
        rows = [(first + i * HOUR, value, job) for i, value in means]
        old = core.choose_start(core.series_from_starts(rows), now, window, job)
        old_start = round((old.start - now.timestamp()) / 3600) + now_index
        now_value = mean(values, now_index, job_h)
        decisions += 1
        differs += round(old.start) != round(exact.start)
        exact_saving = (exact.now_value - exact.expected) / exact.now_value
        rolled_saving = (old.now_value - old.expected) / old.now_value
        said_raw += exact_saving
        said_rolled += rolled_saving
        worst = max(worst, exact_saving - rolled_saving)
        got_rolled += (now_value - mean(values, old_start, job_h)) / now_value
    return {
        "decisions": decisions,
        "start differs": differs / decisions,
        "saving (exact)": said_raw / decisions,
        "saving reported (rolled)": said_rolled / decisions,
        "saving achieved (rolled)": got_rolled / decisions,
        "worst understatement": worst,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window-hours", type=int, default=12)
    parser.add_argument("--job-hours", type=int, default=3)
    parser.add_argument("--year", type=int, default=2023)
    parser.add_argument("zones", nargs="*", default=["DE", "GB", "ES", "US-CAL-CISO", "US-TEX-ERCO"])
    args = parser.parse_args()
    print(f"window {args.window_hours} h, job {args.job_hours} h, every 5th hour of {args.year}")
    header = f"{'zone':<14}{'n':>6}{'start differs':>15}{'exact':>9}{'rolled says':>13}{'rolled gets':>13}"
    print(header + f"{'worst under':>13}")
    for zone in args.zones:
        row = measure(zone, args.year, args.window_hours, args.job_hours)
        print(
            f"{zone:<14}{row['decisions']:>6.0f}{row['start differs']:>15.1%}{row['saving (exact)']:>9.1%}"
            f"{row['saving reported (rolled)']:>13.1%}{row['saving achieved (rolled)']:>13.1%}"
            f"{100 * row['worst understatement']:>10.1f} pt"
        )


if __name__ == "__main__":
    main()
