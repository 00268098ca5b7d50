"""The original package's task-factory example: a delay task runs first, then the work.

Run it with ``python examples/task_factory_flow.py`` (no network needed, see decorator_flow.py). The delay task
returns its decision, so the work can wait for it with ``wait_for=`` and read why it started when it did.
"""

import time
from datetime import timedelta

from prefect import flow, task

from carbonaware_prefect import carbonaware_delay_task


@task
def train_model() -> None:
    print("✅ Training started at carbon-optimal time!")
    time.sleep(1)  # Simulated training workload
    print("🏁 Training completed!")


@flow(log_prints=True)
def training_pipeline() -> None:
    print("🚀 Launching carbon-aware training pipeline...")

    # Create a carbon-aware delay task with specific parameters
    delay = carbonaware_delay_task(
        provider="gcp",  # Optional, if workload is running in the cloud (azure, aws, or gcp)
        region="europe-west2",  # Optional, if workload is running in the cloud
        window=timedelta(seconds=10),  # Max time to wait for a better time (real jobs: hours)
        duration=timedelta(minutes=30),  # Estimated duration of the job
        source="offline",  # Demo without network; omit to use the hosted forecast
        retries=1,  # Any @task keyword works too
    )

    # Execute the delay task first; it returns the decision (Plan.to_dict())
    decision = delay.submit()
    print(f"Decision: {decision.result()['reason']}")

    # Then run the actual training task once the delay is over
    train_model.submit(wait_for=[decision]).result()


if __name__ == "__main__":
    training_pipeline()
