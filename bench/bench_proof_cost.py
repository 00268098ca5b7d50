"""What reporting costs: decorated tasks (artifacts, events, ledger -- the defaults) against plain ones.

    python bench/bench_proof_cost.py [--tasks 200] [--rounds 20] [--port 4299] [--no-artifacts] [--log-level INFO]

A real ``prefect server`` runs in its own process (SQLite in a temporary PREFECT_HOME), so the API's work is not
timed inside the process under test. A second process runs flows that ``.map`` ``--tasks`` tasks needing no wait,
plain and decorated in pairs, the order flipped every pair (ABBA...: drift -- the database growing, a neighbour's
load -- falls on both), ``--rounds`` pairs after one warm-up pair. Four figures, from noisiest to exact:

1. End to end: the median of the per-pair ratios decorated / plain with a bootstrap 95 % interval, and the
   min-of-k ratio (fastest decorated over fastest plain: the runs least disturbed by other load); for the ``.map``
   inside the flow run and for the whole flow run. The whole run includes creating it, which Prefect's client
   retries with exponential backoff when the (SQLite) server is busy: 1, 2, 3 or 4 ``POST /flow_runs/`` (see 4.)
   make it take about 1, 2-4, 8 or 16 s on this machine, whatever the tasks do. "drained" adds the time until the
   background publisher has written and sent everything (the flow does not wait for that).
2. Process CPU per flow run (all threads, the publisher's included): what the reporting costs in total, wherever
   it runs; much less disturbed by other processes than wall time.
3. In-task overhead, measured inside each task: the time the decorator's wrapper takes around the body (wall and
   this thread's CPU), against the same measurement around a plain task's body (the measurement's own floor);
   beside it the publisher thread's CPU and the time in garbage collection per flow run.
4. API traffic per flow run: every HTTP request to the server (method and path) and every event Prefect's events
   worker sends, counted in the process under test -- deterministic, and it shows what is on the wire.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO_ROOT, clean_env, prefect_server

CHILD = r"""
import collections, json, re, sys, threading, time
from datetime import timedelta
import httpx
from prefect import flow, task
from prefect.events.worker import EventsWorker
import carbonaware_prefect as cp
from carbonaware_core import ForecastPoint

TASKS, ROUNDS, LEDGER, ARTIFACT = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4] == "on"

# -- API traffic: every request and every event this process sends, by kind
TRAFFIC = collections.Counter()
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

def _kind(request):
    return f"{request.method} {UUID_RE.sub('{id}', request.url.path.split('/api', 1)[-1])}"

def _count_sync(send):
    def counted(self, request, *args, **kwargs):
        TRAFFIC[_kind(request)] += 1
        return send(self, request, *args, **kwargs)
    return counted

def _count_async(send):
    async def counted(self, request, *args, **kwargs):
        TRAFFIC[_kind(request)] += 1
        return await send(self, request, *args, **kwargs)
    return counted

def _count_events(send):
    def counted(self, event, *args, **kwargs):
        TRAFFIC[f"event {event.event}"] += 1
        return send(self, event, *args, **kwargs)
    return counted

httpx.Client.send = _count_sync(httpx.Client.send)
httpx.AsyncClient.send = _count_async(httpx.AsyncClient.send)
EventsWorker.send = _count_events(EventsWorker.send)

# -- in-task overhead: time around the body, minus the body's own
BODY = threading.local()
OVERHEAD = []

def body(i):
    BODY.began = (time.perf_counter(), time.thread_time())
    BODY.ended = (time.perf_counter(), time.thread_time())
    return i

def around(fn):
    def measured(i):
        wall, cpu = time.perf_counter(), time.thread_time()
        result = fn(i)
        wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
        inner = (BODY.ended[0] - BODY.began[0], BODY.ended[1] - BODY.began[1])
        OVERHEAD.append((wall - inner[0], cpu - inner[1]))
        return result
    return measured

def flat(zone, now, end):  # now is already the best time: no wait, a full decision all the same
    start = now.replace(minute=0, second=0, microsecond=0)
    return [ForecastPoint(start + timedelta(hours=i), start + timedelta(hours=i + 1), 300.0 + i) for i in range(12)]

decorator = cp.carbonaware_delay_decorator(window=timedelta(hours=6), duration=timedelta(minutes=30), source=flat,
                                           grid_zone="DE", power_kw=1.5, ledger=LEDGER, artifact=ARTIFACT)
plain = task(name="plain")(around(body))
decorated = task(name="decorated")(around(decorator(body)))

MAPPED = {}  # seconds the .map took inside the flow run: no flow-run creation in it

@flow(name="bench-plain")
def run_plain():
    began = time.perf_counter()
    plain.map(range(TASKS)).result()
    MAPPED["seconds"] = time.perf_counter() - began

