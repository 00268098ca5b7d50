"""Prefect integration: start tasks and flows at the lowest-carbon time within a bounded wait.

Drop-in replacement for the original ``carbonaware_prefect`` package: the decorator and the task factory keep their
names, defaults and behaviour; planning, sources and the wait live in ``carbonaware_core``. On top of the core this
module adds what only Prefect can give: run logging, artifacts, retry and timeout awareness, and scheduling
deployment runs at the best time so that no worker sits idle while waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import functools
import inspect
import logging
import re
import threading
import time
import unicodedata
from collections.abc import AsyncGenerator, Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar, cast
from uuid import UUID

from prefect import Flow, Task, task
from prefect.artifacts import acreate_markdown_artifact, create_markdown_artifact
from prefect.blocks.core import Block
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext, RunContext, TaskRunContext
from prefect.deployments import arun_deployment, run_deployment
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger
from prefect.states import Completed
from pydantic import Field, SecretStr, ValidationError

import carbonaware_core as core
from carbonaware_core import (
    DEFAULT_DURATION,
    DEFAULT_WINDOW,
    CloudZone,
    Plan,
    carbonaware_delay,
    carbonaware_delay_async,
    plan_delay,
)

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun, State

__all__ = [
    "RESCHEDULED_TAG",
    "CarbonAwareSettings",
    "CloudZone",
    "ElectricityMapsCredentials",
    "Plan",
    "WattTimeCredentials",
    "acarbonaware_run_deployment",
    "areschedule_current_flow_run",
    "carbonaware_delay",
    "carbonaware_delay_async",
    "carbonaware_delay_decorator",
    "carbonaware_delay_task",
    "carbonaware_run_deployment",
    "carbonaware_schedule",
    "flush_reports",
    "plan_delay",
    "reschedule_current_flow_run",
]

F = TypeVar("F", bound=Callable[..., Any])
Logger = logging.Logger | logging.LoggerAdapter[Any]

RESCHEDULED_TAG = "carbonaware-rescheduled"  # a run carrying it was already moved once and never moves again
PREFECT_OPTIONS = frozenset({"delay_on_retry", "artifact", "settings"})
LIBRARY_OPTIONS = core.OPTIONS | PREFECT_OPTIONS  # recognised by name among task and run_deployment kwargs
ARTIFACT_TIMEOUT_SECONDS = 30.0
TIMEOUT_MARGIN_SECONDS = 2.0  # a delay task returns this long before its own timeout
MIN_ROOM_SECONDS = 0.001  # less room than this before a timeout is no room to wait at all
WORKER_FLUSH_SECONDS = 5.0  # in a distributed runner's worker process, a run's reports get this long at its end
_ARTIFACT_KEY = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")

log = core.logger
if log.level == logging.NOTSET:
    # Prefect's root handler shows WARNING and up only; the decisions are INFO and worth seeing outside runs too.
    log.setLevel(logging.INFO)
# Waits in task-runner threads never see SIGINT themselves: watch it from the main thread (now, and again when a
# decorator or delay task is built, in case the handler was replaced meanwhile), so Ctrl-C ends them too.
core.watch_interrupts()


def _end_waits_when_the_runner_cancels() -> None:
    """A worker or ``serve`` runner cancels a run by telling its process (the intent), then sending SIGTERM, which
    only the main thread sees: waits in task-runner threads would sleep on, and the run stay Cancelling until they
    ended. Once the intent is known, every wait ends as Prefect ends a task that has not started: cancelled."""
    if _control_intent() is not None:
        raise asyncio.CancelledError("carbonaware: the flow run is being cancelled; the job was not started")


def _control_intent() -> Any:
    try:
        from prefect._internal import control_listener
    except ImportError:  # a Prefect without it: Ctrl-C and timeouts still end waits
        return None
    return control_listener.get_intent()


core._wait_guards.append(_end_waits_when_the_runner_cancels)


# --------------------------------------------------------------------------------------------------------------
# Settings: validated once, when the decorator or task is built
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Settings:
    """What a decorated function or delay task was built with; picklable for process-pool task runners."""

    window: timedelta
    duration: timedelta
    provider: str | None
    region: str | None
    options: Mapping[str, Any]  # core options, as given
    delay_on_retry: bool = False
    artifact: bool | str = True  # False: none; a string: the artifact key
    job_inside: bool = True  # the job runs in this run after the wait (decorator), not in a later task (factory)
    zone: CloudZone | None = None  # provider and region as the core reads them (case, legacy order, Azure names)
    config: str | SettingsBlock | None = None  # ``settings``: a block (or its name), read at decision time


def _settings(
    window: timedelta,
    duration: timedelta,
    provider: str | None,
    region: str | None,
    options: Mapping[str, Any],
    *,
    job_inside: bool = True,
) -> _Settings:
    """Split Prefect options from core options and raise every argument error now, not at run time."""
    options = _readable_again(options)
    if options.get("zones") is not None or options.get("home") is False:
        raise ValueError(
            "zones: the decorator and the delay task wait inside the running process, which cannot move to another "
            "zone; to run where and when it is cleanest, create the run of that zone's deployment with "
            "carbonaware_run_deployment({'aws:eu-west-1': 'etl/eu', 'aws:eu-north-1': 'etl/nordic'}, ...) or hand "
            "over with reschedule_current_flow_run(..., zones={'aws:eu-north-1': 'etl/nordic'})"
        )
    core_options = {k: v for k, v in options.items() if k not in PREFECT_OPTIONS}
    zone = core.validate_arguments(window, duration, provider, region, core_options).zone
    delay_on_retry = options.get("delay_on_retry", False)
    if not isinstance(delay_on_retry, bool):
        raise TypeError(f"delay_on_retry must be a bool, not {type(delay_on_retry).__name__}")
    artifact = _artifact_option(options.get("artifact", True))
    config = _settings_option(options.get("settings"))
    return _Settings(
        window,
        duration,
        provider,
        region,
        core_options,
        delay_on_retry,
        artifact,
        job_inside=job_inside,
        zone=zone,
        config=config,
    )


def _artifact_option(artifact: Any) -> bool | str:
    if not isinstance(artifact, (bool, str)) or (isinstance(artifact, str) and not _ARTIFACT_KEY.match(artifact)):
        raise ValueError(f"artifact must be True, False or a key of lowercase letters, digits and dashes: {artifact!r}")
    return artifact


def _split_options(kwargs: dict[str, Any], names: frozenset[str] = LIBRARY_OPTIONS) -> dict[str, Any]:
    """Remove and return the library options among a function's keyword arguments."""
    return _readable_again({name: kwargs.pop(name) for name in list(kwargs) if name in names})


def _readable_again(options: Mapping[str, Any]) -> dict[str, Any]:
    """The options with ``windows`` and ``zones`` given as iterators (generators) read into lists: this layer checks
    its arguments at once and plans later (each call of a decorated function), reading them each time."""
    return {
        name: [*value] if name in ("windows", "zones") and isinstance(value, Iterator) else value
        for name, value in options.items()
    }


# --------------------------------------------------------------------------------------------------------------
# The run we are in
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Run:
    """The innermost task or flow run (retries, logging, artifacts), its flow's attempt, and the timeouts around
    it: the run's own and those of the runs it runs in are kept apart, since a delay task's job runs after the
    task, not in it."""

    name: str
    run_count: int
    flow_name: str | None = None
    flow_run_count: int = 1
    own_left: float | None = None  # seconds until this run's own timeout; None: no timeout
    outer_left: float | None = None  # seconds until the earliest timeout of the runs around it (flows, tasks)

    def retry(self) -> str | None:
        """Which attempt this is, when it is not the first -- of this run or of the flow around it."""
        if self.run_count > 1:
            return f"attempt {self.run_count} of {self.name}"
        if self.flow_run_count > 1:
            return f"attempt {self.flow_run_count} of flow {self.flow_name}"
        return None


def _current_run() -> _Run | None:
    task_ctx, flow_ctx = TaskRunContext.get(), FlowRunContext.get()
    flow_run = flow_ctx.flow_run if flow_ctx is not None else None
    flow = flow_ctx.flow if flow_ctx is not None else None
    if task_ctx is not None:
        return _Run(
            task_ctx.task.name,
            task_ctx.task_run.run_count,
            flow.name if flow is not None else None,
            flow_run.run_count if flow_run is not None else 1,
            _time_left(task_ctx.task.timeout_seconds, task_ctx),
            _earliest(_time_left(_timeout_of(ctx), ctx) for ctx in _outer_runs(task_ctx, flow_ctx)),
        )
    if flow_ctx is not None and flow is not None and flow_run is not None:
        own = _time_left(flow.timeout_seconds, flow_ctx)
        outer = _earliest(_time_left(_timeout_of(ctx), ctx) for ctx in _outer_runs(None, flow_ctx))
        return _Run(flow.name, flow_run.run_count, own_left=own, outer_left=outer)
    return None


def _outer_runs(task_ctx: TaskRunContext | None, flow_ctx: FlowRunContext | None) -> list[RunContext]:
    """Every run this code runs inside, except the innermost one (``task_ctx``, or ``flow_ctx`` without it).

    Prefect keeps no list of them and its cancel scopes keep their deadlines to themselves, but each context
    remembers the one it replaced when entered (the subflow's, its parent flow's; a nested task's, its parent
    task's), and worker threads get the same objects in their copied context. A context Prefect rebuilt in
    another process has no such memory: only the runs it rebuilt are seen there.
    """
    chain: list[RunContext] = [] if task_ctx is None else [task_ctx, *_replaced(task_ctx)]
    if flow_ctx is not None:
        chain += [flow_ctx, *_replaced(flow_ctx)]
    # Prefect enters a run's context more than once (to create the run, then for each attempt): one run, one
    # clock, from its innermost context -- the latest start, the closest to when its timeout began.
    runs: dict[Any, RunContext] = {}
    for ctx in chain:
        runs.setdefault(_run_id(ctx), ctx)
    return list(runs.values())[1:]


def _replaced(ctx: RunContext) -> list[RunContext]:
    """The contexts ``ctx`` was entered over, innermost first (the same class: tasks over tasks, flows over flows)."""
    found: list[RunContext] = []
    while len(found) < 100:  # depth bound: a cycle would be Prefect's bug, never a hang here
        previous = getattr(getattr(ctx, "_token", None), "old_value", None)
        if not isinstance(previous, (TaskRunContext, FlowRunContext)) or any(previous is seen for seen in found):
            break
        found.append(previous)
        ctx = previous
    return found


def _run_id(ctx: RunContext) -> Any:
    run = ctx.task_run if isinstance(ctx, TaskRunContext) else getattr(ctx, "flow_run", None)
    return ("task" if isinstance(ctx, TaskRunContext) else "flow", getattr(run, "id", None) or id(ctx))


