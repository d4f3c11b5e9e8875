"""A ``torch.distributed.checkpoint`` StorageWriter on spotguard's checkpoint store.

Why not DCP's ``FileSystemWriter``: it writes to a path, and a spot checkpoint must reach S3
(multipart, retries) with a SHA-256 of every byte and a commit that counts only once every
rank's files are there. Here each rank streams its shard file through
:meth:`CheckpointStore.put` (checksummed on the way, local spool + rename or S3 multipart), so
all ranks upload at once; the coordinator then puts DCP's metadata and commits the manifest
(format ``dcp``) listing every rank's files.

The (name, size, SHA-256) of each rank's file travels to the coordinator inside the
``WriteResult`` list that DCP already gathers for :meth:`finish`: no collective of our own.
So does a rank's *own file* (``own_file``: what differs per rank and must not be resharded,
its RNG states; rank 0's also the replicated plain values): written beside its shard as
``rank-<k>-<id>.pt``, listed in the same manifest, left out of DCP's metadata. A save where
any rank failed commits none of them.
The metadata written is DCP's own, byte for byte what ``FileSystemWriter`` would write (plain
``_StorageInfo`` entries), so a checkpoint downloaded into a folder, with ``dcp-<id>.metadata``
renamed ``.metadata``, is an ordinary DCP checkpoint (``dcp_to_torch_save`` reads it).
Every file name carries the save's id (``__0_<id>_0.distcp``, ``dcp-<id>.metadata``,
``rank-0-<id>.pt``): two saves never write the same key.

The shard file layout is DCP's too: each item at an offset, a tensor as one ``torch.save``
record (so the reader can use ``torch.load(weights_only=True)``), bytes items as they are.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

import torch
from torch.distributed.checkpoint.filesystem import (
    CURRENT_DCP_VERSION,
    DEFAULT_SUFFIX,
    _StorageInfo,
    _StoragePrefix,
)
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from spotguard.errors import CheckpointError, UnloadableCheckpoint
from spotguard.protocol import step_dir
from spotguard.trainer_hooks.manifest import FileEntry, Manifest

if TYPE_CHECKING:
    from spotguard.trainer_hooks.store import CheckpointStore, Payload

__all__ = ["StoreWriter", "metadata_name"]

#: DCP's metadata in the store: ``dcp-<save id>.metadata``. Not ``.metadata`` (DCP's name): a
#: local store hides dot files (its spools), and the name must be listed to be verified.
METADATA_SUFFIX = ".metadata"
#: How many hex digits of the save's id go into its file names.
ID_DIGITS = 12


def metadata_name(manifest: Manifest) -> str:
    """The one metadata file that ``manifest`` (format ``dcp``) lists."""
    found = [name for name in manifest.files if name.endswith(METADATA_SUFFIX)]
    if len(found) != 1:
        raise UnloadableCheckpoint(
            f"checkpoint {manifest.step} lists {len(found)} DCP metadata files, not one: it "
            "was not written by spotguard's sharded save"
        )
    return found[0]


@dataclass(frozen=True)
class _Written:
    """What one item's WriteResult carries to the coordinator: where DCP finds the item, and
    the store's record of the whole file it lies in (so the manifest can list it)."""

    info: _StorageInfo
    file: str
    entry: FileEntry


@dataclass(frozen=True)
class _OwnFile:
    """A rank's own file (not part of DCP's state): listed in the manifest, not in the
    metadata."""

    file: str
    entry: FileEntry


