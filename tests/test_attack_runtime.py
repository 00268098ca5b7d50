"""Runtime promises under attack (issue 8, items 7-10, 12, 13, 18a): bounded file reads, bounded planning work,
elapsed time bounding the wait, replays in any time zone, transient metadata failures, stale cached decisions, and
no report for an async caller cancelled while planning."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

import carbonaware_core as core
from carbonaware_core import ForecastPoint, carbonaware_delay, carbonaware_delay_async, plan_delay
from tests.fake_providers import fake_clock
from tests.loopback import FakeClock, HostedScheduler, LoopbackServer, Reply, Seen, serving

UTC = timezone.utc
BASE = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)
MINUTE = timedelta(minutes=1)
YEAR = timedelta(days=365.25)
SLACK = 2.0  # seconds of scheduling noise allowed on a loaded machine


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    return fake_clock(monkeypatch, BASE)


def series_json(start: datetime, values: list[float], step: timedelta = HOUR) -> bytes:
    return json.dumps(
        [
            {"start": (start + i * step).isoformat(), "end": (start + (i + 1) * step).isoformat(), "value": v}
            for i, v in enumerate(values)
        ]
    ).encode()


def run_bounded(call: Callable[[], Any], limit: float) -> Any:
    """``call()`` in a thread; fails the test (instead of hanging it) if it does not return within ``limit``."""
    outcome: list[Any] = []

    def target() -> None:
        try:
            outcome.append(("ok", call()))
        except BaseException as exc:  # handed back to the test
            outcome.append(("error", exc))

    worker = threading.Thread(target=target, daemon=True)
    began = time.monotonic()
    worker.start()
    worker.join(limit)
    elapsed = time.monotonic() - began
    assert outcome, f"still blocked after {elapsed:.1f}s"
    kind, value = outcome[0]
    if kind == "error":
        raise value
    return value


# ---- 7. the file: source reads only regular files, within the window ------------------------------------------


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "forecast.fifo"
    os.mkfifo(path)
    yield path
    try:  # a reader still blocked in open() (the unfixed code) is released by a writer coming and going
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


def test_a_fifo_without_a_writer_fails_open_within_the_window(fifo: Path) -> None:
    plan = run_bounded(lambda: carbonaware_delay(timedelta(seconds=1), MINUTE, source=f"file:{fifo}"), 1.0 + SLACK)
    assert plan.reason == "source-failed" and plan.delay == timedelta(0)
    assert str(fifo) in plan.detail and "not a regular file" in plan.detail


def test_a_directory_is_refused(tmp_path: Path) -> None:
    plan = plan_delay(HOUR, MINUTE, source=f"file:{tmp_path}", now=BASE)
    assert plan.reason == "source-failed"
    assert "not a regular file (a directory)" in plan.detail


def test_dev_stdin_on_an_open_pipe_does_not_block() -> None:
    """A process whose stdin is a pipe nobody writes to (a daemon, a CI step): file:/dev/stdin is refused at once."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARBONAWARE_")}
    env["PYTHONPATH"] = str(Path(core.__file__).parent)
    script = (
        "import datetime, json, carbonaware_core as c\n"
        "second, minute = datetime.timedelta(seconds=1), datetime.timedelta(minutes=1)\n"
        "p = c.carbonaware_delay(second, minute, source='file:/dev/stdin')\n"
        "print(json.dumps([p.reason, p.detail]))\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True
    )
    try:
        out, _ = child.communicate(timeout=10)  # stdin stays open until the child ends: nothing is ever written
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        pytest.fail("file:/dev/stdin blocked")
    reason, detail = json.loads(out)
    assert reason == "source-failed" and "/dev/stdin" in detail and "not a regular file" in detail


def test_a_regular_file_still_reads(tmp_path: Path) -> None:
    path = tmp_path / "f.json"
    path.write_bytes(series_json(BASE, [300.0, 100.0, 300.0, 300.0]))
    plan = plan_delay(2 * HOUR, timedelta(minutes=30), source=f"file:{path}", now=BASE)
    assert (plan.reason, plan.start) == ("optimal", BASE + HOUR)


