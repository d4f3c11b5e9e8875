"""Snapshot buffers: a copy that does not fit in memory, buffers sized to the state.

Memory is made scarce through the ``available`` seam of the Saver/Snapshotter; the store,
its files and the read-back are real.
"""

from __future__ import annotations

import logging

import psutil
import pytest
import torch

from spotguard.trainer_hooks import CheckpointStore
from spotguard.trainer_hooks._internals.ranks import Ranks
from spotguard.trainer_hooks._internals.saver import Saver
from spotguard.trainer_hooks._internals.snapshot import (
    PAGE,
    NoRoomForCopy,
    Snapshotter,
    available_memory,
    page_aligned,
)
from spotguard.trainer_hooks.settings import GuardSettings

MiB = 2**20


def state_tree() -> dict:
    torch.manual_seed(3)
    return {
        "state": {"model": {"weight": torch.randn(1024, 1024), "bias": torch.randn(7)}},
        "__spotguard__": {"step": 5, "epoch": 0},
    }


def test_a_copy_that_does_not_fit_is_saved_in_the_foreground(tmp_path, caplog):
    uri = str(tmp_path / "store")
    tree = state_tree()  # 4 MiB of tensors; 1 MiB "available"
    saver = Saver(GuardSettings(uri=uri, every_n_steps=5), CheckpointStore(uri), Ranks(),
                  available=lambda: MiB)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="spotguard.trainer_hooks"):
        saver.save_async(5, 0, tree)
    assert not saver.saving  # no upload thread: the save is done when save_async returns
    manifest, loaded = CheckpointStore(uri).resume()
    assert (manifest.step, manifest.kind) == (5, "periodic")
    assert torch.equal(loaded["state"]["model"]["weight"], tree["state"]["model"]["weight"])
    assert torch.equal(loaded["state"]["model"]["bias"], tree["state"]["model"]["bias"])
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "needs 4 MiB more host memory and 1 MiB can be used" in warning
    assert "saving step 5 in the foreground" in warning
    assert saver.failure is None


def test_a_copy_that_fits_is_uploaded_in_the_background(tmp_path, caplog):
    uri = str(tmp_path / "store")
    tree = state_tree()
    saver = Saver(GuardSettings(uri=uri, every_n_steps=5), CheckpointStore(uri), Ranks(),
                  available=lambda: 64 * MiB)  # fmt: skip
    saver.save_async(5, 0, tree)
    tree["state"]["model"]["weight"].zero_()  # training goes on: the copy is what is saved
    assert saver.wait(30)
    _, loaded = CheckpointStore(uri).resume()
    assert torch.equal(loaded["state"]["model"]["weight"], state_tree()["state"]["model"]["weight"])
    assert "foreground" not in caplog.text


def test_buffers_already_held_count_as_free():
    free = [64 * MiB]
    snapshots = Snapshotter(available=lambda: free[0])
    tree = state_tree()
    first = snapshots.copy(tree)
    free[0] = 0  # nothing left: the same buffers are reused, so nothing is needed
    tree["state"]["model"]["weight"].add_(1)
    second = snapshots.copy(tree)
    assert (
        second["state"]["model"]["weight"].data_ptr()
        == first["state"]["model"]["weight"].data_ptr()
    )
    assert torch.equal(second["state"]["model"]["weight"], tree["state"]["model"]["weight"])
    tree["state"]["model"]["bias"] = torch.randn(2 * MiB)  # changed shape: 8 MiB to allocate
    with pytest.raises(NoRoomForCopy, match="needs 8 MiB more host memory and 0 MiB"):
        snapshots.copy(tree)


