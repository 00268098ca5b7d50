"""What a minimum predicted saving can and cannot do for the offline model (issue 9 item 8).

One command from a clean clone (stdlib only, plus the core and the model builder of this repository):

    python bench/thresholds.py [--data ../shared/data] [--every 5] [--target 0.10] [--markdown]

The question: can a threshold on the predicted saving (below it, start at once: the planner's ``below-threshold``)
bring the share of waits that end dirtier than starting at once down to ``--target`` while giving up at most one
point of the captured saving? Same protocol as bench/backtest.py: each zone's latest year is held out, the profile is
the shipped variant trained on the years before it, every ``--every``-th hour is a start, the planner is the
library's, the share is the summed saving over the summed perfect-forecast saving of the zones where it exceeds 5 %,
harmful waits are pooled over every scored zone. Rules, per (window, job):

- none: no minimum (the planner's 0.1 % rule only);
- per zone (shipped rule): ``build_offline_model.choose_min_saving`` on the year before the held-out year with a
  profile of the years before that, the median for zones without such a year (what bench/backtest.py calls
  "min/zone");
- uniform t: one minimum for every zone;
- hindsight: per-zone minimums chosen on the HELD-OUT year itself, separately for each (window, job), greedily
  (each step raises the one zone's minimum that removes the most harmful-wait share per point of saving given up)
  until the harmful share reaches the target. It sees the answers, so no rule chosen on other years can be
  expected to do better: its cost is a floor on what the target costs with thresholds on this forecast.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _path in (str(ROOT), str(ROOT / "scripts")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import build_offline_model as bom  # noqa: E402 - after the path set-up on purpose

SHARE_THRESHOLD = 0.05  # zones where the perfect forecast saves more than this enter the share (as bench/backtest)
GRID = (0.0, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.15)
UNIFORM = (0.01, 0.02, 0.03, 0.04, 0.05)


@dataclass(frozen=True)
class ZoneOutcomes:
    """One zone's decisions on its held-out year, one list per configuration, and its validated minimum."""

    zone: str
    year: int
    by_config: tuple[tuple[bom.Outcome, ...], ...]
    validated: float | None


@dataclass(frozen=True)
class Effect:
    """A rule's outcome on one zone and configuration: the saving kept (summed over the starts), the perfect
    forecast's, the number of waits, how many of them ended dirtier, and the number of starts."""

    kept: float
    perfect: float
    waits: int
    harmful: int
    starts: int = 1

    @property
    def strong(self) -> bool:
        """Whether the zone enters the share: its perfect forecast saves more than 5 % on average."""
        return self.perfect / self.starts > SHARE_THRESHOLD


def effect(outcomes: Sequence[bom.Outcome], minimum: float) -> Effect:
    """What a minimum predicted saving does to one zone's decisions (below it and below 0.1 %: start at once)."""
    floor = max(minimum, bom.NEGLIGIBLE)
    waits = [true for predicted, true, _ in outcomes if predicted >= floor]
    return Effect(
        math.fsum(waits),
        math.fsum(o[2] for o in outcomes),
        len(waits),
        sum(1 for true in waits if true < 0),
        max(1, len(outcomes)),
    )


@dataclass(frozen=True)
class Pooled:
    """Over the zones: share of the summed perfect saving (zones where it exceeds 5 %), harmful share of waits."""

    share: float
    harmful: float
    waits: int


def pooled(effects: Sequence[Effect]) -> Pooled:
    strong = [e for e in effects if e.strong]
    perfect = math.fsum(e.perfect for e in strong)
    waits = sum(e.waits for e in effects)
    return Pooled(
        math.fsum(e.kept for e in strong) / perfect if perfect else 0.0,
        sum(e.harmful for e in effects) / waits if waits else 0.0,
        waits,
    )


def hindsight_minimums(
    outcomes: Mapping[str, Sequence[bom.Outcome]], target: float, grid: Sequence[float] = GRID
) -> dict[str, float]:
    """Per-zone minimums on ``grid`` that bring the pooled harmful share to ``target`` at a small loss of saving,
    chosen greedily on the very decisions they are scored on: each step raises the one zone's minimum with the
    largest drop of the harmful share per point of share given up. Stops at the target, or when no raise lowers
    the harmful share."""
    table = {zone: [effect(found, t) for t in grid] for zone, found in outcomes.items()}
    level = dict.fromkeys(outcomes, 0)

    def state(levels: Mapping[str, int]) -> Pooled:
        return pooled([table[zone][index] for zone, index in levels.items()])

    current = state(level)
    while current.harmful > target:
        best: tuple[float, str, int, Pooled] | None = None
        for zone in outcomes:
            for index in range(level[zone] + 1, len(grid)):
                trial = state({**level, zone: index})
                gain = current.harmful - trial.harmful
                if gain <= 0:
                    continue
                score = gain / max(current.share - trial.share, 1e-9)
                if best is None or score > best[0]:
                    best = (score, zone, index, trial)
        if best is None:
            break
        _, zone, index, current = best
        level[zone] = index
    return {zone: grid[index] for zone, index in level.items()}


