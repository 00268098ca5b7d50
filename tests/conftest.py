"""Shared test setup: an isolated environment, caches cleared, and no traffic beyond loopback."""

from __future__ import annotations

import ipaddress
import os
import sys
import tempfile
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


def _loopback_only(event: str, args: tuple[object, ...]) -> None:
    """Fail any test that would open a connection beyond this machine."""
    if event != "socket.connect":
        return
    address = args[1]
    if isinstance(address, tuple) and address:
        host = str(address[0])
        try:
            if ipaddress.ip_address(host).is_loopback:
                return
        except ValueError:
            if host == "localhost":
                return
        raise ConnectionRefusedError(f"test tried to reach {host}: only loopback is allowed")


sys.addaudithook(_loopback_only)


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
