"""``python -m carbonaware_core run -- CMD`` as a wrapper under attack: real processes, real signals.

The wrapper runs in its own session with pipes for stdin/stdout/stderr, so no terminal is involved and every
signal here comes from ``os.kill``. Its SIGINT is re-armed first (``python -c`` resets it to Python's own
handler), so these tests also hold when pytest itself was started with SIGINT ignored (``nohup``, ``&``).
Synchronisation is on lines read from the pipes (through a queue, with a bounded timeout), never on sleeps.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import IO

import pytest

import carbonaware_core as core

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX signals")

ROOT = Path(__file__).resolve().parent.parent
# python -m carbonaware_core, with SIGINT handled as Python does by default even if we inherited it ignored
CLI = [
    sys.executable,
    "-c",
    "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "runpy.run_module('carbonaware_core', run_name='__main__', alter_sys=True)",
]
TIMEOUT = 30.0  # generous: the machine is loaded; nothing here waits this long when it works

# The command the wrapper runs: prints "ready <pid>" once its signal set-up is done, then exits with the code
# read from stdin (the test decides when). Modes: default signals, SIGINT ignored, or SIGKILL itself.
CHILD = r"""
import os, signal, sys
mode = sys.argv[1]
if mode == "ignore-int":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
if mode == "sigkill":
    os.kill(os.getpid(), signal.SIGKILL)
print("ready", os.getpid(), flush=True)
sys.exit(int(sys.stdin.readline() or 0))
"""


class Wrapper:
    """A running ``carbonaware_core run``: its lines on stdout and stderr arrive in queues as they are written."""

    def __init__(self, *args: str, cli: tuple[str, ...] = tuple(CLI), own_session: bool = True) -> None:
        self.process = subprocess.Popen(
            [*cli, *args],
            cwd=ROOT,
            env=dict(os.environ),
            stdin=subprocess.PIPE if own_session else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=own_session,  # no terminal: our os.kill is the only sender
        )
        self.out: queue.Queue[str] = queue.Queue()
        self.err: queue.Queue[str] = queue.Queue()
        self.stderr_lines: list[str] = []
        assert self.process.stdout is not None and self.process.stderr is not None
        for stream, lines in ((self.process.stdout, self.out), (self.process.stderr, self.err)):
            threading.Thread(target=self._pump, args=(stream, lines), daemon=True).start()

    @staticmethod
    def _pump(stream: IO[str], lines: queue.Queue[str]) -> None:
        for line in stream:
            lines.put(line)
        lines.put("")  # end of stream

    def line_from(self, lines: queue.Queue[str], containing: str) -> str:
        """The first line holding ``containing``; fails after TIMEOUT or at end of stream."""
        while True:
            try:
                line = lines.get(timeout=TIMEOUT)
            except queue.Empty:
                pytest.fail(f"no line with {containing!r} within {TIMEOUT} s; stderr so far: {self.stderr_lines}")
            if lines is self.err:
                self.stderr_lines.append(line)
            if line == "":
                pytest.fail(f"stream ended without {containing!r}; stderr: {self.stderr_lines}")
            if containing in line:
                return line

    def child_ready(self) -> int:
        return int(self.line_from(self.out, "ready").split()[1])

    def finish(self) -> tuple[int, str]:
        """Exit status and the rest of stderr."""
        code = self.process.wait(timeout=TIMEOUT)
        rest: list[str] = []
        while (line := self.err.get(timeout=TIMEOUT)) != "":
            rest.append(line)
        return code, "".join([*self.stderr_lines, *rest])

    def tell_child_to_exit(self, code: int) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{code}\n")
        self.process.stdin.flush()

    def close(self, child: int | None = None) -> None:
        for pid in (self.process.pid, child):
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.process.wait(timeout=TIMEOUT)


@pytest.fixture
def child_script(tmp_path: Path) -> Path:
    path = tmp_path / "child.py"
    path.write_text(CHILD)
    return path


@pytest.fixture
def at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The wrapper runs the command at once: no source is asked."""
    monkeypatch.setenv("CARBONAWARE_DISABLE", "1")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.parametrize(("name", "status"), [("SIGTERM", 143), ("SIGHUP", 129)])
