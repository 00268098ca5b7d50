"""The bounds the library promises under awkward timing: shared fetches, rate limits, slow servers, replays."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest

import carbonaware_core as core
from tests.fake_providers import FakeNeso, fake_clock, install, slots
from tests.loopback import FakeClock, HostedScheduler, LoopbackServer, Reply

UTC = timezone.utc
NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
WINDOW = timedelta(hours=6)
DURATION = timedelta(minutes=30)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    return fake_clock(monkeypatch, NOW)


def series_json(start: datetime, values: list[float]) -> list[dict[str, object]]:
    hour = timedelta(hours=1)
    return [
        {"start": (start + i * hour).isoformat(), "end": (start + (i + 1) * hour).isoformat(), "value": v}
        for i, v in enumerate(values)
    ]


# ---- a cache key never lets an answer reach a caller it does not fit -------------------------------------------


def test_a_cached_british_forecast_is_never_served_to_another_zone(
    server: LoopbackServer, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    neso = install(
        FakeNeso(server, slots(NOW, timedelta(minutes=30), [200.0] * 8 + [50.0] * 4 + [200.0] * 90)), monkeypatch
    )
    british = core.plan_delay(WINDOW, DURATION, "gcp", "europe-west2", source="ukgrid", now=NOW)
    assert british.reason == "optimal" and british.start == NOW + timedelta(hours=4)
    american = core.plan_delay(WINDOW, DURATION, "aws", "us-east-1", source="ukgrid", now=NOW)
    assert american.reason == "source-failed" and american.delay == timedelta(0)
    assert "Great Britain only" in american.detail and "US-MIDA-PJM" in american.detail
    assert len(neso.calls) == 1


def test_a_replay_is_not_answered_with_a_live_decision(server: LoopbackServer, clock: FakeClock, monkeypatch) -> None:
    hosted = HostedScheduler(server, clock=clock.time)
    monkeypatch.setenv("CARBONAWARE_SCHEDULER_BASE_URL", server.url)
    core.plan_delay(WINDOW, DURATION, "aws", "us-west-1", source="carbonaware")
    core.plan_delay(WINDOW, DURATION, "aws", "us-west-1", source="carbonaware", now=NOW - timedelta(minutes=1))
    core.plan_delay(WINDOW, DURATION, "aws", "us-west-1", source="carbonaware")
    assert len(hosted.calls) == 2  # live, then the replay apart; the second live call is served from the cache


# ---- redaction happens before a quote is cut ---------------------------------------------------------------------


@pytest.mark.parametrize("client", ["requests", "urllib"])
def test_a_key_echoed_across_the_quote_limit_is_not_half_printed(
    server: LoopbackServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, client: str
) -> None:
    key = "emk_0123456789abcdefghijklmnopqrstuv"
    body = '{"error": "Invalid auth-token: the token you sent (' + key + ') is not valid for this zone"}'
    assert body.index(key) < 80 < body.index(key) + len(key)  # the key straddles the excerpt's cut
    server.route("GET", "/v3/carbon-intensity/forecast", Reply(401, body))
    monkeypatch.setenv("CARBONAWARE_HTTP_CLIENT", client)
    monkeypatch.setenv("ELECTRICITYMAPS_API_URL", server.url)
    monkeypatch.setenv("ELECTRICITYMAPS_API_KEY", key)
    with caplog.at_level("DEBUG", logger="carbonaware"):
        plan = core.carbonaware_delay(WINDOW, DURATION, "aws", "eu-central-1", source="electricitymaps", now=NOW)
    assert plan.reason == "source-failed" and "HTTP 401" in plan.detail
    texts = [plan.detail, *(r.getMessage() for r in caplog.records)]
    for piece in (key[i : i + 8] for i in range(len(key) - 7)):
        assert not any(piece in text for text in texts), piece


# ---- re-planning many waiting tasks costs one request, like planning them did ----------------------------------


def test_waiting_tasks_replan_with_one_shared_request(server: LoopbackServer, clock: FakeClock, monkeypatch) -> None:
    hosted = HostedScheduler(server, clock=clock.time, ideal_after=timedelta(hours=5))
    monkeypatch.setenv("CARBONAWARE_SCHEDULER_BASE_URL", server.url)
    waiters = []
    for _ in range(50):
        request = core.validate_arguments(WINDOW, DURATION, "aws", "us-west-1", {"source": "carbonaware"})
        plan = core._plan(request)
        assert plan.reason == "optimal"
        waiters.append(core._Waiter(request, plan, clock.time()))
        clock.advance(0.003)  # tasks of one .map() start milliseconds apart
    assert len(hosted.calls) == 1
    clock.advance(core.REPLAN_EVERY.total_seconds())
    for waiter in waiters:
        assert waiter.replan_due()
        waiter.replan()
    assert len(hosted.calls) == 2


# ---- a rate limit holds back requests, not answers already in hand -----------------------------------------------


def test_a_rate_limit_elsewhere_does_not_refuse_a_cached_answer(server: LoopbackServer, clock: FakeClock) -> None:
    server.route("GET", "/de.json", Reply(200, series_json(NOW, [300.0, 250.0, 100.0, 300.0, 300.0, 300.0, 300.0])))
    server.route("GET", "/fr.json", Reply(429, {"error": "slow down"}, {"Retry-After": "60"}))
    first = core.plan_delay(WINDOW, DURATION, source=f"url:{server.url}/de.json", now=NOW)
    limited = core.plan_delay(WINDOW, DURATION, source=f"url:{server.url}/fr.json", now=NOW)
    again = core.plan_delay(WINDOW, DURATION, source=f"url:{server.url}/de.json", now=NOW)
    assert first.reason == again.reason == "optimal" and again.start == NOW + timedelta(hours=2)
    assert limited.reason == "source-failed" and "HTTP 429" in limited.detail  # not "no-zone": url needs none
    assert len(server.requests_to("/de.json")) == 1


def test_sources_that_need_no_zone_do_not_probe_for_one(
    monkeypatch: pytest.MonkeyPatch, server: LoopbackServer
) -> None:
    monkeypatch.setenv("CARBONAWARE_METADATA_HOST", server.host)
    server.route("GET", "/f.json", Reply(200, series_json(NOW, [300.0] * 8)))
    plan = core.plan_delay(WINDOW, DURATION, source=f"url:{server.url}/f.json", now=NOW)
    assert plan.reason == "already-best"
    assert [s.path for s in server.seen] == ["/f.json"]  # no metadata request at all


# ---- detection: a slow start-up is not remembered forever --------------------------------------------------------


def test_a_metadata_service_too_slow_at_first_is_asked_again_later(
    server: LoopbackServer, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CARBONAWARE_METADATA_HOST", server.host)
    answer = {"Metadata-Flavor": "Google", "Content-Type": "application/text"}
    path = "/computeMetadata/v1/instance/zone"
    server.route("GET", path, Reply(200, "projects/1/zones/europe-west1-b", answer, delay=0.6))
    assert core.detect_cloud_zone() is None
    server.route("GET", path, Reply(200, "projects/1/zones/europe-west1-b", answer))
    assert core.detect_cloud_zone() is None  # not asked again at once: a slow service is not hammered
    clock.advance(core.DETECT_RETRY_SECONDS + 1)
    assert core.detect_cloud_zone() == core.CloudZone("gcp", "europe-west1")
    clock.advance(10 * core.DETECT_RETRY_SECONDS)
    server.route("GET", path, Reply(404, "gone", answer))
    assert core.detect_cloud_zone() == core.CloudZone("gcp", "europe-west1")  # an answer is kept for good


# ---- the request budget is total, whatever the server trickles -----------------------------------------------------


@pytest.fixture
def trickling_headers() -> Iterator[str]:
    """A server that sends a status line, then one header line every 0.2 s, for ever."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                try:
                    conn.recv(65536)
                    conn.sendall(b"HTTP/1.1 200 OK\r\n")
                    for i in range(90):
                        if stop.wait(0.2):
                            return
                        conn.sendall(f"X-Slow-{i}: yes\r\n".encode())
                except OSError:
                    continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/"
    stop.set()
    thread.join(2)
    listener.close()


