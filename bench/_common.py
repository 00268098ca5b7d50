"""Helpers shared by the benchmark scripts: clean child environments, timing, tables, the machine.

Stdlib only, so ``bench_core.py`` stays runnable from a clean clone with nothing installed.
"""

from __future__ import annotations

import contextlib
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# Variables that would make a child detect a zone, pick a source or use a proxy without being told to.
ISOLATED_PREFIXES = ("CARBONAWARE_", "AWS_", "ECS_", "GCE_", "ELECTRICITYMAPS_", "WATTTIME_", "UKGRID_", "PREFECT_")
ISOLATED_NAMES = frozenset(
    {
        "REGION_NAME",
        "K_SERVICE",
        "FUNCTION_TARGET",
        "PYTHONPATH",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "NO_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "no_proxy",
    }
)


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The current environment minus anything that would steer zone detection, sources or proxies.

    A benchmark child must measure the code path we name, not one a stray AWS_REGION or proxy chose for it.
    """
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ISOLATED_NAMES and not name.startswith(ISOLATED_PREFIXES)
    }
    env.update(extra or {})
    return env


def run_python(
    python: str, args: Sequence[str], env: Mapping[str, str], cwd: str | Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run a child interpreter and capture its output; failures are returned, not raised, so a table still prints."""
    return subprocess.run(
        [python, *args], env=dict(env), cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


def wall_time(command: Sequence[str], env: Mapping[str, str]) -> float:
    """Seconds from spawn to exit of one process (stdout/stderr discarded)."""
    started = time.perf_counter()
    subprocess.run(list(command), env=dict(env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def median_of(samples: Sequence[float]) -> float:
    return statistics.median(samples) if samples else float("nan")


def repeat(fn: Callable[[], float], runs: int) -> list[float]:
    """Call a measurement ``runs`` times; the callers report the median, which shrugs off a noisy neighbour."""
    return [fn() for _ in range(runs)]


# ----------------------------------------------------------------------------------------------------------------
# Formatting
# ----------------------------------------------------------------------------------------------------------------


def fmt_seconds(seconds: float | None) -> str:
    """Human units that keep three significant figures from microseconds to minutes."""
    if seconds is None or seconds != seconds:
        return "n/a"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds:.3g} s"


def fmt_ratio(ours: float | None, other: float | None) -> str:
    """ours / other: below 1 means ours is smaller (faster, leaner); 'n/a' when either side is missing or zero."""
    if ours is None or other is None or other != other or ours != ours or other == 0:
        return "n/a"
    ratio = ours / other
    return f"{ratio:.3g}x" if ratio >= 0.01 else f"{ratio:.1e}x"


@dataclass(frozen=True)
class Table:
    """A small table printed as aligned text or as GitHub markdown."""

    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]

    def text(self) -> str:
        widths = [max(len(str(cell)) for cell in column) for column in zip(self.headers, *self.rows, strict=True)]
        lines = [self._line(self.headers, widths), "  ".join("-" * w for w in widths)]
        lines += [self._line(row, widths) for row in self.rows]
        return "\n".join(lines)

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.headers) + " |", "|" + "|".join("---" for _ in self.headers) + "|"]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in self.rows]
        return "\n".join(lines)

    @staticmethod
    def _line(cells: Sequence[str], widths: Sequence[int]) -> str:
        return "  ".join(str(cell).ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()


def machine_summary() -> str:
    """One line naming the CPU, core count, OS and interpreter, so a pasted table says where it came from."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), model)
    except OSError:
        model = platform.processor() or model
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return (
        f"{model}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()} ({sys.executable}), {when}, load average {load}"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(url: str, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)  # polling a server that has no readiness signal of its own
    raise SystemExit(f"prefect server at {url} did not become healthy in {seconds:.0f}s")


@contextlib.contextmanager
def prefect_server(env: Mapping[str, str], port: int = 0) -> Iterator[str]:
    """A ``prefect server`` in its own process on 127.0.0.1 (a free port unless given); yields its API URL once it
    answers, and stops it afterwards. The UI's browser side is pointed at the same API."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}/api"
    prefect = str(Path(sys.executable).with_name("prefect"))
    server = subprocess.Popen(
        [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env={**env, "PREFECT_API_URL": url, "PREFECT_UI_API_URL": url},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_healthy(url)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
