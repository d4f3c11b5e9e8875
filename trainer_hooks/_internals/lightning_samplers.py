"""The train samplers' state that Lightning's checkpoint misses under DDP, and the epoch
after a checkpoint taken at the last batch of an epoch.

A ``StatefulDataLoader`` saves its position, and its own ``RandomSampler``'s generator, in
Lightning's checkpoint. Under DDP, Lightning replaces the sampler before the run: a
``DistributedSampler`` (its order depends on ``seed + epoch``) or, for a sampler it does not
know (torchdata's own ``RandomSampler`` among them), a ``DistributedSamplerWrapper`` that
draws the inner sampler's whole order at every ``iter()`` and then shards it. Neither is
stateful, so the loader saves only how many samples it yielded and fast-forwards on resume.
Two things were then lost (checked against Lightning 2.6.6 and torchdata 0.11):

* **The epoch.** The fit loop creates the restored iterator (and the fast-forward) before it
  calls ``set_epoch``, so the resumed epoch was cut from epoch 0's order. :class:`TrainSamplers`
  sets the epoch first.
* **The inner sampler's generator.** A fresh inner sampler starts from its first epoch's
  generator state, so the resumed epoch and every later one drew another order.
  :class:`TrainSamplers` records the generator's state right before each draw and saves it
  with every checkpoint (each rank its own). On resume, every draw until training starts
  begins from that state: building a restored iterator draws several times (torchdata
  re-creates the sampler iterator while it loads the state), and the order it keeps must be
  the one the saved position counts in.

A checkpoint taken at the last batch of an epoch (an emergency stop there, or a periodic save
that lands there) resumes into the next epoch: the fit loop counts the saved epoch as done.
Two more things went wrong there, with one process too:

* **No batch in that epoch.** The fit loop builds the train iterator once, from the restored
  state, and does not build another for an epoch it resumes into. torchdata's restored
  iterator goes on with the epoch it was saved in, which has no batch left, so the next epoch
  trained nothing and the run ended early with exit code 0. With a plain ``DataLoader`` its
  order was drawn from other random streams. :class:`TrainSamplers` builds the iterator
  again at that epoch's start, after ``set_epoch`` and after the random streams are back, as
  Lightning does at every epoch start: the inner generator (or torchdata's sampler
  generator) stands where the saved epoch's draw left it, so the order is the uninterrupted
  run's. ``ResumableDataLoader`` saves the next epoch's start itself (its
  iterator is no torch ``DataLoader`` iterator) and is left alone.
* **The epoch's start.** The fit loop skipped the epoch's ``on_train_epoch_start`` and its
  progress counters, so a checkpoint later in that epoch looked like an ended epoch: the next
  resume began the epoch again (any loader). The loop's restart stage is cleared first.

No Lightning import: either package drives it. The hook points are the fit loop's
``_load_combined_loader_states``, which runs after the train dataloaders are built and right
before their iterator is created, and its ``on_advance_start`` (an epoch's start).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["TrainSamplers"]

log = logging.getLogger("spotguard.trainer_hooks")


def _samplers(dataloader: Any) -> Iterator[Any]:
    """The loader's sampler and its batch sampler's sampler, once each (as Lightning's
    ``_set_sampler_epoch`` finds them)."""
    batch_sampler = getattr(dataloader, "batch_sampler", None)
    found = (getattr(dataloader, "sampler", None), getattr(batch_sampler, "sampler", None))
    yield from {id(s): s for s in found if s is not None}.values()


def _drawn_order(dataloader: Any) -> tuple[Any, torch.Generator] | None:
    """Lightning's ``DistributedSamplerWrapper`` in the loader, as (the dataset that draws the
    inner order, the inner sampler's generator); ``None`` when there is none."""
    for sampler in _samplers(dataloader):
        dataset = getattr(sampler, "dataset", None)
        generator = getattr(getattr(dataset, "_sampler", None), "generator", None)
        if isinstance(generator, torch.Generator) and callable(getattr(dataset, "reset", None)):
            return dataset, generator
    return None


