"""The emergency path: save within the notice window if it fits, or keep the last verified
checkpoint and say so.

Called at the same step on every rank; every decision below is agreed on by all ranks. It waits
for an in-flight periodic save while that leaves time (a finished one is committed, unpruned, as
the fallback), estimates from the measured throughput whether the emergency save fits in what
is left before the deadline (assuming a conservative speed before the first save is measured),
and only then saves; with no checkpoint at all to fall back on it tries anyway. A sharded save
is estimated per rank from its own shards and speed, and every rank saves its shards at the
same step (one DCP save: it commits for all or for none).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from spotguard.trainer_hooks._internals.ranks import Ranks
from spotguard.trainer_hooks._internals.saver import Saver
from spotguard.trainer_hooks._internals.sharded import ShardedSave
from spotguard.trainer_hooks._internals.snapshot import tree_nbytes
from spotguard.trainer_hooks._internals.stops import StopIntake
from spotguard.trainer_hooks.manifest import FileEntry

__all__ = ["emergency_save"]

log = logging.getLogger("spotguard.trainer_hooks")

#: Serialize + upload speed assumed before any save of this run was measured: conservative
#: (S3 from EC2 with parallel parts runs several times faster), so an emergency save is only
#: tried blind when it is small enough to fit anyway.
UNMEASURED_BYTES_PER_SECOND = 32 * 1024 * 1024


def emergency_save(
    stops: StopIntake,
    saver: Saver,
    ranks: Ranks,
    step: int,
    epoch: int,
    tree_fn: Callable[[], Any],
    deadline: float,
) -> bool:
    """Save ``step`` as the emergency checkpoint if it fits before ``deadline`` (a
    ``time.monotonic()`` value, the same on every rank); ``True`` when it is committed."""
    stops.events["save_started"] = time.time()
    left = deadline - time.monotonic()
    log.warning("stop requested (%s) at step %d; %.1f s left before the deadline",
                stops.reason or "request", step, left)  # fmt: skip
    started = time.monotonic()
    if saver.saving and not saver.wait(max(left / 2, 0.0)):
        log.warning("the periodic save in flight did not finish in time; saving anyway")
    (busy,) = ranks.any(saver.saving)
    running = None
    if busy:
        running = saver.abandon()  # from now on it cannot commit: this step's save wins
        log.warning("abandoning the periodic upload of step %s", running)
    else:
        saver.commit_pending(prune=False)  # a finished periodic save: keep it as fallback
    if saver.failure is not None:
        log.error("an earlier background save had failed: %s", saver.failure)
        saver.failure = None
    left -= time.monotonic() - started
    (not_saved,) = ranks.any(saver.last_committed_step != step)
    if not not_saved:
        log.warning("step %d is already checkpointed; nothing more to save", step)
        return True
    (same_step,) = ranks.any(running == step)
    if same_step:
        # Its files would land over this save's (same keys) after the commit: keep the last
        # verified checkpoint instead (Lightning: a stop during validation right after a
        # periodic save of the same step whose upload outlived half the time left).
        log.error("an upload of step %d is still running: keeping the last verified "
                  "checkpoint (step %s)", step, saver.last_committed_step)  # fmt: skip
        return False
    tree = tree_fn()
    # Sharded: this rank's own shards at its own measured speed; the verdict is agreed below.
    size = tree.nbytes if isinstance(tree, ShardedSave) else tree_nbytes(tree)
    estimate = size / (saver.throughput or UNMEASURED_BYTES_PER_SECOND)
    # Both agreed: after a failed commit only rank 0 knows there is nothing to fall back on.
    too_slow, nothing_older = ranks.any(estimate > left, saver.last_committed_step is None)
    if too_slow and not nothing_older:
        log.error(
            "emergency save would take ~%.1f s (%s) but only %.1f s are left: keeping the "
            "last verified checkpoint (step %s)", estimate,
            "measured" if saver.throughput else "no save measured yet: assumed",
            left, saver.last_committed_step,
        )  # fmt: skip
        return False
    if too_slow:
        log.warning("emergency save may not finish (~%.1f s, %.1f s left), but there is no "
                    "checkpoint to fall back on: trying", estimate, left)  # fmt: skip
    return _put_and_commit(saver, ranks, step, epoch, tree)


def _put_and_commit(saver: Saver, ranks: Ranks, step: int, epoch: int, tree: Any) -> bool:
    if isinstance(tree, ShardedSave):  # one DCP save, on the training thread's own group
        committed = saver.save_sharded(step, epoch, "emergency", tree, ranks.cpu_group())
        if not committed:
            log.error("emergency checkpoint of step %d not committed: %s", step, saver.failure)
        return committed
    try:
        entry: FileEntry | None = saver.put(step, tree)
    except Exception as exc:
        log.error("emergency save at step %d failed: %s", step, exc)
        entry = None
    (failed,) = ranks.any(entry is None)
    if failed or entry is None:
        return False
    # Not pruning: a periodic save may still be uploading into its directory.
    committed = saver.commit(step, epoch, "emergency", entry, prune=False)  # agreed
    if not committed:
        log.error("emergency checkpoint of step %d not committed: %s", step, saver.failure)
    return committed
