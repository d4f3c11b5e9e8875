"""The agent as systemd runs it: a real process, IMDS over HTTP, real targets and signals."""

from __future__ import annotations

import itertools
import json
import re
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread
from typing import ClassVar

import pytest

from spotguard.imds.simulator import ImdsSimulator
from spotguard.protocol import parse_time
from tests.agent.support import wait_polls
from tests.conftest import free_port
from tests.support import wait_for

#: The poll interval the agent fixture configures.
INTERVAL = 0.2


def notice_kind(agent) -> str | None:
    notice = agent.notice()
    return notice["kind"] if notice else None


def assert_no_busy_loop(times: list[float], per_tick: int = 1) -> None:
    """Never a busy loop or a double poll: no more requests than ticks fit between the first
    and the last (plus two), ``per_tick`` each.

    Counted, not spaced: the agent keeps a fixed rate, so the tick after a late one comes
    sooner than the poll interval (at once, when it is a whole interval late)."""
    span = times[-1] - times[0] if times else 0.0
    allowed = (span / INTERVAL + 2) * per_tick
    assert len(times) <= allowed, f"{len(times)} requests where {allowed:.0f} fit: {times}"


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
    wait_polls(sim, 5)  # nothing else may happen
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
    wait_polls(sim, 3)
    assert target.signals() == ["SIGUSR1"]
    assert newcomer.signals() == ["SIGUSR1"]
    assert second.log().count("notice: spot-interruption") == 0  # already handled


