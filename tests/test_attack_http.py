"""The HTTP layer under attack: workers end at their deadline, loopback means loopback, no secret in any output,
local files are described not quoted, fork safety. Real servers on 127.0.0.1 only (tests/hostile.py)."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import quote, quote_plus

import pytest

import carbonaware_core as core
from carbonaware_core import SourceError, expect_json, http_request, plan_delay
from tests.fake_providers import FakeElectricityMaps, FakeWattTime, install
from tests.hostile import hostile, hostile_process, open_descriptors, settle
from tests.loopback import LoopbackServer, Reply, Seen, serving

HOSTILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hostile.py")
W, D = timedelta(hours=6), timedelta(minutes=30)


@pytest.fixture(params=["requests", "urllib"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("CARBONAWARE_HTTP_CLIENT", request.param)
    return str(request.param)


def run_calls(url: str, backend: str, count: int, timeout: float, nofile: int | None = None) -> dict[str, Any]:
    """The load in a process of its own, so the threads and descriptors counted are the client's alone."""
    args = [sys.executable, HOSTILE, "calls", url, backend, str(count), str(timeout)]
    done = subprocess.run([*args, *([str(nofile)] if nofile else [])], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# --------------------------------------------------------------------------------------------------------------
# 1. Abandoned request workers end
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["header-drip", "continue-flood"])
def test_workers_and_sockets_end_at_the_deadline(backend: str, mode: str) -> None:
    """A byte every 50 ms keeps each receive alive (its timeout is 0.3 s): only closing the socket at the
    deadline ends the worker. 400 calls must leave no thread and no descriptor behind."""
    with hostile_process(mode, interval=0.05) as url:
        result = run_calls(url, backend, 400, 0.3)
    assert set(result["errors"]) == {"no answer within 0.3s (timeout)"}, result["errors"]
    assert result["after_threads"] <= result["threads"], result
    assert result["after_fds"] <= result["fds"], result
    assert result["settled_in"] < 2.0, result
    assert result["max_overrun"] < 1.0, result


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1, made with the openssl command."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = str(folder / "cert.pem"), str(folder / "key.pem")
    command = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert]
    command += ["-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
    try:
        subprocess.run(command, check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"no openssl to make a certificate: {error}")
    return cert, key


@pytest.mark.parametrize("mode", ["header-drip", "continue-flood"])
def test_workers_end_at_the_deadline_over_tls(
    backend: str, mode: str, certificate: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same after a completed TLS handshake (the socket the deadline shuts down is then an SSLSocket)."""
    monkeypatch.setenv("SSL_CERT_FILE", certificate[0])  # urllib's default context
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", certificate[0])
    with hostile_process(mode, interval=0.05, tls=certificate) as url:
        result = run_calls(url, backend, 60, 0.5)
    assert set(result["errors"]) == {"no answer within 0.5s (timeout)"}, result["errors"]
    assert result["after_threads"] <= result["threads"], result
    assert result["after_fds"] <= result["fds"], result
    assert result["max_overrun"] < 1.0, result


def test_a_low_descriptor_limit_survives_a_header_drip(backend: str) -> None:
    """With 64 descriptors, leaked sockets made the user's own open() fail with EMFILE."""
    with hostile_process("header-drip", interval=0.05) as url:
        result = run_calls(url, backend, 300, 0.2, nofile=64)
    assert result["open_works"], result
    assert set(result["errors"]) == {"no answer within 0.2s (timeout)"}, result["errors"]
    assert result["after_fds"] <= result["fds"], result


def test_detection_probes_end_at_their_deadline() -> None:
    with hostile("header-drip", interval=0.02) as server:
        env = {"CARBONAWARE_METADATA_HOST": server.url.removeprefix("http://")}
        threads, fds = threading.active_count(), open_descriptors()
        began = time.monotonic()
        with pytest.raises(SourceError, match="no metadata service answered"):
            core._probe_metadata(env, 0.25)
        elapsed = time.monotonic() - began
        after_threads, after_fds, waited = settle(threads, fds, 3.0)
    assert elapsed < 0.25 + 0.5
    assert (after_threads, after_fds) <= (threads, fds) and waited < 2.0, (threads, after_threads, fds, after_fds)


# --------------------------------------------------------------------------------------------------------------
# 2. Loopback means loopback
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "loopback"),
    [
        ("http://127.0.0.1:8080/x", True),
        ("http://127.255.3.4/", True),
        ("http://[::1]:9000/", True),
        ("http://[::ffff:127.0.0.1]/", True),
        ("http://LOCALHOST:80/", True),
        ("http://127.evil.example/", False),
        ("http://127.0.0.1.evil.example/", False),
        ("http://localhost.evil.example/", False),
        ("http://localhost./", False),
        ("http://127.1/", False),
        ("http://evil.example/?h=127.0.0.1", False),
        ("http://127.0.0.1@evil.example/", False),
        ("http://10.0.0.1/", False),
        ("http://[::2]/", False),
        ("http://[bad/", False),
    ],
)
def test_loopback_is_decided_from_the_parsed_address(url: str, loopback: bool) -> None:
    assert core._is_loopback(url) is loopback


