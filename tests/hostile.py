"""Hostile HTTP servers on 127.0.0.1, on raw sockets: they misbehave in ways http.server cannot.

One thread and one selector serve every connection, so a test that counts its own threads and descriptors is
not disturbed by the server's. Run as a script, a server lives in its own process (the numbers measured are then
the client's alone) and stops when its standard input closes:

    python tests/hostile.py serve MODE        # prints the port, then serves until stdin closes
    python tests/hostile.py calls URL BACKEND COUNT TIMEOUT [NOFILE]   # the load, printed as JSON

Modes: ``header-drip`` (the status line, then one header byte per ``interval``, for ever), ``continue-flood``
(``HTTP/1.1 100 Continue`` without end), ``body-drip`` (headers, then one body byte per interval), ``black-hole``
(reads, never answers), ``redirect`` (302 to elsewhere), ``error-500``, ``ok`` (a valid forecast series).
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

MODES = ("header-drip", "continue-flood", "body-drip", "black-hole", "redirect", "error-500", "ok")


def series_body() -> bytes:
    """48 hourly points from the hour before now, lowest four hours ahead: a forecast the planner accepts."""
    start = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
    points = [
        {"start": (start + timedelta(hours=i)).isoformat(), "value": 100.0 if i == 5 else 300.0 + i} for i in range(48)
    ]
    return json.dumps(points).encode()


def _answer(status: str, body: bytes, extra: str = "") -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


class HostileServer:
    """One misbehaving server; ``url`` while running. ``interval``: seconds between trickled bytes."""

    def __init__(self, mode: str, interval: float = 0.2) -> None:
        assert mode in MODES, mode
        self.mode, self.interval = mode, interval
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4096)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.listener, selectors.EVENT_READ)
        self._state: dict[socket.socket, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"hostile-{mode}", daemon=True)
        self.requests = 0

    def start(self) -> HostileServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for conn in list(self._state):
            self._close(conn)
        self._selector.close()
        self.listener.close()

    def _close(self, conn: socket.socket) -> None:
        self._state.pop(conn, None)
        try:
            self._selector.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            for key, _events in self._selector.select(timeout=min(self.interval, 0.05)):
                if key.fileobj is self.listener:
                    self._accept()
                else:
                    self._receive(key.fileobj)  # type: ignore[arg-type]
            now = time.monotonic()
            for conn, state in list(self._state.items()):
                if state["answering"] and state["next"] <= now:
                    state["next"] = now + self.interval
                    self._step(conn, state)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # out of descriptors, say: the client sees a black hole
                return
            conn.setblocking(False)
            self._state[conn] = {"buffer": b"", "answering": False, "next": 0.0, "step": 0}
            self._selector.register(conn, selectors.EVENT_READ)

    def _receive(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        state = self._state[conn]
        state["buffer"] += data
        if not state["answering"] and b"\r\n\r\n" in state["buffer"]:
            state["buffer"] = state["buffer"].split(b"\r\n\r\n", 1)[1]
            state["answering"], state["next"], state["step"] = True, 0.0, 0
            self.requests += 1

    def _send(self, conn: socket.socket, data: bytes) -> None:
        try:
            conn.send(data)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._close(conn)

    def _step(self, conn: socket.socket, state: dict[str, Any]) -> None:
        step = state["step"]
        state["step"] += 1
        mode = self.mode
        if mode == "header-drip":
            self._send(conn, b"HTTP/1.1 200 OK\r\nX-Drip: " if step == 0 else b"x")
        elif mode == "continue-flood":
            self._send(conn, b"HTTP/1.1 100 Continue\r\n\r\n")
        elif mode == "body-drip":
            head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n["
            self._send(conn, head if step == 0 else b" ")
        elif mode == "black-hole":
            state["answering"] = False
        else:
            if mode == "redirect":
                reply = _answer("302 Found", b"", "Location: /elsewhere\r\n")
            elif mode == "error-500":
                reply = _answer("500 Internal Server Error", b"Internal Server Error")
            else:
                reply = _answer("200 OK", series_body())
            state["answering"] = False  # kept alive: the next request on this connection is answered too
            self._send(conn, reply)


@contextmanager
def hostile(mode: str, interval: float = 0.2) -> Iterator[HostileServer]:
    server = HostileServer(mode, interval).start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def hostile_process(mode: str, interval: float = 0.2, tls: tuple[str, str] | None = None) -> Iterator[str]:
    """A hostile server in its own process; yields its URL. It ends when we close its stdin. ``tls``: (certificate,
    key) files: a TLS server that completes the handshake and then trickles (``https://`` URL)."""
    command = ["serve", mode, str(interval)] if tls is None else ["serve-tls", mode, *tls, str(interval)]
    child = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), *command],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        yield f"{'http' if tls is None else 'https'}://127.0.0.1:{port}"
    finally:
        assert child.stdin is not None
        child.stdin.close()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def serve_tls(mode: str, cert: str, key: str, interval: float) -> None:
    """A TLS server (a thread per connection; it runs in its own process) that completes the handshake, then
    trickles like ``mode`` ("header-drip" or "continue-flood"). Prints its port; ends when stdin closes."""
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)

    def handle(conn: socket.socket) -> None:
        try:
            with context.wrap_socket(conn, server_side=True) as tls:
                tls.settimeout(30)
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = tls.recv(4096)
                    if not chunk:
                        return
                    data += chunk
                first = True
                while True:
                    if mode == "header-drip":
                        tls.sendall(b"HTTP/1.1 200 OK\r\nX-Drip: " if first else b"x")
                    else:
                        tls.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                    first = False
                    time.sleep(interval)
        except (OSError, ValueError):
            return

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    print(listener.getsockname()[1], flush=True)
    sys.stdin.read()


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def settle(baseline_threads: int, baseline_fds: int, seconds: float) -> tuple[int, int, float]:
    """Polls until threads and descriptors are back to the baseline (or ``seconds`` pass): (threads, fds, waited)."""
    began = time.monotonic()
    while True:
        threads, fds = threading.active_count(), open_descriptors()
        waited = time.monotonic() - began
        if (threads <= baseline_threads and fds <= baseline_fds) or waited > seconds:
            return threads, fds, waited
        time.sleep(0.02)


