"""Flows and tasks the Prefect tests run where pickling or a fresh process needs them importable by path.

Deployment runs execute in a subprocess started by a Prefect runner, which loads the flow from this file; the
process-pool task runner unpickles tasks in spawned processes. Both need module-level objects, not test locals.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta

from prefect import State, flow, task

from carbonaware_prefect import areschedule_current_flow_run, carbonaware_delay_decorator, reschedule_current_flow_run

WINDOW = timedelta(minutes=5)
DURATION = timedelta(minutes=1)
ZONE = {"provider": "aws", "region": "us-east-1"}


@task
@carbonaware_delay_decorator(window=WINDOW, duration=DURATION, **ZONE)
def started_in_process(item: int) -> tuple[int, float, int]:
    """When and in which process the body began."""
    return item, time.time(), os.getpid()


@flow(name="carbonaware-scheduled")
def scheduled_flow(label: str) -> str:
    """A deployment whose run is scheduled by carbonaware_run_deployment; the API records when it started."""
    return label


@flow(name="carbonaware-handover")
def handover_flow(label: str) -> State | str:
    """A deployment run that hands itself over to a later run at the best start."""
    handed_over = reschedule_current_flow_run(window=WINDOW, duration=DURATION, **ZONE)
    if handed_over is not None:
        return handed_over
    return label


@flow(name="carbonaware-handover-async")
async def handover_flow_async(label: str) -> State | str:
    """The same for async flows."""
    handed_over = await areschedule_current_flow_run(
        window=WINDOW, duration=DURATION, artifact="handover-async", **ZONE
    )
    if handed_over is not None:
        return handed_over
    return label