def test_a_path_that_hangs_is_abandoned_at_the_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A dead network mount blocks open() itself: the read is left behind at the budget, and is not piled up."""
    release = threading.Event()
    entered = threading.Event()
    real = core._read_regular_file

    def hung(path: str) -> bytes:
        entered.set()
        release.wait(30)
        return real(path)

    monkeypatch.setattr(core, "_read_regular_file", hung)
    path = str(tmp_path / "on-a-dead-mount.json")
    try:
        began = time.monotonic()
        first = plan_delay(HOUR, MINUTE, source=f"file:{path}", now=BASE, timeout=0.5)
        assert time.monotonic() - began < 0.5 + SLACK
        assert entered.is_set() and first.reason == "source-failed" and "no answer within 0.5s" in first.detail
        core.clear_cache()  # the remembered failure aside, a second read of the hung path is not started
        second = plan_delay(HOUR, MINUTE, source=f"file:{path}", now=BASE, timeout=0.5)
        assert "an earlier read of it has not returned" in second.detail
    finally:
        release.set()


# ---- 8. planning work is bounded for any accepted window ----------------------------------------------------------


@pytest.mark.parametrize("years", [100, 7_900])
def test_an_enormous_window_plans_quickly_with_the_offline_profile(years: int) -> None:
    window = years * YEAR
    began = time.perf_counter()
    plan = plan_delay(window, timedelta(minutes=30), "aws", "us-east-1", source="offline", now=BASE)
    elapsed = time.perf_counter() - began
    assert elapsed < 2.0  # measured ~0.1 s; unbounded before (4 s for 100 years, 7,900 never ended)
    assert plan.reason in ("optimal", "already-best") and plan.source == "offline"
    assert plan.window == window  # the caller's window is reported, not the horizon the source was asked
    assert timedelta(0) <= plan.delay <= timedelta(days=367)


def test_a_job_longer_than_a_year_plans_quickly_and_starts_now() -> None:
    began = time.perf_counter()
    plan = plan_delay(10 * YEAR, 50 * YEAR, "aws", "us-east-1", source="offline", now=BASE)
    assert time.perf_counter() - began < 2.0
    assert (plan.reason, plan.delay) == ("already-best", timedelta(0))
    assert plan.duration == 50 * YEAR


def test_a_callable_is_asked_for_at_most_a_year_of_starts() -> None:
    asked: list[tuple[datetime, datetime]] = []

    def series(zone: core.CloudZone | None, start: datetime, end: datetime) -> list[ForecastPoint]:
        asked.append((start, end))
        return [ForecastPoint(start, end, 100.0)]

    plan = plan_delay(1_000 * YEAR, HOUR, "aws", "us-east-1", source=series, now=BASE)
    assert plan.reason == "already-best" and plan.window == 1_000 * YEAR
    (start, end), *_ = asked
    assert start == BASE and end - start <= timedelta(days=367) + HOUR


def test_the_hosted_scheduler_is_asked_for_no_more_than_it_sees(clock: FakeClock, monkeypatch) -> None:
    with serving() as server:
        monkeypatch.setenv("CARBONAWARE_SCHEDULER_BASE_URL", server.url)
        hosted = HostedScheduler(server, clock=clock.time)
        plan = plan_delay(3 * 24 * HOUR, timedelta(minutes=30), "aws", "us-west-1", source="carbonaware")
        assert plan.reason == "optimal" and plan.window == 3 * 24 * HOUR
        (window,) = [call.json()["windows"][0] for call in hosted.calls]
    begin, end = (datetime.fromisoformat(window[k].replace("Z", "+00:00")) for k in ("start", "end"))
    assert end - begin == 24 * HOUR


@pytest.mark.parametrize(
    ("window", "now"),
    [
        (timedelta.max, None),
        (timedelta(days=3_000_000), None),
        (HOUR, datetime(9999, 12, 31, 23, 30, tzinfo=UTC)),
    ],
    ids=["timedelta.max", "8200-years", "now-at-the-end-of-time"],
)
def test_windows_that_would_overflow_are_argument_errors(window: timedelta, now: datetime | None) -> None:
    options = {} if now is None else {"now": now}
    with pytest.raises(ValueError, match="past the year 9999"):
        plan_delay(window, timedelta(minutes=30), "aws", "us-east-1", source="offline", **options)
    with pytest.raises(ValueError, match="past the year 9999"):
        carbonaware_delay(window, timedelta(minutes=30), "aws", "us-east-1", source="offline", **options)


# ---- 9. elapsed (monotonic) time bounds the wait ---------------------------------------------------------------


class SteppingClock(FakeClock):
    """Wall and elapsed time kept apart: ``step()`` moves the wall clock only (an NTP step, a manual fix)."""

    def __init__(self, start: datetime) -> None:
        super().__init__(start)
        self.elapsed = 0.0

    def monotonic(self) -> float:
        with self._lock:
            return self.elapsed

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.t += seconds
            self.elapsed += seconds

    def step(self, seconds: float) -> None:
        with self._lock:
            self.t += seconds


def trough_at(begin: datetime, length: timedelta = 10 * MINUTE) -> Callable[..., list[ForecastPoint]]:
    """A series with one low stretch at a fixed moment (as a real forecast has), high elsewhere."""
    finish = begin + length

    def series(zone: core.CloudZone | None, start: datetime, end: datetime) -> list[ForecastPoint]:
        cuts = sorted({start, end, *(t for t in (begin, finish) if start < t < end)})
        return [ForecastPoint(a, b, 100.0 if begin <= a < finish else 400.0) for a, b in itertools.pairwise(cuts)]

    return series


def stepped_back_after(clock: SteppingClock, seconds: float, step: float) -> Callable[[float], None]:
    slept = [0.0]

    def on_sleep(pause: float) -> None:
        slept[0] += pause
        if slept[0] >= seconds and not getattr(on_sleep, "done", False):
            on_sleep.done = True  # type: ignore[attr-defined]
            clock.step(step)

    return on_sleep


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_a_wall_clock_stepped_back_does_not_stretch_the_wait(monkeypatch, asynchronous: bool) -> None:
    clock = SteppingClock(BASE)
    monkeypatch.setattr(core, "CLOCK", clock)
    clock.on_sleep = stepped_back_after(clock, 300, -3600)  # five minutes in, the wall clock goes back an hour
    args = (30 * MINUTE, 5 * MINUTE, "aws", "us-east-1")
    source = trough_at(BASE + 20 * MINUTE)
    if asynchronous:
        plan = asyncio.run(carbonaware_delay_async(*args, source=source))
        slept = sum(clock.asleeps)
    else:
        plan = carbonaware_delay(*args, source=source)
        slept = sum(clock.sleeps)
    assert plan.delay == 20 * MINUTE
    assert math.isclose(clock.elapsed, 1200.0, abs_tol=1.0)  # the planned 20 minutes, not 1 h 20
    assert slept <= 1800.0


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_re_plans_after_a_step_back_ask_only_for_what_is_left_of_the_window(monkeypatch, asynchronous: bool) -> None:
    clock = SteppingClock(BASE)
    monkeypatch.setattr(core, "CLOCK", clock)
    clock.on_sleep = stepped_back_after(clock, 40 * 60, -20 * 60)  # 40 minutes in, the wall clock goes back 20
    asked: list[tuple[float, timedelta]] = []  # (elapsed seconds, horizon asked)
    trough = trough_at(BASE + 2 * HOUR + 50 * MINUTE)

    def source(zone: core.CloudZone | None, start: datetime, end: datetime) -> list[ForecastPoint]:
        asked.append((clock.elapsed, end - start))
        return trough(zone, start, end)

    args = (3 * HOUR, 5 * MINUTE, "aws", "us-east-1")
    options = {"source": source, "replan": True, "replan_every": 30 * MINUTE}
    if asynchronous:
        asyncio.run(carbonaware_delay_async(*args, **options))
    else:
        carbonaware_delay(*args, **options)
    assert len(asked) >= 3  # the first plan, a re-plan before the step and one after it
    for elapsed, horizon in asked:  # never more than the real time left in the window, plus the job
        assert horizon.total_seconds() <= 3 * 3600 - elapsed + 5 * 60 + 1.0
    assert clock.elapsed <= 3 * 3600 + 1.0


# ---- 10. replays in a daylight-saving zone ---------------------------------------------------------------------

LONDON = ZoneInfo("Europe/London")
DST_NOWS = [
    pytest.param(datetime(2025, 3, 30, 0, 30, tzinfo=LONDON), id="spring-forward"),
    pytest.param(datetime(2025, 10, 26, 0, 30, tzinfo=LONDON), id="fall-back"),
    pytest.param(datetime(2025, 11, 2, 0, 30, tzinfo=ZoneInfo("America/New_York")), id="new-york-fall-back"),
]


@pytest.mark.parametrize("now", DST_NOWS)
def test_a_source_is_asked_for_exactly_the_window_and_the_job(now: datetime) -> None:
    asked: list[tuple[datetime, datetime]] = []

    def series(zone: core.CloudZone | None, start: datetime, end: datetime) -> list[ForecastPoint]:
        asked.append((start, end))
        return [ForecastPoint(start, end, 100.0)]

    plan_delay(6 * HOUR, HOUR, "aws", "us-east-1", source=series, now=now)
    ((start, end),) = asked
    assert start == now
    assert end.timestamp() - start.timestamp() == 7 * 3600


@pytest.mark.parametrize("now", DST_NOWS)
def test_the_delay_never_exceeds_the_window_across_a_clock_change(now: datetime, monkeypatch) -> None:
    """The scheduler's best start lies 6 h 50 min ahead in real time, past a 6 h window: never a 6:50 delay."""
    with serving() as server:
        monkeypatch.setenv("CARBONAWARE_SCHEDULER_BASE_URL", server.url)
        HostedScheduler(server, clock=lambda: now.timestamp(), ideal_after=6 * HOUR + 50 * MINUTE)
        plan = plan_delay(6 * HOUR, 30 * MINUTE, "aws", "us-west-1", source="carbonaware", now=now)
    assert plan.delay <= 6 * HOUR
    assert plan.start.timestamp() <= now.timestamp() + 6 * 3600


