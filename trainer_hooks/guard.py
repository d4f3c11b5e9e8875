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
from pathlib import Path
from types import TracebackType
from typing import Any

from spotguard.trainer_hooks._internals import rng
from spotguard.trainer_hooks._internals.core import GuardCore, GuardSettings
from spotguard.trainer_hooks.store import TransferSettings

__all__ = ["SpotGuard"]

META_KEY = "__spotguard__"
log = logging.getLogger("spotguard.trainer_hooks")


class SpotGuard:
    """Periodic async checkpoints, an emergency save on preemption, automatic resume."""

    def __init__(
        self,
        uri: str,
        *,
        every_n_steps: int | None = None,
        every_seconds: float | None = None,
        keep_last: int | None = 3,
        state_dir: str | Path | None = None,
        signals: tuple[str, ...] = ("SIGUSR1", "SIGTERM"),
        exit_code: int = 75,
        default_budget: float = 30.0,
        safety_margin: float = 5.0,
        imds_endpoint: str | None = None,
        transfer: TransferSettings | None = None,
    ) -> None:
        settings = GuardSettings(
            uri=uri,
            every_n_steps=every_n_steps,
            every_seconds=every_seconds,
            keep_last=keep_last,
            state_dir=Path(state_dir) if state_dir is not None else None,
            signals=signals,
            exit_code=exit_code,
            default_budget=default_budget,
            safety_margin=safety_margin,
            imds_endpoint=imds_endpoint,
            transfer=transfer,
        )
        self._core = GuardCore(settings)
        self._installed = False
        self.epoch = 0

    @property
    def store(self) -> Any:
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
        if not self._installed:
            self._core.install()
            self._installed = True
        core = self._core
        if core.store.latest() is None:
            return 0
        manifest, saved = core.store.load_state()
        for name, value in saved["state"].items():
            target = state.get(name)
            if target is not None and hasattr(target, "load_state_dict"):
                target.load_state_dict(value)
            else:
                state[name] = value
        meta = saved[META_KEY]
        if core.ranks.rank != 0:
            # The state is replicated (rank 0's); the random streams are each rank's own.
            meta = core.store.load_state(step=manifest.step, name=core.my_file)[1][META_KEY]
        self.epoch = int(meta["epoch"])
        core.last_committed_step = manifest.step
        rng.restore(meta["rng"])  # last: nothing above may draw random numbers after it
        return int(meta["step"])

    def _tree(self, step: int, state: MutableMapping[str, Any]) -> dict[str, Any]:
        meta = {"step": step, "epoch": self.epoch, "rng": rng.capture()}
        if self._core.ranks.rank != 0:
            return {META_KEY: meta}  # replicated state is saved once, by rank 0
        return {
            "state": {
                name: value.state_dict() if hasattr(value, "state_dict") else value
                for name, value in state.items()
            },
            META_KEY: meta,
        }

    def step(self, step: int, state: MutableMapping[str, Any], *, epoch: int | None = None) -> None:
        """Call at every step boundary with the number of steps completed."""
        if not self._installed:
            self._core.install()
            self._installed = True
        if epoch is not None:
            self.epoch = epoch
        self._core.at_step_boundary(step, self.epoch, lambda: self._tree(step, state))

    def finish(self, step: int, state: MutableMapping[str, Any]) -> None:
        """Save the final checkpoint, wait for every upload, raise any background failure."""
        try:
            self._core.save_sync(step, self.epoch, self._tree(step, state), "final")
        finally:
            self.close()

    def close(self) -> None:
        """Stop watching, restore signal handlers, unregister from the agent."""
        self._core.wait()
        self._core.close()
        self._installed = False
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
