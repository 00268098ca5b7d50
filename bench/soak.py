"""Soak: 10,000 decisions against hostile loopback servers, then the same against a well-behaved one.

    python bench/soak.py [--decisions N] [--timeout S] [--threads N] [--backend requests|urllib|both]

Each decision is ``plan_delay`` with a ``url:`` source (a fresh URL each time, so every one makes a request) and a
small ``timeout``, run from a thread pool. The hostile servers, each in its own process (so what is counted is
ours alone), take turns: a black hole, a header drip and a body drip (a byte every 20 ms, so no single receive
ever times out), an endless ``100 Continue`` flood, a redirect and a 500. Printed per run: threads, open
descriptors and RSS before, and after the pool is done (given 2 s to settle), and the worst overrun of any call
past its timeout. Exit status 1 if anything grew or a call overran by a second. Only 127.0.0.1 is contacted;
not run in CI (about three minutes).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

from _common import Table, fmt_seconds, machine_summary  # noqa: E402

import carbonaware_core as core  # noqa: E402 - the repository root is put on sys.path just above
from tests.hostile import hostile_process  # noqa: E402

HOSTILE_MODES = ("black-hole", "header-drip", "body-drip", "continue-flood", "redirect", "error-500")
DRIP_INTERVAL = 0.02
POOL_BOUND = 10  # requests keeps up to 10 idle kept-alive connections per host: bounded, not a leak
SETTLE_SECONDS = 2.0
WARM_UP = 2_000  # decisions before each backend's measured runs: what the first ones import and pool is not growth


@dataclass(frozen=True)
class Usage:
    threads: int
    fds: int
    rss_mb: float


def usage() -> Usage:
    rss = 0.0
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
    return Usage(threading.active_count(), len(os.listdir("/proc/self/fd")), rss)


@dataclass(frozen=True)
class Run:
    name: str
    before: Usage
    after: Usage
    peak_threads: int
    max_overrun: float
    p50: float
    p99: float
    reasons: Counter[str]
    failures: Counter[str]
    seconds: float

    def flat(self, hosts: int) -> bool:
        return (
            self.after.threads <= self.before.threads
            and self.after.fds <= self.before.fds + POOL_BOUND * hosts
            and self.after.rss_mb - self.before.rss_mb < 30
        )


def soak(name: str, urls: Sequence[str], decisions: int, timeout: float, threads: int) -> Run:
    before = usage()
    peak = [before.threads]

    def decide(i: int) -> tuple[float, str, str]:
        began = time.monotonic()
        plan = core.plan_delay(
            timedelta(hours=1), timedelta(minutes=30), source=f"url:{urls[i % len(urls)]}/f?n={i}", timeout=timeout
        )
        elapsed = time.monotonic() - began
        if i % 97 == 0:
            peak[0] = max(peak[0], threading.active_count())
        return elapsed, plan.reason, plan.detail if plan.reason == "source-failed" else ""

    started = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(decide, range(decisions)))
    seconds = time.monotonic() - started
    deadline = time.monotonic() + SETTLE_SECONDS
    after = usage()
    while time.monotonic() < deadline and (after.threads > before.threads or after.fds > before.fds):
        time.sleep(0.05)  # polling the counters, not waiting for an event: there is none for "a thread ended"
        after = usage()
    durations = sorted(elapsed for elapsed, _, _ in results)
    return Run(
        name,
        before,
        after,
        peak[0],
        max(durations) - timeout,
        statistics.median(durations),
        durations[int(len(durations) * 0.99) - 1],
        Counter(reason for _, reason, _ in results),
        Counter(re.sub(r"\d+", "N", detail) for _, _, detail in results if detail),
        seconds,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decisions", type=int, default=10_000)
    parser.add_argument("--timeout", type=float, default=0.2, help="each decision's timeout, seconds")
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--backend", choices=("requests", "urllib", "both"), default="both")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    logging.getLogger("carbonaware").addHandler(logging.NullHandler())  # 10,000 warnings are not the point
    backends = ("requests", "urllib") if args.backend == "both" else (args.backend,)
    runs: list[tuple[Run, int]] = []
    with ExitStack() as stack:
        hostile = [stack.enter_context(hostile_process(mode, DRIP_INTERVAL)) for mode in HOSTILE_MODES]
        good = stack.enter_context(hostile_process("ok"))
        for backend in backends:
            os.environ["CARBONAWARE_HTTP_CLIENT"] = backend
            soak("warm-up", [*hostile, good], WARM_UP, args.timeout, args.threads)  # imports, sessions, pools
            for name, urls in ((f"{backend}, hostile mix", hostile), (f"{backend}, well-behaved", [good])):
                core.clear_cache()
                runs.append((soak(name, urls, args.decisions, args.timeout, args.threads), len(urls)))
    headers = ("run", "threads", "fds", "RSS MB", "peak threads", "max overrun", "p50", "p99", "took", "flat")
    rows = tuple(
        (
            run.name,
            f"{run.before.threads} -> {run.after.threads}",
            f"{run.before.fds} -> {run.after.fds}",
            f"{run.before.rss_mb:.1f} -> {run.after.rss_mb:.1f}",
            str(run.peak_threads),
            fmt_seconds(run.max_overrun),
            fmt_seconds(run.p50),
            fmt_seconds(run.p99),
            fmt_seconds(run.seconds),
            "yes" if run.flat(hosts) else "NO",
        )
        for run, hosts in runs
    )
    table = Table(headers, rows)
    print(f"soak -- {args.decisions:,} decisions per run, timeout {args.timeout:g} s, {args.threads} threads")
    print(machine_summary())
    print()
    print(table.markdown() if args.markdown else table.text())
    print()
    for run, _ in runs:
        print(f"{run.name}: reasons {dict(run.reasons)}")
        for detail, count in run.failures.most_common(4):
            print(f"    {count:>5} x {detail[:150]}")
    print(f"flat: threads back to where they were, descriptors within {POOL_BOUND} kept-alive per host, RSS < +30 MB")
    ok = all(run.flat(hosts) and run.max_overrun < 1.0 for run, hosts in runs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
