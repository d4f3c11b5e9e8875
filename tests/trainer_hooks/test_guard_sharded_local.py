"""SpotGuard's sharded (dcp) path in this process, world size 1 (no process group: DCP runs
alone): what the rank count does not change. Plain values, optimizers saved before their
first step, a newest checkpoint with a shard missing, the first save's read-back, the commit
guard of an abandoned save, which module names an optimizer's state, which rank's error
DCP's gathered failure becomes, the background saves' group timeout, how long ``finish``
waits behind a save, and a DTensor buffer choosing the sharded format. The multi-rank cases
are in ``test_guard_sharded``."""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint.api import CheckpointException

from spotguard.errors import (
    CheckpointError,
    ConfigError,
    CorruptCheckpoint,
    StoreError,
    UploadFailed,
)
from spotguard.protocol import MANIFEST_NAME, step_dir
from spotguard.trainer_hooks import CheckpointStore, ResumableDataLoader, SpotGuard
from spotguard.trainer_hooks.backends import MemoryBackend
from spotguard.trainer_hooks.manifest import QUARANTINE_NAME
from tests.trainer_hooks.test_dcp_store import assert_same, shards

OWN = re.compile(r"rank-0-[0-9a-f]{12}\.pt")


@pytest.fixture(autouse=True)
def no_agent(tmp_path, monkeypatch):
    monkeypatch.setenv("SPOTGUARD_STATE_DIR", str(tmp_path / "no-agent"))


def build(weight_decay: float = 0.1) -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    optim = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=weight_decay)
    return {"model": model, "optim": optim}


def train(state: dict[str, Any], steps: range) -> None:
    for done in steps:
        batch = torch.Generator().manual_seed(done)
        x, y = torch.randn(3, 4, generator=batch), torch.randn(3, 2, generator=batch)
        (state["model"](x) - y).square().mean().backward()
        state["optim"].step()
        state["optim"].zero_grad()


def dcp(uri: str, **options: Any) -> SpotGuard:
    return SpotGuard(uri, checkpoint_format="dcp", save_niceness=0, **options)


def plain(state: dict[str, Any], stats: dict[str, float]) -> dict[str, Any]:
    """Entries that are neither modules nor optimizers."""
    return {
        "stats": stats,
        "best": None,
        "table": torch.zeros(2),
        "sched": torch.optim.lr_scheduler.StepLR(state["optim"], step_size=2),
        "data": ResumableDataLoader(torch.arange(10), batch_size=2, shuffle=True),
    }


def test_plain_values_come_back_whole_whatever_the_live_state_looks_like(tmp_path):
    """Plain values are rank 0's, saved whole in its own file: a dict that gained keys, a
    None that became a dict, a tensor of another size, a scheduler and a loader (their
    state_dict()) all come back as saved, never fitted into the live state's shape."""
    uri = str(tmp_path / "store")
    state = build()
    state |= plain(state, {})
    with dcp(uri) as guard:
        guard.restore(state)
        batches = iter(state["data"])
        for done in range(1, 4):
            train(state, range(done, done + 1))
            state["sched"].step()
            next(batches)
            state["stats"][f"loss{done}"] = done / 10
        state["best"], state["table"] = {"step": 3}, torch.arange(5.0)
        guard.finish(3, state)
    manifest = CheckpointStore(uri).get(3)
    assert [name for name in manifest.files if OWN.fullmatch(name)]  # rank-0-<save id>.pt
    assert not [name for name in manifest.files if name.startswith("rank-0.")]

    fresh = build()
    fresh |= plain(fresh, {"stale": 1.0})
    with dcp(uri) as guard:
        assert guard.restore(fresh) == 3
    assert fresh["stats"] == {"loss1": 0.1, "loss2": 0.2, "loss3": 0.3}
    assert fresh["best"] == {"step": 3}
    assert torch.equal(fresh["table"], torch.arange(5.0))
    assert fresh["sched"].state_dict() == state["sched"].state_dict()
    assert fresh["data"].state_dict() == state["data"].state_dict()
    assert fresh["optim"].param_groups[0]["lr"] == state["optim"].param_groups[0]["lr"]
    assert_same(state["model"].state_dict(), fresh["model"].state_dict())


