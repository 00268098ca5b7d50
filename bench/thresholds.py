"""What a minimum predicted saving can and cannot do for the offline model (issue 9 item 8).

One command from a clean clone (stdlib only, plus the core and the model builder of this repository):

    python bench/thresholds.py [--data ../shared/data] [--every 5] [--target 0.10] [--markdown]
        [--kind month-weekpart-hour-utc --shrink 10]   # the same for another profile layout the builder makes

The question: can a threshold on the predicted saving (below it, start at once: the planner's ``below-threshold``)
bring the share of waits that end dirtier than starting at once down to ``--target`` while giving up at most one
point of the captured saving? Same protocol as bench/backtest.py: each zone's latest year is held out, the profile is
the shipped variant trained on the years before it, every ``--every``-th hour is a start, the planner is the
library's, the share is the summed saving over the summed perfect-forecast saving of the zones where it exceeds 5 %,
harmful waits are pooled over every scored zone. Rules, per (window, job):

- none: no minimum (the planner's 0.1 % rule only);
- per zone (shipped): ``build_offline_model.choose_min_saving`` on the year before the held-out year with a profile
  of the years before that, the median for zones without such a year (bench/backtest.py's "min/zone");
- uniform t: one minimum for every zone;
- per zone, in units of the error's spread: wait only when the predicted saving reaches z times the spread
  (standard deviation) of the profile's relative error between now and the planned start, measured on the
  profile's own training years for that delay (``error_spread``); z per zone chosen like the shipped rule on the
  year before the held-out year (fewest harmful waits within 1 % of the zone's saving);
- to target on validation, per zone or per zone x 6 h of the day (UTC, of "now"): minimums chosen by the greedy
  search below on the year before the held-out year (profile of the years before that), per (window, job), then
  applied to the held-out year; units without a validation year get the median;
- per zone, two profiles agree (``agreeing``): wait only when the profile AND a second profile of the same training
  years in the other layout (weekday/weekend with shrinkage ``PARTNER_SHRINK`` for the shipped month x hour one,
  month x hour for the weekpart one) both predict a saving of at least the minimum at the planned start, each
  against its own "start at once"; the minimum per zone chosen like the shipped rule on the year before (the 1 %
  budget counted against the planner with no minimum: ``choose_against_none``);
- per zone, the chance of harm against the predicted saving, to target on validation (``harm_scored``): for each
  wait, q = the share of the training years' days (same UTC hour, the month and its two neighbours) on which
  starting at the planned delay was dirtier than starting at once, counted on the true series; wait only when
  predicted saving / max(q - ``HARM_TAU``, 0.001) reaches a level (on ``HARM_GRID``) chosen per zone by the greedy
  search below on the year before the held-out year: waits that are often wrong about the sign go first unless
  their predicted saving is large;
- hindsight, per zone or per zone x 6 h of the day: the same greedy search on the HELD-OUT year itself. It sees the
  answers, so a rule chosen on other years cannot be expected to do better: its cost bounds from below what the
  target costs with such thresholds on this forecast.

The greedy search (``hindsight_minimums``) raises, step by step, the one unit's minimum that removes the most
harmful-wait share per point of saving given up, until the target is reached or no raise lowers the harm.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parent.parent
for _path in (str(ROOT), str(ROOT / "scripts")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import build_offline_model as bom  # noqa: E402 - after the path set-up on purpose

SHARE_THRESHOLD = 0.05  # zones where the perfect forecast saves more than this enter the share (as bench/backtest)
GRID = (0.0, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.15)
UNIFORM = (0.01, 0.02, 0.03, 0.04, 0.05)
BLOCK_HOURS = 6  # "per zone x 6 h of the day": four blocks of UTC hours

Record = tuple[datetime, float, bom.Outcome]  # planned at, planned delay (hours), outcome
SPREAD_GRID = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0)  # z: multiples of the error's spread
MAX_LAG = 12  # hours: the longest delay of the configurations
HARM_TAU = 0.10  # harm chances below this cost nothing in the harm-scored rule
HARM_GRID = (0.0, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0)
PARTNER_SHRINK = 10.0  # the weekpart partner of the agreement rule: docs/backtest.md's mwh-s-3sf-k10
Unit = TypeVar("Unit", bound=Hashable)


@dataclass(frozen=True)
class ZoneOutcomes:
    """One zone's decisions, one tuple per configuration: on its held-out year and (when it has one) on the year
    before, each with a profile of the years before it; its shipped-rule minimum; the same decisions with the
    predicted saving in units of the error's spread, and the z chosen on them; the same decisions scored for the
    agreement rule (``agreeing``), and the minimum chosen on them; the same decisions scored by their chance of harm
    (``harm_scored``)."""

    zone: str
    year: int
    test: tuple[tuple[Record, ...], ...]
    validation: tuple[tuple[Record, ...], ...] | None
    validated: float | None
    test_scaled: tuple[tuple[Record, ...], ...]
    validation_scaled: tuple[tuple[Record, ...], ...] | None
    spread_minimum: float | None
    test_agreed: tuple[tuple[Record, ...], ...] = ()
    validation_agreed: tuple[tuple[Record, ...], ...] | None = None
    agreed_minimum: float | None = None
    test_harm: tuple[tuple[Record, ...], ...] = ()
    validation_harm: tuple[tuple[Record, ...], ...] | None = None


@dataclass(frozen=True)
class Effect:
    """A rule's outcome on one unit (a zone, or part of one): saving kept and perfect saving (summed over the
    starts), the number of waits, how many ended dirtier, and whether the unit's zone enters the share."""

    kept: float
    perfect: float
    waits: int
    harmful: int
    strong: bool


