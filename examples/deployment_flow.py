"""Schedule a deployment run at the lowest-carbon start instead of holding a worker while it waits.

``python examples/deployment_flow.py`` registers the deployment with the Prefect API (a temporary local server if
PREFECT_API_URL is unset), plans, creates one run scheduled at the best start within six hours, and exits at once.
``python examples/deployment_flow.py serve`` then runs the scheduled runs when they are due.
"""

import sys
from datetime import timedelta

from prefect import flow

from carbonaware_prefect import carbonaware_run_deployment, reschedule_current_flow_run

ZONE = {"provider": "gcp", "region": "europe-west2"}


@flow(log_prints=True)
def nightly_report(day: str = "today"):
    # A run started by a schedule or by hand can also hand itself over to a later, greener run of the same
    # deployment and end at once; the later run carries the tag "carbonaware-rescheduled" and never moves again.
    handed_over = reschedule_current_flow_run(
        window=timedelta(hours=6), duration=timedelta(minutes=30), source="offline", **ZONE
    )
    if handed_over:
        return handed_over
    print(f"📊 Building the report for {day}")


def schedule_one_run() -> None:
    nightly_report.to_deployment(name="carbon-aware").apply()
    flow_run, plan = carbonaware_run_deployment(
        "nightly-report/carbon-aware",
        window=timedelta(hours=6),  # The run starts within six hours...
        duration=timedelta(minutes=30),  # ...at the start that makes this half hour greenest
        parameters={"day": "today"},
        source="offline",  # Demo without network; omit to use the hosted forecast
        **ZONE,
    )
    print(f"Flow run {flow_run.name!r} scheduled for {plan.start:%Y-%m-%d %H:%M} UTC ({plan.reason})")


if __name__ == "__main__":
    if sys.argv[1:] == ["serve"]:
        nightly_report.serve(name="carbon-aware")
    else:
        schedule_one_run()
