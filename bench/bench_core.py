"""Micro-benchmarks of the core, each against a baseline measured in the same run.

    python bench/bench_core.py [--markdown] [--quick]

Stdlib and ``carbonaware_core`` only; about half a minute. Every number is the median of many runs. Rows:

- import: ``python -I -S`` importing ``carbonaware_core`` minus the same interpreter doing nothing, next to the floor
  the module cannot avoid (``dataclasses, logging, datetime``) and ``-X importtime``'s cumulative figure;
- zone detection when nothing answers (a refused port, a port that accepts and never answers), each in a fresh
  process because the result is cached per process, against a stdlib replica of carbonaware-prefect 0.1.3's
  algorithm: one GET per cloud, one after the other, 0.5 s timeout each;
- the planner on a 7-day, 5-minute series (2016 points; a 2 h job; a 6-day window), against a fixed-step
  brute-force scan that averages by summing -- both must find the same start, and the planner must be no slower
  (issue 11);
- the same for 20 zones (20 such series, as a multi-zone plan reads them): from ForecastPoints to each zone's best
  start (``_series_arrays`` + ``lowest_mean_start`` per zone) in under 20 ms, and the planner alone on arrays, each
  against the brute force over the same 20 series;
- a whole ``plan_delay`` on the offline source with a 1-year and a 100-year window (the source is asked for a year
  of hourly starts at most), best of 5, against the same plan with the default 6 h window.

Only 127.0.0.1 is contacted. ``ratio`` is ours / baseline: below 1 means ours is faster.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

from _common import (  # noqa: E402
    REPO_ROOT,
    Table,
    clean_env,
    fmt_ratio,
    fmt_seconds,
    machine_summary,
    median_of,
    run_python,
)

import carbonaware_core as core  # noqa: E402 - the repository root is put on sys.path just above
from tests.loopback import black_hole, refused_host  # noqa: E402

IMPORT_TARGET = 0.015
DETECT_TARGET = 0.3
PLANNER_TARGET = 0.005
ZONES = 20
ZONES_TARGET = 0.020  # issue 11: 20 zones x a 7-day 5-minute series in under 20 ms
OFFLINE_PLAN_TARGET = 0.05  # issue 8 item 8: planning stays under 50 ms for every accepted window
ORIGINAL_PROBE_TIMEOUT = 0.5  # carbonaware-prefect 0.1.3, introspection.py: httpx.get(..., timeout=0.5) per cloud


@dataclass(frozen=True)
class Row:
    """One line of the result table; ``target`` None means the row is context, not a pass/fail check."""

    metric: str
    ours: float
    baseline: float | None
    target: float | None
    baseline_label: str = ""
    strict: bool = True  # the target is "< target"; False: "<= target"
    max_ratio: float | None = None  # also a check: ours / baseline at most this

    @property
    def passed(self) -> bool:
        if self.max_ratio is not None and self.baseline and self.ours / self.baseline > self.max_ratio:
            return False
        if self.target is None:
            return True
        return self.ours < self.target if self.strict else self.ours <= self.target

    def cells(self) -> tuple[str, ...]:
        checked = self.target is not None or self.max_ratio is not None
        verdict = "pass" if self.passed else "FAIL"
        target = "-" if self.target is None else f"{'<' if self.strict else '<='} {fmt_seconds(self.target)}"
        if self.max_ratio is not None:
            ratio = f"ratio <= {self.max_ratio:g}"
            target = ratio if self.target is None else f"{target}, {ratio}"
        if not checked:
            verdict = "-"
        baseline = fmt_seconds(self.baseline) if self.baseline is not None else "-"
        if self.baseline_label:
            baseline = f"{baseline} ({self.baseline_label})"
        return (self.metric, fmt_seconds(self.ours), baseline, fmt_ratio(self.ours, self.baseline), target, verdict)


# ----------------------------------------------------------------------------------------------------------------
# Import time
# ----------------------------------------------------------------------------------------------------------------

# ``python -I`` leaves the working directory off sys.path (3.11+), so every variant inserts the repository
# itself: the baseline pays for that insert too, and the difference is the import alone.
_PATH_SETUP = f"import sys; sys.path.insert(0, {str(REPO_ROOT)!r})"


def _startup(statement: str) -> list[str]:
    return ["-I", "-S", "-c", f"{_PATH_SETUP}; {statement}" if statement else _PATH_SETUP]


def measure_imports(runs: int) -> dict[str, float]:
    """Median wall time of interpreter start alone, with the core imported, and with the unavoidable floor.

    The three variants are interleaved so drift (frequency scaling, a neighbour) hits them alike.
    """
    variants = {
        "pass": "",
        "core": "import carbonaware_core",
        "floor": "import dataclasses, logging, datetime",
        "floor_no_dataclasses": "import logging, datetime",
    }
    env = clean_env()
    for statement in variants.values():  # warm the page cache and write the .pyc files
        run_python(sys.executable, _startup(statement), env)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(runs):
        for name, statement in variants.items():
            samples[name].append(_time_process([sys.executable, *_startup(statement)], env))
    return {name: median_of(values) for name, values in samples.items()}


def _time_process(command: Sequence[str], env: dict[str, str]) -> float:
    import subprocess

    started = time.perf_counter()
    subprocess.run(list(command), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def importtime_cumulative(runs: int) -> float:
    """Median of ``-X importtime``'s cumulative microseconds for carbonaware_core, in seconds."""
    values = []
    for _ in range(runs):
        done = run_python(sys.executable, ["-X", "importtime", *_startup("import carbonaware_core")], clean_env())
        for line in done.stderr.splitlines():
            fields = [part.strip() for part in line.split("|")]
            if len(fields) == 3 and fields[2] == "carbonaware_core":
                values.append(int(fields[1]) / 1e6)
    return median_of(values)


