"""Tests that guard promises a deliberate bug used to slip past: every expectation here is a literal, never a
constant read from the module under test (a test that reads the threshold it checks passes for any threshold).

Each test names, in its docstring, the bug it was shown to catch (see the notes of issue 8, item 19)."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

import carbonaware_core as core
from carbonaware_core import ForecastPoint, carbonaware_delay, plan_delay
from tests.fake_providers import fake_clock
from tests.loopback import FakeClock

ROOT = Path(__file__).resolve().parent.parent
BASE = datetime(2025, 6, 1, 12, 0, tzinfo=timezone.utc)
HOUR = timedelta(hours=1)
HALF_HOUR = timedelta(minutes=30)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    return fake_clock(monkeypatch, BASE)


def two_levels(first: datetime, low_from: timedelta, now_value: float, low_value: float) -> list[ForecastPoint]:
    """Ten-minute points over 3 h: ``now_value`` until ``low_from``, ``low_value`` after."""
    step = timedelta(minutes=10)
    return [
        ForecastPoint(first + i * step, first + (i + 1) * step, low_value if i * step >= low_from else now_value)
        for i in range(18)
    ]


# --------------------------------------------------------------------------------------------------------------
# Hooks: every entry point reports through the same place (issue 8, item 17)
# --------------------------------------------------------------------------------------------------------------


def test_plan_delay_calls_on_plan_once_with_the_plan(clock: FakeClock) -> None:
    """Bug caught: plan_delay validating ``on_plan`` but never calling it."""
    seen: list[core.Plan] = []
    plan = plan_delay(
        6 * HOUR, HALF_HOUR, "aws", "us-east-1", source=two_levels(BASE, HOUR, 300, 100), on_plan=seen.append
    )
    assert seen == [plan]
    assert seen[0] is plan
    assert (plan.reason, plan.delay) == ("optimal", HOUR)


def test_plan_delay_with_a_failing_hook_costs_one_warning(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    calls: list[core.Plan] = []

    def broken(plan: core.Plan) -> None:
        calls.append(plan)
        raise RuntimeError("dashboard down")

    with caplog.at_level(logging.INFO, logger="carbonaware"):
        plan = plan_delay(
            6 * HOUR, HALF_HOUR, "aws", "us-east-1", source=two_levels(BASE, HOUR, 300, 100), on_plan=broken
        )
    assert calls == [plan]
    failures = [r for r in caplog.records if "on_plan hook failed" in r.getMessage()]
    assert len(failures) == 1 and failures[0].levelno == logging.WARNING
    assert "RuntimeError: dashboard down" in failures[0].getMessage()


# --------------------------------------------------------------------------------------------------------------
# The 0.1 % negligible-savings rule
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("low_value", "reason", "delay"),
    [
        (1000 * (1 - 0.0005), "already-best", timedelta(0)),  # waiting would save 0.05 %: not worth it
        (1000 * (1 - 0.002), "optimal", HOUR),  # 0.2 %: worth it
    ],
    ids=["saves-0.05%", "saves-0.2%"],
)
def test_savings_below_a_tenth_of_a_percent_are_negligible(low_value: float, reason: str, delay: timedelta) -> None:
    """Bugs caught: a threshold of 0 (the 0.05 % case waits) or of 1 % (the 0.2 % case does not)."""
    source = two_levels(BASE, HOUR, 1000.0, low_value)
    plan = plan_delay(6 * HOUR, HALF_HOUR, "aws", "us-east-1", source=source, now=BASE)
    assert (plan.reason, plan.delay) == (reason, delay)
    if reason == "optimal":
        assert plan.savings == pytest.approx(0.002)
    else:
        assert plan.savings == 0.0 and plan.start == BASE


# --------------------------------------------------------------------------------------------------------------
# The wait: the wall-clock clamp, and short chunks
# --------------------------------------------------------------------------------------------------------------


class SteppedClock(FakeClock):
    """A wall clock stepped forward by ``step`` seconds (NTP, say) the first time planning reads ``now``: the
    plan's own start then lies past the caller's window on the wall clock."""

    def __init__(self, start: datetime, step: float) -> None:
        super().__init__(start)
        self.step: float | None = step

    def now(self) -> datetime:
        if self.step is not None:
            self.advance(self.step)
            self.step = None
        return super().now()


def test_the_wait_never_passes_the_window_on_the_wall_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bug caught: waking at the plan's start without clamping it to ``called + window``."""
    clock = SteppedClock(BASE, step=600.0)
    monkeypatch.setattr(core, "CLOCK", clock)
    # planned at BASE + 10 min: the best start, the window's last moment, is BASE + 70 min
    source = two_levels(BASE, timedelta(minutes=70), 300.0, 100.0)
    plan = carbonaware_delay(HOUR, HALF_HOUR, "aws", "us-east-1", source=source)
    assert (plan.reason, plan.start) == ("optimal", BASE + timedelta(minutes=70))
    assert clock.time() <= BASE.timestamp() + 3600.0  # called at BASE with a 1 h window: awake by BASE + 1 h
    assert clock.time() >= BASE.timestamp() + 3600.0 - 1.0  # and it did wait up to the window's end
    assert sum(clock.sleeps) <= 3000.0 + 1e-6


