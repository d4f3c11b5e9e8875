"""SpotGuard's sharded (``dcp``) checkpoints: the format decision, the state dict every rank
builds, the save job the saver runs, and the load of one sharded checkpoint.

With FSDP2 or tensor parallelism the state is made of DTensors: no rank holds it all, so rank 0
cannot save it alone (format ``torch``). In format ``dcp`` every rank saves its own shards
through :func:`~spotguard.trainer_hooks._internals.dcp_store.save_sharded`:

* modules as ``get_model_state_dict`` gives them, optimizers as ``get_optimizer_state_dict``
  with the module of the state that owns their parameters: keyed by parameter names (FQNs),
  which is what lets DCP reshard them to another world size;
* other objects with ``state_dict()`` and plain values as they are: replicated (a value that
  differs per rank is refused by the save);
* what differs per rank and must not be resharded, its random streams, in a small file of its
  own (``rank-<k>.pt``, :func:`~spotguard.trainer_hooks._internals.files.meta`), committed in
  the same manifest.

A periodic save copies this rank's shards into reused CPU buffers (torch's ``DefaultStager``:
it keeps one CPU storage per source storage, DTensors included) at the step boundary: the only
stall training sees; the background thread then saves the copy.
"""

from __future__ import annotations

import dataclasses
import io
import logging
from collections.abc import Callable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from spotguard.errors import ConfigError, CorruptCheckpoint, UnloadableCheckpoint
from spotguard.trainer_hooks._internals.files import META_KEY, Restored
from spotguard.trainer_hooks._internals.snapshot import USABLE_SHARE, NoRoomForCopy

if TYPE_CHECKING:
    from torch.distributed.checkpoint.staging import DefaultStager

    from spotguard.trainer_hooks._internals.ranks import Ranks
    from spotguard.trainer_hooks.manifest import Manifest
    from spotguard.trainer_hooks.store import CheckpointStore, Payload

__all__ = [
    "ShardedSave",
    "ShardedStager",
    "choose_format",
    "holds_dtensors",
    "load_sharded_step",
    "own_file_name",
    "sharded_state_dict",
]

log = logging.getLogger("spotguard.trainer_hooks")


def own_file_name(rank: int) -> str:
    """The file of ``rank``'s own state (its random streams) in a sharded checkpoint."""
    return f"rank-{rank}.pt"