def is_strong(outcomes: Sequence[bom.Outcome]) -> bool:
    """Whether a zone enters the share: its perfect forecast saves more than 5 % on average."""
    return bool(outcomes) and math.fsum(o[2] for o in outcomes) / len(outcomes) > SHARE_THRESHOLD


def effect(outcomes: Sequence[bom.Outcome], minimum: float, strong: bool | None = None) -> Effect:
    """What a minimum predicted saving does to a unit's decisions (below it and below 0.1 %: start at once);
    ``strong`` defaults to the unit's own average (pass the zone's for a part of a zone)."""
    floor = max(minimum, bom.NEGLIGIBLE)
    waits = [true for predicted, true, _ in outcomes if predicted >= floor]
    return Effect(
        math.fsum(waits),
        math.fsum(o[2] for o in outcomes),
        len(waits),
        sum(1 for true in waits if true < 0),
        is_strong(outcomes) if strong is None else strong,
    )


@dataclass(frozen=True)
class Pooled:
    """Over the units: share of the summed perfect saving (zones where it exceeds 5 %), harmful share of waits."""

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
    outcomes: Mapping[Unit, Sequence[bom.Outcome]],
    target: float,
    grid: Sequence[float] = GRID,
    strong: Mapping[Unit, bool] | None = None,
) -> dict[Unit, float]:
    """Per-unit minimums on ``grid`` that bring the pooled harmful share to ``target`` at a small loss of saving,
    chosen greedily on the decisions given: each step raises the one unit's minimum with the largest drop of the
    harmful share per point of share given up. Stops at the target, or when no raise lowers the harmful share.
    ``strong`` says which units count in the share (default: each unit's own average)."""
    table = {
        unit: [effect(found, t, None if strong is None else strong[unit]) for t in grid]
        for unit, found in outcomes.items()
    }
    level = dict.fromkeys(outcomes, 0)

    def state(levels: Mapping[Unit, int]) -> Pooled:
        return pooled([table[unit][index] for unit, index in levels.items()])

    current = state(level)
    while current.harmful > target:
        best: tuple[float, Unit, int, Pooled] | None = None
        for unit in outcomes:
            for index in range(level[unit] + 1, len(grid)):
                trial = state({**level, unit: index})
                gain = current.harmful - trial.harmful
                if gain <= 0:
                    continue
                score = gain / max(current.share - trial.share, 1e-9)
                if best is None or score > best[0]:
                    best = (score, unit, index, trial)
        if best is None:
            break
        _, unit, index, current = best
        level[unit] = index
    return {unit: grid[index] for unit, index in level.items()}


def error_spread(profile: object, kind: str, rows: Sequence[bom.Row], max_lag: int = MAX_LAG) -> list[float]:
    """For each delay d = 0..max_lag hours, the standard deviation of e(t + d) - e(t) over the rows, e being the
    profile's relative error (truth / profile - 1): how uncertain a predicted difference between now and d hours
    later is. Errors persist (weather lasts), so it grows with d; index 0 is 0."""
    core = bom._core()
    hourly = {moment: value / core.profile_value(profile, kind, moment) - 1 for moment, value in rows}
    spread = [0.0]
    for lag in range(1, max_lag + 1):
        diffs = [hourly[m + timedelta(hours=lag)] - e for m, e in hourly.items() if m + timedelta(hours=lag) in hourly]
        mean = math.fsum(diffs) / len(diffs)
        spread.append(math.sqrt(math.fsum((x - mean) ** 2 for x in diffs) / len(diffs)))
    return spread


