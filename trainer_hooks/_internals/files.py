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

from spotguard.errors import (
    CheckpointError,
    CorruptCheckpoint,
    ResumeRefused,
    UnloadableCheckpoint,
)
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
    """Load the checkpoint every rank resumes from; ``None`` when the store holds none.

    Rank 0 proposes the newest that verifies for it (quarantining what fails on the way down)
    and the others load exactly that step: ranks never resume from different checkpoints,
    even while another writer commits. When another rank's file of that checkpoint fails
    verification, rank 0 quarantines the checkpoint and every rank tries the next older one:
    all resume from the newest that every rank can load. Any other failure to load (memory,
    a missing file) raises on every rank alike. When the store holds checkpoint data and none
    verifies, :class:`~spotguard.errors.ResumeRefused` is raised on every rank, unless
    ``allow_fresh_start`` (then the log says so and all start from 0).
    """
    while True:
        step, found = _proposed(store, ranks, allow_fresh_start)
        if step is None:
            return None
        restored, corrupt, other = _load_step(store, ranks, step, found)
        problems = ranks.gather((corrupt, other))
        unloadable = "; ".join(f"rank {k}: {why}" for k, (_, why) in enumerate(problems) if why)
        if unloadable:
            raise UnloadableCheckpoint(f"checkpoint {step} cannot be loaded ({unloadable})")
        broken = [f"rank {k}: {why}" for k, (why, _) in enumerate(problems) if why]
        if not broken:
            assert restored is not None  # every rank loaded it
            return restored
        if ranks.rank == 0:  # the writer: the others must not find it again
            store.quarantine(step, "; ".join(broken))
        log.error("checkpoint %d failed verification on another rank (%s): trying the next "
                  "older one", step, "; ".join(broken))  # fmt: skip


def _proposed(
    store: CheckpointStore, ranks: Ranks, allow_fresh_start: bool
) -> tuple[int | None, tuple[Manifest, Any] | None]:
    """Rank 0's newest verified step, told to every rank (or its error, raised on all), and
    on rank 0 what it loaded on the way."""
    step: int | None = None
    found: tuple[Manifest, Any] | None = None
    problem: CheckpointError | None = None
    if ranks.rank == 0:
        try:
            found = store.resume(WHOLE_STATE_FILE)
            if found is not None and found[0].world_size != ranks.world:
                raise UnloadableCheckpoint(
                    f"{store.uri}: checkpoint {found[0].step} was written by "
                    f"{found[0].world_size} rank(s), this run has {ranks.world}: whole-state "
                    "checkpoints resume at the same world size"
                )
            step = found[0].step if found is not None else None
        except ResumeRefused as exc:
            if not allow_fresh_start:
                problem = exc
            else:
                log.error("starting from step 0 (allow_fresh_start=True) although %s", exc)
        except CheckpointError as exc:
            problem = exc
    step, message = ranks.gather((step, str(problem) if problem else None))[0]
    if message is not None:
        if problem is not None:
            raise problem
        raise ResumeRefused(f"rank 0 could not resume: {message}")
    return step, found


def _load_step(
    store: CheckpointStore, ranks: Ranks, step: int, found: tuple[Manifest, Any] | None
) -> tuple[Restored | None, str | None, str | None]:
    """This rank's view of ``step`` (``found``: rank 0 has loaded it already): what it
    restored, or why not (corrupt, or otherwise)."""
    try:
        manifest, whole = found or store.load_state(step=step, name=WHOLE_STATE_FILE)
        own = whole[META_KEY]
        if ranks.rank != 0:
            # Rank 0's file carries rank 0's random streams; this rank's are its own.
            own = store.load_state(step=step, name=rank_file(ranks.rank))[1][META_KEY]
    except CorruptCheckpoint as exc:
        return None, str(exc), None
    except (CheckpointError, KeyError) as exc:
        return None, None, f"{type(exc).__name__}: {exc}"
    return Restored(manifest, whole, own), None, None
