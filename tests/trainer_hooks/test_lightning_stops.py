"""Stops that arrive off the training batch, in real Lightning runs with real signals.

Lightning runs ``prepare_data`` before any callback hook, installs its own SIGTERM handler
(exit code 0, no checkpoint) just before the sanity check, and a long validation would run to
its end before a stop checked only after training batches is seen. Every stop must end in exit
code 75: with an emergency save when something was trained, within one validation batch during
validation, and on every rank alike.

The validation runs (``--val-batches 6``) have a sanity check of 2 batches and a validation of
6 batches at the end of each 12-step epoch.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from spotguard.trainer_hooks import CheckpointStore
from tests.support import wait_for
from tests.trainer_hooks.agent_double import AgentDouble
from tests.trainer_hooks.test_plain_resume import assert_same_weights, steps_done

SCRIPT = Path(__file__).with_name("train_lightning.py")
VALIDATED = ("--val-batches", "6")


#: The agent's end of the registration socket, one per state dir, for the test running.
AGENTS: dict[Path, AgentDouble] = {}


@pytest.fixture(autouse=True)
def _close_agents():
    yield
    while AGENTS:
        AGENTS.popitem()[1].close()


def agent_of(folder: Path) -> AgentDouble:
    state_dir = folder / "state"
    if state_dir not in AGENTS:
        AGENTS[state_dir] = AgentDouble(state_dir)
    return AGENTS[state_dir]


def fit(folder: Path, out: Path, *extra: str) -> subprocess.Popen:
    state_dir = agent_of(folder).path.parent
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), "--store", str(folder / "store"), "--root",
         str(folder / "root"), "--out", str(out), *extra],
        env={**os.environ, "SPOTGUARD_STATE_DIR": str(state_dir)}, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip


def exit_code(process: subprocess.Popen, timeout: float) -> int:
    """The run's exit code; a run (with its DDP ranks) still going after ``timeout`` is a
    hang: ended, and the test fails."""
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
        pytest.fail(f"the run hung: {process.stderr.read()[-3000:]}")


def held(folder: Path, *extra: str) -> subprocess.Popen:
    """A run holding where ``extra`` says, once it is there."""
    ready = folder / "ready"
    process = fit(folder, folder / "unused.pt", "--ready-file", str(ready), *extra)
    try:
        wait_for(lambda: ready.exists() or process.poll() is not None, timeout=180, what="the hold")
    except BaseException:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    assert process.poll() is None, process.stderr.read()[-3000:]
    return process


def val_batches(progress: Path) -> list[tuple[int, int]]:
    """(global step, batch index) of each validation batch rank 0 ran."""
    lines = progress.read_text().splitlines() if progress.exists() else []
    return [(int(step), int(batch)) for step, batch in (line.split() for line in lines)]


def exit_codes(folder: Path, ranks: int) -> list[int]:
    """The exit codes the ranks told the agent (each says it just before it leaves)."""
    exits = agent_of(folder).exits
    wait_for(lambda: len(exits) >= ranks, what=f"{ranks} exit message(s)")
    return sorted(message["code"] for message in exits.values())


def assert_gave_everything_back(folder: Path) -> None:
    """No registration left with the agent, and the writer lease free for the replacement."""
    agent = agent_of(folder)
    wait_for(lambda: not agent.registered, what="every registration to end")
    store = CheckpointStore(str(folder / "store"))
    store.hold(ttl=5.0, wait=0.0)  # raises while another writer holds it
    store.release()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run with validation (validation draws from the random streams)."""
    folder = tmp_path_factory.mktemp("validated-reference")
    process = fit(folder, folder / "final.pt", *VALIDATED)
    assert exit_code(process, 180) == 0, process.stderr.read()[-3000:]
    return folder / "final.pt"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["sigterm", "sigusr1"])
def test_a_stop_during_prepare_data_exits_75(tmp_path, signum):
    """Before any callback hook: nothing trained, nothing to save (was 143 and -10)."""
    process = held(tmp_path, "--hold-in", "prepare_data")
    process.send_signal(signum)
    assert exit_code(process, 60) == 75, process.stderr.read()[-3000:]
    assert CheckpointStore(str(tmp_path / "store")).list() == []


def test_a_stop_during_the_sanity_check_exits_75_at_once_without_a_save(tmp_path, reference):
    """Lightning's own handler would end the run with 0; nothing was trained yet, so nothing is
    saved, and the replacement starts afresh and ends bit-exact."""
    progress = tmp_path / "val-progress"
    process = held(tmp_path, *VALIDATED, "--val-progress", str(progress), "--hold-in", "sanity")
    process.send_signal(signal.SIGTERM)
    assert exit_code(process, 60) == 75, process.stderr.read()[-3000:]
    assert val_batches(progress) == [(0, 0)]  # the second sanity batch never ran
    assert CheckpointStore(str(tmp_path / "store")).list() == []
    assert exit_codes(tmp_path, 1) == [75]
    assert_gave_everything_back(tmp_path)

    out = tmp_path / "final.pt"
    replacement = fit(tmp_path, out, *VALIDATED)
    assert exit_code(replacement, 180) == 0, replacement.stderr.read()[-3000:]
    assert_same_weights(out, reference)


