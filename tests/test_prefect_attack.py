"""Promises of the Prefect layer under attack: provider text in artifacts, Ctrl-C in worker threads, every
enclosing timeout, the delay task's margin. Real Prefect server (test harness), real signals, loopback only."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from markdown_it import MarkdownIt
from prefect import flow, get_client, task
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.deployments import run_deployment
from prefect.runner import Runner
from prefect.states import Cancelling

import carbonaware_core
import carbonaware_prefect as cp
from carbonaware_core import CloudZone, ForecastPoint, Plan
from tests import prefect_helpers as helpers
from tests.loopback import HostedScheduler, Reply, serving
from tests.prefect_helpers import wait_for

ROOT = Path(__file__).resolve().parent.parent
ZONE = {"provider": "aws", "region": "us-east-1"}
HOSTILE = "![t](https://x.invalid/p.png) <img src=x onerror=alert(1)> [a](http://x)"  # < 80 characters: quoted whole


@pytest.fixture(scope="module")
def prefect_api() -> Iterator[str]:
    with helpers.prefect_server() as url:
        yield url


@pytest.fixture
def scheduler(monkeypatch: pytest.MonkeyPatch) -> Iterator[HostedScheduler]:
    """The hosted scheduler on loopback; its ideal start is a minute after the window opens."""
    with serving() as server:
        hosted = HostedScheduler(server, ideal_after=timedelta(minutes=1))
        monkeypatch.setenv("CARBONAWARE_SCHEDULER_BASE_URL", server.url)
        yield hosted


def asked_window(hosted: HostedScheduler) -> timedelta:
    window = hosted.calls[-1].json()["windows"][0]
    return datetime.fromisoformat(window["end"]) - datetime.fromisoformat(window["start"])


# --------------------------------------------------------------------------------------------------------------
# Item 4: provider text is data, not markup
# --------------------------------------------------------------------------------------------------------------


def render(markdown: str) -> str:
    """HTML as a CommonMark renderer with GFM tables and strike-through makes it (Prefect's UI renders markdown)."""
    return MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(markdown)


def outside_the_fence(markdown: str) -> str:
    """The markdown without its fenced chart, and without backslash escapes (what is left is active)."""
    fence = re.search(r"^(`{3,})text$", markdown, re.MULTILINE)
    assert fence is not None, markdown
    prose = markdown[: fence.start()]
    return re.sub(r"\\[!-/:-@\[-`{-~]", "", prose)


def test_a_providers_error_text_shows_as_text_in_the_artifact(
    prefect_api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with serving() as server:
        server.route("POST", "/v0/schedule/", Reply(502, HOSTILE.encode()))
        monkeypatch.setenv("CARBONAWARE_SCHEDULER_BASE_URL", server.url)

        @task(name="hostile-provider")
        @cp.carbonaware_delay_decorator(window=timedelta(minutes=5), source="carbonaware", **ZONE)
        def job() -> str:
            return "ran"

        @flow
        def pipeline() -> str:
            return job()

        assert pipeline() == "ran"  # failed open
        assert server.requests_to("/v0/schedule/"), "the scheduler was never asked"
    artifact = helpers.published_artifact("carbonaware-hostile-provider")  # read back through the client API
    assert artifact is not None and artifact.data is not None and artifact.description is not None
    for markdown in (artifact.data, artifact.description):
        assert "source-failed" in markdown and "onerror" in markdown and "x.invalid" in markdown.replace("\\", "")
        active = outside_the_fence(markdown + "\n```text\n```")
        for construct in ("![", "](", "<img", "<", "[", "]"):
            assert construct not in active, (construct, markdown)
        html = render(markdown)
        assert "<img" not in html and "<a " not in html, html
        assert "![t](https://x.invalid/p.png)" in html and "&lt;img src=x onerror=alert(1)&gt;" in html  # the words


def hostile_plan(text: str, chart_text: str) -> Plan:
    now = datetime(2026, 1, 1, 12, tzinfo=timezone.utc)
    points = tuple(
        ForecastPoint(now + timedelta(minutes=5 * i), now + timedelta(minutes=5 * (i + 1)), 300.0 - i)
        for i in range(12)
    )
    return Plan(
        start=now + timedelta(minutes=20),
        delay=timedelta(minutes=20),
        zone=CloudZone("aws", text),
        source="url:" + chart_text,
        expected=1.0,
        now=2.0,
        savings=0.5,
        unit="g/kWh " + chart_text,
        reason="optimal",
        detail=text,
        grid_zone=text,
        window=timedelta(hours=1),
        fallbacks=(text,),
        forecast=points,
    )


def test_every_outside_field_is_escaped_and_the_chart_cannot_close_its_fence() -> None:
    text = (
        HOSTILE + " www.evil.example a@b.example *em* _u_ `code` ~~s~~ | cell &amp; \n# heading\r\n<script>x</script>"
    )
    chart_text = "\n````\n" + HOSTILE + "\n```"  # a longer backtick run than a plain fence, then a line of its own
    markdown = cp._render_markdown(hostile_plan(text, chart_text))
    html = render(markdown)
    for element in ("<img", "<a ", "<script", "<em>", "<code>", "<s>", "<h1", "<h2"):
        assert element not in html, (element, html)
    assert html.count("<tr>") == 1 + 8  # the header row and eight rows: no cell or row broke out
    assert html.count("<pre>") == 1 and html.rstrip().endswith("</code></pre>")  # the chart stayed in its fence
    chart = html[html.index("<pre>") :]
    assert "`````" not in chart and "````" in chart and "![t](https://x.invalid/p.png)" in chart  # shown as written
    prose = html[: html.index("<pre>")]
    for words in ("![t](https://x.invalid/p.png)", "&lt;img src=x onerror=alert(1)&gt;", "[a](http://x)", "&amp;amp;"):
        assert words in prose, words
    assert "www.evil.example a@b.example *em* _u_ `code` ~~s~~ | cell" in prose
    active = outside_the_fence(markdown)
    assert "http:" not in active and "https:" not in active and "www." not in active and "@" not in active
    description = carbonaware_core.describe(cp._markdown_safe(hostile_plan(text, chart_text)))
    assert "\n" not in description and "<" not in outside_the_fence(description + "\n```text\n```")
    assert render(description).count("<p>") == 1 and "<img" not in render(description)


# --------------------------------------------------------------------------------------------------------------
# Item 14: Ctrl-C ends waits in every thread (core mechanism, then a real Prefect process)
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def sigint_recorder() -> Iterator[list[int]]:
    """A SIGINT handler of the program's own (never the default one: a stray signal must not end the session),
    with the library's watcher chained in front of it; the original handler comes back afterwards."""
    calls: list[int] = []
    original = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))
    try:
        assert carbonaware_core.watch_interrupts()
        assert carbonaware_core.watch_interrupts()  # idempotent: one link in the chain, not two
        yield calls
    finally:
        signal.signal(signal.SIGINT, original)


