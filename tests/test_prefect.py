"""The Prefect integration against a real Prefect server (test harness) and a real scheduler on loopback.

Waits are real (about a second each) where the test is about timing; nothing in the network stack is mocked.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
import threading
import time
from collections.abc import AsyncGenerator, Callable, Generator, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from prefect import flow, get_client, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, LogFilter, LogFilterTaskRunId
from prefect.client.schemas.objects import FlowRun
from prefect.runner import Runner
from prefect.task_runners import ProcessPoolTaskRunner
from prefect.utilities.callables import parameter_schema

import carbonaware_core
import carbonaware_prefect as cp
from tests import prefect_helpers as helpers
from tests.loopback import LoopbackServer, Reply, Seen, serving
from tests.prefect_helpers import wait_for

ZONE = {"provider": "aws", "region": "us-east-1"}
WINDOW = timedelta(minutes=5)
DURATION = timedelta(minutes=1)
IDEAL_LBS, NAIVE_LBS = 500.0, 800.0  # lbs/MWh: 226.8 and 362.9 g/kWh, 37.5 % saved
SLACK = 1.0  # seconds a body may start after the ideal time (thread hand-offs, Prefect state calls)


@pytest.fixture(scope="session", autouse=True)
def prefect_server() -> Iterator[str]:
    """One Prefect server (SQLite in a temporary directory), started once per session (about 7 s)."""
    with helpers.prefect_server() as url:
        yield url


@dataclass
class Scheduler:
    """The hosted scheduler on loopback; ``ideal.time`` is ``offset`` seconds after each request arrives."""

    server: LoopbackServer
    offset: float = 1.5
    ideals: list[datetime] = field(default_factory=list)

    def __call__(self, seen: Seen) -> Reply:
        ideal = datetime.now(timezone.utc) + timedelta(seconds=self.offset)
        self.ideals.append(ideal)
        body = {
            "ideal": {"time": ideal.isoformat(), "zone": seen.json()["zones"][0], "co2_intensity": IDEAL_LBS},
            "naive_case": {"time": seen.json()["windows"][0]["start"], "co2_intensity": NAIVE_LBS},
            "carbon_savings": {"vs_naive_case": 37.5},
        }
        return Reply(200, body)

    @property
    def requests(self) -> list[Seen]:
        return self.server.requests_to("/v0/schedule/")

    @property
    def ideal(self) -> float:
        assert self.ideals, "the scheduler was never asked"
        return self.ideals[-1].timestamp()


@pytest.fixture
def scheduler(monkeypatch: pytest.MonkeyPatch) -> Iterator[Scheduler]:
    with serving() as server:
        answer = Scheduler(server)
        server.route("POST", "/v0/schedule/", answer)
        monkeypatch.setenv("CARBONAWARE_SCHEDULER_BASE_URL", server.url)
        yield answer


# --------------------------------------------------------------------------------------------------------------
# Building: names, signatures, argument errors
# --------------------------------------------------------------------------------------------------------------


@task
@cp.carbonaware_delay_decorator(window=WINDOW, duration=DURATION, **ZONE)
def train(epochs: int, rate: float = 0.1) -> float:
    """Train the model (the body records when it began)."""
    return time.time()


@task
@cp.carbonaware_delay_decorator(window=WINDOW, duration=DURATION, **ZONE)
def evaluate(epochs: int, rate: float = 0.1) -> float:
    """Same shape as train, a different task."""
    return time.time()


@task
@cp.carbonaware_delay_decorator(window=WINDOW, duration=DURATION, **ZONE)
async def train_async(epochs: int) -> float:
    """Async body."""
    return time.time()


def test_decorated_task_keeps_name_docstring_signature_schema_and_own_key() -> None:
    assert train.name == "train"
    assert train.description == "Train the model (the body records when it began)."
    assert str(inspect.signature(train.fn, eval_str=True)) == "(epochs: int, rate: float = 0.1) -> float"
    schema = parameter_schema(train.fn).model_dump()
    assert schema["properties"]["epochs"]["type"] == "integer"
    assert schema["properties"]["rate"]["default"] == 0.1
    assert schema["required"] == ["epochs"]
    assert train.task_key.startswith("train-")
    assert train.task_key != evaluate.task_key  # same wrapper code, distinct keys: from the user's function
    assert train.source_code is not None and "def train(" in train.source_code
    assert train_async.isasync and inspect.iscoroutinefunction(train_async.fn)
    assert not train.isasync


def test_library_names_are_exported() -> None:
    assert cp.carbonaware_delay is carbonaware_core.carbonaware_delay
    assert cp.carbonaware_delay_async is carbonaware_core.carbonaware_delay_async
    assert cp.plan_delay is carbonaware_core.plan_delay
    assert cp.Plan is carbonaware_core.Plan and cp.CloudZone is carbonaware_core.CloudZone


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"provider": "aws"}, ValueError),
        ({"provider": "nimbus", "region": "x"}, ValueError),
        ({"window": 3600}, TypeError),
        ({"duration": timedelta(0)}, ValueError),
        ({"colour": "green"}, TypeError),
        ({"min_savings": 2.0}, ValueError),
        ({"source": "nowhere"}, ValueError),
        ({"artifact": "Not A Key"}, ValueError),
        ({"delay_on_retry": "yes"}, TypeError),
    ],
)
def test_argument_errors_raise_when_built(kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        cp.carbonaware_delay_decorator(**kwargs)
    with pytest.raises(error):
        cp.carbonaware_delay_task(**kwargs)


def scale(factor: int, value: int) -> int:
    return factor * value


def test_a_partial_is_named_after_its_function() -> None:
    delayed = cp.carbonaware_delay_decorator(window=WINDOW, **ZONE)(functools.partial(scale, 2))
    assert delayed.__name__ == "scale"
    assert task(delayed).name == "scale"


def test_original_positional_order_region_then_provider_still_works() -> None:
    built = cp.carbonaware_delay_task(WINDOW, DURATION, "us-east-1", "aws")  # the original took region first
    assert built.name == "carbonaware-delay"


# --------------------------------------------------------------------------------------------------------------
# Waiting in tasks
# --------------------------------------------------------------------------------------------------------------


def test_sync_task_starts_at_the_ideal_time(scheduler: Scheduler) -> None:
    @flow
    def pipeline() -> tuple[float, float]:
        return time.time(), train(3)

    called, began = pipeline()
    assert scheduler.ideal <= began <= scheduler.ideal + SLACK
    assert began - called <= WINDOW.total_seconds()
    assert len(scheduler.requests) == 1
    sent = scheduler.requests[0].json()
    assert sent["zones"] == [ZONE] and sent["duration"] == "PT5M"  # 1 min is asked as 5 (500 otherwise)


def test_async_task_waits_without_blocking_the_event_loop(scheduler: Scheduler) -> None:
    ticks: list[float] = []

    async def ticker(stop: asyncio.Event) -> None:
        while not stop.is_set():
            ticks.append(time.time())
            await asyncio.sleep(0.05)

    @flow
    async def pipeline() -> float:
        stop = asyncio.Event()
        ticking = asyncio.create_task(ticker(stop))
        began = await train_async(1)
        stop.set()
        await ticking
        return began

    began = asyncio.run(pipeline())
    assert scheduler.ideal <= began <= scheduler.ideal + SLACK
    waiting = [t for t in ticks if scheduler.ideal - 1.0 <= t < scheduler.ideal]
    assert len(waiting) >= 10, "the loop stalled during the wait"
    artifact = helpers.published_artifact("carbonaware-train-async")  # created with acreate_markdown_artifact
    assert artifact is not None and "37.5%" in artifact.data


def test_artifact_records_the_decision_before_the_wait(scheduler: Scheduler) -> None:
    @task(name="Artifact Probe")
    @cp.carbonaware_delay_decorator(window=WINDOW, duration=DURATION, **ZONE)
    def probe() -> float:
        return time.time()

    @flow
    def pipeline() -> float:
        return probe()

    began = pipeline()
    artifact = helpers.published_artifact("carbonaware-artifact-probe")  # the key: from the task name, lowercase-dashes
    assert artifact is not None and artifact.type == "markdown"
    assert artifact.task_run_id is not None
    text = artifact.data
    assert "| Decision | optimal: best start in the next 5m00s |" in text
    assert "| Intensity if started now | 362.9 gCO2/kWh (marginal) |" in text
    assert "| Expected at the chosen start | 226.8 gCO2/kWh (marginal) |" in text
    assert "| Savings | 37.5% |" in text
    assert "| Source | carbonaware |" in text
    assert "aws:us-east-1" in text and "PT5M / PT1M" in text
    assert artifact.description.startswith("carbonaware: waiting")
    assert artifact.created.timestamp() < began  # published by on_plan, before the wait ended

    def run_log() -> list[str]:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(LogFilter(task_run_id=LogFilterTaskRunId(any_=[artifact.task_run_id])))
        return [entry.message for entry in logs if entry.message.startswith("carbonaware: waiting")]

    assert wait_for(run_log, 20, "the decision in the task run's log")  # get_run_logger(): shown in the UI


def test_artifact_can_be_switched_off_or_renamed(scheduler: Scheduler) -> None:
    @task
    @cp.carbonaware_delay_decorator(window=WINDOW, duration=DURATION, artifact=False, **ZONE)
    def quiet() -> None:
        return None

    @task
    @cp.carbonaware_delay_decorator(window=WINDOW, duration=DURATION, artifact="nightly-decision", **ZONE)
    def named() -> None:
        return None

    scheduler.offset = 0.0

    @flow
    def pipeline() -> None:
        quiet()
        named()

    pipeline()
    assert helpers.published_artifact("carbonaware-quiet") is None
    assert helpers.published_artifact("nightly-decision") is not None


def test_retries_run_at_once(scheduler: Scheduler) -> None:
    attempts: list[float] = []

    @task(retries=1, name="flaky-once")
    @cp.carbonaware_delay_decorator(window=WINDOW, duration=DURATION, **ZONE)
    def flaky() -> int:
        attempts.append(time.time())
        if len(attempts) == 1:
            carbonaware_core.clear_cache()  # a re-delay could not hide behind the cached answer
            raise RuntimeError("first attempt fails")
        return len(attempts)

    @flow
    def pipeline() -> int:
        return flaky()

    assert pipeline() == 2
    assert len(scheduler.requests) == 1
    assert attempts[1] - attempts[0] < scheduler.offset
    artifact = helpers.published_artifact("carbonaware-flaky-once")  # the retry's decision is reported like any other
    assert artifact is not None and artifact.description is not None
    assert "attempt 2 of flaky-once\\: retries run at once" in artifact.description  # markdown: ':' escaped
    assert "aws:us-east-1" in artifact.description  # the zone it was given, not "unknown zone"


def test_a_flow_retry_does_not_wait_again(scheduler: Scheduler) -> None:
    """Prefect gives a retried flow new task runs (run_count 1 again); the flow's attempt counts too."""
    began: list[float] = []

    @flow(retries=1)
    def pipeline() -> int:
        began.append(train(1))
        if len(began) == 1:
            carbonaware_core.clear_cache()
            raise RuntimeError("the rest of the first attempt fails")
        return len(began)

    assert pipeline() == 2
    assert len(scheduler.requests) == 1  # the second attempt's task did not plan again
    assert began[0] >= scheduler.ideal
    assert began[1] - began[0] < scheduler.offset


