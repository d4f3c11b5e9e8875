"""An HTTP proxy between a client and the moto server that misbehaves on request.

Modes: pass-through, a burst of N error answers (500/503 with an S3 error body), N dropped
connections (the request is read, then the socket closes with no answer), and added latency.
Rules (:meth:`FaultyProxy.on`) aim at some requests only, by method and a piece of the path:
answer an error (403 AccessDenied: not retried), delay, hold until released, or *mangle* the
body on its way to the server (a byte flipped, or bytes appended, with the checksum headers
dropped so the server keeps it: a store that "succeeds" and keeps other bytes than were sent).
It forwards over one keep-alive connection per client connection, rewriting Host.
"""

from __future__ import annotations

import http.client
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

ERROR_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>injected by the test proxy</Message></Error>"
)
HOLD_LIMIT = 60.0
DENIED_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
    b"<Message>denied by the test proxy</Message></Error>"
)


@dataclass
class Rule:
    method: str
    path_contains: str
    action: str  # "deny", "delay", "hold", "flip", "append"; "flip-reply": the answer's body
    count: int = -1  # -1: forever
    seconds: float = 0.0
    hits: int = 0
    #: "hold": the request waits here until :meth:`release` (at most ``HOLD_LIMIT`` s).
    gate: threading.Event = field(default_factory=threading.Event)

    def release(self) -> None:
        self.gate.set()

    def matches(self, method: str, path: str) -> bool:
        return self.count != 0 and method == self.method and self.path_contains in path


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
        self.rules: list[Rule] = []
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

    def on(self, method: str, path_contains: str, action: str, **options: float) -> Rule:
        """Apply ``action`` to ``method`` requests whose path contains ``path_contains``."""
        rule = Rule(method, path_contains, action, **options)  # type: ignore[arg-type]
        with self.lock:
            self.rules.append(rule)
        return rule

    def heal(self) -> None:
        with self.lock:
            self.errors_left = self.drops_left = 0
            self.latency = 0.0
            self.rules.clear()

    def _rule(self, method: str, path: str) -> Rule | None:
        with self.lock:
            for rule in self.rules:
                if rule.matches(method, path):
                    rule.count -= rule.count > 0
                    rule.hits += 1
                    return rule
        return None

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
                rule = proxy._rule(self.command, self.path)
                if proxy.latency:
                    time.sleep(proxy.latency)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                if rule is not None and rule.action == "delay":
                    time.sleep(rule.seconds)
                elif rule is not None and rule.action == "hold":
                    rule.gate.wait(HOLD_LIMIT)
                elif rule is not None and rule.action == "deny":
                    verdict = "deny"
                elif rule is not None and rule.action != "flip-reply" and body:
                    # flip / append: the server keeps other bytes than were sent
                    body = (
                        body[:-1] + bytes([body[-1] ^ 0xFF])
                        if rule.action == "flip"
                        else body + b"\r\n0\r\nx-amz-checksum-crc32:AAAAAA==\r\n\r\n"
                    )
                    headers = {
                        k: v
                        for k, v in headers.items()
                        if not k.lower().startswith(("x-amz-checksum", "content-md5"))
                        and k.lower() != "x-amz-sdk-checksum-algorithm"
                    }
                    headers["Content-Length"] = str(len(body))
                if verdict == "drop":
                    self.close_connection = True
                    return
                if verdict in ("error", "deny"):
                    status, error = (
                        (403, DENIED_BODY)
                        if verdict == "deny"
                        else (proxy.error_status, ERROR_BODY)
                    )
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(error)))
                    self.end_headers()
                    self.wfile.write(error)
                    return
                upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                headers["Host"] = f"{proxy.upstream[0]}:{proxy.upstream[1]}"
                upstream.request(self.command, self.path, body=body, headers=headers)
                answer = upstream.getresponse()
                data = answer.read()
                if rule is not None and rule.action == "flip-reply" and data:
                    # what this client reads is damaged on its way: the store's bytes are fine
                    data = data[:-1] + bytes([data[-1] ^ 0xFF])
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
