"""The agent as systemd runs it: a real process, IMDS over HTTP, real targets and signals."""

from __future__ import annotations

import itertools
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread
from typing import ClassVar

import pytest

from spotguard.imds.simulator import ImdsSimulator
from spotguard.protocol import parse_time
from tests.conftest import free_port
from tests.support import wait_for


def notice_kind(agent) -> str | None:
    notice = agent.notice()
    return notice["kind"] if notice else None


def test_spot_notice_signals_registered_target_and_logs_its_exit(sim, agents, targets):
    agent = agents.start(sim.url)
    target = targets(agent.state_dir)
    deadline = sim.control.spot(in_seconds=120)

    wait_for(lambda: target.process.poll() is not None, what="the target to exit")
    assert target.signals() == ["SIGUSR1"]
    assert target.process.returncode == 75
    notice = agent.notice()
    assert notice["kind"] == "spot-interruption"
    assert notice["action"] == "terminate"
    assert notice["deadline"] == deadline.replace("Z", ".000Z")
    assert notice["id"] == f"spot-interruption/{notice['deadline']}"
    assert oct((agent.state_dir / "notice.json").stat().st_mode & 0o777) == "0o644"
    wait_for(lambda: "signal, exit code 75" in agent.log(), what="the agent to log the exit code")
    # Told over the socket too, with the same notice as the file; registered with its own pid.
    assert [m["id"] for m in target.received("notice")] == [notice["id"]]
    assert target.received("registered")[0]["pid"] == target.pid
    assert "reports exit code 75 at step 7" in agent.log()


def test_unregistered_twin_and_a_closed_registration_are_never_signalled(sim, agents, targets):
    agent = agents.start(sim.url)
    registered = targets(agent.state_dir, exit_code=None)
    twin = targets(agent.state_dir, register=False, exit_code=None)  # same command line
    # Registered, then hung up while it runs on: a registration lives as long as its connection.
    hung_up = targets(agent.state_dir, exit_code=None, extra=("--once",))
    wait_for(lambda: f"pid {hung_up.pid} disconnected" in agent.log(), what="the hang-up")

    sim.control.spot()
    wait_for(lambda: registered.signals(), what="the registered target's signal")
    time.sleep(1.0)  # several more polls: nothing else may happen
    assert registered.signals() == ["SIGUSR1"]
    assert twin.signals() == []
    assert hung_up.signals() == []
    assert twin.process.poll() is None
    assert hung_up.process.poll() is None


def test_restarted_agent_does_not_signal_again_but_signals_newcomers(sim, agents, targets):
    first = agents.start(sim.url)
    target = targets(first.state_dir, exit_code=None)
    sim.control.spot()
    wait_for(lambda: target.signals(), what="the first signal")
    assert first.stop() == 0

    wait_for(lambda: target.received("disconnected"), what="the hang-up of the stopped agent")

    second = agents.start(sim.url, state_dir=first.state_dir)
    newcomer = targets(first.state_dir, exit_code=None)
    wait_for(lambda: newcomer.signals(), what="the newcomer's signal")
    # The first target reconnected by itself and was told again, but not signalled again.
    wait_for(lambda: len(target.received("registered")) == 2, what="the first to reconnect")
    wait_for(lambda: len(target.received("notice")) == 2, what="the notice pushed again")
    time.sleep(0.6)
    assert target.signals() == ["SIGUSR1"]
    assert newcomer.signals() == ["SIGUSR1"]
    assert second.log().count("notice: spot-interruption") == 0  # already handled


@pytest.mark.parametrize(
    "fast_watches", [False, True], ids=["without-fast-watches", "with-fast-watches"]
)
def test_polls_keep_the_poll_interval(sim, agents, fast_watches):
    """The spot watch is polled on every tick (every 0.2 s), with or without the ASG and
    maintenance watches polled at the same interval, and never faster than the interval.

    Bounded in polls, not in wall time: the rebalance watch, every 2.0 s (ten ticks), is
    the reference. Between its first and last poll, spot must be polled at least 7 times
    per rebalance interval (10 when on time; a spot interval that doubled, e.g. by ticks
    that skip a watch due "now", gives 5). The fast watches, when on, keep pace with spot
    (within one poll), and when off are never polled.
    """
    paths = {
        "asg": "autoscaling/target-lifecycle-state",
        "maintenance": "events/maintenance/scheduled",
        "rebalance": "events/recommendations/rebalance",
    }
    agents.start(
        sim.url,
        rebalance_interval=2.0,
        watch_asg_termination=fast_watches,
        watch_scheduled_maintenance=fast_watches,
    )

    def polls_of(suffix: str) -> list[float]:
        return [r["time"] for r in sim.control.requests() if r["path"].endswith(suffix)]

    wait_for(lambda: len(polls_of(paths["rebalance"])) >= 4, timeout=60, what="4 rebalance polls")
    requests = sim.control.requests()
    rebalance = [r["time"] for r in requests if r["path"].endswith(paths["rebalance"])]
    first, last = rebalance[0], rebalance[-1]

    def between(suffix: str) -> int:
        return sum(first <= r["time"] <= last and r["path"].endswith(suffix) for r in requests)

    spot = between("spot/instance-action")
    intervals = len(rebalance) - 1
    assert spot >= 7 * intervals, (spot, intervals)
    for watch in ("asg", "maintenance"):
        if fast_watches:
            assert abs(between(paths[watch]) - spot) <= 1, (watch, between(paths[watch]), spot)
        else:
            assert polls_of(paths[watch]) == [], f"the {watch} watch is off"
    # Never a hot loop: no two spot polls closer than (most of) the poll interval.
    times = [r["time"] for r in sim.spot_polls()]
    assert min(b - a for a, b in itertools.pairwise(times)) >= 0.15, times


