"""Source chains ('a,b', 'auto') and the shared single-flight cache, driven through real loopback providers."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

import carbonaware_core
from tests.fake_providers import (
    CASES,
    EM_KEY,
    HOUR0,
    LBS_PER_MWH_IN_G_PER_KWH,
    NOW,
    Case,
    FakeElectricityMaps,
    FakeGsf,
    FakeNeso,
    Planner,
    fake_clock,
    install,
    oracle,
    path_of,
    query_params,
    series,
    slots,
    valley,
)
from tests.loopback import FakeClock, HostedScheduler, LoopbackServer, Reply

UTC = timezone.utc
WINDOW = timedelta(hours=6)
DURATION = timedelta(minutes=30)
EM_CASE = CASES[0]
by_case = pytest.mark.parametrize("case", CASES, ids=str)


@pytest.fixture(autouse=True)
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    return fake_clock(monkeypatch, NOW)


@pytest.fixture
def em(server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> FakeElectricityMaps:
    return EM_CASE.make(server, monkeypatch)  # type: ignore[no-any-return]


@pytest.fixture
def hosted(server: LoopbackServer, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> HostedScheduler:
    scheduler = HostedScheduler(server, clock=clock.time)
    monkeypatch.setenv("CARBONAWARE_SCHEDULER_BASE_URL", scheduler.base_url)
    return scheduler


@pytest.fixture
def offline_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An offline profile for DE: every month and hour 300, but June 15:00 UTC 120 and 16:00 UTC 150."""
    june = [300.0] * 24
    june[15], june[16] = 120.0, 150.0
    profile = [june if month == 5 else [300.0] * 24 for month in range(12)]
    path = tmp_path / "offline.json"
    path.write_text(json.dumps({"kind": "month-hour-utc", "zones": {"DE": profile}}))
    monkeypatch.setenv("CARBONAWARE_OFFLINE_DATA", str(path))
    return path


PLANNER = Planner(WINDOW, DURATION, {"now": NOW, "provider": "aws", "region": "eu-central-1"})
plan = PLANNER.plan


def delay_logged(
    caplog: pytest.LogCaptureFixture, **options: object
) -> tuple[carbonaware_core.Plan, list[logging.LogRecord]]:
    result, records = PLANNER.delay_logged(caplog, **options)
    return result, [r for r in records if r.levelno >= logging.INFO]


# ---- chains --------------------------------------------------------------------------------------------------


