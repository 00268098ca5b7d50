"""Loopback emulations of the forecast providers (/work/shared/protocols.md §2-§5), and a test oracle.

Each fake registers routes on a ``tests.loopback.LoopbackServer`` and answers with the provider's exact wire shape:

- ``FakeElectricityMaps``: ``GET /v3/carbon-intensity/forecast`` with header ``auth-token`` (§2).
- ``FakeWattTime``: ``GET /login`` with HTTP Basic -> ``{"token"}``; ``GET /v3/forecast`` with ``Bearer`` (§3).
- ``FakeNeso``: ``GET /intensity/{from}/fw48h`` and ``/regional/intensity/{from}/fw48h/postcode/{outward}`` |
  ``/regionid/{1..17}``, regional answers as an object (live) or a one-item list (documented) (§4).
- ``FakeGsf``: ``GET /emissions/forecasts/current`` of the Carbon Aware SDK WebAPI (§5).

A fake serves ``points`` -- ``(start, value)`` pairs in its provider's period (EM hourly, WattTime 5 min, NESO
30 min, GSF 5 min); ``None`` is a missing value in the provider's own spelling (``null``). ``calls`` lists the
forecast requests in arrival order; ``script(reply, ...)`` makes the next forecast requests answer those replies,
``fault`` makes every one answer it, ``on_request(n)`` runs before the n-th is answered (change the forecast, hold
the answer), ``clock`` makes "from now" answers start at the provider's current period. Authentication is checked
first, as the providers do. Nothing here mocks urllib or requests.

``Case``/``CASES`` describe the four sources uniformly for parametrised tests; ``reset_server`` lets one server
(started once per module: stopping one costs ~0.5 s) serve many tests.

``oracle()`` is an independent brute-force planner on a one-minute grid (exact arithmetic), used to compute what a
plan must say without calling the library's planner.
"""

from __future__ import annotations

import base64
import math
import re
import socket
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from fractions import Fraction
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.loopback import FakeClock, LoopbackServer, Reply, Seen

UTC = timezone.utc
LBS_PER_MWH_IN_G_PER_KWH = 0.45359237  # 1 lb = 0.45359237 kg, so 1 lb/MWh = 0.45359237 g/kWh

# Distinctive secrets: no log line, plan detail or error text may ever contain them.
EM_KEY = "EM-SECRET-123"
WT_USER = "wt-user-ab"
WT_PASSWORD = "WT-PASSWORD-456"
WT_TOKEN_PREFIX = "WT-TOKEN-789"
WT_BASIC = base64.b64encode(f"{WT_USER}:{WT_PASSWORD}".encode()).decode("ascii")
SECRETS = (EM_KEY, WT_PASSWORD, WT_TOKEN_PREFIX, WT_BASIC)

Point = tuple[datetime, "float | None"]
Interval = tuple[datetime, datetime, "float | None"]


# ----------------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------------


def slots(start: datetime, period: timedelta, values: Iterable[float | None]) -> list[Point]:
    """``(start + i * period, value)`` for each value."""
    return [(start + i * period, value) for i, value in enumerate(values)]


def intervals(points: Iterable[Point], period: timedelta) -> list[Interval]:
    return [(start, start + period, value) for start, value in points]


def iso_z(moment: datetime, millis: bool = False) -> str:
    """'2025-06-01T12:00:00Z' (or '...00.000Z' as Electricity Maps writes it)."""
    text = moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return text + (".000Z" if millis else "Z")


