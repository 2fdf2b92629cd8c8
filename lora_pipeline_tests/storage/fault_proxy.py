"""A small HTTP proxy that sits between boto3 and the moto server and misbehaves on cue.

Real S3 endpoints answer 503 SlowDown under load, 500 InternalError now and
then, drop connections and sometimes stall; the storage layer's retries,
timeouts and circuit breaker exist for those moments, so the tests need them on
demand. A test schedules faults (``proxy.inject("503", times=2)``), optionally
only for matching requests, and the proxy forwards everything else untouched.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

# 503/500: an S3 error reply, the request never reaches moto. reset: the connection
# is reset before the request is forwarded. drop-response: the request IS applied
# upstream, then the connection is reset (the client cannot know it succeeded).
# stall: wait ``stall_seconds`` before forwarding.
FAULTS = ("503", "500", "reset", "drop-response", "stall")

_ERROR_BODIES = {
    "503": (503, "SlowDown", "Please reduce your request rate."),
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
}


_HOP_HEADERS = ("transfer-encoding", "connection", "content-length", "date", "server")


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # path and query, e.g. /bucket/key?partNumber=2&uploadId=...


@dataclass
class _Rule:
    fault: str
    remaining: float  # times left; float("inf") for always
    match: Callable[[Request], bool] | None


class FaultProxy:
    """Forwards to ``upstream``; injects scheduled faults. Use as a context manager."""

    def __init__(self, upstream: str, *, stall_seconds: float = 5.0) -> None:
        parts = urlsplit(upstream)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self.stall_seconds = stall_seconds
        self._rules: list[_Rule] = []
        self._lock = threading.Lock()
        self.requests: list[Request] = []
        self._last_request_at = 0.0
        # Request headers removed before forwarding (e.g. {"if-match", "if-none-match"}
        # to play an endpoint that ignores conditional writes).
        self.drop_headers: set[str] = set()
        self.injected: list[tuple[str, Request]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- scheduling ---------------------------------------------------------------

    def inject(
        self,
        fault: str,
        *,
        times: float = 1,
        match: Callable[[Request], bool] | None = None,
    ) -> None:
        """Answer the next ``times`` matching requests with ``fault`` (one of FAULTS)."""
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; choose from {FAULTS}")
        with self._lock:
            self._rules.append(_Rule(fault, times, match))

    def always(self, fault: str, match: Callable[[Request], bool] | None = None) -> None:
        self.inject(fault, times=float("inf"), match=match)

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def settled(self, quiet_s: float = 0.5, timeout_s: float = 10.0) -> int:
        """The number of requests seen, once none has arrived for ``quiet_s``.

        A request is recorded when its handler reads it, which under load can be after the
        client gave up on it; counting before and after a step is sound only from a settled
        count, else a late request of the step before is blamed on the step measured."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                quiet_for = time.monotonic() - self._last_request_at
                if quiet_for >= quiet_s:
                    return len(self.requests)
            time.sleep(max(quiet_s - quiet_for, 0.01))
        raise TimeoutError(f"the proxy kept receiving requests for {timeout_s}s")

    def _take_fault(self, request: Request) -> str | None:
        with self._lock:
            self.requests.append(request)
            self._last_request_at = time.monotonic()
            for rule in self._rules:
                if rule.remaining > 0 and (rule.match is None or rule.match(request)):
                    rule.remaining -= 1
                    self.injected.append((rule.fault, request))
                    return rule.fault
        return None

    # -- serving -----------------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _handle(self) -> None:
                try:
                    self._handle_request()
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the client gave up (e.g. its read timeout)
                except ConnectionRefusedError:
                    self.close_connection = True  # the upstream is gone (a stalled request outlived the session)

            def _handle_request(self) -> None:
                body = self._body()
                request = Request(self.command, self.path)
                fault = proxy._take_fault(request)
                if fault == "drop-response":
                    self._forward(body, reply=False)
                if fault in ("reset", "drop-response"):
                    self._reset()
                    return
                if fault == "stall":
                    time.sleep(proxy.stall_seconds)
                if fault in _ERROR_BODIES:
                    status, code, message = _ERROR_BODIES[fault]
                    payload = (
                        '<?xml version="1.0" encoding="UTF-8"?>\n'
                        f"<Error><Code>{code}</Code><Message>{message}</Message>"
                        "<RequestId>fault-proxy</RequestId></Error>"
                    ).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                self._forward(body)

            def _reset(self) -> None:
                # Close with SO_LINGER 0: the client sees a connection reset, no response.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()

            def _forward(self, body: bytes, reply: bool = True) -> None:
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in ("transfer-encoding", "connection", "content-length", "expect")
                    and k.lower() not in proxy.drop_headers
                }
                upstream = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
                try:
                    send_body = body if body or self.command in ("PUT", "POST") else None
                    upstream.request(self.command, self.path, body=send_body, headers=headers)
                    response = upstream.getresponse()
                    payload = response.read()
                    if not reply:
                        return
                    self.send_response(response.status, response.reason)
                    for key, value in response.getheaders():
                        if key.lower() not in _HOP_HEADERS:
                            self.send_header(key, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                finally:
                    upstream.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        return Handler
