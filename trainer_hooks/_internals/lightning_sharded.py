"""Lightning's sharded strategies in format ``dcp``: which configurations are saved correctly,
what every rank saves, and how a sharded checkpoint comes back into the live trainer.

Checked against Lightning 2.6.6 (no Lightning import: either package drives it):

* **What is sharded.** ``ModelParallelStrategy`` (FSDP2 / tensor parallelism, DTensors) with
  ``save_distributed_checkpoint=True`` (its default) and ``FSDPStrategy`` with
  ``state_dict_type="sharded"`` give each rank its own shards from ``dump_checkpoint``: their
  ``lightning_module_state_dict`` and ``optimizer_state`` are torch's sharded state dicts (FQN
  keys, DTensor or ShardedTensor values). Their other setting gathers the whole state on rank
  0 and leaves the other ranks' entries empty: refused, naming the setting to change.
* **What every rank saves** (:func:`sharded_save`): Lightning's checkpoint dict, dumped on every
  rank, split three ways. The model's and optimizers' shards go into DCP's state dict under
  the names Lightning's own distributed checkpoints use (``state_dict``, ``optimizer_<i>``).
  Spotguard's ``__spotguard__`` entry (random streams, samplers) differs per rank: it goes into
  the rank's own file. The rest (loops, callbacks, schedulers, hyperparameters, precision)
  is what a ``torch`` checkpoint restores from rank 0's file on every rank; it goes whole into
  rank 0's own file (as the plain loop's plain values, :data:`~.sharded_state.PLAIN_KEY`), so every
  rank loads rank 0's copy, and that small file only (not rank 0's shard), its structure
  needs no template on load, and it loads weights-only. An optimizer without state yet is
  dumped as the plain loop's marker (:func:`~.sharded_state.fresh_optimizer`): torch's state-dict
  APIs would step it with ``lr=0`` (FSDP2), or save it empty and unloadable (FSDP1).
  ``FSDPStrategy``'s shards are ShardedTensors, which torch's stager (the copy of a periodic
  save) does not take: they are saved as the DTensors of the same shards
  (:func:`_as_dtensors`), and loaded through the DTensors of the live shards
  (:func:`load_step`). Lightning's dump is a CPU copy already (its strategies offload):
  such a job goes to the background thread without a second copy
  (:attr:`~.sharded.ShardedSave.private`).
* **Resume** (:func:`sharded_store_side`): these strategies restore after their ``setup``
  (``restore_checkpoint_after_setup``), so the checkpoint connector's ``resume_start`` runs
  with the model sharded and the optimizers built: there the shards are loaded into the live
  model and optimizers (``set_model_state_dict`` / ``set_optimizer_state_dict``, at any world
  size), and the rest goes to Lightning as its loaded checkpoint. Their
  ``load_model_state_dict`` / ``load_optimizer_state_dict`` do nothing and
  ``lightning_restore_optimizer`` is off: Lightning restores loops, callbacks and schedulers
  from the rest, exactly as after its own ``load_checkpoint``, and never counters without
  weights.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any, cast

import torch

from spotguard.errors import ConfigError, ResumeRefused, UnloadableCheckpoint
from spotguard.trainer_hooks._internals.core import GuardCore
from spotguard.trainer_hooks._internals.files import META_KEY, Restored, load_newest
from spotguard.trainer_hooks._internals.lightning_resume import (
    STATE_METHODS,
    WHOLE_STATE,
    StoreSide,
    check_replicated,
    lightning_class,
)
from spotguard.trainer_hooks._internals.sharded import ShardedSave, load_sharded_step
from spotguard.trainer_hooks._internals.sharded_state import PLAIN_KEY, fresh_optimizer

if TYPE_CHECKING:
    from spotguard.trainer_hooks._internals.ranks import Ranks
    from spotguard.trainer_hooks.store import CheckpointStore

__all__ = ["REST_KEY", "checkpoint_format", "load_step", "sharded_save", "sharded_store_side"]

log = logging.getLogger("spotguard.trainer_hooks")

#: Lightning's sharded strategies that spotguard saves in format ``dcp``.
_SHARDED = frozenset({"ModelParallelStrategy", "FSDPStrategy"})
#: The DCP key of the rest of Lightning's checkpoint dict (rank 0's, one blob).
REST_KEY = "lightning"
_SUPPORTED = (
    "supported: SingleDeviceStrategy, DDPStrategy (strategy='ddp'), ModelParallelStrategy "
    "(save_distributed_checkpoint=True) and FSDPStrategy(state_dict_type='sharded')"
)


def _sharded_base(cls: type) -> str | None:
    """The Lightning sharded strategy ``cls`` is (or derives from), if any."""
    found = next((base for base in cls.__mro__ if lightning_class(base, _SHARDED)), None)
    return None if found is None else found.__name__


def checkpoint_format(strategy: Any, setting: str) -> str:
    """The format of a ``fit`` under ``strategy`` (``setting``: the ``checkpoint_format``
    setting): ``dcp`` for a sharded strategy that dumps its shards, ``torch`` for one that
    holds one whole, replicated state; :class:`ConfigError` for anything else, before anything
    is installed or held."""
    cls = type(strategy)
    name = cls.__name__
    base = _sharded_base(cls)
    if base is None:
        check_replicated(strategy)
        if setting == "dcp":
            raise ConfigError(
                f"checkpoint_format='dcp' with {name}: SpotCheckpoint saves a replicated "
                "strategy's whole state in format torch; use checkpoint_format='auto' or 'torch'"
            )
        return "torch"
    for method in STATE_METHODS:
        owner = next(klass for klass in cls.__mro__ if method in vars(klass))
        if not lightning_class(owner, WHOLE_STATE | _SHARDED):
            raise ConfigError(
                f"SpotCheckpoint cannot checkpoint {name}: {owner.__name__}.{method} keeps "
                f"state its own way, and spotguard saves {base}'s sharded state; {_SUPPORTED}"
            )
    if base == "ModelParallelStrategy" and not strategy._save_distributed_checkpoint:
        raise ConfigError(
            f"SpotCheckpoint cannot checkpoint {name}(save_distributed_checkpoint=False): it "
            "gathers the whole state on rank 0; use save_distributed_checkpoint=True (the default)"
        )
    if base == "FSDPStrategy" and getattr(strategy, "_state_dict_type", "full") != "sharded":
        raise ConfigError(
            f"SpotCheckpoint cannot checkpoint {name}(state_dict_type='full'): it gathers the "
            f"whole state on rank 0; use {name}(state_dict_type='sharded')"
        )
    hybrid = getattr(getattr(strategy, "sharding_strategy", None), "name", "")
    if base == "FSDPStrategy" and "HYBRID" in hybrid and "device_mesh" not in strategy.kwargs:
        raise ConfigError(
            f"SpotCheckpoint cannot checkpoint {name}(sharding_strategy='{hybrid}') without a "
            "device_mesh: its shards (ShardedTensors of process groups) are not saved; give "
            f"{name}(device_mesh=(replicas, ranks per replica)) or use 'FULL_SHARD'"
        )
    if setting == "torch":
        raise ConfigError(
            f"checkpoint_format='torch' cannot save {name}'s sharded state: no rank holds all "
            "of it; use checkpoint_format='dcp' (or 'auto')"
        )
    return "dcp"


def sharded_save(trainer: Any) -> ShardedSave:
    """This rank's part of Lightning's checkpoint (call it on every rank alike: the dump may
    run collectives). Never raises: a failure to build it is kept in the job, and the save
    fails on every rank before DCP's first collective instead of leaving the others in it."""
    rank: int = trainer.global_rank
    strategy = trainer.strategy
    optimizer_state = strategy.optimizer_state

    def state_or_marker(optimizer: Any) -> Any:
        """An optimizer's sharded state, or the marker of one without state yet (torch's
        state-dict APIs would make its state by a step with ``lr=0`` on the live optimizer)."""
        inner = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer's
        return optimizer_state(optimizer) if inner.state else fresh_optimizer(inner)

    strategy.optimizer_state = state_or_marker  # for this dump only
    try:
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        own = {META_KEY: checkpoint.pop(META_KEY)}
        state_dict: dict[str, Any] = {"state_dict": checkpoint.pop("state_dict")}
        for index, optimizer_state_dict in enumerate(checkpoint.pop("optimizer_states", [])):
            state_dict[f"optimizer_{index}"] = optimizer_state_dict
        state_dict = _as_dtensors(state_dict, {})
        private = _unshared(state_dict, _live_storages(strategy))
        if rank == 0:  # the others' copies are not saved: rank 0's is restored on every rank
            # copied now: a periodic save writes its own file in the background
            own[PLAIN_KEY] = {REST_KEY: copy.deepcopy(checkpoint)}
        # named when they differ across ranks (DCP would keep one rank's copy)
        buffers = frozenset(
            f"state_dict.{name}" for name, _ in trainer.lightning_module.named_buffers()
        )
    except Exception as exc:
        return ShardedSave({}, {}, rank, 0, failure=exc)
    finally:
        vars(strategy).pop("optimizer_state", None)
    job = ShardedSave.of_state_dict(state_dict, own, rank)
    return dataclasses.replace(job, buffers=buffers, private=private)