_LOOKUPS: list[str] = []


def _record_lookups(event: str, args: tuple[object, ...]) -> None:
    if event == "socket.getaddrinfo" and args:
        _LOOKUPS.append(str(args[0]))


sys.addaudithook(_record_lookups)


def test_credentials_never_go_over_http_to_a_name_that_only_looks_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ELECTRICITYMAPS_API_URL", "http://127.evil.example")
    monkeypatch.setenv("ELECTRICITYMAPS_API_KEY", "EM-SECRET-evil-1")
    _LOOKUPS.clear()
    plan = plan_delay(W, D, "aws", "eu-central-1", source="electricitymaps")
    assert plan.reason == "source-failed"
    assert "refusing to send credentials over plain HTTP" in plan.detail
    assert not [host for host in _LOOKUPS if "evil" in host], _LOOKUPS  # refused before any DNS lookup


def test_loopback_requests_ignore_proxies(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with serving() as proxy, serving() as target:
        proxy.route("GET", "/x", Reply(502, "via proxy"))
        target.route("GET", "/x", Reply(200, {"direct": True}))
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY"):
            monkeypatch.setenv(name, proxy.url)
        answer = http_request("GET", f"{target.url}/x", timeout=2.0)
        assert (answer.status, proxy.seen) == (200, [])


# --------------------------------------------------------------------------------------------------------------
# 3. No secret in any output
# --------------------------------------------------------------------------------------------------------------

KEY = 'EM-Key/Se+cr=et&"q\\9'  # characters that quoting, JSON and percent-encoding all change


def lower_hex(text: str) -> str:
    return re.sub(r"%[0-9A-F]{2}", lambda m: m.group().lower(), text)


def forms(secret: str) -> set[str]:
    found = {secret, repr(secret)[1:-1], json.dumps(secret)[1:-1], quote(secret, safe=""), quote_plus(secret)}
    found |= {quote(secret), json.dumps(secret)[1:-1].replace("/", "\\/")}
    return found | {lower_hex(f) for f in found}


def assert_nowhere(secrets: list[str], plan: core.Plan, caplog: pytest.LogCaptureFixture) -> None:
    texts = [plan.detail, json.dumps(plan.to_dict()), *plan.fallbacks]
    texts += [f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records]
    for secret in secrets:
        for form in forms(secret):
            for text in texts:
                assert form not in text, (form, text)


def echoes(key: str) -> dict[str, Reply]:
    enc = quote(key, safe="")
    return {
        "redirect": Reply(
            302, "", {"Location": f"https://elsewhere.example/login?k={enc}&k2={lower_hex(enc)}&raw={key}"}
        ),
        "json-value": Reply(200, {"forecast": [{"datetime": key, "carbonIntensity": 1}]}),
        "json-number": Reply(200, {"forecast": [{"datetime": "2025-06-01T12:00:00Z", "carbonIntensity": key}]}),
        "no-field": Reply(200, {"error": key, "encoded": enc, "plus": quote_plus(key)}),
        "not-json": Reply(200, f"oops {key} {enc}", {"Content-Type": "text/plain"}),
        "500": Reply(500, {"detail": f"bad key {json.dumps(key)} {lower_hex(enc)}"}),
        "401": Reply(401, {"error": f"invalid auth-token {key!r}"}),
        "429": Reply(429, {"error": key}, {"Retry-After": "1"}),
    }


@pytest.mark.parametrize("echo", list(echoes("k")))
def test_the_electricitymaps_key_is_nowhere_whatever_the_server_echoes(
    backend: str, server: LoopbackServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, echo: str
) -> None:
    caplog.set_level(logging.DEBUG)
    fake = install(FakeElectricityMaps(server, key=KEY), monkeypatch)
    fake.script(echoes(KEY)[echo])
    plan = plan_delay(W, D, "aws", "eu-central-1", source="electricitymaps")
    assert fake.calls and fake.calls[0].headers["auth-token"] == KEY  # it was really sent
    assert plan.reason == "source-failed", plan.detail
    assert_nowhere([KEY], plan, caplog)


def test_watttime_password_and_token_are_nowhere(
    backend: str, server: LoopbackServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    password = "WT-pass/wo+rd=1&x"
    fake = install(FakeWattTime(server, password=password, regions=("PJM_DC",)), monkeypatch)

    def echo(seen: Seen) -> Reply:
        token = seen.headers.get("authorization", "").removeprefix("Bearer ")
        return Reply(403, {"error": f"scope: {token} {quote(token, safe='')} {password} {quote_plus(password)}"})

    server.route("GET", "/v3/forecast", echo)
    plan = plan_delay(W, D, "aws", "us-east-1", source="watttime", grid_zone="US-MIDA-PJM")
    assert plan.reason == "source-failed" and "HTTP 403" in plan.detail, plan.detail
    assert fake.issued, "no token was issued"
    assert_nowhere([password, fake.issued[0]], plan, caplog)


def test_a_url_token_is_nowhere_even_in_urllib3_debug_lines(
    backend: str, server: LoopbackServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token = "URL-tok/en+9=z"
    enc = quote(token, safe="")
    server.route("GET", "/series", lambda seen: Reply(302, "", {"Location": f"/other{seen.path[len('/series') :]}"}))
    plan = plan_delay(W, D, "aws", "us-east-1", source=f"url:{server.url}/series?token={enc}")
    assert server.seen and enc in server.seen[0].path  # the token was really sent
    assert plan.reason == "source-failed" and "redirect" in plan.detail, plan.detail
    assert_nowhere([token, enc], plan, caplog)


def test_source_errors_redact_remembered_secrets() -> None:
    core.remember_secrets(["remembered-Se/cret"])
    message = str(SourceError(f"x {lower_hex(quote('remembered-Se/cret', safe=''))} y remembered-Se/cret"))
    assert message == "x *** y ***"


# --------------------------------------------------------------------------------------------------------------
# 5. Local files: the shape, never the content
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "shape"),
    [
        ("root:x:0:0:PRIVATE-LINE:/root:/bin/bash\ndaemon:x:1:1:PRIVATE-TWO:/usr/sbin\n", "a CSV with 1 column"),
        ("user,PRIVATE-COL,c\nPRIVATE-A,PRIVATE-B,PRIVATE-C\n", "a CSV with 3 columns and no start column"),
        ('[{"start": "PRIVATE-START", "value": 1}]', "bad point 1: start is not an ISO-8601 date-time"),
        ('[{"start": "2025-06-01T12:00:00Z", "value": "PRIVATE-VALUE"}]', "bad point 1: value is not a number"),
        ('[{"start": "2025-06-01T12:00:00Z", "end": "PRIVATE-END", "value": 1}]', "bad point 1: end is not"),
        ('[{"PRIVATE-KEY": "PRIVATE"}]', "bad point 1: no start time (expected one of start, datetime"),
        ('[{"start": "2025-06-01T12:00:00Z", "value": 1}, "PRIVATE"]', "point 2 is not"),
    ],
)
def test_a_file_source_describes_the_shape_never_the_content(
    tmp_path: Any, caplog: pytest.LogCaptureFixture, content: str, shape: str
) -> None:
    caplog.set_level(logging.DEBUG)
    path = tmp_path / "passwd"
    path.write_text(content)
    plan = plan_delay(W, D, "aws", "us-east-1", source=f"file:{path}")
    assert plan.reason == "source-failed"
    assert shape in plan.detail, plan.detail
    for text in [plan.detail, json.dumps(plan.to_dict()), *(r.getMessage() for r in caplog.records)]:
        assert "PRIVATE" not in text, text


# --------------------------------------------------------------------------------------------------------------
# 6. Fork safety
# --------------------------------------------------------------------------------------------------------------


def in_child(check: Any, limit: float = 60.0) -> int:
    """Runs ``check()`` in a forked child; its exit status (0: passed). A child still running after ``limit``
    seconds (deadlocked on a lock inherited from the parent, say) is killed: -9."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 1
        try:
            status = 0 if check() else 3
        except BaseException:
            status = 2
        finally:
            os._exit(status)
    give_up = time.monotonic() + limit
    while time.monotonic() < give_up:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)  # polling a child's exit: nothing to wait on but its pid
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return -9


def series_reply(value_at_best: float) -> Reply:
    start = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
    points = [{"start": (start + timedelta(hours=i)).isoformat(), "value": 300.0} for i in range(12)]
    points[4]["value"] = value_at_best
    return Reply(200, points)


def test_a_child_forked_during_a_fetch_fetches_afresh(backend: str, server: LoopbackServer) -> None:
    arrived, release = threading.Event(), threading.Event()
    count = {"n": 0}

    def slow_then_fast(_seen: Seen) -> Reply:
        count["n"] += 1
        if count["n"] == 1:
            arrived.set()
            release.wait(20)
        return series_reply(111.0)

    server.route("GET", "/series", slow_then_fast)
    source = f"url:{server.url}/series"
    parent = threading.Thread(target=lambda: plan_delay(W, D, source=source, timeout=10.0), daemon=True)
    parent.start()
    assert arrived.wait(10)

    def child_plans() -> bool:
        began = time.monotonic()
        plan = plan_delay(W, D, source=source, timeout=3.0)
        return plan.reason == "optimal" and plan.expected == 111.0 and time.monotonic() - began < 2.5

    try:
        assert in_child(child_plans) == 0
    finally:
        release.set()
        parent.join(10)


class ZoneServer(ThreadingHTTPServer):
    """Answers /series?zone=Z with a series whose best value is the zone's number; records each request's port."""

    daemon_threads = True

    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive

            def log_message(self, *args: Any) -> None:
                return

            def do_GET(self) -> None:
                zone = self.path.partition("zone=")[2]
                server.seen.append((zone, self.client_address[1]))
                body = json.dumps(series_reply(float(zone)).body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture
def zone_server() -> Iterator[ZoneServer]:
    running = ZoneServer()
    thread = threading.Thread(target=running.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield running
    finally:
        running.shutdown()
        running.server_close()


def test_parent_and_child_never_share_a_kept_alive_connection(
    zone_server: ZoneServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CARBONAWARE_HTTP_CLIENT", "requests")
    base = f"http://127.0.0.1:{zone_server.server_address[1]}/series?zone="
    assert plan_delay(W, D, source=f"url:{base}101").expected == 101.0  # leaves a kept-alive connection pooled
    [(_, parent_port)] = zone_server.seen

    def child_plans() -> bool:
        return all(plan_delay(W, D, source=f"url:{base}{200 + i}").expected == 200.0 + i for i in range(3))

    status = in_child(child_plans)
    assert [plan_delay(W, D, source=f"url:{base}{150 + i}").expected for i in range(3)] == [150.0, 151.0, 152.0]
    assert status == 0
    child_ports = {port for zone, port in zone_server.seen if zone.startswith("2")}
    assert parent_port not in child_ports, zone_server.seen


def test_fork_reset_keeps_finished_entries_and_drops_unfinished_ones() -> None:
    cache = core.SingleFlightCache()
    cache.get("done", lambda: 1, ttl=60)
    unfinished = core._Entry()
    cache._entries["running"] = unfinished
    cache.reset_after_fork()
    assert cache.get("done", lambda: 2, ttl=60) == 1
    assert cache.get("running", lambda: 3, ttl=60, wait=0.1) == 3


# --------------------------------------------------------------------------------------------------------------
# 18b, 18c
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("header", [{"Retry-After": "²"}, {"Retry-After": "¹²"}])
def test_non_ascii_retry_after_names_the_status(backend: str, server: LoopbackServer, header: dict[str, str]) -> None:
    server.route("GET", "/x", Reply(503, "busy", header))
    answer = http_request("GET", f"{server.url}/x", timeout=2.0)
    with pytest.raises(SourceError, match=r"HTTP 503 \('busy'\)$"):
        expect_json(answer, "thing")


def test_non_ascii_content_length_is_no_float_error() -> None:
    core._check_declared_size({"content-length": "²"}, 10)
    answer = core.HttpResponse(503, {"retry-after": "²"}, b"")
    assert answer.retry_after() is None


@pytest.mark.parametrize(("region", "hint"), [("CAISO_NORTH", False), ("PJM_DC", True)])
def test_watttime_scope_hint_only_for_other_regions(
    server: LoopbackServer, monkeypatch: pytest.MonkeyPatch, region: str, hint: bool
) -> None:
    install(FakeWattTime(server, regions=()), monkeypatch)  # every region out of scope
    monkeypatch.setenv("WATTTIME_REGION", region)
    plan = plan_delay(W, D, "aws", "us-east-1", source="watttime")
    assert "HTTP 403" in plan.detail, plan.detail
    assert ("free accounts may only read CAISO_NORTH" in plan.detail) is hint


def test_a_child_forked_while_a_file_read_hangs_reads_the_file_itself(tmp_path: Any) -> None:
    """A parent thread stuck reading a path (a hung mount) holds that path's slot; the child has no such thread."""
    forecast = tmp_path / "forecast.json"
    forecast.write_text(json.dumps(series_reply(99.0).body))
    held = threading.Event()
    release = threading.Event()

    def stuck_reader() -> None:
        with core._READING_LOCK:  # as a parent thread inside _read_within would be, at the moment of the fork
            core._READING.add(str(forecast))
            held.set()
            release.wait(20)
        core._READING.discard(str(forecast))

    thread = threading.Thread(target=stuck_reader, daemon=True)
    thread.start()
    assert held.wait(10)
    try:
        status = in_child(lambda: plan_delay(W, D, source=f"file:{forecast}", timeout=3.0).expected == 99.0, limit=20.0)
    finally:
        release.set()
        thread.join(10)
    assert status == 0
