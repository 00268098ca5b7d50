"""The region tables in the core are exactly what scripts/build_region_table.py builds from the shared facts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import carbonaware_core as core

ROOT = Path(__file__).resolve().parent.parent
MAPPINGS = ROOT.parent / "shared" / "data" / "mappings"


def _built_tables() -> dict[str, object]:
    if not MAPPINGS.is_dir():
        pytest.skip(f"shared mapping data not present at {MAPPINGS}")
    result = subprocess.run(
        [sys.executable, "scripts/build_region_table.py", "--data", str(MAPPINGS)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    namespace: dict[str, object] = {}
    exec(result.stdout, namespace)
    return namespace


def test_core_region_table_matches_the_build_script() -> None:
    built = _built_tables()
    assert built["REGION_ZONES"] == core.REGION_ZONES
    assert built["ZONE_WATTTIME"] == core.ZONE_WATTTIME


def test_every_wattime_zone_is_a_zone_some_region_maps_to() -> None:
    assert set(core.ZONE_WATTTIME) <= set(core.REGION_ZONES.values())


@pytest.mark.parametrize(
    ("provider", "region", "zone"),
    [
        ("aws", "us-west-2", "US-NW-PACW"),  # Electricity Maps' own table wins over CCF/UMass
        ("gcp", "us-central1", "US-CENT-SWPP"),
        ("azure", "uksouth", "GB"),
        ("gcp", "europe-west2", "GB"),
    ],
)
def test_known_regions_map_to_their_grid_zone(provider: str, region: str, zone: str) -> None:
    query = core.Query(
        core.CloudZone(provider, region), None, core.CLOCK.now(), core.DEFAULT_WINDOW, core.DEFAULT_DURATION, 1.0
    )
    assert core.grid_zone_for(query) == zone
