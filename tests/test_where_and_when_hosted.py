"""Where and when (issue 11) against real HTTP servers on 127.0.0.1: the hosted scheduler asked once with every
zone and window, mixed sources per zone, a zone whose sources fail, units that disagree."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

import carbonaware_core as core
from carbonaware_core import CloudZone, plan_delay
from tests.fake_providers import EM_KEY, FakeWattTime, fake_clock, query_params, slots
from tests.loopback import FakeClock, LoopbackServer, Reply, Seen, fastapi_422

UTC = timezone.utc
NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
STEP = timedelta(minutes=5)
LBS = 0.45359237


@pytest.fixture(autouse=True)
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    return fake_clock(monkeypatch, NOW)


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


class ManyZoneScheduler:
    """``POST /v0/schedule/`` for several zones and windows, as the real server plans: for each zone and window,
    starts every 5 minutes from the window's start to its end, scored by the mean MOER (lbs/MWh) over the job;
    ``ideal`` the lowest, ``options`` the first ``num_options`` by intensity, ``naive_case`` the first window's start
    in the first zone. Validation as the server's: windows start >= its now - 5 min and before their end, zones in
    its enums."""

    def __init__(self, server: LoopbackServer, clock: FakeClock, moer: dict[str, Callable[[datetime], float]]) -> None:
        self.server, self.clock, self.moer = server, clock, moer
        server.route("POST", "/v0/schedule/", self.schedule)

    @property
    def calls(self) -> list[Seen]:
        return self.server.requests_to("/v0/schedule/")

    def score(self, zone: str, start: datetime, duration: timedelta) -> float:
        steps = max(1, math.floor(duration / STEP))
        return sum(self.moer[zone](start + k * STEP) for k in range(steps)) / steps

    def schedule(self, seen: Seen) -> Reply:
        document = seen.json()
        duration = core.parse_duration(document["duration"])
        windows = [(parse(w["start"]), parse(w["end"])) for w in document["windows"]]
        for index, (start, end) in enumerate(windows):
            if start.timestamp() < self.clock.time() - 300:
                return fastapi_422(["body", "windows", index], "Value error, start time must not be in the past")
            if not start < end:
                return fastapi_422(["body", "windows", index], "Value error, start must be before end")
        zones = document["zones"]
        for zone in zones:
            if zone["region"] not in core.SCHEDULER_REGIONS.get(zone["provider"], frozenset()):
                return fastapi_422(["body", "zones", 0, "region"], "Input should be ... enum[AwsRegion]")
        scored = []
        for zone in zones:
            name = f"{zone['provider']}:{zone['region']}"
            for start, end in windows:
                at = start
                while at <= end:
                    scored.append((self.score(name, at, duration), at, zone))
                    at += STEP
        scored.sort(key=lambda item: (item[0], item[1]))

        def option(item: tuple[float, datetime, dict[str, str]]) -> dict[str, object]:
            return {"time": iso(item[1]), "zone": item[2], "co2_intensity": item[0]}

        naive = (self.score(f"{zones[0]['provider']}:{zones[0]['region']}", windows[0][0], duration), windows[0][0])
        return Reply(
            200,
            {
                "ideal": option(scored[0]),
                "options": [option(item) for item in scored[: document["num_options"]]],
                "worst_case": option(scored[-1]),
                "naive_case": option((naive[0], naive[1], zones[0])),
                "median_case": option(scored[len(scored) // 2]),
                "carbon_savings": {"vs_worst_case": 1.0, "vs_naive_case": 1.0, "vs_median_case": 1.0},
            },
        )


def dip(at: datetime, low: float, high: float = 900.0) -> Callable[[datetime], float]:
    """``low`` for the hour around ``at`` (12 five-minute points), ``high`` elsewhere."""
    return lambda moment: low if abs(moment - at) < timedelta(minutes=30) else high


ZONES = ["aws:eu-north-1", "gcp:europe-west1", "grid:FR"]
WINDOWS = [(NOW - timedelta(hours=1), NOW + timedelta(hours=2)), (NOW + timedelta(hours=3), NOW + timedelta(hours=9))]


def test_the_hosted_scheduler_is_asked_once_with_every_zone_and_window(
    server: LoopbackServer, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CARBONAWARE_SCHEDULER_BASE_URL", server.url)
    north_dip, home_dip = NOW + timedelta(hours=4), NOW + timedelta(hours=1)
    scheduler = ManyZoneScheduler(
        server,
        clock,
        {
            "aws:eu-west-1": dip(home_dip, 200.0),
            "aws:eu-north-1": dip(north_dip, 100.0),
            "gcp:europe-west1": dip(NOW, 900.0),
        },
    )
    plan = plan_delay(timedelta(hours=6), timedelta(minutes=30), "aws", "eu-west-1", zones=ZONES, windows=WINDOWS)
    [seen] = scheduler.calls  # one request, for every zone it serves
    sent = seen.json()
    assert sent["zones"] == [
        {"provider": "aws", "region": "eu-west-1"},
        {"provider": "aws", "region": "eu-north-1"},
        {"provider": "gcp", "region": "europe-west1"},
    ]
    assert sent["windows"] == [  # intersected with [now, now + window]
        {"start": iso(NOW), "end": iso(NOW + timedelta(hours=2))},
        {"start": iso(NOW + timedelta(hours=3)), "end": iso(NOW + timedelta(hours=6))},
    ]
    assert sent["duration"] == "PT30M"
    # the lowest 30-minute mean over both windows and all zones: eu-north-1, the dip's first half hour
    assert (plan.reason, plan.zone, plan.source) == ("optimal", CloudZone("aws", "eu-north-1"), "carbonaware")
    assert plan.start == north_dip - timedelta(minutes=25)  # points from 15:35 are low: 15:35 .. 16:05 all 100
    assert plan.expected == pytest.approx(100.0 * LBS)
    assert plan.now == pytest.approx(900.0 * LBS)  # eu-west-1 at once (the naive case)
    assert plan.savings == pytest.approx(1 - 100 / 900)
    [home, north, west1, france] = plan.alternatives
    assert (home.zone, home.start, home.mean) == (
        "aws:eu-west-1",
        home_dip - timedelta(minutes=25),
        pytest.approx(200 * LBS),
    )
    assert plan.time_savings == pytest.approx(1 - 200 / 900)
    assert "time only, in aws:eu-west-1: -77.8%" in core.describe(plan)
    assert north.zone == "aws:eu-north-1" and north.start == plan.start
    # gcp europe-west1 is worse than every option the scheduler listed: no start of its own, and no other source
    assert (west1.start, west1.source) == (None, "carbonaware") and "not among" in west1.note
    # grid:FR has no cloud zone: the offline model answers it, in average g/kWh, not the marginal MOER: left out
    assert (france.zone, france.source) == ("grid:FR", "offline")
    assert "not comparable" in france.note and "grid:FR left out" in plan.detail
    assert plan.to_dict()["alternatives"][3]["note"] == france.note
    # the next plan for the same question is served by the cache: still one request
    plan_delay(timedelta(hours=6), timedelta(minutes=30), "aws", "eu-west-1", zones=ZONES, windows=WINDOWS)
    assert len(scheduler.calls) == 1


def test_a_home_zone_outside_the_hosted_options_still_gives_the_baseline(
    server: LoopbackServer, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CARBONAWARE_SCHEDULER_BASE_URL", server.url)
    scheduler = ManyZoneScheduler(
        server, clock, {"aws:eu-west-1": lambda m: 700.0, "aws:eu-north-1": dip(NOW + timedelta(hours=2), 100.0)}
    )
    plan = plan_delay(timedelta(hours=6), timedelta(minutes=30), "aws", "eu-west-1", zones=["aws:eu-north-1"],
                      min_savings=0.5)  # fmt: skip
    assert len(scheduler.calls) == 1
    assert (plan.reason, plan.zone, plan.now) == ("optimal", CloudZone("aws", "eu-north-1"), pytest.approx(700 * LBS))
    assert plan.savings == pytest.approx(1 - 100 / 700)  # against the home zone at once, above min_savings
    assert plan.alternatives[0].start is None and plan.time_savings is None
    assert plan.fallbacks == ()  # not a failure: the offline model was not asked


class ZonedElectricityMaps:
    """Electricity Maps v3 forecasts by zone key (hourly gCO2eq/kWh); zones not listed answer HTTP 500, as an
    outage does. ``together``: requests wait until that many are in flight at once (a barrier, not a sleep)."""

    def __init__(self, server: LoopbackServer, values: dict[str, list[float]], together: int = 1) -> None:
        self.values = values
        self.calls: list[str] = []
        self.barrier = threading.Barrier(together, timeout=5) if together > 1 else None
        server.route("GET", "/v3/carbon-intensity/forecast", self.forecast)

    def forecast(self, seen: Seen) -> Reply:
        zone = query_params(seen).get("zone", "")
        self.calls.append(zone)
        if self.barrier is not None:
            self.barrier.wait()  # raises BrokenBarrierError if the zones were asked one after the other
        if seen.headers.get("auth-token") != EM_KEY:
            return Reply(401, {"error": "Invalid auth-token"})
        if zone not in self.values:
            return Reply(500, "Internal Server Error")
        items = [
            {"carbonIntensity": value, "datetime": (NOW + timedelta(hours=h)).strftime("%Y-%m-%dT%H:00:00.000Z")}
            for h, value in enumerate(self.values[zone])
        ]
        return Reply(200, {"zone": zone, "forecast": items, "updatedAt": iso(NOW)})


@pytest.fixture
def em_env(server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ELECTRICITYMAPS_API_URL", server.url)
    monkeypatch.setenv("ELECTRICITYMAPS_API_KEY", EM_KEY)


@pytest.fixture
def offline_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """SE-SE3: 60 every hour but 18:00 UTC (30)."""
    day = [60.0] * 24
    day[18] = 30.0
    path = tmp_path / "offline.json"
    path.write_text(json.dumps({"kind": "month-hour-utc", "zones": {"SE-SE3": [day] * 12}}))
    monkeypatch.setenv("CARBONAWARE_OFFLINE_DATA", str(path))
    core._OFFLINE.clear()
    return path


IE = [300.0, 280.0, 250.0, 90.0, 200.0, 300.0, 300.0, 300.0, 300.0, 300.0, 300.0, 300.0]


def test_mixed_sources_per_zone_fetched_at_once(server: LoopbackServer, em_env: None, offline_model: Path) -> None:
    em = ZonedElectricityMaps(server, {"IE": IE}, together=2)  # both zones' requests must be in flight together
    plan = plan_delay(timedelta(hours=8), timedelta(hours=1), "aws", "eu-west-1", source="electricitymaps,offline",
                      now=NOW, zones=["aws:eu-north-1"])  # fmt: skip
    assert sorted(em.calls) == ["IE", "SE-SE3"]
    [ireland, sweden] = plan.alternatives
    assert (ireland.source, ireland.start, ireland.mean) == ("electricitymaps", NOW + timedelta(hours=3), 90.0)
    assert (sweden.source, sweden.start, sweden.mean) == ("offline", NOW + timedelta(hours=6), 30.0)
    assert (plan.zone, plan.grid_zone, plan.source) == (CloudZone("aws", "eu-north-1"), "SE-SE3", "offline")
    assert plan.start == NOW + timedelta(hours=6) and plan.savings == pytest.approx(0.9)
    assert plan.time_savings == pytest.approx(0.7)
    assert any(f.startswith("aws:eu-north-1: electricitymaps:") for f in plan.fallbacks)  # why offline answered


def test_a_zone_whose_sources_fail_is_skipped_and_named(server: LoopbackServer, em_env: None) -> None:
    ZonedElectricityMaps(server, {"IE": IE})
    plan = plan_delay(timedelta(hours=8), timedelta(hours=1), "aws", "eu-west-1", source="electricitymaps", now=NOW,
                      zones=["aws:eu-north-1"])  # fmt: skip
    assert (plan.reason, plan.zone, plan.start, plan.expected) == (
        "optimal", CloudZone("aws", "eu-west-1"), NOW + timedelta(hours=3), 90.0,
    )  # fmt: skip
    [failure] = plan.fallbacks
    assert failure.startswith("aws:eu-north-1: electricitymaps:") and "500" in failure
    assert plan.alternatives[1].start is None and "500" in plan.alternatives[1].note
    assert "aws:eu-north-1" in core.describe(plan)


def test_all_zones_failing_fails_open_at_the_earliest_allowed_start(server: LoopbackServer, em_env: None) -> None:
    ZonedElectricityMaps(server, {})
    window = (NOW + timedelta(hours=2), NOW + timedelta(hours=4))
    plan = plan_delay(timedelta(hours=8), timedelta(hours=1), "aws", "eu-west-1", source="electricitymaps", now=NOW,
                      zones=["aws:eu-north-1"], windows=[window])  # fmt: skip
    assert plan.reason == "source-failed" and len(plan.fallbacks) == 2
    assert plan.start == window[0] and plan.waits  # never outside the caller's windows


def test_units_that_disagree_are_not_compared(
    server: LoopbackServer, em_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    ZonedElectricityMaps(server, {"IE": IE})
    lows = [1.0] * 12 * 8  # WattTime MOER for Sweden, 5-minute lbs/MWh: lower than any g/kWh above, but marginal
    watttime = FakeWattTime(server, slots(NOW, STEP, lows), regions=("SE",))
    for name, value in watttime.env().items():
        monkeypatch.setenv(name, value)
    plan = plan_delay(timedelta(hours=6), timedelta(hours=1), "aws", "eu-west-1", source="electricitymaps,watttime",
                      now=NOW, zones=["aws:eu-north-1"])  # fmt: skip
    assert len(watttime.calls) == 1  # Sweden fell back to WattTime, which answered
    assert (plan.zone, plan.expected, plan.unit) == (CloudZone("aws", "eu-west-1"), 90.0, core.G_PER_KWH)
    sweden = plan.alternatives[1]
    assert (sweden.source, sweden.unit) == ("watttime", "gCO2/kWh (marginal)")
    assert "not comparable" in sweden.note
    assert "aws:eu-north-1 left out: watttime gives gCO2/kWh (marginal), not comparable with gCO2eq/kWh" in plan.detail


def test_an_unknown_zone_is_an_argument_error_before_any_request(server: LoopbackServer, em_env: None) -> None:
    em = ZonedElectricityMaps(server, {"IE": IE})
    with pytest.raises(ValueError, match="unknown provider 'aws-eu'"):
        plan_delay(timedelta(hours=6), timedelta(hours=1), "aws", "eu-west-1", source="electricitymaps", now=NOW,
                   zones=["aws-eu:west-1"])  # fmt: skip
    assert em.calls == []


def test_windows_beyond_the_hosted_schedulers_day_are_not_sent_and_the_plan_says_so(
    server: LoopbackServer, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CARBONAWARE_SCHEDULER_BASE_URL", server.url)
    scheduler = ManyZoneScheduler(server, clock, {"aws:eu-west-1": dip(NOW + timedelta(hours=5), 100.0, 400.0)})
    tonight = (NOW + timedelta(hours=4), NOW + timedelta(hours=8))
    later = (NOW + timedelta(hours=30), NOW + timedelta(hours=33))  # past its ~24 h of data
    plan = plan_delay(timedelta(hours=40), timedelta(minutes=30), "aws", "eu-west-1", windows=[tonight, later])
    [seen] = scheduler.calls
    assert seen.json()["windows"] == [{"start": iso(tonight[0]), "end": iso(tonight[1])}]
    assert plan.start == NOW + timedelta(hours=4, minutes=35) and plan.source == "carbonaware"
    assert "looks only 24h00m ahead" in plan.detail