def cheap_in(seconds: float) -> list[ForecastPoint]:
    now = datetime.now(timezone.utc)
    step = timedelta(seconds=1)
    return [
        ForecastPoint(now + step * i, now + step * (i + 1), 100.0 if i >= seconds else 500.0) for i in range(-1, 90)
    ]


def wait_in_thread(run: Callable[[Callable[[Plan], None]], Any]) -> tuple[threading.Thread, threading.Event, list[Any]]:
    """Start ``run(on_plan)`` in a worker thread; the event is set once its wait is decided."""
    decided, outcome = threading.Event(), []

    def target() -> None:
        try:
            outcome.append(run(lambda plan: decided.set()))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, decided, outcome


def test_ctrl_c_ends_waits_in_worker_threads_and_only_those_already_waiting(sigint_recorder: list[int]) -> None:
    def sync_wait(on_plan: Callable[[Plan], None]) -> Plan:
        return carbonaware_core.carbonaware_delay(
            timedelta(seconds=60), timedelta(seconds=1), source=cheap_in(45), on_plan=on_plan, **ZONE
        )

    def async_wait(on_plan: Callable[[Plan], None]) -> Plan:
        coroutine = carbonaware_core.carbonaware_delay_async(
            timedelta(seconds=60), timedelta(seconds=1), source=cheap_in(45), on_plan=on_plan, **ZONE
        )
        return asyncio.run(coroutine)

    waits = [wait_in_thread(sync_wait), wait_in_thread(async_wait)]
    for _, decided, _ in waits:
        assert decided.wait(30), "the wait never began"
    os.kill(os.getpid(), signal.SIGINT)  # a real signal: handled in this (the main) thread
    interrupted = time.monotonic()
    for thread, _, _ in waits:
        thread.join(timeout=10)
    ended = time.monotonic() - interrupted
    assert sigint_recorder == [signal.SIGINT]  # the program's own handler still ran, once
    (sync_outcome,), (async_outcome,) = (outcome for _, _, outcome in waits)
    assert isinstance(sync_outcome, KeyboardInterrupt), sync_outcome
    assert isinstance(async_outcome, asyncio.CancelledError), async_outcome  # as asyncio.run does on Ctrl-C
    assert ended < carbonaware_core.WAIT_CHUNK_SECONDS + 1.5  # one sleep chunk, generously

    # A wait that begins after the interrupt is not poisoned by it (a notebook goes on after Ctrl-C).
    thread, decided, outcome = wait_in_thread(
        lambda on_plan: carbonaware_core.carbonaware_delay(
            timedelta(seconds=3), timedelta(seconds=1), source=cheap_in(1.5), on_plan=on_plan, **ZONE
        )
    )
    thread.join(timeout=30)
    assert len(outcome) == 1 and isinstance(outcome[0], Plan) and outcome[0].reason == "optimal", outcome


