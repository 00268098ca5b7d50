"""Flows for tests/test_prefect_native*.py that a Prefect runner loads by path in a fresh process (module level)."""

from __future__ import annotations

import os
from datetime import datetime, timedelta

from prefect import flow, task

from carbonaware_core import CloudZone, ForecastPoint
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
# Distributed task runners: tasks that Dask worker processes unpickle
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
