"""Notices end: withdrawn by IMDS or expired, they leave notice.json and stop no one new; and
what lies in the state dir, or comes from IMDS, cannot stop or mislead the agent."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import psutil
import pytest

from spotguard.agent.notices import ActiveNotices
from spotguard.protocol import Notice, parse_time
from tests.agent.support import wait_polls
from tests.support import wait_for

MIB = 1024 * 1024


def kind_of(agent) -> str | None:
    notice = agent.notice()
    return notice["kind"] if notice else None


WITHDRAWALS = {
    "spot-interruption": (lambda c: c.spot(), lambda c: c.clear_spot()),
    "asg-termination": (lambda c: c.lifecycle("Terminated"), lambda c: c.clear_lifecycle()),
    "scheduled-maintenance": (
        lambda c: c.maintenance(not_before_in=600, event_id="ev-1"),
        lambda c: c.cancel_maintenance("ev-1"),
    ),
    "rebalance-recommendation": (lambda c: c.rebalance(), lambda c: c.clear_rebalance()),
}


@pytest.mark.parametrize("kind", list(WITHDRAWALS))
def test_a_withdrawn_notice_leaves_the_file_and_stops_no_newcomer(sim, agents, targets, kind):
    schedule, withdraw = WITHDRAWALS[kind]
    agent = agents.start(sim.url, maintenance_lead=900)
    schedule(sim.control)
    wait_for(lambda: kind_of(agent) == kind, what=f"the {kind} notice")
    withdraw(sim.control)
    wait_for(lambda: agent.notice() is None, what="notice.json to be removed")
    assert f"notice {kind}/" in agent.log()
    assert "withdrawn by IMDS" in agent.log()

    newcomer = targets(agent.state_dir, exit_code=None)
    wait_polls(sim, 5)
    assert newcomer.signals() == []
    assert newcomer.received("notice") == []


def test_the_file_falls_back_to_the_next_most_urgent_notice(sim, agents):
    agent = agents.start(sim.url, maintenance_lead=900)
    sim.control.rebalance()
    sim.control.maintenance(not_before_in=600, event_id="ev-2")
    wait_for(lambda: kind_of(agent) == "scheduled-maintenance", what="the maintenance notice")
    sim.control.cancel_maintenance("ev-2")
    wait_for(lambda: kind_of(agent) == "rebalance-recommendation", what="the rebalance again")
    sim.control.clear_rebalance()
    wait_for(lambda: agent.notice() is None, what="notice.json to be removed")


def test_a_notice_expires_a_grace_period_after_its_deadline(sim, agents, targets):
    agent = agents.start(sim.url, maintenance_lead=900, notice_grace=1.0)
    early = targets(agent.state_dir, exit_code=None)
    sim.control.maintenance(not_before_in=2, event_id="soon")  # still served after NotBefore
    wait_for(lambda: early.signals() == ["SIGUSR1"], what="the signal before the deadline")
    wait_for(lambda: agent.notice() is None, what="the notice to expire")
    assert "notice scheduled-maintenance/soon expired" in agent.log()

    newcomer = targets(agent.state_dir, exit_code=None)
    wait_polls(sim, 5)
    assert newcomer.signals() == []
    assert agent.notice() is None  # not taken up again although IMDS still serves it


def test_a_notice_first_seen_long_past_its_deadline_is_never_active(sim, agents, targets):
    sim.control.maintenance(not_before_in=-60, event_id="old")
    agent = agents.start(sim.url, maintenance_lead=900, notice_grace=10.0)
    target = targets(agent.state_dir, exit_code=None)
    wait_polls(sim, 5)
    assert agent.notice() is None
    assert target.signals() == []


def test_a_stale_notice_file_is_removed_once_imds_has_answered(sim, agents, tmp_path):
    state_dir = tmp_path / "state"
    first = agents.start(sim.url, state_dir=state_dir)
    sim.control.spot()
    wait_for(lambda: first.notice(), what="the notice")
    assert first.stop() == 0
    sim.control.clear_spot()  # withdrawn while no agent ran
    second = agents.start(sim.url, state_dir=state_dir)
    wait_for(lambda: second.notice() is None, what="the stale notice.json to go")


def test_whatever_lies_in_the_state_dir_cannot_stop_the_agent(sim, agents, targets, tmp_path):
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    outside = tmp_path / "outside.txt"
    outside.write_text("untouched")
    os.mkfifo(state_dir / "agent-state.json")  # would block a plain open() forever
    (state_dir / "notice.json").symlink_to(outside)  # would be written through
    (state_dir / "agent.sock").mkdir()  # a directory where the socket goes
    (state_dir / "agent.sock" / "junk").write_text("x")
    with (state_dir / "huge").open("wb") as huge:
        huge.truncate(8 << 30)  # sparse: 8 GiB that take no disk
    targets_dir = state_dir / "targets"  # version 1's world-writable registrations
    targets_dir.mkdir()
    os.mkfifo(targets_dir / "2.json")
    (targets_dir / "3.json").write_text("[" * 100000)
    for index in range(2000):
        (targets_dir / f"junk-{index}.json").write_text("{}")
    state_dir.chmod(0o777)

    agent = agents.start(sim.url, state_dir=state_dir)
    target = targets(state_dir, exit_code=None)
    sim.control.spot()
    wait_for(lambda: target.signals() == ["SIGUSR1"], what="the signal")
    wait_for(lambda: kind_of(agent) == "spot-interruption", what="the notice file")
    assert outside.read_text() == "untouched"
    assert not (state_dir / "notice.json").is_symlink()
    assert not targets_dir.exists()
    assert oct(state_dir.stat().st_mode & 0o777) == "0o755"
    assert oct((state_dir / "agent.sock").stat().st_mode & 0o777) == "0o666"
    assert psutil.Process(agent.process.pid).memory_info().rss <= 30 * MIB
    assert "agent-state.json is unreadable" in agent.log()


def test_a_newline_in_imds_data_cannot_forge_a_log_line(sim, agents, targets):
    forged = "INFO spotguard.agent.daemon: sent SIGKILL to pid 1"
    agent = agents.start(sim.url, log_format="plain", maintenance_lead=900)
    sim.control.maintenance(code=f"system-reboot\n{forged}\r\x1b[2K", not_before_in=600)
    wait_for(lambda: "notice: scheduled-maintenance" in agent.log(), what="the notice log")
    lines = agent.log().splitlines()
    assert not any(line.startswith(forged) for line in lines)
    assert any("system-reboot\\nINFO" in line for line in lines)


def notice_id(agent) -> str | None:
    notice = agent.notice()
    return notice["id"] if notice else None


def logged_at(agent, matches: Callable[[dict[str, Any]], bool]) -> float:
    """When the agent logged the first (JSON) line that ``matches``, by its own clock: what it
    did when, however late the test looks."""
    for line in agent.log().splitlines():
        if line.startswith("{") and matches(entry := json.loads(line)):
            return parse_time(entry["ts"]).timestamp()
    raise AssertionError("the agent never logged such a line")


def test_maintenance_lasts_until_not_after_and_the_next_due_event_follows(sim, agents):
    """AWS may act until NotAfter: the notice stays until then (plus the grace period), not
    NotBefore; and once it is over, a second due event that IMDS serves takes its place.

    Timed by the agent's log, not by when the test looks: the first event ends no earlier
    than its NotAfter (4 s after its NotBefore, 8 times the grace period), and notice.json
    shows it until the second event takes its place."""
    agent = agents.start(sim.url, maintenance_lead=900, notice_grace=0.5)
    scheduled = time.time()
    sim.control.maintenance(event_id="first", not_before_in=1, not_after_in=5)
    sim.control.maintenance(event_id="second", not_before_in=3, not_after_in=600)
    first, second = "scheduled-maintenance/first", "scheduled-maintenance/second"
    wait_for(lambda: notice_id(agent) == first, what="the first event")
    shown = []

    def second_shown() -> bool:
        shown.append(notice_id(agent))
        return shown[-1] == second

    wait_for(second_shown, timeout=30, what="the second event")
    assert set(shown) == {first, second}, shown  # no gap, nothing else in between
    ended = logged_at(agent, lambda entry: f"notice {first} expired" in entry["msg"])
    # NotAfter is whole seconds: at most 1 s before scheduled + 5.
    assert ended >= scheduled + 5 - 1, f"ended {ended - scheduled:.1f} s after scheduling"
    began = logged_at(
        agent, lambda entry: entry["msg"].startswith("notice:") and entry.get("notice_id") == second
    )
    assert began >= ended


def test_a_deadline_at_the_end_of_the_calendar_is_a_notice_not_a_crash():
    """IMDS said year 9999: adding the grace period to it overflowed and failed every tick."""
    notices = ActiveNotices(300.0)
    now = datetime.now(timezone.utc)
    far = Notice("spot-interruption", "terminate", datetime.max.replace(tzinfo=timezone.utc),
                 now, key="9999")  # fmt: skip
    assert notices.is_new(far, now)
    assert not notices.ended(far, now)


#: How long the agent remembers a notice no longer active (6 h by default): much longer than a
#: gap of a few polls takes, even on a loaded machine.
MEMORY = 5.0
#: Run in the agent process.
SHORT_MEMORY = f"import spotguard.agent.state as state; state.KEEP_INACTIVE = {MEMORY}"


def went_inactive(agent, notice_id: str) -> datetime | None:
    """When the agent saved ``notice_id`` as no longer active (None while it is active)."""
    try:
        saved = json.loads((agent.state_dir / "agent-state.json").read_text())
    except FileNotFoundError:
        return None
    since = saved["notices"].get(notice_id, {}).get("inactive_since")
    return parse_time(since) if since else None


def test_a_notice_that_comes_back_twice_is_still_not_news(sim, agents, targets):
    """A maintenance notice missing from IMDS for a moment, twice, further apart than the time
    an inactive notice is remembered: it is handled once (one "notice:" line, one signal), as
    the memory counts from when it last went inactive, not from the first time.

    The second gap starts a memory after the agent saved the first (its own clock), so a
    memory counted from there has run out; each gap lasts a few polls, far below it."""
    agent = agents.start(sim.url, maintenance_lead=900, preamble=SHORT_MEMORY)
    trainer = targets(agent.state_dir, exit_code=None)

    def serve() -> None:
        sim.control.maintenance(not_before_in=600, event_id="ev-9")
        wait_for(lambda: kind_of(agent) == "scheduled-maintenance", what="the notice")

    def withdraw() -> float:
        sim.control.cancel_maintenance("ev-9")
        wait_for(lambda: agent.notice() is None, what="the notice to go")
        return time.monotonic()

    serve()
    wait_for(lambda: trainer.signals() == ["SIGUSR1"], what="the signal")
    started = withdraw()
    first = wait_for(lambda: went_inactive(agent, "scheduled-maintenance/ev-9"),
                     what="the first gap saved")  # fmt: skip
    serve()
    gaps = [time.monotonic() - started]  # as the test saw them, for the failure message
    time.sleep(max(0.0, first.timestamp() + MEMORY + 0.5 - time.time()))
    started = withdraw()
    serve()
    gaps.append(time.monotonic() - started)
    wait_polls(sim, 5)
    assert agent.log().count('"notice: scheduled-maintenance') == 1, (gaps, agent.log())
    assert trainer.signals() == ["SIGUSR1"]
