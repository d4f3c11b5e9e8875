"""SpotCheckpoint: spot-safe checkpointing for Lightning, with nothing to change in ``fit``.

::

    from spotguard.trainer_hooks.lightning import SpotCheckpoint

    spot = SpotCheckpoint("s3://bucket/runs/run-42", every_n_train_steps=500)
    trainer = Trainer(callbacks=[spot])
    trainer.fit(model, datamodule)      # resumes by itself when the store has a checkpoint

Works with ``pytorch_lightning`` and with the unified ``lightning`` package: the class derives
from the ``Callback`` of each one that is installed, so either Trainer accepts it.

How it fits Lightning 2.x (checked against 2.6.6):

* **Resume without ``ckpt_path``.** ``fit`` picks its checkpoint before any callback hook runs,
  so ``setup`` loads the newest verified checkpoint, and it goes into the checkpoint connector
  right where Lightning would load a ``ckpt_path``; Lightning then restores it exactly as if
  ``ckpt_path`` had been given (model, optimizers, schedulers, loops, callbacks, and a
  stateful train dataloader such as torchdata's ``StatefulDataLoader`` or
  :class:`~spotguard.trainer_hooks.data.ResumableDataLoader`). RNG states are restored in
  ``on_train_start``: earlier, Lightning's own set-up would draw from them again.
* **With ``ckpt_path``** (a file, ``"last"``, ...), every rank resumes from one source, and
  :attr:`SpotCheckpoint.resumed_from` names its step. The store's newest verified checkpoint
  wins when it is at least as new as the path, with a warning when it is newer: a relaunch
  after preemption runs the same command, and ``"last"`` (Lightning's own ``last.ckpt``) can
  be steps behind the emergency save; restoring it would redo those steps and then write
  steps below the store's newest. To restart from an older checkpoint on purpose, give the
  callback a new store prefix. A path newer than the store wins (its spotguard entry holds
  rank 0's random streams only: the log says the other ranks start theirs afresh), and so
  does a path when none of the store's checkpoints as new as it loads (loaded again under a
  sharded strategy: the store's failed load wrote into the model).
  (:mod:`spotguard.trainer_hooks._internals.lightning_resume`.)
* **Strategies.** Those that hold one whole, replicated state (single device, DDP) save in
  format ``torch``. The sharded ones, ``ModelParallelStrategy`` (FSDP2, tensor parallelism;
  ``save_distributed_checkpoint=True``, its default) and ``FSDPStrategy`` (with
  ``state_dict_type="sharded"``), save in format ``dcp``: every rank its own shards, at every
  save, and a resume loads weights and optimizer states into the live model itself, at any
  world size (:mod:`spotguard.trainer_hooks._internals.lightning_sharded`). DeepSpeed, XLA and
  any strategy not known to be handled are refused at ``setup`` with a
  :class:`~spotguard.errors.ConfigError` naming the supported ones.
* **Samplers under DDP.** Lightning replaces the train sampler by a distributed one that no
  loader state captures; spotguard saves its epoch and generator state with each rank's
  entry (:mod:`spotguard.trainer_hooks._internals.lightning_samplers`).
* **Signals.** Lightning's SIGTERM handler broadcasts inside the handler (a deadlock under DDP,
  Lightning #20806) and ends the run with exit code 0 and no checkpoint: SpotCheckpoint takes
  SIGTERM and SIGUSR1 back the moment Lightning installs it; handlers only set a flag. From
  construction to ``setup`` (``prepare_data`` runs before any callback hook) the callback
  holds them too.
* **The stop decision** is reduced over all ranks at every optimizer-step boundary (not at
  micro-batches inside a gradient-accumulation window: their ``.grad`` is not in any
  checkpoint), after every validation batch, and before training starts: if any rank was
  notified, every rank stops at the same place and exits 75, with an emergency save when
  something was trained (:mod:`spotguard.trainer_hooks._internals.lightning_loop`).
* Checkpoints in format ``torch`` are Lightning's own checkpoint dict (``dump_checkpoint``),
  with spotguard's ``__spotguard__`` entry (step, epoch, RNG states) added in
  ``on_save_checkpoint``, copied into CPU buffers at the step boundary and uploaded in the
  background; they load with ``torch.load(weights_only=True)``, so hyperparameters must be
  plain data (or registered with ``torch.serialization.add_safe_globals``). Other ranks save
  their own RNG states only (the file format is shared with ``SpotGuard``:
  :mod:`spotguard.trainer_hooks._internals.files`). In format ``dcp`` every rank saves its
  shards of the same dict, and its own entry in a file of its own.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from typing_extensions import override

from spotguard.errors import Preempted
from spotguard.trainer_hooks._internals import rng
from spotguard.trainer_hooks._internals.core import GuardCore
from spotguard.trainer_hooks._internals.files import META_KEY, load_newest, meta
from spotguard.trainer_hooks._internals.lightning_loop import (
    EarlySignals,
    LoopStops,
    take_signals_back,
)
from spotguard.trainer_hooks._internals.lightning_resume import (
    StoreSide,
    after_resume_start,
    choose_source,
    whole_state_side,
)
from spotguard.trainer_hooks._internals.lightning_samplers import TrainSamplers
from spotguard.trainer_hooks._internals.lightning_sharded import (
    checkpoint_format,
    sharded_save,
    sharded_store_side,
)
from spotguard.trainer_hooks.settings import GuardSettings

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from spotguard.trainer_hooks.settings import CommonOptions

__all__ = ["SpotCheckpoint"]


def _callback_base() -> type:
    """Lightning's ``Callback``: that of the one Lightning package installed, or a class that
    derives from both (either Trainer then accepts the callback)."""
    bases: list[type] = []
    for module in ("pytorch_lightning", "lightning.pytorch"):
        try:
            bases.append(importlib.import_module(module).Callback)
        except ImportError:
            continue
    if not bases:
        raise ImportError(
            "SpotCheckpoint needs Lightning: pip install 'spotguard[lightning]' (or 'lightning')"
        )
    if len(bases) == 1:
        return bases[0]
    return type("_LightningCallbacks", tuple(bases), {"__module__": __name__})


if TYPE_CHECKING:
    # What mypy checks the callback against: one real base, so that a misspelt hook or
    # attribute is an error (the runtime base is chosen from what is installed).
    from lightning.pytorch import Callback as _Callback
else:
    _Callback = _callback_base()


class SpotCheckpoint(_Callback):
    """Periodic async checkpoints, emergency save on preemption, automatic resume.

    ``uri`` is the checkpoint store; ``every_n_train_steps`` / ``every_n_seconds`` set the
    periodic saves (Lightning's names for :class:`GuardSettings`' ``every_n_steps`` /
    ``every_seconds``); the other keyword arguments are :class:`GuardSettings`' fields, with
    its defaults.
    """

    def __init__(
        self,
        uri: str,
        *,
        every_n_train_steps: int | None = None,
        every_n_seconds: float | None = None,
        **options: Unpack[CommonOptions],
    ) -> None:
        super().__init__()
        self.settings = GuardSettings(
            uri=uri, every_n_steps=every_n_train_steps, every_seconds=every_n_seconds, **options
        )
        self._core: GuardCore | None = None
        self._loop: LoopStops | None = None
        self._give_back_signal_registration: Callable[[], None] | None = None
        self._early_signals = EarlySignals(self.settings)
        self._early_signals.install()
        #: This rank's random streams, from the checkpoint resumed: restored at train start.
        self._pending_rng: dict[str, Any] | None = None
        #: The train samplers' state Lightning's checkpoint misses under DDP.
        self._samplers = TrainSamplers()
        #: Undo the resume seams (:mod:`~spotguard.trainer_hooks._internals.lightning_resume`).
        self._undo_seams: list[Callable[[], None]] = []
        #: ``torch`` or ``dcp``: decided at ``setup`` from the strategy.
        self._format: str | None = None
        #: The step the run resumed from (None on a fresh start).
        self.resumed_from: int | None = None
        #: Wall-clock times of the preemption path (``stop_requested``, ``save_started``,
        #: ``save_committed``, ``exiting``), as far as it got; kept after the run ends.
        self.events: dict[str, float] = {}

    @property
    @override
    def state_key(self) -> str:
        return f"SpotCheckpoint[{self.settings.uri}]"

    # -- spotguard's entry in Lightning's checkpoint ------------------------------------------

    @override
    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        checkpoint[META_KEY] = self._meta(trainer)

    def _meta(self, trainer: Any) -> dict[str, Any]:
        """This rank's spotguard entry: step, epoch, random streams and samplers' state."""
        own = meta(trainer.global_step, trainer.current_epoch)
        return {**own, "samplers": self._samplers.state()}

    # -- hooks ------------------------------------------------------------------------------

    @override
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        # before anything is installed or held
        self._format = checkpoint_format(trainer.strategy, self.settings.checkpoint_format)
        core = GuardCore(self.settings)
        self._core = core
        self.events = core.events
        core.install()
        early_stop = self._early_signals.hand_over()
        if early_stop is not None:
            core.request_stop(early_stop)
        self._loop = LoopStops(core)
        self._give_back_signal_registration = take_signals_back(trainer, core)
        whole: StoreSide | None = None
        if self._format == "dcp":
            core.saver.use_sharded()  # loaded in resume_start: the strategy is set up by then
        else:
            whole = whole_state_side(
                load_newest(
                    core.store, core.ranks, allow_fresh_start=core.settings.allow_fresh_start
                )
            )
        connector = trainer._checkpoint_connector

        def resume_from(path: Any, reload: Callable[[], None]) -> None:
            """Right after Lightning loaded ``ckpt_path`` (if any): one source for all ranks."""
            store = whole if whole is not None else sharded_store_side(trainer, core)
            source = choose_source(connector, path, store, core.ranks, core.store.uri, reload)
            own = source.own or {}
            self._pending_rng, self.resumed_from = own.get("rng"), source.step
            self._samplers.restore_later(own.get("samplers"))
            if source.step is not None:
                core.resumed_from(source.step, newest_in_store=source.newest_in_store)

        self._undo_seams = [
            after_resume_start(connector, resume_from),
            self._samplers.install(trainer.fit_loop),
        ]

    @override
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self._loop is not None:
            self._loop.train_started(trainer)
        self._samplers.training_started()
        if self._pending_rng is not None:
            rng.restore(self._pending_rng)
        self._pending_rng = None

    @override
    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        core, loop = self._core, self._loop
        if core is None or loop is None or not loop.at_optimizer_step(trainer):
            return
        core.at_step_boundary(trainer.global_step, trainer.current_epoch, self._tree_fn(trainer))

    @override
    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if self._loop is not None:
            self._loop.validation_started(trainer)

    @override
    def on_validation_batch_end(
        self,
        trainer: Any,
        pl_module: Any,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._loop is not None:
            self._loop.validation_batch_ended(trainer, self._tree_fn(trainer))

    @override
    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self._loop is not None:
            self._loop.validation_ended(trainer, self._tree_fn(trainer))

    def _tree_fn(self, trainer: Any) -> Any:
        """What this rank saves: in format ``dcp`` its shards of Lightning's checkpoint (every
        rank); in format ``torch`` Lightning's whole checkpoint on rank 0 (our entry added by
        :meth:`on_save_checkpoint`), its own step and RNG states elsewhere."""
        if self._format == "dcp":
            return functools.partial(sharded_save, trainer)
        if trainer.global_rank == 0:
            # weights_only=False said, not defaulted: Lightning logs every defaulted call
            dump = trainer._checkpoint_connector.dump_checkpoint
            return functools.partial(dump, weights_only=False)
        return lambda: {META_KEY: self._meta(trainer)}

    @override
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        core = self._core
        if core is None:
            return
        tree = self._tree_fn(trainer)()
        core.save_sync(trainer.global_step, trainer.current_epoch, tree, "final")

    @override
    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self._core is not None and not isinstance(exception, Preempted):
            self._core.wait()
            self._core.close()
        self._fit_over()

    @override
    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        core = self._core
        if core is None or stage != "fit":
            return
        self._core = None
        core.wait()
        core.close()
        self._fit_over()
        if not core.preempted:
            core.raise_if_failed()

    def _fit_over(self) -> None:
        """Lightning's signal registration back as it was, the signals back to their owners
        from before the callback was built. After the core closed: it gives back what it
        found at ``setup``, the callback's own early handler."""
        if self._give_back_signal_registration is not None:
            self._give_back_signal_registration()
            self._give_back_signal_registration = None
        self._loop = None
        self._early_signals.restore()
        while self._undo_seams:
            self._undo_seams.pop()()
