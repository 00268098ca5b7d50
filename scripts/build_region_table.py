"""Build the cloud-region -> Electricity Maps zone table and the zone -> WattTime table.

Run from the repository root; prints a Python snippet on stdout (diagnostics go to stderr), or with ``--write``
rewrites the block between ``# BEGIN GENERATED`` and ``# END GENERATED`` at the end of carbonaware_core.py in place:

    python scripts/build_region_table.py [--data DIR] [--write [carbonaware_core.py]]

tests/test_region_table.py checks that the two agree.

Only facts (which region lies in which zone) are taken from the inputs in DIR
(default ../shared/data/mappings/, see ../shared/data/README.md):
  - electricitymaps_data_centers_region_to_zone.csv: Electricity Maps' own table; wins on disagreement.
  - ccf_region_to_em_zone.csv: Cloud Carbon Footprint; used where Electricity Maps has no entry.
  - umass_gcp_dc_zonecode_mapper.json: umassos/decarbonization-potential; used last, keys normalised.
Zone keys are checked against those files and DIR/../annual/umass_em_zone_annual_mean_2020_2022.csv.
Exits with status 1 (snippet still printed) if a check fails, e.g. a region the hosted CarbonAware
scheduler supports is left without a zone, or a WattTime entry cites a region outside its zone.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterable
from pathlib import Path

Key = tuple[str, str]  # (provider, region)

PROVIDERS = ("aws", "gcp", "azure")
MAX_LINE = 110
SOURCE_NAMES = ("Electricity Maps", "CCF", "UMass")  # priority order
UMASS_FILE = "umass_gcp_dc_zonecode_mapper.json"

# Obsolete zone keys (found in the UMass mapper) -> current Electricity Maps keys.
NORMALISE: dict[str, str] = {
    "AUS-NSW": "AU-NSW",  # Electricity Maps uses the ISO 3166-2 prefix "AU-"
    "AUS-VIC": "AU-VIC",
    # Indian state zones were replaced by the five grid regions IN-NO/NE/EA/WE/SO
    # (electricitymaps-contrib issue #5676, PR #8005): Maharashtra is in the west, Delhi in the north.
    "IN-MH": "IN-WE",
    "IN-DL": "IN-NO",
}

# Input rows left out, with the reason. Also left out: Azure "*stage" names (internal staging locations,
# never a customer's region; CCF's northcentralusstage and westus2stage contradict their parent region).
DROP: dict[Key, str] = {
    ("azure", "unitedstates"): "geography alias spanning many zones",
    ("azure", "unitedstateseuap"): "geography alias spanning many zones",
    # East US 3 is announced for Fulton/Douglas counties, Georgia (Southern Company territory), not PJM:
    # azure.microsoft.com/blog/microsoft-will-establish-its-next-us-datacenter-region-in-georgia-s-fulton-
    # and-douglas-counties/ (2021-02-11); not yet launched.
    ("azure", "eastus3"): "Atlanta, GA; CCF's US-MIDA-PJM is wrong",
}


# Regions the hosted CarbonAware scheduler API supports (carbonaware-scheduler-client 1.3.0 types).
SCHEDULER_REGIONS: dict[str, str] = {
    "aws": "af-south-1 ap-east-1 ap-northeast-1 ap-northeast-2 ap-northeast-3 ap-south-1 ap-south-2"
    " ap-southeast-2 ap-southeast-3 ap-southeast-4 ap-southeast-5 ap-southeast-7 ca-central-1 ca-west-1"
    " eu-central-1 eu-central-2 eu-north-1 eu-south-1 eu-south-2 eu-west-1 eu-west-2 eu-west-3"
    " il-central-1 me-central-1 mx-central-1 sa-east-1 us-east-1 us-east-2 us-west-1 us-west-2",
    "gcp": "asia-east1 asia-northeast1 asia-southeast1 europe-north1 europe-west1 europe-west3"
    " europe-west4 northamerica-northeast2 southamerica-west1 us-central1 us-east1 us-east4 us-west1"
    " us-west2",
    "azure": "australiacentral australiaeast australiasoutheast brazilsouth canadacentral canadaeast"
    " centralindia centralus chinaeast2 chinanorth chinanorth2 chinanorth3 eastasia eastus eastus2"
    " francecentral germanywestcentral indonesiacentral israelcentral italynorth japaneast japanwest"
    " koreacentral mexicocentral newzealandnorth northcentralus northeurope norwayeast polandcentral"
    " southafricanorth southcentralus southindia spaincentral swedencentral switzerlandnorth uaenorth"
    " uksouth ukwest westcentralus westeurope westus westus2 westus3",
}

HEADER = (
    "# Cloud region -> Electricity Maps zone key. Built by scripts/build_region_table.py from facts in:",
    "#   Electricity Maps data_centers.json (electricitymaps-contrib @b354f28) -- wins on disagreement,",
    "#   Cloud Carbon Footprint packages/*/src/lib/*Regions.ts, umassos/decarbonization-potential mapper.",
)

# MANUAL: regions that none of the inputs covers -> (zone, "city; source of the location fact").
# Empty: every scheduler region above is covered by the inputs (checked in main()).
MANUAL: dict[Key, tuple[str, str]] = {}

# ---- Electricity Maps zone -> WattTime v3 region (signal co2_moer) ----
WT_SOURCES = (
    "[M] WattTime/watttime-python-client data/us_region_meta_data.csv @1282382 (WattTime's own list of",
    "    v3 co2_moer regions with full names, e.g. PACW = PacifiCorp West).",
    "[R] carbon-aware/scheduler scheduler/src/regions/mapping.json @cb0d9b9: answers of WattTime's",
    "    /v3/region-from-loc at Electricity Maps' data-centre coordinates, for the cloud regions listed.",
)
# Region names listed in [M].
WT_META = {"AZPS", "BPA", "CAISO_NORTH", "ERCOT_NORTHCENTRAL", "NEVP", "PACE", "PACW", "SCEG"}
# zone -> (WattTime region, cloud regions [R] places in it, note). Zones without an entry fall back.
WT_NOT_MAPPED = "# Not mapped: US-CENT-SWPP ([R] puts gcp us-central1 in MISO_WORTHINGTON, not SPP)."
WATTTIME: dict[str, tuple[str, tuple[str, ...], str]] = {
    "AE": ("ARE", ("aws me-central-1", "azure uaenorth"), ""),
    "AU-NSW": ("NEM_NSW", ("aws ap-southeast-2", "azure australiaeast", "azure australiacentral"), ""),
    "AU-VIC": ("NEM_VIC", ("aws ap-southeast-4", "azure australiasoutheast"), ""),
    "BE": ("BE", ("gcp europe-west1",), ""),
    "BR-CS": ("BRA", ("aws sa-east-1", "azure brazilsouth"), ""),
    "CA-AB": ("AESO", ("aws ca-west-1",), ""),
    "CA-ON": ("IESO_NORTH", ("azure canadacentral",), "[R] gcp Toronto -> PJM_WESTERN_KY ignored"),
    "CA-QC": ("HQ", ("aws ca-central-1", "azure canadaeast"), ""),
    "CH": ("CH", ("aws eu-central-2", "azure switzerlandnorth"), ""),
    "CL-SEN": ("CHL", ("gcp southamerica-west1",), ""),
    "CN": ("CHN", ("azure chinaeast2", "azure chinanorth"), ""),
    "DE": ("DE", ("aws eu-central-1", "azure germanywestcentral", "gcp europe-west3"), ""),
    "ES": ("ES", ("aws eu-south-2", "azure spaincentral"), ""),
    "FI": ("FI", ("gcp europe-north1",), ""),
    "FR": ("FR", ("aws eu-west-3", "azure francecentral"), ""),
    "GB": ("UK", ("aws eu-west-2", "azure uksouth", "azure ukwest"), ""),
    "HK": ("HKG", ("aws ap-east-1", "azure eastasia"), ""),
    "ID": ("IDN", ("aws ap-southeast-3", "azure indonesiacentral"), ""),
    "IE": ("IE", ("aws eu-west-1", "azure northeurope"), ""),
    "IL": ("ISR", ("aws il-central-1",), "[R] azure israelcentral -> JOR ignored"),
    "IN-SO": ("IND", ("aws ap-south-2", "azure southindia"), ""),
    "IN-WE": ("IND", ("aws ap-south-1", "azure centralindia"), ""),
    "IT-NO": ("IT", ("aws eu-south-1", "azure italynorth"), ""),
    "JP-KN": ("JP_KN", ("aws ap-northeast-3", "azure japanwest"), ""),
    "JP-TK": ("JP_TK", ("aws ap-northeast-1", "gcp asia-northeast1"), "[R] azure japaneast -> JP_TH ignored"),
    "KR": ("KOR", ("aws ap-northeast-2", "azure koreacentral"), ""),
    "MX": ("MX_SIN", ("aws mx-central-1", "azure mexicocentral"), ""),
    "MY-WM": ("MYS", ("aws ap-southeast-5",), ""),
    "NL": ("NL", ("gcp europe-west4",), "[R] azure westeurope -> DE ignored"),
    "NO-NO1": ("NO", ("azure norwayeast",), ""),
    "NZ": ("NZL", ("azure newzealandnorth",), ""),
    "PL": ("PL", ("azure polandcentral",), ""),
    "SE-SE3": ("SE", ("aws eu-north-1", "azure swedencentral"), ""),
    "SG": ("SGP", ("gcp asia-southeast1",), ""),
    "TH": ("THA", ("aws ap-southeast-7",), ""),
    "TW": ("TWN", ("gcp asia-east1",), ""),
    "US-CAL-CISO": ("CAISO_NORTH", ("aws us-west-1", "azure westus"), "gcp us-west2 is Los Angeles"),
    "US-CAR-SCEG": ("SCEG", ("gcp us-east1",), ""),
    "US-MIDA-PJM": ("PJM_DC", ("aws us-east-1", "azure eastus"), "N. Virginia; Ohio/Chicago sites differ"),
    "US-MIDW-MISO": ("MISO_WORTHINGTON", ("azure centralus",), "older mappings: MISO_MASON_CITY"),
    "US-NW-BPAT": ("BPA", (), "same BA; [R] puts azure westus2 in CHPD"),
    "US-NW-NEVP": ("NEVP", (), "same BA"),
    "US-NW-PACE": ("PACE", ("azure westcentralus",), "same BA"),
    "US-NW-PACW": ("PACW", (), "same BA; [R] puts aws us-west-2, gcp us-west1 in BPA"),
    "US-SW-AZPS": ("AZPS", ("azure westus3",), "same BA"),
    "US-TEX-ERCO": ("ERCOT_NORTHCENTRAL", (), "Dallas; [R] azure southcentralus -> ERCOT_EASTTX"),
    "ZA": ("ZAF", ("aws af-south-1", "azure southafricanorth"), ""),
}


def read_csv_zones(path: Path) -> dict[Key, str]:
    """(provider, region) -> zone for the three providers, skipping empty zones."""
    out: dict[Key, str] = {}
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            provider, region, zone = row["provider"], row["region"], row["em_zone"].strip()
            if provider not in PROVIDERS or not zone or region.lower() == "unknown":
                continue
            if provider == "azure":  # CCF spells some Azure names in CamelCase; Azure's names are lower case
                region = region.lower()
            out[(provider, region)] = zone
    return out


def wrap(prefix: str, items: Iterable[str], width: int = MAX_LINE) -> list[str]:
    """Comment lines listing items after prefix, each line at most width characters."""
    lines, line = [], prefix
    for item in items:
        if len(line) + len(item) + 2 > width:
            lines.append(line.rstrip())
            line = "#   "
        line += item + ", "
    return [*lines, line.rstrip(", ")]


def build(data: Path) -> tuple[list[str], list[str]]:
    """Return (snippet lines, problems)."""
    sources = [
        read_csv_zones(data / "electricitymaps_data_centers_region_to_zone.csv"),
        read_csv_zones(data / "ccf_region_to_em_zone.csv"),
        {("gcp", r): z for r, z in json.loads((data / UMASS_FILE).read_text()).items()},
    ]
    with (data.parent / "annual" / "umass_em_zone_annual_mean_2020_2022.csv").open(encoding="utf-8") as f:
        known = {row["zonecode"] for row in csv.DictReader(f)}
    known |= set(sources[0].values()) | set(sources[1].values())
    problems = [
        f"NORMALISE target {new} not in Electricity Maps' table"
        for new in NORMALISE.values()
        if new not in sources[0].values()
    ]
    allowed = known | NORMALISE.keys()
    problems += [f"unknown zone key {z} in input" for s in sources for z in s.values() if z not in allowed]

    table: dict[Key, str] = {}
    disagreements: list[str] = []
    applied: set[str] = set()
    named = list(zip(SOURCE_NAMES, sources, strict=True))
    for key in sorted(set().union(*sources) - DROP.keys()):
        if key[1].endswith("stage"):
            continue
        votes = [(name, NORMALISE.get(s[key], s[key])) for name, s in named if key in s]
        applied |= {f"{s[key]}->{NORMALISE[s[key]]}" for s in sources if s.get(key) in NORMALISE}
        table[key] = votes[0][1]
        losers = [f"{name} {zone}" for name, zone in votes[1:] if zone != table[key]]
        if losers:
            disagreements.append(f"{key[0]} {key[1]} ({table[key]} vs {' / '.join(losers)})")
    for key, (zone, _where) in MANUAL.items():
        if key in table or zone not in known:
            problems.append(f"MANUAL {key}: already covered or unknown zone {zone}")
        table[key] = zone
    problems += [
        f"scheduler region not covered: {p} {r}"
        for p, names in SCHEDULER_REGIONS.items()
        for r in names.split()
        if (p, r) not in table
    ]

    lines = [
        *HEADER,
        *wrap("# Disagreements resolved in favour of Electricity Maps (else CCF): ", disagreements),
        *wrap("# Obsolete UMass zone keys normalised: ", sorted(applied)),
        *wrap("# Dropped: ", [f"{p} {r} ({why})" for (p, r), why in sorted(DROP.items())]),
        "#   and Azure *stage names (internal staging, not customer regions).",
        "REGION_ZONES: dict[tuple[str, str], str] = {",
    ]
    for (provider, region), zone in sorted(table.items()):
        note = f"  # manual: {MANUAL[(provider, region)][1]}" if (provider, region) in MANUAL else ""
        lines.append(f'    ("{provider}", "{region}"): "{zone}",{note}')
    lines += ["}", "", "# Electricity Maps zone -> WattTime region (signal co2_moer). Sources:"]
    lines += [f"#   {source}" for source in WT_SOURCES]
    lines.append(WT_NOT_MAPPED)
    lines.append("ZONE_WATTTIME: dict[str, str] = {")
    zones_used = set(table.values())
    for zone, (wt_region, seen, note) in sorted(WATTTIME.items()):
        tags = ["[M]"] if wt_region in WT_META else []
        tags += ["[R] " + ", ".join(seen)] if seen else []
        if zone not in zones_used or not tags:
            problems.append(f"WATTTIME {zone}: zone unused or no source")
        for provider_region in seen:
            provider, region = provider_region.split()
            if table.get((provider, region)) != zone:
                problems.append(f"WATTTIME {zone}: {provider_region} is not in that zone")
        comment = "; ".join(tags + ([note] if note else []))
        lines.append(f'    "{zone}": "{wt_region}",  # {comment}')
    lines.append("}")
    problems += [f"line > {MAX_LINE} chars: {line[:40]}..." for line in lines if len(line) > MAX_LINE]
    return lines, problems


BEGIN_MARKER = "# BEGIN GENERATED"
END_MARKER = "# END GENERATED"


def replace_generated(text: str, lines: list[str]) -> str:
    """``text`` with the lines between its generated-block markers (kept as they are) replaced by ``lines``."""
    rows = text.split("\n")
    begins = [i for i, row in enumerate(rows) if row.startswith(BEGIN_MARKER)]
    ends = [i for i, row in enumerate(rows) if row.startswith(END_MARKER)]
    if len(begins) != 1 or len(ends) != 1 or ends[0] < begins[0]:
        raise ValueError(f"expected one {BEGIN_MARKER!r} line followed by one {END_MARKER!r} line")
    return "\n".join([*rows[: begins[0] + 1], *lines, *rows[ends[0] :]])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/mappings"), help="mappings dir")
    parser.add_argument(
        "--write", nargs="?", const=Path("carbonaware_core.py"), type=Path, help="rewrite the generated block in place"
    )
    args = parser.parse_args()
    lines, problems = build(args.data)
    if args.write is None:
        print("\n".join(lines))
    else:
        args.write.write_text(replace_generated(args.write.read_text(), lines))
        print(f"rewrote the generated block of {args.write}", file=sys.stderr)
    counts = {p: sum(line.startswith(f'    ("{p}"') for line in lines) for p in PROVIDERS}
    print(f"regions per provider: {counts}", file=sys.stderr)
    for problem in problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