def _timeout_of(ctx: RunContext) -> float | None:
    if isinstance(ctx, TaskRunContext):
        return ctx.task.timeout_seconds
    return ctx.flow.timeout_seconds if isinstance(ctx, FlowRunContext) and ctx.flow is not None else None


def _earliest(lefts: Iterable[float | None]) -> float | None:
    known = [left for left in lefts if left is not None]
    return min(known) if known else None


def _room(run: _Run, settings: _Settings) -> float | None:
    """Seconds the wait may take before a timeout, or None when no timeout applies.

    The job must still fit after the wait inside every run that holds it: with the decorator that is this run and
    every run around it; with the delay task it is only the runs around it, and the task itself just has to return
    before its own timeout (``TIMEOUT_MARGIN_SECONDS`` to spare, so the returned plan is not cut off).
    """
    job = settings.duration.total_seconds()
    limits = []
    if run.own_left is not None:
        limits.append(run.own_left - job if settings.job_inside else run.own_left - TIMEOUT_MARGIN_SECONDS)
    if run.outer_left is not None:
        limits.append(run.outer_left - job)
    return min(limits) if limits else None


def _time_left(timeout: float | None, ctx: RunContext) -> float | None:
    """Seconds of ``timeout`` left in this attempt. Prefect starts the clock just after it enters the attempt's
    run context, so counting from the context's creation errs on the safe side (and needs no server clock)."""
    if timeout is None:
        return None
    return timeout - max(0.0, time.time() - ctx.start_time.timestamp())


def _run_logger() -> logging.Logger | logging.LoggerAdapter[Any]:
    """The run logger inside runs (messages reach the UI), the ``carbonaware`` logger outside."""
    try:
        return get_run_logger()
    except MissingContextError:
        return log


# --------------------------------------------------------------------------------------------------------------
# Delaying inside a run
# --------------------------------------------------------------------------------------------------------------


def _skip_plan(settings: _Settings, window: timedelta, detail: str, reason: str = "disabled") -> Plan:
    """A plan that does not wait, decided here without asking a source: the wait is disabled for this attempt
    (a retry, no room before the timeout), or ``source-failed`` when something broke."""
    return core.immediate_plan(reason, detail, window=window, duration=settings.duration, zone=settings.zone)


def _plan_for_run(
    settings: _Settings, loop: asyncio.AbstractEventLoop | None
) -> Plan | tuple[timedelta, dict[str, Any]]:
    """Either a plan that does not wait (a retry, no room before the timeout), or the core's window and options."""
    run = _current_run()
    logger = settings.options.get("logger") or _run_logger()
    options = {**settings.options, "logger": logger}
    if run is not None and settings.artifact:
        options["on_plan"] = _artifact_hook(_task_key(settings, run), loop, logger, settings.options.get("on_plan"))
    if run is None:
        return settings.window, options
    if (attempt := run.retry()) is not None and not settings.delay_on_retry:
        return _skip(settings, settings.window, f"{attempt}: retries run at once", options)
    window, room = settings.window, _room(run, settings)
    if room is not None and room < MIN_ROOM_SECONDS:
        job = f" and the {settings.duration.total_seconds():.0f}s job" if settings.job_inside else ""
        return _skip(settings, window, f"no room before the timeout for a wait{job}", options)
    if room is not None:
        window = min(window, timedelta(seconds=room))
    return window, options


def _skip(settings: _Settings, window: timedelta, detail: str, options: Mapping[str, Any]) -> Plan:
    """Log and report (artifact, events, ledger, ``on_plan``) a decision not to wait, as the core does its own."""
    return _decided_here(_skip_plan(settings, window, detail), settings, options["logger"], options.get("on_plan"))


def _decided_here(plan: Plan, settings: _Settings, logger: Logger, on_plan: Callable[[Plan], None] | None) -> Plan:
    """A decision made here, without the core: the same line, hook, artifact, events and ledger record as one the
    core made (with an id, so that its outcome joins it, and the job's ``power_kw`` for the energy)."""
    power_kw, grid_zone = settings.options.get("power_kw"), settings.options.get("grid_zone")
    power = power_kw if isinstance(power_kw, (int, float)) else None
    plan = replace(plan, power_kw=power, grid_zone=grid_zone if isinstance(grid_zone, str) else plan.grid_zone)
    plan = core.record_decision(plan, settings.options.get("ledger"))  # assigns the id; a sink or a quick append
    core.report_plan(plan, logger, on_plan)
    return plan


def _delay_sync(settings: _Settings) -> Plan:
    """Wait in this thread (in chunks, so Prefect's timeout lands); never raises an ``Exception``."""
    try:
        prepared = _plan_for_run(settings, None)
        if isinstance(prepared, Plan):
            return prepared
        window, options = prepared
        given = _configure(settings.config, options, settings.provider, settings.region, options["logger"])
        return carbonaware_delay(window, settings.duration, given.provider, given.region, **given.options)
    except Exception as exc:  # noqa: BLE001 - fail open: cancellations and timeouts are BaseException and pass
        return _failed(settings, exc)


async def _delay_async(settings: _Settings) -> Plan:
    """Wait without blocking the event loop; never raises an ``Exception``."""
    try:
        # In a thread (context variables go along): a skipped wait's artifact must not block the event loop.
        prepared = await asyncio.to_thread(_plan_for_run, settings, asyncio.get_running_loop())
        if isinstance(prepared, Plan):
            return prepared
        window, options = prepared
        configure = functools.partial(_configure, settings.config, options, settings.provider, settings.region)
        given = await asyncio.to_thread(configure, options["logger"])
        return await carbonaware_delay_async(window, settings.duration, given.provider, given.region, **given.options)
    except Exception as exc:  # noqa: BLE001 - fail open
        return _failed(settings, exc)


def _failed(settings: _Settings, exc: Exception) -> Plan:
    """Start now after an error here; reported (WARNING, as for any failure) and recorded like any decision."""
    detail = f"internal error: {type(exc).__name__}: {exc}"
    plan = _skip_plan(settings, settings.window, detail, reason="source-failed")
    logger = settings.options.get("logger") or _run_logger()
    try:
        run = _current_run()
        on_plan = settings.options.get("on_plan")
        if run is not None and settings.artifact:
            on_plan = _artifact_hook(_task_key(settings, run), None, logger, on_plan)
        return _decided_here(plan, settings, logger, on_plan)
    except Exception as again:  # noqa: BLE001 - the last line of fail-open: the line at least
        core.report_plan(plan, logger)
        logger.warning("carbonaware: could not report the decision: %s: %s", type(again).__name__, again)
        return plan


def _task_key(settings: _Settings, run: _Run) -> str:
    """The artifact key of a task's or flow's decisions: the one given, or one per task (flow) name."""
    return settings.artifact if isinstance(settings.artifact, str) else _artifact_key(run.name)


def _in_a_worker_process() -> bool:
    """Whether a distributed task runner (Dask, Ray, a process pool) sent this run here from the flow's process:
    Prefect marks the run context it rebuilds there as detached. Threads of the flow's own process never are."""
    ctx = FlowRunContext.get()
    return ctx is not None and bool(getattr(ctx, "detached", False))


def _send_reports_from_a_worker_process() -> None:
    """At the end of a run in a worker process, send what the decision queued (artifacts, events, log lines) before
    returning, within ``WORKER_FLUSH_SECONDS``: Ray ends its workers at once when the flow ends, and anything still
    queued in them is lost. In the flow's own process the queues stay off the run's path. Never raises."""
    if not _in_a_worker_process():
        return
    try:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        deadline = time.monotonic() + WORKER_FLUSH_SECONDS
        _PUBLISHER.drain(WORKER_FLUSH_SECONDS)  # first: it creates artifacts and emits events
        for service in (EventsWorker, APILogWorker):
            service.drain_all(timeout=max(0.0, deadline - time.monotonic()))
    except Exception as exc:  # noqa: BLE001 - reporting must not break the work
        log.warning("carbonaware: could not send the reports from this worker process: %s: %s", type(exc).__name__, exc)


async def _asend_reports_from_a_worker_process() -> None:
    """The same for async runs: the waiting happens in a thread, never on the run's event loop."""
    if _in_a_worker_process():
        await asyncio.to_thread(_send_reports_from_a_worker_process)


# --------------------------------------------------------------------------------------------------------------
# Artifacts: one markdown artifact per decision, created before the wait
# --------------------------------------------------------------------------------------------------------------


def _artifact_key(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "run"
    return slug if slug.startswith("carbonaware") else f"carbonaware-{slug}"


def _artifact_hook(
    key: str,
    loop: asyncio.AbstractEventLoop | None,
    logger: logging.Logger | logging.LoggerAdapter[Any],
    then: Callable[[Plan], None] | None,
) -> Callable[[Plan], None]:
    """The core's ``on_plan`` hook: publish the artifact, then call the user's own hook if any."""

    def on_plan(plan: Plan) -> None:
        _publish(plan, key, loop, logger)
        if then is not None:
            then(plan)

    return on_plan


def _publish(
    plan: Plan,
    key: str,
    loop: asyncio.AbstractEventLoop | None,
    logger: logging.Logger | logging.LoggerAdapter[Any],
    *,
    scheduled: bool = False,
) -> None:
    """Create the artifact; a failure (rendering included) costs one warning, never the user's work or hook.
    ``scheduled``: the decision schedules a run for later (a deployment), nothing waits. A decision that waits
    publishes it now, before the wait; one that does not hands it to the publisher, off the task's path
    (``flush_reports()`` waits for it)."""
    ids, api_url = _run_ids(), _configured_api_url()
    _prove_decision(plan, key, ids, api_url, scheduled=scheduled)
    try:
        if not plan.waits:
            _markdown_later(plan, key, ids, api_url, scheduled=scheduled)
            return
        markdown = _render_markdown(plan, scheduled=scheduled)
        description = core.describe(_markdown_safe(plan), scheduled=scheduled)  # the UI renders both
        if loop is not None and not _on_loop_thread(loop):
            # Async runs: planning runs in a worker thread, so the run's own loop is free to create it.
            coroutine = acreate_markdown_artifact(markdown=markdown, key=key, description=description)
            future = asyncio.run_coroutine_threadsafe(coroutine, loop)
            try:
                future.result(timeout=ARTIFACT_TIMEOUT_SECONDS)
            finally:
                future.cancel()  # no-op once done; a stuck API call must not outlive the warning
        else:
            # _sync: a sync caller inside an async flow must not get an un-awaited coroutine back.
            cast(Any, create_markdown_artifact)(markdown=markdown, key=key, description=description, _sync=True)
    except Exception as exc:  # noqa: BLE001 - reporting must not break the work
        logger.warning("carbonaware: could not create artifact %r: %s: %s", key, type(exc).__name__, exc)


def _on_loop_thread(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _render_markdown(plan: Plan, *, scheduled: bool = False) -> str:
    """The artifact: the decision, the numbers behind it and the forecast it came from.

    Text from outside (a provider's error excerpt, source labels, zones, units) is escaped: it is shown as text,
    never as an image, a link or HTML. The chart goes in a fence that no line of it can close.
    """
    data, safe = plan.to_dict(), _markdown_safe(plan)
    wait = core.format_iso_duration(timedelta(seconds=round(plan.delay.total_seconds())))
    where = str(safe.zone) if safe.zone else "-"
    if safe.grid_zone:
        where += f" (grid zone {safe.grid_zone})"
    rows = [
        ("Decision", f"{safe.reason}: {safe.detail}"),
        ("Start", f"{data['start']} (in {wait})"),
        ("Zone", where),
        ("Source", safe.source),
        ("Intensity if started now", _intensity(plan.now, safe.unit)),
        ("Expected at the chosen start", _intensity(plan.expected, safe.unit)),
        ("Savings", "n/a" if plan.savings is None else f"{plan.savings:.1%}"),
        ("Window / job", f"{core.format_iso_duration(plan.window)} / {core.format_iso_duration(plan.duration)}"),
        *_grams_rows(plan),
        *_time_only_rows(plan),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows) + _zones_table(plan)
    # Only the values the planner used: a provider's gap (null, NaN) would break the chart's scale.
    charted = tuple(point for point in plan.forecast if core._valid_intensity(point.value))
    heading = f"### {core.describe(safe, scheduled=scheduled)}\n\n| | |\n|---|---|\n{table}\n"
    if not charted:  # a decision without a series (the hosted scheduler, a skipped wait): no empty chart
        return heading
    chart = core.render_chart(
        replace(plan, source=_plain_text(plan.source), unit=_plain_text(plan.unit), forecast=charted)
    )
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall("`+", chart)), default=0))
    return f"{heading}\n{fence}text\n{chart}\n{fence}\n"


