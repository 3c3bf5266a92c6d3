"""A loopback HTTP proxy that forwards S3 requests to a real (moto) server and injects the faults object stores
show under load: ``503 SlowDown`` answers and connections reset without an answer.

Clients reach it as their S3 endpoint (AWS_ENDPOINT_URL); path-style requests are forwarded unchanged. The
:class:`FaultPolicy` decides per request, and counts what it did so a test can check the faults really happened.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>FAULTPROXY</RequestId></Error>"
)
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


@dataclass
class FaultPolicy:
    """``down``: key substrings answered 503 on every request while ``enabled``; ``flaky``: key substrings whose
    first request gets a 503 and second a reset connection; ``flaky_writes``: the first PUT/POST under these
    substrings gets a 503."""

    down: tuple[str, ...] = ()
    flaky: tuple[str, ...] = ()
    flaky_writes: tuple[str, ...] = ()
    enabled: bool = True
    seen: Counter = field(default_factory=Counter)  # requests per key
    injected: Counter = field(default_factory=Counter)  # "503" / "reset" counts
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def decide(self, method: str, key: str) -> str | None:
        """None (forward), "503" or "reset"."""
        with self._lock:
            self.seen[key] += 1
            count = self.seen[key]
            fault = None
            if self.enabled:
                if method in ("GET", "HEAD") and any(part in key for part in self.down):
                    fault = "503"
                elif method in ("GET", "HEAD") and any(part in key for part in self.flaky):
                    fault = {1: "503", 2: "reset"}.get(count)
                elif method in ("PUT", "POST") and any(part in key for part in self.flaky_writes):
                    writes = sum(1 for k in self.injected if k.startswith("write:"))
                    fault = "503" if writes == 0 else None
                    if fault:
                        self.injected[f"write:{key}"] += 1
            if fault:
                self.injected[fault] += 1
            return fault


class FaultProxy:
    def __init__(self, upstream: str, policy: FaultPolicy) -> None:
        target = urlsplit(upstream)
        self.policy = policy
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                key = urlsplit(self.path).path
                fault = proxy.policy.decide(self.command, key)
                if fault == "reset":  # RST, no answer: what a dropped connection looks like to the client
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault == "503":
                    payload = b"" if self.command == "HEAD" else SLOW_DOWN
                    self.send_response(503, "Slow Down")
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                connection = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                    connection.request(self.command, self.path, body=body, headers=headers)
                    response = connection.getresponse()
                    payload = response.read()
                    self.send_response(response.status, response.reason)
                    for name, value in response.getheaders():
                        if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                            self.send_header(name, value)
                    length = response.getheader("Content-Length") if self.command == "HEAD" else len(payload)
                    self.send_header("Content-Length", str(length or 0))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                finally:
                    connection.close()

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle  # noqa: N815 (http.server's names)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
