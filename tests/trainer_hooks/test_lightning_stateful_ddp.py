"""Lightning DDP (2 gloo ranks) with torchdata's StatefulDataLoader and Lightning's default
distributed sampler, as a new user writes it: only rank 1 signalled mid-run, exit 75, the same
command again, and the result is bit-exact; also with ``fit(ckpt_path="last")`` and
Lightning's own ``ModelCheckpoint`` a few steps behind the emergency save."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torchdata  # noqa: F401 - the runs' StatefulDataLoader: a dev dependency, never skipped

from spotguard.trainer_hooks import CheckpointStore
from tests.support import wait_for
from tests.trainer_hooks.test_plain_resume import assert_same_weights, steps_done

SCRIPT = Path(__file__).with_name("train_lightning_variants.py")


def fit(folder: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), "--devices", "2", "--loader", "stateful", "--store",
         str(folder / "store"), "--root", str(folder / "root"), "--out", str(out), *extra],
        env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("stateful-ddp-reference")
    process = fit(folder, folder / "final.pt")
    assert process.wait(300) == 0, process.stderr.read()[-3000:]  # type: ignore[union-attr]
    return folder / "final.pt"


def interrupt_rank_1(folder: Path, at: int, *extra: str) -> int:
    """Run until step ``at``, SIGUSR1 to rank 1 only (Lightning's launcher started it as rank
    0's child), and expect exit 75 with an emergency checkpoint past ``at``: its step."""
    progress, go = folder / "progress", folder / "go"
    rank0 = fit(folder, folder / "unused.pt", "--progress", str(progress), "--pause-at",
                str(at), "--go-file", str(go), *extra)  # fmt: skip
    wait_for(lambda: steps_done(progress) >= at, timeout=180, what=f"step {at}")
    (rank1,) = psutil.Process(rank0.pid).children()
    os.kill(rank1.pid, signal.SIGUSR1)
    go.touch()
    assert rank0.wait(120) == 75, rank0.stderr.read()[-3000:]  # type: ignore[union-attr]
    latest = CheckpointStore(str(folder / "store")).latest()
    assert latest.kind == "emergency"
    assert latest.step >= at
    return latest.step


def resume_same_command(folder: Path, *extra: str) -> tuple[dict, str]:
    out, report = folder / "final.pt", folder / "report.json"
    process = fit(folder, out, "--progress", str(folder / "progress"), "--report", str(report),
                  *extra)  # fmt: skip
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    steps = [int(line) for line in (folder / "progress").read_text().split()]
    assert steps == list(range(1, 37)), "the resumed run redid or skipped steps"
    return json.loads(report.read_text()), stderr


def test_rank_1_signalled_mid_epoch_resumes_bit_exact(tmp_path, reference):
    """Before: the resumed epoch was cut from epoch 0's order (the sampler's epoch was set
    after the restored iterator existed), and every later epoch drew another order (the inner
    sampler's generator started afresh)."""
    emergency = interrupt_rank_1(tmp_path, 17)
    report, _ = resume_same_command(tmp_path)
    assert report["resumed_from"] == emergency
    assert_same_weights(tmp_path / "final.pt", reference)


def test_ckpt_path_last_behind_the_emergency_save_resumes_from_the_store(tmp_path, reference):
    """The issue's run: Lightning's last.ckpt at step 10, the emergency checkpoint at 17 or
    later. Before: Lightning restored step 10 (7 steps redone), rank 1 took its random
    streams from the store's newer checkpoint, and resumed_from named the store's step."""
    last = ("--last-every", "10", "--ckpt-path", "last")
    emergency = interrupt_rank_1(tmp_path, 17, *last)
    report, stderr = resume_same_command(tmp_path, *last)
    assert report["resumed_from"] == emergency
    assert report["ckpt_path"].endswith(f"ckpt-{emergency:012d}")
    assert f"holds step 10, but {tmp_path / 'store'} holds a newer verified checkpoint" in stderr
    assert_same_weights(tmp_path / "final.pt", reference)