@pytest.mark.parametrize("now", DST_NOWS)
def test_the_hosted_scheduler_is_sent_six_real_hours(now: datetime, monkeypatch) -> None:
    with serving() as server:
        monkeypatch.setenv("CARBONAWARE_SCHEDULER_BASE_URL", server.url)
        hosted = HostedScheduler(server, clock=lambda: now.timestamp())
        plan_delay(6 * HOUR, 30 * MINUTE, "aws", "us-west-1", source="carbonaware", now=now)
        (window,) = [call.json()["windows"][0] for call in hosted.calls]
    begin, end = (datetime.fromisoformat(window[k].replace("Z", "+00:00")) for k in ("start", "end"))
    assert (begin, end - begin) == (now, 6 * HOUR)


# ---- 12. a metadata service that fails at first is asked again ---------------------------------------------------

IMDS_TOKEN = "AQAEAFakeImdsV2Token-runtime=="


def imds_reply(method: str, path: str, headers: dict[str, str]) -> tuple[int, str]:
    """EC2 IMDSv2, as tests/test_core_detect.py emulates it: a token by PUT, the region with that token."""
    if method == "PUT" and path == "/latest/api/token":
        return 200, IMDS_TOKEN
    if method == "GET" and path == "/latest/meta-data/placement/region":
        return (200, "eu-west-3") if headers.get("x-aws-ec2-metadata-token") == IMDS_TOKEN else (401, "")
    return 404, "Not Found"


