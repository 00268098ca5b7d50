"""http_request and expect_json over both backends, against real servers on 127.0.0.1."""

from __future__ import annotations

import base64
import gzip
import logging
import time
import tracemalloc
from collections.abc import Iterator

import pytest

import carbonaware_core as core
from carbonaware_core import SourceError, expect_json, http_request
from tests.loopback import LoopbackServer, Reply, black_hole, refused_host, serving

TIMEOUT = 0.5
SLACK = 0.4
USER_AGENTS = {"requests": "python-requests/", "urllib": "Python-urllib/"}


@pytest.fixture(params=["requests", "urllib"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("CARBONAWARE_HTTP_CLIENT", request.param)
    return str(request.param)


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    with serving(poll_interval=0.02) as running:
        yield running


def timed(method: str, url: str, **kwargs: object) -> tuple[core.HttpResponse | SourceError, float]:
    began = time.monotonic()
    try:
        result: core.HttpResponse | SourceError = http_request(method, url, **kwargs)  # type: ignore[arg-type]
    except SourceError as error:
        result = error
    return result, time.monotonic() - began


def pieces(size: int, count: int) -> Iterator[bytes]:
    piece = b"x" * size
    for _ in range(count):
        yield piece


# --------------------------------------------------------------------------------------------------------------
# Plain answers
# --------------------------------------------------------------------------------------------------------------


def test_backend_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CARBONAWARE_HTTP_CLIENT", raising=False)
    assert core._http_backend() == "requests"  # importable in this venv
    monkeypatch.setenv("CARBONAWARE_HTTP_CLIENT", "URLLIB ")
    assert core._http_backend() == "urllib"


def test_json_answer(backend: str, server: LoopbackServer) -> None:
    server.route("POST", "/echo", lambda seen: Reply(201, {"got": seen.json()}, {"X-Request-Id": "abc"}))
    response = http_request(
        "POST", f"{server.url}/echo", headers={"Content-Type": "application/json"}, body=b'{"a": 1}', timeout=2.0
    )
    assert response.status == 201
    assert response.headers["x-request-id"] == "abc"  # names lower-cased
    assert response.json() == {"got": {"a": 1}}
    [seen] = server.seen
    assert seen.headers["user-agent"].startswith(USER_AGENTS[backend])
    assert seen.body == b'{"a": 1}'


@pytest.mark.parametrize("status", [400, 401, 404, 422, 500, 503])
def test_error_statuses_are_answers_not_exceptions(backend: str, server: LoopbackServer, status: int) -> None:
    server.route("GET", "/x", Reply(status, {"error": f"status {status}"}))
    response = http_request("GET", f"{server.url}/x", timeout=2.0)
    assert response.status == status
    assert response.json() == {"error": f"status {status}"}


@pytest.mark.parametrize(("status", "method"), [(301, "GET"), (302, "GET"), (307, "POST"), (308, "POST")])
def test_redirects_are_not_followed(backend: str, server: LoopbackServer, status: int, method: str) -> None:
    server.route(method, "/old", Reply(status, "", {"Location": "/new"}))
    server.route(method, "/new", Reply(200, {"followed": True}))
    response = http_request(method, f"{server.url}/old", body=b"{}" if method == "POST" else None, timeout=2.0)
    assert response.status == status
    assert response.headers["location"] == "/new"
    assert server.requests_to("/new") == []
    with pytest.raises(SourceError, match=rf"redirect \(HTTP {status} to /new\)"):
        expect_json(response, "thing")


# --------------------------------------------------------------------------------------------------------------
# Size cap
# --------------------------------------------------------------------------------------------------------------


def test_declared_length_over_the_cap_is_refused_before_reading(backend: str, server: LoopbackServer) -> None:
    sent = {"pieces": 0}

    def body() -> Iterator[bytes]:
        for piece in pieces(2**20, 50):
            sent["pieces"] += 1
            yield piece

    server.route("GET", "/big", Reply(200, stream=body, length=50 * 2**20))
    result, elapsed = timed("GET", f"{server.url}/big", timeout=5.0)
    assert isinstance(result, SourceError)
    assert "larger than 4 MB" in str(result) and str(50 * 2**20) in str(result)
    assert elapsed < 1.0
    assert sent["pieces"] < 50


def test_streamed_body_without_length_is_cut_at_the_cap(backend: str, server: LoopbackServer) -> None:
    server.route("GET", "/big", Reply(200, stream=lambda: pieces(65536, 200)))  # 12.5 MB, chunked
    tracemalloc.start()
    try:
        result, elapsed = timed("GET", f"{server.url}/big", timeout=5.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(result, SourceError)
    assert "larger than 4 MB" in str(result)
    assert elapsed < 2.0
    assert peak < 3 * core.MAX_BODY_BYTES


@pytest.mark.parametrize("chunked", [True, False])
def test_cap_boundary_is_exact(backend: str, server: LoopbackServer, chunked: bool) -> None:
    cap = 100_000
    for size, allowed in ((cap, True), (cap + 1, False)):
        body = b"y" * size
        if chunked:
            server.route("GET", "/b", Reply(200, stream=lambda b=body: [b[:30_000], b[30_000:]]))
        else:
            server.route("GET", "/b", Reply(200, body))
        result, _ = timed("GET", f"{server.url}/b", timeout=2.0, max_bytes=cap)
        if allowed:
            assert isinstance(result, core.HttpResponse) and result.body == body
        else:
            assert isinstance(result, SourceError) and "larger than" in str(result)


def test_compressed_body_is_capped_on_its_decoded_size(backend: str, server: LoopbackServer) -> None:
    bomb = gzip.compress(b"\0" * (64 * 2**20), compresslevel=9)  # 64 MB of zeros in ~64 KB
    server.route("GET", "/bomb", Reply(200, bomb, {"Content-Encoding": "gzip"}))
    tracemalloc.start()
    try:
        result, elapsed = timed("GET", f"{server.url}/bomb", timeout=5.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    if backend == "requests":  # requests asks for gzip and decodes it: the cap must apply to what it decodes
        assert isinstance(result, SourceError) and "larger than" in str(result)
    else:  # urllib never asks for compression and hands the bytes over as they came
        assert isinstance(result, core.HttpResponse) and result.body == bomb
    assert elapsed < 3.0
    assert peak < 32 * 2**20


# --------------------------------------------------------------------------------------------------------------
# Time budget
# --------------------------------------------------------------------------------------------------------------


def test_total_deadline_on_a_trickled_body(backend: str, server: LoopbackServer) -> None:
    server.route("GET", "/slow", Reply(200, b"z" * 4000, chunks=40, pause=0.05))  # 2 s in all, 50 ms per piece
    result, elapsed = timed("GET", f"{server.url}/slow", timeout=TIMEOUT)
    assert isinstance(result, SourceError)
    assert "timeout" in str(result)
    assert elapsed <= TIMEOUT + SLACK


def test_total_deadline_on_a_trickled_chunked_body(backend: str, server: LoopbackServer) -> None:
    server.route("GET", "/slow", Reply(200, stream=lambda: pieces(100, 40), pause=0.05))
    result, elapsed = timed("GET", f"{server.url}/slow", timeout=TIMEOUT)
    assert isinstance(result, SourceError) and "timeout" in str(result)
    assert elapsed <= TIMEOUT + SLACK


def test_a_body_trickled_within_the_budget_is_read_whole(backend: str, server: LoopbackServer) -> None:
    server.route("GET", "/slow", Reply(200, b"0123456789" * 10, chunks=5, pause=0.02))
    response = http_request("GET", f"{server.url}/slow", timeout=2.0)
    assert response.body == b"0123456789" * 10


def test_late_status_line(backend: str, server: LoopbackServer) -> None:
    server.route("GET", "/late", Reply(200, {"ok": True}, delay=1.5))
    result, elapsed = timed("GET", f"{server.url}/late", timeout=TIMEOUT)
    assert isinstance(result, SourceError) and "timeout" in str(result)
    assert elapsed <= TIMEOUT + SLACK


def test_black_hole(backend: str) -> None:
    with black_hole() as host:
        result, elapsed = timed("GET", f"http://{host}/x", timeout=TIMEOUT)
    assert isinstance(result, SourceError)
    assert str(result) == f"no answer within {TIMEOUT:g}s (timeout)"
    assert TIMEOUT * 0.8 <= elapsed <= TIMEOUT + SLACK


def test_refused(backend: str) -> None:
    result, elapsed = timed("GET", f"http://{refused_host()}/x", timeout=TIMEOUT)
    assert isinstance(result, SourceError)
    assert str(result) == "connection refused"
    assert elapsed < TIMEOUT


def test_connection_closed_before_the_declared_length_is_an_error(backend: str, server: LoopbackServer) -> None:
    """A cut body must not pass for a whole one: a CSV or JSON cut at a line end still parses."""
    body = "start,value\n2025-06-01T12:00:00Z,100\n2025-06-01T13:00:00Z,90\n"
    server.route("GET", "/cut", Reply(200, body, {"Content-Type": "text/csv"}, truncate=True))
    result, elapsed = timed("GET", f"{server.url}/cut", timeout=2.0)
    assert isinstance(result, SourceError), f"a truncated body was accepted: {result!r}"
    assert elapsed < 2.0


# --------------------------------------------------------------------------------------------------------------
# expect_json messages
# --------------------------------------------------------------------------------------------------------------


def response(status: int, body: bytes = b"", **headers: str) -> core.HttpResponse:
    return core.HttpResponse(status, {k.replace("_", "-").lower(): v for k, v in headers.items()}, body)


def test_expect_json_ok() -> None:
    assert expect_json(response(200, b'{"a": [1, 2]}'), "x") == {"a": [1, 2]}


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (response(429, b"{}", retry_after="7"), r"^forecast rate-limited \(HTTP 429, retry after 7s\)$"),
        (response(429, b"{}"), r"^forecast rate-limited \(HTTP 429\)$"),
        (
            response(302, b"", location="https://login.example.com/sso"),
            r"^forecast answered a redirect \(HTTP 302 to https://login\.example\.com/sso\); check the URL$",
        ),
        (response(500, b"Internal Server Error"), r"^forecast answered HTTP 500 \('Internal Server Error'\)$"),
        (response(404, b'{"detail":"Not Found"}'), r"^forecast answered HTTP 404 \('\{\"detail\":\"Not Found\"\}'\)$"),
        (response(503, b"x" * 500), r"^forecast answered HTTP 503 \('x{80}\.\.\.'\)$"),
        (response(401, b"line one\nline two"), r"^forecast answered HTTP 401 \('line one line two'\)$"),
        (response(200, b"<html>oops</html>"), r"^response is not JSON \('<html>oops</html>'\)$"),
        (response(200, b"\xff\xfe{}"), r"^response is not JSON"),
        (response(200, b""), r"^response is not JSON"),
        (response(200, b'{"a": 1'), r"^response is not JSON"),
    ],
)
def test_expect_json_messages(answer: core.HttpResponse, message: str) -> None:
    with pytest.raises(SourceError, match=message):
        expect_json(answer, "forecast")


def test_retry_after_is_carried_on_the_error() -> None:
    with pytest.raises(SourceError) as caught:
        expect_json(response(429, b"{}", retry_after="30"), "x")
    assert caught.value.retry_after == 30.0
    with pytest.raises(SourceError) as caught:
        expect_json(response(429, b"{}", retry_after="soon"), "x")
    assert caught.value.retry_after is None


# --------------------------------------------------------------------------------------------------------------
# Secrets stay out of errors and logs
# --------------------------------------------------------------------------------------------------------------

SECRET = "SECRET123"
BASIC = base64.b64encode(b"alice:hunter2-SECRET").decode()


def secret_headers() -> dict[str, str]:
    return {"auth-token": SECRET, "Authorization": f"Basic {BASIC}"}


def assert_no_secret(text: str) -> None:
    for secret in (SECRET, BASIC, "hunter2"):
        assert secret not in text


def all_logs(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records)


def test_secret_not_in_errors_or_logs_on_401(
    backend: str, server: LoopbackServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server.route("GET", "/v3/carbon-intensity/forecast", Reply(401, {"error": "Invalid auth-token"}))
    answer = http_request(
        "GET", f"{server.url}/v3/carbon-intensity/forecast?zone=DE", headers=secret_headers(), timeout=2.0
    )
    assert server.seen[0].headers["auth-token"] == SECRET  # it was really sent
    with pytest.raises(SourceError) as caught:
        expect_json(answer, "electricitymaps")
    assert "HTTP 401" in str(caught.value)
    assert_no_secret(str(caught.value))
    assert_no_secret(repr(caught.value))
    assert_no_secret(all_logs(caplog))


@pytest.mark.parametrize("where", ["refused", "black-hole", "trickle", "too-big", "cut"])
def test_secret_not_in_transport_errors(
    backend: str, server: LoopbackServer, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    caplog.set_level(logging.DEBUG)
    replies = {
        "trickle": Reply(200, b"z" * 4000, chunks=40, pause=0.05),
        "too-big": Reply(200, stream=lambda: pieces(2**20, 8)),
        "cut": Reply(200, b'{"forecast": [', truncate=True),
    }
    with black_hole() as hole:
        host = {"refused": refused_host(), "black-hole": hole}.get(where, server.host)
        if where in replies:
            server.route("GET", "/f", replies[where])
        try:
            answer = http_request("GET", f"http://{host}/f", headers=secret_headers(), timeout=TIMEOUT)
            expect_json(answer, "source")
        except SourceError as error:
            assert_no_secret(str(error))
            assert_no_secret(repr(error))
            assert error.__cause__ is None or SECRET not in str(error.__cause__)
        else:
            pytest.fail("no error")
    assert_no_secret(all_logs(caplog))


def test_secret_echoed_by_the_server_is_not_repeated_in_the_error(backend: str, server: LoopbackServer) -> None:
    """Some APIs quote the credential back ("invalid token 'abc'"); the error is logged, so it must not carry it."""
    server.route("GET", "/f", lambda seen: Reply(401, {"error": f"invalid auth-token '{seen.headers['auth-token']}'"}))
    answer = http_request("GET", f"{server.url}/f", headers=secret_headers(), timeout=2.0)
    with pytest.raises(SourceError) as caught:
        expect_json(answer, "electricitymaps")
    assert "HTTP 401" in str(caught.value)
    assert_no_secret(str(caught.value))
