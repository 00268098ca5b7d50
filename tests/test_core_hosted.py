"""The hosted CarbonAware scheduler (protocols.md §1) against a real server on 127.0.0.1, over both HTTP backends."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import carbonaware_core as core
from carbonaware_core import carbonaware_delay, plan_delay
from tests.fake_providers import fake_clock
from tests.loopback import FakeClock, HostedScheduler, LoopbackServer, Reply, black_hole, fastapi_422, serving

BASE = datetime(2025, 6, 1, 12, 0, tzinfo=timezone.utc)
WINDOW = timedelta(hours=6)
DURATION = timedelta(minutes=30)
TIMEOUT = 0.5
SLACK = 0.4  # scheduling noise allowed beyond the request timeout
LBS = 0.45359237
ZONE = {"provider": "aws", "region": "us-west-1"}
USER_AGENTS = {"requests": "python-requests/", "urllib": "Python-urllib/"}


def utc(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def answer(ideal_time: str | object, ideal: object = 500.0, naive: object = 800.0) -> dict[str, object]:
    """A 200 body as the scheduler writes it, with chosen fields."""
    return {
        "ideal": {"time": ideal_time, "zone": ZONE, "co2_intensity": ideal},
        "options": [{"time": ideal_time, "zone": ZONE, "co2_intensity": ideal}],
        "worst_case": {"time": utc(BASE + timedelta(minutes=5)), "zone": ZONE, "co2_intensity": 990.0},
        "naive_case": {"time": utc(BASE), "zone": ZONE, "co2_intensity": naive},
        "median_case": {"time": utc(BASE + timedelta(minutes=10)), "zone": ZONE, "co2_intensity": 700.0},
        "carbon_savings": {"vs_worst_case": 49.5, "vs_naive_case": 37.5, "vs_median_case": 28.6},
    }


GOOD = answer(utc(BASE + timedelta(hours=1)))


@pytest.fixture(params=["requests", "urllib"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("CARBONAWARE_HTTP_CLIENT", request.param)
    return str(request.param)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    return fake_clock(monkeypatch, BASE)


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[LoopbackServer]:
    with serving(poll_interval=0.02) as running:
        monkeypatch.setenv("CARBONAWARE_SCHEDULER_BASE_URL", running.url)
        yield running


@pytest.fixture
def scheduler(server: LoopbackServer, clock: FakeClock) -> HostedScheduler:
    return HostedScheduler(server, clock=clock.time)


def carbonaware_logs(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "carbonaware"]


# --------------------------------------------------------------------------------------------------------------
# The request and the 200 answer
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("duration", "iso"),
    [
        (timedelta(minutes=30), "PT30M"),
        (timedelta(minutes=90), "PT1H30M"),
        (timedelta(hours=2), "PT2H"),
        (timedelta(hours=23, minutes=30), "PT23H30M"),
        (timedelta(days=1), "P1D"),
        (timedelta(seconds=45), "PT5M"),  # the real server answers 500 to anything under five minutes
        (timedelta(minutes=4, seconds=59), "PT5M"),
        (timedelta(minutes=5), "PT5M"),
    ],
)
def test_request_shape(backend: str, scheduler: HostedScheduler, duration: timedelta, iso: str) -> None:
    plan = plan_delay(WINDOW, duration, "AWS", "us-west-1")  # default source: the hosted scheduler first
    assert plan.source == "carbonaware"
    [seen] = scheduler.calls
    assert seen.method == "POST"
    assert seen.path == "/v0/schedule/"  # the trailing slash: without it the server answers 307
    assert seen.headers["content-type"].startswith("application/json")
    assert seen.headers["user-agent"].startswith(USER_AGENTS[backend])  # the backend really is the one asked for
    assert seen.json() == {
        "duration": iso,
        "windows": [{"start": "2025-06-01T12:00:00Z", "end": "2025-06-01T18:00:00Z"}],
        "zones": [{"provider": "aws", "region": "us-west-1"}],
        "num_options": 3,
    }
    assert scheduler.server.requests_to("/v0/schedule") == []


def test_window_is_sent_in_utc_z_form_whatever_the_callers_timezone(
    backend: str, scheduler: HostedScheduler, clock: FakeClock
) -> None:
    plus2 = timezone(timedelta(hours=2))
    now = datetime(2025, 6, 1, 14, 0, 30, 123456, tzinfo=plus2)  # 12:00:30.123456Z
    plan_delay(timedelta(hours=1), DURATION, "gcp", "europe-west1", now=now)
    [seen] = scheduler.calls
    window = seen.json()["windows"]
    assert window == [{"start": "2025-06-01T12:00:30Z", "end": "2025-06-01T13:00:30Z"}]
    assert seen.json()["zones"] == [{"provider": "gcp", "region": "europe-west1"}]


def test_answer_becomes_the_plan(backend: str, scheduler: HostedScheduler) -> None:
    scheduler.ideal_after = timedelta(hours=2, minutes=35)
    scheduler.ideal_lbs, scheduler.naive_lbs = 612.3, 900.0
    plan = plan_delay(WINDOW, DURATION, "aws", "us-west-1")
    assert plan.reason == "optimal"
    assert plan.start == BASE + timedelta(hours=2, minutes=35)
    assert plan.delay == timedelta(hours=2, minutes=35)
    assert plan.expected == pytest.approx(612.3 * LBS)
    assert plan.now == pytest.approx(900.0 * LBS)
    assert plan.savings == pytest.approx((900.0 - 612.3) / 900.0)
    assert plan.zone == core.CloudZone("aws", "us-west-1")
    assert plan.unit.startswith("gCO2")
    assert json.loads(json.dumps(plan.to_dict()))["start"] == "2025-06-01T14:35:00Z"


def test_savings_fall_back_to_the_stated_percentage(backend: str, server: LoopbackServer, clock: FakeClock) -> None:
    body = answer(utc(BASE + timedelta(hours=1)))
    del body["naive_case"]
    server.route("POST", "/v0/schedule/", Reply(200, body))
    plan = plan_delay(WINDOW, DURATION, "aws", "us-west-1", source="carbonaware")
    assert plan.reason == "optimal"
    assert plan.now is None
    assert plan.savings == pytest.approx(0.375)


def test_ideal_a_few_minutes_in_the_past_starts_now(backend: str, server: LoopbackServer, clock: FakeClock) -> None:
    server.route("POST", "/v0/schedule/", Reply(200, answer(utc(BASE - timedelta(minutes=4)))))
    plan = plan_delay(WINDOW, DURATION, "aws", "us-west-1", source="carbonaware")
    assert plan.reason != "source-failed"
    assert (plan.start, plan.delay) == (BASE, timedelta(0))


def test_ideal_just_past_the_window_is_clamped_to_its_end(
    backend: str, server: LoopbackServer, clock: FakeClock
) -> None:
    """Bug caught: the clamped start carried the scheduler's figures for a start 3 minutes later."""
    server.route("POST", "/v0/schedule/", Reply(200, answer(utc(BASE + WINDOW + timedelta(minutes=3)))))
    plan = plan_delay(WINDOW, DURATION, "aws", "us-west-1", source="carbonaware")
    assert plan.start == BASE + WINDOW  # never a start outside the window
    assert plan.reason == "optimal"
    assert plan.expected is None and plan.savings is None  # the figures were for 18:03, not 18:00
    assert plan.now == pytest.approx(800.0 * LBS)
    assert "2025-06-01T18:03:00Z, lies past the window's end" in plan.detail


