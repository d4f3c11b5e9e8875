"""Metrics exposition, health, log formats, and the systemd notify protocol."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from pathlib import Path

import requests

from spotguard.agent.logs import configure_logging
from spotguard.agent.metrics import Metrics, MetricsServer
from spotguard.agent.sd_notify import SystemdNotifier
from tests.support import wait_for


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def test_metrics_render_in_prometheus_text_format():
    clock = Clock()
    metrics = Metrics(clock)
    metrics.inc("spotguard_polls_total", watch="spot-interruption", outcome="none")
    metrics.inc("spotguard_polls_total", watch="spot-interruption", outcome="none")
    metrics.inc("spotguard_signals_sent_total")
    clock.now += 7
    text = metrics.render()
    assert "# TYPE spotguard_polls_total counter" in text
    assert 'spotguard_polls_total{outcome="none",watch="spot-interruption"} 2' in text
    assert "spotguard_signals_sent_total 1" in text
    assert "spotguard_last_good_poll_age_seconds 7" in text


def test_health_turns_503_when_polls_go_stale():
    clock = Clock()
    metrics = Metrics(clock)
    server = MetricsServer(metrics, "127.0.0.1", 0, max_age=5)
    server.start()
    try:
        url = "http://{}:{}/healthz".format(*server.address)
        metrics.good_poll()
        assert requests.get(url, timeout=5).status_code == 200
        clock.now += 6
        answer = requests.get(url, timeout=5)
        assert answer.status_code == 503
        assert "stale" in answer.text
    finally:
        server.stop()


def test_json_logs_carry_extra_fields(capsys):
    configure_logging("json", "info")
    logging.getLogger("spotguard.test").warning("hello %s", "there", extra={"pid": 42})
    line = json.loads(capsys.readouterr().out.strip())
    assert line["msg"] == "hello there"
    assert line["pid"] == 42
    assert line["level"] == "warning"


def test_agent_speaks_sd_notify(sim, tmp_path: Path):
    """A real agent process sends READY=1, then WATCHDOG=1 pings, then STOPPING=1."""
    import subprocess

    address = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(address)
    listener.settimeout(10)
    env = {**os.environ, "NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000",
           "SPOTGUARD_METRICS_ADDRESS": "", "SPOTGUARD_POLL_INTERVAL": "5",
           "SPOTGUARD_MAX_BACKOFF": "5"}  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "spotguard", "agent", "--config", "/dev/null",
         "--imds-endpoint", sim.url, "--state-dir", str(tmp_path / "state")],
        env=env, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert listener.recv(256).decode() == "READY=1"
        # Pings every 0.2 s (half of WATCHDOG_USEC) although polls are 5 s apart: bounded in
        # polls, not in wall time. Ten pings come with at most two spot polls logged by the
        # simulator; pings tied to ticks (two per 5 s wait) would take five polls.
        pings = [listener.recv(256).decode() for _ in range(10)]  # each: a 10 s no-hang bound
        polls = len(sim.spot_polls())
        assert set(pings) == {"WATCHDOG=1"}
        assert 1 <= polls <= 2, f"{polls} spot polls for 10 watchdog pings"
        process.terminate()
        wait_for(lambda: listener.recv(256).decode() == "STOPPING=1", what="STOPPING=1")
        assert process.wait(10) == 0
    finally:
        process.kill()
        listener.close()


def test_notifier_is_a_no_op_outside_systemd():
    notifier = SystemdNotifier({})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    notifier.notify("READY=1")  # must not raise
    assert (
        SystemdNotifier({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}).watchdog_interval
        is None
    )  # the watchdog is someone else's
