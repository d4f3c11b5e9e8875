"""The IMDS simulator fixture is shared with the agent tests (in-process IMDS polling)."""

from tests.agent.support import sim

__all__ = ["sim"]