# --------------------------------------------------------------------------------------------------------------
# The real server's rules, replayed (scheduler/src/modeling/schedule.py, its region enums)
# --------------------------------------------------------------------------------------------------------------


def _valley_at_the_end(moment: datetime) -> float:
    """MOER (lbs/MWh) falling towards a minimum just past 18:00 + 30 min: the best 30-minute start is 18:05."""
    minutes = (moment - BASE).total_seconds() / 60
    return 900.0 - min(minutes, 390.0) + (200.0 if minutes > 400 else 0.0)


def test_the_servers_ideal_past_the_window_gives_way_to_its_best_option_inside(
    backend: str, server: LoopbackServer, clock: FakeClock
) -> None:
    hosted = HostedScheduler(server, clock=clock.time, moer=_valley_at_the_end)
    window_end = BASE + WINDOW
    rolled = dict(hosted.rolled(BASE, window_end, DURATION))
    assert min(rolled, key=lambda t: rolled[t]) == window_end + timedelta(minutes=5)  # the server's ideal: outside
    plan = plan_delay(WINDOW, DURATION, "aws", "us-west-1", source="carbonaware")
    inside = {t: v for t, v in rolled.items() if t <= window_end}
    best = min(inside, key=lambda t: (inside[t], t))
    assert plan.start == best == window_end
    assert plan.expected == pytest.approx(inside[best] * LBS)  # the figure for the start taken, not for 18:05
    assert plan.now == pytest.approx(rolled[BASE] * LBS)
    assert plan.savings == pytest.approx(1 - inside[best] / rolled[BASE])


