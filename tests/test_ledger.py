"""Issue 10: grams on every plan, the ledger file (appends, damage), the CLI's --power-kw/--ledger and `report`."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import carbonaware_core as core
from carbonaware_core import ForecastPoint

UTC = timezone.utc
NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)
ROOT = Path(__file__).resolve().parent.parent


def two_level(high: float = 400.0, low: float = 100.0) -> list[ForecastPoint]:
    """``high`` for two hours from NOW, then ``low`` for ten: the best 1 h job starts at NOW + 2 h."""
    return [ForecastPoint(NOW + i * HOUR, NOW + (i + 1) * HOUR, high if i < 2 else low) for i in range(12)]


def plan(**options: Any) -> core.Plan:
    settings: dict[str, Any] = {"source": two_level(), "now": NOW, "grid_zone": "DE"}
    settings.update(options)
    return core.plan_delay(timedelta(hours=6), HOUR, **settings)


# ---- grams arithmetic ---------------------------------------------------------------------------------------


def test_grams_on_the_plan_from_power_and_duration() -> None:
    result = plan(power_kw=2.5)
    assert result.start == NOW + 2 * HOUR
    assert result.energy_kwh == pytest.approx(2.5)
    assert result.emissions_now_g == pytest.approx(400.0 * 2.5)
    assert result.emissions_g == pytest.approx(100.0 * 2.5)
    assert result.avoided_g == pytest.approx(300.0 * 2.5)
    data = result.to_dict()
    assert data["power_kw"] == 2.5 and data["energy_kwh"] == 2.5
    assert (data["emissions_now_g"], data["emissions_g"], data["avoided_g"]) == (1000.0, 250.0, 750.0)
    assert data["signal"] == "average" and data["id"] == result.id and len(result.id) == 16


def test_no_power_no_grams_never_guessed() -> None:
    data = plan().to_dict()
    assert data["power_kw"] is None
    for name in ("energy_kwh", "emissions_g", "emissions_now_g", "avoided_g"):
        assert data[name] is None


def test_failed_plan_has_energy_but_no_grams() -> None:
    result = plan(power_kw=1.0, source=lambda *_: (_ for _ in ()).throw(RuntimeError("down")))
    assert result.reason == "source-failed"
    assert result.energy_kwh == pytest.approx(1.0)
    assert result.emissions_g is None and result.avoided_g is None


def test_the_log_line_says_grams(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="carbonaware"):
        plan(power_kw=2.0)
    line = next(r.getMessage() for r in caplog.records if getattr(r, "carbonaware_decision", False))
    assert "2 kWh: 800 -> 200 g (average, avoids 600 g)" in line


@pytest.mark.parametrize(
    ("unit", "grams"),
    [
        ("gCO2eq/kWh", True),
        ("gCO2/kWh", True),
        ("gCO2e/kWh", True),
        ("gCO2/kWh (marginal)", True),
        ("lbs_co2_per_mwh", False),
        ("lbs/MWh (marginal)", False),
        ("kgCO2/kWh", False),
        ("", False),
        ("percent", False),
    ],
)
def test_only_grams_per_kwh_gives_grams(unit: str, grams: bool) -> None:
    assert (core.emissions_g(300.0, unit, 2.0) is not None) is grams


def test_a_source_in_another_unit_gives_no_grams(monkeypatch: pytest.MonkeyPatch) -> None:
    lbs = core.Forecast(tuple(two_level(900.0, 200.0)), unit="lbs/MWh (marginal)")
    monkeypatch.setitem(core.SOURCES, "lbs", core.Source("lbs", lambda q: lbs, needs_zone=False, uses_zone=False))
    result = plan(source="lbs", power_kw=3.0)
    assert result.waits and result.energy_kwh == pytest.approx(3.0)
    assert (result.emissions_g, result.emissions_now_g, result.avoided_g) == (None, None, None)
    assert core.signal_of(result.unit) == "marginal"


@given(
    intensity=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
    energy=st.one_of(st.none(), st.floats(min_value=0, max_value=1e9)),
)
def test_grams_are_a_product_or_none_never_nan(intensity: float | None, energy: float | None) -> None:
    grams = core.emissions_g(intensity, "gCO2eq/kWh", energy)
    if grams is None:
        assert intensity is None or energy is None or not math.isfinite(intensity * energy)
    else:
        assert math.isfinite(grams) and grams == intensity * energy  # type: ignore[operator]


@given(st.floats(min_value=1e-3, max_value=1e6), st.integers(min_value=1, max_value=10**7))
def test_energy_is_power_times_hours(power: float, seconds: int) -> None:
    assert core.energy_kwh(power, timedelta(seconds=seconds)) == pytest.approx(power * seconds / 3600)


@pytest.mark.parametrize("bad", [0, -1, math.nan, math.inf, 1e7])
def test_power_kw_out_of_range_is_an_argument_error(bad: float) -> None:
    with pytest.raises(ValueError, match="power_kw"):
        plan(power_kw=bad)


@pytest.mark.parametrize("bad", [True, "2", [2]])
def test_power_kw_of_the_wrong_type_is_an_argument_error(bad: Any) -> None:
    with pytest.raises(TypeError, match="power_kw"):
        plan(power_kw=bad)


# ---- the ledger -------------------------------------------------------------------------------------------


def test_each_decision_is_a_ledger_line(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    first = plan(power_kw=2.0, ledger=path)
    second = plan(ledger=str(path))
    records = core.read_ledger(str(path))
    assert [r["kind"] for r in records] == ["decision", "decision"]
    assert [r["id"] for r in records] == [first.id, second.id] and first.id != second.id
    assert records[0]["plan"] == json.loads(json.dumps(first.to_dict()))
    assert records[0]["called_at"] == "2025-06-01T12:00:00Z"


def test_the_ledger_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "env.jsonl"
    monkeypatch.setenv("CARBONAWARE_LEDGER", str(path))
    core.carbonaware_delay(timedelta(hours=1), HOUR, source=[], now=NOW, grid_zone="DE")  # fails open: no wait
    (record,) = core.read_ledger(str(path))
    assert record["plan"]["reason"] == "source-failed"


def test_no_ledger_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    plan(power_kw=1.0)
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_ledger_costs_a_warning_not_the_work(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="carbonaware"):
        result = plan(ledger=tmp_path)  # a directory
    assert result.waits
    assert any("could not write to ledger" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("bad", [3, b"x.jsonl"])
def test_a_ledger_that_is_not_a_path_is_an_argument_error(bad: Any) -> None:
    with pytest.raises(TypeError, match="ledger"):
        plan(ledger=bad)


@pytest.mark.parametrize("bad", ["", "  ", "a\0b"])
def test_an_empty_ledger_path_is_an_argument_error(bad: str) -> None:
    with pytest.raises(ValueError, match="ledger"):
        plan(ledger=bad)


def good(index: int) -> bytes:
    return json.dumps({"v": 1, "kind": "outcome", "id": f"o{index}", "decision": f"d{index}"}).encode() + b"\n"


def test_damaged_and_foreign_lines_are_skipped_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "damaged.jsonl"
    lines = [
        good(1),
        b"not json\n",
        b"[1, 2, 3]\n",
        b'{"v": 2, "kind": "decision", "id": "x", "plan": {}, "called_at": "2025-01-01T00:00:00Z"}\n',
        b'{"v": 1, "kind": "decision", "id": "x"}\n',  # a decision without its plan
        b'{"v": 1, "kind": "gossip", "id": "x"}\n',
        b"\xff\xfe\x00binary\n",
        b"\n",
        b"[" * 100_000 + b"\n",  # deeper than the JSON parser recurses
        b'{"v": 1, "kind": "outcome", "id": "big", "decision": "' + b"x" * (2 << 20) + b'"}\n',  # over the line cap
        good(2),
        b'{"v": 1, "kind": "outcome", "id": "cut", "deci',  # a writer died mid-line
    ]
    path.write_bytes(b"".join(lines))
    with caplog.at_level(logging.WARNING, logger="carbonaware"):
        records = core.read_ledger(str(path))
    assert [r["id"] for r in records] == ["o1", "o2"]
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "skipped 9 damaged or foreign line(s)" in warning


def test_an_append_after_a_cut_line_stays_whole(tmp_path: Path) -> None:
    path = tmp_path / "cut.jsonl"
    path.write_bytes(good(1) + b'{"v": 1, "kind": "outc')
    core.append_records(str(path), [json.loads(good(2))])
    assert [r["id"] for r in core.read_ledger(str(path))] == ["o1", "o2"]


def test_a_missing_ledger_is_empty(tmp_path: Path) -> None:
    assert core.read_ledger(str(tmp_path / "none.jsonl")) == []


WRITER = """
import sys
sys.path.insert(0, sys.argv[1])
import carbonaware_core
path, worker = sys.argv[2], int(sys.argv[3])
pad = "x" * 6000  # each line longer than PIPE_BUF: plain appends could tear
for i in range(500):
    record = {"v": 1, "kind": "outcome", "id": f"{worker}-{i}", "decision": "d", "pad": pad}
    carbonaware_core.append_records(path, [record])
