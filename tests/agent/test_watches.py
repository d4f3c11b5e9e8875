"""The agent polls the watches its config enables, at the intervals it asks for."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from spotguard.agent.config import AgentConfig
from spotguard.agent.daemon import Agent
from spotguard.agent.watches import guarded, watches_from_config
from spotguard.errors import ImdsBadAnswer
from spotguard.imds.parsers import evaluate_spot_action
from spotguard.protocol import Notice
from tests.agent.support import wait_polls
from tests.support import Sim, wait_for

NOW = datetime(2026, 11, 29, 8, 20, tzinfo=timezone.utc)


def test_watches_follow_the_config():
    config = AgentConfig(watch_rebalance=False, asg_interval=0.5, poll_interval=1.0)
    watches = {w.name: w for w in watches_from_config(config)}
    assert "rebalance-recommendation" not in watches
    assert watches["spot-interruption"].interval == 1.0
    assert watches["asg-termination"].interval == 1.0  # never faster than the poll interval
    assert watches["scheduled-maintenance"].interval == 60.0


class QuietImds:
    """An IMDS client double that answers 404 (no notice) and counts the paths asked."""

    def __init__(self) -> None:
        self.polled: Counter[str] = Counter()

    def get(self, path: str) -> None:
        self.polled[path.rsplit("/", 1)[-1]] += 1


def test_each_tick_polls_every_watch_due_however_late_it_woke(tmp_path: Path):
    """Ticks come at a fixed rate, each woken a little late, by a different amount: a watch
    due "now" at a tick that woke earlier than the last (0.09 s, then 0 s late) is polled all
    the same; skipped, its interval would double. Clocked here, not by the machine: the end
    to end cadence test (test_agent_e2e.py) can only count what a loaded machine allows."""
    config = AgentConfig(state_dir=tmp_path, poll_interval=0.2, rebalance_interval=2.0,
                         maintenance_interval=0.2, asg_interval=0.2)  # fmt: skip
    imds, clock = QuietImds(), [0.0]
    agent = Agent(config, client=imds, clock=lambda: clock[0])  # type: ignore[arg-type]
    for tick in range(100):
        clock[0] = 1000.0 + 0.2 * tick + (0.09 if tick % 2 == 0 else 0.0)
        agent.tick()
    assert imds.polled == {
        "instance-action": 100,
        "target-lifecycle-state": 100,
        "scheduled": 100,
        "rebalance": 10,  # every ten ticks
    }
    assert agent.failures == 0


def test_whatever_a_parser_raises_is_a_bad_answer_for_that_watch():
    def broken(body: str | None, now: datetime) -> Notice | None:
        raise OverflowError("date value out of range")

    with pytest.raises(ImdsBadAnswer, match=r"scheduled-maintenance.*OverflowError"):
        guarded("scheduled-maintenance", broken)("[]", NOW)
    with pytest.raises(ImdsBadAnswer, match="not JSON"):  # its own errors pass unchanged
        guarded("spot-interruption", evaluate_spot_action)("{", NOW)
    assert guarded("spot-interruption", evaluate_spot_action)(None, NOW) is None


def serve_raw(sim: Sim, **state: Any) -> None:
    """Put answers in the simulator that its control API cannot write: it formats the times it
    is given itself (and ``%Y`` leaves year 1 unpadded on glibc)."""
    with sim.server._lock:
        for name, value in state.items():
            setattr(sim.server._state, name, value)


@pytest.mark.parametrize("broken", ["spot-year-1", "maintenance-year-1", "lifecycle-garbage"])
def test_one_watch_with_a_bad_answer_leaves_the_others_working(sim, agents, broken):
    """Through the simulator over HTTP: one watch gets a year-1 time or garbage, and the
    rebalance watch (polled after the others) still sees its notice."""
    if broken == "spot-year-1":  # converting it to UTC overflows
        serve_raw(sim, spot={"action": "terminate", "time": "0001-01-01T00:00:00+01:00"})
    elif broken == "maintenance-year-1":  # NotBefore minus the lead overflows
        event = {"Code": "system-reboot", "EventId": "instance-event-year-one",
                 "NotBefore": "01 Jan 0001 00:05:00 GMT", "State": "active"}  # fmt: skip
        serve_raw(sim, maintenance=[event])
    else:
        sim.control.lifecycle("<html>\x00garbage")
    sim.control.rebalance()
    agent = agents.start(sim.url)
    wait_for(
        lambda: "notice: rebalance-recommendation" in agent.log(),
        timeout=20,
        what="the rebalance notice next to the broken watch",
    )
    assert "tick failed" not in agent.log()
    if broken == "maintenance-year-1":
        return  # readable after all: a maintenance long overdue
    # IMDS answered: unknown for that watch alone, no backoff slowing the other watches down
    wait_for(lambda: "cannot read what IMDS answers" in agent.log(), timeout=20,
             what="the unreadable answer logged")  # fmt: skip
    wait_polls(sim, 10)  # with the same answer
    assert "retrying with backoff" not in agent.log()
