"""Hooks and webhooks cannot outlive their bounds or be turned elsewhere: a timed-out hook dies
with its whole process group, its output is capped, IMDS text cannot keep it from starting, and
a webhook answer of 307 is not followed."""

from __future__ import annotations

import json
import logging
import threading
import tracemalloc
from collections.abc import Iterator
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest

from spotguard.agent.actions import NoticeActions
from spotguard.agent.config import AgentConfig
from spotguard.protocol import Notice
from tests.support import wait_for

NOW = datetime(2026, 11, 29, 8, 20, tzinfo=timezone.utc)


def notice(action: str = "terminate", key: str = "2026-11-29T08:22:00.000Z") -> Notice:
    return Notice("spot-interruption", action, NOW, NOW, key)


class Outcomes:
    """The observer NoticeActions reports to: (action, succeeded) per ended action."""

    def __init__(self) -> None:
        self.ended: list[tuple[str, bool]] = []

    def __call__(self, action: str, ok: bool) -> None:
        self.ended.append((action, ok))


def run_actions(config: AgentConfig, the_notice: Notice) -> list[tuple[str, bool]]:
    outcomes = Outcomes()
    actions = NoticeActions(config, outcomes)
    actions.start(the_notice)
    wait_for(lambda: outcomes.ended, timeout=60, what="the action to end")
    actions.join(timeout=10)
    return outcomes.ended


def is_alive(pid: int) -> bool:
    """A zombie counts as dead: in a container PID 1 may never reap an orphan."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_timed_out_hook_dies_with_its_backgrounded_grandchild(tmp_path: Path):
    pid_file = tmp_path / "grandchild.pid"
    script = 'sleep 300 & echo $! > "$0"; wait'
    config = AgentConfig(hook_command=("/bin/sh", "-c", script, str(pid_file)), hook_timeout=1.0)
    try:
        assert run_actions(config, notice()) == [("hook", False)]
        grandchild = int(pid_file.read_text())
        wait_for(
            lambda: not is_alive(grandchild), what=f"the hook's grandchild {grandchild} to die"
        )
    finally:
        if pid_file.exists() and is_alive(int(pid_file.read_text())):
            psutil.Process(int(pid_file.read_text())).kill()


def test_a_hook_that_never_reads_a_large_notice_still_times_out(tmp_path: Path):
    """IMDS text makes the notice JSON larger than a pipe holds (64 KiB of escaped NULs is
    384 KiB); a hook that ignores its stdin must still be killed at its timeout."""
    pid_file = tmp_path / "hook.pid"
    config = AgentConfig(
        hook_command=("/bin/sh", "-c", 'echo $$ > "$0"; exec sleep 300', str(pid_file)),
        hook_timeout=1.0,
    )
    try:
        assert run_actions(config, notice(action="\x00" * 65536)) == [("hook", False)]
        wait_for(lambda: not is_alive(int(pid_file.read_text())), what="the hook to die")
    finally:
        if pid_file.exists() and is_alive(int(pid_file.read_text())):
            psutil.Process(int(pid_file.read_text())).kill()


def test_a_flooding_hook_is_drained_but_only_its_tail_kept(caplog: pytest.LogCaptureFixture):
    """32 MiB of output, then exit 3: the agent's memory for it stays near the cap, and the
    failure is still logged with the output's tail."""
    flood = ("/bin/sh", "-c", "yes flood | head -c 33554432; echo last words; exit 3")
    config = AgentConfig(hook_command=flood, hook_timeout=60.0)
    caplog.set_level(logging.ERROR, "spotguard.agent.actions")
    tracemalloc.start()
    try:
        assert run_actions(config, notice()) == [("hook", False)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024, f"{peak} bytes traced while the hook ran"
    (record,) = [r for r in caplog.records if "exited 3" in r.getMessage()]
    assert record.getMessage().endswith("last words")


@pytest.mark.parametrize("text", ["reboot\x00now", "reboot\ud800now"])
def test_imds_text_with_nul_or_lone_surrogate_cannot_stop_the_hook(tmp_path: Path, text: str):
    out = tmp_path / "hook.out"
    script = 'printf %s "$SPOTGUARD_NOTICE_ACTION" > "$0"; cat >> "$0"'
    config = AgentConfig(hook_command=("/bin/sh", "-c", script, str(out)))
    assert run_actions(config, notice(action=text)) == [("hook", True)]
    action, _, stdin = out.read_text("utf-8", "replace").partition("{")
    assert action.startswith("reboot")
    assert action.endswith("now")
    assert json.loads("{" + stdin)["action"] == text  # stdin carries the exact JSON


def test_a_nul_from_the_simulator_still_runs_the_hook(sim, agents, tmp_path: Path):
    """Through the real agent: a scheduled event whose code holds a NUL, served by the
    simulator over HTTP, still runs the hook."""
    out = tmp_path / "hook.out"
    script = 'printf %s "$SPOTGUARD_NOTICE_ACTION" > "$0"'
    agent = agents.start(sim.url, hook_command=["/bin/sh", "-c", script, str(out)])
    sim.control.maintenance(code="system\x00reboot", not_before_in=60)
    wait_for(lambda: out.exists(), what="the hook to run", timeout=20)
    assert out.read_text().startswith("system"), agent.log()


class _Recorder(BaseHTTPRequestHandler):
    """POST: answer ``server.status`` (with ``server.location``) and record the body."""

    def do_POST(self) -> None:
        server = self.server
        assert isinstance(server, RecordingServer)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        server.received.append((self.path, body))
        self.send_response(server.status)
        if server.location:
            self.send_header("Location", server.location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""


class RecordingServer(ThreadingHTTPServer):
    def __init__(self, status: int, location: str = "") -> None:
        super().__init__(("127.0.0.1", 0), _Recorder)
        self.status = status
        self.location = location
        self.received: list[tuple[str, bytes]] = []
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def elsewhere() -> Iterator[RecordingServer]:
    server = RecordingServer(200)
    yield server
    server.shutdown()
    server.server_close()


def test_a_webhook_307_is_not_followed(elsewhere: RecordingServer):
    redirector = RecordingServer(307, location=f"{elsewhere.url}/stolen")
    try:
        config = AgentConfig(webhook_url=f"{redirector.url}/hook", webhook_retries=2)
        assert run_actions(config, notice()) == [("webhook", False)]
        assert [path for path, _ in redirector.received] == ["/hook"]
        assert elsewhere.received == [], "the notice was re-POSTed to the redirect target"
    finally:
        redirector.shutdown()
        redirector.server_close()
