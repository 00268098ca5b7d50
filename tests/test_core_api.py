"""The public API: argument errors at once, the original positional order, Plan.to_dict, user sources, files."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import carbonaware_core as core
from carbonaware_core import CloudZone, ForecastPoint, Plan, carbonaware_delay, carbonaware_delay_async, plan_delay
from tests.fake_providers import fake_clock
from tests.loopback import FakeClock, HostedScheduler, Reply, serving

BASE = datetime(2025, 6, 1, 12, 0, tzinfo=timezone.utc)
HOUR = timedelta(hours=1)
W, D = timedelta(hours=6), timedelta(minutes=30)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    return fake_clock(monkeypatch, BASE)


@pytest.fixture
def scheduler(monkeypatch: pytest.MonkeyPatch, clock: FakeClock) -> Iterator[HostedScheduler]:
    with serving(poll_interval=0.02) as server:
        monkeypatch.setenv("CARBONAWARE_SCHEDULER_BASE_URL", server.url)
        yield HostedScheduler(server, clock=clock.time)


def hourly(*values: float, first: datetime = BASE) -> list[ForecastPoint]:
    return [ForecastPoint(first + i * HOUR, first + (i + 1) * HOUR, v) for i, v in enumerate(values)]


# --------------------------------------------------------------------------------------------------------------
# Argument errors: raised at once, before any request, by every entry point
# --------------------------------------------------------------------------------------------------------------

BAD_CALLS: list[tuple[str, tuple, dict, type[Exception], str]] = [
    ("zero duration", (W, timedelta(0)), {}, ValueError, "duration must be positive"),
    ("negative duration", (W, -D), {}, ValueError, "duration must be positive"),
    ("zero window", (timedelta(0), D), {}, ValueError, "window must be positive"),
    ("negative window", (-W, D), {}, ValueError, "window must be positive"),
    ("window in seconds", (3600, D), {}, TypeError, "window must be a datetime.timedelta"),
    ("window as text", ("6h", D), {}, TypeError, "window must be a datetime.timedelta"),
    ("duration as float", (W, 1800.0), {}, TypeError, "duration must be a datetime.timedelta"),
    ("window None", (None, D), {}, TypeError, "window must be a datetime.timedelta"),
    ("provider without region", (W, D), {"provider": "aws"}, ValueError, "provider and region go together"),
    ("region without provider", (W, D), {"region": "us-east-1"}, ValueError, "provider and region go together"),
    ("unknown provider", (W, D, "digitalocean", "nyc3"), {}, ValueError, "unknown provider 'digitalocean'"),
    ("empty region", (W, D, "aws", "  "), {}, ValueError, "region"),
    ("provider not a string", (W, D, 1, "us-east-1"), {}, TypeError, "must be strings"),
    ("unknown option", (W, D), {"min_saving": 0.1}, TypeError, "unknown option.*min_saving"),
    ("misspelt source option", (W, D), {"sources": "offline"}, TypeError, "unknown option"),
    ("min_savings of 1", (W, D), {"min_savings": 1.0}, ValueError, "min_savings"),
    ("min_savings negative", (W, D), {"min_savings": -0.1}, ValueError, "min_savings"),
    ("min_savings as percent", (W, D), {"min_savings": 20}, ValueError, "min_savings"),
    ("min_savings as text", (W, D), {"min_savings": "0.1"}, ValueError, "min_savings"),
    ("min_savings NaN", (W, D), {"min_savings": math.nan}, ValueError, "min_savings"),
    ("min_savings bool", (W, D), {"min_savings": True}, ValueError, "min_savings"),
    ("unknown source", (W, D), {"source": "wattime"}, ValueError, "unknown source 'wattime'"),
    ("unknown source in a chain", (W, D), {"source": "offline,nope"}, ValueError, "unknown source 'nope'"),
    ("source of the wrong type", (W, D), {"source": 42}, TypeError, "source must be"),
    ("naive now", (W, D), {"now": datetime(2025, 6, 1, 12)}, ValueError, "timezone-aware"),
    ("now as text", (W, D), {"now": "2025-06-01T12:00Z"}, ValueError, "timezone-aware"),
    ("zero timeout", (W, D), {"timeout": 0}, ValueError, "timeout"),
    ("huge timeout", (W, D), {"timeout": 3600}, ValueError, "timeout"),
    ("timeout as bool", (W, D), {"timeout": True}, ValueError, "timeout"),
    ("grid_zone not a string", (W, D), {"grid_zone": ["DE"]}, TypeError, "grid_zone"),
    ("empty source", (W, D), {"source": ""}, ValueError, "names no source"),
    ("source of commas", (W, D), {"source": ",,"}, ValueError, "names no source"),
    ("source of a colon", (W, D), {"source": ":"}, ValueError, "names no source"),
    ("logger not a logger", (W, D), {"logger": "my.flow"}, TypeError, "logger"),
    ("on_plan not callable", (W, D), {"on_plan": "print"}, TypeError, "on_plan"),
]


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "message"), [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS]
)
@pytest.mark.parametrize("entry", ["plan_delay", "carbonaware_delay", "carbonaware_delay_async"])
def test_argument_errors_raise_at_once(
    entry: str,
    args: tuple,
    kwargs: dict,
    error: type[Exception],
    message: str,
    scheduler: HostedScheduler,
    clock: FakeClock,
) -> None:
    clock.on_sleep = lambda seconds: pytest.fail("slept before rejecting the arguments")
    began = time.monotonic()
    with pytest.raises(error, match=message):
        if entry == "plan_delay":
            plan_delay(*args, **kwargs)
        elif entry == "carbonaware_delay":
            carbonaware_delay(*args, **kwargs)
        else:
            asyncio.run(carbonaware_delay_async(*args, **kwargs))
    assert time.monotonic() - began < 0.5
    assert scheduler.server.seen == []  # no request was made first


def test_argument_errors_raise_even_when_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARBONAWARE_DISABLE", "1")
    with pytest.raises(ValueError):
        carbonaware_delay(W, D, provider="aws")
    with pytest.raises(TypeError):
        carbonaware_delay(W, D, colour="green")


# --------------------------------------------------------------------------------------------------------------
# Zones given by the caller
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs", "zone"),
    [
        (("aws", "us-east-1"), {}, {"provider": "aws", "region": "us-east-1"}),
        (("us-east-1", "aws"), {}, {"provider": "aws", "region": "us-east-1"}),  # the original package's order
        (("westeurope", "azure"), {}, {"provider": "azure", "region": "westeurope"}),
        ((), {"region": "europe-west4", "provider": "gcp"}, {"provider": "gcp", "region": "europe-west4"}),
        (("AWS", "US-EAST-1"), {}, {"provider": "aws", "region": "us-east-1"}),
        (("azure", "West Europe"), {}, {"provider": "azure", "region": "westeurope"}),
    ],
)
def test_zone_forms(args: tuple, kwargs: dict, zone: dict, scheduler: HostedScheduler) -> None:
    plan = plan_delay(W, D, *args, **kwargs)
    assert plan.zone == CloudZone(zone["provider"], zone["region"])
    [seen] = scheduler.calls
    assert seen.json()["zones"] == [zone]


def test_defaults_are_six_hours_and_thirty_minutes(scheduler: HostedScheduler) -> None:
    plan = plan_delay(provider="aws", region="us-east-1")
    assert (plan.window, plan.duration) == (timedelta(hours=6), timedelta(minutes=30))
    body = scheduler.calls[0].json()
    assert body["duration"] == "PT30M"
    assert body["windows"] == [{"start": "2025-06-01T12:00:00Z", "end": "2025-06-01T18:00:00Z"}]


# --------------------------------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------------------------------

moments = st.datetimes(
    min_value=datetime(1980, 1, 1),
    max_value=datetime(2200, 1, 1),
    timezones=st.sampled_from([timezone.utc, timezone(timedelta(hours=-5)), timezone(timedelta(hours=5, minutes=30))]),
)
intensities = st.one_of(st.none(), st.floats(0, 5000, allow_nan=False))


@settings(max_examples=200, deadline=None)
@given(
    start=moments,
    delay=st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=2)),
    zone=st.one_of(
        st.none(),
        st.builds(CloudZone, st.sampled_from(core.PROVIDERS), st.from_regex(r"[a-z0-9-]{2,20}", fullmatch=True)),
    ),
    expected=intensities,
    now=intensities,
    savings=st.one_of(st.none(), st.floats(-1, 1, allow_nan=False)),
    reason=st.sampled_from(core.REASONS),
    detail=st.text(max_size=60),
    duration=st.timedeltas(min_value=timedelta(seconds=1), max_value=timedelta(days=1)),
)
def test_plan_to_dict_is_json_and_round_trips(start, delay, zone, expected, now, savings, reason, detail, duration):
    plan = Plan(
        start=start,
        delay=delay,
        zone=zone,
        source="carbonaware",
        expected=expected,
        now=now,
        savings=savings,
        unit="gCO2eq/kWh",
        reason=reason,
        detail=detail,
        duration=duration,
        forecast=tuple(hourly(1.0, 2.0)),
    )
    text = json.dumps(plan.to_dict(), allow_nan=False)
    back = json.loads(text)
    assert abs(core.parse_datetime(back["start"]) - start) < timedelta(seconds=1)
    assert back["start"].endswith("Z")
    assert back["delay_seconds"] == pytest.approx(delay.total_seconds(), abs=1e-3)
    assert back["zone"] == (None if zone is None else {"provider": zone.provider, "region": zone.region})
    assert (back["reason"], back["source"], back["detail"], back["unit"]) == (
        reason,
        "carbonaware",
        detail,
        "gCO2eq/kWh",
    )
    for key, value in (("expected", expected), ("now", now)):
        assert back[key] == (None if value is None else pytest.approx(value, abs=0.01))
    assert back["savings"] == (None if savings is None else pytest.approx(savings, abs=1e-4))
    assert back["duration_seconds"] == pytest.approx(duration.total_seconds())
    assert back["window_seconds"] == pytest.approx(plan.window.total_seconds())


def test_plan_to_dict_of_a_real_plan(scheduler: HostedScheduler) -> None:
    plan = plan_delay(W, D, "aws", "us-west-2")
    back = json.loads(json.dumps(plan.to_dict(), allow_nan=False))
    assert back["start"] == "2025-06-01T13:00:00Z"
    assert back["delay_seconds"] == 3600
    assert back["zone"] == {"provider": "aws", "region": "us-west-2"}
    assert back["reason"] == "optimal" and back["source"] == "carbonaware"
    assert back["now"] == pytest.approx(800 * core.LBS_PER_MWH_TO_G_PER_KWH, abs=0.01)
    assert plan.waits


def test_plan_is_frozen() -> None:
    plan = plan_delay(W, D, "aws", "us-east-1", source=hourly(5, 5, 5, 5, 5, 5, 5), now=BASE)
    with pytest.raises(AttributeError):
        plan.delay = timedelta(0)  # type: ignore[misc]
    assert not plan.waits


# --------------------------------------------------------------------------------------------------------------
# User sources: callables and iterables
# --------------------------------------------------------------------------------------------------------------


def test_callable_source_gets_the_zone_and_the_horizon() -> None:
    asked: list[tuple] = []

    def my_forecast(zone, start, end):
        asked.append((zone, start, end))
        return hourly(300, 100, 300, 300, 300, 300, 300, first=start)

    plan = plan_delay(W, D, "gcp", "europe-west1", source=my_forecast, now=BASE)
    assert asked == [(CloudZone("gcp", "europe-west1"), BASE, BASE + W + D)]
    assert (plan.source, plan.start, plan.reason) == ("my_forecast", BASE + HOUR, "optimal")


def test_callable_source_without_a_zone() -> None:
    asked: list[object] = []
    plan = plan_delay(
        W,
        D,
        source=lambda zone, start, end: asked.append(zone) or hourly(100, 50, 100, 100, 100, 100, 100, first=start),
        now=BASE,
    )
    assert asked == [None]
    assert plan.start == BASE + HOUR and plan.zone is None


def test_callable_returning_a_generator() -> None:
    def gen(zone, start, end) -> Iterator[ForecastPoint]:
        yield from hourly(100, 20, 100, 100, 100, 100, 100, first=start)

    assert plan_delay(W, D, "aws", "us-east-1", source=gen, now=BASE).start == BASE + HOUR


@pytest.mark.parametrize("kind", [list, tuple, iter])
def test_iterable_sources(kind) -> None:
    points = hourly(300, 300, 10, 300, 300, 300, 300)
    plan = plan_delay(W, D, "aws", "us-east-1", source=kind(points), now=BASE)
    assert (plan.start, plan.source) == (BASE + 2 * HOUR, "series")
    assert plan.forecast == tuple(points)


@pytest.mark.parametrize(
    ("source", "detail"),
    [
        (lambda zone, start, end: None, "TypeError"),
        (lambda zone, start, end: [(start, end, 100.0)], "not ForecastPoint"),
        (lambda zone, start, end: 1 / 0, "ZeroDivisionError"),
        ([{"start": BASE, "value": 3}], "not ForecastPoint"),
    ],
)
def test_broken_user_sources_fail_open(source, detail: str) -> None:
    plan = plan_delay(W, D, "aws", "us-east-1", source=source, now=BASE)
    assert (plan.reason, plan.delay) == ("source-failed", timedelta(0))
    assert detail in plan.detail


def test_registered_source_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    def fetch(query: core.Query) -> core.Forecast:
        return core.Forecast(tuple(hourly(200, 40, 200, 200, 200, 200, 200, first=query.now)), grid_zone="XX")

    monkeypatch.setitem(core.SOURCES, "mine", core.Source("mine", fetch, cache_key=None, needs_zone=False))
    plan = plan_delay(W, D, source="mine", now=BASE)
    assert (plan.source, plan.start, plan.grid_zone) == ("mine", BASE + HOUR, "XX")


# --------------------------------------------------------------------------------------------------------------
# file: and url: sources
# --------------------------------------------------------------------------------------------------------------

ROWS = [
    ("2025-06-01T12:00:00Z", 320),
    ("2025-06-01T13:00:00Z", 280),
    ("2025-06-01T14:00:00Z", 95),
    ("2025-06-01T15:00:00Z", 300),
    ("2025-06-01T16:00:00Z", 310),
    ("2025-06-01T17:00:00Z", 330),
    ("2025-06-01T18:00:00Z", 340),
]


def _next(text: str) -> str:
    return core._iso(core.parse_datetime(text) + HOUR)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("plain.json", json.dumps([{"start": t, "value": v} for t, v in ROWS])),
        (
            "with-ends.json",
            json.dumps(
                [
                    {"start": t, "end": ROWS[i + 1][0] if i + 1 < len(ROWS) else "2025-06-01T19:00:00Z", "value": v}
                    for i, (t, v) in enumerate(ROWS)
                ]
            ),
        ),
        (
            "electricitymaps.json",
            json.dumps({"zone": "DE", "forecast": [{"carbonIntensity": v, "datetime": t} for t, v in ROWS]}),
        ),
        (
            "neso.json",
            json.dumps(
                {
                    "data": [
                        {"from": t[:16] + "Z", "to": _next(t)[:16] + "Z", "intensity": {"forecast": v, "index": "low"}}
                        for t, v in ROWS
                    ]
                }
            ),
        ),
        ("series.csv", "start,value\n" + "".join(f"{t},{v}\n" for t, v in ROWS)),
        ("excel.csv", "\ufefftimestamp,carbon_intensity\r\n" + "".join(f"{t},{v}\r\n" for t, v in ROWS)),
        ("no-extension", "datetime,intensity\n" + "".join(f"{t},{v}\n" for t, v in ROWS)),
    ],
)
def test_file_source(tmp_path, name: str, content: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    plan = plan_delay(W, D, "aws", "us-east-1", source=f"file:{path}", now=BASE)
    assert (plan.reason, plan.start, plan.source) == ("optimal", BASE + 2 * HOUR, "file")
    assert plan.expected == pytest.approx(95) and plan.now == pytest.approx(320)


def test_missing_values_are_gaps_in_csv_as_in_json(tmp_path) -> None:
    """An empty cell (a missing hour in a spreadsheet export) is a gap, as JSON null is; the rest still plans."""
    values = [320, None, 95, 300, 310, 330, 340]
    json_path, csv_path = tmp_path / "f.json", tmp_path / "f.csv"
    json_path.write_text(json.dumps([{"start": t, "value": v} for (t, _), v in zip(ROWS, values, strict=False)]))
    csv_path.write_text(
        "start,value\n" + "".join(f"{t},{'' if v is None else v}\n" for (t, _), v in zip(ROWS, values, strict=False))
    )
    for path in (json_path, csv_path):
        plan = plan_delay(W, D, "aws", "us-east-1", source=f"file:{path}", now=BASE)
        assert (plan.reason, plan.start) == ("optimal", BASE + 2 * HOUR), (path.name, plan.detail)


def test_file_source_from_the_environment(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f.json"
    path.write_text(json.dumps([{"start": t, "value": v} for t, v in ROWS]))
    monkeypatch.setenv("CARBONAWARE_SOURCE", f"file:{path}")
    plan = plan_delay(W, D, "aws", "us-east-1", now=BASE)
    assert (plan.source, plan.start) == ("file", BASE + 2 * HOUR)


def test_unknown_source_in_the_environment_is_ignored_with_a_warning(
    scheduler: HostedScheduler, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    monkeypatch.setenv("CARBONAWARE_SOURCE", "wattime")
    plan = plan_delay(W, D, "aws", "us-east-1")
    assert plan.source == "carbonaware"  # auto
    assert any("CARBONAWARE_SOURCE" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("content", "detail"),
    [
        (None, "cannot read"),
        ("[]", "non-empty list"),
        ('[{"start": "yesterday", "value": 3}]', "bad point"),
        ('{"forecast": [1, 2]}', "must be an object"),
        ("[{]", "not valid JSON"),
    ],
)
def test_bad_files_fail_open(tmp_path, content: str | None, detail: str) -> None:
    path = tmp_path / "forecast.json"
    if content is not None:
        path.write_text(content)
    plan = plan_delay(W, D, "aws", "us-east-1", source=f"file:{path}", now=BASE)
    assert (plan.reason, plan.delay) == ("source-failed", timedelta(0))
    assert detail in plan.detail


@pytest.mark.parametrize("value", [",,", " , ", ":"])
def test_an_empty_source_in_the_environment_is_ignored_with_a_warning(
    value: str, scheduler: HostedScheduler, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    monkeypatch.setenv("CARBONAWARE_SOURCE", value)
    plan = plan_delay(W, D, "aws", "us-east-1")
    assert plan.source == "carbonaware"  # auto, not "no source answered"
    assert any("CARBONAWARE_SOURCE" in r.getMessage() and "names no source" in r.getMessage() for r in caplog.records)


def jittered_rows(count: int, jitter: float, missing: frozenset[int] = frozenset()) -> str:
    """Five-minute points whose timestamps are off by up to ``jitter`` seconds, as data loggers write them."""
    import random

    rng = random.Random(count)
    rows = []
    for i in range(count):
        if i not in missing:
            moment = BASE + timedelta(minutes=5 * i, seconds=rng.uniform(-jitter, jitter))
            rows.append({"start": moment.isoformat(), "value": 100.0 if 40 <= i < 46 else 300.0 + i % 7})
    return json.dumps(rows)


def test_jittered_timestamps_still_make_one_series(tmp_path) -> None:
    path = tmp_path / "jittered.json"
    path.write_text(jittered_rows(96, jitter=0.003))
    plan = plan_delay(W, D, "aws", "us-east-1", source=f"file:{path}", now=BASE)
    assert plan.reason == "optimal" and "covered part" not in plan.detail
    assert abs(plan.start - (BASE + timedelta(minutes=200))) < timedelta(seconds=1)  # the trough, 40 points in


@settings(max_examples=60, deadline=None)
@given(
    count=st.integers(20, 200),
    jitter=st.floats(0.0, 20.0),
    missing=st.frozensets(st.integers(1, 198), max_size=5),
)
def test_points_reach_the_next_start_unless_an_item_is_missing(count: int, jitter: float, missing: frozenset) -> None:
    document = json.loads(jittered_rows(count, jitter, frozenset(i for i in missing if i < count - 1)))
    points = core.parse_series_document(document)
    for point, following in itertools.pairwise(points):
        gap = following.start - point.start
        if gap < timedelta(minutes=7):  # the next item is there: no hole between them
            assert point.end == following.start
        else:  # an item is missing: it stays a gap, the point keeps about one spacing
            assert point.end < following.start
            assert abs(point.end - point.start - timedelta(minutes=5)) < timedelta(seconds=41)


def test_a_source_that_breaks_does_not_end_the_chain(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(query: core.Query) -> core.Forecast:
        return [1, 2][5]  # an IndexError, as a corrupt model file would cause

    monkeypatch.setitem(core.SOURCES, "broken", core.Source("broken", broken, cache_key=None))
    path = tmp_path / "f.csv"
    path.write_text("start,value\n" + "".join(f"{t},{v}\n" for t, v in ROWS))
    plan = plan_delay(W, D, "aws", "us-east-1", source=f"broken,file:{path}", now=BASE)
    assert (plan.source, plan.start) == ("file", BASE + 2 * HOUR)
    assert plan.fallbacks == ("broken: internal error: IndexError: 'list index out of range'",)


class Float32:
    """A numpy-like scalar: not a ``float`` subclass, but convertible with ``float()``."""

    def __init__(self, value: float) -> None:
        self.value = float(value)

    def __float__(self) -> float:
        return self.value


@pytest.mark.parametrize("kind", [Decimal, Float32], ids=["Decimal", "numpy-like"])
def test_values_from_decimal_or_numpy_scalars_are_read(kind: type) -> None:
    points = [ForecastPoint(p.start, p.end, kind(p.value)) for p in rows_as_points()]
    plan = plan_delay(W, D, "aws", "us-east-1", source=points, now=BASE)
    assert (plan.reason, plan.start) == ("optimal", BASE + 2 * HOUR)
    json.dumps(plan.to_dict(), allow_nan=False)  # plain floats all the way to the JSON


def test_intensities_near_float_overflow_are_gaps_not_nan() -> None:
    points = [
        ForecastPoint(BASE + i * HOUR, BASE + (i + 1) * HOUR, value) for i, value in enumerate([1e307, 1e306, 1e307])
    ]
    plan = plan_delay(W, D, "aws", "us-east-1", source=points, now=BASE)
    assert plan.reason == "source-failed" and plan.delay == timedelta(0)
    json.dumps(plan.to_dict(), allow_nan=False)  # still valid JSON


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.invalid/f.json?signal_type=co2_moer&token=SECRET-TOKEN-1",
        "http://127.0.0.1:99999/f.json?signal_type=co2_moer&api_key=SECRET-TOKEN-1",
    ],
)
def test_a_token_in_a_url_source_never_reaches_the_plan(url: str) -> None:
    plan = plan_delay(W, D, "aws", "us-east-1", source=f"url:{url}", now=BASE)
    assert plan.reason == "source-failed"
    assert "SECRET-TOKEN-1" not in plan.detail and "***" in plan.detail
    assert "signal_type=co2_moer" in plan.detail  # only parameters named like credentials are hidden


def rows_as_points() -> list[ForecastPoint]:
    return [ForecastPoint(core.parse_datetime(t), core.parse_datetime(t) + HOUR, v) for t, v in ROWS]


def test_an_empty_grid_zone_is_no_grid_zone() -> None:
    """``grid_zone=os.environ.get("GRID_ZONE", "")`` must not break a flow: blank means not given."""
    plan = plan_delay(W, D, "aws", "us-east-1", grid_zone=" ", source=rows_as_points(), now=BASE)
    assert plan.reason == "optimal" and plan.start == BASE + 2 * HOUR


def test_a_tiny_window_still_plans_with_a_local_source() -> None:
    plan = plan_delay(timedelta(microseconds=1), D, "aws", "us-east-1", source=rows_as_points(), now=BASE)
    assert plan.reason == "already-best" and plan.delay == timedelta(0)


def test_file_larger_than_the_cap_fails_open(tmp_path) -> None:
    path = tmp_path / "huge.json"
    with path.open("wb") as handle:
        handle.truncate(core.MAX_BODY_BYTES + 10)
    plan = plan_delay(W, D, "aws", "us-east-1", source=f"file:{path}", now=BASE)
    assert plan.reason == "source-failed" and "larger than" in plan.detail


def test_url_source(monkeypatch: pytest.MonkeyPatch) -> None:
    with serving(poll_interval=0.02) as server:
        csv = "start,value\n" + "".join(f"{t},{v}\n" for t, v in ROWS)
        server.route("GET", "/forecast.csv", Reply(200, csv, {"Content-Type": "text/csv"}))
        plan = plan_delay(W, D, "aws", "us-east-1", source=f"url:{server.url}/forecast.csv", now=BASE)
        assert (plan.source, plan.start) == ("url", BASE + 2 * HOUR)
        server.route("GET", "/gone.csv", Reply(404, "Not Found", {"Content-Type": "text/plain"}))
        plan = plan_delay(W, D, "aws", "us-east-1", source=f"url:{server.url}/gone.csv", now=BASE)
        assert plan.reason == "source-failed" and "HTTP 404" in plan.detail


def test_source_chain_falls_back_in_order(tmp_path, clock: FakeClock) -> None:
    path = tmp_path / "f.csv"
    path.write_text("start,value\n" + "".join(f"{t},{v}\n" for t, v in ROWS))
    plan = plan_delay(W, D, "aws", "us-east-1", source=f"carbonaware,file:{path}", timeout=0.5)
    assert (plan.source, plan.start) == ("file", BASE + 2 * HOUR)
    assert "carbonaware: connection refused" in plan.detail  # the earlier failure is told, not hidden


# --------------------------------------------------------------------------------------------------------------
# Durations and date-times
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30m", timedelta(minutes=30)),
        ("6h", timedelta(hours=6)),
        ("1h30m", timedelta(minutes=90)),
        ("2d", timedelta(days=2)),
        ("90s", timedelta(seconds=90)),
        ("PT30M", timedelta(minutes=30)),
        ("pt6h", timedelta(hours=6)),
        ("P1DT2H", timedelta(hours=26)),
        ("PT1.5H", timedelta(minutes=90)),
        ("P1W", timedelta(weeks=1)),
        (" 45M ", timedelta(minutes=45)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert core.parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "30", "soon", "PT", "P", "m", "-30m", "30 minutes", "1h-30m", "PT30X"])
def test_parse_duration_refuses_garbage(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        core.parse_duration(text)


@pytest.mark.parametrize("text", ["99999999999d", "1" * 400 + "s", "P99999999999W"])
def test_parse_duration_refuses_what_timedelta_cannot_hold(text: str) -> None:
    with pytest.raises(ValueError, match="out of range"):
        core.parse_duration(text)


def test_parse_datetime_refuses_what_datetime_cannot_hold() -> None:
    with pytest.raises(ValueError, match="out of range"):
        core.parse_datetime("0001-01-01T00:00+01:00")


@settings(max_examples=300, deadline=None)
@given(
    st.timedeltas(min_value=timedelta(seconds=1), max_value=timedelta(days=30)).map(
        lambda d: timedelta(seconds=round(d.total_seconds()))
    )
)
def test_iso_duration_round_trips(duration: timedelta) -> None:
    text = core.format_iso_duration(duration)
    assert text.startswith("P") and "." not in text
    assert core.parse_duration(text) == duration


@settings(max_examples=300, deadline=None)
@given(moments)
def test_parse_datetime_reads_isoformat(moment: datetime) -> None:
    parsed = core.parse_datetime(moment.isoformat())
    assert parsed == moment
    assert parsed.tzinfo == timezone.utc
    assert core.parse_datetime(moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")) == moment


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-06-01T12:00Z", BASE),
        ("2025-06-01T12:00:00.000Z", BASE),
        ("2025-06-01 14:00:00+02:00", BASE),
        ("2025-06-01T12:00:00", BASE),
        ("2025-06-01T07:00:00-0500", BASE),
        ("2022-07-15T00:00:00+00:00", datetime(2022, 7, 15, tzinfo=timezone.utc)),
    ],
)
def test_parse_datetime_provider_forms(text: str, expected: datetime) -> None:
    assert core.parse_datetime(text) == expected


@pytest.mark.parametrize("text", ["", "2025-06-01", "tomorrow", "2025-13-01T00:00Z", "1748779200"])
def test_parse_datetime_refuses_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        core.parse_datetime(text)


def test_a_request_keeps_what_is_asked_apart_from_how_to_ask_it() -> None:
    """``validate_arguments`` sorts the arguments into the question's part and the asking's part; every old name
    still reads through, and ``with_`` changes either part (a re-plan's shorter window, say) and nothing else."""
    from dataclasses import fields, replace

    log = logging.getLogger("carbonaware.test.request")
    options = {"min_savings": 0.1, "timeout": 3.0, "logger": log, "now": BASE, "grid_zone": "IE", "replan": True}
    request = core.validate_arguments(W, D, "aws", "eu-west-1", options)
    assert (request.asked.window, request.asked.duration, request.asked.min_savings) == (W, D, 0.1)
    assert (request.asked.zone, request.asked.grid_zone, request.asked.now) == (
        CloudZone("aws", "eu-west-1"),
        "IE",
        BASE,
    )
    assert (request.asking.timeout, request.asking.log, request.asking.replan) == (3.0, log, True)
    for part in (request.asked, request.asking):
        for name in (f.name for f in fields(part)):
            assert getattr(request, name) == getattr(part, name), name
    changed = request.with_(window=HOUR, now=None, timeout=4.0)
    assert changed.asked == replace(request.asked, window=HOUR, now=None)
    assert changed.asking == replace(request.asking, timeout=4.0)
    assert request.window == W and request.timeout == 3.0  # frozen: the original is untouched
    with pytest.raises(TypeError, match="no field"):
        request.with_(windw=HOUR)


def test_one_zone_and_where_and_when_ask_a_source_the_same_question() -> None:
    """The single-zone path builds the same Question as the joint planner (one place: home), so a source is asked
    for the same zone and horizon either way, and a window that allows every start changes no start."""
    calls: list[tuple[object, datetime, datetime]] = []

    def valley(zone: CloudZone | None, start: datetime, end: datetime) -> list[ForecastPoint]:
        calls.append((zone, start, end))
        return [ForecastPoint(BASE + k * HOUR, BASE + (k + 1) * HOUR, 300.0 - 40 * min(k, 6 - k)) for k in range(8)]

    zone = {"provider": "aws", "region": "eu-west-1"}
    one = plan_delay(W, D, source=valley, now=BASE, replan=False, **zone)
    joint = plan_delay(W, D, source=valley, now=BASE, replan=False, windows=[(BASE, BASE + W)], **zone)
    assert len(calls) == 2 and calls[0] == calls[1]
    assert calls[0] == (CloudZone("aws", "eu-west-1"), BASE, BASE + W + D)
    assert one.reason == joint.reason == "optimal"
    assert (
        (one.start, one.expected, one.now)
        == (joint.start, joint.expected, joint.now)
        == (BASE + 3 * HOUR, 180.0, 300.0)
    )
