"""What training code imports: verified checkpoints, emergency saves, automatic resume.

::

    SpotGuard            a hand-written loop: restore(state) -> step, step(...), finish(...)
    SpotCheckpoint       the Lightning callback (spotguard.trainer_hooks.lightning)
    ResumableDataLoader  a DataLoader that resumes mid-epoch, bit-exact
    CheckpointStore      list, save, verify, load and prune checkpoints under one URI
    GuardSettings, TransferSettings   the settings, with their defaults and checks
    Manifest             a committed checkpoint's description (the commit marker)
    backends             where the bytes live: LocalBackend, S3Backend, MemoryBackend

The errors are drawn in :mod:`spotguard.errors`. ``SpotGuard`` and ``ResumableDataLoader``
need torch and are imported on first use, so that ``spotguard ckpt`` works where only the
store is needed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from spotguard.errors import (
    CheckpointError,
    CorruptCheckpoint,
    Preempted,
    StoreError,
    UploadFailed,
)
from spotguard.lazy import lazy_exports
from spotguard.trainer_hooks.manifest import Manifest
from spotguard.trainer_hooks.results import VerifyResult
from spotguard.trainer_hooks.settings import GuardSettings, TransferSettings
from spotguard.trainer_hooks.store import CheckpointStore

if TYPE_CHECKING:
    from spotguard.trainer_hooks.data import ResumableDataLoader
    from spotguard.trainer_hooks.guard import SpotGuard

__all__ = [
    "CheckpointError",
    "CheckpointStore",
    "CorruptCheckpoint",
    "GuardSettings",
    "Manifest",
    "Preempted",
    "ResumableDataLoader",
    "SpotGuard",
    "StoreError",
    "TransferSettings",
    "UploadFailed",
    "VerifyResult",
]

_LAZY = {
    "SpotGuard": "spotguard.trainer_hooks.guard",
    "ResumableDataLoader": "spotguard.trainer_hooks.data",
}


__getattr__ = lazy_exports(__name__, _LAZY)
