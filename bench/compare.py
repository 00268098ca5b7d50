"""Side by side with the package this one replaces: carbonaware-prefect 0.1.3 and ours, in one run.

    python bench/compare.py [--markdown] [--quick] [--only STEPS] [--no-prefect-map] [--no-netns]

The first run installs ``carbonaware-prefect==0.1.3`` (with the same ``prefect`` version as ours) from the package
index into ``bench/.cache/original-venv``; later runs reuse it. Ours runs from the repository with the project's
``.venv`` interpreter when there is one.

Everything then happens inside a network namespace that has nothing but a loopback interface (``ip netns``, as
root), so neither package can reach anything beyond this machine: both talk to the SAME loopback server speaking
the hosted scheduler's protocol (``POST /v0/schedule/``, protocols.md §1), and the original's zone detection, which
hard-codes 169.254.169.254 and metadata.google.internal, really runs -- against 169.254.169.254 added to the
namespace's loopback and a hosts file pointing metadata.google.internal there. Without ``ip netns`` (or with
``--no-netns``) the original's detection is redirected instead: its ``httpx.get`` is wrapped to send the same
requests to a loopback port, and the table says so.

Like for like: ours uses only the hosted scheduler (``CARBONAWARE_SOURCE=carbonaware``), as the original can do
nothing else; ours' default chain would fall back to its offline model when the API is down. ``ratio`` is
ours / original: below 1 means ours is faster, leaner or makes fewer requests.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from _common import Table, clean_env, fmt_ratio, fmt_seconds, machine_summary  # noqa: E402 - stdlib only

CACHE_DIR = HERE / ".cache"
ORIGINAL_SPEC = "carbonaware-prefect==0.1.3"
ORIGINAL, OURS = "original", "ours"
RESULT_PREFIX = "RESULT "
METADATA_IP = "169.254.169.254"
PROVIDER, REGION = "aws", "us-east-1"  # in the original client's list of regions and in ours
WINDOW = timedelta(hours=1)
DURATION = timedelta(minutes=30)
WAIT_SECONDS = 5.0


# ================================================================================================================
# Child side: runs under either package's interpreter, stdlib only until it imports the package under test
# ================================================================================================================


def _delay_function(package: str) -> Callable[..., Any]:
    """Each package's plain delay call; ours is the core's, which our Prefect layer calls too."""
    if package == ORIGINAL:
        from carbonaware_prefect import carbonaware_delay

        return carbonaware_delay
    import carbonaware_core

    return carbonaware_core.carbonaware_delay


def _forget(package: str) -> None:
    """Ours caches decisions for five minutes; repeated timings must each make a request, as the original does."""
    if package == OURS:
        import carbonaware_core

        carbonaware_core.clear_cache()


def _call(delay: Callable[..., Any], with_zone: bool = True) -> None:
    zone = {"provider": PROVIDER, "region": REGION} if with_zone else {}
    delay(window=WINDOW, duration=DURATION, **zone)


def _timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def op_import(spec: dict[str, Any]) -> dict[str, Any]:
    import importlib

    started = time.perf_counter()
    module = importlib.import_module(spec["module"])
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "complete": hasattr(module, "carbonaware_delay_decorator")}


def op_decide(spec: dict[str, Any]) -> dict[str, Any]:
    """The first call in a fresh process, then ``warm`` more with the decision cache emptied each time."""
    package = spec["package"]
    delay = _delay_function(package)
    cold = _timed(lambda: _call(delay))
    warm = []
    for _ in range(spec["warm"]):
        _forget(package)
        warm.append(_timed(lambda: _call(delay)))
    return {"cold": cold, "warm": warm}


def op_detect(spec: dict[str, Any]) -> dict[str, Any]:
    """No provider/region: the time until the work may start is the detection time (neither package sleeps)."""
    delay = _delay_function(spec["package"])
    if spec.get("redirect"):
        _redirect_original_detection(spec["redirect"])
    return {"seconds": _timed(lambda: _call(delay, with_zone=False))}


def _redirect_original_detection(host: str) -> None:
    """Fallback without a network namespace: the original's detection code, unchanged, but every httpx.get it makes
    goes to ``host`` on loopback instead of 169.254.169.254 / metadata.google.internal."""
    from urllib.parse import urlsplit, urlunsplit

    import httpx

    from carbonaware_prefect import introspection

    class LoopbackHttpx:
        def __getattr__(self, name: str) -> Any:
            return getattr(httpx, name)

        @staticmethod
        def get(url: str, **kwargs: Any) -> Any:
            parts = urlsplit(url)
            return httpx.get(urlunsplit(("http", host, parts.path, parts.query, "")), **kwargs)

    introspection.httpx = LoopbackHttpx()


def op_map(spec: dict[str, Any]) -> dict[str, Any]:
    """``count`` calls from a thread pool, as Prefect's ThreadPoolTaskRunner runs a ``.map``."""
    from concurrent.futures import ThreadPoolExecutor

    delay = _delay_function(spec["package"])
    errors: dict[str, int] = {}

    def task(index: int) -> int:
        _call(delay)
        return index

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=spec["workers"]) as pool:
        futures = [pool.submit(task, i) for i in range(spec["count"])]
        for future in futures:
            error = future.exception()
            if error is not None:
                errors[type(error).__name__] = errors.get(type(error).__name__, 0) + 1
    return {"seconds": time.perf_counter() - started, "errors": errors}