def test_token_expiry_mid_run_is_survived(sim, agents, targets):
    agent = agents.start(sim.url, token_ttl=21600)
    target = targets(agent.state_dir)
    wait_for(lambda: len(sim.spot_polls()) >= 3, what="a few polls")
    sim.control.fault(expire_tokens=True)
    time.sleep(0.5)
    sim.control.spot()
    wait_for(lambda: target.signals(), what="the signal after the token expired")
    statuses = [(r["method"], r["status"]) for r in sim.control.requests()]
    first_401 = statuses.index(("GET", 401))
    assert ("PUT", 200) in statuses[first_401:], "the agent did not fetch a new token"


def test_short_token_ttl_is_renewed_before_it_expires(sim, agents):
    agents.start(sim.url, token_ttl=1)
    time.sleep(2.5)
    requests = sim.control.requests()
    assert [r for r in requests if r["status"] == 401] == []
    assert sum(r["method"] == "PUT" for r in requests) >= 2


@pytest.mark.parametrize(
    "fault",
    [{"status": 500}, {"status": 503}, {"latency": 0.8}, {"garbage": -1}, {"drop": -1}],
    ids=["500", "503", "timeout", "garbage", "dropped"],
)
def test_imds_failing_then_serving_a_notice_is_detected_within_two_polls(
    sim, agents, targets, fault
):
    sim.control.fault(**fault)
    agent = agents.start(sim.url)
    target = targets(agent.state_dir)
    time.sleep(1.5)
    sim.control.spot()
    assert agent.notice() is None, "a failing IMDS must never look like a notice"
    assert target.signals() == []
    failing = sim.spot_polls()
    recovered_at = time.time()
    sim.control.fault(clear=True)

    wait_for(lambda: target.signals(), what="the signal after recovery")
    noticed_at = next(e["time"] for e in target.events() if e["event"] == "signal")
    served = [
        r
        for r in sim.spot_polls()
        if r["status"] == 200 and recovered_at <= r["time"] <= noticed_at
    ]
    assert 1 <= len(served) <= 2
    # Never a hot loop: while IMDS failed, polls were no closer than the poll interval.
    times = [r["time"] for r in failing]
    assert all(b - a >= 0.15 for a, b in itertools.pairwise(times)), times
    assert agent.process.poll() is None


def test_imds_unreachable_at_start_up(agents, targets, port):
    agent = agents.start(f"http://127.0.0.1:{port}")
    target = targets(agent.state_dir)
    time.sleep(1.0)
    assert agent.process.poll() is None
    assert "IMDS gave no usable answer" in agent.log()
    with ImdsSimulator(port=port) as late_sim:
        from spotguard.imds.sim_control import SimControl

        SimControl(late_sim.url).spot()
        wait_for(lambda: target.signals(), what="the signal once IMDS is up")
    assert "IMDS answers again" in agent.log()


def test_rebalance_updates_the_notice_file_only(sim, agents, targets):
    agent = agents.start(sim.url)
    target = targets(agent.state_dir, exit_code=None)
    sim.control.rebalance()
    wait_for(lambda: notice_kind(agent) == "rebalance-recommendation", what="rebalance notice")
    time.sleep(0.8)
    assert target.signals() == []
    sim.control.spot()
    wait_for(lambda: target.signals(), what="the spot signal")
    assert notice_kind(agent) == "spot-interruption"  # interruption outranks rebalance


def test_scheduled_maintenance_waits_for_its_lead_time(sim, agents, targets):
    agent = agents.start(sim.url, maintenance_lead=2.0)
    target = targets(agent.state_dir, exit_code=None)
    sim.control.maintenance(code="system-reboot", not_before_in=86400, event_id="far")
    time.sleep(0.8)
    assert agent.notice() is None
    assert target.signals() == []

    sim.control.maintenance(code="instance-stop", not_before_in=4, event_id="soon")
    scheduled = time.time()
    time.sleep(0.8)  # > 2 s before the lead time starts: still nothing
    assert agent.notice() is None
    wait_for(lambda: target.signals(), timeout=8, what="the maintenance signal")
    signalled = next(e["time"] for e in target.events() if e["event"] == "signal")
    assert signalled >= scheduled + 4 - 2 - 1.0  # NotBefore has one-second resolution
    notice = agent.notice()
    assert notice["kind"] == "scheduled-maintenance"
    assert notice["id"] == "scheduled-maintenance/soon"
    assert notice["action"] == "instance-stop"