def test_a_termination_signal_reaches_the_command_and_the_wrapper_waits_for_it(
    at_once: None, child_script: Path, name: str, status: int
) -> None:
    wrapper = Wrapper("run", "--", sys.executable, str(child_script), "default")
    child = None
    try:
        child = wrapper.child_ready()
        os.kill(wrapper.process.pid, getattr(signal, name))
        code, stderr = wrapper.finish()
        assert code == status  # the command died of the signal passed on; the wrapper says so as a shell would
        assert f"passed {name} on to the command (pid {child})" in stderr
        assert _gone(child)  # waited for and reaped, not orphaned
        assert "Traceback" not in stderr
    finally:
        wrapper.close(child)


def test_sigint_while_the_command_ignores_it_waits_for_the_command(at_once: None, child_script: Path) -> None:
    wrapper = Wrapper("run", "--", sys.executable, str(child_script), "ignore-int")
    child = None
    try:
        child = wrapper.child_ready()
        os.kill(wrapper.process.pid, signal.SIGINT)
        wrapper.line_from(wrapper.err, f"passed SIGINT on to the command (pid {child})")
        assert wrapper.process.poll() is None  # still waiting for the command, which ignored it
        wrapper.tell_child_to_exit(5)
        code, stderr = wrapper.finish()
        assert code == 5
        assert "Traceback" not in stderr
    finally:
        wrapper.close(child)


def test_sigint_reaches_a_command_that_does_not_ignore_it(at_once: None, child_script: Path) -> None:
    wrapper = Wrapper("run", "--", sys.executable, "-c", "import sys; print('ready 0', flush=True); sys.stdin.read()")
    try:
        wrapper.child_ready()
        os.kill(wrapper.process.pid, signal.SIGINT)
        code, stderr = wrapper.finish()
        assert code == 130  # an uncaught KeyboardInterrupt ends Python by SIGINT: 128 + 2
        assert "KeyboardInterrupt" in stderr and "passed SIGINT on" in stderr
    finally:
        wrapper.close()


