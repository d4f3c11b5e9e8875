"""Prometheus metrics and a health endpoint, served on a loopback address.

The exposition format is written here rather than by ``prometheus_client``: the agent needs a
dozen counters and gauges, and that library alone would push the agent's resident memory past
its 30 MiB budget (measured: +2.2 MiB, on a budget that urllib3 and psutil already take most of).

``/healthz`` turns 503 when the last good IMDS poll is older than ``health_max_age``: a
supervisor can see an agent that runs but no longer knows whether the instance is going away.

The server is an extra, never a reason to stop: a port already taken is retried with backoff
while polling and signalling go on (exiting would only put the agent into a restart loop that
helps nobody), and no local client can tie it up: each connection has one deadline for its
whole request and a cap bounds the threads serving them; connections over the cap are closed
at once.
"""

from __future__ import annotations

import io
import logging
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["Metrics", "MetricsServer"]

log = logging.getLogger(__name__)

#: Seconds a client has to send its whole request (a scraper needs milliseconds).
REQUEST_DEADLINE = 5.0
#: Connections served at once; more are closed unanswered.
MAX_CONNECTIONS = 16
#: Retrying a port that is taken: the first wait, doubled per failure up to the last.
BIND_RETRY_FIRST = 1.0
BIND_RETRY_MAX = 30.0

_HELP = {
    "spotguard_polls_total": ("counter", "IMDS polls by watch and outcome."),
    "spotguard_imds_errors_total": ("counter", "IMDS polls that gave no usable answer, by reason."),
    "spotguard_last_good_poll_age_seconds": ("gauge", "Seconds since the last usable IMDS answer."),
    "spotguard_notices_total": ("counter", "Distinct notices detected, by kind."),
    "spotguard_notice_lead_time_seconds": (
        "gauge",
        "Deadline minus detection time of the latest notice, by kind.",
    ),
    "spotguard_signals_sent_total": ("counter", "Signals delivered to targets."),
    "spotguard_signals_failed_total": ("counter", "Signals that could not be delivered."),
    "spotguard_targets_running": ("gauge", "Signalled targets still running."),
    "spotguard_actions_total": ("counter", "Hook and webhook runs by action and result."),
}

Labels = tuple[tuple[str, str], ...]


class Metrics:
    """Thread-safe counters and gauges with labels."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._values: dict[tuple[str, Labels], float] = {}
        self.started = clock()
        self.last_good_poll: float | None = None

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def set(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self._values[(name, tuple(sorted(labels.items())))] = value

    def good_poll(self) -> None:
        self.last_good_poll = self._clock()

    def last_good_poll_age(self) -> float:
        """Seconds since the last good poll (since start when there was none yet)."""
        return self._clock() - (self.last_good_poll or self.started)

    def render(self) -> str:
        self.set("spotguard_last_good_poll_age_seconds", self.last_good_poll_age())
        with self._lock:
            items = sorted(self._values.items())
        lines: list[str] = []
        seen: set[str] = set()
        for (name, labels), value in items:
            if name not in seen:
                seen.add(name)
                kind, text = _HELP.get(name, ("untyped", name))
                lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            label_text = ",".join(f'{key}="{_escape(val)}"' for key, val in labels)
            lines.append(f"{name}{{{label_text}}} {value:g}" if labels else f"{name} {value:g}")
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class _DeadlineReader(io.RawIOBase):
    """A connection's reads, all inside one deadline: a per-read timeout alone would let a
    client that drips a byte at a time (slowloris) hold its thread for as long as it likes."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("request deadline passed")
        self._sock.settimeout(remaining)
        return self._sock.recv_into(buffer)


class _Server(ThreadingHTTPServer):
    """A thread per connection, at most ``max_connections`` at once."""

    daemon_threads = True
    block_on_close = False  # threads are not tracked: stop() must not wait for slow clients

    def __init__(
        self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], max_connections: int
    ) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(max_connections)
        self._full = False

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            if not self._full:
                self._full = True
                log.warning("metrics: too many connections; closing new ones until some end")
            self.shutdown_request(request)
            return
        self._full = False
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class MetricsServer:
    """``GET /metrics`` and ``GET /healthz`` in a daemon thread.

    The constructor tries the port once (so a free one is listening when ``start`` returns);
    when it is taken, the thread started by ``start`` retries with backoff, logging once per
    change of state (the error when it starts or changes, the recovery when it listens).
    """

    def __init__(self, metrics: Metrics, host: str, port: int, max_age: float) -> None:
        class Handler(BaseHTTPRequestHandler):
            timeout = REQUEST_DEADLINE  # for writes; reads share the deadline below

            def setup(self) -> None:
                super().setup()
                deadline = time.monotonic() + REQUEST_DEADLINE
                self.rfile.close()  # the plain socket file; the socket stays open
                self.rfile = io.BufferedReader(_DeadlineReader(self.connection, deadline))

            def do_GET(self) -> None:
                if self.path == "/metrics":
                    self._answer(200, metrics.render(), "text/plain; version=0.0.4")
                elif self.path == "/healthz":
                    age = metrics.last_good_poll_age()
                    if age <= max_age:
                        self._answer(200, f"ok: last good poll {age:.1f} s ago\n")
                    else:
                        self._answer(503, f"stale: last good poll {age:.1f} s ago\n")
                else:
                    self._answer(404, "not found\n")

            def _answer(self, status: int, body: str, kind: str = "text/plain") -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                """Scrapes every few seconds would drown the journal, and so would clients that
                time out or send garbage."""

        self._bind_args = ((host, port), Handler, MAX_CONNECTIONS)
        self._where = f"{host}:{port}"
        self._server: _Server | None = None
        self._bind_error = ""
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._serving = False
        self._thread = threading.Thread(target=self._run, name="spotguard-metrics", daemon=True)
        self._bind()

    @property
    def address(self) -> tuple[str, int] | None:
        """Where it listens; ``None`` while the port is still being retried."""
        if self._server is None:
            return None
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            server, serving = self._server, self._serving
        if server is not None:
            if serving:
                server.shutdown()
            server.server_close()

    def _bind(self) -> None:
        try:
            server = _Server(*self._bind_args)
        except OSError as exc:
            error = exc.strerror or str(exc)
            if error != self._bind_error:
                self._bind_error = error
                log.error(
                    "metrics: cannot listen on %s: %s; polling goes on, retrying with backoff",
                    self._where,
                    error,
                )
            return
        if self._bind_error:
            log.info("metrics: listening on %s", self._where)
        with self._lock:
            self._server = server

    def _run(self) -> None:
        delay = BIND_RETRY_FIRST
        while self._server is None:
            if self._stopping.wait(delay):
                return
            delay = min(delay * 2, BIND_RETRY_MAX)
            self._bind()
        with self._lock:
            if self._stopping.is_set():
                self._server.server_close()  # bound while stop() ran: closing twice is harmless
                return
            self._serving = True
        self._server.serve_forever()