def test_a_job_of_odd_minutes_can_see_the_ideal_ten_minutes_past_the_end(
    backend: str, server: LoopbackServer, clock: FakeClock
) -> None:
    """Bug caught (by the property test below): a 74-minute job in a 1-minute window got the server's ideal 9
    minutes past the window's end, which the client rejected as outside the window, so no plan."""

    def falling(moment: datetime) -> float:
        return 500.0 - (moment - BASE).total_seconds() / 60

    hosted = HostedScheduler(server, clock=clock.time, moer=falling)
    window, duration = timedelta(minutes=1), timedelta(minutes=74)
    rolled = dict(hosted.rolled(BASE, BASE + window, duration))
    assert max(rolled) == BASE + timedelta(minutes=10)  # the latest start the server compares
    plan = plan_delay(window, duration, "aws", "us-west-1", source="carbonaware")
    # its options inside the 1-minute window: only 12:00, so starting at once is the best the window allows
    assert (plan.reason, plan.start) == ("already-best", BASE)
    assert plan.expected == pytest.approx(rolled[BASE] * LBS)


def test_the_servers_answer_inside_the_window_is_taken_as_it_is(
    backend: str, server: LoopbackServer, clock: FakeClock
) -> None:
    def valley(moment: datetime) -> float:
        return 300.0 if BASE + timedelta(hours=2) <= moment < BASE + timedelta(hours=3) else 700.0

    hosted = HostedScheduler(server, clock=clock.time, moer=valley)
    plan = plan_delay(WINDOW, DURATION, "aws", "us-west-1", source="carbonaware")
    rolled = dict(hosted.rolled(BASE, BASE + WINDOW, DURATION))
    assert plan.start == BASE + timedelta(hours=2)
    assert plan.expected == pytest.approx(rolled[plan.start] * LBS) == pytest.approx(300.0 * LBS)
    assert plan.savings == pytest.approx(1 - 300.0 / 700.0)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    blocks=st.lists(st.integers(100, 1000), min_size=60, max_size=60),
    window_minutes=st.integers(1, 6 * 60),
    duration_minutes=st.one_of(st.integers(1, 4), st.integers(5, 180)),
    dip_after_the_window=st.booleans(),
)
def test_every_hosted_plan_starts_inside_the_window_with_figures_for_that_start(
    server: LoopbackServer,
    clock: FakeClock,
    blocks: list[int],
    window_minutes: int,
    duration_minutes: int,
    dip_after_the_window: bool,
) -> None:
    """For any forecast, window and job the real server's algorithm meets: the start lies in the window, and any
    expected intensity the plan reports is the server's rolling mean for that very start. (A dip just after the
    window's end puts the server's ideal past it.)"""
    core.clear_cache()
    window, duration = window_minutes * MINUTE, duration_minutes * MINUTE

    def moer(moment: datetime) -> float:
        if dip_after_the_window and BASE + window < moment <= BASE + window + duration:
            return 50.0
        return float(blocks[int((moment - BASE) / (30 * MINUTE))])

    hosted = HostedScheduler(server, clock=clock.time, moer=moer)
    plan = plan_delay(window, duration, "aws", "us-west-1", source="carbonaware")
    assert plan.reason in ("optimal", "already-best"), plan.detail
    assert BASE <= plan.start <= BASE + window
    rolled = dict(hosted.rolled(BASE, BASE + window, max(duration, 5 * MINUTE)))
    if plan.expected is not None:
        assert plan.expected == pytest.approx(rolled[plan.start] * LBS)
    assert plan.now == pytest.approx(rolled[BASE] * LBS)
    if plan.reason == "optimal" and plan.expected is not None:  # the best start inside the window: its options
        # are the lowest means overall, so the lowest of them inside the window is the lowest inside it
        assert plan.expected == pytest.approx(min(v for t, v in rolled.items() if t <= BASE + window) * LBS)


MINUTE = timedelta(minutes=1)


def test_a_job_under_five_minutes_is_asked_about_as_five(
    backend: str, server: LoopbackServer, clock: FakeClock
) -> None:
    """Bug caught: the real server answers 500 to any duration under PT5M, so short jobs never got a plan."""

    def valley(moment: datetime) -> float:
        return 300.0 if BASE + timedelta(hours=1) <= moment < BASE + timedelta(hours=1, minutes=5) else 700.0

    hosted = HostedScheduler(server, clock=clock.time, moer=valley)
    plan = plan_delay(WINDOW, timedelta(seconds=40), "aws", "us-west-1", source="carbonaware")
    [seen] = hosted.calls
    assert seen.json()["duration"] == "PT5M"
    assert plan.reason == "optimal" and plan.start == BASE + timedelta(hours=1)
    assert plan.expected == pytest.approx(300.0 * LBS)


