"""Copy a state tree into CPU buffers, reusing them from one save to the next.

The copy is all a periodic save costs the training loop: serialization and upload then run in
the background on the copy. Buffers are keyed by their place in the tree and reused when shape
and dtype match, so steady-state saves allocate nothing.

A copy doubles the state in host memory, so before allocating, :meth:`Snapshotter.copy` checks
that the new buffers fit in the memory available (the host's or the cgroup's, whichever is
tighter) and raises :class:`NoRoomForCopy` otherwise: the caller then saves without a copy. A
process OOM-killed at its first periodic save loses the run; a slower save does not.

Buffers for GPU tensors are page-locked so the device-to-host copies run asynchronously, all
devices at once. They are plain host allocations registered with CUDA (``cudaHostRegister``),
not ``pin_memory=True``: PyTorch's caching host allocator rounds every pinned block up to a
power of two, which for a 9 GiB state means 16 GiB of locked memory.

A DTensor (FSDP2, tensor parallelism: the sharded path) is copied as its local shard, and the
copy rewrapped with the source's layout: the staged DTensor holds a CPU shard under the
source's mesh and placements, as torch's own stager makes them. Torch's stager is not used:
for every DTensor it allocates a throwaway full-size tensor (a DTensor's ``data_ptr()`` is 0)
and deep-copies its attributes, which made the stall about 2 x the copy (bench/dcp_stall.py).
"""

from __future__ import annotations

import copy
import logging
import mmap
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import psutil
import torch
from torch.distributed.tensor import DTensor

__all__ = ["NoRoomForCopy", "Snapshotter", "available_memory", "page_aligned", "tree_nbytes"]

log = logging.getLogger("spotguard.trainer_hooks")

TreePath = tuple[Any, ...]

PAGE = mmap.PAGESIZE
#: Share of the available memory the new buffers may take: the rest stays for the training
#: loop and the serialization that run while the copy exists.
USABLE_SHARE = 0.9
#: GPU tensors at least this large get page-locked buffers (each costs up to two pages of
#: alignment and a registration); smaller ones are copied synchronously, as DCP does.
PIN_MIN_BYTES = 2**20
#: Where cgroups are mounted (v2 there, v1's memory controller below it); limits set there
#: (containers, systemd ``MemoryMax``) OOM-kill long before the host runs out.
CGROUP_ROOT = Path("/sys/fs/cgroup")


class NoRoomForCopy(Exception):
    """The snapshot's buffers do not fit in the memory available: save without a copy.

    A control-flow signal the saver catches, never raised to the user: outside the error tree
    of :mod:`spotguard.errors` on purpose (its docstring says why)."""


def tree_nbytes(tree: Any) -> int:
    """Bytes of every tensor in ``tree`` (what a save of it writes, about)."""
    if isinstance(tree, torch.Tensor):
        return _nbytes(tree)
    if isinstance(tree, dict):
        return sum(tree_nbytes(value) for value in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(tree_nbytes(value) for value in tree)
    return 0


def available_memory(
    cgroup_root: Path = CGROUP_ROOT, membership: Path = Path("/proc/self/cgroup")
) -> int:
    """Bytes this process can still allocate: the host's available memory, or less when a
    cgroup limit on this process (or on a group above it) leaves less: cgroup v2
    (``memory.max``) or v1 (the ``memory`` controller's ``memory.limit_in_bytes``, as on
    Amazon Linux 2 with Docker or ECS). ``membership`` lists this process's groups."""
    room = psutil.virtual_memory().available
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return room
    for line in lines:
        _, controllers, group = line.split(":", 2)
        if controllers == "":
            root, files = cgroup_root, _V2_FILES
        elif "memory" in controllers.split(","):
            root, files = cgroup_root / "memory", _V1_FILES
        else:
            continue
        leaf = root / group.lstrip("/")
        for folder in (leaf, *leaf.parents):
            if not folder.is_relative_to(root):
                break
            room = min(room, _cgroup_room(folder, *files))
    return room


#: (limit, usage, inactive page cache in memory.stat) of each cgroup version.
_V2_FILES = ("memory.max", "memory.current", "inactive_file")
_V1_FILES = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")


def _cgroup_room(folder: Path, limit_file: str, usage_file: str, inactive: str) -> int:
    """What the cgroup in ``folder`` leaves below its limit (page cache it can drop counts as
    free); unlimited when it sets no limit or cannot be read."""
    try:
        limit = (folder / limit_file).read_text().strip()
        if limit == "max":
            return 2**63
        used = int((folder / usage_file).read_text())
        stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines())
    except (OSError, ValueError):
        return 2**63
    return max(int(limit) - used + int(stat.get(inactive, 0)), 0)


