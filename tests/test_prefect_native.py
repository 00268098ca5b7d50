"""Issue 12 on a real Prefect server: credentials and settings in Blocks, switches in Variables, no silent misuse,
worded decisions. (Recurring deployments with a real ``serve`` runner: tests/test_prefect_native_serve.py.)

Providers are loopback servers speaking the real protocol; the core's clock is a fake one (waits take no time,
the Variables cache ages when the test says so); Prefect itself runs for real.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from prefect import Flow, Task, flow, get_client, task
from prefect.artifacts import Artifact
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.variables import Variable
from pydantic import SecretStr, ValidationError

import carbonaware_core as core
import carbonaware_prefect as cp
from tests import prefect_helpers
from tests.fake_providers import (
    EM_KEY,
    SECRETS,
    WT_PASSWORD,
    WT_USER,
    FakeElectricityMaps,
    FakeWattTime,
    assert_no_secrets,
    slots,
)
from tests.loopback import FakeClock, black_hole, refused_host, serving

UTC = timezone.utc
START = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
ZONE = {"provider": "aws", "region": "us-east-1"}
WINDOW, DURATION = timedelta(hours=3), timedelta(minutes=30)
HOUR = timedelta(hours=1)
VALLEY = [500.0, 400.0, 100.0, 450.0, 500.0, 500.0, 500.0, 500.0]  # the cheap hour starts 2 h after START


@pytest.fixture(scope="module", autouse=True)
def prefect_server() -> Iterator[str]:
    with prefect_helpers.prefect_server() as url:
        yield url


@pytest.fixture(autouse=True)
def fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeClock]:
    """A fake core clock at START, an empty blocks/Variables cache, and no Variables left from another test."""
    clock = FakeClock(START)
    monkeypatch.setattr(core, "CLOCK", clock)
    cp._CONFIG_CACHE.clear()
    core.CACHE.clear()
    yield clock
    for name in (cp.VARIABLE_DISABLE, cp.VARIABLE_DRY_RUN, cp.VARIABLE_MIN_SAVINGS):
        Variable.unset(name)
    cp._CONFIG_CACHE.clear()


# Tests about the Variables' 30 s cache period itself: they keep the library's period.
REAL_CACHE_PERIOD = (
    "test_the_disable_variable_flipped_between_two_runs",
    "test_the_disable_variable_ends_a_wait_in_progress",
)


@pytest.fixture(autouse=True)
def fewer_switch_reads(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A wait re-reads both switches from the API each ``CONFIG_TTL_SECONDS``: every 30 s of a fake two-hour wait
    makes 480 real API reads, half a minute per decision. Elsewhere the cache lasts ten fake minutes: each wait
    still re-reads the switches (a dozen times), with 20 times fewer API calls."""
    if request.node.originalname not in REAL_CACHE_PERIOD:
        monkeypatch.setattr(cp, "CONFIG_TTL_SECONDS", 600.0)


def valley(zone: Any, now: datetime, end: datetime) -> list[core.ForecastPoint]:
    """A series source: dear now, cheapest two hours later, whenever asked (decisions use ``replan=False``)."""
    return [core.ForecastPoint(now + HOUR * i, now + HOUR * (i + 1), v) for i, v in enumerate(VALLEY)]


class Plans(list[core.Plan]):
    """An ``on_plan`` hook that keeps every decision."""

    def __call__(self, plan: core.Plan) -> None:
        self.append(plan)


def flow_logs(flow_run_id: Any) -> list[str]:
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [entry.message for entry in logs]