def in_spread_units(records: Sequence[Record], spread: Sequence[float]) -> tuple[Record, ...]:
    """The records with each predicted saving divided by the spread at its planned delay (rounded up to whole
    hours); a decision to start at once keeps predicted 0."""
    scaled = []
    for moment, delay, (predicted, true, perfect) in records:
        lag = min(max(1, math.ceil(delay - 1e-9)), len(spread) - 1)
        value = predicted / spread[lag] if predicted >= bom.NEGLIGIBLE and spread[lag] > 0 else 0.0
        scaled.append((moment, delay, (value, true, perfect)))
    return tuple(scaled)


def profile_job_mean(profile: object, kind: str, start: datetime, length: float) -> float:
    """Mean of the profile's hourly steps over [start, start + length hours] (start at any minute)."""
    core = bom._core()
    total, moment, end = 0.0, start, start + timedelta(hours=length)
    while moment < end:
        following = min(moment.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1), end)
        total += core.profile_value(profile, kind, moment) * (following - moment).total_seconds()
        moment = following
    return total / (end - start).total_seconds()


def agreeing(records: Sequence[Record], partner: object, kind: str, job: float) -> tuple[Record, ...]:
    """The records with each wait's predicted saving replaced by the lower of it and the saving ``partner`` (a
    second profile, layout ``kind``) predicts at the same planned start against its own "start at once": a minimum
    on the result waits only when both forecasts reach it. Decisions to start at once are kept as they are."""
    agreed = []
    for moment, delay, (predicted, true, perfect) in records:
        if predicted >= bom.NEGLIGIBLE and delay > 0:
            now = profile_job_mean(partner, kind, moment, job)
            later = profile_job_mean(partner, kind, moment + timedelta(hours=delay), job)
            predicted = min(predicted, (now - later) / now)
        agreed.append((moment, delay, (predicted, true, perfect)))
    return tuple(agreed)


def choose_against_none(
    plain: Sequence[bom.Outcome], rescored: Sequence[bom.Outcome], grid: Sequence[float] = bom.THRESHOLD_GRID
) -> float:
    """``build_offline_model.choose_min_saving`` for a rule that rescored the planner's decisions (``rescored``,
    the same decisions in the same order as ``plain``): the minimum with the fewest harmful waits among those
    giving up at most ``SAVING_BUDGET`` of the perfect saving against the planner with no minimum (``plain``),
    not against the rescored rule with no minimum; ties keep the lowest."""
    base = bom.threshold_effect(plain, 0.0)[0]
    best, best_harm = 0.0, math.inf
    for threshold in grid:
        kept, harmful, _ = bom.threshold_effect(rescored, threshold)
        if base - kept <= bom.SAVING_BUDGET + 1e-12 and harmful < best_harm - 1e-12:
            best, best_harm = threshold, harmful
    return best


class LaterCleaner:
    """On a true series (the training years' rows): how often starting a job ``delay`` hours later than at a UTC
    hour was cleaner than starting at that hour, over the days of a month and its two neighbours."""

    def __init__(self, rows: Sequence[bom.Row]) -> None:
        self.origin = rows[0][0] if rows else datetime(2000, 1, 1, tzinfo=timezone.utc)
        index = {round((moment - self.origin).total_seconds() / 3600): value for moment, value in rows}
        self.count = max(index) + 1 if index else 0
        self.prefix, self.gaps = [0.0], [0]
        for k in range(self.count):
            value = index.get(k)
            self.prefix.append(self.prefix[-1] + (value or 0.0))
            self.gaps.append(self.gaps[-1] + (value is None))
        self.years = sorted({moment.year for moment, _ in rows})
        self.cache: dict[tuple[int, int, float, float], tuple[int, int]] = {}

    def _mean(self, start: float, length: float) -> float | None:
        lo, hi = math.floor(start), math.ceil(start + length)
        if lo < 0 or hi > self.count or self.gaps[hi] - self.gaps[lo]:
            return None
        return float(bom._job_mean(self.prefix, start, length))

    def counts(self, month: int, hour: int, delay: float, job: float) -> tuple[int, int]:
        """(days on which the later start was cleaner, days counted)."""
        key = (month, hour, delay, job)
        if key not in self.cache:
            later = total = 0
            for year in self.years:
                for shift in (-1, 0, 1):
                    wanted = (month - 1 + shift) % 12 + 1
                    day = datetime(year, wanted, 1, hour, tzinfo=timezone.utc)
                    while day.month == wanted:
                        start = (day - self.origin).total_seconds() / 3600
                        now, then = self._mean(start, job), self._mean(start + delay, job)
                        if now is not None and then is not None:
                            total += 1
                            later += then < now
                        day += timedelta(days=1)
            self.cache[key] = (later, total)
        return self.cache[key]