@flow(name="bench-decorated")
def run_decorated():
    began = time.perf_counter()
    decorated.map(range(TASKS)).result()
    MAPPED["seconds"] = time.perf_counter() - began

# -- garbage collection: more objects alive for a moment means more collections of Prefect's large heap
GC = {"seconds": 0.0, "full": 0}

def _gc_timer(phase, info, _began=[0.0]):
    if phase == "start":
        _began[0] = time.perf_counter()
    else:
        GC["seconds"] += time.perf_counter() - _began[0]
        GC["full"] += info["generation"] == 2

import gc
gc.callbacks.append(_gc_timer)

def publisher_cpu():  # CPU seconds of the publisher's thread so far
    thread = cp._PUBLISHER._thread
    if thread is None or not thread.is_alive():
        return 0.0
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))

def measured(name, fn):
    cp.flush_reports(120.0)
    EventsWorker.drain_all(timeout=120.0)
    TRAFFIC.clear()
    OVERHEAD.clear()
    GC.update(seconds=0.0, full=0)
    began, cpu, publisher = time.perf_counter(), time.process_time(), publisher_cpu()
    fn()
    flow_done, flow_cpu = time.perf_counter() - began, time.process_time() - cpu
    cp.flush_reports(120.0)
    drained, drained_cpu = time.perf_counter() - began, time.process_time() - cpu
    publisher = publisher_cpu() - publisher
    EventsWorker.drain_all(timeout=120.0)  # Prefect's own events of this flow run count as its traffic
    overhead = sorted(OVERHEAD)
    return {
        "name": name, "wall": flow_done, "mapped": MAPPED["seconds"], "drained": drained,
        "cpu": flow_cpu, "cpu_drained": drained_cpu,
        "publisher_cpu": publisher, "gc_seconds": GC["seconds"], "gc_full": GC["full"],
        "overhead_wall": [o[0] for o in overhead], "overhead_cpu": sorted(o[1] for o in overhead),
        "traffic": dict(TRAFFIC),
    }

results = []
for pair in range(ROUNDS + 1):  # pair 0 warms up both
    order = [("plain", run_plain), ("decorated", run_decorated)]
    if pair % 2:
        order.reverse()
    results.append({"pair": pair, **{name: measured(name, fn) for name, fn in order}})
print(json.dumps(results))
"""


def median_interval(ratios: Sequence[float], draws: int = 2000, seed: int = 10) -> tuple[float, float]:
    """A bootstrap 95 % interval of the median of ``ratios`` (resampling the pairs; a fixed seed: repeatable)."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(draws))
    return medians[int(0.025 * draws)], medians[int(0.975 * draws) - 1]


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


def ratio_line(label: str, pairs: Sequence[dict[str, Any]], field: str) -> str:
    ratios = [pair["decorated"][field] / pair["plain"][field] for pair in pairs]
    low, high = median_interval(ratios)
    fastest = min(pair["decorated"][field] for pair in pairs) / min(pair["plain"][field] for pair in pairs)
    return (
        f"{label:<34} median {statistics.median(ratios):.3f}  95% CI {low:.3f}..{high:.3f}  "
        f"min-of-{len(pairs)} {fastest:.3f}  (pairs {min(ratios):.2f}..{max(ratios):.2f})"
    )


def overhead_lines(pairs: Sequence[dict[str, Any]], tasks: int) -> list[str]:
    lines = []
    plain_wall = statistics.median(pair["plain"]["wall"] for pair in pairs)
    for name in ("plain", "decorated"):
        walls = sorted(v for pair in pairs for v in pair[name]["overhead_wall"])
        cpus = sorted(v for pair in pairs for v in pair[name]["overhead_cpu"])
        wall = f"wall median {statistics.median(walls) * 1e3:7.3f} ms  p90 {percentile(walls, 0.9) * 1e3:7.3f} ms"
        cpu = f"thread CPU median {statistics.median(cpus) * 1e3:7.3f} ms  p90 {percentile(cpus, 0.9) * 1e3:7.3f} ms"
        lines.append(f"  {name:<10} {wall} | {cpu}")
    cpus = sorted(v for pair in pairs for v in pair["decorated"]["overhead_cpu"])
    share = statistics.median(cpus) * tasks / plain_wall
    lines.append(
        f"  the decorated tasks' CPU in the wrapper, {tasks} tasks one after another: {share:.1%} of a plain flow run"
    )
    for name in ("plain", "decorated"):
        seconds = statistics.median(pair[name].get("gc_seconds", 0.0) for pair in pairs)
        full = statistics.median(pair[name].get("gc_full", 0) for pair in pairs)
        lines.append(f"  garbage collection, {name} flow run: {seconds * 1e3:.0f} ms ({full:g} full collections)")
    publisher = statistics.median(pair["decorated"]["publisher_cpu"] for pair in pairs)
    lines.append(f"  the publisher thread (off the tasks' path): {publisher / tasks * 1e3:.3f} ms CPU per task")
    return lines


