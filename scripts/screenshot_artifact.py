"""Screenshot the Prefect UI's page for a carbonaware decision artifact, for the README (not part of CI).

    python scripts/screenshot_artifact.py [--out docs/prefect-artifact.png] [--kind table|markdown]

Starts ``prefect server`` in its own process (a temporary PREFECT_HOME, loopback only), runs an example flow whose
decorated task decides against a fixed forecast (400 gCO2eq/kWh for two hours, then 100; 2.5 kW for an hour;
CARBONAWARE_DRY_RUN, so nothing waits), then loads the artifact's page in headless Chromium (Debian's ``chromium``
package) and writes the PNG.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from _common import prefect_server  # noqa: E402 - the benchmarks' server helper

FLOW = r"""
import sys
from datetime import datetime, timedelta
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
import carbonaware_prefect as cp
from carbonaware_core import ForecastPoint

def forecast(zone, now, end):
    start = now.replace(minute=0, second=0, microsecond=0)
    return [ForecastPoint(start + timedelta(hours=i), start + timedelta(hours=i + 1), 400.0 if i < 2 else 100.0)
            for i in range(12)]

@task(name="nightly-training")
@cp.carbonaware_delay_decorator(window=timedelta(hours=6), duration=timedelta(hours=1), source=forecast,
                                grid_zone="DE", power_kw=2.5)
def train() -> str:
    return "trained"

@flow(name="carbonaware-example")
def example() -> str:
    return train()

example()
cp.flush_reports(30.0)
key = "carbonaware-nightly-training" + ("-decisions" if sys.argv[1] == "table" else "")
with get_client(sync_client=True) as client:
    artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
print(artifacts[-1].id)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "prefect-artifact.png"))
    parser.add_argument("--kind", choices=("table", "markdown"), default="table")
    parser.add_argument("--size", default="1800,560")
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("needs Chromium: apt-get install -y chromium")
    home = tempfile.mkdtemp(prefix="carbonaware-screenshot-")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "CARBONAWARE_"))}
    env.update(PREFECT_HOME=home, DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    with prefect_server(env) as api:
        flow_env = {**env, "PREFECT_API_URL": api, "CARBONAWARE_DRY_RUN": "1", "PYTHONPATH": str(ROOT)}
        ran = subprocess.run(
            [sys.executable, "-c", FLOW, args.kind], env=flow_env, cwd=ROOT, capture_output=True, text=True, check=True
        )
        artifact_id = ran.stdout.strip().splitlines()[-1]
        page = f"{api.removesuffix('/api')}/artifacts/artifact/{artifact_id}"
        subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--window-size={args.size}", "--virtual-time-budget=20000", f"--screenshot={args.out}", page],
            check=True, capture_output=True, timeout=180,
        )  # fmt: skip
        print(f"{args.out}: {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
