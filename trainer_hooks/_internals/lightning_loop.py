"""Where a Lightning run may stop, and how, outside the plain "after a training step".

:class:`~spotguard.trainer_hooks.lightning.SpotCheckpoint` keeps the hooks; the decisions live
here, against Lightning 2.6.6's loop (no Lightning import: either package drives it):

* **Optimizer-step boundaries only.** ``on_train_batch_end`` fires after every micro-batch
  under gradient accumulation, with ``global_step`` unchanged. A save there would record loop
  progress inside the window but not the accumulated ``.grad`` (Lightning does not save it),
  and the resumed run would step the optimizer on the rest of the window only. So saves and
  stops happen at the micro-batch whose optimizer step just ran (``global_step`` moved); a
  stop that arrives inside a window is taken when the window ends.
* **Validation.** A long validation would otherwise run to its end before the stop is seen:
  the stop is agreed after every validation batch. The training state then sits at an
  optimizer-step boundary (unless a ``val_check_interval`` put validation inside a window: the
  stop then waits for the window's end), so the emergency save is taken at the current step;
  the resumed run goes on with training after that validation (its remaining batches are not
  run again: its metrics are lost, never the training state). During the sanity check nothing
  has been trained since the start (or the resumed checkpoint): the run leaves with the exit
  code without saving.
* **Before training.** A stop between ``setup`` and the first batch leaves the same way at
  ``on_train_start``. Lightning installs its own SIGTERM handler just before the sanity check
  (it ends ``fit`` with exit code 0 and no checkpoint, and broadcasts inside the handler):
  :func:`take_signals_back` gives the signals back to the core right after. From the
  callback's construction until ``setup``, :class:`EarlySignals` holds them.

Every decision is the same on every rank: the flags are reduced, and a collective per
validation batch runs only when every rank has as many validation batches (else the stop is
agreed once, when validation ends).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from spotguard.errors import Preempted
from spotguard.trainer_hooks._internals.core import GuardCore
from spotguard.trainer_hooks.settings import GuardSettings

__all__ = ["EarlySignals", "LoopStops", "take_signals_back"]

log = logging.getLogger("spotguard.trainer_hooks")


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class EarlySignals:
    """The stop signals from the callback's construction until its ``setup`` hands them to the
    core: Lightning runs ``prepare_data`` before any callback hook, and the default action of
    SIGTERM (143) or SIGUSR1 (death) would end the process without the exit code.

    With one process nothing is trained yet: the handler raises
    :class:`~spotguard.errors.Preempted` at once (exit code 75, no checkpoint). With several
    ranks it only records the stop: a rank leaving alone would leave the others in Lightning's
    ``prepare_data`` barrier or in the next collective; ``setup`` passes it to the core, and the
    ranks agree on it before training.
    """

    def __init__(self, settings: GuardSettings) -> None:
        self.settings = settings
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}
        self._armed = False

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signals are the main thread's; the core says so at setup
        for name in self.settings.signals:
            signum = signal.Signals[name]
            self._previous[signum] = signal.signal(signum, self._on_signal)
        self._armed = True

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.reason = self.reason or signal.Signals(signum).name
        if not self._armed or _distributed():
            return  # recorded; a second signal, or one while leaving, changes nothing
        self._armed = False
        log.warning("%s before training started: leaving with exit code %d, nothing to save",
                    self.reason, self.settings.exit_code)  # fmt: skip
        raise Preempted(0, False, self.settings.exit_code)

    def hand_over(self) -> str | None:
        """The core now handles the signals: the stop recorded so far, if any."""
        self._armed = False
        return self.reason

    def restore(self) -> None:
        """Give the signals back to whoever had them before the callback was built."""
        self._armed = False
        for signum, handler in self._previous.items():
            if handler is not None:
                signal.signal(signum, handler)
        self._previous.clear()


def take_signals_back(trainer: Any, core: GuardCore) -> Callable[[], None]:
    """Make Lightning's signal registration (at ``fit`` start, after ``on_fit_start``, before
    the sanity check) hand SIGTERM and SIGUSR1 straight back to the core, so that no window is
    left where Lightning's handler runs. Returns the undo, for when ``fit`` is over.

    Lightning's registration also remembers the handlers it found (the core's) and puts them
    back in its own teardown, which runs *after* the callbacks' ``on_exception``: the undo
    makes it forget ours, or a closed core would keep every later SIGTERM as a mere flag."""
    connector = trainer._signal_connector
    register = connector.register_signal_handlers

    def register_then_take_back() -> None:
        register()
        core.reinstall_signal_handlers()

    def undo() -> None:
        vars(connector).pop("register_signal_handlers", None)
        for name in core.settings.signals:
            connector._original_handlers.pop(signal.Signals[name], None)

    connector.register_signal_handlers = register_then_take_back
    return undo


class LoopStops:
    """The stop and save decisions of one ``fit`` at Lightning's loop positions."""

    def __init__(self, core: GuardCore) -> None:
        self.core = core
        #: ``global_step`` after the last optimizer step seen (``None`` before training).
        self._step_seen: int | None = None
        #: Micro-batches were run since the last optimizer step (their ``.grad`` is unsaved).
        self._window_open = False
        #: Every rank has as many batches in this validation: agree after each one.
        self._each_batch = True

    # -- training -------------------------------------------------------------------------

    def train_started(self, trainer: Any) -> None:
        self._step_seen, self._window_open = trainer.global_step, False
        if self.core.agreed_stop():
            self.core.leave(trainer.global_step, "before the first training step")

    def at_optimizer_step(self, trainer: Any) -> bool:
        """Whether this micro-batch ran an optimizer step (the state is saveable); the same
        answer on every rank, as the accumulation schedule is."""
        step: int = trainer.global_step
        stepped = step != self._step_seen
        self._step_seen = step
        self._window_open = not stepped
        return stepped

    # -- validation -----------------------------------------------------------------------

    def validation_started(self, trainer: Any) -> None:
        counts = (
            trainer.num_sanity_val_batches if trainer.sanity_checking else trainer.num_val_batches
        )
        every = self.core.ranks.gather([float(count) for count in counts])
        self._each_batch = all(other == every[0] for other in every)
        if not self._each_batch:
            log.warning("validation batches differ between ranks (%s): a stop is taken when "
                        "validation ends, not after the current batch", every)  # fmt: skip

    def validation_batch_ended(self, trainer: Any, tree_fn: Callable[[], Any]) -> None:
        if self._each_batch:
            self._stop_in_validation(trainer, tree_fn)

    def validation_ended(self, trainer: Any, tree_fn: Callable[[], Any]) -> None:
        if not self._each_batch:
            self._stop_in_validation(trainer, tree_fn)

    def _stop_in_validation(self, trainer: Any, tree_fn: Callable[[], Any]) -> None:
        if self._window_open or not self.core.agreed_stop():
            return  # inside an accumulation window the stop waits for the window's end
        if trainer.sanity_checking:
            self.core.leave(trainer.global_step, "during the sanity check")
        self.core.emergency(trainer.global_step, trainer.current_epoch, tree_fn)
