"""SpotGuard: spot-safe checkpointing for a hand-written PyTorch training loop.

::

    guard = SpotGuard("s3://bucket/runs/run-42", every_n_steps=500)
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "data": loader}
    start = guard.restore(state)            # newest verified checkpoint, or 0 on a fresh start
    for step in range(start, total_steps):
        train_one_step(...)
        guard.step(step + 1, state)         # periodic async saves; exits 75 when preempted
    guard.finish(total_steps, state)        # final checkpoint, waits for uploads, raises failures

``state`` maps names to objects with ``state_dict()``/``load_state_dict()`` (modules,
optimizers, schedulers, grad scalers, :class:`~spotguard.trainer_hooks.data.ResumableDataLoader`)
or to plain values (ints, tensors, dicts), which :meth:`restore` replaces in the dict. The RNG
states (Python, NumPy, torch, CUDA) are saved alongside and restored last, so the resumed run
draws the same random numbers the uninterrupted one would have.

With FSDP2 or tensor parallelism (DTensor state), every rank saves its own shards
(``checkpoint_format="dcp"``, chosen by the default ``"auto"``): modules and optimizers through
torch's ``get_model_state_dict``/``get_optimizer_state_dict`` (an optimizer with the module of
``state`` that holds all its parameters; one saved before its first step resumes fresh), so a
resume may run at another world size; the other entries of ``state`` are rank 0's, saved
whole in rank 0's own file and loaded whole on every rank, as in format ``torch``; each
rank's random streams go into a small file of its own. :meth:`restore` loads the newest
checkpoint whatever its format.

Where no agent runs, ``imds_endpoint="http://169.254.169.254"`` makes the process poll IMDS
itself (spot notice and rebalance recommendation, with the agent's IMDSv2 client).

When the agent signals (or the notice file appears, or SIGTERM arrives), :meth:`step` saves an
emergency checkpoint at that step boundary and raises
:class:`~spotguard.trainer_hooks.Preempted`, a ``SystemExit`` with code 75: ``finally`` blocks
run, and a supervisor that restarts on 75 (systemd ``RestartForceExitStatus=75``) resumes.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

from spotguard.trainer_hooks._internals import rng
from spotguard.trainer_hooks._internals.core import GuardCore
from spotguard.trainer_hooks._internals.files import META_KEY, load_newest, meta
from spotguard.trainer_hooks._internals.sharded import ShardedSave, load_sharded_step
from spotguard.trainer_hooks._internals.sharded_state import choose_format
from spotguard.trainer_hooks.settings import GuardSettings

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from spotguard.trainer_hooks.settings import GuardOptions
    from spotguard.trainer_hooks.store import CheckpointStore

__all__ = ["SpotGuard"]

log = logging.getLogger("spotguard.trainer_hooks")


class SpotGuard:
    """Periodic async checkpoints, an emergency save on preemption, automatic resume.

    ``uri`` is the checkpoint store; the keyword arguments are :class:`GuardSettings`' fields
    (``every_n_steps``, ``every_seconds``, ``keep_last``, ``imds_endpoint``, ``transfer``, ...),
    with its defaults; a bad value raises :class:`~spotguard.errors.ConfigError`.
    """

    def __init__(self, uri: str, **options: Unpack[GuardOptions]) -> None:
        self._core = GuardCore(GuardSettings(uri=uri, **options))
        self._installed = False
        #: ``torch`` or ``dcp``: decided once, the same on every rank, at first use.
        self._format: str | None = None
        self.epoch = 0

    @property
    def store(self) -> CheckpointStore:
        return self._core.store

    @property
    def stop_requested(self) -> bool:
        """Whether a preemption was announced; :meth:`step` will act on it."""
        return self._core.stop_requested

    @property
    def events(self) -> dict[str, float]:
        """Wall-clock times of the preemption path (``stop_requested``, ``save_started``,
        ``save_committed``, ``exiting``), as far as it got."""
        return self._core.events

    def restore(self, state: MutableMapping[str, Any]) -> int:
        """Load the newest verified checkpoint into ``state``; returns the step to start at."""
        self._install(state)
        core = self._core
        restored = load_newest(
            core.store, core.ranks, allow_fresh_start=core.settings.allow_fresh_start,
            sharded=lambda step: load_sharded_step(core.store, core.ranks, step, state),
        )  # fmt: skip
        if restored is None:
            return 0
        manifest = restored.manifest
        if restored.whole is not None:  # whole-state: sharded state is loaded in place
            for name, value in restored.whole["state"].items():
                target = state.get(name)
                if target is not None and hasattr(target, "load_state_dict"):
                    target.load_state_dict(value)
                else:
                    state[name] = value
        self.epoch = int(restored.meta.get("epoch", manifest.epoch))
        core.resumed_from(manifest.step, newest_in_store=manifest.step)
        if "rng" in restored.meta:
            rng.restore(restored.meta["rng"])  # last: nothing above may draw random numbers
        else:
            log.warning("checkpoint %d was written by %d rank(s) and holds no random streams "
                        "of rank %d: it keeps its own, so this run is not bit-exact against "
                        "an uninterrupted one", manifest.step, manifest.world_size,
                        core.ranks.rank)  # fmt: skip
        return int(restored.meta.get("step", manifest.step))

    def _install(self, state: MutableMapping[str, Any]) -> None:
        """At first use (every rank alike): install the core, then decide the format."""
        if not self._installed:
            self._core.install()
            self._installed = True
        if self._format is None:
            core = self._core
            self._format = choose_format(core.settings.checkpoint_format, state, core.ranks)
            if self._format == "dcp":
                core.saver.use_sharded()

    def _tree(self, step: int, state: MutableMapping[str, Any]) -> dict[str, Any] | ShardedSave:
        own = {META_KEY: meta(step, self.epoch)}
        if self._format == "dcp":  # every rank its shards, and its own streams beside them
            return ShardedSave.of(state, own, self._core.ranks.rank)
        if self._core.ranks.rank != 0:
            return own  # replicated state is saved once, by rank 0
        whole = {
            name: value.state_dict() if hasattr(value, "state_dict") else value
            for name, value in state.items()
        }
        return {"state": whole, **own}

    def step(self, step: int, state: MutableMapping[str, Any], *, epoch: int | None = None) -> None:
        """Call at every step boundary with the number of steps completed."""
        self._install(state)
        if epoch is not None:
            self.epoch = epoch
        self._core.at_step_boundary(step, self.epoch, lambda: self._tree(step, state))

    def finish(self, step: int, state: MutableMapping[str, Any]) -> None:
        """Save the final checkpoint, wait for every upload, raise any background failure."""
        try:
            self._install(state)
            self._core.save_sync(step, self.epoch, self._tree(step, state), "final")
        finally:
            self.close()

    def close(self) -> None:
        """Stop watching, restore signal handlers, unregister from the agent; raise a
        background failure, except after a preemption (the exit code is 75 then)."""
        self._core.wait()
        self._core.close()
        self._installed = False
        if not self._core.preempted:
            self._core.raise_if_failed()

    def __enter__(self) -> SpotGuard:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if not self._installed:
            return
        if error is None:
            self.close()
            return
        try:  # already failing: do not mask that error with one from closing
            self.close()
        except Exception as close_error:
            log.error("while closing after %s: %s", type(error).__name__, close_error)