def _storage(tensor: torch.Tensor) -> int:
    """Where ``tensor``'s (a DTensor's local) data lives."""
    from torch.distributed.tensor import DTensor

    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return int(local.untyped_storage().data_ptr())


def _live_storages(strategy: Any) -> set[int]:
    """The storages of the live model's parameters and buffers and of the optimizers' state:
    what training writes into after the boundary."""
    model = strategy.model
    tensors = [*model.parameters(), *model.buffers()]
    for optimizer in strategy.optimizers:
        for moments in optimizer.state.values():
            tensors += [value for value in moments.values() if isinstance(value, torch.Tensor)]
    return {_storage(tensor) for tensor in tensors} - {0}


def _unshared(value: Any, live: set[int]) -> bool:
    """Whether Lightning's dump in ``value`` is a private copy (its strategies offload to the
    CPU: a copy of a GPU tensor), once its scalars that are the live ones (Adam's step count
    stays on the CPU) are copied here, in place. ``False`` when a larger tensor is live (the
    model trains on the CPU): the save is staged then, into buffers reused from save to save."""
    if isinstance(value, dict):
        keys: Any = list(value)
    elif isinstance(value, list):
        keys = range(len(value))
    else:
        return True
    private = True
    for key in keys:
        item = value[key]
        if isinstance(item, torch.Tensor) and _storage(item) in live:
            if item.dim() == 0 and type(item) is torch.Tensor:
                value[key] = item.clone()
            else:
                private = False
        elif not _unshared(item, live):
            private = False
    return private


