"""SpotGuard's sharded (``dcp``) checkpoints: the save job the saver runs, its staging, each
rank's own file, and the load of one sharded checkpoint (what each rank's state dict holds,
and how a loaded one is put back: :mod:`.sharded_state`).

With FSDP2 or tensor parallelism the state is made of DTensors: no rank holds it all, so rank 0
cannot save it alone (format ``torch``). In format ``dcp`` every rank saves its own shards
through :func:`~spotguard.trainer_hooks._internals.dcp_store.save_sharded`:

* modules and optimizers through DCP, everything else whole in rank 0's own file
  (:mod:`.sharded_state`);
* what differs per rank and must not be resharded, its random streams, in a small file of its
  own (``rank-<k>-<save id>.pt``, :func:`~spotguard.trainer_hooks._internals.files.meta`),
  committed in the same manifest.

Every rank builds its part before any collective of DCP's, and the ranks agree that each did
(on save in :func:`~.dcp_replicas.refuse_per_rank_state`'s collective, on load in one
all-reduce): a rank that failed to build never leaves the others in DCP's collectives.

A periodic save copies this rank's shards into reused CPU buffers (the whole-state path's
:class:`~.snapshot.Snapshotter`, which copies a DTensor's local shard and rewraps the copy in
its layout) at the step boundary: the only stall training sees; the background thread then
saves the copy. A job whose tensors are a private copy already (Lightning's dump to the CPU)
is handed to that thread as it is.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import logging
from collections.abc import Callable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, cast

import torch
from torch.distributed.tensor import DTensor

from spotguard.errors import ConfigError, CorruptCheckpoint, UnloadableCheckpoint
from spotguard.trainer_hooks._internals.files import META_KEY, RANK_FILE, Restored, rank_stem
from spotguard.trainer_hooks._internals.sharded_state import (
    PLAIN_KEY,
    apply_loaded,
    buffer_names,
    has_dtensor,
    load_target,
    plain_state,
    refill,
    sharded_state_dict,
)
from spotguard.trainer_hooks._internals.snapshot import NoRoomForCopy, Snapshotter

if TYPE_CHECKING:
    from spotguard.trainer_hooks._internals.ranks import Ranks
    from spotguard.trainer_hooks.manifest import Manifest
    from spotguard.trainer_hooks.store import CheckpointStore, Payload

__all__ = ["ShardedSave", "ShardedStager", "load_sharded_step", "own_file_of"]

log = logging.getLogger("spotguard.trainer_hooks")


def own_file_of(manifest: Manifest, rank: int) -> str | None:
    """``rank``'s own file in a sharded checkpoint's ``manifest`` (``rank-<k>-<save id>.pt``,
    ``rank-<k>.pt`` from earlier versions); ``None`` when the checkpoint was written by fewer
    ranks."""
    for name in sorted(manifest.files):
        found = RANK_FILE.fullmatch(name)
        if found is not None and int(found[1]) == rank:
            return name
    return None


def _local_nbytes(value: Any) -> int:
    """Bytes of this rank's part of every tensor in ``value`` (a DTensor's local shard, a
    ShardedTensor's local shards: FSDP1's sharded state dicts)."""
    from torch.distributed._shard.sharded_tensor.api import ShardedTensor

    if isinstance(value, DTensor):
        return value.to_local().nbytes
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
    #: Its tensors are copies nothing else writes (Lightning's dump to the CPU): a periodic
    #: save hands them to the background thread as they are, without staging a second copy.
    private: bool = False

    @classmethod
    def of(cls, state: Mapping[str, Any], own: dict[str, Any], rank: int) -> ShardedSave:
        """The job for SpotGuard's ``state`` at this step boundary: its modules and optimizers
        for DCP; on rank 0 its plain values too, copied now into its own file. Never raises:
        a failure is kept in :attr:`failure`."""
        try:
            state_dict = sharded_state_dict(state)
            plain = plain_state(state)
            for name, value in plain.items():  # rank 0's copy alone would be saved
                if has_dtensor(value):
                    raise ConfigError(
                        f"state[{name!r}] holds a DTensor outside a module or optimizer: only "
                        "those are saved sharded (other entries are rank 0's, saved whole); "
                        "keep it in a module (a parameter or buffer) or save its full_tensor()"
                    )
            if rank == 0:
                own = {**own, PLAIN_KEY: copy.deepcopy(plain)}
            buffers = buffer_names(state)
        except Exception as exc:
            return cls({}, own, rank, 0, failure=exc)
        return dataclasses.replace(cls.of_state_dict(state_dict, own, rank), buffers=buffers)

    @classmethod
    def of_state_dict(
        cls, state_dict: dict[str, Any], own: dict[str, Any], rank: int
    ) -> ShardedSave:
        """A job for a state dict built elsewhere (Lightning's checkpoint dict)."""
        with torch.no_grad():  # to_local without an autograd node per tensor
            nbytes = _local_nbytes(state_dict) + _local_nbytes(own)
        return cls(state_dict, own, rank, nbytes)

    def own_file(self) -> tuple[str, Payload]:
        """(stem, payload) of this rank's own file: the writer names it with the save's id."""
        own = self.own
        return rank_stem(self.rank), lambda handle: torch.save(own, handle)


class ShardedStager:
    """Copies a :class:`ShardedSave`'s shards into CPU buffers reused from one save to the
    next (a :class:`~.snapshot.Snapshotter`: each DTensor's local shard copied and rewrapped
    in its layout; complete when :meth:`stage` returns; buffers page-locked for CUDA
    tensors; a :attr:`~ShardedSave.private` job is left as it is); :class:`NoRoomForCopy`
    when new buffers would not fit in the memory ``available`` says is left (the saver then
    saves without a copy); any other failure to copy becomes the job's
    :attr:`~ShardedSave.failure` (the save fails on every rank)."""

    def __init__(self, available: Callable[[], int]) -> None:
        self._snapshots = Snapshotter(available)

    def stage(self, job: ShardedSave) -> ShardedSave:
        if job.failure is not None or job.private:  # nothing to copy (the save fails on
            return job  # every rank), or it is a private copy already
        try:
            staged = cast(dict[str, Any], self._snapshots.copy(job.state_dict))
        except NoRoomForCopy:
            raise
        except Exception as exc:  # this rank's part fails: agreed before DCP, on every rank
            return dataclasses.replace(job, state_dict={}, failure=exc)
        return dataclasses.replace(job, state_dict=staged)


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
            f"weights-only ({str(exc).strip()[:200]}); register the classes it holds with "
            "torch.serialization.add_safe_globals"
        ) from None
    return cast(dict[str, Any], loaded)