# ----------------------------------------------------------------------------------------------------------------
# Zone detection when nothing answers
# ----------------------------------------------------------------------------------------------------------------

_OURS_DETECT = f"""
{_PATH_SETUP}
import time
if sys.argv[1:] == ["preload"]:
    import urllib.request  # already loaded in most real processes (Prefect, requests, ...)
import carbonaware_core
started = time.perf_counter()
zone = carbonaware_core.detect_cloud_zone()
print(time.perf_counter() - started, zone)
"""

# A stdlib replica of carbonaware-prefect 0.1.3's detect_cloud_zone(): AWS, then Azure, then GCP, one after the
# other, each ``httpx.get(..., timeout=0.5)`` where any exception moves on to the next cloud. The real package
# hard-codes 169.254.169.254 and metadata.google.internal; here every probe goes to the same loopback host as
# ours does. bench/compare.py runs the real package, inside a loopback-only network namespace.
_ORIGINAL_DETECT = """
import sys, time, urllib.request
host, timeout = sys.argv[1], float(sys.argv[2])
probes = [
    ("/latest/meta-data/placement/availability-zone", {}),
    ("/metadata/instance/compute/location?api-version=2021-02-01", {"Metadata": "true"}),
    ("/computeMetadata/v1/instance/zone", {"Metadata-Flavor": "Google"}),
]
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
started = time.perf_counter()
zone = None
for path, headers in probes:
    try:
        zone = opener.open(urllib.request.Request(f"http://{host}{path}", headers=headers), timeout=timeout).read()
        break
    except Exception:
        pass
print(time.perf_counter() - started, zone)
"""


def _detect_once(code: str, host: str, args: Sequence[str] = ()) -> float:
    """Seconds the child spent detecting (its own clock, so interpreter start-up is not counted)."""
    env = clean_env({"CARBONAWARE_METADATA_HOST": host})
    done = run_python(sys.executable, ["-I", "-S", "-c", code, *args], env, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"detection child failed: {done.stderr.strip()[-400:]}")
    seconds, _, zone = done.stdout.strip().partition(" ")
    if zone not in ("None", ""):
        raise RuntimeError(f"detection found a zone where nothing answers: {zone}")
    return float(seconds)


def _with_host(kind: str, measure: Callable[[str], float]) -> float:
    """Run one measurement against a fresh refused port or a fresh black hole (a full accept queue would change
    how the black hole fails)."""
    if kind == "refused":
        return measure(refused_host())
    with black_hole() as host:
        return measure(host)


