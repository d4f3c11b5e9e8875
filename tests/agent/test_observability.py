"""Metrics exposition, health, log formats, and the systemd notify protocol."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
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


def healthz_status(port: int) -> int | None:
    try:
        return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code
    except requests.RequestException:  # refused, or (the squatter) accepted and never answered
        return None


def test_a_taken_metrics_port_leaves_the_agent_polling_until_it_frees(sim, agents):
    """The port is held by the test: the agent keeps polling and publishing notices, logs the
    problem once however often it retries, and serves metrics once the port is free."""
    with socket.create_server(("127.0.0.1", 0)) as squatter:
        port = squatter.getsockname()[1]
        agent = agents.start(sim.url, metrics_address=f"127.0.0.1:{port}")
        wait_for(lambda: "cannot listen" in agent.log(), what="the bind error to be logged")
        sim.control.spot()
        wait_for(
            lambda: (agent.notice() or {}).get("kind") == "spot-interruption",
            what="the notice while the port is taken",
        )
        # 25 polls 0.2 s apart span several bind retries (1 s, then 2 s, ... apart).
        polls = len(sim.spot_polls())
        wait_for(lambda: len(sim.spot_polls()) >= polls + 25, timeout=30, what="more polls")
        assert healthz_status(port) is None  # the squatter answers nothing
    wait_for(lambda: healthz_status(port) == 200, timeout=60, what="/healthz once the port frees")
    log = agent.log()
    assert log.count("cannot listen") == 1, log
    assert "metrics: listening on" in log
    assert agent.process.poll() is None


def slow_clients(port: int, count: int) -> list[socket.socket]:
    """``count`` connections that each send the start of a request line and nothing more."""
    clients = []
    for _ in range(count):
        client = socket.create_connection(("127.0.0.1", port), timeout=30)
        client.sendall(b"GET /metr")
        clients.append(client)
    return clients


def closed_by_server(client: socket.socket) -> bool:
    client.settimeout(0.01)
    try:
        return client.recv(1024) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def handler_threads() -> int:
    return sum("process_request_thread" in t.name for t in threading.enumerate())


def test_metrics_connections_are_capped_and_slow_ones_cut_off():
    """60 connections that never finish their request: the server runs at most its cap of 16
    handler threads, closes the rest at once, closes the slow ones at their 5 s deadline, and
    answers a scraper afterwards."""
    server = MetricsServer(Metrics(), "127.0.0.1", 0, max_age=30)
    server.start()
    assert server.address is not None
    port = server.address[1]
    clients = slow_clients(port, 60)
    try:
        most = 0

        def all_closed() -> bool:
            nonlocal most
            most = max(most, handler_threads())
            return all(closed_by_server(client) for client in clients)

        wait_for(all_closed, timeout=30, what="the server to close every slow connection")
        assert most <= 16, f"{most} handler threads for 60 slow clients"
        assert healthz_status(port) == 200
    finally:
        for client in clients:
            client.close()
        server.stop()


def test_a_dripping_metrics_client_is_cut_off_at_the_request_deadline():
    """A byte every 0.5 s resets any per-read timeout; the 5 s deadline for the whole request
    still closes the connection long before its 60 s request line is through."""
    server = MetricsServer(Metrics(), "127.0.0.1", 0, max_age=30)
    server.start()
    assert server.address is not None
    client = socket.create_connection(server.address, timeout=30)
    try:
        request = b"GET /" + b"m" * 120
        for sent, byte in enumerate(request):
            try:
                client.sendall(bytes([byte]))
            except OSError:
                break
            if closed_by_server(client):
                break
            time.sleep(0.5)
        assert sent < len(request) - 1, "the server waited for the whole dripped request"
    finally:
        client.close()
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
           "SPOTGUARD_METRICS_ADDRESS": "", "SPOTGUARD_POLL_INTERVAL": "20",
           "SPOTGUARD_MAX_BACKOFF": "20"}  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "spotguard", "agent", "--config", "/dev/null",
         "--imds-endpoint", sim.url, "--state-dir", str(tmp_path / "state")],
        env=env, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert listener.recv(256).decode() == "READY=1"
        # Pings every 0.2 s (half of WATCHDOG_USEC) although polls are 20 s apart: bounded in
        # polls, not in wall time. Ten pings come with at most two spot polls logged by the
        # simulator (a loaded machine would have to stretch the 2 s they take past 40 s);
        # pings tied to ticks (two per 20 s wait) would take five polls, or time out.
        pings = [listener.recv(256).decode() for _ in range(10)]  # each: a 10 s no-hang bound
        polls = len(wait_for(sim.spot_polls, what="the first spot poll"))
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


def test_plain_logs_escape_control_characters_everywhere(capsys):
    """Message, extra fields and a traceback's text each stay on lines of their own making."""
    configure_logging("plain", "info")
    forged = "\nINFO spotguard.agent.daemon: sent SIGKILL to pid 1"
    try:
        raise ValueError(forged)
    except ValueError:
        logging.getLogger("spotguard.test").exception("bad %s", forged, extra={"who": forged})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("ERROR spotguard.test: bad \\nINFO")
    assert "who=\\nINFO" in lines[0]
    assert all(line.startswith("  | ") for line in lines[1:])
    assert not any(line.startswith("INFO") for line in lines)
