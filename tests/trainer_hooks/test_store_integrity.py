"""The store never lies: failures surface, corrupt checkpoints are quarantined, no silent fresh
start, one writer per prefix, a mangling store is caught at the first save, saves are deferred
rather than dropped, and the emergency never waits past the deadline.

Real parts throughout: moto over HTTP behind the fault proxy, local directories, real training
processes and signals; the in-memory backend only where a request count is the point.
"""

from __future__ import annotations

import io
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from spotguard.errors import (
    Preempted,
    ResumeRefused,
    UnloadableCheckpoint,
    UploadFailed,
    WriterConflict,
)
from spotguard.trainer_hooks import CheckpointStore, SpotGuard, TransferSettings
from spotguard.trainer_hooks.backends import MemoryBackend
from tests.conftest import free_port
from tests.faulty_proxy import HOLD_LIMIT
from tests.support import wait_for
from tests.trainer_hooks.test_plain_resume import SCRIPT, steps_done, train

MiB = 2**20
IMPATIENT = TransferSettings(max_attempts=2)


def tiny_state(value: float = 0.0) -> dict:
    return {"weight": torch.full((16,), value), "data": {"n": 0}}


def run_steps(guard: SpotGuard, state: dict, steps: range, *, settle: bool = True) -> None:
    """Train ``steps``; with ``settle``, each save finishes before the next step (these steps
    take microseconds: without it every save would find the last one still running)."""
    for step in steps:
        state["weight"] += 1
        guard.step(step, state)
        if settle:
            guard._core.wait()


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


# -- every failure surfaces ----------------------------------------------------------------


def test_a_failed_commit_is_raised_at_the_next_step_and_at_exit(faulty_s3):
    bucket, proxy = faulty_s3
    proxy.on("PUT", "manifest.json", "deny")
    guard = SpotGuard(f"s3://{bucket}/run", every_n_steps=2, transfer=IMPATIENT,
                      state_dir="/nonexistent")  # fmt: skip
    state = tiny_state()
    guard.restore(state)
    run_steps(guard, state, range(1, 3))  # the save of step 2 uploads, then its commit fails
    guard._core.wait()
    assert guard._core.failed_saves == 1
    with pytest.raises(UploadFailed, match="access denied"):
        guard.step(3, state)
    guard.step(4, state)  # raised once; a new save is attempted and fails the same way
    guard._core.wait()
    with pytest.raises(UploadFailed, match="access denied"):
        guard.finish(4, state)
    assert CheckpointStore(f"s3://{bucket}/run").latest() is None