def page_aligned(shape: torch.Size, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """An empty CPU tensor whose bytes start and end on pages of its own, and the allocation
    that holds it (at most two pages larger): the pages can be locked without touching a
    neighbour's, and without rounding the size up."""
    nbytes = shape.numel() * dtype.itemsize
    span = -(-nbytes // PAGE) * PAGE
    raw = torch.empty(span + PAGE, dtype=torch.uint8)
    start = -raw.data_ptr() % PAGE
    return raw[start : start + nbytes].view(dtype).view(shape), raw[start : start + span]


def _page_locked(source: torch.Tensor) -> torch.Tensor:
    """A CPU buffer for ``source``, page-locked when CUDA lets it (else pageable: the copy
    into it is synchronous then, still correct)."""
    buffer, pages = page_aligned(source.shape, source.dtype)
    address = pages.data_ptr()
    cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call]
    code = int(cudart.cudaHostRegister(address, pages.numel(), 1))  # 1: portable, every device
    if code != 0:
        log.warning("cannot page-lock a %d-byte snapshot buffer (cudaError %d): copying "
                    "it synchronously", pages.numel(), code)  # fmt: skip
        return buffer
    # Unlocked when the last view of the memory is gone (not at exit: CUDA may be gone).
    weakref.finalize(pages.untyped_storage(), _unlock, address).atexit = False
    return buffer


def _unlock(address: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(address)  # type: ignore[no-untyped-call]


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _children(node: Any) -> Iterable[tuple[Any, Any]] | None:
    """The (key, child) pairs of a container the copy descends into; ``None`` for a leaf."""
    if isinstance(node, dict):
        return node.items()
    if isinstance(node, list) or (isinstance(node, tuple) and not hasattr(node, "_fields")):
        return enumerate(node)
    return None


def _tensors(node: Any, path: TreePath) -> Iterator[tuple[TreePath, torch.Tensor]]:
    """Every tensor the copy of ``node`` reads (a DTensor's local shard), by path."""
    if isinstance(node, DTensor):
        yield path, _local(node)
        return
    if isinstance(node, torch.Tensor):
        yield path, node
        return
    for key, child in _children(node) or ():
        yield from _tensors(child, (*path, key))


def _local(tensor: DTensor) -> torch.Tensor:
    """``tensor``'s local shard (``to_local`` without autograd: no graph node per tensor)."""
    with torch.no_grad():
        return tensor.to_local()


def _reusable(buffer: torch.Tensor, source: torch.Tensor) -> bool:
    return buffer.shape == source.shape and buffer.dtype == source.dtype


class Snapshotter:
    """The buffers of one rank's snapshots; ``available`` says how many bytes may still be
    allocated (a seam: tests make memory scarce without touching the machine)."""

    def __init__(self, available: Callable[[], int] = available_memory) -> None:
        self._buffers: dict[TreePath, torch.Tensor] = {}
        self._available = available

    def copy(self, tree: Any) -> Any:
        """A CPU copy of ``tree``, complete when this returns; :class:`NoRoomForCopy` (with
        nothing allocated, and the old buffers given back) when its buffers would not fit."""
        sources = dict(_tensors(tree, ()))
        self._buffers = {  # buffers of tensors that changed or left go back before allocating
            path: buffer
            for path, buffer in self._buffers.items()
            if path in sources and _reusable(buffer, sources[path])
        }
        need = sum(_nbytes(t) for path, t in sources.items() if path not in self._buffers)
        if need:
            usable = int(self._available() * USABLE_SHARE)
            if need > usable:
                self._buffers.clear()  # their memory is better spent on the save without them
                raise NoRoomForCopy(
                    f"a copy of the state needs {need / 2**20:.0f} MiB more host memory and "
                    f"{usable / 2**20:.0f} MiB can be used"
                )
        devices: set[torch.device] = set()
        copied = self._walk(tree, (), devices)
        for device in devices:  # every device copied from: its device-to-host copies land
            torch.cuda.synchronize(device)
        return copied

    def _walk(self, node: Any, path: TreePath, devices: set[torch.device]) -> Any:
        if isinstance(node, DTensor):  # its shard's copy, in the source's layout (internal
            # constructor: ``from_local`` would move the copy back to the mesh's device)
            local = self._tensor(_local(node), path, devices)
            return DTensor(local, node._spec, requires_grad=False)  # type: ignore[no-untyped-call]
        if isinstance(node, torch.Tensor):
            return self._tensor(node, path, devices)
        if isinstance(node, OrderedDict):
            return OrderedDict((k, self._walk(v, (*path, k), devices)) for k, v in node.items())
        if isinstance(node, dict):
            return {k: self._walk(v, (*path, k), devices) for k, v in node.items()}
        if isinstance(node, list):
            return [self._walk(v, (*path, i), devices) for i, v in enumerate(node)]
        if _children(node) is not None:  # a plain tuple
            return tuple(self._walk(v, (*path, i), devices) for i, v in enumerate(node))
        return copy.deepcopy(node)

    def _tensor(
        self, tensor: torch.Tensor, path: TreePath, devices: set[torch.device]
    ) -> torch.Tensor:
        source = tensor.detach()
        buffer = self._buffers.get(path)
        if buffer is None:
            if source.is_cuda and _nbytes(source) >= PIN_MIN_BYTES:
                buffer = _page_locked(source)
            else:
                buffer = torch.empty(source.shape, dtype=source.dtype, device="cpu")
            self._buffers[path] = buffer
        if source.is_cuda:
            devices.add(source.device)
        buffer.copy_(source, non_blocking=source.is_cuda)
        return buffer