def test_a_stop_during_validation_is_taken_within_one_batch_and_resumes_bit_exact(
    tmp_path, reference
):
    progress, val_progress = tmp_path / "progress", tmp_path / "val-progress"
    process = held(tmp_path, *VALIDATED, "--progress", str(progress), "--val-progress",
                   str(val_progress), "--hold-in", "validation", "--pause-at", "12")  # fmt: skip
    process.send_signal(signal.SIGUSR1)
    assert exit_code(process, 60) == 75, process.stderr.read()[-3000:]
    assert [b for b in val_batches(val_progress) if b[0] == 12] == [(12, 0)]
    assert steps_done(progress) == 12
    latest = CheckpointStore(str(tmp_path / "store")).latest()
    # A periodic save deferred to step 12 (its predecessor still uploading on a busy machine)
    # may have committed first: the emergency then has nothing to add. Either way, step 12.
    assert latest.step == 12
    assert latest.kind in ("emergency", "periodic")
    assert exit_codes(tmp_path, 1) == [75]

    out = tmp_path / "final.pt"
    resumed = fit(tmp_path, out, *VALIDATED, "--progress", str(progress))
    assert exit_code(resumed, 180) == 0, resumed.stderr.read()[-3000:]
    assert [int(line) for line in progress.read_text().split()] == list(range(1, 37))
    assert_same_weights(out, reference)


# -- two DDP ranks on gloo --------------------------------------------------------------------


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ddp-validated-reference")
    process = fit(folder, folder / "final.pt", "--devices", "2", *VALIDATED)
    assert exit_code(process, 300) == 0, process.stderr.read()[-3000:]
    return folder / "final.pt"


def test_ddp_rank_1_terminated_during_validation_every_rank_saves_and_exits_75(
    tmp_path, ddp_reference
):
    """Every rank agrees after the same validation batch, both take part in the save. SIGTERM:
    Lightning's own handler, had it stayed installed, would broadcast from inside it (a
    deadlock when only rank 1 is signalled)."""
    go, val_progress = tmp_path / "go", tmp_path / "val-progress"
    rank0 = held(tmp_path, "--devices", "2", *VALIDATED, "--val-progress", str(val_progress),
                 "--hold-in", "validation", "--pause-at", "12", "--go-file", str(go))  # fmt: skip
    registrations = agent_of(tmp_path).wait_registered(2)
    rank1_pid = next(pid for pid, message in registrations.items() if message["rank"] == 1)
    os.kill(rank1_pid, signal.SIGTERM)
    go.touch()
    assert exit_code(rank0, 120) == 75, rank0.stderr.read()[-3000:]
    assert exit_codes(tmp_path, 2) == [75, 75]
    assert [b for b in val_batches(val_progress) if b[0] == 12] == [(12, 0)]
    latest = CheckpointStore(str(tmp_path / "store")).latest()
    # As with one process (above): a periodic save deferred to step 12 may have committed
    # first on a busy machine (CI's two xdist workers did), and the emergency then has nothing
    # to add. Either way, step 12, with both ranks' files.
    assert latest.step == 12
    assert latest.kind in ("emergency", "periodic")
    assert sorted(latest.files) == ["rank-1.pt", "state.pt"]

    out = tmp_path / "final.pt"
    resumed = fit(tmp_path, out, "--devices", "2", *VALIDATED)
    assert exit_code(resumed, 300) == 0, resumed.stderr.read()[-3000:]
    assert_same_weights(out, ddp_reference)


def test_ddp_stop_during_prepare_data_is_agreed_before_training(tmp_path):
    """Only local rank 0 runs ``prepare_data`` while the others wait in Lightning's barrier: a
    rank leaving there alone would strand them. The stop is kept until every rank can agree
    on it, before the first training step; then all exit 75 with nothing to save."""
    progress, go = tmp_path / "progress", tmp_path / "go"
    rank0 = held(tmp_path, "--devices", "2", "--hold-in", "prepare_data", "--go-file", str(go),
                 "--progress", str(progress))  # fmt: skip
    rank0.send_signal(signal.SIGTERM)
    go.touch()
    assert exit_code(rank0, 120) == 75, rank0.stderr.read()[-3000:]
    assert exit_codes(tmp_path, 2) == [75, 75]
    assert not progress.exists()  # no training step ran
    assert CheckpointStore(str(tmp_path / "store")).list() == []
    assert_gave_everything_back(tmp_path)


# -- in-process --------------------------------------------------------------------------------


@pytest.mark.parametrize("fails", [False, True], ids=["finished", "failed"])
def test_the_signals_go_back_to_their_owners_after_fit(tmp_path, fails):
    """SpotCheckpoint holds SIGTERM and SIGUSR1 from its construction: once ``fit`` is over,
    however it ended, they are the handlers from before again, and a later SIGTERM is not
    swallowed."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.demos.boring_classes import BoringModel

    from spotguard.trainer_hooks.lightning import SpotCheckpoint

    class Failing(BoringModel):
        def training_step(self, batch, batch_idx):
            if fails:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    def own(signum: int, frame: object) -> None:
        """A handler the program had before."""

    before = {signum: signal.signal(signum, own) for signum in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        spot = SpotCheckpoint(str(tmp_path / "store"), state_dir=str(tmp_path / "none"))
        assert signal.getsignal(signal.SIGTERM) is not own
        trainer = Trainer(
            max_steps=2, callbacks=[spot], logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        )  # fmt: skip
        if fails:
            with pytest.raises(RuntimeError, match="boom"):
                trainer.fit(Failing())
        else:
            trainer.fit(Failing())
        assert signal.getsignal(signal.SIGTERM) is own
        assert signal.getsignal(signal.SIGUSR1) is own
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