def op_wait(spec: dict[str, Any]) -> dict[str, Any]:
    """One decision that says 'wait a few seconds'; the parent samples this process's memory meanwhile."""
    for name in spec.get("preload", []):
        __import__(name)
    delay = _delay_function(spec["package"])
    return {"seconds": _timed(lambda: _call(delay))}


def op_down(spec: dict[str, Any]) -> dict[str, Any]:
    """The API is down: does the work (here: returning) run, or does the delay raise and fail the task?"""
    delay = _delay_function(spec["package"])
    started = time.perf_counter()
    try:
        _call(delay)
        outcome = "runs"
    except Exception as exc:
        outcome = f"fails ({type(exc).__name__})"
    return {"seconds": time.perf_counter() - started, "outcome": outcome}


def op_prefect_map(spec: dict[str, Any]) -> dict[str, Any]:
    """A real Prefect flow mapping a decorated task over ``count`` inputs (temporary local Prefect server)."""
    import logging

    from prefect import flow, task

    from carbonaware_prefect import carbonaware_delay_decorator

    logging.getLogger("prefect").setLevel(logging.ERROR)
    counter = {"calls": 0}

    @task(log_prints=False)
    @carbonaware_delay_decorator(window=WINDOW, duration=DURATION, provider=PROVIDER, region=REGION)
    def work(index: int) -> int:
        counter["calls"] += 1
        return index

    @task
    def plain(index: int) -> int:
        return index

    @flow(log_prints=False)
    def many(count: int) -> list[int]:
        return work.map(range(count)).result()

    @flow(log_prints=False)
    def warm_up() -> list[int]:
        return plain.map(range(2)).result()

    warm_up()  # starts the temporary Prefect server outside the timing, without asking the scheduler
    started = time.perf_counter()
    results = many(spec["count"])
    return {"seconds": time.perf_counter() - started, "results": len(results), "calls": counter["calls"]}


CHILD_OPS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "import": op_import,
    "decide": op_decide,
    "detect": op_detect,
    "map": op_map,
    "wait": op_wait,
    "down": op_down,
    "prefect_map": op_prefect_map,
}


def child_main(spec: dict[str, Any]) -> int:
    result = CHILD_OPS[spec["op"]](spec)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


# ================================================================================================================
# Parent side
# ================================================================================================================


@dataclass(frozen=True)
class Setup:
    """The two interpreters and how the original's zone detection is confined."""

    original_python: str
    ours_python: str
    netns: bool
    prefect_home: str
    workdir: str

    def python(self, package: str) -> str:
        return self.original_python if package == ORIGINAL else self.ours_python


class ChildFailed(RuntimeError):
    pass


def _child_env(setup: Setup, package: str, extra: dict[str, str]) -> dict[str, str]:
    env = clean_env(
        {
            "PREFECT_HOME": setup.prefect_home,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "WARNING",
            "DO_NOT_TRACK": "1",
            **extra,
        }
    )
    if package == OURS:
        env["PYTHONPATH"] = str(REPO_ROOT)
        env["CARBONAWARE_SOURCE"] = "carbonaware"
    return env


