"""A DataLoader that resumes mid-epoch exactly where it stopped, without torchdata.

A plain ``DataLoader`` restarts an interrupted epoch from sample 0 (and, with ``shuffle=True``,
in a different order), so a resumed run sees some samples twice and others never: it cannot
end bit-exact. :class:`ResumableDataLoader` draws each epoch's order from ``seed + epoch``,
counts the batches it has handed to the training loop, and after ``load_state_dict`` skips
exactly those (by index, without loading them).

Random augmentation in worker processes resumes exactly too. torch seeds each worker once per
``iter()`` (``base_seed + worker_id``, ``base_seed`` drawn from the loader's generator), and
what a worker draws for a batch then depends on the batches it fetched before: after a resume
mid-epoch, batch k goes to another worker, in another stream state. So the workers' torch,
``random`` and NumPy streams are reseeded before every batch from (seed, rank, epoch, batch),
and the generator behind ``base_seed`` (what ``worker_init_fn`` sees) from (seed, rank, epoch):
nothing random depends on where the previous run stopped, and every rank draws its own
numbers. Without workers (``num_workers=0``) augmentation draws from the training process's
own streams, which the checkpoint holds. ``loader.dataset`` is the wrapper that does this; the
caller's dataset is ``loader.dataset.dataset``. One exception: with ``persistent_workers=True``
torch seeds the workers at the first ``iter()`` only, so randomness drawn in
``worker_init_fn`` (not in ``__getitem__``) depends on the epoch the process started in.

It has ``state_dict``/``load_state_dict``, so Lightning saves and restores it with the fit
loop, and the plain-PyTorch :class:`~spotguard.trainer_hooks.SpotGuard` does the same when it
is part of the guarded state. torchdata's ``StatefulDataLoader`` works too, where installed,
for the position within the epoch; its later epochs reshuffle differently from an
uninterrupted run (its resumed iterator draws from its generator once more), so bit-exact
runs across epochs need this loader.

Under ``torch.distributed`` it shards itself the way ``DistributedSampler`` does (each rank
every world-size-th sample of the epoch's order). Its state records the world size: after
``B`` batches of ``b`` samples on each of ``W`` ranks, the first ``B * b * W`` samples of the
epoch's order are consumed (the ranks' batches interleave), so a resume at another world size
shares out the rest of that epoch over the new ranks (padded by wrapping as above): across
the resume no sample of the epoch is seen twice or skipped. With Lightning's DDP, pass
``Trainer(use_distributed_sampler=False)``: Lightning would otherwise try to rebuild the
loader around a ``DistributedSampler`` of its own.
"""

from __future__ import annotations

import hashlib
import logging
import random
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from spotguard.errors import ConfigError

__all__ = ["ResumableBatchSampler", "ResumableDataLoader"]

log = logging.getLogger("spotguard.trainer_hooks")

#: In ``state_dict`` since workers are seeded per batch; a state without it was saved by a
#: loader whose workers drew from per-iter() streams, which a resumed run cannot reproduce.
WORKER_SEEDING = 1


def _derive(*parts: int) -> int:
    """A 64-bit seed from ``parts``, the same on every machine and Python; different parts give
    unrelated seeds (``seed + epoch`` would give seed 3's epoch 1 the streams of seed 4's
    epoch 0)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _seed_streams(seed: int) -> None:
    """Seed what torch seeds in a new worker (torch, ``random``, NumPy), for one batch."""
    random.seed(seed)
    torch.manual_seed(seed)
    numpy = sys.modules.get("numpy")  # a dataset that draws from NumPy has imported it
    if numpy is not None:
        numpy.random.seed([seed & 0xFFFF_FFFF, seed >> 32])


class _Batch(list[int]):
    """A batch of indices with the seed its samples' augmentation draws from.

    A list, so whatever reads the batch sampler still sees indices; the seed travels with it,
    pickled, to the worker process that fetches it.
    """

    def __init__(self, indices: Iterable[int], seed: int) -> None:
        super().__init__(indices)
        self.seed = seed


class _WorkerSeeded(Dataset[Any]):
    """The caller's dataset, fetched a batch at a time, a worker's streams reseeded first from
    the batch's seed (see the module docstring for why once per worker is not enough)."""

    def __init__(self, dataset: Dataset[Any]) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def __getitems__(self, batch: _Batch) -> list[Any]:
        if get_worker_info() is not None:  # in the training process: its own, saved streams
            _seed_streams(batch.seed)
        fetch = getattr(self.dataset, "__getitems__", None)
        return fetch(batch) if fetch else [self.dataset[index] for index in batch]

    def __getattr__(self, name: str) -> Any:
        """The caller's dataset attributes (``loader.dataset.classes``) still work."""
        if name == "dataset":  # not set yet (unpickling): no endless recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


