"""The machinery shared by SpotGuard (plain PyTorch) and SpotCheckpoint (Lightning).

:class:`GuardCore` puts four jobs together, each in a module of its own:

* :mod:`.stops`: **stop intake**: signals, the agent's notice file, IMDS polled in-process,
  the registration with the agent, the deadline;
* :mod:`.saver`: **save scheduling**: periodic saves copied at a step boundary and uploaded in
  the background, one at a time, failures kept until they can be raised;
* :mod:`.emergency`: **the emergency path**: save inside the notice window, or keep the last
  verified checkpoint and say so; then exit 75;
* :mod:`.ranks`: **rank coordination**: one small non-blocking all-reduce per step boundary,
  read at the next one, decides for all ranks at once whether to stop, to save, and whether an
  upload is still running or failed; any rank notified means every rank stops after the same
  step. The deadline is shared too: the earliest notice of any rank governs every rank.

Front ends call :meth:`GuardCore.install`, :meth:`~GuardCore.at_step_boundary` and
:meth:`~GuardCore.close`; the state itself is theirs (``tree_fn`` builds the tree to save).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from spotguard.errors import Preempted, UploadFailed, WriterConflict
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
        self.stops = StopIntake(settings, state_dir)
        self.saver = Saver(settings, self.store, self.ranks)
        #: Wall-clock times (``time.time()``) of the preemption path on this rank, for logs
        #: and drills: ``stop_requested``, ``save_started``, ``save_committed``, ``exiting``.
        self.events = self.stops.events
        #: Set once the process has decided how it ends (the emergency path's 75).
        self._exit_code: int | None = None
        #: The latest moment (``time.monotonic()``) an upload may still be waited for at exit.
        self._exit_deadline: float | None = None
        self._told_abandoned = False

    # -- set-up and tear-down -------------------------------------------------------------

    def install(self) -> None:
        """Handle signals and notices, and (rank 0) become the prefix's one writer: wait for
        a writer still active (an interrupted instance finishing its emergency save) first.
        Every rank waits here until rank 0 holds the store. The rank is resolved here, not at
        construction: a guard may be built before ``init_process_group``."""
        self.stops.install(self.ranks.rank)
        problem: Exception | None = None
        if self.ranks.rank == 0:
            try:
                self.store.hold(ttl=self.settings.lease_ttl, wait=self.settings.lease_wait_seconds)
            except Exception as exc:  # raised below, on every rank alike
                problem = exc
        # The other ranks wait in this collective meanwhile: lease_wait (180 s by default; the
        # fleet sets SPOTGUARD_LEASE_WAIT to its termination delay + 240 s, and warns above
        # 600 s in all) must stay below the process-group timeouts (gloo 30 min, NCCL 10 min).
        (failed,) = self.ranks.any(problem is not None)
        if problem is not None:
            raise problem
        if failed:
            raise WriterConflict(f"{self.store.uri}: rank 0 could not take the writer lease")
        # Our threads must be gone before the interpreter finalizes: a daemon thread that
        # wakes up then is ended with pthread_exit, and unwinding through torch's C++ frame
        # evaluator aborts the process ("terminate called without an active exception").
        atexit.register(self._at_interpreter_exit)

    def reinstall_signal_handlers(self) -> None:
        self.stops.reinstall_signal_handlers()

    def _stop_threads(self, deadline: float | None = None) -> None:
        self.stops.stop_watchers()
        deadline = deadline if deadline is not None else self._exit_deadline
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        if not self.saver.wait(timeout) and not self._told_abandoned:
            self._told_abandoned = True
            log.error("a checkpoint upload was still running at the deadline: abandoned")

    def _at_interpreter_exit(self) -> None:
        self._stop_threads()
        if not self.saver.saving:
            self.store.release(timeout=5.0)

    def _leave_now(self) -> None:
        """At the start of interpreter shutdown, with an abandoned upload still running: its
        threads sit in network reads, and shutdown would join them (s3transfer's pool) or
        abort under them (torch's frames), overrunning the deadline or turning 75 into
        SIGABRT. Leave with the exit code already decided instead."""
        if not self.saver.saving:
            self.store.release(timeout=5.0)  # it finished after all: the lease can go back
            return
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        logging.shutdown()
        os._exit(self._exit_code if self._exit_code is not None else 1)

    def close(
        self,
        exit_code: int | None = None,
        *,
        deadline: float | None = None,
        keep_lease: bool = False,
        step: int | None = None,
    ) -> None:
        """Stop the threads (waiting for an upload at most until ``deadline``, a
        ``time.monotonic()`` value), give the signals back, leave the agent (telling it
        ``exit_code`` and ``step`` first: it learns how this ended even if what follows is cut
        short), and give the writer lease back within the deadline, unless ``keep_lease`` or an
        abandoned upload may still land (it then expires by itself)."""
        if deadline is not None:
            self._exit_deadline = deadline
        try:  # every rank started it at the same boundary: it completes (or its peer is gone)
            self.ranks.drain()
        except Exception as exc:
            log.warning("the last stop agreement did not complete: %s", exc)
        self._stop_threads(deadline)
        atexit.unregister(self._at_interpreter_exit)
        self.stops.close(exit_code, step)
        if self.saver.saving and self._exit_code is not None:
            # threading's hooks run before it joins threads (concurrent.futures uses the
            # same one); atexit handlers would run too late.
            threading._register_atexit(self._leave_now)  # type: ignore[attr-defined]
        elif not keep_lease:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            self.store.release(timeout=left)

    # -- what the front ends ask ----------------------------------------------------------

    @property
    def stop_requested(self) -> bool:
        return self.stops.stop_requested

    def request_stop(self, reason: str) -> None:
        self.stops.request_stop(reason)

    def resumed_from(self, step: int, *, newest_in_store: int | None) -> None:
        """The run resumed from ``step`` (recorded in every manifest this run commits);
        ``newest_in_store`` is the newest known-good checkpoint until the next commit: ``step``
        itself when it came from the store, else what the store holds (Lightning given a
        ``ckpt_path`` newer than the store; ``None`` for an empty store)."""
        self.saver.resumed_from = step
        self.saver.last_committed_step = newest_in_store

    @property
    def failed_saves(self) -> int:
        return self.saver.failed_saves

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the upload in flight; ``True`` when none is left running. After an
        emergency, never past its deadline."""
        if self._exit_deadline is not None:
            left = max(self._exit_deadline - time.monotonic(), 0.0)
            timeout = left if timeout is None else min(timeout, left)
        return self.saver.wait(timeout)

    def raise_if_failed(self) -> None:
        self.saver.raise_if_failed()

    def save_sync(self, step: int, epoch: int, tree: Any, kind: str) -> None:
        """Save in the foreground on every rank (the final checkpoint)."""
        self.ranks.drain()
        self.saver.save_sync(step, epoch, tree, kind)

    # -- the step boundary ----------------------------------------------------------------

    def at_step_boundary(self, step: int, epoch: int, tree_fn: Callable[[], Any]) -> None:
        """Everything that happens between two steps; the same call on every rank.

        Four flags decide it: whether any rank must stop, wants a save (time-based and
        rebalance saves differ per node), is still uploading, or failed. With one rank they
        are read now. With several, they are OR-ed by a non-blocking all-reduce started here
        and read at the next boundary, so the step never waits for it: every rank acts on the
        same flags one step later (a stop is taken after the step that follows the notice).
        Saves every ``every_n_steps`` need no agreement and happen at their own step.
        """
        saver = self.saver
        ranks = self.ranks
        if ranks.active:
            stop, node_save, busy, failed = ranks.agreed(4)
            want_save = node_save or saver.periodic_due(step, early=False, clock=False)
        else:
            stop, want_save, busy, failed = self._flags(step)
        if stop:  # first: an earlier failure must not cost the emergency save
            self.stops.request_stop("another rank was notified", own=False)
            self.emergency(step, epoch, tree_fn)
        if failed:
            saver.pending = None
            if saver.failure is None:
                saver.failure = UploadFailed("a checkpoint save failed on another rank")
            saver.raise_if_failed()
        if saver.pending is not None and not busy:  # then on every rank: see Saver
            saver.commit_pending()
        saver.deferred = want_save and busy  # the same on every rank: the flags are reduced
        if want_save and not busy:
            self.stops.early_save = False
            saver.save_async(step, epoch, tree_fn())
        if ranks.active:  # after acting: a save just started shows as busy
            ranks.start_agreement(*self._flags(step))

    def _flags(self, step: int) -> tuple[bool, bool, bool, bool]:
        """This rank's view: stop requested, save wanted, upload running, upload failed."""
        saver = self.saver
        return (
            self.stops.stop_requested,
            saver.periodic_due(step, self.stops.early_save),
            saver.saving,
            saver.failure is not None,
        )

    def emergency(self, step: int, epoch: int, tree_fn: Callable[[], Any]) -> NoReturn:
        """Save within the notice window if it fits, then raise :class:`Preempted`; nothing
        here waits past the deadline, and whatever fails on the way, the exit code is 75
        (the replacement resumes from the last verified checkpoint)."""
        self._exit_code = self.settings.exit_code
        deadline = time.monotonic() + self._seconds_left() - self.settings.safety_margin
        self._exit_deadline = deadline
        try:
            saved = emergency_save(
                self.stops, self.saver, self.ranks, step, epoch, tree_fn, deadline
            )
        except Exception as exc:
            log.error("the emergency save failed (%s): leaving with the last verified "
                      "checkpoint (step %s)", exc, self.saver.last_committed_step)  # fmt: skip
            saved = False
        if saved:
            self.events["save_committed"] = time.time()
        self.events["exiting"] = time.time()
        try:  # rank 0 holds the lease; another rank's abandoned upload may still land
            (uploading,) = self.ranks.any(self.saver.saving)
        except Exception:
            uploading = True
        self.close(
            exit_code=self.settings.exit_code, deadline=deadline, keep_lease=uploading, step=step
        )
        raise Preempted(step, saved, self.settings.exit_code)

    def agreed_stop(self) -> bool:
        """Whether any rank was asked to stop, agreed now: a blocking collective, for points
        off the step boundary (between validation batches, before the first step)."""
        (stop,) = self.ranks.any(self.stop_requested)
        if stop:
            self.stops.request_stop("another rank was notified", own=False)
        return stop

    def leave(self, step: int, why: str) -> NoReturn:
        """Exit with the exit code without a save, for a stop before anything was trained
        since the start or the resumed checkpoint (``why`` says where). Registration and
        writer lease are given back as on any exit: no save has run, none is uploading."""
        log.warning("stop requested (%s) %s: nothing trained since step %d, leaving without "
                    "a save", self.stops.reason or "request", why, step)  # fmt: skip
        self._exit_code = self.settings.exit_code
        self.events["exiting"] = time.time()
        self.close(exit_code=self.settings.exit_code, step=step)
        saved = self.saver.last_committed_step == step
        raise Preempted(step, saved, self.settings.exit_code)

    def _seconds_left(self) -> float:
        """Until the instance goes away: the earliest of every rank's own time (a notice's
        deadline, or ``default_budget`` from a bare signal) governs every rank: only the
        node that was told knows it. ``default_budget`` from now when no rank knows."""
        own = self.stops.own_seconds_left()
        try:
            earliest = self.ranks.earliest(own)
        except Exception as exc:
            log.error("could not share the deadline with the other ranks: %s", exc)
            earliest = own
        return self.settings.default_budget if earliest is None else earliest

    @property
    def preempted(self) -> bool:
        """The emergency path ran: the process is leaving with its exit code."""
        return self._exit_code is not None
