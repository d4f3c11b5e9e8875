"""Save scheduling: periodic saves copied at a step boundary and uploaded in the background.

A periodic save copies the state into reused CPU buffers (the only stall training sees) and
serializes, checksums and uploads it in one background thread. One save is in flight at a
time: a periodic save that comes due meanwhile is *deferred*, not dropped: it runs at the first
step boundary after the running one finished. When a second copy of the state does not fit in
memory, the save runs in the foreground on the state itself instead, with a warning: training
waits for it, but the process is not OOM-killed and the save still happens.

Every failure of a save is kept, never lost: the upload, the commit (a conflict with another
writer, a store that reads back other bytes), the retention's prune. It is logged at once and
raised as :class:`~spotguard.errors.UploadFailed` at the next step boundary on every rank (the
boundary's all-reduce carries "failed"), or at the final save.

With several ranks each rank puts its own file (:mod:`~spotguard.trainer_hooks._internals.files`)
and, once every rank is done, rank 0 commits the manifest with the entries gathered from all:
the commit is a collective, run at a step boundary on every rank alike. With one rank the
upload thread commits itself. Either way the pending commit has one lock: the emergency path
and the upload thread never both commit it.

A sharded (``dcp``) save is a :class:`~.sharded.ShardedSave` job instead of a tree: staged
into reused CPU buffers at the boundary, then saved *and committed* by one DCP save in which
every rank takes part (:func:`~.dcp_store.save_sharded`), so nothing is left pending for the
boundary. Periodic ones run their collectives on a gloo group of their own
(:meth:`Saver.use_sharded`), never on a group the training thread uses; emergency and final
saves run in the training thread on the agreements' group. DCP raises a failure of any rank
on every rank, and it is kept like any other.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from spotguard.errors import UploadFailed
from spotguard.trainer_hooks._internals.dcp_store import save_sharded
from spotguard.trainer_hooks._internals.files import rank_file
from spotguard.trainer_hooks._internals.ranks import Ranks
from spotguard.trainer_hooks._internals.sharded import ShardedSave, ShardedStager
from spotguard.trainer_hooks._internals.snapshot import (
    NoRoomForCopy,
    Snapshotter,
    available_memory,
    tree_nbytes,
)
from spotguard.trainer_hooks.manifest import FileEntry
from spotguard.trainer_hooks.settings import GuardSettings
from spotguard.trainer_hooks.store import CheckpointStore

__all__ = ["Saver"]

log = logging.getLogger("spotguard.trainer_hooks")


class Saver:
    """This rank's saves: when they are due, the one in flight, and their commits."""

    def __init__(
        self,
        settings: GuardSettings,
        store: CheckpointStore,
        ranks: Ranks,
        *,
        available: Callable[[], int] = available_memory,
    ) -> None:
        """``available``: bytes of host memory still free for snapshot buffers."""
        self.settings = settings
        self.store = store
        self.ranks = ranks
        self._snapshots = Snapshotter(available)
        self._stager = ShardedStager(available)
        #: The background sharded saves' own process group (:meth:`use_sharded`).
        self._save_group: Any = None
        #: How long :meth:`wait` waits without a timeout of its own (:meth:`use_sharded`).
        self.wait_limit: float | None = None
        self._worker: threading.Thread | None = None
        #: Guards taking ``pending``: the upload thread and the main thread never both commit
        #: it. Never held across I/O (the emergency path must not wait behind a slow store).
        self._lock = threading.Lock()
        #: Whether a periodic payload was read back in full yet (the first one is).
        self._read_back_once = False
        #: Set by the emergency path: an upload still running must not commit any more.
        self._abandoned = False
        self.failure: BaseException | None = None
        self.failed_saves = 0
        #: Bytes per second of serialize + upload, measured by the saves so far.
        self.throughput: float | None = None
        self._last_save_step = -1
        self._last_save_time = time.monotonic()
        #: A periodic save came due while another was uploading: it runs at the next boundary.
        self.deferred = False
        #: A save whose file this rank has put but that is not committed yet.
        self.pending: tuple[int, int, str, FileEntry] | None = None
        #: The newest checkpoint known good: this process's last commit, or what it resumed
        #: from. Retention never deletes it.
        self.last_committed_step: int | None = None
        #: The step this run resumed from, recorded in every manifest it commits.
        self.resumed_from: int | None = None

    def use_sharded(self) -> None:
        """Make the background sharded saves' process group (a collective: every rank). Its
        timeout bounds how long a save waits for a peer; :meth:`wait` waits a minute more at
        most (by then a save still running is stuck in the store, not waiting for a rank)."""
        self._save_group, timeout = self.ranks.new_save_group()
        self.wait_limit = timeout.total_seconds() + 60.0

    @property
    def my_file(self) -> str:
        """This rank's file name; asked at save time, when the process group exists."""
        return rank_file(self.ranks.rank)

    def periodic_due(self, step: int, early: bool, *, clock: bool = True) -> bool:
        """Whether a periodic save is due at ``step`` (``early``: a rebalance asked for one).

        ``clock=False`` leaves out ``every_seconds``: what is left is the same on every rank
        (the step, and ``deferred``, which is set from agreed flags), so it needs no agreement.
        """
        if step <= self._last_save_step:
            return False
        if early or self.deferred:
            return True
        settings = self.settings
        if settings.every_n_steps and step % settings.every_n_steps == 0:
            return True
        return bool(
            clock
            and settings.every_seconds
            and time.monotonic() - self._last_save_time >= settings.every_seconds
        )

    @property
    def saving(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    def raise_if_failed(self) -> None:
        if self.failure is not None:
            failure, self.failure = self.failure, None
            raise UploadFailed(f"a background checkpoint save failed: {failure}") from failure

    def _fail(self, step: int, what: str, exc: BaseException) -> None:
        self.failed_saves += 1
        self.failure = exc
        log.error("checkpoint %s at step %d failed: %s", what, step, exc)

    def save_async(self, step: int, epoch: int, tree: Any) -> None:
        """Copy ``tree`` now, upload the copy in the background; when no copy fits in memory,
        save ``tree`` itself now (streamed: no second copy), as the upload thread would."""
        started = time.monotonic()
        self._last_save_step, self._last_save_time = step, started
        self.deferred = False
        try:
            if isinstance(tree, ShardedSave):
                snapshot: Any = self._stager.stage(tree)
            else:
                snapshot = self._snapshots.copy(tree)
        except NoRoomForCopy as exc:
            log.warning("%s: saving step %d in the foreground instead", exc, step)
            self._put_then_commit(step, epoch, tree)
            return
        log.debug("snapshot of step %d took %.3f s", step, time.monotonic() - started)
        self._worker = threading.Thread(
            target=self._in_background, args=(step, epoch, snapshot), name="spotguard-save",
            daemon=True,
        )  # fmt: skip
        self._worker.start()

    def _in_background(self, step: int, epoch: int, snapshot: Any) -> None:
        """The upload thread: it yields the CPU to training (a lower scheduling priority,
        inherited by the transfer threads it starts), then puts and commits."""
        yield_cpu(self.settings.save_niceness)
        self._put_then_commit(step, epoch, snapshot)

    def _put_then_commit(self, step: int, epoch: int, snapshot: Any) -> None:
        """Put this rank's file, then commit it (one rank) or leave it pending for the next
        boundary's collective commit; a failure is kept for the next boundary. A sharded job
        is saved and committed at once, on the background saves' group (the same group
        wherever a rank runs it: every rank's saves start in the same order)."""
        if isinstance(snapshot, ShardedSave):
            self.save_sharded(step, epoch, "periodic", snapshot, self._save_group, periodic=True)
            return
        try:
            entry = self.put(step, snapshot, read_back=not self._read_back_once)
            self._read_back_once = True
        except BaseException as exc:  # surfaced at the next step boundary or at exit
            self._fail(step, "upload", exc)
            return
        with self._lock:
            if self._abandoned:
                log.warning("the upload of step %d finished after the emergency: not committed",
                            step)  # fmt: skip
                return
            self.pending = (step, epoch, "periodic", entry)
        if not self.ranks.active:  # nobody to wait for: commit from here
            self.commit_pending()

    def put(self, step: int, tree: Any, *, read_back: bool = False) -> FileEntry:
        """Serialize and store this rank's file of ``step``; measures the throughput. With
        ``read_back``, every byte is read back and checked (in the upload thread, so a store
        that keeps other bytes is caught at the first periodic save, never in the notice)."""
        started = time.monotonic()
        entry = self.store.put(
            step,
            self.my_file,
            lambda handle: torch.save(tree, handle),
            size_hint=tree_nbytes(tree),
        )
        self._measure(entry.size, started)
        if read_back:
            self.store.read_back_payload(step, self.my_file, entry)
        return entry

    def _measure(self, size: int, started: float) -> None:
        rate = size / max(time.monotonic() - started, 1e-6)
        self.throughput = rate if self.throughput is None else 0.5 * (self.throughput + rate)

    def save_sharded(
        self,
        step: int,
        epoch: int,
        kind: str,
        job: ShardedSave,
        group: Any,
        *,
        periodic: bool = False,
    ) -> bool:
        """Save and commit ``job`` on every rank of ``group`` (a collective); measures this
        rank's throughput. A failure (of any rank: DCP raises it on all) is kept for the next
        boundary, not raised: ``True`` when committed. A ``periodic`` save that the emergency
        path abandoned meanwhile is not committed (its coordinator asks before committing)."""
        started = time.monotonic()
        # The first periodic save of the process reads back every file of every rank before
        # the commit, as the whole-state path does (a store that keeps other bytes).
        read_back = periodic and not self._read_back_once
        try:
            manifest = save_sharded(
                self.store, step, job.state_dict, process_group=group, epoch=epoch, kind=kind,
                resumed_from=self.resumed_from, own_file=job.own_file(),
                may_commit=(lambda: not self._abandoned) if periodic else None,
                failure=job.failure, buffers=job.buffers, read_back=read_back,
            )  # fmt: skip
            self._read_back_once = self._read_back_once or read_back
        except BaseException as exc:  # the upload thread keeps even an interruption
            if not periodic and not isinstance(exc, Exception):
                raise
            if periodic and self._abandoned:
                log.warning("the sharded save of step %d was abandoned for the emergency: "
                            "not committed (%s)", step, exc)  # fmt: skip
                return False
            self._fail(step, f"{kind} sharded save", exc)
            return False
        self._measure(job.nbytes, started)
        with self._lock:
            self.last_committed_step = max(step, self.last_committed_step or step)
        if self.ranks.rank == 0:
            log.info("checkpoint %s at step %d committed (dcp, %d bytes)", kind, step,
                     sum(e.size for e in manifest.files.values()))  # fmt: skip
        # Not after an emergency save: a periodic save may still be uploading into its folder.
        if kind != "emergency" and self.settings.keep_last and self.ranks.rank == 0:
            try:
                self.store.prune(self.settings.keep_last, newest_verified=step)
            except Exception as exc:
                self._fail(step, "retention (prune)", exc)
        return True

    def commit_pending(self, *, prune: bool = True) -> bool:
        """Commit the save whose files every rank has put (collectives with several ranks: call
        it on every rank alike). Nothing is committed unless every rank has its file put. A
        failure is kept for the next boundary, not raised: ``True`` when it committed."""
        (incomplete,) = self.ranks.any(self.pending is None)
        with self._lock:
            taken, self.pending = self.pending, None
        if incomplete or taken is None:
            return False
        return self.commit(*taken, prune=prune)

    def commit(
        self, step: int, epoch: int, kind: str, entry: FileEntry, *, prune: bool = True
    ) -> bool:
        """Commit ``step`` with every rank's entry (a collective: every rank alike). A failure
        is kept for the next boundary, not raised: ``True`` when it committed."""
        entries = self.ranks.gather((self.my_file, entry))
        problem: Exception | None = None
        try:
            if self.ranks.rank == 0:  # rank 0 owns the manifest
                files = dict(entries)
                self.store.commit(
                    step, files, epoch=epoch, kind=kind, resumed_from=self.resumed_from,
                    world_size=self.ranks.world,
                )  # fmt: skip
                log.info("checkpoint %s at step %d committed (%d bytes)", kind, step,
                         sum(e.size for e in files.values()))  # fmt: skip
        except Exception as exc:
            problem = exc
        # Every rank learns the outcome: none may count a checkpoint rank 0 could not commit
        # (their decisions, like the emergency's fallback, must stay the same on all ranks).
        (failed,) = self.ranks.any(problem is not None)
        if failed:
            if problem is not None:  # rank 0 keeps it; the next boundary raises it everywhere
                self._fail(step, "commit", problem)
            return False
        self.last_committed_step = max(step, self.last_committed_step or step)
        if prune and self.settings.keep_last and self.ranks.rank == 0:
            try:
                self.store.prune(self.settings.keep_last, newest_verified=step)
            except Exception as exc:
                self._fail(step, "retention (prune)", exc)
        return True

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the upload in flight; ``True`` when none is left running. Without a
        ``timeout``, sharded saves are waited for :attr:`wait_limit` at most (``finish`` and
        ``close`` never wait forever behind a stuck save): one still running then is abandoned
        (it can no longer commit) and kept as a failure."""
        limit = timeout if timeout is not None else self.wait_limit
        if self._worker is not None:
            self._worker.join(limit)
        if timeout is None and self.saving:
            self._abandoned = True
            self._fail(self._last_save_step, "background save", UploadFailed(
                f"still running after {limit:.0f} s (the save group's timeout has passed): "
                "abandoned, not committed"
            ))  # fmt: skip
        return not self.saving

    def abandon(self) -> int | None:
        """Stop an upload still running from committing (the emergency's own step wins);
        returns the step that upload was saving, if one was running. Never blocks."""
        self._abandoned = True
        return self._last_save_step if self.saving else None

    def save_sync(self, step: int, epoch: int, tree: Any, kind: str) -> None:
        """Save in the foreground on every rank (the final checkpoint); every rank raises if
        any rank's save or commit failed."""
        self.wait()
        self.ranks.any(False)  # every rank finished its upload before anyone commits
        self.commit_pending()
        self._agree_and_raise()
        if self.last_committed_step == step:
            return  # e.g. a final save right after a periodic one at the same step
        self._last_save_step = step
        if isinstance(tree, ShardedSave):  # DCP: every rank fails alike, or none does
            self.save_sharded(step, epoch, kind, tree, self.ranks.cpu_group())
            self._agree_and_raise()
            return
        try:
            entry = self.put(step, tree)
        except Exception as exc:
            self._fail(step, "upload", exc)
            entry = None
        (failed,) = self.ranks.any(entry is None)
        if not failed and entry is not None:
            self.commit(step, epoch, kind, entry)
        elif self.failure is None:
            self.failure = UploadFailed("the final save failed on another rank")
        self._agree_and_raise()

    def _agree_and_raise(self) -> None:
        (failed,) = self.ranks.any(self.failure is not None)
        if failed and self.failure is None:
            self.failure = UploadFailed("a checkpoint save failed on another rank")
        self.raise_if_failed()


def yield_cpu(niceness: int) -> None:
    """Lower this thread's scheduling priority by ``niceness`` (Linux: niceness is per thread,
    and threads it starts inherit it). Where cores are short (data-loader workers, a busy host),
    training goes first and the save takes what is left; on an idle core it changes nothing."""
    if not niceness:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except (AttributeError, OSError) as exc:  # not Linux, or not allowed: a plain thread
        log.debug("background save keeps its priority: %s", exc)
