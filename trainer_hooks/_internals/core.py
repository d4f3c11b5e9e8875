"""The machinery shared by SpotGuard (plain PyTorch) and SpotCheckpoint (Lightning).

:class:`GuardCore` puts four jobs together, each in a module of its own:

* :mod:`.stops`: **stop intake**: signals, the agent's notice file, IMDS polled in-process,
  the registration with the agent, the deadline;
* :mod:`.saver`: **save scheduling**: periodic saves copied at a step boundary and uploaded in
  the background, one at a time, failures kept until they can be raised;
* :mod:`.emergency`: **the emergency path**: save inside the notice window, or keep the last
  verified checkpoint and say so; then exit 75;
* :mod:`.ranks`: **rank coordination**: one small all-reduce per step boundary decides, for all
  ranks at once, whether to stop, to save, and whether an upload is still running or failed;
  any rank notified means every rank stops after the same step.

Front ends call :meth:`GuardCore.install`, :meth:`~GuardCore.at_step_boundary` and
:meth:`~GuardCore.close`; the state itself is theirs (``tree_fn`` builds the tree to save).
"""

from __future__ import annotations

import atexit
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from spotguard.errors import Preempted, UploadFailed
from spotguard.protocol import state_dir_from_env
from spotguard.trainer_hooks._internals.emergency import emergency_save
from spotguard.trainer_hooks._internals.ranks import Ranks
from spotguard.trainer_hooks._internals.saver import Saver
from spotguard.trainer_hooks._internals.stops import StopIntake
from spotguard.trainer_hooks.settings import GuardSettings
from spotguard.trainer_hooks.store import CheckpointStore

__all__ = ["GuardCore"]

log = logging.getLogger("spotguard.trainer_hooks")


class GuardCore:
    """One per process: stop intake, saves and rank coordination behind one small API."""

    def __init__(self, settings: GuardSettings) -> None:
        self.settings = settings
        self.store = CheckpointStore(settings.uri, transfer=settings.transfer)
        self.ranks = Ranks()
        state_dir = Path(settings.state_dir) if settings.state_dir else state_dir_from_env()
        self.stops = StopIntake(settings, state_dir, self.ranks.rank)
        self.saver = Saver(settings, self.store, self.ranks)
        #: Wall-clock times (``time.time()``) of the preemption path on this rank, for logs
        #: and drills: ``stop_requested``, ``save_started``, ``save_committed``, ``exiting``.
        self.events = self.stops.events

    # -- set-up and tear-down -------------------------------------------------------------

    def install(self) -> None:
        self.stops.install(on_exit=self._stop_threads)

    def reinstall_signal_handlers(self) -> None:
        self.stops.reinstall_signal_handlers()

    def _stop_threads(self) -> None:
        self.stops.stop_watchers()
        self.saver.wait()

    def close(self, exit_code: int | None = None) -> None:
        self._stop_threads()
        atexit.unregister(self._stop_threads)
        self.stops.close(exit_code)

    # -- what the front ends ask ----------------------------------------------------------

    @property
    def stop_requested(self) -> bool:
        return self.stops.stop_requested

    def request_stop(self, reason: str) -> None:
        self.stops.request_stop(reason)

    @property
    def last_committed_step(self) -> int | None:
        return self.saver.last_committed_step

    @last_committed_step.setter
    def last_committed_step(self, step: int | None) -> None:
        self.saver.last_committed_step = step

    @property
    def failed_saves(self) -> int:
        return self.saver.failed_saves

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the upload in flight; ``True`` when none is left running."""
        return self.saver.wait(timeout)

    def raise_if_failed(self) -> None:
        self.saver.raise_if_failed()

    def save_sync(self, step: int, epoch: int, tree: Any, kind: str) -> None:
        """Save in the foreground on every rank (the final checkpoint)."""
        self.saver.save_sync(step, epoch, tree, kind)

    # -- the step boundary ----------------------------------------------------------------

    def at_step_boundary(self, step: int, epoch: int, tree_fn: Callable[[], Any]) -> None:
        """Everything that happens between two steps; the same call on every rank.

        One small all-reduce agrees on whether any rank must stop, wants a save (time-based
        and rebalance saves differ per node), is still uploading, or failed; with one rank
        there is no collective at all.
        """
        saver = self.saver
        stop, want_save, busy, failed = self.ranks.any(
            self.stops.stop_requested,
            saver.periodic_due(step, self.stops.early_save),
            saver.saving,
            saver.failure is not None,
        )
        if failed:
            saver.pending = None
            if saver.failure is None:
                saver.failure = UploadFailed("a checkpoint save failed on another rank")
            saver.raise_if_failed()
        if saver.pending is not None and not busy:
            saver.commit_pending()
        if stop:
            self.stops.request_stop("another rank was notified")
            self.emergency(step, epoch, tree_fn)
        if want_save and not busy:
            self.stops.early_save = False
            saver.save_async(step, epoch, tree_fn())

    def emergency(self, step: int, epoch: int, tree_fn: Callable[[], Any]) -> NoReturn:
        """Save within the notice window if it fits, then raise :class:`Preempted`."""
        saved = emergency_save(self.stops, self.saver, self.ranks, step, epoch, tree_fn)
        if saved:
            self.events["save_committed"] = time.time()
        self.events["exiting"] = time.time()
        self.close(exit_code=self.settings.exit_code)
        raise Preempted(step, saved, self.settings.exit_code)
