"""What training code imports: verified checkpoints, emergency saves, automatic resume.

The errors raised here are drawn in :mod:`spotguard.trainer_hooks.errors`.
"""

from __future__ import annotations

from spotguard.trainer_hooks._internals.manifest import Manifest
from spotguard.trainer_hooks.errors import (
    CheckpointError,
    CorruptCheckpoint,
    StoreError,
    UploadFailed,
)
from spotguard.trainer_hooks.store import CheckpointStore, TransferSettings, VerifyResult

__all__ = [
    "CheckpointError",
    "CheckpointStore",
    "CorruptCheckpoint",
    "Manifest",
    "StoreError",
    "TransferSettings",
    "UploadFailed",
    "VerifyResult",
]
