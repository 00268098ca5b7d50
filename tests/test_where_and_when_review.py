"""Where and when (issue 11), attacked: careless zone strings, a source that names another zone than the one asked,
hostile hosted-scheduler answers. Real HTTP servers on 127.0.0.1; the core's clock is a fake one."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import carbonaware_core as core
from carbonaware_core import plan_delay
from tests.fake_providers import EM_KEY, fake_clock, query_params
from tests.loopback import FakeClock, LoopbackServer, Reply, Seen

UTC = timezone.utc
NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)


@pytest.fixture(autouse=True)
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    return fake_clock(monkeypatch, NOW)


def test_grid_zone_keys_are_read_as_electricity_maps_writes_them() -> None:
    """Electricity Maps zone keys are upper case: "grid:fr" is FR, not a zone no source knows, and not a second
    candidate beside "grid:FR"."""
    assert core.parse_zone("grid:fr") == core.Place(grid="FR")
    assert core.parse_zone(" GRID: us-cal-ciso ") == core.Place(grid="US-CAL-CISO")
    plan = plan_delay(timedelta(hours=12), HOUR, "aws", "eu-west-1", source="offline", now=NOW,
                      zones=["grid:fr", "grid:FR"])  # fmt: skip
    assert [a.zone for a in plan.alternatives] == ["aws:eu-west-1", "grid:FR"]
    assert plan.fallbacks == () and plan.alternatives[1].source == "offline"


class EchoingElectricityMaps:
    """Electricity Maps v3 forecasts by zone key, each answer naming ``answered[zone]`` as its zone (a server may
    name its own alias of the zone asked)."""

    def __init__(self, server: LoopbackServer, values: dict[str, float], answered: dict[str, str]) -> None:
        self.values, self.answered = values, answered
        server.route("GET", "/v3/carbon-intensity/forecast", self.forecast)

    def forecast(self, seen: Seen) -> Reply:
        zone = query_params(seen).get("zone", "")
        if seen.headers.get("auth-token") != EM_KEY or zone not in self.values:
            return Reply(500, "Internal Server Error")
        stamps = [(NOW + HOUR * h).strftime("%Y-%m-%dT%H:00:00.000Z") for h in range(12)]
        items = [{"carbonIntensity": self.values[zone] if h else 500.0, "datetime": s} for h, s in enumerate(stamps)]
        return Reply(200, {"zone": self.answered.get(zone, zone), "forecast": items, "updatedAt": stamps[0]})


def test_a_grid_place_is_named_as_asked_whatever_zone_its_source_names(
    server: LoopbackServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chosen grid place is how the plan's consumers (the CLI's table, the Prefect deployment mapping) find
    the winner: it must be the place asked for, not the source's name for it."""
    monkeypatch.setenv("ELECTRICITYMAPS_API_URL", server.url)
    monkeypatch.setenv("ELECTRICITYMAPS_API_KEY", EM_KEY)
    EchoingElectricityMaps(server, {"IE": 400.0, "DE": 100.0}, answered={"DE": "DE-LU"})
    plan = plan_delay(timedelta(hours=8), HOUR, "aws", "eu-west-1", source="electricitymaps", now=NOW,
                      zones=["grid:DE"])  # fmt: skip
    assert (plan.reason, plan.zone, plan.grid_zone) == ("optimal", None, "DE")
    assert "grid:DE" in core.render_alternatives(plan).split("<- chosen")[0].splitlines()[-1]


# ---- the hosted scheduler, hostile or just literal ------------------------------------------------------------------


def scheduler_option(at: datetime, provider: str, region: str, lbs: float) -> dict[str, object]:
    return {"time": at.strftime("%Y-%m-%dT%H:%M:%SZ"), "zone": {"provider": provider, "region": region},
            "co2_intensity": lbs}  # fmt: skip


class LiteralScheduler:
    """``POST /v0/schedule/`` answering ``ideal`` and ``options`` as given, and the naive case as the real server
    does: the first zone at the first window's start (``naive`` lbs/MWh)."""

    def __init__(self, server: LoopbackServer, ideal: dict[str, object], options: list[object], naive: float) -> None:
        self.ideal, self.options, self.naive = ideal, options, naive
        server.route("POST", "/v0/schedule/", self.schedule)

    def schedule(self, seen: Seen) -> Reply:
        document = seen.json()
        first = document["zones"][0]
        start = document["windows"][0]["start"]
        naive = {"time": start, "zone": first, "co2_intensity": self.naive}
        return Reply(200, {"ideal": self.ideal, "options": self.options, "naive_case": naive, "worst_case": naive,
                           "median_case": naive, "carbon_savings": {}})  # fmt: skip


LATER = [(NOW + 2 * HOUR, NOW + 3 * HOUR)]  # the only allowed starts: two to three hours from now


