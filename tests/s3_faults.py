"""A fault-injecting HTTP proxy on loopback in front of the real S3-compatible server of
tests/s3_server.py: every request goes to the server unchanged (same headers, so request
signatures stay valid), except those a rule picks, which get what a failing store gives:

    proxy = FaultProxy(s3.endpoint)            # then AWS_ENDPOINT_URL=proxy.endpoint
    proxy.fail("GET", "/step-00000004/state", times=3)   # 503 SlowDown, 3 times
    proxy.fail("HEAD", "/state")                          # 503, every time
    proxy.hold("PUT", "/state")                # no answer until proxy.release()
    ...
    proxy.stop()

A rule matches a request by method and a substring of its path (/bucket/key?query).
"""

from __future__ import annotations

import http.client
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>fault</RequestId></Error>"
)
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection"}


@dataclass
class _Rule:
    method: str
    path_part: str
    action: str  # "fail" (a 503) or "hold" (no answer until released)
    times: int | None  # None: every matching request
    released: threading.Event = field(default_factory=threading.Event)

    def matches(self, method: str, path: str) -> bool:
        return method == self.method and self.path_part in path and self.times != 0


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        target = urlparse(upstream)
        self.upstream = (target.hostname, target.port)
        self.rules: list[_Rule] = []
        self.faults: list[tuple[str, str, str]] = []  # (action, method, path) of each fault given
        self.held = threading.Semaphore(0)  # one release per request being held
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def fail(self, method: str, path_part: str, times: int | None = None) -> None:
        """Answer matching requests with 503 SlowDown (`times` of them; None: all)."""
        with self._lock:
            self.rules.append(_Rule(method, path_part, "fail", times))

    def hold(self, method: str, path_part: str) -> None:
        """Give matching requests no answer until `release` (a store that stopped answering)."""
        with self._lock:
            self.rules.append(_Rule(method, path_part, "hold", None))

    def release(self) -> None:
        """Forward the held requests and the later ones; drop every rule."""
        with self._lock:
            for rule in self.rules:
                rule.released.set()
            self.rules = []

    def stop(self) -> None:
        self.release()
        self._server.shutdown()
        self._server.server_close()

    def _take(self, method: str, path: str) -> _Rule | None:
        with self._lock:
            for rule in self.rules:
                if rule.matches(method, path):
                    if rule.times is not None:
                        rule.times -= 1
                    self.faults.append((rule.action, method, path))
                    return rule
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", ""):
                    raw = b""
                    while True:  # relayed as it came (chunk sizes, trailers and all)
                        line = self.rfile.readline()
                        raw += line
                        size = int(line.split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while True:
                                trailer = self.rfile.readline()
                                raw += trailer
                                if trailer in (b"\r\n", b"\n", b""):
                                    return raw
                        raw += self.rfile.read(size + 2)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _relay(self) -> None:
                body = self._body()
                rule = proxy._take(self.command, self.path)
                if rule is not None and rule.action == "hold":
                    proxy.held.release()
                    rule.released.wait(timeout=60)
                elif rule is not None:
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(SLOW_DOWN)
                    return
                upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    upstream.putrequest(
                        self.command, self.path, skip_host=True, skip_accept_encoding=True
                    )
                    for name, value in self.headers.items():
                        upstream.putheader(name, value)
                    upstream.endheaders(body or None)
                    response = upstream.getresponse()
                    data = response.read()
                    self.send_response(response.status, response.reason)
                    for name, value in response.getheaders():
                        if name.lower() not in _HOP_BY_HOP and not (
                            name.lower() == "content-length" and self.command != "HEAD"
                        ):
                            self.send_header(name, value)
                    if self.command != "HEAD":
                        self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    upstream.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

        return Handler
