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
  so ``setup`` pre-loads the newest verified checkpoint into the checkpoint connector, which
  Lightning then restores exactly as if ``ckpt_path`` had been given (model, optimizers,
  schedulers, loops, callbacks, and a stateful train dataloader such as
  :class:`~spotguard.trainer_hooks.data.ResumableDataLoader`). A ``ckpt_path`` passed to
  ``fit`` still wins. RNG states are restored in ``on_train_start``: earlier, Lightning's own
  set-up would draw from them again.
* **Signals.** Lightning's SIGTERM handler broadcasts inside the handler (a deadlock under DDP,
  Lightning #20806) and ends the run with exit code 0 and no checkpoint. ``on_train_start``
  takes SIGTERM and SIGUSR1 back; handlers only set a flag.
* **The stop decision** is reduced over all ranks in ``on_train_batch_end``
  (``strategy.reduce_boolean_decision``): if any rank was notified, every rank stops after the
  same step and exits 75.
* Checkpoints are Lightning's own checkpoint dict (``dump_checkpoint``), with spotguard's
  ``__spotguard__`` entry (step, epoch, RNG states) added in ``on_save_checkpoint``, copied
  into CPU buffers at the step boundary and uploaded in the background; they load with
  ``torch.load(weights_only=True)``, so hyperparameters must be plain data (or registered
  with ``torch.serialization.add_safe_globals``). Other ranks save their own RNG states only
  (the file format is shared with ``SpotGuard``: :mod:`spotguard.trainer_hooks._internals.files`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from typing_extensions import override

from spotguard.errors import Preempted
from spotguard.trainer_hooks._internals import rng
from spotguard.trainer_hooks._internals.core import GuardCore
from spotguard.trainer_hooks._internals.files import META_KEY, load_newest, meta
from spotguard.trainer_hooks.settings import GuardSettings

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from spotguard.trainer_hooks.settings import CommonOptions

__all__ = ["SpotCheckpoint"]


def _callback_bases() -> tuple[type, ...]:
    """Lightning's ``Callback`` of each Lightning package installed (either Trainer then
    accepts the callback)."""
    bases = []
    for module in ("pytorch_lightning", "lightning.pytorch"):
        try:
            bases.append(importlib.import_module(module).Callback)
        except ImportError:
            continue
    if not bases:
        raise ImportError(
            "SpotCheckpoint needs Lightning: pip install 'spotguard[lightning]' (or 'lightning')"
        )
    return tuple(bases)


class SpotCheckpoint(*_callback_bases()):  # type: ignore[misc]
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
        self._pending_rng: dict[str, Any] | None = None
        self._rank_rng: dict[str, Any] | None = None
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
        checkpoint[META_KEY] = meta(trainer.global_step, trainer.current_epoch)

    @override
    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        own = checkpoint.get(META_KEY)
        self._pending_rng = own["rng"] if isinstance(own, dict) else None

    # -- hooks ------------------------------------------------------------------------------

    @override
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        core = GuardCore(self.settings)
        self._core = core
        self.events = core.events
        core.install()
        restored = load_newest(
            core.store, core.ranks, allow_fresh_start=core.settings.allow_fresh_start
        )
        if restored is None:
            return
        # Lightning restores from this pre-loaded dict when fit() was given no ckpt_path.
        trainer._checkpoint_connector._loaded_checkpoint = restored.whole
        if core.ranks.rank != 0:
            self._rank_rng = restored.meta["rng"]
        core.resumed_from(restored.manifest.step)
        self.resumed_from = restored.manifest.step

    @override
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self._core is not None:
            self._core.reinstall_signal_handlers()
        pending = self._rank_rng or self._pending_rng
        if pending is not None:
            rng.restore(pending)
        self._rank_rng = self._pending_rng = None

    @override
    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        core = self._core
        if core is None:
            return
        core.at_step_boundary(trainer.global_step, trainer.current_epoch, self._tree_fn(trainer))

    def _tree_fn(self, trainer: Any) -> Any:
        """What this rank saves: Lightning's whole checkpoint on rank 0 (our entry added by
        :meth:`on_save_checkpoint`), its own step and RNG states elsewhere."""
        if trainer.global_rank == 0:
            return trainer._checkpoint_connector.dump_checkpoint
        return lambda: {META_KEY: meta(trainer.global_step, trainer.current_epoch)}

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

    @override
    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        core = self._core
        if core is None or stage != "fit":
            return
        self._core = None
        core.wait()
        core.close()
        if not core.preempted:
            core.raise_if_failed()