def test_asg_termination_signals(sim, agents, targets):
    agent = agents.start(sim.url)
    target = targets(agent.state_dir)
    sim.control.lifecycle("InService")
    time.sleep(0.5)
    assert target.signals() == []
    sim.control.lifecycle("Terminated")
    wait_for(lambda: target.signals() == ["SIGUSR1"], what="the ASG signal")
    assert notice_kind(agent) == "asg-termination"


def test_command_line_selector_signals_only_matching_processes(sim, agents, targets):
    agent = agents.start(sim.url, target_patterns=["target_proc.py .*--tag selected-run"])
    chosen = targets(agent.state_dir, register=False, tag="selected-run")
    other = targets(agent.state_dir, register=False, exit_code=None, tag="other-run")
    sim.control.spot()
    wait_for(lambda: chosen.signals(), what="the selected process's signal")
    time.sleep(0.5)
    assert other.signals() == []


class _Webhook(BaseHTTPRequestHandler):
    received: ClassVar[list[dict]] = []
    failures_left = 2

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).received.append(body)
        status = 503 if type(self).failures_left > 0 else 200
        type(self).failures_left -= 1
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_hook_and_webhook_run_once_per_notice_without_leaking_the_url(
    sim, agents, targets, tmp_path
):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Webhook)
    Thread(target=server.serve_forever, daemon=True).start()
    secret_url = f"http://127.0.0.1:{server.server_address[1]}/hooks/T0SECRET/XYZ?token=s3cr3t"
    hook_out = tmp_path / "hook.out"
    hook = [
        sys.executable, "-c",
        "import os, sys, pathlib; pathlib.Path(sys.argv[1]).write_text("
        "sys.stdin.read() + '|' + os.environ['SPOTGUARD_NOTICE_KIND'])",
        str(hook_out),
    ]  # fmt: skip
    agent = agents.start(
        sim.url, hook_command=hook, webhook_url=secret_url, webhook_retries=3, log_level="debug"
    )
    sim.control.spot()
    wait_for(lambda: hook_out.exists(), what="the hook to run")
    payload, kind = hook_out.read_text().split("|")
    assert json.loads(payload)["kind"] == kind == "spot-interruption"
    wait_for(lambda: len(_Webhook.received) == 3, what="the webhook retries")
    assert {body["kind"] for body in _Webhook.received} == {"spot-interruption"}
    wait_for(lambda: "answered 200" in agent.log(), what="the webhook success log")
    assert "T0SECRET" not in agent.log()
    assert "s3cr3t" not in agent.log()
    server.shutdown()


def test_metrics_and_health_endpoints(sim, agents, targets):
    import requests

    address = f"127.0.0.1:{free_port()}"
    agent = agents.start(sim.url, metrics_address=address, health_max_age=1.0)
    target = targets(agent.state_dir)
    sim.control.spot(in_seconds=100)
    wait_for(lambda: target.process.poll() is not None, what="the target to exit")
    wait_for(lambda: "signal, exit code 75" in agent.log(), what="the exit to be seen")
    metrics = requests.get(f"http://{address}/metrics", timeout=5).text
    assert 'spotguard_notices_total{kind="spot-interruption"} 1' in metrics
    assert "spotguard_signals_sent_total 1" in metrics
    assert "spotguard_targets_running 0" in metrics
    lead = next(line for line in metrics.splitlines() if "notice_lead_time_seconds{" in line)
    # The lead time is the notice's deadline minus when the agent noticed it (no assumption
    # about how soon that was); at most the 100 s the notice was set for.
    notice = agent.notice()
    noticed_lead = (
        parse_time(notice["deadline"]) - parse_time(notice["noticed_at"])
    ).total_seconds()
    assert float(lead.split()[-1]) == pytest.approx(noticed_lead, abs=0.01)
    assert 0 < noticed_lead <= 100
    assert requests.get(f"http://{address}/healthz", timeout=5).status_code == 200

    sim.control.fault(status=503)
    wait_for(
        lambda: requests.get(f"http://{address}/healthz", timeout=5).status_code == 503,
        what="health to turn bad",
    )
    metrics = requests.get(f"http://{address}/metrics", timeout=5).text
    assert 'spotguard_imds_errors_total{reason="unreachable"}' in metrics


def test_agent_survives_a_broken_state_file(sim, agents, tmp_path):
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "agent-state.json").write_text("{not json")
    agent = agents.start(sim.url, state_dir=state_dir)
    sim.control.spot()
    wait_for(lambda: agent.notice(), what="the notice file")
    assert (state_dir / "agent-state.corrupt").exists()
    assert "unreadable" in agent.log()


def test_bad_config_is_one_line_and_exit_2(tmp_path: Path):
    import subprocess

    bad = tmp_path / "agent.toml"
    bad.write_text("poll_interval = -1\n")
    result = subprocess.run(
        [sys.executable, "-m", "spotguard", "agent", "--config", str(bad)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "poll_interval" in result.stderr