def test_wait_guards_end_waits_by_raising_and_a_broken_one_breaks_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def broken() -> None:
        calls.append("broken")
        raise RuntimeError("a guard with a bug")

    monkeypatch.setattr(carbonaware_core, "_wait_guards", [broken])
    plan = carbonaware_core.carbonaware_delay(timedelta(seconds=3), timedelta(seconds=1), source=cheap_in(1.5), **ZONE)
    assert plan.reason == "optimal" and calls  # consulted after each chunk, and the wait went on (fail open)

    stop = threading.Event()

    def cancelling() -> None:
        if stop.is_set():
            raise asyncio.CancelledError("the runner is cancelling")

    monkeypatch.setattr(carbonaware_core, "_wait_guards", [cancelling])
    thread, decided, outcome = wait_in_thread(
        lambda on_plan: carbonaware_core.carbonaware_delay(
            timedelta(seconds=60), timedelta(seconds=1), source=cheap_in(45), on_plan=on_plan, **ZONE
        )
    )
    assert decided.wait(30)
    stop.set()
    thread.join(timeout=10)
    assert len(outcome) == 1 and isinstance(outcome[0], asyncio.CancelledError), outcome


def test_an_ignored_or_default_sigint_is_left_alone() -> None:
    original = signal.getsignal(signal.SIGINT)
    try:
        for disposition in (signal.SIG_IGN, signal.SIG_DFL):
            signal.signal(signal.SIGINT, disposition)
            assert carbonaware_core.watch_interrupts() is False
            assert signal.getsignal(signal.SIGINT) == disposition
    finally:
        signal.signal(signal.SIGINT, original)
    answers: list[bool] = []
    thread = threading.Thread(target=lambda: answers.append(carbonaware_core.watch_interrupts()))
    thread.start()
    thread.join(timeout=10)
    assert answers == [False]  # signal handlers can only be set from the main thread