def imds_routes(server: LoopbackServer) -> None:
    for method, path in (("PUT", "/latest/api/token"), ("GET", "/latest/meta-data/placement/region")):

        def answer(seen: Seen, method: str = method, path: str = path) -> Reply:
            status, body = imds_reply(method, path, seen.headers)
            return Reply(status, body, {"Content-Type": "text/plain"})

        server.route(method, path, answer)


def test_a_metadata_service_answering_503_at_first_is_found_once_it_is_up(clock: FakeClock, monkeypatch) -> None:
    with serving() as server:
        monkeypatch.setenv("CARBONAWARE_METADATA_HOST", server.host)
        for method, path in (("PUT", "/latest/api/token"), ("GET", "/latest/meta-data/placement/region")):
            server.route(method, path, Reply(503, "Service Unavailable", {"Content-Type": "text/plain"}))
        assert core.detect_cloud_zone() is None
        imds_routes(server)
        clock.advance(61)  # a minute later, as promised
        assert core.detect_cloud_zone() == core.CloudZone("aws", "eu-west-3")


class ImdsOnPort:
    """An IMDSv2 emulation that can start later on a port chosen now: refused until ``start()``."""

    def __init__(self) -> None:
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()  # nothing listens here yet: connections are refused
        self.requests = 0
        self.httpd: ThreadingHTTPServer | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                return

            def _handle(self) -> None:
                owner.requests += 1
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                headers = {k.lower(): v for k, v in self.headers.items()}
                status, body = imds_reply(self.command, self.path, headers)
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

            do_GET = do_PUT = _handle

        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()


def test_a_refused_metadata_connection_is_asked_again_once_the_network_is_up(clock: FakeClock, monkeypatch) -> None:
    imds = ImdsOnPort()
    monkeypatch.setenv("CARBONAWARE_METADATA_HOST", imds.host)
    try:
        assert core.detect_cloud_zone() is None  # refused: the network is still coming up
        imds.start()
        assert core.detect_cloud_zone() is None  # not hammered: asked again later, not at once
        assert imds.requests == 0
        clock.advance(61)
        assert core.detect_cloud_zone() == core.CloudZone("aws", "eu-west-3")
    finally:
        imds.stop()


def test_a_definite_not_here_is_remembered(clock: FakeClock, monkeypatch) -> None:
    """A server that answers, but is no metadata service (404 everywhere, no GCP header), is not asked again."""
    with serving() as server:
        monkeypatch.setenv("CARBONAWARE_METADATA_HOST", server.host)
        assert core.detect_cloud_zone() is None
        asked = len(server.seen)
        assert asked >= 3
        clock.advance(24 * 3600)
        assert core.detect_cloud_zone() is None
        assert len(server.seen) == asked


