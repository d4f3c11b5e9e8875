"""The one error of the drill: a step of the rehearsal did not hold.

::

    DrillFailed        which step ("store", "agent", "reference", "interruption", "resume",
                       "bit-exact", ...) and a one-line explanation of what went wrong
"""

from __future__ import annotations

__all__ = ["DrillFailed"]


class DrillFailed(Exception):
    """A drill step failed; ``step`` names it, the message says what happened."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(message)
        self.step = step
