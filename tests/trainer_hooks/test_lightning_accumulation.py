"""Gradient accumulation (``accumulate_grad_batches=4``) in real Lightning runs.

Lightning calls ``on_train_batch_end`` after every micro-batch, with ``global_step`` unchanged
inside a window, and no checkpoint holds the accumulated ``.grad``: a checkpoint taken inside a
window resumes with the optimizer stepping on the rest of the window only. Every save, stop and
periodic alike, must land where an optimizer step just ran.

12 micro-batches per epoch, 3 optimizer steps per epoch, 9 in all; micro-batch 5 of the first
epoch is the second of the second window (``global_step`` 1): its window ends at micro-batch 7,
with step 2.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

from spotguard.protocol import Notice, write_notice
from spotguard.trainer_hooks import CheckpointStore
from tests.support import wait_for
from tests.trainer_hooks.test_plain_resume import assert_same_weights

SCRIPT = Path(__file__).with_name("train_lightning.py")
MICRO_BATCHES = 36  # 3 epochs of 12


def fit(store: Path, folder: Path, out: Path, *extra: str, env: dict | None = None):
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), "--accumulate", "4", "--store", str(store), "--root",
         str(folder / "root"), "--out", str(out), *extra],
        env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def micro_batches(progress: Path) -> list[int]:
    """``global_step`` after each micro-batch the runs recorded."""
    return [int(line) for line in progress.read_text().split()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("accumulation-reference")
    process = fit(folder / "store", folder, folder / "final.pt")
    assert process.wait(180) == 0, process.stderr.read()[-3000:]
    return folder / "final.pt"


def test_a_stop_inside_a_window_is_taken_at_its_end_and_resumes_bit_exact(tmp_path, reference):
    progress, ready = tmp_path / "progress", tmp_path / "ready"
    first = fit(tmp_path / "store", tmp_path, tmp_path / "unused.pt", "--progress",
                str(progress), "--pause-at-batch", "5", "--ready-file", str(ready))  # fmt: skip
    wait_for(ready.exists, timeout=120, what="micro-batch 5")
    first.send_signal(signal.SIGUSR1)
    assert first.wait(60) == 75, first.stderr.read()[-3000:]
    # The window was finished (micro-batches 6 and 7), then saved at its optimizer step.
    assert micro_batches(progress) == [0, 0, 0, 1, 1, 1, 1, 2]
    store = CheckpointStore(str(tmp_path / "store"))
    assert [(m.step, m.kind) for m in store.list()] == [(2, "emergency")]  # none mid-window

    out = tmp_path / "final.pt"
    second = fit(tmp_path / "store", tmp_path, out, "--progress", str(progress))
    assert second.wait(180) == 0, second.stderr.read()[-3000:]
    assert len(micro_batches(progress)) == MICRO_BATCHES, "micro-batches redone or skipped"
    assert_same_weights(out, reference)


def test_a_save_asked_for_inside_a_window_waits_for_its_end(tmp_path, reference):
    """A rebalance recommendation (an early periodic save) arriving inside a window: the
    checkpoint is taken at the window's optimizer step, and a run resumed from it (as a
    replacement would, had the instance gone right after) ends bit-exact."""
    state_dir, ready = tmp_path / "state", tmp_path / "ready"
    state_dir.mkdir(parents=True)
    run = fit(tmp_path / "store", tmp_path, tmp_path / "unused.pt", "--every", "100",
              "--pause-at-batch", "5", "--hold-for", "rebalance", "--ready-file", str(ready),
              env={"SPOTGUARD_STATE_DIR": str(state_dir)})  # fmt: skip
    wait_for(ready.exists, timeout=120, what="micro-batch 5")
    now = datetime.now(timezone.utc)
    write_notice(state_dir, Notice("rebalance-recommendation", "none", None, now, f"k{now}"))
    assert run.wait(180) == 0, run.stderr.read()[-3000:]
    store = CheckpointStore(str(tmp_path / "store"))
    assert [(m.step, m.kind) for m in store.list()] == [(2, "periodic"), (9, "final")]

    alone = tmp_path / "only-the-periodic"
    shutil.copytree(tmp_path / "store" / "ckpt-000000000002", alone / "ckpt-000000000002")
    out = tmp_path / "final.pt"
    resumed = fit(alone, tmp_path / "resumed", out)
    assert resumed.wait(180) == 0, resumed.stderr.read()[-3000:]
    assert_same_weights(out, reference)