def test_delay_on_retry_waits_again(scheduler: Scheduler) -> None:
    attempts: list[float] = []

    @task(retries=1)
    @cp.carbonaware_delay_decorator(window=WINDOW, duration=DURATION, delay_on_retry=True, **ZONE)
    def flaky() -> int:
        attempts.append(time.time())
        if len(attempts) == 1:
            carbonaware_core.clear_cache()
            raise RuntimeError("first attempt fails")
        return len(attempts)

    @flow
    def pipeline() -> int:
        return flaky()

    scheduler.offset = 1.0
    assert pipeline() == 2
    assert len(scheduler.requests) == 2
    assert attempts[1] >= scheduler.ideal


def test_wait_is_capped_so_the_job_fits_before_the_task_timeout(scheduler: Scheduler) -> None:
    @task(timeout_seconds=4)
    @cp.carbonaware_delay_decorator(window=timedelta(hours=1), duration=timedelta(seconds=2), **ZONE)
    def bounded() -> float:
        return time.time()

    scheduler.offset = 60.0  # the scheduler wants a minute; the timeout leaves 2 s

    @flow
    def pipeline() -> tuple[float, float]:
        return time.time(), bounded()

    called, began = pipeline()  # completes: the cap, not Prefect's timeout, ended the wait
    assert 1.5 <= began - called < 4.0  # about 2 s: the room the 4 s timeout leaves before a 2 s job
    window = scheduler.requests[0].json()["windows"][0]
    asked = datetime.fromisoformat(window["end"]) - datetime.fromisoformat(window["start"])
    assert asked <= timedelta(seconds=3)  # the source was asked about the capped window only