class ResumableBatchSampler(Sampler[list[int]]):
    """Batches of indices in a per-epoch order that depends only on ``seed + epoch``.

    (Not :func:`_derive`d: a checkpoint of an earlier version would then resume its epoch in
    another order.)
    """

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
        #: Samples of this epoch's order consumed before the sharding (a resume at another
        #: world size); the rest is sharded over the ranks of now.
        self.start_sample = 0

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
        left = max(self.length - self.start_sample, 0)
        return -(-left // world)  # every rank gets as many samples (padded by wrapping)

    def position(self, start_sample: int, batches: int, world: int) -> tuple[int, int]:
        """(start_sample, batches) in this epoch at the world size of now, for a position
        saved at ``world`` ranks: the same at the same world size; at another, the samples
        consumed by all ranks (``batches`` each, interleaved) become the start of the order."""
        if world == self._replicas()[1]:
            return start_sample, batches
        return min(start_sample + batches * self.batch_size * world, self.length), 0

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
        order = order[self.start_sample :]
        rank, world = self._replicas()
        if world > 1 and order:  # like DistributedSampler: pad by wrapping, every world-th
            order = (order * world)[: self._shard_length() * world][rank::world]
        start, self.start_batch = self.start_batch, 0
        # The seeds of a batch: by its place in the epoch (of a resharded rest, its own).
        place = (self.start_sample,) if self.start_sample else ()
        for batch in range(start, len(self)):
            indices = order[batch * self.batch_size : (batch + 1) * self.batch_size]
            yield _Batch(indices, _derive(self.seed, rank, self.epoch, batch, *place))


class ResumableDataLoader(DataLoader[Any]):
    """``DataLoader(dataset, batch_size, shuffle=...)`` that can resume mid-epoch.

    Takes the usual DataLoader keywords (``num_workers``, ``collate_fn``, ``pin_memory``, ...)
    except the sampler ones and ``generator``, which it owns.
    """

    def __init__(
        self, dataset: Dataset[Any], batch_size: int = 1, *, shuffle: bool = False,
        seed: int = 0, drop_last: bool = False, **kwargs: Any,
    ) -> None:  # fmt: skip
        if "generator" in kwargs:
            raise ConfigError(
                "ResumableDataLoader seeds its own generator from seed, rank and epoch (a "
                "caller's generator state would not survive a resume): pass seed= instead"
            )
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
        generator = torch.Generator()
        super().__init__(
            _WorkerSeeded(dataset), batch_sampler=sampler, generator=generator, **kwargs
        )
        self._resumable = sampler
        self._generator = generator
        self._epoch = 0  # the epoch the position below belongs to
        self._start = 0  # samples of its order consumed at another world size (a resume)
        self._consumed = 0  # batches handed to the training loop in that epoch (after those)
        self._epoch_done = False

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]  # a generator of batches
        sampler = self._resumable
        # After a finished epoch, iter() starts the next one, at batch 0.
        if self._epoch_done and sampler.epoch == self._epoch:
            sampler.set_epoch(sampler.epoch + 1)
        if sampler.epoch != self._epoch:
            self._epoch, self._start, self._consumed = sampler.epoch, 0, 0
        self._epoch_done = False
        sampler.start_sample, sampler.start_batch = self._start, self._consumed
        rank, _ = sampler._replicas()
        # The workers' base seed, drawn from this at iter(): the same for a resumed epoch.
        self._generator.manual_seed(_derive(sampler.seed, rank, self._epoch))
        total = len(sampler)
        for batch in super().__iter__():
            self._consumed += 1
            # Done with the last batch, not at StopIteration: Lightning stops pulling after
            # len(loader) batches and never exhausts the iterator.
            self._epoch_done = self._consumed >= total
            yield batch
        self._epoch_done = True

    def state_dict(self) -> dict[str, int]:
        """The position (and the world size it counts batches at); everything random derives
        from it, the seed and the rank."""
        done = self._epoch_done
        epoch, start, consumed = (
            (self._epoch + 1, 0, 0) if done else (self._epoch, self._start, self._consumed)
        )
        return {
            "epoch": epoch,
            "batches_consumed": consumed,
            "start_sample": start,
            "world_size": self._resumable._replicas()[1],
            "seed": self._resumable.seed,
            "worker_seeding": WORKER_SEEDING,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at the saved position, at any world size (a state without one, from an
        older spotguard, is taken as saved at the world size of now); another seed is refused
        (the order would change)."""
        if state.get("seed", self._resumable.seed) != self._resumable.seed:
            raise ConfigError(
                f"checkpoint was taken with loader seed {state['seed']}, this loader has seed "
                f"{self._resumable.seed}: resuming would change the sample order"
            )
        if "worker_seeding" not in state and self.num_workers > 0:
            log.warning(
                "this data loader state was saved by an older spotguard: the sample order "
                "resumes exactly, but random augmentation in the loader's worker processes "
                "will differ from the run that saved it"
            )
        sampler = self._resumable
        world = int(state.get("world_size", sampler._replicas()[1]))
        self._epoch = int(state["epoch"])
        self._start, self._consumed = sampler.position(
            int(state.get("start_sample", 0)), int(state["batches_consumed"]), world
        )
        sampler.set_epoch(self._epoch)
        sampler.start_sample = self._start  # len(loader) of the resumed epoch, before iter()
        self._epoch_done = False
