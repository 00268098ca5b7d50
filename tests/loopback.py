"""Real HTTP servers on 127.0.0.1 for tests: routes answer exactly what a provider would send.

Nothing here mocks urllib or requests: the library under test opens real sockets to these servers.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Seen:
    """One request as the server received it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Reply:
    """What a route answers. ``chunks`` with ``pause`` trickles a body; ``truncate`` closes mid-body."""

    status: int = 200
    body: bytes | str | Any = b""
    headers: dict[str, str] = field(default_factory=dict)
    pause: float = 0.0  # seconds before each chunk
    chunks: int = 1
    delay: float = 0.0  # seconds before the status line
    truncate: bool = False
    # A body produced piece by piece (huge bodies without holding them in memory): sent with
    # "Transfer-Encoding: chunked", or raw after "Content-Length: length" when ``length`` is given.
    stream: Callable[[], Iterable[bytes]] | None = None
    length: int | None = None

    def payload(self) -> bytes:
        if isinstance(self.body, bytes):
            return self.body
        if isinstance(self.body, str):
            return self.body.encode()
        return json.dumps(self.body).encode()


Route = Callable[[Seen], Reply]


class LoopbackServer:
    """A threaded HTTP/1.1 server; ``routes[(METHOD, path-without-query)] = callable(Seen) -> Reply``."""

    def __init__(self, poll_interval: float = 0.02) -> None:
        self.routes: dict[tuple[str, str], Route] = {}
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # headers and body go out in separate writes: with Nagle on, delayed ACKs add ~40 ms per request
            disable_nagle_algorithm = True

            def log_message(self, *args: Any) -> None:
                return

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                seen = Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                with server._lock:
                    server.seen.append(seen)
                route = server.routes.get((self.command, self.path.split("?")[0]))
                reply = route(seen) if route else Reply(404, "Not Found", {"Content-Type": "text/plain"})
                self._send(reply)

            def _send(self, reply: Reply) -> None:
                if reply.delay:
                    time.sleep(reply.delay)
                if reply.stream is not None:
                    self._send_stream(reply)
                    return
                payload = reply.payload()
                self.send_response(reply.status)
                headers = {"Content-Type": "application/json", **reply.headers}
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload) + (1000 if reply.truncate else 0)))
                self.end_headers()
                step = max(1, -(-len(payload) // reply.chunks))
                try:
                    for i in range(0, max(len(payload), 1), step):
                        if reply.pause:
                            time.sleep(reply.pause)
                        self.wfile.write(payload[i : i + step])
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass
                if reply.truncate:
                    self.close_connection = True

            def _send_stream(self, reply: Reply) -> None:
                assert reply.stream is not None
                self.send_response(reply.status)
                for name, value in {"Content-Type": "application/json", **reply.headers}.items():
                    self.send_header(name, value)
                chunked = reply.length is None
                if chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                else:
                    self.send_header("Content-Length", str(reply.length))
                self.end_headers()
                try:
                    for piece in reply.stream():
                        if reply.pause:
                            time.sleep(reply.pause)
                        if chunked:
                            self.wfile.write(b"%x\r\n" % len(piece))
                        self.wfile.write(piece)
                        if chunked:
                            self.wfile.write(b"\r\n")
                        self.wfile.flush()
                    if chunked:
                        self.wfile.write(b"0\r\n\r\n")
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass
                self.close_connection = True

            do_GET = do_POST = do_PUT = _handle

        class Server(ThreadingHTTPServer):
            request_queue_size = 1024  # the listen backlog: a thousand clients may connect at once

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        # clients that give up mid-answer (timeout tests) are expected here, not errors worth a traceback
        self.httpd.handle_error = lambda _request, _address: None  # type: ignore[method-assign]
        # serve_forever notices shutdown() only every poll_interval seconds: a short one makes teardown quick
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": poll_interval}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def host(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"{host}:{port}"

    def route(self, method: str, path: str, reply: Reply | Route) -> None:
        self.routes[(method, path)] = reply if callable(reply) else (lambda _seen, r=reply: r)

    def requests_to(self, path: str) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if s.path.split("?")[0] == path]

    def start(self) -> LoopbackServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@contextmanager
def serving(poll_interval: float = 0.02) -> Iterator[LoopbackServer]:
    server = LoopbackServer(poll_interval).start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def black_hole() -> Iterator[str]:
    """A port that accepts connections (the kernel does) but never answers: a timeout, like a dropped packet."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


def refused_host() -> str:
    """A loopback port with nothing listening: connections are refused at once."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return f"127.0.0.1:{port}"


# ----------------------------------------------------------------------------------------------------------------
# A stand-in for carbonaware_core.CLOCK: time moves only when the code under test sleeps or a test advances it
# ----------------------------------------------------------------------------------------------------------------


class FakeClock:
    """Duck-types ``carbonaware_core.Clock`` (time, monotonic, now, sleep, asleep) and records every sleep.

    ``on_sleep(seconds)`` runs before each sleep is accounted, so a test can raise from inside the wait
    (KeyboardInterrupt, a cancellation) exactly as a real signal would arrive during ``time.sleep``.
    """

    def __init__(self, start: datetime | float = 1748779200.0) -> None:  # 2025-06-01T12:00:00Z
        self.t = start.timestamp() if isinstance(start, datetime) else float(start)
        self.sleeps: list[float] = []
        self.asleeps: list[float] = []
        self.on_sleep: Callable[[float], None] | None = None
        self._lock = threading.Lock()

    def time(self) -> float:
        with self._lock:
            return self.t

    def monotonic(self) -> float:
        return self.time()

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.time(), timezone.utc)

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.t += seconds

    def sleep(self, seconds: float) -> None:
        if self.on_sleep is not None:
            self.on_sleep(seconds)
        self.sleeps.append(seconds)
        self.advance(max(0.0, seconds))

    async def asleep(self, seconds: float) -> None:
        import asyncio

        if self.on_sleep is not None:
            self.on_sleep(seconds)
        self.asleeps.append(seconds)
        self.advance(max(0.0, seconds))
        await asyncio.sleep(0)  # a real await point: other tasks run, as with asyncio.sleep