def test_a_save_before_the_first_step_leaves_the_optimizer_fresh_and_resumes_bit_exact(tmp_path):
    """torch's get_optimizer_state_dict makes state by a step with lr=0 (AdamW: step 1, and
    moments from the weight decay): the save must not change the live optimizer, and the
    resumed run must be the uninterrupted one, bit for bit."""
    whole = build()
    train(whole, range(1, 6))

    uri = str(tmp_path / "store")
    first = build()
    with dcp(uri) as guard:
        guard.restore(first)
        guard.finish(0, first)  # before any optimizer.step()
    assert first["optim"].state == {}
    resumed = build()
    with dcp(uri) as guard:
        assert guard.restore(resumed) == 0
        assert resumed["optim"].state == {}
        train(resumed, range(1, 6))
        guard.finish(5, resumed)
    assert_same(whole["model"].state_dict(), resumed["model"].state_dict())
    assert_same(whole["optim"].state_dict(), resumed["optim"].state_dict())


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_newest_checkpoint_missing_a_shard_is_quarantined_and_the_run_goes_on(tmp_path, damage):
    """Skipped and left in place, it would make the next save of its step a WriterConflict
    ("committed already") at every restart."""
    uri = str(tmp_path / "store")
    state = build()
    with dcp(uri, every_n_steps=4) as guard:
        guard.restore(state)
        for done in range(1, 9):
            train(state, range(done, done + 1))
            guard.step(done, state)
            guard._core.wait()
        guard.finish(8, state)
    folder = Path(uri) / step_dir(8)
    shard = folder / shards(CheckpointStore(uri).get(8).files)[0]
    if damage == "missing":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[:-7])
    state = build()
    with dcp(uri, every_n_steps=4) as guard:
        assert guard.restore(state) == 4
        assert (folder / QUARANTINE_NAME).exists()
        assert "manifest says" in CheckpointStore(uri).quarantined()[0].reason
        for done in range(5, 10):
            train(state, range(done, done + 1))
            guard.step(done, state)
            guard._core.wait()
        guard.finish(9, state)
    assert [m.step for m in CheckpointStore(uri).list()] == [4, 8, 9]


class _Mangling(MemoryBackend):
    """Keeps other bytes than were sent for the files named ``match`` (what some S3-compatible
    servers did with botocore's checksums)."""

    def __init__(self, match: str) -> None:
        super().__init__()
        self.match = match

    def write(self, key: str, produce: Any, size_hint: int | None = None) -> None:
        super().write(key, produce, size_hint)
        if re.search(self.match, key):
            data = bytearray(self.objects[key])
            data[len(data) // 2] ^= 0xFF
            self.objects[key] = bytes(data)


@pytest.mark.parametrize("match", [r"__0_\w+\.distcp$", r"rank-0-\w+\.pt$"])
def test_the_first_sharded_save_reads_back_every_file_before_its_commit(match):
    from spotguard.trainer_hooks._internals.dcp_store import save_sharded

    store = CheckpointStore(_Mangling(match))
    state = {"w": torch.arange(64.0)}
    own = ("rank-0", lambda handle: torch.save({"r": 0}, handle))
    with pytest.raises(CorruptCheckpoint, match=r"reads back .* the store keeps other bytes"):
        save_sharded(store, 1, state, own_file=own, read_back=True)
    assert store.list() == []
    save_sharded(store, 2, state, own_file=own)  # unread: committed, as later saves are
    assert [m.step for m in store.list()] == [2]


def test_spotguard_reads_back_its_first_periodic_sharded_save_only(tmp_path):
    uri = str(tmp_path / "store")
    state = build()
    read: list[tuple[int, str]] = []
    with dcp(uri, every_n_steps=2) as guard:
        guard.restore(state)
        store = guard._core.saver.store
        original = store.read_back_payload

        def spy(step: int, name: str, entry: Any) -> None:
            read.append((step, name))
            original(step, name, entry)

        store.read_back_payload = spy  # type: ignore[method-assign]
        for done in range(1, 5):
            train(state, range(done, done + 1))
            guard.step(done, state)
            guard._core.wait()
        guard.finish(4, state)
    files = CheckpointStore(uri).get(2).files
    assert sorted(read) == sorted((2, name) for name in files)


def test_a_save_that_may_not_commit_fails_with_nothing_committed():
    from spotguard.trainer_hooks._internals.dcp_store import save_sharded

    store = CheckpointStore(MemoryBackend())
    with pytest.raises(CheckpointError, match="step 3: save abandoned before its commit"):
        save_sharded(store, 3, {"w": torch.ones(2)}, may_commit=lambda: False)
    assert store.list() == []
    assert not [key for key in store._backend.objects if key.endswith(MANIFEST_NAME)]


def test_an_optimizer_is_keyed_by_a_module_holding_all_its_parameters():
    from spotguard.trainer_hooks._internals.sharded_state import sharded_state_dict

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    optim = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(2, 3)).sum().backward()
    optim.step()
    built = sharded_state_dict({"first": model[0], "model": model, "optim": optim})
    assert sorted(built["optim"]["state"]) == ["0.bias", "0.weight", "1.bias", "1.weight"]

    encoder, decoder = torch.nn.Linear(3, 3), torch.nn.Linear(3, 2)
    both = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=0.1)
    decoder(encoder(torch.randn(2, 3))).sum().backward()
    both.step()
    with pytest.raises(ConfigError, match=r"state\['optim'\] optimizes parameters that no "
                       r"single module.*nn\.ModuleDict"):  # fmt: skip
        sharded_state_dict({"enc": encoder, "dec": decoder, "optim": both})


