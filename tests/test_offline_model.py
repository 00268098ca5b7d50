"""The offline model: its builder, the shipped data file, and planning with it through the public API."""

from __future__ import annotations

import gzip
import json
import math
import re
import sys
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import carbonaware_core as core

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import build_offline_model as bom  # noqa: E402 - scripts/ is not a package

SHIPPED = ROOT / "carbonaware_offline.json"
SHARED_DATA = bom.DEFAULT_DATA
# the zones of ../shared/data/README.md and the years each has: 19 with 2021-2023, then 21 added with one year each
# (FR with two)
FULL_ZONES = {
    *("AU-NSW", "AU-VIC", "BR", "BR-CS", "CA-ON", "CL-SEN", "DE", "ES", "GB", "IN-WE", "JP-TK", "KR", "NO", "SG"),
    *("US-CAL-CISO", "US-MIDA-PJM", "US-NY-NYIS", "US-TEX-ERCO", "ZA"),
}
ZONES_2023 = {
    *("US-MIDW-MISO", "US-NW-PACW", "US-NW-BPAT", "US-NW-PACE", "US-SW-AZPS", "US-CENT-SWPP", "US-NE-ISNE"),
    *("US-SE-SOCO", "US-TEN-TVA", "US-NW-PSEI", "US-NW-PGE", "US-SW-SRP", "US-NW-PSCO", "US-NW-NEVP", "US-CAL-BANC"),
    "CA-QC",
}
DATA_YEARS = {
    **{zone: [2021, 2022, 2023] for zone in FULL_ZONES},
    **{zone: [2022] for zone in ("BE", "FI", "IE", "SE-SE3")},
    "FR": [2022, 2023],
    **{zone: [2023] for zone in ZONES_2023},
}
DATA_ZONES = set(DATA_YEARS)
# entirely Electricity Maps model estimates, per the README (SG only partly)
ESTIMATED_ZONES = ["IE", "IN-WE", "JP-TK"]
HEADER = (
    "Datetime (UTC),Country,Zone Name,Zone Id,Carbon Intensity gCO₂eq/kWh (direct),"
    "Carbon Intensity gCO₂eq/kWh (LCA),Low Carbon Percentage,Renewable Percentage,Data Source,Data Estimated,"
    "Data Estimation Method"
)
needs_shared_data = pytest.mark.skipif(
    not (SHARED_DATA / "electricitymaps_hourly").is_dir(), reason="../shared/data is not present"
)


def hours_of(year: int) -> list[datetime]:
    start = datetime(year, 1, 1, tzinfo=timezone.utc)
    count = (datetime(year + 1, 1, 1, tzinfo=timezone.utc) - start) // timedelta(hours=1)
    return [start + timedelta(hours=k) for k in range(count)]


def write_zone_year(data_dir: Path, zone: str, year: int, value: Callable[[datetime], float]) -> None:
    """A file laid out like Electricity Maps' download: the LCA column is the sixth, the direct one differs."""
    path = bom.zone_file(data_dir, zone, year)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [HEADER]
    for moment in hours_of(year):
        v = value(moment)
        lines.append(f"{moment:%Y-%m-%d %H:%M:%S},X,X,{zone},{v * 0.7:.2f},{v:.2f},50,40,test,false,")
    with gzip.open(path, "wt", encoding="utf-8", newline="") as handle:
        handle.write("\n".join(lines) + "\n")


def flat(profile: Any) -> list[Any]:
    return [x for item in profile for x in flat(item)] if isinstance(profile, list) else [profile]


# --------------------------------------------------------------------------------------------------------------
# The builder
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def synthetic_data(tmp_path: Path) -> Path:
    for zone, level in (("ZZ-B", 400.0), ("ZZ-A", 100.0)):
        for year in (2021, 2022):
            write_zone_year(tmp_path, zone, year, lambda m, lv=level: lv + 10 * m.hour + m.month + (m.year - 2021))
    return tmp_path