def calls(url: str, backend: str, count: int, timeout: float, nofile: int | None = None) -> dict[str, Any]:
    """``count`` http_request calls from 32 threads; threads and descriptors before, right after and settled."""
    import resource
    from concurrent.futures import ThreadPoolExecutor

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import carbonaware_core as core

    if nofile is not None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    if backend == "requests":
        import requests  # noqa: F401 - imported before the baseline, as a real process would have it
    threads, fds = threading.active_count(), open_descriptors()
    overrun = 0.0
    errors: dict[str, int] = {}

    def one(_: int) -> float:
        began = time.monotonic()
        try:
            core.http_request("GET", url, timeout=timeout, backend=backend)
        except core.SourceError as error:
            text = str(error)
            errors[text] = errors.get(text, 0) + 1
        return time.monotonic() - began - timeout

    with ThreadPoolExecutor(32) as pool:
        overrun = max(pool.map(one, range(count)))
    peak_threads, peak_fds = threading.active_count(), open_descriptors()
    after_threads, after_fds, waited = settle(threads, fds, 5.0)
    opened = True
    try:
        with open(os.devnull, "rb"):
            pass
    except OSError:
        opened = False
    return {
        "threads": threads,
        "fds": fds,
        "peak_threads": peak_threads,
        "peak_fds": peak_fds,
        "after_threads": after_threads,
        "after_fds": after_fds,
        "settled_in": waited,
        "max_overrun": overrun,
        "open_works": opened,
        "errors": errors,
    }


def main(argv: list[str]) -> int:
    if argv[0] == "serve":
        with hostile(argv[1], float(argv[2]) if len(argv) > 2 else 0.2) as server:
            print(server.port, flush=True)
            sys.stdin.read()  # until the parent closes our stdin
        return 0
    if argv[0] == "serve-tls":
        serve_tls(argv[1], argv[2], argv[3], float(argv[4]))
        return 0
    if argv[0] == "calls":
        url, backend, count, timeout = argv[1], argv[2], int(argv[3]), float(argv[4])
        nofile = int(argv[5]) if len(argv) > 5 else None
        print(json.dumps(calls(url, backend, count, timeout, nofile)), flush=True)
        os._exit(0)  # leaked threads, if any, must not hold the process open
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