@pytest.mark.parametrize("client", ["requests", "urllib"])
def test_trickled_headers_cannot_stretch_the_budget(trickling_headers: str, client: str) -> None:
    started = time.monotonic()
    with pytest.raises(core.SourceError, match="timeout"):
        core.http_request("GET", trickling_headers, timeout=0.5, backend=client)
    assert time.monotonic() - started < 1.0


# ---- the shared cache: followers keep their own budget, fetches under way survive eviction -----------------------


def test_a_follower_waits_no_longer_than_its_own_budget() -> None:
    cache = core.SingleFlightCache()
    release = threading.Event()
    leader = threading.Thread(target=lambda: cache.get("k", lambda: release.wait(5) and "slow answer", ttl=60))
    leader.start()
    try:
        while "k" not in cache._entries:
            time.sleep(0.001)
        started = time.monotonic()
        with pytest.raises(core.SourceError, match="waiting for a request another caller made"):
            cache.get("k", lambda: "never asked", ttl=60, wait=0.2)
        assert time.monotonic() - started < 0.6
    finally:
        release.set()
        leader.join(5)
    assert cache.get("k", lambda: "never asked", ttl=60) == "slow answer"


def test_eviction_never_drops_a_fetch_under_way() -> None:
    cache = core.SingleFlightCache(max_entries=2)
    release, calls = threading.Event(), []

    def slow() -> str:
        calls.append("slow")
        release.wait(5)
        return "slow answer"

    leader = threading.Thread(target=lambda: cache.get("busy", slow, ttl=60))
    leader.start()
    while "busy" not in cache._entries:
        time.sleep(0.001)
    for key in ("a", "b", "c"):
        cache.get(key, lambda key=key: key, ttl=60)
    assert "busy" in cache._entries and len(cache._entries) <= 3
    release.set()
    leader.join(5)
    assert cache.get("busy", slow, ttl=60) == "slow answer" and calls == ["slow"]


