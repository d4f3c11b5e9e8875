"""Prometheus metrics and a health endpoint, served on a loopback address.

The exposition format is written here rather than by ``prometheus_client``: the agent needs a
dozen counters and gauges, and that library alone would push the agent's resident memory past
its 30 MiB budget (measured: +2.2 MiB, on a budget that urllib3 and psutil already take most of).

``/healthz`` turns 503 when the last good IMDS poll is older than ``health_max_age``: a
supervisor can see an agent that runs but no longer knows whether the instance is going away.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["Metrics", "MetricsServer"]

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


class MetricsServer:
    """``GET /metrics`` and ``GET /healthz`` in a daemon thread."""

    def __init__(self, metrics: Metrics, host: str, port: int, max_age: float) -> None:
        class Handler(BaseHTTPRequestHandler):
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
                """Scrapes every few seconds would drown the journal."""

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="spotguard-metrics", daemon=True
        )

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