def _has_dtensor(value: Any) -> bool:
    if isinstance(value, DTensor):
        return True
    if isinstance(value, Mapping):
        return any(_has_dtensor(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_dtensor(item) for item in value)
    return False


def holds_dtensors(state: Mapping[str, Any]) -> bool:
    """Whether ``state`` holds a DTensor: a module's parameters, an optimizer's, or a value
    (other objects' ``state_dict()`` is not built for this: it may be costly)."""
    for value in state.values():
        if isinstance(value, nn.Module):
            params: Any = value.parameters()
        elif isinstance(value, torch.optim.Optimizer):
            params = (p for group in value.param_groups for p in group["params"])
        else:
            if _has_dtensor(value):
                return True
            continue
        if any(isinstance(param, DTensor) for param in params):
            return True
    return False


def choose_format(setting: str, state: Mapping[str, Any], ranks: Ranks) -> str:
    """The format of every checkpoint this run writes, the same on every rank (a collective
    with several ranks): ``setting`` resolved (``auto``: ``dcp`` when any rank's state holds a
    DTensor); ``torch`` for DTensor state is refused on every rank."""
    (sharded,) = ranks.any(holds_dtensors(state))
    if setting == "torch" and sharded:
        raise ConfigError(
            "checkpoint_format='torch' cannot save DTensor state (FSDP2, tensor parallelism): "
            "no rank holds all of it; use checkpoint_format='dcp' (or 'auto')"
        )
    if setting == "auto":
        return "dcp" if sharded else "torch"
    return setting


def _owner(name: str, optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> nn.Module:
    """The module of ``state`` whose parameters ``optimizer`` updates."""
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for value in state.values():
        if isinstance(value, nn.Module) and any(id(p) in params for p in value.parameters()):
            return value
    raise ConfigError(
        f"state[{name!r}] optimizes parameters of no module in the state: a sharded "
        "checkpoint keys optimizer state by parameter names, so put the model in the state too"
    )


def sharded_state_dict(state: Mapping[str, Any]) -> dict[str, Any]:
    """DCP's state dict of ``state``: modules and optimizers through torch's state-dict API
    (sharded, FQN keys), other objects' ``state_dict()``, plain values as they are."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    built: dict[str, Any] = {}
    for name, value in state.items():
        if isinstance(value, nn.Module):
            built[name] = get_model_state_dict(value)
        elif isinstance(value, torch.optim.Optimizer):
            built[name] = get_optimizer_state_dict(_owner(name, value, state), value)
        elif hasattr(value, "state_dict"):
            built[name] = value.state_dict()
        else:
            built[name] = value
    return built


def _apply(state: MutableMapping[str, Any], loaded: Mapping[str, Any]) -> None:
    """Put ``loaded`` (a state dict built by :func:`sharded_state_dict`, filled by DCP) back
    into the objects of ``state``; plain values are replaced in the dict."""
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    for name, value in list(state.items()):
        if isinstance(value, nn.Module):
            set_model_state_dict(value, loaded[name])
        elif isinstance(value, torch.optim.Optimizer):
            set_optimizer_state_dict(_owner(name, value, state), value, loaded[name])
        elif hasattr(value, "load_state_dict"):
            value.load_state_dict(loaded[name])
        else:
            state[name] = loaded[name]


def _local_nbytes(value: Any) -> int:
    """Bytes of this rank's part of every tensor in ``value`` (a DTensor's local shard)."""
    if isinstance(value, DTensor):
        return _local_nbytes(value.to_local())
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, Mapping):
        return sum(_local_nbytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_local_nbytes(item) for item in value)
    return 0


@dataclasses.dataclass(frozen=True)
class ShardedSave:
    """One rank's part of a sharded checkpoint: what the saver saves when the format is
    ``dcp`` (a whole-state tree otherwise)."""

    #: DCP's state dict (:func:`sharded_state_dict`), live or staged.
    state_dict: dict[str, Any]
    #: This rank's own file's content (``{"__spotguard__": meta}``), captured at the boundary.
    own: dict[str, Any]
    rank: int
    #: Bytes of this rank's shards: what the emergency path's estimate is made of.
    nbytes: int

    @classmethod
    def of(cls, state: Mapping[str, Any], own: dict[str, Any], rank: int) -> ShardedSave:
        state_dict = sharded_state_dict(state)
        return cls(state_dict, own, rank, _local_nbytes(state_dict))

    def own_file(self) -> tuple[str, Payload]:
        own = self.own
        return own_file_name(self.rank), lambda handle: torch.save(own, handle)


class ShardedStager:
    """Copies a :class:`ShardedSave`'s shards into CPU buffers reused from one save to the
    next (torch's ``DefaultStager``, synchronous: complete when :meth:`stage` returns; buffers
    page-locked where CUDA is); :class:`NoRoomForCopy` when new buffers would not fit in the
    memory ``available`` says is left (the saver then saves without a copy)."""

    def __init__(self, available: Callable[[], int]) -> None:
        self._available = available
        self._stager: DefaultStager | None = None
        self._held = 0  # bytes of buffers held for reuse

    def stage(self, job: ShardedSave) -> ShardedSave:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        need = job.nbytes - self._held
        if need > 0:
            usable = int(self._available() * USABLE_SHARE)
            if need > usable:
                self.close()  # their memory is better spent on the save without them
                raise NoRoomForCopy(
                    f"a copy of this rank's shards needs {need / 2**20:.0f} MiB more host "
                    f"memory and {usable / 2**20:.0f} MiB can be used"
                )
        if self._stager is None:
            cuda = torch.cuda.is_available()
            options = StagingOptions(
                use_pinned_memory=cuda,
                use_shared_memory=False,
                use_async_staging=False,
                use_non_blocking_copy=False,
            )
            self._stager = DefaultStager(options)
        staged = cast(dict[str, Any], self._stager.stage(job.state_dict))
        self._held = max(self._held, job.nbytes)
        return dataclasses.replace(job, state_dict=staged)

    def close(self) -> None:
        if self._stager is not None:
            self._stager.close()
            self._stager, self._held = None, 0


def _own_meta(store: CheckpointStore, manifest: Manifest, name: str) -> dict[str, Any]:
    """A rank's own file, verified, loaded weights-only."""
    buffer = io.BytesIO()
    store.fetch(manifest, name, buffer)  # CorruptCheckpoint naming it
    buffer.seek(0)
    try:
        loaded = torch.load(buffer, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UnloadableCheckpoint(
            f"{store.uri}: {name} of step {manifest.step} verifies but does not load "
            f"weights-only ({str(exc).strip()[:200]})"
        ) from None
    return cast(dict[str, Any], loaded[META_KEY])


def load_sharded_step(
    store: CheckpointStore, ranks: Ranks, step: int, state: MutableMapping[str, Any]
) -> tuple[Restored | None, tuple[str, str] | None, str | None]:
    """Load the sharded checkpoint of ``step`` into ``state`` (a collective: every rank),
    then this rank's own file. Never raises (every rank must reach the gather that follows):
    returns what it restored, or (file, reason) when a file failed verification (``""``: a
    shard or the metadata, reported by DCP alike on every rank), or another reason.

    A rank without a file of its own (the checkpoint was written by fewer ranks) keeps its
    random streams: :class:`Restored`'s meta is empty then.
    """
    from spotguard.trainer_hooks._internals.dcp_store import load_sharded

    try:
        target = sharded_state_dict(state)
        manifest = load_sharded(store, step, target, process_group=ranks.cpu_group())
    except CorruptCheckpoint as exc:
        return None, ("", str(exc)), None
    except Exception as exc:
        return None, None, f"{type(exc).__name__}: {exc}"
    name = own_file_name(ranks.rank)
    try:
        own = _own_meta(store, manifest, name) if name in manifest.files else {}
        _apply(state, target)
    except CorruptCheckpoint as exc:
        return None, (name, str(exc)), None
    except Exception as exc:
        return None, None, f"{type(exc).__name__}: {exc}"
    return Restored(manifest, None, own), None, None
