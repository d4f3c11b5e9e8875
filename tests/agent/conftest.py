"""Agent fixtures live in support.py, importable by tests for their helpers too."""

from tests.agent.support import agents, sim, targets

__all__ = ["agents", "sim", "targets"]