"""


def test_twenty_processes_appending_lose_and_interleave_nothing(tmp_path: Path) -> None:
    path = tmp_path / "busy.jsonl"
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(ROOT), str(path), str(worker)]) for worker in range(20)
    ]
    assert [writer.wait(timeout=600) for writer in writers] == [0] * 20
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 20 * 500 + 1
    ids = [json.loads(line)["id"] for line in lines[:-1]]  # every line parses: nothing interleaved
    assert sorted(ids) == sorted(f"{w}-{i}" for w in range(20) for i in range(500))
    for worker in range(20):  # each writer's lines in its own order
        mine = [int(i.split("-")[1]) for i in ids if i.startswith(f"{worker}-")]
        assert mine == list(range(500))


# ---- the CLI ----------------------------------------------------------------------------------------------


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("CARBONAWARE_")}
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "carbonaware_core", *args],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


def series_file(tmp_path: Path) -> str:
    document = [{"start": p.start.isoformat(), "end": p.end.isoformat(), "value": p.value} for p in two_level()]
    path = tmp_path / "series.json"
    path.write_text(json.dumps(document))
    return str(path)


def test_cli_plan_power_kw_and_ledger(tmp_path: Path) -> None:
    ledger = tmp_path / "cli.jsonl"
    source = f"file:{series_file(tmp_path)}"
    done = cli("plan", "--source", source, "--now", "2025-06-01T12:00:00Z", "--duration", "1h", "--grid-zone", "DE",
               "--power-kw", "2", "--ledger", str(ledger), "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert (data["energy_kwh"], data["emissions_now_g"], data["emissions_g"], data["avoided_g"]) == (2, 800, 200, 600)
    (record,) = core.read_ledger(str(ledger))
    assert record["plan"] == data


def test_cli_run_records_the_decision_and_a_pending_outcome(tmp_path: Path) -> None:
    ledger = tmp_path / "run.jsonl"
    done = cli("run", "--source", f"file:{series_file(tmp_path)}", "--grid-zone", "DE", "--power-kw", "3",
               "--window", "1m", "--ledger", str(ledger), "--", sys.executable, "-c", "import time; time.sleep(0.3)",
               env={"CARBONAWARE_DRY_RUN": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr
    decision, outcome = core.read_ledger(str(ledger))
    assert decision["kind"] == "decision" and outcome["kind"] == "outcome"
    assert outcome["decision"] == decision["id"] and outcome["status"] == "pending"
    assert 0.3 <= outcome["runtime_seconds"] < 30
    assert outcome["energy_kwh"] == pytest.approx(3 * outcome["runtime_seconds"] / 3600, abs=3 * 0.001 / 3600)


def test_cli_run_of_a_missing_command_records_no_outcome(tmp_path: Path) -> None:
    ledger = tmp_path / "missing.jsonl"
    done = cli("run", "--source", f"file:{series_file(tmp_path)}", "--grid-zone", "DE", "--window", "1m",
               "--ledger", str(ledger), "--", "no-such-command-here", env={"CARBONAWARE_DRY_RUN": "1"})  # fmt: skip
    assert done.returncode == 127
    assert [r["kind"] for r in core.read_ledger(str(ledger))] == ["decision"]


def test_cli_power_kw_is_checked(tmp_path: Path) -> None:
    done = cli("plan", "--source", f"file:{series_file(tmp_path)}", "--power-kw", "-1")
    assert done.returncode == 2 and "power_kw" in done.stderr


# ---- report totals against an independent sum, for any ledger ---------------------------------------------------

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)
decision_rows = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=48 * 3600),  # delay seconds
        st.sampled_from(["optimal", "already-best", "source-failed", "dry-run"]),
        st.one_of(st.none(), finite),  # predicted avoided g
        st.one_of(st.none(), st.floats(min_value=0, max_value=1e4)),  # planned kWh
        st.one_of(st.none(), st.tuples(st.sampled_from(["measured", "estimate", "pending"]), finite, finite)),
        st.sampled_from(["DE", "GB", None]),
    ),
    max_size=30,
)


@given(decision_rows)
def test_report_totals_are_the_sums(rows: list[Any]) -> None:
    records: list[dict[str, Any]] = []
    for index, (delay, reason, avoided, kwh, outcome, zone) in enumerate(rows):
        called = NOW + timedelta(minutes=index)
        plan = {"delay_seconds": delay, "reason": reason, "avoided_g": avoided, "energy_kwh": kwh, "grid_zone": zone,
                "source": "s", "signal": "average"}  # fmt: skip
        records.append({"v": 1, "kind": "decision", "id": f"d{index}", "called_at": core._iso(called), "plan": plan})
        if outcome is not None:
            status, actual, counterfactual = outcome
            at, end = core._iso(called), core._iso(called + HOUR)
            records.append({"v": 1, "kind": "outcome", "id": f"o{index}", "decision": f"d{index}", "status": status,
                            "called_at": at, "started": at, "ended": end, "actual": actual,
                            "counterfactual": counterfactual, "power_kw": 1.0})  # fmt: skip
    decisions = core.decisions_between(records, NOW, NOW + timedelta(days=1))
    report = core.build_report(decisions, core.latest_outcomes(records), NOW, NOW + timedelta(days=1))
    total = report["total"]

    assert total["decisions"] == len(rows)
    assert total["waits"] == sum(1 for r in rows if r[1] == "optimal" and r[0] > 0)
    assert total["hours_waited"] == pytest.approx(sum(r[0] for r in rows if r[1] == "optimal") / 3600, abs=1e-3)
    assert total["predicted_avoided_g"] == pytest.approx(sum(r[2] or 0 for r in rows), abs=0.1)
    realised = [r[4] for r in rows if r[4] is not None and r[4][0] != "pending"]
    measured = sum(c - a for s, a, c in realised if s == "measured")  # 1 kW for an hour: grams = intensity
    assert total["measured_avoided_g"] == pytest.approx(measured, abs=0.1 + 1e-9 * abs(measured))
    kwh = sum(1.0 if r[4] is not None else (r[3] or 0.0) for r in rows)
    assert total["kwh"] == pytest.approx(kwh, abs=1e-3)
    negative = sum(1 for _s, a, c in realised if c > 0 and (c - a) / c < 0)
    assert total["negative_share"] == (round(negative / len(realised), 4) if realised else None)
    assert sum(z["decisions"] for z in report["by_zone"].values()) == len(rows)


# ---- careless ledgers -------------------------------------------------------------------------------------------


def test_a_fifo_ledger_neither_blocks_nor_breaks_the_work(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fifo = tmp_path / "ledger.fifo"
    os.mkfifo(fifo)
    with caplog.at_level(logging.WARNING, logger="carbonaware"):
        result = plan(ledger=fifo)
    assert result.waits
    assert any("not a regular file" in r.getMessage() for r in caplog.records)


def test_a_ledger_locked_for_good_is_given_up_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "locked.jsonl"
    path.write_bytes(good(1))
    monkeypatch.setattr(core, "LEDGER_LOCK_SECONDS", 0.2)
    holder = subprocess.Popen(  # another process holds the lock (a stuck writer)
        [sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'ab'); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('locked', flush=True); sys.stdin.read()", str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        with caplog.at_level(logging.WARNING, logger="carbonaware"):
            result = plan(ledger=path)
        assert result.waits
        assert any("stayed locked by another writer" in r.getMessage() for r in caplog.records)
    finally:
        holder.kill()
        holder.wait()
    assert [r["id"] for r in core.read_ledger(str(path))] == ["o1"]


def test_report_of_an_unreadable_ledger_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert core.main(["report", "--ledger", str(tmp_path)]) == 2
    assert "cannot read ledger" in capsys.readouterr().err


def test_report_since_before_the_year_one_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        core.main(["report", "--ledger", str(tmp_path / "x.jsonl"), "--since", "999999d"])
    assert exit_info.value.code == 2


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX")
def test_a_forked_child_draws_other_ids_than_its_parent() -> None:
    """Decision ids come from a per-process generator: a child forked after the parent's first id must not
    replay the parent's sequence (same state, same ids), or two processes' ledger records would collide."""
    core._new_id()  # the parent's generator exists before the fork
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.write(write, " ".join(core._new_id() for _ in range(3)).encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 1024).decode().split()
    os.close(read)
    parent = [core._new_id() for _ in range(3)]
    assert len(child) == 3 and not set(child) & set(parent)