def test_no_wait_when_the_job_cannot_fit_before_the_timeout(scheduler: Scheduler) -> None:
    def broken_hook(plan: carbonaware_core.Plan) -> None:
        raise RuntimeError("the user's hook fails")

    @task(timeout_seconds=2, name="no-room")
    @cp.carbonaware_delay_decorator(WINDOW, timedelta(minutes=30), "us-east-1", "AWS", on_plan=broken_hook)
    def bounded() -> float:
        return time.time()

    @flow
    def pipeline() -> tuple[float, float]:
        return time.time(), bounded()

    called, began = pipeline()  # the failing hook broke nothing
    assert began - called < 1.0
    assert scheduler.requests == []
    artifact = helpers.published_artifact("carbonaware-no-room")  # the decision not to wait is reported like any other
    assert artifact is not None and artifact.description is not None
    assert "no room before the timeout" in artifact.description
    assert "aws:us-east-1" in artifact.description  # the zone as the core reads it (the original's order, case)
    assert "disabled" in artifact.description  # not turned into an internal error by the hook


def test_prefect_timeout_stops_a_core_wait_in_a_worker_thread(scheduler: Scheduler) -> None:
    @task(timeout_seconds=2)
    def waits_a_minute() -> str:
        cp.carbonaware_delay(window=WINDOW, duration=DURATION, **ZONE)  # the core itself: no cap
        return "ran"

    scheduler.offset = 60.0

    @flow
    def pipeline() -> tuple[Any, float]:
        future = waits_a_minute.submit()  # a worker thread: only the chunked sleep lets the timeout land
        started = time.time()
        future.wait()
        return future.state, time.time() - started

    state, elapsed = pipeline()
    assert state.name == "TimedOut" and state.is_failed()
    assert elapsed < 2.0 + carbonaware_core.WAIT_CHUNK_SECONDS + 3.0  # the timeout, one sleep chunk, overhead


