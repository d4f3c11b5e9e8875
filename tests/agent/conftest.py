"""Agent fixtures live in support.py, importable by tests for their helpers too."""

from tests.agent.support import agents, targets, throwaway_user

__all__ = ["agents", "targets", "throwaway_user"]
