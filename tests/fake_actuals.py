"""Loopback emulations of the providers' MEASURED intensity endpoints (protocols.md §2, §4, §7), for the actuals
readers and the live correction: Electricity Maps ``/v3/carbon-intensity/history`` and ``/past-range``, NESO
``/intensity/{from}/{to}`` with ``intensity.actual``. Real HTTP on 127.0.0.1; ``calls`` records the requests."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

import carbonaware_core
from tests.fake_providers import EM_KEY, iso_z, path_of, pattern_route, query_params
from tests.loopback import LoopbackServer, Reply, Seen

UTC = timezone.utc
HOUR = timedelta(hours=1)
HALF = timedelta(minutes=30)


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
