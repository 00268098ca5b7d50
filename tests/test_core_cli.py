"""``python -m carbonaware_core`` as a real subprocess, its environment pointing at servers on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

import carbonaware_core as core
from tests.loopback import HostedScheduler, Reply, serving

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime(2025, 6, 1, 12, 0, tzinfo=timezone.utc)  # a Sunday
HOURLY = [320, 300, 280, 95, 260, 300, 330, 340]  # the trough is the 15:00 hour


def cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "carbonaware_core", *args],
        cwd=ROOT,
        env=dict(os.environ),  # the conftest's isolated environment
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def forecast_file(tmp_path: Path) -> Path:
    path = tmp_path / "forecast.csv"
    rows = [f"{(NOW + timedelta(hours=i)).strftime('%Y-%m-%dT%H:%M:%SZ')},{v}\n" for i, v in enumerate(HOURLY)]
    path.write_text("start,value\n" + "".join(rows))
    return path


@pytest.fixture
def scheduler(monkeypatch: pytest.MonkeyPatch) -> Iterator[HostedScheduler]:
    with serving(poll_interval=0.02) as server:
        monkeypatch.setenv("CARBONAWARE_SCHEDULER_BASE_URL", server.url)
        yield HostedScheduler(server)  # the real clock: the subprocess plans for now


def test_plan_json_from_the_hosted_scheduler(scheduler: HostedScheduler) -> None:
    began = time.time()
    done = cli("plan", "--json", "--provider", "aws", "--region", "us-west-1", "--window", "6h")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["reason"] == "optimal" and plan["source"] == "carbonaware"
    assert plan["zone"] == {"provider": "aws", "region": "us-west-1"}
    assert 3598 <= plan["delay_seconds"] <= 3600
    start = datetime.fromisoformat(plan["start"].replace("Z", "+00:00")).timestamp()
    assert began + 3598 <= start <= time.time() + 3600
    [seen] = scheduler.calls
    assert seen.json()["duration"] == "PT30M"
    assert seen.json()["zones"] == [{"provider": "aws", "region": "us-west-1"}]


def test_plan_prints_a_chart_with_the_start_marked(forecast_file: Path) -> None:
    done = cli("plan", "--source", f"file:{forecast_file}", "--now", "2025-06-01T12:00Z", "--window", "6h")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    marked = [line for line in lines if "<- start" in line]
    assert len(marked) == 1
    assert marked[0].startswith("Sun 15:00") and " 95 " in marked[0]
    assert "2025-06-01T15:00:00Z" in done.stdout  # the decision line names the start
    for hour, value in enumerate(HOURLY[:7]):  # every hour of the window and the job has a row
        assert any(line.startswith(f"Sun {12 + hour}:00") and f" {value} " in line for line in lines)


def test_plan_json_from_a_file(forecast_file: Path) -> None:
    done = cli("plan", "--json", "--quiet", "--source", f"file:{forecast_file}", "--now", "2025-06-01T12:00Z")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert (plan["start"], plan["delay_seconds"], plan["reason"]) == ("2025-06-01T15:00:00Z", 10800, "optimal")
    assert plan["expected"] == 95 and plan["now"] == 320
    assert done.stderr == ""


@pytest.mark.parametrize(
    ("window", "duration", "window_seconds", "duration_seconds"),
    [("6h", "30m", 21600, 1800), ("90m", "1h30m", 5400, 5400), ("PT2H", "PT30M", 7200, 1800), ("1d", "45s", 86400, 45)],
)
def test_durations(forecast_file: Path, window: str, duration: str, window_seconds: int, duration_seconds: int) -> None:
    done = cli(
        "plan",
        "--json",
        "--quiet",
        "--source",
        f"file:{forecast_file}",
        "--now",
        "2025-06-01T12:00Z",
        "--window",
        window,
        "--duration",
        duration,
    )
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert (plan["window_seconds"], plan["duration_seconds"]) == (window_seconds, duration_seconds)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--duration", "soon"], "not a duration: 'soon'"),
        (["--window", "30"], "not a duration: '30'"),
        (["--window=-6h"], "not a duration"),
        (["--provider", "aws"], "provider and region go together"),
        (["--provider", "digitalocean", "--region", "x"], "invalid choice"),
        (["--min-savings", "2"], "min_savings"),
        (["--now", "yesterday"], "--now"),
        (["--source", "wattime"], "unknown source 'wattime'"),
        (["--window", "99999999999d"], "out of range"),
        (["--now", "0001-01-01T00:00+01:00"], "--now"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message(args: list[str], message: str, scheduler: HostedScheduler) -> None:
    done = cli("plan", *args)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""
    assert scheduler.calls == []


def test_run_returns_the_commands_exit_code_after_the_wait(scheduler: HostedScheduler, tmp_path: Path) -> None:
    scheduler.ideal_after = timedelta(seconds=2)  # the window start is whole seconds: a wait of 1-2 s
    stamp = tmp_path / "ran-at"
    code = f"import sys, time; open({str(stamp)!r}, 'w').write(repr(time.time())); sys.exit(3)"
    began = time.time()
    done = cli(
        "run",
        "--json",
        "--provider",
        "aws",
        "--region",
        "us-east-1",
        "--window",
        "1m",
        "--",
        sys.executable,
        "-c",
        code,
    )
    assert done.returncode == 3, done.stderr
    plan = json.loads(done.stdout)
    assert plan["reason"] == "optimal" and 1.0 <= plan["delay_seconds"] <= 2.0
    ran_at = float(stamp.read_text())
    start = datetime.fromisoformat(plan["start"].replace("Z", "+00:00")).timestamp()
    assert ran_at >= start  # the command ran after the planned start, not before
    assert ran_at - began >= 1.0
    assert "waiting" in done.stderr  # the one log line


def test_run_at_once_when_the_source_says_now(tmp_path: Path) -> None:
    path = tmp_path / "flat.json"
    first = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
    path.write_text(
        json.dumps([{"start": (first + timedelta(hours=i)).isoformat(), "value": 100 + 10 * i} for i in range(9)])
    )
    began = time.monotonic()
    done = cli("run", "--source", f"file:{path}", "--", sys.executable, "-c", "import sys; sys.exit(3)")
    assert done.returncode == 3, done.stderr
    assert time.monotonic() - began < 5.0
    assert "already-best" in done.stderr


def test_run_with_a_missing_command(forecast_file: Path) -> None:
    done = cli(
        "run", "--quiet", "--source", f"file:{forecast_file}", "--now", "2025-06-01T15:00Z", "--", "no-such-command-xyz"
    )
    assert done.returncode == 127
    assert "cannot run no-such-command-xyz" in done.stderr


def test_run_when_every_source_fails_still_runs_the_command() -> None:
    done = cli(
        "run",
        "--provider",
        "aws",
        "--region",
        "us-east-1",
        "--source",
        "carbonaware",
        "--",
        sys.executable,
        "-c",
        "print('work done')",
    )
    assert done.returncode == 0
    assert done.stdout.strip() == "work done"
    assert "source-failed" in done.stderr and "connection refused" in done.stderr


# ``python -m carbonaware_core`` with SIGINT handled as Python does by default: a child inherits an ignored SIGINT
# (pytest started by nohup, as a background job, by some CI runners), and Python then installs no handler for it.
CLI_WITH_CTRL_C = [
    sys.executable,
    "-c",
    "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "runpy.run_module('carbonaware_core', run_name='__main__', alter_sys=True)",
]


def test_wait_is_interrupted_by_ctrl_c(scheduler: HostedScheduler) -> None:
    process = subprocess.Popen(
        [*CLI_WITH_CTRL_C, "wait", "--provider", "aws", "--region", "us-east-1"],
        cwd=ROOT,
        env=dict(os.environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        line = process.stderr.readline()  # the plan's log line: it is now waiting an hour
        assert re.search(r"waiting (59m5\ds|1h00m)", line), line
        sent = time.monotonic()
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=10)
        assert time.monotonic() - sent < 2.0
        assert code == 130
        assert "interrupted" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_detect_with_nothing_answering_exits_1() -> None:
    began = time.monotonic()
    done = cli("detect")
    assert done.returncode == 1
    assert done.stdout.strip() == "no cloud zone detected"
    assert time.monotonic() - began < 5.0
    done = cli("detect", "--json")
    assert (done.returncode, done.stdout.strip()) == (1, "null")


def test_detect_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    done = cli("detect")
    assert (done.returncode, done.stdout.strip()) == (0, "aws:eu-west-1")
    done = cli("detect", "--json")
    assert json.loads(done.stdout) == {"provider": "aws", "region": "eu-west-1"}


def test_detect_from_a_metadata_service(monkeypatch: pytest.MonkeyPatch) -> None:
    with serving(poll_interval=0.02) as metadata:
        metadata.route(
            "GET", "/metadata/instance/compute/location", Reply(200, "uksouth", {"Content-Type": "text/plain"})
        )
        monkeypatch.setenv("CARBONAWARE_METADATA_HOST", metadata.host)
        done = cli("detect", "--timeout", "2")
    assert (done.returncode, done.stdout.strip()) == (0, "azure:uksouth")


def test_help_lists_the_commands() -> None:
    done = cli("--help")
    assert done.returncode == 0
    for command in ("plan", "wait", "run", "detect"):
        assert command in done.stdout


# --------------------------------------------------------------------------------------------------------------
# The chart itself
# --------------------------------------------------------------------------------------------------------------


def _points(first: datetime, step: timedelta, values: list[float]) -> list[core.ForecastPoint]:
    return [core.ForecastPoint(first + i * step, first + (i + 1) * step, v) for i, v in enumerate(values)]


@pytest.mark.parametrize(
    ("points", "start"),
    [
        (_points(NOW, timedelta(hours=1), [float(v) for v in HOURLY]), NOW + timedelta(hours=3)),
        (_points(NOW, timedelta(hours=1), [90.0, 300, 300, 300, 300, 300, 300, 300]), NOW),  # already best
        (_points(NOW, timedelta(hours=1), [400.0, 390, 380, 370, 360, 350, 340, 30]), NOW + timedelta(hours=6)),
        (
            _points(NOW, timedelta(minutes=5), [300.0 - (150 if 40 <= i < 46 else 0) for i in range(96)]),
            NOW + timedelta(minutes=200),
        ),  # dense: several points per row
        # a forecast that starts a few minutes after now (the first value is carried back to now)
        (_points(NOW + timedelta(minutes=7), timedelta(hours=1), [100.0, 300, 300, 300, 300, 300, 300, 300]), NOW),
    ],
    ids=["hourly", "already-best", "window-end", "dense-5-minute", "series-starting-7-minutes-after-now"],
)
def test_chart_marks_the_start_exactly_once(points: list[core.ForecastPoint], start: datetime) -> None:
    plan = core.plan_delay(timedelta(hours=6), timedelta(minutes=30), "aws", "us-east-1", source=points, now=NOW)
    assert plan.start == start
    chart = core.render_chart(plan).splitlines()
    marked = [line for line in chart if line.endswith("<- start")]
    assert len(marked) == 1, "\n".join(chart)
    assert len(chart) <= 25  # a header and at most 24 rows


def test_chart_without_a_series() -> None:
    plan = core.plan_delay(timedelta(hours=6), timedelta(minutes=30), "aws", "us-east-1", source=[], now=NOW)
    assert "<- start" not in core.render_chart(plan)


@pytest.mark.parametrize("command", ["plan", "wait"])
def test_quiet_means_nothing_on_stderr(command: str) -> None:
    done = cli(
        command,
        "--quiet",
        "--json",
        "--source",
        "file:/nonexistent/forecast.csv",
        "--provider",
        "aws",
        "--region",
        "us-east-1",
    )
    assert done.returncode == 0
    assert done.stderr == ""
    assert json.loads(done.stdout)["reason"] == "source-failed"


def test_plan_leaves_its_decision_to_stdout_and_other_warnings_to_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARBONAWARE_SOURCE", "nosuch")  # a set-up warning: stderr
    args = ["--source", "file:/nonexistent/forecast.csv", "--provider", "aws", "--region", "us-east-1"]
    done = cli("plan", *args)
    assert done.returncode == 0
    assert "source-failed" in done.stdout
    assert "source-failed" not in done.stderr  # the decision is printed once, not again as a warning
    done = cli("plan", "--provider", "aws", "--region", "us-east-1", "--window", "1h")
    assert "ignoring CARBONAWARE_SOURCE" in done.stderr