@pytest.mark.parametrize(
    ("provider", "region"), [("gcp", "us-east5"), ("aws", "ap-southeast-1"), ("azure", "eastus3"), ("ovh", "x")]
)
def test_a_region_the_scheduler_does_not_support_is_never_sent(
    backend: str, server: LoopbackServer, clock: FakeClock, provider: str, region: str
) -> None:
    """Bug caught: the request went out and came back as a 422 naming ``enum[AwsRegion]``, even for GCP."""
    hosted = HostedScheduler(server, clock=clock.time)
    plan = plan_delay(WINDOW, DURATION, provider, region)  # the default chain: the scheduler, then offline
    assert hosted.calls == []
    said = f"carbonaware: {provider}:{region} is not supported by the hosted scheduler"
    assert said in plan.detail  # and then the offline model, where it knows the region's grid
    assert plan.source != "carbonaware"
    assert plan.fallbacks in ((), (said,))


def test_a_job_longer_than_the_servers_day_is_not_sent(backend: str, server: LoopbackServer, clock: FakeClock) -> None:
    hosted = HostedScheduler(server, clock=clock.time)
    plan = plan_delay(WINDOW, timedelta(days=1, hours=2), "aws", "us-west-1")
    assert hosted.calls == []
    assert "carbonaware: a job over 24h00m is longer than the hosted scheduler's forecast" in plan.detail


def test_the_servers_500_for_a_job_past_its_forecast_is_replayed(server: LoopbackServer, clock: FakeClock) -> None:
    import urllib.error
    import urllib.request

    HostedScheduler(server, clock=clock.time)
    for duration, status in (("P1D", 200), ("P1DT2H", 500), ("PT4M59S", 500)):
        body = {
            "duration": duration,
            "windows": [{"start": utc(BASE), "end": utc(BASE + WINDOW)}],
            "zones": [ZONE],
        }
        request = urllib.request.Request(
            f"{server.url}/v0/schedule/", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request) as answered:
                got = answered.status
        except urllib.error.HTTPError as refused:
            got = refused.code
        assert got == status, duration


