"""What :class:`~spotguard.trainer_hooks.CheckpointStore`'s inspection methods report.

Plain records, kept apart from the store so that the code that builds them (the read side, in
``_internals``) and the code that shows them (``spotguard ckpt``) import them from one public
place.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Quarantined", "VerifyResult"]


@dataclass(frozen=True)
class VerifyResult:
    """One checkpoint re-read in full by :meth:`CheckpointStore.verify
    <spotguard.trainer_hooks.CheckpointStore.verify>`: ``ok``, or the ``problem`` found."""

    step: int
    ok: bool
    problem: str = ""


@dataclass(frozen=True)
class Quarantined:
    """A checkpoint moved aside because it failed verification
    (:meth:`CheckpointStore.quarantined <spotguard.trainer_hooks.CheckpointStore.quarantined>`)."""

    step: int
    reason: str
    quarantined_at: str
