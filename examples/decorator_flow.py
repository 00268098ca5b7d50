"""The original package's decorator example, unchanged apart from a short demo window, an offline source and a
region the offline model covers (London).

Run it with ``python examples/decorator_flow.py``: no network is needed (the typical-day profile, or, if that data
file is not installed, a logged fail-open that runs the task at once). A 10-second window rarely beats starting
now on hourly data, so expect "already-best"; to see a real decision without waiting for it, run with
``CARBONAWARE_DRY_RUN=1`` and a window of hours. In production drop ``source`` to use the hosted forecast and give
the window in hours.
"""

import time
from datetime import timedelta

from prefect import flow, task

from carbonaware_prefect import carbonaware_delay_decorator


# This task will delay execution until a CO2-optimal window is available
@task
@carbonaware_delay_decorator(
    provider="gcp",  # Optional, if workload is running in the cloud (azure, aws, or gcp)
    region="europe-west2",  # Optional, if workload is running in the cloud
    window=timedelta(seconds=10),  # Max time to wait for a better time (real jobs: hours)
    duration=timedelta(minutes=30),  # Estimated duration of the job
    source="offline",  # Demo without network; omit to use the hosted forecast
)
def train_model() -> None:
    print("✅ Training started at carbon-optimal time!")
    time.sleep(1)  # Simulated training workload
    print("🏁 Training completed!")


@flow(log_prints=True)
def training_pipeline() -> None:
    print("🚀 Launching carbon-aware training pipeline...")
    train_model()


if __name__ == "__main__":
    training_pipeline()
