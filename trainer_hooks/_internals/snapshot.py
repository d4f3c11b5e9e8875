"""Copy a state tree into CPU buffers, reusing them from one save to the next.

The copy is all a periodic save costs the training loop: serialization and upload then run in
the background on the copy. Buffers are keyed by their place in the tree and reused when shape
and dtype match, so steady-state saves allocate nothing (and, on GPU, copy into pinned memory).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import torch

Path = tuple[Any, ...]


def cuda_in_use() -> bool:
    """Whether this process has touched CUDA (asking must not initialize it)."""
    return torch.cuda.is_available() and bool(torch.cuda.is_initialized())  # type: ignore[no-untyped-call]


def tree_nbytes(tree: Any) -> int:
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(tree_nbytes(value) for value in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(tree_nbytes(value) for value in tree)
    return 0


class Snapshotter:
    def __init__(self) -> None:
        self._buffers: dict[Path, torch.Tensor] = {}

    def copy(self, tree: Any, *, reuse: bool = True) -> Any:
        """A CPU copy of ``tree``; with ``reuse=False`` nothing earlier is overwritten."""
        copied = self._walk(tree, (), reuse)
        if cuda_in_use():
            torch.cuda.synchronize()  # the non-blocking device-to-host copies must land
        return copied

    def _walk(self, node: Any, path: Path, reuse: bool) -> Any:
        if isinstance(node, torch.Tensor):
            return self._tensor(node, path, reuse)
        if isinstance(node, OrderedDict):
            return OrderedDict((k, self._walk(v, (*path, k), reuse)) for k, v in node.items())
        if isinstance(node, dict):
            return {k: self._walk(v, (*path, k), reuse) for k, v in node.items()}
        if isinstance(node, list):
            return [self._walk(v, (*path, i), reuse) for i, v in enumerate(node)]
        if isinstance(node, tuple) and not hasattr(node, "_fields"):
            return tuple(self._walk(v, (*path, i), reuse) for i, v in enumerate(node))
        return copy.deepcopy(node)

    def _tensor(self, tensor: torch.Tensor, path: Path, reuse: bool) -> torch.Tensor:
        source = tensor.detach()
        buffer = self._buffers.get(path) if reuse else None
        if buffer is None or buffer.shape != source.shape or buffer.dtype != source.dtype:
            buffer = torch.empty(
                source.shape, dtype=source.dtype, device="cpu", pin_memory=source.is_cuda
            )
            if reuse:
                self._buffers[path] = buffer
        buffer.copy_(source, non_blocking=source.is_cuda)
        return buffer