def test_the_servers_422_for_an_unknown_region_is_replayed(server: LoopbackServer, clock: FakeClock) -> None:
    import urllib.error
    import urllib.request

    HostedScheduler(server, clock=clock.time)
    body = json.dumps(
        {
            "duration": "PT30M",
            "windows": [{"start": utc(BASE), "end": utc(BASE + WINDOW)}],
            "zones": [{"provider": "gcp", "region": "us-east5"}],
        }
    ).encode()
    request = urllib.request.Request(f"{server.url}/v0/schedule/", body, {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request)
    assert refused.value.code == 422
    detail = json.loads(refused.value.read())["detail"]
    assert detail[0]["loc"] == ["body", "zones", 0, "region", "enum[AwsRegion]"]
    with urllib.request.urlopen(f"{server.url}/v0/regions/") as listed:
        regions = {(z["provider"], z["region"]) for z in json.load(listed)["regions"]}
    assert len(regions) == 100 and ("gcp", "us-east5") not in regions
    assert regions == {(p, r) for p, names in core.SCHEDULER_REGIONS.items() for r in names}


def test_an_older_server_refusing_a_listed_region_is_reported_as_unsupported(
    backend: str, server: LoopbackServer, clock: FakeClock
) -> None:
    only_aws = {"aws": ("AwsRegion", ("us-east-1",))}
    hosted = HostedScheduler(server, clock=clock.time, enums=only_aws)
    plan = plan_delay(WINDOW, DURATION, "azure", "westeurope", source="carbonaware")
    assert len(hosted.calls) == 1
    assert plan.reason == "source-failed"
    assert "azure:westeurope is not supported by the hosted scheduler (HTTP 422)" in plan.detail


def test_a_window_longer_than_the_servers_day_says_so(backend: str, server: LoopbackServer, clock: FakeClock) -> None:
    hosted = HostedScheduler(server, clock=clock.time, ideal_after=timedelta(hours=3))
    plan = plan_delay(timedelta(hours=48), DURATION, "aws", "us-west-1", source="carbonaware")
    [seen] = hosted.calls
    assert seen.json()["windows"] == [{"start": utc(BASE), "end": utc(BASE + timedelta(hours=24))}]
    assert plan.reason == "optimal" and plan.start == BASE + timedelta(hours=3)
    assert "carbonaware looks only 24h00m ahead, so starts after 2025-06-02T12:00:00Z were not compared" in plan.detail
    short = plan_delay(timedelta(hours=24), DURATION, "aws", "us-west-1", source="carbonaware")
    assert "looks only" not in short.detail


def test_a_shared_decision_minutes_later_is_no_shorter_a_look(
    backend: str, server: LoopbackServer, clock: FakeClock
) -> None:
    hosted = HostedScheduler(server, clock=clock.time, ideal_after=timedelta(hours=3))
    plan_delay(WINDOW, DURATION, "aws", "us-west-1", source="carbonaware")
    long = plan_delay(timedelta(hours=48), DURATION, "aws", "us-west-1", source="carbonaware")
    clock.advance(120)
    again = plan_delay(WINDOW, DURATION, "aws", "us-west-1", source="carbonaware")
    long_again = plan_delay(timedelta(hours=48), DURATION, "aws", "us-west-1", source="carbonaware")
    assert len(hosted.calls) == 2  # one per window length: the later callers were answered from the cache
    assert "looks only" not in again.detail
    assert long.detail == long_again.detail  # the look ahead is the one the shared decision had
    assert "starts after 2025-06-02T12:00:00Z were not compared" in long_again.detail


def test_ideal_worse_than_now_starts_now(backend: str, scheduler: HostedScheduler) -> None:
    scheduler.ideal_lbs, scheduler.naive_lbs = 900.0, 800.0
    plan = plan_delay(WINDOW, DURATION, "aws", "us-west-1")
    assert (plan.reason, plan.delay) == ("already-best", timedelta(0))


def test_min_savings_applies_to_the_hosted_decision(backend: str, scheduler: HostedScheduler) -> None:
    scheduler.ideal_lbs, scheduler.naive_lbs = 760.0, 800.0  # 5 % better later
    plan = plan_delay(WINDOW, DURATION, "aws", "us-west-1", min_savings=0.1)
    assert (plan.reason, plan.delay) == ("below-threshold", timedelta(0))


# --------------------------------------------------------------------------------------------------------------
# The fault matrix: every one runs the work at once, logs one line with the cause, and stays within the timeout
# --------------------------------------------------------------------------------------------------------------


def _nan_body() -> str:
    return json.dumps(answer(utc(BASE + timedelta(hours=1)), ideal=float("nan")))  # json writes a bare NaN


def _huge(total: int) -> Iterator[bytes]:
    piece = b" " * (1024 * 1024)
    for _ in range(total // len(piece)):
        yield piece


FAULTS: dict[str, tuple[Reply, str]] = {
    "redirect-301": (Reply(301, "", {"Location": "https://scheduler.example.com/v0/schedule/"}), r"redirect.*301"),
    "redirect-307": (Reply(307, "", {"Location": "/v0/schedule"}), r"redirect.*307"),
    "http-404": (Reply(404, {"detail": "Not Found"}), r"HTTP 404"),
    "http-422": (fastapi_422(["body", "windows", 0], "Value error, start time must not be in the past"), r"HTTP 422"),
    "http-429": (Reply(429, {"detail": "Too Many Requests"}, {"Retry-After": "120"}), r"429"),
    "http-500": (Reply(500, "Internal Server Error", {"Content-Type": "text/plain; charset=utf-8"}), r"HTTP 500"),
    "truncated-json": (Reply(200, json.dumps(GOOD)[:70]), r"not JSON"),
    "connection-cut-mid-body": (Reply(200, GOOD, truncate=True), r"(?i)incomplete|connection|broken"),
    "html-instead-of-json": (
        Reply(200, "<html><body>Bad gateway</body></html>", {"Content-Type": "text/html"}),
        r"not JSON",
    ),
    "json-list": (Reply(200, []), r"unexpected answer"),
    "json-without-ideal": (Reply(200, {"options": [], "carbon_savings": {}}), r"ideal"),
    "ideal-not-an-object": (Reply(200, {"ideal": "2025-06-01T13:00:00Z"}), r"ideal"),
    "ideal-time-a-number": (Reply(200, {"ideal": {"time": 1748782800, "co2_intensity": 500}}), r"time"),
    "ideal-time-not-a-date": (Reply(200, answer("tomorrow morning")), r"not a date"),
    "ideal-time-far-in-the-past": (Reply(200, answer(utc(BASE - timedelta(hours=3)))), r"outside the window"),
    "ideal-time-beyond-the-window": (
        Reply(200, answer(utc(BASE + WINDOW + timedelta(hours=1)))),
        r"outside the window",
    ),
    "nan-intensity": (Reply(200, _nan_body()), r"not a valid intensity"),
    "negative-intensity": (Reply(200, answer(utc(BASE + timedelta(hours=1)), ideal=-12.0)), r"not a valid intensity"),
    "string-intensity": (Reply(200, answer(utc(BASE + timedelta(hours=1)), ideal="612")), r"not a valid intensity"),
    "negative-naive-intensity": (
        Reply(200, answer(utc(BASE + timedelta(hours=1)), naive=-1.0)),
        r"not a valid intensity",
    ),
    "status-line-too-late": (Reply(200, GOOD, delay=1.5), r"timeout"),
    "slow-body-trickled-past-the-timeout": (Reply(200, GOOD, chunks=40, pause=0.05), r"timeout"),
    "body-50MB-declared": (Reply(200, stream=lambda: _huge(50 * 2**20), length=50 * 2**20), r"larger than"),
    "body-50MB-chunked": (Reply(200, stream=lambda: _huge(50 * 2**20)), r"larger than"),
}


def _assert_failed_open(plan: core.Plan, caplog: pytest.LogCaptureFixture, cause: str, elapsed: float) -> None:
    assert plan.reason == "source-failed", plan
    assert (plan.delay, plan.start) == (timedelta(0), BASE)
    assert plan.expected is None and plan.savings is None
    assert re.search(cause, plan.detail), plan.detail
    [line] = carbonaware_logs(caplog)  # one line, with the cause
    assert line.levelno == logging.WARNING
    assert re.search(cause, line.getMessage()), line.getMessage()
    assert elapsed <= TIMEOUT + SLACK, f"took {elapsed:.2f}s with a {TIMEOUT}s timeout"


@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault_runs_now(
    fault: str, backend: str, server: LoopbackServer, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    reply, cause = FAULTS[fault]
    server.route("POST", "/v0/schedule/", reply)
    clock.on_sleep = lambda seconds: pytest.fail(f"waited {seconds}s after a failure")
    caplog.set_level(logging.INFO)
    began = time.monotonic()
    plan = carbonaware_delay(WINDOW, DURATION, "aws", "us-west-1", source="carbonaware", timeout=TIMEOUT)
    _assert_failed_open(plan, caplog, cause, time.monotonic() - began)
    assert len(server.requests_to("/v0/schedule/")) == 1  # one request: no redirect followed, no retry storm
    assert server.requests_to("/v0/schedule") == []


def test_refused(backend: str, clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)  # the conftest points the scheduler at a port nothing listens on
    began = time.monotonic()
    plan = carbonaware_delay(WINDOW, DURATION, "aws", "us-west-1", source="carbonaware", timeout=TIMEOUT)
    _assert_failed_open(plan, caplog, r"refused", time.monotonic() - began)


def test_black_holed(
    backend: str, clock: FakeClock, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO)
    with black_hole() as host:
        monkeypatch.setenv("CARBONAWARE_SCHEDULER_BASE_URL", f"http://{host}")
        began = time.monotonic()
        plan = carbonaware_delay(WINDOW, DURATION, "aws", "us-west-1", source="carbonaware", timeout=TIMEOUT)
        elapsed = time.monotonic() - began
    _assert_failed_open(plan, caplog, r"timeout", elapsed)
    assert elapsed >= TIMEOUT * 0.8  # it did wait for an answer, up to the budget


def test_default_source_fails_open_too(
    backend: str, server: LoopbackServer, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    monkeypatch.setenv("CARBONAWARE_OFFLINE_DATA", str(tmp_path / "no-offline-model.json"))
    server.route("POST", "/v0/schedule/", Reply(500, "Internal Server Error", {"Content-Type": "text/plain"}))
    plan = plan_delay(WINDOW, DURATION, "aws", "us-west-1", timeout=TIMEOUT)
    assert (plan.reason, plan.delay) == ("source-failed", timedelta(0))
    assert "HTTP 500" in plan.detail


def test_huge_body_is_refused_without_reading_it(backend: str, server: LoopbackServer, clock: FakeClock) -> None:
    sent = {"pieces": 0}

    def counted() -> Iterator[bytes]:
        for piece in _huge(50 * 2**20):
            sent["pieces"] += 1
            yield piece

    server.route("POST", "/v0/schedule/", Reply(200, stream=counted))  # chunked: no size declared up front
    tracemalloc.start()
    try:
        began = time.monotonic()
        plan = plan_delay(WINDOW, DURATION, "aws", "us-west-1", source="carbonaware", timeout=5.0)
        elapsed = time.monotonic() - began
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (plan.reason, plan.delay) == ("source-failed", timedelta(0))
    assert "larger than" in plan.detail
    assert elapsed < 2.0
    assert peak < 16 * 2**20, f"peak {peak / 2**20:.1f} MB while refusing a 50 MB body"
    assert sent["pieces"] < 50  # the server could not deliver it all: the client stopped reading


# --------------------------------------------------------------------------------------------------------------
# Caching: failures briefly, Retry-After as asked, successes for their TTL, one request for many callers
# --------------------------------------------------------------------------------------------------------------


def test_429_is_remembered_for_retry_after(backend: str, server: LoopbackServer, clock: FakeClock) -> None:
    server.route("POST", "/v0/schedule/", Reply(429, {"detail": "Too Many Requests"}, {"Retry-After": "120"}))
    first = plan_delay(WINDOW, DURATION, "aws", "us-west-1", source="carbonaware", timeout=TIMEOUT)
    server.route("POST", "/v0/schedule/", Reply(200, GOOD))  # the server would answer now, but we were told to wait
    second = plan_delay(WINDOW, DURATION, "aws", "us-west-1", source="carbonaware", timeout=TIMEOUT)
    clock.advance(100)
    # a rate limit is the server's, not one zone's: other questions wait too
    other = plan_delay(WINDOW, DURATION, "aws", "eu-west-1", source="carbonaware", timeout=TIMEOUT)
    assert len(server.requests_to("/v0/schedule/")) == 1
    assert first.reason == second.reason == other.reason == "source-failed"
    assert "rate-limited" in second.detail and "120s" in second.detail  # the remembered cause, not a new one
    clock.advance(21)  # once Retry-After has passed, it is asked again
    server.route("POST", "/v0/schedule/", Reply(200, answer(utc(BASE + timedelta(hours=2)))))
    again = plan_delay(WINDOW, DURATION, "aws", "us-west-1", source="carbonaware", timeout=TIMEOUT)
    assert len(server.requests_to("/v0/schedule/")) == 2
    assert again.reason == "optimal"


def test_retry_after_is_honoured_only_within_reason(backend: str, server: LoopbackServer, clock: FakeClock) -> None:
    server.route("POST", "/v0/schedule/", Reply(429, {"detail": "Too Many Requests"}, {"Retry-After": "86400"}))
    plan_delay(WINDOW, DURATION, "aws", "us-west-1", source="carbonaware", timeout=TIMEOUT)
    clock.advance(core.MAX_RETRY_AFTER_SECONDS - 10)
    plan_delay(WINDOW, DURATION, "aws", "us-west-1", source="carbonaware", timeout=TIMEOUT)
    assert len(server.requests_to("/v0/schedule/")) == 1
    clock.advance(20)  # a day-long Retry-After must not switch the library off for a day
    plan_delay(WINDOW, DURATION, "aws", "us-west-1", source="carbonaware", timeout=TIMEOUT)
    assert len(server.requests_to("/v0/schedule/")) == 2


def test_retry_after_as_http_date(backend: str, server: LoopbackServer, clock: FakeClock) -> None:
    from email.utils import format_datetime

    when = format_datetime(clock.now() + timedelta(seconds=90), usegmt=True)
    server.route("POST", "/v0/schedule/", Reply(429, {"detail": "Too Many Requests"}, {"Retry-After": when}))
    plan = plan_delay(WINDOW, DURATION, "aws", "us-west-1", source="carbonaware", timeout=TIMEOUT)
    assert "retry after 90s" in plan.detail


def test_failure_is_remembered_only_briefly(backend: str, server: LoopbackServer, clock: FakeClock) -> None:
    server.route("POST", "/v0/schedule/", Reply(500, "Internal Server Error", {"Content-Type": "text/plain"}))
    assert plan_delay(WINDOW, DURATION, "aws", "us-west-1", source="carbonaware").reason == "source-failed"
    server.route("POST", "/v0/schedule/", Reply(200, answer(utc(BASE + timedelta(hours=1, seconds=30)))))
    clock.advance(core.FAILURE_TTL_SECONDS / 2)
    assert plan_delay(WINDOW, DURATION, "aws", "us-west-1", source="carbonaware").reason == "source-failed"
    assert len(server.requests_to("/v0/schedule/")) == 1  # a blip is not asked again at once...
    clock.advance(core.FAILURE_TTL_SECONDS)
    plan = plan_delay(WINDOW, DURATION, "aws", "us-west-1", source="carbonaware")
    assert len(server.requests_to("/v0/schedule/")) == 2  # ...but it does not disable the library for long
    assert plan.reason == "optimal"


def test_success_is_cached(backend: str, scheduler: HostedScheduler) -> None:
    plans = [plan_delay(WINDOW, DURATION, "aws", "us-west-1") for _ in range(25)]
    assert len(scheduler.calls) == 1
    assert {p.start for p in plans} == {BASE + timedelta(hours=1)}
    # a different duration or window is a different question
    plan_delay(WINDOW, timedelta(hours=1), "aws", "us-west-1")
    plan_delay(timedelta(hours=3), DURATION, "aws", "us-west-1")
    assert len(scheduler.calls) == 3


def test_success_cache_expires(backend: str, scheduler: HostedScheduler, clock: FakeClock) -> None:
    plan_delay(WINDOW, DURATION, "aws", "us-west-1")
    clock.advance(3600)  # an hour later the old decision is stale: ask again
    plan = plan_delay(WINDOW, DURATION, "aws", "us-west-1")
    assert len(scheduler.calls) == 2
    assert plan.start == BASE + timedelta(hours=2)


def test_explicit_now_far_apart_is_not_answered_from_the_cache(backend: str, scheduler: HostedScheduler) -> None:
    """``now=`` plans as if it were that time: a decision made for another time must not be reused."""
    later = BASE + timedelta(hours=3)
    first = plan_delay(WINDOW, DURATION, "aws", "us-west-1", now=BASE)
    second = plan_delay(WINDOW, DURATION, "aws", "us-west-1", now=later)
    assert first.start == BASE + timedelta(hours=1)
    assert second.start == later + timedelta(hours=1)
    assert second.reason == "optimal"


HERD = 1000  # the README's figure: 1,000 threads -> 1 request
HERD_BUDGET = 120.0  # seconds for the whole herd, however loaded the machine; it takes about a second here


def _herd(call: Callable[[], core.Plan]) -> list[core.Plan]:
    """``call`` in HERD threads released at once by a barrier; every thread joined within one overall budget, so a
    stuck herd fails with a count instead of hanging past pytest's timeout (joins of 30 s each, in turn, could)."""
    barrier = threading.Barrier(HERD, timeout=HERD_BUDGET)
    plans: list[core.Plan] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run() -> None:
        try:
            barrier.wait()
            plan = call()
            with lock:
                plans.append(plan)
        except BaseException as exc:
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=run, daemon=True) for _ in range(HERD)]
    try:
        for thread in threads:
            thread.start()
    except RuntimeError:  # "can't start new thread": a thread limit shared with the rest of a busy machine
        barrier.abort()  # the ones started stop waiting for the rest
        raise
    deadline = time.monotonic() + HERD_BUDGET
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    alive = sum(thread.is_alive() for thread in threads)
    assert alive == 0, f"{alive} of {HERD} threads still running after {HERD_BUDGET:g} s"
    assert not errors, errors[:3]
    assert len(plans) == HERD
    return plans


# The clock is a fake that does not move: how long a loaded machine takes to start 1,000 threads must not let a
# cached answer (or a cached failure, 10 s) expire midway, which would rightly make a second request. The requests'
# own timeouts run on the real clock; 60 s leaves room for a slow machine, against a 0.3 s answer.
@pytest.mark.timeout(HERD_BUDGET + 120)
def test_thousand_threads_make_one_request(backend: str, server: LoopbackServer, clock: FakeClock) -> None:
    scheduler = HostedScheduler(server, latency=0.3, clock=clock.time)  # the answer takes a while to come
    plans = _herd(lambda: plan_delay(WINDOW, DURATION, "azure", "westeurope", source="carbonaware", timeout=60.0))
    assert len(scheduler.calls) == 1
    assert {p.reason for p in plans} == {"optimal"}
    assert {p.start for p in plans} == {BASE + timedelta(hours=1)}


@pytest.mark.timeout(HERD_BUDGET + 120)
def test_thousand_threads_share_one_failure(backend: str, server: LoopbackServer, clock: FakeClock) -> None:
    server.route("POST", "/v0/schedule/", Reply(503, "Service Unavailable", {"Content-Type": "text/plain"}, delay=0.2))
    plans = _herd(lambda: plan_delay(WINDOW, DURATION, "azure", "westeurope", source="carbonaware", timeout=60.0))
    assert [p.reason for p in plans] == ["source-failed"] * HERD
    assert len(server.requests_to("/v0/schedule/")) == 1
