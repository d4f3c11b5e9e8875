"""Errors of the trainer hooks, under the same root as the agent's.

::

    SpotguardError                 (spotguard.agent.errors)
    └── CheckpointError            anything about a checkpoint store
        ├── StoreError             the store cannot be used: bad URI, missing bucket,
        │                          no credentials, access denied, unreachable endpoint
        ├── CorruptCheckpoint      a manifest or payload that fails verification
        └── UploadFailed           a background save failed (re-raised at the next save or exit)
"""

from __future__ import annotations

from spotguard.agent.errors import SpotguardError

__all__ = ["CheckpointError", "CorruptCheckpoint", "StoreError", "UploadFailed"]


class CheckpointError(SpotguardError):
    """Base of every checkpoint store error."""


class StoreError(CheckpointError):
    """The store cannot be used as configured; the message says what to fix."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint failed verification: it is skipped, never loaded."""


class UploadFailed(CheckpointError):
    """A save running in the background failed."""
