"""What each rank saves, in one format for both front ends, and how a rank finds its part.

A checkpoint holds one whole-state file, written by rank 0, and one small file per other rank::

    state.pt      {<the front end's state>..., "__spotguard__": {"step", "epoch", "rng"}}
    rank-<k>.pt   {"__spotguard__": {"step", "epoch", "rng"}}

The state is replicated (DDP), so rank 0 saves it once; what differs per rank is its random
streams, saved by each rank and restored by each rank from its own file. The front end decides
what the whole state is (``SpotGuard``: ``{"state": {name: state_dict}}``; ``SpotCheckpoint``:
Lightning's own checkpoint dict, which Lightning can still load with ``ckpt_path``); the
``__spotguard__`` entry is the same for both.
"""

from __future__ import annotations

import logging
from typing import Any

from spotguard.errors import ResumeRefused
from spotguard.trainer_hooks._internals import rng
from spotguard.trainer_hooks._internals.ranks import Ranks
from spotguard.trainer_hooks.manifest import Manifest
from spotguard.trainer_hooks.store import CheckpointStore

__all__ = ["META_KEY", "WHOLE_STATE_FILE", "Restored", "load_newest", "meta", "rank_file"]

log = logging.getLogger("spotguard.trainer_hooks")

WHOLE_STATE_FILE = "state.pt"
META_KEY = "__spotguard__"


def rank_file(rank: int) -> str:
    """The file ``rank`` writes: the whole state on rank 0, its own streams elsewhere."""
    return WHOLE_STATE_FILE if rank == 0 else f"rank-{rank}.pt"


def meta(step: int, epoch: int) -> dict[str, Any]:
    """What every rank saves about itself: where it is, and its random streams (captured now:
    call it at the step boundary being saved)."""
    return {"step": step, "epoch": epoch, "rng": rng.capture()}


class Restored:
    """The newest verified checkpoint as one rank sees it: the whole state and its own meta."""

    def __init__(self, manifest: Manifest, whole: Any, own_meta: dict[str, Any]) -> None:
        self.manifest, self.whole, self.meta = manifest, whole, own_meta


def load_newest(
    store: CheckpointStore, ranks: Ranks, *, allow_fresh_start: bool = False
) -> Restored | None:
    """Load the newest verified checkpoint for this rank; ``None`` when the store holds none.

    Rank 0 quarantines what fails verification on the way down. When the store holds
    checkpoint data and none verifies, :class:`~spotguard.errors.ResumeRefused` is raised,
    unless ``allow_fresh_start`` (then it says so in the log and returns ``None``).
    """
    try:
        found = store.resume(WHOLE_STATE_FILE, quarantine=ranks.rank == 0)
    except ResumeRefused as exc:
        if not allow_fresh_start:
            raise
        log.error("starting from step 0 (allow_fresh_start=True) although %s", exc)
        return None
    if found is None:
        return None
    manifest, whole = found
    own = whole[META_KEY]
    if ranks.rank != 0:
        # Rank 0's file carries rank 0's random streams; this rank's are its own.
        own = store.load_state(step=manifest.step, name=rank_file(ranks.rank))[1][META_KEY]
    return Restored(manifest, whole, own)
