"""Where and when (issue 11), attacked: careless zone strings, a source that names another zone than the one asked,
hostile hosted-scheduler answers. Real HTTP servers on 127.0.0.1; the core's clock is a fake one."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

import carbonaware_core as core
from carbonaware_core import plan_delay
from tests.fake_providers import EM_KEY, fake_clock, query_params
from tests.loopback import FakeClock, LoopbackServer, Reply, Seen

UTC = timezone.utc
NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)


@pytest.fixture(autouse=True)
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    return fake_clock(monkeypatch, NOW)


def test_grid_zone_keys_are_read_as_electricity_maps_writes_them() -> None:
    """Electricity Maps zone keys are upper case: "grid:fr" is FR, not a zone no source knows, and not a second
    candidate beside "grid:FR"."""
    assert core.parse_zone("grid:fr") == core.Place(grid="FR")
    assert core.parse_zone(" GRID: us-cal-ciso ") == core.Place(grid="US-CAL-CISO")
    plan = plan_delay(timedelta(hours=12), HOUR, "aws", "eu-west-1", source="offline", now=NOW,
                      zones=["grid:fr", "grid:FR"])  # fmt: skip
    assert [a.zone for a in plan.alternatives] == ["aws:eu-west-1", "grid:FR"]
    assert plan.fallbacks == () and plan.alternatives[1].source == "offline"


class EchoingElectricityMaps:
    """Electricity Maps v3 forecasts by zone key, each answer naming ``answered[zone]`` as its zone (a server may
    name its own alias of the zone asked)."""

    def __init__(self, server: LoopbackServer, values: dict[str, float], answered: dict[str, str]) -> None:
        self.values, self.answered = values, answered
        server.route("GET", "/v3/carbon-intensity/forecast", self.forecast)

    def forecast(self, seen: Seen) -> Reply:
        zone = query_params(seen).get("zone", "")
        if seen.headers.get("auth-token") != EM_KEY or zone not in self.values:
            return Reply(500, "Internal Server Error")
        stamps = [(NOW + HOUR * h).strftime("%Y-%m-%dT%H:00:00.000Z") for h in range(12)]
        items = [{"carbonIntensity": self.values[zone] if h else 500.0, "datetime": s} for h, s in enumerate(stamps)]
        return Reply(200, {"zone": self.answered.get(zone, zone), "forecast": items, "updatedAt": stamps[0]})


def test_a_grid_place_is_named_as_asked_whatever_zone_its_source_names(
    server: LoopbackServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chosen grid place is how the plan's consumers (the CLI's table, the Prefect deployment mapping) find
    the winner: it must be the place asked for, not the source's name for it."""
    monkeypatch.setenv("ELECTRICITYMAPS_API_URL", server.url)
    monkeypatch.setenv("ELECTRICITYMAPS_API_KEY", EM_KEY)
    EchoingElectricityMaps(server, {"IE": 400.0, "DE": 100.0}, answered={"DE": "DE-LU"})
    plan = plan_delay(timedelta(hours=8), HOUR, "aws", "eu-west-1", source="electricitymaps", now=NOW,
                      zones=["grid:DE"])  # fmt: skip
    assert (plan.reason, plan.zone, plan.grid_zone) == ("optimal", None, "DE")
    assert "grid:DE" in core.render_alternatives(plan).split("<- chosen")[0].splitlines()[-1]