def _passes(combined_loader: Any) -> bool:
    """Whether the combined loader iterates a torch ``DataLoader`` iterator: one pass over
    its epoch (restored by torchdata: the rest of the epoch it was saved in)."""
    from torch.utils.data.dataloader import _BaseDataLoaderIter

    iterators = getattr(getattr(combined_loader, "_iterator", None), "iterators", [])
    return any(isinstance(it, _BaseDataLoaderIter) for it in iterators)


class TrainSamplers:
    """The epoch and generator states of the train samplers, for one ``fit``."""

    def __init__(self) -> None:
        #: Per train dataloader: its inner generator's state before its latest draw.
        self._before_draw: list[torch.Tensor | None] = []
        #: The states to put back (from the checkpoint resumed), until the loaders exist.
        self._to_restore: list[torch.Tensor | None] = []
        #: Per train dataloader: the state every draw starts from until training starts.
        self._pinned: dict[int, torch.Tensor] = {}

    def state(self) -> list[torch.Tensor | None]:
        """What a checkpoint saves: the states the current orders were drawn from."""
        return list(self._before_draw)

    def restore_later(self, states: list[torch.Tensor | None] | None) -> None:
        """Put ``states`` back when the fit loop builds the train iterator."""
        self._to_restore = list(states or [])

    def training_started(self) -> None:
        """The restored iterators exist: later draws are new epochs, drawn as they come."""
        self._pinned.clear()

    def install(self, fit_loop: Any) -> Callable[[], None]:
        """Hook the fit loop's train-data set-up and its epoch start; returns the undo."""
        load_states = fit_loop._load_combined_loader_states
        start_epoch = fit_loop.on_advance_start
        #: The epoch the restored loop state was saved in (``None``: nothing restored).
        restored_epoch: int | None = None

        def prepare_then_load() -> None:
            nonlocal restored_epoch
            loader = fit_loop._combined_loader
            epoch = fit_loop.epoch_progress.current.processed
            if loader is not None:
                self._prepare(loader.flattened, epoch)
            if fit_loop.restarting:
                restored_epoch = epoch
            load_states()

        def start_epoch_after_restore() -> None:
            nonlocal restored_epoch
            saved, restored_epoch = restored_epoch, None
            moved_on = saved is not None and fit_loop.epoch_progress.current.processed > saved
            if moved_on:  # the saved epoch ended at the checkpoint: this one starts afresh
                fit_loop.reset_restart_stage()
                log.warning(
                    "resumed at the end of epoch %d: Lightning does not run that epoch's "
                    "end (on_train_epoch_end hooks, a ReduceLROnPlateau stepped there): what "
                    "they keep may differ from an uninterrupted run", saved,
                )  # fmt: skip
            start_epoch()
            if moved_on and _passes(fit_loop._combined_loader):
                iter(fit_loop._data_fetcher)  # as at the start of every epoch not resumed

        fit_loop._load_combined_loader_states = prepare_then_load
        fit_loop.on_advance_start = start_epoch_after_restore

        def undo() -> None:
            vars(fit_loop).pop("_load_combined_loader_states", None)
            vars(fit_loop).pop("on_advance_start", None)

        return undo

    def _prepare(self, dataloaders: list[Any], epoch: int) -> None:
        restore, self._to_restore = self._to_restore, []
        self._before_draw = [None] * len(dataloaders)
        for index, dataloader in enumerate(dataloaders):
            for sampler in _samplers(dataloader):
                if callable(getattr(sampler, "set_epoch", None)):
                    sampler.set_epoch(epoch)
            found = _drawn_order(dataloader)
            if found is None:
                continue
            dataset, generator = found
            state = restore[index] if index < len(restore) else None
            if state is not None:
                self._pinned[index] = state
            self._record_draws(dataset, generator, index)

    def _record_draws(self, dataset: Any, generator: torch.Generator, index: int) -> None:
        draw = dataset.reset

        def record_then_draw() -> None:
            if index in self._pinned:
                generator.set_state(self._pinned[index])
            self._before_draw[index] = generator.get_state()
            draw()

        dataset.reset = record_then_draw