def measure_detection(kind: str, runs_ours: int, runs_original: int) -> tuple[float, float, float]:
    """(ours, ours with urllib.request already imported, the 0.1.3 replica): medians over fresh processes.

    Ours imports urllib.request lazily, inside the timed call; the replica imports it before its clock starts,
    as 0.1.3 imports httpx at package import. The middle figure removes that difference.
    """
    ours = [_with_host(kind, lambda host: _detect_once(_OURS_DETECT, host)) for _ in range(runs_ours)]
    preloaded = [_with_host(kind, lambda host: _detect_once(_OURS_DETECT, host, ["preload"])) for _ in range(runs_ours)]
    original = [
        _with_host(kind, lambda host: _detect_once(_ORIGINAL_DETECT, host, [host, str(ORIGINAL_PROBE_TIMEOUT)]))
        for _ in range(runs_original)
    ]
    return median_of(ours), median_of(preloaded), median_of(original)


# ----------------------------------------------------------------------------------------------------------------
# Planner
# ----------------------------------------------------------------------------------------------------------------

STEP = timedelta(minutes=5)
POINTS = 7 * 24 * 12  # 2016
JOB = timedelta(hours=2)
WINDOW = timedelta(days=6)
SERIES_START = datetime(2025, 6, 2, tzinfo=timezone.utc)


def synthetic_series(seed: int = 7, phase: float = 0.0) -> tuple[core.ForecastPoint, ...]:
    """A week of 5-minute values shaped like a grid: a daily cycle, a slower weather swing and noise; ``phase``
    (hours) shifts the daily cycle, as for a zone in another time zone."""
    rng = random.Random(seed)
    points = []
    for i in range(POINTS):
        hours = i / 12
        value = 320 + 140 * math.sin(2 * math.pi * (hours + phase) / 24) + 60 * math.sin(2 * math.pi * hours / 84)
        start = SERIES_START + i * STEP
        points.append(core.ForecastPoint(start, start + STEP, max(5.0, value + rng.gauss(0, 25))))
    return tuple(points)


def brute_force_grid(values: Sequence[float], job_steps: int, candidates: int) -> tuple[int, float]:
    """The common approach: try every grid start, average the job's points by summing. Returns (index, mean)."""
    best_index, best_mean = 0, math.inf
    for k in range(candidates):
        mean = sum(values[k : k + job_steps]) / job_steps
        if mean < best_mean:
            best_index, best_mean = k, mean
    return best_index, best_mean


def brute_force_points(points: Sequence[core.ForecastPoint], job_steps: int, candidates: int) -> tuple[int, float]:
    """The same scan fed ForecastPoints (sorted by start first, as choose_start must do)."""
    values = [p.value for p in sorted(points, key=lambda p: p.start)]
    return brute_force_grid(values, job_steps, candidates)


def _median_time(fn: Callable[[], object], runs: int) -> float:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return median_of(samples)


@dataclass(frozen=True)
class PlannerResult:
    choose: float
    lowest: float
    brute_points: float
    brute_floats: float
    same_answer: bool


def measure_planner(runs: int) -> PlannerResult:
    points = synthetic_series()
    t0 = SERIES_START.timestamp()
    starts = [p.start.timestamp() for p in points]
    ends = [p.end.timestamp() for p in points]
    values = [p.value for p in points]
    job_steps, candidates = int(JOB / STEP), int(WINDOW / STEP) + 1
    latest, length = t0 + WINDOW.total_seconds(), JOB.total_seconds()

    choice = core.choose_start(points, SERIES_START, WINDOW, JOB)
    exact = core.lowest_mean_start(starts, ends, values, t0, latest, length)
    index, mean = brute_force_grid(values, job_steps, candidates)
    same = (
        exact is not None
        and math.isclose(exact[0], t0 + index * STEP.total_seconds())
        and math.isclose(exact[1], mean, rel_tol=1e-9)
        and math.isclose(choice.start, exact[0])
    )
    return PlannerResult(
        choose=_median_time(lambda: core.choose_start(points, SERIES_START, WINDOW, JOB), runs),
        lowest=_median_time(lambda: core.lowest_mean_start(starts, ends, values, t0, latest, length), runs),
        brute_points=_median_time(lambda: brute_force_points(points, job_steps, candidates), runs),
        brute_floats=_median_time(lambda: brute_force_grid(values, job_steps, candidates), runs),
        same_answer=same,
    )