def traffic_lines(pairs: Sequence[dict[str, Any]], tasks: int) -> list[str]:
    """Requests per flow run by kind: the median over the pairs (the counts barely vary)."""
    kinds = sorted({kind for pair in pairs for name in ("plain", "decorated") for kind in pair[name]["traffic"]})
    lines = [f"  {'request or event':<44} {'plain':>8} {'decorated':>10} {'extra/task':>11}"]
    totals = {"plain": 0.0, "decorated": 0.0}
    for kind in kinds:
        counts = {
            name: statistics.median(pair[name]["traffic"].get(kind, 0) for pair in pairs)
            for name in ("plain", "decorated")
        }
        for name in totals:
            totals[name] += counts[name]
        extra = (counts["decorated"] - counts["plain"]) / tasks
        lines.append(f"  {kind:<44} {counts['plain']:>8g} {counts['decorated']:>10g} {extra:>11.3f}")
    extra = (totals["decorated"] - totals["plain"]) / tasks
    lines.append(f"  {'all':<44} {totals['plain']:>8g} {totals['decorated']:>10g} {extra:>11.3f}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=20, help="pairs of flow runs (plain, decorated) after a warm-up")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--no-artifacts", action="store_true", help="decorated with artifact=False (no reporting)")
    parser.add_argument("--json", help="also write the raw measurements to this file")
    parser.add_argument(
        "--log-level",
        default="WARNING",
        help="PREFECT_LOGGING_LEVEL of the flows (INFO: the decision line and Prefect's own go to the API as logs)",
    )
    args = parser.parse_args()
    python = sys.executable
    home = tempfile.mkdtemp(prefix="carbonaware-bench-prefect-")
    env = clean_env({"PREFECT_HOME": home, "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    load_before = os.getloadavg()
    with prefect_server(env, args.port) as url:
        child_env = {
            **env,
            "PREFECT_API_URL": url,
            "PREFECT_LOGGING_LEVEL": args.log_level,
            "PYTHONPATH": str(REPO_ROOT),
        }
        ledger = os.path.join(home, "ledger.jsonl")
        artifacts = "off" if args.no_artifacts else "on"
        done = subprocess.run(
            [python, "-c", CHILD, str(args.tasks), str(args.rounds), ledger, artifacts],
            env=child_env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=7200,
            check=False,
        )
        if done.returncode != 0:
            print(done.stderr[-4000:], file=sys.stderr)
            return 1
        results = json.loads(done.stdout.strip().splitlines()[-1])
    load_after = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(results))
    pairs = results[1:]
    print(
        f"{args.tasks} mapped tasks per flow run, {args.rounds} pairs after a warm-up, order flipped every pair; "
        f"prefect server in its own process; {os.cpu_count()} CPUs, load average {load_before[0]:.1f} before, "
        f"{load_after[0]:.1f} after"
    )
    print(
        f"{'pair':>4} {'plain s':>8} {'decorated s':>11} {'ratio':>6} {'drained s':>9} {'CPU plain':>9} {'CPU dec':>8}"
    )
    for row in results:
        plain, decorated = row["plain"], row["decorated"]
        mark = " (warm-up)" if row["pair"] == 0 else ""
        print(f"{row['pair']:>4} {plain['wall']:>8.2f} {decorated['wall']:>11.2f} "
              f"{decorated['wall'] / plain['wall']:>6.3f} {decorated['drained']:>9.2f} {plain['cpu']:>9.2f} "
              f"{decorated['cpu_drained']:>8.2f}{mark}")  # fmt: skip
    print("\n1. End to end, decorated / plain:")
    print("  " + ratio_line("the .map inside the flow run", pairs, "mapped"))
    print("  " + ratio_line("flow run wall time", pairs, "wall"))
    print("  " + ratio_line("... with the publisher drained", [_drained(pair) for pair in pairs], "wall"))
    print("2. Process CPU per flow run (all threads), decorated / plain:")
    print("  " + ratio_line("flow run CPU", pairs, "cpu"))
    print("  " + ratio_line("... with the publisher drained", [_drained(pair, "cpu") for pair in pairs], "cpu"))
    print("3. In-task overhead: the wrapper around the body, per task:")
    print("\n".join(overhead_lines(pairs, args.tasks)))
    print("4. API traffic per flow run (median over the pairs):")
    print("\n".join(traffic_lines(pairs, args.tasks)))
    return 0


def _drained(pair: dict[str, Any], field: str = "wall") -> dict[str, Any]:
    """The pair with the decorated run's time until its reports were out (the plain run has none to wait for)."""
    source = "drained" if field == "wall" else "cpu_drained"
    return {
        "plain": {field: pair["plain"][source]},
        "decorated": {field: pair["decorated"][source]},
    }


if __name__ == "__main__":
    sys.exit(main())
