"""A nightly cron deployment that may start any time in the six hours after its cron time, at the greenest start.

One line makes it carbon-aware: ``@carbonaware_schedule(...)`` above ``@flow``. The cron run plans, creates a run of
the same deployment at the best start (tag ``carbonaware-rescheduled``, a decision artifact) and ends as
``Completed``/``Rescheduled``; no worker sleeps in between. If every source fails, or the run started after its
margin, it runs at once. The same flow serves all three deployment styles:

    python examples/recurring_deployment.py serve     # flow.serve(cron=...): this process runs the runs
    python examples/recurring_deployment.py deploy    # flow.deploy(cron=...): a work pool's workers run them
    prefect deploy --prefect-file examples/prefect.yaml --all   # prefect.yaml, same entrypoint and cron
"""

import sys
from datetime import timedelta
from pathlib import Path

from prefect import flow

from carbonaware_prefect import carbonaware_schedule


@carbonaware_schedule(window=timedelta(hours=6), duration=timedelta(minutes=30), provider="gcp", region="europe-west2")
@flow(log_prints=True)
def nightly_report(day: str = "today") -> None:
    print(f"Building the report for {day}")


if __name__ == "__main__":
    if sys.argv[1:] == ["deploy"]:
        here = Path(__file__).resolve().parent
        nightly_report.from_source(str(here), "recurring_deployment.py:nightly_report").deploy(
            name="carbon-aware-nightly",
            work_pool_name="my-pool",  # a process work pool: prefect work-pool create my-pool --type process
            cron="0 1 * * *",
        )
    else:
        nightly_report.serve(name="carbon-aware-nightly", cron="0 1 * * *")
