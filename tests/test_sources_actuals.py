"""Measured intensity (``Source.actuals`` / ``fetch_actuals``): Electricity Maps ``/history`` and ``/past-range``,
NESO ``/intensity/{from}/{to}`` actuals, a user's url document and registered readers -- on loopback servers
speaking each provider's wire format (protocols.md §2, §4, §7)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

import carbonaware_core
from carbonaware_core import CloudZone, ForecastPoint, Query, Source, SourceError, fetch_actuals
from tests.fake_providers import (
    EM_KEY,
    assert_no_secrets,
    fake_clock,
    iso_z,
    path_of,
    pattern_route,
    query_params,
)
from tests.loopback import FakeClock, LoopbackServer, Reply, Seen

UTC = timezone.utc
NOW = datetime(2025, 6, 1, 12, 20, tzinfo=UTC)
HOUR0 = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)
HALF = timedelta(minutes=30)
DE = CloudZone("aws", "eu-central-1")
GB = CloudZone("gcp", "europe-west2")


@pytest.fixture(autouse=True)
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    return fake_clock(monkeypatch, NOW)


class EmActuals:
    """Electricity Maps v3 past intensity: ``/history`` (the last 24 hours, free tier included) and
    ``/past-range?start=&end=`` (paid); items ``{"zone","carbonIntensity","datetime","updatedAt",...}``."""

    HISTORY = "/v3/carbon-intensity/history"
    PAST_RANGE = "/v3/carbon-intensity/past-range"

    def __init__(self, server: LoopbackServer, values: dict[datetime, float | None], *, key: str = EM_KEY) -> None:
        self.server, self.values, self.key = server, values, key
        self.calls: list[Seen] = []
        self.fault: Reply | None = None
        self.list_key = "history"
        self.past_range_access = True
        server.route("GET", self.HISTORY, self._history)
        server.route("GET", self.PAST_RANGE, self._past_range)

    def env(self) -> dict[str, str]:
        return {"ELECTRICITYMAPS_API_URL": self.server.url, "ELECTRICITYMAPS_API_KEY": self.key}

    def _items(self, zone: str, first: datetime, last: datetime) -> list[dict[str, Any]]:
        return [
            {
                "zone": zone,
                "carbonIntensity": value,
                "datetime": iso_z(moment, millis=True),
                "updatedAt": iso_z(moment + HOUR, millis=True),
                "createdAt": iso_z(moment - timedelta(days=1), millis=True),
                "emissionFactorType": "lifecycle",
                "isEstimated": False,
                "estimationMethod": None,
            }
            for moment, value in sorted(self.values.items())
            if first < moment + HOUR and moment < last  # every hour overlapping [first, last)
        ]

    def _check(self, seen: Seen) -> Reply | None:
        self.calls.append(seen)
        if seen.headers.get("auth-token") != self.key:
            return Reply(401, {"error": "Invalid auth-token"})
        if self.fault is not None:
            return self.fault
        if "zone" not in query_params(seen):
            return Reply(400, {"error": "zone required"})
        return None

    def _history(self, seen: Seen) -> Reply:
        refused = self._check(seen)
        if refused is not None:
            return refused
        zone = query_params(seen)["zone"]
        now = carbonaware_core.CLOCK.now()
        current = now.replace(minute=0, second=0, microsecond=0)
        return Reply(200, {"zone": zone, self.list_key: self._items(zone, current - timedelta(hours=23), now)})

    def _past_range(self, seen: Seen) -> Reply:
        refused = self._check(seen)
        if refused is not None:
            return refused
        if not self.past_range_access:
            return Reply(401, {"message": "Your plan does not include access to carbon-intensity/past-range"})
        params = query_params(seen)
        first, last = (datetime.fromisoformat(params[k].replace("Z", "+00:00")) for k in ("start", "end"))
        return Reply(200, {"zone": params["zone"], "data": self._items(params["zone"], first, last)})


class NesoActuals:
    """NESO ``GET /intensity/{from}/{to}``: 30-minute items, ``intensity.actual`` filled for the past, null ahead."""

    def __init__(self, server: LoopbackServer, values: dict[datetime, tuple[float | None, float | None]]) -> None:
        self.server, self.values = server, values  # start -> (forecast, actual)
        self.calls: list[Seen] = []
        moment = r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}Z"
        pattern_route(server, "GET", rf"/intensity/(?P<a>{moment})/(?P<b>{moment})", self._answer)

    def env(self) -> dict[str, str]:
        return {"UKGRID_API_URL": self.server.url}

    def _answer(self, seen: Seen) -> Reply:
        self.calls.append(seen)
        a, b = re.findall(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}Z", path_of(seen))
        first, last = (datetime.strptime(t, "%Y-%m-%dT%H:%MZ").replace(tzinfo=UTC) for t in (a, b))
        first = first.replace(minute=0 if first.minute < 30 else 30)
        data = [
            {
                "from": start.strftime("%Y-%m-%dT%H:%MZ"),
                "to": (start + HALF).strftime("%Y-%m-%dT%H:%MZ"),
                "intensity": {"forecast": forecast, "actual": actual, "index": "moderate"},
            }
            for start, (forecast, actual) in sorted(self.values.items())
            if first <= start < last
        ]
        return Reply(200, {"data": data})


def install(fake: EmActuals | NesoActuals, monkeypatch: pytest.MonkeyPatch) -> Any:
    for name, value in fake.env().items():
        monkeypatch.setenv(name, value)
    return fake


def hourly(first: datetime, values: list[float | None]) -> dict[datetime, float | None]:
    return {first + i * HOUR: v for i, v in enumerate(values)}


@pytest.fixture
def em(server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> EmActuals:
    # 36 hours up to NOW's hour: 100, 101, ... (the current hour 12:00 is the last)
    return install(EmActuals(server, hourly(HOUR0 - 35 * HOUR, [100.0 + i for i in range(36)])), monkeypatch)


# ---- Electricity Maps ----------------------------------------------------------------------------------------


def test_history_request_and_points(em: EmActuals) -> None:
    points = fetch_actuals("electricitymaps", DE, NOW - timedelta(hours=6), NOW, timeout=5)
    assert len(em.calls) == 1
    seen = em.calls[0]
    assert path_of(seen) == EmActuals.HISTORY
    assert query_params(seen) == {"zone": "DE", "emissionFactorType": "lifecycle"}
    assert seen.headers["auth-token"] == EM_KEY
    # [06:20, 12:20): the hours from 06:00 through 12:00, each a [t, t + 1 h) average; sorted, none after now
    assert [p.start for p in points] == [HOUR0 - k * HOUR for k in range(6, -1, -1)]
    assert all(p.end - p.start == HOUR for p in points)
    assert [p.value for p in points] == [129.0, 130.0, 131.0, 132.0, 133.0, 134.0, 135.0]


def test_history_accepts_data_as_the_list_key(em: EmActuals) -> None:
    em.list_key = "data"  # protocols.md §7: the list key is unconfirmed
    points = fetch_actuals("electricitymaps", DE, NOW - timedelta(hours=2), NOW)
    assert [p.value for p in points] == [133.0, 134.0, 135.0]


def test_an_explicit_grid_zone_is_asked_for(em: EmActuals) -> None:
    fetch_actuals("electricitymaps", None, NOW - timedelta(hours=2), NOW, grid_zone="FR")
    assert query_params(em.calls[0])["zone"] == "FR"


def test_older_ranges_ask_past_range(em: EmActuals) -> None:
    start, end = NOW - timedelta(hours=34), NOW - timedelta(hours=30)
    points = fetch_actuals("electricitymaps", DE, start, end)
    seen = em.calls[0]
    assert path_of(seen) == EmActuals.PAST_RANGE
    params = query_params(seen)
    assert (params["zone"], params["start"], params["end"]) == ("DE", "2025-05-31T02:20:00Z", "2025-05-31T06:20:00Z")
    assert [p.start for p in points] == [HOUR0 - k * HOUR for k in (34, 33, 32, 31, 30)]


def test_past_range_refused_for_the_plan_names_it_without_the_key(em: EmActuals) -> None:
    em.past_range_access = False
    with pytest.raises(SourceError) as caught:
        fetch_actuals("electricitymaps", DE, NOW - timedelta(days=3), NOW - timedelta(days=2))
    assert "HTTP 401" in str(caught.value) and "past intensity" in str(caught.value)
    assert_no_secrets(str(caught.value))


def test_bad_key_is_a_source_error_without_the_key(em: EmActuals, monkeypatch: pytest.MonkeyPatch) -> None:
    em.key = "ANOTHER-KEY"
    with pytest.raises(SourceError) as caught:
        fetch_actuals("electricitymaps", DE, NOW - timedelta(hours=2), NOW)
    assert "HTTP 401" in str(caught.value)
    assert_no_secrets(str(caught.value))


def test_missing_key_asks_nothing(em: EmActuals, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ELECTRICITYMAPS_API_KEY")
    with pytest.raises(SourceError, match="ELECTRICITYMAPS_API_KEY is not set"):
        fetch_actuals("electricitymaps", DE, NOW - timedelta(hours=2), NOW)
    assert em.calls == []


@pytest.mark.parametrize(
    "reply",
    [
        Reply(200, b"<html>not json</html>"),
        Reply(200, {"zone": "DE"}),
        Reply(200, {"zone": "DE", "history": {"not": "a list"}}),
        Reply(500, b"Internal Server Error"),
        Reply(200, {"zone": "DE", "history": [{"carbonIntensity": 100}]}),
        Reply(200, {"zone": "DE", "history": [{"datetime": "yesterday", "carbonIntensity": 100}]}),
        Reply(200, {"zone": "DE", "history": [{"datetime": "2025-06-01T11:00:00Z", "carbonIntensity": "high"}]}),
    ],
    ids=["html", "no-list", "list-is-object", "500", "no-datetime", "bad-datetime", "value-not-a-number"],
)
def test_garbage_answers_are_source_errors(em: EmActuals, reply: Reply) -> None:
    em.fault = reply
    with pytest.raises(SourceError):
        fetch_actuals("electricitymaps", DE, NOW - timedelta(hours=2), NOW)


@pytest.mark.parametrize("values", [[], [None, None]], ids=["empty", "all-null"])
def test_nothing_measured_is_a_source_error(em: EmActuals, values: list[float | None]) -> None:
    em.values = hourly(HOUR0 - len(values) * HOUR, values)
    with pytest.raises(SourceError, match="no valid measurement published"):
        fetch_actuals("electricitymaps", DE, NOW - timedelta(hours=2), NOW)


def test_null_nan_negative_and_future_values_are_dropped(em: EmActuals) -> None:
    em.values = {
        HOUR0 - 3 * HOUR: 120.0,
        HOUR0 - 2 * HOUR: None,
        HOUR0 - HOUR: -5.0,
        HOUR0: 140.0,
    }
    em.fault = Reply(
        200,
        b'{"zone":"DE","history":['
        b'{"datetime":"2025-06-01T09:00:00.000Z","carbonIntensity":120},'
        b'{"datetime":"2025-06-01T10:00:00.000Z","carbonIntensity":NaN},'
        b'{"datetime":"2025-06-01T11:00:00.000Z","carbonIntensity":-5},'
        b'{"datetime":"2025-06-01T12:00:00.000Z","carbonIntensity":140},'
        b'{"datetime":"2025-06-01T13:00:00.000Z","carbonIntensity":150}]}',
    )
    points = fetch_actuals("electricitymaps", DE, NOW - timedelta(hours=4), NOW)
    assert [(p.start.hour, p.value) for p in points] == [(9, 120.0), (12, 140.0)]


# ---- NESO ----------------------------------------------------------------------------------------------------


@pytest.fixture
def neso(server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> NesoActuals:
    values: dict[datetime, tuple[float | None, float | None]] = {}
    for i in range(-12, 8):  # 06:00 .. 15:30; actuals known until 11:30-12:00, null from 12:00
        start = HOUR0 + i * HALF
        values[start] = (200.0 + i, 150.0 + i if i < 0 else None)
    return install(NesoActuals(server, values), monkeypatch)


def test_neso_actuals_are_the_actual_values(neso: NesoActuals) -> None:
    points = fetch_actuals("ukgrid", GB, NOW - timedelta(hours=2), NOW)
    assert path_of(neso.calls[0]) == "/intensity/2025-06-01T10:20Z/2025-06-01T12:20Z"
    assert [(p.start, p.end, p.value) for p in points] == [
        (HOUR0 + i * HALF, HOUR0 + (i + 1) * HALF, 150.0 + i) for i in (-4, -3, -2, -1)
    ]


def test_neso_without_a_zone_is_national(neso: NesoActuals) -> None:
    assert fetch_actuals("ukgrid", None, NOW - timedelta(hours=1), NOW)


def test_neso_regional_has_no_actuals(neso: NesoActuals, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARBONAWARE_UK_POSTCODE", "RG10")
    with pytest.raises(SourceError, match="nationally only"):
        fetch_actuals("ukgrid", GB, NOW - timedelta(hours=1), NOW)
    assert neso.calls == []


def test_neso_outside_great_britain_asks_nothing(neso: NesoActuals) -> None:
    with pytest.raises(SourceError, match="Great Britain only"):
        fetch_actuals("ukgrid", DE, NOW - timedelta(hours=1), NOW)
    assert neso.calls == []


def test_neso_range_is_bounded(neso: NesoActuals) -> None:
    with pytest.raises(SourceError, match="at most 14 days"):
        fetch_actuals("ukgrid", GB, NOW - timedelta(days=15), NOW)
    assert neso.calls == []


def test_neso_not_published_yet(neso: NesoActuals) -> None:
    with pytest.raises(SourceError, match="no valid measurement published"):
        fetch_actuals("ukgrid", GB, HOUR0, NOW)  # 12:00-12:20: actual still null


# ---- url documents, registered readers, arguments ---------------------------------------------------------------


def test_url_measurements(server: LoopbackServer) -> None:
    document = {"data": [{"start": iso_z(HOUR0 - k * HOUR), "value": 90 + k} for k in range(5, -3, -1)]}
    server.route("GET", "/meter.json", Reply(200, document))
    points = fetch_actuals(f"url:{server.url}/meter.json", None, NOW - timedelta(hours=3), NOW)
    assert [(p.start, p.value) for p in points] == [(HOUR0 - k * HOUR, 90.0 + k) for k in (3, 2, 1, 0)]


def test_url_without_an_address() -> None:
    with pytest.raises(SourceError, match="need an address"):
        fetch_actuals("url", None, NOW - timedelta(hours=3), NOW)


@pytest.fixture
def registered() -> Iterator[list[Query]]:
    asked: list[Query] = []
    yield asked
    carbonaware_core.SOURCES.pop("meter", None)


def test_a_registered_reader_gets_the_question(registered: list[Query]) -> None:
    def reader(query: Query, start: datetime, end: datetime) -> tuple[ForecastPoint, ...]:
        registered.append(query)
        return (ForecastPoint(start, start + HOUR, 123.0), ForecastPoint(start + HOUR, start + 2 * HOUR, math.inf))

    carbonaware_core.register_source(
        Source("meter", lambda q: carbonaware_core.Forecast(()), needs_zone=False, actuals=reader)
    )
    points = fetch_actuals("meter:site-7", DE, NOW - timedelta(hours=3), NOW, grid_zone="DE", timeout=2)
    assert [p.value for p in points] == [123.0]
    (query,) = registered
    assert (query.zone, query.grid_zone, query.arg, query.now, query.timeout) == (DE, "DE", "site-7", NOW, 2.0)


@pytest.mark.parametrize(
    "returned",
    [RuntimeError("boom"), None, 42, [object()], [ForecastPoint(NOW, NOW, 1.0)]],
    ids=["raises", "none", "int", "not-points", "empty-interval"],
)
def test_a_broken_reader_is_a_source_error(registered: list[Query], returned: Any) -> None:
    def reader(query: Query, start: datetime, end: datetime) -> Any:
        if isinstance(returned, Exception):
            raise returned
        return returned

    carbonaware_core.register_source(
        Source("meter", lambda q: carbonaware_core.Forecast(()), needs_zone=False, actuals=reader)
    )
    with pytest.raises(SourceError):
        fetch_actuals("meter", None, NOW - timedelta(hours=3), NOW)


def test_a_source_without_a_reader() -> None:
    with pytest.raises(SourceError, match=r"serves no measured intensity.*electricitymaps.*ukgrid"):
        fetch_actuals("offline", DE, NOW - timedelta(hours=3), NOW)
    with pytest.raises(SourceError, match="serves no measured intensity"):
        fetch_actuals("nosuchsource", DE, NOW - timedelta(hours=3), NOW)


@pytest.mark.parametrize(
    ("source", "start", "end", "timeout"),
    [
        ("electricitymaps", NOW.replace(tzinfo=None), NOW, 5.0),
        ("electricitymaps", NOW, NOW - HOUR, 5.0),
        ("electricitymaps", NOW - HOUR, NOW, 0),
        ("electricitymaps", NOW - HOUR, NOW, True),
        ("a,b", NOW - HOUR, NOW, 5.0),
        ("", NOW - HOUR, NOW, 5.0),
    ],
)
def test_argument_errors_raise(source: str, start: datetime, end: datetime, timeout: float) -> None:
    with pytest.raises(ValueError):
        fetch_actuals(source, DE, start, end, timeout=timeout)


def test_fetch_actuals_is_public() -> None:
    assert "fetch_actuals" in carbonaware_core.__all__