def harm_scored(records: Sequence[Record], table: LaterCleaner, job: float) -> tuple[Record, ...]:
    """The records with each wait's predicted saving divided by max(q - HARM_TAU, 0.001), q the share of the
    training days on which that delay was dirtier (1 when no day counts); decisions to start at once keep theirs."""
    scored = []
    for moment, delay, (predicted, true, perfect) in records:
        if predicted >= bom.NEGLIGIBLE and delay > 0:
            later, total = table.counts(moment.month, moment.hour, delay, job)
            harm = 1 - later / total if total else 1.0
            predicted = predicted / max(harm - HARM_TAU, 0.001)
        scored.append((moment, delay, (predicted, true, perfect)))
    return tuple(scored)


def partner_of(kind: str) -> tuple[str, float]:
    """The second profile of the agreement rule, layout and shrinkage: the other layout (weekpart with
    ``PARTNER_SHRINK``)."""
    if kind == "month-hour-utc":
        return "month-weekpart-hour-utc", PARTNER_SHRINK
    return "month-hour-utc", 0.0


def zone_outcomes(args: tuple[Path, str, int, str, float]) -> ZoneOutcomes | None:
    """The decisions of one zone (None when it has no year before its latest), with the builder's profile of
    layout ``kind`` and weekpart shrinkage ``shrink`` (its other settings as shipped)."""
    data_dir, zone, every, kind, shrink = args
    years = bom.available_years(data_dir, zone)
    if len(years) < 2:
        return None
    smoothing, significant = bom.DEFAULT_SMOOTHING, bom.DEFAULT_SIGNIFICANT
    loaded = {year: bom.load_zone_year(data_dir, zone, year) for year in years}

    Parts = tuple[tuple[Record, ...], ...]

    def records(test: int) -> tuple[Parts, Parts, Parts, Parts]:
        rows = [row for year in years if year < test for row in loaded[year]]
        profile = bom.build_profile(rows, kind, 1, smoothing=smoothing, significant=significant, shrink=shrink)
        other, other_shrink = partner_of(kind)
        partner = bom.build_profile(rows, other, 1, smoothing=smoothing, significant=significant, shrink=other_shrink)
        spread = error_spread(profile, kind, rows)
        plain = tuple(
            tuple(bom.decision_records(profile, kind, loaded[test], every, configs=(config,)))
            for config in bom.THRESHOLD_CONFIGS
        )
        agreed = tuple(
            agreeing(part, partner, other, job) for part, (_, job) in zip(plain, bom.THRESHOLD_CONFIGS, strict=True)
        )
        table = LaterCleaner(rows)
        harm = tuple(harm_scored(part, table, job) for part, (_, job) in zip(plain, bom.THRESHOLD_CONFIGS, strict=True))
        return plain, tuple(in_spread_units(part, spread) for part in plain), agreed, harm

    def pooled_configs(parts: Parts) -> list[bom.Outcome]:
        return [outcome for part in parts for _, _, outcome in part]

    validated = bom.validated_min_saving(data_dir, zone, years[-2], kind, smoothing, significant, shrink)
    test, test_scaled, test_agreed, test_harm = records(years[-1])
    validation, validation_scaled, spread_minimum = None, None, None
    validation_agreed, agreed_minimum, validation_harm = None, None, None
    if len(years) > 2:
        validation, validation_scaled, validation_agreed, validation_harm = records(years[-2])
        spread_minimum = bom.choose_min_saving(pooled_configs(validation_scaled), grid=SPREAD_GRID)
        agreed_minimum = choose_against_none(pooled_configs(validation), pooled_configs(validation_agreed))
    return ZoneOutcomes(
        zone,
        years[-1],
        test,
        validation,
        validated,
        test_scaled,
        validation_scaled,
        spread_minimum,
        test_agreed,
        validation_agreed,
        agreed_minimum,
        test_harm,
        validation_harm,
    )


