"""What a Lightning ``fit`` resumes from, and what it may run with: the seams SpotCheckpoint
needs in Lightning's restore path (checked against 2.6.6; no Lightning import, either package
drives it).

* **Replicated strategies in format torch.** Such a checkpoint holds one whole state, written
  by rank 0, and each rank's random streams. :func:`check_replicated` allows Lightning's
  ``SingleDeviceStrategy`` and ``DDPStrategy`` (``ddp``, ``ddp_spawn``, ``ddp_fork``,
  ``ddp_notebook``) and subclasses of them that do not keep state their own way. Strategies
  that shard the model or optimizer save and load through their own ``save_checkpoint`` /
  ``load_checkpoint``, which the automatic resume bypasses: step counters would come back
  with fresh weights. Lightning's ``ModelParallelStrategy`` and ``FSDPStrategy`` go through
  format ``dcp`` instead (:mod:`.lightning_sharded`); everything else (DeepSpeed keeps its
  own format) is refused before anything is installed. An allow-list, not a deny-list: a
  strategy nobody checked is refused, not trusted (DeepSpeed derives from ``DDPStrategy``).
* **One source for every rank.** ``fit(ckpt_path=...)`` loads the path in the checkpoint
  connector's ``resume_start``, after every callback's ``setup``; :func:`after_resume_start`
  lets :func:`choose_source` decide right after it, on every rank, before anything is
  restored. The store's newest verified checkpoint wins when it is at least as new as the
  path, with a warning when it is newer: a relaunch after preemption runs the same command,
  ``ckpt_path`` included (``"last"`` names Lightning's own ``last.ckpt``, which can be steps
  behind an emergency save), and restoring the older path would redo work and then write
  steps below the store's newest. A path newer than the store wins; its spotguard entry holds
  rank 0's random streams only, so the other ranks' are not restored (the log says so).
  Under a sharded strategy Lightning has loaded the path's weights into the live model
  already; the store's checkpoint is loaded over them when its listed newest is at least as
  new (:class:`StoreSide`). When that load gives nothing as new as the path (every newer
  checkpoint failed, or the fallback is older), the path wins after all and Lightning loads
  it again: never the path's counters over the store's (or half-loaded) weights, never an
  older store checkpoint over a newer path.

The train samplers' part of a resume is :mod:`.lightning_samplers`'.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from spotguard.errors import ConfigError
from spotguard.protocol import step_dir
from spotguard.trainer_hooks._internals.files import META_KEY, Restored
from spotguard.trainer_hooks._internals.ranks import Ranks

__all__ = [
    "STATE_METHODS",
    "WHOLE_STATE",
    "Source",
    "StoreSide",
    "after_resume_start",
    "check_replicated",
    "choose_source",
    "lightning_class",
    "whole_state_side",
]

log = logging.getLogger("spotguard.trainer_hooks")

_LIGHTNING = ("lightning", "pytorch_lightning")
#: Lightning strategies that hold the whole state, replicated on every rank.
_REPLICATED = frozenset({"SingleDeviceStrategy", "DDPStrategy"})
#: Their bases, where the whole-state implementations of :data:`STATE_METHODS` live.
WHOLE_STATE = _REPLICATED | {"Strategy", "ParallelStrategy"}
#: How a strategy gets and sets state: a subclass overriding any of them keeps its own.
STATE_METHODS = (
    "lightning_module_state_dict",
    "load_model_state_dict",
    "optimizer_state",
    "load_optimizer_state_dict",
    "save_checkpoint",
    "load_checkpoint",
    "restore_checkpoint_after_setup",
)


def lightning_class(cls: type, names: frozenset[str]) -> bool:
    """Whether ``cls`` is the Lightning class of one of ``names`` (either package)."""
    return cls.__name__ in names and cls.__module__.split(".")[0] in _LIGHTNING


def check_replicated(strategy: Any) -> None:
    """Raise :class:`ConfigError` unless ``strategy`` keeps one whole, replicated state."""
    cls = type(strategy)
    name = cls.__name__
    use = (
        "use strategy='ddp' (DDPStrategy), a single device, ModelParallelStrategy or "
        "FSDPStrategy(state_dict_type='sharded')"
    )
    if cls.__module__.split(".")[0] in _LIGHTNING and not lightning_class(cls, _REPLICATED):
        raise ConfigError(
            f"SpotCheckpoint cannot checkpoint {name}: it shards the model or optimizer or "
            f"keeps them in its own format, and spotguard saves one whole state; {use}"
        )
    if not any(lightning_class(base, _REPLICATED) for base in cls.__mro__):
        raise ConfigError(
            f"SpotCheckpoint cannot checkpoint {name}: only Lightning's SingleDeviceStrategy "
            f"and DDPStrategy (and their subclasses) are known to hold one whole state; {use}"
        )
    for method in STATE_METHODS:
        owner = next(base for base in cls.__mro__ if method in vars(base))
        if not lightning_class(owner, WHOLE_STATE):
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


@dataclass(frozen=True)
class StoreSide:
    """The store's side of :func:`choose_source`, the same on every rank."""

    #: The newest committed step: what the store would resume from (``None``: nothing).
    step: int | None
    #: Load the newest verified checkpoint (on every rank alike): its :class:`Restored` and
    #: the checkpoint dict Lightning restores the rest from; ``None`` when there is none.
    load: Callable[[], tuple[Restored, dict[str, Any]] | None]