def load_sharded_step(
    store: CheckpointStore,
    ranks: Ranks,
    step: int,
    state: MutableMapping[str, Any],
    *,
    loaded_as: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> tuple[Restored | None, tuple[str, str] | None, str | None]:
    """Load the sharded checkpoint of ``step`` into ``state`` (a collective: every rank),
    then the plain values from rank 0's own file and this rank's random streams from its own.
    Never raises (every rank must reach the gather that follows): returns what it restored,
    or (file, reason) when a file failed verification (``""``: a shard or the metadata), or
    another reason. When another rank failed to build its part, none enters DCP and this
    rank returns neither (that rank reports it).

    A rank without a file of its own (the checkpoint was written by fewer ranks) keeps its
    random streams: :class:`Restored`'s meta is empty then. ``loaded_as``: the form DCP loads
    the target in, sharing its storage (FSDP1's ShardedTensors as DTensors: torch's loader
    drops a ShardedTensor's empty shard and then misreads the checkpoint's layout).
    """
    from spotguard.trainer_hooks._internals.dcp_reader import StoreReader
    from spotguard.trainer_hooks._internals.dcp_store import load_sharded

    reader = StoreReader(store, step)
    problem: Exception | None = None
    target: dict[str, Any] = {}
    try:  # DCP's metadata first: it says what the checkpoint holds (optimizer markers)
        target = load_target(state, reader.checked_metadata())
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
        into = target if loaded_as is None else loaded_as(target)
        manifest = load_sharded(store, step, into, process_group=ranks.cpu_group(),
                                reader=reader)  # fmt: skip
        refill(target, into)
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
        apply_loaded(state, target, replicated.get(PLAIN_KEY, {}))
    except CorruptCheckpoint as exc:
        return None, (name, str(exc)), None
    except Exception as exc:
        return None, None, f"{type(exc).__name__}: {exc}"
    return Restored(manifest, None, own.get(META_KEY, {})), None, None