def wait_for_log(flow_run_id: Any, text: str, timeout: float = 20.0) -> list[str]:
    """The run's logs once one holds ``text`` (the API receives them in batches, a moment after the run)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = flow_logs(flow_run_id)
        if any(text in line for line in lines) or time.monotonic() > deadline:
            assert any(text in line for line in lines), lines
            return lines
        time.sleep(0.2)


# --------------------------------------------------------------------------------------------------------------
# 4. No silent misuse: above @task / @flow the Prefect object stays one
# --------------------------------------------------------------------------------------------------------------


def test_decorator_above_task_keeps_a_task_that_submits_and_maps() -> None:
    plans = Plans()
    options = {"source": valley, "replan": False, "on_plan": plans, "artifact": "above-task", **ZONE}

    @cp.carbonaware_delay_decorator(WINDOW, DURATION, **options)
    @task(name="above-task")
    def job(x: int) -> int:
        return x * 2

    assert isinstance(job, Task) and job.name == "above-task"

    @flow
    def pipeline() -> list[int]:
        submitted = job.submit(1).result()
        return [submitted, *job.map([2, 3]).result()]

    assert pipeline() == [2, 4, 6]
    assert len(plans) == 3 and all(p.reason == "optimal" and p.delay == 2 * HOUR for p in plans)
    artifact = Artifact.get("above-task")
    assert artifact is not None and artifact.task_run_id is not None  # the decision belongs to the task run


def test_decorator_above_flow_keeps_a_flow_whose_run_shows_the_decision() -> None:
    @cp.carbonaware_delay_decorator(WINDOW, DURATION, source=valley, replan=False, **ZONE)
    @flow(name="above-flow")
    def nightly(day: str) -> str:
        return day

    assert isinstance(nightly, Flow) and callable(nightly.serve) and callable(nightly.deploy)
    assert list(nightly.parameters.properties) == ["day"]
    assert nightly("mon") == "mon"
    artifact = Artifact.get("carbonaware-above-flow")
    assert artifact is not None and artifact.flow_run_id is not None
    wait_for_log(artifact.flow_run_id, "carbonaware: waiting 2h00m")


def test_decorator_above_an_async_task_keeps_it_async() -> None:
    @cp.carbonaware_delay_decorator(WINDOW, DURATION, source=valley, replan=False, artifact=False, **ZONE)
    @task
    async def job() -> str:
        return "async"

    assert isinstance(job, Task) and job.isasync

    @flow
    async def pipeline() -> str:
        return await job()

    import asyncio

    assert asyncio.run(pipeline()) == "async"
    assert core.CLOCK.asleeps  # type: ignore[attr-defined] # waited without blocking the event loop


def test_schedule_refuses_tasks_and_generators_at_decoration_time() -> None:
    with pytest.raises(TypeError, match="above @flow"):

        @cp.carbonaware_schedule(window=WINDOW, **ZONE)
        @task
        def job() -> None: ...

    with pytest.raises(TypeError, match="generator"):

        @cp.carbonaware_schedule(window=WINDOW, **ZONE)
        @flow
        def gen() -> Iterator[int]:
            yield 1

    with pytest.raises(ValueError, match="artifact"):
        cp.carbonaware_schedule(artifact="Not A Key")
    with pytest.raises(TypeError, match="settings"):
        cp.carbonaware_schedule(settings=42)
    with pytest.raises(TypeError, match="settings"):
        cp.carbonaware_delay_decorator(settings=["x"])
    with pytest.raises(TypeError, match="unknown option"):
        cp.carbonaware_schedule(sorce="offline")


def test_schedule_outside_a_deployment_just_runs_the_flow(caplog: pytest.LogCaptureFixture) -> None:
    @cp.carbonaware_schedule(window=WINDOW, duration=DURATION, source=valley, replan=False, **ZONE)
    @flow(name="not-deployed")
    def local(x: int) -> int:
        return x + 1

    assert isinstance(local, Flow)
    assert local(1) == 2  # not a deployment run: nothing to hand over to, so it runs


# --------------------------------------------------------------------------------------------------------------
# 6. Words that say what happens
# --------------------------------------------------------------------------------------------------------------


def _plan(reason: str = "optimal", delay: timedelta = 2 * HOUR, **changes: Any) -> core.Plan:
    plan = core.immediate_plan("already-best", "x", window=WINDOW, duration=DURATION, now=START)
    fields = {"reason": reason, "delay": delay, "start": START + delay, "now": 500.0, "expected": 100.0}
    return core.replace(plan, **{**fields, "savings": 0.8, "source": "electricitymaps", **changes})


def test_scheduled_decisions_say_scheduled_not_would_wait() -> None:
    scheduled = core.describe(_plan(), scheduled=True)
    assert "run scheduled 2h00m later, at 2026-06-01T14:00:00Z" in scheduled
    assert "wait" not in scheduled
    dry = core.describe(_plan("dry-run", detail="CARBONAWARE_DRY_RUN is set; best start"), scheduled=True)
    assert "would schedule the run 2h00m later" in dry and "CARBONAWARE_DRY_RUN is set: it starts now" in dry
    assert "run starts now" in core.describe(_plan("already-best", timedelta(0)), scheduled=True)
    # the in-process wordings are unchanged
    assert "waiting 2h00m" in core.describe(_plan())
    assert "would wait 2h00m" in core.describe(_plan(), waiting=False)


def test_an_artifact_without_a_series_has_no_empty_chart_block() -> None:
    markdown = cp._render_markdown(_plan(source="carbonaware"))  # the hosted scheduler: a decision, no series
    assert "```" not in markdown and markdown.rstrip().endswith("|")
    with_series = cp._render_markdown(_plan(forecast=tuple(valley(None, START, START))))
    assert with_series.count("```") == 2


@pytest.mark.parametrize("name", ["window", "duration"])
def test_a_negative_window_reads_as_negative_seconds(name: str) -> None:
    arguments = {"window": WINDOW, "duration": DURATION, name: timedelta(seconds=-5)}
    with pytest.raises(ValueError) as raised:
        cp.carbonaware_delay_decorator(**arguments)
    assert "got -5s" in str(raised.value) and "day" not in str(raised.value)


def test_run_deployment_logs_and_artifact_say_scheduled(caplog: pytest.LogCaptureFixture) -> None:
    prefect_helpers.scheduled_flow.to_deployment(name="h5-wording").apply()

    @flow(name="schedules-a-run")
    def parent() -> core.Plan:
        _run, plan = cp.carbonaware_run_deployment(
            "carbonaware-scheduled/h5-wording",
            WINDOW,
            DURATION,
            parameters={"label": "x"},
            source=valley,
            replan=False,
            **ZONE,
        )
        return plan

    with caplog.at_level(logging.INFO):
        plan = parent()
    assert plan.reason == "optimal" and plan.delay == 2 * HOUR
    lines = [r.getMessage() for r in caplog.records if "carbonaware:" in r.getMessage()]
    assert any("run scheduled 2h00m later" in line for line in lines)
    assert not any("would wait" in line or "waiting" in line for line in lines)
    artifact = Artifact.get("carbonaware-deployment-carbonaware-scheduled-h5-wording")  # one key per deployment
    assert artifact is not None and "run scheduled" in str(artifact.description)
    assert "waiting" not in str(artifact.data)


# --------------------------------------------------------------------------------------------------------------
# 2. Operator switches in Prefect Variables, read at decision time
# --------------------------------------------------------------------------------------------------------------


def decide_in_a_flow(**options: Any) -> core.Plan:
    """One flow run with one decorated task: the decision it made (the source: ``valley`` unless a block is used)."""
    plans = Plans()
    chosen = {"replan": False, "artifact": False, **ZONE, **options}
    if "settings" not in options:
        chosen.setdefault("source", valley)

    @task(name="decides")
    @cp.carbonaware_delay_decorator(WINDOW, DURATION, on_plan=plans, **chosen)
    def decides() -> None:
        return None

    @flow(name="decides")
    def once() -> None:
        decides()

    once()
    assert len(plans) == 1
    return plans[0]


def test_the_disable_variable_flipped_between_two_runs(fresh: FakeClock) -> None:
    assert decide_in_a_flow().reason == "optimal"
    fresh.advance(cp.CONFIG_TTL_SECONDS + 1)
    Variable.set(cp.VARIABLE_DISABLE, True)
    disabled = decide_in_a_flow()
    assert disabled.reason == "disabled" and disabled.delay == timedelta(0)
    assert "the Prefect Variable carbonaware_disable is set" in disabled.detail
    Variable.set(cp.VARIABLE_DISABLE, False, overwrite=True)
    assert decide_in_a_flow().reason == "disabled"  # read at most every 30 s: still the cached value
    fresh.advance(cp.CONFIG_TTL_SECONDS + 1)
    assert decide_in_a_flow().reason == "optimal"


@pytest.mark.parametrize("value", [True, "yes", "1", "on"])
def test_the_dry_run_variable_plans_without_waiting(fresh: FakeClock, value: Any) -> None:
    Variable.set(cp.VARIABLE_DRY_RUN, value, overwrite=True)
    sleeps_before = len(fresh.sleeps)
    plan = decide_in_a_flow()
    assert plan.reason == "dry-run" and plan.delay == 2 * HOUR
    assert "the Prefect Variable carbonaware_dry_run is set" in plan.detail
    assert fresh.sleeps[sleeps_before:] == []


@pytest.mark.parametrize("value", [False, "no", "0", "", 0, {"not": "a switch"}])
def test_variables_that_are_off_or_nonsense_change_nothing(value: Any) -> None:
    Variable.set(cp.VARIABLE_DISABLE, value, overwrite=True)
    Variable.set(cp.VARIABLE_DRY_RUN, value, overwrite=True)
    assert decide_in_a_flow().reason == "optimal"


def test_the_min_savings_variable_yields_to_code_and_blocks() -> None:
    Variable.set(cp.VARIABLE_MIN_SAVINGS, 0.9, overwrite=True)  # waiting saves 80 %
    assert decide_in_a_flow().reason == "below-threshold"
    assert decide_in_a_flow(min_savings=0.5).reason == "optimal"  # argument > Variable
    block = cp.CarbonAwareSettings(min_savings=0.5)
    assert decide_in_a_flow(settings=block, source=valley).reason == "optimal"  # block > Variable
    cp._CONFIG_CACHE.clear()
    Variable.set(cp.VARIABLE_MIN_SAVINGS, "not a number", overwrite=True)
    assert decide_in_a_flow().reason == "optimal"  # ignored, with one warning
    cp._CONFIG_CACHE.clear()
    Variable.set(cp.VARIABLE_MIN_SAVINGS, 1.5, overwrite=True)
    assert decide_in_a_flow().reason == "optimal"


@pytest.mark.parametrize("api", ["refused", "black-hole"])
def test_an_unreachable_api_counts_as_unset(
    api: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outside runs, with PREFECT_API_URL set to an API that refuses or never answers: the decision is made as if
    no Variable were set, within the read bound, and the blocked read is not repeated within the TTL. (The wait
    checks the switches every 30 s of its fake two hours: a shorter bound keeps that quick in real time.)"""
    monkeypatch.setattr(cp, "WAIT_READ_TIMEOUT_SECONDS", 0.05)
    plans = Plans()

    @cp.carbonaware_delay_decorator(WINDOW, DURATION, source=valley, replan=False, on_plan=plans, **ZONE)
    def plain() -> str:
        return "ran"

    def call_with(host: str) -> float:
        began = time.monotonic()
        with temporary_settings({PREFECT_API_URL: f"http://{host}/api"}):
            assert plain() == "ran"
        return time.monotonic() - began

    if api == "refused":
        took = call_with(refused_host())
        again = call_with(refused_host())
    else:
        with black_hole() as host:
            took, again = call_with(host), call_with(host)
    assert [p.reason for p in plans] == ["optimal", "optimal"]
    assert took < cp.CONFIG_READ_TIMEOUT_SECONDS * 3 + 5  # three reads at most, each bounded
    assert again < took + 1.0


