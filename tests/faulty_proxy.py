"""An HTTP proxy between a client and the moto server that misbehaves on request.

Modes: pass-through, a burst of N error answers (500/503 with an S3 error body), N dropped
connections (the request is read, then the socket closes with no answer), and added latency.
It forwards over one keep-alive connection per client connection, rewriting Host.
"""

from __future__ import annotations

import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

ERROR_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>injected by the test proxy</Message></Error>"
)


class FaultyProxy:
    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.lock = threading.Lock()
        self.error_status = 503
        self.errors_left = 0  # -1: forever
        self.drops_left = 0
        self.latency = 0.0
        self.requests = 0
        self.faults = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def fail(self, count: int, status: int = 503) -> None:
        with self.lock:
            self.errors_left, self.error_status = count, status

    def drop(self, count: int) -> None:
        with self.lock:
            self.drops_left = count

    def heal(self) -> None:
        with self.lock:
            self.errors_left = self.drops_left = 0
            self.latency = 0.0

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _take(self) -> str:
        with self.lock:
            self.requests += 1
            if self.drops_left:
                self.drops_left -= self.drops_left > 0
                self.faults += 1
                return "drop"
            if self.errors_left:
                self.errors_left -= self.errors_left > 0
                self.faults += 1
                return "error"
            return "pass"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _relay(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                verdict = proxy._take()
                if proxy.latency:
                    time.sleep(proxy.latency)
                if verdict == "drop":
                    self.close_connection = True
                    return
                if verdict == "error":
                    self.send_response(proxy.error_status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(ERROR_BODY)))
                    self.end_headers()
                    self.wfile.write(ERROR_BODY)
                    return
                upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = f"{proxy.upstream[0]}:{proxy.upstream[1]}"
                upstream.request(self.command, self.path, body=body, headers=headers)
                answer = upstream.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                length = answer.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                upstream.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

            def log_message(self, *args: object) -> None:
                pass

        return Handler