def _as_dtensors(value: Any, meshes: dict[str, Any]) -> Any:
    """``value`` with every ShardedTensor (FSDPStrategy's sharded state dicts: FSDP1 without
    a device mesh) as the DTensor of the same shard: torch's stager, which copies a periodic
    save into CPU buffers, does not take ShardedTensors. FSDP1 chunks dim 0 over all ranks as
    a DTensor ``Shard(0)`` does; a layout that differs is refused, not saved wrong. ``meshes``:
    the world's mesh per device type, made once per save."""
    from torch.distributed._shard.sharded_tensor.api import ShardedTensor

    if isinstance(value, ShardedTensor):
        return _dtensor_of(value, meshes)
    if isinstance(value, dict):
        return {key: _as_dtensors(item, meshes) for key, item in value.items()}
    if isinstance(value, list):
        return [_as_dtensors(item, meshes) for item in value]
    return value


def _dtensor_of(value: Any, meshes: dict[str, Any]) -> Any:
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shards = value.local_shards()
    size = value.size()
    if len(shards) > 1:
        raise ConfigError(
            f"a ShardedTensor of shape {tuple(size)} holds {len(shards)} shards on one rank: "
            "spotguard saves FSDP's one shard per rank only"
        )
    meta = value.metadata().tensor_properties
    if shards:
        local = shards[0].tensor
        offset = tuple(shards[0].metadata.shard_offsets)
    else:
        local = torch.empty((0, *size[1:]), dtype=meta.dtype)
        offset = None
    kind = local.device.type
    mesh = meshes.get(kind)
    if mesh is None:
        world = dist.group.WORLD
        if world is None:
            raise ConfigError("FSDP's sharded state without a process group: nothing to save")
        mesh = meshes[kind] = DeviceMesh.from_group(world, kind)
    shape, start = compute_local_shape_and_global_offset(size, mesh, [Shard(0)])
    if tuple(local.shape) != tuple(shape) or (offset is not None and offset != tuple(start)):
        raise ConfigError(
            f"FSDP's shard of a tensor of shape {tuple(size)} on this rank ({tuple(local.shape)} "
            f"at {offset}) is not the Shard(0) chunk ({tuple(shape)} at {tuple(start)}): "
            "spotguard cannot save this layout"
        )
    return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=size,
                              stride=torch.empty(size, device="meta").stride())  # fmt: skip