def test_two_builds_are_byte_identical(synthetic_data: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "one.json", tmp_path / "two.json"
    assert bom.main(["--data", str(synthetic_data), "--years", "2021", "2022", "--out", str(first)]) == 0
    reordered = ["--years", "2022", "2021", "--zones", "ZZ-B", "ZZ-A"]
    assert bom.main(["--data", str(synthetic_data), *reordered, "--out", str(second)]) == 0
    assert first.read_bytes() == second.read_bytes()
    document = json.loads(first.read_text())
    assert list(document["zones"]) == ["ZZ-A", "ZZ-B"]
    assert document["training_years"] == [2021, 2022]
    assert b" " not in first.read_bytes().split(b'"zones"')[1]  # compact separators


def test_the_lca_column_is_read_not_the_direct_one(synthetic_data: Path) -> None:
    rows = bom.load_zone_year(synthetic_data, "ZZ-A", 2021)
    assert len(rows) == 8760
    assert rows[0] == (datetime(2021, 1, 1, tzinfo=timezone.utc), 101.0)
    assert rows[-1] == (datetime(2021, 12, 31, 23, tzinfo=timezone.utc), 100.0 + 230 + 12)


def test_a_bad_value_or_a_missing_cell_fails_loudly() -> None:
    with pytest.raises(ValueError, match=re.escape(":3: intensity -1.0")):
        bom.parse_rows(HEADER + "\n2023-01-01 00:00:00,X,X,Z,1,2,,,,,\n2023-01-01 01:00:00,X,X,Z,1,-1,,,,,\n")
    with pytest.raises(ValueError, match="one column containing 'LCA'"):
        bom.parse_rows("Datetime (UTC),value\n2023-01-01 00:00:00,1\n")
    january_only = [(m, 1.0) for m in hours_of(2023) if m.month == 1]
    with pytest.raises(ValueError, match=r"cell \(1, 0\) of month-hour-utc has no data"):
        bom.build_profile(january_only, "month-hour-utc")


def test_gaps_are_skipped_crlf_is_read_and_estimates_are_counted(tmp_path: Path) -> None:
    """The shapes of the added files: a blank hour (US-NW-PACW 2023), CRLF line ends, the Data Estimated flag."""
    lines = [
        HEADER,
        "2023-01-01 00:00:00,X,X,Z,1,100,,,,false,",
        "2023-01-01 01:00:00,X,X,Z,,,,,eia.gov,,",
        "2023-01-01 02:00:00,X,X,Z,1,300,,,,true,MODE_BREAKDOWN",
    ]
    for ending in ("\n", "\r\n"):
        read = bom.read_rows(ending.join(lines) + ending)
        assert read.rows == [
            (datetime(2023, 1, 1, 0, tzinfo=timezone.utc), 100.0),
            (datetime(2023, 1, 1, 2, tzinfo=timezone.utc), 300.0),
        ]
        assert (read.estimated, read.gaps) == (1, 1)
    with pytest.raises(ValueError, match=":2: "):  # a value that is there but not a number still fails
        bom.parse_rows(HEADER + "\n2023-01-01 00:00:00,X,X,Z,1,n/a,,,,,\n")


def test_each_zone_is_built_from_the_years_it_has(tmp_path: Path) -> None:
    write_zone_year(tmp_path, "ZZ-OLD", 2021, lambda m: 100.0)
    write_zone_year(tmp_path, "ZZ-OLD", 2022, lambda m: 200.0)
    write_zone_year(tmp_path, "ZZ-NEW", 2023, lambda m: 50.0 + m.hour)
    model = bom.build_model(tmp_path, ["ZZ-OLD", "ZZ-NEW"], smoothing=0)
    assert model["zone_info"]["ZZ-OLD"]["years"] == [2021, 2022]
    assert model["zone_info"]["ZZ-NEW"] == {"years": [2023], "estimated_share": 0.0, "gap_hours": 0}
    assert model["training_years"] == [2021, 2022, 2023]
    assert set(flat(model["zones"]["ZZ-OLD"])) == {150.0}
    assert model["zones"]["ZZ-NEW"][0][:3] == [50.0, 51.0, 52.0]
    only_2022 = bom.build_model(tmp_path, ["ZZ-OLD"], [2022], smoothing=0)
    assert set(flat(only_2022["zones"]["ZZ-OLD"])) == {200.0}
    with pytest.raises(ValueError, match="ZZ-NEW: no hourly file"):
        bom.build_model(tmp_path, ["ZZ-NEW"], [2021])


def test_three_significant_figures_keep_low_zones_precise() -> None:
    assert [bom._round(v, 1, 3) for v in (687.44, 99.94, 23.44, 5.678, 0.0)] == [687, 99.9, 23.4, 5.68, 0]
    assert isinstance(bom._round(687.44, 1, 3), int)


@settings(max_examples=15, deadline=None)
@given(
    shape=st.lists(st.floats(0, 800, allow_nan=False), min_size=24, max_size=24),
    months=st.lists(st.floats(0, 400, allow_nan=False), min_size=12, max_size=12),
    weekend=st.floats(-100, 0, allow_nan=False),
)
def test_a_known_daily_shape_is_recovered(shape: list[float], months: list[float], weekend: float) -> None:
    """value = month level + hour shape (+ a weekend change): every cell mean is exactly that sum."""

    def value(m: datetime) -> float:
        return months[m.month - 1] + shape[m.hour] + (weekend if m.weekday() >= 5 else 0.0) + 100

    rows = [(m, value(m)) for m in hours_of(2023)]
    split = bom.build_profile(rows, "month-weekpart-hour-utc")
    for month in range(12):
        for hour in range(24):
            base = months[month] + shape[hour] + 100
            assert split[month][0][hour] == pytest.approx(base, abs=0.05 + 1e-9)
            assert split[month][1][hour] == pytest.approx(base + weekend, abs=0.05 + 1e-9)
    weekdays_only = [(m, v) for m, v in rows if m.weekday() < 5]
    plain = bom.build_profile(weekdays_only, "month-hour-utc", digits=3)
    smooth = bom.build_profile(weekdays_only, "month-hour-utc", digits=3, smoothing=0.25)
    for month in range(12):
        for hour in range(24):
            assert plain[month][hour] == pytest.approx(months[month] + shape[hour] + 100, abs=5e-4 + 1e-9)
            neighbours = months[month - 1] + months[(month + 1) % 12]
            blended = 0.5 * months[month] + 0.25 * neighbours + shape[hour] + 100
            assert smooth[month][hour] == pytest.approx(blended, abs=5e-4 + 1e-9)


def test_a_shrunk_weekpart_cell_keeps_n_over_n_plus_k_of_its_difference() -> None:
    """Weekdays 300, weekends 100 at every hour of 2023: each pooled cell is the hour-weighted mean; a cell with n
    hours keeps n / (n + 10) of its distance from it. January 2023 has 22 weekdays and 9 weekend days."""
    rows = [(m, 100.0 if m.weekday() >= 5 else 300.0) for m in hours_of(2023)]
    shrunk = bom.build_profile(rows, "month-weekpart-hour-utc", digits=6, shrink=10)
    pooled = (22 * 300 + 9 * 100) / 31
    assert shrunk[0][0][5] == pytest.approx(pooled + 22 / 32 * (300 - pooled), abs=1e-6)
    assert shrunk[0][1][5] == pytest.approx(pooled + 9 / 19 * (100 - pooled), abs=1e-6)
    assert bom.build_profile(rows, "month-weekpart-hour-utc", digits=6, shrink=0)[0] == [[300.0] * 24, [100.0] * 24]
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="shrink"):
            bom.build_profile(rows, "month-weekpart-hour-utc", shrink=bad)
    with pytest.raises(ValueError, match="weekpart layout only"):
        bom.build_profile(rows, "month-hour-utc", shrink=10)


