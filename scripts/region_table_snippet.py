# Cloud region -> Electricity Maps zone key. Built by scripts/build_region_table.py from facts in:
#   Electricity Maps data_centers.json (electricitymaps-contrib @b354f28) -- wins on disagreement,
#   Cloud Carbon Footprint packages/*/src/lib/*Regions.ts, umassos/decarbonization-potential mapper.
# Disagreements resolved in favour of Electricity Maps (else CCF):
#   azure northcentralus (US-MIDA-PJM vs CCF US-MIDW-MISO), azure westus2 (US-NW-BPAT vs CCF US-NW-PACE),
#   azure westus3 (US-SW-AZPS vs CCF US-NW-PACE), gcp us-central1 (US-CENT-SWPP vs CCF US-MIDW-MISO),
#   gcp us-east1 (US-CAR-SCEG vs UMass US-CAR-SC)
# Obsolete UMass zone keys normalised: AUS-NSW->AU-NSW, AUS-VIC->AU-VIC, IN-DL->IN-NO, IN-MH->IN-WE
# Dropped: azure eastus3 (Atlanta, GA; CCF's US-MIDA-PJM is wrong),
#   azure unitedstates (geography alias spanning many zones),
#   azure unitedstateseuap (geography alias spanning many zones)
#   and Azure *stage names (internal staging, not customer regions).
REGION_ZONES: dict[tuple[str, str], str] = {
    ("aws", "af-south-1"): "ZA",
    ("aws", "ap-east-1"): "HK",
    ("aws", "ap-northeast-1"): "JP-TK",
    ("aws", "ap-northeast-2"): "KR",
    ("aws", "ap-northeast-3"): "JP-KN",
    ("aws", "ap-south-1"): "IN-WE",
    ("aws", "ap-south-2"): "IN-SO",
    ("aws", "ap-southeast-1"): "SG",
    ("aws", "ap-southeast-2"): "AU-NSW",
    ("aws", "ap-southeast-3"): "ID",
    ("aws", "ap-southeast-4"): "AU-VIC",
    ("aws", "ap-southeast-5"): "MY-WM",
    ("aws", "ap-southeast-6"): "NZ",
    ("aws", "ap-southeast-7"): "TH",
    ("aws", "ca-central-1"): "CA-QC",
    ("aws", "ca-west-1"): "CA-AB",
    ("aws", "eu-central-1"): "DE",
    ("aws", "eu-central-2"): "CH",
    ("aws", "eu-north-1"): "SE-SE3",
    ("aws", "eu-south-1"): "IT-NO",
    ("aws", "eu-south-2"): "ES",
    ("aws", "eu-west-1"): "IE",
    ("aws", "eu-west-2"): "GB",
    ("aws", "eu-west-3"): "FR",
    ("aws", "il-central-1"): "IL",
    ("aws", "me-central-1"): "AE",
    ("aws", "me-south-1"): "BH",
    ("aws", "mx-central-1"): "MX",
    ("aws", "sa-east-1"): "BR-CS",
    ("aws", "us-east-1"): "US-MIDA-PJM",
    ("aws", "us-east-2"): "US-MIDA-PJM",
    ("aws", "us-gov-east-1"): "US-MIDA-PJM",
    ("aws", "us-gov-west-1"): "US-NW-PACW",
    ("aws", "us-west-1"): "US-CAL-CISO",
    ("aws", "us-west-2"): "US-NW-PACW",
    ("azure", "apsoutheast"): "SG",
    ("azure", "australiacentral"): "AU-NSW",
    ("azure", "australiacentral2"): "AU-NSW",
    ("azure", "australiaeast"): "AU-NSW",
    ("azure", "australiasoutheast"): "AU-VIC",
    ("azure", "brazilsouth"): "BR-CS",
    ("azure", "brazilsoutheast"): "BR-CS",
    ("azure", "canadacentral"): "CA-ON",
    ("azure", "canadaeast"): "CA-QC",
    ("azure", "centralindia"): "IN-WE",
    ("azure", "centralus"): "US-MIDW-MISO",
    ("azure", "centraluseuap"): "US-MIDW-MISO",
    ("azure", "chinaeast"): "CN",
    ("azure", "chinaeast2"): "CN",
    ("azure", "chinanorth"): "CN",
    ("azure", "chinanorth2"): "CN",
    ("azure", "chinanorth3"): "CN",
    ("azure", "eastasia"): "HK",
    ("azure", "eastus"): "US-MIDA-PJM",
    ("azure", "eastus2"): "US-MIDA-PJM",
    ("azure", "eastus2euap"): "US-MIDA-PJM",
    ("azure", "francecentral"): "FR",
    ("azure", "francesouth"): "FR",
    ("azure", "germany"): "DE",
    ("azure", "germanynorth"): "DE",
    ("azure", "germanywestcentral"): "DE",
    ("azure", "indonesiacentral"): "ID",
    ("azure", "israelcentral"): "IL",
    ("azure", "italynorth"): "IT-NO",
    ("azure", "japaneast"): "JP-TK",
    ("azure", "japanwest"): "JP-KN",
    ("azure", "koreacentral"): "KR",
    ("azure", "koreasouth"): "KR",
    ("azure", "mexicocentral"): "MX",
    ("azure", "newzealandnorth"): "NZ",
    ("azure", "northcentralus"): "US-MIDA-PJM",
    ("azure", "northeurope"): "IE",
    ("azure", "norwayeast"): "NO-NO1",
    ("azure", "norwaywest"): "NO-NO2",
    ("azure", "polandcentral"): "PL",
    ("azure", "qatarcentral"): "QA",
    ("azure", "southafricanorth"): "ZA",
    ("azure", "southafricawest"): "ZA",
    ("azure", "southcentralus"): "US-TEX-ERCO",
    ("azure", "southeastasia"): "SG",
    ("azure", "southindia"): "IN-SO",
    ("azure", "spaincentral"): "ES",
    ("azure", "swedencentral"): "SE-SE3",
    ("azure", "switzerlandnorth"): "CH",
    ("azure", "switzerlandwest"): "CH",
    ("azure", "uaecentral"): "AE",
    ("azure", "uaenorth"): "AE",
    ("azure", "uk"): "GB",
    ("azure", "uksouth"): "GB",
    ("azure", "ukwest"): "GB",
    ("azure", "usnorth"): "US-MIDW-MISO",
    ("azure", "westcentralus"): "US-NW-PACE",
    ("azure", "westeurope"): "NL",
    ("azure", "westindia"): "IN-WE",
    ("azure", "westus"): "US-CAL-CISO",
    ("azure", "westus2"): "US-NW-BPAT",
    ("azure", "westus3"): "US-SW-AZPS",
    ("gcp", "africa-south1"): "ZA",
    ("gcp", "asia-east1"): "TW",
    ("gcp", "asia-east2"): "HK",
    ("gcp", "asia-northeast1"): "JP-TK",
    ("gcp", "asia-northeast2"): "JP-KN",
    ("gcp", "asia-northeast3"): "KR",
    ("gcp", "asia-south1"): "IN-WE",
    ("gcp", "asia-south2"): "IN-NO",
    ("gcp", "asia-southeast1"): "SG",
    ("gcp", "asia-southeast2"): "ID",
    ("gcp", "asia-southeast3"): "TH",
    ("gcp", "australia-southeast1"): "AU-NSW",
    ("gcp", "australia-southeast2"): "AU-VIC",
    ("gcp", "europe-central2"): "PL",
    ("gcp", "europe-north1"): "FI",
    ("gcp", "europe-north2"): "SE-SE3",
    ("gcp", "europe-southwest1"): "ES",
    ("gcp", "europe-west1"): "BE",
    ("gcp", "europe-west10"): "DE",
    ("gcp", "europe-west12"): "IT-NO",
    ("gcp", "europe-west2"): "GB",
    ("gcp", "europe-west3"): "DE",
    ("gcp", "europe-west4"): "NL",
    ("gcp", "europe-west6"): "CH",
    ("gcp", "europe-west8"): "IT-NO",
    ("gcp", "europe-west9"): "FR",
    ("gcp", "me-central1"): "QA",
    ("gcp", "me-central2"): "SA",
    ("gcp", "me-west1"): "IL",
    ("gcp", "northamerica-northeast1"): "CA-QC",
    ("gcp", "northamerica-northeast2"): "CA-ON",
    ("gcp", "northamerica-south1"): "MX",
    ("gcp", "southamerica-east1"): "BR-CS",
    ("gcp", "southamerica-west1"): "CL-SEN",
    ("gcp", "us-central1"): "US-CENT-SWPP",
    ("gcp", "us-central2"): "US-MIDW-MISO",
    ("gcp", "us-east1"): "US-CAR-SCEG",
    ("gcp", "us-east4"): "US-MIDA-PJM",
    ("gcp", "us-east5"): "US-MIDA-PJM",
    ("gcp", "us-south1"): "US-TEX-ERCO",
    ("gcp", "us-west1"): "US-NW-PACW",
    ("gcp", "us-west2"): "US-CAL-CISO",
    ("gcp", "us-west3"): "US-NW-PACE",
    ("gcp", "us-west4"): "US-NW-NEVP",
}

