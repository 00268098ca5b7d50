"""A process's first request goes by urllib (importing requests would cost more than the request); the later ones
by requests, over one kept-alive connection. Each case runs in a fresh interpreter, since "first" is per process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.loopback import LoopbackServer, Reply, serving

REPO = Path(__file__).resolve().parent.parent

CHILD = """
import json, sys
import carbonaware_core as core
url, count = sys.argv[1], int(sys.argv[2])
imported = []
for i in range(count):
    answer = core.http_request("GET", url, timeout=5.0)
    imported.append("requests" in sys.modules)
    assert answer.status == 200 and answer.json() == {"n": i}, answer
print(json.dumps(imported))
"""


@pytest.fixture
def counted() -> Iterator[tuple[LoopbackServer, list[Any]]]:
    """A loopback server answering /n with a counter, and the TCP connections it accepted."""
    with serving() as server:
        accepted: list[Any] = []
        lock = threading.Lock()
        answered = iter(range(1000))
        accept = server.httpd.get_request

        def counting_accept() -> Any:
            connection = accept()
            accepted.append(connection[1])
            return connection

        def number(_seen: object) -> Reply:
            with lock:
                return Reply(200, {"n": next(answered)})

        server.httpd.get_request = counting_accept  # type: ignore[method-assign]
        server.route("GET", "/n", number)
        yield server, accepted


def run_child(url: str, count: int, client: str | None) -> list[bool]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARBONAWARE_")}
    env["PYTHONPATH"] = str(REPO)
    if client:
        env["CARBONAWARE_HTTP_CLIENT"] = client
    done = subprocess.run(
        [sys.executable, "-c", CHILD, url, str(count)], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result: list[bool] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def agents(server: LoopbackServer) -> list[str]:
    return [seen.headers.get("user-agent", "").split("/")[0].lower() for seen in server.requests_to("/n")]


def test_first_request_by_urllib_then_requests_over_one_connection(counted) -> None:
    server, accepted = counted
    imported = run_child(f"{server.url}/n", 4, client=None)
    assert imported == [False, True, True, True]  # requests is imported from the second request on only
    assert agents(server) == ["python-urllib", "python-requests", "python-requests", "python-requests"]
    assert len(accepted) == 2  # urllib's connection, then one that requests keeps alive for the other three


def test_asking_for_requests_uses_it_from_the_first_request(counted) -> None:
    server, accepted = counted
    assert run_child(f"{server.url}/n", 3, client="requests") == [True, True, True]
    assert agents(server) == ["python-requests"] * 3
    assert len(accepted) == 1


def test_asking_for_urllib_never_imports_requests(counted) -> None:
    server, accepted = counted
    assert run_child(f"{server.url}/n", 3, client="urllib") == [False, False, False]
    assert agents(server) == ["python-urllib"] * 3
    assert len(accepted) == 3  # urllib opens one connection per request