def test_importing_the_prefect_layer_chains_the_default_handler() -> None:
    """In a fresh process, as a user's script starts: Ctrl-C still raises KeyboardInterrupt in the main thread."""
    code = (
        "import signal, carbonaware_prefect\n"
        "handler = signal.getsignal(signal.SIGINT)\n"
        "assert handler is not signal.default_int_handler and getattr(handler, '_carbonaware_interrupts', False)\n"
        "try:\n"
        "    signal.raise_signal(signal.SIGINT)\n"
        "except KeyboardInterrupt:\n"
        "    print('KeyboardInterrupt')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n" + code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stdout.strip() == "KeyboardInterrupt", done.stderr


def test_ctrl_c_during_mapped_waits_ends_the_process_without_running_the_jobs(prefect_api: str, tmp_path: Path) -> None:
    """A real process, a real SIGINT: tasks from ``.map()`` wait in worker threads for a start 45 s away."""
    markers, tasks = tmp_path / "markers", 4
    markers.mkdir()
    home = tmp_path / "prefect-home"
    home.mkdir()
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_HOME": str(home)}
    code = f"from tests.prefect_helpers import ctrl_c_flow_main; ctrl_c_flow_main({str(markers)!r}, {tasks})"
    with open(tmp_path / "out.log", "wb") as log:
        process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=log, stderr=log)
        try:
            waiting = wait_for(
                lambda: (found := sorted(markers.glob("waiting-*"))) and len(found) == tasks and found,
                180,
                "every mapped task to begin its wait",
            )
            process.send_signal(signal.SIGINT)
            interrupted = time.monotonic()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the process was still running 15 s after Ctrl-C: {(tmp_path / 'out.log').read_text()}")
            ended = time.monotonic() - interrupted
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    output = (tmp_path / "out.log").read_text(errors="replace")
    assert process.returncode != 0, output
    assert not list(markers.glob("ran-*")), "a job ran after Ctrl-C"
    assert ended < 10.0, (ended, output)  # a sleep chunk and Prefect's own crash reporting, generously
    decisions = [json.loads(path.read_text()) for path in waiting]
    assert all(decision["delay"] > 30 for decision in decisions)  # they were waiting, not about to start
    assert all(decision["thread"] != "MainThread" for decision in decisions)  # in worker threads

    async def states() -> tuple[str, list[str]]:
        flow_run_id = decisions[0]["flow_run"]
        async with get_client() as client:
            flow_run = await client.read_flow_run(flow_run_id)
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        return str(flow_run.state_name), [str(run.state_name) for run in runs]

    flow_state, task_states = asyncio.run(states())
    assert flow_state == "Crashed" and len(task_states) == tasks, (flow_state, task_states)
    assert "Completed" not in task_states, task_states
    print(f"process ended {ended:.2f}s after SIGINT; flow {flow_state}; tasks {task_states}")


def test_cancelling_a_served_run_ends_a_wait_in_a_worker_thread(prefect_api: str, tmp_path: Path) -> None:
    """The runner's SIGTERM reaches only the run's main thread; a task waiting in a worker thread kept the run
    Cancelling until its wait ended (for hours with real windows), the job then about to run."""
    loop = asyncio.new_event_loop()
    runner = Runner(query_seconds=1, prefetch_seconds=30, pause_on_shutdown=False)
    ready = threading.Event()

    async def main() -> None:
        await runner.aadd_deployment(await helpers.cancel_probe_flow.ato_deployment(name="cancel"))
        ready.set()
        await runner.start()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    try:
        assert ready.wait(60), "the runner did not register the deployment"
        flow_run = run_deployment("carbonaware-cancel-probe/cancel", parameters={"markers": str(tmp_path)}, timeout=0)
        wait_for((tmp_path / "waiting").exists, 120, "the served run's task to begin its wait")
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(flow_run.id, Cancelling())  # what the UI's Cancel button does
            cancelling = time.monotonic()

            def state_name() -> str | None:
                state = client.read_flow_run(flow_run.id).state
                return state.name if state is not None and state.is_final() else None

            final = wait_for(state_name, 25, "the run to leave Cancelling")
            landed = time.monotonic() - cancelling
    finally:
        asyncio.run_coroutine_threadsafe(runner.astop(), loop).result(timeout=60)
        thread.join(timeout=60)
    assert final == "Cancelled" and landed < 15.0, (final, landed)  # measured: about 3 s on a loaded machine
    assert not (tmp_path / "ran").exists(), "the job ran in a cancelled run"
    print(f"served run Cancelled {landed:.2f}s after Cancelling was set")


