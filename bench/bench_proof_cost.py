"""What reporting costs: decorated tasks (artifacts, events, ledger -- the defaults) against plain ones.

    python bench/bench_proof_cost.py [--tasks 200] [--rounds 6] [--port 4299]

A real ``prefect server`` runs in its own process (SQLite in a temporary PREFECT_HOME), so the API's work is not
timed inside the process under test. A second process runs one flow that ``.map``s ``--tasks`` tasks needing no
wait, plain and decorated alternately (ABAB..., the order flipped every round, so drift in the server -- its
database growing -- falls on both), for ``--rounds`` rounds after one warm-up pair. It prints every round, the
median ratio and the spread (min..max) of the per-round ratios; "drained" adds the time until the background
publisher has created every table artifact (the flow itself does not wait for that). ``--repeat N`` times each
side N times per round and keeps the fastest, which filters out runs disturbed by other load on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO_ROOT, clean_env, prefect_server

CHILD = r"""
import json, sys, time
from datetime import datetime, timedelta, timezone
from prefect import flow, task
import carbonaware_prefect as cp
from carbonaware_core import ForecastPoint

TASKS, ROUNDS, REPEAT = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[5])
LEDGER, ARTIFACT = sys.argv[3], sys.argv[4] == "on"

def flat(zone, now, end):  # now is already the best time: no wait, a full decision all the same
    start = now.replace(minute=0, second=0, microsecond=0)
    return [ForecastPoint(start + timedelta(hours=i), start + timedelta(hours=i + 1), 300.0 + i) for i in range(12)]

@task(name="plain")
def plain(i: int) -> int:
    return i

@task(name="decorated")
@cp.carbonaware_delay_decorator(window=timedelta(hours=6), duration=timedelta(minutes=30), source=flat,
                                grid_zone="DE", power_kw=1.5, ledger=LEDGER, artifact=ARTIFACT)
def decorated(i: int) -> int:
    return i

@flow(name="bench-plain")
def run_plain() -> None:
    plain.map(range(TASKS)).result()

@flow(name="bench-decorated")
def run_decorated() -> None:
    decorated.map(range(TASKS)).result()

def timed(fn):
    began = time.perf_counter()
    fn()
    flow_done = time.perf_counter()
    cp._PUBLISHER.drain(120.0)
    return flow_done - began, time.perf_counter() - began

results = []
for round_ in range(ROUNDS + 1):  # round 0 warms up both
    order = [("plain", run_plain), ("decorated", run_decorated)]
    if round_ % 2:
        order.reverse()
    times = {name: min(timed(fn) for _ in range(REPEAT)) for name, fn in order}  # the least disturbed of REPEAT
    results.append({"round": round_, **{f"{k}_{i}": v[i] for k, v in times.items() for i in (0, 1)}})
print(json.dumps(results))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--no-artifacts", action="store_true", help="decorated with artifact=False (no reporting)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per side per round; the fastest counts")
    args = parser.parse_args()
    python = sys.executable
    home = tempfile.mkdtemp(prefix="carbonaware-bench-prefect-")
    env = clean_env({"PREFECT_HOME": home, "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    with prefect_server(env, args.port) as url:
        child_env = {**env, "PREFECT_API_URL": url, "PREFECT_LOGGING_LEVEL": "WARNING", "PYTHONPATH": str(REPO_ROOT)}
        ledger = os.path.join(home, "ledger.jsonl")
        done = subprocess.run(
            [
                python,
                "-c",
                CHILD,
                str(args.tasks),
                str(args.rounds),
                ledger,
                "off" if args.no_artifacts else "on",
                str(args.repeat),
            ],
            env=child_env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=3600,
            check=False,
        )
        if done.returncode != 0:
            print(done.stderr[-4000:], file=sys.stderr)
            return 1
        rounds = json.loads(done.stdout.strip().splitlines()[-1])
    print(
        f"{args.tasks} mapped tasks per flow, {args.rounds} rounds after a warm-up; prefect server in its own process"
    )
    print(f"{'round':>5} {'plain s':>9} {'decorated s':>12} {'ratio':>7} {'drained s':>10} {'ratio':>7}")
    ratios, drained = [], []
    for row in rounds:
        ratio, with_drain = row["decorated_0"] / row["plain_0"], row["decorated_1"] / row["plain_1"]
        mark = " (warm-up)" if row["round"] == 0 else ""
        print(f"{row['round']:>5} {row['plain_0']:>9.2f} {row['decorated_0']:>12.2f} {ratio:>7.3f} "
              f"{row['decorated_1']:>10.2f} {with_drain:>7.3f}{mark}")  # fmt: skip
        if row["round"]:
            ratios.append(ratio)
            drained.append(with_drain)
    print(f"decorated / plain: median {statistics.median(ratios):.3f} (spread {min(ratios):.3f}..{max(ratios):.3f})")
    print(f"with the publisher drained: median {statistics.median(drained):.3f} "
          f"(spread {min(drained):.3f}..{max(drained):.3f})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
