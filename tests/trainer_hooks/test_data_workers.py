"""ResumableDataLoader with real worker processes: random augmentation resumes bit-exact.

The dataset draws from torch, ``random`` and NumPy inside ``__getitem__``, in the loader's
worker processes: what a resumed run sees must be exactly what the uninterrupted run saw,
through SpotGuard's real save and restore, and two ranks must not draw the same numbers.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import torch
from torch.utils.data import Dataset, get_worker_info

from spotguard.errors import ConfigError
from spotguard.trainer_hooks import Preempted, ResumableDataLoader, SpotGuard
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
LENGTH, BATCH = 24, 4  # 6 batches an epoch


class Augmented(Dataset[torch.Tensor]):
    """Sample ``index``, the worker's base seed (what ``worker_init_fn`` would seed from; -1
    without workers) and three random "augmentations": torch, python and NumPy draws."""

    def __len__(self) -> int:
        return LENGTH

    def __getitem__(self, index: int) -> torch.Tensor:
        worker = get_worker_info()
        base = -1 if worker is None else (worker.seed - worker.id) % 2**52  # exact in a double
        draws = [torch.rand(()).item(), random.random(), float(numpy.random.rand())]
        return torch.tensor([float(index), float(base), *draws], dtype=torch.float64)


def loader(seed: int = 3, num_workers: int = 2) -> ResumableDataLoader:
    return ResumableDataLoader(
        Augmented(), batch_size=BATCH, shuffle=True, seed=seed, num_workers=num_workers
    )


def batches(epochs: int, **options: int) -> list[list[list[float]]]:
    data = loader(**options)
    return [batch.tolist() for _ in range(epochs) for batch in data]


@pytest.mark.parametrize("stop_at", [3, 9])  # mid-epoch 0, and mid-epoch 1 (odd: worker 1)
def test_worker_augmentation_resumes_bit_exact_through_spotguard(tmp_path, stop_at):
    reference = batches(epochs=3)
    uri = str(tmp_path / "store")
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)
    seen: list[list[list[float]]] = []
    try:
        state = {"data": loader()}
        guard = SpotGuard(uri, state_dir="/nonexistent")
        assert guard.restore(state) == 0

        def train() -> None:
            step = 0
            for _ in range(3):
                for batch in state["data"]:
                    seen.append(batch.tolist())
                    step += 1
                    if step == stop_at:
                        os.kill(os.getpid(), signal.SIGUSR1)
                    guard.step(step, state)

        with pytest.raises(Preempted):
            train()
        resumed = {"data": loader()}
        with SpotGuard(uri, state_dir="/nonexistent") as again:
            step = again.restore(resumed)
            assert step == stop_at
            while step < 3 * len(resumed["data"]):
                for batch in resumed["data"]:
                    seen.append(batch.tolist())
                    step += 1
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert seen == reference


def test_augmentation_is_random_per_sample_and_per_epoch():
    """The seeding must not make every sample (or every epoch) draw the same numbers."""
    both = batches(epochs=2)
    first, second = both[:6], both[6:]
    draws = [row[2] for batch in first for row in batch]
    assert len(set(draws)) == LENGTH
    by_index = {row[0]: row[2:] for batch in first for row in batch}
    assert all(by_index[row[0]] != row[2:] for batch in second for row in batch)


def test_spawned_workers_draw_what_forked_ones_draw():
    """The seeds travel with the batches: workers started fresh (the dataset wrapper pickled
    into them) draw exactly what forked ones draw, and the caller's dataset stays reachable."""
    spawned = ResumableDataLoader(
        Augmented(), batch_size=BATCH, shuffle=True, seed=3, num_workers=2,
        multiprocessing_context="spawn",
    )  # fmt: skip
    assert isinstance(spawned.dataset.dataset, Augmented)
    assert len(spawned.dataset) == LENGTH
    assert [batch.tolist() for batch in spawned] == batches(epochs=1)


def rank_main(seed: int) -> None:
    """One rank of a 2-rank gloo job: print its draws and whether a mid-epoch resume of its
    own shard is exact (run by :func:`test_ranks_draw_different_numbers_and_resume_exactly`)."""
    torch.distributed.init_process_group("gloo")
    data = loader(seed)
    full, state = [], {}
    for epoch in range(2):
        for position, batch in enumerate(data):
            full.append(batch.tolist())
            if epoch == 1 and position == 0:
                state = data.state_dict()
    resumed = loader(seed)
    resumed.load_state_dict(state)
    tail = [batch.tolist() for batch in resumed]
    bases = sorted({row[1] for batch in full for row in batch})
    draws = [row[2:] for batch in full for row in batch]
    exact = tail == full[-len(tail) :]
    print(json.dumps({"bases": bases, "draws": draws, "resumed_exactly": exact}))
    torch.distributed.destroy_process_group()


def test_ranks_draw_different_numbers_and_resume_exactly(tmp_path):
    code = "from tests.trainer_hooks.test_data_workers import rank_main; rank_main(3)"
    port = str(free_port())
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=REPO,
            stdout=subprocess.PIPE,
            env={
                **os.environ,
                "RANK": str(rank),
                "WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            },
        )
        for rank in (0, 1)
    ]
    outputs = [rank.communicate(timeout=120)[0] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0]
    first, second = (json.loads(output.splitlines()[-1]) for output in outputs)
    assert set(first["bases"]) & set(second["bases"]) == set()
    shared = {tuple(row) for row in first["draws"]} & {tuple(row) for row in second["draws"]}
    assert shared == set()
    assert first["resumed_exactly"]
    assert second["resumed_exactly"]


def test_state_from_before_worker_seeding_loads_with_a_warning(caplog):
    """A checkpoint of the previous version has the position but not the worker seeding: the
    order resumes exactly, the augmentation cannot, and the log says so."""
    reference = batches(epochs=2, num_workers=0)
    data = loader(num_workers=2)
    with caplog.at_level(logging.WARNING, logger="spotguard.trainer_hooks"):
        data.load_state_dict({"epoch": 1, "batches_consumed": 2, "seed": 3})
    assert "random augmentation in the loader's worker processes will differ" in caplog.text
    indices = [[row[0] for row in batch.tolist()] for batch in data]
    assert indices == [[row[0] for row in batch] for batch in reference[8:]]


def test_state_from_before_without_workers_loads_quietly(caplog):
    """Without worker processes the augmentation draws from the process's own RNG, which the
    checkpoint holds: nothing differs, so nothing to warn about."""
    with caplog.at_level(logging.WARNING, logger="spotguard.trainer_hooks"):
        loader(num_workers=0).load_state_dict({"epoch": 1, "batches_consumed": 2, "seed": 3})
    assert caplog.text == ""


def test_a_generator_of_the_callers_is_refused():
    with pytest.raises(ConfigError, match="seed="):
        ResumableDataLoader(Augmented(), batch_size=BATCH, generator=torch.Generator())