def zone_outcomes(args: tuple[Path, str, int]) -> ZoneOutcomes | None:
    """The held-out decisions of one zone (None when it has no year before its latest)."""
    data_dir, zone, every = args
    years = bom.available_years(data_dir, zone)
    if len(years) < 2:
        return None
    test, earlier = years[-1], years[:-1]
    rows = [row for year in earlier for row in bom.load_zone_year(data_dir, zone, year)]
    kind, smoothing, significant = bom.DEFAULT_KIND, bom.DEFAULT_SMOOTHING, bom.DEFAULT_SIGNIFICANT
    profile = bom.build_profile(rows, kind, 1, smoothing=smoothing, significant=significant)
    truth = bom.load_zone_year(data_dir, zone, test)
    by_config = tuple(
        tuple(bom.decision_outcomes(profile, kind, truth, every, configs=(config,))) for config in bom.THRESHOLD_CONFIGS
    )
    validated = bom.validated_min_saving(data_dir, zone, earlier[-1], kind, smoothing, significant)
    return ZoneOutcomes(zone, test, by_config, validated)


def _label(config: tuple[float, float]) -> str:
    def hours(h: float) -> str:
        return f"{h:g} h" if h >= 1 else f"{h * 60:g} min"

    return f"window {hours(config[0])}, job {hours(config[1])}"


def _cell(e: Effect) -> str:
    share = f"{100 * e.kept / e.perfect:.1f}" if e.perfect > 0 else "-"
    harmful = f"{100 * e.harmful / e.waits:.0f}" if e.waits else "-"
    return f"{share}; {harmful}"


def report(found: Sequence[ZoneOutcomes], target: float, markdown: bool) -> list[str]:
    """Per configuration: a row per zone (share of its perfect saving %; harmful waits %) for no minimum, the
    shipped rule and the hindsight minimums, then the pooled figures of every rule."""
    validated = {z.zone: z.validated for z in found if z.validated is not None}
    default = bom.default_min_saving(validated)
    shipped = {z.zone: validated.get(z.zone, default) for z in found}
    lines: list[str] = []
    for index, config in enumerate(bom.THRESHOLD_CONFIGS):
        by_zone = {z.zone: z.by_config[index] for z in found}
        hindsight = hindsight_minimums(by_zone, target)
        rules: dict[str, dict[str, float]] = {
            "none": dict.fromkeys(by_zone, 0.0),
            "per zone (shipped)": shipped,
            **{f"uniform {100 * t:g} %": dict.fromkeys(by_zone, t) for t in UNIFORM},
            f"hindsight to {100 * target:g} %": hindsight,
        }
        results = {name: pooled([effect(by_zone[z], m[z]) for z in by_zone]) for name, m in rules.items()}
        base = results["none"].share
        lines += ["", f"{'### ' if markdown else '== '}{_label(config)}", ""]
        header = ["zone", "year", "perfect %", "none", "per zone (shipped)", "min", "hindsight", "min"]
        rows = []
        for z in sorted(found, key=lambda z: z.zone):
            outcomes = by_zone[z.zone]
            none = effect(outcomes, 0.0)
            rows.append(
                [
                    z.zone,
                    str(z.year),
                    f"{100 * none.perfect / none.starts:.1f}",
                    _cell(none),
                    _cell(effect(outcomes, shipped[z.zone])),
                    f"{100 * shipped[z.zone]:g}",
                    _cell(effect(outcomes, hindsight[z.zone])),
                    f"{100 * hindsight[z.zone]:g}",
                ]
            )
        lines += _render(header, rows, markdown)
        lines.append("")
        summary = [
            [name, f"{100 * r.share:.1f}", f"{100 * (r.share - base):+.1f}", f"{100 * r.harmful:.1f}", str(r.waits)]
            for name, r in results.items()
        ]
        lines += _render(
            ["rule", "share of perfect saving %", "vs none, points", "harmful waits %", "waits"], summary, markdown
        )
    return lines


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=bom.DEFAULT_DATA, help="shared data folder (default %(default)s)")
    parser.add_argument("--every", type=int, default=bom.EVERY, help="score every n-th hour (default %(default)s)")
    parser.add_argument("--target", type=float, default=0.10, help="harmful share to reach (default %(default)s)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes (default 2)")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    zones = bom.available_zones(args.data)
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        found = [z for z in pool.map(zone_outcomes, [(args.data, zone, args.every) for zone in zones]) if z]
    if not found:
        print(f"no zone under {args.data} has a year before its latest", file=sys.stderr)
        return 1
    command = " ".join(argv if argv is not None else sys.argv[1:])
    out = [
        f"{'## ' if args.markdown else ''}Minimum predicted saving: what thresholds can do (held-out latest year)",
        "",
        f"- command: python bench/thresholds.py {command}".rstrip(),
        f"- zones scored: {len(found)}; cells: share of the zone's perfect saving %; harmful waits % of its waits",
    ]
    out += report(found, args.target, args.markdown)
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