def test_a_command_killed_by_sigkill_gives_137(at_once: None, child_script: Path) -> None:
    done = subprocess.run(
        [*CLI, "run", "--quiet", "--", sys.executable, str(child_script), "sigkill"],
        cwd=ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 137, done.stderr  # 128 + 9, not 247 (sys.exit(-9))


def test_a_command_exiting_with_a_code_gives_that_code(at_once: None) -> None:
    done = subprocess.run(
        [*CLI, "run", "--quiet", "--", sys.executable, "-c", "import sys; sys.exit(42)"],
        cwd=ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert (done.returncode, done.stderr) == (42, "")


@pytest.mark.parametrize("kind", ["not-executable-file", "directory"])
def test_a_command_that_cannot_be_executed_gives_126(at_once: None, tmp_path: Path, kind: str) -> None:
    target = tmp_path / "script.sh"
    if kind == "directory":
        target.mkdir()
    else:
        target.write_text("#!/bin/sh\nexit 0\n")
        target.chmod(0o644)  # even root cannot execute a file without any execute bit
    done = subprocess.run(
        [*CLI, "run", "--quiet", "--", str(target)],
        cwd=ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 126
    assert f"cannot run {target}" in done.stderr and "Traceback" not in done.stderr


def test_a_missing_command_gives_127(at_once: None) -> None:
    done = subprocess.run(
        [*CLI, "run", "--quiet", "--", "no-such-command-carbonaware-xyz"],
        cwd=ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 127
    assert "cannot run no-such-command-carbonaware-xyz" in done.stderr


@pytest.fixture
def trough_in_an_hour(tmp_path: Path) -> Path:
    """A forecast for the real now whose trough starts in about an hour: the wrapper waits."""
    first = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
    rows = [
        f"{(first + timedelta(hours=i)).strftime('%Y-%m-%dT%H:%M:%SZ')},{50 if i == 2 else 300}\n" for i in range(6)
    ]
    path = tmp_path / "forecast.csv"
    path.write_text("start,value\n" + "".join(rows))
    return path


@pytest.mark.parametrize(("name", "status"), [("SIGTERM", 143), ("SIGINT", 130), ("SIGHUP", 129)])
def test_a_signal_during_the_wait_ends_the_cli_promptly_and_the_command_never_runs(
    trough_in_an_hour: Path, tmp_path: Path, name: str, status: int
) -> None:
    stamp = tmp_path / "ran"
    wrapper = Wrapper(
        "run",
        "--window",
        "3h",
        "--source",
        f"file:{trough_in_an_hour}",
        "--",
        sys.executable,
        "-c",
        f"open({str(stamp)!r}, 'w').close()",
    )
    try:
        wrapper.line_from(wrapper.err, "waiting")  # the decision line: it is now in its wait
        sent = time.monotonic()
        os.kill(wrapper.process.pid, getattr(signal, name))
        code, stderr = wrapper.finish()
        assert time.monotonic() - sent < 10.0  # against a wait of an hour or more; a loaded machine needs slack
        assert code == status
        assert "interrupted" in stderr and "Traceback" not in stderr
        assert not stamp.exists()
    finally:
        wrapper.close()


def test_the_wrapper_restores_the_signal_handlers_it_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process (a caller of ``main``): afterwards SIGTERM/SIGINT/SIGHUP do what they did before."""
    monkeypatch.setenv("CARBONAWARE_DISABLE", "1")
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    code = core.main(["run", "--quiet", "--", sys.executable, "-c", "import sys; sys.exit(4)"])
    assert code == 4
    assert {s: signal.getsignal(s) for s in before} == before


def test_exit_status_of_a_child_killed_by_a_signal() -> None:
    assert [core._exit_status(c) for c in (0, 3, 255, -9, -15, -2)] == [0, 3, 255, 137, 143, 130]


@pytest.fixture(autouse=True)
def _no_stray_handlers() -> Iterator[None]:
    """No test here leaves a handler behind in the pytest process."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    yield
    assert {s: signal.getsignal(s) for s in before} == before


# Ctrl-C typed at a terminal reaches the whole foreground process group: the command has it already, and the
# wrapper must not send it a second one. The wrapper is made a session leader with a pseudo-terminal as its
# controlling terminal (and stdin); the command counts the SIGINTs it gets.
ON_A_TERMINAL = (
    "import os, runpy, signal, sys; os.setsid(); fd = os.open(sys.argv.pop(1), os.O_RDWR); os.dup2(fd, 0); "
    "signal.signal(signal.SIGINT, signal.default_int_handler); "
    "runpy.run_module('carbonaware_core', run_name='__main__', alter_sys=True)"
)
COUNTING_CHILD = r"""
import os, signal, sys
got = []
signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))
print("ready", os.getpid(), flush=True)
line = sys.stdin.readline()
print("sigints", len(got), flush=True)
sys.exit(int(line))
"""


def test_ctrl_c_at_a_terminal_reaches_the_command_once(at_once: None, tmp_path: Path) -> None:
    import pty

    child_script = tmp_path / "counting.py"
    child_script.write_text(COUNTING_CHILD)
    master, slave = pty.openpty()
    terminal = os.ttyname(slave)
    os.close(slave)
    cli = (sys.executable, "-c", ON_A_TERMINAL, terminal)  # it sets up its own session with the terminal
    wrapper = Wrapper("run", "--", sys.executable, str(child_script), cli=cli, own_session=False)
    child = None
    try:
        child = wrapper.child_ready()
        os.write(master, b"\x03")  # Ctrl-C: the terminal signals the foreground group, wrapper and command
        wrapper.line_from(wrapper.err, "the command got SIGINT from the terminal")
        os.write(master, b"5\n")
        assert wrapper.line_from(wrapper.out, "sigints").split() == ["sigints", "1"]
        code, stderr = wrapper.finish()
        assert code == 5
        assert "passed SIGINT on" not in stderr and "Traceback" not in stderr
    finally:
        wrapper.close(child)
        os.close(master)