def test_a_corrupt_file_on_any_rank_wins_over_a_lower_ranks_other_error():
    """Rank 0's transient StoreError must not hide rank 1's CorruptCheckpoint: the caller
    quarantines or falls back on the latter only."""
    from spotguard.trainer_hooks._internals.dcp_store import _as_spotguard_error

    failures: Any = {0: (StoreError("throttled"), None), 1: (CorruptCheckpoint("bad"), None)}
    error = _as_spotguard_error(
        CheckpointException("x", failures), "loading step 4", CheckpointError
    )
    assert isinstance(error, CorruptCheckpoint)
    assert str(error) == "loading step 4 failed on rank 1: bad (rank 0 failed too)"


def test_waiting_for_a_stuck_sharded_save_is_bounded(tmp_path):
    """finish and close wait for the save thread: never past the save group's timeout and a
    minute (here shortened); the save is then abandoned and reported."""
    from spotguard.trainer_hooks._internals.saver import Saver

    guard = dcp(str(tmp_path / "store"))
    saver: Saver = guard._core.saver
    release = threading.Event()
    saver._worker = threading.Thread(target=release.wait, daemon=True)
    saver._worker.start()
    saver.wait_limit = 0.2
    try:
        assert saver.wait() is False
        with pytest.raises(UploadFailed, match="still running after 0 s"):
            saver.raise_if_failed()
        assert saver._abandoned
    finally:
        release.set()


def test_the_background_saves_group_outlives_a_short_job_timeout(tmp_path):
    """It carries save traffic only: a slow rank's upload must not time it out as the job's
    collectives would (NCCL's default is 10 minutes)."""
    from datetime import timedelta

    import torch.distributed as dist

    from spotguard.trainer_hooks._internals.ranks import SAVE_GROUP_TIMEOUT, Ranks

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0,
                            world_size=1, timeout=timedelta(seconds=30))  # fmt: skip
    try:
        group, timeout = Ranks().new_save_group()
        assert timeout == SAVE_GROUP_TIMEOUT == timedelta(minutes=60)
        assert group._get_backend(torch.device("cpu")).options._timeout == timeout
    finally:
        dist.destroy_process_group()


def test_a_module_whose_only_dtensor_is_a_buffer_is_saved_sharded(tmp_path):
    """Rank 0's whole-state file would hold rank 0's shard of a sharded buffer, and every rank
    would load it back: such a module takes the sharded path, and format ``torch`` is refused."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from spotguard.trainer_hooks._internals.ranks import Ranks
    from spotguard.trainer_hooks._internals.sharded_state import choose_format

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0,
                            world_size=1)  # fmt: skip
    try:
        model = torch.nn.Linear(4, 2)
        mesh = init_device_mesh("cpu", (1,))
        model.register_buffer("table", distribute_tensor(torch.zeros(4), mesh, [Shard(0)]))
        state = {"model": model}
        assert choose_format("auto", state, Ranks()) == "dcp"
        with pytest.raises(ConfigError, match=r"checkpoint_format='torch' cannot save DTensor"):
            choose_format("torch", state, Ranks())
    finally:
        dist.destroy_process_group()
