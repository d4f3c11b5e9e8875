"""SpotGuard's sharded (``dcp``) checkpoints: the format decision, the state dict every rank
builds, the save job the saver runs, and the load of one sharded checkpoint.

With FSDP2 or tensor parallelism the state is made of DTensors: no rank holds it all, so rank 0
cannot save it alone (format ``torch``). In format ``dcp`` every rank saves its own shards
through :func:`~spotguard.trainer_hooks._internals.dcp_store.save_sharded`:

* modules as ``get_model_state_dict`` gives them, optimizers as ``get_optimizer_state_dict``
  with the module of the state that holds all their parameters: keyed by parameter names
  (FQNs), which is what lets DCP reshard them to another world size. An optimizer without
  state yet (a save before its first step) is saved as a marker with its hyperparameters:
  torch's state-dict API would make its state by a step with ``lr=0``, changing the live
  optimizer (Adam's step count, and its moments with weight decay); on load the marker leaves
  the live optimizer fresh;
* everything else (other objects' ``state_dict()``, plain values) is not DCP's to save: DCP
  would load it into a template built from the live state, so a dict that gained keys would
  come back empty and a value that changed type or size would never load again. It is saved
  whole in rank 0's own file, as the ``torch`` format does (rank 0's copy is the replicated
  state), and loaded whole from there on every rank, at any world size;
* what differs per rank and must not be resharded, its random streams, in a small file of its
  own (``rank-<k>-<save id>.pt``, :func:`~spotguard.trainer_hooks._internals.files.meta`),
  committed in the same manifest.

Every rank builds its part before any collective of DCP's, and the ranks agree that each did
(on save in :func:`~.dcp_replicas.refuse_per_rank_state`'s collective, on load in one
all-reduce): a rank that failed to build never leaves the others in DCP's collectives.

A periodic save copies this rank's shards into reused CPU buffers (torch's ``DefaultStager``:
it keeps one CPU storage per source storage, DTensors included) at the step boundary: the only
stall training sees; the background thread then saves the copy.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import logging
import re
from collections.abc import Callable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from spotguard.errors import ConfigError, CorruptCheckpoint, UnloadableCheckpoint
from spotguard.trainer_hooks._internals.files import META_KEY, Restored
from spotguard.trainer_hooks._internals.snapshot import USABLE_SHARE, NoRoomForCopy

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import Metadata
    from torch.distributed.checkpoint.staging import DefaultStager

    from spotguard.trainer_hooks._internals.ranks import Ranks
    from spotguard.trainer_hooks.manifest import Manifest
    from spotguard.trainer_hooks.store import CheckpointStore, Payload

__all__ = [
    "FRESH_OPTIMIZER",
    "PLAIN_KEY",
    "ShardedSave",
    "ShardedStager",
    "choose_format",
    "holds_dtensors",
    "load_sharded_step",
    "own_file_of",
    "own_file_stem",
    "plain_state",
    "sharded_state_dict",
]

log = logging.getLogger("spotguard.trainer_hooks")


#: The entry of rank 0's own file that holds the state's plain values (``{name: value}``).
PLAIN_KEY = "state"
#: DCP's entry for an optimizer saved without state (see the module's docstring).
FRESH_OPTIMIZER = "__spotguard_fresh_optimizer__"
#: A rank's own file: ``rank-<k>-<save id>.pt`` (``rank-<k>.pt`` from earlier versions).
_OWN_FILE = re.compile(r"rank-(\d+)(?:-[0-9a-f]+)?\.pt")


def own_file_stem(rank: int) -> str:
    """The name of ``rank``'s own file before the save's id (the writer adds it)."""
    return f"rank-{rank}"


def own_file_of(manifest: Manifest, rank: int) -> str | None:
    """``rank``'s own file in a sharded checkpoint's ``manifest``; ``None`` when the
    checkpoint was written by fewer ranks."""
    for name in sorted(manifest.files):
        found = _OWN_FILE.fullmatch(name)
        if found is not None and int(found[1]) == rank:
            return name
    return None


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
    chosen = ("dcp" if sharded else "torch") if setting == "auto" else setting
    if chosen == "dcp":  # at the start, not at the first save (the same state on every rank)
        for name, value in state.items():
            if isinstance(value, torch.optim.Optimizer):
                _owner(name, value, state)
    return chosen


def _owner(name: str, optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> nn.Module:
    """The module of ``state`` that holds every parameter ``optimizer`` updates (the first in
    the state's order: the same at save and load). Not merely one that shares a parameter:
    the optimizer's state is keyed by that module's parameter names, and a submodule or one of
    two modules would leave the other parameters without a name."""
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for value in state.values():
        if isinstance(value, nn.Module) and params <= {id(p) for p in value.parameters()}:
            return value
    raise ConfigError(
        f"state[{name!r}] optimizes parameters that no single module of the state holds: a "
        "sharded checkpoint keys optimizer state by the parameter names of one module; put "
        "the module holding all of them in the state (the whole model, or the modules it "
        "optimizes together in one nn.ModuleDict)"
    )


def _hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def _fresh(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """What an optimizer without state is saved as: the marker and its hyperparameters (a
    scheduler may have set its learning rate already)."""
    return {FRESH_OPTIMIZER: True, "param_groups": _hyperparameters(optimizer)}


def sharded_state_dict(state: Mapping[str, Any]) -> dict[str, Any]:
    """DCP's state dict of ``state``: its modules and optimizers through torch's state-dict
    API (sharded, FQN keys; an optimizer without state as a marker, never stepped to make
    some). Nothing else: see :func:`plain_state`."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    built: dict[str, Any] = {}
    for name, value in state.items():
        if isinstance(value, nn.Module):
            built[name] = get_model_state_dict(value)
        elif isinstance(value, torch.optim.Optimizer):
            if value.state:
                built[name] = get_optimizer_state_dict(_owner(name, value, state), value)
            else:
                built[name] = _fresh(value)
    return built


def plain_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``state`` that are neither modules nor optimizers, as saved in rank 0's
    own file: objects' ``state_dict()``, plain values as they are."""
    return {
        name: value.state_dict() if hasattr(value, "state_dict") else value
        for name, value in state.items()
        if not isinstance(value, (nn.Module, torch.optim.Optimizer))
    }


def _buffers(state: Mapping[str, Any]) -> frozenset[str]:
    """The paths of the modules' buffers in DCP's state dict."""
    return frozenset(
        f"{name}.{path}"
        for name, value in state.items()
        if isinstance(value, nn.Module)
        for path, _ in value.named_buffers()
    )


def _target(state: Mapping[str, Any], metadata: Metadata) -> dict[str, Any]:
    """The state dict DCP loads the checkpoint into: modules and optimizers as
    :func:`sharded_state_dict` builds them (an optimizer the checkpoint holds as a marker: its
    hyperparameters only, the live one stays fresh), and any other entry only where DCP holds
    it (Lightning's entries, or plain values of an earlier spotguard's checkpoint)."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    saved = metadata.state_dict_metadata

    def in_dcp(name: str) -> bool:
        return any(key == name or key.startswith(f"{name}.") for key in saved)

    target: dict[str, Any] = {}
    for name, value in state.items():
        if isinstance(value, nn.Module):
            target[name] = get_model_state_dict(value)
        elif isinstance(value, torch.optim.Optimizer):
            if f"{name}.{FRESH_OPTIMIZER}" in saved:
                target[name] = _fresh(value)
            else:
                target[name] = get_optimizer_state_dict(_owner(name, value, state), value)
        elif in_dcp(name):
            target[name] = value.state_dict() if hasattr(value, "state_dict") else value
    return target


def _apply(
    state: MutableMapping[str, Any], loaded: Mapping[str, Any], plain: Mapping[str, Any]
) -> None:
    """Put ``loaded`` (built by :func:`_target`, filled by DCP) and ``plain`` (rank 0's plain
    values) back into the objects of ``state``; plain values are replaced in the dict."""
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    for name, value in list(state.items()):
        if name not in loaded:
            continue
        if isinstance(value, nn.Module):
            set_model_state_dict(value, loaded[name])
        elif isinstance(value, torch.optim.Optimizer):
            if FRESH_OPTIMIZER in loaded[name]:  # saved before its first step: stays fresh
                saved = loaded[name]["param_groups"]
                if len(saved) != len(value.param_groups):
                    raise UnloadableCheckpoint(
                        f"state[{name!r}] has {len(value.param_groups)} parameter groups, the "
                        f"checkpoint {len(saved)}"
                    )
                for group, hyperparameters in zip(value.param_groups, saved, strict=True):
                    group.update(hyperparameters)
            else:
                set_optimizer_state_dict(_owner(name, value, state), value, loaded[name])
        elif hasattr(value, "load_state_dict"):
            value.load_state_dict(loaded[name])
        else:
            state[name] = loaded[name]
    for name, saved in plain.items():  # as the torch format restores rank 0's state
        value = state.get(name)
        if value is not None and hasattr(value, "load_state_dict"):
            value.load_state_dict(saved)
        else:
            state[name] = saved


def _local_nbytes(value: Any) -> int:
    """Bytes of this rank's part of every tensor in ``value`` (a DTensor's local shard, a
    ShardedTensor's local shards: FSDP1's sharded state dicts)."""
    from torch.distributed._shard.sharded_tensor.api import ShardedTensor

    if isinstance(value, DTensor):
        return _local_nbytes(value.to_local())
    if isinstance(value, ShardedTensor):
        return sum(_local_nbytes(shard.tensor) for shard in value.local_shards())
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
    #: Bytes of this rank's shards and own file: what the emergency path's estimate is made of.
    nbytes: int
    #: Why this rank could not build its part: the save then fails on every rank (agreed
    #: before DCP's first collective), instead of this rank leaving the others in it.
    failure: Exception | None = None
    #: The paths of module buffers in :attr:`state_dict` (named as such when they differ).
    buffers: frozenset[str] = frozenset()

    @classmethod
    def of(cls, state: Mapping[str, Any], own: dict[str, Any], rank: int) -> ShardedSave:
        """The job for SpotGuard's ``state`` at this step boundary: its modules and optimizers
        for DCP; on rank 0 its plain values too, copied now into its own file. Never raises:
        a failure is kept in :attr:`failure`."""
        try:
            state_dict = sharded_state_dict(state)
            plain = plain_state(state)
            for name, value in plain.items():  # rank 0's copy alone would be saved
                if _has_dtensor(value):
                    raise ConfigError(
                        f"state[{name!r}] holds a DTensor outside a module or optimizer: only "
                        "those are saved sharded (other entries are rank 0's, saved whole); "
                        "keep it in a module (a parameter or buffer) or save its full_tensor()"
                    )
            if rank == 0:
                own = {**own, PLAIN_KEY: copy.deepcopy(plain)}
            buffers = _buffers(state)
        except Exception as exc:
            return cls({}, own, rank, 0, failure=exc)
        return dataclasses.replace(cls.of_state_dict(state_dict, own, rank), buffers=buffers)

    @classmethod
    def of_state_dict(
        cls, state_dict: dict[str, Any], own: dict[str, Any], rank: int
    ) -> ShardedSave:
        """A job for a state dict built elsewhere (Lightning's checkpoint dict)."""
        return cls(state_dict, own, rank, _local_nbytes(state_dict) + _local_nbytes(own))

    def own_file(self) -> tuple[str, Payload]:
        """(stem, payload) of this rank's own file: the writer names it with the save's id."""
        own = self.own
        return own_file_stem(self.rank), lambda handle: torch.save(own, handle)


class ShardedStager:
    """Copies a :class:`ShardedSave`'s shards into CPU buffers reused from one save to the
    next (torch's ``DefaultStager``, synchronous: complete when :meth:`stage` returns; buffers
    page-locked where CUDA is); :class:`NoRoomForCopy` when new buffers would not fit in the
    memory ``available`` says is left (the saver then saves without a copy); any other failure
    to copy becomes the job's :attr:`~ShardedSave.failure` (the save fails on every rank)."""

    def __init__(self, available: Callable[[], int]) -> None:
        self._available = available
        self._stager: DefaultStager | None = None
        self._held = 0  # bytes of buffers held for reuse

    def stage(self, job: ShardedSave) -> ShardedSave:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        if job.failure is not None:  # nothing to copy: the save fails on every rank
            return job
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
        try:
            staged = cast(dict[str, Any], self._stager.stage(job.state_dict))
        except Exception as exc:  # this rank's part fails: agreed before DCP, on every rank
            return dataclasses.replace(job, state_dict={}, failure=exc)
        self._held = max(self._held, job.nbytes)
        return dataclasses.replace(job, state_dict=staged)

    def close(self) -> None:
        if self._stager is not None:
            self._stager.close()
            self._stager, self._held = None, 0


def _own_content(store: CheckpointStore, manifest: Manifest, name: str) -> dict[str, Any]:
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
    return cast(dict[str, Any], loaded)


def load_sharded_step(
    store: CheckpointStore, ranks: Ranks, step: int, state: MutableMapping[str, Any]
) -> tuple[Restored | None, tuple[str, str] | None, str | None]:
    """Load the sharded checkpoint of ``step`` into ``state`` (a collective: every rank),
    then the plain values from rank 0's own file and this rank's random streams from its own.
    Never raises (every rank must reach the gather that follows): returns what it restored,
    or (file, reason) when a file failed verification (``""``: a shard or the metadata), or
    another reason. When another rank failed to build its part, none enters DCP and this
    rank returns neither (that rank reports it).

    A rank without a file of its own (the checkpoint was written by fewer ranks) keeps its
    random streams: :class:`Restored`'s meta is empty then.
    """
    from spotguard.trainer_hooks._internals.dcp_reader import StoreReader
    from spotguard.trainer_hooks._internals.dcp_store import load_sharded

    reader = StoreReader(store, step)
    problem: Exception | None = None
    target: dict[str, Any] = {}
    try:  # DCP's metadata first: it says what the checkpoint holds (optimizer markers)
        target = _target(state, reader.checked_metadata())
    except Exception as exc:
        problem = exc
    (failed,) = ranks.any(problem is not None)  # before DCP's first collective
    if isinstance(problem, CorruptCheckpoint):
        return None, ("", str(problem)), None
    if problem is not None:
        return None, None, f"{type(problem).__name__}: {problem}"
    if failed:
        return None, None, None
    try:
        manifest = load_sharded(store, step, target, process_group=ranks.cpu_group(),
                                reader=reader)  # fmt: skip
    except CorruptCheckpoint as exc:
        return None, ("", str(exc)), None
    except Exception as exc:
        return None, None, f"{type(exc).__name__}: {exc}"
    mine, first = own_file_of(manifest, ranks.rank), own_file_of(manifest, 0)
    name = mine or ""
    try:
        own = _own_content(store, manifest, mine) if mine else {}
        name = first or ""
        same = first is None or first == mine
        replicated = own if same else _own_content(store, manifest, first or "")
        _apply(state, target, replicated.get(PLAIN_KEY, {}))
    except CorruptCheckpoint as exc:
        return None, (name, str(exc)), None
    except Exception as exc:
        return None, None, f"{type(exc).__name__}: {exc}"
    return Restored(manifest, None, own.get(META_KEY, {})), None, None