def test_when_rank_0s_commit_fails_every_rank_stops_with_that_error(faulty_s3, tmp_path):
    bucket, proxy = faulty_s3
    proxy.on("PUT", "manifest.json", "deny")
    port, logs = str(free_port()), [tmp_path / f"rank-{rank}.log" for rank in (0, 1)]
    ranks = []
    for rank, log in enumerate(logs):
        with log.open("w") as handle:
            ranks.append(subprocess.Popen(
                [sys.executable, str(SCRIPT), "--ddp", "--store", f"s3://{bucket}/ddp",
                 "--out", str(tmp_path / "out.pt"), "--every", "3"],
                env={**os.environ, "SPOTGUARD_STATE_DIR": str(tmp_path / "none"),
                     "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                     "MASTER_PORT": port},
                stderr=handle,
            ))  # fmt: skip
    codes = [rank.wait(120) for rank in ranks]  # no hang until the process-group timeout
    assert all(code not in (0, 75) for code in codes), codes
    for log in logs:  # the same error on both, not a peer that died
        assert "UploadFailed" in log.read_text(), log.read_text()[-2000:]
    assert "access denied" in logs[0].read_text()


def test_a_failure_and_a_stop_at_the_same_boundary_still_save_and_exit_75(faulty_s3):
    bucket, proxy = faulty_s3
    proxy.on("PUT", "ckpt-000000000002/manifest.json", "deny")  # the periodic commit fails
    guard = SpotGuard(f"s3://{bucket}/run", every_n_steps=2, transfer=IMPATIENT,
                      state_dir="/none")  # fmt: skip
    state = tiny_state()
    guard.restore(state)
    run_steps(guard, state, range(1, 3))
    assert guard._core.failed_saves == 1
    guard._core.request_stop("SIGUSR1")  # the notice arrives before the next boundary
    with pytest.raises(Preempted) as preempted:
        guard.step(3, state)
    assert (preempted.value.code, preempted.value.saved, preempted.value.step) == (75, True, 3)
    latest = CheckpointStore(f"s3://{bucket}/run").latest()
    assert (latest.step, latest.kind) == (3, "emergency")


# -- quarantine, retention, no silent fresh start ------------------------------------------


def test_retention_never_keeps_a_corrupt_checkpoint_over_good_ones(tmp_path):
    store_dir = tmp_path / "store"
    state = tiny_state()
    with SpotGuard(str(store_dir), every_n_steps=10, keep_last=2, state_dir="/none") as guard:
        run_steps(guard, state, range(1, 31))
        guard._core.wait()
    flip_last_byte(store_dir / "ckpt-000000000030" / "state.pt")  # same size, wrong bytes

    state = tiny_state()
    with SpotGuard(str(store_dir), every_n_steps=5, keep_last=1, state_dir="/none") as guard:
        assert guard.restore(state) == 20  # the newest that verifies
        run_steps(guard, state, range(21, 26))
        guard.finish(25, state)
    store = CheckpointStore(str(store_dir))
    assert [m.step for m in store.list()] == [25]  # retention kept the good one, not 30
    assert [q.step for q in store.quarantined()] == [30]
    assert "does not match" in store.quarantined()[0].reason
    assert {result.step: result.ok for result in store.verify()} == {25: True, 30: False}
    with SpotGuard(str(store_dir), state_dir="/none") as guard:
        assert guard.restore(tiny_state()) == 25


@pytest.mark.parametrize("damage", ["manifests", "payloads"])
def test_no_silent_fresh_start_when_nothing_verifies(tmp_path, damage, caplog):
    store_dir = tmp_path / "store"
    with SpotGuard(str(store_dir), every_n_steps=5, keep_last=None, state_dir="/none") as guard:
        state = tiny_state()
        run_steps(guard, state, range(1, 11))
        guard._core.wait()
    for folder in store_dir.glob("ckpt-*"):
        if damage == "manifests":
            (folder / "manifest.json").write_text('{"version": 2, "step": "mangled')
        else:
            flip_last_byte(folder / "state.pt")
    for _attempt in range(2):  # the same answer on every later launch too
        with (
            SpotGuard(str(store_dir), state_dir="/none") as guard,
            pytest.raises(ResumeRefused, match="none verifies") as refused,
        ):
            guard.restore(tiny_state())
        assert "step 10" in str(refused.value)
        assert "step 5" in str(refused.value)
        assert "allow_fresh_start" in str(refused.value)
    with (
        caplog.at_level(logging.ERROR),
        SpotGuard(str(store_dir), allow_fresh_start=True, state_dir="/none") as guard,
    ):
        assert guard.restore(tiny_state()) == 0
    assert "starting from step 0" in caplog.text


def test_an_empty_store_and_uncommitted_uploads_are_a_fresh_start(tmp_path):
    store = CheckpointStore(str(tmp_path / "store"))
    store.put(7, "state.pt", b"an upload that never committed")
    with SpotGuard(str(tmp_path / "store"), state_dir="/none") as guard:
        assert guard.restore(tiny_state()) == 0


def test_lightning_refuses_a_store_where_nothing_verifies(tmp_path):
    from lightning.pytorch import Trainer
    from lightning.pytorch.demos.boring_classes import BoringModel

    from spotguard.trainer_hooks.lightning import SpotCheckpoint

    store = CheckpointStore(str(tmp_path / "store"))
    store.save(4, {"state.pt": lambda handle: torch.save({"step": 4}, handle)})
    flip_last_byte(tmp_path / "store" / "ckpt-000000000004" / "state.pt")
    trainer = Trainer(
        max_steps=2, callbacks=[SpotCheckpoint(str(tmp_path / "store"), state_dir="/none")],
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
    )  # fmt: skip
    with pytest.raises(ResumeRefused, match="step 4"):
        trainer.fit(BoringModel())


def test_a_checkpoint_that_verifies_but_cannot_load_here_is_kept_and_not_skipped(tmp_path):
    """Not weights-only data (or no memory on this host): the bytes are as written, so the
    checkpoint is not quarantined, and resuming from an older one would lose its steps."""
    store = CheckpointStore(str(tmp_path / "store"))
    store.save(4, {"state.pt": lambda handle: torch.save({"step": 4}, handle)})
    store.save(8, {"state.pt": lambda handle: torch.save({"path": Path("/x")}, handle)})
    for _attempt in range(2):
        with (
            SpotGuard(str(tmp_path / "store"), state_dir="/none") as guard,
            pytest.raises(UnloadableCheckpoint, match=r"step 8.*add_safe_globals"),
        ):
            guard.restore(tiny_state())
    assert [m.step for m in store.list()] == [4, 8]
    assert store.quarantined() == []


# -- a store that keeps other bytes --------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "mangle", "quarantined"),
    [("state.pt", "append", []), ("state.pt", "flip", []), ("manifest.json", "append", [1])],
)
def test_a_store_that_keeps_other_bytes_is_caught_at_the_first_save(
    faulty_s3, target, mangle, quarantined
):
    """The payload read back in full (the first periodic save; a flipped byte keeps the size),
    the manifest and the sizes read back at every commit (a committed one is quarantined)."""
    bucket, proxy = faulty_s3
    proxy.on("PUT", target, mangle)
    guard = SpotGuard(f"s3://{bucket}/run", every_n_steps=1, state_dir="/none")
    state = tiny_state()
    guard.restore(state)
    run_steps(guard, state, range(1, 2))
    with pytest.raises(UploadFailed, match="AWS_REQUEST_CHECKSUM_CALCULATION=when_required"):
        guard.step(2, state)
    store = CheckpointStore(f"s3://{bucket}/run")
    assert store.latest() is None  # never counted as a checkpoint
    assert [q.step for q in store.quarantined()] == quarantined
    guard._core.wait()
    guard.close()


