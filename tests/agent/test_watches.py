"""The agent polls the watches its config enables, at the intervals it asks for."""

from __future__ import annotations

from spotguard.agent.config import AgentConfig
from spotguard.agent.watches import watches_from_config


def test_watches_follow_the_config():
    config = AgentConfig(watch_rebalance=False, asg_interval=0.5, poll_interval=1.0)
    watches = {w.name: w for w in watches_from_config(config)}
    assert "rebalance-recommendation" not in watches
    assert watches["spot-interruption"].interval == 1.0
    assert watches["asg-termination"].interval == 1.0  # never faster than the poll interval
    assert watches["scheduled-maintenance"].interval == 60.0