def test_map_over_fifty_inputs_asks_the_scheduler_once(scheduler: Scheduler) -> None:
    @flow
    def pipeline() -> list[float]:
        return train.map(list(range(50))).result()

    began = pipeline()
    assert len(began) == 50
    # the core's single-flight cache shares one fetch; a task that only starts planning once that decision's start
    # has passed (a busy pool) asks again, as a stale decision is never reused
    asked = [ideal - timedelta(seconds=scheduler.offset) for ideal in scheduler.ideals]
    assert all(asked[i] >= scheduler.ideals[i - 1] for i in range(1, len(asked)))
    assert min(began) >= scheduler.ideals[0].timestamp()


def test_fails_open_when_the_scheduler_is_unreachable() -> None:
    delay = cp.carbonaware_delay_task(window=WINDOW, duration=DURATION, source="carbonaware", **ZONE)  # refused port

    @flow
    def pipeline() -> dict[str, Any]:
        return delay()

    started = time.time()
    plan = pipeline()
    assert plan["reason"] == "source-failed" and plan["delay_seconds"] == 0
    assert time.time() - started < 10


def test_decorator_under_flow(scheduler: Scheduler) -> None:
    @flow(name="nightly-report")
    @cp.carbonaware_delay_decorator(window=WINDOW, duration=DURATION, **ZONE)
    def nightly(day: str) -> float:
        return time.time()

    began = nightly("monday")
    assert scheduler.ideal <= began <= scheduler.ideal + SLACK
    assert helpers.published_artifact("carbonaware-nightly-report") is not None