def by_zone(records: Sequence[Record]) -> list[bom.Outcome]:
    return [outcome for _, _, outcome in records]


def block_of(moment: datetime) -> int:
    return moment.hour // BLOCK_HOURS


def by_block(zone: str, records: Sequence[Record]) -> dict[tuple[str, int], list[bom.Outcome]]:
    """A zone's decisions split by the block of the day (UTC) of the moment they were planned at."""
    split: dict[tuple[str, int], list[bom.Outcome]] = {(zone, b): [] for b in range(24 // BLOCK_HOURS)}
    for moment, _, outcome in records:
        split[(zone, block_of(moment))].append(outcome)
    return split


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2] if ordered else 0.0


# key "zone@block" -> minimum; which decisions it applies to: "plain" the planner's, "spread" in units of the
# error's spread, "agree" the agreement rule's (``agreeing``), "harm" scored by harm (``harm_scored``)
Rule = tuple[Callable[[str], float], str]


def rules_for_config(found: Sequence[ZoneOutcomes], index: int, target: float) -> dict[str, Rule]:
    """Every rule for one configuration: a function of "zone@block" giving the minimum, and which decisions it
    applies to (see ``Rule``)."""
    validated = {z.zone: z.validated for z in found if z.validated is not None}
    default = bom.default_min_saving(validated)
    test = {z.zone: by_zone(z.test[index]) for z in found}
    strong = {zone: is_strong(outcomes) for zone, outcomes in test.items()}
    with_validation = [z for z in found if z.validation is not None]
    val_zone = {z.zone: by_zone(z.validation[index]) for z in with_validation if z.validation}
    val_strong = {zone: is_strong(outcomes) for zone, outcomes in val_zone.items()}
    val_blocks = {
        k: v for z in with_validation if z.validation for k, v in by_block(z.zone, z.validation[index]).items()
    }
    test_blocks = {k: v for z in found for k, v in by_block(z.zone, z.test[index]).items()}
    chosen_zone = hindsight_minimums(val_zone, target, strong=val_strong)
    chosen_block = hindsight_minimums(val_blocks, target, strong={k: val_strong[k[0]] for k in val_blocks})
    seen_zone = hindsight_minimums(test, target, strong=strong)
    seen_block = hindsight_minimums(test_blocks, target, strong={k: strong[k[0]] for k in test_blocks})
    zone_default, block_default = _median(list(chosen_zone.values())), _median(list(chosen_block.values()))
    val_harm = {z.zone: by_zone(z.validation_harm[index]) for z in with_validation if z.validation_harm}
    chosen_harm = hindsight_minimums(val_harm, target, grid=HARM_GRID, strong=val_strong)
    harm_default = _median(list(chosen_harm.values()))
    spread = {z.zone: z.spread_minimum for z in found if z.spread_minimum is not None}
    spread_default = bom.default_min_saving(spread)
    agreed = {z.zone: z.agreed_minimum for z in found if z.agreed_minimum is not None}
    agreed_default = bom.default_min_saving(agreed)
    return {
        "none": (_constant(0.0), "plain"),
        "per zone (shipped)": (lambda key: validated.get(key.split("@")[0], default), "plain"),
        **{f"uniform {100 * t:g} %": (_constant(t), "plain") for t in UNIFORM},
        "per zone, in units of the error's spread": (
            lambda key: spread.get(key.split("@")[0], spread_default),
            "spread",
        ),
        "per zone, both layouts agree": (lambda key: agreed.get(key.split("@")[0], agreed_default), "agree"),
        f"per zone, to {100 * target:g} % on validation": (
            lambda key: chosen_zone.get(key.split("@")[0], zone_default),
            "plain",
        ),
        f"per zone, chance of harm, to {100 * target:g} % on validation": (
            lambda key: chosen_harm.get(key.split("@")[0], harm_default),
            "harm",
        ),
        f"per zone x {BLOCK_HOURS} h, to {100 * target:g} % on validation": (
            lambda key: chosen_block.get(_block_key(key), block_default),
            "plain",
        ),
        f"hindsight per zone, to {100 * target:g} %": (lambda key: seen_zone[key.split("@")[0]], "plain"),
        f"hindsight per zone x {BLOCK_HOURS} h, to {100 * target:g} %": (
            lambda key: seen_block[_block_key(key)],
            "plain",
        ),
    }


def _constant(minimum: float) -> Callable[[str], float]:
    return lambda key: minimum


def _block_key(key: str) -> tuple[str, int]:
    zone, block = key.split("@")
    return zone, int(block)


def score(found: Sequence[ZoneOutcomes], index: int, rule: Rule) -> tuple[Pooled, dict[str, Effect]]:
    """A rule on the held-out year: pooled figures and each zone's effect (decisions judged by their block)."""
    minimum, variant = rule
    zones: dict[str, Effect] = {}
    for z in found:
        outcomes = by_zone(z.test[index])
        strong = is_strong(outcomes)
        decisions = {"plain": z.test, "spread": z.test_scaled, "agree": z.test_agreed, "harm": z.test_harm}
        records = decisions[variant][index]
        parts = [
            effect(part, minimum(f"{zone}@{block}"), strong)
            for (zone, block), part in by_block(z.zone, records).items()
        ]
        zones[z.zone] = Effect(
            math.fsum(p.kept for p in parts),
            math.fsum(p.perfect for p in parts),
            sum(p.waits for p in parts),
            sum(p.harmful for p in parts),
            strong,
        )
    return pooled(list(zones.values())), zones


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
    shipped rule and the hindsight per-zone minimums, then the pooled figures of every rule."""
    lines: list[str] = []
    for index, config in enumerate(bom.THRESHOLD_CONFIGS):
        rules = rules_for_config(found, index, target)
        results = {name: score(found, index, rule) for name, rule in rules.items()}
        base = results["none"][0].share
        shown = ("none", "per zone (shipped)", f"hindsight per zone, to {100 * target:g} %")
        lines += ["", f"{'### ' if markdown else '== '}{_label(config)}", ""]
        header = ["zone", "year", "perfect %", "none", "per zone (shipped)", "min %", "hindsight per zone", "min %"]
        rows = []
        for z in sorted(found, key=lambda z: z.zone):
            none, shipped, seen = (results[name][1][z.zone] for name in shown)
            rows.append(
                [
                    z.zone,
                    str(z.year),
                    f"{100 * none.perfect / max(1, len(z.test[index])):.1f}",
                    _cell(none),
                    _cell(shipped),
                    f"{100 * rules[shown[1]][0](z.zone):g}",
                    _cell(seen),
                    f"{100 * rules[shown[2]][0](z.zone):g}",
                ]
            )
        lines += _render(header, rows, markdown)
        lines.append("")
        summary = [
            [name, f"{100 * r.share:.1f}", f"{100 * (r.share - base):+.1f}", f"{100 * r.harmful:.1f}", str(r.waits)]
            for name, (r, _) in results.items()
        ]
        header = ["rule", "share of perfect saving %", "vs none, points", "harmful waits %", "waits"]
        lines += _render(header, summary, markdown)
    return lines


def _render(header: list[str], rows: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        rule = "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"
        return ["| " + " | ".join(header) + " |", rule] + ["| " + " | ".join(row) + " |" for row in rows]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    return [fmt.format(*header), *(fmt.format(*row) for row in rows)]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=bom.DEFAULT_DATA, help="shared data folder (default %(default)s)")
    parser.add_argument(
        "--every", type=_positive, default=bom.EVERY, help="score every n-th hour (default %(default)s)"
    )
    parser.add_argument("--target", type=float, default=0.10, help="harmful share to reach (default %(default)s)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes (default 2)")
    parser.add_argument("--kind", choices=bom.KINDS, default=bom.DEFAULT_KIND, help="profile layout")
    parser.add_argument("--shrink", type=float, default=bom.DEFAULT_SHRINK, help="weekpart shrinkage (builder's)")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    zones = bom.available_zones(args.data)
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        work = [(args.data, zone, args.every, args.kind, args.shrink) for zone in zones]
        found = [z for z in pool.map(zone_outcomes, work) if z]
    if not found:
        print(f"no zone under {args.data} has a year before its latest", file=sys.stderr)
        return 1
    command = " ".join(argv if argv is not None else sys.argv[1:])
    out = [
        f"{'## ' if args.markdown else ''}Minimum predicted saving: what thresholds can do (held-out latest year)",
        "",
        f"- command: python bench/thresholds.py {command}".rstrip(),
        f"- zones scored: {len(found)}, with a validation year: {sum(z.validation is not None for z in found)}; "
        f"profile: {args.kind}" + (f", weekpart shrinkage {args.shrink:g}" if args.shrink else ""),
        "- zone rows: share of the zone's perfect saving %; harmful waits, % of its waits",
    ]
    out += report(found, args.target, args.markdown)
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