def load_step(
    store: CheckpointStore, ranks: Ranks, step: int, state: MutableMapping[str, Any]
) -> tuple[Restored | None, tuple[str, str] | None, str | None]:
    """:func:`load_sharded_step` for Lightning's state: FSDP1's ShardedTensors in the target
    are loaded as the DTensors of the same shards (they share storage, so the shards are
    filled). Torch's loader drops a ShardedTensor's empty shard (a weight with fewer rows
    than ranks, such as a ``Linear(d, 1)`` head), then takes the checkpoint for the pre-2.4
    optimizer layout and fails on every rank at every relaunch."""
    return load_sharded_step(
        store, ranks, step, state, loaded_as=lambda target: _as_dtensors(target, {})
    )


def _rest(value: Any, step: int) -> dict[str, Any]:
    """The rest of Lightning's checkpoint dict, from rank 0's own file (loaded weights-only,
    as a ``torch`` checkpoint is)."""
    if not isinstance(value, dict):
        raise UnloadableCheckpoint(
            f"checkpoint {step} holds no Lightning checkpoint entries (loops, callbacks, "
            "schedulers) in rank 0's own file: it was not written by this version of "
            "SpotCheckpoint; give it a new store prefix"
        )
    return cast(dict[str, Any], value)


def sharded_store_side(trainer: Any, core: GuardCore) -> StoreSide:
    """The store's side of the resume under a sharded strategy: the newest committed step (a
    collective), and a load of the newest verified one into the live model and optimizers,
    its rest for Lightning. Call it once the strategy is set up (in ``resume_start``)."""
    ranks = core.ranks
    found: int | None = None
    problem: str | None = None
    if ranks.rank == 0:
        try:
            newest = core.store.latest()
            found = None if newest is None else newest.step
        except Exception as exc:  # raised below, on every rank alike
            problem = f"{type(exc).__name__}: {exc}"
    step, problem = ranks.gather((found, problem))[0]
    if problem is not None:
        raise ResumeRefused(f"rank 0 could not list {core.store.uri}: {problem}")

    def load() -> tuple[Restored, dict[str, Any]] | None:
        strategy = trainer.strategy
        state: dict[str, Any] = {"state_dict": strategy.model, REST_KEY: None}
        for index, optimizer in enumerate(strategy.optimizers):
            state[f"optimizer_{index}"] = optimizer
        restored = load_newest(
            core.store, ranks, allow_fresh_start=core.settings.allow_fresh_start,
            sharded=lambda at: load_step(core.store, ranks, at, state),
        )  # fmt: skip
        if restored is None:
            return None
        manifest = restored.manifest
        if manifest.format != "dcp":
            raise ConfigError(
                f"{core.store.uri}: checkpoint {manifest.step} is format {manifest.format} "
                f"(a replicated strategy's whole state), and {type(strategy).__name__} resumes "
                "from sharded (dcp) checkpoints only; give SpotCheckpoint a new store prefix"
            )
        if not restored.meta:
            log.warning("checkpoint %d was written by %d rank(s) and holds no random streams "
                        "of rank %d: it keeps its own, so this run is not bit-exact against an "
                        "uninterrupted one", manifest.step, manifest.world_size,
                        ranks.rank)  # fmt: skip
        return restored, _rest(state[REST_KEY], manifest.step)

    return StoreSide(step, load)