# --------------------------------------------------------------------------------------------------------------
# 1. Credentials and settings in Blocks
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def electricitymaps(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeElectricityMaps]:
    """Electricity Maps on loopback; the library knows its URL, and the environment holds a WRONG key."""
    with serving() as server:
        fake = FakeElectricityMaps(server, slots(START, HOUR, VALLEY))
        monkeypatch.setenv("ELECTRICITYMAPS_API_URL", server.url)
        monkeypatch.setenv("ELECTRICITYMAPS_API_KEY", "WRONG-ENV-KEY")
        yield fake


def save_blocks(suffix: str) -> str:
    credentials = cp.ElectricityMapsCredentials(api_key=SecretStr(EM_KEY))
    credentials.save(f"em-{suffix}", overwrite=True)
    settings = cp.CarbonAwareSettings(source="electricitymaps", grid_zone="DE", electricitymaps=credentials)
    settings.save(f"carbon-{suffix}", overwrite=True)
    return f"carbon-{suffix}"


def test_blocks_saved_loaded_by_name_send_the_key_in_the_header_never_in_logs(
    electricitymaps: FakeElectricityMaps, caplog: pytest.LogCaptureFixture
) -> None:
    name = save_blocks("header")
    plans = Plans()

    @task(name="keyed")
    @cp.carbonaware_delay_decorator(WINDOW, DURATION, settings=name, on_plan=plans, artifact="keyed", **ZONE)
    def keyed() -> str:
        return "ran"

    @flow(name="keyed")
    def pipeline() -> str:
        return keyed()

    with caplog.at_level(logging.DEBUG):
        assert pipeline() == "ran"
    headers = {seen.headers.get("auth-token") for seen in electricitymaps.calls}
    assert headers == {EM_KEY}  # the block's key, not the environment's WRONG one
    assert "zone=DE" in electricitymaps.calls[0].path  # the block's grid zone
    (plan,) = plans
    assert plan.source == "electricitymaps" and plan.reason == "optimal" and plan.delay == 2 * HOUR
    artifact = Artifact.get("keyed")
    assert artifact is not None
    texts = [r.getMessage() for r in caplog.records] + wait_for_log(artifact.flow_run_id, "carbonaware: waiting 2h00m")
    assert_no_secrets(*texts, str(artifact.data), str(artifact.description), repr(plan), json.dumps(plan.to_dict()))