# Characters that can open or close inline markdown (CommonMark, GFM and common extensions): emphasis, code,
# links and images, raw HTML and autolinks, entities, table cells, bare-URL autolinks (``:``, ``@``, ``www.``),
# math, strike-through. The rest cannot: outside text never starts a line here, so block markers are inert.
_MARKDOWN_ACTIVE = re.compile(r"([\\`*_{}\[\]<>#!|~&:@.$^=+])")


def _plain_text(text: str) -> str:
    """One line without control, format (bidi, zero-width) or line-separator characters: a newline would end a
    table row or the heading, a direction override would make the text read otherwise than it is."""
    return "".join(" " if unicodedata.category(c)[0] == "C" or c in "\u2028\u2029" else c for c in text)


def _markdown_text(text: str) -> str:
    """Outside text as markdown that renders as exactly that text."""
    return _MARKDOWN_ACTIVE.sub(r"\\\1", _plain_text(text))


def _markdown_safe(plan: Plan) -> Plan:
    """The plan with every field that came from outside escaped, for markdown built from it (``describe``)."""
    zone = plan.zone and core.CloudZone(_markdown_text(plan.zone.provider), _markdown_text(plan.zone.region))
    return replace(
        plan,
        zone=zone,
        source=_markdown_text(plan.source),
        unit=_markdown_text(plan.unit),
        reason=_markdown_text(plan.reason),
        detail=_markdown_text(plan.detail),
        grid_zone=None if plan.grid_zone is None else _markdown_text(plan.grid_zone),
        fallbacks=tuple(_markdown_text(reason) for reason in plan.fallbacks),
        alternatives=tuple(
            replace(
                alternative,
                zone=_markdown_text(alternative.zone),
                unit=_markdown_text(alternative.unit),
                source=_markdown_text(alternative.source),
                note=_markdown_text(alternative.note),
            )
            for alternative in plan.alternatives
        ),
    )


def _time_only_rows(plan: Plan) -> list[tuple[str, str]]:
    """Beside the saving of place and start together, what moving the start alone would have saved at home."""
    if len(plan.alternatives) < 2:
        return []
    shown = "n/a" if plan.time_savings is None else f"{plan.time_savings:.1%}"
    return [(f"Savings, time only in {_markdown_text(plan.alternatives[0].zone)}", shown)]


def _zones_table(plan: Plan) -> str:
    """Every candidate zone of a plan over several (home first): its best allowed start and mean, or why none.
    Read from the plan as made (the chosen zone is matched as the plan names it), escaped as it is written."""
    if len(plan.alternatives) < 2:
        return ""
    chosen = str(plan.zone) if plan.zone is not None else f"grid:{plan.grid_zone}"
    lines = ["", "", "| Zone | Best start | Mean | Source |", "|---|---|---|---|"]
    for alternative in plan.alternatives:
        mark = " (chosen)" if alternative.zone == chosen and plan.reason == "optimal" else ""
        zone = _markdown_text(alternative.zone) + mark
        if alternative.start is None or alternative.mean is None:
            lines.append(f"| {zone} | - | - | {_markdown_text(alternative.note or 'no answer')} |")
            continue
        mean = f"{alternative.mean:.1f} {_markdown_text(alternative.unit)}"
        lines.append(f"| {zone} | {core._iso(alternative.start)} | {mean} | {_markdown_text(alternative.source)} |")
    return "\n".join(lines)


def _grams_rows(plan: Plan) -> list[tuple[str, str]]:
    """Energy and grams, when the caller gave ``power_kw`` (otherwise no rows: never guessed)."""
    if plan.energy_kwh is None:
        return []
    grams = (plan.emissions_now_g, plan.emissions_g, plan.avoided_g)
    shown = "n/a (not a g/kWh signal)" if None in grams else "{:.0f} g / {:.0f} g / {:.0f} g".format(*grams)
    return [
        ("Energy", f"{plan.energy_kwh:.3g} kWh ({plan.power_kw:g} kW)"),
        (f"Grams now / at start / avoided ({core.signal_of(plan.unit)})", shown),
    ]


def _intensity(value: float | None, unit: str) -> str:
    return "n/a" if value is None else f"{value:.1f} {unit}"


# --------------------------------------------------------------------------------------------------------------
# Prefect configuration: credentials and settings in Blocks, operator switches in Variables
# --------------------------------------------------------------------------------------------------------------

CONFIG_TTL_SECONDS = 30.0  # blocks and Variables are read again at most this long after the last read
CONFIG_READ_TIMEOUT_SECONDS = 5.0  # an API slower than this counts as unreachable: the settings are unset
WAIT_READ_TIMEOUT_SECONDS = 1.0  # the same, for the switch a wait in progress checks (a wait sleeps 1 s chunks)
VARIABLE_DISABLE, VARIABLE_DRY_RUN, VARIABLE_MIN_SAVINGS = (
    "carbonaware_disable",
    "carbonaware_dry_run",
    ("carbonaware_min_savings"),
)
_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})


class ElectricityMapsCredentials(Block):
    """An Electricity Maps API key, used when the environment has none (``ELECTRICITYMAPS_API_KEY``)."""

    _block_type_name = "Electricity Maps Credentials"
    _description = "API key for the Electricity Maps forecast, used by carbonaware-prefect."
    api_key: SecretStr = Field(description="The auth-token of an Electricity Maps plan with forecast access.")


class WattTimeCredentials(Block):
    """A WattTime login (``WATTTIME_USERNAME`` / ``WATTTIME_PASSWORD``)."""

    _block_type_name = "WattTime Credentials"
    _description = "Username and password of a WattTime account, used by carbonaware-prefect."
    username: str = Field(description="WattTime username.")
    password: SecretStr = Field(description="WattTime password.")


class CarbonAwareSettings(Block):
    """What every carbon-aware wait of a deployment uses unless the code says otherwise (``settings="name"``).

    Precedence: an argument in code > this block > the environment (``CARBONAWARE_*``, provider keys) > default.
    """

    _block_type_name = "Carbon Aware Settings"
    _description = "Source chain, savings threshold, zone and provider credentials for carbonaware-prefect."
    source: str | None = Field(default=None, description="Source chain, e.g. 'electricitymaps,offline'.")
    min_savings: float | None = Field(default=None, ge=0, lt=1, description="Wait only if it saves this fraction.")
    grid_zone: str | None = Field(default=None, description="Grid zone, e.g. 'DE', instead of the region table's.")
    provider: str | None = Field(default=None, description="Cloud provider (aws, gcp, azure) instead of detection.")
    region: str | None = Field(default=None, description="Cloud region, with provider, instead of detection.")
    power_kw: float | None = Field(default=None, gt=0, description="Average draw of the job in kW.")
    electricitymaps: ElectricityMapsCredentials | None = None
    watttime: WattTimeCredentials | None = None


CONFIG_BLOCKS = (ElectricityMapsCredentials, WattTimeCredentials, CarbonAwareSettings)
SettingsBlock = ElectricityMapsCredentials | WattTimeCredentials | CarbonAwareSettings


def _settings_option(value: Any) -> str | SettingsBlock | None:
    """``settings``: the name of a ``CarbonAwareSettings`` block, ``"block-type-slug/name"`` for any of the three
    block types, or a block object. Checked when the decorator or task is built; loaded at decision time."""
    if value is None or isinstance(value, CONFIG_BLOCKS) or (isinstance(value, str) and value.strip()):
        return value
    raise TypeError(
        "settings must be the name of a CarbonAwareSettings block, 'type-slug/name' or a block object, "
        f"not {type(value).__name__}"
    )


@dataclass(frozen=True)
class _Configured:
    """What a decision is made with once blocks and Variables are applied."""

    provider: str | None
    region: str | None
    options: dict[str, Any]


_CONFIG_CACHE: dict[tuple[str, str], tuple[float, Any]] = {}  # (api url, what) -> (monotonic read time, value)
_CONFIG_READING: dict[tuple[str, str], Any] = {}  # reads under way (futures), one per key
_CONFIG_LOCK = threading.Lock()
_MISSING = object()