# -- one writer per prefix -----------------------------------------------------------------


@pytest.fixture(params=["local", "s3"])
def prefix(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    return f"s3://{request.getfixturevalue('s3')}/shared"


def test_two_writers_on_one_prefix_stop_instead_of_overwriting(prefix):
    first, second = CheckpointStore(prefix), CheckpointStore(prefix)
    first.save(10, {"state.pt": b"first's"})
    with pytest.raises(WriterConflict, match="two writers"):
        second.save(10, {"state.pt": b"second's"})  # the same step: created only if absent
    second_manifest = second.save(20, {"state.pt": b"second's newer"})
    with pytest.raises(WriterConflict, match=second.writer.host) as caught:
        first.save(15, {"state.pt": b"first's again"})
    assert f"pid {second.writer.pid}" in str(caught.value)
    assert [m.step for m in CheckpointStore(prefix).list()] == [10, 20]
    assert second_manifest.writer == second.writer
    second.save(15, {"state.pt": b"late but mine"})  # below one's own newest: not a conflict


def test_manifests_record_the_writer_and_where_the_run_resumed_from(tmp_path):
    store_dir = str(tmp_path / "store")
    with SpotGuard(store_dir, every_n_steps=5, state_dir="/none") as guard:
        state = tiny_state()
        run_steps(guard, state, range(1, 6))
        guard._core.wait()
    with SpotGuard(store_dir, every_n_steps=5, state_dir="/none") as guard:
        state = tiny_state()
        assert guard.restore(state) == 5
        run_steps(guard, state, range(6, 11))
        guard._core.wait()
    manifest = CheckpointStore(store_dir).latest()
    assert (manifest.step, manifest.resumed_from, manifest.world_size) == (10, 5, 1)
    assert manifest.writer.pid == os.getpid()
    assert CheckpointStore(store_dir).get(5).resumed_from is None


# -- deferred, not dropped -----------------------------------------------------------------


def test_a_save_due_during_an_upload_runs_at_the_first_boundary_after_it(faulty_s3):
    bucket, proxy = faulty_s3
    hold = proxy.on("PUT", "ckpt-000000000002/state.pt", "hold", count=1)
    guard = SpotGuard(f"s3://{bucket}/slow", every_n_steps=2, keep_last=None,
                      state_dir="/none")  # fmt: skip
    state = tiny_state()
    guard.restore(state)
    run_steps(guard, state, range(1, 3), settle=False)  # step 2's upload starts and is held
    wait_for(lambda: hold.hits, what="the upload of step 2 to reach the store")
    run_steps(guard, state, range(3, 5), settle=False)  # step 4 due while step 2 uploads
    assert guard._core.saver.deferred
    hold.release()
    guard._core.wait()
    run_steps(guard, state, range(5, 6))  # the first boundary after the upload: save now
    guard._core.wait()
    guard.close()
    assert [m.step for m in CheckpointStore(f"s3://{bucket}/slow").list()] == [2, 5]


# -- the emergency is bounded --------------------------------------------------------------


def test_an_emergency_during_a_throttled_upload_exits_75_before_the_deadline(faulty_s3, tmp_path):
    """The emergency commits, and the process exits 75, while step 10's upload is still held:
    a guard that waited for that upload (before its own save, or in close() after it) would
    run into the proxy's 60 s hold, past every bound here. The guard gives the upload half the
    time left, then saves in the other half: 20 s of budget leave a loaded machine 9.5 s for
    that save, not the 3.5 s of the 8 s this test had."""
    bucket, proxy = faulty_s3
    rule = proxy.on("PUT", "ckpt-000000000010/state.pt", "hold", count=1)
    progress = tmp_path / "progress"
    budget = 20.0
    assert budget + 10 < HOLD_LIMIT  # each bound below is one the held upload would break
    run = train(f"s3://{bucket}/throttled", tmp_path / "out.pt", "--every", "10",
                "--progress", str(progress), "--pause-at", "12", "--budget", str(budget),
                "--margin", "1", env={"SPOTGUARD_STATE_DIR": str(tmp_path / "none")})  # fmt: skip
    wait_for(lambda: steps_done(progress) >= 12 and rule.hits, timeout=120, what="step 12")
    signalled = time.monotonic()
    run.send_signal(signal.SIGUSR1)
    store = CheckpointStore(f"s3://{bucket}/throttled")
    try:
        # The guard's deadline is budget - margin after the signal: 5 s more to see its commit.
        wait_for(lambda: store.latest() is not None, timeout=budget + 5, what="the commit")
        assert run.wait(budget + 10) == 75  # the upload still held: nobody waited for it
        assert time.monotonic() - signalled < budget + 10, "the exit overran the deadline"
    finally:
        rule.release()
    assert [m.step for m in store.list()] == [12]  # its own step; the stuck upload never counts
    assert store.latest().kind == "emergency"


# -- what resume and a commit cost ---------------------------------------------------------


def test_resume_and_commit_cost_the_same_with_1000_checkpoints():
    backend = MemoryBackend()
    store = CheckpointStore(backend)
    for step in range(1, 1001):
        backend.objects[f"ckpt-{step:012d}/state.pt"] = b"x"
    store.save(1001, {"state.pt": lambda handle: torch.save({"step": 1001}, handle)})
    for step in range(1, 1001):  # committed by someone earlier: a manifest each
        backend.objects[f"ckpt-{step:012d}/manifest.json"] = backend.objects[
            "ckpt-000000001001/manifest.json"
        ].replace(b'"step": 1001', f'"step": {step}'.encode())
    backend.requests.clear()
    manifest, loaded = store.resume()
    assert (manifest.step, loaded["step"]) == (1001, 1001)
    assert backend.requests == {"directories": 1, "files": 1, "read_small": 1, "download": 1}
    backend.requests.clear()
    store.save(1002, {"state.pt": b"next"})
    assert backend.requests["read_small"] <= 3, backend.requests  # newest's + read-back
    backend.requests.clear()
    assert store.prune(3, newest_verified=1002) == list(range(1, 1000))
    assert backend.requests["read_small"] == 0, backend.requests


# -- restores of many ranges ---------------------------------------------------------------


def test_a_restore_of_more_ranges_than_s3transfers_window_completes(s3):
    """s3transfer 0.19 deadlocks an in-order download of more ranges than its in-memory
    window (10): with 64 MiB ranges, any checkpoint above 704 MiB never restored. 16 ranges
    of 1 MiB here; the thread must finish (a hang fails the test, it does not stall it)."""
    store = CheckpointStore(f"s3://{s3}/ranges", transfer=TransferSettings(download_part_size=MiB))
    payload = os.urandom(16 * MiB)
    store.save(1, {"blob.bin": payload})
    received = io.BytesIO()
    worker = threading.Thread(
        target=store.fetch, args=(store.latest(), "blob.bin", received), daemon=True
    )
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "the download hung"
    assert received.getvalue() == payload
