"""One checkpoint as one ``torch.save`` file, for export (``spotguard ckpt pull --to-torch``).

Why: a trained model leaves the run for evaluation or serving, where nobody wants DCP's
shards, a process group, or spotguard. What is written loads with
``torch.load(FILE, weights_only=True)``:

* ``dcp`` checkpoints are loaded whole in this one process (no process group, any world size
  they were written at) through the store's own
  :class:`~spotguard.trainer_hooks._internals.dcp_reader.StoreReader`: every file verified
  against the manifest, DCP's metadata unpickled through its allow-list, values loaded
  weights-only. Never through DCP's ``FileSystemReader`` or ``dcp_to_torch_save``, which
  ``pickle.load`` the metadata: a store is data, not trusted code. DTensor and FSDP2 shards
  come out as full plain tensors, nested as they were saved. Only DCP's state is exported:
  files a rank writes beside its shards (``rank-<k>-<save id>.pt``: its random streams, and
  on rank 0 the run's plain values) resume a run, they are not the model: they are listed in
  the manifest but not in DCP's metadata, which alone says what is loaded here.
* ``torch`` checkpoints are one ``torch.save`` file already: rank 0's ``state.pt`` (the whole
  state; the other ranks' files hold only their own random streams) is copied as it is,
  verified on the way.

The file is written beside its destination (mode 0600: model weights are not for every user of
the machine), flushed to disk, loaded back weights-only, and only then renamed over the
destination: what lies there is the old file or the whole new one, never a part of one.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch
from torch.distributed.checkpoint.api import CheckpointException

# Private, but it is the planner torch's own ``format_utils.dcp_to_torch_save`` loads with: it
# rebuilds the whole nested state dict (full-size tensors) from DCP's metadata. torch 2.13 has
# no public way to load a checkpoint without a state dict to load into. Used here only.
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

from spotguard.errors import CheckpointError, ConfigError, UnloadableCheckpoint
from spotguard.protocol import step_dir, write_atomic
from spotguard.trainer_hooks._internals.dcp_reader import SafeLoadPlanner, StoreReader
from spotguard.trainer_hooks.manifest import WHOLE_STATE_FILE, Manifest

if TYPE_CHECKING:
    from spotguard.trainer_hooks._internals.reader import StoreReader as Store

__all__ = ["export_torch", "load_whole", "writable_target"]


def writable_target(path: Path) -> Path:
    """``path`` as a file to write, checked before anything is downloaded (a typo must not
    cost a download of the whole checkpoint): :class:`ConfigError` naming it otherwise."""
    if path.is_dir():
        raise ConfigError(f"{path} is a directory, not a file to write")
    if not path.parent.is_dir():
        raise ConfigError(f"cannot write {path}: directory {path.parent} does not exist")
    return path


def export_torch(store: Store, manifest: Manifest, path: Path) -> None:
    """Write the committed checkpoint ``manifest`` of ``store`` to ``path`` as one
    ``torch.save`` file (see the module's docstring), atomically.

    :class:`~spotguard.errors.CorruptCheckpoint` naming the file when one fails verification,
    :class:`~spotguard.errors.UnloadableCheckpoint` when the checkpoint verifies but does not
    load weights-only; ``path`` is then untouched.
    """
    writable_target(path)
    where = f"{store.uri}/{step_dir(manifest.step)}"

    def produce(handle: IO[bytes]) -> None:
        if manifest.format == "dcp":
            torch.save(load_whole(store, manifest.step), handle)
        else:
            store.fetch(manifest, WHOLE_STATE_FILE, handle)

    # Mode 0600: model weights are not for every user of the machine.
    write_atomic(path, produce, 0o600, check=lambda temp: _check_loads(temp, where))


class _WholeStatePlanner(SafeLoadPlanner, _EmptyStateDictLoadPlanner):
    """Builds the state dict from the metadata (``_EmptyStateDictLoadPlanner``) and loads
    non-tensor values weights-only (:class:`SafeLoadPlanner`)."""

    whole: dict[str, Any]

    def set_up_planner(
        self,
        state_dict: dict[str, Any],
        metadata: Metadata | None = None,
        is_coordinator: bool = False,
    ) -> None:
        # dcp.load hands the planner a dict of its own, filled in place: the result.
        self.whole = state_dict
        super().set_up_planner(state_dict, metadata, is_coordinator)


def load_whole(store: Store, step: int) -> dict[str, Any]:
    """The ``dcp`` checkpoint of ``step`` as one nested state dict of full plain tensors and
    values, loaded in this process alone (the whole state must fit in memory)."""
    planner = _WholeStatePlanner()  # type: ignore[no-untyped-call]  # torch's __init__
    try:
        with warnings.catch_warnings():  # "assuming ... a single process": that is the intent
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp_load({}, storage_reader=StoreReader(store, step), planner=planner, no_dist=True)
    except CheckpointException as exc:
        raise _unwrapped(exc, f"{store.uri}/{step_dir(step)}") from exc
    return planner.whole


def _unwrapped(exc: CheckpointException, where: str) -> BaseException:
    """DCP wraps what failed (here: in this one process) into ``CheckpointException``; the
    spotguard error inside keeps its type and message (a corrupt file stays
    :class:`~spotguard.errors.CorruptCheckpoint` naming it), anything else is unloadable."""
    failures = [failure[0] for failure in exc.failures.values()]
    error: BaseException = failures[0] if failures else exc
    if isinstance(error, CheckpointError) or not isinstance(error, Exception):
        return error  # KeyboardInterrupt and the like pass as they are
    return UnloadableCheckpoint(f"{where}: cannot be loaded whole: {type(error).__name__}: {error}")


def _check_loads(path: Path, where: str) -> None:
    """What was written loads with ``torch.load(weights_only=True)`` (memory-mapped: no second
    copy of the state in memory), as promised: a ``torch`` checkpoint's file is copied as it
    is, and its writer may have saved classes that only ``weights_only=False`` loads."""
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, MemoryError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnloadableCheckpoint(
            f"{where}: verifies, but the exported file does not load with "
            f"torch.load(weights_only=True) ({first[:200]}); nothing was written"
        ) from None