# ----------------------------------------------------------------------------------------------------------------
# The hosted CarbonAware scheduler (protocols.md §1), answering the way scheduler.carbonaware.dev does
# ----------------------------------------------------------------------------------------------------------------

SCHEDULER_PROVIDERS = ("aws", "gcp", "azure", "ovh")


def _names(text: str) -> tuple[str, ...]:
    return tuple(text.split())


# The scheduler's region enums (carbon-aware/scheduler scheduler/src/regions/{aws,azure}.py @cb0d9b9, gcp.py
# @6c66ba1, ovh.py @2683546): a CloudZone's region must be a member of its provider's enum.
SCHEDULER_ENUMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "aws": (
        "AwsRegion",
        _names(
            "af-south-1 ap-east-1 ap-northeast-1 ap-northeast-2 ap-northeast-3 ap-south-1 ap-south-2 ap-southeast-2 "
            "ap-southeast-3 ap-southeast-4 ap-southeast-5 ap-southeast-7 ca-central-1 ca-west-1 eu-central-1 "
            "eu-central-2 eu-north-1 eu-south-1 eu-south-2 eu-west-1 eu-west-2 eu-west-3 il-central-1 me-central-1 "
            "mx-central-1 sa-east-1 us-east-1 us-east-2 us-west-1 us-west-2"
        ),
    ),
    "gcp": (
        "GcpRegion",
        _names(
            "asia-east1 asia-northeast1 asia-southeast1 europe-north1 europe-west1 europe-west3 europe-west4 "
            "northamerica-northeast2 southamerica-west1 us-central1 us-east1 us-east4 us-west1 us-west2"
        ),
    ),
    "azure": (
        "AzureRegion",
        _names(
            "australiacentral australiaeast australiasoutheast brazilsouth canadacentral canadaeast centralindia "
            "centralus chinaeast2 chinanorth chinanorth2 chinanorth3 eastasia eastus eastus2 francecentral "
            "germanywestcentral indonesiacentral israelcentral italynorth japaneast japanwest koreacentral "
            "mexicocentral newzealandnorth northcentralus northeurope norwayeast polandcentral southafricanorth "
            "southcentralus southindia spaincentral swedencentral switzerlandnorth uaenorth uksouth ukwest "
            "westcentralus westeurope westus westus2 westus3"
        ),
    ),
    "ovh": (
        "OvhRegion",
        _names(
            "ca-beauharnois ca-toronto de-frankfurt fr-gravelines fr-paris fr-roubaix fr-strasbourg gb-london "
            "in-mumbai pl-warsaw sg-singapore us-hillsboro us-vint_hill"
        ),
    ),
}
_ISO_DURATION_TEXT = re.compile(r"^P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?)?$")


def fastapi_422(loc: list[Any], msg: str, kind: str = "value_error") -> Reply:
    """FastAPI's validation error body."""
    return Reply(422, {"detail": [{"type": kind, "loc": loc, "msg": msg, "input": None}]})


