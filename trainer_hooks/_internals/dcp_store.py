"""Sharded checkpoints: ``torch.distributed.checkpoint`` on spotguard's checkpoint store.

Why DCP: with FSDP2, DTensor or tensor parallelism no single rank holds the state, and DCP is
the loader that reshards it to another world size. Why through the store: every rank's shard
file then gets what a whole-state checkpoint gets (SHA-256 on the way, S3 multipart with
retries, a manifest written last that commits all ranks' files at once, verification of every
byte read). Every rank uploads its own shard at the same time, so a save is bounded by the
node's network, not by one process's upload.

Failure is DCP's to spread and ours to name: DCP gathers each rank's exception in its
collective steps and raises ``CheckpointException`` on *every* rank, so no rank is left
waiting; :func:`save_sharded` and :func:`load_sharded` turn it back into the spotguard error
that a rank raised (:class:`~spotguard.errors.CorruptCheckpoint` naming the file,
:class:`~spotguard.errors.StoreError`, :class:`~spotguard.errors.WriterConflict`), prefixed
with the rank, on every rank. A save that fails on any rank commits nothing.

Without an initialized process group both run in this process alone (world size 1).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Collection, Iterator
from typing import TYPE_CHECKING, Any

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from spotguard.errors import (
    CheckpointError,
    CorruptCheckpoint,
    SpotguardError,
    UnloadableCheckpoint,
)
from spotguard.trainer_hooks._internals.dcp_reader import SafeLoadPlanner, StoreReader
from spotguard.trainer_hooks._internals.dcp_replicas import refuse_per_rank_state, unwrap_stateful
from spotguard.trainer_hooks._internals.dcp_writer import StoreWriter
from spotguard.trainer_hooks.manifest import Manifest

if TYPE_CHECKING:
    from spotguard.trainer_hooks._internals.reader import StoreReader as ReadableStore
    from spotguard.trainer_hooks.store import CheckpointStore, Payload

__all__ = ["load_sharded", "save_sharded"]


def save_sharded(
    store: CheckpointStore,
    step: int,
    state_dict: dict[str, Any],
    *,
    process_group: dist.ProcessGroup | None = None,
    epoch: int = 0,
    kind: str = "periodic",
    resumed_from: int | None = None,
    extra: dict[str, Any] | None = None,
    own_file: tuple[str, Payload] | None = None,
    may_commit: Callable[[], bool] | None = None,
    failure: BaseException | None = None,
    buffers: Collection[str] = (),
    read_back: bool = False,
) -> Manifest:
    """Save ``state_dict`` (plain tensors, DTensors, FSDP2 state from
    ``torch.distributed.checkpoint.state_dict.get_state_dict``, non-tensor values) as the
    checkpoint of ``step``; call it on every rank of ``process_group`` (default: the world).

    Each rank writes its shard file into the store; the coordinator (rank 0 of the group) puts
    DCP's metadata and commits a manifest (format ``dcp``, the world size, every rank's files).
    Returns that manifest on every rank; raises on every rank when any rank failed.

    Everything but DTensors is saved once, as replicated state: a value that differs across
    ranks (per-rank state: RNG states, data loader positions) is refused with
    :class:`~spotguard.errors.ConfigError` naming its key, on every rank. It belongs in the
    per-rank files: ``own_file`` (stem, payload), which this rank writes beside its shard as
    ``<stem>-<save id>.pt`` and the manifest lists with the rest (a stem of its own on every
    rank). ``buffers``: the paths of module buffers, named as such in that error.

    ``failure``: this rank could not build its part (its state dict): raised here, and every
    other rank raises :class:`~spotguard.errors.CheckpointError` naming it, all before DCP's
    first collective (which this rank would never join). ``read_back``: each rank reads back
    the files it wrote before the coordinator commits (the first save of a process: a store
    that keeps other bytes than were sent fails it on every rank).

    ``may_commit`` is asked on the coordinator just before the commit: ``False`` fails the
    save on every rank, with nothing committed (a save overtaken by an emergency save).
    """
    writer = StoreWriter(
        store, step, epoch=epoch, kind=kind, resumed_from=resumed_from, extra=extra,
        own_file=own_file, may_commit=may_commit, read_back=read_back,
    )  # fmt: skip
    alone = not _distributed()
    if alone and failure is not None:
        raise failure
    try:
        state_dict = unwrap_stateful(state_dict)
    except Exception as exc:
        if alone:
            raise
        failure = failure or exc
    if not alone:  # the same error on every rank, before anything is written
        refuse_per_rank_state(state_dict, process_group, failure=failure,
                              what=f"sharded save of step {step}", buffers=buffers)  # fmt: skip
    try:
        with _quiet(alone):
            dcp_save(state_dict, storage_writer=writer, process_group=process_group, no_dist=alone)
    except CheckpointException as exc:
        raise _as_spotguard_error(exc, f"sharded save of step {step}", CheckpointError) from exc
    if alone:
        assert writer.manifest is not None
        return writer.manifest
    # The commit happened on the coordinator; every rank returns it (one small broadcast,
    # joined by every rank: dcp.save returned on all of them).
    box = [writer.manifest.to_bytes() if writer.manifest is not None else None]
    dist.broadcast_object_list(box, group=process_group, group_src=0)
    if box[0] is None:
        raise CheckpointError(f"sharded save of step {step}: the coordinator has no commit")
    return Manifest.from_bytes(box[0], writer.checkpoint_id)


def load_sharded(
    store: ReadableStore,
    step: int,
    state_dict: dict[str, Any],
    *,
    process_group: dist.ProcessGroup | None = None,
    reader: StoreReader | None = None,
) -> Manifest:
    """Load the sharded checkpoint of ``step`` into ``state_dict`` in place (DCP semantics:
    tensors and DTensors are filled as they are laid out now, at any world size; other values
    are replaced); call it on every rank. Returns the checkpoint's manifest.

    Every file used is verified first (:class:`~spotguard.errors.CorruptCheckpoint` naming
    it, on every rank); nothing is unpickled beyond DCP's metadata (through an allow-list)
    and weights-only ``torch.save`` records. After an error the state dict may hold a mix of
    old and loaded values: do not train on it. ``reader``: one that read the metadata
    already (:meth:`StoreReader.checked_metadata`, to build ``state_dict`` from it).
    """
    reader = reader or StoreReader(store, step)
    alone = not _distributed()
    try:
        with _quiet(alone):
            dcp_load(
                state_dict,
                storage_reader=reader,
                planner=SafeLoadPlanner(),
                process_group=process_group,
                no_dist=alone,
            )
    except CheckpointException as exc:
        raise _as_spotguard_error(exc, f"loading step {step}", UnloadableCheckpoint) from exc
    assert reader.manifest is not None
    return reader.manifest


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _quiet(alone: bool) -> Iterator[None]:
    """Without a process group DCP warns that it assumes one process: that is the intent."""
    with warnings.catch_warnings():
        if alone:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _as_spotguard_error(
    exc: CheckpointException, what: str, default: type[CheckpointError]
) -> BaseException:
    """One error for DCP's gathered failures, the same on every rank: a
    :class:`CorruptCheckpoint` of any rank first (what the caller quarantines or falls back
    on: a transient error of a lower rank must not hide it), else the lowest rank's spotguard
    error, keeping its type; anything else becomes ``default`` naming its type. Interruptions
    pass through."""
    failures = {rank: failure[0] for rank, failure in exc.failures.items()}
    if not failures:
        return default(f"{what} failed: {exc}")
    ranked = sorted(failures.items())
    corrupt = [rank for rank, error in ranked if isinstance(error, CorruptCheckpoint)]
    ours = [rank for rank, error in ranked if isinstance(error, SpotguardError)]
    rank = (corrupt or ours or [min(failures)])[0]
    error = failures[rank]
    if not isinstance(error, Exception):
        return error  # KeyboardInterrupt, SystemExit: not a checkpoint problem
    others = sorted(set(failures) - {rank})
    also = f" (rank{'s' if len(others) > 1 else ''} {', '.join(map(str, others))} failed too)"
    detail = str(error) if isinstance(error, SpotguardError) else f"{type(error).__name__}: {error}"
    message = f"{what} failed on rank {rank}: {detail}{also if others else ''}"
    kind = type(error) if isinstance(error, CheckpointError) else default
    try:
        return kind(message)
    except TypeError:  # an error class with another constructor
        return default(message)
