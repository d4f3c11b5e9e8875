"""SpotCheckpoint in real Lightning runs (both import styles): signals, exit 75, bit-exact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spotguard.trainer_hooks import CheckpointStore
from tests.support import wait_for
from tests.trainer_hooks.test_plain_resume import assert_same_weights, steps_done

SCRIPT = Path(__file__).with_name("train_lightning.py")
PACKAGES = ["pytorch_lightning", "lightning.pytorch"]


def fit(package: str, folder: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), "--package", package, "--store", str(folder / "store"),
         "--root", str(folder / "root"), "--out", str(out), *extra],
        env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


@pytest.fixture(scope="module", params=PACKAGES)
def reference(request, tmp_path_factory) -> tuple[str, Path]:
    folder = tmp_path_factory.mktemp("reference")
    process = fit(request.param, folder, folder / "final.pt")
    assert process.wait(180) == 0, process.stderr.read()
    return request.param, folder / "final.pt"


@pytest.mark.parametrize(
    ("stop_at", "signum"),
    [(7, signal.SIGUSR1), (24, signal.SIGTERM)],
    ids=["mid-epoch-sigusr1", "epoch-boundary-sigterm"],
)
def test_fit_interrupted_and_resumed_is_bit_exact(tmp_path, reference, stop_at, signum):
    package, reference_weights = reference
    progress = tmp_path / "progress"
    first = fit(package, tmp_path, tmp_path / "unused.pt", "--progress", str(progress),
                "--pause-at", str(stop_at))  # fmt: skip
    wait_for(lambda: steps_done(progress) >= stop_at, timeout=120, what=f"step {stop_at}")
    first.send_signal(signum)
    assert first.wait(60) == 75, first.stderr.read()  # never Lightning's exit 0
    latest = CheckpointStore(str(tmp_path / "store")).latest()
    assert latest.step == stop_at
    assert latest.kind == "emergency"
    # Lightning's own ModelCheckpoint (on by default, keeps the last epoch-end file) kept its
    # schedule: nothing extra was written because of the preemption. Stopping at the last
    # batch of an epoch comes before that epoch's end-of-epoch save.
    own = sorted(p.name for p in (tmp_path / "root" / "checkpoints").glob("*.ckpt"))
    finished = (stop_at - 1) // 12
    assert own == ([f"epoch={finished - 1}-step={12 * finished}.ckpt"] if finished else [])

    out = tmp_path / "final.pt"
    second = fit(package, tmp_path, out, "--progress", str(progress))  # same fit() call
    assert second.wait(180) == 0, second.stderr.read()
    assert_same_weights(out, reference_weights)
    steps = [int(line) for line in progress.read_text().split()]
    assert steps == list(range(1, 37)), "the resumed run redid or skipped steps"


def test_lightning_checkpoint_loads_weights_only(reference, tmp_path):
    _package, _ = reference
    store = CheckpointStore(str(reference[1].parent / "store"))
    manifest, checkpoint = store.load_state(name="state.pt")
    # The last step: the final save, or a periodic save that landed on it (then the final one
    # has nothing to add and is not written again).
    assert manifest.step == 36
    assert checkpoint["global_step"] == 36
    assert checkpoint["__spotguard__"]["step"] == 36  # spotguard's entry: step, epoch, RNG
    assert set(checkpoint["__spotguard__"]["rng"]) >= {"python", "torch", "numpy"}
    assert isinstance(checkpoint["state_dict"]["net.0.weight"], torch.Tensor)