def test_a_chain_falls_through_to_the_next_source(
    em: FakeElectricityMaps, hosted: HostedScheduler, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ELECTRICITYMAPS_API_KEY", "wrong-key")
    result = plan(source="electricitymaps,carbonaware")
    assert len(em.calls) == 1 and len(hosted.calls) == 1
    assert result.source == "carbonaware"
    assert result.reason == "optimal"
    assert result.start == NOW + timedelta(hours=1)  # the hosted scheduler's ideal
    assert result.expected == pytest.approx(500.0 * LBS_PER_MWH_IN_G_PER_KWH)
    assert "electricitymaps" in result.detail and "HTTP 401" in result.detail


def test_the_first_source_that_answers_wins(em: FakeElectricityMaps, hosted: HostedScheduler) -> None:
    result = plan(source="electricitymaps,carbonaware")
    assert result.source == "electricitymaps"
    assert result.start == datetime(2025, 6, 1, 15, 0, tzinfo=UTC)
    assert hosted.calls == []
    assert "after" not in result.detail


def test_a_chain_where_every_source_fails(
    em: FakeElectricityMaps, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    em.fault = Reply(503, "Service Unavailable", {"Content-Type": "text/plain"})
    result, records = delay_logged(caplog, source="electricitymaps,carbonaware")
    assert result.reason == "source-failed" and result.start == NOW
    assert "electricitymaps" in result.detail and "HTTP 503" in result.detail
    assert "carbonaware" in result.detail and "connection refused" in result.detail
    assert len(records) == 1
    assert "HTTP 503" in records[0].getMessage() and "connection refused" in records[0].getMessage()


@pytest.mark.parametrize("spec", ["electricitymaps,carbonaware", "auto"])
def test_why_a_chain_fell_back_reaches_the_log(
    em: FakeElectricityMaps,
    hosted: HostedScheduler,
    offline_model: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    spec: str,
) -> None:
    """The work waits (a later source answered), but the first source is broken: the one line must say so."""
    monkeypatch.setenv("ELECTRICITYMAPS_API_KEY", EM_KEY + "-revoked")
    if spec == "auto":
        hosted.server.route(
            "POST", "/v0/schedule/", Reply(500, "Internal Server Error", {"Content-Type": "text/plain"})
        )
    result, records = delay_logged(caplog, source=spec)
    failed = "electricitymaps" if spec != "auto" else "carbonaware"
    assert result.reason == "optimal" and result.source != failed
    assert failed in result.detail
    assert len(records) == 1
    assert failed in records[0].getMessage() and "HTTP" in records[0].getMessage(), records[0].getMessage()


def test_auto_is_the_hosted_scheduler_first(hosted: HostedScheduler, offline_model: Path) -> None:
    result = plan()  # no source: auto
    assert result.source == "carbonaware"
    assert result.start == NOW + timedelta(hours=1)
    assert len(hosted.calls) == 1
    request = hosted.calls[0].json()
    assert request["zones"] == [{"provider": "aws", "region": "eu-central-1"}]


@pytest.mark.parametrize("hosted_answer", ["refused", "500"])
def test_auto_falls_back_to_the_offline_model(
    server: LoopbackServer, offline_model: Path, monkeypatch: pytest.MonkeyPatch, hosted_answer: str
) -> None:
    if hosted_answer == "500":
        server.route("POST", "/v0/schedule/", Reply(500, "Internal Server Error", {"Content-Type": "text/plain"}))
        monkeypatch.setenv("CARBONAWARE_SCHEDULER_BASE_URL", server.url)
    result = plan(source="auto")
    assert result.source == "offline"
    profile = slots(HOUR0, timedelta(hours=1), [120.0 if h == 3 else 150.0 if h == 4 else 300.0 for h in range(8)])
    expected = oracle([(start, start + timedelta(hours=1), value) for start, value in profile], NOW, WINDOW, DURATION)
    assert result.start == expected.start == datetime(2025, 6, 1, 15, 0, tzinfo=UTC)
    assert result.expected == pytest.approx(120.0)
    assert "carbonaware" in result.detail
    assert ("HTTP 500" if hosted_answer == "500" else "connection refused") in result.detail


def test_auto_without_an_offline_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CARBONAWARE_OFFLINE_DATA", str(tmp_path / "absent.json"))
    result = plan()
    assert result.reason == "source-failed" and result.start == NOW
    assert "carbonaware" in result.detail and "offline" in result.detail


# ---- one fetch per key, however many callers ----------------------------------------------------------------


@by_case
def test_a_thousand_threads_make_one_request(
    case: Case, server: LoopbackServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = case.make(server, monkeypatch)
    callers = 1000
    everyone_in = threading.Event()
    counted = [0]
    count_lock = threading.Lock()

    def hold_until_everyone_asked(_number: int) -> None:
        everyone_in.wait(timeout=20)  # the answer is held while every caller piles up on the fetch in flight

    fake.on_request = hold_until_everyone_asked
    results: list[carbonaware_core.Plan | BaseException] = []
    results_lock = threading.Lock()

    def caller() -> None:
        with count_lock:
            counted[0] += 1
            if counted[0] == callers:
                everyone_in.set()
        try:
            # a generous budget: the answer is held until the last thread has started, which on a loaded
            # machine can take longer than a second
            outcome: carbonaware_core.Plan | BaseException = plan(source=case.name, timeout=30.0, **case.options)
        except BaseException as exc:
            outcome = exc
        with results_lock:
            results.append(outcome)

    threads = [threading.Thread(target=caller) for _ in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert everyone_in.is_set()
    assert len(results) == callers
    assert not [r for r in results if isinstance(r, BaseException)]
    assert len(fake.calls) == 1
    assert len(getattr(fake, "logins", [None])) == 1  # WattTime: one login too
    plans = [r for r in results if isinstance(r, carbonaware_core.Plan)]
    assert {p.detail for p in plans if p.reason != "optimal"} == set()
    assert {(p.source, p.reason, p.start) for p in plans} == {
        (case.name, "optimal", datetime(2025, 6, 1, 15, tzinfo=UTC))
    }


def test_two_hundred_async_callers_make_one_request(server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> None:
    neso = install(
        FakeNeso(server, series(timedelta(minutes=30), HOUR0, HOUR0 + timedelta(hours=48), rising)), monkeypatch
    )

    async def main() -> list[carbonaware_core.Plan]:
        calls = [
            carbonaware_core.carbonaware_delay_async(
                WINDOW, DURATION, source="ukgrid", now=NOW, timeout=5.0, provider="gcp", region="europe-west2"
            )
            for _ in range(200)
        ]
        return await asyncio.gather(*calls)

    plans = asyncio.run(main())
    assert len(neso.calls) == 1
    assert {(p.reason, p.start, p.source) for p in plans} == {("already-best", NOW, "ukgrid")}


def rising(moment: datetime) -> float:
    return 100.0 + (moment - HOUR0) / timedelta(minutes=30)


@by_case
def test_an_entry_is_refreshed_once_its_lifetime_ends(
    case: Case, server: LoopbackServer, monkeypatch: pytest.MonkeyPatch, clock: FakeClock
) -> None:
    fake = case.make(server, monkeypatch)
    ttl = carbonaware_core.SOURCES[case.name].ttl
    settings = {"source": case.name, **case.options}
    first = plan(**settings)
    assert first.start == datetime(2025, 6, 1, 15, 0, tzinfo=UTC)
    fake.points = series(fake.period, case.grid_start, case.grid_start + timedelta(hours=24), rising)
    clock.advance(ttl - 1)
    assert plan(**settings).start == first.start  # still the cached forecast
    assert len(fake.calls) == 1
    clock.advance(2)
    fresh = plan(**settings)
    assert len(fake.calls) == 2
    assert fresh.reason == "already-best" and fresh.start == NOW  # the new forecast rises all day


def test_different_zones_are_different_entries(em: FakeElectricityMaps) -> None:
    plan(source="electricitymaps")
    plan(source="electricitymaps", provider="gcp", region="europe-west2")
    plan(source="electricitymaps")
    assert [query_params(c)["zone"] for c in em.calls] == ["DE", "GB"]


def test_a_rate_limit_holds_for_every_request_to_that_provider(em: FakeElectricityMaps, clock: FakeClock) -> None:
    """Retry-After is the provider's answer to this client, not to one zone or horizon: asking again for a
    different horizon seconds later only draws another 429 (and counts against the quota)."""
    em.fault = Reply(429, {"error": "Too Many Requests"}, {"Retry-After": "120"})
    first = plan(source="electricitymaps")  # 6 h window: horizonHours=24
    assert "HTTP 429" in first.detail
    clock.advance(30)
    second = plan(source="electricitymaps", window=timedelta(hours=2))  # horizonHours=6: another cache key
    assert second.reason == "source-failed"
    assert len(em.calls) == 1, [query_params(c) for c in em.calls]


# ---- a cached answer is reused only for the same request -----------------------------------------------------


def test_gsf_one_whole_forecast_serves_a_short_and_a_long_window(
    server: LoopbackServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SDK is asked for its whole forecast (no time bounds), so a 1 h caller's answer serves a 6 h caller."""
    gsf = install(FakeGsf(server, series(timedelta(minutes=5), NOW, NOW + timedelta(hours=12), valley)), monkeypatch)
    short = plan(source="gsf", provider="azure", region="eastus", window=timedelta(hours=1))
    assert query_params(gsf.calls[0]) == {"location": "eastus"}
    assert short.start + DURATION <= NOW + timedelta(hours=1, minutes=30)
    long = plan(source="gsf", provider="azure", region="eastus", window=WINDOW)
    assert len(gsf.calls) == 1
    assert long.start == oracle(gsf.intervals(), NOW, WINDOW, DURATION).start == datetime(2025, 6, 1, 15, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("case_name", "variable", "value", "check"),
    [
        ("ukgrid", "CARBONAWARE_UK_POSTCODE", "RG10", lambda seen: path_of(seen).endswith("/postcode/RG10")),
        ("gsf", "CARBONAWARE_SDK_LOCATION", "westus", lambda seen: query_params(seen)["location"] == "westus"),
        (
            "electricitymaps",
            "ELECTRICITYMAPS_EMISSION_FACTOR",
            "direct",
            lambda seen: query_params(seen)["emissionFactorType"] == "direct",
        ),
    ],
)
def test_a_setting_that_changes_the_request_is_part_of_the_cache_key(
    server: LoopbackServer,
    monkeypatch: pytest.MonkeyPatch,
    case_name: str,
    variable: str,
    value: str,
    check: object,
) -> None:
    case = next(c for c in CASES if c.name == case_name)
    fake = case.make(server, monkeypatch)
    plan(source=case.name, **case.options)
    monkeypatch.setenv(variable, value)
    plan(source=case.name, **case.options)
    assert len(fake.calls) == 2, f"after {variable} changed, the answer for the old request was reused"
    assert callable(check) and check(fake.calls[1])


# ---- the registry ----------------------------------------------------------------------------------------------


def test_a_registered_source_plugs_into_specs_chains_and_the_cache(
    em: FakeElectricityMaps, monkeypatch: pytest.MonkeyPatch, clock: FakeClock
) -> None:
    """A source registered from outside speaks HTTP to its provider; its cache key and lifetime are honoured."""
    asked: list[carbonaware_core.Query] = []

    def fetch(query: carbonaware_core.Query) -> carbonaware_core.Forecast:
        asked.append(query)
        response = carbonaware_core.http_request(
            "GET",
            f"{em.server.url}/v3/carbon-intensity/forecast?zone={query.arg or 'DE'}",
            headers={"auth-token": EM_KEY},
            timeout=query.timeout,
        )
        document = carbonaware_core.expect_json(response, "mirror")
        points = tuple(
            carbonaware_core.ForecastPoint(
                carbonaware_core.parse_datetime(item["datetime"]),
                carbonaware_core.parse_datetime(item["datetime"]) + timedelta(hours=1),
                float(item["carbonIntensity"]),
            )
            for item in document["forecast"]
        )
        return carbonaware_core.Forecast(points, grid_zone=query.arg or "DE")

    source = carbonaware_core.Source("mirror", fetch, cache_key=lambda q: (q.zone, q.arg), ttl=60.0)
    monkeypatch.setitem(carbonaware_core.SOURCES, "mirror", source)
    monkeypatch.setenv("ELECTRICITYMAPS_API_KEY", "wrong-key")  # the built-in fails: the chain reaches "mirror"

    first = plan(source="electricitymaps,mirror:FR")
    assert first.source == "mirror" and first.grid_zone == "FR"
    assert first.start == datetime(2025, 6, 1, 15, 0, tzinfo=UTC)
    assert "electricitymaps" in first.detail
    assert [q.arg for q in asked] == ["FR"]
    plan(source="mirror:FR")
    assert len(asked) == 1  # cached under the source's own key
    clock.advance(61)
    plan(source="mirror:FR")
    assert len(asked) == 2  # and refreshed after its own lifetime


def test_re_registering_a_name_replaces_the_source(em: FakeElectricityMaps, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(carbonaware_core.SOURCES, "electricitymaps", carbonaware_core.SOURCES["electricitymaps"])

    def nothing(_query: carbonaware_core.Query) -> carbonaware_core.Forecast:
        raise carbonaware_core.SourceError("replaced")

    carbonaware_core.register_source(carbonaware_core.Source("electricitymaps", nothing))
    result = plan(source="electricitymaps")
    assert em.calls == []
    assert result.reason == "source-failed" and "replaced" in result.detail


def test_a_source_that_crashes_is_a_failed_source(monkeypatch: pytest.MonkeyPatch, clock: FakeClock) -> None:
    crashes: list[int] = []

    def broken(_query: carbonaware_core.Query) -> carbonaware_core.Forecast:
        crashes.append(1)
        raise KeyError("forecast")

    monkeypatch.setitem(carbonaware_core.SOURCES, "broken", carbonaware_core.Source("broken", broken, _zone_key))
    result = plan(source="broken")
    assert result.reason == "source-failed" and "KeyError" in result.detail
    plan(source="broken")
    assert len(crashes) == 1  # remembered like any failure
    clock.advance(carbonaware_core.FAILURE_TTL_SECONDS + 1)
    plan(source="broken")
    assert len(crashes) == 2


def _zone_key(query: carbonaware_core.Query) -> object:
    return (query.zone, query.arg)


def test_the_source_can_come_from_the_environment(server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> None:
    neso = install(
        FakeNeso(server, series(timedelta(minutes=30), HOUR0, HOUR0 + timedelta(hours=48), valley)), monkeypatch
    )
    monkeypatch.setenv("CARBONAWARE_SOURCE", "ukgrid:12")
    result = carbonaware_core.plan_delay(WINDOW, DURATION, now=NOW, timeout=5.0, provider="gcp", region="europe-west2")
    assert result.source == "ukgrid"
    assert path_of(neso.calls[0]).endswith("/fw48h/regionid/12")


def test_a_remembered_failure_does_not_pin_its_callers() -> None:
    """The cache re-raises the failure it remembers to every caller. Raising one exception object again and again
    chains each caller's frames onto its traceback: it grows without bound and keeps callers' locals alive."""
    import gc
    import traceback
    import weakref

    class Marker:
        pass

    def down() -> None:
        raise carbonaware_core.SourceError("down")

    def caller() -> tuple[weakref.ref[Marker], int]:
        marker = Marker()
        try:
            carbonaware_core.CACHE.get(("pinning-test",), down, ttl=60.0)
        except carbonaware_core.SourceError as error:
            frames = len(traceback.extract_tb(error.__traceback__))
        return weakref.ref(marker), frames

    depths = [caller()[1] for _ in range(50)]
    last_marker, _ = caller()
    gc.collect()
    assert max(depths) <= depths[0] + 2, f"the traceback grew from {depths[0]} to {max(depths)} frames"
    assert last_marker() is None, "a caller's local is kept alive by the remembered failure"