# --------------------------------------------------------------------------------------------------------------
# Item 15: every enclosing run's timeout caps the wait
# --------------------------------------------------------------------------------------------------------------


def test_a_parent_flows_timeout_caps_the_wait_in_a_subflow(prefect_api: str, scheduler: HostedScheduler) -> None:
    @task  # no timeout of its own; the 2 s "job" is Prefect's own work after the body: states, results
    @cp.carbonaware_delay_decorator(window=timedelta(seconds=30), duration=timedelta(seconds=2), **ZONE)
    def job() -> float:
        return time.time()

    @flow  # no timeout of its own either
    def inner() -> float:
        return job.submit().result()  # in a worker thread: the context it sees was copied from the subflow's

    @flow(timeout_seconds=6)
    def outer() -> tuple[float, float]:
        return time.time(), inner()

    state = outer(return_state=True)
    assert state.is_completed(), state  # not TimedOut: the wait left room for the job
    called, began = state.result()
    assert began - called < 4.5  # the 6 s timeout less the 2 s job, and a moment
    assert timedelta(seconds=1) <= asked_window(scheduler) <= timedelta(seconds=4)  # it still waited, capped


def test_an_enclosing_tasks_timeout_caps_the_wait_of_a_task_it_runs(
    prefect_api: str, scheduler: HostedScheduler
) -> None:
    @task  # no timeout of its own; the 2 s "job" is Prefect's own work after the body: states, results
    @cp.carbonaware_delay_decorator(window=timedelta(seconds=30), duration=timedelta(seconds=2), **ZONE)
    def job() -> float:
        return time.time()

    @task(timeout_seconds=6)
    def parent() -> tuple[float, float]:
        return time.time(), job()

    @flow
    def pipeline() -> Any:
        return parent(return_state=True)

    state = pipeline()
    assert state.is_completed(), state
    called, began = state.result()
    assert began - called < 4.5
    assert timedelta(seconds=1) <= asked_window(scheduler) <= timedelta(seconds=4)


# --------------------------------------------------------------------------------------------------------------
# Item 19: the delay task returns 2 s before its own timeout
# --------------------------------------------------------------------------------------------------------------


def test_the_delay_task_returns_two_seconds_before_its_own_timeout(
    prefect_api: str, scheduler: HostedScheduler
) -> None:
    delay = cp.carbonaware_delay_task(
        window=timedelta(minutes=5), duration=timedelta(minutes=1), timeout_seconds=6, **ZONE
    )

    @flow
    def pipeline() -> tuple[Any, float, float]:
        called = time.time()
        state = delay(return_state=True)
        return state, called, time.time()

    state, called, returned = pipeline()
    assert state.is_completed(), state  # returned in time, not timed out
    plan = state.result()
    assert plan["reason"] == "optimal"
    asked = asked_window(scheduler).total_seconds()
    assert 3.0 <= asked <= 4.05, asked  # 6 s - 2 s, less the moments before planning; 0 s margin: 6, 10 s: none
    assert 3.0 <= plan["delay_seconds"] <= 4.05, plan
    assert returned - called < 6.0  # back before the timeout