def region_enum_422(region: str, enums: dict[str, tuple[str, tuple[str, ...]]]) -> Reply:
    """Pydantic's answer to a region outside ``AwsRegion | GcpRegion | AzureRegion | OvhRegion``: one error per
    member of the union, the first naming ``enum[AwsRegion]`` whatever the provider asked for."""

    def listing(names: tuple[str, ...]) -> str:
        quoted = [f"'{name}'" for name in names]
        return ", ".join(quoted[:-1]) + f" or {quoted[-1]}" if len(quoted) > 1 else "".join(quoted)

    detail = [
        {
            "type": "enum",
            "loc": ["body", "zones", 0, "region", f"enum[{enum}]"],
            "msg": f"Input should be {listing(names)}",
            "input": region,
            "ctx": {"expected": listing(names)},
        }
        for enum, names in enums.values()
    ]
    return Reply(422, {"detail": detail})


def _utc_text(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class HostedScheduler:
    """Routes for ``POST /v0/schedule/`` (307 without the trailing slash), ``GET /health`` and ``GET /v0/regions/``.

    The request is validated as the real server does (422 with a FastAPI ``detail`` list; ``start`` must be no
    earlier than five minutes before the server's clock and before ``end``; a region outside the provider's enum
    gets the union's 422 naming ``enum[AwsRegion]``; a duration under five minutes gets a plain-text 500, as the
    real server's rollup fails on it). Intensities are WattTime MOER in lbs/MWh. ``clock`` is the server's clock.

    Without ``moer`` the ideal start is ``ideal_after`` past the window start with fixed figures. With ``moer``
    (lbs/MWh at each 5-minute point) the answer is computed as scheduler/src/modeling/schedule.py does: points
    every 5 minutes from the server's now for ``horizon`` (WattTime's ~24 h), kept where start <= point <= end +
    duration, a rolling mean over floor(duration / 5 min) points dated at its first point, sorted by intensity:
    ideal the lowest, ``options`` the first ``num_options``, naive the earliest start -- so the ideal can lie 5 minutes
    past the window's end (up to 10 for a job that is not whole 5-minute steps).
    """

    def __init__(
        self,
        server: LoopbackServer,
        *,
        ideal_after: timedelta = timedelta(hours=1),
        ideal_lbs: float = 500.0,
        naive_lbs: float = 800.0,
        clock: Callable[[], float] = time.time,
        latency: float = 0.0,
        moer: Callable[[datetime], float] | None = None,
        horizon: timedelta = timedelta(hours=24),
        enums: dict[str, tuple[str, tuple[str, ...]]] | None = None,
    ) -> None:
        self.server = server
        self.ideal_after = ideal_after
        self.ideal_lbs = ideal_lbs
        self.naive_lbs = naive_lbs
        self.clock = clock
        self.latency = latency
        self.moer = moer
        self.horizon = horizon
        self.enums = SCHEDULER_ENUMS if enums is None else enums
        server.route("POST", "/v0/schedule/", self.schedule)
        server.route("POST", "/v0/schedule", Reply(307, b"", {"Location": "/v0/schedule/"}))
        server.route("GET", "/health", Reply(200, {"status": "ok"}))
        listed = [{"provider": p, "region": r} for p, (_enum, names) in self.enums.items() for r in names]
        server.route("GET", "/v0/regions/", Reply(200, {"regions": listed}))

    @property
    def base_url(self) -> str:
        return self.server.url

    @property
    def calls(self) -> list[Seen]:
        return self.server.requests_to("/v0/schedule/")

    def schedule(self, seen: Seen) -> Reply:
        try:
            document = seen.json()
        except ValueError:
            return fastapi_422(["body", 0], "JSON decode error", "json_invalid")
        if not isinstance(document, dict):
            return fastapi_422(["body"], "Input should be a valid dictionary", "model_attributes_type")
        match = _ISO_DURATION_TEXT.match(str(document.get("duration", "")))
        if not match or not any(match.groups()):
            return fastapi_422(["body", "duration"], "Input should be a valid duration", "duration_parsing")
        days, hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
        duration = timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
        windows, zones = document.get("windows"), document.get("zones")
        if not isinstance(windows, list) or not windows:
            return fastapi_422(["body", "windows"], "List should have at least 1 item after validation")
        try:
            start = datetime.fromisoformat(windows[0]["start"].replace("Z", "+00:00"))
            end = datetime.fromisoformat(windows[0]["end"].replace("Z", "+00:00"))
        except (KeyError, TypeError, ValueError, AttributeError):
            return fastapi_422(["body", "windows", 0], "Input should be a valid datetime", "datetime_parsing")
        if start.tzinfo is None or end.tzinfo is None:
            return fastapi_422(["body", "windows", 0], "Input should have timezone info", "timezone_aware")
        if start.timestamp() < self.clock() - 300:
            return fastapi_422(["body", "windows", 0], "Value error, start time must not be in the past")
        if not start < end:
            return fastapi_422(["body", "windows", 0], "Value error, start must be before end")
        if not isinstance(zones, list) or len(zones) != 1 or not isinstance(zones[0], dict):
            return fastapi_422(["body", "zones"], "List should have at least 1 item after validation")
        zone = zones[0]
        if zone.get("provider") not in SCHEDULER_PROVIDERS:
            return fastapi_422(["body", "zones", 0, "provider"], "Input should be 'aws', 'gcp', 'azure' or 'ovh'")
        if not isinstance(zone.get("region"), str):
            return fastapi_422(["body", "zones", 0, "region"], "Input should be a valid string", "string_type")
        if not any(zone["region"] in names for _enum, names in self.enums.values()):
            return region_enum_422(zone["region"], self.enums)
        if zone["region"] not in self.enums.get(zone["provider"], ("", ()))[1]:
            message = f"Value error, Invalid region '{zone['region']}' for provider '{zone['provider']}'"
            return fastapi_422(["body", "zones", 0], message)
        if not isinstance(document.get("num_options", 3), int):  # optional: the server defaults it to 3
            return fastapi_422(["body", "num_options"], "Input should be a valid integer", "int_type")
        if duration < timedelta(minutes=5):  # its rollup yields no c02_moer column: an unhandled KeyError
            return Reply(500, "Internal Server Error", {"Content-Type": "text/plain; charset=utf-8"})
        if duration > self.horizon:  # no start has a whole job of forecast: "No valid forecast data", unhandled
            return Reply(500, "Internal Server Error", {"Content-Type": "text/plain; charset=utf-8"})
        if self.moer is not None:
            return self._replayed(start, end, duration, zone, int(document.get("num_options", 3)))
        ideal = start + self.ideal_after

        def case(moment: datetime, lbs: float) -> dict[str, Any]:
            return {"time": _utc_text(moment), "zone": zone, "co2_intensity": lbs}

        worst = max(self.naive_lbs, self.ideal_lbs) * 1.2
        body = {
            "ideal": case(ideal, self.ideal_lbs),
            "options": [case(ideal, self.ideal_lbs), case(ideal + timedelta(minutes=5), self.ideal_lbs * 1.01)],
            "worst_case": case(start + timedelta(minutes=5), worst),
            "naive_case": case(start, self.naive_lbs),
            "median_case": case(start + timedelta(minutes=10), (self.naive_lbs + self.ideal_lbs) / 2),
            "carbon_savings": {
                "vs_worst_case": round(100 * (worst - self.ideal_lbs) / worst, 1),
                "vs_naive_case": round(100 * (self.naive_lbs - self.ideal_lbs) / self.naive_lbs, 1),
                "vs_median_case": 5.1,
            },
        }
        return Reply(200, body, delay=self.latency)

    def rolled(self, start: datetime, end: datetime, duration: timedelta) -> list[tuple[datetime, float]]:
        """(start time, mean lbs/MWh) of every start the real server compares, in time order."""
        assert self.moer is not None
        step = timedelta(minutes=5)
        now = datetime.fromtimestamp(self.clock(), timezone.utc)
        first = now - timedelta(seconds=now.timestamp() % 300)
        points = [first + i * step for i in range(int(self.horizon / step))]
        kept = [(t, self.moer(t)) for t in points if start <= t <= end + duration]
        size = int(duration.total_seconds() / 60 / 5)
        return [(kept[i][0], sum(v for _t, v in kept[i : i + size]) / size) for i in range(len(kept) - size + 1)]

    def _replayed(self, start: datetime, end: datetime, duration: timedelta, zone: Any, count: int) -> Reply:
        rows = self.rolled(start, end, duration)
        if not rows:  # "No valid forecast data available ...": a ValueError, unhandled
            return Reply(500, "Internal Server Error", {"Content-Type": "text/plain; charset=utf-8"})
        ranked = sorted(rows, key=lambda row: row[1])  # stable: equal means keep time order

        def case(row: tuple[datetime, float]) -> dict[str, Any]:
            return {"time": _utc_text(row[0]), "zone": zone, "co2_intensity": row[1]}

        ideal, worst, median, naive = ranked[0], ranked[-1], ranked[len(ranked) // 2], rows[0]
        body = {
            "ideal": case(ideal),
            "options": [case(row) for row in ranked[:count]],
            "worst_case": case(worst),
            "naive_case": case(naive),
            "median_case": case(median),
            "carbon_savings": {
                "vs_worst_case": (worst[1] - ideal[1]) / worst[1] * 100,
                "vs_naive_case": (naive[1] - ideal[1]) / naive[1] * 100,
                "vs_median_case": (median[1] - ideal[1]) / median[1] * 100,
            },
        }
        return Reply(200, body, delay=self.latency)
