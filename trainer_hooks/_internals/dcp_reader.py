"""A ``torch.distributed.checkpoint`` StorageReader on spotguard's checkpoint store.

Every file a rank uses is verified before a byte of it is interpreted: the manifest must be
committed with format ``dcp``, and each shard file (and DCP's metadata file) is streamed into a
private spool while its size and SHA-256 are checked against the manifest
(:class:`~spotguard.errors.CorruptCheckpoint` naming the file otherwise). A rank downloads
only the files that hold items it needs, whole: a checksum covers a whole file.

A checkpoint store is data, not trusted code, and DCP's stock loader trusts it twice:

* DCP's metadata file is a plain pickle, and ``FileSystemReader`` reads it with
  ``pickle.load``, which can run any callable the file names. torch offers no public safe
  loader for it (``weights_only`` covers ``torch.save`` files only), so
  :func:`load_metadata` unpickles with an allow-list: DCP's metadata dataclasses,
  ``torch.Size``, dtypes, layouts and paths. Anything else (a ``checkpoint_id`` of another
  type, a planner of someone else's with its own ``planner_data`` classes) is refused with
  :class:`~spotguard.errors.UnloadableCheckpoint` instead of being imported.
* Non-tensor values (ints, strings, lists in the state dict) are ``torch.save`` records that
  DCP's ``DefaultLoadPlanner`` loads with ``weights_only=False``; :class:`SafeLoadPlanner`
  loads them weights-only. Tensors are loaded weights-only as in DCP.
"""

from __future__ import annotations

import io
import pickle
import tempfile
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any, ClassVar, cast

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from spotguard.errors import CorruptCheckpoint, UnloadableCheckpoint
from spotguard.protocol import step_dir
from spotguard.trainer_hooks._internals.dcp_writer import metadata_name
from spotguard.trainer_hooks.manifest import Manifest

if TYPE_CHECKING:
    from spotguard.trainer_hooks._internals.reader import StoreReader as Store

__all__ = ["SafeLoadPlanner", "StoreReader", "load_metadata"]

_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # a name -> one of torch's layouts
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath"},  # DCP's own writer records its path
    "collections": {"OrderedDict"},
}


def _instance_of_allowed(target: Any) -> bool:
    """``target`` is an instance of one of the allow-listed classes (never a class, function
    or module itself: pickle's BUILD on those would set attributes process-wide)."""
    kind = type(target)
    return kind.__name__ in _METADATA_CLASSES.get(kind.__module__, ()) and not isinstance(
        target, type
    )


class _MetadataUnpickler(pickle._Unpickler):
    """Imports only what DCP's metadata is made of (see the module's docstring), and changes
    nothing but what it builds.

    Python's own unpickler in pure Python, so that each opcode that changes an existing object
    can check it, as torch's weights-only unpickler does: BUILD (set an object's state) only
    on instances of the allow-listed classes, APPEND(S) only on lists, SETITEM(S) only on
    dicts, ADDITEMS only on sets. Otherwise BUILD on an allow-listed *class* would ``setattr``
    on it for the whole process (``pathlib.PosixPath.exists`` replaced by another callable).
    """

    dispatch: ClassVar[dict[int, Callable[[Any], None]]] = dict(pickle._Unpickler.dispatch)
    stack: list[Any]
    metastack: list[list[Any]]

    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP's metadata")

    def load_build(self) -> None:
        _refuse_unless(_allowed_instance(self.stack[-2]), "BUILD", self.stack[-2])
        super().load_build()  # type: ignore[misc]

    def load_append(self) -> None:
        _refuse_unless(type(self.stack[-2]) is list, "APPEND", self.stack[-2])
        super().load_append()  # type: ignore[misc]

    def load_appends(self) -> None:  # the target lies below the mark
        _refuse_unless(type(self.metastack[-1][-1]) is list, "APPENDS", self.metastack[-1][-1])
        super().load_appends()  # type: ignore[misc]

    def load_setitem(self) -> None:
        _refuse_unless(type(self.stack[-3]) in _DICTS, "SETITEM", self.stack[-3])
        super().load_setitem()  # type: ignore[misc]

    def load_setitems(self) -> None:
        target = self.metastack[-1][-1]
        _refuse_unless(type(target) in _DICTS, "SETITEMS", target)
        super().load_setitems()  # type: ignore[misc]

    def load_additems(self) -> None:
        target = self.metastack[-1][-1]
        _refuse_unless(type(target) is set, "ADDITEMS", target)
        super().load_additems()  # type: ignore[misc]

    dispatch[pickle.BUILD[0]] = load_build
    dispatch[pickle.APPEND[0]] = load_append
    dispatch[pickle.APPENDS[0]] = load_appends
    dispatch[pickle.SETITEM[0]] = load_setitem
    dispatch[pickle.SETITEMS[0]] = load_setitems
    dispatch[pickle.ADDITEMS[0]] = load_additems


_DICTS = (dict, OrderedDict)


def _allowed_instance(target: Any) -> bool:
    """An instance of an allow-listed class (a dataclass of DCP's metadata), never a class,
    function or module itself."""
    kind = type(target)
    return not isinstance(target, type) and kind.__name__ in _METADATA_CLASSES.get(
        kind.__module__, ()
    )


def _refuse_unless(ok: bool, opcode: str, target: Any) -> None:
    if not ok:
        raise pickle.UnpicklingError(
            f"pickle {opcode} on a {type(target).__name__} object: DCP's metadata changes "
            "only what it builds"
        )