def test_flow_timeout_caps_the_wait_of_a_decorated_flow(scheduler: Scheduler) -> None:
    @flow(timeout_seconds=2)
    @cp.carbonaware_delay_decorator(window=WINDOW, **ZONE)  # default duration 30 min > 2 s
    def hurried() -> float:
        return time.time()

    started = time.time()
    assert hurried() - started < 1.0
    assert scheduler.requests == []


def test_the_flows_timeout_caps_the_wait_of_a_task_inside_it(scheduler: Scheduler) -> None:
    @task  # no timeout of its own
    @cp.carbonaware_delay_decorator(window=timedelta(hours=1), duration=timedelta(seconds=2), **ZONE)
    def job() -> float:
        return time.time()

    scheduler.offset = 60.0  # the scheduler wants a minute; the flow's 6 s timeout leaves about 4 s

    @flow(timeout_seconds=6)
    def pipeline() -> tuple[float, float]:
        return time.time(), job()

    called, began = pipeline()  # completes: the wait was capped by the flow's timeout, not cut by it
    assert began - called < 5.0
    window = scheduler.requests[0].json()["windows"][0]
    asked = datetime.fromisoformat(window["end"]) - datetime.fromisoformat(window["start"])
    assert asked <= timedelta(seconds=4.5)


def test_decorator_above_task_waits_in_the_task_run(scheduler: Scheduler) -> None:
    @cp.carbonaware_delay_decorator(window=WINDOW, duration=DURATION, **ZONE)
    @task
    def inner() -> float:
        return time.time()

    @flow(name="outer-flow")
    def outer() -> float:
        return inner()

    scheduler.offset = 0.5
    assert outer() >= scheduler.ideal
    assert helpers.published_artifact("carbonaware-inner") is not None  # the wait happened in the task run (issue 12)
    assert helpers.published_artifact("carbonaware-outer-flow") is None


def test_a_failing_on_plan_hook_breaks_neither_the_task_nor_the_artifact(scheduler: Scheduler) -> None:
    seen: list[str] = []

    def hook(plan: carbonaware_core.Plan) -> None:
        seen.append(plan.reason)
        raise RuntimeError("user hook fails")

    @task
    @cp.carbonaware_delay_decorator(window=WINDOW, duration=DURATION, on_plan=hook, artifact="hooked", **ZONE)
    def hooked() -> str:
        return "ran"

    scheduler.offset = 0.0

    @flow
    def pipeline() -> str:
        return hooked()

    assert pipeline() == "ran"
    assert len(seen) == 1  # the user hook ran after ours
    assert helpers.published_artifact("hooked") is not None