def parse_z(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def query_params(seen: Seen) -> dict[str, str]:
    """The query string as a dict; a parameter sent twice is a protocol error."""
    parsed = parse_qs(urlsplit(seen.path).query, keep_blank_values=True)
    repeated = [name for name, values in parsed.items() if len(values) != 1]
    if repeated:
        raise AssertionError(f"parameters sent more than once: {repeated}")
    return {name: values[0] for name, values in parsed.items()}


def path_of(seen: Seen) -> str:
    return urlsplit(seen.path).path


class PatternRoutes(dict):  # type: ignore[type-arg]
    """LoopbackServer's exact ``(method, path)`` routes, plus regular-expression routes for paths carrying data
    (NESO puts the start time and the postcode into the path)."""

    def __init__(self) -> None:
        super().__init__()
        self.patterns: list[tuple[str, re.Pattern[str], Callable[[Seen], Reply]]] = []

    def get(self, key: Any, default: Any = None) -> Any:
        found = super().get(key)
        if found is not None:
            return found
        method, path = key
        for wanted, pattern, route in self.patterns:
            if wanted == method and pattern.fullmatch(path):
                return route
        return default


def reset_server(server: LoopbackServer) -> LoopbackServer:
    """Forget every route and every recorded request, so one running server can serve many tests.

    Also turns Nagle off on accepted connections: the server writes headers and body separately, and on a
    kept-alive connection (requests reuses them) Nagle plus delayed ACK cost ~40 ms per request.
    """
    server.routes = PatternRoutes()
    with server._lock:
        server.seen.clear()
    if not getattr(server.httpd, "nodelay", False):
        accept = server.httpd.get_request

        def get_request() -> Any:
            connection, address = accept()
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return connection, address

        server.httpd.get_request = get_request  # type: ignore[method-assign]
        server.httpd.nodelay = True  # type: ignore[attr-defined]
    return server


def pattern_route(server: LoopbackServer, method: str, pattern: str, route: Callable[[Seen], Reply]) -> None:
    if not isinstance(server.routes, PatternRoutes):
        routes = PatternRoutes()
        routes.update(server.routes)
        server.routes = routes
    patterns = server.routes.patterns
    patterns[:] = [p for p in patterns if (p[0], p[1].pattern) != (method, pattern)]  # a later fake replaces one
    patterns.append((method, re.compile(pattern), route))


def fake_clock(monkeypatch: Any, start: datetime) -> FakeClock:
    """``carbonaware_core.CLOCK`` replaced by a clock that moves only when the code sleeps or a test advances it."""
    import carbonaware_core

    clock = FakeClock(start)
    monkeypatch.setattr(carbonaware_core, "CLOCK", clock)
    return clock


# ----------------------------------------------------------------------------------------------------------------
# The fakes
# ----------------------------------------------------------------------------------------------------------------


class FakeProvider:
    """Common bookkeeping: recorded forecast requests, scripted faults, the served points."""

    source = ""
    period = timedelta(hours=1)

    def __init__(self, server: LoopbackServer, points: Iterable[Point] = ()) -> None:
        self.server = server
        self.points: list[Point] = list(points)
        self.calls: list[Seen] = []
        self.fault: Reply | None = None
        self.filtering = True  # serve only what the request asked for, as the provider does
        # the provider's own clock: when set, a forecast "from now" starts at the period containing clock()
        # (Electricity Maps, WattTime); otherwise at the first point
        self.clock: Callable[[], datetime] | None = None
        self.served: list[Point] = []  # the points of the last forecast answered
        # called with the request's number (1, 2, ...) before it is answered: change points, set faults, or
        # hold the answer until the test says so
        self.on_request: Callable[[int], None] | None = None
        self._script: list[Reply] = []
        self._lock = threading.Lock()

    def script(self, *replies: Reply) -> None:
        """The next forecast requests answer these replies, in order (after authentication)."""
        with self._lock:
            self._script.extend(replies)

    def env(self) -> dict[str, str]:
        raise NotImplementedError

    def refuse(self, seen: Seen) -> Reply | None:
        """The provider's authentication answer for a bad request, or None."""
        return None

    def answer(self, seen: Seen) -> Reply:
        raise NotImplementedError

    def _forecast(self, seen: Seen) -> Reply:
        with self._lock:
            self.calls.append(seen)
            number = len(self.calls)
        if self.on_request is not None:
            self.on_request(number)
        refused = self.refuse(seen)
        if refused is not None:
            return refused
        with self._lock:
            scripted = self._script.pop(0) if self._script else self.fault
        return scripted if scripted is not None else self.answer(seen)

    def _from_now(self, hours: float) -> list[Point]:
        """``hours`` of points from the period containing the provider's now (or from the first point)."""
        points = self.points
        if not points or not self.filtering:
            return list(points)
        first = points[0][0]
        if self.clock is not None:
            now = self.clock()
            first = first + ((now - first) // self.period) * self.period
        return [p for p in points if first <= p[0] < first + timedelta(hours=hours)]

    def intervals(self) -> list[Interval]:
        """The points configured, as [start, end) intervals."""
        return intervals(self.points, self.period)

    def served_intervals(self) -> list[Interval]:
        """The points of the last answer, as [start, end) intervals."""
        return intervals(self.served, self.period)


class FakeElectricityMaps(FakeProvider):
    """Electricity Maps v3 forecast: hourly gCO2eq/kWh, ``horizonHours`` points from the first one."""

    source = "electricitymaps"
    period = timedelta(hours=1)
    PATH = "/v3/carbon-intensity/forecast"
    NO_ACCESS = "Your plan does not include access to carbon-intensity/forecast"

    def __init__(
        self,
        server: LoopbackServer,
        points: Iterable[Point] = (),
        *,
        key: str = EM_KEY,
        zone: str | None = None,
        forecast_access: bool = True,
    ) -> None:
        super().__init__(server, points)
        self.key, self.zone, self.forecast_access = key, zone, forecast_access
        server.route("GET", self.PATH, self._forecast)

    def env(self) -> dict[str, str]:
        return {"ELECTRICITYMAPS_API_URL": self.server.url, "ELECTRICITYMAPS_API_KEY": self.key}

    def refuse(self, seen: Seen) -> Reply | None:
        if seen.headers.get("auth-token") != self.key:
            return Reply(401, {"error": "Invalid auth-token"})
        if not self.forecast_access:
            return Reply(401, {"message": self.NO_ACCESS})
        return None

    def answer(self, seen: Seen) -> Reply:
        params = query_params(seen)
        if "zone" not in params and not {"dataCenterProvider", "dataCenterRegion"} <= set(params):
            return Reply(400, {"error": "zone, lat/lon or dataCenterProvider/dataCenterRegion required"})
        horizon = int(params.get("horizonHours", "24"))
        if horizon not in (6, 24, 48, 72):
            return Reply(400, {"error": "horizonHours must be one of 6, 24, 48, 72"})
        points = self._from_now(horizon)
        self.served = points
        zone = self.zone or params.get("zone") or "XX"
        body = {
            "zone": zone,
            "forecast": [{"carbonIntensity": value, "datetime": iso_z(start, millis=True)} for start, value in points],
            "updatedAt": iso_z(points[0][0] if points else datetime(2025, 1, 1, tzinfo=UTC), millis=True),
        }
        return Reply(200, body)


class FakeWattTime(FakeProvider):
    """WattTime v3: Basic login -> token; Bearer forecast of MOER in ``units`` over 5-minute periods."""

    source = "watttime"
    period = timedelta(minutes=5)
    SCOPE_ERROR = (
        "Invalid scope. You do not have sufficient access to this resource. Please note that all users are "
        "allowed free access to CAISO_NORTH."
    )

    def __init__(
        self,
        server: LoopbackServer,
        points: Iterable[Point] = (),
        *,
        user: str = WT_USER,
        password: str = WT_PASSWORD,
        regions: Sequence[str] = ("CAISO_NORTH",),
        units: str = "lbs_co2_per_mwh",
    ) -> None:
        super().__init__(server, points)
        self.user, self.password, self.regions, self.units = user, password, set(regions), units
        self.logins: list[Seen] = []
        self.login_fault: Reply | None = None
        self.issued: list[str] = []
        self.valid_tokens: set[str] = set()
        server.route("GET", "/login", self._login)
        server.route("GET", "/v3/forecast", self._forecast)

    def env(self) -> dict[str, str]:
        return {"WATTTIME_API_URL": self.server.url, "WATTTIME_USERNAME": self.user, "WATTTIME_PASSWORD": self.password}

    def invalidate_tokens(self) -> None:
        """Tokens issued so far expire, as WattTime's do after ~30 minutes."""
        with self._lock:
            self.valid_tokens.clear()

    def _login(self, seen: Seen) -> Reply:
        with self._lock:
            self.logins.append(seen)
            if self.login_fault is not None:
                return self.login_fault
            basic = base64.b64encode(f"{self.user}:{self.password}".encode()).decode("ascii")
            if seen.headers.get("authorization") != f"Basic {basic}":
                return Reply(403, {"error": "Forbidden"})
            token = f"{WT_TOKEN_PREFIX}-{len(self.issued) + 1}"
            self.issued.append(token)
            self.valid_tokens.add(token)
        return Reply(200, {"token": token})

    def refuse(self, seen: Seen) -> Reply | None:
        header = seen.headers.get("authorization", "")
        with self._lock:
            valid = header.startswith("Bearer ") and header[len("Bearer ") :] in self.valid_tokens
        if not valid:
            return Reply(401, {"error": "Unauthorized"})
        if query_params(seen).get("region") not in self.regions:
            return Reply(403, {"error": self.SCOPE_ERROR})
        return None

    def answer(self, seen: Seen) -> Reply:
        params = query_params(seen)
        if params.get("signal_type") != "co2_moer":
            return Reply(400, {"error": "signal_type must be co2_moer"})
        horizon = float(params.get("horizon_hours", "24"))
        points = self._from_now(horizon)
        self.served = points
        generated = points[0][0] if points else datetime(2025, 1, 1, tzinfo=UTC)
        body = {
            "data": [{"point_time": start.isoformat(), "value": value} for start, value in points],
            "meta": {
                "data_point_period_seconds": int(self.period.total_seconds()),
                "region": params.get("region"),
                "signal_type": "co2_moer",
                "units": self.units,
                "generated_at": generated.isoformat(),
                "generated_at_period_seconds": 300,
                "model": {"date": "2024-01-01", "type": "binned_regression"},
            },
        }
        return Reply(200, body)


NESO_REGIONS = {
    1: "North Scotland",
    2: "South Scotland",
    3: "North West England",
    4: "North East England",
    5: "Yorkshire",
    6: "North Wales & Merseyside",
    7: "South Wales",
    8: "West Midlands",
    9: "East Midlands",
    10: "East England",
    11: "South West England",
    12: "South England",
    13: "London",
    14: "South East England",
    15: "England",
    16: "Scotland",
    17: "Wales",
}
NESO_POSTCODES = {"RG10": 12, "SW1A": 13, "EH1": 2, "CF10": 7}
_NESO_FROM = r"(?P<from>[^/]+)"


class FakeNeso(FakeProvider):
    """NESO Carbon Intensity API: 48 hours of 30-minute intervals from the one containing ``from``."""

    source = "ukgrid"
    period = timedelta(minutes=30)

    def __init__(self, server: LoopbackServer, points: Iterable[Point] = (), *, regional_shape: str = "object") -> None:
        super().__init__(server, points)
        if regional_shape not in ("object", "list"):
            raise ValueError(regional_shape)
        self.regional_shape = regional_shape
        pattern_route(server, "GET", rf"/intensity/{_NESO_FROM}/fw48h", self._forecast)
        pattern_route(
            server, "GET", rf"/regional/intensity/{_NESO_FROM}/fw48h/(postcode|regionid)/[^/]+", self._forecast
        )

    def env(self) -> dict[str, str]:
        return {"UKGRID_API_URL": self.server.url}

    @staticmethod
    def error(status: int, message: str) -> Reply:
        code = {400: "400 Bad Request", 500: "500 Internal Server Error"}.get(status, str(status))
        return Reply(status, {"error": {"code": code, "message": message}})

    def _items(self, start: datetime, regional: bool) -> list[dict[str, Any]]:
        first = start.replace(minute=0 if start.minute < 30 else 30, second=0, microsecond=0)
        items = []
        self.served = []
        for begin, value in self.points:
            if not self.filtering or first <= begin < first + timedelta(hours=48):
                self.served.append((begin, value))
                intensity: dict[str, Any] = {"forecast": value, "index": _neso_index(value)}
                if not regional:
                    intensity["actual"] = None
                item: dict[str, Any] = {
                    "from": begin.strftime("%Y-%m-%dT%H:%MZ"),
                    "to": (begin + self.period).strftime("%Y-%m-%dT%H:%MZ"),
                    "intensity": intensity,
                }
                if regional:
                    item["generationmix"] = [{"fuel": "wind", "perc": 40.0}, {"fuel": "gas", "perc": 60.0}]
                items.append(item)
        return items

    def answer(self, seen: Seen) -> Reply:
        path = path_of(seen)
        parts = path.strip("/").split("/")
        regional = parts[0] == "regional"
        from_text = parts[2] if regional else parts[1]
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}Z", from_text):
            return self.error(400, "Please enter a valid date in ISO8601 format YYYY-MM-DDThh:mmZ")
        start = datetime.strptime(from_text, "%Y-%m-%dT%H:%MZ").replace(tzinfo=UTC)
        if not regional:
            return Reply(200, {"data": self._items(start, regional=False)})
        kind, key = parts[4], parts[5]
        if kind == "postcode":
            if key not in NESO_POSTCODES:
                return self.error(400, "Please enter a valid outward postcode i.e. RG10")
            region_id = NESO_POSTCODES[key]
        else:
            if not key.isdigit() or int(key) not in NESO_REGIONS:
                return self.error(400, "Please enter a valid region id between 1 and 17")
            region_id = int(key)
        region: dict[str, Any] = {
            "regionid": region_id,
            "dnoregion": f"DNO {region_id}",
            "shortname": NESO_REGIONS[region_id],
            "data": self._items(start, regional=True),
        }
        if kind == "postcode":
            region["postcode"] = key
        return Reply(200, {"data": region if self.regional_shape == "object" else [region]})


def _neso_index(value: float | None) -> str:
    if value is None:
        return "moderate"
    return "very low" if value < 50 else "low" if value < 130 else "moderate" if value < 210 else "high"


class FakeGsf(FakeProvider):
    """Carbon Aware SDK WebAPI ``/emissions/forecasts/current``, replaying the SDK's own processing of the forecast
    it holds (GSF.CarbonAware ForecastHandler.ProcessAndValidateForecast, CarbonAware EmissionsForecast.Validate,
    IntervalHelper.FilterByDuration, EmissionsDataExtensions.RollingAverage in
    Green-Software-Foundation/carbon-aware-sdk):

    - only ``location`` is required; ``dataStartAt`` defaults to the first tick, ``dataEndAt`` to the end of the
      last one, and either outside [first tick, end of last tick] answers 400 (an ``ArgumentException``);
    - ticks are kept if they end at or after ``dataStartAt`` and start at or before ``dataEndAt``;
    - without ``windowSize`` the ticks come back as they are; with ``windowSize=W`` they come back as rolling means:
      one item per tick from ``dataStartAt``, each ``duration`` W minutes, the time-weighted mean over [t, t + W],
      while t + W stays within the data and (after the first) within ``dataEndAt``;
    - ``optimalDataPoints`` are the items with the lowest value.

    ``shape`` 'list' (current servers) or 'object'; ``optimal_key`` 'optimalDataPoints' (current) or
    'optimalDataPoint' (older servers, a single object). ``period`` is the tick length (5 min, as WattTime's)."""

    source = "gsf"
    period = timedelta(minutes=5)
    PATH = "/emissions/forecasts/current"

    def __init__(
        self,
        server: LoopbackServer,
        points: Iterable[Point] = (),
        *,
        shape: str = "list",
        optimal_key: str = "optimalDataPoints",
        period: timedelta | None = None,
    ) -> None:
        super().__init__(server, points)
        self.shape, self.optimal_key = shape, optimal_key
        if period is not None:
            self.period = period
        server.route("GET", self.PATH, self._forecast)

    def env(self) -> dict[str, str]:
        return {"CARBONAWARE_SDK_URL": self.server.url}

    @staticmethod
    def validation_error(field: str, message: str, title: str = "One or more validation errors occurred.") -> Reply:
        return Reply(
            400,
            {
                "type": "https://tools.ietf.org/html/rfc7231#section-6.5.1",
                "title": title,
                "status": 400,
                "errors": {field: [message]},
            },
            {"Content-Type": "application/problem+json"},
        )

    def answer(self, seen: Seen) -> Reply:
        params = query_params(seen)
        if not params.get("location"):
            return self.validation_error("location", "location is not set", "ArgumentException")
        ticks = [(begin, begin + self.period, value) for begin, value in sorted(self.points, key=lambda p: p[0])]
        if not ticks:
            return Reply(500, {"title": "InternalServerError", "status": 500}, {"Content-Type": "application/json"})
        first, last = ticks[0][0], ticks[-1][1]
        try:
            start = parse_z(params["dataStartAt"]) if "dataStartAt" in params else first
            end = parse_z(params["dataEndAt"]) if "dataEndAt" in params else last
            minutes = int(params.get("windowSize", "0"))
        except ValueError:
            return self.validation_error("dataStartAt", "The value is not valid.")
        for name, moment in (("dataStartAt", start), ("dataEndAt", end)):
            if not first <= moment <= last:
                message = f"{name} must be within time range of the forecasted data, '{first}' through '{last}'"
                return self.validation_error(name, message, "ArgumentException")
        if start >= end:
            message = "dataStartAt must be earlier than dataEndAt"
            return self.validation_error("dataStartAt", message, "ArgumentException")
        if self.filtering:
            ticks = [t for t in ticks if t[1] >= start and t[0] <= end]
        items = ticks if minutes <= 0 else rolling_means(ticks, timedelta(minutes=minutes), start, end)
        location = params["location"]
        data = [
            {
                "location": location,
                "timestamp": begin.isoformat(),
                "duration": round((finish - begin).total_seconds() / 60),
                "value": value,
            }
            for begin, finish, value in items
        ]
        self.served = [(parse_z(d["timestamp"]), d["value"]) for d in data]
        numbers = [d for d in data if isinstance(d["value"], (int, float))]
        lowest = min((d["value"] for d in numbers), default=None)
        optimal = [d for d in numbers if d["value"] == lowest]
        document: dict[str, Any] = {
            "generatedAt": iso_z(first),
            "requestedAt": iso_z(first),
            "location": location,
            "dataStartAt": iso_z(start),
            "dataEndAt": iso_z(end),
            "windowSize": minutes or round(self.period.total_seconds() / 60),
        }
        if self.optimal_key == "optimalDataPoint":
            document["optimalDataPoint"] = optimal[0] if optimal else None
        else:
            document["optimalDataPoints"] = optimal
        document["forecastData"] = data
        return Reply(200, [document] if self.shape == "list" else document)


def rolling_means(
    ticks: Sequence[Interval], window: timedelta, data_start: datetime, data_end: datetime
) -> list[Interval]:
    """The SDK's RollingAverage: windows [t, t + window] stepping by the first tick's length from
    max(data_start, first tick), each the time-weighted mean of the ticks it overlaps; a window is yielded only
    when the ticks cover it, and the windows after the first stop once one would end past ``data_end``."""
    if not ticks:
        return []
    step = ticks[0][1] - ticks[0][0]
    begin = max(data_start, ticks[0][0])
    out: list[Interval] = []
    index = 0
    while True:
        finish = begin + window
        if index > 0 and finish > data_end:
            return out
        if finish > ticks[-1][1]:
            return out
        parts = [(max(a, begin), min(b, finish), v) for a, b, v in ticks if b > begin and a < finish]
        if parts and parts[0][0] == begin and all(v is not None for _a, _b, v in parts):
            total = sum(float(v) * (b - a).total_seconds() for a, b, v in parts if v is not None)
            out.append((begin, finish, total / window.total_seconds()))
        begin += step
        index += 1


# ----------------------------------------------------------------------------------------------------------------
# An independent planner: brute force on a one-minute grid with exact fractions
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    """What a plan over a series must say. ``error`` is 'empty', 'stale' or 'not-covering-now' when the series
    cannot be planned over; else ``start`` is the earliest start with the lowest mean over the job."""

    error: str | None = None
    start: datetime | None = None
    mean: Fraction | None = None
    now_mean: Fraction | None = None
    shortened: bool = False

    @property
    def waits(self) -> bool:
        return self.error is None and self.start is not None and self.mean is not None and self.mean < self.now_mean

    def value(self, factor: float = 1.0) -> float:
        assert self.mean is not None
        return float(self.mean) * factor

    def now_value(self, factor: float = 1.0) -> float:
        assert self.now_mean is not None
        return float(self.now_mean) * factor


def oracle(series: Iterable[Interval], now: datetime, window: timedelta, duration: timedelta) -> Expected:
    """Every minute-aligned start in [now, now + window] whose job [s, s + length) is covered, tried one by one.

    Boundaries must lie on whole minutes from ``now``. The documented rules are modelled: invalid values (None,
    negative, NaN) are gaps; a series whose first interval starts after now, by at most its own length, is
    carried back to now; a job longer than the forecast covered from now is compared over the covered part.
    """
    minute = timedelta(minutes=1)

    def offset(moment: datetime) -> int:
        whole, rest = divmod(moment - now, minute)
        if rest:
            raise ValueError(f"{moment} is not on a whole minute from {now}")
        return whole

    valid = sorted((s, e, v) for s, e, v in series if v is not None and math.isfinite(v) and v >= 0 and e > s)
    if not valid:
        return Expected(error="empty")
    if max(e for _, e, _ in valid) <= now:
        return Expected(error="stale")
    by_minute: dict[int, Fraction] = {}
    for s, e, v in valid:
        for m in range(offset(s), offset(e)):
            by_minute.setdefault(m, Fraction(v))
    first_start, first_end, first_value = valid[0]
    if 0 not in by_minute and now < first_start <= now + (first_end - first_start):
        for m in range(0, offset(first_start)):
            by_minute[m] = Fraction(first_value)
    if 0 not in by_minute:
        return Expected(error="not-covering-now")
    covered = 0
    while covered in by_minute:
        covered += 1
    wanted = offset(now + duration)
    length = min(wanted, covered)
    best: tuple[int, Fraction] | None = None
    now_mean: Fraction | None = None
    for s in range(0, offset(now + window) + 1):
        if any(m not in by_minute for m in range(s, s + length)):
            continue
        mean = sum((by_minute[m] for m in range(s, s + length)), Fraction(0)) / length
        if s == 0:
            now_mean = mean
        if best is None or mean < best[1]:
            best = (s, mean)
    assert best is not None and now_mean is not None
    return Expected(start=now + best[0] * minute, mean=best[1], now_mean=now_mean, shortened=length < wanted)


# ----------------------------------------------------------------------------------------------------------------
# Test plumbing shared by the source tests
# ----------------------------------------------------------------------------------------------------------------

NOW = datetime(2025, 6, 1, 12, 20, tzinfo=UTC)  # planning time in the source tests; FakeClock starts here too
HOUR0 = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)  # the hour (and half hour) containing NOW


