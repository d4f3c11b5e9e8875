"""ResumableDataLoader resumed at another world size: the rest of the epoch is shared out.

Ranks are given by hand (``rank``, ``world``) without a process group: the loader's sharding
is all that is under test, in this process, with the real sampler and DataLoader.
"""

from __future__ import annotations

import pytest
import torch

from spotguard.trainer_hooks import ResumableDataLoader

LENGTH, BATCH, SEED, TAKEN = 23, 2, 5, 3  # TAKEN batches per rank before the save


def placed(rank: int, world: int) -> ResumableDataLoader:
    """A loader that shards as ``rank`` of ``world`` would under torch.distributed."""
    data = ResumableDataLoader(torch.arange(LENGTH), batch_size=BATCH, shuffle=True, seed=SEED)
    data._resumable._replicas = lambda: (rank, world)  # type: ignore[method-assign]
    return data


def order() -> list[int]:
    """Epoch 0's order: what DistributedSampler-style sharding deals out."""
    return torch.randperm(LENGTH, generator=torch.Generator().manual_seed(SEED)).tolist()


@pytest.mark.parametrize(("before", "after"), [(2, 3), (3, 2), (2, 1), (1, 2)])
def test_a_resume_at_another_world_size_sees_each_sample_of_the_epoch_once(before, after):
    consumed: list[int] = []
    saved = []
    for rank in range(before):
        data = placed(rank, before)
        batches = iter(data)
        for _ in range(TAKEN):
            consumed += next(batches).tolist()
        saved.append(data.state_dict())
    assert [state["world_size"] for state in saved] == [before] * before
    seen = TAKEN * BATCH * before  # the ranks' batches interleave: a prefix of the order
    assert sorted(consumed) == sorted(order()[:seen])

    resumed: list[int] = []
    lengths = []
    for rank in range(after):
        data = placed(rank, after)
        data.load_state_dict(saved[rank % before])  # any rank's state: the same position
        lengths.append(len(data))
        resumed += [index for batch in data for index in batch.tolist()]
    rest = order()[seen:]
    padding = -len(rest) % after  # every rank as many samples: the rest wraps, as at the start
    assert sorted(resumed) == sorted(rest + rest[:padding])
    assert lengths == [-(-(len(rest) + padding) // after // BATCH)] * after
    # Saved again mid-way and resumed at the first world size: the position still adds up.
    data = placed(0, after)
    data.load_state_dict(saved[0])
    next(iter(data))
    again = placed(0, before)
    again.load_state_dict(data.state_dict())
    assert again._start == seen + BATCH * after


def test_a_state_without_a_world_size_resumes_at_the_world_size_of_now():
    """An older spotguard's state: its batches count at the world size of the resumed run."""
    whole = [batch.tolist() for batch in placed(1, 2)]
    data = placed(1, 2)
    data.load_state_dict({"epoch": 0, "batches_consumed": TAKEN, "seed": SEED})
    assert [batch.tolist() for batch in data] == whole[TAKEN:]