@pytest.mark.parametrize(
    "fast_watches", [False, True], ids=["without-fast-watches", "with-fast-watches"]
)
def test_polls_keep_the_poll_interval(sim, agents, fast_watches):
    """The spot watch is polled on every tick (every 0.2 s), with or without the ASG and
    maintenance watches polled at the same interval, and never faster than the interval.

    Counted in gaps between polls, not against a wall-time rate: at least four in five gaps
    between spot polls are one interval long (at most 1.5). A tick that runs late, however
    late, leaves one longer gap (the fixed rate catches up at the next); ticks that skip a
    watch due "now" (woken a little earlier than the last) double a third to two thirds of
    them (test_watches.py checks that case on a clock of its own).
    Between the first and last poll of the rebalance watch (every 2.0 s, ten ticks) the fast
    watches, when on, keep pace with spot (within one poll), and when off are never polled.
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

    def between(suffix: str) -> list[float]:
        return [r["time"] for r in requests
                if first <= r["time"] <= last and r["path"].endswith(suffix)]  # fmt: skip

    spot = between("spot/instance-action")
    gaps = [b - a for a, b in itertools.pairwise(spot)]
    on_time = sum(gap <= 1.5 * INTERVAL for gap in gaps)
    assert on_time >= 0.8 * len(gaps), f"{on_time} of {len(gaps)} gaps on time: {gaps}"
    for watch in ("asg", "maintenance"):
        if fast_watches:
            polled = len(between(paths[watch]))
            assert abs(polled - len(spot)) <= 1, (watch, polled, len(spot))
        else:
            assert polls_of(paths[watch]) == [], f"the {watch} watch is off"
    assert_no_busy_loop([r["time"] for r in sim.spot_polls()])


def test_token_expiry_mid_run_is_survived(sim, agents, targets):
    agent = agents.start(sim.url, token_ttl=21600)
    target = targets(agent.state_dir)
    wait_for(lambda: len(sim.spot_polls()) >= 3, what="a few polls")
    sim.control.fault(expire_tokens=True)
    wait_polls(sim, 2)  # polled with a dead token
    sim.control.spot()
    wait_for(lambda: target.signals(), what="the signal after the token expired")
    statuses = [(r["method"], r["status"]) for r in sim.control.requests()]
    first_401 = statuses.index(("GET", 401))
    assert ("PUT", 200) in statuses[first_401:], "the agent did not fetch a new token"


def test_short_token_ttl_is_renewed_before_it_expires(sim, agents):
    """A 6 s token is renewed 0.6 s before it runs out (a tenth of its life): a second token
    comes before any poll is refused, and not before the first has served for most of its
    life (renewing at every poll would pass the first check). Waited for, not slept: without
    renewal the second token would come only after a 401."""
    agents.start(sim.url, token_ttl=6)

    def tokens() -> list[float]:
        return [r["time"] for r in sim.control.requests() if r["method"] == "PUT"]

    wait_for(lambda: len(tokens()) >= 2, timeout=30, what="a second token")
    assert [r for r in sim.control.requests() if r["status"] == 401] == []
    first, second = tokens()[:2]
    assert second - first >= 3.0, "renewed long before the token's end"
    assert len([r for r in sim.spot_polls() if first < r["time"] < second]) >= 5


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
    # The agent's own word that a poll failed (garbage: unreadable, for each watch apart).
    wait_for(lambda: re.search("no usable answer|cannot read", agent.log()), what="a failure")
    sim.control.spot()
    if "latency" not in fault:  # (a request that timed out is not recorded by the simulator)
        seen = len(sim.control.requests())
        wait_for(lambda: len(sim.control.requests()) >= seen + 4, what="polls failing on")
    assert agent.notice() is None, "a failing IMDS must never look like a notice"
    assert target.signals() == []
    failing = [r["time"] for r in sim.control.requests()]
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
    # Never a hot loop while IMDS failed: at most a token request per watch and tick. (A
    # request that timed out is not logged by the simulator: the timeout paces those.)
    if "latency" not in fault:
        assert_no_busy_loop(failing, per_tick=4)
    assert agent.process.poll() is None


def test_imds_unreachable_at_start_up(agents, targets, port):
    agent = agents.start(f"http://127.0.0.1:{port}")
    target = targets(agent.state_dir)
    wait_for(lambda: "IMDS gave no usable answer" in agent.log(), what="the failure logged")
    assert agent.process.poll() is None
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
    wait_polls(sim, 4)
    assert target.signals() == []
    sim.control.spot()
    wait_for(lambda: target.signals(), what="the spot signal")
    assert notice_kind(agent) == "spot-interruption"  # interruption outranks rebalance


def test_scheduled_maintenance_waits_for_its_lead_time(sim, agents, targets):
    """Acted on 2 s before NotBefore, not when first seen: the agent saw the event (two
    polls) well before its lead time started, and signalled only after."""
    agent = agents.start(sim.url, maintenance_lead=2.0)
    target = targets(agent.state_dir, exit_code=None)
    sim.control.maintenance(code="system-reboot", not_before_in=86400, event_id="far")
    wait_polls(sim, 3)  # the maintenance watch is polled at the same ticks
    assert agent.notice() is None
    assert target.signals() == []

    scheduled = time.time()
    sim.control.maintenance(code="instance-stop", not_before_in=6, event_id="soon")
    served = time.time()
    lead_starts = scheduled + 6 - 1 - 2  # at the earliest: NotBefore has one-second resolution
    wait_for(lambda: target.signals(), timeout=30, what="the maintenance signal")
    signalled = next(e["time"] for e in target.events() if e["event"] == "signal")
    assert signalled >= lead_starts
    # ... and at the first ticks once it has started, not seconds later (counted in polls: the
    # lead starts at served + 4 s at the latest, NotBefore being at most served + 6 s).
    late = [
        r for r in sim.control.requests()
        if r["path"].endswith("events/maintenance/scheduled") and served + 4 < r["time"] < signalled
    ]  # fmt: skip
    assert len(late) <= 3, f"{len(late)} polls between the lead time's start and the signal"
    seen_before = [
        r for r in sim.control.requests()
        if r["path"].endswith("events/maintenance/scheduled") and served < r["time"] < lead_starts
    ]  # fmt: skip
    assert len(seen_before) >= 2, "the agent never saw the event before its lead time"
    notice = agent.notice()
    assert notice["kind"] == "scheduled-maintenance"
    assert notice["id"] == "scheduled-maintenance/soon"
    assert notice["action"] == "instance-stop"


def test_asg_termination_signals(sim, agents, targets):
    agent = agents.start(sim.url)
    target = targets(agent.state_dir)
    sim.control.lifecycle("InService")
    wait_polls(sim, 3)  # the ASG watch is polled at the same ticks
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
    wait_polls(sim, 3)
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