def test_the_hosted_baseline_is_the_earliest_allowed_start_when_the_windows_begin_later(
    server: LoopbackServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server's naive case is its first window's start: with windows that begin later than now, that is the
    "at once" figure min_savings compares with, not an unknown one (which would hold every plan below it)."""
    monkeypatch.setenv("CARBONAWARE_SCHEDULER_BASE_URL", server.url)
    best = scheduler_option(NOW + 2 * HOUR + timedelta(minutes=30), "aws", "eu-north-1", 100.0)
    LiteralScheduler(server, best, [best], naive=800.0)
    plan = plan_delay(timedelta(hours=8), HOUR, "aws", "eu-west-1", source="carbonaware", now=NOW,
                      zones=["aws:eu-north-1"], windows=LATER, min_savings=0.5)  # fmt: skip
    assert plan.now == pytest.approx(800.0 * 0.45359237)
    assert (plan.reason, plan.zone, plan.start) == ("optimal", core.CloudZone("aws", "eu-north-1"), best_start(best))
    assert plan.savings == pytest.approx(1 - 100 / 800)


def best_start(option: dict[str, object]) -> datetime:
    return core.parse_datetime(str(option["time"]))


def test_hosted_options_outside_the_allowed_starts_are_no_answer_and_the_chain_goes_on(
    server: LoopbackServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Options for zones not asked about, or at starts not allowed, say nothing about the zones asked: the chain
    moves on to its next source, and the plan says why."""
    monkeypatch.setenv("CARBONAWARE_SCHEDULER_BASE_URL", server.url)
    stray = [
        scheduler_option(NOW + 2 * HOUR, "aws", "us-east-1", 1.0),  # a zone nobody asked about
        scheduler_option(NOW + 6 * HOUR, "aws", "eu-north-1", 2.0),  # after the allowed starts
        scheduler_option(NOW, "aws", "eu-west-1", 3.0),  # before them
    ]
    LiteralScheduler(server, stray[0], stray, naive=800.0)
    plan = plan_delay(timedelta(hours=8), HOUR, "aws", "eu-west-1", source="carbonaware,offline", now=NOW,
                      zones=["aws:eu-north-1"], windows=LATER)  # fmt: skip
    assert len(server.requests_to("/v0/schedule/")) == 1  # asked once for both zones, failure or not
    assert [a.source for a in plan.alternatives] == ["offline", "offline"]
    assert LATER[0][0] <= plan.start <= LATER[0][1]
    assert any("carbonaware" in failure and "allowed" in failure for failure in plan.fallbacks)
    only = plan_delay(timedelta(hours=8), HOUR, "aws", "eu-west-1", source="carbonaware", now=NOW,
                      zones=["aws:eu-north-1"], windows=LATER)  # fmt: skip
    assert only.reason == "source-failed" and only.start == LATER[0][0]
    assert "no source answered" not in only.detail and "allowed" in only.detail  # the log line says why


def test_hosted_zones_are_matched_whatever_their_case(server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARBONAWARE_SCHEDULER_BASE_URL", server.url)
    best = scheduler_option(NOW + 2 * HOUR, "AWS", "EU-NORTH-1", 100.0)
    LiteralScheduler(server, best, [best], naive=800.0)
    plan = plan_delay(timedelta(hours=8), HOUR, "aws", "eu-west-1", source="carbonaware", now=NOW,
                      zones=["aws:eu-north-1"], windows=LATER)  # fmt: skip
    assert (plan.reason, plan.zone) == ("optimal", core.CloudZone("aws", "eu-north-1"))


def only_the_nordics_answer(zone: object, now: datetime, end: datetime) -> list[core.ForecastPoint]:
    if str(zone) != "aws:eu-north-1":
        raise ConnectionError("grid operator down")
    return [core.ForecastPoint(NOW + HOUR * h, NOW + HOUR * (h + 1), 100.0 if h == 3 else 300.0) for h in range(12)]


@pytest.mark.parametrize("zones", [["grid:FR"], ["grid:FR", "aws:eu-north-1"]])
def test_a_grid_home_that_fails_is_still_named_in_the_plan(zones: list[str]) -> None:
    """home=False with a grid zone first: when it gives no answer the plan runs there and must say so, not run
    "for unknown zone"."""
    plan = plan_delay(timedelta(hours=8), HOUR, source=only_the_nordics_answer, now=NOW, zones=zones, home=False,
                      min_savings=0.1)  # fmt: skip
    assert plan.reason in ("source-failed", "below-threshold")
    assert (plan.zone, plan.grid_zone) == (None, "FR")
    assert "unknown zone" not in core.describe(plan) and "FR" in core.describe(plan)


def hourly(zone: object, now: datetime, end: datetime) -> list[core.ForecastPoint]:
    """100 now, then one more each hour: starting at once is best."""
    return [core.ForecastPoint(NOW + HOUR * h, NOW + HOUR * (h + 1), 100.0 + h) for h in range(12)]


@pytest.mark.parametrize(
    "options",
    [
        {"deadline": datetime.max.replace(tzinfo=timezone(-timedelta(hours=5)))},  # "no deadline", in New York
        {"windows": [(datetime.min.replace(tzinfo=timezone(timedelta(hours=5))), NOW + 2 * HOUR)]},  # "since ever"
    ],
)
def test_the_ends_of_time_in_any_offset_are_allowed_bounds(options: dict[str, object]) -> None:
    """datetime.max in a zone west of UTC is past year 9999 in UTC: still a bound past anything planned, not an
    OverflowError."""
    plan = plan_delay(timedelta(hours=6), HOUR, "aws", "eu-west-1", source=hourly, now=NOW, **options)  # type: ignore[arg-type]
    assert (plan.reason, plan.start) == ("already-best", NOW)


def test_one_window_may_be_given_as_one_pair() -> None:
    """zones takes one (provider, region) pair; windows takes one (start, end) pair the same way."""
    pair = (NOW + 2 * HOUR, NOW + 3 * HOUR)
    plan = plan_delay(timedelta(hours=6), HOUR, "aws", "eu-west-1", source=hourly, now=NOW, windows=pair)
    assert plan.start == pair[0] and core.windows_option(pair) == (pair,)


def test_the_time_only_saving_is_written_as_a_signed_change() -> None:
    """Moving the start alone may save nothing (0.0%, not -0.0%), or -- against the hosted scheduler's naive case,
    which is not among its options -- cost a little (+5.0%, never --5.0%)."""
    plan = plan_delay(timedelta(hours=8), HOUR, "aws", "eu-west-1", source=only_the_nordics_answer, now=NOW,
                      zones=["aws:eu-north-1"])  # fmt: skip
    assert "time only" not in core.describe(plan)  # home gave no answer: nothing to say about time alone
    home = core.Alternative("aws:eu-west-1", NOW, 100.0, core.G_PER_KWH, "x")
    other = core.Alternative("aws:eu-north-1", NOW, 50.0, core.G_PER_KWH, "x")
    for saving, text in ((0.7, "-70.0%"), (0.0, "0.0%"), (-0.05, "+5.0%")):
        shown = core.describe(replace(plan, alternatives=(home, other), time_savings=saving))
        assert shown.split("time only, in aws:eu-west-1: ")[1].split(" ")[0].rstrip(";") == text


# ---- the planner's shortcuts on the series the brief names: they must equal the general path ----------------------

PARIS = ZoneInfo("Europe/Paris")


@st.composite
def awkward_series(draw: st.DrawFn) -> tuple[list[core.ForecastPoint], datetime, timedelta, timedelta]:
    """Steps of a third of a second past whole ones, 7-minute grids under a 30-minute job, hours in Europe/Paris
    across the March change, and a first point in another zone than the rest."""
    kind = draw(st.sampled_from(["third", "seven", "paris", "first-zone"]))
    step = {"third": timedelta(seconds=draw(st.sampled_from([1, 60, 300])), microseconds=333_333),
            "seven": timedelta(minutes=7)}.get(kind, timedelta(minutes=draw(st.sampled_from([5, 15, 60]))))  # fmt: skip
    origin = datetime(2025, 3, 30, 0, tzinfo=UTC) + timedelta(minutes=5 * draw(st.integers(-24, 24)))
    count = draw(st.integers(2, 50))
    values = draw(st.lists(st.floats(0, 1000, allow_nan=False), min_size=count, max_size=count))
    moments = [origin + i * step for i in range(count + 1)]
    if kind == "paris":
        moments = [moment.astimezone(PARIS) for moment in moments]
    points = [core.ForecastPoint(a, b, v) for a, b, v in zip(moments, moments[1:], values, strict=False)]
    if kind == "first-zone":
        first = points[0]
        points[0] = core.ForecastPoint(first.start.astimezone(PARIS), first.end.astimezone(PARIS), first.value)
    now = origin + timedelta(seconds=draw(st.integers(-600, 600)))
    duration = timedelta(minutes=30) if kind == "seven" else draw(st.integers(1, 4)) * step
    return points, now, timedelta(seconds=draw(st.integers(0, 40_000))), duration


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=awkward_series())
def test_the_planner_shortcuts_equal_the_general_path_on_awkward_series(
    case: tuple[list[core.ForecastPoint], datetime, timedelta, timedelta],
) -> None:
    points, now, window, duration = case

    def outcome() -> object:
        try:
            return core.choose_start(points, now, window, duration)
        except core.SourceError as exc:
            return str(exc)

    fast = outcome()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(core, "_regular_series_arrays", lambda points: None)
        patch.setattr(core, "_job_steps_on_grid", lambda *args, **kwargs: 0)
        assert outcome() == fast
