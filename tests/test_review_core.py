"""Reviewer R1: the separately written parts of issue 8 under attack together (hostile servers, Ctrl-C, clocks)."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator

import pytest

import carbonaware_core as core
from tests.hostile import HostileServer, hostile, open_descriptors, settle


@pytest.fixture(params=["requests", "urllib"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("CARBONAWARE_HTTP_CLIENT", request.param)
    if request.param == "requests":
        pytest.importorskip("requests")
    return str(request.param)


@pytest.fixture
def ctrl_c_raises() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt here, whatever pytest was started with (a background job ignores it)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _ctrl_c_once_the_server_answers(server: HostileServer) -> threading.Thread:
    """A real SIGINT to the main thread once the server has read the request and begun its answer."""

    def press() -> None:
        until = time.monotonic() + 10.0
        while server.requests == 0 and time.monotonic() < until:
            time.sleep(0.01)  # polling the server's counter, bounded: it has no event to wait on
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

    presser = threading.Thread(target=press, daemon=True)
    presser.start()
    return presser


# ---- Ctrl-C while a request waits: the worker and its socket end too -----------------------------------------


def test_ctrl_c_during_a_request_leaves_no_worker_behind(backend: str, ctrl_c_raises: None) -> None:
    """A's deadline shutdown only ran when the deadline passed: a KeyboardInterrupt (D's Ctrl-C, or a Prefect
    timeout raised in the main thread) out of the caller's join left the worker reading a header drip for ever."""
    with hostile("header-drip", interval=0.05) as server:
        threads, fds = threading.active_count(), open_descriptors()
        presser = _ctrl_c_once_the_server_answers(server)
        began = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            core.http_request("GET", f"{server.url}/series", timeout=60.0)
        assert time.monotonic() - began < 15.0
        presser.join(5.0)
        after_threads, after_fds, waited = settle(threads, fds, 5.0)
    assert (after_threads, after_fds) <= (threads, fds), (threads, after_threads, fds, after_fds, waited)