@dataclass(frozen=True)
class ZonesResult:
    from_points: float
    on_arrays: float
    brute_points: float
    brute_floats: float
    same_answer: bool


def measure_zones(runs: int) -> ZonesResult:
    """20 zones: each zone's best start over its own series, as a multi-zone plan asks (once per zone)."""
    zones = [synthetic_series(seed=100 + zone, phase=zone * 24 / ZONES) for zone in range(ZONES)]
    t0 = SERIES_START.timestamp()
    latest, length = t0 + WINDOW.total_seconds(), JOB.total_seconds()
    job_steps, candidates = int(JOB / STEP), int(WINDOW / STEP) + 1
    arrays = [core._series_arrays(points, t0) for points in zones]

    def from_points() -> list[tuple[float, float] | None]:
        """What the joint plan does once the series are in: the allowed starts, each zone's best, the best zone."""
        intervals = core.feasible_starts(t0, latest, (), None, length)
        found = []
        for points in zones:
            starts, ends, values = core._series_arrays(points, t0)
            found.append(core.lowest_mean_start_within(starts, ends, values, intervals, length))
        assert core.best_place(found) is not None
        return found

    def on_arrays() -> list[tuple[float, float] | None]:
        return [core.lowest_mean_start(s, e, v, t0, latest, length) for s, e, v in arrays]

    def brute_points() -> list[tuple[int, float]]:
        return [brute_force_points(points, job_steps, candidates) for points in zones]

    def brute_floats() -> list[tuple[int, float]]:
        return [brute_force_grid(values, job_steps, candidates) for _, _, values in arrays]

    exact, brute = from_points(), brute_points()
    same = exact == on_arrays() and all(
        found is not None
        and math.isclose(found[0], t0 + index * STEP.total_seconds())
        and math.isclose(found[1], mean, rel_tol=1e-9)
        for found, (index, mean) in zip(exact, brute, strict=True)
    )
    return ZonesResult(
        from_points=_median_time(from_points, runs),
        on_arrays=_median_time(on_arrays, runs),
        brute_points=_median_time(brute_points, runs),
        brute_floats=_median_time(brute_floats, runs),
        same_answer=same,
    )


def _best_time(fn: Callable[[], object], runs: int) -> float:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return min(samples)


def measure_offline_plans(runs: int) -> dict[str, float]:
    """Seconds for a whole offline plan (aws:us-east-1, 1 h job) by window: best of ``runs``."""
    now = datetime(2025, 3, 4, 12, 7, 13, tzinfo=timezone.utc)
    windows = {"6h": timedelta(hours=6), "1y": timedelta(days=365), "100y": timedelta(days=36_525)}

    def plan(window: timedelta) -> core.Plan:
        return core.plan_delay(
            window=window, duration=timedelta(hours=1), provider="aws", region="us-east-1", source="offline", now=now
        )

    return {name: _best_time(lambda window=window: plan(window), runs) for name, window in windows.items()}


# ----------------------------------------------------------------------------------------------------------------
# Reading a large series: start-only points with jittered timestamps (what a url: or file: source may serve)
# ----------------------------------------------------------------------------------------------------------------

LARGE_POINTS = 65_000  # about 3.4 MB of JSON, just under the 4 MB body cap


def jittered_document(seed: int = 11) -> list[dict[str, object]]:
    """Five-minute points, each timestamp off by up to half a second: every gap between them is different."""
    rng = random.Random(seed)
    moments = (SERIES_START + i * STEP + timedelta(seconds=rng.uniform(0, 0.5)) for i in range(LARGE_POINTS))
    return [{"start": moment.isoformat(), "value": 300.0} for moment in moments]


