"""Agent fixtures live in support.py, importable by tests for their helpers too."""

from tests.agent.support import agents, targets

__all__ = ["agents", "targets"]
