"""Flows for tests/test_prefect_native*.py that a Prefect runner loads by path in a fresh process (module level)."""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from typing import Any

from prefect import flow, task

from carbonaware_core import CloudZone, ForecastPoint, Plan
from carbonaware_prefect import carbonaware_delay_decorator, carbonaware_delay_task, carbonaware_schedule

WINDOW = timedelta(minutes=5)
DURATION = timedelta(minutes=1)
ZONE = {"provider": "aws", "region": "us-east-1"}


@carbonaware_schedule(window=WINDOW, duration=DURATION, **ZONE)
@flow(name="carbonaware-nightly")
def nightly(label: str) -> str:
    """A cron deployment's flow made carbon-aware by one line; the hosted scheduler (loopback) decides."""
    return label


@carbonaware_schedule(window=WINDOW, duration=DURATION, artifact="nightly-async", **ZONE)
@flow(name="carbonaware-nightly-async")
async def nightly_async(label: str) -> str:
    return label


def every_source_down(zone: CloudZone | None, now: datetime, end: datetime) -> list[ForecastPoint]:
    raise ConnectionError("every forecast source is down")


@carbonaware_schedule(window=WINDOW, duration=DURATION, source=every_source_down, **ZONE)
@flow(name="carbonaware-nightly-no-source")
def nightly_no_source(label: str) -> str:
    """With every source failing, the cron run itself runs at once: a run is guaranteed within the margin."""
    return label


# --------------------------------------------------------------------------------------------------------------
# Distributed task runners: tasks that Dask and Ray worker processes unpickle
# --------------------------------------------------------------------------------------------------------------


def _worker_settings() -> object:
    from carbonaware_prefect import CarbonAwareSettings, ElectricityMapsCredentials
    from tests.fake_providers import EM_KEY

    # A block object, not a name: it travels with the pickled task to every worker process.
    return CarbonAwareSettings(source="electricitymaps", electricitymaps=ElectricityMapsCredentials(api_key=EM_KEY))


WORKER_SETTINGS = _worker_settings()


@task
@carbonaware_delay_decorator(
    window=timedelta(hours=2), duration=timedelta(minutes=30), grid_zone="DE", dry_run=True, settings=WORKER_SETTINGS
)
def on_a_worker_with_block(item: int) -> tuple[int, int]:
    return item, os.getpid()


delay_on_a_worker = carbonaware_delay_task(
    window=timedelta(hours=2), duration=timedelta(minutes=30), grid_zone="DE", dry_run=True, settings=WORKER_SETTINGS
)


@task
def sends_reports_before_returning() -> bool:
    """Whether a decorated run here would send its queued reports before returning (in worker processes only)."""
    import carbonaware_prefect

    return carbonaware_prefect._in_a_worker_process()


# Ray: every decision also notes which worker process planned it, so a test can count requests per process.
PLANNED_IN = "TEST_PLANNED_IN"  # environment variable: a directory, inherited by the worker processes
RAY_OPTIONS: dict[str, Any] = {
    "window": timedelta(hours=2),
    "duration": timedelta(minutes=30),
    "grid_zone": "DE",
    "dry_run": True,
    "settings": WORKER_SETTINGS,
}


def note_planning_process(plan: Plan) -> None:
    """An ``on_plan`` hook: one file per decision, named by the process that made it."""
    import uuid

    directory = os.environ.get(PLANNED_IN)
    if directory:
        with open(os.path.join(directory, f"{os.getpid()}-{uuid.uuid4().hex}"), "w") as handle:
            handle.write(plan.reason)


@task
@carbonaware_delay_decorator(**RAY_OPTIONS, on_plan=note_planning_process)
def on_a_ray_worker(item: int) -> tuple[int, int]:
    return item, os.getpid()


@task
@carbonaware_delay_decorator(**RAY_OPTIONS, on_plan=note_planning_process)
async def on_a_ray_worker_async(item: int) -> tuple[int, int]:
    """prefect-ray runs async tasks with ``asyncio.run`` in the worker process."""
    return item, os.getpid()


delay_on_a_ray_worker = carbonaware_delay_task(**RAY_OPTIONS, on_plan=note_planning_process)


def library_file() -> str:
    """Which ``carbonaware_prefect`` a worker process imports (this checkout, or an installed one)."""
    import carbonaware_prefect

    return os.path.realpath(carbonaware_prefect.__file__)