class _Counter:
    """Counts what is written through it: the store's stream cannot ``tell()`` (an S3 upload
    is a pipe), and DCP needs each item's offset."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self.size = 0

    def write(self, data: Any) -> int:
        written = self._stream.write(data)
        self.size += written
        return written

    def flush(self) -> None:
        self._stream.flush()


def _nbytes(item: WriteItem) -> int:
    """About how many bytes ``item`` takes: the S3 upload sizes its parts by it."""
    if item.tensor_data is None:
        return 0
    return item.tensor_data.size.numel() * item.tensor_data.properties.dtype.itemsize


def _done(value: Any) -> Future[Any]:
    future: Future[Any] = Future()
    future.set_result(value)
    return future


class StoreWriter(StorageWriter):
    """Writes one DCP checkpoint into ``store`` at ``step``; the coordinator commits it.

    One instance per save (like DCP's writers it keeps the save's state); after ``dcp.save``
    returns, :attr:`manifest` holds the commit on the coordinator (``None`` elsewhere).
    """

    def __init__(
        self,
        store: CheckpointStore,
        step: int,
        *,
        epoch: int = 0,
        kind: str = "periodic",
        resumed_from: int | None = None,
        extra: dict[str, Any] | None = None,
        own_file: tuple[str, Payload] | None = None,
        may_commit: Callable[[], bool] | None = None,
        read_back: bool = False,
    ) -> None:
        """``own_file``: (stem, payload) this rank writes beside its shard as
        ``<stem>-<save id>.pt`` (its RNG states); ``may_commit``: asked on the coordinator
        right before the commit; ``False`` fails the save on every rank instead (an emergency
        took over from this save); ``read_back``: every file this rank wrote is read back in
        full before it reports them, and DCP's metadata on the coordinator before the commit
        (a failure fails the save on every rank)."""
        super().__init__()
        self.store, self.step = store, step
        self.epoch, self.kind, self.resumed_from, self.extra = epoch, kind, resumed_from, extra
        self.own_file, self.may_commit, self.read_back = own_file, may_commit, read_back
        self.save_id = uuid.uuid4().hex
        self.is_coordinator = False
        self._tag = ""  # the coordinator's save id in file names, from prepare_global_plan
        #: The commit, on the coordinator once :meth:`finish` ran.
        self.manifest: Manifest | None = None

    @property
    def checkpoint_id(self) -> str:
        """How DCP's logs name this checkpoint."""
        return f"{self.store.uri}/{step_dir(self.step)}"

    def reset(self, checkpoint_id: Any = None) -> None:
        """A new save begins (``checkpoint_id`` is not ours to interpret: the step is)."""
        self.save_id = uuid.uuid4().hex
        self.manifest = None

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.checkpoint_id, save_id=self.save_id)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """On the coordinator, before any rank writes a byte: this process must still be the
        one writer of the prefix (the lease, no newer commit by another writer:
        :class:`~spotguard.errors.WriterConflict`, raised on every rank by DCP); then each
        rank's file prefix, ``__<rank>_<save id>_``: DCP's names plus this save's id, so no two
        saves ever share a file (an orphaned worker of an earlier launch, or two saves of
        one step), and the manifest lists exactly the files of its own save."""
        self.store.check_writer(self.step)
        self._tag = self.save_id[:ID_DIGITS]
        return [
            dataclasses.replace(plan, storage_data=_StoragePrefix(f"__{rank}_{self._tag}_"))
            for rank, plan in enumerate(plans)
        ]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """This rank's items as one file, streamed through the store (checksummed).

        Synchronous: DCP waits for the future at once, and the upload already runs its parts
        in parallel. A rank with nothing to write (replicated state deduplicated to another
        rank) writes no shard file, so the manifest never lists an empty shard; its own file
        (if any) it always writes.
        """
        results = self._write_shard(plan, planner) if plan.items else []
        if self.own_file is not None:
            stem, payload = self.own_file
            prefix: _StoragePrefix = plan.storage_data  # __<rank>_<the save's id>_
            name = f"{stem}-{prefix.prefix.split('_')[3]}.pt"
            entry = self.store.put(self.step, name, payload)
            results.append(
                WriteResult(MetadataIndex(name), entry.size, storage_data=_OwnFile(name, entry))
            )
        if self.read_back:  # each file once (a shard holds many items)
            files = {result.storage_data.file: result.storage_data.entry for result in results}
            for name, entry in files.items():
                self.store.read_back_payload(self.step, name, entry)
        return _done(results)

    def _write_shard(self, plan: SavePlan, planner: SavePlanner) -> list[WriteResult]:
        prefix: _StoragePrefix = plan.storage_data
        name = f"{prefix.prefix}0{DEFAULT_SUFFIX}"
        placed: list[tuple[Any, int, int]] = []  # (index, offset, length)
        # Bytes items first, then tensors largest first: the order DCP's writer uses.
        items = [item for item in plan.items if item.type == WriteItemType.BYTE_IO]
        items += sorted(
            (item for item in plan.items if item.type != WriteItemType.BYTE_IO),
            key=_nbytes,
            reverse=True,
        )

        def produce(stream: BinaryIO) -> None:
            placed.clear()  # a backend that retries calls this again from the start
            counter = _Counter(stream)
            for item in items:
                offset = counter.size
                data = planner.resolve_data(item)
                if item.type == WriteItemType.BYTE_IO:
                    assert isinstance(data, io.BytesIO)
                    counter.write(data.getbuffer())
                else:
                    assert isinstance(data, torch.Tensor)
                    tensor = data.detach().cpu()
                    if tensor.untyped_storage().nbytes() != tensor.nbytes:
                        tensor = tensor.clone()  # a view: save its elements, not its base
                    torch.save(tensor, counter)  # type: ignore[arg-type]
                placed.append((item.index, offset, counter.size - offset))

        size_hint = sum(_nbytes(item) for item in items) + 4096 * len(items)
        entry = self.store.put(self.step, name, produce, size_hint=size_hint)
        return [
            WriteResult(
                index=index,
                size_in_bytes=length,
                storage_data=_Written(_StorageInfo(name, offset, length), name, entry),
            )
            for index, offset, length in placed
        ]

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """On the coordinator, after every rank wrote: put DCP's metadata, then commit the
        manifest of every rank's files. Nothing is committed if any rank failed (DCP does not
        call this then), and what fails here is raised on every rank by DCP."""
        files: dict[str, FileEntry] = {}
        storage: dict[Any, _StorageInfo] = {}
        for rank_results in results:
            for result in rank_results:
                written = result.storage_data
                if isinstance(written, _OwnFile):
                    if written.file in files:  # one rank's file would replace another's
                        raise CheckpointError(f"two ranks wrote their own file {written.file}")
                    files[written.file] = written.entry
                    continue
                if not isinstance(written, _Written):
                    raise TypeError(f"a rank wrote {type(written).__name__}, not a store file")
                storage[result.index] = written.info
                files[written.file] = written.entry
        metadata.version = CURRENT_DCP_VERSION
        metadata.storage_data = storage
        metadata.storage_meta = self.storage_meta()
        name = f"dcp-{self._tag}{METADATA_SUFFIX}"
        files[name] = self.store.put(self.step, name, pickle.dumps(metadata))
        if self.read_back:
            self.store.read_back_payload(self.step, name, files[name])
        if self.may_commit is not None and not self.may_commit():
            raise CheckpointError(f"step {self.step}: save abandoned before its commit")
        self.manifest = self.store.commit(
            self.step,
            files,
            epoch=self.epoch,
            kind=self.kind,
            extra=self.extra,
            resumed_from=self.resumed_from,
            world_size=len(results),
            format="dcp",
        )

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        """Never picked by DCP from a bare ``checkpoint_id``: it is always passed explicitly."""
        return False
