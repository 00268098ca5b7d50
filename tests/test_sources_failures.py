"""Every forecast source, every way it fails: the work runs at once, one log line says why, no secret leaks.

Also: each source's plan equals an independent brute-force planner for any forecast (hypothesis).
"""

from __future__ import annotations

import email.utils
import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import carbonaware_core
from tests.fake_providers import (
    CASES,
    HOUR0,
    NOW,
    Case,
    FakeProvider,
    Planner,
    assert_no_secrets,
    fake_clock,
    oracle,
    series,
    slots,
    valley,
)
from tests.loopback import FakeClock, LoopbackServer, Reply, black_hole

UTC = timezone.utc
WINDOW = timedelta(hours=6)
DURATION = timedelta(minutes=30)


by_case = pytest.mark.parametrize("case", CASES, ids=str)


@pytest.fixture(autouse=True)
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    return fake_clock(monkeypatch, NOW)


@pytest.fixture
def make(server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> Callable[[Case], FakeProvider]:
    def build(case: Case) -> FakeProvider:
        return case.make(server, monkeypatch)  # type: ignore[no-any-return]

    return build


def planner(case: Case) -> Planner:
    return Planner(WINDOW, DURATION, {"source": case.name, "now": NOW, **case.options})


def plan(case: Case, **options: object) -> carbonaware_core.Plan:
    return planner(case).plan(**options)


def delay_logged(
    case: Case, caplog: pytest.LogCaptureFixture, **options: object
) -> tuple[carbonaware_core.Plan, list[logging.LogRecord]]:
    """carbonaware_delay on the fake clock; the library's log records. Asserts no secret anywhere."""
    return planner(case).delay_logged(caplog, **options)


def assert_ran_now_saying(result: carbonaware_core.Plan, records: list[logging.LogRecord], *words: str) -> None:
    assert result.reason == "source-failed"
    assert result.start == NOW and result.delay == timedelta(0)
    assert result.expected is None and result.savings is None
    for word in words:
        assert word in result.detail, (word, result.detail)
    assert len(records) == 1, [r.getMessage() for r in records]
    assert records[0].levelno == logging.WARNING
    for word in words:
        assert word in records[0].getMessage()


# ---- refusals, rate limits, garbage ----------------------------------------------------------------------------


@by_case
def test_unauthorized_runs_now_and_logs_once(
    case: Case, make: Callable[[Case], FakeProvider], caplog: pytest.LogCaptureFixture
) -> None:
    fake = make(case)
    fake.fault = Reply(401, case.unauthorized)
    result, records = delay_logged(case, caplog)
    assert_ran_now_saying(result, records, case.name, "HTTP 401")
    assert 1 <= len(fake.calls) <= 2  # WattTime logs in again once; nobody loops


RETRY_AFTER = [
    pytest.param({"Retry-After": "120"}, 120.0, id="seconds"),
    pytest.param({}, carbonaware_core.FAILURE_TTL_SECONDS, id="none"),
    pytest.param(
        {"Retry-After": email.utils.format_datetime(NOW + timedelta(seconds=90), usegmt=True)}, 90.0, id="http-date"
    ),
    pytest.param({"Retry-After": "3600"}, carbonaware_core.MAX_RETRY_AFTER_SECONDS, id="capped"),
]


@by_case
@pytest.mark.parametrize(("headers", "hold"), RETRY_AFTER)
def test_rate_limit_is_remembered_then_retried(
    case: Case, make: Callable[[Case], FakeProvider], clock: FakeClock, headers: dict[str, str], hold: float
) -> None:
    fake = make(case)
    fake.fault = Reply(429, {"error": "Too Many Requests"}, headers)
    first = plan(case)
    assert first.reason == "source-failed" and "HTTP 429" in first.detail
    assert len(fake.calls) == 1
    fake.fault = None
    clock.advance(hold - 1)
    held = plan(case)
    assert held.reason == "source-failed" and "HTTP 429" in held.detail
    assert len(fake.calls) == 1, "asked again while the failure should be remembered"
    clock.advance(2)
    fresh = plan(case)
    assert len(fake.calls) == 2
    assert fresh.reason == "optimal"
    assert fresh.start == datetime(2025, 6, 1, 15, 0, tzinfo=UTC)


@by_case
@pytest.mark.parametrize(
    "body",
    [b"<html><body>502 Bad Gateway</body></html>", b'{"forecast": [{"carbonIntensity": 1', b"", b"\xff\xfe\x00"],
    ids=["html", "cut-json", "empty", "binary"],
)
def test_bad_json_runs_now(
    case: Case, make: Callable[[Case], FakeProvider], caplog: pytest.LogCaptureFixture, body: bytes
) -> None:
    fake = make(case)
    fake.fault = Reply(200, body, {"Content-Type": "text/html"})
    result, records = delay_logged(case, caplog)
    assert_ran_now_saying(result, records, case.name, "not JSON")


@by_case
def test_a_body_cut_short_runs_now(
    case: Case, make: Callable[[Case], FakeProvider], caplog: pytest.LogCaptureFixture
) -> None:
    fake = make(case)
    fake.fault = Reply(200, b'{"data": [', truncate=True)
    result, records = delay_logged(case, caplog)
    assert_ran_now_saying(result, records, case.name)


WRONG_SHAPES = {
    "electricitymaps": {"zone": "DE", "history": [{"carbonIntensity": 100, "datetime": "2025-06-01T12:00:00.000Z"}]},
    "watttime": {"data": [{"point_time": "2025-06-01T12:20:00+00:00", "value": 500}], "meta": {"units": "percent"}},
    "ukgrid": {"data": "no data"},
    "gsf": [{"location": "eastus", "emissionsData": []}],
}


@by_case
def test_a_wrong_shape_runs_now(
    case: Case, make: Callable[[Case], FakeProvider], caplog: pytest.LogCaptureFixture
) -> None:
    fake = make(case)
    fake.fault = Reply(200, WRONG_SHAPES[case.name])
    result, records = delay_logged(case, caplog)
    assert_ran_now_saying(result, records, case.name)


@by_case
def test_a_silent_server_times_out(
    case: Case, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    env = {
        "electricitymaps": "ELECTRICITYMAPS_API_URL",
        "watttime": "WATTTIME_API_URL",
        "ukgrid": "UKGRID_API_URL",
        "gsf": "CARBONAWARE_SDK_URL",
    }
    monkeypatch.setenv("ELECTRICITYMAPS_API_KEY", "EM-SECRET-123")
    monkeypatch.setenv("WATTTIME_USERNAME", "wt-user-ab")
    monkeypatch.setenv("WATTTIME_PASSWORD", "WT-PASSWORD-456")
    with black_hole() as hole:
        monkeypatch.setenv(env[case.name], f"http://{hole}")
        began = time.monotonic()
        result, records = delay_logged(case, caplog, timeout=0.3)
        took = time.monotonic() - began
    assert_ran_now_saying(result, records, case.name, "no answer within 0.3s (timeout)")
    assert took < 3.0  # the 0.3 s budget, not the 10 s default


# ---- forecasts that do not fit -------------------------------------------------------------------------------


def falling(moment: datetime) -> float:
    return 500.0 - (moment - HOUR0) / timedelta(minutes=5)


@by_case
def test_a_forecast_short_of_the_window_is_planned_over_what_it_covers(
    case: Case, make: Callable[[Case], FakeProvider]
) -> None:
    fake = make(case)
    covered_until = HOUR0 + timedelta(hours=3)
    fake.points = series(fake.period, case.grid_start, covered_until, falling)  # the window reaches 18:20
    result = plan(case)
    expected = oracle(fake.served_intervals(), NOW, WINDOW, DURATION)
    assert result.reason == "optimal"
    assert result.start == expected.start
    assert result.start + DURATION <= covered_until
    assert result.start >= covered_until - max(fake.period, DURATION)  # falling values: in the last covered period
    assert result.expected == pytest.approx(expected.value(case.factor))


@by_case
def test_a_forecast_shorter_than_the_job_compares_what_it_covers(
    case: Case, make: Callable[[Case], FakeProvider]
) -> None:
    fake = make(case)
    fake.points = series(fake.period, case.grid_start, HOUR0 + timedelta(hours=1), falling)
    result = plan(case, duration=timedelta(hours=2))
    expected = oracle(fake.served_intervals(), NOW, WINDOW, timedelta(hours=2))
    assert expected.shortened
    assert result.start == expected.start
    assert "only its covered part" in result.detail


@by_case
def test_a_forecast_that_starts_later_runs_now(
    case: Case, make: Callable[[Case], FakeProvider], caplog: pytest.LogCaptureFixture
) -> None:
    fake = make(case)
    start = HOUR0 + timedelta(hours=2)
    fake.points = series(fake.period, start, start + timedelta(hours=12), valley)
    result, records = delay_logged(case, caplog)
    assert_ran_now_saying(result, records, case.name, "does not cover now")


@by_case
def test_a_stale_forecast_runs_now(
    case: Case, make: Callable[[Case], FakeProvider], caplog: pytest.LogCaptureFixture
) -> None:
    fake = make(case)
    fake.filtering = False  # a misbehaving server: yesterday's forecast whatever was asked
    fake.points = series(fake.period, HOUR0 - timedelta(hours=12), HOUR0, valley)
    result, records = delay_logged(case, caplog)
    assert_ran_now_saying(result, records, case.name, "stale")


# ---- for all forecasts: the plan is the brute-force optimum --------------------------------------------------

SHIFTS = st.integers(min_value=-3, max_value=3)
MAYBE_VALUES = st.one_of(st.integers(min_value=0, max_value=999), st.none(), st.just(-5)).map(
    lambda v: None if v is None else float(v)
)


@by_case
@settings(max_examples=35, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_plans_equal_brute_force(case: Case, make: Callable[[Case], FakeProvider], data: st.DataObject) -> None:
    carbonaware_core.clear_cache()
    fake = make(case)
    window = data.draw(st.sampled_from([timedelta(hours=1), timedelta(hours=3), timedelta(hours=6)]), "window")
    duration = data.draw(st.sampled_from([timedelta(minutes=m) for m in (5, 30, 45, 90)]), "duration")
    shift = data.draw(SHIFTS, "shift")
    count = data.draw(st.integers(min_value=1, max_value=int(timedelta(hours=8) / fake.period)), "count")
    weights = st.one_of(st.integers(min_value=0, max_value=999).map(float), MAYBE_VALUES)
    values = data.draw(st.lists(weights, min_size=count, max_size=count), "values")
    fake.points = slots(case.grid_start + shift * fake.period, fake.period, values)

    result = plan(case, window=window, duration=duration)
    expected = oracle(fake.served_intervals(), NOW, window, duration)

    assert_no_secrets(result.detail)
    if expected.error is not None:
        assert result.reason == "source-failed", (expected.error, result)
        words = {"empty": "empty", "stale": "stale", "not-covering-now": "does not cover now"}
        assert words[expected.error] in result.detail
        return
    assert result.source == case.name
    assert result.start == expected.start, (result.detail, expected)
    assert result.now == pytest.approx(expected.now_value(case.factor), rel=1e-9, abs=1e-9)
    assert result.expected == pytest.approx(expected.value(case.factor), rel=1e-9, abs=1e-9)
    assert result.reason == ("optimal" if expected.waits else "already-best")
    assert result.start <= NOW + window
    assert ("only its covered part" in result.detail) == expected.shortened


# ---- for all failure answers: run now, say why once, leak nothing ---------------------------------------------

STATUSES = st.sampled_from([400, 401, 403, 404, 405, 408, 409, 418, 422, 429, 500, 502, 503, 504])
BODIES = st.sampled_from(
    [
        b"",
        b"Internal Server Error",
        b'{"error": "Invalid auth-token"}',
        b'{"message": "Your plan does not include access to this endpoint"}',
        b'{"error": {"code": "400 Bad Request", "message": "Please enter a valid date"}}',
        b"<html>" + b"x" * 5000 + b"</html>",
    ]
)


@by_case
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(status=STATUSES, body=BODIES, retry=st.sampled_from([None, "1", "30", "Wed, 21 Oct 2015 07:28:00 GMT"]))
def test_any_error_answer_runs_now_quietly(
    case: Case,
    make: Callable[[Case], FakeProvider],
    caplog: pytest.LogCaptureFixture,
    status: int,
    body: bytes,
    retry: str | None,
) -> None:
    carbonaware_core.clear_cache()
    fake = make(case)
    fake.fault = Reply(status, body, {"Retry-After": retry} if retry else {})
    result, records = delay_logged(case, caplog)
    assert_ran_now_saying(result, records, case.name, str(status))
    assert len(records[0].getMessage()) < 600  # one readable line, not a dumped body


@by_case
@pytest.mark.parametrize("problem", ["stale", "later"])
def test_an_unusable_forecast_is_remembered_briefly_like_a_failure(
    case: Case, make: Callable[[Case], FakeProvider], clock: FakeClock, problem: str
) -> None:
    """A 200 answer the planner cannot use (stale, or starting hours from now) fails the plan like an error does,
    so it must be asked again after FAILURE_TTL_SECONDS -- not trusted for the source's whole lifetime."""
    fake = make(case)
    good = fake.points
    fake.filtering = problem != "stale"
    if problem == "stale":
        fake.points = series(fake.period, HOUR0 - timedelta(hours=12), HOUR0, valley)
    else:
        fake.points = series(fake.period, HOUR0 + timedelta(hours=2), HOUR0 + timedelta(hours=14), valley)
    assert plan(case).reason == "source-failed"
    fake.points, fake.filtering = good, True
    clock.advance(carbonaware_core.FAILURE_TTL_SECONDS + 1)
    recovered = plan(case)
    assert len(fake.calls) == 2, "the unusable answer was kept for the source's full lifetime"
    assert recovered.reason == "optimal"


@by_case
def test_retry_after_on_a_503_is_honoured(case: Case, make: Callable[[Case], FakeProvider], clock: FakeClock) -> None:
    """Retry-After also comes with 503 (maintenance, overload): asking again ten seconds later ignores it."""
    fake = make(case)
    fake.fault = Reply(503, {"error": "Service Unavailable"}, {"Retry-After": "120"})
    assert "HTTP 503" in plan(case).detail
    fake.fault = None
    clock.advance(60)
    plan(case)
    assert len(fake.calls) == 1, "asked again 60 s into a 120 s Retry-After"
    clock.advance(61)
    assert plan(case).reason == "optimal"
    assert len(fake.calls) == 2