def _command(setup: Setup, package: str, op: str, params: dict[str, Any]) -> list[str]:
    spec = {"op": op, "package": package, **params}
    return [setup.python(package), str(Path(__file__).resolve()), "--child", json.dumps(spec)]


def _parse(done_stdout: str, done_stderr: str, returncode: int) -> dict[str, Any]:
    for line in reversed(done_stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = (done_stderr.strip().splitlines() or ["no output"])[-1]
    raise ChildFailed(f"exit {returncode}: {tail[:160]}")


def run_child(
    setup: Setup, package: str, op: str, env: dict[str, str] | None = None, timeout: float = 600, **params: Any
) -> dict[str, Any]:
    """Run one measurement in a fresh process of the package's interpreter; cwd is a scratch directory so neither
    package can pick up the other from the working directory."""
    done = subprocess.run(
        _command(setup, package, op, params),
        env=_child_env(setup, package, env or {}),
        cwd=setup.workdir,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return _parse(done.stdout, done.stderr, done.returncode)


def run_child_sampling_memory(
    setup: Setup, package: str, op: str, env: dict[str, str], **params: Any
) -> tuple[dict[str, Any], int]:
    """As run_child, while reading VmHWM (peak resident set, kB) from /proc/PID/status until the child exits."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(
            _command(setup, package, op, params),
            env=_child_env(setup, package, env),
            cwd=setup.workdir,
            stdout=out,
            stderr=err,
            text=True,
        )
        peak_kb = 0
        while process.poll() is None:
            peak_kb = max(peak_kb, _vm_hwm_kb(process.pid))
            time.sleep(0.02)
        out.seek(0)
        err.seek(0)
        return _parse(out.read(), err.read(), process.returncode), peak_kb


def _vm_hwm_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


# ---- loopback servers -------------------------------------------------------------------------------------------


def _loopback() -> Any:
    """tests/loopback.py, imported in the parent only: putting the repository on a child's sys.path would let the
    original's interpreter import our carbonaware_prefect."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.append(str(REPO_ROOT))
    from tests import loopback

    return loopback


@contextmanager
def scheduler(ideal_after: timedelta = timedelta(0), failing: bool = False) -> Iterator[Any]:
    """The hosted scheduler on 127.0.0.1 (tests/loopback.py): num_options optional as on the real server, a deep
    accept queue for 1,000 concurrent clients, and TCP_NODELAY as uvicorn (the real server) sets it."""
    loopback = _loopback()
    HostedScheduler, Reply, Seen = loopback.HostedScheduler, loopback.Reply, loopback.Seen

    with loopback.serving() as server:
        hosted = HostedScheduler(server, ideal_after=ideal_after)

        def schedule(seen: Seen) -> Any:
            if failing:
                return Reply(500, "Internal Server Error", {"Content-Type": "text/plain; charset=utf-8"})
            return hosted.schedule(seen)

        server.route("POST", "/v0/schedule/", schedule)
        yield server


def schedule_requests(server: Any) -> int:
    return len(server.requests_to("/v0/schedule/"))


@contextmanager
def metadata_black_hole(setup: Setup) -> Iterator[str]:
    """A listener that never answers: on 169.254.169.254:80 inside the namespace, else on a loopback port."""
    import socket

    if not setup.netns:
        with _loopback().black_hole() as host:
            yield host
        return
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((METADATA_IP, 80))
    listener.listen(64)
    try:
        yield f"{METADATA_IP}:80"
    finally:
        listener.close()


def metadata_refused(setup: Setup) -> str:
    """Nothing listens on 169.254.169.254:80 inside the namespace; else a free loopback port."""
    return f"{METADATA_IP}:80" if setup.netns else _loopback().refused_host()


# ---- measurements -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Line:
    """One table row: values are floats (seconds, counts, kB) or text; ``kind`` chooses the formatting."""

    metric: str
    original: float | str | None
    ours: float | str | None
    kind: str = "seconds"  # seconds | count | kb | text

    def cells(self) -> tuple[str, str, str, str]:
        ratio = "n/a"
        if isinstance(self.original, (int, float)) and isinstance(self.ours, (int, float)):
            ratio = fmt_ratio(float(self.ours), float(self.original))
        return (self.metric, self._format(self.original), self._format(self.ours), ratio)

    def _format(self, value: float | str | None) -> str:
        if value is None:
            return "n/a"
        if isinstance(value, str):
            return value
        if self.kind == "count":
            return f"{value:,.0f}"
        if self.kind == "kb":
            return f"{value / 1024:.1f} MiB"
        return fmt_seconds(value)


def _median(values: Sequence[float]) -> float:
    import statistics

    return statistics.median(values)


def _safely(measure: Callable[[], list[Line]], metric: str) -> list[Line]:
    """A failed measurement becomes a row that says so instead of ending the run."""
    try:
        return measure()
    except (ChildFailed, subprocess.TimeoutExpired, OSError) as exc:
        return [Line(metric, f"error: {exc}"[:70], f"error: {exc}"[:70], "text")]


def measure_imports(setup: Setup, runs: int) -> list[Line]:
    """Fresh processes, the variants interleaved run by run so a busy neighbour slows them alike."""
    variants = [
        (ORIGINAL, "carbonaware_prefect"),
        (OURS, "carbonaware_prefect"),
        (OURS, "carbonaware_core"),
        (ORIGINAL, "prefect"),
        (OURS, "prefect"),
    ]
    for package, module in variants:  # warm-up: .pyc files, page cache, PREFECT_HOME
        run_child(setup, package, "import", module=module)
    results: dict[tuple[str, str], list[dict[str, Any]]] = {variant: [] for variant in variants}
    for _ in range(runs):
        for package, module in variants:
            results[(package, module)].append(run_child(setup, package, "import", module=module))
    seconds = {variant: _median([r["seconds"] for r in rows]) for variant, rows in results.items()}
    complete = all(r["complete"] for r in results[(OURS, "carbonaware_prefect")])
    original = seconds[(ORIGINAL, "carbonaware_prefect")]
    ours: float | str = seconds[(OURS, "carbonaware_prefect")]
    if not complete:
        ours = "n/a (our carbonaware_prefect has no decorator yet)"
    return [
        Line("import carbonaware_prefect (both import prefect)", original, ours),
        Line("import: ours without Prefect (carbonaware_core)", original, seconds[(OURS, "carbonaware_core")]),
        Line("↳ reference: import prefect alone", seconds[(ORIGINAL, "prefect")], seconds[(OURS, "prefect")]),
    ]


def measure_decision(setup: Setup, runs: int, warm: int) -> list[Line]:
    """A fresh server per child, so the TCP connections each package opened for its 1 + ``warm`` calls count."""
    cold: dict[str, list[float]] = {ORIGINAL: [], OURS: []}
    later: dict[str, list[float]] = {ORIGINAL: [], OURS: []}
    connections: dict[str, list[int]] = {ORIGINAL: [], OURS: []}
    for _ in range(runs):
        for package in (ORIGINAL, OURS):
            with scheduler() as server:
                accepted = _counting_connections(server)
                result = run_child(setup, package, "decide", {"CARBONAWARE_SCHEDULER_BASE_URL": server.url}, warm=warm)
                cold[package].append(result["cold"])
                later[package] += result["warm"]
                connections[package].append(len(accepted))
    return [
        Line("time to a decision, first call in a process", _median(cold[ORIGINAL]), _median(cold[OURS])),
        Line("time to a decision, later calls (no cache)", _median(later[ORIGINAL]), _median(later[OURS])),
        Line(
            f"↳ connections opened for those 1 + {warm} calls",
            max(connections[ORIGINAL]),
            max(connections[OURS]),
            "count",
        ),
    ]


def _counting_connections(server: Any) -> list[Any]:
    """The client addresses of the TCP connections the loopback server accepts from now on."""
    accepted: list[Any] = []
    accept = server.httpd.get_request

    def counting() -> Any:
        connection = accept()
        accepted.append(connection[1])
        return connection

    server.httpd.get_request = counting
    return accepted


def measure_detection(setup: Setup, runs_refused: int, runs_holed: int) -> list[Line]:
    def detect_once(package: str, kind: str) -> float:
        with scheduler() as server, _metadata(setup, kind) as host:
            env = {"CARBONAWARE_SCHEDULER_BASE_URL": server.url}
            params: dict[str, Any] = {}
            if not setup.netns:  # redirect both to the same loopback port
                env["CARBONAWARE_METADATA_HOST"] = host
                params["redirect"] = host if package == ORIGINAL else None
            seconds: float = run_child(setup, package, "detect", env, **params)["seconds"]
            if schedule_requests(server):
                raise ChildFailed(f"{package} asked the scheduler although no zone was found")
            return seconds

    where = "169.254.169.254 in a netns" if setup.netns else "httpx.get redirected to loopback"
    lines = []
    for kind, runs in (("refused", runs_refused), ("black-holed", runs_holed)):
        samples: dict[str, list[float]] = {ORIGINAL: [], OURS: []}
        for _ in range(runs):
            for package in (ORIGINAL, OURS):
                samples[package].append(detect_once(package, kind))
        lines.append(
            Line(f"zone detection, metadata {kind} ({where})", _median(samples[ORIGINAL]), _median(samples[OURS]))
        )
    return lines


@contextmanager
def _metadata(setup: Setup, kind: str) -> Iterator[str]:
    if kind == "refused":
        yield metadata_refused(setup)
    else:
        with metadata_black_hole(setup) as host:
            yield host


def measure_map(setup: Setup, count: int, workers: int, runs: int) -> list[Line]:
    """Thread-pool calls; the packages alternate run by run and the best wall time counts (noise only adds)."""
    seconds: dict[str, list[float]] = {ORIGINAL: [], OURS: []}
    requests: dict[str, list[int]] = {ORIGINAL: [], OURS: []}
    errors: dict[str, dict[str, int]] = {ORIGINAL: {}, OURS: {}}
    for _ in range(runs):
        for package in (ORIGINAL, OURS):
            with scheduler() as server:
                env = {"CARBONAWARE_SCHEDULER_BASE_URL": server.url}
                result = run_child(setup, package, "map", env, count=count, workers=workers)
                seconds[package].append(result["seconds"])
                requests[package].append(schedule_requests(server))
                for name, n in result["errors"].items():
                    errors[package][name] = errors[package].get(name, 0) + n
    label = f"{count:,} mapped calls ({workers} threads)"
    best = f"best of {runs}" if runs > 1 else "single run"
    lines = [
        Line(f"{label}: requests", max(requests[ORIGINAL]), max(requests[OURS]), "count"),
        Line(f"{label}: wall time, {best}", min(seconds[ORIGINAL]), min(seconds[OURS])),
    ]
    if errors[ORIGINAL] or errors[OURS]:
        lines.append(Line(f"{label}: errors", _errors(errors[ORIGINAL]), _errors(errors[OURS]), "text"))
    return lines


def _errors(errors: dict[str, int]) -> str:
    return ", ".join(f"{n} {name}" for name, n in errors.items()) or "none"


def measure_prefect_map(setup: Setup, count: int, runs: int) -> list[Line]:
    """A real flow per package and run, alternating; the best wall time counts."""
    seconds: dict[str, list[float]] = {ORIGINAL: [], OURS: []}
    requests: dict[str, list[int]] = {ORIGINAL: [], OURS: []}
    failures: dict[str, str] = {}
    for _ in range(runs):
        for package in (ORIGINAL, OURS):
            with scheduler() as server:
                env = {"CARBONAWARE_SCHEDULER_BASE_URL": server.url}
                try:
                    result = run_child(setup, package, "prefect_map", env, timeout=900, count=count)
                    seconds[package].append(result["seconds"])
                except ChildFailed as exc:
                    failures[package] = f"error: {exc}"[:70]
                requests[package].append(schedule_requests(server))

    def wall(package: str) -> float | str | None:
        return min(seconds[package]) if seconds[package] else failures.get(package)

    best = f"best of {runs}" if runs > 1 else "single run"
    return [
        Line(f"Prefect flow, task.map over {count:,}: requests", max(requests[ORIGINAL]), max(requests[OURS]), "count"),
        Line(f"Prefect flow, task.map over {count:,}: wall time, {best}", wall(ORIGINAL), wall(OURS)),
    ]


def measure_memory(setup: Setup) -> list[Line]:
    def peak(package: str, preload: list[str]) -> tuple[int, float]:
        with scheduler(ideal_after=timedelta(seconds=WAIT_SECONDS)) as server:
            env = {"CARBONAWARE_SCHEDULER_BASE_URL": server.url}
            result, kb = run_child_sampling_memory(setup, package, "wait", env, preload=preload)
            return kb, result["seconds"]

    original = peak(ORIGINAL, [])  # its delay function lives in carbonaware_prefect, which imports prefect
    ours_prefect = peak(OURS, ["carbonaware_prefect"])
    ours_core = peak(OURS, [])
    return [
        Line("peak RSS while waiting, carbonaware_prefect imported", original[0], ours_prefect[0], "kb"),
        Line("peak RSS while waiting, ours without Prefect", original[0], ours_core[0], "kb"),
        Line("↳ the wait itself, for reference", original[1], ours_core[1]),
    ]


def measure_api_down(setup: Setup, runs: int) -> list[Line]:
    def down(package: str, failing: bool) -> tuple[str, float, int]:
        outcomes, seconds, requests = [], [], 0
        for _ in range(runs):
            with scheduler(failing=True) as server:
                url = server.url if failing else f"http://{_loopback().refused_host()}"
                result = run_child(setup, package, "down", {"CARBONAWARE_SCHEDULER_BASE_URL": url})
                requests += schedule_requests(server)
            outcomes.append(result["outcome"])
            seconds.append(result["seconds"])
        return "/".join(sorted(set(outcomes))), _median(seconds), round(requests / runs)

    lines = []
    for label, failing in (("API answers 500", True), ("API port refused", False)):
        original, ours = down(ORIGINAL, failing), down(OURS, failing)
        lines.append(Line(f"{label}: the task", original[0], ours[0], "text"))
        lines.append(Line(f"{label}: time until it runs or fails", original[1], ours[1]))
        if failing:
            lines.append(Line(f"{label}: requests per call", original[2], ours[2], "count"))
    return lines


# ---- the run ----------------------------------------------------------------------------------------------------


STEPS = ("import", "decision", "detection", "map", "memory", "down", "prefect-map")


def collect(setup: Setup, args: argparse.Namespace) -> list[Line]:
    scale = 3 if args.quick else 1
    steps: dict[str, Callable[[], list[Line]]] = {
        "import": lambda: measure_imports(setup, runs=max(3, 9 // scale)),
        "decision": lambda: measure_decision(setup, runs=max(2, 5 // scale), warm=20 // scale),
        "detection": lambda: measure_detection(setup, max(2, 5 // scale), max(1, 3 // scale)),
        "map": lambda: measure_map(setup, args.count, args.workers, runs=1 if args.quick else 2),
        "memory": lambda: measure_memory(setup),
        "down": lambda: measure_api_down(setup, runs=max(1, 3 // scale)),
        "prefect-map": lambda: measure_prefect_map(setup, args.count, runs=1 if args.quick else 2),
    }
    wanted = args.only.split(",") if args.only else [s for s in STEPS if s != "prefect-map" or args.prefect_map]
    lines: list[Line] = []
    for name in wanted:
        started = time.perf_counter()
        lines += _safely(steps[name], name)
        print(f"  {name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return lines


def inner_main(args: argparse.Namespace) -> int:
    """The measurements; inside the network namespace when there is one."""
    if args.netns:
        _assert_loopback_only()
    with tempfile.TemporaryDirectory(prefix="carbonaware-compare-") as scratch:
        setup = Setup(
            original_python=args.original_python,
            ours_python=args.ours_python,
            netns=args.netns,
            prefect_home=os.path.join(scratch, "prefect-home"),
            workdir=scratch,
        )
        started = time.perf_counter()
        lines = collect(setup, args)
        elapsed = time.perf_counter() - started
    table = Table(("metric", "original 0.1.3", "ours", "ratio"), tuple(line.cells() for line in lines))
    bullet = "- " if args.markdown else ""
    print(f"compare -- {machine_summary()}")
    print(f"{bullet}original: {ORIGINAL_SPEC} + {_versions(args.original_python)} ({args.original_python})")
    print(f"{bullet}ours: {REPO_ROOT} + {_versions(args.ours_python)} ({args.ours_python})")
    isolation = "loopback-only network namespace" if args.netns else "NO network namespace (detection redirected)"
    print(f"{bullet}isolation: {isolation}; ratio = ours / original (below 1: ours is faster, leaner, fewer requests)")
    print()
    print(table.markdown() if args.markdown else table.text())
    print()
    print(f"{bullet}measurements took {elapsed:.0f} s")
    return 0


def _versions(python: str) -> str:
    code = (
        "import importlib.metadata as m\n"
        "out = []\n"
        "for name in ('prefect', 'httpx', 'requests'):\n"
        "    try: out.append(f'{name} {m.version(name)}')\n"
        "    except m.PackageNotFoundError: out.append(f'no {name}')\n"
        "print(', '.join(out))"
    )
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False)
    return done.stdout.strip() or "?"


def _assert_loopback_only() -> None:
    """Refuse to measure if this namespace can reach anything but itself."""
    with open("/proc/net/dev", encoding="ascii") as handle:
        interfaces = [line.split(":")[0].strip() for line in handle.readlines()[2:]]
    if interfaces != ["lo"]:
        raise SystemExit(f"refusing to run: the namespace has interfaces {interfaces}, not only lo")


# ---- setup: the original's venv and the namespace ----------------------------------------------------------------


def prefect_version(python: str) -> str | None:
    code = "import importlib.metadata as m; print(m.version('prefect'))"
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False)
    return done.stdout.strip() or None


def ensure_original_venv(version: str | None) -> str:
    """bench/.cache/original-venv with carbonaware-prefect 0.1.3 and the same prefect as ours; reused when the
    requirement line has not changed."""
    venv = CACHE_DIR / "original-venv"
    python = venv / "bin" / "python"
    requirements = [ORIGINAL_SPEC, f"prefect=={version}" if version else "prefect"]
    marker = venv / "bench-requirements.txt"
    if python.exists() and marker.exists() and marker.read_text() == " ".join(requirements):
        return str(python)
    print(f"installing {' '.join(requirements)} into {venv} (once) ...", file=sys.stderr, flush=True)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    (CACHE_DIR / ".gitignore").write_text("# made by bench/compare.py: keep this cache out of git and lint runs\n*\n")
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-qq", *requirements], check=True)
    marker.write_text(" ".join(requirements))
    return str(python)


def ours_python() -> str:
    """The project's .venv (prefect, requests) when present, else this interpreter."""
    candidate = REPO_ROOT / ".venv" / "bin" / "python"
    return str(candidate) if candidate.exists() else sys.executable


def netns_available() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, check=False)
    return done.returncode == 0


@contextmanager
def loopback_namespace() -> Iterator[str]:
    """A namespace with only lo (up), 169.254.169.254 on lo, and metadata.google.internal in its hosts file."""
    name = f"carbonaware-bench-{os.getpid()}"
    etc = Path("/etc/netns") / name
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text(f"127.0.0.1 localhost\n::1 localhost\n{METADATA_IP} metadata.google.internal\n")
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "netns", "exec", name, "ip", "addr", "add", f"{METADATA_IP}/32", "dev", "lo"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
        shutil.rmtree(etc, ignore_errors=True)


def outer_main(args: argparse.Namespace, argv: Sequence[str]) -> int:
    ours = args.ours_python or ours_python()
    original = args.original_python or ensure_original_venv(prefect_version(ours))
    inner = [sys.executable, str(Path(__file__).resolve()), *argv, "--inner"]
    inner += ["--original-python", original, "--ours-python", ours]
    if args.no_netns or not netns_available():
        print("no network namespace: the original's detection will be redirected to loopback", file=sys.stderr)
        return subprocess.run(inner, check=False).returncode
    with loopback_namespace() as name:
        return subprocess.run(["ip", "netns", "exec", name, *inner, "--netns"], check=False).returncode


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", action="store_true", help="print a GitHub markdown table")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke test, noisier)")
    parser.add_argument("--no-prefect-map", dest="prefect_map", action="store_false", help="skip the real flow")
    parser.add_argument("--no-netns", action="store_true", help="do not use a network namespace")
    parser.add_argument("--count", type=int, default=1000, help="mapped calls (default 1000)")
    parser.add_argument("--workers", type=int, default=1000, help="threads; Prefect's default pool is unbounded")
    parser.add_argument("--only", help=f"comma-separated steps to run, of: {', '.join(STEPS)}")
    parser.add_argument("--original-python", help="an interpreter with carbonaware-prefect 0.1.3 installed")
    parser.add_argument("--ours-python", help="an interpreter for ours (default: the project's .venv)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--netns", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(json.loads(args.child))
    if args.inner:
        return inner_main(args)
    return outer_main(args, argv)


if __name__ == "__main__":
    sys.exit(main())
