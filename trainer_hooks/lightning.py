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
* Checkpoints are Lightning's own checkpoint dict (``dump_checkpoint``), copied into CPU
  buffers at the step boundary and uploaded in the background; they load with
  ``torch.load(weights_only=True)``, so hyperparameters must be plain data (or registered
  with ``torch.serialization.add_safe_globals``).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from spotguard.trainer_hooks._internals import rng
from spotguard.trainer_hooks._internals.core import GuardCore, GuardSettings, Preempted
from spotguard.trainer_hooks.store import TransferSettings

__all__ = ["SpotCheckpoint"]

CHECKPOINT_FILE = "lightning.ckpt"


def _callback_bases() -> tuple[type, ...]:
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


class _SpotCheckpoint:
    """Periodic async checkpoints, emergency save on preemption, automatic resume."""

    def __init__(
        self,
        uri: str,
        *,
        every_n_train_steps: int | None = None,
        every_n_seconds: float | None = None,
        keep_last: int | None = 3,
        state_dir: str | Path | None = None,
        signals: tuple[str, ...] = ("SIGUSR1", "SIGTERM"),
        exit_code: int = 75,
        default_budget: float = 30.0,
        safety_margin: float = 5.0,
        imds_endpoint: str | None = None,
        transfer: TransferSettings | None = None,
    ) -> None:
        self.settings = GuardSettings(
            uri=uri,
            every_n_steps=every_n_train_steps,
            every_seconds=every_n_seconds,
            keep_last=keep_last,
            state_dir=Path(state_dir) if state_dir is not None else None,
            signals=signals,
            exit_code=exit_code,
            default_budget=default_budget,
            safety_margin=safety_margin,
            imds_endpoint=imds_endpoint,
            transfer=transfer,
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
    def state_key(self) -> str:
        return f"SpotCheckpoint[{self.settings.uri}]"

    # -- state kept inside Lightning's checkpoint -------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng.capture()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_rng = state_dict.get("rng")

    # -- hooks ------------------------------------------------------------------------------

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        core = GuardCore(self.settings, file_name=CHECKPOINT_FILE)
        self._core = core
        self.events = core.events
        core.install()
        if core.store.latest() is None:
            return
        manifest, checkpoint = core.store.load_state(name=CHECKPOINT_FILE)
        # Lightning restores from this pre-loaded dict when fit() was given no ckpt_path.
        trainer._checkpoint_connector._loaded_checkpoint = checkpoint
        if core.ranks.rank != 0:
            # Rank 0's checkpoint carries rank 0's random streams; this rank's are its own.
            self._rank_rng = core.store.load_state(step=manifest.step, name=core.my_file)[1]["rng"]
        core.last_committed_step = manifest.step
        self.resumed_from = manifest.step

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self._core is not None:
            self._core.reinstall_signal_handlers()
        pending = self._rank_rng or self._pending_rng
        if pending is not None:
            rng.restore(pending)
        self._rank_rng = self._pending_rng = None

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        core = self._core
        if core is None:
            return
        core.at_step_boundary(trainer.global_step, trainer.current_epoch, self._tree_fn(trainer))

    def _tree_fn(self, trainer: Any) -> Any:
        """What this rank saves: Lightning's whole checkpoint on rank 0, its RNG elsewhere."""
        if trainer.global_rank == 0:
            return trainer._checkpoint_connector.dump_checkpoint
        return lambda: {"rng": rng.capture()}

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        core = self._core
        if core is None:
            return
        tree = self._tree_fn(trainer)()
        core.save_sync(trainer.global_step, trainer.current_epoch, tree, "final")

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self._core is not None and not isinstance(exception, Preempted):
            self._core.wait()
            self._core.close()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        core = self._core
        if core is None or stage != "fit":
            return
        self._core = None
        core.wait()
        core.close()
        core.raise_if_failed()


SpotCheckpoint = type("SpotCheckpoint", (_SpotCheckpoint, *_callback_bases()), {})
SpotCheckpoint.__doc__ = _SpotCheckpoint.__doc__
SpotCheckpoint.__module__ = __name__
