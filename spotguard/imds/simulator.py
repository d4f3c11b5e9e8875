"""A local EC2 instance metadata service for rehearsals, tests and benchmarks.

It serves the real paths in the real formats (``text/plain``, IMDSv2 token rules: ``PUT
/latest/api/token`` with a TTL of 1..21600 s, 401 for a missing or expired token) and keeps a
scheduled notice's time *fixed*, as EC2 does: a simulator that recomputed "now + 2 minutes" per
request would make every poll look like a new notice and defeat the agent's dedupe.

A control API under ``/_sim/`` (no token needed) schedules notices and injects faults::

    POST /_sim/spot         {"action": "terminate", "in_seconds": 120}  or  {"time": ISO}
    POST /_sim/spot/clear
    POST /_sim/rebalance    {"notice_time": ISO}               (default: now)
    POST /_sim/rebalance/clear
    POST /_sim/maintenance  {"code": "system-reboot", "not_before_in": 3600,
                             "not_after_in": 7200, "event_id": "...", "state": "active"}
    POST /_sim/maintenance/cancel  {"event_id": "..."}  (moves it to events/maintenance/history)
    POST /_sim/lifecycle    {"state": "Terminated"}
    POST /_sim/lifecycle/clear
    POST /_sim/fault        {"status": 503, "count": 5}  {"latency": 0.5}  {"garbage": 3}
                            {"drop": 3}  {"expire_tokens": true}  {"clear": true}
                            (count -1 = until cleared)
    POST /_sim/reset
    GET  /_sim/requests     every metadata request so far: time, method, path, status
    GET  /_sim/state

:class:`~spotguard.imds.sim_control.SimControl` is a small client for that API.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from spotguard.protocol import SPOT_NOTICE_SECONDS, parse_time

__all__ = ["ImdsSimulator"]

MAINTENANCE_TIME_FORMAT = "%d %b %Y %H:%M:%S GMT"
GARBAGE = b"\xff\xfe<html>\x00garbage{{"

STATIC_METADATA = {
    "instance-id": "i-0123456789abcdef0",
    "instance-type": "g5.xlarge",
    "instance-life-cycle": "spot",
    "ami-id": "ami-0123456789abcdef0",
    "hostname": "ip-10-0-0-10.ec2.internal",
    "local-ipv4": "10.0.0.10",
    "placement/availability-zone": "us-east-1a",
    "placement/region": "us-east-1",
}


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso_seconds(moment: datetime) -> str:
    """IMDS writes notice times to the second: ``2026-11-29T08:22:00Z``."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class _Faults:
    latency: float = 0.0
    status: int = 0
    status_count: int = 0
    garbage_count: int = 0
    drop_count: int = 0

    @staticmethod
    def take(count: int) -> tuple[bool, int]:
        """Whether a counted fault fires now, and the count left (-1 is forever)."""
        if count == 0:
            return False, 0
        return True, count if count < 0 else count - 1


@dataclass
class _State:
    tokens: dict[str, float] = field(default_factory=dict)
    spot: dict[str, str] | None = None
    rebalance: str | None = None
    maintenance: list[dict[str, str]] = field(default_factory=list)
    maintenance_history: list[dict[str, str]] = field(default_factory=list)
    lifecycle: str | None = None
    faults: _Faults = field(default_factory=_Faults)
    requests: list[dict[str, Any]] = field(default_factory=list)


