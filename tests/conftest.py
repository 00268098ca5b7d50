"""Shared test setup: an isolated environment, caches cleared, and no traffic beyond loopback."""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
import tempfile
import types
from collections.abc import Iterator

import pytest

# Prefect reads its settings when first imported, by whichever test module does so first: isolate its home and
# silence analytics before any of them.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="carbonaware-prefect-home-")
os.environ["DO_NOT_TRACK"] = "1"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "90"

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import carbonaware_core
from tests.loopback import LoopbackServer, refused_host, serving

ISOLATED_PREFIXES = ("CARBONAWARE_", "AWS_", "ECS_", "GCE_", "ELECTRICITYMAPS_", "WATTTIME_", "UKGRID_")
ISOLATED_NAMES = (
    "REGION_NAME",
    "K_SERVICE",
    "FUNCTION_TARGET",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "http_proxy",
    "https_proxy",
)


# Every attempt to reach beyond this machine, as "event host", in the order made (any thread). The attempt is
# refused before a packet leaves, and the test during which it was made fails (the library under test fails
# open, so refusing alone would let the test pass).
REACHED_BEYOND_LOOPBACK: list[str] = []
_NAME_EVENTS = ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr")
_ADDRESS_EVENTS = ("socket.connect", "socket.sendto", "socket.sendmsg")


def _is_loopback_host(host: object) -> bool:
    """Loopback literals (127.0.0.0/8, ::1) and the name localhost; ``None`` or ``""`` (a local wildcard)."""
    if host is None or host in ("", b""):
        return True
    text = host.decode("ascii", "replace") if isinstance(host, bytes) else str(host)
    if text.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(text.strip("[]").split("%")[0]).is_loopback
    except ValueError:
        return False


def _loopback_only(event: str, args: tuple[object, ...]) -> None:
    """Refuse, and record for the fixture below, any connection, datagram or name lookup beyond loopback."""
    if event in _ADDRESS_EVENTS:
        address = args[1]
        if not isinstance(address, tuple) or not address:
            return  # a Unix socket path, or sendmsg on a connected socket (its connect was checked)
        host = address[0]
    elif event in _NAME_EVENTS:
        host = args[0]
    else:
        return
    if _is_loopback_host(host):
        return
    REACHED_BEYOND_LOOPBACK.append(f"{event} {host}")
    if event in _NAME_EVENTS:
        raise socket.gaierror(socket.EAI_NONAME, f"test tried to resolve {host}: only loopback is allowed")
    raise ConnectionRefusedError(f"test tried to reach {host}: only loopback is allowed")


sys.addaudithook(_loopback_only)


@pytest.fixture(autouse=True)
def loopback_only() -> Iterator[None]:
    """Fail the test (at its teardown, so threads it started count too) if anything tried to leave loopback."""
    before = len(REACHED_BEYOND_LOOPBACK)
    yield
    reached = REACHED_BEYOND_LOOPBACK[before:]
    if reached:
        pytest.fail(f"test reached beyond loopback: {'; '.join(sorted(set(reached)))}", pytrace=False)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Attempts outside any test (a session fixture starting a server, say) fail the run too."""
    if REACHED_BEYOND_LOOPBACK and exitstatus == 0:
        print(f"\nreached beyond loopback: {'; '.join(sorted(set(REACHED_BEYOND_LOOPBACK)))}", file=sys.stderr)
        session.exitstatus = 1


@pytest.fixture(scope="session", autouse=True)
def prefect_session_server_stops() -> Iterator[None]:
    """The session's Prefect test server (tests/prefect_helpers.py), if a module started one, stops last."""
    yield
    helpers = sys.modules.get("tests.prefect_helpers")
    if helpers is not None:
        helpers.stop_session_server()


@pytest.fixture(autouse=True)
def isolated_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every default endpoint points at a refused loopback port unless a test says otherwise."""
    for name in list(os.environ):
        if name.startswith(ISOLATED_PREFIXES) or name in ISOLATED_NAMES:
            monkeypatch.delenv(name, raising=False)
    nowhere = refused_host()
    monkeypatch.setenv("CARBONAWARE_METADATA_HOST", nowhere)
    monkeypatch.setenv("CARBONAWARE_SCHEDULER_BASE_URL", f"http://{nowhere}")
    monkeypatch.setenv("ELECTRICITYMAPS_API_URL", f"http://{nowhere}")
    monkeypatch.setenv("WATTTIME_API_URL", f"http://{nowhere}")
    monkeypatch.setenv("UKGRID_API_URL", f"http://{nowhere}")
    monkeypatch.setenv("CARBONAWARE_SDK_URL", f"http://{nowhere}")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    carbonaware_core.clear_cache()
    yield
    carbonaware_core.clear_cache()


def _touches_prefect(module: types.ModuleType) -> bool:
    """A test module about the Prefect layer: named so, or importing Prefect or carbonaware_prefect."""
    if "prefect" in module.__name__.rsplit(".", 1)[-1]:
        return True
    for value in vars(module).values():
        name = value.__name__ if isinstance(value, types.ModuleType) else getattr(value, "__module__", None)
        if isinstance(name, str) and "prefect" in name:
            return True
    return False


_PREFECT_MODULES: dict[str, bool] = {}


@pytest.fixture(autouse=True)
def core_waits_without_prefect_switches(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside the Prefect modules, a wait checks no Prefect Variables, as in a process that never imported
    carbonaware_prefect. Once a Prefect module has imported it and the session's Prefect test server has set
    ``PREFECT_API_URL``, every wait would read two Variables from that server each 30 s of the fake clock: a
    5-hour fake wait cost a minute of real API reads, and a core test's behaviour depended on what ran before."""
    module = request.module
    if module is None:
        return
    touches = _PREFECT_MODULES.get(module.__name__)
    if touches is None:
        touches = _PREFECT_MODULES[module.__name__] = _touches_prefect(module)
    if not touches:
        monkeypatch.setattr(carbonaware_core, "_start_now_checks", [])


@pytest.fixture(scope="module")
def shared_server() -> Iterator[LoopbackServer]:
    """One loopback server per test module: starting and stopping one per test costs more than the tests."""
    with serving() as server:
        yield server


@pytest.fixture
def server(shared_server: LoopbackServer) -> LoopbackServer:
    """The module's server with no routes and no recorded requests."""
    from tests.fake_providers import reset_server

    return reset_server(shared_server)