@dataclass(frozen=True)
class Case:
    """One source as the tests drive it: its fake, where its grid starts for NOW, where it runs, its unit factor
    (to gCO2/kWh) and what it answers an unauthorised request."""

    name: str
    fake: type[FakeProvider]
    grid_start: datetime
    options: dict[str, str]
    factor: float = 1.0
    unauthorized: Any = None

    def __str__(self) -> str:
        return self.name

    def make(self, server: LoopbackServer, monkeypatch: Any, value: Callable[[datetime], float] | None = None) -> Any:
        """The fake, installed, serving ``value`` (default ``valley``) for 24 hours from the grid start."""
        fake = self.fake(server)
        start = self.grid_start
        fake.points = series(fake.period, start, start + timedelta(hours=24), value or valley)
        return install(fake, monkeypatch)


CASES = (
    Case(
        "electricitymaps",
        FakeElectricityMaps,
        HOUR0,
        {"provider": "aws", "region": "eu-central-1"},
        unauthorized={"error": "Invalid auth-token"},
    ),
    Case(
        "watttime",
        FakeWattTime,
        NOW,
        {"provider": "aws", "region": "us-west-1"},
        factor=LBS_PER_MWH_IN_G_PER_KWH,
        unauthorized={"error": "Unauthorized"},
    ),
    Case(
        "ukgrid",
        FakeNeso,
        HOUR0,
        {"provider": "gcp", "region": "europe-west2"},
        unauthorized={"error": {"code": "401 Unauthorized", "message": "Unauthorized"}},
    ),
    Case(
        "gsf",
        FakeGsf,
        NOW,
        {"provider": "azure", "region": "eastus"},
        unauthorized={"type": "about:blank", "title": "Unauthorized", "status": 401},
    ),
)