def test_buffers_hold_the_state_and_no_more():
    tree = {"odd": torch.randn(3 * MiB // 4 + 3), "half": torch.zeros(1001, dtype=torch.float16)}
    copied = Snapshotter().copy(tree)
    for name, source in tree.items():
        storage = copied[name].untyped_storage().nbytes()
        assert storage == source.numel() * source.element_size(), name


@pytest.mark.parametrize("count", [1, PAGE // 8 - 1, PAGE // 8, 3 * PAGE // 8 + 1, MiB // 8 + 3])
def test_page_aligned_buffers_own_their_pages_without_rounding(count):
    """What is page-locked for a GPU tensor: its own pages, under two pages more than it."""
    buffer, pages = page_aligned(torch.Size([count]), torch.float64)
    nbytes = count * 8
    assert buffer.data_ptr() % PAGE == 0
    assert pages.data_ptr() == buffer.data_ptr()
    assert pages.numel() % PAGE == 0
    assert nbytes <= pages.numel() < nbytes + PAGE
    assert buffer.untyped_storage().nbytes() <= nbytes + 2 * PAGE
    buffer.fill_(1.5)
    assert float(buffer.sum()) == 1.5 * count


@pytest.mark.parametrize(
    ("membership", "root", "files"),
    [
        ("0::/system.slice/job.service\n", "", ("memory.max", "memory.current", "inactive_file")),
        (
            "9:memory:/docker/abc\n8:pids:/docker/abc\n1:name=systemd:/docker/abc\n",
            "memory",
            ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
        ),
    ],
    ids=["cgroup-v2", "cgroup-v1"],
)
def test_a_cgroup_limit_above_this_process_bounds_the_available_memory(
    tmp_path, membership, root, files
):
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(membership)
    mount = tmp_path / "cgroup"
    group = membership.split("\n")[0].split(":", 2)[2]
    top, leaf = mount / root, mount / root / group.lstrip("/")
    leaf.mkdir(parents=True)
    limit, usage, inactive = files
    (top / limit).write_text(f"{1024 * MiB}\n")  # the topmost group has the limit
    (top / usage).write_text(f"{900 * MiB}\n")
    (top / "memory.stat").write_text(f"anon 1\n{inactive} {100 * MiB}\n")
    (leaf / limit).write_text("max\n" if root == "" else f"{2**63 - 4096}\n")
    (leaf / usage).write_text(f"{10 * MiB}\n")
    (leaf / "memory.stat").write_text(f"{inactive} 0\n")
    assert available_memory(cgroup_root=mount, membership=proc) == 224 * MiB
    assert 0 < available_memory() <= psutil.virtual_memory().total


def test_a_dtensor_is_staged_as_a_private_copy_of_its_shard_in_its_layout(tmp_path):
    """The sharded path's staging: each DTensor's local shard copied into a buffer reused from
    one save to the next, rewrapped with the source's mesh and placements; what training
    writes afterwards does not reach the copy; the memory check counts the shard's bytes."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0,
                            world_size=1)  # fmt: skip
    try:
        mesh = init_device_mesh("cpu", (1,))
        weight = distribute_tensor(torch.randn(256, 1024), mesh, [Shard(0)])  # 1 MiB
        tree = {"model": {"weight": weight}, "step": 4}
        snapshots = Snapshotter(available=lambda: 2 * MiB)
        first = snapshots.copy(tree)
        staged = first["model"]["weight"]
        assert isinstance(staged, DTensor)
        assert first["step"] == 4
        assert staged.placements == weight.placements
        assert staged.device_mesh == mesh
        assert staged.shape == weight.shape
        assert not staged.requires_grad
        expected = weight.to_local().clone()
        with torch.no_grad():
            weight.to_local().add_(1)  # training goes on
        assert torch.equal(staged.to_local(), expected)
        second = snapshots.copy(tree)["model"]["weight"]
        assert second.to_local().data_ptr() == staged.to_local().data_ptr()  # reused
        assert torch.equal(second.to_local(), weight.to_local())
        grown = {"weight": distribute_tensor(torch.randn(1024, 1024), mesh, [Shard(0)])}
        with pytest.raises(NoRoomForCopy, match="needs 4 MiB more host memory"):
            snapshots.copy(grown)
    finally:
        dist.destroy_process_group()