# ---- planning, too, ends with the window ------------------------------------------------------------------------


def test_a_chain_of_slow_sources_stops_when_the_window_is_spent(clock: FakeClock, monkeypatch) -> None:
    """Each source gets what is left of the window as its budget; once it is spent, the rest are not asked."""
    budgets: dict[str, float] = {}

    def slow(name: str, minutes: float):
        def fetch(query: core.Query) -> core.Forecast:
            budgets[name] = query.budget()
            clock.advance(minutes * 60)  # a request that took this long, then failed
            raise core.SourceError("no answer (timeout)")

        return fetch

    for name, minutes in (("first", 50), ("second", 20), ("third", 1)):
        monkeypatch.setitem(core.SOURCES, name, core.Source(name, slow(name, minutes), cache_key=None))
    plan = core.carbonaware_delay(
        timedelta(hours=1), DURATION, "aws", "us-east-1", source="first,second,third", timeout=300
    )
    assert budgets == {"first": 300.0, "second": 300.0}  # 10 minutes were left for the second: its timeout fits
    assert plan.reason == "source-failed" and clock.sleeps == []
    assert plan.detail.endswith("second: no answer (timeout); third: no time left in the window")


def test_a_source_is_never_given_more_than_the_window_left(clock: FakeClock, monkeypatch) -> None:
    seen: list[float] = []

    def fetch(query: core.Query) -> core.Forecast:
        seen.append(query.budget())
        raise core.SourceError("down")

    monkeypatch.setitem(core.SOURCES, "probe", core.Source("probe", fetch, cache_key=None))
    core.plan_delay(timedelta(seconds=3), DURATION, "aws", "us-east-1", source="probe", timeout=10)
    assert seen == [3.0]


def test_a_live_chain_of_black_holes_returns_within_the_window(monkeypatch) -> None:
    """Real sockets and the real clock: two sources that never answer cost the window, not two timeouts."""
    with socket.create_server(("127.0.0.1", 0), backlog=16) as hole:  # accepts, never answers
        url = f"http://127.0.0.1:{hole.getsockname()[1]}"
        monkeypatch.setenv("CARBONAWARE_SCHEDULER_BASE_URL", url)
        monkeypatch.setenv("UKGRID_API_URL", url)
        began = time.monotonic()
        plan = core.carbonaware_delay(
            timedelta(seconds=1), DURATION, "aws", "eu-west-2", source="carbonaware,ukgrid", timeout=30
        )
        elapsed = time.monotonic() - began
    assert plan.reason == "source-failed" and plan.delay == timedelta(0)
    assert elapsed < 10  # one window (1 s) and thread hand-offs; before the fix, two 30 s timeouts


def test_a_failure_only_a_short_window_caused_is_not_served_to_others(clock: FakeClock, monkeypatch) -> None:
    """A caller with a minute to spare times out; the next caller, with hours, asks again and gets its answer."""
    calls: list[float] = []

    def fetch(query: core.Query) -> core.Forecast:
        calls.append(query.budget())
        if len(calls) == 1:
            clock.advance(query.budget())  # the request used all the time this caller had
            raise core.SourceError("no answer (timeout)")
        return core.Forecast(
            tuple(
                core.ForecastPoint(
                    NOW + i * timedelta(hours=1), NOW + (i + 1) * timedelta(hours=1), 100.0 if i == 3 else 300.0
                )
                for i in range(8)
            )
        )

    shared = core.Source("shared", fetch, cache_key=lambda query: "one key for every window")
    monkeypatch.setitem(core.SOURCES, "shared", shared)
    hurried = core.plan_delay(timedelta(minutes=1), DURATION, "aws", "us-east-1", source="shared", timeout=300)
    assert hurried.reason == "source-failed" and calls == [60.0]
    patient = core.plan_delay(WINDOW, DURATION, "aws", "us-east-1", source="shared", timeout=300)
    assert patient.reason == "optimal" and len(calls) == 2


def test_a_failure_of_the_source_itself_is_remembered(clock: FakeClock, monkeypatch) -> None:
    calls: list[float] = []

    def fetch(query: core.Query) -> core.Forecast:
        calls.append(query.budget())
        raise core.SourceError("HTTP 500")

    monkeypatch.setitem(core.SOURCES, "flaky", core.Source("flaky", fetch, cache_key=lambda query: "k"))
    for window in (timedelta(minutes=1), WINDOW):
        assert core.plan_delay(window, DURATION, "aws", "us-east-1", source="flaky").reason == "source-failed"
    assert len(calls) == 1  # remembered for FAILURE_TTL_SECONDS, whoever asked first
