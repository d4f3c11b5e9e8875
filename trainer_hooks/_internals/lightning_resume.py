"""What a Lightning ``fit`` resumes from, and what it may run with: the seams SpotCheckpoint
needs in Lightning's restore path (checked against 2.6.6; no Lightning import, either package
drives it).

* **Replicated strategies only.** A checkpoint holds one whole state, written by rank 0, and
  each rank's random streams. Strategies that shard the model or optimizer (FSDP,
  ModelParallel) or keep them in their own format (DeepSpeed) save and load through their own
  ``save_checkpoint`` / ``load_checkpoint``, which the automatic resume bypasses: step
  counters would come back with fresh weights. :func:`check_replicated` allows Lightning's
  ``SingleDeviceStrategy`` and ``DDPStrategy`` (``ddp``, ``ddp_spawn``, ``ddp_fork``,
  ``ddp_notebook``) and subclasses of them that keep state their way; everything else is
  refused before anything is installed. An allow-list, not a deny-list: a strategy nobody
  checked is refused, not trusted (DeepSpeed derives from ``DDPStrategy``).
* **One source for every rank.** ``fit(ckpt_path=...)`` loads the path in the checkpoint
  connector's ``resume_start``, after every callback's ``setup``; :func:`after_resume_start`
  lets :func:`choose_source` decide right after it, on every rank, before anything is
  restored. The store's newest verified checkpoint wins when it is at least as new as the
  path, with a warning when it is newer: a relaunch after preemption runs the same command,
  ``ckpt_path`` included (``"last"`` names Lightning's own ``last.ckpt``, which can be steps
  behind an emergency save), and restoring the older path would redo work and then write
  steps below the store's newest. A path newer than the store wins; its spotguard entry holds
  rank 0's random streams only, so the other ranks' are not restored (the log says so).

The train samplers' part of a resume is :mod:`.lightning_samplers`'.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from spotguard.errors import ConfigError
from spotguard.trainer_hooks._internals.files import META_KEY, Restored
from spotguard.trainer_hooks._internals.ranks import Ranks
from spotguard.trainer_hooks.manifest import step_dir

__all__ = [
    "Source",
    "after_resume_start",
    "check_replicated",
    "choose_source",
]

log = logging.getLogger("spotguard.trainer_hooks")

_LIGHTNING = ("lightning", "pytorch_lightning")
#: Lightning strategies that hold the whole state, replicated on every rank.
_REPLICATED = frozenset({"SingleDeviceStrategy", "DDPStrategy"})
#: Their bases, where the whole-state implementations of :data:`_STATE_METHODS` live.
_WHOLE_STATE = _REPLICATED | {"Strategy", "ParallelStrategy"}
#: How a strategy gets and sets state: a subclass overriding any of them keeps its own.
_STATE_METHODS = (
    "lightning_module_state_dict",
    "load_model_state_dict",
    "optimizer_state",
    "load_optimizer_state_dict",
    "save_checkpoint",
    "load_checkpoint",
    "restore_checkpoint_after_setup",
)


def _lightning_class(cls: type, names: frozenset[str]) -> bool:
    return cls.__name__ in names and cls.__module__.split(".")[0] in _LIGHTNING


def check_replicated(strategy: Any) -> None:
    """Raise :class:`ConfigError` unless ``strategy`` keeps one whole, replicated state."""
    cls = type(strategy)
    name = cls.__name__
    use = "use strategy='ddp' (DDPStrategy) or a single device until spotguard supports it"
    if cls.__module__.split(".")[0] in _LIGHTNING and not _lightning_class(cls, _REPLICATED):
        raise ConfigError(
            f"SpotCheckpoint cannot checkpoint {name}: it shards the model or optimizer or "
            f"keeps them in its own format, and spotguard saves one whole state; {use}"
        )
    if not any(_lightning_class(base, _REPLICATED) for base in cls.__mro__):
        raise ConfigError(
            f"SpotCheckpoint cannot checkpoint {name}: only Lightning's SingleDeviceStrategy "
            f"and DDPStrategy (and their subclasses) are known to hold one whole state; {use}"
        )
    for method in _STATE_METHODS:
        owner = next(base for base in cls.__mro__ if method in vars(base))
        if not _lightning_class(owner, _WHOLE_STATE):
            raise ConfigError(
                f"SpotCheckpoint cannot checkpoint {name}: {owner.__name__}.{method} keeps "
                f"state its own way, and spotguard saves one whole state; {use}"
            )


@dataclass(frozen=True)
class Source:
    """What this rank resumes from."""

    #: The step restored (``None``: a fresh start).
    step: int | None
    #: This rank's spotguard entry (step, random streams, samplers) from the same checkpoint
    #: (``None``: none to restore).
    own: dict[str, Any] | None
    #: The newest verified checkpoint in the store: what counts as checkpointed already.
    newest_in_store: int | None


def choose_source(
    connector: Any, path: Any, restored: Restored | None, ranks: Ranks, uri: str
) -> Source:
    """Decide, on every rank alike (one collective), between the ``ckpt_path`` Lightning has
    just loaded into ``connector`` (if any) and the store's newest verified checkpoint
    (``restored``); leave the winner in ``connector._loaded_checkpoint``."""
    given = connector._loaded_checkpoint if path else None
    steps = ranks.gather(None if given is None else int(given.get("global_step", 0)))
    stored = restored.manifest.step if restored is not None else None
    newest_given = max((s for s in steps if s is not None), default=None)
    if newest_given is None or (stored is not None and stored >= newest_given):
        if restored is None:
            return Source(None, None, None)
        connector._loaded_checkpoint = restored.whole
        if path:
            connector._ckpt_path = f"{uri}/{step_dir(restored.manifest.step)}"  # Lightning logs it
            if stored != newest_given and ranks.rank == 0:
                log.warning(
                    "ckpt_path=%r holds step %s, but %s holds a newer verified checkpoint: "
                    "resuming from step %s instead (a relaunch runs the same command; to "
                    "restart from the older checkpoint on purpose, give SpotCheckpoint a new "
                    "store prefix)", str(path), newest_given, uri, stored,
                )  # fmt: skip
        return Source(stored, restored.meta, stored)
    if steps.count(newest_given) != len(steps):
        raise ConfigError(
            f"ckpt_path={path!r} names different checkpoints on different ranks (global_step "
            f"by rank: {steps}): every rank must resume from the same one"
        )
    entry = given.get(META_KEY) if given is not None else None
    own = entry if isinstance(entry, dict) and ranks.rank == 0 else None
    if ranks.rank == 0:
        why = f"step {newest_given}, newer than the store's newest ({stored})"
        if own is None:
            log.warning("resuming from ckpt_path=%r (%s): it holds no spotguard random "
                        "streams, none are restored", str(path), why)  # fmt: skip
        elif ranks.world > 1:
            log.warning("resuming from ckpt_path=%r (%s): it holds rank 0's random streams "
                        "only, the other ranks start theirs afresh", str(path), why)  # fmt: skip
        else:
            log.info("resuming from ckpt_path=%r (%s)", str(path), why)
    return Source(newest_given, own, stored)


def after_resume_start(connector: Any, then: Callable[[Any], None]) -> Callable[[], None]:
    """Call ``then(ckpt_path)`` right after Lightning's ``resume_start`` loaded the path (or
    found none), before anything is restored from it. Returns the undo."""
    resume_start = connector.resume_start

    def resume_start_then(checkpoint_path: Any = None, **kwargs: Any) -> None:
        resume_start(checkpoint_path, **kwargs)
        then(checkpoint_path)

    connector.resume_start = resume_start_then
    return lambda: vars(connector).pop("resume_start", None)