def test_the_builder_ships_a_shrunk_weekpart_model_on_request(synthetic_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "k.json"
    args = ["--data", str(synthetic_data), "--kind", "month-weekpart-hour-utc", "--shrink", "10", "--out", str(out)]
    assert bom.main(args) == 0
    document = json.loads(out.read_text())
    assert document["kind"] == "month-weekpart-hour-utc" and "n/(n+10)" in document["statistic"]
    assert len(document["zones"]["ZZ-A"][0]) == 2
    second = tmp_path / "k2.json"
    assert bom.main([*args[:-1], str(second)]) == 0
    assert out.read_bytes() == second.read_bytes()


def test_recency_weights_double_per_year() -> None:
    assert bom.recency_weights([2023, 2021, 2022]) == {2021: 1.0, 2022: 2.0, 2023: 4.0}
    rows = [(m, 100.0) for m in hours_of(2021)] + [(m, 400.0) for m in hours_of(2022)]
    profile = bom.build_profile(rows, "month-hour-utc", year_weights=bom.recency_weights([2021, 2022]))
    assert set(flat(profile)) == {300.0}  # (100 * 1 + 400 * 2) / 3
    assert set(flat(bom.build_profile(rows, "month-hour-utc", digits=0))) == {250}


# --------------------------------------------------------------------------------------------------------------
# The lookup: the builder's cells and the core's profile_value agree, at every edge
# --------------------------------------------------------------------------------------------------------------


def coded_profile(kind: str) -> list[Any]:
    """Every cell holds a code for its position: month * 1000 + weekend * 100 + hour."""
    if kind == "month-hour-utc":
        return [[m * 1000 + h for h in range(24)] for m in range(12)]
    return [[[m * 1000 + part * 100 + h for h in range(24)] for part in (0, 1)] for m in range(12)]


EDGES = [
    # (moment, month index, weekend, hour)
    (datetime(2023, 1, 31, 23, 59, 59, tzinfo=timezone.utc), 0, 0, 23),  # Tuesday, last second of January
    (datetime(2023, 2, 1, 0, 0, tzinfo=timezone.utc), 1, 0, 0),
    (datetime(2023, 3, 3, 23, 59, tzinfo=timezone.utc), 2, 0, 23),  # Friday night
    (datetime(2023, 3, 4, 0, 0, tzinfo=timezone.utc), 2, 1, 0),  # Saturday starts
    (datetime(2023, 3, 5, 23, 59, tzinfo=timezone.utc), 2, 1, 23),  # Sunday ends
    (datetime(2023, 3, 6, 0, 0, tzinfo=timezone.utc), 2, 0, 0),  # Monday
    (datetime(2023, 12, 31, 23, 30, tzinfo=timezone.utc), 11, 1, 23),  # Sunday, last hour of the year
    (datetime(2024, 2, 29, 12, 0, tzinfo=timezone.utc), 1, 0, 12),  # leap day
    # Aware non-UTC moments are looked up in UTC: Monday 01:30 in UTC+2 is Sunday 23:30 UTC, still December
    (datetime(2024, 1, 1, 1, 30, tzinfo=timezone(timedelta(hours=2))), 11, 1, 23),
    # ... and Friday 20:00 in UTC-5 is Saturday 01:00 UTC, in the next month
    (datetime(2023, 3, 31, 20, 0, tzinfo=timezone(timedelta(hours=-5))), 3, 1, 1),
]


@pytest.mark.parametrize(("moment", "month", "weekend", "hour"), EDGES)
def test_profile_value_edges(moment: datetime, month: int, weekend: int, hour: int) -> None:
    assert core.profile_value(coded_profile("month-hour-utc"), "month-hour-utc", moment) == month * 1000 + hour
    split = core.profile_value(coded_profile("month-weekpart-hour-utc"), "month-weekpart-hour-utc", moment)
    assert split == month * 1000 + weekend * 100 + hour
    assert bom.cell_of("month-weekpart-hour-utc", moment) == (month, weekend, hour)


@settings(max_examples=200, deadline=None)
@given(
    moment=st.datetimes(datetime(2000, 1, 1), datetime(2100, 1, 1)),
    offset=st.integers(-14 * 60, 14 * 60),
    kind=st.sampled_from(bom.KINDS),
)
def test_the_builder_files_each_hour_where_the_core_looks_it_up(moment: datetime, offset: int, kind: str) -> None:
    aware = moment.replace(tzinfo=timezone(timedelta(minutes=offset)))
    profile = coded_profile(kind)
    cell: Any = profile
    for index in bom.cell_of(kind, aware):
        cell = cell[index]
    assert core.profile_value(profile, kind, aware) == cell


# --------------------------------------------------------------------------------------------------------------
# The shipped file
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(SHIPPED.read_text(encoding="utf-8"))
    return document


def test_the_shipped_file_covers_every_zone_with_sane_values(shipped: dict[str, Any]) -> None:
    assert shipped["format"] == 1
    assert shipped["unit"] == "gCO2eq/kWh"
    assert shipped["kind"] in bom.KINDS
    assert set(shipped["zones"]) == DATA_ZONES
    assert {zone: info["years"] for zone, info in shipped["zone_info"].items()} == DATA_YEARS
    assert shipped["estimated_zones"] == ESTIMATED_ZONES
    for zone in ESTIMATED_ZONES:
        assert shipped["zone_info"][zone]["estimated_share"] == 1.0
    assert 0.05 < shipped["zone_info"]["SG"]["estimated_share"] < 0.5  # "partly"
    assert shipped["zone_info"]["US-NW-PACW"]["gap_hours"] == 24
    for zone, profile in shipped["zones"].items():
        assert len(profile) == 12, zone
        for month in profile:
            days = month if shipped["kind"] == "month-weekpart-hour-utc" else [month]
            assert len(days) == (2 if shipped["kind"] == "month-weekpart-hour-utc" else 1), zone
            for day in days:
                assert len(day) == 24, zone
                for value in day:
                    assert isinstance(value, (int, float)) and not isinstance(value, bool), zone
                    assert math.isfinite(value) and 0 <= value < 2000, (zone, value)
        assert max(flat(profile)) > min(flat(profile)), f"{zone} has no daily or seasonal shape"


def test_the_shipped_file_covers_most_cloud_regions(shipped: dict[str, Any]) -> None:
    """Every region the offline source answers for, counted through the public API (62 with the first 19 zones)."""
    now = datetime(2024, 3, 1, 9, tzinfo=timezone.utc)
    six, one = timedelta(hours=6), timedelta(hours=1)
    answered = {
        (provider, region)
        for provider, region in core.REGION_ZONES
        if core.plan_delay(six, one, provider=provider, region=region, source="offline", now=now).source == "offline"
    }
    assert len(core.REGION_ZONES) == 141
    assert len(answered) == 91  # 89 by their own zone, 2 (Azure Norway) through the all-Norway profile
    for region in (("aws", "eu-west-1"), ("aws", "us-west-2"), ("aws", "eu-west-3"), ("aws", "eu-north-1")):
        assert region in answered  # the ones issue 9 names
    assert shipped["stand_ins"] == {"NO-NO1": "NO", "NO-NO2": "NO"}


def test_a_stand_in_answers_with_the_aggregate_and_says_so(shipped: dict[str, Any]) -> None:
    now = datetime(2024, 3, 1, 9, tzinfo=timezone.utc)
    plan = core.plan_delay(
        timedelta(hours=6), timedelta(hours=1), provider="azure", region="norwayeast", source="offline", now=now
    )
    assert plan.source == "offline" and plan.grid_zone == "NO-NO1"
    assert "NO-NO1 has no profile of its own: the NO profile stands in" in plan.detail
    expected = brute_force_start(shipped["zones"]["NO"], shipped["kind"], now, timedelta(hours=6), timedelta(hours=1))
    assert plan.start == (now if plan.reason == "below-threshold" else expected)


def test_the_shipped_file_carries_its_odbl_notice(shipped: dict[str, Any]) -> None:
    assert shipped["license"] == "ODbL-1.0"
    assert shipped["license_url"] == "https://opendatacommons.org/licenses/odbl/1-0/"
    assert "Electricity Maps" in shipped["attribution"] and "Open Database License" in shipped["attribution"]
    assert shipped["training_years"] == [2021, 2022, 2023]
    assert SHIPPED.stat().st_size < 60_000  # 40 zones; the core reads it whole on first use
    notice = (ROOT / "DATA-LICENSE.md").read_text(encoding="utf-8")
    for needle in (
        "carbonaware_offline.json",
        "Electricity Maps",
        bom.LICENSE_URL,
        "Apache License 2.0",
        "Share-alike",
    ):
        assert needle in notice


@needs_shared_data
def test_the_shipped_file_is_what_the_builder_makes_from_the_shared_data() -> None:
    assert set(bom.available_zones(SHARED_DATA)) == DATA_ZONES
    rebuilt = bom.dump_model(bom.build_model(SHARED_DATA, sorted(DATA_ZONES)))
    assert rebuilt == SHIPPED.read_text(encoding="ascii"), "run: python scripts/build_offline_model.py"


# --------------------------------------------------------------------------------------------------------------
# Planning with the offline source through the public API
# --------------------------------------------------------------------------------------------------------------


def brute_force_start(profile: Any, kind: str, now: datetime, window: timedelta, job: timedelta) -> datetime:
    """Earliest start on a one-minute grid with the lowest mean, the profile read without ``profile_value``.

    Exhaustive: the profile is a step series with steps at whole UTC hours, so the job mean is piecewise linear in
    the start with kinks at whole hours and whole hours minus the job length; with ``now`` and the job length in
    whole minutes, every kink and both ends of the range lie on the minute grid.
    """

    def at(moment: datetime) -> float:
        cell: Any = profile[moment.month - 1]
        if kind == "month-weekpart-hour-utc":
            cell = cell[1 if moment.weekday() >= 5 else 0]
        return float(cell[moment.hour])

    minute = timedelta(minutes=1)
    per_minute = [at(now + k * minute) for k in range((window + job) // minute)]
    length = job // minute
    means = [sum(per_minute[k : k + length]) / length for k in range(window // minute + 1)]
    lowest = min(means)
    first = next(k for k, m in enumerate(means) if m <= lowest + 1e-7 * lowest)
    return now + first * minute


NOWS = [
    datetime(2024, 1, 15, 9, 0, tzinfo=timezone.utc),
    datetime(2024, 6, 3, 4, 0, tzinfo=timezone.utc),
    datetime(2024, 6, 3, 14, 20, tzinfo=timezone.utc),
    datetime(2024, 10, 31, 21, 45, tzinfo=timezone.utc),  # the window crosses into November
    datetime(2025, 3, 8, 23, 7, tzinfo=timezone(timedelta(hours=1))),
]


@pytest.mark.parametrize("now", NOWS)
@pytest.mark.parametrize(
    ("window", "job"), [(timedelta(hours=6), timedelta(hours=1)), (timedelta(hours=12), timedelta(minutes=90))]
)
def test_the_offline_source_plans_the_lowest_typical_hour(
    shipped: dict[str, Any], now: datetime, window: timedelta, job: timedelta
) -> None:
    plan = core.plan_delay(window, job, provider="gcp", region="europe-west2", source="offline", now=now)
    assert plan.source == "offline" and plan.grid_zone == "GB", plan.detail
    expected = brute_force_start(shipped["zones"]["GB"], shipped["kind"], now.astimezone(timezone.utc), window, job)
    assert plan.start == expected
    assert plan.reason == ("already-best" if expected == now else "optimal")
    assert plan.delay == expected - now


def test_the_shipped_model_makes_london_wait_sometimes(shipped: dict[str, Any]) -> None:
    """Guards the test above against a degenerate model under which every plan is 'start now'."""
    six, one = timedelta(hours=6), timedelta(hours=1)
    waits = [
        core.plan_delay(six, one, provider="gcp", region="europe-west2", source="offline", now=now).waits
        for now in NOWS
    ]
    assert any(waits) and not all(waits)


def test_a_zone_the_model_does_not_cover_fails_with_its_name(shipped: dict[str, Any]) -> None:
    assert core.REGION_ZONES[("gcp", "europe-west4")] == "NL" and "NL" not in shipped["zones"]
    plan = core.plan_delay(
        timedelta(hours=6), timedelta(hours=1), provider="gcp", region="europe-west4", source="offline", now=NOWS[0]
    )
    assert plan.reason == "source-failed"
    assert plan.delay == timedelta(0)
    assert "NL" in plan.detail


def write_model(path: Path, kind: str, zones: dict[str, Any]) -> Path:
    path.write_text(json.dumps({"format": 1, "kind": kind, "unit": "gCO2eq/kWh", "zones": zones}))
    return path


def test_a_weekpart_model_is_looked_up_by_weekday(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Weekdays 300 at every hour, weekends 100: on Friday 20:00 UTC the plan waits for Saturday 00:00 UTC."""
    month = [[300.0] * 24, [100.0] * 24]
    monkeypatch.setenv(
        "CARBONAWARE_OFFLINE_DATA",
        str(write_model(tmp_path / "m.json", "month-weekpart-hour-utc", {"DE": [month] * 12})),
    )
    six, one = timedelta(hours=6), timedelta(hours=1)
    friday = datetime(2024, 3, 8, 20, 0, tzinfo=timezone.utc)
    plan = core.plan_delay(
        six, one, provider="aws", region="eu-central-1", grid_zone="DE", source="offline", now=friday
    )
    assert plan.start == datetime(2024, 3, 9, 0, 0, tzinfo=timezone.utc)
    assert plan.expected == pytest.approx(100.0) and plan.now == pytest.approx(300.0)
    sunday = datetime(2024, 3, 10, 20, 0, tzinfo=timezone.utc)
    plan = core.plan_delay(
        six, one, provider="aws", region="eu-central-1", grid_zone="DE", source="offline", now=sunday
    )
    assert plan.reason == "already-best" and plan.start == sunday


def test_without_a_model_the_offline_source_fails_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARBONAWARE_OFFLINE_DATA", str(tmp_path / "absent.json"))
    plan = core.plan_delay(
        timedelta(hours=6), timedelta(hours=1), provider="gcp", region="europe-west2", source="offline", now=NOWS[0]
    )
    assert plan.reason == "source-failed" and plan.delay == timedelta(0)
    assert "no offline model" in plan.detail


# --------------------------------------------------------------------------------------------------------------
# Fewer harmful waits: the per-zone minimum predicted saving shipped with the model (issue 9 item 8)
# --------------------------------------------------------------------------------------------------------------


def dip_model(path: Path, min_savings: Any = None, zone_extra: dict[str, Any] | None = None) -> Path:
    """DE: 300 at every hour, but 270 at 02:00 UTC: waiting from 00:00 for 02:00 is predicted to save 10 %."""
    day = [300.0] * 24
    day[2] = 270.0
    document: dict[str, Any] = {
        "format": 1,
        "kind": "month-hour-utc",
        "unit": "gCO2eq/kWh",
        "zones": {"DE": [day] * 12},
    }
    if min_savings is not None:
        document["min_savings"] = min_savings
    document.update(zone_extra or {})
    path.write_text(json.dumps(document))
    return path


MIDNIGHT = datetime(2024, 5, 6, 0, 0, tzinfo=timezone.utc)


def plan_de(**options: Any) -> core.Plan:
    return core.plan_delay(
        timedelta(hours=6), timedelta(hours=1), grid_zone="DE", source="offline", now=MIDNIGHT, **options
    )


def test_a_prediction_below_the_zones_minimum_does_not_wait(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARBONAWARE_OFFLINE_DATA", str(dip_model(tmp_path / "a.json")))
    plan = plan_de()
    assert plan.reason == "optimal" and plan.start == MIDNIGHT + timedelta(hours=2)  # no table: waits as before
    assert plan.savings == pytest.approx(0.1)

    monkeypatch.setenv("CARBONAWARE_OFFLINE_DATA", str(dip_model(tmp_path / "b.json", {"by_zone": {"DE": 0.12}})))
    plan = plan_de()
    assert plan.reason == "below-threshold" and plan.delay == timedelta(0)
    assert "waiting would save 10.0%, below the offline model's minimum for DE, 12.0%" in plan.detail
    assert "Electricity Maps" in plan.detail  # the attribution still follows

    plan = plan_de(min_savings=0.2)  # the caller's higher floor wins, and is named as theirs
    assert plan.reason == "below-threshold" and "below min_savings 20.0%" in plan.detail

    monkeypatch.setenv("CARBONAWARE_OFFLINE_DATA", str(dip_model(tmp_path / "c.json", {"by_zone": {"DE": 0.08}})))
    assert plan_de().reason == "optimal"  # 10 % predicted clears an 8 % minimum


def test_the_models_default_minimum_covers_zones_without_their_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = {"by_zone": {"FR": 0.5}, "default": 0.15}
    monkeypatch.setenv("CARBONAWARE_OFFLINE_DATA", str(dip_model(tmp_path / "d.json", table)))
    plan = plan_de()
    assert plan.reason == "below-threshold" and "minimum for DE, 15.0%" in plan.detail


@pytest.mark.parametrize("broken", [{"by_zone": {"DE": "high"}}, {"by_zone": {"DE": 1.5}}, [0.2], {"default": True}])
def test_a_malformed_minimum_is_ignored_not_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, broken: Any) -> None:
    monkeypatch.setenv("CARBONAWARE_OFFLINE_DATA", str(dip_model(tmp_path / "e.json", broken)))
    plan = plan_de()
    assert plan.reason == "optimal" and plan.start == MIDNIGHT + timedelta(hours=2)


def test_only_the_offline_source_carries_a_minimum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same series from a user's callable plans as before: the floor is knowledge about the offline model."""
    monkeypatch.setenv("CARBONAWARE_OFFLINE_DATA", str(dip_model(tmp_path / "f.json", {"default": 0.5})))
    series = core.profile_series(
        json.loads((tmp_path / "f.json").read_text())["zones"]["DE"],
        "month-hour-utc",
        MIDNIGHT,
        MIDNIGHT + timedelta(hours=8),
    )
    forecast = [{"start": p.start.isoformat(), "end": p.end.isoformat(), "value": p.value} for p in series]
    path = tmp_path / "forecast.json"
    path.write_text(json.dumps(forecast))
    plan = core.plan_delay(timedelta(hours=6), timedelta(hours=1), grid_zone="DE", source=f"file:{path}", now=MIDNIGHT)
    assert plan.reason == "optimal" and plan.start == MIDNIGHT + timedelta(hours=2), plan.detail


def test_an_estimated_zone_says_so_in_the_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    extra = {"estimated_zones": ["DE"], "zone_info": {"DE": {"years": [2022], "estimated_share": 1.0}}}
    monkeypatch.setenv("CARBONAWARE_OFFLINE_DATA", str(dip_model(tmp_path / "g.json", zone_extra=extra)))
    assert "DE: 100% of its training hours are Electricity Maps model estimates" in plan_de().detail
    monkeypatch.setenv("CARBONAWARE_OFFLINE_DATA", str(dip_model(tmp_path / "h.json")))
    assert "estimates" not in plan_de().detail


def test_the_threshold_rule_buys_the_fewest_harmful_waits_within_the_budget() -> None:
    """Outcomes (predicted, true, perfect): small predictions are noise here. A 1.5 % minimum drops one harmful
    wait and gains saving; 2 % drops both but also a good wait (costs 0.2 of 60 points: 0.33 %); 3 % and up would
    also drop the eight 3 % waits."""
    outcomes = [
        (0.01, -0.01, 0.05),
        (0.015, -0.01, 0.05),
        (0.015, 0.022, 0.05),
        *[(0.03, 0.02, 0.05)] * 8,
        (0.05, 0.05, 0.05),
        *[(0.0, 0.0, 0.0)] * 4,
    ]
    kept, harmful, waits = bom.threshold_effect(outcomes, 0.0)
    assert waits == 12 and harmful == pytest.approx(2 / 12)
    assert kept == pytest.approx((-0.01 - 0.01 + 0.022 + 0.16 + 0.05) / 0.6)
    assert bom.threshold_effect(outcomes, 0.02) == (pytest.approx(0.21 / 0.6), 0.0, 9)
    assert bom.choose_min_saving(outcomes, budget=0.01) == 0.02
    assert bom.choose_min_saving(outcomes, budget=0.0) == 0.015  # no budget: only what costs nothing
    assert bom.choose_min_saving([(0.01, -0.01, 0.05), (0.02, 0.03, 0.05)], budget=0.0) == 0.015
    assert bom.default_min_saving({"A": 0.01, "B": 0.03, "C": 0.02, "D": 0.05}) == 0.02


def test_the_shipped_minimums_are_validated_per_zone(shipped: dict[str, Any]) -> None:
    table = shipped["min_savings"]
    assert set(table["by_zone"]) == {zone for zone, years in DATA_YEARS.items() if len(years) > 1}
    assert all(0 <= value <= 0.05 for value in table["by_zone"].values())
    assert table["default"] in table["by_zone"].values()


@pytest.mark.parametrize(
    "extra",
    [
        {"estimated_zones": 7},
        {"estimated_zones": ["DE"], "zone_info": []},
        {"estimated_zones": ["DE"], "zone_info": {"DE": {"estimated_share": "all"}}},
        {"stand_ins": ["DE"]},
    ],
)
def test_malformed_zone_notes_do_not_break_the_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: dict[str, Any]
) -> None:
    monkeypatch.setenv("CARBONAWARE_OFFLINE_DATA", str(dip_model(tmp_path / "i.json", zone_extra=extra)))
    plan = plan_de()
    assert plan.source == "offline" and plan.reason == "optimal", plan.detail
    assert plan.start == MIDNIGHT + timedelta(hours=2)
