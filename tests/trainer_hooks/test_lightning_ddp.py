"""Two DDP ranks on gloo, only rank 1 signalled: both stop at the same step, both take part in
the save, both exit 75, nobody deadlocks, and the resumed run ends bit-exact."""

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


def fit(folder: Path, out: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), "--devices", "2", "--store", str(folder / "store"),
         "--root", str(folder / "root"), "--out", str(out), *extra],
        env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ddp-reference")
    process = fit(folder, folder / "final.pt")
    assert process.wait(300) == 0, process.stderr.read()[-3000:]
    return folder / "final.pt"


def test_only_rank_1_signalled_all_ranks_stop_save_and_exit_75(tmp_path, reference):
    state_dir = tmp_path / "run-spotguard"
    agent = AgentDouble(state_dir)
    progress, go = tmp_path / "progress", tmp_path / "go"
    env = {"SPOTGUARD_STATE_DIR": str(state_dir)}
    rank0 = fit(tmp_path, tmp_path / "unused.pt", "--progress", str(progress), "--pause-at",
                "8", "--go-file", str(go), env=env)  # fmt: skip
    wait_for(lambda: steps_done(progress) >= 8, timeout=180, what="step 8")
    ranks = {message["rank"]: pid for pid, message in agent.wait_registered(2).items()}
    assert sorted(ranks) == [0, 1]
    assert ranks[0] == rank0.pid  # Lightning launched rank 1 itself: we learn its pid here
    os.kill(ranks[1], signal.SIGUSR1)
    go.touch()
    assert rank0.wait(120) == 75, rank0.stderr.read()[-3000:]
    wait_for(lambda: len(agent.exits) == 2, what="both ranks' exit messages")
    assert {pid: exit["code"] for pid, exit in agent.exits.items()} == {
        rank0.pid: 75,
        ranks[1]: 75,
    }
    agent.close()
    latest = CheckpointStore(str(tmp_path / "store")).latest()
    assert latest.step == 9  # ranks read the flags of step 8's boundary at step 9's
    assert latest.kind == "emergency"
    assert sorted(latest.files) == ["rank-1.pt", "state.pt"]

    out = tmp_path / "final.pt"
    resumed = fit(tmp_path, out, "--progress", str(progress), env=env)
    assert resumed.wait(300) == 0, resumed.stderr.read()[-3000:]
    assert_same_weights(out, reference)