def test_the_wait_sleeps_in_chunks_of_at_most_a_second(clock: FakeClock) -> None:
    """Bug caught: long sleeps (60 s chunks), which keep task timeouts and cancellation from landing."""
    plan = carbonaware_delay(6 * HOUR, HALF_HOUR, "aws", "us-east-1", source=two_levels(BASE, HOUR, 300, 100))
    assert (plan.reason, plan.delay) == ("optimal", HOUR)
    assert clock.sleeps and max(clock.sleeps) <= 1.0
    assert len(clock.sleeps) >= 3600
    assert clock.time() == BASE.timestamp() + 3600.0


# --------------------------------------------------------------------------------------------------------------
# The outermost fail-open catch of planning
# --------------------------------------------------------------------------------------------------------------


class BrokenMonotonic(FakeClock):
    def monotonic(self) -> float:
        raise RuntimeError("monotonic clock unavailable")


def test_an_error_escaping_every_inner_catch_gives_a_run_now_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bug caught: removing (or narrowing) the last ``except Exception`` in ``_plan``."""
    monkeypatch.setattr(core, "CLOCK", BrokenMonotonic(BASE))
    plan = plan_delay(6 * HOUR, HALF_HOUR, "aws", "us-east-1", source=two_levels(BASE, HOUR, 300, 100))
    assert (plan.reason, plan.delay, plan.start) == ("source-failed", timedelta(0), BASE)
    assert plan.detail.startswith("internal error: RuntimeError")
    assert "monotonic clock unavailable" in plan.detail


class NamelessSource:
    """A callable source whose ``__name__`` raises: labelling it happens outside any one source's catch."""

    @property
    def __name__(self) -> str:
        raise RuntimeError("no name")

    def __call__(self, zone: object, start: datetime, end: datetime) -> list[ForecastPoint]:
        return two_levels(BASE, HOUR, 300, 100)


def test_a_source_that_breaks_outside_its_fetch_gives_a_run_now_plan(clock: FakeClock) -> None:
    plan = plan_delay(6 * HOUR, HALF_HOUR, "aws", "us-east-1", source=NamelessSource())
    assert plan.reason == "source-failed"
    assert "internal error" in plan.detail and "no name" in plan.detail


# --------------------------------------------------------------------------------------------------------------
# The CLI's --json document, whole
# --------------------------------------------------------------------------------------------------------------


