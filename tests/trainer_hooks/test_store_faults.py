"""S3 misbehaving between client and server, and processes killed mid-upload."""

from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from spotguard.trainer_hooks import (
    CheckpointStore,
    SpotGuard,
    StoreError,
    TransferSettings,
    UploadFailed,
)

MiB = 2**20
SMALL_PARTS = TransferSettings(part_size=5 * MiB, threads=2)
#: For failures meant to persist: give up after one retry instead of minutes of backoff.
IMPATIENT = TransferSettings(part_size=5 * MiB, threads=2, max_attempts=2)


def test_error_bursts_and_dropped_connections_are_retried(faulty_s3):
    bucket, proxy = faulty_s3
    store = CheckpointStore(f"s3://{bucket}/run", transfer=SMALL_PARTS)
    payload = os.urandom(11 * MiB)  # three parts
    proxy.fail(3, status=503)
    store.save(1, {"blob.bin": payload})
    proxy.drop(2)
    store.save(2, {"blob.bin": payload})
    assert proxy.faults == 5
    proxy.fail(2, status=500)
    sink = io.BytesIO()
    store.fetch(store.latest(), "blob.bin", sink)
    assert sink.getvalue() == payload
    assert [m.step for m in store.list()] == [1, 2]


def test_persistent_failure_fails_loudly_and_keeps_the_previous_checkpoint(faulty_s3):
    bucket, proxy = faulty_s3
    store = CheckpointStore(f"s3://{bucket}/run", transfer=IMPATIENT)
    store.save(1, {"blob.bin": b"good"})
    proxy.fail(-1, status=500)
    with pytest.raises(StoreError, match="failed") as caught:
        store.save(2, {"blob.bin": os.urandom(6 * MiB)})
    assert "\n" not in str(caught.value)
    proxy.heal()
    assert store.latest().step == 1


def test_background_failure_surfaces_at_the_next_save_and_at_exit(faulty_s3):
    bucket, proxy = faulty_s3
    model = torch.nn.Linear(4, 4)
    state = {"model": model}
    guard = SpotGuard(
        f"s3://{bucket}/run", every_n_steps=2, state_dir="/nonexistent", transfer=IMPATIENT
    )
    guard.restore(state)
    guard.step(2, state)
    guard._core.wait()
    proxy.fail(-1, status=500)
    guard.step(4, state)  # the upload starts and fails in the background
    guard._core.wait()
    assert guard._core.failed_saves == 1
    with pytest.raises(UploadFailed, match="background checkpoint save failed"):
        guard.step(6, state)
    proxy.heal()
    assert CheckpointStore(f"s3://{bucket}/run").latest().step == 2

    proxy.fail(-1, status=500)
    guard.step(8, state)
    with pytest.raises(UploadFailed):
        guard.close()  # a run never ends green with its last save missing


def test_sigkill_mid_upload_leaves_only_complete_checkpoints(faulty_s3, tmp_path):
    bucket, proxy = faulty_s3
    proxy.latency = 0.02  # a few hundred ms per checkpoint: kills land mid-upload
    uri = f"s3://{bucket}/killed"
    rng = random.Random(42)
    committed_before = 0
    for trial in range(4):
        process = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("save_loop.py")), "--store", uri],
            stdout=subprocess.PIPE, text=True, env=dict(os.environ),
        )  # fmt: skip
        time.sleep(rng.uniform(0.8, 2.0))
        process.send_signal(signal.SIGKILL)
        process.wait()
        store = CheckpointStore(uri)
        listed = store.list()
        assert [r.ok for r in store.verify() if r.step in {m.step for m in listed}] == [True] * len(
            listed
        )
        assert len(listed) >= committed_before, f"trial {trial}: a committed checkpoint vanished"
        committed_before = len(listed)
        if listed:
            sink = io.BytesIO()
            store.fetch(store.latest(), "state.bin", sink)  # the newest complete one loads
    assert committed_before >= 1
    uncommitted = [r for r in CheckpointStore(uri).verify() if not r.ok]
    assert all("never committed" in r.problem for r in uncommitted)
