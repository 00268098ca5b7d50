"""Flows and tasks the Prefect tests run where pickling or a fresh process needs them importable by path.

Deployment runs execute in a subprocess started by a Prefect runner, which loads the flow from this file; the
process-pool task runner unpickles tasks in spawned processes. Both need module-level objects, not test locals.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from prefect import State, flow, task

from carbonaware_core import ForecastPoint, Plan
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


# --------------------------------------------------------------------------------------------------------------
# One Prefect test server for every Prefect test module of a session
# --------------------------------------------------------------------------------------------------------------


_SESSION_SERVER = ExitStack()  # the test server this process started, and its settings; closed at session end


@contextmanager
def prefect_server() -> Iterator[str]:
    """The API URL of the session's Prefect test server, started by the first module that asks (each start costs
    seconds, so it serves every later module too; its settings stay active until ``stop_session_server()``, which
    tests/conftest.py calls when the session ends)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    url = PREFECT_API_URL.value()
    if not (url and urlsplit(url).hostname == "127.0.0.1"):
        _SESSION_SERVER.enter_context(prefect_test_harness(server_startup_timeout=None))
        url = PREFECT_API_URL.value()
    yield url


def stop_session_server() -> None:
    """Stop the session's test server, if this process started one (its logs and events drained first)."""
    _SESSION_SERVER.close()


# --------------------------------------------------------------------------------------------------------------
# Ctrl-C: a real process, a real SIGINT (run with ``python -c``, see tests/test_prefect_attack.py)
# --------------------------------------------------------------------------------------------------------------

CHEAP_AFTER = timedelta(seconds=45)  # the forecast's cheap hour begins this long after each planning


def cheap_later(zone: object, now: datetime, end: datetime) -> list[ForecastPoint]:
    """A forecast source: dear now, cheap from ``CHEAP_AFTER`` on, so every decorated task waits about 45 s."""
    step = timedelta(seconds=5)
    return [
        ForecastPoint(now + step * i, now + step * (i + 1), 100.0 if step * i >= CHEAP_AFTER else 500.0)
        for i in range(-1, 30)
    ]


def ctrl_c_flow_main(markers: str, tasks: int) -> None:
    """A flow that ``.map()``s decorated tasks which then wait in worker threads. Each writes ``waiting-*`` once
    its wait is decided (the run ids in it) and ``ran-*`` if its body ever runs."""
    import json
    import signal
    import threading

    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if started with SIGINT ignored

    from prefect.context import FlowRunContext, TaskRunContext

    def mark_waiting(plan: Plan) -> None:
        flow_ctx, task_ctx = FlowRunContext.get(), TaskRunContext.get()
        ids = {
            "flow_run": str(flow_ctx.flow_run.id) if flow_ctx and flow_ctx.flow_run else None,
            "task_run": str(task_ctx.task_run.id) if task_ctx else None,
            "delay": plan.delay.total_seconds(),
            "thread": threading.current_thread().name,
        }
        with open(os.path.join(markers, f"waiting-{threading.get_ident()}"), "w") as handle:
            json.dump(ids, handle)

    @task
    @carbonaware_delay_decorator(
        window=timedelta(seconds=60), duration=timedelta(seconds=5), source=cheap_later, on_plan=mark_waiting, **ZONE
    )
    def job(item: int) -> int:
        with open(os.path.join(markers, f"ran-{item}"), "w") as handle:
            handle.write("the body ran")
        return item

    @flow(name="carbonaware-ctrl-c")
    def pipeline() -> list[int]:
        return job.map(list(range(tasks))).result()

    pipeline()


# --------------------------------------------------------------------------------------------------------------
# Cancelling a served run whose task waits in a worker thread (deployment runs load this file by path)
# --------------------------------------------------------------------------------------------------------------


def _mark_cancel_probe_waiting(plan: Plan) -> None:
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is not None:
        with open(os.path.join(ctx.parameters["markers"], "waiting"), "w") as handle:
            handle.write(f"{os.getpid()} {plan.delay.total_seconds()}")


@task
@carbonaware_delay_decorator(
    window=timedelta(seconds=60),
    duration=timedelta(seconds=5),
    source=cheap_later,
    on_plan=_mark_cancel_probe_waiting,
    **ZONE,
)
def cancel_probe_job(markers: str) -> str:
    with open(os.path.join(markers, "ran"), "w") as handle:
        handle.write("the body ran")
    return "ran"


@flow(name="carbonaware-cancel-probe")
def cancel_probe_flow(markers: str) -> str:
    """Its task waits about 45 s in a worker thread (``.submit()``), where the runner's SIGTERM never lands."""
    return cancel_probe_job.submit(markers).result()


def published_artifact(key: str) -> Any:
    """The latest artifact under ``key`` once the background publisher has sent what it holds: decisions that do
    not wait publish their artifacts off the task's path, a moment after the run."""
    from prefect.artifacts import Artifact

    import carbonaware_prefect

    carbonaware_prefect.flush_reports(30.0)
    return Artifact.get(key)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll until ``predicate`` returns something truthy (the API has no event to wait on); fail with ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