def test_why_detection_will_be_retried_is_logged(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG", logger="carbonaware")
    assert core.detect_cloud_zone() is None  # the test set-up points every probe at a refused port
    lines = [r.getMessage() for r in caplog.records if r.name == "carbonaware"]
    assert any("ConnectionRefusedError" in line and "asking again in" in line for line in lines), lines


# ---- 13. a cached decision is reused only while it still answers the caller's question ---------------------------


@pytest.fixture
def hosted(clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> Iterator[HostedScheduler]:
    """The loopback scheduler; the cache lifetime made huge, so that it is never the reason to ask again."""
    monkeypatch.setitem(core.SOURCES, "carbonaware", replace(core.SOURCES["carbonaware"], ttl=1e9))
    with serving() as server:
        monkeypatch.setenv("CARBONAWARE_SCHEDULER_BASE_URL", server.url)
        yield HostedScheduler(server, clock=clock.time, ideal_after=HOUR)


def hosted_plan(**options: Any) -> core.Plan:
    return plan_delay(6 * HOUR, 30 * MINUTE, "aws", "us-west-1", source="carbonaware", **options)


def test_a_decision_whose_start_has_passed_is_not_reused(hosted: HostedScheduler, clock: FakeClock) -> None:
    first = hosted_plan()
    assert (first.reason, first.start) == ("optimal", BASE + HOUR)
    clock.advance(2 * 3600)
    second = hosted_plan()
    assert len(hosted.calls) == 2  # asked again, not the old answer clamped to now
    assert (second.reason, second.start) == ("optimal", BASE + 3 * HOUR)


def test_a_decision_still_ahead_is_reused(hosted: HostedScheduler, clock: FakeClock) -> None:
    hosted_plan()
    clock.advance(30 * 60)
    again = hosted_plan()
    assert len(hosted.calls) == 1
    assert (again.reason, again.start, again.delay) == ("optimal", BASE + HOUR, 30 * MINUTE)


def test_now_is_best_is_not_reused_seconds_later(hosted: HostedScheduler, clock: FakeClock) -> None:
    hosted.ideal_after = timedelta(0)
    assert hosted_plan().reason == "already-best"
    clock.advance(5)
    hosted.ideal_after = HOUR  # the scheduler now has a better start to offer
    later = hosted_plan()
    assert len(hosted.calls) == 2
    assert (later.reason, later.start) == ("optimal", BASE + timedelta(seconds=5) + HOUR)


def test_concurrent_callers_still_share_one_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """Callers that come while a request is in flight share it, even a "now is best" answer; a caller after it
    has come back asks again."""
    with serving() as server:
        monkeypatch.setenv("CARBONAWARE_SCHEDULER_BASE_URL", server.url)
        hosted = HostedScheduler(server, ideal_after=timedelta(0), latency=0.3)  # real clock
        barrier = threading.Barrier(20)
        reasons: list[str] = []
        lock = threading.Lock()

        def call() -> None:
            barrier.wait()
            plan = hosted_plan(timeout=5.0)
            with lock:
                reasons.append(plan.reason)

        threads = [threading.Thread(target=call) for _ in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert reasons == ["already-best"] * 20
        assert len(hosted.calls) == 1
        hosted_plan(timeout=5.0)
        assert len(hosted.calls) == 2


# ---- 18a. an async caller cancelled while planning gets no on_plan --------------------------------------------


def test_an_async_caller_cancelled_during_planning_never_reports(server: LoopbackServer) -> None:
    entered, release = threading.Event(), threading.Event()
    reported: list[core.Plan] = []

    def slow(seen: Seen) -> Reply:
        entered.set()
        release.wait(10)
        return Reply(200, series_json(datetime.now(UTC), [300.0, 100.0, 300.0, 300.0]))

    server.route("GET", "/slow.json", slow)

    async def main() -> None:
        task = asyncio.create_task(
            carbonaware_delay_async(HOUR, MINUTE, source=f"url:{server.url}/slow.json", on_plan=reported.append)
        )
        assert await asyncio.to_thread(entered.wait, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()

    asyncio.run(main())  # asyncio.run waits for the planning thread to finish before it returns
    assert reported == []


def test_an_async_caller_not_cancelled_reports_once(clock: FakeClock) -> None:
    reported: list[core.Plan] = []
    plan = asyncio.run(carbonaware_delay_async(HOUR, MINUTE, source=trough_at(BASE), on_plan=reported.append))
    assert reported == [plan]
