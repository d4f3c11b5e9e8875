"""Per-rank state must not reach a sharded save: DCP would keep one rank's copy of it.

DCP's save planner treats every value that is not sharded (a plain tensor, an int, a string:
anything but a DTensor or ShardedTensor) as *replicated*: the same key on every rank is one
value, written once, by one rank, and loaded on every rank. That is right for DDP weights and
wrong for per-rank state (RNG states, a data loader's position, a rank's own counters): two
ranks saving ``{"rng": tensor([rank] * 3)}`` would both load rank 0's, with no error.

So before a sharded save every rank sends one SHA-256 per unsharded leaf (tensors by dtype,
shape and bytes; plain values by a canonical text: sets sorted, so hash seeds do not matter;
other objects by their pickle) and every rank refuses, with the same
:class:`~spotguard.errors.ConfigError` naming the keys, when a key's digests differ across
ranks. A key present on only some ranks is fine: it is saved from the one rank that has it.
Per-rank state belongs in the per-rank files, not in the sharded state dict.

That one collective is also where the ranks agree that each built its part of the save: a rank
that failed before (building its state dict, these digests) says so in it, and every rank
raises before DCP's first collective.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Collection, Iterator, Mapping
from typing import Any, cast

import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor.api import ShardedTensor
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor

from spotguard.errors import CheckpointError, ConfigError

__all__ = ["refuse_per_rank_state", "unwrap_stateful"]

_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)


def unwrap_stateful(state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` with each top-level ``Stateful`` replaced by its ``state_dict()``, as
    ``dcp.save`` does (once: the check and the save then see the same values)."""
    return {
        key: value.state_dict() if isinstance(value, Stateful) else value
        for key, value in state_dict.items()
    }


def _leaves(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    """The unsharded leaves of a state dict: ``(dotted path, value)``."""
    if isinstance(value, (DTensor, ShardedTensor)):
        return  # sharded: each rank's part is its own, DCP keeps them all
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _leaves(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _leaves(item, f"{path}[{index}]")
    else:
        yield path, value


def _canonical(value: Any) -> bytes:
    """The same bytes for equal plain values on any rank (``repr`` of a set depends on the
    hash seed of the process; pickle of a dict on insertion order, which is kept)."""
    if isinstance(value, _PLAIN) or type(value) is torch.Size:
        return f"{type(value).__qualname__}:{value!r}".encode()
    if isinstance(value, (set, frozenset)):
        return b"set:" + b",".join(sorted(_canonical(item) for item in value))
    if isinstance(value, Mapping):
        items = sorted(_canonical(key) + b"=" + _canonical(item) for key, item in value.items())
        return b"map:" + b",".join(items)
    if isinstance(value, (list, tuple)):
        return b"seq:" + b",".join(_canonical(item) for item in value)
    return b"pickle:" + pickle.dumps(value, protocol=4)  # what DCP's torch.save pickles too


def _digest(value: Any) -> str:
    digest = hashlib.sha256()
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
        digest.update(f"tensor:{tensor.dtype}:{tuple(tensor.shape)}:".encode())
        if tensor.layout == torch.strided and not tensor.is_quantized:
            flat = tensor.cpu().contiguous().reshape(-1).view(torch.uint8)
            digest.update(cast(Any, flat.numpy()))  # its buffer: no copy
        else:  # sparse, quantized, ...: what torch.save would write
            digest.update(_canonical(tensor.cpu()))
    else:
        digest.update(_canonical(value))
    return digest.hexdigest()


def refuse_per_rank_state(
    state_dict: Mapping[str, Any],
    group: Any = None,
    *,
    failure: BaseException | None = None,
    what: str = "sharded save",
    buffers: Collection[str] = (),
) -> None:
    """Raise :class:`ConfigError` on every rank of ``group`` when an unsharded value of
    ``state_dict`` differs across ranks (a collective: call it on every rank).

    The same collective tells every rank whether every rank got this far: a rank that failed
    to build its part (``failure``, or its digests here) raises that error, every other rank
    :class:`CheckpointError` naming it, before anyone enters DCP's collectives (which the
    failed rank would never join: the others would wait in them or pair mismatched ones).
    ``buffers``: paths that are module buffers, named as such when they differ.
    """
    digests: dict[str, str] = {}
    if failure is None:
        try:
            digests = {path: _digest(value) for path, value in _leaves(state_dict, "")}
        except Exception as exc:
            failure = exc
    mine = None if failure is None else f"{type(failure).__name__}: {failure}"
    gathered: list[tuple[dict[str, str], str | None] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (digests, mine), group=group)
    if failure is not None:
        raise failure
    failed = [(rank, item[1]) for rank, item in enumerate(gathered) if item and item[1]]
    if failed:
        rank, why = failed[0]
        raise CheckpointError(f"{what}: rank {rank} failed before saving ({why}); nothing was "
                              "written")  # fmt: skip
    per_rank = [item[0] if item else {} for item in gathered]
    differing: list[str] = []
    differing_buffers: list[str] = []
    for path in sorted({path for ranks in per_rank for path in ranks}):
        seen: dict[str, list[int]] = {}
        for rank, ranks in enumerate(per_rank):
            if path in ranks:
                seen.setdefault(ranks[path], []).append(rank)
        if len(seen) > 1:
            groups = " vs ".join(f"rank{'s' * (len(r) > 1)} {','.join(map(str, r))}"
                                 for r in seen.values())  # fmt: skip
            (differing_buffers if path in buffers else differing).append(f"{path!r} ({groups})")
    if differing_buffers:
        shown = ", ".join(differing_buffers[:5]) + (
            f" and {len(differing_buffers) - 5} more" * (len(differing_buffers) > 5)
        )
        raise ConfigError(
            f"sharded save: module buffer{'s' * (len(differing_buffers) > 1)} {shown} "
            f"differ{'s' * (len(differing_buffers) == 1)} across ranks. FSDP2 shards "
            "parameters but does not keep buffers (BatchNorm's running statistics) in sync "
            "across ranks, and a checkpoint holds one copy of a buffer: sync them before the "
            "save (torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) before fully_shard, "
            "or all-reduce the buffers at each step), or use a normalization without running "
            "statistics (LayerNorm, GroupNorm)"
        )
    if differing:
        shown = ", ".join(differing[:5]) + (
            f" and {len(differing) - 5} more" * (len(differing) > 5)
        )
        raise ConfigError(
            f"sharded save: {shown} differ{'s' * (len(differing) == 1)} across ranks. DCP "
            "saves one copy of every value that is not a DTensor (it takes them as replicated) "
            "and loads that copy on every rank, so per-rank state would come back as one "
            "rank's. Keep per-rank values (RNG states, data loader positions) out of the "
            "sharded state dict: save them in the per-rank files, or make them DTensors"
        )
