"""The ranks of a ``torch.distributed`` job, or a single process: the same small API.

Collectives run in the training thread only, at step boundaries: never in a signal handler and
never in the upload thread (they would interleave with DDP's own).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["Ranks"]


class Ranks:
    """This process's rank and world size, and the two collectives the hooks need."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.active else 0
        self.world = dist.get_world_size() if self.active else 1
        nccl = self.active and dist.get_backend() == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else None

    def any(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag OR-ed over all ranks."""
        if not self.active:
            return flags
        import torch.distributed as dist

        tensor = torch.tensor([int(flag) for flag in flags], device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tuple(bool(value) for value in tensor.tolist())

    def gather(self, item: Any) -> list[Any]:
        """``item`` of every rank, in rank order."""
        if not self.active:
            return [item]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, item)
        return gathered