def whole_state_side(restored: Restored | None) -> StoreSide:
    """The store's side when its checkpoint is loaded already: a whole-state one, which is
    Lightning's own checkpoint dict."""
    if restored is None:
        return StoreSide(None, lambda: None)
    return StoreSide(restored.manifest.step, lambda: (restored, restored.whole))


def choose_source(
    connector: Any,
    path: Any,
    store: StoreSide,
    ranks: Ranks,
    uri: str,
    reload: Callable[[], None],
) -> Source:
    """Decide, on every rank alike (collectives), between the ``ckpt_path`` Lightning has just
    loaded into ``connector`` (if any) and the store's newest verified checkpoint; leave the
    winner in ``connector._loaded_checkpoint``. ``reload``: Lightning's load of the path again
    (its ``resume_start``), for when the store's load, which writes into the live model under
    a sharded strategy, gave no checkpoint at least as new as the path: the path then wins,
    and its weights must be back in the model (a failed load may have half-written them)."""
    given = connector._loaded_checkpoint if path else None
    steps = ranks.gather(None if given is None else int(given.get("global_step", 0)))
    newest_given = max((s for s in steps if s is not None), default=None)
    stored = store.step
    if newest_given is None or (store.step is not None and store.step >= newest_given):
        loaded = store.load()
        step = None if loaded is None else loaded[0].manifest.step
        if newest_given is None or (step is not None and step >= newest_given):
            if loaded is None:
                return Source(None, None, None)
            restored, checkpoint = loaded
            connector._loaded_checkpoint = checkpoint
            if path:
                connector._ckpt_path = f"{uri}/{step_dir(restored.manifest.step)}"  # logged
            newer = newest_given is not None and restored.manifest.step > newest_given
            if newer and ranks.rank == 0:
                log.warning(
                    "ckpt_path=%r holds step %s, but %s holds a newer verified checkpoint: "
                    "resuming from step %s instead (a relaunch runs the same command; to "
                    "restart from the older checkpoint on purpose, give SpotCheckpoint a new "
                    "store prefix)", str(path), newest_given, uri, restored.manifest.step,
                )  # fmt: skip
            return Source(restored.manifest.step, restored.meta, restored.manifest.step)
        # The store has nothing verified as new as the path: the path wins, loaded again.
        if ranks.rank == 0:
            log.warning("%s's newest checkpoints did not load (newest verified: %s): "
                        "ckpt_path=%r (step %s) is loaded again and resumed", uri, step,
                        str(path), newest_given)  # fmt: skip
        reload()
        given, stored = connector._loaded_checkpoint, step
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


def after_resume_start(
    connector: Any, then: Callable[[Any, Callable[[], None]], None]
) -> Callable[[], None]:
    """Call ``then(ckpt_path, reload)`` right after Lightning's ``resume_start`` loaded the
    path (or found none), before anything is restored from it; ``reload`` runs Lightning's
    ``resume_start`` on the path again. Returns the undo."""
    resume_start = connector.resume_start

    def resume_start_then(checkpoint_path: Any = None, **kwargs: Any) -> None:
        resume_start(checkpoint_path, **kwargs)
        then(checkpoint_path, lambda: resume_start(checkpoint_path, **kwargs))

    connector.resume_start = resume_start_then
    return lambda: vars(connector).pop("resume_start", None)
