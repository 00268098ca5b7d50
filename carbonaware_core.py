"""Run work at the lowest-carbon moment inside a bounded wait, for the cloud region it runs in.

One stdlib-only file (Python 3.10+) that can be copied into any tree. It detects the cloud zone, asks a forecast
source, plans the start exactly, and waits at most ``window`` -- failing open: whatever goes wrong, the work runs
at once and one log line says why. ``requests`` is used for HTTP when importable (from the second request of a
process on: the first goes by urllib rather than wait for the import), urllib otherwise.

    from carbonaware_core import carbonaware_delay
    plan = carbonaware_delay(window=timedelta(hours=6), duration=timedelta(minutes=30))

CLI: ``python -m carbonaware_core plan|wait|run|detect|report --help``.

One file of code and one optional data file (``carbonaware_offline.json``, kept apart for its ODbL licence). The
sections, in reading order (each uses only those above it): data; time and durations; the planner (the optimum, then
reading a series and choose_start, then where and when: allowed starts, the decision rule, the best place); forecast
arithmetic (live correction); HTTP (bounded calls); secrets (redaction); HTTP transports; the cache; zone
detection; sources (hosted scheduler, series documents, Electricity Maps, WattTime, NESO, GSF SDK, offline,
live-corrected); planning (the request: what is asked and how to ask it, then arguments, then zone, chain and
decision, then where and when); the wait; reasons to start now; ledger, grams, ledger file, realised outcomes,
report; CLI; appendix: the generated region tables.
"""

from __future__ import annotations

import itertools
import logging
import math
import operator
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timedelta, timezone

TYPE_CHECKING = False  # importing typing costs milliseconds; with postponed annotations only mypy needs it
if TYPE_CHECKING:
    from typing import Any, TypeGuard

__version__ = "0.2.0"
__all__ = [  # the contract of the vendored file: every public name; tests/test_where_and_when.py keeps it whole
    "CACHE",
    "CARBONAWARE_BASE_URL",
    "CLOCK",
    "CREDENTIAL_NAMES",
    "DEFAULT_DURATION",
    "DEFAULT_WINDOW",
    "DETECT_RETRY_SECONDS",
    "DETECT_TIMEOUT_SECONDS",
    "ELECTRICITYMAPS_BASE_URL",
    "FAILURE_TTL_SECONDS",
    "G_PER_KWH",
    "HISTORY_SOURCES",
    "HORIZON_CAP",
    "HTTP_TIMEOUT_SECONDS",
    "LBS_PER_MWH_TO_G_PER_KWH",
    "LEDGER_LOCK_SECONDS",
    "LEDGER_VERSION",
    "LIVE_HALF_LIFE",
    "LIVE_HISTORY",
    "LIVE_MAX_AGE",
    "LIVE_SPAN",
    "LIVE_YESTERDAY_WEIGHT",
    "MARGINAL_SOURCES",
    "MAX_BODY_BYTES",
    "MAX_INTENSITY",
    "MAX_LEDGER_LINE",
    "MAX_POWER_KW",
    "MAX_REMEMBERED_SECRETS",
    "MAX_RETRY_AFTER_SECONDS",
    "METADATA_HOST",
    "NEGLIGIBLE_SAVINGS",
    "OFFLINE_ATTRIBUTION",
    "OFFLINE_DATA_FILE",
    "OFFLINE_KINDS",
    "OPTIONS",
    "OUTCOME_PATIENCE",
    "OUTCOME_STATUSES",
    "PROVIDERS",
    "REASONS",
    "REGION_ZONES",
    "REPLAN_AFTER",
    "REPLAN_EVERY",
    "REPORT_RESOLVE_SECONDS",
    "SCHEDULER_HORIZON",
    "SCHEDULER_REGIONS",
    "SCHEDULER_SHORTEST_JOB",
    "SOURCES",
    "SOURCE_CHAINS",
    "UKGRID_BASE_URL",
    "UKGRID_MAX_RANGE",
    "WAIT_CHUNK_SECONDS",
    "WATTTIME_BASE_URL",
    "WATTTIME_TOKEN_TTL_SECONDS",
    "ZONE_WATTTIME",
    "ActualsReader",
    "Alternative",
    "Anomaly",
    "Choice",
    "Clock",
    "CloudZone",
    "Decision",
    "Forecast",
    "ForecastPoint",
    "ForecastRefused",
    "HttpResponse",
    "Outcome",
    "Place",
    "Plan",
    "Query",
    "Question",
    "SeriesCallable",
    "SingleFlightCache",
    "Source",
    "SourceError",
    "SourceResult",
    "anomaly_weight",
    "append_records",
    "avoided_g",
    "base_url",
    "best_place",
    "blended_with_yesterday",
    "build_report",
    "carbonaware_delay",
    "carbonaware_delay_async",
    "check_ledger_option",
    "check_power_kw",
    "check_source_spec",
    "choose_start",
    "clear_cache",
    "complete_outcomes",
    "decide",
    "decision_record",
    "decisions_between",
    "describe",
    "detect_cloud_zone",
    "emissions_g",
    "energy_kwh",
    "expect_json",
    "feasible_starts",
    "fetch_actuals",
    "format_iso_duration",
    "grid_zone_for",
    "http_request",
    "immediate_plan",
    "interrupt_waits",
    "interval_mean",
    "is_grams_per_kwh",
    "latest_outcomes",
    "ledger_path",
    "ledger_sinks",
    "live_corrected",
    "logger",
    "lowest_mean_start",
    "lowest_mean_start_within",
    "main",
    "mean_over",
    "measured_by",
    "offline_model",
    "outcome_from_record",
    "parse_datetime",
    "parse_duration",
    "parse_series_csv",
    "parse_series_document",
    "parse_zone",
    "pending_outcome",
    "plan_and_report",
    "plan_delay",
    "profile_series",
    "profile_value",
    "read_ledger",
    "recent_anomaly",
    "record_decision",
    "record_outcome",
    "register_source",
    "remember_secrets",
    "render_alternatives",
    "render_chart",
    "render_report",
    "report_plan",
    "resolve_outcome",
    "series_from_starts",
    "signal_of",
    "validate_arguments",
    "watch_interrupts",
    "windows_option",
    "zones_option",
]

logger = logging.getLogger("carbonaware")

DEFAULT_WINDOW = timedelta(hours=6)
DEFAULT_DURATION = timedelta(minutes=30)
PROVIDERS = ("aws", "gcp", "azure", "ovh")
REASONS = ("optimal", "already-best", "below-threshold", "no-zone", "source-failed", "disabled", "dry-run")
WAIT_CHUNK_SECONDS = 1.0  # short sleeps so task timeouts and cancellation land promptly in worker threads
DETECT_TIMEOUT_SECONDS = 0.25  # the whole detection, threads and all, stays under 0.3 s
HTTP_TIMEOUT_SECONDS = 10.0
MAX_BODY_BYTES = 4 * 1024 * 1024
FAILURE_TTL_SECONDS = 10.0  # a blip must not disable the library for long
NEGLIGIBLE_SAVINGS = 0.001  # below any forecast's accuracy: waiting for less is waiting for nothing
MAX_RETRY_AFTER_SECONDS = 300.0
MAX_INTENSITY = 1e6  # in any unit we read (g/kWh, lbs/MWh); real grids stay below a few thousand
LBS_PER_MWH_TO_G_PER_KWH = 0.45359237
G_PER_KWH = "gCO2eq/kWh"


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CloudZone:
    """Where the work runs: a cloud provider and one of its regions."""

    provider: str
    region: str

    def __str__(self) -> str:
        return f"{self.provider}:{self.region}"


@dataclass(frozen=True)
class Place:
    """A candidate place to run: a cloud zone, or a grid zone alone (on-premises, written ``grid:FR``). A grid
    place's plan has ``zone`` None and ``grid_zone`` set, as a plan for ``grid_zone="FR"`` has today."""

    cloud: CloudZone | None = None
    grid: str | None = None

    def __str__(self) -> str:
        return str(self.cloud) if self.cloud is not None else f"grid:{self.grid}"


@dataclass(frozen=True)
class Alternative:
    """One candidate place of a plan over several: its best allowed start and mean there, or why it has none."""

    zone: str  # as written in ``zones``: "aws:eu-west-1", "grid:FR"
    start: datetime | None
    mean: float | None
    unit: str
    source: str
    note: str = ""  # why it was not compared (its sources failed, its unit differs), when it was not

    def to_dict(self) -> dict[str, Any]:
        return {
            "zone": self.zone,
            "start": None if self.start is None else _iso(self.start),
            "mean": _round_or_none(self.mean),
            "unit": self.unit,
            "source": self.source,
            "note": self.note,
        }


@dataclass(frozen=True)
class ForecastPoint:
    """Mean carbon intensity over [start, end): providers report interval averages, not instants."""

    start: datetime
    end: datetime
    value: float


@dataclass(frozen=True)
class Plan:
    """The decision: when to start, why, and what it is expected to save. ``to_dict()`` is JSON-safe."""

    start: datetime
    delay: timedelta
    zone: CloudZone | None
    source: str
    expected: float | None  # mean intensity over the job at the chosen start
    now: float | None  # mean intensity over the job if started at once
    savings: float | None  # fraction of ``now`` saved by waiting
    unit: str
    reason: str
    detail: str = ""
    grid_zone: str | None = None
    duration: timedelta = DEFAULT_DURATION
    window: timedelta = DEFAULT_WINDOW
    fallbacks: tuple[str, ...] = ()  # why earlier sources in the chain gave no answer
    forecast: tuple[ForecastPoint, ...] = field(default=(), repr=False, compare=False)
    power_kw: float | None = None  # the job's average draw, as the caller gave it: no grams without it
    id: str = field(default="", compare=False)  # links the decision to its outcome in a ledger
    # a plan over several places (``zones``): every candidate's best start, home first; and what moving the start
    # alone would save in the home zone (``savings`` is the saving of moving both, against starting there at once)
    alternatives: tuple[Alternative, ...] = ()
    time_savings: float | None = None

    @property
    def waits(self) -> bool:
        """Whether the work starts later. Without ``windows`` only optimal starts are later; with them the earliest
        allowed start may lie ahead whatever the reason (already-best, below-threshold, a failed source)."""
        return self.delay > timedelta(0) and self.reason not in ("disabled", "dry-run")

    @property
    def energy_kwh(self) -> float | None:
        return energy_kwh(self.power_kw, self.duration)

    @property
    def emissions_g(self) -> float | None:
        """Expected grams at the chosen start."""
        return emissions_g(self.expected, self.unit, self.energy_kwh)

    @property
    def emissions_now_g(self) -> float | None:
        """Expected grams if started at once (the counterfactual)."""
        return emissions_g(self.now, self.unit, self.energy_kwh)

    @property
    def avoided_g(self) -> float | None:
        return avoided_g(self.emissions_now_g, self.emissions_g)

    def to_dict(self) -> dict[str, Any]:
        return {
            "start": _iso(self.start),
            "delay_seconds": round(self.delay.total_seconds(), 3),
            "zone": None if self.zone is None else {"provider": self.zone.provider, "region": self.zone.region},
            "grid_zone": self.grid_zone,
            "source": self.source,
            "expected": _round_or_none(self.expected),
            "now": _round_or_none(self.now),
            "savings": _round_or_none(self.savings, 4),
            "unit": self.unit,
            "reason": self.reason,
            "detail": self.detail,
            "duration_seconds": self.duration.total_seconds(),
            "window_seconds": self.window.total_seconds(),
            "fallbacks": list(self.fallbacks),
            "id": self.id,
            "signal": signal_of(self.unit),
            "power_kw": self.power_kw,
            "energy_kwh": _round_or_none(self.energy_kwh, 9),
            "emissions_g": _round_or_none(self.emissions_g, 3),
            "emissions_now_g": _round_or_none(self.emissions_now_g, 3),
            "avoided_g": _round_or_none(self.avoided_g, 3),
            **self._where_dict(),
        }

    def _where_dict(self) -> dict[str, Any]:
        if not self.alternatives:  # a one-place plan's document stays as it was
            return {}
        return {
            "alternatives": [alternative.to_dict() for alternative in self.alternatives],
            "time_savings": _round_or_none(self.time_savings, 4),
        }


@dataclass(frozen=True)
class Forecast:
    """A series answer: the planner decides."""

    points: tuple[ForecastPoint, ...]
    unit: str = G_PER_KWH
    grid_zone: str | None = None
    attribution: str | None = None  # credit the data's licence asks for wherever a plan is shown
    # the source's own floor on the predicted saving worth a wait (the offline model's per-zone figure from its
    # backtest: below it, waits ended dirtier too often); the planner applies the higher of it and min_savings
    min_savings: float | None = None
    label: str | None = None  # the plan's source name when not the chain's (e.g. a live-corrected forecast)


@dataclass(frozen=True)
class Decision:
    """A decided answer (the hosted scheduler chooses the start itself)."""

    start: datetime
    expected: float | None
    now: float | None
    savings: float | None
    unit: str = G_PER_KWH
    asked_for: datetime | None = None  # the ``now`` the source decided for: a later caller may need another answer
    looked_ahead: timedelta | None = None  # the window the source decided over (the hosted scheduler: <= ~24 h)
    note: str | None = None  # what the plan's detail must add (figures dropped, say)


@dataclass(frozen=True)
class Query:
    """What a source is asked: the zone, the planning horizon and the per-request budget."""

    zone: CloudZone | None
    grid_zone: str | None
    now: datetime
    window: timedelta
    duration: timedelta
    timeout: float
    arg: str | None = None  # the part after ':' in a source spec, e.g. the path in "file:forecast.json"
    fixed_now: bool = False  # the caller chose ``now`` (a replay): answers for another moment do not fit
    deadline: float = math.inf  # CLOCK.monotonic() by which planning must be over: the window's end
    credentials: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # (variable name, value), see setting()

    def setting(self, name: str) -> str:
        """A provider key or login by its environment variable's name: from the ``credentials`` option (a Prefect
        credentials block, say) first, then the environment."""
        return dict(self.credentials).get(name) or os.environ.get(name, "")

    @property
    def horizon_end(self) -> datetime:
        return self.now + self.window + self.duration

    def budget(self) -> float:
        """Seconds the next request may take: ``timeout``, or less when the window ends sooner -- requests never
        run past the window, however many a source makes or sources a chain tries."""
        left = self.deadline - CLOCK.monotonic()
        if left <= 0:
            raise SourceError("no time left in the window")
        return min(self.timeout, left)

    def out_of_time(self) -> bool:
        """Whether this caller's window, rather than the timeout, is what ran out."""
        return self.deadline - CLOCK.monotonic() < 0.1


def _shared_fetch(query: Query, fetch: Callable[[], Any]) -> Callable[[], Any]:
    """``fetch`` for the shared cache: a failure because this caller's window ran out is not the source's fault,
    so it is marked not to be remembered for others."""

    def bounded() -> Any:
        try:
            return fetch()
        except SourceError as error:
            if query.out_of_time() and not error.retry_after and not isinstance(error, _CallerOutOfTime):
                raise _CallerOutOfTime(str(error)) from None
            raise

    return bounded


class SourceError(Exception):
    """A source could not give a usable answer. The message is logged; it must never contain a secret."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(_redact(message, ()))  # whatever the message quotes, no secret in use survives
        self.retry_after = retry_after


class _NoZone(SourceError):
    """The source needs a zone and none is known: reported once as reason "no-zone", not per source."""


class ForecastRefused(SourceError):
    """The provider answered but serves no forecast to this key or plan (HTTP 401/403) or has none (404): its
    recent actuals may still serve, corrected onto the offline profile (the live correction)."""


class _CallerOutOfTime(SourceError):
    """The fetch failed because the caller's window ran out, not because of the source: never remembered, so a
    caller with seconds to spare cannot make everyone else run at once for the next ``FAILURE_TTL_SECONDS``."""


SourceResult = Forecast | Decision
SeriesCallable = Callable[[CloudZone | None, datetime, datetime], Iterable[ForecastPoint]]
ActualsReader = Callable[[Query, datetime, datetime], tuple[ForecastPoint, ...]]


@dataclass(frozen=True)
class Source:
    """A forecast provider plugged into the planner. ``cache_key`` None means: not cached."""

    name: str
    fetch: Callable[[Query], SourceResult]
    cache_key: Callable[[Query], Hashable] | None = None
    ttl: float = 900.0
    needs_zone: bool = True  # useless without a cloud or grid zone
    uses_zone: bool = True  # False: never looks at one (so no detection runs for it)
    horizon: timedelta | None = None  # the longest window it can answer; None: HORIZON_CAP
    # reads MEASURED intensity over [start, end) for the query's zone (zone, grid_zone, arg; ``query.budget()``
    # seconds per request); raises SourceError (incl. "not published yet" / empty), never anything else. Feeds the
    # live correction (source "live:<name>") and realised outcomes; see ``fetch_actuals``
    actuals: ActualsReader | None = None


HORIZON_CAP = timedelta(days=366)  # no source is asked about more than a year of starts, or a job over a year long


def _within_horizon(source: Source | None, query: Query) -> Query:
    """The question a source can answer: a window no longer than it sees ahead and a job no longer than a year.
    Planning time and memory then stay bounded however long the caller's window; the plan keeps the real one."""
    horizon = min(source.horizon or HORIZON_CAP, HORIZON_CAP) if source is not None else HORIZON_CAP
    if query.window <= horizon and query.duration <= HORIZON_CAP:
        return query
    return replace(query, window=min(query.window, horizon), duration=min(query.duration, HORIZON_CAP))


SOURCES: dict[str, Source] = {}
SOURCE_CHAINS = {"auto": ("carbonaware", "offline")}


def register_source(source: Source) -> None:
    """The one place a source plugs in; a later registration under the same name replaces the earlier one."""
    SOURCES[source.name] = source


def _json_bytes(document: Any) -> bytes:
    import json

    return json.dumps(document).encode()


def _round_or_none(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


# --------------------------------------------------------------------------------------------------------------
# Time and durations
# --------------------------------------------------------------------------------------------------------------

_ISO_DATETIME = r"^(\d{4})-(\d{2})-(\d{2})[T ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d{1,9}))?)?\s*(Z|z|[+-]\d{2}:?\d{2})?$"
_ISO_DURATION = (
    r"^P(?:(\d+(?:\.\d+)?)W)?(?:(\d+(?:\.\d+)?)D)?"
    r"(?:T(?:(\d+(?:\.\d+)?)H)?(?:(\d+(?:\.\d+)?)M)?(?:(\d+(?:\.\d+)?)S)?)?$"
)
_SHORT_DURATION = r"^(?:(\d+(?:\.\d+)?)d)?(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$"


def parse_datetime(text: str) -> datetime:
    """ISO-8601 as providers write it ('Z', no seconds, fractions); naive means UTC. Python 3.10 lacks this."""
    match = re.match(_ISO_DATETIME, text.strip())
    if not match:
        raise ValueError(f"not an ISO-8601 date-time: {text[:40]!r}")
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    micro = int((fraction or "0")[:6].ljust(6, "0"))
    tz = timezone.utc
    if offset and offset not in ("Z", "z"):
        sign = -1 if offset[0] == "-" else 1
        digits = offset[1:].replace(":", "")
        tz = timezone(sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:])))
    try:
        parsed = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second or 0), micro, tzinfo=tz)
        return parsed.astimezone(timezone.utc)
    except OverflowError:
        raise ValueError(f"date-time out of range: {text[:40]!r}") from None


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_duration(text: str) -> timedelta:
    """'30m', '6h', '1h30m', '2d', '90s' or ISO-8601 ('PT30M', 'P1DT2H'). Bare numbers are refused as ambiguous."""
    cleaned = text.strip()
    iso = re.match(_ISO_DURATION, cleaned.upper())
    short = re.match(_SHORT_DURATION, cleaned.lower())
    parts = iso.groups() if iso else (None, *short.groups()) if short else None
    if not cleaned or parts is None or not any(parts):
        raise ValueError(f"not a duration: {text!r} (use 30m, 6h, 1h30m or ISO-8601 such as PT30M)")
    weeks, days, hours, minutes, seconds = (float(p) if p else 0.0 for p in parts)
    try:
        return timedelta(weeks=weeks, days=days, hours=hours, minutes=minutes, seconds=seconds)
    except OverflowError:
        raise ValueError(f"duration out of range: {text[:40]!r}") from None


def format_iso_duration(duration: timedelta) -> str:
    """timedelta -> ISO-8601 ('PT30M', 'P1DT12H'), as the hosted scheduler expects."""
    total = duration.total_seconds()
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    date_part = f"{int(days)}D" if days else ""
    time_part = "".join(
        f"{_compact_number(amount)}{unit}" for amount, unit in ((hours, "H"), (minutes, "M"), (seconds, "S")) if amount
    )
    if not date_part and not time_part:
        return "PT0S"
    return f"P{date_part}" + (f"T{time_part}" if time_part else "")


def _compact_number(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:.6f}".rstrip("0")


def _signed_human(delta: timedelta) -> str:
    """``-5s`` where ``str(timedelta)`` would print ``-1 day, 23:59:55``."""
    return f"-{_human(-delta)}" if delta < timedelta(0) else _human(delta)


def _human(delta: timedelta) -> str:
    seconds = round(delta.total_seconds())
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Clock:
    """Wall clock and sleep; tests and replays swap ``carbonaware_core.CLOCK`` instead of touching the network."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        """For cache lifetimes and the window's deadline on planning (a request's own timeout is on the real
        clock)."""
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    async def asleep(self, seconds: float) -> None:
        import asyncio

        await asyncio.sleep(seconds)

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.time(), timezone.utc)


CLOCK = Clock()


# --------------------------------------------------------------------------------------------------------------
# The planner: exact optimum over interval series
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    """The planner's answer in seconds: start, mean intensity there, mean intensity at once, job length used."""

    start: float
    expected: float
    now_value: float
    length: float
    data_end: float = math.inf  # where the series' last interval ends: no start later than this minus the job


def lowest_mean_start(
    starts: Sequence[float],
    ends: Sequence[float],
    values: Sequence[float],
    earliest: float,
    latest: float,
    length: float,
) -> tuple[float, float] | None:
    """Earliest start s in [earliest, latest] minimising the mean of a step series over [s, s + length].

    Intervals must be sorted and non-overlapping. The mean is piecewise linear in s, so the optimum lies where s or
    s + length meets an interval boundary, or at an end of the range: only those candidates are evaluated. A start
    counts only if [s, s + length] is covered without gaps. Returns (start, mean), or None if no start fits.
    """
    return _lowest_mean_start(starts, ends, values, earliest, latest, length, known_grid=False)


def _lowest_mean_start(
    starts: Sequence[float],
    ends: Sequence[float],
    values: Sequence[float],
    earliest: float,
    latest: float,
    length: float,
    known_grid: bool,
) -> tuple[float, float] | None:
    """lowest_mean_start; ``known_grid``: the series is one gap-free whole-second grid after its first interval
    (as _regular_series_arrays made it), so that is not checked again."""
    import bisect

    # only intervals that can hold a part of some job [s, s + length] matter: the "now" question reads one or two
    below, above = bisect.bisect_right(ends, earliest), bisect.bisect_left(starts, latest + length)
    if below > 0 or above < len(starts):
        starts, ends, values = starts[below:above], ends[below:above], values[below:above]
    best: tuple[float, float] | None = None
    runs = [(0, len(starts))] if known_grid and starts else _contiguous_runs(starts, ends)
    for lo, hi in runs:
        first, last = max(earliest, starts[lo]), min(latest, ends[hi - 1] - length)
        if first <= last:
            whole = lo == 0 and hi == len(starts)
            run_starts, run_values = (starts, values) if whole else (starts[lo:hi], values[lo:hi])
            found = _best_in_run(run_starts, run_values, ends[hi - 1], first, last, length, known_grid)
            if best is None or _better(found[1], found[0], best[1], best[0]):
                best = found
    return best


def _best_in_run(
    starts: Sequence[float],
    values: Sequence[float],
    run_end: float,
    first: float,
    last: float,
    length: float,
    known_grid: bool = False,
) -> tuple[float, float]:
    """One gap-free run: the candidate starts in order, each mean from the run's running integral."""
    boundaries = [*starts[1:], run_end]
    steps = _job_steps_on_grid(starts, run_end, length, known_grid)
    if steps:  # every width after the first is the grid step, exactly
        step = run_end - starts[-1]
        widths: Iterable[float] = itertools.chain((boundaries[0] - starts[0],), itertools.repeat(step))
    else:
        widths = map(operator.sub, boundaries, starts)
    # integral of the series from starts[0] to starts[i]
    cumulative = [0.0, *itertools.accumulate(map(operator.mul, widths, values))]
    if steps and math.isfinite(cumulative[-1]):
        return _best_on_grid(starts, values, cumulative, boundaries[:steps], first, last, length, steps)
    return _best_by_sweep(starts, values, cumulative, boundaries, first, last, length)