def _cli_json(*args: str) -> object:
    done = subprocess.run(
        [sys.executable, "-m", "carbonaware_core", *args],
        cwd=ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_plan_json_is_the_whole_document(tmp_path: Path) -> None:
    """Bug caught: any key dropped, renamed or changed in ``--json`` (``savings`` was dropped unnoticed)."""
    hourly = [320, 300, 280, 95, 260, 300, 330, 340]
    rows = "".join(f"2025-06-01T{12 + i:02d}:00:00Z,{v}\n" for i, v in enumerate(hourly))
    path = tmp_path / "forecast.csv"
    path.write_text("start,value\n" + rows)
    document = _cli_json(
        "plan", "--json", "--quiet", "--source", f"file:{path}", "--now", "2025-06-01T12:00Z", "--provider", "aws",
        "--region", "us-east-1",
    )  # fmt: skip
    assert re.fullmatch(r"[0-9a-f]{16}", document.pop("id"))  # random: links the decision to its outcome
    assert document == {
        "start": "2025-06-01T15:00:00Z",
        "delay_seconds": 10800.0,
        "zone": {"provider": "aws", "region": "us-east-1"},
        "grid_zone": None,
        "source": "file",
        "expected": 95.0,
        "now": 320.0,
        "savings": 0.7031,  # 1 - 95/320, to four places
        "unit": "gCO2eq/kWh",
        "reason": "optimal",
        "detail": "best start in the next 6h00m",
        "duration_seconds": 1800.0,
        "window_seconds": 21600.0,
        "fallbacks": [],
        "signal": "average",
        "power_kw": None,  # not given: no kWh and no grams, never guessed
        "energy_kwh": None,
        "emissions_g": None,
        "emissions_now_g": None,
        "avoided_g": None,
    }


def test_plan_json_when_now_is_best_with_a_grid_zone(tmp_path: Path) -> None:
    rows = "".join(f"2025-06-01T{12 + i:02d}:00:00Z,{100 + 10 * i}\n" for i in range(8))
    path = tmp_path / "forecast.csv"
    path.write_text("start,value\n" + rows)
    document = _cli_json(
        "plan", "--json", "--quiet", "--source", f"file:{path}", "--now", "2025-06-01T12:00Z", "--grid-zone", "DE",
        "--window", "2h", "--duration", "1h", "--power-kw", "2",
    )  # fmt: skip
    assert re.fullmatch(r"[0-9a-f]{16}", document.pop("id"))
    assert document == {
        "start": "2025-06-01T12:00:00Z",
        "delay_seconds": 0.0,
        "zone": None,
        "grid_zone": "DE",
        "source": "file",
        "expected": 100.0,
        "now": 100.0,
        "savings": 0.0,
        "unit": "gCO2eq/kWh",
        "reason": "already-best",
        "detail": "now is already the best time in the window",
        "duration_seconds": 3600.0,
        "window_seconds": 7200.0,
        "fallbacks": [],
        "signal": "average",
        "power_kw": 2.0,
        "energy_kwh": 2.0,  # 2 kW for the 1 h job
        "emissions_g": 200.0,
        "emissions_now_g": 200.0,
        "avoided_g": 0.0,
    }


# --------------------------------------------------------------------------------------------------------------
# The loopback guard of tests/conftest.py (issue 8, item 20)
# --------------------------------------------------------------------------------------------------------------

GUARDED = textwrap.dedent(
    """
    import socket

    import carbonaware_core as core


    def test_connects_beyond_loopback():
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: refused by the guard before any packet leaves
        except OSError:
            pass  # swallowed, as the library's fail-open code would
        finally:
            s.close()


    def test_resolves_a_remote_name():
        try:
            socket.getaddrinfo("carbonaware-guard.invalid", 443)
        except OSError:
            pass


    def test_sends_a_datagram_beyond_loopback():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.sendto(b"x", ("198.51.100.7", 9))
        except OSError:
            pass
        finally:
            s.close()


    def test_the_library_fails_open_but_the_test_fails(monkeypatch):
        monkeypatch.setenv("CARBONAWARE_SCHEDULER_BASE_URL", "http://203.0.113.5:9")
        plan = core.plan_delay(provider="aws", region="us-east-1", source="carbonaware", timeout=2)
        assert plan.reason == "source-failed"


    def test_loopback_is_fine():
        for host in ("127.0.0.1", "localhost", "::1", "127.1.2.3"):
            socket.getaddrinfo(host, 80)
        s = socket.socket()
        try:
            s.connect(("127.0.0.1", 9))
        except OSError:
            pass
        finally:
            s.close()
    """
)


def test_the_loopback_guard_fails_tests_that_reach_beyond_loopback(tmp_path: Path) -> None:
    """Run pytest on a tiny suite under this conftest: every reach beyond loopback fails its test, by name."""
    (tmp_path / "test_reach.py").write_text(GUARDED)
    done = subprocess.run(  # the project's own conftest, loaded as a plugin: the guard under test, not a copy
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", "-p", "tests.conftest", str(tmp_path)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = done.stdout
    assert done.returncode == 1, out + done.stderr
    assert "5 passed, 4 errors" in out, out  # each failed at its teardown, naming what it reached
    for name, host in (
        ("test_connects_beyond_loopback", "192.0.2.1"),
        ("test_resolves_a_remote_name", "carbonaware-guard.invalid"),
        ("test_sends_a_datagram_beyond_loopback", "198.51.100.7"),
        ("test_the_library_fails_open_but_the_test_fails", "203.0.113.5"),
    ):
        section = out.split(f"ERROR at teardown of {name} ", 1)[1].split("\n_", 1)[0]
        assert "test reached beyond loopback: socket." in section and host in section, out
    assert "of test_loopback_is_fine" not in out
