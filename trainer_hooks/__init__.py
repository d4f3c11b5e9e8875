"""What training code imports: verified checkpoints, emergency saves, automatic resume.

The errors raised here are drawn in :mod:`spotguard.trainer_hooks.errors`. ``SpotGuard``,
``Preempted`` and ``ResumableDataLoader`` need torch and are imported on first use, so that
``spotguard ckpt`` works where only the store is needed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from spotguard.trainer_hooks._internals.manifest import Manifest
from spotguard.trainer_hooks.errors import (
    CheckpointError,
    CorruptCheckpoint,
    StoreError,
    UploadFailed,
)
from spotguard.trainer_hooks.store import CheckpointStore, TransferSettings, VerifyResult

if TYPE_CHECKING:
    from spotguard.trainer_hooks._internals.core import Preempted
    from spotguard.trainer_hooks.data import ResumableDataLoader
    from spotguard.trainer_hooks.guard import SpotGuard

__all__ = [
    "CheckpointError",
    "CheckpointStore",
    "CorruptCheckpoint",
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
    "Preempted": "spotguard.trainer_hooks._internals.core",
    "ResumableDataLoader": "spotguard.trainer_hooks.data",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
