"""A real HTTP server on 127.0.0.1 for download tests, with per-test misbehaviour.

Each served path has a :class:`Route` saying how to misbehave: fail the first N
requests with 503/429 (+ Retry-After), drop the connection at a byte offset, ignore
Range, stall at a byte offset, trickle one byte at a time (body, or headers too), send
no Content-Length, redirect, or answer 404. Every request is logged so
tests can assert what the client asked for (Range headers, number of full GETs).
"""
import hashlib
import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest


@dataclass
class Route:
    """How the server answers one path."""

    body: bytes = b""
    status: int = 200  # e.g. 404 to answer "not found" forever
    fail: List[Tuple[int, Optional[str]]] = field(default_factory=list)  # (status, Retry-After) per request, consumed
    drop_at: List[int] = field(default_factory=list)  # absolute offsets; each request drops at the next one, consumed
    stall_at: Optional[int] = None  # absolute offset at which every response stops sending (forever)
    stall_times: Optional[int] = None  # stall only this many times (None = always)
    ignore_range: bool = False
    redirect: Optional[str] = None  # Location for a 302
    delay_per_chunk: float = 0.0  # seconds between 64 KiB chunks (slow server, for concurrency tests)
    content_length: Optional[int] = None  # lie about the length
    no_length: bool = False  # send no Content-Length: the body ends when the connection closes
    trickle: float = 0.0  # seconds between single bytes of the body (a hostile, slow server)
    trickle_head: bool = False  # with trickle: send the status line and headers a byte at a time too


@dataclass
class RequestRecord:
    path: str
    range: Optional[str]
    status: int
    authorization: Optional[str] = None  # the Authorization header, e.g. from user:password@ in the URL
    at: float = field(default_factory=time.monotonic)  # when the request was answered (server clock)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "TestServer"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - silence stderr
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        srv = self.server
        with srv.lock:
            route = srv.routes.get(self.path)
            failure = route.fail.pop(0) if route and route.fail else None
            drop = route.drop_at.pop(0) if route and route.drop_at else None
            stall = None
            if route and route.stall_at is not None and (route.stall_times is None or route.stall_times > 0):
                stall = route.stall_at
                if route.stall_times is not None:
                    route.stall_times -= 1
        range_header = self.headers.get("Range")

        def record(status: int) -> None:
            with srv.lock:
                srv.requests.append(RequestRecord(self.path, range_header, status, self.headers.get("Authorization")))

        if route is None or route.status == 404:
            record(404)
            self._simple(404, b"not found")
            return
        if failure is not None:
            status, retry_after = failure
            record(status)
            self._simple(status, b"try later", {"Retry-After": retry_after} if retry_after is not None else {})
            return
        if route.redirect:
            record(302)
            self._simple(302, b"", {"Location": route.redirect})
            return
        if route.status != 200:
            record(route.status)
            self._simple(route.status, b"error")
            return

        body = route.body
        start = 0
        status = 200
        if range_header and not route.ignore_range:
            spec = range_header.split("=", 1)[1]
            start = int(spec.split("-", 1)[0])
            if start >= len(body):
                record(416)
                self._simple(416, b"", {"Content-Range": f"bytes */{len(body)}"})
                return
            status = 206
        record(status)
        headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        if route.no_length:
            headers["Connection"] = "close"
            self.close_connection = True
        else:
            length = route.content_length if route.content_length is not None else len(body) - start
            headers["Content-Length"] = str(length)
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
        if route.trickle_head:
            head = f"HTTP/1.1 {status} {self.responses[status][0]}\r\n"
            head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
            if not self._trickle(head.encode("latin-1"), route.trickle):
                return
        else:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
        if route.trickle:
            self._trickle(body[start:], route.trickle)
            return

        pos = start
        step = 64 * 1024
        try:
            while pos < len(body):
                end = min(len(body), pos + step)
                if drop is not None and pos <= drop < end:
                    end = drop
                if stall is not None and pos <= stall < end:
                    end = stall
                self.wfile.write(body[pos:end])
                pos = end
                if drop is not None and pos == drop:
                    self.wfile.flush()
                    # Abort the connection mid-body: the client sees fewer bytes than announced.
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                if stall is not None and pos == stall:
                    self.wfile.flush()
                    srv.stop.wait(30)  # hold the connection open, send nothing
                    self.close_connection = True
                    return
                if route.delay_per_chunk:
                    time.sleep(route.delay_per_chunk)
            self.wfile.flush()
        except OSError:
            self.close_connection = True

    def _trickle(self, data: bytes, interval: float) -> bool:
        """Send ``data`` one byte every ``interval`` s; False once the client is gone or the server stops."""
        self.close_connection = True
        try:
            for i in range(len(data)):
                self.wfile.write(data[i:i + 1])
                self.wfile.flush()
                if self.server.stop.wait(interval):
                    return False
        except OSError:
            return False
        return True

    def _simple(self, status: int, body: bytes, headers: Optional[Dict[str, str]] = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class TestServer(ThreadingHTTPServer):
    """Threaded HTTP server on 127.0.0.1 with configurable :class:`Route` objects."""

    __test__ = False  # not a pytest test class
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes: Dict[str, Route] = {}
        self.requests: List[RequestRecord] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base + path

    def add(self, path: str, route: Route) -> str:
        self.routes[path] = route
        return self.url(path)

    def requests_for(self, path: str) -> List[RequestRecord]:
        with self.lock:
            return [r for r in self.requests if r.path == path]

    def handle_error(self, request: object, client_address: object) -> None:
        # Clients that hang up mid-response (timeouts, tests) are expected; stay quiet.
        pass

    def start(self) -> "TestServer":
        self._thread.start()
        return self

    def close(self) -> None:
        self.stop.set()
        self.shutdown()
        self.server_close()


@pytest.fixture
def http_server() -> Iterator[TestServer]:
    server = TestServer().start()
    try:
        yield server
    finally:
        server.close()


def make_payload(size: int = 3 * 1024 * 1024 + 12345, seed: int = 0) -> bytes:
    """Deterministic pseudo-random bytes standing in for a checkpoint (hash-chained, fast)."""
    out = bytearray()
    block = hashlib.sha512(str(seed).encode()).digest()
    # Expand with a cheap chain: a fresh 64-byte block per 4 KiB, repeated; content only
    # has to be distinct per offset enough for resume bugs to show up in the hash.
    while len(out) < size:
        block = hashlib.sha512(block).digest()
        out += block * 64
    return bytes(out[:size])


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_manifest(folder: Path, assets: List[dict]) -> Path:
    """Write a manifest JSON into ``folder`` and return its path."""
    path = Path(folder) / "assets.json"
    path.write_text(json.dumps({"assets": assets}, indent=2), encoding="utf-8")
    return path


def asset_entry(name: str, file: str, data: bytes, urls: List[str], size: Optional[int] = None) -> dict:
    entry = {"name": name, "file": file, "sha256": sha256_hex(data), "urls": urls, "format": "ckpt"}
    if size is not None:
        entry["size"] = size
    return entry


REPO_ROOT = Path(__file__).resolve().parents[2]


def subprocess_env(**extra: str) -> Dict[str, str]:
    """Environment for ``python -m vehiclenet`` children: repo on sys.path, no proxies."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
        env.pop(key, None)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.update(extra)
    return env