def _job_steps_on_grid(starts: Sequence[float], run_end: float, length: float, known_grid: bool = False) -> int:
    """How many grid steps the job spans, when the run after its first interval is a whole-second grid whose step
    divides the job (then every ``boundary - length`` past the first ``steps`` boundaries is a boundary); else 0.

    The first interval may differ: a forecast's first value is often carried back to now. Whole seconds below
    2**52 keep every sum exact, so the grid's shortcut computes the very floats the sweep would."""
    if len(starts) < 2:
        return 0
    step = run_end - starts[-1]
    if not (step > 0 and length > 0 and starts[1] >= 0 and run_end < 2**52):
        return 0
    if starts[1] % 1 or step % 1 or length % step:
        return 0
    if not known_grid:
        grid = [*itertools.accumulate(itertools.repeat(step, len(starts) - 2), initial=starts[1])]
        if not _same(grid, starts[1:]):
            return 0
    return int(length // step)


def _best_on_grid(
    starts: Sequence[float],
    values: Sequence[float],
    cumulative: Sequence[float],
    early_boundaries: Sequence[float],
    first: float,
    last: float,
    length: float,
    steps: int,
) -> tuple[float, float]:
    """The sweep's answer on a grid, the grid starts' means from one pass over the running integral.

    Candidates, in order: ``first``; ``b - length`` for the first ``steps`` boundaries b (they fall inside the first
    interval, or before the run); the grid starts strictly between; ``last``. Grid start k >= 1 ends exactly on grid
    start k + steps, so its mean is a difference of two running integrals; the rest use the sweep's formula."""
    import bisect

    def mean_at(s: float) -> float:
        end = s + length
        left, right = bisect.bisect_right(starts, s) - 1, bisect.bisect_right(starts, end) - 1
        integral_end = cumulative[right] + (end - starts[right]) * values[right]
        return (integral_end - (cumulative[left] + (s - starts[left]) * values[left])) / length

    best_start, best_mean = first, mean_at(first)
    to_beat = best_mean - 1e-9 * max(1.0, abs(best_mean))
    # the sweep's rule: candidates rise, so a tie never beats the earlier start and only a lower mean counts
    for s in (b - length for b in early_boundaries):
        if first < s < last and (mean := mean_at(s)) < to_beat:
            best_start, best_mean, to_beat = s, mean, mean - 1e-9 * max(1.0, abs(mean))
    lo, hi = bisect.bisect_right(starts, first), bisect.bisect_left(starts, last)  # grid starts in (first, last)
    integrals = [*map(operator.sub, cumulative[lo + steps : hi + steps], cumulative[lo:hi])]
    found = _first_clear_minimum(integrals, length, to_beat)
    if found is not None:
        best_start, best_mean = starts[lo + found], integrals[found] / length
        to_beat = best_mean - 1e-9 * max(1.0, abs(best_mean))
    elif integrals and min(integrals) / length < to_beat:  # a near tie before the minimum: the rule, one by one
        for k, integral in enumerate(integrals, lo):
            if (mean := integral / length) < to_beat:
                best_start, best_mean, to_beat = starts[k], mean, mean - 1e-9 * max(1.0, abs(mean))
    if last > first:
        mean = mean_at(last)
        if mean < to_beat:
            best_start, best_mean = last, mean
    return best_start, best_mean


def _first_clear_minimum(integrals: list[float], length: float, to_beat: float) -> int | None:
    """Where the sweep's rule ends among these candidates, when that is plainly the first lowest one: it beats
    ``to_beat`` and every earlier candidate by more than the tolerance. None when a near tie needs the rule itself.

    Dividing by ``length`` is monotonic, so the lowest integral is the lowest mean; so is the tolerance test."""
    if not integrals:
        return None
    lowest = min(integrals)
    floor, where = lowest / length, integrals.index(lowest)
    runner_up = min(integrals[:where]) / length if where else math.inf
    beaten = min(to_beat, runner_up - 1e-9 * max(1.0, abs(runner_up)))
    return where if floor < beaten else None


def _best_by_sweep(
    starts: Sequence[float],
    values: Sequence[float],
    cumulative: Sequence[float],
    boundaries: Sequence[float],
    first: float,
    last: float,
    length: float,
) -> tuple[float, float]:
    """Any run: sweep the candidate starts in order, both ends of the job moving forward only."""
    count = len(starts)
    candidates = sorted(  # a set: on a regular grid most "boundary - length" points are boundaries too
        {
            first,
            last,
            *(b for b in starts if first < b < last),
            *(b - length for b in boundaries if first < b - length < last),
        }
    )
    left = right = 0  # interval indices holding s and s + length
    best_start, best_mean, to_beat = first, math.inf, math.inf
    for s in candidates:
        end = s + length
        while left + 1 < count and starts[left + 1] <= s:
            left += 1
        while right + 1 < count and starts[right + 1] <= end:
            right += 1
        integral_end = cumulative[right] + (end - starts[right]) * values[right]
        integral_start = cumulative[left] + (s - starts[left]) * values[left]
        mean = (integral_end - integral_start) / length
        # _better, inlined: candidates rise, so a tie never beats the earlier start and only a lower mean counts
        if mean < to_beat or math.isinf(best_mean):
            best_start, best_mean = s, mean
            to_beat = mean - 1e-9 * max(1.0, abs(mean))
    return best_start, best_mean


def _better(mean: float, start: float, best_mean: float, best_start: float) -> bool:
    if math.isinf(best_mean):
        return True
    tolerance = 1e-9 * max(1.0, abs(best_mean))
    if mean < best_mean - tolerance:
        return True
    return abs(mean - best_mean) <= tolerance and start < best_start


def _contiguous_runs(starts: Sequence[float], ends: Sequence[float]) -> Iterator[tuple[int, int]]:
    if starts and _same(ends[:-1], starts[1:]):  # each interval ends where the next begins: one run
        yield 0, len(starts)
        return
    gaps = [i for i, (begin, end) in enumerate(zip(starts[1:], ends, strict=False), 1) if begin - end > 1e-6]
    edges = [0, *gaps, len(starts)] if starts else []
    yield from itertools.pairwise(edges)


def _same(a: Sequence[float], b: Sequence[float]) -> bool:
    """Element-wise equality; two lists compare in C, skipping the floats they share."""
    return a == b if isinstance(a, list) and isinstance(b, list) else all(map(operator.eq, a, b))


# --------------------------------------------------------------------------------------------------------------
# The planner: reading a series (epoch seconds, gaps, a shortcut for regular grids) and choose_start
# --------------------------------------------------------------------------------------------------------------


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _series_arrays(points: Iterable[ForecastPoint], now: float) -> tuple[list[float], list[float], list[float]]:
    """Sorted, valid, non-overlapping intervals as epoch seconds; a first value just after ``now`` covers now.

    Invalid values (NaN, infinite, negative) become gaps; overlaps are cut at the later start.
    """
    starts, ends, values, _ = _series_arrays_and_grid(points, now)
    return starts, ends, values


def _series_arrays_and_grid(
    points: Iterable[ForecastPoint], now: float
) -> tuple[list[float], list[float], list[float], bool]:
    """_series_arrays, and whether they are one gap-free whole-second grid after the first interval."""
    points = points if isinstance(points, (list, tuple)) else [*points]
    regular = _regular_series_arrays(points)
    if regular is not None:
        starts, ends, values, whole_seconds = regular
        return (*_carried_back(starts, ends, values, now), whole_seconds)
    return (*_carried_back(*_any_series_arrays(points), now), False)


def _any_series_arrays(points: Iterable[ForecastPoint]) -> tuple[list[float], list[float], list[float]]:
    """The general path: point by point, any order, invalid values and overlaps allowed."""
    rows = []
    previous_end, previous_seconds = None, 0.0
    for point in points:  # a year of hours on every offline plan, so _valid_intensity and _epoch are inlined
        value, begin, end = point.value, point.start, point.end
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= MAX_INTENSITY:
            # a series made step by step shares each boundary between two points: convert it once
            begun = previous_seconds if begin is previous_end else _epoch(begin)
            previous_end, previous_seconds = end, _epoch(end)
            if previous_seconds > begun:
                rows.append((begun, previous_seconds, float(value)))
    rows.sort()
    if all(later[0] >= earlier[1] for earlier, later in itertools.pairwise(rows)):  # the usual case: nothing to cut
        starts, ends, values = ([*column] for column in zip(*rows, strict=True)) if rows else ([], [], [])
        return starts, ends, values
    starts, ends, values = [], [], []
    for row_start, row_end, row_value in rows:
        if starts and row_start < ends[-1]:
            ends[-1] = row_start
            if ends[-1] <= starts[-1]:
                starts.pop(), ends.pop(), values.pop()
        starts.append(row_start)
        ends.append(row_end)
        values.append(row_value)
    return starts, ends, values


def _regular_series_arrays(
    points: Sequence[ForecastPoint],
) -> tuple[list[float], list[float], list[float], bool] | None:
    """The arrays of a series that is one gap-free grid of valid values -- what providers send -- without a
    per-point conversion, or None for anything else (then the general path decides, point by point).

    Each start is compared with ``first start + k * step`` built in the first start's zone, which must be UTC-like
    (a fixed offset, or naive meaning UTC), so datetime arithmetic there is exact; a point in any other zone is
    compared by its instant. The seconds are then computed as ``timestamp()`` would, from whole microseconds; the
    flag says whether they are whole seconds below 2**52 (what _best_on_grid needs)."""
    if len(points) < 2:
        return None
    values = [point.value for point in points]  # comprehensions: faster than attrgetter here
    kinds = {*map(type, values)}
    if not kinds <= {float, int}:  # bool, str, None, Decimal...: the general path's rules apply
        return None
    if not (min(values) >= 0 and max(values) <= MAX_INTENSITY and math.isfinite(sum(values))):  # sum: NaN
        return None
    begins = [point.start for point in points]
    try:
        zone, step = begins[0].tzinfo, begins[1] - begins[0]
        if (zone is not None and type(zone) is not timezone) or step <= timedelta(0):
            return None
        grid = [*itertools.accumulate(itertools.repeat(step, len(points)), operator.add, initial=begins[0])]
    except (AttributeError, TypeError, OverflowError):  # not datetimes, naive with aware, past year 9999
        return None
    if begins != grid[:-1]:
        return None
    finishes = [point.end for point in points]
    shared = all(map(operator.is_, finishes[:-1], begins[1:]))  # a series made step by step
    if not (finishes[-1] == grid[-1] and (shared or finishes == grid[1:])):
        return None
    found = _grid_seconds((begins[0] if zone else begins[0].replace(tzinfo=timezone.utc)) - _EPOCH, step, len(points))
    if found is None:
        return None
    seconds, whole = found
    return seconds[:-1], seconds[1:], [*map(float, values)] if int in kinds else values, whole


def _grid_seconds(first: timedelta, step: timedelta, count: int) -> tuple[list[float], bool] | None:
    """``count + 1`` grid boundaries as epoch seconds, each the float ``timestamp()`` gives (a whole number of
    microseconds divided by 10**6), and whether they are whole seconds below 2**52; None where rounding far from
    1970 could merge two of them."""
    microsecond = timedelta(microseconds=1)
    offset, stride = first // microsecond, step // microsecond
    if offset % 10**6 == 0 and stride % 10**6 == 0 and abs(offset) + stride * count < 2**52 * 10**6:
        # whole seconds below 2**52: float sums are exact, and cheaper than dividing each
        whole = itertools.accumulate(itertools.repeat(float(stride // 10**6), count), initial=float(offset // 10**6))
        return [*whole], True
    moments = range(offset, offset + stride * (count + 1), stride)
    seconds = [*map(operator.truediv, moments, itertools.repeat(10**6))]  # int / int, as timestamp() does
    return (seconds, False) if all(map(operator.lt, seconds, seconds[1:])) else None


def _carried_back(
    starts: list[float], ends: list[float], values: list[float], now: float
) -> tuple[list[float], list[float], list[float]]:
    if starts and now < starts[0] <= now + (ends[0] - starts[0]):
        starts[0] = now  # forecasts often begin at the next period boundary; carry the first value back
    return starts, ends, values


def _aware(point: ForecastPoint) -> ForecastPoint:
    if point.start.tzinfo and point.end.tzinfo:
        return point
    return ForecastPoint(_utc(_epoch(point.start)), _utc(_epoch(point.end)), point.value)


def _epoch(moment: datetime) -> float:
    """Seconds since the epoch; naive means UTC (as in parse_datetime), never the machine's local time."""
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


def _valid_intensity(value: object) -> TypeGuard[float]:
    """A number a grid can have: no NaN, no negatives, and nothing near float overflow (sums must stay finite)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= MAX_INTENSITY


def choose_start(points: Iterable[ForecastPoint], now: datetime, window: timedelta, duration: timedelta) -> Choice:
    """Plan over a series; raises SourceError when the series cannot say anything about starting now."""
    t0 = now.timestamp()
    starts, ends, values, grid = _series_arrays_and_grid(points, t0)
    covered_until = _covered_from(starts, ends, t0)
    length = min(duration.total_seconds(), covered_until - t0)
    now_mean = _lowest_mean_start(starts, ends, values, t0, t0, length, grid)
    best = _lowest_mean_start(starts, ends, values, t0, t0 + window.total_seconds(), length, grid)
    assert now_mean is not None and best is not None  # [t0, t0 + length] is covered by construction
    return Choice(start=best[0], expected=best[1], now_value=now_mean[1], length=length, data_end=ends[-1])


def _covered_from(starts: Sequence[float], ends: Sequence[float], t: float) -> float:
    """Where the gap-free stretch of data holding ``t`` ends; a SourceError if nothing holds ``t``."""
    if not starts:
        raise SourceError("forecast is empty or has no valid values")
    if ends[-1] <= t:
        raise SourceError(f"forecast is stale: it ends at {_iso(_utc(ends[-1]))}, before now")
    for lo, hi in _contiguous_runs(starts, ends):
        if starts[lo] <= t < ends[hi - 1]:
            return ends[hi - 1]
    raise SourceError(f"forecast does not cover now: it starts at {_iso(_utc(starts[0]))}")


def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, timezone.utc)


# --------------------------------------------------------------------------------------------------------------
# The planner over places and allowed starts: the question, feasible starts, the joint optimum, the decision rule
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    """What a plan answers: where (``places``; ``places[0]`` is home, the baseline for savings and the winner of
    ties) and when (a start in [earliest, earliest + window], inside ``allowed`` when given, finishing by
    ``finish_by`` when given). How to ask it (sources, timeout, hooks) is not part of the question."""

    places: tuple[Place, ...]
    duration: timedelta
    earliest: datetime
    window: timedelta
    finish_by: datetime | None = None
    allowed: tuple[tuple[datetime, datetime], ...] = ()
    min_savings: float = 0.0
    power_kw: float | None = None
    replay: bool = False  # ``earliest`` is the caller's ``now``, not the clock's

    def start_intervals(self) -> tuple[tuple[datetime, datetime], ...]:
        """[earliest, earliest + window] ∩ allowed ∩ (-inf, finish_by - duration], as sorted disjoint intervals."""
        t0 = self.earliest.timestamp()
        found = feasible_starts(
            t0,
            t0 + self.window.total_seconds(),
            [(lo.timestamp(), hi.timestamp()) for lo, hi in self.allowed],
            None if self.finish_by is None else self.finish_by.timestamp(),
            self.duration.total_seconds(),
        )
        return tuple((_utc(lo), _utc(hi)) for lo, hi in found)


def feasible_starts(
    earliest: float,
    latest: float,
    allowed: Sequence[tuple[float, float]],
    finish_by: float | None,
    length: float,
) -> list[tuple[float, float]]:
    """The starts a job may take, as sorted disjoint closed intervals: inside [earliest, latest], inside one of
    ``allowed`` (all of the range when empty), and early enough to end by ``finish_by``."""
    top = latest if finish_by is None else min(latest, finish_by - length)
    pieces = sorted((max(lo, earliest), min(hi, top)) for lo, hi in (allowed or [(earliest, top)]))
    merged: list[tuple[float, float]] = []
    for lo, hi in pieces:
        if lo > hi:
            continue
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return merged


def lowest_mean_start_within(
    starts: Sequence[float],
    ends: Sequence[float],
    values: Sequence[float],
    intervals: Sequence[tuple[float, float]],
    length: float,
) -> tuple[float, float] | None:
    """``lowest_mean_start`` over a union of sorted disjoint start intervals: (start, mean) of the lowest mean,
    the earliest start among equals; None if no allowed start is covered."""
    best: tuple[float, float] | None = None
    for lo, hi in intervals:
        found = lowest_mean_start(starts, ends, values, lo, hi, length)
        if found is not None and (best is None or _better(found[1], found[0], best[1], best[0])):
            best = found
    return best


def best_place(candidates: Sequence[tuple[float, float] | None]) -> int | None:
    """Index of the best (start, mean) among places (None: no answer). The lowest mean wins; among equal means
    (within 1e-9 relative) the home place (index 0), then the earliest start, then the order given."""
    chosen: int | None = None
    for index, candidate in enumerate(candidates):
        if candidate is None:
            continue
        if chosen is None:
            chosen = index
            continue
        best = candidates[chosen]
        assert best is not None
        tolerance = 1e-9 * max(1.0, abs(best[1]))
        lower = candidate[1] < best[1] - tolerance
        if lower or (abs(candidate[1] - best[1]) <= tolerance and chosen != 0 and candidate[0] < best[0]):
            chosen = index
    return chosen


def decide(
    now_mean: float | None,
    best_mean: float | None,
    start_is_now: bool,
    min_savings: float,
    stated: float | None = None,
) -> tuple[str, float | None]:
    """The rule every plan follows, public so that backtests apply the same: (reason, predicted saving of the best
    start against starting at once). "already-best" when the best start is now or saves a negligible amount,
    "below-threshold" when ``min_savings`` > 0 and the saving is below it or unknown, else "optimal".
    ``stated``: the source's own saving, used when the means do not tell."""
    savings = _savings(now_mean, best_mean)
    if savings is None:
        savings = stated
    if start_is_now or (savings is not None and savings < NEGLIGIBLE_SAVINGS):
        return "already-best", savings
    if min_savings > 0 and (savings is None or savings < min_savings):
        return "below-threshold", savings
    return "optimal", savings


def _savings(now_value: float | None, expected: float | None) -> float | None:
    if now_value is None or expected is None or now_value <= 0:
        return None
    return (now_value - expected) / now_value


# --------------------------------------------------------------------------------------------------------------
# Forecast arithmetic: live correction
# --------------------------------------------------------------------------------------------------------------
# A typical-day profile says what an hour usually looks like; the last day's measurements say how today differs.
# Two corrections, in this order: (1) blend into each hour of the profile the same hour yesterday, where it was
# measured (LIVE_YESTERDAY_WEIGHT of it); (2) add today's anomaly -- measured minus that blend, averaged over the
# latest LIVE_SPAN of measurements -- fading it by half every LIVE_HALF_LIFE ahead. The settings were chosen on
# validation years, never on a year they are scored on (``python bench/backtest.py --live-only`` shows the choice
# and the scores): the recent level persists for longer than any window (a long half-life), and the day before
# says more about the next hours' shape than the level does.

LIVE_YESTERDAY_WEIGHT = 0.25
LIVE_HALF_LIFE = timedelta(hours=96)
LIVE_SPAN = timedelta(hours=1)
LIVE_MAX_AGE = timedelta(hours=6)  # measurements older than this say nothing about today
LIVE_HISTORY = timedelta(hours=24)  # what the free tiers serve, and all the corrections read
_DAY = timedelta(days=1)


@dataclass(frozen=True)
class Anomaly:
    """How far today's measurements lie from the profile (same unit), up to ``measured_until``."""

    value: float
    measured_until: datetime


def mean_over(points: Iterable[ForecastPoint], start: datetime, end: datetime) -> float | None:
    """Time-weighted mean of the valid values over the parts of [start, end) the points cover; None if none do."""
    total = weight = 0.0
    for point in points:
        overlap = (min(point.end, end) - max(point.start, start)).total_seconds()
        if overlap > 0 and _valid_intensity(point.value):
            total += overlap * point.value
            weight += overlap
    return total / weight if weight > 0 else None


def recent_anomaly(
    actuals: Iterable[ForecastPoint],
    profile: Sequence[ForecastPoint],
    now: datetime,
    span: timedelta = LIVE_SPAN,
    max_age: timedelta = LIVE_MAX_AGE,
) -> Anomaly:
    """Measured minus typical, time-weighted over the latest ``span`` of valid measurements before ``now``.

    Only intervals over by ``now`` count: a value for the hour under way is a nowcast, and one dated ahead is no
    measurement at all. NaN, negative or absurd values are ignored. A SourceError when nothing valid remains or
    the latest measurement ends over ``max_age`` before now: a stale anomaly would pass yesterday off as today."""
    measured = measured_by(actuals, now)
    if not measured:
        raise SourceError("no valid measurement before now")
    until = max(p.end for p in measured)
    if now - until > max_age:
        raise SourceError(f"the latest measurement ends {_human(now - until)} before now (stale)")
    since = until - span
    profile = [p for p in profile if p.end > since and p.start < until]  # a year of profile: look at hours only
    total = weight = 0.0
    for point in measured:
        start, end = max(point.start, since), point.end
        typical = mean_over(profile, start, end) if end > start else None
        if typical is not None:
            seconds = (end - start).total_seconds()
            total += seconds * (point.value - typical)
            weight += seconds
    if weight <= 0:
        raise SourceError("the profile does not cover the latest measurements")
    return Anomaly(total / weight, until)


def measured_by(actuals: Iterable[ForecastPoint], now: datetime) -> list[ForecastPoint]:
    """The valid measurements whose interval is over by ``now`` (the hour under way is a nowcast, and a point
    dated ahead is no measurement), in time order."""
    kept = [p for p in (_aware(point) for point in actuals) if _valid_intensity(p.value) and p.start < p.end <= now]
    return sorted(kept, key=lambda p: p.start)


def blended_with_yesterday(
    profile: Iterable[ForecastPoint], measured: Sequence[ForecastPoint], weight: float = LIVE_YESTERDAY_WEIGHT
) -> tuple[ForecastPoint, ...]:
    """Each profile point moved ``weight`` of the way to what was measured over the same interval a day earlier;
    points whose day-earlier interval was not (fully) measured keep the profile's value."""
    if weight <= 0 or not measured:
        return tuple(profile)
    first, last = measured[0].start + _DAY, measured[-1].end + _DAY
    points = []
    for point in profile:
        value = point.value
        if first <= point.start and point.end <= last and _valid_intensity(value):
            past = _covered_mean(measured, point.start - _DAY, point.end - _DAY)
            if past is not None:
                value = (1 - weight) * value + weight * past
        points.append(ForecastPoint(point.start, point.end, value))
    return tuple(points)


def _covered_mean(points: Sequence[ForecastPoint], start: datetime, end: datetime) -> float | None:
    """``mean_over`` when the points cover all of [start, end), else None."""
    covered = sum(max(0.0, (min(p.end, end) - max(p.start, start)).total_seconds()) for p in points)
    if covered < (end - start).total_seconds() - 1e-6:
        return None
    return mean_over(points, start, end)


def anomaly_weight(hours_ahead: float, half_life_hours: float) -> float:
    """The share of today's anomaly still expected ``hours_ahead`` after the latest measurement."""
    return float(0.5 ** (max(0.0, hours_ahead) / half_life_hours))


def live_corrected(
    profile: Iterable[ForecastPoint], anomaly: Anomaly, half_life: timedelta = LIVE_HALF_LIFE
) -> tuple[ForecastPoint, ...]:
    """The profile's points after the latest measurement, each moved by the anomaly as faded at its midpoint;
    never below zero (a grid's intensity is not negative, and a negative value would read as a gap)."""
    half_life_hours = half_life.total_seconds() / 3600
    points = []
    for point in profile:
        if point.end <= anomaly.measured_until or not _valid_intensity(point.value):
            continue
        middle = point.start + (point.end - point.start) / 2
        ahead = (middle - anomaly.measured_until).total_seconds() / 3600
        value = point.value + anomaly.value * anomaly_weight(ahead, half_life_hours)
        points.append(ForecastPoint(point.start, point.end, max(0.0, value)))
    return tuple(points)


# --------------------------------------------------------------------------------------------------------------
# HTTP: bounded, no redirects, requests when importable
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: Mapping[str, str]  # lower-case names
    body: bytes
    secrets: tuple[str, ...] = ()  # credentials sent with the request: never quoted back, even if echoed

    def excerpt(self, limit: int = 80) -> str:
        """A short, secret-free quote of the body for log lines."""
        return _quote(self.body.decode("utf-8", "replace"), self.secrets, limit)

    def json(self) -> Any:
        import json

        try:
            return json.loads(self.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise SourceError(f"response is not JSON ({self.excerpt()})") from exc

    def retry_after(self) -> float | None:
        value = self.headers.get("retry-after", "").strip()
        if _ascii_digits(value):
            return float(value)
        if value:
            try:
                from email.utils import parsedate_to_datetime

                return max(0.0, parsedate_to_datetime(value).timestamp() - CLOCK.time())
            except (TypeError, ValueError):
                return None
        return None


def _ascii_digits(text: str) -> bool:
    """'42', not '²' or '٤٢': str.isdigit() accepts both, and float()/int() then fail on the first."""
    return text.isascii() and text.isdigit()


def _quote(text: str, secrets: Sequence[str] = (), limit: int = 80) -> str:
    """A short quote for a log line: redacted first, then cut, so no half of a secret survives the cut."""
    text = _redact(text[: limit + 4096], secrets).replace("\n", " ").strip()  # 4096: room for any secret's forms
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


def _http_backend() -> str:
    """'requests' when importable (connection reuse), else 'urllib'; CARBONAWARE_HTTP_CLIENT forces one."""
    wanted = os.environ.get("CARBONAWARE_HTTP_CLIENT", "").strip().lower()
    if wanted == "urllib":
        return "urllib"
    try:
        import requests  # noqa: F401
    except ImportError:
        return "urllib"
    return "requests"


_REQUEST_SENT = threading.Event()  # set once this process has sent a request through http_request


def _transport(backend: str | None) -> str:
    """The transport for one request: ``backend`` when given, else _http_backend() -- except that, unless
    CARBONAWARE_HTTP_CLIENT asks for requests, the process's first request goes by urllib while requests is not
    imported yet. A kept-alive connection is all requests adds, the first request has none to reuse, and importing
    requests takes longer than a whole request to a nearby API: the first decision in a process should not wait
    for it. From the second request on, requests (imported then, once) keeps connections alive."""
    if backend:
        return backend
    first = not _REQUEST_SENT.is_set()
    _REQUEST_SENT.set()
    wanted = os.environ.get("CARBONAWARE_HTTP_CLIENT", "").strip().lower()
    if first and wanted != "requests" and "requests" not in sys.modules:
        return "urllib"
    return _http_backend()


def http_request(
    method: str,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = HTTP_TIMEOUT_SECONDS,
    max_bytes: int = MAX_BODY_BYTES,
    backend: str | None = None,
    secrets: Sequence[str] = (),
) -> HttpResponse:
    """One request with a total time budget and a size cap; any status is returned, redirects are not followed.

    Following redirects would carry API keys to another host, and urllib cannot redo a POST after a 307. Socket
    timeouts bound each receive, not DNS nor a server trickling its headers, so the request runs in a worker
    thread that is abandoned at the deadline: the budget holds whatever the network does. ``secrets`` are more
    strings to keep out of errors, besides credential headers and URL credentials (a password a server echoes).
    """
    deadline = time.monotonic() + timeout
    chosen = _transport(backend)
    found = (*_secrets_in(headers or {}), *_url_secrets(url), *(secret for secret in secrets if secret))
    secrets = tuple(sorted(set(found), key=len, reverse=True))
    remember_secrets(secrets)
    direct = _is_loopback(url)  # loopback goes straight there: an HTTP_PROXY must not see a local service's traffic

    def call() -> HttpResponse:
        if chosen == "requests":
            return _requests_call(method, url, headers or {}, body, deadline, max_bytes, direct=direct)
        return _urllib_call(method, url, headers or {}, body, deadline, max_bytes, proxies=not direct)

    result = _bounded_call(call, deadline, "carbonaware-http")
    if result is None:
        raise SourceError(f"no answer within {timeout:g}s (timeout)")
    if isinstance(result, SourceError):
        raise SourceError(_redact(str(result), secrets)[:300], result.retry_after) from None
    if isinstance(result, BaseException):
        raise SourceError(_redact(_transport_message(result, timeout), secrets)[:300]) from None
    return replace(result, secrets=secrets)


class _RequestSockets:
    """The sockets one request's worker opened or reuses. At the deadline the caller shuts them down, so a
    receive blocked on a server that trickles its status line or headers (or sends ``100 Continue`` for ever)
    returns at once and the worker ends. Only shut down, never closed from here: the worker closes its own
    socket, so a descriptor number can never be reused by another ``open()`` while the worker still holds it."""

    __slots__ = ("_lock", "_sockets", "_state")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sockets: list[Any] = []
        self._state = "running"  # then "finished" (the answer is in) or "expired" (the deadline passed first)

    def add(self, sock: Any) -> None:
        with self._lock:
            if self._state == "running":
                self._sockets.append(sock)
                return
            expired = self._state == "expired"
        if expired:
            _shutdown_socket(sock)

    def finish(self) -> None:
        """The answer is read: from now on the socket may go back to a pool, so the deadline must not touch it."""
        with self._lock:
            if self._state == "expired":
                raise TimeoutError("timed out")
            self._state, self._sockets = "finished", []

    def expire(self) -> None:
        with self._lock:
            if self._state != "running":
                return
            self._state, sockets, self._sockets = "expired", self._sockets, []
        for sock in sockets:
            _shutdown_socket(sock)


def _shutdown_socket(sock: Any) -> None:
    import socket

    try:  # the plain socket's shutdown, also for an SSLSocket (whose own would drop its TLS state mid-read)
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except (OSError, TypeError, ValueError):  # already closed, or not a socket at all
        pass


_CURRENT = threading.local()  # .sockets: the _RequestSockets of the request this worker thread runs


def _track_socket(sock: Any) -> None:
    """Called by our connection classes wherever a socket is opened or reused for a request."""
    sockets: _RequestSockets | None = getattr(_CURRENT, "sockets", None)
    if sockets is not None and sock is not None:
        sockets.add(sock)


def _request_finished() -> None:
    sockets: _RequestSockets | None = getattr(_CURRENT, "sockets", None)
    if sockets is not None:
        sockets.finish()


def _bounded_call(call: Callable[[], HttpResponse], deadline: float, name: str) -> HttpResponse | BaseException | None:
    """``call()`` in a worker thread; its answer or exception, or None once ``deadline`` passed -- and then its
    sockets are shut down, so the worker does not outlive the deadline (or the caller's interruption) by more than
    a moment either."""
    sockets = _RequestSockets()
    outcome: list[HttpResponse | BaseException] = []

    def work() -> None:
        _CURRENT.sockets = sockets
        try:
            outcome.append(call())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread below
            outcome.append(exc)

    worker = threading.Thread(target=work, name=name, daemon=True)
    worker.start()
    try:
        worker.join(max(0.0, deadline - time.monotonic()) + 0.05)
    except BaseException:  # Ctrl-C or a run's timeout raised in this thread: the worker must end with it
        sockets.expire()
        raise
    if outcome:
        return outcome[0]
    sockets.expire()  # what the worker reports after this (a reset connection) came too late to count
    return None


# --------------------------------------------------------------------------------------------------------------
# Secrets: one redaction step for every message and log record
# --------------------------------------------------------------------------------------------------------------


_SENSITIVE_HEADERS = ("authorization", "auth-token", "x-api-key", "cookie", "proxy-authorization")


_SENSITIVE_PARAM_WORDS = frozenset(
    {"key", "apikey", "token", "secret", "password", "passwd", "pass", "auth", "sig", "signature", "credential"}
)


def _url_secrets(url: str) -> tuple[str, ...]:
    """Credentials a URL may carry: a userinfo password, values of query parameters named like keys or tokens
    (as written and decoded)."""
    from urllib.parse import unquote_plus, urlsplit

    try:
        parts = urlsplit(url)
        found = [parts.password or ""]
    except ValueError:
        return ()
    for pair in parts.query.split("&"):
        name, _, value = pair.partition("=")
        if _SENSITIVE_PARAM_WORDS.intersection(re.split(r"[^a-z0-9]+", name.lower())):
            found += [value, unquote_plus(value)]
    return tuple(value for value in found if len(value) >= 4)


def _secrets_in(headers: Mapping[str, str]) -> tuple[str, ...]:
    """Credential values and their long words ('Bearer T' -> 'T', not 'Bearer'), longest first."""
    values = [v for k, v in headers.items() if k.lower() in _SENSITIVE_HEADERS]
    pieces = {value for value in values if len(value) >= 4}
    pieces |= {word for value in values for word in value.split() if len(word) >= 8}
    return tuple(sorted(pieces, key=len, reverse=True))


MAX_REMEMBERED_SECRETS = 64
_SECRETS: dict[str, tuple[str, ...]] = {}  # secret -> the forms it may take in text; oldest first
_SECRET_FORMS: tuple[str, ...] = ()  # every form of every remembered secret, longest first
_SECRETS_LOCK = threading.Lock()


def remember_secrets(secrets: Iterable[str]) -> None:
    """Keys, passwords and tokens in use in this process: no SourceError message and no record logged through
    the ``carbonaware`` or ``urllib3`` loggers will hold one. Bounded: the oldest are forgotten first."""
    global _SECRET_FORMS
    fresh = [secret for secret in secrets if len(secret) >= 4 and secret not in _SECRETS]
    if not fresh:
        return
    with _SECRETS_LOCK:
        for secret in fresh:
            _SECRETS[secret] = _secret_forms(secret)
        while len(_SECRETS) > MAX_REMEMBERED_SECRETS:
            del _SECRETS[next(iter(_SECRETS))]
        _SECRET_FORMS = tuple(sorted({f for forms in _SECRETS.values() for f in forms}, key=len, reverse=True))


def _secret_forms(secret: str) -> tuple[str, ...]:
    """The secret as written, repr- and JSON-escaped, and percent-encoded (quote, quote_plus, either hex case)."""
    import json
    from urllib.parse import quote, quote_plus

    forms = {secret, repr(secret)[1:-1], json.dumps(secret)[1:-1], json.dumps(secret)[1:-1].replace("/", "\\/")}
    forms |= {quote(secret), quote(secret, safe=""), quote_plus(secret), quote_plus(secret, safe="")}
    forms |= {re.sub(r"%[0-9A-F]{2}", lambda m: m.group().lower(), form) for form in forms}
    return tuple(form for form in forms if len(form) >= 4)


def _redact(text: str, secrets: Sequence[str]) -> str:
    """``text`` without any form of ``secrets`` or of the remembered ones."""
    forms: Iterable[str] = _SECRET_FORMS
    if secrets:
        extra = {form for secret in secrets if len(secret) >= 4 for form in _secret_forms(secret)}
        forms = sorted(extra.union(_SECRET_FORMS), key=len, reverse=True)
    for form in forms:
        if form in text:
            text = text.replace(form, "***")
    return text


class _RedactingFilter(logging.Filter):
    """Takes remembered secrets out of log records (urllib3 logs request lines with their query at DEBUG)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not _SECRET_FORMS:
            return True
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is logging's business, not ours
            return True
        cleaned = _redact(message, ())
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = _redact(logging.Formatter().formatException(record.exc_info), ())
        elif record.exc_text:
            record.exc_text = _redact(record.exc_text, ())
        return True


_REDACTING_FILTER = _RedactingFilter()
logger.addFilter(_REDACTING_FILTER)


def _filter_loggers(prefixes: Sequence[str]) -> None:
    """Put the redacting filter on these loggers and their existing children (a filter on a parent does not see
    records its children log)."""
    names = {name for name in logging.root.manager.loggerDict if name.startswith(tuple(f"{p}." for p in prefixes))}
    for name in {*prefixes, *names}:
        target = logging.getLogger(name)
        if _REDACTING_FILTER not in target.filters:
            target.addFilter(_REDACTING_FILTER)


# --------------------------------------------------------------------------------------------------------------
# HTTP transports: urllib and requests, bounded reads, loopback and safe URLs
# --------------------------------------------------------------------------------------------------------------


def _transport_message(exc: BaseException, timeout: float) -> str:
    root = _root_cause(exc)
    text = f"{exc} {root}".lower()
    if isinstance(root, TimeoutError) or "timed out" in text or "timeout" in type(root).__name__.lower():
        return f"no answer within {timeout:g}s (timeout)"
    if isinstance(root, ConnectionRefusedError) or "refused" in text:
        return "connection refused"
    return f"connection failed ({type(root).__name__}: {root})"


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost error under urllib's URLError.reason or requests' wrapped urllib3 errors."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        reason = getattr(exc, "reason", None)
        wrapped = exc.args[0] if exc.args and isinstance(exc.args[0], BaseException) else None
        inner = reason if isinstance(reason, BaseException) else wrapped or exc.__cause__
        if inner is None:
            break
        exc = inner
    return exc


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("timed out")
    return left


def _read_bounded(
    read: Callable[[int], bytes], deadline: float, max_bytes: int, settimeout: Callable[[float], None]
) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        settimeout(_remaining(deadline))
        chunk = read(65536)  # at most one receive, so a trickled body cannot stretch the budget
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > max_bytes:
            raise SourceError(f"response larger than {max_bytes // (1024 * 1024)} MB, refused")
        chunks.append(chunk)


def _check_declared_size(headers: Mapping[str, str], max_bytes: int) -> None:
    declared = headers.get("content-length", "")
    if _ascii_digits(declared) and int(declared) > max_bytes:
        raise SourceError(f"response larger than {max_bytes // (1024 * 1024)} MB ({declared} bytes), refused")


def _socket_settimeout(http_response: Any) -> Callable[[float], None]:
    """Reach the socket under an http.client response so each read gets the remaining budget, not a fresh one."""

    def settimeout(seconds: float) -> None:
        try:
            http_response.fp.raw._sock.settimeout(seconds)
        except (AttributeError, OSError):  # already closed at end of body, or not a plain socket
            pass

    return settimeout


_URLLIB_OPENERS: dict[bool, Any] = {}


def _urllib_opener(proxies: bool) -> Any:
    if proxies not in _URLLIB_OPENERS:
        import http.client
        import urllib.request

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args: Any, **kwargs: Any) -> None:
                return None

        class TrackedHTTPConnection(http.client.HTTPConnection):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                create = self._create_connection  # type: ignore[has-type]

                def create_tracked(*a: Any, **k: Any) -> Any:
                    sock = create(*a, **k)
                    _track_socket(sock)  # before a proxy tunnel or TLS handshake reads anything
                    return sock

                self._create_connection = create_tracked

            def connect(self) -> None:
                super().connect()
                _track_socket(self.sock)  # the TLS socket that replaced the plain one

        class TrackedHTTPSConnection(TrackedHTTPConnection, http.client.HTTPSConnection):
            pass

        class TrackedHTTPHandler(urllib.request.HTTPHandler):
            def http_open(self, req: Any) -> Any:
                return self.do_open(TrackedHTTPConnection, req)

        class TrackedHTTPSHandler(urllib.request.HTTPSHandler):
            def https_open(self, req: Any) -> Any:
                return self.do_open(TrackedHTTPSConnection, req, context=getattr(self, "_context", None))

        handlers: list[Any] = [NoRedirect(), TrackedHTTPHandler(), TrackedHTTPSHandler()]
        if not proxies:
            handlers.append(urllib.request.ProxyHandler({}))
        _URLLIB_OPENERS[proxies] = urllib.request.build_opener(*handlers)
    return _URLLIB_OPENERS[proxies]


def _urllib_call(
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes | None,
    deadline: float,
    max_bytes: int,
    proxies: bool,
) -> HttpResponse:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, method=method, headers=dict(headers))
    try:
        response = _urllib_opener(proxies).open(request, timeout=_remaining(deadline))
    except urllib.error.HTTPError as error:  # non-2xx: still an answer, with a body worth reading
        response = error
    with response:
        response_headers = {k.lower(): v for k, v in response.headers.items()}
        _check_declared_size(response_headers, max_bytes)
        inner: Any = response.fp if isinstance(response, urllib.error.HTTPError) else response  # http.client's
        payload = _read_bounded(inner.read1, deadline, max_bytes, _socket_settimeout(inner))
        declared = response_headers.get("content-length", "")
        if _ascii_digits(declared) and len(payload) < int(declared):  # read1 ends quietly where read() would raise
            raise SourceError(f"connection closed early: response cut short ({len(payload)} of {declared} bytes)")
        _request_finished()
        return HttpResponse(int(response.status), response_headers, payload)


_SESSIONS: dict[bool, Any] = {}  # direct (loopback, no proxies from the environment) -> requests.Session
_SESSION_LOCK = threading.Lock()


def _requests_session(direct: bool = False) -> Any:
    with _SESSION_LOCK:
        if direct not in _SESSIONS:
            _SESSIONS[direct] = _new_requests_session(direct)
        return _SESSIONS[direct]


def _new_requests_session(direct: bool) -> Any:
    """A Session whose connections report their sockets to the request they serve, so the deadline can end a
    worker blocked in the status line or headers. ``direct``: environment proxies (and .netrc) are ignored."""
    import requests
    import urllib3
    from requests.adapters import HTTPAdapter

    class Tracking:  # before urllib3's connection classes in the MRO, for plain and TLS connections alike
        sock: Any

        def _new_conn(self) -> Any:
            sock = super()._new_conn()  # type: ignore[misc]
            _track_socket(sock)
            return sock

        def getresponse(self, *args: Any, **kwargs: Any) -> Any:
            _track_socket(self.sock)  # a kept-alive socket from the pool, or the TLS one from connect()
            return super().getresponse(*args, **kwargs)  # type: ignore[misc]

    class TrackedHTTPConnection(Tracking, urllib3.connection.HTTPConnection):
        pass

    class TrackedHTTPSConnection(Tracking, urllib3.connection.HTTPSConnection):
        pass

    class TrackedHTTPPool(urllib3.HTTPConnectionPool):
        ConnectionCls = TrackedHTTPConnection

    class TrackedHTTPSPool(urllib3.HTTPSConnectionPool):
        ConnectionCls = TrackedHTTPSConnection

    class TrackedAdapter(HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = {"http": TrackedHTTPPool, "https": TrackedHTTPSPool}

    _filter_loggers(("urllib3", "requests", "carbonaware"))
    session = requests.Session()
    session.trust_env = not direct
    session.mount("http://", TrackedAdapter())
    session.mount("https://", TrackedAdapter())
    return session


def _requests_call(
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes | None,
    deadline: float,
    max_bytes: int,
    direct: bool = False,
) -> HttpResponse:
    budget = _remaining(deadline)
    # a direct session does not read the environment: the CA bundle it names still applies (a local TLS service)
    verify = (os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True) if direct else None
    response = _requests_session(direct).request(
        method,
        url,
        headers=dict(headers),
        data=body,
        timeout=(budget, budget),
        allow_redirects=False,
        stream=True,
        verify=verify,
    )
    with response:
        response_headers = {k.lower(): v for k, v in response.headers.items()}
        _check_declared_size(response_headers, max_bytes)
        settimeout = _socket_settimeout(getattr(response.raw, "_fp", None))
        read = getattr(response.raw, "read1", response.raw.read)  # read1: one recv, so the deadline holds
        payload = _read_bounded(lambda n: read(n, decode_content=True), deadline, max_bytes, settimeout)
        _request_finished()  # before the connection goes back to the pool
        return HttpResponse(response.status_code, response_headers, payload)


def expect_json(response: HttpResponse, what: str) -> Any:
    """The JSON of a 2xx answer, or a SourceError naming the status and a short, secret-free excerpt."""
    if response.status == 429:
        after = response.retry_after()
        hint = f", retry after {after:g}s" if after is not None else ""
        raise SourceError(f"{what} rate-limited (HTTP 429{hint})", retry_after=after)
    if 300 <= response.status < 400:
        where = _redact(response.headers.get("location", "?"), response.secrets)[:80]  # redacted, then cut
        raise SourceError(f"{what} answered a redirect (HTTP {response.status} to {where}); check the URL")
    if response.status >= 400 or response.status < 200:
        after = response.retry_after()
        hint = f", retry after {after:g}s" if after is not None else ""
        raise SourceError(f"{what} answered HTTP {response.status}{hint} ({response.excerpt()})", after)
    return response.json()


def _is_loopback(url: str) -> bool:
    """Whether the URL's host is a loopback address (127.0.0.0/8, ::1, also IPv4-mapped) or exactly
    'localhost' -- decided from the parsed host, never by a name's prefix, and before any DNS lookup."""
    import ipaddress
    from urllib.parse import urlsplit

    try:
        host = urlsplit(url).hostname or ""
    except ValueError:
        return False
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool((mapped or address).is_loopback)


def _require_safe_url(url: str, *, carries_secret: bool) -> None:
    """Secrets travel only over HTTPS, or plain HTTP to loopback (tests, local proxies)."""
    if not url.lower().startswith(("https://", "http://")):
        raise SourceError(f"unsupported URL scheme in {_quote(url, _url_secrets(url), limit=60)}")
    if carries_secret and url.lower().startswith("http://") and not _is_loopback(url):
        raise SourceError("refusing to send credentials over plain HTTP to a non-loopback host; use https://")


def base_url(env_name: str, default: str) -> str:
    return (os.environ.get(env_name) or default).rstrip("/")


# --------------------------------------------------------------------------------------------------------------
# One cache for every source: one fetch per key per TTL, however many callers ask at once
# --------------------------------------------------------------------------------------------------------------


class _Entry:
    __slots__ = ("done", "error", "expires", "value")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.error: SourceError | None = SourceError("the fetch was interrupted")
        self.expires = 0.0


class SingleFlightCache:
    """Values and failures by key. Concurrent callers of a missing key wait for one fetch instead of each making
    their own; failures are remembered only briefly (or as long as Retry-After asks, within reason)."""

    def __init__(self, max_entries: int = 256) -> None:
        self._lock = threading.Lock()
        self._entries: dict[Hashable, _Entry] = {}
        self._blocked: dict[str, tuple[float, str]] = {}  # source -> (monotonic time, the answer that said so)
        self._max_entries = max_entries

    def get(
        self,
        key: Hashable,
        fetch: Callable[[], Any],
        ttl: float,
        *,
        failure_ttl: float | None = None,
        wait: float | None = None,
        reusable: Callable[[Any], bool] | None = None,
    ) -> Any:
        """The cached value, or the one fetch for ``key``; a follower waits for it at most ``wait`` seconds.
        ``reusable(value)``: whether a finished value still answers this caller; if not, the caller fetches afresh
        (and those who come while it does wait for that fetch)."""
        with self._lock:
            entry = self._entries.get(key)
            leader = entry is None or (entry.done.is_set() and not self._answers(entry, reusable))
            if leader:
                entry = _Entry()
                self._entries[key] = entry
                self._evict_if_full()
        assert entry is not None
        if leader:
            self._run(entry, fetch, ttl, FAILURE_TTL_SECONDS if failure_ttl is None else failure_ttl)
        elif not entry.done.wait(wait):
            raise SourceError(f"no answer within {wait:g}s (waiting for a request another caller made)")
        if entry.error is not None:  # a fresh exception per caller: a shared one would pile up tracebacks
            raise type(entry.error)(str(entry.error), entry.error.retry_after) from None
        return entry.value

    @staticmethod
    def _answers(entry: _Entry, reusable: Callable[[Any], bool] | None) -> bool:
        """A finished entry serves a caller while unexpired -- a value only if it still fits the caller's question."""
        if entry.expires <= CLOCK.monotonic():
            return False
        return entry.error is not None or reusable is None or bool(reusable(entry.value))

    def _run(self, entry: _Entry, fetch: Callable[[], Any], ttl: float, failure_ttl: float) -> None:
        try:
            entry.value = fetch()
            entry.error = None
            entry.expires = CLOCK.monotonic() + ttl
        except _CallerOutOfTime as error:
            entry.error = error
            entry.expires = CLOCK.monotonic()  # shared with callers waiting now, then fetched afresh
        except SourceError as error:
            entry.error = error
            hold = min(error.retry_after, MAX_RETRY_AFTER_SECONDS) if error.retry_after else failure_ttl
            entry.expires = CLOCK.monotonic() + max(hold, failure_ttl)
        except Exception as exc:  # noqa: BLE001 - a source bug must not escape into user work
            entry.error = SourceError(f"{type(exc).__name__}: {_quote(str(exc), limit=160)}")
            entry.expires = CLOCK.monotonic() + failure_ttl
        finally:
            entry.done.set()

    def _evict_if_full(self) -> None:
        """Expired entries first, then the oldest finished ones; a fetch under way is never dropped."""
        if len(self._entries) <= self._max_entries:
            return
        now = CLOCK.monotonic()
        finished = [k for k, e in self._entries.items() if e.done.is_set()]
        for key in sorted(finished, key=lambda k: self._entries[k].expires > now):  # expired ones first
            del self._entries[key]
            if len(self._entries) <= self._max_entries:
                return

    def block(self, name: str, error: SourceError) -> None:
        """A provider said Retry-After: no request to it, for any key, until then."""
        until = CLOCK.monotonic() + min(error.retry_after or 0.0, MAX_RETRY_AFTER_SECONDS)
        with self._lock:
            if until > self._blocked.get(name, (0.0, ""))[0]:
                self._blocked[name] = (until, str(error))

    def check_not_blocked(self, name: str) -> None:
        until, why = self._blocked.get(name, (0.0, ""))
        if until > CLOCK.monotonic():
            raise SourceError(f"{why}; next request in {until - CLOCK.monotonic():.0f}s")

    def forget(self, key: Hashable) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._blocked.clear()

    def reset_after_fork(self) -> None:
        """In a forked child: no thread is left to finish a fetch that was in flight, so it is dropped (the
        child asks afresh instead of waiting for it and failing open for ever); the lock and the finished
        entries' events are new, as a parent thread may have held one at the fork."""
        self._lock = threading.Lock()
        kept: dict[Hashable, _Entry] = {}
        for key, entry in list(self._entries.items()):
            if entry.done.is_set():
                entry.done = threading.Event()
                entry.done.set()
                kept[key] = entry
        self._entries = kept


CACHE = SingleFlightCache()


def clear_cache() -> None:
    """Forget detected zones, forecasts and remembered failures (tests; long-lived processes that moved)."""
    CACHE.clear()
    _WARNED.clear()


_WARNED: set[str] = set()


def _after_fork_in_child() -> None:
    """A forked child (gunicorn, celery prefork, multiprocessing) starts with one thread: locks a parent thread
    held stay held and fetches in flight never finish, so both are reset. The requests sessions are dropped, not
    closed -- their pooled keep-alive sockets are the parent's too, and a child reading from them would get the
    parent's answers (closing or shutting them down here would cut the parent's). urllib keeps no sockets."""
    global _SESSION_LOCK, _SECRETS_LOCK, _OFFLINE_LOCK, _READING_LOCK
    CACHE.reset_after_fork()
    _SESSION_LOCK = threading.Lock()
    _SESSIONS.clear()
    _SECRETS_LOCK = threading.Lock()
    _OFFLINE_LOCK = threading.Lock()
    _READING_LOCK = threading.Lock()
    _READING.clear()  # no reading thread came along: a file the parent was stuck on may be tried again


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _warn_once(message: str) -> None:
    """A warning about the set-up (not about one decision): once per process, not on every plan."""
    if message not in _WARNED:
        _WARNED.add(message)
        logger.warning(message)


# --------------------------------------------------------------------------------------------------------------
# Zone detection: environment first, then the metadata services of AWS, GCP and Azure in parallel
# --------------------------------------------------------------------------------------------------------------

METADATA_HOST = "169.254.169.254"
_REGION_PATTERN = r"^[a-z]{2,}(?:-[a-z0-9]+)*-?\d*[a-z]*$"
_AWS_REGION = r"^[a-z]{2}(?:-[a-z]+)+-\d+$"


def _normalise_region(provider: str, region: str) -> str:
    cleaned = region.strip().lower()
    if provider == "azure":
        cleaned = cleaned.replace(" ", "")
    return cleaned


def _zone_from_environment(env: Mapping[str, str]) -> tuple[CloudZone, str] | None:
    """Zones the environment states outright, with the variable that said so."""
    provider, region = (env.get("CARBONAWARE_PROVIDER", "").strip().lower(), env.get("CARBONAWARE_REGION", ""))
    if provider and region.strip():
        if provider in PROVIDERS:
            return CloudZone(provider, _normalise_region(provider, region)), "CARBONAWARE_PROVIDER/REGION"
        _warn_once(f"carbonaware: ignoring CARBONAWARE_PROVIDER={provider[:20]!r}: not one of {', '.join(PROVIDERS)}")
    elif provider or region.strip():
        missing = "CARBONAWARE_REGION" if provider else "CARBONAWARE_PROVIDER"
        _warn_once(f"carbonaware: ignoring CARBONAWARE_PROVIDER/REGION: {missing} is not set (they go together)")
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        value = env.get(name, "").strip().lower()
        if re.match(_AWS_REGION, value):
            return CloudZone("aws", value), name
    region_name = _normalise_region("azure", env.get("REGION_NAME", ""))
    if region_name and re.match(_REGION_PATTERN, region_name):
        return CloudZone("azure", region_name), "REGION_NAME"
    return None


def _metadata_base(env: Mapping[str, str], specific: str | None = None) -> str:
    host = (specific and env.get(specific)) or env.get("CARBONAWARE_METADATA_HOST") or METADATA_HOST
    host = host.strip().rstrip("/")
    return host if host.startswith(("http://", "https://")) else f"http://{host}"


class _ProbeUnsure(Exception):
    """A probe that could not tell whether the service is there (5xx, 429, refused, unreachable, timed out): the
    network may still be coming up, so this is asked again later, unlike a definite "not here"."""


def _probe_get(url: str, headers: Mapping[str, str], deadline: float, method: str = "GET") -> HttpResponse:
    """The answer of a service that answered (any status below 500 but 429); _ProbeUnsure otherwise. A probe,
    too, ends at its deadline however the server trickles."""
    body = b"" if method == "PUT" else None
    answer = _bounded_call(
        lambda: _urllib_call(method, url, headers, body, deadline, 64 * 1024, proxies=False),
        deadline,
        "carbonaware-probe",
    )
    if answer is None:
        raise _ProbeUnsure("timed out")
    if isinstance(answer, BaseException):  # refused, unreachable, timed out, reset: no answer yet
        raise _ProbeUnsure(type(_root_cause(answer)).__name__)
    if answer.status >= 500 or answer.status == 429:
        raise _ProbeUnsure(f"HTTP {answer.status}")
    return answer


def _probe_aws(env: Mapping[str, str], deadline: float) -> CloudZone | None:
    if env.get("AWS_EC2_METADATA_DISABLED", "").strip().lower() == "true":
        return None
    base = env.get("AWS_EC2_METADATA_SERVICE_ENDPOINT", "").rstrip("/") or _metadata_base(env)
    headers = {}
    unsure: _ProbeUnsure | None = None
    try:
        token = _probe_get(
            f"{base}/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "21600"}, deadline, method="PUT"
        )
        if token.status == 200 and 0 < len(token.body) < 512:
            headers["X-aws-ec2-metadata-token"] = token.body.decode("ascii", "replace").strip()
    except _ProbeUnsure as why:  # IMDSv1 may still answer without a token
        unsure = why
    answer = _probe_get(f"{base}/latest/meta-data/placement/region", headers, deadline)
    if answer.status != 200:
        if unsure is not None and answer.status == 401:  # needs the token the service could not give yet
            raise unsure
        return None
    region = answer.body.decode("ascii", "replace").strip()
    return CloudZone("aws", region) if re.match(_AWS_REGION, region) else None


def _probe_gcp(env: Mapping[str, str], deadline: float) -> CloudZone | None:
    base = _metadata_base(env, "GCE_METADATA_HOST")
    for path in ("instance/zone", "instance/region"):  # VMs answer the zone; Cloud Run and Functions the region
        answer = _probe_get(f"{base}/computeMetadata/v1/{path}", {"Metadata-Flavor": "Google"}, deadline)
        if answer.headers.get("metadata-flavor") != "Google":
            return None
        if answer.status == 200:
            region = _gcp_region(answer.body.decode("ascii", "replace").strip())
            return CloudZone("gcp", region) if region else None
    return None


def _gcp_region(text: str) -> str | None:
    """'projects/1/zones/us-central1-a' -> 'us-central1'; 'projects/1/regions/us-central1' -> 'us-central1'."""
    match = re.match(r"^projects/[^/]+/(zones|regions)/([a-z0-9-]+)$", text)
    if not match:
        return None
    kind, name = match.groups()
    if kind == "regions":
        return name
    region, _, letter = name.rpartition("-")
    return region if region and len(letter) == 1 else None


def _probe_azure(env: Mapping[str, str], deadline: float) -> CloudZone | None:
    base = _metadata_base(env)
    url = f"{base}/metadata/instance/compute/location?api-version=2021-02-01&format=text"
    answer = _probe_get(url, {"Metadata": "true"}, deadline)
    if answer.status != 200:
        return None
    region = _normalise_region("azure", answer.body.decode("ascii", "replace"))
    return CloudZone("azure", region) if re.match(r"^[a-z][a-z0-9]{2,40}$", region) else None


def _probe_ecs(env: Mapping[str, str], deadline: float) -> CloudZone | None:
    uri = env.get("ECS_CONTAINER_METADATA_URI_V4", "").strip().rstrip("/")
    if not uri:
        return None
    answer = _probe_get(f"{uri}/task", {}, deadline)
    if answer.status != 200:
        return None
    import json

    try:
        document = json.loads(answer.body)
        region = str(document.get("TaskARN", "")).split(":")[3]
    except (ValueError, AttributeError, IndexError):
        return None
    return CloudZone("aws", region) if re.match(_AWS_REGION, region) else None


_PROBES: tuple[Callable[[Mapping[str, str], float], CloudZone | None], ...] = (
    _probe_ecs,
    _probe_aws,
    _probe_gcp,
    _probe_azure,
)


def _probe_metadata(env: Mapping[str, str], timeout: float) -> CloudZone | None:
    """All probes at once; the first valid answer wins and nothing waits past ``timeout``. None only when every
    probe said "not here" for certain; a SourceError (remembered briefly) when any could not tell."""
    import queue

    deadline = time.monotonic() + timeout
    answers: queue.SimpleQueue[tuple[str, CloudZone | _ProbeUnsure | None]] = queue.SimpleQueue()

    def run(probe: Callable[[Mapping[str, str], float], CloudZone | None]) -> None:
        name = probe.__name__.removeprefix("_probe_")
        try:
            answers.put((name, probe(env, deadline)))
        except _ProbeUnsure as why:
            answers.put((name, why))
        except Exception:  # noqa: BLE001
            answers.put((name, None))

    for probe in _PROBES:
        threading.Thread(target=run, args=(probe,), name=f"carbonaware-{probe.__name__}", daemon=True).start()
    unsure: list[str] = []
    for _ in _PROBES:
        try:
            name, answer = answers.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise SourceError(
                f"no metadata service answered within {timeout:g}s; asking again in {DETECT_RETRY_SECONDS:g}s"
            ) from None
        if isinstance(answer, CloudZone):
            return answer
        if isinstance(answer, _ProbeUnsure):
            unsure.append(f"{name}: {answer}")
    if unsure:  # the network may still be coming up: not "not here" for the life of the process
        raise SourceError(f"metadata unsure ({', '.join(unsure)}); asking again in {DETECT_RETRY_SECONDS:g}s")
    return None  # every probe answered "not here": that holds for the life of the process


_DETECTION_SETTINGS = (
    "CARBONAWARE_METADATA_HOST",
    "GCE_METADATA_HOST",
    "AWS_EC2_METADATA_SERVICE_ENDPOINT",
    "AWS_EC2_METADATA_DISABLED",
    "ECS_CONTAINER_METADATA_URI_V4",
)
DETECT_RETRY_SECONDS = 60.0  # a metadata service too slow, failing or unreachable at start-up is asked again soon


def detect_cloud_zone(timeout: float = DETECT_TIMEOUT_SECONDS) -> CloudZone | None:
    """The zone this process runs in, or None. Environment first; a metadata answer (or every service saying "not
    here") is kept for the process; no answer yet (timeout, refused, 5xx) only for DETECT_RETRY_SECONDS."""
    found = _zone_from_environment(os.environ)
    if found is not None:
        logger.debug("carbonaware: zone %s from %s", found[0], found[1])
        return found[0]
    env = dict(os.environ)
    key = ("detect", *(env.get(name) for name in _DETECTION_SETTINGS))
    try:
        zone: CloudZone | None = CACHE.get(
            key,
            lambda: _probe_metadata(env, timeout),
            ttl=math.inf,
            failure_ttl=DETECT_RETRY_SECONDS,
            wait=timeout + 0.1,
        )
    except SourceError as error:
        logger.debug("carbonaware: %s", error)
        return None
    return zone


# --------------------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------------------

CARBONAWARE_BASE_URL = "https://scheduler.carbonaware.dev"


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# The (provider, region) pairs the hosted scheduler accepts: the region enums of carbon-aware/scheduler
# scheduler/src/regions/{aws,azure}.py @cb0d9b9, gcp.py @6c66ba1, ovh.py @2683546 (100 pairs, as its GET /v0/regions/
# lists them). Any other region gets a 422 whose excerpt names `enum[AwsRegion]` whatever the provider, so the
# client says what is wrong instead of sending the request.
SCHEDULER_REGIONS: dict[str, frozenset[str]] = {
    "aws": _words(
        "af-south-1 ap-east-1 ap-northeast-1 ap-northeast-2 ap-northeast-3 ap-south-1 ap-south-2 ap-southeast-2 "
        "ap-southeast-3 ap-southeast-4 ap-southeast-5 ap-southeast-7 ca-central-1 ca-west-1 eu-central-1 eu-central-2 "
        "eu-north-1 eu-south-1 eu-south-2 eu-west-1 eu-west-2 eu-west-3 il-central-1 me-central-1 mx-central-1 "
        "sa-east-1 us-east-1 us-east-2 us-west-1 us-west-2"
    ),
    "gcp": _words(
        "asia-east1 asia-northeast1 asia-southeast1 europe-north1 europe-west1 europe-west3 europe-west4 "
        "northamerica-northeast2 southamerica-west1 us-central1 us-east1 us-east4 us-west1 us-west2"
    ),
    "azure": _words(
        "australiacentral australiaeast australiasoutheast brazilsouth canadacentral canadaeast centralindia "
        "centralus chinaeast2 chinanorth chinanorth2 chinanorth3 eastasia eastus eastus2 francecentral "
        "germanywestcentral indonesiacentral israelcentral italynorth japaneast japanwest koreacentral mexicocentral "
        "newzealandnorth northcentralus northeurope norwayeast polandcentral southafricanorth southcentralus "
        "southindia spaincentral swedencentral switzerlandnorth uaenorth uksouth ukwest westcentralus westeurope "
        "westus westus2 westus3"
    ),
    "ovh": _words(
        "ca-beauharnois ca-toronto de-frankfurt fr-gravelines fr-paris fr-roubaix fr-strasbourg gb-london in-mumbai "
        "pl-warsaw sg-singapore us-hillsboro us-vint_hill"
    ),
}
SCHEDULER_SHORTEST_JOB = timedelta(minutes=5)  # shorter durations always get HTTP 500 from the real server
SCHEDULER_HORIZON = timedelta(hours=24)  # it asks WattTime for ~24 h, whatever the window (protocols.md §7)


def _fetch_carbonaware(query: Query) -> Decision:
    """The hosted scheduler decides the start itself (WattTime MOER on a 5-minute grid)."""
    if query.zone is None:
        raise SourceError("the hosted scheduler needs a cloud zone")
    if query.zone.region not in SCHEDULER_REGIONS.get(query.zone.provider, frozenset()):
        raise SourceError(f"{query.zone} is not supported by the hosted scheduler")
    if query.duration > SCHEDULER_HORIZON:  # its rollup finds no start and answers 500
        raise SourceError(f"a job over {_human(SCHEDULER_HORIZON)} is longer than the hosted scheduler's forecast")
    url = base_url("CARBONAWARE_SCHEDULER_BASE_URL", CARBONAWARE_BASE_URL) + "/v0/schedule/"
    _require_safe_url(url, carries_secret=False)
    payload = {
        # it plans on a 5-minute grid and answers 500 to anything shorter: a shorter job is asked about as 5 minutes
        "duration": format_iso_duration(max(query.duration, SCHEDULER_SHORTEST_JOB)),
        "windows": [{"start": _iso(query.now), "end": _iso(query.now + query.window)}],
        "zones": [{"provider": query.zone.provider, "region": query.zone.region}],
        "num_options": 3,
    }
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    body = _json_bytes(payload)
    response = http_request("POST", url, headers=headers, body=body, timeout=query.budget())
    if response.status == 422 and b"enum[" in response.body[:65536]:
        raise SourceError(f"{query.zone} is not supported by the hosted scheduler (HTTP 422)")
    return _carbonaware_decision(expect_json(response, "scheduler"), query)


def _carbonaware_decision(document: Any, query: Query) -> Decision:
    """The scheduler's best start inside the window, with its own figures for that start. Its ideal may lie past
    the window's end (it rolls a mean of floor(job / 5 min) points over points up to end + job: 5 minutes past for a
    job of whole 5-minute steps, up to 10 otherwise): then the best of its other options inside the window is taken,
    or, if none is, the window's end without figures (the scheduler's are for another start)."""
    ideal = _field(document, "ideal", dict)
    start = _option_time(ideal, "ideal")
    earliest, latest = (query.now - timedelta(minutes=15), query.now + query.window + timedelta(minutes=10))
    if not earliest <= start <= latest:
        raise SourceError(f"scheduler: ideal.time {_iso(start)} lies outside the window {_iso(query.now)}..")
    expected = _moer_g_per_kwh(ideal.get("co2_intensity"), "ideal")
    naive = document.get("naive_case")
    now_value = _moer_g_per_kwh(naive.get("co2_intensity"), "naive_case") if isinstance(naive, dict) else None
    window_end = query.now + query.window
    ahead = query.window
    if start > window_end:
        inside = _best_option_within(document.get("options"), earliest, window_end)
        if inside is None:
            note = (
                f"the scheduler's best start, {_iso(start)}, lies past the window's end; its figures are for that "
                f"start, so none are given for {_iso(window_end)}"
            )
            return Decision(window_end, None, now_value, None, "gCO2/kWh (marginal)", looked_ahead=ahead, note=note)
        start, expected = inside
        return Decision(
            start, expected, now_value, _savings(now_value, expected), "gCO2/kWh (marginal)", looked_ahead=ahead
        )
    savings = _savings(now_value, expected)
    if savings is None:
        stated = document.get("carbon_savings")
        percent = stated.get("vs_naive_case") if isinstance(stated, dict) else None
        savings = float(percent) / 100.0 if _valid_intensity(percent) else None
    return Decision(
        start=start, expected=expected, now=now_value, savings=savings, unit="gCO2/kWh (marginal)", looked_ahead=ahead
    )


def _option_time(option: dict[str, Any], where: str) -> datetime:
    try:
        return parse_datetime(str(_field(option, "time", str)))
    except ValueError as exc:
        raise SourceError(f"scheduler: {where}.time is not a date ({exc})") from None


def _best_option_within(options: Any, earliest: datetime, latest: datetime) -> tuple[datetime, float] | None:
    """(start, g/kWh) of the lowest-intensity option starting in [earliest, latest]; malformed options are skipped."""
    found: list[tuple[float, datetime]] = []
    for option in options if isinstance(options, list) else ():
        if not isinstance(option, dict) or not _valid_intensity(option.get("co2_intensity")):
            continue
        try:
            moment = parse_datetime(str(option.get("time")))
        except ValueError:
            continue
        if moment.tzinfo is not None and earliest <= moment <= latest:
            found.append((float(option["co2_intensity"]) * LBS_PER_MWH_TO_G_PER_KWH, moment))
    if not found:
        return None
    value, moment = min(found, key=lambda item: (item[0], item[1]))
    return moment, value


def _field(document: Any, name: str, kind: type | tuple[type, ...]) -> Any:
    value = document.get(name) if isinstance(document, dict) else None
    if not isinstance(value, kind):
        kind = kind if isinstance(kind, type) else kind[0]
        raise SourceError(f"unexpected answer: no {name!r} {kind.__name__} in {_quote(repr(document), limit=200)}")
    return value


def _moer_g_per_kwh(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if not _valid_intensity(value):
        raise SourceError(
            f"scheduler: {where}.co2_intensity is not a valid intensity ({_quote(repr(value), limit=40)})"
        )
    return float(value) * LBS_PER_MWH_TO_G_PER_KWH


register_source(
    Source(
        "carbonaware",
        _fetch_carbonaware,
        cache_key=lambda q: (
            base_url("CARBONAWARE_SCHEDULER_BASE_URL", CARBONAWARE_BASE_URL),
            q.zone,
            q.duration,
            round(q.window.total_seconds() / 60),
        ),
        ttl=300.0,
        horizon=SCHEDULER_HORIZON,
    )
)


# ---- series documents (file, url, callables) --------------------------------------------------------------------

_START_KEYS = ("start", "datetime", "timestamp", "point_time", "from", "time")
_END_KEYS = ("end", "to")
_VALUE_KEYS = ("value", "carbonIntensity", "carbon_intensity", "intensity", "forecast", "co2_intensity")


def series_from_starts(
    rows: Iterable[tuple[datetime, float, timedelta | None]], default_period: timedelta | None = None
) -> tuple[ForecastPoint, ...]:
    """Points given by their start (and maybe their length). Without a length, a point lasts ``default_period`` or,
    if none is known, until the next start -- unless that is over 1.5 typical spacings away (the median gap, which
    timestamps jittered by a few milliseconds do not disturb), so a missing item stays a gap."""
    ordered = sorted(rows, key=lambda row: row[0])
    gaps = sorted(b[0] - a[0] for a, b in itertools.pairwise(ordered) if b[0] > a[0])
    spacing = default_period or (gaps[len(gaps) // 2] if gaps else timedelta(hours=1))
    points = []
    for i, (start, value, length) in enumerate(ordered):
        if length is not None or default_period is not None:
            end = start + (length or spacing)
        elif i + 1 < len(ordered) and ordered[i + 1][0] - start <= spacing * 1.5:
            end = ordered[i + 1][0]
        else:
            end = start + spacing
        points.append(ForecastPoint(start, end, value))
    return tuple(points)


def parse_series_document(document: Any) -> tuple[ForecastPoint, ...]:
    """A list of {start[, end], value} objects in any of the common spellings, possibly wrapped in
    {"forecast"|"data"|"points": [...]}. Values are gCO2eq/kWh."""
    items = document
    if isinstance(document, dict):
        items = next((document[k] for k in ("forecast", "data", "points", "forecastData") if k in document), None)
    if not isinstance(items, list) or not items:
        raise SourceError("series: expected a non-empty list of points")
    rows = []
    for index, item in enumerate(items, 1):  # messages describe the shape, never quote the content (a local file)
        if not isinstance(item, dict):
            raise SourceError(f"series: every point must be an object (point {index} is not)")
        start_text = next((item[k] for k in _START_KEYS if k in item), None)
        value = next((item[k] for k in _VALUE_KEYS if k in item), None)
        if isinstance(value, dict):  # NESO-style {"intensity": {"forecast": 120}}
            value = value.get("forecast")
        if isinstance(value, str) and not value.strip():  # an empty CSV cell is a gap, as JSON null is
            value = None
        end_text = next((item[k] for k in _END_KEYS if k in item), None)
        if start_text is None:
            raise SourceError(f"series: bad point {index}: no start time (expected one of {', '.join(_START_KEYS)})")
        start = _series_time(start_text, index, "start")
        end = _series_time(end_text, index, "end") if end_text is not None else None
        try:
            number = float(value) if value is not None else math.nan
        except (TypeError, ValueError, OverflowError):
            raise SourceError(f"series: bad point {index}: value is not a number") from None
        rows.append((start, number, None if end is None else end - start))
    return series_from_starts(rows)


def _series_time(text: Any, index: int, what: str) -> datetime:
    try:
        return parse_datetime(str(text))
    except ValueError:
        raise SourceError(f"series: bad point {index}: {what} is not an ISO-8601 date-time") from None


def parse_series_csv(text: str) -> tuple[ForecastPoint, ...]:
    import csv
    import io

    reader = csv.DictReader(io.StringIO(text))
    columns = reader.fieldnames or []
    if columns and not any(name in columns for name in _START_KEYS):
        count = f"{len(columns)} column{'s' if len(columns) != 1 else ''}"
        raise SourceError(f"series: a CSV with {count} and no start column (expected one of {', '.join(_START_KEYS)})")
    return parse_series_document([dict(row) for row in reader])


def _parse_series_bytes(data: bytes, name: str) -> tuple[ForecastPoint, ...]:
    text = data.decode("utf-8-sig", "replace")
    if name.lower().endswith(".csv") or not text.lstrip().startswith(("[", "{")):
        return parse_series_csv(text)
    import json

    try:
        return parse_series_document(json.loads(text))
    except ValueError as exc:
        raise SourceError(f"series: {name} is not valid JSON ({exc})") from None


def _fetch_file(query: Query) -> Forecast:
    path = query.arg or os.environ.get("CARBONAWARE_FORECAST_FILE", "")
    if not path:
        raise SourceError("file source needs a path: source='file:forecast.json'")
    data = _read_within(path, query.budget())
    if len(data) > MAX_BODY_BYTES:
        raise SourceError(f"{path} is larger than {MAX_BODY_BYTES // (1024 * 1024)} MB")
    return Forecast(_parse_series_bytes(data, path))


_READING: set[str] = set()  # paths whose read has not come back (a hung network mount): not tried again meanwhile
_READING_LOCK = threading.Lock()


def _read_within(path: str, budget: float) -> bytes:
    """The file's first bytes, or a SourceError within ``budget`` seconds: even open() and stat() can hang on a
    dead network mount, so they run in a worker that is abandoned at the budget (one per path at a time)."""
    import queue

    with _READING_LOCK:
        if path in _READING:
            raise SourceError(f"cannot read {path}: an earlier read of it has not returned")
        _READING.add(path)
    outcome: queue.SimpleQueue[bytes | SourceError] = queue.SimpleQueue()

    def read() -> None:
        try:
            outcome.put(_read_regular_file(path))
        except SourceError as error:
            outcome.put(error)
        except Exception as exc:  # noqa: BLE001 - whatever the file system raises is a source failure
            outcome.put(SourceError(f"cannot read {path}: {type(exc).__name__}"))
        finally:
            with _READING_LOCK:
                _READING.discard(path)

    threading.Thread(target=read, name="carbonaware-file", daemon=True).start()
    try:
        result = outcome.get(timeout=budget)
    except queue.Empty:
        raise SourceError(f"cannot read {path}: no answer within {budget:g}s") from None
    if isinstance(result, SourceError):
        raise result
    return result


def _read_regular_file(path: str) -> bytes:
    """At most MAX_BODY_BYTES + 1 bytes of a regular file. Opened without blocking and checked before reading: a
    FIFO with no writer, a terminal, /dev/stdin or a device would block or never end."""
    import stat

    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    try:
        descriptor = os.open(path, flags)
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror}") from None
    try:
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            os.close(descriptor)
            kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a pipe"), (stat.S_ISSOCK, "a socket"))
            kind = next((name for test, name in kinds if test(mode)), "a device")
            raise SourceError(f"cannot read {path}: not a regular file ({kind})")
        with os.fdopen(descriptor, "rb") as handle:
            return handle.read(MAX_BODY_BYTES + 1)
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror}") from None


def _fetch_url(query: Query) -> Forecast:
    url = query.arg or ""
    _require_safe_url(url, carries_secret=False)
    response = http_request("GET", url, headers={"Accept": "application/json, text/csv"}, timeout=query.budget())
    if response.status != 200:
        expect_json(response, "url source")
    return Forecast(_parse_series_bytes(response.body, url.split("?")[0]))


register_source(
    Source(
        "file",
        _fetch_file,
        cache_key=lambda q: q.arg or os.environ.get("CARBONAWARE_FORECAST_FILE"),
        ttl=60.0,
        needs_zone=False,
        uses_zone=False,
    )
)
register_source(Source("url", _fetch_url, cache_key=lambda q: q.arg, ttl=900.0, needs_zone=False, uses_zone=False))
# (its actuals reader is added in the live-corrected block)


# ---- Electricity Maps v3 -----------------------------------------------------------------------------------------

ELECTRICITYMAPS_BASE_URL = "https://api.electricitymaps.com"


def _hours_needed(query: Query, choices: Sequence[int]) -> int:
    needed = math.ceil((query.window + query.duration).total_seconds() / 3600) + 1
    return next((h for h in choices if h >= needed), choices[-1])


def _electricitymaps_params(query: Query) -> dict[str, str | int]:
    """What to ask for; also the cache key, so that any change in the question asks again."""
    params = _electricitymaps_where(query)
    params["horizonHours"] = _hours_needed(query, (6, 24, 48, 72))
    params["emissionFactorType"] = os.environ.get("ELECTRICITYMAPS_EMISSION_FACTOR", "lifecycle")
    return params


def _electricitymaps_where(query: Query) -> dict[str, str | int]:
    zone = grid_zone_for(query)
    if zone:
        return {"zone": zone}
    if query.zone is not None:
        return {"dataCenterProvider": query.zone.provider, "dataCenterRegion": query.zone.region}
    raise SourceError("no grid zone or cloud zone to ask for")


def _electricitymaps_url(query: Query) -> str:
    base = base_url("ELECTRICITYMAPS_API_URL", ELECTRICITYMAPS_BASE_URL).removesuffix("/v3")
    return f"{base}/v3/carbon-intensity/forecast?{_query_string(_electricitymaps_params(query))}"


def _fetch_electricitymaps(query: Query) -> Forecast:
    """Hourly lifecycle gCO2eq/kWh forecast; the zone from the region table or from the data-centre lookup."""
    key = _header_value("ELECTRICITYMAPS_API_KEY", query.setting("ELECTRICITYMAPS_API_KEY"))
    url = _electricitymaps_url(query)
    _require_safe_url(url, carries_secret=True)
    response = http_request(
        "GET", url, headers={"auth-token": key, "Accept": "application/json"}, timeout=query.budget()
    )
    if response.status in (401, 403, 404):
        raise ForecastRefused(
            f"electricitymaps refused the key or this plan has no forecast access (HTTP {response.status}: "
            f"{response.excerpt()})"
        )
    document = expect_json(response, "electricitymaps")
    items = _field(document, "forecast", list)
    rows = [(_point_time(item, "datetime"), _point_value(item, "carbonIntensity"), None) for item in items]
    answered_zone = document.get("zone") if isinstance(document.get("zone"), str) else grid_zone_for(query)
    return Forecast(series_from_starts(rows, timedelta(hours=1)), unit=G_PER_KWH, grid_zone=answered_zone)


def _fingerprint(credential: str) -> str:
    """Part of a cache key: answers (and refusals) for one key or account never serve another's caller."""
    import hashlib

    return hashlib.sha256(credential.encode("utf-8", "replace")).hexdigest()[:16]


def _header_value(name: str, value: str) -> str:
    """A credential fit for an HTTP header; a bad one is named, never echoed."""
    cleaned = value.strip()
    if not cleaned:
        raise SourceError(f"{name} is not set")
    if any(not " " <= ch <= "~" for ch in cleaned):
        raise SourceError(f"{name} contains characters not allowed in an HTTP header (a pasted line break?)")
    return cleaned


def _query_string(params: Mapping[str, str | int]) -> str:
    from urllib.parse import urlencode

    return urlencode(params)


def _point_time(item: Any, name: str) -> datetime:
    """A provider's point time; the error quotes the point briefly, redacted before it is cut."""
    try:
        return parse_datetime(str(item[name]))
    except (KeyError, TypeError):
        raise SourceError(f"unexpected point {_quote(str(item))}: no {name!r}") from None
    except ValueError:
        raise SourceError(f"unexpected point {_quote(str(item))}: bad {name!r} (not an ISO-8601 date-time)") from None


def _point_value(item: Any, name: str) -> float:
    value = item.get(name) if isinstance(item, dict) else None
    if value is None:
        return math.nan  # a missing value is a gap, not an error
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise SourceError(f"unexpected point {_quote(str(item))}: {name!r} is not a number")
    return float(value)


def _electricitymaps_actuals(query: Query, start: datetime, end: datetime) -> tuple[ForecastPoint, ...]:
    """Measured hourly intensity: ``/history`` (the last 24 h, on the free tier too) when the range lies within
    it, else ``/past-range`` (paid plans). The current hour is in ``/history`` already, so ``/latest`` adds
    nothing a second request would be worth."""
    key = _header_value("ELECTRICITYMAPS_API_KEY", os.environ.get("ELECTRICITYMAPS_API_KEY", ""))
    base = base_url("ELECTRICITYMAPS_API_URL", ELECTRICITYMAPS_BASE_URL).removesuffix("/v3")
    params = _electricitymaps_where(query)
    params["emissionFactorType"] = os.environ.get("ELECTRICITYMAPS_EMISSION_FACTOR", "lifecycle")
    if start >= CLOCK.now() - LIVE_HISTORY - timedelta(minutes=5):  # /history: about the last 24 hours
        url, list_keys = f"{base}/v3/carbon-intensity/history?{_query_string(params)}", ("history", "data")
    else:
        params.update(start=_iso(start), end=_iso(end))
        url, list_keys = f"{base}/v3/carbon-intensity/past-range?{_query_string(params)}", ("data", "history")
    _require_safe_url(url, carries_secret=True)
    response = http_request(
        "GET", url, headers={"auth-token": key, "Accept": "application/json"}, timeout=query.budget()
    )
    if response.status in (401, 403):
        raise SourceError(
            f"electricitymaps refused the key or this plan has no access to past intensity (HTTP "
            f"{response.status}: {response.excerpt()})"
        )
    document = expect_json(response, "electricitymaps")
    found = next((k for k in list_keys if isinstance(document, dict) and isinstance(document.get(k), list)), None)
    items = _field(document, found or list_keys[0], list)
    rows = [(_point_time(item, "datetime"), _point_value(item, "carbonIntensity"), None) for item in items]
    return series_from_starts(rows, timedelta(hours=1))


register_source(
    Source(
        "electricitymaps",
        _fetch_electricitymaps,
        cache_key=lambda q: (_electricitymaps_url(q), _fingerprint(q.setting("ELECTRICITYMAPS_API_KEY"))),
        ttl=900.0,
        horizon=timedelta(hours=72),
        actuals=_electricitymaps_actuals,
    )
)


# ---- WattTime v3 ---------------------------------------------------------------------------------------------------

WATTTIME_BASE_URL = "https://api.watttime.org"
WATTTIME_TOKEN_TTL_SECONDS = 25 * 60  # tokens live ~30 min
_WATTTIME_UNITS = {"lbs_co2_per_mwh": LBS_PER_MWH_TO_G_PER_KWH, "g_co2_per_kwh": 1.0, "kg_co2_per_mwh": 1.0}


def _watttime_credentials(query: Query) -> tuple[str, str]:
    user, password = query.setting("WATTTIME_USERNAME"), query.setting("WATTTIME_PASSWORD")
    if not user or not password:
        raise SourceError("WATTTIME_USERNAME and WATTTIME_PASSWORD are not set")
    return user, password


def _watttime_login(base: str, user: str, password: str, timeout: float) -> str:
    import base64

    basic = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    response = http_request(
        "GET", f"{base}/login", headers={"Authorization": f"Basic {basic}"}, timeout=timeout, secrets=(password,)
    )
    if response.status in (401, 403):
        raise SourceError(f"watttime login refused (HTTP {response.status}); check WATTTIME_USERNAME/PASSWORD")
    token = expect_json(response, "watttime login")
    if not isinstance(token, dict) or not isinstance(token.get("token"), str) or not token["token"]:
        raise SourceError("watttime login answered no token")
    remember_secrets([str(token["token"])])  # before anything could quote it back
    return str(token["token"])


def _watttime_region(query: Query) -> str:
    region = query.arg or os.environ.get("WATTTIME_REGION", "").strip()
    if region:
        return region
    zone = grid_zone_for(query)
    if zone is None or zone not in ZONE_WATTTIME:
        raise SourceError(f"no WattTime region known for {zone or query.zone}; set WATTTIME_REGION")
    return ZONE_WATTTIME[zone]


def _watttime_url(query: Query) -> str:
    params: dict[str, str | int] = {
        "region": _watttime_region(query),
        "signal_type": "co2_moer",
        "horizon_hours": _hours_needed(query, (1, 6, 24, 72)),
    }
    return f"{base_url('WATTTIME_API_URL', WATTTIME_BASE_URL)}/v3/forecast?{_query_string(params)}"


def _fetch_watttime(query: Query) -> Forecast:
    """Marginal (MOER) forecast in 5-minute periods, lbs/MWh converted to g/kWh. An expired token (401, or 403
    without a scope complaint) earns one fresh login; a region outside the account's scope does not."""
    region = _watttime_region(query)
    response = _watttime_get(query, _watttime_url(query))
    if response.status in (401, 403):
        scope = "; free accounts may only read CAISO_NORTH" if region.upper() != "CAISO_NORTH" else ""
        raise SourceError(
            f"watttime refused the forecast for {region} (HTTP {response.status}: {response.excerpt()}){scope}"
        )
    return _watttime_forecast(expect_json(response, "watttime"), region)


def _watttime_forecast(document: Any, region: str) -> Forecast:
    data = _field(document, "data", list)
    meta = document.get("meta") if isinstance(document.get("meta"), dict) else {}
    units = str(meta.get("units", "lbs_co2_per_mwh"))
    if units not in _WATTTIME_UNITS:
        raise SourceError(f"watttime answered units {_quote(units, limit=40)}, expected lbs_co2_per_mwh")
    factor = _WATTTIME_UNITS[units]
    period = meta.get("data_point_period_seconds", 300)
    if not isinstance(period, (int, float)) or not 0 < period <= 86400:
        raise SourceError(f"watttime answered a bad data_point_period_seconds {_quote(repr(period), limit=40)}")
    length = timedelta(seconds=period)
    rows = [(_point_time(item, "point_time"), _point_value(item, "value") * factor, length) for item in data]
    return Forecast(series_from_starts(rows), unit="gCO2/kWh (marginal)", grid_zone=region)


def _watttime_get(query: Query, url: str) -> HttpResponse:
    """GET ``url`` with a (shared, cached) token, logging in again once if it has expired."""
    user, password = _watttime_credentials(query)
    base = base_url("WATTTIME_API_URL", WATTTIME_BASE_URL)
    _require_safe_url(url, carries_secret=True)
    token_key = ("watttime-token", base, user)
    for attempt in range(2):
        login = _shared_fetch(query, lambda: _watttime_login(base, user, password, query.budget()))
        token = CACHE.get(token_key, login, ttl=WATTTIME_TOKEN_TTL_SECONDS, wait=query.budget())
        bearer = _header_value("the WattTime token", f"Bearer {token}")
        response = http_request("GET", url, headers={"Authorization": bearer}, timeout=query.budget())
        out_of_scope = response.status == 403 and b"scope" in response.body.lower()
        if response.status not in (401, 403) or out_of_scope or attempt == 1:
            break
        CACHE.forget(token_key)
    return response


def _watttime_actuals(query: Query, start: datetime, end: datetime) -> tuple[ForecastPoint, ...]:
    """Measured MOER over [start, end) from ``/v3/historical`` (the forecast's shape, past periods), in g/kWh."""
    region = _watttime_region(query)
    params: dict[str, str | int] = {"region": region, "start": _iso(start), "end": _iso(end), "signal_type": "co2_moer"}
    url = f"{base_url('WATTTIME_API_URL', WATTTIME_BASE_URL)}/v3/historical?{_query_string(params)}"
    response = _watttime_get(query, url)
    if response.status in (401, 403):
        raise SourceError(f"watttime refused the history for {region} (HTTP {response.status}: {response.excerpt()})")
    points = _watttime_forecast(expect_json(response, "watttime history"), region).points
    if not points:
        raise SourceError(f"watttime has no history for {region} from {_iso(start)} yet")
    return points


register_source(
    Source(
        "watttime",
        _fetch_watttime,
        cache_key=lambda q: (_watttime_url(q), _fingerprint(q.setting("WATTTIME_USERNAME"))),
        ttl=300.0,
        horizon=timedelta(hours=72),
        actuals=_watttime_actuals,
    )
)


# ---- NESO Carbon Intensity API (Great Britain) ----------------------------------------------------------------------

UKGRID_BASE_URL = "https://api.carbonintensity.org.uk"


def _ukgrid_where(query: Query) -> str:
    """'' for national, else the regional suffix: 'postcode/RG10' (outward code) or 'regionid/12'."""
    where = (query.arg or os.environ.get("CARBONAWARE_UK_POSTCODE", "")).strip().upper()
    if not where:
        return ""
    if where.isdigit():
        return f"regionid/{int(where)}"
    outward = where.split()[0]
    if not re.match(r"^[A-Z]{1,2}[0-9][A-Z0-9]?$", outward):
        raise SourceError(f"not a UK outward postcode: {outward[:10]!r}")
    return f"postcode/{outward}"


def _ukgrid_key(query: Query) -> Hashable:
    """Checks the zone too: the key is computed before the cache is asked, so a cached British forecast can
    never be handed to a job elsewhere."""
    zone = grid_zone_for(query)
    if zone != "GB" and (zone is not None or query.zone is not None):
        raise SourceError(f"ukgrid covers Great Britain only, not {zone or query.zone}")
    return base_url("UKGRID_API_URL", UKGRID_BASE_URL), _ukgrid_where(query)


def _fetch_ukgrid(query: Query) -> Forecast:
    _ukgrid_key(query)  # the zone check, for callers that skip the cache
    start = query.now.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%MZ")
    where = _ukgrid_where(query)
    path = f"/regional/intensity/{start}/fw48h/{where}" if where else f"/intensity/{start}/fw48h"
    url = base_url("UKGRID_API_URL", UKGRID_BASE_URL) + path
    response = http_request("GET", url, headers={"Accept": "application/json"}, timeout=query.budget())
    data = _ukgrid_items(expect_json(response, "ukgrid"))
    rows = []
    for item in data:
        start_at, end_at = _point_time(item, "from"), _point_time(item, "to")
        intensity = item.get("intensity") if isinstance(item, dict) else None
        value = _point_value(intensity, "forecast") if isinstance(intensity, dict) else math.nan
        rows.append((start_at, value, end_at - start_at))
    return Forecast(series_from_starts(rows), unit="gCO2/kWh", grid_zone="GB")


def _ukgrid_items(document: Any) -> list[Any]:
    """National answers hold a list; regional ones wrap it in an object or (as documented) a one-item list."""
    data = _field(document, "data", (list, dict))
    if isinstance(data, list) and data and isinstance(data[0], dict) and "data" in data[0]:
        data = data[0]
    if isinstance(data, dict):
        data = data.get("data")
    if not isinstance(data, list):
        raise SourceError("ukgrid: unexpected answer shape")
    return data


UKGRID_MAX_RANGE = timedelta(days=14)  # the longest {from}/{to} range NESO answers in one request


def _ukgrid_actuals(query: Query, start: datetime, end: datetime) -> tuple[ForecastPoint, ...]:
    """Measured national intensity: the ``actual`` values of ``/intensity/{from}/{to}`` (null until NESO
    publishes them, a half hour or so late). NESO measures nationally only: a regional question has no actuals."""
    _ukgrid_key(query)
    if _ukgrid_where(query):
        raise SourceError("ukgrid publishes measured intensity nationally only, not per region or postcode")
    if end - start > UKGRID_MAX_RANGE:
        raise SourceError(f"ukgrid answers at most {UKGRID_MAX_RANGE.days} days of actuals per request")
    moments = [m.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%MZ") for m in (start, end)]
    url = base_url("UKGRID_API_URL", UKGRID_BASE_URL) + f"/intensity/{moments[0]}/{moments[1]}"
    response = http_request("GET", url, headers={"Accept": "application/json"}, timeout=query.budget())
    rows = []
    for item in _ukgrid_items(expect_json(response, "ukgrid")):
        start_at, end_at = _point_time(item, "from"), _point_time(item, "to")
        intensity = item.get("intensity") if isinstance(item, dict) else None
        value = _point_value(intensity, "actual") if isinstance(intensity, dict) else math.nan
        rows.append((start_at, value, end_at - start_at))
    return series_from_starts(rows)


register_source(
    Source(
        "ukgrid",
        _fetch_ukgrid,
        cache_key=_ukgrid_key,
        ttl=900.0,
        needs_zone=False,
        horizon=timedelta(hours=48),
        actuals=_ukgrid_actuals,
    )
)


# ---- Green Software Foundation Carbon Aware SDK WebAPI (self-hosted) -------------------------------------------------


def _gsf_question(query: Query) -> tuple[str, str]:
    """(base URL, location): the cache key too. The question names no times and no window, so every caller of a
    location shares one answer and plans over it with its own now, window and job."""
    base = os.environ.get("CARBONAWARE_SDK_URL", "").strip().rstrip("/")
    if not base:
        raise SourceError("CARBONAWARE_SDK_URL is not set (the Carbon Aware SDK is self-hosted)")
    location = query.arg or os.environ.get("CARBONAWARE_SDK_LOCATION", "").strip()
    if not location and query.zone is not None:
        location = query.zone.region
    if not location:
        raise SourceError("no location for the Carbon Aware SDK; set CARBONAWARE_SDK_LOCATION")
    return base, location


def _fetch_gsf(query: Query) -> Forecast:
    """The SDK's raw forecast ticks, planned over here. Sent ``windowSize=W``, the SDK answers rolling means over W
    minutes (one per tick), which a planner must not average again; sent ``dataStartAt``/``dataEndAt`` outside its
    forecast (a window longer than its ~24 h, a forecast generated just after now), it answers 400. Asking for
    neither gets every tick it has; the planner trims to the window and the plan says how far the data reached."""
    base, location = _gsf_question(query)
    _require_safe_url(base, carries_secret=False)
    url = f"{base}/emissions/forecasts/current?{_query_string({'location': location})}"
    document = expect_json(
        http_request("GET", url, headers={"Accept": "application/json"}, timeout=query.budget()), "gsf"
    )
    forecast = document[0] if isinstance(document, list) and document else document
    items = _field(forecast, "forecastData", list)
    rows = [
        (_point_time(item, "timestamp"), _point_value(item, "value"), _minutes(item.get("duration"))) for item in items
    ]
    return Forecast(series_from_starts(rows), unit=G_PER_KWH, grid_zone=location)


def _minutes(value: Any) -> timedelta | None:
    return timedelta(minutes=value) if isinstance(value, (int, float)) and 0 < value <= 1440 else None


register_source(Source("gsf", _fetch_gsf, cache_key=_gsf_question, ttl=600.0, needs_zone=False))


# ---- offline: typical intensity by month and hour, built from Electricity Maps' 2021-2023 data -------------------

OFFLINE_DATA_FILE = "carbonaware_offline.json"
OFFLINE_KINDS = ("month-hour-utc", "month-weekpart-hour-utc")
OFFLINE_ATTRIBUTION = "typical-day profile from Electricity Maps data (ODbL)"
_OFFLINE: dict[str, Any] = {}
_OFFLINE_LOCK = threading.Lock()


def offline_model(path: str | None = None) -> dict[str, Any]:
    """The profile document (ODbL, (c) Electricity Maps), read on first use and kept; {} when absent."""
    location = (
        path
        or os.environ.get("CARBONAWARE_OFFLINE_DATA")
        or os.path.join(os.path.dirname(os.path.abspath(__file__)), OFFLINE_DATA_FILE)
    )
    import json

    with _OFFLINE_LOCK:
        if location not in _OFFLINE:
            try:
                with open(location, encoding="utf-8") as handle:
                    _OFFLINE[location] = json.load(handle)
            except (OSError, ValueError) as exc:
                logger.debug("carbonaware: no offline model at %s (%s)", location, exc)
                _OFFLINE[location] = {}
        return dict(_OFFLINE[location])


def profile_value(profile: Sequence[Any], kind: str, moment: datetime) -> float:
    """Typical intensity for the hour containing ``moment`` (UTC): profile[month][hour], or
    profile[month][0 weekday | 1 weekend][hour]."""
    utc = moment.astimezone(timezone.utc)
    by_month = profile[utc.month - 1]
    if kind == "month-weekpart-hour-utc":
        by_month = by_month[1 if utc.weekday() >= 5 else 0]
    return float(by_month[utc.hour])


_ONE_HOUR = timedelta(hours=1)


def profile_series(profile: Sequence[Any], kind: str, start: datetime, end: datetime) -> tuple[ForecastPoint, ...]:
    """Hourly points from the hour containing ``start`` until ``end``.

    A year of hours is planned on every call, so this works month by month in epoch seconds (the hour of day and
    the weekday are arithmetic; 1970-01-01 was a Thursday) and makes each hour's datetime once, shared by the point
    ending there and the point starting there: what ``profile_value`` would give for each hour, at a fraction of the
    cost."""
    t, stop = math.floor(start.timestamp() / 3600) * 3600, end.timestamp()
    split = kind == "month-weekpart-hour-utc"
    hour = _utc(t)
    points: list[ForecastPoint] = []
    while t < stop:
        month_end = datetime(hour.year + hour.month // 12, hour.month % 12 + 1, 1, tzinfo=timezone.utc).timestamp()
        by_month = profile[hour.month - 1]
        days = (by_month[0], by_month[1]) if split else (by_month, by_month)
        cells = [[float(cell) for cell in day] for day in days]
        while t < stop and t < month_end:
            weekend = split and (t // 86400 + 3) % 7 >= 5
            t += 3600
            following = hour + _ONE_HOUR
            points.append(ForecastPoint(hour, following, cells[weekend][hour.hour]))
            hour = following
    return tuple(points)


def grid_zone_for(query: Query) -> str | None:
    """The Electricity Maps zone key: given outright, or looked up from the cloud region."""
    if query.grid_zone:
        return query.grid_zone
    if query.zone is None:
        return None
    return REGION_ZONES.get((query.zone.provider, query.zone.region))


def _offline_min_savings(model: Mapping[str, Any], zone: str) -> float | None:
    """The model's validated minimum predicted saving for ``zone`` (its own, else the model's default); None when
    the model has none or it is malformed (then only the caller's min_savings applies)."""
    table = model.get("min_savings")
    if not isinstance(table, dict):
        return None
    by_zone = table.get("by_zone")
    value = by_zone.get(zone) if isinstance(by_zone, dict) else None
    if value is None:
        value = table.get("default")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1:
        return float(value)
    return None


def _offline_caveat(model: Mapping[str, Any], zone: str) -> str:
    """What the plan's detail must say when the zone's data are mostly Electricity Maps' model estimates."""
    listed = model.get("estimated_zones")
    if not isinstance(listed, list) or zone not in listed:
        return ""
    infos = model.get("zone_info")
    info = infos.get(zone) if isinstance(infos, dict) else None
    share = info.get("estimated_share") if isinstance(info, dict) else None
    measured = f"{share:.0%} of" if isinstance(share, (int, float)) and not isinstance(share, bool) else "most"
    return f"; {zone}: {measured} its training hours are Electricity Maps model estimates, not measurements"


def _offline_stand_in(model: Mapping[str, Any], zone: str) -> str:
    """The zone whose profile answers for ``zone``: its own, else the aggregate the model names for it (e.g. all of
    Norway for NO-NO1)."""
    zones, stand_ins = model.get("zones"), model.get("stand_ins")
    if not isinstance(zones, dict) or zone in zones or not isinstance(stand_ins, dict):
        return zone
    whole = stand_ins.get(zone)
    return whole if isinstance(whole, str) and whole in zones else zone


def _stand_in_note(zone: str, profile_zone: str) -> str:
    return "" if zone == profile_zone else f"; {zone} has no profile of its own: the {profile_zone} profile stands in"


def _fetch_offline(query: Query) -> Forecast:
    zone = grid_zone_for(query)
    if zone is None:
        raise SourceError(f"no grid zone known for {query.zone}; set grid_zone or CARBONAWARE_GRID_ZONE")
    model = offline_model()
    profile_zone = _offline_stand_in(model, zone)
    profile = model.get("zones", {}).get(profile_zone)
    if profile is None:
        covered = "no offline model installed" if not model else f"the offline model does not cover {zone}"
        raise SourceError(covered)
    kind = model.get("kind")
    if model.get("format", 1) != 1 or kind not in OFFLINE_KINDS:
        raise SourceError(f"unsupported offline model (format {model.get('format')!r}, kind {kind!r})")
    series = profile_series(profile, kind, query.now, query.horizon_end)
    return Forecast(
        series,
        unit=G_PER_KWH,
        grid_zone=zone,
        attribution=OFFLINE_ATTRIBUTION + _stand_in_note(zone, profile_zone) + _offline_caveat(model, profile_zone),
        min_savings=_offline_min_savings(model, profile_zone),
    )


# a typical year repeats: a year of starts holds every value it has (a longer window only repeats them)
register_source(Source("offline", _fetch_offline, cache_key=None, horizon=timedelta(days=366)))


# ---- live-corrected: recent actuals + the offline profile ---------------------------------------------------------


def fetch_actuals(
    source: str,
    zone: CloudZone | None,
    start: datetime,
    end: datetime,
    *,
    timeout: float = HTTP_TIMEOUT_SECONDS,
    grid_zone: str | None = None,
) -> tuple[ForecastPoint, ...]:
    """Measured intensity over [start, end), sorted, from ``source`` ("electricitymaps", "ukgrid",
    "url:https://...", or any registered Source with an ``actuals`` reader). A SourceError when the source has no
    reader, fails, or has measured nothing valid there yet; argument errors raise ValueError/TypeError."""
    for name, moment in (("start", start), ("end", end)):
        if not isinstance(moment, datetime) or moment.utcoffset() is None:
            raise ValueError(f"{name} must be a timezone-aware datetime")
    if not start < end:
        raise ValueError("start must be before end")
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout <= 300:
        raise ValueError(f"timeout must be seconds in (0, 300], got {timeout!r}")
    parts = _split_spec(source) if isinstance(source, str) else []
    if len(parts) != 1:
        raise ValueError(f"source must name one source, e.g. 'electricitymaps', not {source!r}")
    name, arg = parts[0]
    grid = grid_zone or os.environ.get("CARBONAWARE_GRID_ZONE") or None
    now, deadline = CLOCK.now(), CLOCK.monotonic() + timeout
    query = Query(zone, grid, now, timedelta(0), timedelta(0), float(timeout), arg, deadline=deadline)
    return _measured(name, query, start.astimezone(timezone.utc), end.astimezone(timezone.utc))


def _measured(name: str, query: Query, start: datetime, end: datetime) -> tuple[ForecastPoint, ...]:
    """The valid measured points a source's reader gives for [start, end), none dated after now; whatever the
    reader raises or returns, a SourceError or points."""
    source = SOURCES.get(name)
    if source is None or source.actuals is None:
        readers = ", ".join(sorted(n for n, s in SOURCES.items() if s.actuals is not None))
        raise SourceError(f"{name} serves no measured intensity (sources that do: {readers})")
    try:
        points = [_aware(p) for p in source.actuals(query, start, end) if isinstance(p, ForecastPoint)]
        kept = [p for p in points if _valid_intensity(p.value) and start < p.end and p.start < min(end, query.now)]
        kept = [p for p in kept if p.start < p.end]
    except SourceError:
        raise
    except Exception as exc:  # noqa: BLE001 - a broken reader (a user's, say) is a source failure, not a crash
        raise SourceError(f"{name} actuals: {type(exc).__name__}: {_quote(str(exc), limit=160)}") from None
    if not kept:
        raise SourceError(f"{name}: no valid measurement published for {_iso(start)}..{_iso(end)} yet")
    return tuple(sorted(kept, key=lambda p: p.start))


def _url_actuals(query: Query, start: datetime, end: datetime) -> tuple[ForecastPoint, ...]:
    """A user's own measurements: a series document (JSON or CSV, as the url source reads) at ``url:<address>``."""
    if not query.arg:
        raise SourceError("url actuals need an address: 'live:url:https://host/measurements.json'")
    return _fetch_url(query).points


register_source(replace(SOURCES["url"], actuals=_url_actuals))


def _live_inner(query: Query) -> tuple[str, str | None]:
    """'live:electricitymaps' -> ('electricitymaps', None); 'live:url:https://x' -> ('url', 'https://x')."""
    name, sep, arg = (query.arg or "electricitymaps").partition(":")
    return name.strip().lower(), (arg.strip() or None) if sep else None


def _fetch_live(query: Query) -> Forecast:
    """The offline profile corrected by the last hours the named source measured (see "Forecast arithmetic: live
    correction"): for keys and plans that get actuals but no forecast (Electricity Maps' free tier)."""
    name, arg = _live_inner(query)
    return _live_forecast(name, replace(query, arg=arg))


MARGINAL_SOURCES = frozenset({"carbonaware", "watttime"})  # they measure what an extra kWh emits, not the mean


def _live_forecast(name: str, query: Query) -> Forecast:
    if name in MARGINAL_SOURCES:
        raise SourceError(
            f"{name} measures marginal emissions; the live correction needs average intensity like the profile's"
        )
    past = query.now - LIVE_HISTORY
    typical = _fetch_offline(replace(query, now=past, window=query.window + LIVE_HISTORY))
    where = grid_zone_for(query) or query.zone
    key = ("live-actuals", name, query.arg, where, math.floor(query.now.timestamp() / 900))
    fetch = _shared_fetch(query, lambda: _measured(name, query, past, query.now))
    actuals: tuple[ForecastPoint, ...] = CACHE.get(key, fetch, ttl=900.0, wait=query.budget())
    measured = measured_by(actuals, query.now)
    blended = blended_with_yesterday(typical.points, measured)
    anomaly = recent_anomaly(measured, blended, query.now)
    label = f"{name}+offline (live-corrected)"
    note = (
        f"live-corrected: the typical day blended {LIVE_YESTERDAY_WEIGHT:.0%} with {name}'s measurements a day "
        f"earlier, then moved by the latest measured difference ({anomaly.value:+.0f} until "
        f"{_iso(anomaly.measured_until)}), fading by half every {_human(LIVE_HALF_LIFE)}"
    )
    attribution = f"{note}; {typical.attribution}" if typical.attribution else note
    points = live_corrected(blended, anomaly)
    # the profile's per-zone floor stays: in the backtest it keeps the live forecast's waits that end dirtier below
    # the offline model's, at a small cost in saving (bench/backtest.py --live-only: "live, no minimum")
    return Forecast(
        points,
        unit=G_PER_KWH,
        grid_zone=typical.grid_zone,
        attribution=attribution,
        min_savings=typical.min_savings,
        label=label,
    )


register_source(Source("live", _fetch_live, cache_key=None, needs_zone=False, horizon=timedelta(days=366)))


def _or_live_corrected(source: Source, query: Query, fetch: Callable[[], SourceResult]) -> Callable[[], SourceResult]:
    """``fetch``, and when the provider refuses its forecast but measures (``actuals``), a live-corrected forecast
    from its recent actuals instead: the automatic step for free-tier keys. Both failing is one failure."""
    if source.actuals is None:
        return fetch

    def attempt() -> SourceResult:
        try:
            return fetch()
        except ForecastRefused as refused:
            try:
                result = _live_forecast(source.name, _within_horizon(SOURCES["live"], query))
            except SourceError as error:
                raise SourceError(f"{refused}; a live correction from its actuals failed too: {error}") from None
            return replace(result, attribution=f"its forecast was refused ({refused}); {result.attribution}")

    return attempt


# --------------------------------------------------------------------------------------------------------------
# Planning: the request -- what is asked, and how to ask it
# --------------------------------------------------------------------------------------------------------------
# A caller's arguments fall in two parts that change for different reasons: what is asked (the question, before
# the clock and zone detection fill in its earliest start and home place) and how to ask it (sources, budget,
# hooks, switches). A re-plan asks the same question over what is left of the window; a test asks another way.

OPTIONS = frozenset(
    {"source", "min_savings", "now", "timeout", "logger", "grid_zone", "on_plan", "replan", "replan_every"}
    | {"credentials", "disable", "dry_run"}
    | {"power_kw", "ledger"}
    | {"zones", "home", "windows", "deadline"}
)
CREDENTIAL_NAMES = frozenset({"ELECTRICITYMAPS_API_KEY", "WATTTIME_USERNAME", "WATTTIME_PASSWORD"})
REPLAN_AFTER = timedelta(hours=1)  # waits longer than this re-check the forecast by default
REPLAN_EVERY = timedelta(minutes=30)


@dataclass(frozen=True)
class _Asked:
    """What is asked, as the caller put it: the arguments of a ``Question`` before ``now`` (the clock's, unless
    a replay gives its own) and the home place (given, or detected) are known."""

    window: timedelta
    duration: timedelta
    zone: CloudZone | None
    grid_zone: str | None
    min_savings: float
    now: datetime | None  # a replay's own now; None: the clock's, read when planning
    power_kw: float | None = None
    places: tuple[Place, ...] = ()  # ``zones``: candidates besides home
    home: bool = True  # the home zone (given or detected) is a candidate, and the baseline
    allowed: tuple[tuple[datetime, datetime], ...] = ()  # ``windows``: allowed start intervals, UTC
    finish_by: datetime | None = None  # ``deadline``, UTC

    @property
    def where_and_when(self) -> bool:
        """Whether the question goes beyond one zone and one window from now (then the joint planner answers)."""
        return bool(self.places or self.allowed or self.finish_by is not None or not self.home)

    def question(self, now: datetime, places: tuple[Place, ...]) -> Question:
        """The question every planning path answers, once the moment and the candidate places are known."""
        return Question(
            places=places,
            duration=self.duration,
            earliest=now,
            window=self.window,
            finish_by=self.finish_by,
            allowed=self.allowed,
            min_savings=self.min_savings,
            power_kw=self.power_kw,
            replay=self.now is not None,
        )


@dataclass(frozen=True)
class _Asking:
    """How to ask: where answers come from, the per-request budget, who hears the decision, and the operator's
    switches. None of it changes which start is best for a given series."""

    source: Any
    timeout: float
    log: logging.Logger | logging.LoggerAdapter[Any]
    on_plan: Callable[[Plan], None] | None
    replan: bool | None = None
    replan_every: timedelta = REPLAN_EVERY
    credentials: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    disable: bool | str | None = None  # None: CARBONAWARE_DISABLE; a string: who switched it on (for the log)
    dry_run: bool | str | None = None  # None: CARBONAWARE_DRY_RUN
    ledger: str | None = None  # None: CARBONAWARE_LEDGER, read when a record is written


_ASKED_FIELDS = frozenset(f.name for f in fields(_Asked))
_ASKING_FIELDS = frozenset(f.name for f in fields(_Asking))


@dataclass(frozen=True)
class _Request:
    """A validated call: what is asked and how to ask it. The read-only names below keep every caller's
    ``request.window``, ``request.source`` (...) as they were before the two parts were told apart."""

    asked: _Asked
    asking: _Asking

    def with_(self, **changes: Any) -> _Request:
        """The request with some of either part's fields changed (``replace`` for the two records at once)."""
        unknown = set(changes) - _ASKED_FIELDS - _ASKING_FIELDS
        if unknown:
            raise TypeError(f"_Request has no field(s) {', '.join(sorted(unknown))}")
        asked = {name: value for name, value in changes.items() if name in _ASKED_FIELDS}
        asking = {name: value for name, value in changes.items() if name in _ASKING_FIELDS}
        return _Request(replace(self.asked, **asked), replace(self.asking, **asking))

    @property
    def where_and_when(self) -> bool:
        return self.asked.where_and_when

    def question(self, now: datetime, places: tuple[Place, ...]) -> Question:
        return self.asked.question(now, places)

    @property
    def window(self) -> timedelta:
        return self.asked.window

    @property
    def duration(self) -> timedelta:
        return self.asked.duration

    @property
    def zone(self) -> CloudZone | None:
        return self.asked.zone

    @property
    def grid_zone(self) -> str | None:
        return self.asked.grid_zone

    @property
    def min_savings(self) -> float:
        return self.asked.min_savings

    @property
    def now(self) -> datetime | None:
        return self.asked.now

    @property
    def power_kw(self) -> float | None:
        return self.asked.power_kw

    @property
    def places(self) -> tuple[Place, ...]:
        return self.asked.places

    @property
    def home(self) -> bool:
        return self.asked.home

    @property
    def allowed(self) -> tuple[tuple[datetime, datetime], ...]:
        return self.asked.allowed

    @property
    def finish_by(self) -> datetime | None:
        return self.asked.finish_by

    @property
    def source(self) -> Any:
        return self.asking.source

    @property
    def timeout(self) -> float:
        return self.asking.timeout

    @property
    def log(self) -> logging.Logger | logging.LoggerAdapter[Any]:
        return self.asking.log

    @property
    def on_plan(self) -> Callable[[Plan], None] | None:
        return self.asking.on_plan

    @property
    def replan(self) -> bool | None:
        return self.asking.replan

    @property
    def replan_every(self) -> timedelta:
        return self.asking.replan_every

    @property
    def credentials(self) -> tuple[tuple[str, str], ...]:
        return self.asking.credentials

    @property
    def disable(self) -> bool | str | None:
        return self.asking.disable

    @property
    def dry_run(self) -> bool | str | None:
        return self.asking.dry_run

    @property
    def ledger(self) -> str | None:
        return self.asking.ledger


# --------------------------------------------------------------------------------------------------------------
# Planning: arguments and options (every argument error raises here)
# --------------------------------------------------------------------------------------------------------------


def validate_arguments(window: Any, duration: Any, provider: Any, region: Any, options: Mapping[str, Any]) -> _Request:
    """Every argument error surfaces here, at decoration time, never hours later inside the user's work."""
    for name, value in (("window", window), ("duration", duration)):
        if not isinstance(value, timedelta):
            raise TypeError(f"{name} must be a datetime.timedelta, not {type(value).__name__}")
        if value <= timedelta(0):
            raise ValueError(f"{name} must be positive, got {_signed_human(value)}")
    unknown = set(options) - OPTIONS
    if unknown:
        raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}; known: {', '.join(sorted(OPTIONS))}")
    zone = _explicit_zone(provider, region)
    min_savings = options.get("min_savings", 0.0)
    if not isinstance(min_savings, (int, float)) or isinstance(min_savings, bool) or not 0 <= min_savings < 1:
        raise ValueError(f"min_savings must be a fraction in [0, 1), got {min_savings!r}")
    now = options.get("now")
    if now is not None and (not isinstance(now, datetime) or now.tzinfo is None or now.utcoffset() is None):
        raise ValueError("now must be a timezone-aware datetime")
    if now is not None:  # in UTC before any arithmetic: "+ 6 h" in a daylight-saving zone is 5 or 7 real hours
        now = now.astimezone(timezone.utc)
    _check_reachable(now or _utc(CLOCK.time()), window, duration)  # an overflow check: any reading of the clock
    timeout = options.get("timeout", HTTP_TIMEOUT_SECONDS)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout <= 300:
        raise ValueError(f"timeout must be seconds in (0, 300], got {timeout!r}")
    grid_zone = options.get("grid_zone")
    if grid_zone is not None and not isinstance(grid_zone, str):
        raise TypeError(f"grid_zone must be a string such as 'DE', not {grid_zone!r}")
    source = options.get("source")
    if source is not None:
        check_source_spec(source)
    log, on_plan = options.get("logger"), options.get("on_plan")
    if log is not None and not isinstance(log, (logging.Logger, logging.LoggerAdapter)):
        raise TypeError(f"logger must be a logging.Logger or LoggerAdapter, not {type(log).__name__}")
    if on_plan is not None and not callable(on_plan):
        raise TypeError("on_plan must be a callable taking the Plan")
    replan, replan_every = options.get("replan"), options.get("replan_every", REPLAN_EVERY)
    if replan is not None and not isinstance(replan, bool):
        raise TypeError("replan must be True, False or None (None: only for waits over an hour)")
    if not isinstance(replan_every, timedelta) or replan_every < timedelta(minutes=1):
        raise ValueError("replan_every must be a timedelta of at least one minute")
    credentials = _credentials_option(options.get("credentials"))
    disable, dry_run = (
        _switch_option("disable", options.get("disable")),
        _switch_option("dry_run", options.get("dry_run")),
    )
    where: dict[str, Any] = _where_and_when_options(now or _utc(CLOCK.time()), window, duration, zone, options)
    asked = _Asked(
        window=window,
        duration=duration,
        zone=zone,
        grid_zone=grid_zone.strip() or None if grid_zone else None,
        min_savings=float(min_savings),
        now=now,
        power_kw=check_power_kw(options.get("power_kw")),
        **where,
    )
    asking = _Asking(
        source=source,
        timeout=float(timeout),
        log=log or logger,
        on_plan=on_plan,
        replan=replan,
        replan_every=replan_every,
        credentials=credentials,
        disable=disable,
        dry_run=dry_run,
        ledger=check_ledger_option(options.get("ledger")),
    )
    return _Request(asked, asking)


def _where_and_when_options(
    now: datetime, window: timedelta, duration: timedelta, zone: CloudZone | None, options: Mapping[str, Any]
) -> dict[str, Any]:
    """``zones``, ``home``, ``windows`` and ``deadline``, checked, and checked to leave at least one start."""
    places = zones_option(options.get("zones"))
    home = options.get("home", True)
    if not isinstance(home, bool):
        raise TypeError("home must be True or False (False: only the given zones are candidates)")
    if not home and not places:
        raise ValueError("home=False leaves no candidate: give zones, e.g. zones=['aws:eu-north-1']")
    allowed = windows_option(options.get("windows"))
    finish_by = _aware_option("deadline", options.get("deadline"))
    question = Question((), duration, now, window, finish_by, allowed)
    if not question.start_intervals():
        raise ValueError(_no_start_message(now, window, duration, allowed, finish_by))
    places = tuple(dict.fromkeys(place for place in places if home is False or place.cloud != zone or zone is None))
    return {"places": places, "home": home, "allowed": allowed, "finish_by": finish_by}


def _no_start_message(
    now: datetime, window: timedelta, duration: timedelta, allowed: Sequence[Any], finish_by: datetime | None
) -> str:
    if finish_by is not None and finish_by - duration < now:
        return f"deadline {_iso(finish_by)} leaves no room for a {_human(duration)} job starting at {_iso(now)}"
    if finish_by is not None and allowed:
        return f"no window allows a start that finishes by the deadline {_iso(finish_by)}"
    if finish_by is not None:
        return f"deadline {_iso(finish_by)} leaves no start in the window"
    return f"the windows lie wholly outside [{_iso(now)}, {_iso(now + window)}] (now plus the window)"


def parse_zone(text: Any) -> Place:
    """A candidate zone: "aws:eu-west-1" (provider:region), "grid:FR" (a grid zone, for on-premises), a
    ``(provider, region)`` pair, a CloudZone or a Place. Unknown providers and malformed strings raise."""
    if isinstance(text, Place):
        return text
    if isinstance(text, CloudZone):
        return Place(cloud=_explicit_zone(text.provider, text.region))
    if isinstance(text, tuple) and len(text) == 2:
        return Place(cloud=_explicit_zone(*text))
    if not isinstance(text, str):
        raise TypeError(f"a zone is 'provider:region', 'grid:ZONE' or a (provider, region) pair, not {text!r}")
    kind, sep, rest = text.strip().partition(":")
    if not sep or not rest.strip():
        raise ValueError(f"unknown zone {text!r}: write 'aws:eu-west-1', 'gcp:europe-west1' or 'grid:FR'")
    if kind.strip().lower() == "grid":
        key = rest.strip().upper()  # Electricity Maps writes its zone keys in upper case: "fr" is FR
        if not re.fullmatch(r"[A-Za-z]{2}(?:-[A-Za-z0-9]+)*", key):
            raise ValueError(f"unknown grid zone {key!r}: an Electricity Maps zone key such as FR, DE or US-CAL-CISO")
        return Place(grid=key)
    if kind.strip().lower() not in PROVIDERS:
        raise ValueError(f"unknown provider {kind.strip()!r} in zone {text!r}; expected grid or {', '.join(PROVIDERS)}")
    return Place(cloud=_explicit_zone(kind, rest))


def zones_option(value: Any) -> tuple[Place, ...]:
    """``zones``: None, one zone string (commas separate several), or an iterable of zones (see parse_zone)."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = [part for part in value.split(",") if part.strip()]
    elif isinstance(value, tuple) and len(value) == 2 and all(isinstance(part, str) for part in value):
        value = [value]  # one (provider, region) pair
    if not _is_iterable(value):
        raise TypeError(f"zones must be zone strings or (provider, region) pairs, not {type(value).__name__}")
    places = tuple(parse_zone(item) for item in value)
    if not places:
        raise ValueError("zones is empty: give at least one, e.g. zones=['aws:eu-north-1'], or leave it out")
    return places


def windows_option(value: Any) -> tuple[tuple[datetime, datetime], ...]:
    """``windows``: (start, end) pairs of aware datetimes (or one such pair), start before end; UTC, sorted."""
    if value is None:
        return ()
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(part, datetime) for part in value):
        value = [value]  # one (start, end) pair
    if not _is_iterable(value) or isinstance(value, (str, bytes)):
        raise TypeError("windows must be (start, end) pairs of timezone-aware datetimes")
    pairs = []
    for item in value:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(f"a window is a (start, end) pair of datetimes, not {item!r}")
        start, end = (_aware_option("a window's start", item[0]), _aware_option("a window's end", item[1]))
        assert start is not None and end is not None
        if not start < end:
            raise ValueError(f"window {_iso(start)}..{_iso(end)} is empty or inverted: its start must come first")
        pairs.append((start, end))
    if not pairs:
        raise ValueError("windows is empty: give at least one (start, end) pair, or leave it out")
    return tuple(sorted(pairs))


def _aware_option(name: str, value: Any) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, datetime) or value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime, not {value!r}")
    try:
        return value.astimezone(timezone.utc)
    except OverflowError:  # datetime.max west of UTC (or min east of it): a bound past (before) anything planned
        return (datetime.max if value.year == datetime.max.year else datetime.min).replace(tzinfo=timezone.utc)


def _credentials_option(credentials: Any) -> tuple[tuple[str, str], ...]:
    """Provider keys given in code (or by a Prefect block) instead of the environment, by the variable's name.
    Remembered as secrets at once, so that no log line or error message can quote them."""
    if credentials is None:
        return ()
    if not isinstance(credentials, Mapping):
        raise TypeError("credentials must be a mapping such as {'ELECTRICITYMAPS_API_KEY': key}")
    unknown = set(credentials) - CREDENTIAL_NAMES
    if unknown:
        raise ValueError(
            f"unknown credential(s) {sorted(map(str, unknown))}; known: {', '.join(sorted(CREDENTIAL_NAMES))}"
        )
    if not all(isinstance(value, str) for value in credentials.values()):
        raise TypeError("credential values must be strings")
    remember_secrets(value for name, value in credentials.items() if name != "WATTTIME_USERNAME")
    return tuple(sorted((name, value) for name, value in credentials.items() if value))


def _switch_option(name: str, value: Any) -> bool | str | None:
    if value is None or isinstance(value, bool) or (isinstance(value, str) and value.strip()):
        return value
    raise TypeError(f"{name} must be True, False, None (the environment decides) or a string saying who set it")


def _check_reachable(now: datetime, window: timedelta, duration: timedelta) -> None:
    """The window and the job must end a day before datetime's end (the year 9999), or planning would overflow:
    an argument error now, not an exception hours later."""
    try:
        now + window + duration + timedelta(days=1)
    except OverflowError:
        raise ValueError(
            f"window ({window}) and duration ({duration}) reach past the year 9999 from {_iso(now)}"
        ) from None


def _explicit_zone(provider: Any, region: Any) -> CloudZone | None:
    if provider is None and region is None:
        return None
    if provider is None or region is None:
        raise ValueError("provider and region go together: give both, or neither to detect the zone")
    if not isinstance(provider, str) or not isinstance(region, str):
        raise TypeError("provider and region must be strings")
    provider, region = provider.strip().lower(), region.strip()
    if provider not in PROVIDERS and region.lower() in PROVIDERS:
        provider, region = (region.lower(), provider)  # the original package took (region, provider) positionally
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; expected one of {', '.join(PROVIDERS)}")
    if not region:
        raise ValueError("region must not be empty")
    return CloudZone(provider, _normalise_region(provider, region))


def check_source_spec(spec: Any) -> None:
    """Names must be known and callables callable; iterables of points are checked when used."""
    if callable(spec) or (not isinstance(spec, str) and _is_iterable(spec)):
        return
    if not isinstance(spec, str):
        raise TypeError(f"source must be a name, a callable or an iterable of ForecastPoint, not {type(spec).__name__}")
    if not _split_spec(spec):
        raise ValueError(f"source names no source: {spec!r}; use e.g. 'auto' or 'electricitymaps,offline'")
    for name, _arg in _split_spec(spec):
        if name not in SOURCES and name not in SOURCE_CHAINS:
            known = ", ".join(sorted([*SOURCES, *SOURCE_CHAINS]))
            raise ValueError(f"unknown source {name!r}; known: {known}")


def _is_iterable(value: Any) -> bool:
    try:
        iter(value)
    except TypeError:
        return False
    return True


def _split_spec(spec: str) -> list[tuple[str, str | None]]:
    parts = []
    for item in spec.split(","):
        name, sep, arg = item.strip().partition(":")
        if name.strip():
            parts.append((name.strip().lower(), arg.strip() if sep else None))
    return parts


def _expand_chain(spec: str) -> list[tuple[str, str | None]]:
    expanded: list[tuple[str, str | None]] = []
    for name, arg in _split_spec(spec):
        expanded += [(n, None) for n in SOURCE_CHAINS[name]] if name in SOURCE_CHAINS else [(name, arg)]
    return expanded


def _source_spec(request: _Request) -> Any:
    if request.source is not None:
        return request.source
    from_env = os.environ.get("CARBONAWARE_SOURCE", "").strip()
    if from_env:
        try:
            check_source_spec(from_env)
            return from_env
        except ValueError as exc:
            request.log.warning("carbonaware: ignoring CARBONAWARE_SOURCE (%s); using auto", exc)
    return "auto"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _switched_on(option: bool | str | None, env_name: str) -> str | None:
    """Why the ``disable``/``dry_run`` switch is on (argument first, then the environment), or None when off."""
    if option is None:
        return f"{env_name} is set" if _env_flag(env_name) else None
    if isinstance(option, str):
        return f"{option} is set"
    return f"{env_name.removeprefix('CARBONAWARE_').lower()}=True" if option else None


# --------------------------------------------------------------------------------------------------------------
# Planning: zone, source chain, decision
# --------------------------------------------------------------------------------------------------------------


def plan_delay(
    window: timedelta = DEFAULT_WINDOW,
    duration: timedelta = DEFAULT_DURATION,
    provider: str | None = None,
    region: str | None = None,
    **options: Any,
) -> Plan:
    """Decide when to start, never sleeping. Argument errors raise; every other failure gives a run-now plan.
    The decision is reported like every other entry point's: the log line, then ``on_plan``."""
    return plan_and_report(validate_arguments(window, duration, provider, region, options))


def plan_and_report(request: _Request, *, scheduled: bool = False) -> Plan:
    """``plan_delay`` for a validated request; ``scheduled``: worded for a run a scheduler starts later."""
    plan = _plan(request)
    report_plan(plan, request.log, request.on_plan, waiting=False, scheduled=scheduled)
    _record_decision(plan, request)
    return plan


def _plan(request: _Request) -> Plan:
    now = request.now or CLOCK.now()
    if (disabled := _switched_on(request.disable, "CARBONAWARE_DISABLE")) is not None:
        # an id and the energy like any decision: the ledger links its outcome to it
        return replace(_run_now(request, now, None, "-", "disabled", disabled), power_kw=request.power_kw, id=_new_id())
    try:
        plan = _plan_where_and_when(request, now) if request.where_and_when else _plan_with_sources(request, now)
    except Exception as exc:  # noqa: BLE001 - last line of fail-open: a bug here must not break user work
        detail = f"internal error: {type(exc).__name__}: {exc}"
        plan = _run_now(request, now, request.zone, "-", "source-failed", detail)
    dry_run = _switched_on(request.dry_run, "CARBONAWARE_DRY_RUN")
    if dry_run is not None and plan.reason in ("optimal", "already-best", "below-threshold"):
        # the plan it would follow, which nobody waits for; failures keep their own reason
        plan = replace(plan, reason="dry-run", detail=f"{dry_run}; {plan.detail}")
    return replace(plan, power_kw=request.power_kw, id=_new_id())


def _plan_with_sources(request: _Request, now: datetime) -> Plan:
    spec = _source_spec(request)
    zone = request.zone or (detect_cloud_zone() if _uses_zone(spec) else None)
    grid_zone = request.grid_zone or os.environ.get("CARBONAWARE_GRID_ZONE") or None
    question = request.question(now, (Place(zone, grid_zone),))  # one place, home: the same question as for several
    deadline = CLOCK.monotonic() + question.window.total_seconds()  # planning, too, ends with the window
    query = _source_query(question, question.places[0], request.asking, deadline)
    failures: list[str] = []
    zone_missing = False
    for label, attempt in _attempts(spec, query):
        try:  # a network source that finds the window spent says so without asking; local ones still answer
            plan = _plan_from(attempt(), label, query, question.min_savings)
        except _NoZone:
            zone_missing = True
            continue
        except SourceError as error:
            failures.append(f"{label}: {error}")
            continue
        except Exception as exc:  # noqa: BLE001 - a broken source (a bad offline model, say) must not end the chain
            failures.append(f"{label}: internal error: {type(exc).__name__}: {_quote(str(exc), limit=160)}")
            continue
        if failures:
            plan = replace(plan, detail=f"{plan.detail}; after {'; '.join(failures)}", fallbacks=tuple(failures))
        return plan
    no_zone = "no cloud zone: give provider and region (or set CARBONAWARE_PROVIDER/CARBONAWARE_REGION)"
    if zone_missing and not failures:
        return _run_now(request, now, None, "-", "no-zone", no_zone)
    detail = "; ".join([*failures, *([no_zone] if zone_missing else [])]) or "no source answered"
    return _run_now(request, now, zone, "-", "source-failed", detail)


def _source_query(question: Question, place: Place, asking: _Asking, deadline: float) -> Query:
    """What one place's sources are asked, built from the question (its earliest start, window and duration) and
    how to ask it (each request's timeout, the credentials): one builder, so every planning path asks alike."""
    return Query(
        place.cloud,
        place.grid,
        question.earliest,
        question.window,
        question.duration,
        asking.timeout,
        None,
        question.replay,
        deadline,
        credentials=asking.credentials,
    )


def _uses_zone(spec: Any) -> bool:
    """Whether any source in ``spec`` would use a cloud zone: if none would, nothing probes the network for it."""
    if isinstance(spec, str):
        return any(SOURCES[name].uses_zone for name, _arg in _expand_chain(spec))
    return callable(spec)  # a callable is handed the zone; a plain list of points is not


def _attempts(spec: Any, query: Query) -> Iterator[tuple[str, Callable[[], SourceResult]]]:
    """(label, fetch) for each source to try in order; named sources go through the shared cache."""
    if isinstance(spec, str):
        for name, arg in _expand_chain(spec):
            asked = _within_horizon(SOURCES[name], replace(query, arg=arg))
            yield name, _or_live_corrected(SOURCES[name], asked, _cached_fetch(SOURCES[name], asked))
    elif callable(spec):
        asked = _within_horizon(None, query)
        yield _callable_name(spec), lambda: _user_series(lambda: spec(asked.zone, asked.now, asked.horizon_end))
    else:
        yield "series", lambda: _user_series(lambda: spec)


def _user_series(produce: Callable[[], Iterable[ForecastPoint]]) -> Forecast:
    """A series from the user's callable or iterable; whatever it raises is a source failure, not a crash."""
    try:
        return Forecast(tuple(_float_valued(point) for point in produce()))
    except Exception as exc:  # noqa: BLE001 - user code: fail open
        raise SourceError(f"raised {type(exc).__name__}: {_redact(str(exc)[:4096], ())[:160]}") from None


def _float_valued(point: ForecastPoint) -> ForecastPoint:
    """Values as plain floats: a series from pandas or numpy (``float32``, ``int64``) or in ``Decimal`` would
    otherwise read as gaps."""
    value: object = getattr(point, "value", None)
    if type(value) in (float, int) or isinstance(value, (bool, str, bytes)) or not hasattr(value, "__float__"):
        return point
    try:
        return replace(point, value=float(value))
    except (TypeError, ValueError, OverflowError):
        return point


def _callable_name(fn: Any) -> str:
    return str(getattr(fn, "__name__", type(fn).__name__))


def _cached_fetch(source: Source, query: Query) -> Callable[[], SourceResult]:
    def fetch() -> SourceResult:
        if source.needs_zone and query.zone is None and query.grid_zone is None:
            raise _NoZone("no cloud zone")
        if source.cache_key is None:
            return source.fetch(query)
        key = (source.name, source.cache_key(query), query.now if query.fixed_now else None)  # replays apart

        def fetch_once() -> SourceResult:
            CACHE.check_not_blocked(source.name)  # only a caller about to send a request is held back
            try:
                return _usable(_stamped(source.fetch(query), query.now), query.now)
            except SourceError as error:
                if error.retry_after:  # a provider that asks for a pause gets it, whatever we would ask next
                    CACHE.block(source.name, error)
                raise

        wait = min(query.timeout + 1.0, max(0.0, query.deadline - CLOCK.monotonic()))
        result: SourceResult = CACHE.get(
            key,
            _shared_fetch(query, fetch_once),
            ttl=source.ttl,
            wait=wait,
            reusable=lambda cached: _still_answers(cached, query),
        )
        return result

    return fetch


def _stamped(result: SourceResult, now: datetime) -> SourceResult:
    """A decision remembers the moment it was made for, so a later caller can tell whether it still applies."""
    if isinstance(result, Decision) and result.asked_for is None:
        return replace(result, asked_for=now)
    return result


def _still_answers(result: Any, query: Query) -> bool:
    """A cached decision answers a later caller only while its start is still ahead of the caller's now and inside
    the caller's window (and it was made no later than that now); otherwise that caller asks again. A series is
    planned against each caller's own now, so it always serves."""
    if not isinstance(result, Decision):
        return True
    asked_for = result.asked_for or query.now
    return asked_for <= query.now < result.start <= query.now + query.window + _DECISION_STEP


_DECISION_STEP = timedelta(minutes=5)  # a decided start may lie one 5-minute step past the window's end (§7)


def _usable(result: SourceResult, now: datetime) -> SourceResult:
    """Reject, inside the cache, answers no one can plan with -- so they are remembered briefly like any failure
    instead of for the source's whole lifetime."""
    if isinstance(result, Forecast):
        starts, ends, _values = _series_arrays(result.points, now.timestamp())
        _covered_from(starts, ends, now.timestamp())
    return result


@dataclass(frozen=True)
class _Answered:
    """One source's answer, planned: the best start it allows and its figures, before the decision rule."""

    label: str
    start: datetime
    expected: float | None
    now_value: float | None
    unit: str
    floor: float  # the minimum predicted saving that applies: min_savings, or the source's own when higher
    floor_name: str = "min_savings {:.1%}"
    grid_zone: str | None = None
    points: tuple[ForecastPoint, ...] = ()
    stated: float | None = None  # the source's own saving, when its intensities do not tell
    notes: tuple[str, ...] = ()  # what the plan's detail must add, in order


_SHORTENED_NOTE = "the forecast ends before the job would, so only its covered part was compared"


def _plan_from(result: SourceResult, label: str, query: Query, min_savings: float) -> Plan:
    if isinstance(result, Decision):
        start = min(max(result.start, query.now), query.now + query.window)
        notes = tuple(note for note in (result.note, _decision_horizon_note(label, query, result)) if note)
        answered = _Answered(label, start, result.expected, result.now, result.unit, min_savings,
                             stated=result.savings, notes=notes)  # fmt: skip
        return _decide(query, answered)
    if not isinstance(result, Forecast):
        raise SourceError(f"source returned {type(result).__name__}, not a Forecast or Decision")
    if not all(isinstance(p, ForecastPoint) for p in result.points):
        raise SourceError("source returned items that are not ForecastPoint")
    points = tuple(_aware(p) for p in result.points)
    choice = choose_start(points, query.now, query.window, query.duration)
    shortened = choice.length < query.duration.total_seconds() - 1e-6
    floor, floor_name = _floor(min_savings, result.min_savings, result.label or label, result.grid_zone)
    notes = (_SHORTENED_NOTE,) if shortened else _series_horizon_notes(query, choice.data_end)
    answered = _Answered(
        result.label or label, _utc(choice.start), choice.expected, choice.now_value, result.unit, floor, floor_name,
        result.grid_zone, points, notes=(*notes, *([result.attribution] if result.attribution else [])),
    )  # fmt: skip
    return _decide(query, answered)


def _floor(min_savings: float, own: float | None, label: str, grid_zone: str | None) -> tuple[float, str]:
    """The minimum predicted saving that applies, and how the detail names it: the source's own when higher."""
    if isinstance(own, (int, float)) and not isinstance(own, bool) and min_savings < own < 1:
        return float(own), (
            f"the {label} model's minimum for {grid_zone or 'this zone'}, {{:.1%}} (in its "
            "backtest, smaller predicted savings too often ended dirtier than starting at once)"
        )
    return min_savings, "min_savings {:.1%}"


def _series_horizon_notes(query: Query, data_end: float) -> tuple[str, ...]:
    """How far the series let the planner see, when that is short of the caller's window plus the job: a plan
    over a day of forecast must not read as the best start of a 48 h window."""
    if data_end >= (query.now + query.window + query.duration).timestamp() - 1:
        return ()
    end = _utc(data_end)
    last_start = max(end - query.duration, query.now)
    return (
        f"the forecast reaches only {_iso(end)} ({_human(end - query.now)} ahead), so starts after "
        f"{_iso(last_start)} were not compared",
    )


def _decision_horizon_note(label: str, query: Query, decision: Decision) -> str | None:
    """A deciding source that looks less far ahead than the caller's window says so in the plan (a decision shared
    by callers with the same window, minutes apart, is no shorter a look for that)."""
    ahead = decision.looked_ahead
    if ahead is None or ahead >= query.window - timedelta(seconds=1):
        return None
    until = (decision.asked_for or query.now) + ahead
    return f"{label} looks only {_human(ahead)} ahead, so starts after {_iso(until)} were not compared"


def _decide(query: Query, answered: _Answered) -> Plan:
    """The decision rule (``decide``) applied to one source's answer, then worded and built into a Plan."""
    start, expected, now_value = answered.start, answered.expected, answered.now_value
    reason, savings = decide(now_value, expected, start <= query.now, answered.floor, answered.stated)
    if reason == "already-best":
        start, expected, savings = query.now, now_value if now_value is not None else expected, 0.0
        detail = "now is already the best time in the window"
    elif reason == "below-threshold":
        detail = _below_threshold_detail(savings, answered.floor_name.format(answered.floor))
        start, expected, savings = query.now, now_value, 0.0
    else:
        detail = f"best start in the next {_human(query.window)}"
    detail += "".join(f"; {note}" for note in answered.notes)
    return Plan(
        start=start,
        delay=start - query.now,
        zone=query.zone,
        source=answered.label,
        expected=expected,
        now=now_value,
        savings=savings,
        unit=answered.unit,
        reason=reason,
        detail=detail,
        grid_zone=answered.grid_zone or query.grid_zone,
        duration=query.duration,
        window=query.window,
        forecast=answered.points,
    )


def _below_threshold_detail(savings: float | None, floor: str) -> str:
    known = "an unknown amount" if savings is None else f"{savings:.1%}"
    return f"waiting would save {known}, below {floor}"


def _run_now(request: _Request, now: datetime, zone: CloudZone | None, source: str, reason: str, detail: str) -> Plan:
    """Start at once -- or, with ``windows``, at the earliest allowed start: failing open never breaks the caller's
    rule of when work may run (only the operator's ``disable`` switch does)."""
    plan = immediate_plan(reason, detail, window=request.window, duration=request.duration, now=now, zone=zone)
    plan = replace(plan, source=source, grid_zone=request.grid_zone)
    if reason == "disabled" or not request.allowed:
        return plan
    intervals = request.question(now, ()).start_intervals()
    start = intervals[0][0] if intervals else now
    return replace(plan, start=start, delay=start - now)


def immediate_plan(
    reason: str,
    detail: str,
    *,
    window: timedelta = DEFAULT_WINDOW,
    duration: timedelta = DEFAULT_DURATION,
    now: datetime | None = None,
    zone: CloudZone | None = None,
) -> Plan:
    """A plan to start at once, for callers that decide that without a forecast (a retry, no room to wait)."""
    if reason not in REASONS:
        raise ValueError(f"unknown reason {reason!r}; expected one of {', '.join(REASONS)}")
    start = now or CLOCK.now()
    return Plan(
        start=start,
        delay=timedelta(0),
        zone=zone,
        source="-",
        expected=None,
        now=None,
        savings=None,
        unit=G_PER_KWH,
        reason=reason,
        detail=detail,
        duration=duration,
        window=window,
    )


def describe(plan: Plan, *, waiting: bool = True, scheduled: bool = False) -> str:
    """One line that says what was decided and why (``waiting=False``: a plan only, nobody sleeps on it;
    ``scheduled=True``: a run that Prefect's scheduler starts at the plan's start, nothing sleeps either)."""
    where = str(plan.zone) if plan.zone else (plan.grid_zone or "unknown zone")
    fell_back = f" (after {'; '.join(plan.fallbacks)})" if plan.fallbacks else ""
    if plan.delay > timedelta(0) and plan.reason != "disabled":
        numbers = ""
        if plan.now is not None and plan.expected is not None:
            numbers = f": {plan.now:.0f} -> {plan.expected:.0f} {plan.unit}"
            if plan.savings is not None:
                numbers += f" (-{plan.savings:.1%})"
        numbers += _time_only_text(plan)
        if plan.reason not in ("optimal", "dry-run"):  # the earliest allowed start lies ahead
            numbers, fell_back = f"{numbers} ({plan.reason}: {plan.detail})", ""  # the detail names the failures
        if scheduled:
            verb = "would schedule the run" if plan.reason == "dry-run" else "run scheduled"
            when = f"{verb} {_human(plan.delay)} later, at {_iso(plan.start)},"
            dry = f" ({plan.detail.partition(';')[0]}: it starts now)" if plan.reason == "dry-run" else ""
            return f"carbonaware: {when} for {where} via {plan.source}{numbers}{fell_back}{dry}"
        verb = "would wait" if plan.reason == "dry-run" or not waiting else "waiting"
        when = f"{verb} {_human(plan.delay)} until {_iso(plan.start)}"
        return f"carbonaware: {when} for {where} via {plan.source}{numbers}{_grams_text(plan)}{fell_back}"
    verb = "run starts now" if scheduled else "running now" if waiting else "start now"
    if plan.reason == "optimal" and plan.now is not None and plan.expected is not None:  # another zone, at once
        numbers = f": {plan.now:.0f} -> {plan.expected:.0f} {plan.unit}"
        numbers += f" (-{plan.savings:.1%})" if plan.savings is not None else ""
        return f"carbonaware: {verb} in {where} via {plan.source}{numbers}{_time_only_text(plan)}{_grams_text(plan)}"
    return f"carbonaware: {verb} for {where} ({plan.reason}: {plan.detail}){_grams_text(plan)}"


def _time_only_text(plan: Plan) -> str:
    """Beside the saving of moving place and start, what moving the start alone would save at home."""
    if len(plan.alternatives) < 2 or plan.time_savings is None:
        return ""
    return f"; time only, in {plan.alternatives[0].zone}: {_change_text(plan.time_savings)}"


def _change_text(savings: float) -> str:
    """A saving as the change it makes: -70.0%, 0.0%, or +5.0% (a cost)."""
    return "0.0%" if round(savings, 3) == 0 else f"{-savings:+.1%}"


def report_plan(
    plan: Plan,
    log: logging.Logger | logging.LoggerAdapter[Any],
    on_plan: Callable[[Plan], None] | None = None,
    *,
    waiting: bool = True,
    scheduled: bool = False,
) -> None:
    """The one decision line (WARNING for failures, INFO otherwise), then ``on_plan``; a failing hook costs one
    warning, never the work. For callers that decide without the core too (a retry that does not wait)."""
    level = logging.WARNING if plan.reason in ("no-zone", "source-failed") else logging.INFO
    log.log(level, describe(plan, waiting=waiting, scheduled=scheduled), extra={"carbonaware_decision": True})
    if on_plan is not None:
        try:
            on_plan(plan)
        except Exception as exc:  # noqa: BLE001 - a reporting hook must not break the work
            log.warning("carbonaware: on_plan hook failed: %s: %s", type(exc).__name__, exc)


# --------------------------------------------------------------------------------------------------------------
# Planning: where and when (several places, allowed starts, a finish-by deadline)
# --------------------------------------------------------------------------------------------------------------
# Each place's series comes through its own source chain and the one cache, all places at once (threads, each
# bounded by what is left of the window); the hosted scheduler, whose API takes lists of zones and windows, is asked
# once for every place it serves. Then one exact choice over (place, start): ``lowest_mean_start`` per place and
# allowed interval, ``best_place`` across places, ``decide`` against starting at once in the home place.


class _NotAmongOptions(SourceError):
    """The hosted scheduler ranks its options across zones: a zone absent from them is no better than any listed,
    which is an answer (no fallback to another source), though without a start of its own."""

    def __init__(self, message: str, now_value: float | None) -> None:
        super().__init__(message)
        self.now_value = now_value


@dataclass(frozen=True)
class _PlaceAnswer:
    """What one place's chain gave: its best allowed start and mean (epoch seconds), and the mean at the earliest
    allowed start (for the home place: the baseline), or only the failures."""

    place: Place
    label: str = "-"
    start: float | None = None
    mean: float | None = None
    first_mean: float | None = None
    unit: str = G_PER_KWH
    grid_zone: str | None = None
    points: tuple[ForecastPoint, ...] = ()
    floor: float | None = None  # the source's own minimum predicted saving (the offline model's)
    notes: tuple[str, ...] = ()
    failures: tuple[str, ...] = ()

    @property
    def answered(self) -> bool:
        return self.start is not None and self.mean is not None


def _candidate_places(request: _Request, spec: Any) -> tuple[Place, ...]:
    """Home first (given, else detected when a source would use it; with the grid zone), then ``zones``."""
    places: list[Place] = []
    if request.home:
        zone = request.zone or (detect_cloud_zone() if _uses_zone(spec) else None)
        grid_zone = request.grid_zone or os.environ.get("CARBONAWARE_GRID_ZONE") or None
        if zone is not None or grid_zone is not None:
            places.append(Place(zone, grid_zone))
    for place in request.places:
        if not any(place == known or (place.cloud and place.cloud == known.cloud) for known in places):
            places.append(place)
    return tuple(places)


def _plan_where_and_when(request: _Request, now: datetime) -> Plan:
    spec = _source_spec(request)
    places = _candidate_places(request, spec)
    if not places:
        no_zone = "no cloud zone: give provider and region, or zones (or set CARBONAWARE_PROVIDER/CARBONAWARE_REGION)"
        return _run_now(request, now, None, "-", "no-zone", no_zone)
    question = request.question(now, places)
    intervals = [(lo.timestamp(), hi.timestamp()) for lo, hi in question.start_intervals()]
    if not intervals:  # time passed since the arguments were checked (a re-plan late in the window, say)
        return _run_now(request, now, places[0].cloud, "-", "already-best", "no allowed start is left in the window")
    deadline = CLOCK.monotonic() + question.window.total_seconds()  # planning, too, ends with the window
    queries = [_source_query(question, place, request.asking, deadline) for place in places]
    hosted = _hosted_once(places, intervals, queries[0])
    jobs = [_place_job(place, spec, query, intervals, hosted) for place, query in zip(places, queries, strict=True)]
    answers = _answers_within(jobs, places, deadline)
    return _joint_plan(question, intervals, answers, request)


def _place_job(
    place: Place,
    spec: Any,
    query: Query,
    intervals: Sequence[tuple[float, float]],
    hosted: Callable[[Query], Decision],
) -> Callable[[], _PlaceAnswer]:
    return lambda: _place_answer(place, spec, query, intervals, hosted)


def _place_answer(
    place: Place,
    spec: Any,
    query: Query,
    intervals: Sequence[tuple[float, float]],
    hosted: Callable[[Query], Decision],
) -> _PlaceAnswer:
    """The first source of the chain whose answer allows a start, measured over the allowed intervals."""
    failures: list[str] = []
    for label, attempt in _attempts(spec, query):
        try:
            result = hosted(query) if label == "carbonaware" and isinstance(spec, str) else attempt()
            answer = _measured_answer(place, label, result, query, intervals)
        except _NoZone:
            failures.append(f"{label}: no cloud or grid zone")
            continue
        except _NotAmongOptions as bound:
            unit = "gCO2/kWh (marginal)"
            return _PlaceAnswer(
                place, label, first_mean=bound.now_value, unit=unit, grid_zone=place.grid, notes=(str(bound),)
            )
        except SourceError as error:
            failures.append(f"{label}: {error}")
            continue
        except Exception as exc:  # noqa: BLE001 - a broken source must not end the chain
            failures.append(f"{label}: internal error: {type(exc).__name__}: {_quote(str(exc), limit=160)}")
            continue
        return replace(answer, failures=tuple(failures))
    return _PlaceAnswer(place, grid_zone=place.grid, failures=tuple(failures) or ("no source answered",))


def _measured_answer(
    place: Place, label: str, result: SourceResult, query: Query, intervals: Sequence[tuple[float, float]]
) -> _PlaceAnswer:
    if isinstance(result, Decision):
        start = _allowed_start(result.start.timestamp(), intervals)
        if start is None:
            raise SourceError(f"its start {_iso(result.start)} is not an allowed start")
        return _PlaceAnswer(place, label, start, result.expected, result.now, result.unit, place.grid,
                            notes=(result.note,) if result.note else ())  # fmt: skip
    if not isinstance(result, Forecast):
        raise SourceError(f"source returned {type(result).__name__}, not a Forecast or Decision")
    if not all(isinstance(p, ForecastPoint) for p in result.points):
        raise SourceError("source returned items that are not ForecastPoint")
    points = tuple(_aware(p) for p in result.points)
    starts, ends, values = _series_arrays(points, query.now.timestamp())
    length = min(query.duration, HORIZON_CAP).total_seconds()
    best = lowest_mean_start_within(starts, ends, values, intervals, length)
    if best is None:
        raise SourceError("its forecast covers no allowed start and the whole job after it")
    first = lowest_mean_start(starts, ends, values, intervals[0][0], intervals[0][0], length)
    notes = (result.attribution,) if result.attribution else ()
    # a grid place is named as asked (the plan's consumers find the winner by it), not by the source's alias
    grid_zone = place.grid if place.cloud is None else result.grid_zone or place.grid
    return _PlaceAnswer(
        place, result.label or label, best[0], best[1], None if first is None else first[1], result.unit,
        grid_zone, points, result.min_savings, notes,
    )  # fmt: skip


def _allowed_start(start: float, intervals: Sequence[tuple[float, float]]) -> float | None:
    """A decided start inside an allowed interval, or one 5-minute step past its end (the hosted scheduler's grid):
    then the interval's end; None when it is not allowed."""
    step = _DECISION_STEP.total_seconds()
    for lo, hi in intervals:
        if lo - 1 <= start <= hi + step:
            return min(max(start, lo), hi)
    return None


def _answers_within(
    jobs: Sequence[Callable[[], _PlaceAnswer]], places: Sequence[Place], deadline: float
) -> list[_PlaceAnswer]:
    """Every place's answer, all asked at once; a place without an answer when the window ends has failed."""
    if len(jobs) == 1:
        return [jobs[0]()]
    answers: list[_PlaceAnswer | None] = [None] * len(jobs)

    def run(index: int) -> None:
        answers[index] = jobs[index]()

    threads = [threading.Thread(target=run, args=(i,), daemon=True, name="carbonaware-place") for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - CLOCK.monotonic()))
    return [
        answer
        if answer is not None
        else _PlaceAnswer(place, grid_zone=place.grid, failures=("no answer within the window",))
        for answer, place in zip(answers, places, strict=True)
    ]


def _comparable(unit: str) -> tuple[str, bool]:
    return signal_of(unit), is_grams_per_kwh(unit)


def _agreeing_unit(answers: Sequence[_PlaceAnswer]) -> tuple[str, bool] | None:
    """The unit places are compared in: the home place's when it answered, else the most common (first wins)."""
    answered = [answer for answer in answers if answer.answered]
    if not answered:
        return None
    if answers[0].answered or answers[0].first_mean is not None:
        return _comparable(answers[0].unit)
    kinds = [_comparable(answer.unit) for answer in answered]
    return max(kinds, key=kinds.count)


def _joint_plan(
    question: Question, intervals: Sequence[tuple[float, float]], answers: Sequence[_PlaceAnswer], request: _Request
) -> Plan:
    now, several = question.earliest, len(answers) > 1
    unit = _agreeing_unit(answers)
    dropped = [
        answer for answer in answers if answer.answered and unit is not None and _comparable(answer.unit) != unit
    ]
    home_said = answers[0].answered or answers[0].first_mean is not None
    reference = answers[0].unit if home_said else "the other zones'"
    notes = [f"{a.place} left out: {a.label} gives {a.unit}, not comparable with {reference}" for a in dropped]
    usable = [answer if answer.answered and answer not in dropped else None for answer in answers]
    failures = [
        f"{answer.place}: {failure}" if several else failure for answer in answers for failure in answer.failures
    ]
    chosen = best_place([None if a is None else (a.start or 0.0, a.mean or 0.0) for a in usable])
    alternatives = tuple(_alternative(answer, answer in dropped) for answer in answers) if several else ()
    if chosen is None:
        unanswered = [f"{a.place}: {a.label}: {note}" for a in answers if not a.answered for note in a.notes]
        detail = "; ".join([*failures, *notes, *unanswered]) or "no source answered"
        plan = _run_now(request, now, answers[0].place.cloud, "-", "source-failed", detail)
        grid_zone = answers[0].place.grid or plan.grid_zone  # a grid home is named, not "unknown zone"
        return replace(plan, fallbacks=tuple(failures), alternatives=alternatives, grid_zone=grid_zone)
    best = answers[chosen]
    home = usable[0]
    baseline = answers[0].first_mean if _comparable(answers[0].unit) == unit else None
    earliest = intervals[0][0]
    start_is_now = chosen == 0 and (best.start or earliest) <= earliest + 1e-6
    floor, floor_name = _floor(question.min_savings, best.floor, best.label, best.grid_zone)
    reason, savings = decide(baseline, best.mean, start_is_now, floor)
    if reason == "optimal":
        where, start, expected = best, _utc(best.start or earliest), best.mean
        detail = _where_and_when_detail(question, len(answers))
    else:
        where, start, expected = answers[0], _utc(earliest), baseline
        detail = (
            "the earliest allowed start is already the best"
            if reason == "already-best"
            else _below_threshold_detail(savings, floor_name.format(floor))
        )
        savings = 0.0
    for note in (*notes, *best.notes):
        detail += f"; {note}"
    if failures:
        detail += f"; after {'; '.join(failures)}"
    time_savings = _savings(baseline, home.mean) if home is not None and several else None
    return Plan(
        start=start,
        delay=start - now,
        zone=where.place.cloud,
        source=where.label,
        expected=expected,
        now=baseline,
        savings=savings,
        unit=where.unit,
        reason=reason,
        detail=detail,
        grid_zone=where.grid_zone,
        duration=question.duration,
        window=question.window,
        fallbacks=tuple(failures),
        forecast=where.points,
        alternatives=alternatives,
        time_savings=time_savings,
    )


def _where_and_when_detail(question: Question, places: int) -> str:
    what = f"best zone and start of {places} zones" if places > 1 else "best start"
    constraints = []
    if question.allowed:
        constraints.append("inside the allowed windows")
    if question.finish_by is not None:
        constraints.append(f"finishing by {_iso(question.finish_by)}")
    return f"{what} in the next {_human(question.window)}" + "".join(f", {c}" for c in constraints)


def _alternative(answer: _PlaceAnswer, dropped: bool) -> Alternative:
    if not answer.answered:
        why = "; ".join(answer.failures or answer.notes)
        return Alternative(str(answer.place), None, None, answer.unit, answer.label, why)
    note = "unit not comparable with the home zone's: left out" if dropped else ""
    return Alternative(str(answer.place), _utc(answer.start or 0.0), answer.mean, answer.unit, answer.label, note)


# ---- the hosted scheduler, asked once for every zone and window ---------------------------------------------------


def _hosted_once(
    places: Sequence[Place], intervals: Sequence[tuple[float, float]], query: Query
) -> Callable[[Query], Decision]:
    """Each place's hosted-scheduler decision, from one request naming every cloud zone it serves and every allowed
    window (through the cache: concurrent places wait for that one request)."""
    zones = tuple(
        place.cloud
        for place in places
        if place.cloud is not None and place.cloud.region in SCHEDULER_REGIONS.get(place.cloud.provider, frozenset())
    )
    horizon_end = query.now.timestamp() + SCHEDULER_HORIZON.total_seconds()
    windows = tuple(
        (lo, max(hi, lo + SCHEDULER_SHORTEST_JOB.total_seconds())) for lo, hi in intervals if lo < horizon_end
    )

    def decision_for(asked: Query) -> Decision:
        if asked.zone is None:
            raise SourceError("the hosted scheduler needs a cloud zone")
        if asked.zone not in zones:
            raise SourceError(f"{asked.zone} is not supported by the hosted scheduler")
        if asked.duration > SCHEDULER_HORIZON:
            raise SourceError(f"a job over {_human(SCHEDULER_HORIZON)} is longer than the hosted scheduler's forecast")
        if not windows:
            raise SourceError(f"no allowed start lies within the hosted scheduler's {_human(SCHEDULER_HORIZON)}")
        base = base_url("CARBONAWARE_SCHEDULER_BASE_URL", CARBONAWARE_BASE_URL)
        key = ("carbonaware-many", base, zones, asked.duration, windows, asked.now if asked.fixed_now else None)

        def fetch_once() -> dict[CloudZone, Decision]:
            CACHE.check_not_blocked("carbonaware")
            try:
                return _fetch_carbonaware_many(asked, zones, windows)
            except SourceError as error:
                if error.retry_after:
                    CACHE.block("carbonaware", error)
                raise

        wait = min(asked.timeout + 1.0, max(0.0, asked.deadline - CLOCK.monotonic()))
        decisions: dict[CloudZone, Decision] = CACHE.get(key, _shared_fetch(asked, fetch_once), ttl=300.0, wait=wait)
        decision = decisions[asked.zone]
        if decision.expected is None:
            raise _NotAmongOptions(decision.note or "not among the hosted scheduler's options", decision.now)
        if intervals[-1][1] > horizon_end:  # it sees ~24 h whatever it is asked (protocols.md §7)
            seen = f"starts after {_iso(_utc(horizon_end))} were not compared"
            return replace(
                decision, note=f"the hosted scheduler looks only {_human(SCHEDULER_HORIZON)} ahead, so {seen}"
            )
        return decision

    return decision_for


def _fetch_carbonaware_many(
    query: Query, zones: Sequence[CloudZone], windows: Sequence[tuple[float, float]]
) -> dict[CloudZone, Decision]:
    url = base_url("CARBONAWARE_SCHEDULER_BASE_URL", CARBONAWARE_BASE_URL) + "/v0/schedule/"
    _require_safe_url(url, carries_secret=False)
    payload = {
        "duration": format_iso_duration(max(query.duration, SCHEDULER_SHORTEST_JOB)),
        "windows": [{"start": _iso(_utc(lo)), "end": _iso(_utc(hi))} for lo, hi in windows],
        "zones": [{"provider": zone.provider, "region": zone.region} for zone in zones],
        "num_options": 3 * len(zones),  # options are ranked across zones: room for each zone's best
    }
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    response = http_request("POST", url, headers=headers, body=_json_bytes(payload), timeout=query.budget())
    if response.status == 422 and b"enum[" in response.body[:65536]:
        raise SourceError("a zone is not supported by the hosted scheduler (HTTP 422)")
    return _decisions_by_zone(expect_json(response, "scheduler"), zones, windows, query.now)


def _decisions_by_zone(
    document: Any, zones: Sequence[CloudZone], windows: Sequence[tuple[float, float]], now: datetime
) -> dict[CloudZone, Decision]:
    """Per zone, its lowest option (ideal included) starting in an allowed window (or one step past its end); the
    naive case (the first window's start, as the server plans it) gives the figure for starting at once in its
    zone. No allowed option for any zone asked is no answer at all: a SourceError, and the chain goes on."""
    _field(document, "ideal", dict)
    options = [document["ideal"], *(document.get("options") or [])]
    naive = document.get("naive_case")
    best: dict[CloudZone, tuple[float, float]] = {}  # zone -> (g/kWh, start)
    for option in options if isinstance(options, list) else ():
        found = _zoned_option(option, windows)
        if found is None:
            continue
        zone, start, value = found
        if zone in zones and (zone not in best or (value, start) < best[zone]):
            best[zone] = (value, start)
    if not best:
        raise SourceError(f"none of its {len(options)} options is an allowed start in a zone it was asked about")
    earliest = windows[0][0] if windows else now.timestamp()
    naive_found = _zoned_option(naive, [(earliest - 900, earliest + 900)])
    listed = [value for value, _start in best.values()]
    decisions = {}
    for zone in zones:
        now_value = naive_found[2] if naive_found is not None and naive_found[0] == zone else None
        if zone in best:
            value, start = best[zone]
            decisions[zone] = Decision(_utc(start), value, now_value, _savings(now_value, value), "gCO2/kWh (marginal)")
        else:  # "expected" None: no start of its own, every listed option is at least as low
            note = f"not among the hosted scheduler's {len(options)} lowest options" + (
                f" (all at most {max(listed):.0f} gCO2/kWh)" if listed else ""
            )
            decisions[zone] = Decision(now, None, now_value, None, "gCO2/kWh (marginal)", note=note)
    return decisions


def _zoned_option(option: Any, windows: Sequence[tuple[float, float]]) -> tuple[CloudZone, float, float] | None:
    """(zone, allowed start, g/kWh) of one scheduler option, or None when malformed or not an allowed start."""
    if not isinstance(option, dict) or not _valid_intensity(option.get("co2_intensity")):
        return None
    where = option.get("zone")
    if (
        not isinstance(where, dict)
        or not isinstance(where.get("provider"), str)
        or not isinstance(where.get("region"), str)
    ):
        return None
    try:
        moment = parse_datetime(str(option.get("time")))
    except ValueError:
        return None
    start = _allowed_start(moment.timestamp(), windows)
    if start is None:
        return None
    provider = where["provider"].strip().lower()
    zone = CloudZone(provider, _normalise_region(provider, where["region"]))
    return zone, start, float(option["co2_intensity"]) * LBS_PER_MWH_TO_G_PER_KWH


# --------------------------------------------------------------------------------------------------------------
# The wait
# --------------------------------------------------------------------------------------------------------------

_interrupts = 0  # how many times interrupt_waits() was called; each wait remembers the count it began with
_wait_guards: list[Callable[[], None]] = []  # more reasons to end waits early, each raising (the Prefect layer's)
# Reasons to start the job now instead (an operator's switch read during the wait): each returns why, or None.
_start_now_checks: list[Callable[[], str | None]] = []


def _start_now_reason() -> str | None:
    """Why a wait in progress should end and its job start now; a broken check counts as no reason."""
    for check in _start_now_checks:
        try:
            why = check()
        except Exception:  # noqa: BLE001 - a broken check must not break the wait
            continue
        if why:
            return why
    return None


def _started_early(waiter: _Waiter, why: str) -> Plan:
    """The plan as followed when a switch ended the wait: starting now, logged once."""
    now = CLOCK.now()
    waiter.request.log.info("carbonaware: starting now, before the planned %s: %s", _iso(waiter.plan.start), why)
    delay = max(timedelta(0), now - waiter.planned_from)
    return replace(waiter.plan, start=now, delay=delay, reason="disabled", detail=f"{why}; the wait ended early")


def interrupt_waits() -> None:
    """End every wait in progress, in whatever thread, within one sleep chunk (``KeyboardInterrupt``; async waits
    are cancelled); waits that begin later are not affected. ``watch_interrupts`` calls it on Ctrl-C; a program
    with its own SIGINT or SIGTERM handler can call it there."""
    global _interrupts
    _interrupts += 1  # only ever compared for change, so a lost update between two threads still moves it


def watch_interrupts() -> bool:
    """Let Ctrl-C end waits in every thread: Python delivers SIGINT to the main thread only, so a wait in a worker
    thread (a Prefect ``.submit()``/``.map()``, a thread pool) would sleep on and then run its job.

    Puts a SIGINT handler in front of the current one that calls ``interrupt_waits()`` and then the previous
    handler, so KeyboardInterrupt (or whatever that handler does) follows as before. Main thread only (elsewhere
    it returns False); idempotent; an ignored or default SIGINT is left alone. Returns whether Ctrl-C now ends
    waits in other threads.
    """
    import signal

    if threading.current_thread() is not threading.main_thread():
        return False
    try:
        previous = signal.getsignal(signal.SIGINT)
        if getattr(previous, "_carbonaware_interrupts", False):
            return True
        if not callable(previous):  # SIG_IGN, SIG_DFL, or a handler set outside Python: leave them be
            return False

        def on_sigint(signum: int, frame: Any) -> Any:
            interrupt_waits()
            return previous(signum, frame)

        on_sigint._carbonaware_interrupts = True  # type: ignore[attr-defined]
        signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main interpreter
        return False
    return True


def _interrupt_check(error: type[BaseException] = KeyboardInterrupt) -> Callable[[], None]:
    """For one wait, taken as it begins: a check that raises ``error`` once ``interrupt_waits()`` has been called
    since, or whatever a guard raises. On the main thread it also starts watching Ctrl-C, for the waits that later
    run in other threads."""
    watch_interrupts()
    began_with = _interrupts

    def check() -> None:
        if _interrupts != began_with:
            raise error
        for guard in _wait_guards:
            try:
                guard()
            except Exception:  # noqa: BLE001 - a broken guard must not break the wait; its BaseException ends it
                continue

    return check


def _prepare(
    window: timedelta, duration: timedelta, provider: Any, region: Any, options: Mapping[str, Any]
) -> tuple[_Request, Plan, float, float]:
    request = validate_arguments(window, duration, provider, region, options)
    called_at, called_mono = CLOCK.time(), CLOCK.monotonic()
    plan = _plan(request)
    report_plan(plan, request.log, request.on_plan)
    _record_decision(plan, request)
    return request, plan, called_at, called_mono


def _wake_at(plan: Plan, request: _Request, planned_at: float, deadline: float) -> float:
    """Wall-clock second to start, never past ``deadline``. A live plan's start is a real moment (its own
    ``now`` was read a little after ``planned_at``, so adding the delay to ``planned_at`` would start early);
    a replay's start is in its own time, so its delay counts from ``planned_at``."""
    if not plan.waits:
        return planned_at
    start = plan.start.timestamp() if request.now is None else planned_at + plan.delay.total_seconds()
    return min(start, deadline)


class _Waiter:
    """The wait between planning and starting: a wall-clock target, a hard deadline, and -- for long waits --
    re-planning at intervals, since a forecast made hours ago is worse than a fresh one. Elapsed (monotonic) time
    bounds it too: a wall clock stepped back never stretches the wait past the planned delay or the window."""

    def __init__(self, request: _Request, plan: Plan, called_at: float, called_mono: float | None = None) -> None:
        self.request, self.plan, self.called_at = request, plan, called_at
        self.deadline = called_at + request.window.total_seconds()
        self.wake_at = _wake_at(plan, request, called_at, self.deadline)
        mono = CLOCK.monotonic() if called_mono is None else called_mono
        self.mono_deadline = mono + request.window.total_seconds()
        self.wake_mono = mono + (self.wake_at - called_at)  # the same target in elapsed time, within the window
        self.planned_from = plan.start - plan.delay
        enabled = request.replan if request.replan is not None else plan.delay > REPLAN_AFTER
        self.next_replan = called_at + request.replan_every.total_seconds() if enabled and plan.waits else math.inf

    def pause(self) -> float:
        """Seconds to sleep next; 0 when it is time to start -- by the wall clock or by elapsed time, whichever
        comes first."""
        left = min(self.wake_at - CLOCK.time(), self.wake_mono - CLOCK.monotonic())
        return max(0.0, min(left, WAIT_CHUNK_SECONDS))

    def replan_due(self) -> bool:
        now = CLOCK.time()
        return now >= self.next_replan and self.wake_at - now > 60 and self.wake_mono - CLOCK.monotonic() > 60

    def replan(self) -> None:
        now, mono = CLOCK.time(), CLOCK.monotonic()
        self.next_replan = now + self.request.replan_every.total_seconds()
        replay = self.request.now is not None  # a replay keeps its own clock; live waits ask about the real now
        reference = self.planned_from + timedelta(seconds=now - self.called_at) if replay else None
        left = min(self.deadline - now, self.mono_deadline - mono)  # what is left of the window by either clock
        fresh = _plan(self.request.with_(window=timedelta(seconds=left), now=reference))
        if fresh.reason in ("no-zone", "source-failed", "disabled"):
            self.request.log.debug("carbonaware: re-plan gave no answer (%s); keeping the start", fresh.detail)
            return
        wake_at = _wake_at(fresh, self.request, now, self.deadline)
        if abs(wake_at - self.wake_at) >= 60:
            self.request.log.info(
                "carbonaware: re-planned with a fresher forecast: start moves from %s to %s",
                _iso(_utc(self.wake_at)),
                _iso(_utc(wake_at)),
            )
            wake_mono = min(mono + (wake_at - now), self.mono_deadline)  # elapsed time still ends it in the window
            self.wake_at, self.wake_mono, self.plan = wake_at, wake_mono, replace(fresh, id=self.plan.id)


def carbonaware_delay(
    window: timedelta = DEFAULT_WINDOW,
    duration: timedelta = DEFAULT_DURATION,
    provider: str | None = None,
    region: str | None = None,
    **options: Any,
) -> Plan:
    """Plan, then sleep until the best start (at most ``window``). Returns the plan it followed."""
    interrupted = _interrupt_check()
    waiter = _Waiter(*_prepare(window, duration, provider, region, options))
    while (pause := waiter.pause()) > 0:
        CLOCK.sleep(pause)
        interrupted()
        if _start_now_checks and (why := _start_now_reason()):
            return _started_early(waiter, why)
        if waiter.replan_due():
            waiter.replan()
    interrupted()
    return waiter.plan


async def carbonaware_delay_async(
    window: timedelta = DEFAULT_WINDOW,
    duration: timedelta = DEFAULT_DURATION,
    provider: str | None = None,
    region: str | None = None,
    **options: Any,
) -> Plan:
    """As carbonaware_delay, but planning runs in a worker thread and the wait is ``asyncio.sleep``."""
    import asyncio

    interrupted = _interrupt_check(asyncio.CancelledError)  # as asyncio.run does on Ctrl-C: a cancellation
    request = validate_arguments(window, duration, provider, region, options)
    called_at, called_mono = CLOCK.time(), CLOCK.monotonic()
    plan = await asyncio.to_thread(_plan, request)  # a caller cancelled meanwhile ends here: no report, no on_plan
    await asyncio.to_thread(report_plan, plan, request.log, request.on_plan)  # on_plan may block (an artifact)
    if ledger_path(request.ledger) is not None:  # a file append: off the event loop too
        await asyncio.to_thread(_record_decision, plan, request)
    waiter = _Waiter(request, plan, called_at, called_mono)
    while (pause := waiter.pause()) > 0:
        await CLOCK.asleep(pause)
        interrupted()
        if _start_now_checks and (why := await asyncio.to_thread(_start_now_reason)):
            return _started_early(waiter, why)
        if waiter.replan_due():
            await asyncio.to_thread(waiter.replan)
    interrupted()
    return waiter.plan


# --------------------------------------------------------------------------------------------------------------
# Ledger: options and ids
# --------------------------------------------------------------------------------------------------------------

LEDGER_VERSION = 1
LEDGER_LOCK_SECONDS = 5.0
MAX_LEDGER_LINE = 1 << 20  # a longer line is damage (or not ours): skipped without reading it into memory
MAX_POWER_KW = 1e6  # a gigawatt: beyond any one job
OUTCOME_PATIENCE = timedelta(days=2)  # how long measured data may be late before an estimate stands in for it
HISTORY_SOURCES = ("electricitymaps", "ukgrid", "watttime")  # sources that publish what the grid actually emitted
OUTCOME_STATUSES = ("pending", "measured", "estimate")
_GRAMS_UNIT = re.compile(r"gco2(?:e|eq)?/kwh(?: \((?:average|marginal)\))?")


def check_power_kw(value: Any) -> float | None:
    """``power_kw``: the job's average draw in kW; None (the default) means unknown -- and no grams."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"power_kw must be a number of kilowatts, not {type(value).__name__}")
    if not math.isfinite(value) or not 0 < value <= MAX_POWER_KW:
        raise ValueError(f"power_kw must be kilowatts in (0, {MAX_POWER_KW:.0f}], got {value!r}")
    return float(value)


def check_ledger_option(value: Any) -> str | None:
    """``ledger``: the path of a JSON Lines file (a str or path object); None: ``CARBONAWARE_LEDGER`` if set."""
    if value is None:
        return None
    if not isinstance(value, str) and not hasattr(value, "__fspath__"):
        raise TypeError(f"ledger must be a path, not {type(value).__name__}")
    path = os.fspath(value)
    if not isinstance(path, str) or not path.strip() or "\0" in path:
        raise ValueError(f"ledger must be a non-empty file path, got {value!r}")
    return path


def ledger_path(option: str | None) -> str | None:
    """The ledger in use: the option, else ``CARBONAWARE_LEDGER``, else none."""
    return option or os.environ.get("CARBONAWARE_LEDGER", "").strip() or None


_IDS: list[Any] = []  # [random.Random seeded from os.urandom], per process (reseeded in a forked child)


def _new_id() -> str:
    """64 random bits that tell a ledger's decisions apart (no uuid import). Drawn from a generator seeded once per
    process from ``os.urandom``: the ids need to be unique, not secret, and ``os.urandom`` per decision can cost
    a tenth of a millisecond on a busy machine."""
    if not _IDS:
        import random

        _IDS.append(random.Random(os.urandom(32)))
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=_IDS.clear)
    return f"{_IDS[0].getrandbits(64):016x}"


# --------------------------------------------------------------------------------------------------------------
# Grams: small pure functions
# --------------------------------------------------------------------------------------------------------------


def energy_kwh(power_kw: float | None, runtime: timedelta) -> float | None:
    return None if power_kw is None else power_kw * runtime.total_seconds() / 3600.0


def is_grams_per_kwh(unit: str) -> bool:
    """Whether ``unit`` is grams of CO2(eq) per kWh, the one unit that times kWh gives grams."""
    return bool(_GRAMS_UNIT.fullmatch(unit.strip().lower()))


def emissions_g(intensity: float | None, unit: str, energy: float | None) -> float | None:
    """Grams for ``energy`` kWh at ``intensity``; None when either is unknown, not finite, or not in g/kWh."""
    if intensity is None or energy is None or not is_grams_per_kwh(unit):
        return None
    grams = intensity * energy
    return grams if math.isfinite(grams) else None


def avoided_g(counterfactual_g: float | None, actual_g: float | None) -> float | None:
    """Grams avoided against starting at once (negative: waiting emitted more)."""
    return None if counterfactual_g is None or actual_g is None else counterfactual_g - actual_g


def signal_of(unit: str) -> str:
    """Which accounting a figure belongs to: "marginal" (the emissions a change of load causes, WattTime's MOER)
    or "average" (the grid mix's mean); they are not comparable."""
    return "marginal" if "marginal" in unit.lower() else "average"


def _grams_text(plan: Plan) -> str:
    if plan.energy_kwh is None:
        return ""
    text = f"; {plan.energy_kwh:.3g} kWh"
    if plan.emissions_now_g is not None and plan.emissions_g is not None and plan.avoided_g is not None:
        text += f": {plan.emissions_now_g:.0f} -> {plan.emissions_g:.0f} g ({signal_of(plan.unit)}, "
        text += f"avoids {plan.avoided_g:.0f} g)"
    return text


# --------------------------------------------------------------------------------------------------------------
# Ledger file: one JSON object a line, appended whole
# --------------------------------------------------------------------------------------------------------------


def append_records(path: str, records: Sequence[Mapping[str, Any]]) -> None:
    """Append ``records`` as JSON lines in one write under an exclusive lock: writers in many processes never
    interleave or lose a line (O_APPEND puts each write at the end). A line a crashed writer left unfinished is
    ended first, so it spoils only itself. Raises OSError/ValueError; callers decide whether that matters."""
    import json

    data = b"".join(json.dumps(r, separators=(",", ":"), allow_nan=False).encode() + b"\n" for r in records)
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags | getattr(os, "O_NONBLOCK", 0), 0o644)  # a FIFO must not hold the work at open
    try:
        import stat

        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"not a regular file: {path}")  # a FIFO or a device would block or swallow records
        _lock(fd)
        size = os.fstat(fd).st_size
        if size and hasattr(os, "pread") and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)  # releases the lock


def _lock(fd: int) -> None:
    """The exclusive lock, waited for at most ``patience`` seconds: a writer holds it for one write, so a lock
    held longer is a stuck process (or a stale NFS lock), which must not hold up the work."""
    try:
        import fcntl
    except ImportError:  # Windows: appends of one write each, without the lock
        return
    patience = LEDGER_LOCK_SECONDS
    give_up = time.monotonic() + patience
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= give_up:
                raise OSError(f"the ledger stayed locked by another writer for {patience:.0f} s") from None
            time.sleep(0.001)


def read_ledger(path: str, log: logging.Logger | logging.LoggerAdapter[Any] = logger) -> list[dict[str, Any]]:
    """The ledger's records in file order. A damaged or foreign line is skipped and counted in one warning;
    a missing file is an empty ledger."""
    import json

    records: list[dict[str, Any]] = []
    skipped: list[int] = []
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed below; binary, so no line can fail to decode here
    except FileNotFoundError:
        return records
    with handle:
        number = 0
        while line := handle.readline(MAX_LEDGER_LINE):
            number += 1
            if not line.endswith(b"\n") and len(line) == MAX_LEDGER_LINE:
                while (rest := handle.readline(MAX_LEDGER_LINE)) and not rest.endswith(b"\n"):
                    pass
                skipped.append(number)
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                record = None
            if _is_record(record):
                records.append(record)
            else:
                skipped.append(number)
    if skipped:
        where = ", ".join(str(n) for n in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        log.warning(
            "carbonaware: ledger %s: skipped %d damaged or foreign line(s) (line %s)", path, len(skipped), where
        )
    return records


def _is_record(record: Any) -> TypeGuard[dict[str, Any]]:
    if not isinstance(record, dict) or record.get("v") != LEDGER_VERSION or not isinstance(record.get("id"), str):
        return False
    if record.get("kind") == "decision":
        return isinstance(record.get("plan"), dict) and isinstance(record.get("called_at"), str)
    return record.get("kind") == "outcome" and isinstance(record.get("decision"), str)


def decision_record(plan: Plan) -> dict[str, Any]:
    return {
        "v": LEDGER_VERSION,
        "kind": "decision",
        "id": plan.id,
        "at": _iso(CLOCK.now()),
        "called_at": _iso(plan.start - plan.delay),
        "plan": plan.to_dict(),
    }


# Integrations that write records later, off the work's path (Prefect's publisher, inside runs): a sink returns
# True when it took the records, False to leave them to the synchronous append here.
ledger_sinks: list[Callable[[str, Sequence[Mapping[str, Any]]], bool]] = []


def _write(
    path: str | None, records: Sequence[Mapping[str, Any]], log: logging.Logger | logging.LoggerAdapter[Any]
) -> None:
    """Append to the ledger, failing open: a full disk or a read-only path costs a warning, never the work."""
    if path is None:
        return
    for sink in ledger_sinks:
        try:
            if sink(path, records):
                return
        except Exception as exc:  # noqa: BLE001 - a broken sink falls back to the append below
            log.warning("carbonaware: ledger sink failed (%s: %s); appending now", type(exc).__name__, exc)
    try:
        append_records(path, records)
    except Exception as exc:  # noqa: BLE001 - reporting must not break the work
        log.warning("carbonaware: could not write to ledger %s: %s: %s", path, type(exc).__name__, exc)


def _record_decision(plan: Plan, request: _Request) -> None:
    _write(ledger_path(request.ledger), [decision_record(plan)], request.log)


def record_decision(plan: Plan, ledger: str | None = None) -> Plan:
    """Write ``plan`` to the ledger (``ledger`` or ``CARBONAWARE_LEDGER``), for plans decided outside the core's
    entry points (which record their own); returns the plan with an id to pass to ``record_outcome``."""
    plan = plan if plan.id else replace(plan, id=_new_id())
    _write(ledger_path(check_ledger_option(ledger)), [decision_record(plan)], logger)
    return plan


# --------------------------------------------------------------------------------------------------------------
# Realised outcomes: measured history against starting at once
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What the work emitted against what starting at once would have: the intensities measured (or, failing
    that, estimated) over [started, started + runtime] and [called_at, called_at + runtime]."""

    decision: str  # the Plan's id
    called_at: datetime  # when the caller asked: the counterfactual starts here
    started: datetime
    ended: datetime
    status: str  # "pending" (not published yet), "measured", or "estimate" (the offline model's typical values)
    source: str  # where the realised intensities came from ("-" while pending)
    unit: str = G_PER_KWH
    actual: float | None = None  # mean intensity over the run as it happened
    counterfactual: float | None = None  # mean intensity had it started at once and run as long
    power_kw: float | None = None
    zone: CloudZone | None = None
    grid_zone: str | None = None
    planned_source: str = "-"
    detail: str = ""

    @property
    def runtime(self) -> timedelta:
        return max(self.ended - self.started, timedelta(0))

    @property
    def savings(self) -> float | None:
        return _savings(self.counterfactual, self.actual)

    @property
    def energy_kwh(self) -> float | None:
        return energy_kwh(self.power_kw, self.runtime)

    @property
    def emissions_g(self) -> float | None:
        return emissions_g(self.actual, self.unit, self.energy_kwh)

    @property
    def emissions_now_g(self) -> float | None:
        return emissions_g(self.counterfactual, self.unit, self.energy_kwh)

    @property
    def avoided_g(self) -> float | None:
        return avoided_g(self.emissions_now_g, self.emissions_g)

    def to_record(self) -> dict[str, Any]:
        return {
            "v": LEDGER_VERSION,
            "kind": "outcome",
            "id": _new_id(),
            "at": _iso(CLOCK.now()),
            "decision": self.decision,
            "status": self.status,
            "called_at": _iso(self.called_at),
            "started": _iso(self.started),
            "ended": _iso(self.ended),
            "runtime_seconds": round(self.runtime.total_seconds(), 3),
            "source": self.source,
            "planned_source": self.planned_source,
            "signal": signal_of(self.unit),
            "unit": self.unit,
            "actual": _round_or_none(self.actual),
            "counterfactual": _round_or_none(self.counterfactual),
            "savings": _round_or_none(self.savings, 4),
            "power_kw": self.power_kw,
            "energy_kwh": _round_or_none(self.energy_kwh, 9),
            "emissions_g": _round_or_none(self.emissions_g, 3),
            "emissions_now_g": _round_or_none(self.emissions_now_g, 3),
            "avoided_g": _round_or_none(self.avoided_g, 3),
            "zone": None if self.zone is None else {"provider": self.zone.provider, "region": self.zone.region},
            "grid_zone": self.grid_zone,
            "detail": self.detail,
        }


def outcome_from_record(record: Mapping[str, Any]) -> Outcome:
    """An outcome back from its ledger record; ValueError/TypeError/KeyError if it is not one."""
    zone = record.get("zone")
    return Outcome(
        decision=str(record["decision"]),
        called_at=parse_datetime(str(record["called_at"])),
        started=parse_datetime(str(record["started"])),
        ended=parse_datetime(str(record["ended"])),
        status=str(record["status"]) if record.get("status") in OUTCOME_STATUSES else "pending",
        source=str(record.get("source", "-")),
        unit=str(record.get("unit", G_PER_KWH)),
        actual=_finite_or_none(record.get("actual")),
        counterfactual=_finite_or_none(record.get("counterfactual")),
        power_kw=_finite_or_none(record.get("power_kw")),
        zone=CloudZone(str(zone["provider"]), str(zone["region"])) if isinstance(zone, dict) else None,
        grid_zone=record["grid_zone"] if isinstance(record.get("grid_zone"), str) else None,
        planned_source=str(record.get("planned_source", "-")),
        detail=str(record.get("detail", "")),
    )


def _finite_or_none(value: Any) -> float | None:
    return float(value) if _valid_intensity(value) or (type(value) in (int, float) and math.isfinite(value)) else None


def _aware_utc(value: Any, name: str) -> datetime:
    if not isinstance(value, datetime) or value.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime")
    return value.astimezone(timezone.utc)


def record_outcome(plan: Plan, started: datetime, ended: datetime, *, ledger: str | None = None) -> Outcome:
    """Record that the work planned by ``plan`` ran from ``started`` to ``ended`` (aware datetimes).

    Nothing is fetched here, so the work is never held up: measured intensities are published after the fact, so
    the outcome is written "pending" and ``python -m carbonaware_core report`` completes it later (or call
    ``resolve_outcome``). Argument errors raise; a ledger that cannot be written costs a warning."""
    outcome = pending_outcome(plan, started, ended)
    _write(ledger_path(check_ledger_option(ledger)), [outcome.to_record()], logger)
    return outcome


def pending_outcome(plan: Plan, started: datetime, ended: datetime) -> Outcome:
    """The outcome ``record_outcome`` records, not written anywhere (for integrations that write it later)."""
    started, ended = _aware_utc(started, "started"), _aware_utc(ended, "ended")
    if ended < started:
        raise ValueError("ended must not be before started")
    return Outcome(
        decision=plan.id,
        called_at=plan.start - plan.delay,
        started=started,
        ended=ended,
        status="pending",
        source="-",
        power_kw=plan.power_kw,
        zone=plan.zone,
        grid_zone=plan.grid_zone,
        planned_source=plan.source,
        detail="measured intensities are published after the fact; report completes this",
    )


def interval_mean(points: Iterable[ForecastPoint], start: datetime, end: datetime) -> float | None:
    """Time-weighted mean intensity over [start, end), or None unless valid points cover at least 99 % of it.
    An empty interval (a job of no measurable length) reads the point holding ``start``."""
    begin, stop = start.timestamp(), end.timestamp()
    if stop <= begin:
        stop = begin + 1.0
    weighted = covered = 0.0
    for point in points:
        if not _valid_intensity(point.value):
            continue
        lo, hi = max(begin, _aware(point).start.timestamp()), min(stop, _aware(point).end.timestamp())
        if hi > lo:
            weighted += float(point.value) * (hi - lo)
            covered += hi - lo
    if covered < 0.99 * (stop - begin):
        return None
    return weighted / covered


def _history_candidates(outcome: Outcome) -> list[str]:
    """Sources to ask for measured values: the planning source first if it publishes history; NESO only for
    Great Britain (it knows no other grid)."""
    zone = grid_zone_for(Query(outcome.zone, outcome.grid_zone, outcome.started, timedelta(0), timedelta(0), 1.0))
    names = [outcome.planned_source, *HISTORY_SOURCES]
    chosen = []
    for name in names:
        if name in HISTORY_SOURCES and name not in chosen and (name != "ukgrid" or zone == "GB"):
            chosen.append(name)
    return chosen


def _history(outcome: Outcome, name: str, start: datetime, end: datetime, timeout: float) -> tuple[ForecastPoint, ...]:
    """Measured intensities over [start, end) from source ``name``."""
    return fetch_actuals(name, outcome.zone, start, end, timeout=timeout, grid_zone=outcome.grid_zone)


def _history_unit(name: str) -> str:
    return "gCO2/kWh (marginal)" if name == "watttime" else G_PER_KWH


def _span(outcome: Outcome) -> tuple[datetime, datetime]:
    runtime = max(outcome.runtime, timedelta(seconds=1))
    return min(outcome.called_at, outcome.started), max(outcome.called_at, outcome.started) + runtime


def _realised(outcome: Outcome, points: Sequence[ForecastPoint]) -> tuple[float, float] | None:
    runtime = outcome.runtime
    actual = interval_mean(points, outcome.started, outcome.started + runtime)
    counterfactual = interval_mean(points, outcome.called_at, outcome.called_at + runtime)
    return None if actual is None or counterfactual is None else (actual, counterfactual)


def resolve_outcome(outcome: Outcome, *, timeout: float = HTTP_TIMEOUT_SECONDS, final: bool = False) -> Outcome:
    """A pending outcome completed from measured history if published, else -- once ``OUTCOME_PATIENCE`` has
    passed since the run (or ``final``) -- from the offline model as a labelled estimate; else still pending,
    with the reasons in ``detail``. Never raises for a source's failure."""
    if outcome.status != "pending":
        return outcome
    start, end = _span(outcome)
    reasons = []
    for name in _history_candidates(outcome):
        try:
            found = _realised(outcome, _history(outcome, name, start, end, timeout))
        except SourceError as error:
            reasons.append(f"{name}: {error}")
            continue
        except Exception as exc:  # noqa: BLE001 - a broken reader must not break the report
            reasons.append(f"{name}: internal error: {type(exc).__name__}")
            continue
        if found is None:
            reasons.append(f"{name}: not all of the run is published yet")
            continue
        actual, counterfactual = found
        detail = f"measured by {name}"
        return replace(
            outcome,
            status="measured",
            source=name,
            unit=_history_unit(name),
            actual=actual,
            counterfactual=counterfactual,
            detail=detail,
        )
    why = "; ".join(reasons) or "no source with history"
    if not final and CLOCK.now() - outcome.ended < OUTCOME_PATIENCE:
        return replace(outcome, detail=f"pending: {why}")
    return _estimated(outcome, why)


def _estimated(outcome: Outcome, why: str) -> Outcome:
    """The offline model's typical values for those hours: an estimate, labelled so, never "measured"."""
    start, end = _span(outcome)
    query = Query(outcome.zone, outcome.grid_zone, start, end - start, timedelta(seconds=1), 1.0)
    try:
        found = _realised(outcome, _fetch_offline(query).points)
    except Exception as exc:  # noqa: BLE001 - no model for the zone: stays pending, says why
        return replace(outcome, detail=f"pending: {why}; no estimate either ({type(exc).__name__}: {exc})")
    if found is None:
        return replace(outcome, detail=f"pending: {why}; no estimate either")
    actual, counterfactual = found
    detail = f"estimate from the offline model's typical hours (no measurement: {why})"
    return replace(
        outcome,
        status="estimate",
        source="offline",
        unit=G_PER_KWH,
        actual=actual,
        counterfactual=counterfactual,
        detail=detail,
    )


# --------------------------------------------------------------------------------------------------------------
# Report: totals over a period
# --------------------------------------------------------------------------------------------------------------

REPORT_RESOLVE_SECONDS = 60.0  # completing pending outcomes stops after this; the rest stay pending for next time


@dataclass
class _Totals:
    decisions: int = 0
    waits: int = 0
    hours_waited: float = 0.0
    kwh: float = 0.0
    predicted_avoided_g: float = 0.0
    measured_avoided_g: float = 0.0
    estimated_avoided_g: float = 0.0
    measured: int = 0
    estimated: int = 0
    pending: int = 0
    negative: int = 0  # realised (measured or estimated) savings below zero

    def add(self, plan: Mapping[str, Any], outcome: Outcome | None) -> None:
        self.decisions += 1
        delay = _number(plan.get("delay_seconds"))
        if plan.get("reason") == "optimal" and delay > 0:
            self.waits += 1
            self.hours_waited += delay / 3600.0
        used = outcome.energy_kwh if outcome is not None else None
        self.kwh += used if used is not None else _number(plan.get("energy_kwh"))
        self.predicted_avoided_g += _number(plan.get("avoided_g"))
        if outcome is None or outcome.status == "pending":
            self.pending += outcome is not None
            return
        if outcome.status == "measured":
            self.measured += 1
            self.measured_avoided_g += outcome.avoided_g or 0.0
        else:
            self.estimated += 1
            self.estimated_avoided_g += outcome.avoided_g or 0.0
        self.negative += outcome.savings is not None and outcome.savings < 0

    def to_dict(self) -> dict[str, Any]:
        realised = self.measured + self.estimated
        return {
            "decisions": self.decisions,
            "waits": self.waits,
            "hours_waited": round(self.hours_waited, 3),
            "kwh": round(self.kwh, 3),
            "predicted_avoided_g": round(self.predicted_avoided_g, 1),
            "measured_avoided_g": round(self.measured_avoided_g, 1),
            "estimated_avoided_g": round(self.estimated_avoided_g, 1),
            "outcomes_measured": self.measured,
            "outcomes_estimated": self.estimated,
            "outcomes_pending": self.pending,
            "negative_share": round(self.negative / realised, 4) if realised else None,
        }


def _number(value: Any) -> float:
    return float(value) if type(value) in (int, float) and math.isfinite(value) else 0.0


def latest_outcomes(records: Iterable[Mapping[str, Any]]) -> dict[str, Outcome]:
    """Each decision's latest outcome (a completed one supersedes the pending one written before it)."""
    found: dict[str, Outcome] = {}
    for record in records:
        if record.get("kind") != "outcome":
            continue
        try:
            outcome = outcome_from_record(record)
        except (KeyError, TypeError, ValueError):
            continue
        if (
            outcome.status != "pending"
            or found.get(outcome.decision) is None
            or found[outcome.decision].status == "pending"
        ):
            found[outcome.decision] = outcome
    return found


def decisions_between(
    records: Iterable[Mapping[str, Any]], since: datetime, until: datetime
) -> list[Mapping[str, Any]]:
    """Decision records whose call time lies in [since, until), each id once."""
    chosen: dict[str, Mapping[str, Any]] = {}
    for record in records:
        if record.get("kind") != "decision" or record["id"] in chosen:
            continue
        try:
            called = parse_datetime(str(record["called_at"]))
        except ValueError:
            continue
        if since <= called < until:
            chosen[record["id"]] = record
    return list(chosen.values())


def complete_outcomes(
    decisions: Sequence[Mapping[str, Any]], outcomes: dict[str, Outcome], *, timeout: float, budget: float
) -> list[Outcome]:
    """Try to complete the pending outcomes of ``decisions`` (within ``budget`` seconds); return the completed."""
    stop = CLOCK.monotonic() + budget
    done = []
    for record in decisions:
        outcome = outcomes.get(record["id"])
        if outcome is None or outcome.status != "pending" or CLOCK.monotonic() >= stop:
            continue
        fresh = resolve_outcome(outcome, timeout=min(timeout, max(0.1, stop - CLOCK.monotonic())))
        outcomes[record["id"]] = fresh
        if fresh.status != "pending":
            done.append(fresh)
    return done


def build_report(
    decisions: Sequence[Mapping[str, Any]], outcomes: Mapping[str, Outcome], since: datetime, until: datetime
) -> dict[str, Any]:
    """Totals overall, by grid zone, by source and by signal, and realised grams avoided per day."""
    total = _Totals()
    groups: dict[str, dict[str, _Totals]] = {"by_zone": {}, "by_source": {}, "by_signal": {}}
    per_day: dict[str, list[float]] = {}
    for record in decisions:
        plan = record["plan"]
        outcome = outcomes.get(record["id"])
        total.add(plan, outcome)
        keys = {
            "by_zone": _zone_label(plan),
            "by_source": str(plan.get("source")),
            "by_signal": str(plan.get("signal", "average")),
        }
        for group, key in keys.items():
            groups[group].setdefault(key, _Totals()).add(plan, outcome)
        day = str(record["called_at"])[:10]
        cell = per_day.setdefault(day, [0.0, 0.0])
        if outcome is not None and outcome.status != "pending" and outcome.avoided_g is not None:
            cell[0 if outcome.status == "measured" else 1] += outcome.avoided_g
    return {
        "since": _iso(since),
        "until": _iso(until),
        "total": total.to_dict(),
        **{group: {key: t.to_dict() for key, t in sorted(by.items())} for group, by in groups.items()},
        "by_day": [
            {"day": d, "measured_avoided_g": round(m, 1), "estimated_avoided_g": round(e, 1)}
            for d, (m, e) in sorted(per_day.items())
        ],
    }


def _zone_label(plan: Mapping[str, Any]) -> str:
    if isinstance(plan.get("grid_zone"), str):
        return str(plan["grid_zone"])
    zone = plan.get("zone")
    return f"{zone.get('provider')}:{zone.get('region')}" if isinstance(zone, dict) else "unknown"


_REPORT_COLUMNS = (
    ("decisions", "decisions", "{:d}"),
    ("waits", "waits", "{:d}"),
    ("hours_waited", "hours", "{:.1f}"),
    ("kwh", "kWh", "{:.1f}"),
    ("predicted_avoided_g", "pred. g", "{:.0f}"),
    ("measured_avoided_g", "meas. g", "{:.0f}"),
    ("estimated_avoided_g", "est. g", "{:.0f}"),
    ("outcomes_pending", "pending", "{:d}"),
    ("negative_share", "worse", "{:.0%}"),
)


def render_report(report: Mapping[str, Any], width: int = 30) -> str:
    """The report as a table (one row overall, then per zone, source, signal) and a chart of grams per day."""
    header = f"{'':<28}" + "".join(f"{title:>10}" for _key, title, _fmt in _REPORT_COLUMNS)
    lines = [f"carbonaware report {report['since']} .. {report['until']}", header]
    rows = [("total", report["total"])]
    for group, label in (("by_zone", "zone"), ("by_source", "source"), ("by_signal", "signal")):
        rows += [(f"{label} {_plain_cell(key)}", totals) for key, totals in report[group].items()]
    for name, totals in rows:
        cells = ("-" if totals[key] is None else fmt.format(totals[key]) for key, _title, fmt in _REPORT_COLUMNS)
        lines.append(f"{name[:27]:<28}" + "".join(f"{cell:>10}" for cell in cells))
    if len(report["by_signal"]) > 1:
        lines.append("note: grams of average and marginal accounting are not comparable; see the signal rows")
    lines += ["", "realised g avoided per day (# measured, + estimated; negative: waiting emitted more):"]
    days = report["by_day"]
    scale = max((abs(d["measured_avoided_g"]) + abs(d["estimated_avoided_g"]) for d in days), default=0.0) or 1.0
    for day in days:
        measured, estimated = day["measured_avoided_g"], day["estimated_avoided_g"]
        bar = "#" * round(width * abs(measured) / scale) + "+" * round(width * abs(estimated) / scale)
        sign = "-" if measured + estimated < 0 else " "
        lines.append(f"{_plain_cell(day['day'])} {measured + estimated:>10.0f} {sign}{bar}")
    if not days:
        lines.append("(no decisions in this period)")
    lines.append("counterfactual: starting at once; predicted from the forecast, measured/estimated after the run")
    return "\n".join(lines)


def _plain_cell(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)


def _since(text: str, until: datetime) -> datetime:
    try:
        back = parse_duration(text)
    except ValueError:
        return parse_datetime(text)
    try:
        return until - back
    except OverflowError:
        raise ValueError(f"--since {text} reaches before the year 1") from None


def _cli_report(args: Any) -> int:
    import json

    until = parse_datetime(args.until) if args.until else CLOCK.now()
    since = _since(args.since, until)
    path = args.ledger or ledger_path(None)
    if args.prefect:  # the events carbonaware_prefect emitted: the API is the ledger (read only)
        try:
            from carbonaware_prefect import read_prefect_records
        except ImportError as exc:
            print(f"carbonaware: --prefect needs carbonaware_prefect and prefect ({exc})", file=sys.stderr)
            return 2
        path, records = None, read_prefect_records(since, until)
    elif path is None:
        print("carbonaware: no ledger: give --ledger PATH or set CARBONAWARE_LEDGER", file=sys.stderr)
        return 2
    else:
        try:
            records = read_ledger(path)
        except OSError as exc:
            print(f"carbonaware: cannot read ledger {path}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    decisions = decisions_between(records, since, until)
    outcomes = latest_outcomes(records)
    if not args.no_resolve:
        completed = complete_outcomes(decisions, outcomes, timeout=args.timeout, budget=REPORT_RESOLVE_SECONDS)
        _write(path, [outcome.to_record() for outcome in completed], logger)  # the next report need not ask
    report = {"ledger": path or "prefect", **build_report(decisions, outcomes, since, until)}
    print(json.dumps(report, indent=2) if args.json else render_report(report))
    return 0


# --------------------------------------------------------------------------------------------------------------
# CLI: python -m carbonaware_core plan|wait|run|detect
# --------------------------------------------------------------------------------------------------------------


def render_chart(plan: Plan, rows: int = 24, width: int = 40) -> str:
    """A compact text chart of the forecast over the window and the job, the chosen start marked."""
    now = plan.start - plan.delay
    horizon_end = now + plan.window + plan.duration
    points = [p for p in plan.forecast if p.end > now and p.start < horizon_end]
    if not points:
        return "(no forecast series to chart)"
    per_row = -(-len(points) // rows)
    buckets = [points[i : i + per_row] for i in range(0, len(points), per_row)]
    means = [sum(p.value for p in bucket) / len(bucket) for bucket in buckets]
    low, high = min(means), max(means)
    job_end = plan.start + plan.duration
    bar = "#" if (sys.stdout.encoding or "").lower().replace("-", "") != "utf8" else "\u2588"
    lines = [f"{plan.unit} from {plan.source} ({_iso(now)} .. {_iso(horizon_end)})"]
    for index, (bucket, mean) in enumerate(zip(buckets, means, strict=True)):
        begin, end = now if index == 0 else bucket[0].start, bucket[-1].end  # a first value carried back to now
        length = 1 + round((width - 1) * (mean - low) / (high - low)) if high > low else width // 2
        mark = " <- start" if begin <= plan.start < end else (" |" if plan.start < end and begin < job_end else "")
        lines.append(f"{begin.astimezone(timezone.utc):%a %H:%M} {mean:6.0f} {bar * length}{mark}")
    if plan.source == "offline":
        lines.append(OFFLINE_ATTRIBUTION)
    return "\n".join(lines)


def _cli_parser() -> Any:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m carbonaware_core", description="Start work at the lowest-carbon time within a bounded wait."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def planning(sub: Any) -> None:
        sub.add_argument("--window", type=_cli_duration, default=DEFAULT_WINDOW, help="longest wait (6h, 90m, PT6H)")
        sub.add_argument("--duration", type=_cli_duration, default=DEFAULT_DURATION, help="job length (30m, 1h30m)")
        sub.add_argument("--provider", choices=PROVIDERS, help="cloud provider (detected when omitted)")
        sub.add_argument("--region", help="cloud region, e.g. us-east-1, europe-west2, uksouth")
        sub.add_argument("--grid-zone", help="Electricity Maps zone key, e.g. DE, GB, US-CAL-CISO")
        sub.add_argument("--source", help="source name or chain, e.g. auto, offline, file:forecast.json")
        sub.add_argument("--min-savings", type=float, default=0.0, help="wait only if it saves this fraction")
        sub.add_argument("--now", type=parse_datetime, help="plan as if it were this time (ISO-8601)")
        sub.add_argument("--power-kw", type=float, help="the job's average draw in kW: gives kWh and grams")
        sub.add_argument("--ledger", help="append the decision (and, for run, the outcome) to this JSON Lines file")
        sub.add_argument(
            "--zones", help="other candidate zones, comma-separated: aws:eu-north-1,gcp:europe-west1,grid:FR"
        )
        sub.add_argument("--no-home", action="store_true", help="only --zones are candidates, not the home zone")
        sub.add_argument(
            "--windows", type=_cli_windows, help="allowed starts, comma-separated START/END ISO-8601 pairs"
        )
        sub.add_argument("--deadline", type=parse_datetime, help="ISO-8601 time by which the job must finish")
        sub.add_argument("--json", action="store_true", help="print the plan as JSON")
        sub.add_argument("--quiet", action="store_true", help="no log lines on stderr")

    planning(commands.add_parser("plan", help="print the decision and a chart of the forecast; never waits"))
    planning(commands.add_parser("wait", help="wait until the best start, then exit"))
    run = commands.add_parser("run", help="wait, then run a command: run [options] -- CMD ARGS")
    planning(run)
    run.add_argument("cmd", nargs="+", help="the command to run")
    detect = commands.add_parser("detect", help="print the detected cloud zone")
    detect.add_argument("--timeout", type=float, default=DETECT_TIMEOUT_SECONDS)
    detect.add_argument("--json", action="store_true")
    report = commands.add_parser("report", help="totals of a ledger: decisions, waits, kWh, grams avoided")
    report.add_argument("--since", default="30d", help="a duration back from --until (30d) or an ISO-8601 time")
    report.add_argument("--until", help="ISO-8601 end of the period (default: now)")
    report.add_argument("--ledger", help="the ledger file (default: CARBONAWARE_LEDGER)")
    report.add_argument("--prefect", action="store_true", help="read the decisions and outcomes Prefect recorded")
    report.add_argument("--json", action="store_true", help="print the report as JSON")
    report.add_argument("--no-resolve", action="store_true", help="do not complete pending outcomes")
    report.add_argument("--timeout", type=float, default=HTTP_TIMEOUT_SECONDS, help="seconds per history request")
    report.add_argument("--quiet", action="store_true", help="no warnings on stderr")
    return parser


def _cli_duration(text: str) -> timedelta:
    import argparse

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cli_windows(text: str) -> tuple[tuple[datetime, datetime], ...]:
    """``START/END[,START/END...]`` (ISO-8601 date-times; naive means UTC)."""
    import argparse

    pairs = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        start, sep, end = item.partition("/")
        try:
            if not sep:
                raise ValueError(f"a window is START/END, not {item!r}")
            pairs.append((parse_datetime(start), parse_datetime(end)))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return tuple(pairs)


def _cli_options(args: Any) -> dict[str, Any]:
    options: dict[str, Any] = {"min_savings": args.min_savings}
    for name in ("source", "now", "grid_zone", "power_kw", "ledger", "zones", "windows", "deadline"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if args.no_home:
        options["home"] = False
    return options


def render_alternatives(plan: Plan) -> str:
    """One line per candidate zone of a plan over several: its best start and mean, the chosen one marked."""
    lines = [
        f"zones compared (home first; time only in {plan.alternatives[0].zone}: "
        + ("unknown)" if plan.time_savings is None else f"{_change_text(plan.time_savings)})")
    ]
    chosen = str(plan.zone) if plan.zone is not None else f"grid:{plan.grid_zone}"
    for alternative in plan.alternatives:
        mark = " <- chosen" if alternative.zone == chosen and plan.reason == "optimal" else ""
        if alternative.start is None or alternative.mean is None:
            lines.append(f"  {alternative.zone:<24} no answer ({alternative.note})")
            continue
        note = f" ({alternative.note})" if alternative.note else ""
        lines.append(
            f"  {alternative.zone:<24} {_iso(alternative.start)} {alternative.mean:8.1f} {alternative.unit} "
            f"via {alternative.source}{note}{mark}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    import json

    parser = _cli_parser()
    args = parser.parse_args(argv)
    if args.command == "detect":
        zone = detect_cloud_zone(timeout=args.timeout)
        found = None if zone is None else {"provider": zone.provider, "region": zone.region}
        print(json.dumps(found) if args.json else (str(zone) if zone else "no cloud zone detected"))
        return 0 if zone else 1
    if args.quiet:
        logger.addHandler(logging.NullHandler())  # not Python's last-resort handler either
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        if args.command == "plan":  # it prints its decision on stdout; other warnings still go to stderr
            handler.setLevel(logging.WARNING)
            handler.addFilter(lambda record: not getattr(record, "carbonaware_decision", False))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    if args.command == "report":
        try:
            return _cli_report(args)
        except ValueError as exc:
            parser.error(str(exc))
    previous = _set_handlers(_signals("SIGTERM", "SIGHUP"), _raise_stop)  # SIGINT: KeyboardInterrupt already
    try:
        options = _cli_options(args)
        if args.command == "plan":
            plan = plan_delay(args.window, args.duration, args.provider, args.region, **options)
        else:
            plan = carbonaware_delay(args.window, args.duration, args.provider, args.region, **options)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    except KeyboardInterrupt:
        print("carbonaware: interrupted", file=sys.stderr)
        return 130
    except _Stopped as stop:
        print(f"carbonaware: interrupted by {_signal_name(stop.signum)}", file=sys.stderr)
        return 128 + stop.signum
    finally:
        _restore_handlers(previous)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    elif args.command == "plan":
        print(describe(plan, waiting=False))
        if plan.forecast:
            print(render_chart(plan))
        if len(plan.alternatives) > 1:
            print(render_alternatives(plan))
    if args.command == "run":
        sys.stdout.flush()  # the plan before the command's own output
        started, began = CLOCK.now(), CLOCK.monotonic()
        status = _cli_run(args.cmd)
        if ledger_path(args.ledger) is not None and status not in (126, 127):  # 126/127: the command never ran
            ran = timedelta(seconds=max(0.0, CLOCK.monotonic() - began))  # a clock step changes no runtime
            record_outcome(plan, started, started + ran, ledger=args.ledger)
        return status
    return 0


class _Stopped(BaseException):
    """SIGTERM or SIGHUP while the CLI plans or waits: it ends the CLI as Ctrl-C does (a BaseException, so that
    no fail-open ``except Exception`` swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_stop(signum: int, _frame: Any) -> None:
    raise _Stopped(signum)


def _signals(*names: str) -> list[int]:
    """The named signals this platform has (Windows has no SIGHUP)."""
    import signal

    return [int(getattr(signal, name)) for name in names if hasattr(signal, name)]


def _signal_name(signum: int) -> str:
    import signal

    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _set_handlers(signums: Sequence[int], handler: Callable[[int, Any], None]) -> dict[int, Any]:
    """Install ``handler`` for each signal that whoever started us did not ignore (``nohup``, a background job:
    ignored stays ignored); return the previous handlers. Only the main thread may set handlers."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        return {}
    previous: dict[int, Any] = {}
    for signum in signums:
        current = signal.getsignal(signum)
        if current == signal.SIG_IGN:
            continue
        previous[signum] = current
        signal.signal(signum, handler)
    return previous


def _restore_handlers(previous: Mapping[int, Any]) -> None:
    import signal

    for signum, handler in previous.items():
        signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: set outside Python


def _terminal_sent(signum: int) -> bool:
    """Whether ``signum`` is Ctrl-C from our terminal, which the kernel sends to the whole foreground process
    group -- the command, in our group, has it already, and passing it on would deliver it twice. Windows
    consoles, too, send Ctrl-C to every process attached."""
    import signal

    if signum != signal.SIGINT:
        return False
    if sys.platform == "win32":
        return True
    for fd in (0, 1, 2):
        try:
            if os.isatty(fd) and os.tcgetpgrp(fd) == os.getpgrp():
                return True
        except OSError:
            continue
    return False


def _exit_status(returncode: int) -> int:
    """A child's status as a shell reports it: ``128 + N`` for one killed by signal N (Popen says ``-N``)."""
    return 128 - returncode if returncode < 0 else returncode


def _cli_run(cmd: Sequence[str]) -> int:
    """Run ``cmd`` and wait for it as a well-behaved wrapper does: SIGTERM, SIGHUP and SIGINT sent to us are
    passed on to the command and we keep waiting, so it is never orphaned and never outlived; the exit status
    is the command's (``128 + N`` if signal N killed it, 126 if it cannot be executed, 127 if not found)."""
    import subprocess

    child: subprocess.Popen[bytes] | None = None
    early: list[int] = []  # signals that arrived before the command started

    def pass_on(signum: int, _frame: Any) -> None:
        if child is None:
            early.append(signum)
        elif _terminal_sent(signum):
            logger.info("carbonaware: the command got %s from the terminal; waiting for it", _signal_name(signum))
        else:
            _send(child, signum)

    previous = _set_handlers(_signals("SIGTERM", "SIGHUP", "SIGINT"), pass_on)
    try:
        if early:  # stopped between the wait and the start: the command never runs
            print(f"carbonaware: interrupted by {_signal_name(early[0])}", file=sys.stderr)
            return 128 + early[0]
        try:
            child = subprocess.Popen(list(cmd))
        except OSError as exc:
            print(f"carbonaware: cannot run {cmd[0]}: {exc.strerror or exc}", file=sys.stderr)
            return 127 if isinstance(exc, FileNotFoundError) else 126
        for signum in early:  # arrived while the command was being started
            _send(child, signum)
        return _exit_status(child.wait())
    finally:
        _restore_handlers(previous)


def _send(child: Any, signum: int) -> None:
    try:
        child.send_signal(signum)
    except (OSError, ValueError):  # gone already, or a signal this platform cannot send
        return
    logger.info("carbonaware: passed %s on to the command (pid %d); waiting for it", _signal_name(signum), child.pid)


# --------------------------------------------------------------------------------------------------------------
# Appendix: region tables (generated data; rewrite with python scripts/build_region_table.py --write)
# --------------------------------------------------------------------------------------------------------------
# The functions above read these tables only when called, so the data can sit at the end of the file.

# BEGIN GENERATED by scripts/build_region_table.py -- edits between the markers are overwritten
# Cloud region -> Electricity Maps zone key. Built by scripts/build_region_table.py from facts in:
#   Electricity Maps data_centers.json (electricitymaps-contrib @b354f28) -- wins on disagreement,
#   Cloud Carbon Footprint packages/*/src/lib/*Regions.ts, umassos/decarbonization-potential mapper.
# Disagreements resolved in favour of Electricity Maps (else CCF):
#   azure northcentralus (US-MIDA-PJM vs CCF US-MIDW-MISO), azure westus2 (US-NW-BPAT vs CCF US-NW-PACE),
#   azure westus3 (US-SW-AZPS vs CCF US-NW-PACE), gcp us-central1 (US-CENT-SWPP vs CCF US-MIDW-MISO),
#   gcp us-east1 (US-CAR-SCEG vs UMass US-CAR-SC)
# Obsolete UMass zone keys normalised: AUS-NSW->AU-NSW, AUS-VIC->AU-VIC, IN-DL->IN-NO, IN-MH->IN-WE
# Dropped: azure eastus3 (Atlanta, GA; CCF's US-MIDA-PJM is wrong),
#   azure unitedstates (geography alias spanning many zones),
#   azure unitedstateseuap (geography alias spanning many zones)
#   and Azure *stage names (internal staging, not customer regions).
REGION_ZONES: dict[tuple[str, str], str] = {
    ("aws", "af-south-1"): "ZA",
    ("aws", "ap-east-1"): "HK",
    ("aws", "ap-northeast-1"): "JP-TK",
    ("aws", "ap-northeast-2"): "KR",
    ("aws", "ap-northeast-3"): "JP-KN",
    ("aws", "ap-south-1"): "IN-WE",
    ("aws", "ap-south-2"): "IN-SO",
    ("aws", "ap-southeast-1"): "SG",
    ("aws", "ap-southeast-2"): "AU-NSW",
    ("aws", "ap-southeast-3"): "ID",
    ("aws", "ap-southeast-4"): "AU-VIC",
    ("aws", "ap-southeast-5"): "MY-WM",
    ("aws", "ap-southeast-6"): "NZ",
    ("aws", "ap-southeast-7"): "TH",
    ("aws", "ca-central-1"): "CA-QC",
    ("aws", "ca-west-1"): "CA-AB",
    ("aws", "eu-central-1"): "DE",
    ("aws", "eu-central-2"): "CH",
    ("aws", "eu-north-1"): "SE-SE3",
    ("aws", "eu-south-1"): "IT-NO",
    ("aws", "eu-south-2"): "ES",
    ("aws", "eu-west-1"): "IE",
    ("aws", "eu-west-2"): "GB",
    ("aws", "eu-west-3"): "FR",
    ("aws", "il-central-1"): "IL",
    ("aws", "me-central-1"): "AE",
    ("aws", "me-south-1"): "BH",
    ("aws", "mx-central-1"): "MX",
    ("aws", "sa-east-1"): "BR-CS",
    ("aws", "us-east-1"): "US-MIDA-PJM",
    ("aws", "us-east-2"): "US-MIDA-PJM",
    ("aws", "us-gov-east-1"): "US-MIDA-PJM",
    ("aws", "us-gov-west-1"): "US-NW-PACW",
    ("aws", "us-west-1"): "US-CAL-CISO",
    ("aws", "us-west-2"): "US-NW-PACW",
    ("azure", "apsoutheast"): "SG",
    ("azure", "australiacentral"): "AU-NSW",
    ("azure", "australiacentral2"): "AU-NSW",
    ("azure", "australiaeast"): "AU-NSW",
    ("azure", "australiasoutheast"): "AU-VIC",
    ("azure", "brazilsouth"): "BR-CS",
    ("azure", "brazilsoutheast"): "BR-CS",
    ("azure", "canadacentral"): "CA-ON",
    ("azure", "canadaeast"): "CA-QC",
    ("azure", "centralindia"): "IN-WE",
    ("azure", "centralus"): "US-MIDW-MISO",
    ("azure", "centraluseuap"): "US-MIDW-MISO",
    ("azure", "chinaeast"): "CN",
    ("azure", "chinaeast2"): "CN",
    ("azure", "chinanorth"): "CN",
    ("azure", "chinanorth2"): "CN",
    ("azure", "chinanorth3"): "CN",
    ("azure", "eastasia"): "HK",
    ("azure", "eastus"): "US-MIDA-PJM",
    ("azure", "eastus2"): "US-MIDA-PJM",
    ("azure", "eastus2euap"): "US-MIDA-PJM",
    ("azure", "francecentral"): "FR",
    ("azure", "francesouth"): "FR",
    ("azure", "germany"): "DE",
    ("azure", "germanynorth"): "DE",
    ("azure", "germanywestcentral"): "DE",
    ("azure", "indonesiacentral"): "ID",
    ("azure", "israelcentral"): "IL",
    ("azure", "italynorth"): "IT-NO",
    ("azure", "japaneast"): "JP-TK",
    ("azure", "japanwest"): "JP-KN",
    ("azure", "koreacentral"): "KR",
    ("azure", "koreasouth"): "KR",
    ("azure", "mexicocentral"): "MX",
    ("azure", "newzealandnorth"): "NZ",
    ("azure", "northcentralus"): "US-MIDA-PJM",
    ("azure", "northeurope"): "IE",
    ("azure", "norwayeast"): "NO-NO1",
    ("azure", "norwaywest"): "NO-NO2",
    ("azure", "polandcentral"): "PL",
    ("azure", "qatarcentral"): "QA",
    ("azure", "southafricanorth"): "ZA",
    ("azure", "southafricawest"): "ZA",
    ("azure", "southcentralus"): "US-TEX-ERCO",
    ("azure", "southeastasia"): "SG",
    ("azure", "southindia"): "IN-SO",
    ("azure", "spaincentral"): "ES",
    ("azure", "swedencentral"): "SE-SE3",
    ("azure", "switzerlandnorth"): "CH",
    ("azure", "switzerlandwest"): "CH",
    ("azure", "uaecentral"): "AE",
    ("azure", "uaenorth"): "AE",
    ("azure", "uk"): "GB",
    ("azure", "uksouth"): "GB",
    ("azure", "ukwest"): "GB",
    ("azure", "usnorth"): "US-MIDW-MISO",
    ("azure", "westcentralus"): "US-NW-PACE",
    ("azure", "westeurope"): "NL",
    ("azure", "westindia"): "IN-WE",
    ("azure", "westus"): "US-CAL-CISO",
    ("azure", "westus2"): "US-NW-BPAT",
    ("azure", "westus3"): "US-SW-AZPS",
    ("gcp", "africa-south1"): "ZA",
    ("gcp", "asia-east1"): "TW",
    ("gcp", "asia-east2"): "HK",
    ("gcp", "asia-northeast1"): "JP-TK",
    ("gcp", "asia-northeast2"): "JP-KN",
    ("gcp", "asia-northeast3"): "KR",
    ("gcp", "asia-south1"): "IN-WE",
    ("gcp", "asia-south2"): "IN-NO",
    ("gcp", "asia-southeast1"): "SG",
    ("gcp", "asia-southeast2"): "ID",
    ("gcp", "asia-southeast3"): "TH",
    ("gcp", "australia-southeast1"): "AU-NSW",
    ("gcp", "australia-southeast2"): "AU-VIC",
    ("gcp", "europe-central2"): "PL",
    ("gcp", "europe-north1"): "FI",
    ("gcp", "europe-north2"): "SE-SE3",
    ("gcp", "europe-southwest1"): "ES",
    ("gcp", "europe-west1"): "BE",
    ("gcp", "europe-west10"): "DE",
    ("gcp", "europe-west12"): "IT-NO",
    ("gcp", "europe-west2"): "GB",
    ("gcp", "europe-west3"): "DE",
    ("gcp", "europe-west4"): "NL",
    ("gcp", "europe-west6"): "CH",
    ("gcp", "europe-west8"): "IT-NO",
    ("gcp", "europe-west9"): "FR",
    ("gcp", "me-central1"): "QA",
    ("gcp", "me-central2"): "SA",
    ("gcp", "me-west1"): "IL",
    ("gcp", "northamerica-northeast1"): "CA-QC",
    ("gcp", "northamerica-northeast2"): "CA-ON",
    ("gcp", "northamerica-south1"): "MX",
    ("gcp", "southamerica-east1"): "BR-CS",
    ("gcp", "southamerica-west1"): "CL-SEN",
    ("gcp", "us-central1"): "US-CENT-SWPP",
    ("gcp", "us-central2"): "US-MIDW-MISO",
    ("gcp", "us-east1"): "US-CAR-SCEG",
    ("gcp", "us-east4"): "US-MIDA-PJM",
    ("gcp", "us-east5"): "US-MIDA-PJM",
    ("gcp", "us-south1"): "US-TEX-ERCO",
    ("gcp", "us-west1"): "US-NW-PACW",
    ("gcp", "us-west2"): "US-CAL-CISO",
    ("gcp", "us-west3"): "US-NW-PACE",
    ("gcp", "us-west4"): "US-NW-NEVP",
}

# Electricity Maps zone -> WattTime region (signal co2_moer). Sources:
#   [M] WattTime/watttime-python-client data/us_region_meta_data.csv @1282382 (WattTime's own list of
#       v3 co2_moer regions with full names, e.g. PACW = PacifiCorp West).
#   [R] carbon-aware/scheduler scheduler/src/regions/mapping.json @cb0d9b9: answers of WattTime's
#       /v3/region-from-loc at Electricity Maps' data-centre coordinates, for the cloud regions listed.
# Not mapped: US-CENT-SWPP ([R] puts gcp us-central1 in MISO_WORTHINGTON, not SPP).
ZONE_WATTTIME: dict[str, str] = {
    "AE": "ARE",  # [R] aws me-central-1, azure uaenorth
    "AU-NSW": "NEM_NSW",  # [R] aws ap-southeast-2, azure australiaeast, azure australiacentral
    "AU-VIC": "NEM_VIC",  # [R] aws ap-southeast-4, azure australiasoutheast
    "BE": "BE",  # [R] gcp europe-west1
    "BR-CS": "BRA",  # [R] aws sa-east-1, azure brazilsouth
    "CA-AB": "AESO",  # [R] aws ca-west-1
    "CA-ON": "IESO_NORTH",  # [R] azure canadacentral; [R] gcp Toronto -> PJM_WESTERN_KY ignored
    "CA-QC": "HQ",  # [R] aws ca-central-1, azure canadaeast
    "CH": "CH",  # [R] aws eu-central-2, azure switzerlandnorth
    "CL-SEN": "CHL",  # [R] gcp southamerica-west1
    "CN": "CHN",  # [R] azure chinaeast2, azure chinanorth
    "DE": "DE",  # [R] aws eu-central-1, azure germanywestcentral, gcp europe-west3
    "ES": "ES",  # [R] aws eu-south-2, azure spaincentral
    "FI": "FI",  # [R] gcp europe-north1
    "FR": "FR",  # [R] aws eu-west-3, azure francecentral
    "GB": "UK",  # [R] aws eu-west-2, azure uksouth, azure ukwest
    "HK": "HKG",  # [R] aws ap-east-1, azure eastasia
    "ID": "IDN",  # [R] aws ap-southeast-3, azure indonesiacentral
    "IE": "IE",  # [R] aws eu-west-1, azure northeurope
    "IL": "ISR",  # [R] aws il-central-1; [R] azure israelcentral -> JOR ignored
    "IN-SO": "IND",  # [R] aws ap-south-2, azure southindia
    "IN-WE": "IND",  # [R] aws ap-south-1, azure centralindia
    "IT-NO": "IT",  # [R] aws eu-south-1, azure italynorth
    "JP-KN": "JP_KN",  # [R] aws ap-northeast-3, azure japanwest
    "JP-TK": "JP_TK",  # [R] aws ap-northeast-1, gcp asia-northeast1; [R] azure japaneast -> JP_TH ignored
    "KR": "KOR",  # [R] aws ap-northeast-2, azure koreacentral
    "MX": "MX_SIN",  # [R] aws mx-central-1, azure mexicocentral
    "MY-WM": "MYS",  # [R] aws ap-southeast-5
    "NL": "NL",  # [R] gcp europe-west4; [R] azure westeurope -> DE ignored
    "NO-NO1": "NO",  # [R] azure norwayeast
    "NZ": "NZL",  # [R] azure newzealandnorth
    "PL": "PL",  # [R] azure polandcentral
    "SE-SE3": "SE",  # [R] aws eu-north-1, azure swedencentral
    "SG": "SGP",  # [R] gcp asia-southeast1
    "TH": "THA",  # [R] aws ap-southeast-7
    "TW": "TWN",  # [R] gcp asia-east1
    "US-CAL-CISO": "CAISO_NORTH",  # [M]; [R] aws us-west-1, azure westus; gcp us-west2 is Los Angeles
    "US-CAR-SCEG": "SCEG",  # [M]; [R] gcp us-east1
    "US-MIDA-PJM": "PJM_DC",  # [R] aws us-east-1, azure eastus; N. Virginia; Ohio/Chicago sites differ
    "US-MIDW-MISO": "MISO_WORTHINGTON",  # [R] azure centralus; older mappings: MISO_MASON_CITY
    "US-NW-BPAT": "BPA",  # [M]; same BA; [R] puts azure westus2 in CHPD
    "US-NW-NEVP": "NEVP",  # [M]; same BA
    "US-NW-PACE": "PACE",  # [M]; [R] azure westcentralus; same BA
    "US-NW-PACW": "PACW",  # [M]; same BA; [R] puts aws us-west-2, gcp us-west1 in BPA
    "US-SW-AZPS": "AZPS",  # [M]; [R] azure westus3; same BA
    "US-TEX-ERCO": "ERCOT_NORTHCENTRAL",  # [M]; Dallas; [R] azure southcentralus -> ERCOT_EASTTX
    "ZA": "ZAF",  # [R] aws af-south-1, azure southafricanorth
}
# END GENERATED


if __name__ == "__main__":  # after the appendix: the tables must exist before main() runs
    sys.exit(main())
