"""The ranks of a ``torch.distributed`` job, or a single process: the same small API.

Collectives run in the training thread only, at step boundaries: never in a signal handler and
never in the upload thread (they would interleave with DDP's own).

Two choices keep them cheap and correct:

* **Resolved at first use, not at construction.** A guard built before ``init_process_group``
  (or before ``torch.cuda.set_device``) learns its rank when it is first used; a process group
  that appears only after that first use is refused loudly instead of every rank acting as
  rank 0 (same file keys, no stop agreement, a hang).
* **A CPU process group of its own.** The agreements run on a gloo group created for them, so
  on NCCL jobs they never touch a GPU (no device tensor, no host synchronization) and never
  queue behind DDP's gradient all-reduces. The per-step agreement is non-blocking:
  :meth:`Ranks.start_agreement` launches it at one step boundary and :meth:`Ranks.agreed`
  reads it at the next, so every rank acts on the same flags one step later.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch

from spotguard.errors import ConfigError

__all__ = ["SAVE_GROUP_TIMEOUT", "Ranks"]

#: The least timeout of the background saves' group. It carries save traffic only, where one
#: rank may upload for minutes longer than another (a bigger shard, a slower link): with the
#: job's timeout (NCCL's default is 10 minutes) every periodic save of a big state would fail.
SAVE_GROUP_TIMEOUT = timedelta(minutes=60)


class Ranks:
    """This process's rank and world size, and the collectives the hooks need."""

    def __init__(self) -> None:
        self._place: tuple[int, int] | None = None  # (rank, world), once resolved
        self._group: Any = None  # the process group the agreements run on
        self._group_made = False
        #: The agreement started at the last step boundary: (tensor, work), or None.
        self._pending: tuple[torch.Tensor, Any] | None = None

    # -- where this process stands --------------------------------------------------------

    def _resolve(self) -> tuple[int, int]:
        if self._place is None:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                self._place = (dist.get_rank(), dist.get_world_size())
            else:
                declared = os.environ.get("WORLD_SIZE", "1")
                if declared.strip().isdigit() and int(declared) > 1:
                    raise ConfigError(
                        f"WORLD_SIZE={declared} but torch.distributed is not initialized: "
                        "call init_process_group before the guard's first restore() or step()"
                    )
                self._place = (0, 1)
        return self._place

    @property
    def rank(self) -> int:
        return self._resolve()[0]

    @property
    def world(self) -> int:
        return self._resolve()[1]

    @property
    def active(self) -> bool:
        """Several ranks take part: decisions need collectives (asked at every boundary)."""
        if self.world > 1:
            return True
        self._check_still_single()
        return False

    def _check_still_single(self) -> None:
        """A process group made after the guard resolved "one process" would leave every rank
        acting as rank 0: refuse instead."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ConfigError(
                "torch.distributed was initialized after the guard's first use: call "
                "init_process_group before the guard's first restore() or step()"
            )

    def _agreement_group(self) -> tuple[Any, torch.device | None]:
        """The group and device for agreements: a gloo group of our own where gloo exists
        (made on first use: every rank reaches its first collective together), else the
        default group on its backend's device."""
        import torch.distributed as dist

        if not self._group_made:
            self._group_made = True
            if dist.is_gloo_available():
                self._group = dist.new_group(backend="gloo", timeout=_job_timeout())
        if self._group is not None or dist.get_backend() == "gloo":
            return self._group, None
        return None, torch.device("cuda", torch.cuda.current_device())

    def cpu_group(self) -> Any:
        """The group for the training thread's own collectives off the step boundary's flags
        (a sharded save or load in the foreground): the agreements' gloo group with several
        ranks, else ``None`` (the default group, if any)."""
        return self._agreement_group()[0] if self.active else None

    def new_save_group(self) -> tuple[Any, timedelta]:
        """A gloo group for the background saves' collectives (a collective: every rank
        alike), so that no other thread ever issues collectives on the training's groups, and
        its timeout: the job's, but at least :data:`SAVE_GROUP_TIMEOUT` (a peer lost mid-save
        ends the save after it, not the process). No group (``None``) without
        ``torch.distributed``."""
        import torch.distributed as dist

        job = _job_timeout()
        timeout = max(job, SAVE_GROUP_TIMEOUT) if job is not None else SAVE_GROUP_TIMEOUT
        if not (dist.is_available() and dist.is_initialized()):
            return None, timeout
        return dist.new_group(backend="gloo", timeout=timeout), timeout

    # -- collectives ----------------------------------------------------------------------

    def any(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag OR-ed over all ranks, now (a blocking collective)."""
        if not self.active:
            return flags
        import torch.distributed as dist

        group, device = self._agreement_group()
        tensor = torch.tensor([int(flag) for flag in flags], device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
        return tuple(bool(value) for value in tensor.tolist())

    def earliest(self, seconds: float | None) -> float | None:
        """The smallest of every rank's ``seconds`` (``None`` where a rank has none)."""
        if not self.active:
            return seconds
        import torch.distributed as dist

        group, device = self._agreement_group()
        value = float("inf") if seconds is None else seconds
        tensor = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=group)
        result = float(tensor.item())
        return None if result == float("inf") else result

    def start_agreement(self, *flags: bool) -> None:
        """Start OR-ing ``flags`` over all ranks without waiting; :meth:`agreed` reads the
        result at the next step boundary (with several ranks only)."""
        import torch.distributed as dist

        self.drain()
        group, device = self._agreement_group()
        tensor = torch.tensor([int(flag) for flag in flags], device=device)
        work = dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group, async_op=True)
        self._pending = (tensor, work)

    def agreed(self, count: int) -> tuple[bool, ...]:
        """The flags started at the previous boundary, OR-ed over all ranks; ``count``
        times ``False`` when none was started."""
        if self._pending is None:
            return (False,) * count
        tensor, work = self._pending
        self._pending = None
        work.wait()
        return tuple(bool(value) for value in tensor.tolist())

    def drain(self) -> None:
        """Finish an agreement still in flight (its flags are dropped): before the run ends
        or takes another path, so that no collective is left pending."""
        if self._pending is not None:
            self._pending[1].wait()
            self._pending = None

    def gather(self, item: Any) -> list[Any]:
        """``item`` of every rank, in rank order."""
        if not self.active:
            return [item]
        import torch.distributed as dist

        group, _ = self._agreement_group()
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, item, group=group)
        return gathered


def _job_timeout() -> timedelta | None:
    """The collective timeout the job gave its default group (``init_process_group``'s
    ``timeout``), so that a lost peer ends our agreements when it ends the job's own
    collectives, not after torch's 30-minute default for a new group. ``None`` (that default)
    where this torch does not tell."""
    import torch.distributed as dist

    try:
        group = dist.distributed_c10d._get_default_group()
        device = torch.device("cuda" if dist.get_backend() == "nccl" else "cpu")
        timeout = group._get_backend(device).options._timeout
    except (AttributeError, RuntimeError, ValueError):
        return None
    return timeout if isinstance(timeout, timedelta) else None