# Electricity Maps zone -> WattTime region (signal co2_moer). Sources:
#   [M] WattTime/watttime-python-client data/us_region_meta_data.csv @1282382 (WattTime's own list of
#       v3 co2_moer regions with full names, e.g. PACW = PacifiCorp West).
#   [R] carbon-aware/scheduler scheduler/src/regions/mapping.json @cb0d9b9: answers of WattTime's
#       /v3/region-from-loc at Electricity Maps' data-centre coordinates, for the cloud regions listed.
# Not mapped: US-CENT-SWPP ([R] puts gcp us-central1 in MISO_WORTHINGTON, not SPP).
ZONE_WATTTIME: dict[str, str] = {
    "AE": "ARE",  # [R] aws me-central-1, azure uaenorth
    "AU-NSW": "NEM_NSW",  # [R] aws ap-southeast-2, azure australiaeast, azure australiacentral
    "AU-VIC": "NEM_VIC",  # [R] aws ap-southeast-4, azure australiasoutheast
    "BE": "BE",  # [R] gcp europe-west1
    "BR-CS": "BRA",  # [R] aws sa-east-1, azure brazilsouth
    "CA-AB": "AESO",  # [R] aws ca-west-1
    "CA-ON": "IESO_NORTH",  # [R] azure canadacentral; [R] gcp Toronto -> PJM_WESTERN_KY ignored
    "CA-QC": "HQ",  # [R] aws ca-central-1, azure canadaeast
    "CH": "CH",  # [R] aws eu-central-2, azure switzerlandnorth
    "CL-SEN": "CHL",  # [R] gcp southamerica-west1
    "CN": "CHN",  # [R] azure chinaeast2, azure chinanorth
    "DE": "DE",  # [R] aws eu-central-1, azure germanywestcentral, gcp europe-west3
    "ES": "ES",  # [R] aws eu-south-2, azure spaincentral
    "FI": "FI",  # [R] gcp europe-north1
    "FR": "FR",  # [R] aws eu-west-3, azure francecentral
    "GB": "UK",  # [R] aws eu-west-2, azure uksouth, azure ukwest
    "HK": "HKG",  # [R] aws ap-east-1, azure eastasia
    "ID": "IDN",  # [R] aws ap-southeast-3, azure indonesiacentral
    "IE": "IE",  # [R] aws eu-west-1, azure northeurope
    "IL": "ISR",  # [R] aws il-central-1; [R] azure israelcentral -> JOR ignored
    "IN-SO": "IND",  # [R] aws ap-south-2, azure southindia
    "IN-WE": "IND",  # [R] aws ap-south-1, azure centralindia
    "IT-NO": "IT",  # [R] aws eu-south-1, azure italynorth
    "JP-KN": "JP_KN",  # [R] aws ap-northeast-3, azure japanwest
    "JP-TK": "JP_TK",  # [R] aws ap-northeast-1, gcp asia-northeast1; [R] azure japaneast -> JP_TH ignored
    "KR": "KOR",  # [R] aws ap-northeast-2, azure koreacentral
    "MX": "MX_SIN",  # [R] aws mx-central-1, azure mexicocentral
    "MY-WM": "MYS",  # [R] aws ap-southeast-5
    "NL": "NL",  # [R] gcp europe-west4; [R] azure westeurope -> DE ignored
    "NO-NO1": "NO",  # [R] azure norwayeast
    "NZ": "NZL",  # [R] azure newzealandnorth
    "PL": "PL",  # [R] azure polandcentral
    "SE-SE3": "SE",  # [R] aws eu-north-1, azure swedencentral
    "SG": "SGP",  # [R] gcp asia-southeast1
    "TH": "THA",  # [R] aws ap-southeast-7
    "TW": "TWN",  # [R] gcp asia-east1
    "US-CAL-CISO": "CAISO_NORTH",  # [M]; [R] aws us-west-1, azure westus; gcp us-west2 is Los Angeles
    "US-CAR-SCEG": "SCEG",  # [M]; [R] gcp us-east1
    "US-MIDA-PJM": "PJM_DC",  # [R] aws us-east-1, azure eastus; N. Virginia; Ohio/Chicago sites differ
    "US-MIDW-MISO": "MISO_WORTHINGTON",  # [R] azure centralus; older mappings: MISO_MASON_CITY
    "US-NW-BPAT": "BPA",  # [M]; same BA; [R] puts azure westus2 in CHPD
    "US-NW-NEVP": "NEVP",  # [M]; same BA
    "US-NW-PACE": "PACE",  # [M]; [R] azure westcentralus; same BA
    "US-NW-PACW": "PACW",  # [M]; same BA; [R] puts aws us-west-2, gcp us-west1 in BPA
    "US-SW-AZPS": "AZPS",  # [M]; [R] azure westus3; same BA
    "US-TEX-ERCO": "ERCOT_NORTHCENTRAL",  # [M]; Dallas; [R] azure southcentralus -> ERCOT_EASTTX
    "ZA": "ZAF",  # [R] aws af-south-1, azure southafricanorth
}