def load_metadata(data: bytes, where: str) -> Metadata:
    """DCP's metadata from ``data`` (verified bytes), through the allow-list."""
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except Exception as exc:  # verified bytes that do not unpickle here: IndexError, ...
        reason = str(exc) if isinstance(exc, pickle.UnpicklingError) else repr(exc)
        raise UnloadableCheckpoint(
            f"{where}: DCP metadata that this loader does not unpickle ({reason}); it was not "
            "written by spotguard's sharded save"
        ) from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise UnloadableCheckpoint(f"{where}: not DCP metadata ({type(metadata).__name__})")
    return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, but non-tensor values are loaded weights-only."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            loaded = torch.load(value, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UnloadableCheckpoint(
                f"{read_item.dest_index.fqn}: not weights-only data ({first[:200]}); register "
                "its classes with torch.serialization.add_safe_globals"
            ) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


class StoreReader(StorageReader):
    """Reads the DCP checkpoint of ``step`` from ``store``, verifying what it reads.

    A failure to read the manifest or the metadata is not raised from :meth:`read_metadata`
    (DCP would swallow it into an ``AssertionError`` naming no type) but kept, and raised from
    :meth:`set_up_storage_reader`, inside DCP's first collective step: every rank then gets
    it, with its type, and none waits for a rank that gave up.
    """

    def __init__(self, store: Store, step: int) -> None:
        super().__init__()
        self.store, self.step = store, step
        self.where = f"{store.uri}/{step_dir(step)}"
        self.manifest: Manifest | None = None
        self._failure: BaseException | None = None
        self._storage: dict[Any, _StorageInfo] = {}
        self._metadata: Metadata | None = None

    @property
    def checkpoint_id(self) -> str:
        return self.where

    def reset(self, checkpoint_id: Any = None) -> None:
        self.manifest, self._failure, self._storage = None, None, {}
        self._metadata = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        try:
            return self.checked_metadata()
        except Exception as exc:  # raised on every rank from set_up_storage_reader
            self._failure = exc
            return Metadata(state_dict_metadata={}, storage_data={}, storage_meta=StorageMeta())

    def checked_metadata(self) -> Metadata:
        """The checkpoint's manifest and DCP metadata, verified (read once: a caller that
        needs them before ``dcp.load`` to build its state dict, then DCP, share one read).
        Raises :class:`CorruptCheckpoint` or :class:`UnloadableCheckpoint` naming what failed."""
        if self._metadata is None:
            self._metadata = self._read_metadata()
        return self._metadata

    def _read_metadata(self) -> Metadata:
        manifest = self.store.manifest(self.step)
        if manifest.format != "dcp":
            raise UnloadableCheckpoint(
                f"{self.where}: a {manifest.format!r} checkpoint, not a sharded (dcp) one"
            )
        self.manifest = manifest
        buffer, name = io.BytesIO(), metadata_name(manifest)
        self.store.fetch(manifest, name, buffer)
        metadata = load_metadata(buffer.getvalue(), f"{self.where}/{name}")
        for index, info in metadata.storage_data.items():
            if not isinstance(info, _StorageInfo):
                raise UnloadableCheckpoint(f"{self.where}: {index} has no file location")
            if info.relative_path not in manifest.files:
                raise CorruptCheckpoint(
                    f"{self.where}: the metadata places {index.fqn} in {info.relative_path!r}, "
                    "which the manifest does not list"
                )
            if info.transform_descriptors:
                raise UnloadableCheckpoint(
                    f"{self.where}: {index.fqn} was written through DCP stream transforms "
                    f"{info.transform_descriptors}, which this reader does not apply"
                )
        metadata.storage_meta = metadata.storage_meta or StorageMeta()
        return metadata

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        if self._failure is not None:
            raise self._failure
        self._storage = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Each file this rank needs: verified in full into a spool, then its items copied
        into the state dict (tensors weights-only, narrowed to what this rank holds)."""
        assert self.manifest is not None
        per_file: dict[str, list[ReadItem]] = defaultdict(list)
        for item in plan.items:
            per_file[self._storage[item.storage_index].relative_path].append(item)
        for name, items in sorted(per_file.items()):
            with tempfile.TemporaryFile(prefix="spotguard-dcp-") as spool:
                self.store.fetch(self.manifest, name, spool)  # CorruptCheckpoint naming it
                for item in sorted(items, key=lambda i: self._storage[i.storage_index].offset):
                    self._read_item(spool, name, item, planner)
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def _read_item(self, spool: IO[bytes], name: str, item: ReadItem, planner: Any) -> None:
        info = self._storage[item.storage_index]
        spool.seek(info.offset)
        data = spool.read(info.length)
        if len(data) != info.length:
            raise CorruptCheckpoint(
                f"{self.where}/{name}: {item.storage_index.fqn} lies beyond the end of the file"
            )
        if item.type == LoadItemType.BYTE_IO:
            planner.load_bytes(item, io.BytesIO(data))
            return
        try:
            loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
            raise UnloadableCheckpoint(
                f"{self.where}/{name}: {item.storage_index.fqn} is not a weights-only tensor "
                f"({str(exc).strip()[:200]})"
            ) from None
        if not isinstance(loaded, torch.Tensor):
            raise UnloadableCheckpoint(
                f"{self.where}/{name}: {item.storage_index.fqn} holds a "
                f"{type(loaded).__name__}, not a tensor"
            )
        tensor = narrow_tensor_by_index(loaded, item.storage_offsets, item.lengths)
        target = cast(torch.Tensor, planner.resolve_tensor(item)).detach()
        if target.size() != tensor.size():
            raise CorruptCheckpoint(
                f"{self.where}/{name}: {item.storage_index.fqn} has shape {tuple(tensor.size())}"
                f" where the metadata says {tuple(target.size())}"
            )
        target.copy_(tensor)
        planner.commit_tensor(item, target)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        """Never picked by DCP from a bare ``checkpoint_id``: it is always passed explicitly."""
        return False