def _api_url() -> str | None:
    """The Prefect API this process talks to; None outside runs without one (no ephemeral server is started)."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if url:
        return str(url)
    return "ephemeral" if _current_run() is not None else None


def _read_cached(what: str, read: Callable[[], Any], timeout: float = CONFIG_READ_TIMEOUT_SECONDS) -> Any:
    """``read()`` at most once per ``CONFIG_TTL_SECONDS`` per API and name, waiting at most ``timeout``; raises
    what it raised (remembered for the TTL too, so an unreachable API costs one timeout per period, not one per
    task). One read per name at a time: while one is out, callers with a last value use it, the others wait too."""
    url = _api_url()
    if url is None:
        raise LookupError("no Prefect API configured")
    key, now = (url, what), core.CLOCK.monotonic()
    with _CONFIG_LOCK:
        hit = _CONFIG_CACHE.get(key)
        pending = None
        if hit is None or not 0 <= now - hit[0] < CONFIG_TTL_SECONDS:  # stale, or a clock that went back
            pending = _CONFIG_READING.get(key)
            if pending is None:
                pending = _CONFIG_READING[key] = _start_read(key, read)
            elif hit is not None:
                pending = None  # another caller is reading: the last value serves meanwhile
    if pending is None:
        value = cast("tuple[float, Any]", hit)[1]
    else:
        try:
            value = pending.result(timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - remembered, then raised to the caller, which fails open
            value = exc
            if _is_timeout(exc):
                value = TimeoutError(f"the Prefect API did not answer within {timeout:g}s")
                with _CONFIG_LOCK:
                    if not pending.done():  # until the read ends and stores its own answer
                        _CONFIG_CACHE[key] = (now, value)
    if isinstance(value, BaseException):
        raise value
    return value


def _is_timeout(exc: BaseException) -> bool:
    import concurrent.futures

    return isinstance(exc, concurrent.futures.TimeoutError)


def _start_read(key: tuple[str, str], read: Callable[[], Any]) -> Any:
    """``read()`` in a daemon thread (with this context: the run's client settings), its answer -- or what it
    raised -- stored when it ends, however late: Prefect's client retries a dead API for longer than a decision
    may wait, and a late answer still serves the callers that come after it."""
    import concurrent.futures
    import contextvars

    context = contextvars.copy_context()
    done: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def target() -> None:
        try:
            value: Any = context.run(read)
            done.set_result(value)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller and the cache
            value = exc
            done.set_exception(exc)
        with _CONFIG_LOCK:
            _CONFIG_CACHE[key] = (core.CLOCK.monotonic(), value)
            _CONFIG_READING.pop(key, None)

    threading.Thread(target=target, name="carbonaware-config", daemon=True).start()
    return done


def _load_block(settings: str | SettingsBlock) -> SettingsBlock:
    if not isinstance(settings, str):
        return settings

    def load() -> Any:
        loader = Block if "/" in settings else CarbonAwareSettings
        return cast(Any, loader.load)(settings.strip(), _sync=True)

    block = _read_cached(f"block:{settings}", load)
    if not isinstance(block, CONFIG_BLOCKS):
        raise TypeError(f"{type(block).__name__} is not a carbonaware block")
    return block


def _block_options(block: SettingsBlock) -> tuple[dict[str, Any], tuple[str | None, str | None]]:
    """The core options and zone a block stands for (credentials by their environment variable's name)."""
    credentials: dict[str, str] = {}
    found: dict[str, Any] = {}
    zone: tuple[str | None, str | None] = (None, None)
    electricitymaps = block if isinstance(block, ElectricityMapsCredentials) else None
    watttime = block if isinstance(block, WattTimeCredentials) else None
    if isinstance(block, CarbonAwareSettings):
        electricitymaps, watttime = block.electricitymaps, block.watttime
        names = ("source", "min_savings", "grid_zone", "power_kw")
        found = {name: getattr(block, name) for name in names if getattr(block, name) is not None}
        if "power_kw" not in core.OPTIONS:  # a core without energy figures
            found.pop("power_kw", None)
        zone = (block.provider, block.region)
    if electricitymaps is not None:
        credentials["ELECTRICITYMAPS_API_KEY"] = electricitymaps.api_key.get_secret_value()
    if watttime is not None:
        credentials["WATTTIME_USERNAME"] = watttime.username
        credentials["WATTTIME_PASSWORD"] = watttime.password.get_secret_value()
    if credentials:
        found["credentials"] = credentials
    return found, zone


def _with_block(
    settings: str | SettingsBlock, options: dict[str, Any], provider: str | None, region: str | None, logger: Logger
) -> _Configured:
    """Fill what the arguments left unset from the block. A block that cannot be loaded or holds values the core
    refuses is left out, with one line saying why (never its secrets)."""
    name = settings if isinstance(settings, str) else f"{type(settings).__name__} object"
    given = _Configured(provider, region, options)
    try:
        block_options, (block_provider, block_region) = _block_options(_load_block(settings))
        merged = {**block_options, **options}
        if provider is None and region is None:
            provider, region = block_provider, block_region
        # the time options (checked already, with the real window and job) are no block's: a stand-in window and
        # job would find fault with a deadline a few hours away
        own = {name: value for name, value in merged.items() if name not in ("windows", "deadline")}
        core.validate_arguments(timedelta(1), timedelta(1), provider, region, own)
    except Exception as exc:  # noqa: BLE001 - fail open, like a source failure
        logger.warning("carbonaware: settings block %r not used (%s: %s)", name, type(exc).__name__, _why(exc))
        return given
    return _Configured(provider, region, merged)


def _why(exc: Exception) -> str:
    """An error's message without the values it may quote: pydantic's validation errors print their input, which
    for a credentials block would be the key."""
    if isinstance(exc, ValidationError):
        fields = ", ".join(".".join(map(str, error["loc"])) or "-" for error in exc.errors())
        return f"{exc.error_count()} invalid field(s): {fields}"
    return str(exc)


def _variable(name: str, timeout: float = CONFIG_READ_TIMEOUT_SECONDS) -> Any:
    """A Prefect Variable's value, or None when unset or the API cannot be reached."""
    from prefect.variables import Variable

    try:
        return _read_cached(f"variable:{name}", lambda: cast(Any, Variable.get)(name, None, _sync=True), timeout)
    except Exception:  # noqa: BLE001 - an unreachable API counts as unset
        return None


def _operator_stopped_waiting() -> str | None:
    """Checked by every wait in progress (each 1 s chunk; the Variables are read at most every 30 s): a switch
    turned on in the UI ends the wait and the job starts now."""
    if _api_url() is None:
        return None
    for variable in (VARIABLE_DISABLE, VARIABLE_DRY_RUN):
        if _switch(_variable(variable, WAIT_READ_TIMEOUT_SECONDS)):
            return f"the Prefect Variable {variable} is set"
    return None


core._start_now_checks.append(_operator_stopped_waiting)


def _switch(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in _TRUE_WORDS if isinstance(value, (str, int, float)) else False


def _with_variables(configured: _Configured, logger: Logger) -> _Configured:
    """The operator's switches, read at decision time: ``carbonaware_disable`` and ``carbonaware_dry_run`` only
    ever switch on (stop waiting); ``carbonaware_min_savings`` applies where neither code nor block set one."""
    if _api_url() is None:
        return configured
    options = dict(configured.options)
    for variable, option in ((VARIABLE_DISABLE, "disable"), (VARIABLE_DRY_RUN, "dry_run")):
        if _switch(_variable(variable)):
            options[option] = f"the Prefect Variable {variable}"
    threshold = _variable(VARIABLE_MIN_SAVINGS) if "min_savings" not in options else None
    if threshold is not None:
        try:
            value = float(threshold)
            core.validate_arguments(timedelta(1), timedelta(1), None, None, {"min_savings": value})
            options["min_savings"] = value
        except (TypeError, ValueError) as exc:
            logger.warning("carbonaware: Prefect Variable %s ignored (%s)", VARIABLE_MIN_SAVINGS, exc)
    return replace(configured, options=options)


def _configure(
    settings: str | SettingsBlock | None,
    options: Mapping[str, Any],
    provider: str | None,
    region: str | None,
    logger: Logger,
) -> _Configured:
    """Arguments, then the settings block, then the Variables; the core applies the environment and defaults."""
    configured = _Configured(provider, region, dict(options))
    if settings is not None:
        configured = _with_block(settings, configured.options, provider, region, logger)
    return _with_variables(configured, logger)


# --------------------------------------------------------------------------------------------------------------
# The decorator
# --------------------------------------------------------------------------------------------------------------


def carbonaware_delay_decorator(
    window: timedelta = DEFAULT_WINDOW,
    duration: timedelta = DEFAULT_DURATION,
    provider: str | None = None,
    region: str | None = None,
    **options: Any,
) -> Callable[[F], F]:
    """Delay each call of the decorated function until the lowest-carbon start within ``window``.

    Put it under ``@task`` (or ``@flow``), or use it on a plain function; above ``@task`` or ``@flow`` it returns
    the same kind of Prefect object with its function wrapped (``.submit()``, ``.map()``, ``.serve()`` stay).
    Options: the core's (``source``, ``min_savings``, ``grid_zone``, ``timeout``, ``logger``, ``on_plan``, ...),
    ``delay_on_retry`` (default False: retries run at once) and ``artifact`` (default True; False for none, or a
    key). Argument errors raise here.
    """
    settings = _settings(window, duration, provider, region, options)
    core.watch_interrupts()

    def decorate(fn: F) -> F:
        if isinstance(fn, (Task, Flow)):
            return cast(F, _wrap_prefect_object(fn, settings))
        return cast(F, _wrap(fn, settings))

    return decorate


def _wrap(fn: Callable[..., Any], settings: _Settings) -> Callable[..., Any]:
    """A wrapper of the same kind (sync, async, generator, async generator) that Prefect sees as ``fn`` itself."""
    target = fn.fn if isinstance(fn, (Task, Flow)) else fn  # applied above @task: judge by the function inside
    if inspect.isasyncgenfunction(target):
        wrapper = _async_generator_wrapper(fn, settings)
    elif inspect.isgeneratorfunction(target):
        wrapper = _generator_wrapper(fn, settings)
    elif inspect.iscoroutinefunction(target):
        wrapper = _async_wrapper(fn, settings)
    else:
        wrapper = _sync_wrapper(fn, settings)
    # A Task or Flow object's attributes must not be copied onto a plain function.
    functools.update_wrapper(wrapper, fn, updated=() if target is not fn else functools.WRAPPER_UPDATES)
    if not hasattr(fn, "__name__"):  # functools.partial and other callables: name the task after the function
        wrapper.__name__ = wrapper.__qualname__ = getattr(getattr(fn, "func", None), "__name__", type(fn).__name__)
    wrapper.__prefect_task_source__ = fn  # type: ignore[attr-defined] # Prefect: task key and cache from fn's code
    return wrapper


def _wrap_prefect_object(obj: Task[Any, Any] | Flow[Any, Any], settings: _Settings) -> Task[Any, Any] | Flow[Any, Any]:
    """Above ``@task``/``@flow``: a copy of the Task or Flow whose function is wrapped, so that the wait runs in
    the run (its logs, artifacts, retries, timeouts) and the object keeps ``.submit()``/``.map()``/``.serve()``."""
    wrapped = copy.copy(obj)
    wrapped.fn = _wrap(obj.fn, settings)
    return wrapped


def _sync_wrapper(fn: Callable[..., Any], settings: _Settings) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        outcome = _Outcome(_delay_sync(settings), settings)
        try:
            return fn(*args, **kwargs)
        finally:
            outcome.done()
            _send_reports_from_a_worker_process()

    return wrapper


def _async_wrapper(fn: Callable[..., Any], settings: _Settings) -> Callable[..., Any]:
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        outcome = _Outcome(await _delay_async(settings), settings)
        try:
            return await fn(*args, **kwargs)
        finally:
            outcome.done()
            await _asend_reports_from_a_worker_process()

    return wrapper


def _generator_wrapper(fn: Callable[..., Any], settings: _Settings) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Generator[Any, Any, Any]:
        outcome = _Outcome(_delay_sync(settings), settings)  # at the first next(): inside the run
        try:
            return (yield from fn(*args, **kwargs))
        finally:
            outcome.done()
            _send_reports_from_a_worker_process()

    return wrapper


def _async_generator_wrapper(fn: Callable[..., Any], settings: _Settings) -> Callable[..., Any]:
    async def wrapper(*args: Any, **kwargs: Any) -> AsyncGenerator[Any, Any]:
        outcome = _Outcome(await _delay_async(settings), settings)
        inner = fn(*args, **kwargs)
        try:  # ``yield from`` for async generators: asend() and athrow() reach the inner generator
            value = await inner.__anext__()
            while True:
                try:
                    sent = yield value
                except GeneratorExit:  # close() of the wrapper: close the inner one (finally), do not forward
                    raise
                except BaseException as exc:  # noqa: BLE001 - forwarded, as yield from would
                    value = await inner.athrow(exc)
                else:
                    value = await inner.asend(sent)
        except StopAsyncIteration:
            return
        finally:
            await inner.aclose()
            outcome.done()
            await _asend_reports_from_a_worker_process()

    return wrapper


# --------------------------------------------------------------------------------------------------------------
# The task factory
# --------------------------------------------------------------------------------------------------------------


def carbonaware_delay_task(
    window: timedelta = DEFAULT_WINDOW,
    duration: timedelta = DEFAULT_DURATION,
    provider: str | None = None,
    region: str | None = None,
    **task_kwargs: Any,
) -> Task[[], dict[str, Any]]:
    """A Prefect task that waits for the lowest-carbon start and returns the plan (``Plan.to_dict()``).

    ``task_kwargs`` go to ``@task`` (default name ``carbonaware-delay``, never cached), except the library options,
    recognised by name: the core's (``source``, ``min_savings``, ...) plus ``delay_on_retry`` and ``artifact``.
    """
    options = _split_options(task_kwargs)
    settings = _settings(window, duration, provider, region, options, job_inside=False)
    core.watch_interrupts()
    task_kwargs.setdefault("name", "carbonaware-delay")
    if "cache_policy" not in task_kwargs and "cache_key_fn" not in task_kwargs:
        task_kwargs["cache_policy"] = NO_CACHE  # a wait served from a cache would not wait

    def _carbonaware_delay_task() -> dict[str, Any]:
        """Wait for the lowest-carbon start within the window; return the decision."""
        plan = _delay_sync(settings).to_dict()
        _send_reports_from_a_worker_process()
        return plan

    return task(_carbonaware_delay_task, **task_kwargs)


# --------------------------------------------------------------------------------------------------------------
# Deployments: schedule the run at the best start instead of waiting in a worker
# --------------------------------------------------------------------------------------------------------------


def _plan_deployment(
    window: timedelta,
    duration: timedelta,
    provider: str | None,
    region: str | None,
    options: Mapping[str, Any],
    config: str | SettingsBlock | None = None,
) -> Plan:
    """``plan_delay`` with the run logger, the settings block and the Variables, worded for a scheduled run."""
    logger = options.get("logger") or _run_logger()
    given = _configure(config, {"logger": logger, **options}, provider, region, logger)
    request = core.validate_arguments(window, duration, given.provider, given.region, given.options)
    return core.plan_and_report(request, scheduled=True)


def _deployment_options(run_kwargs: dict[str, Any]) -> tuple[dict[str, Any], bool | str, str | SettingsBlock | None]:
    """Take the library's options out of ``run_kwargs`` (which go to ``run_deployment``): the core's,
    ``artifact`` and ``settings``. The created run is tagged so that it never reschedules itself again."""
    for name in ("scheduled_time", "timeout", "delay_on_retry"):
        if name in run_kwargs:
            raise TypeError(
                f"{name!r} does not apply here: carbonaware_run_deployment sets the start itself and returns at once "
                "(nothing waits, so nothing is retried); to wait for the run, use "
                "await prefect.flow_runs.wait_for_flow_run(flow_run.id, timeout=None)"
            )
    options = _split_options(run_kwargs, core.OPTIONS)
    artifact = _artifact_option(run_kwargs.pop("artifact", True))
    config = _settings_option(run_kwargs.pop("settings", None))
    run_kwargs["tags"] = [*(run_kwargs.get("tags") or ()), RESCHEDULED_TAG]
    return options, artifact, config


def _announce(plan: Plan, flow_run: FlowRun, name: str | UUID, artifact: bool | str) -> None:
    """Say which run was created for when (the decision itself was logged by ``plan_delay``); inside a run,
    publish the decision as an artifact too, unless switched off."""
    logger = _run_logger()
    when = plan.to_dict()["start"] if plan.waits else "now"
    logger.info("carbonaware: flow run %r of %s scheduled for %s", flow_run.name, name, when)
    if _current_run() is not None and artifact:
        key = artifact if isinstance(artifact, str) else _deployment_key(name)
        _publish(plan, key, None, logger, scheduled=True)


def _zone_deployments(targets: Mapping[Any, Any]) -> dict[str, str | UUID]:
    """``{zone: deployment}`` keyed as the plan names zones ("aws:eu-west-1", "grid:FR"); argument errors raise."""
    if not targets:
        raise ValueError("the mapping of zones to deployments is empty")
    checked: dict[str, str | UUID] = {}
    for zone, deployment in targets.items():
        if not isinstance(deployment, (str, UUID)):
            raise TypeError(
                f"the deployment for {zone!r} must be a name ('flow/deployment') or an id, not {deployment!r}"
            )
        checked[str(core.parse_zone(zone))] = deployment
    return checked


def _chosen_zone(plan: Plan) -> str:
    return str(core.Place(plan.zone)) if plan.zone is not None else f"grid:{plan.grid_zone}"


def _deployment_for(plan: Plan, name: str | UUID | Mapping[Any, Any], targets: Mapping[str, str | UUID]) -> str | UUID:
    """The deployment to run: ``name`` itself, or the chosen zone's (the first zone's when the plan names none)."""
    if not targets:
        return cast("str | UUID", name)
    return targets.get(_chosen_zone(plan), next(iter(targets.values())))


def _run_deployment_arguments(
    name: str | UUID | Mapping[Any, Any], provider: str | None, region: str | None, run_kwargs: dict[str, Any]
) -> tuple[dict[str, str | UUID], dict[str, Any]]:
    """With a ``{zone: deployment}`` mapping, the zones to plan over are its keys, the first one home."""
    if not isinstance(name, Mapping):
        return {}, run_kwargs
    if provider is not None or region is not None or "zones" in run_kwargs or "home" in run_kwargs:
        raise TypeError(
            "with a mapping of zones to deployments, the candidate zones are its keys (the first one is home, the "
            "baseline for savings): give no provider, region, zones or home"
        )
    targets = _zone_deployments(name)
    return targets, {**run_kwargs, "zones": list(targets), "home": False}


_DEPLOYMENT_NAMES: dict[UUID, str] = {}  # deployment id -> "flow/deployment", read once per process


def _deployment_key(deployment: str | UUID) -> str:
    """One artifact key per deployment, so that the key's history in the UI lists every decision about it:
    ``carbonaware-deployment-<flow>-<deployment>`` (slugged). A deployment given by id is looked up by name;
    if that fails, its id makes the key (stable too)."""
    if isinstance(deployment, str):
        try:
            deployment = UUID(deployment)
        except ValueError:
            return _artifact_key(f"deployment-{deployment}")
    name = _DEPLOYMENT_NAMES.get(deployment)
    if name is None:
        try:
            with _api_client(_configured_api_url()) as client:
                found = client.read_deployment(deployment)
                name = f"{client.read_flow(found.flow_id).name}/{found.name}"
            _DEPLOYMENT_NAMES[deployment] = name
        except Exception as exc:  # noqa: BLE001 - the id serves as well
            log.debug("carbonaware: deployment %s not read (%s); its id names the artifact", deployment, exc)
            name = str(deployment)
    return _artifact_key(f"deployment-{name}")


def _missing_deployment(zone: str, deployment: str | UUID) -> ValueError:
    return ValueError(f"no deployment {str(deployment)!r} (for zone {zone}) on the Prefect server")


def _deployment_id(deployment: str | UUID) -> UUID | None:
    """The id ``run_deployment`` would read ``deployment`` as, or None for a name."""
    if isinstance(deployment, UUID):
        return deployment
    try:
        return UUID(deployment)
    except ValueError:
        return None


def _check_deployments(targets: Mapping[str, str | UUID]) -> None:
    """Every zone's deployment must exist: a typo raises at once, not on the day that zone wins."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        for zone, deployment in targets.items():
            try:
                found = _deployment_id(deployment)
                client.read_deployment(found) if found else client.read_deployment_by_name(str(deployment))
            except ObjectNotFound:
                raise _missing_deployment(zone, deployment) from None


async def _acheck_deployments(targets: Mapping[str, str | UUID]) -> None:
    """As ``_check_deployments``, for async code."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    async with get_client() as client:
        for zone, deployment in targets.items():
            try:
                found = _deployment_id(deployment)
                await (client.read_deployment(found) if found else client.read_deployment_by_name(str(deployment)))
            except ObjectNotFound:
                raise _missing_deployment(zone, deployment) from None


def carbonaware_run_deployment(
    name: str | UUID | Mapping[Any, str | UUID],
    window: timedelta = DEFAULT_WINDOW,
    duration: timedelta = DEFAULT_DURATION,
    provider: str | None = None,
    region: str | None = None,
    parameters: dict[str, Any] | None = None,
    **run_kwargs: Any,
) -> tuple[FlowRun, Plan]:
    """Create a run of deployment ``name`` scheduled at the lowest-carbon start; return ``(flow_run, plan)``.

    Nothing sleeps: the run waits in Prefect's scheduler, so no worker or machine idles through the window. Other
    ``run_kwargs`` go to ``prefect.deployments.run_deployment`` (tags, flow_run_name, job_variables, as_subflow, ...);
    library options (``source``, ``min_savings``, ``windows``, ``deadline``, ...) are recognised by name.

    Where and when: ``name`` may map zones to deployments, e.g. ``{"aws:eu-west-1": "etl/eu", "aws:eu-north-1":
    "etl/nordic"}``: one plan over every (zone, start) creates the run of the winning zone's deployment at its
    start. The first zone is home: the baseline for savings and the winner of ties. Every deployment of the mapping
    must exist (a ValueError before planning otherwise), so a typo shows at once, whichever zone wins.
    """
    targets, run_kwargs = _run_deployment_arguments(name, provider, region, run_kwargs)
    options, artifact, config = _deployment_options(run_kwargs)
    core.validate_arguments(window, duration, provider, region, options)  # argument errors raise before any API call
    _check_deployments(targets)
    plan = _plan_deployment(window, duration, provider, region, options, config)
    scheduled = plan.start if plan.waits else None
    target = _deployment_for(plan, name, targets)
    # _sync: this function is sync even when called inside an async flow (async callers: the "a" variant).
    schedule = cast(Any, run_deployment)
    flow_run = schedule(target, parameters=parameters, scheduled_time=scheduled, timeout=0, _sync=True, **run_kwargs)
    _announce(plan, flow_run, target, artifact)
    return flow_run, plan


async def acarbonaware_run_deployment(
    name: str | UUID | Mapping[Any, str | UUID],
    window: timedelta = DEFAULT_WINDOW,
    duration: timedelta = DEFAULT_DURATION,
    provider: str | None = None,
    region: str | None = None,
    parameters: dict[str, Any] | None = None,
    **run_kwargs: Any,
) -> tuple[FlowRun, Plan]:
    """As ``carbonaware_run_deployment``, for async code (planning runs in a worker thread)."""
    targets, run_kwargs = _run_deployment_arguments(name, provider, region, run_kwargs)
    options, artifact, config = _deployment_options(run_kwargs)
    core.validate_arguments(window, duration, provider, region, options)
    await _acheck_deployments(targets)
    plan = await asyncio.to_thread(_plan_deployment, window, duration, provider, region, options, config)
    scheduled = plan.start if plan.waits else None
    target = _deployment_for(plan, name, targets)
    flow_run = await arun_deployment(target, parameters=parameters, scheduled_time=scheduled, timeout=0, **run_kwargs)
    await asyncio.to_thread(_announce, plan, flow_run, target, artifact)
    return flow_run, plan


# --------------------------------------------------------------------------------------------------------------
# Handing a deployment run over to a later run of the same deployment
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Handover:
    """Everything needed to create the later run, read from the current flow run."""

    deployment_id: UUID | str  # this run's deployment, or another zone's (by name or id)
    kwargs: dict[str, Any]
    plan: Plan


def _handover(
    window: timedelta,
    duration: timedelta,
    provider: str | None,
    region: str | None,
    options: Mapping[str, Any],
    config: str | SettingsBlock | None = None,
) -> _Handover | None:
    """The later run to create, or None when the current run should simply go on now (logged). With ``zones``
    mapping zones to deployments, the later run may be another zone's deployment (at once, if it is cleaner now)."""
    targets, options = _handover_zones(_readable_again(options))
    core.validate_arguments(window, duration, provider, region, options)
    ctx = FlowRunContext.get()
    run = ctx.flow_run if ctx is not None else None
    logger = _run_logger()
    if run is None or run.deployment_id is None:
        logger.warning("carbonaware: not a deployment flow run, so it cannot be rescheduled; running now")
        return None
    if RESCHEDULED_TAG in run.tags or run.run_count > 1:
        logger.info("carbonaware: this run was already rescheduled once (or is a retry); running now")
        return None
    plan = _plan_deployment(window, duration, provider, region, options, config)  # logs the decision
    later_run = {
        "parameters": dict(run.parameters),
        "scheduled_time": plan.start,
        "timeout": 0,
        "tags": [*run.tags, RESCHEDULED_TAG],
        "as_subflow": False,
        "idempotency_key": f"carbonaware-reschedule-{run.id}",  # a retried handover creates no second run
    }
    elsewhere = _elsewhere(plan, targets, home=options.get("home", True) is not False)
    if elsewhere is not None:  # its own work queue and job variables: this deployment's belong to this zone
        return _Handover(elsewhere, later_run, plan)
    if not plan.waits:
        return None
    here = {**later_run, "work_queue_name": run.work_queue_name, "job_variables": run.job_variables}
    return _Handover(run.deployment_id, here, plan)


def _handover_zones(options: Mapping[str, Any]) -> tuple[dict[str, str | UUID], dict[str, Any]]:
    """``zones`` here maps each other zone to its deployment; the core plans over its keys and the home zone."""
    zones = options.get("zones")
    if zones is None:
        return {}, dict(options)
    if not isinstance(zones, Mapping):
        raise TypeError(
            "zones maps each zone to the deployment that runs there, e.g. zones={'aws:eu-north-1': 'etl/nordic'}: "
            "the run can only be handed over to a deployment"
        )
    targets = _zone_deployments(zones)
    return targets, {**options, "zones": list(targets)}


def _elsewhere(plan: Plan, targets: Mapping[str, str | UUID], home: bool = True) -> str | UUID | None:
    """The other zone's deployment when the plan chose a zone other than home's, else None. With ``home`` False
    the current zone is no candidate: every plan names a listed zone (the first when it fails open), whose
    deployment gets the run."""
    if not targets:
        return None
    if not home:
        return _deployment_for(plan, "", targets)
    if plan.reason != "optimal" or not plan.alternatives:
        return None
    chosen = _chosen_zone(plan)
    return targets.get(chosen) if chosen != plan.alternatives[0].zone else None


def _handed_over(handover: _Handover, new_run: FlowRun, artifact: bool | str) -> State[Any]:
    start = handover.plan.to_dict()["start"]
    where = f" in {_chosen_zone(handover.plan)}" if handover.plan.alternatives else ""
    message = f"carbonaware: handed over to flow run {new_run.name!r}{where} scheduled at {start}"
    logger = _run_logger()
    logger.info(message)
    if artifact:
        key = artifact if isinstance(artifact, str) else _deployment_key(handover.deployment_id)
        _publish(handover.plan, key, None, logger, scheduled=True)
    return Completed(name="Rescheduled", message=message)


def reschedule_current_flow_run(
    window: timedelta = DEFAULT_WINDOW,
    duration: timedelta = DEFAULT_DURATION,
    provider: str | None = None,
    region: str | None = None,
    **options: Any,
) -> State[Any] | None:
    """Inside a deployment flow run: if waiting pays, create a run of the same deployment at the best start and
    return a ``Completed`` state named ``Rescheduled`` for the flow to return at once; otherwise None (go on now).

        @flow
        def nightly(day: str) -> None:
            if handed_over := reschedule_current_flow_run(window=timedelta(hours=8), duration=timedelta(hours=1)):
                return handed_over
            ...

    The new run has the same parameters, work queue and job variables plus the tag ``carbonaware-rescheduled``,
    which keeps it from rescheduling again. Any failure to create it is logged and the current run goes on.
    ``artifact`` (default True: the deployment's key, ``carbonaware-deployment-<flow>-<deployment>``; False for
    none, or a key) reports the decision.

    ``zones`` maps other zones to the deployments that run there (``zones={"aws:eu-north-1": "etl/nordic"}``): the
    plan then covers them and the home zone, and when another zone wins, the later run is created for its
    deployment (with the same parameters; its own work queue and job variables), at once if it is cleaner now.
    With ``home=False`` the current zone is no candidate: the run always goes to the winning listed zone.
    """
    artifact = _artifact_option(options.pop("artifact", True))
    config = _settings_option(options.pop("settings", None))
    handover = _handover(window, duration, provider, region, options, config)
    if handover is None:
        return None
    try:
        new_run = cast(Any, run_deployment)(handover.deployment_id, _sync=True, **handover.kwargs)
    except Exception as exc:  # noqa: BLE001 - fail open: run now rather than not at all
        _run_logger().warning(
            "carbonaware: could not create the later run (%s: %s); running now", type(exc).__name__, exc
        )
        return None
    return _handed_over(handover, new_run, artifact)


async def areschedule_current_flow_run(
    window: timedelta = DEFAULT_WINDOW,
    duration: timedelta = DEFAULT_DURATION,
    provider: str | None = None,
    region: str | None = None,
    **options: Any,
) -> State[Any] | None:
    """As ``reschedule_current_flow_run``, for async flows."""
    artifact = _artifact_option(options.pop("artifact", True))
    config = _settings_option(options.pop("settings", None))
    handover = await asyncio.to_thread(_handover, window, duration, provider, region, options, config)
    if handover is None:
        return None
    try:
        new_run = await arun_deployment(handover.deployment_id, **handover.kwargs)
    except Exception as exc:  # noqa: BLE001 - fail open
        _run_logger().warning(
            "carbonaware: could not create the later run (%s: %s); running now", type(exc).__name__, exc
        )
        return None
    return await asyncio.to_thread(_handed_over, handover, new_run, artifact)


# --------------------------------------------------------------------------------------------------------------
# Recurring deployments: a cron run hands over to a run at the best start within its margin
# --------------------------------------------------------------------------------------------------------------


def carbonaware_schedule(
    window: timedelta = DEFAULT_WINDOW,
    duration: timedelta = DEFAULT_DURATION,
    provider: str | None = None,
    region: str | None = None,
    **options: Any,
) -> Callable[[F], F]:
    """Make a scheduled (cron) deployment carbon-aware: each scheduled run may start any time within ``window``
    of its scheduled time, at the lowest-carbon start, without any worker sleeping.

        @carbonaware_schedule(window=timedelta(hours=6), duration=timedelta(hours=1))
        @flow
        def nightly() -> None: ...

        nightly.serve(cron="0 1 * * *")  # or .deploy(...), or prefect.yaml: the flow itself hands over

    The cron run plans and, if waiting pays, creates a run of the same deployment at the best start (tag
    ``carbonaware-rescheduled``, the decision artifact) and ends ``Completed``/``Rescheduled``; that run, a retry,
    a run that is not a deployment's, and any failure to plan or to hand over run at once. The window counts from
    the scheduled time, so a run that started late is never moved past it. Goes above ``@flow`` (or under it, on
    the function); options as for ``reschedule_current_flow_run``. Argument errors raise here.
    """
    options = _readable_again(options)
    checked = dict(options)
    _artifact_option(checked.pop("artifact", True))
    _settings_option(checked.pop("settings", None))
    core.validate_arguments(window, duration, provider, region, checked)

    def decorate(fn: F) -> F:
        if isinstance(fn, Task):
            raise TypeError(
                "carbonaware_schedule goes above @flow: a task cannot hand its run over "
                "(to wait inside a task, use @carbonaware_delay_decorator under @task)"
            )
        target = fn.fn if isinstance(fn, Flow) else fn
        if inspect.isgeneratorfunction(target) or inspect.isasyncgenfunction(target):
            raise TypeError("carbonaware_schedule needs a flow that returns, not a generator")
        wrapper = _scheduled_wrapper(target, window, duration, provider, region, options)
        functools.update_wrapper(wrapper, target)
        if isinstance(fn, Flow):
            flow_copy = copy.copy(fn)
            flow_copy.fn = wrapper
            return cast(F, flow_copy)
        return cast(F, wrapper)

    return decorate


def _scheduled_wrapper(
    fn: Callable[..., Any],
    window: timedelta,
    duration: timedelta,
    provider: str | None,
    region: str | None,
    options: Mapping[str, Any],
) -> Callable[..., Any]:
    if inspect.iscoroutinefunction(fn):

        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            left = await asyncio.to_thread(_window_left, window)
            if left is not None:
                handed_over = await areschedule_current_flow_run(left, duration, provider, region, **options)
                if handed_over is not None:
                    return handed_over
            return await fn(*args, **kwargs)

        return async_wrapper

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        left = _window_left(window)
        if left is not None:
            handed_over = reschedule_current_flow_run(left, duration, provider, region, **options)
            if handed_over is not None:
                return handed_over
        return fn(*args, **kwargs)

    return wrapper


def _window_left(window: timedelta) -> timedelta | None:
    """What is left of ``window`` counted from this run's scheduled time; None (logged) when nothing is."""
    ctx = FlowRunContext.get()
    run = ctx.flow_run if ctx is not None else None
    scheduled = run.expected_start_time if run is not None else None
    if scheduled is None:
        return window  # not a deployment run: reschedule_current_flow_run says so and the flow runs
    late = core.CLOCK.now() - scheduled
    left = window - max(late, timedelta(0))
    if left <= timedelta(seconds=1):
        _run_logger().info(
            "carbonaware: running now: this run started %s after its scheduled time, at the end of its %s window",
            core._human(late),
            core._human(window),
        )
        return None
    return left


# --------------------------------------------------------------------------------------------------------------
# Proof: a table artifact and an event per decision, an event and a ledger record per outcome
# --------------------------------------------------------------------------------------------------------------

DECISION_EVENT = "carbonaware.decision"
OUTCOME_EVENT = "carbonaware.outcome"
PROOF_DRAIN_SECONDS = 10.0  # at exit, queued artifacts get this long to reach the API
PROOF_LINGER_SECONDS = 0.25  # the publisher collects this long, so identical decisions become one artifact
EVENTS_PER_REQUEST = 200  # events go to the API in batches (one POST /events each), not one request per event
EVENT_MAX_BYTES = 1_500_000  # Prefect's default maximum event size (PREFECT_SERVER_EVENTS_MAXIMUM_SIZE_BYTES)


@dataclass(frozen=True)
class _Artifact:
    """An artifact to create off the task's path. Those that compare equal on ``same()`` within one flow run are
    one decision (200 mapped task runs with the same plan): one artifact says so, not 200. ``same`` and
    ``render`` run in the publisher's thread: the task only hands the plan over."""

    kind: str  # "markdown" or "table"
    key: str
    flow_id: UUID | None
    task_id: UUID | None
    same: Callable[[], Any]
    render: Callable[[int], tuple[Any, str]]  # given how many runs decided it: (data, description)
    api_url: str | None  # the API of the run that asked (None: the ephemeral one)

    def group(self) -> tuple[Any, ...]:
        return (self.kind, self.key, self.flow_id, self.same())


@dataclass(frozen=True)
class _Event:
    """A Prefect event to build and send off the task's path (building one costs about a millisecond). Its related
    resources are exactly the flow run and the task run given: nothing is read from any context."""

    name: str
    plan: Plan  # its zone is the event's resource
    flow_id: UUID | None
    task_id: UUID | None
    payload: Callable[[], dict[str, Any]]
    api_url: str | None
    occurred: Any = field(default_factory=lambda: core.CLOCK.now())  # when it happened, not when it is sent


@dataclass(frozen=True)
class _Records:
    """Ledger records a run handed over: appended in the publisher's thread, in the order they were handed."""

    path: str
    records: Sequence[Mapping[str, Any]] | Callable[[], Sequence[Mapping[str, Any]]]  # built here, or built later

    def built(self) -> Sequence[Mapping[str, Any]]:
        return self.records() if callable(self.records) else self.records


_Item = _Artifact | _Event | _Records


class _Publisher:
    """One daemon thread that does the reporting beside the tasks -- ledger appends, events, artifacts -- so a task
    hands its decision over and goes on. Collects for ``PROOF_LINGER_SECONDS``: identical decisions of one flow run
    become one artifact, a batch's ledger records one append per file and its events one request per API.
    Drained (bounded) at interpreter exit and by ``flush_reports()``."""

    def __init__(self) -> None:
        import queue
        import threading

        self._queue: queue.Queue[_Item | Callable[[], None]] = queue.Queue()
        self._thread: Any = None
        self._lock = threading.Lock()
        self._published: dict[tuple[Any, ...], None] = {}  # groups already out (bounded, oldest dropped)
        self._clients: dict[str | None, Any] = {}  # one open client per API: no connection and token per batch

    def submit(self, item: _Item) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._start()
        self._queue.put(item)

    def _start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                import atexit
                import threading

                # An empty context: no run's context (the one that started the thread) leaks into its work.
                work = functools.partial(contextvars.Context().run, self._work)
                self._thread = threading.Thread(target=work, name="carbonaware-publisher", daemon=True)
                self._thread.start()
                atexit.register(self.drain)

    def drain(self, timeout: float = PROOF_DRAIN_SECONDS) -> bool:
        """Wait (at most ``timeout``) until everything submitted so far is published; whether it all was."""
        import threading

        if self._thread is None or not self._thread.is_alive():
            return True
        done = threading.Event()
        self._queue.put(done.set)
        return done.wait(timeout)

    def _work(self) -> None:
        while True:
            batch = self._collect()
            try:
                self._append([item for item in batch if isinstance(item, _Records)])
                self._send([item for item in batch if isinstance(item, (_Event, _Artifact))])
            except Exception as exc:  # noqa: BLE001 - the thread must outlive any bug in a batch
                log.warning("carbonaware: could not publish reports: %s: %s", type(exc).__name__, exc)
            for waiter in batch:
                if not isinstance(waiter, (_Artifact, _Event, _Records)):
                    waiter()

    def _send(self, items: Sequence[_Event | _Artifact]) -> None:
        """Events, then artifacts, per API, in one settings context each (entering one costs milliseconds)."""
        for url in dict.fromkeys(item.api_url for item in items):
            try:
                with _api_settings(url):
                    self._emit([item for item in items if isinstance(item, _Event) and item.api_url == url])
                    self._create_all([item for item in items if isinstance(item, _Artifact) and item.api_url == url])
            except Exception as exc:  # noqa: BLE001 - reporting must not break anything
                log.warning("carbonaware: could not publish to %s: %s: %s", url, type(exc).__name__, exc)

    def _collect(self) -> list[_Item | Callable[[], None]]:
        """What arrived while this thread slept ``PROOF_LINGER_SECONDS`` after the first item: it wakes once a
        period, not once for every task handing something over (each wake-up takes the GIL from the tasks)."""
        import queue

        batch: list[_Item | Callable[[], None]] = [self._queue.get()]
        if isinstance(batch[0], (_Artifact, _Event, _Records)):  # a lone drain request is answered at once
            time.sleep(PROOF_LINGER_SECONDS)
        while True:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                return batch

    @staticmethod
    def _append(items: Sequence[_Records]) -> None:
        """One append per ledger file for the whole batch (one write under the lock: atomic as ever)."""
        for path in dict.fromkeys(item.path for item in items):
            try:
                records = [record for item in items if item.path == path for record in item.built()]
                core.append_records(path, records)
            except Exception as exc:  # noqa: BLE001 - reporting must not break anything
                log.warning("carbonaware: could not write to ledger %s: %s: %s", path, type(exc).__name__, exc)

    @contextlib.contextmanager
    def _client(self, url: str | None) -> Iterator[Any]:
        """This thread's open client of the API at ``url`` (in ``_send``'s settings for it); one that failed is
        closed and opened afresh next time."""
        from prefect.client.orchestration import get_client

        client = self._clients.get(url)
        if client is None:
            client = self._clients[url] = get_client(sync_client=True).__enter__()
        try:
            yield client
        except BaseException:
            self._clients.pop(url, None)
            with contextlib.suppress(Exception):
                client.__exit__(None, None, None)
            raise

    def _emit(self, events: Sequence[_Event]) -> None:
        """``POST /events`` in batches, per API: no events worker, so no run context adds resources of its own."""
        for url in dict.fromkeys(event.api_url for event in events):
            built = [e for e in (_build_event(event) for event in events if event.api_url == url) if e is not None]
            for first in range(0, len(built), EVENTS_PER_REQUEST):
                chunk = built[first : first + EVENTS_PER_REQUEST]
                body = ("[" + ",".join(text for _, text in chunk) + "]").encode()  # encoded once, when built
                try:
                    with self._client(url) as client:
                        post = functools.partial(client.request, cast(Any, "POST"), cast(Any, "/events"))
                        post(content=body, headers={"Content-Type": "application/json"}).raise_for_status()
                except Exception as exc:  # noqa: BLE001 - reporting must not break anything
                    names = ", ".join(sorted({name for name, _ in chunk}))
                    log.warning(
                        "carbonaware: could not emit %s (%d events): %s: %s", names, len(chunk), type(exc).__name__, exc
                    )

    def _create_all(self, items: Sequence[_Artifact]) -> None:
        groups: dict[tuple[Any, ...], list[_Artifact]] = {}
        for item in items:
            try:
                group = item.group()
            except Exception as exc:  # noqa: BLE001 - reporting must not break anything
                log.warning("carbonaware: could not create artifact %r: %s: %s", item.key, type(exc).__name__, exc)
                continue
            if group not in self._published:
                groups.setdefault(group, []).append(item)
        for group, alike in groups.items():
            self._create(alike[0], len(alike))
            self._published[group] = None
            while len(self._published) > 10_000:
                del self._published[next(iter(self._published))]

    def _create(self, item: _Artifact, runs: int) -> None:
        """One API call, in the submitting run's settings; a dead API is retried once, not for a minute."""
        try:
            from prefect.client.schemas.actions import ArtifactCreate

            data, description = item.render(runs)
            artifact = ArtifactCreate(
                key=item.key,
                type=item.kind,
                data=data,
                description=description,
                flow_run_id=item.flow_id,
                task_run_id=item.task_id,
            )
            with self._client(item.api_url) as client:
                client.create_artifact(artifact)
        except Exception as exc:  # noqa: BLE001 - reporting must not break anything
            log.warning("carbonaware: could not create artifact %r: %s: %s", item.key, type(exc).__name__, exc)


_SETTINGS_FOR: dict[tuple[str | None, int], tuple[Any, Any]] = {}  # (url, id(base)) -> (settings built, base)


@contextlib.contextmanager
def _api_settings(url: str | None) -> Iterator[None]:
    """The current settings with the API at ``url``, where a dead API is retried once, not for a minute. Built once
    per API and base settings (the base is kept, so its id stays its own): building them (``temporary_settings``)
    rereads the environment, the profiles and the dotenv files, tens of milliseconds, which once per batch was most
    of the publisher's CPU."""
    from prefect.context import SettingsContext, get_settings_context
    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES

    context = get_settings_context()
    key = (url, id(context.settings))
    entry = _SETTINGS_FOR.get(key)
    if entry is None:
        if len(_SETTINGS_FOR) > 16:
            _SETTINGS_FOR.clear()
        updates: dict[Any, Any] = {PREFECT_API_URL: url, PREFECT_CLIENT_MAX_RETRIES: 1}
        entry = _SETTINGS_FOR[key] = (context.settings.copy_with_update(updates=updates), context.settings)
    with SettingsContext(profile=context.profile, settings=entry[0]):
        yield


@contextlib.contextmanager
def _api_client(url: str | None) -> Iterator[Any]:
    """A sync client of the API at ``url`` that retries a dead API once, not for a minute."""
    from prefect.client.orchestration import get_client

    with _api_settings(url), get_client(sync_client=True) as c:
        yield c


def _build_event(item: _Event) -> tuple[str, str] | None:
    """(name, JSON text) of the event as ``POST /events`` takes it (the server validates it; pydantic here would
    cost a millisecond an event); one larger than the server takes is dropped with a warning."""
    try:
        import json
        import uuid

        event = {
            "id": str(uuid.UUID(hex=core._new_id() + core._new_id(), version=4)),  # no os.urandom per event
            "occurred": item.occurred.isoformat(),
            "event": item.name,
            "resource": _zone_resource(_zone_name(item.plan)),
            "related": _related(item.flow_id, item.task_id),
            "payload": item.payload(),
        }
        text = json.dumps(event, separators=(",", ":"), allow_nan=False)
        if len(text.encode()) > EVENT_MAX_BYTES:
            raise ValueError(f"{len(text.encode())} bytes, more than the {EVENT_MAX_BYTES} an event may have")
        return item.name, text
    except Exception as exc:  # noqa: BLE001 - an event too large, a payload that is not JSON: one warning
        log.warning("carbonaware: could not emit %s: %s: %s", item.name, type(exc).__name__, exc)
        return None


_PUBLISHER = _Publisher()


def _ledger_later(path: str, records: Sequence[Mapping[str, Any]]) -> bool:
    """The core's ledger sink: inside a run, records go to the publisher (off the task's path, in order); outside
    runs the core appends them at once, as without Prefect."""
    if TaskRunContext.get() is None and FlowRunContext.get() is None:
        return False
    _PUBLISHER.submit(_Records(path, tuple(records)))
    return True


if hasattr(core, "ledger_sinks"):  # a vendored core without sinks appends at once
    core.ledger_sinks.append(_ledger_later)


def _configured_api_url() -> str | None:
    """PREFECT_API_URL as set, for the publisher thread to talk to the same API (None: the ephemeral one)."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    return url if isinstance(url, str) else None


def flush_reports(timeout: float = PROOF_DRAIN_SECONDS) -> bool:
    """Wait (at most ``timeout`` seconds) until the ledger records, events and artifacts handed to the background
    publisher so far are written and in the API; whether they all are. It also runs at interpreter exit."""
    return _PUBLISHER.drain(timeout)


def _run_ids() -> tuple[UUID | None, UUID | None]:
    """(flow run id, task run id) of the run we are in, read now: the publisher's thread has no context."""
    task_ctx, flow_ctx = TaskRunContext.get(), FlowRunContext.get()
    flow_run = flow_ctx.flow_run if flow_ctx is not None else None
    task_id = task_ctx.task_run.id if task_ctx is not None else None
    flow_id = flow_run.id if flow_run is not None else (task_ctx.task_run.flow_run_id if task_ctx else None)
    return flow_id, task_id


def _zone_resource(zone: str) -> dict[str, str]:
    return {"prefect.resource.id": f"carbonaware.grid-zone.{zone}", "prefect.resource.name": zone}


def _zone_name(plan: Plan) -> str:
    return _plain_text(plan.grid_zone or (str(plan.zone) if plan.zone else "unknown"))[:100]


def _related(flow_id: UUID | None, task_id: UUID | None) -> list[dict[str, str]]:
    related = []
    if flow_id is not None:
        related.append({"prefect.resource.id": f"prefect.flow-run.{flow_id}", "prefect.resource.role": "flow-run"})
    if task_id is not None:
        related.append({"prefect.resource.id": f"prefect.task-run.{task_id}", "prefect.resource.role": "task-run"})
    return related


def decision_row(plan: Plan) -> dict[str, Any]:
    """The table artifact's one row: what was decided, on which signal, and the grams behind it."""
    data = plan.to_dict()
    return {  # the UI shows the columns in this order: what was decided and what it saves first
        "start": data["start"],
        "wait": core.format_iso_duration(timedelta(seconds=round(plan.delay.total_seconds()))),
        "zone": _zone_name(plan),
        "g_avoided": data["avoided_g"],
        "g_if_now": data["emissions_now_g"],
        "g_at_start": data["emissions_g"],
        "energy_kwh": data["energy_kwh"],
        "savings": data["savings"],
        "signal": data["signal"],
        "source": _plain_text(plan.source),
        "intensity_now": data["now"],
        "intensity_at_start": data["expected"],
        "unit": _plain_text(plan.unit),
        "reason": plan.reason,
        "decision": plan.id,
    }


def _table_key(key: str) -> str:
    return f"{key}-decisions"


def _prove_decision(
    plan: Plan, key: str, ids: tuple[UUID | None, UUID | None], api_url: str | None, *, scheduled: bool = False
) -> None:
    """Beside the markdown artifact: a table artifact (key ``<key>-decisions``, so the key's history lists every
    decision) and a ``carbonaware.decision`` event, both built and sent off the task's path. Never raises."""
    try:
        flow_id, task_id = ids
        payload = functools.partial(core.decision_record, plan)
        _PUBLISHER.submit(_Event(DECISION_EVENT, plan, flow_id, task_id, payload, api_url))

        def same() -> Any:
            return _alike(plan, scheduled)

        def render(runs: int) -> tuple[Any, str]:
            return _table(decision_row(plan), runs)

        _PUBLISHER.submit(_Artifact("table", _table_key(key), flow_id, task_id, same, render, api_url))
    except Exception as exc:  # noqa: BLE001 - reporting must not break the work
        log.warning("carbonaware: could not report the decision: %s: %s", type(exc).__name__, exc)


def _alike(plan: Plan, scheduled: bool) -> Any:
    """What makes two decisions one artifact: the decision as the artifacts show it. Mapped tasks decide moments
    apart: a start-now decision's "now" moves on, and so, in the third digit, do the intensities averaged over the
    job from now; neither makes it another decision. The start of a wait, the reason, the source and the forecast
    (the chart) do."""

    def shown(value: float | None, digits: int) -> float | None:
        return None if value is None else round(value, digits)

    start = plan.start.replace(microsecond=0) if plan.waits else None
    numbers = (shown(plan.now, 1), shown(plan.expected, 1), shown(plan.savings, 3), shown(plan.avoided_g, 0))
    fields = (plan.zone, plan.grid_zone, plan.source, plan.unit, plan.reason, plan.detail, plan.fallbacks)
    return (scheduled, start, *numbers, *fields, plan.duration, plan.window, plan.power_kw, plan.forecast)


def _table(row: dict[str, Any], runs: int) -> tuple[Any, str]:
    description = f"carbonaware decision: start {row['start']} for {row['zone']} via {row['source']}"
    if runs > 1:
        description += f" (decided alike by {runs} task runs of this flow run; later alike ones are not repeated)"
    return [{**row, "runs": runs}], description


def _markdown_later(
    plan: Plan, key: str, ids: tuple[UUID | None, UUID | None], api_url: str | None, *, scheduled: bool = False
) -> None:
    """A decision nobody waits on: its markdown artifact is rendered and created by the publisher."""

    def description() -> str:
        return core.describe(_markdown_safe(plan), scheduled=scheduled)

    def render(runs: int) -> tuple[Any, str]:
        more = f" (and {runs - 1} more task runs of this flow run alike)" if runs > 1 else ""
        return _render_markdown(plan, scheduled=scheduled), description() + more

    def same() -> Any:
        return _alike(plan, scheduled)

    _PUBLISHER.submit(_Artifact("markdown", key, *ids, same, render, api_url))


class _Outcome:
    """Times the job that follows a decision; at its end, records the outcome (ledger, event). Never raises."""

    def __init__(self, plan: Plan, settings: _Settings) -> None:
        self.plan, self.settings = plan, settings
        self.ids = _run_ids()
        self.started, self.began = core.CLOCK.now(), core.CLOCK.monotonic()

    def done(self) -> None:
        try:  # the runtime in elapsed time: a wall clock stepped meanwhile changes nothing
            ended = self.started + timedelta(seconds=max(0.0, core.CLOCK.monotonic() - self.began))
            path = core.ledger_path(self.settings.options.get("ledger"))
            outcome = core.pending_outcome(self.plan, self.started, ended)
            if path is not None and self.plan.id:
                if self.ids != (None, None):  # in a run: the record is built and written off the task's path
                    _PUBLISHER.submit(_Records(path, lambda: [outcome.to_record()]))
                else:
                    core.record_outcome(self.plan, self.started, ended, ledger=path)
            if self.ids != (None, None) and self.settings.artifact:  # artifact=False: no artifacts, no events
                item = _Event(OUTCOME_EVENT, self.plan, *self.ids, outcome.to_record, _configured_api_url())
                _PUBLISHER.submit(item)
        except Exception as exc:  # noqa: BLE001 - reporting must not break the work
            log.warning("carbonaware: could not record the outcome: %s: %s", type(exc).__name__, exc)


def read_prefect_records(since: Any, until: Any, limit: int = 10_000) -> list[dict[str, Any]]:
    """Ledger records rebuilt from the ``carbonaware.decision``/``carbonaware.outcome`` events in the Prefect API
    (for ``python -m carbonaware_core report --prefect``)."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter

    event_filter = EventFilter(
        occurred=EventOccurredFilter(since=since - timedelta(days=2), until=until + timedelta(days=7)),
        event=EventNameFilter(name=[DECISION_EVENT, OUTCOME_EVENT]),
    )
    records: list[dict[str, Any]] = []
    with get_client(sync_client=True) as client:
        page: Any = client.read_events(filter=event_filter, limit=50)  # the most the API serves a page
        while page is not None and len(records) < limit:
            records += [dict(event.payload) for event in page.events if core._is_record(event.payload)]
            page = client.read_events_page(page.next_page) if page.next_page else None
    return list(reversed(records))  # the API answers newest first; the ledger reads oldest first