def measure_large_series(runs: int) -> tuple[float, float]:
    """(parse_series_document, the date parsing alone that any reader must do): medians."""
    document = jittered_document()
    ours = _median_time(lambda: core.parse_series_document(document), runs)
    floor = _median_time(lambda: [core.parse_datetime(str(row["start"])) for row in document], runs)
    return ours, floor


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def collect(quick: bool) -> tuple[list[Row], list[str]]:
    scale = 3 if quick else 1
    imports = measure_imports(runs=45 // scale)
    cumulative = importtime_cumulative(runs=15 // scale)
    refused = measure_detection("refused", runs_ours=11 // scale, runs_original=7 // scale)
    holed = measure_detection("black-hole", runs_ours=9 // scale, runs_original=5 // scale)
    planner = measure_planner(runs=60 // scale)
    zones = measure_zones(runs=31 // scale)  # each run is short: more of them keep the median steady
    large, large_floor = measure_large_series(runs=5 if not quick else 3)
    offline = measure_offline_plans(runs=5)
    net = {name: seconds - imports["pass"] for name, seconds in imports.items()}
    floor = net["floor"]
    replica = "0.1.3 replica"
    brute = "brute force"
    rows = [
        Row("import carbonaware_core (net of start-up)", net["core"], floor, IMPORT_TARGET, "floor"),
        Row("↳ floor: import dataclasses, logging, datetime", floor, None, None),
        Row("↳ without dataclasses: import logging, datetime", net["floor_no_dataclasses"], None, None),
        Row("↳ -X importtime cumulative, carbonaware_core", cumulative, None, None),
        Row("↳ interpreter start-up (-I -S, nothing imported)", imports["pass"], None, None),
        Row("zone detection, metadata port refused", refused[0], refused[2], DETECT_TARGET, replica, False),
        Row("↳ same, urllib.request already imported", refused[1], refused[2], DETECT_TARGET, replica, False),
        Row("zone detection, metadata port black-holed", holed[0], holed[2], DETECT_TARGET, replica, False),
        Row("↳ same, urllib.request already imported", holed[1], holed[2], DETECT_TARGET, replica, False),
        Row("choose_start, 2016 ForecastPoints", planner.choose, planner.brute_points, PLANNER_TARGET, brute, True, 1),
        Row("lowest_mean_start, 2016 floats", planner.lowest, planner.brute_floats, PLANNER_TARGET, brute, True, 1),
        Row(
            f"{ZONES} zones, ForecastPoints to best starts", zones.from_points, zones.brute_points, ZONES_TARGET, brute
        ),
        Row(f"↳ {ZONES} zones, lowest_mean_start on arrays", zones.on_arrays, zones.brute_floats, None, brute, True, 1),
        Row(f"read a {LARGE_POINTS:,}-point jittered series", large, large_floor, None, "parsing its dates"),
        Row("plan_delay offline, 1-year window", offline["1y"], offline["6h"], OFFLINE_PLAN_TARGET, "6 h window"),
        Row("plan_delay offline, 100-year window", offline["100y"], offline["6h"], OFFLINE_PLAN_TARGET, "6 h window"),
    ]
    notes = [
        f"planner: exact optimum equals the 5-minute brute-force optimum: {'yes' if planner.same_answer else 'NO'}; "
        f"for each of {ZONES} zones: {'yes' if zones.same_answer else 'NO'}",
        "baselines: 'floor' = the stdlib modules the core cannot avoid; '0.1.3 replica' = carbonaware-prefect "
        "0.1.3's detection algorithm (AWS, Azure, GCP probed one after another, 0.5 s timeout each) re-created "
        "with urllib against the same loopback port -- bench/compare.py runs the real package in a network "
        "namespace; 'brute force' = every 5-minute start, mean by summing the job's points.",
        "ratio = ours / baseline (below 1: ours is faster). Detection times are measured inside a fresh process "
        "(start-up excluded); import times are whole-process medians.",
    ]
    return rows, notes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", action="store_true", help="print a GitHub markdown table")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke test, noisier)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    rows, notes = collect(args.quick)
    table = Table(("metric", "ours", "baseline", "ratio", "target", "result"), tuple(row.cells() for row in rows))
    print(f"bench_core -- {machine_summary()}")
    print()
    print(table.markdown() if args.markdown else table.text())
    print()
    for note in notes:
        print(f"- {note}" if args.markdown else note)
    print(f"{'- ' if args.markdown else ''}bench_core took {time.perf_counter() - started:.0f} s")
    return 0 if all(row.passed for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