def valley(moment: datetime) -> float:
    """A forecast with one clearly best hour: 15:00-16:00 on NOW's day; elsewhere 200..240."""
    if HOUR0 + timedelta(hours=3) <= moment < HOUR0 + timedelta(hours=4):
        return 80.0
    return 200.0 + 10 * ((moment - HOUR0) // timedelta(minutes=30) % 5)


def series(period: timedelta, start: datetime, end: datetime, value: Callable[[datetime], float]) -> list[Point]:
    """``value`` sampled at each period start in [start, end)."""
    count = (end - start) // period
    return slots(start, period, [value(start + i * period) for i in range(count)])


def install(fake: FakeProvider, monkeypatch: Any) -> FakeProvider:
    """Point the library at ``fake`` through the provider's environment variables."""
    for name, value in fake.env().items():
        monkeypatch.setenv(name, value)
    return fake


def assert_no_secrets(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, f"a secret ({secret[:6]}...) leaked into: {text[:200]!r}"


def library_lines(records: Iterable[Any]) -> list[Any]:
    """Log records of the library (logger 'carbonaware' and its children)."""
    return [r for r in records if r.name == "carbonaware" or r.name.startswith("carbonaware.")]


@dataclass(frozen=True)
class Planner:
    """``plan_delay`` / ``carbonaware_delay`` with a test module's defaults; keyword options override them."""

    window: timedelta
    duration: timedelta
    defaults: dict[str, Any]

    def _arguments(self, options: dict[str, Any]) -> tuple[timedelta, timedelta, dict[str, Any]]:
        settings = {"timeout": 5.0, **self.defaults, **options}
        return settings.pop("window", self.window), settings.pop("duration", self.duration), settings

    def plan(self, **options: Any) -> Any:
        import carbonaware_core

        window, duration, settings = self._arguments(options)
        return carbonaware_core.plan_delay(window, duration, **settings)

    def delay_logged(self, caplog: Any, **options: Any) -> tuple[Any, list[Any]]:
        """carbonaware_delay on the fake clock (a run-now plan returns at once); the library's log records.
        Asserts that no secret reached any log line, the plan's detail or its dict."""
        import json
        import logging

        import carbonaware_core

        window, duration, settings = self._arguments(options)
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="carbonaware"):
            result = carbonaware_core.carbonaware_delay(window, duration, **settings)
        texts = [r.getMessage() for r in caplog.records]
        assert_no_secrets(*texts, result.detail, repr(result), json.dumps(result.to_dict()))
        return result, library_lines(caplog.records)
