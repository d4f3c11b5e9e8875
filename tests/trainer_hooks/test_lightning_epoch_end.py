"""A stop at the last batch of an epoch, in a real Lightning run: SIGUSR1, exit 75, the same
command again, and the run trains every step once and ends bit-exact with an uninterrupted
one; also when a second stop comes later in the epoch resumed into.

Before the fix, with torchdata's ``StatefulDataLoader`` the resumed run trained no batch in
the next epoch and still exited 0 (the restored iterator was the saved, exhausted epoch's);
with a plain ``DataLoader`` that epoch drew another order; and after an epoch-end resume the
epoch's progress counters stayed one behind, so a second stop in it redid the epoch from its
start (spotguard's ``ResumableDataLoader`` included).
"""

from __future__ import annotations

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
#: 3 epochs of 12 steps (per rank); periodic saves off the epochs' ends.
STEPS, EVERY = 36, "10"


def fit(folder: Path, loader: str, devices: int, out: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), "--loader", loader, "--devices", str(devices), "--every",
         EVERY, "--store", str(folder / "store"), "--root", str(folder / "root"), "--out",
         str(out), *extra],
        env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


_references: dict[tuple[str, int], Path] = {}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The uninterrupted run's final weights, per (loader, devices), run once."""

    def final(loader: str, devices: int) -> Path:
        if (loader, devices) not in _references:
            folder = tmp_path_factory.mktemp(f"reference-{loader}-{devices}")
            process = fit(folder, loader, devices, folder / "final.pt")
            assert process.wait(300) == 0, process.stderr.read()[-3000:]  # type: ignore[union-attr]
            _references[loader, devices] = folder / "final.pt"
        return _references[loader, devices]

    return final


def stop(folder: Path, loader: str, devices: int, signal_at: int, lands_at: int) -> None:
    """Run (resuming if the store holds a checkpoint) until step ``signal_at``, SIGUSR1 to the
    last rank, and expect exit 75 with an emergency checkpoint at ``lands_at``."""
    progress, go = folder / "progress", folder / "go"
    go.unlink(missing_ok=True)
    rank0 = fit(folder, loader, devices, folder / "unused.pt", "--progress", str(progress),
                "--pause-at", str(signal_at), "--go-file", str(go))  # fmt: skip

    def reached_or_ended() -> bool:
        return steps_done(progress) >= signal_at or rank0.poll() is not None

    wait_for(reached_or_ended, timeout=180, what=f"step {signal_at}")
    assert rank0.poll() is None, f"the run ended before step {signal_at}: {steps_done(progress)}"
    ranks = [rank0.pid] + [child.pid for child in psutil.Process(rank0.pid).children()]
    os.kill(ranks[-1], signal.SIGUSR1)
    go.touch()
    assert rank0.wait(120) == 75, rank0.stderr.read()[-3000:]  # type: ignore[union-attr]
    latest = CheckpointStore(str(folder / "store")).latest()
    assert (latest.kind, latest.step) == ("emergency", lands_at)


@pytest.mark.parametrize(
    ("loader", "devices", "stops"),
    [
        # (signalled at, lands at): one process stops at the step signalled; 2 ranks agree on
        # the stop one step later, so they are signalled a step before the epoch's last batch
        pytest.param("stateful", 1, [(12, 12)], id="stateful"),
        pytest.param("stateful", 1, [(24, 24), (29, 29)], id="stateful-then-mid-epoch"),
        pytest.param("plain", 1, [(12, 12)], id="plain"),
        pytest.param("resumable", 1, [(12, 12), (17, 17)], id="resumable-then-mid-epoch"),
        pytest.param("stateful", 2, [(11, 12)], id="stateful-ddp"),
    ],
)
def test_a_stop_at_an_epochs_last_batch_resumes_every_step_bit_exact(
    tmp_path, reference, loader, devices, stops
):
    for signal_at, lands_at in stops:
        stop(tmp_path, loader, devices, signal_at, lands_at)
    out, progress = tmp_path / "final.pt", tmp_path / "progress"
    process = fit(tmp_path, loader, devices, out, "--progress", str(progress))
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    steps = [int(line) for line in progress.read_text().split()]
    assert steps == list(range(1, STEPS + 1)), "the resumed run skipped or redid steps"
    at_an_epoch_end = stops[-1][1] % (STEPS // 3) == 0
    # Lightning skips that epoch's end on resume: said, not silent
    assert ("resumed at the end of epoch" in stderr) == at_an_epoch_end
    assert_same_weights(out, reference(loader, devices))
