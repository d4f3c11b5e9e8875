"""A DataLoader that resumes mid-epoch exactly where it stopped, without torchdata.

A plain ``DataLoader`` restarts an interrupted epoch from sample 0 (and, with ``shuffle=True``,
in a different order), so a resumed run sees some samples twice and others never: it cannot
end bit-exact. :class:`ResumableDataLoader` draws each epoch's order from ``seed + epoch``,
counts the batches it has handed to the training loop, and after ``load_state_dict`` skips
exactly those (by index, without loading them).

It has ``state_dict``/``load_state_dict``, so Lightning saves and restores it with the fit
loop, and the plain-PyTorch :class:`~spotguard.trainer_hooks.SpotGuard` does the same when it
is part of the guarded state. torchdata's ``StatefulDataLoader`` works too, where installed,
for the position within the epoch; its later epochs reshuffle differently from an
uninterrupted run (its resumed iterator draws from its generator once more), so bit-exact
runs across epochs need this loader.

Under ``torch.distributed`` it shards itself the way ``DistributedSampler`` does (each rank
every world-size-th sample of the epoch's order). With Lightning's DDP, pass
``Trainer(use_distributed_sampler=False)``: Lightning would otherwise try to rebuild the
loader around a ``DistributedSampler`` of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from spotguard.errors import ConfigError

__all__ = ["ResumableBatchSampler", "ResumableDataLoader"]


class ResumableBatchSampler(Sampler[list[int]]):
    """Batches of indices in a per-epoch order that depends only on ``seed + epoch``."""

    def __init__(
        self, length: int, batch_size: int, *, shuffle: bool = True, seed: int = 0,
        drop_last: bool = False,
    ) -> None:  # fmt: skip
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.length, self.batch_size = length, batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int) -> None:
        """Move to ``epoch`` (the loader does this itself at the start of each epoch)."""
        self.epoch = epoch

    @staticmethod
    def _replicas() -> tuple[int, int]:
        """(rank, world size) of a running torch.distributed job, else (0, 1)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _shard_length(self) -> int:
        _, world = self._replicas()
        return -(-self.length // world)  # every rank gets as many samples (padded by wrapping)

    def __len__(self) -> int:
        if self.drop_last:
            return self._shard_length() // self.batch_size
        return -(-self._shard_length() // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.length, generator=generator).tolist()
        else:
            order = list(range(self.length))
        rank, world = self._replicas()
        if world > 1:  # like DistributedSampler: pad by wrapping, then every world-th index
            order = (order * world)[: self._shard_length() * world][rank::world]
        start, self.start_batch = self.start_batch, 0
        for batch in range(start, len(self)):
            yield order[batch * self.batch_size : (batch + 1) * self.batch_size]


class ResumableDataLoader(DataLoader[Any]):
    """``DataLoader(dataset, batch_size, shuffle=...)`` that can resume mid-epoch.

    Takes the usual DataLoader keywords (``num_workers``, ``collate_fn``, ``pin_memory``, ...)
    except the sampler ones, which it owns.
    """

    def __init__(
        self, dataset: Dataset[Any], batch_size: int = 1, *, shuffle: bool = False,
        seed: int = 0, drop_last: bool = False, **kwargs: Any,
    ) -> None:  # fmt: skip
        sampler = ResumableBatchSampler(
            len(dataset),  # type: ignore[arg-type]
            batch_size,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
        )
        # A generator of its own: otherwise every iter() draws a base seed from the global
        # torch RNG, and a resumed run (one extra iter() mid-epoch) would drift from the
        # uninterrupted one in everything random that follows, dropout included.
        kwargs.setdefault("generator", torch.Generator().manual_seed(seed))
        super().__init__(dataset, batch_sampler=sampler, **kwargs)
        self._resumable = sampler
        self._epoch = 0  # the epoch the position below belongs to
        self._consumed = 0  # batches handed to the training loop in that epoch
        self._epoch_done = False

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]  # a generator of batches
        sampler = self._resumable
        # After a finished epoch, iter() starts the next one, at batch 0.
        if self._epoch_done and sampler.epoch == self._epoch:
            sampler.set_epoch(sampler.epoch + 1)
        if sampler.epoch != self._epoch:
            self._epoch, self._consumed = sampler.epoch, 0
        self._epoch_done = False
        sampler.start_batch = self._consumed
        total = len(sampler)
        for batch in super().__iter__():
            self._consumed += 1
            # Done with the last batch, not at StopIteration: Lightning stops pulling after
            # len(loader) batches and never exhausts the iterator.
            self._epoch_done = self._consumed >= total
            yield batch
        self._epoch_done = True

    def state_dict(self) -> dict[str, int]:
        if self._epoch_done:
            return {"epoch": self._epoch + 1, "batches_consumed": 0, "seed": self._resumable.seed}
        return {
            "epoch": self._epoch,
            "batches_consumed": self._consumed,
            "seed": self._resumable.seed,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed", self._resumable.seed) != self._resumable.seed:
            raise ConfigError(
                f"checkpoint was taken with loader seed {state['seed']}, this loader has seed "
                f"{self._resumable.seed}: resuming would change the sample order"
            )
        self._epoch = int(state["epoch"])
        self._consumed = int(state["batches_consumed"])
        self._resumable.set_epoch(self._epoch)
        self._epoch_done = False