def test_outside_runs_messages_go_to_the_carbonaware_logger(
    scheduler: Scheduler, caplog: pytest.LogCaptureFixture
) -> None:
    @cp.carbonaware_delay_decorator(window=WINDOW, duration=DURATION, **ZONE)
    def plain() -> float:
        return time.time()

    scheduler.offset = 0.5
    assert logging.getLogger("carbonaware").getEffectiveLevel() <= logging.INFO
    with caplog.at_level(logging.INFO, logger="carbonaware"):
        began = plain()
    assert began >= scheduler.ideal
    assert any(r.name == "carbonaware" and "waiting" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------------------------------------------
# Generators
# --------------------------------------------------------------------------------------------------------------


def test_generators_are_delayed_before_their_first_item_and_keep_send(scheduler: Scheduler) -> None:
    @cp.carbonaware_delay_decorator(window=WINDOW, duration=DURATION, **ZONE)
    def echo() -> Generator[float | str, str, str]:
        received = yield time.time()
        yield f"got {received}"
        return "done"

    scheduler.offset = 0.5
    generator = echo()
    assert scheduler.requests == []  # nothing happens before the first item is asked for
    assert next(generator) >= scheduler.ideal
    assert generator.send("x") == "got x"
    with pytest.raises(StopIteration) as stop:
        next(generator)
    assert stop.value.value == "done"


def test_async_generators_forward_asend_and_athrow(scheduler: Scheduler) -> None:
    @cp.carbonaware_delay_decorator(window=WINDOW, duration=DURATION, **ZONE)
    async def echo() -> AsyncGenerator[float | str, str]:
        received = yield time.time()
        try:
            yield f"got {received}"
        except KeyError:
            yield "handled"

    async def drive() -> list[Any]:
        generator = echo()
        first = await generator.__anext__()
        return [first, await generator.asend("x"), await generator.athrow(KeyError("k"))]

    scheduler.offset = 0.5
    first, second, third = asyncio.run(drive())
    assert first >= scheduler.ideal and second == "got x" and third == "handled"


def test_generator_task_runs_in_prefect(scheduler: Scheduler) -> None:
    @task
    @cp.carbonaware_delay_decorator(window=WINDOW, duration=DURATION, **ZONE)
    def batches(count: int) -> Generator[float, None, None]:
        for _ in range(count):
            yield time.time()

    scheduler.offset = 0.5

    @flow
    def pipeline() -> list[float]:
        return list(batches(3))

    items = pipeline()
    assert len(items) == 3 and min(items) >= scheduler.ideal


# --------------------------------------------------------------------------------------------------------------
# The task factory
# --------------------------------------------------------------------------------------------------------------


def test_task_factory_honours_task_kwargs_and_returns_the_plan(scheduler: Scheduler) -> None:
    delay = cp.carbonaware_delay_task(
        window=WINDOW,
        duration=DURATION,
        name="wait-for-green",
        retries=2,
        tags=["green"],
        timeout_seconds=600,
        min_savings=0.1,
        **ZONE,
    )
    assert delay.name == "wait-for-green" and delay.retries == 2 and delay.tags == {"green"}
    assert delay.timeout_seconds == 600 and delay.cache_policy is NO_CACHE
    assert cp.carbonaware_delay_task().name == "carbonaware-delay"

    @flow
    def pipeline() -> tuple[dict[str, Any], float]:
        decision = delay.submit()
        began = train.submit(1, wait_for=[decision])
        return decision.result(), began.result()

    plan, began = pipeline()
    assert plan["reason"] == "optimal" and plan["savings"] == 0.375 and plan["source"] == "carbonaware"
    assert began >= scheduler.ideal
    # train's own delay asks again: the cached decision's start has passed, so it no longer answers (issue 8 #13)
    assert len(scheduler.requests) == 2


def test_a_delay_tasks_timeout_bounds_its_wait_not_the_job_that_follows(scheduler: Scheduler) -> None:
    """The job runs in the next task, so a delay task with a 30 s timeout may wait before a 1 min job."""
    roomy = cp.carbonaware_delay_task(window=WINDOW, duration=DURATION, timeout_seconds=30, **ZONE)
    tight = cp.carbonaware_delay_task(window=WINDOW, duration=DURATION, timeout_seconds=5, **ZONE)

    @task
    def job() -> float:
        return time.time()

    @flow
    def pipeline(delay: Any) -> tuple[dict[str, Any], float, float]:
        called = time.time()
        decision = delay.submit()
        return decision.result(), called, job.submit(wait_for=[decision]).result()

    plan, called, began = pipeline(roomy)
    assert plan["reason"] == "optimal" and began >= scheduler.ideal

    carbonaware_core.clear_cache()
    scheduler.offset = 60.0  # a minute away: the 5 s timeout leaves up to 3 s to wait, then time to return
    plan, called, began = pipeline(tight)  # completes: the delay task was not timed out
    assert plan["reason"] == "optimal"
    assert len(scheduler.requests) == 2
    window = scheduler.requests[-1].json()["windows"][0]
    asked = datetime.fromisoformat(window["end"]) - datetime.fromisoformat(window["start"])
    assert asked <= timedelta(seconds=5 - cp.TIMEOUT_MARGIN_SECONDS)
    assert began - called < 5.0 + SLACK


# --------------------------------------------------------------------------------------------------------------
# Process pool
# --------------------------------------------------------------------------------------------------------------


def test_process_pool_task_runner(scheduler: Scheduler) -> None:
    @flow(task_runner=ProcessPoolTaskRunner(max_workers=2))
    def pipeline() -> list[tuple[int, float, int]]:
        return helpers.started_in_process.map(list(range(4))).result()

    scheduler.offset = 3.0  # spawned workers import Prefect first
    results = pipeline()
    assert sorted(item for item, _, _ in results) == [0, 1, 2, 3]
    assert {pid for _, _, pid in results} - {os.getpid()}, "the bodies ran in other processes"
    # one fetch per worker process while its decision's start is ahead; a task a worker takes up after that start
    # has passed asks again (a stale decision is never reused)
    assert 1 <= len(scheduler.requests) <= 4
    assert min(began for _, began, _ in results) >= scheduler.ideals[0].timestamp()


# --------------------------------------------------------------------------------------------------------------
# Deployments
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Served:
    runner: Runner
    deployment_ids: list[Any]
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread


@pytest.fixture
def serve() -> Iterator[Callable[..., Served]]:
    """Serve flows as deployments with an in-process Runner (their runs execute in subprocesses)."""
    served: list[Served] = []

    def start(*flows: Any) -> Served:
        loop = asyncio.new_event_loop()
        runner = Runner(query_seconds=1, prefetch_seconds=30, pause_on_shutdown=False)
        ids: list[Any] = []
        ready = threading.Event()

        async def main() -> None:
            for flow_obj in flows:
                ids.append(await runner.aadd_deployment(await flow_obj.ato_deployment(name="test")))
            ready.set()
            await runner.start()

        thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
        thread.start()
        wait_for(ready.is_set, 60, "the runner to register the deployments")
        served.append(Served(runner, ids, loop, thread))
        return served[-1]

    yield start
    for entry in served:
        asyncio.run_coroutine_threadsafe(entry.runner.astop(), entry.loop).result(timeout=30)
        entry.thread.join(timeout=30)


def read_runs(deployment_id: Any) -> list[FlowRun]:
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
    return sorted(runs, key=lambda run: run.created or datetime.min.replace(tzinfo=timezone.utc))


def test_run_deployment_schedules_the_run_at_the_best_start(scheduler: Scheduler, serve: Callable[..., Served]) -> None:
    served = serve(helpers.scheduled_flow)
    scheduler.offset = 6.0  # room for the runner to pick the run up and start its process
    flow_run, plan = cp.carbonaware_run_deployment(
        "carbonaware-scheduled/test", window=WINDOW, duration=DURATION, parameters={"label": "x"}, tags=["t"], **ZONE
    )
    assert plan.reason == "optimal" and abs(plan.start.timestamp() - scheduler.ideal) < 0.01
    assert flow_run.state is not None and flow_run.state.is_scheduled()
    assert flow_run.state.state_details.scheduled_time.timestamp() == pytest.approx(plan.start.timestamp(), abs=0.01)
    assert flow_run.parameters == {"label": "x"} and "t" in flow_run.tags
    assert cp.RESCHEDULED_TAG in flow_run.tags  # already placed at its best start: it never moves again

    def finished() -> FlowRun | None:
        runs = read_runs(served.deployment_ids[0])
        return runs[0] if runs and runs[0].state and runs[0].state.is_final() else None

    done = wait_for(finished, 60, "the scheduled run to finish")
    assert done.state.is_completed()
    assert done.start_time is not None
    # The API rounds the remaining wait to whole seconds, so a run may begin up to half a second early.
    assert plan.start.timestamp() - 0.6 <= done.start_time.timestamp() <= plan.start.timestamp() + 10


def test_async_run_deployment_only_schedules(scheduler: Scheduler) -> None:
    helpers.scheduled_flow.to_deployment(name="unserved").apply()
    scheduler.offset = 3600.0
    flow_run, plan = asyncio.run(
        cp.acarbonaware_run_deployment(
            "carbonaware-scheduled/unserved", window=timedelta(hours=2), parameters={"label": "z"}, **ZONE
        )
    )
    assert plan.reason == "optimal" and plan.delay > timedelta(minutes=59)
    assert flow_run.state is not None and flow_run.state.is_scheduled()
    assert flow_run.state.state_details.scheduled_time.timestamp() == pytest.approx(plan.start.timestamp(), abs=0.01)
    untagged, _ = cp.carbonaware_run_deployment(
        "carbonaware-scheduled/unserved", parameters={"label": "w"}, tags=None, **ZONE
    )
    assert untagged.tags == [cp.RESCHEDULED_TAG]  # run_deployment's own tags=None is accepted too
    with pytest.raises(TypeError, match="timeout"):
        cp.carbonaware_run_deployment("carbonaware-scheduled/unserved", timeout=60, **ZONE)
    with pytest.raises(TypeError, match="delay_on_retry"):
        cp.carbonaware_run_deployment("carbonaware-scheduled/unserved", delay_on_retry=True, **ZONE)
    with pytest.raises(ValueError, match="artifact"):
        cp.carbonaware_run_deployment("carbonaware-scheduled/unserved", artifact="Not A Key", **ZONE)
    assert len(scheduler.requests) == 2  # argument errors raise before anything is planned


def test_deployment_runs_hand_themselves_over_to_later_runs(scheduler: Scheduler, serve: Callable[..., Served]) -> None:
    served = serve(helpers.handover_flow, helpers.handover_flow_async)  # sync and async flows, in parallel
    scheduler.offset = 6.0
    with get_client(sync_client=True) as client:
        for deployment_id in served.deployment_ids:
            client.create_flow_run_from_deployment(deployment_id, parameters={"label": "y"})

    def both_finished(deployment_id: Any) -> list[FlowRun] | None:
        runs = read_runs(deployment_id)
        final = [run for run in runs if run.state and run.state.is_final()]
        return runs if len(runs) == 2 and len(final) == 2 else None

    for deployment_id in served.deployment_ids:
        first, second = wait_for(lambda d=deployment_id: both_finished(d), 90, "a run and its later run to finish")
        assert first.state.name == "Rescheduled" and first.state.is_completed()
        assert cp.RESCHEDULED_TAG not in first.tags
        assert cp.RESCHEDULED_TAG in second.tags and second.parameters == {"label": "y"}
        assert second.state.is_completed() and second.state.name == "Completed"
        assert second.start_time is not None
        assert second.start_time.timestamp() >= min(ideal.timestamp() for ideal in scheduler.ideals) - 0.6
    assert len(scheduler.requests) == 2  # one per first run; the later runs did not plan again
    assert (
        helpers.published_artifact("carbonaware-deployment-carbonaware-handover-test") is not None
    )  # one key per deployment
    assert helpers.published_artifact("handover-async") is not None  # the key the async flow chose