def test_a_watttime_block_logs_in_with_its_username_and_password(monkeypatch: pytest.MonkeyPatch) -> None:
    with serving() as server:
        fake = FakeWattTime(server, slots(START, timedelta(minutes=5), [500.0] * 24 + [100.0] * 12 + [500.0] * 60))
        monkeypatch.setenv("WATTTIME_API_URL", server.url)
        block = cp.WattTimeCredentials(username=WT_USER, password=SecretStr(WT_PASSWORD))
        block.save("wt-login", overwrite=True)
        plan = decide_in_a_flow(settings="watttime-credentials/wt-login", source="watttime:CAISO_NORTH")
        assert plan.source == "watttime" and plan.reason == "optimal", plan.detail
        assert len(fake.logins) == 1 and len(fake.calls) == 1
        assert_no_secrets(plan.detail, repr(block), str(block.model_dump()))


def test_precedence_argument_then_block_then_environment_then_default(
    electricitymaps: FakeElectricityMaps, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = save_blocks("precedence")
    # argument > block: the code's source and key win
    assert decide_in_a_flow(settings=name, source=valley).source == "valley"
    assert electricitymaps.calls == []
    refused = decide_in_a_flow(settings=name, credentials={"ELECTRICITYMAPS_API_KEY": "ARGUMENT-KEY"})
    assert electricitymaps.calls[-1].headers["auth-token"] == "ARGUMENT-KEY" and refused.reason == "source-failed"
    # block > environment: CARBONAWARE_SOURCE and the environment's key lose to the block
    monkeypatch.setenv("CARBONAWARE_SOURCE", "ukgrid")
    core.CACHE.clear()
    assert decide_in_a_flow(settings=name).source == "electricitymaps"
    assert electricitymaps.calls[-1].headers["auth-token"] == EM_KEY
    # environment > default: without a block, the environment's source and key
    monkeypatch.setenv("CARBONAWARE_SOURCE", "electricitymaps")
    monkeypatch.setenv("ELECTRICITYMAPS_API_KEY", EM_KEY)
    core.CACHE.clear()
    assert decide_in_a_flow(grid_zone="DE", source=None).source == "electricitymaps"
    # a block's unset fields fall through to the environment
    bare = cp.CarbonAwareSettings(grid_zone="DE")
    assert decide_in_a_flow(settings=bare).source == "electricitymaps"


def test_block_zone_fills_in_only_when_the_code_names_none(electricitymaps: FakeElectricityMaps) -> None:
    block = cp.CarbonAwareSettings(source=None, provider="gcp", region="europe-west3")
    plans = Plans()

    @cp.carbonaware_delay_decorator(WINDOW, DURATION, source=valley, replan=False, settings=block, on_plan=plans)
    def plain() -> None:
        return None

    plain()
    assert str(plans[-1].zone) == "gcp:europe-west3"
    assert str(decide_in_a_flow(settings=block).zone) == "aws:us-east-1"  # ZONE given in code wins


@pytest.mark.parametrize(
    "settings, why",
    [
        ("no-such-block", "Unable to find block document named no-such-block"),
        ("carbon-aware-settings/also-missing", "Unable to find block document named also-missing"),
        ("bad-values", "unknown provider 'mars'"),
    ],
)
def test_a_block_that_cannot_be_used_fails_open_with_one_line(
    settings: str, why: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    cp.CarbonAwareSettings(provider="mars", region="olympus", min_savings=0.9).save("bad-values", overwrite=True)
    monkeypatch.setenv("CARBONAWARE_PROVIDER", "aws")  # what the zone falls back to without the block
    monkeypatch.setenv("CARBONAWARE_REGION", "us-east-1")
    with caplog.at_level(logging.WARNING):
        plan = decide_in_a_flow(settings=settings, source=valley, provider=None, region=None)
    assert plan.reason == "optimal" and plan.source == "valley"  # the code's settings still apply, none of the block's
    assert str(plan.zone) == "aws:us-east-1"
    lines = [r.getMessage() for r in caplog.records if "settings block" in r.getMessage()]
    assert len(lines) == 1 and repr(settings) in lines[0] and why in lines[0], lines


def test_blocks_are_registered_for_the_ui_catalogue(prefect_server: str) -> None:
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    done = subprocess.run(
        [sys.executable, "-m", "prefect", "block", "register", "-m", "carbonaware_prefect"],
        capture_output=True,
        text=True,
        env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    with get_client(sync_client=True) as client:
        slugs = {client.read_block_type_by_slug(slug).slug for slug in cp_slugs()}
        schema = client.get_most_recent_block_schema_for_block_type(
            client.read_block_type_by_slug("electricity-maps-credentials").id
        )
    assert slugs == set(cp_slugs())
    assert schema is not None and schema.fields["secret_fields"] == ["api_key"]


def cp_slugs() -> list[str]:
    return ["electricity-maps-credentials", "watttime-credentials", "carbon-aware-settings"]


def test_settings_pickle_with_the_task_and_never_show_their_secrets() -> None:
    credentials = cp.ElectricityMapsCredentials(api_key=SecretStr(EM_KEY))
    block = cp.CarbonAwareSettings(source="electricitymaps", electricitymaps=credentials)
    settings = cp._settings(WINDOW, DURATION, None, None, {"settings": block})
    again = pickle.loads(pickle.dumps(settings))
    assert again.config.electricitymaps.api_key.get_secret_value() == EM_KEY
    assert_no_secrets(repr(settings), str(block), repr(block), json.dumps(block.model_dump(mode="json")))
    assert all(secret not in repr(core.validate_arguments(WINDOW, DURATION, None, None, {})) for secret in SECRETS)


def test_credentials_option_is_checked_and_kept_out_of_reprs() -> None:
    with pytest.raises(ValueError, match="unknown credential"):
        core.plan_delay(WINDOW, DURATION, credentials={"AWS_SECRET": "x"}, source=valley, replan=False, **ZONE)
    with pytest.raises(TypeError, match="mapping"):
        core.plan_delay(WINDOW, DURATION, credentials="key", source=valley, replan=False, **ZONE)
    keyed = {"credentials": {"ELECTRICITYMAPS_API_KEY": "KEY-1"}}
    request = core.validate_arguments(WINDOW, DURATION, None, None, keyed)
    assert "KEY-1" not in repr(request)
    query = core.Query(None, "DE", START, WINDOW, DURATION, 5.0, credentials=request.credentials)
    assert "KEY-1" not in repr(query) and query.setting("ELECTRICITYMAPS_API_KEY") == "KEY-1"


def test_a_block_that_fails_validation_is_named_without_quoting_its_key(caplog: pytest.LogCaptureFixture) -> None:
    from prefect.client.schemas.actions import BlockDocumentUpdate

    block_id = cp.ElectricityMapsCredentials(api_key=SecretStr("placeholder")).save("em-broken", overwrite=True)
    with get_client(sync_client=True) as client:  # stored data the model refuses: pydantic would quote the input
        client.update_block_document(block_id, BlockDocumentUpdate(data={"api_key": [EM_KEY]}))
    with caplog.at_level(logging.WARNING):
        plan = decide_in_a_flow(settings="electricity-maps-credentials/em-broken", source=valley)
    assert plan.reason == "optimal"
    lines = [r.getMessage() for r in caplog.records if "settings block" in r.getMessage()]
    assert len(lines) == 1 and "'electricity-maps-credentials/em-broken'" in lines[0] and "validation" in lines[0]
    assert_no_secrets(*(r.getMessage() for r in caplog.records))
    with pytest.raises(ValidationError) as raised:  # pydantic's own message quotes the input: ours does not
        cp.ElectricityMapsCredentials(api_key=[EM_KEY])  # type: ignore[arg-type]
    assert EM_KEY in str(raised.value) and cp._why(raised.value) == "1 invalid field(s): api_key"


def test_deployment_entry_points_take_blocks_and_variables_too(caplog: pytest.LogCaptureFixture) -> None:
    prefect_helpers.scheduled_flow.to_deployment(name="h5-configured").apply()
    strict = cp.CarbonAwareSettings(min_savings=0.9)  # waiting saves 80 %: below this block's threshold

    def schedule(**options: Any) -> core.Plan:
        _run, plan = cp.carbonaware_run_deployment(
            "carbonaware-scheduled/h5-configured", WINDOW, DURATION, parameters={"label": "c"}, **options, **ZONE
        )
        return plan

    assert schedule(source=valley, replan=False).reason == "optimal"
    assert schedule(source=valley, replan=False, settings=strict).reason == "below-threshold"
    with pytest.raises(TypeError, match="settings"):
        schedule(settings=3.5)
    Variable.set(cp.VARIABLE_DISABLE, "on", overwrite=True)
    cp._CONFIG_CACHE.clear()
    with caplog.at_level(logging.INFO):
        disabled = schedule(source=valley)
    assert disabled.reason == "disabled" and "carbonaware_disable" in disabled.detail
    assert any("run starts now" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------------------------------------------
# Precedence as a rule: for any mix of arguments and block fields, each setting comes from the argument if given,
# else from the block, else is left to the environment (absent from the options)
# --------------------------------------------------------------------------------------------------------------

SOURCES = st.sampled_from([None, "offline", "electricitymaps", "ukgrid,offline"])
SAVINGS = st.sampled_from([None, 0.0, 0.05, 0.5])
GRID_ZONES = st.sampled_from([None, "DE", "FR"])
KEYS = st.sampled_from([None, "KEY-ARGUMENT-1", "KEY-BLOCK-22"])


@hypothesis_settings(max_examples=80, deadline=None)
@given(SOURCES, SOURCES, SAVINGS, SAVINGS, GRID_ZONES, GRID_ZONES, KEYS, KEYS)
def test_precedence_holds_for_every_mix(
    arg_source: str | None,
    block_source: str | None,
    arg_savings: float | None,
    block_savings: float | None,
    arg_zone: str | None,
    block_zone: str | None,
    arg_key: str | None,
    block_key: str | None,
) -> None:
    arguments = {
        name: value
        for name, value in (("source", arg_source), ("min_savings", arg_savings), ("grid_zone", arg_zone))
        if value is not None
    }
    if arg_key is not None:
        arguments["credentials"] = {"ELECTRICITYMAPS_API_KEY": arg_key}
    credentials = None if block_key is None else cp.ElectricityMapsCredentials(api_key=SecretStr(block_key))
    block = cp.CarbonAwareSettings(
        source=block_source, min_savings=block_savings, grid_zone=block_zone, electricitymaps=credentials
    )
    configured = cp._with_block(block, arguments, None, None, core.logger)
    for name, argument, in_block in (
        ("source", arg_source, block_source),
        ("min_savings", arg_savings, block_savings),
        ("grid_zone", arg_zone, block_zone),
    ):
        expected = argument if argument is not None else in_block
        assert configured.options.get(name) == expected, name
    key = arg_key if arg_key is not None else block_key
    assert (configured.options.get("credentials") or {}).get("ELECTRICITYMAPS_API_KEY") == key


def test_one_key_refused_never_answers_for_another_key(electricitymaps: FakeElectricityMaps) -> None:
    """Two settings blocks with different keys in one process: the cache keeps their answers apart."""

    def plan_with(key: str) -> core.Plan:
        credentials = {"ELECTRICITYMAPS_API_KEY": key}
        return core.plan_delay(WINDOW, DURATION, source="electricitymaps", grid_zone="DE", credentials=credentials)

    assert plan_with("SOMEONE-ELSES-KEY").reason == "source-failed"
    assert plan_with(EM_KEY).reason == "optimal"  # asked again with its own key, not served the refusal
    assert plan_with("SOMEONE-ELSES-KEY").reason == "source-failed"  # nor the other way round
    assert [seen.headers["auth-token"] for seen in electricitymaps.calls] == ["SOMEONE-ELSES-KEY", EM_KEY]


def test_the_disable_variable_ends_a_wait_in_progress(fresh: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    """The operator flips the switch while a task waits its two hours: the job starts within the cache period."""
    began: list[float] = []

    def operator_flips_the_switch(plan: core.Plan) -> None:
        Variable.set(cp.VARIABLE_DISABLE, True, overwrite=True)  # during the wait, from the "UI"

    @task(name="waits-long")
    @cp.carbonaware_delay_decorator(
        WINDOW, DURATION, source=valley, replan=False, on_plan=operator_flips_the_switch, artifact=False, **ZONE
    )
    def job() -> None:
        began.append(core.CLOCK.time())

    @flow(name="waits-long")
    def pipeline() -> None:
        job()

    with caplog.at_level(logging.INFO):
        pipeline()
    waited = began[0] - START.timestamp()
    assert 0 < waited <= cp.CONFIG_TTL_SECONDS + 2  # not the planned 7200 s: the next read of the switch ended it
    assert any(
        "starting now, before the planned 2026-06-01T14:00:00Z: the Prefect Variable carbonaware_disable is set"
        in r.getMessage()
        for r in caplog.records
    )