class ImdsSimulator:
    """The simulator as an object: ``with ImdsSimulator() as sim: sim.url``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._lock = threading.Lock()
        self._state = _State()
        self._server = ThreadingHTTPServer((host, port), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> ImdsSimulator:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="imds-sim", daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> ImdsSimulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- control, shared by the HTTP control API and in-process callers -----------------

    def control(self, command: str, body: dict[str, Any]) -> dict[str, Any]:
        """Apply one control command; raises ``ValueError`` on a bad one."""
        with self._lock:
            state = self._state
            if command == "spot":
                action = body.get("action", "terminate")
                if action not in ("terminate", "stop", "hibernate"):
                    raise ValueError(f"unknown spot action {action!r}")
                when = (
                    parse_time(body["time"])
                    if "time" in body
                    else _now()
                    + timedelta(seconds=float(body.get("in_seconds", SPOT_NOTICE_SECONDS)))
                )
                state.spot = {"action": action, "time": _iso_seconds(when)}
            elif command == "spot/clear":
                state.spot = None
            elif command == "rebalance":
                when = parse_time(body["notice_time"]) if "notice_time" in body else _now()
                state.rebalance = _iso_seconds(when)
            elif command == "rebalance/clear":
                state.rebalance = None
            elif command == "maintenance":
                state.maintenance.append(self._maintenance_event(body))
            elif command == "maintenance/cancel":
                self._cancel_maintenance(str(body["event_id"]))
            elif command == "lifecycle":
                state.lifecycle = str(body["state"])
            elif command == "lifecycle/clear":
                state.lifecycle = None
            elif command == "fault":
                self._fault(body)
            elif command == "reset":
                self._state = _State()
            else:
                raise ValueError(f"unknown control command {command!r}")
            return self._describe()

    @staticmethod
    def _maintenance_event(body: dict[str, Any]) -> dict[str, str]:
        now = _now()
        event = {
            "Code": str(body.get("code", "system-reboot")),
            "Description": str(body.get("description", "scheduled reboot")),
            "EventId": str(body.get("event_id", f"instance-event-{secrets.token_hex(8)}")),
            "NotBefore": (now + timedelta(seconds=float(body.get("not_before_in", 0)))).strftime(
                MAINTENANCE_TIME_FORMAT
            ),
            "State": str(body.get("state", "active")),
        }
        if "not_after_in" in body:
            event["NotAfter"] = (now + timedelta(seconds=float(body["not_after_in"]))).strftime(
                MAINTENANCE_TIME_FORMAT
            )
        return event

    def _cancel_maintenance(self, event_id: str) -> None:
        """As EC2 does with a cancelled event: gone from ``scheduled``, kept in ``history``."""
        state = self._state
        events = [event for event in state.maintenance if event["EventId"] == event_id]
        if not events:
            raise ValueError(f"no scheduled event {event_id!r}")
        state.maintenance = [event for event in state.maintenance if event not in events]
        state.maintenance_history.extend({**event, "State": "canceled"} for event in events)

    def _fault(self, body: dict[str, Any]) -> None:
        faults = self._state.faults
        if body.get("clear"):
            self._state.faults = _Faults()
        if "latency" in body:
            faults.latency = float(body["latency"])
        if "status" in body:
            faults.status = int(body["status"])
            faults.status_count = int(body.get("count", -1))
        if "garbage" in body:
            faults.garbage_count = int(body["garbage"])
        if "drop" in body:
            faults.drop_count = int(body["drop"])
        if body.get("expire_tokens"):
            self._state.tokens.clear()

    def _describe(self) -> dict[str, Any]:
        state = self._state
        return {
            "spot": state.spot,
            "rebalance": state.rebalance,
            "maintenance": list(state.maintenance),
            "lifecycle": state.lifecycle,
            "faults": vars(state.faults).copy(),
            "tokens": len(state.tokens),
        }

    # -- metadata -----------------------------------------------------------------------

    def _metadata(self, path: str) -> tuple[int, str]:
        """Status and body for a token-checked GET below ``/latest/meta-data/``."""
        state = self._state
        key = path.strip("/")
        if key == "spot/instance-action":
            return (200, json.dumps(state.spot)) if state.spot else (404, "")
        if key == "events/recommendations/rebalance":
            if state.rebalance:
                return 200, json.dumps({"noticeTime": state.rebalance})
            return 404, ""
        if key == "events/maintenance/scheduled":
            return 200, json.dumps(state.maintenance)
        if key == "events/maintenance/history":
            return 200, json.dumps(state.maintenance_history)
        if key == "autoscaling/target-lifecycle-state":
            return (200, state.lifecycle) if state.lifecycle else (404, "")
        if key in STATIC_METADATA:
            return 200, STATIC_METADATA[key]
        if key == "":
            return 200, "\n".join(sorted({k.split("/")[0] for k in STATIC_METADATA}))
        return 404, ""

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        sim = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_PUT(self) -> None:
                if self._control("PUT"):
                    return
                sim._serve(self, "PUT")

            def do_GET(self) -> None:
                if self._control("GET"):
                    return
                sim._serve(self, "GET")

            def do_POST(self) -> None:
                if not self._control("POST"):
                    sim._send(self, 405, "")

            def _control(self, method: str) -> bool:
                if not self.path.startswith("/_sim/"):
                    return False
                command = self.path[len("/_sim/") :]
                try:
                    if method == "GET" and command == "requests":
                        with sim._lock:
                            payload: Any = list(sim._state.requests)
                    elif method == "GET" and command == "state":
                        with sim._lock:
                            payload = sim._describe()
                    elif method == "POST":
                        length = int(self.headers.get("Content-Length") or 0)
                        body = json.loads(self.rfile.read(length) or b"{}")
                        payload = sim.control(command, body)
                    else:
                        raise ValueError(f"{method} {self.path} is not a control call")
                except (ValueError, KeyError, TypeError) as exc:
                    sim._send(self, 400, json.dumps({"error": str(exc)}), "application/json")
                    return True
                sim._send(self, 200, json.dumps(payload), "application/json")
                return True

            def log_message(self, format: str, *args: object) -> None:
                """Quiet: the request log is at /_sim/requests."""

        return Handler

    def _serve(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        path = handler.path.split("?", 1)[0]
        with self._lock:
            faults = self._state.faults
            latency = faults.latency
            fire_drop, faults.drop_count = faults.take(faults.drop_count)
            fire_status, faults.status_count = faults.take(faults.status_count)
            fire_garbage = False
            if not (fire_drop or fire_status):
                fire_garbage, faults.garbage_count = faults.take(faults.garbage_count)
        if latency:
            time.sleep(latency)
        if fire_drop:
            self._record(method, path, 0)
            handler.close_connection = True
            return
        if fire_status:
            self._send(handler, faults.status, "")
            self._record(method, path, faults.status)
            return
        with self._lock:
            status, body = self._answer(handler, method, path)
        payload = GARBAGE if fire_garbage and status == 200 else body.encode()
        self._send(handler, status, payload, headers=self._extra_headers(handler, status, method))
        self._record(method, path, status)

    def _answer(self, handler: BaseHTTPRequestHandler, method: str, path: str) -> tuple[int, str]:
        tokens = self._state.tokens
        now = time.monotonic()
        if method == "PUT":
            if path != "/latest/api/token":
                return 405, ""
            if handler.headers.get("X-Forwarded-For"):
                return 403, ""  # IMDS refuses token requests that went through a proxy
            ttl = handler.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
            if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
                return 400, ""
            token = secrets.token_urlsafe(32)
            tokens[token] = now + int(ttl)
            return 200, token
        if not path.startswith("/latest/"):
            return 404, ""
        token = handler.headers.get("X-aws-ec2-metadata-token", "")
        if tokens.get(token, 0.0) <= now:
            tokens.pop(token, None)
            return 401, ""
        if path.startswith("/latest/meta-data"):
            return self._metadata(path[len("/latest/meta-data") :])
        return 404, ""

    @staticmethod
    def _extra_headers(handler: BaseHTTPRequestHandler, status: int, method: str) -> dict[str, str]:
        if method == "PUT" and status == 200:
            ttl = handler.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
            return {"X-aws-ec2-metadata-token-ttl-seconds": ttl}
        return {}

    @staticmethod
    def _send(
        handler: BaseHTTPRequestHandler,
        status: int,
        body: str | bytes,
        kind: str = "text/plain",
        headers: dict[str, str] | None = None,
    ) -> None:
        data = body.encode() if isinstance(body, str) else body
        handler.send_response(status)
        handler.send_header("Content-Type", kind)
        handler.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(data)

    def _record(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self._state.requests.append(
                {"time": time.time(), "method": method, "path": path, "status": status}
            )
