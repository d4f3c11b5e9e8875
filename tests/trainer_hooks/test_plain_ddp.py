"""SpotGuard over torch.distributed: two gloo ranks, only rank 1 signalled."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from spotguard.trainer_hooks import CheckpointStore
from tests.conftest import free_port
from tests.support import wait_for
from tests.trainer_hooks.test_plain_resume import assert_same_weights, steps_done

SCRIPT = Path(__file__).with_name("train_plain.py")


def launch(store: Path, out: Path, *extra: str, env: dict | None = None) -> list[subprocess.Popen]:
    """Both ranks, started the way torchrun would (RANK, WORLD_SIZE, MASTER_*)."""
    port = str(free_port())
    return [
        subprocess.Popen(
            [
                sys.executable,
                str(SCRIPT),
                "--ddp",
                "--store",
                str(store),
                "--out",
                str(out),
                *extra,
            ],
            env={
                **os.environ,
                **(env or {}),
                "RANK": str(rank),
                "WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            },
        )
        for rank in (0, 1)
    ]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("plain-ddp-reference")
    ranks = launch(folder / "store", folder / "final.pt")
    assert [rank.wait(180) for rank in ranks] == [0, 0]
    return folder / "final.pt"


def test_rank_1_signalled_both_ranks_save_exit_75_and_resume_bit_exact(tmp_path, reference):
    state_dir = tmp_path / "run-spotguard"
    (state_dir / "targets").mkdir(parents=True)
    progress, go, store = tmp_path / "progress", tmp_path / "go", tmp_path / "store"
    env = {"SPOTGUARD_STATE_DIR": str(state_dir)}
    ranks = launch(store, tmp_path / "unused.pt", "--progress", str(progress), "--pause-at", "17",
                   "--go-file", str(go), env=env)  # fmt: skip
    wait_for(lambda: steps_done(progress) >= 17, timeout=120, what="step 17")
    registrations = {
        json.loads(p.read_text())["rank"]: json.loads(p.read_text())["pid"]
        for p in (state_dir / "targets").glob("*.json")
    }
    assert registrations == {0: ranks[0].pid, 1: ranks[1].pid}
    ranks[1].send_signal(signal.SIGUSR1)
    go.touch()
    assert [rank.wait(120) for rank in ranks] == [75, 75]
    latest = CheckpointStore(str(store)).latest()
    assert (latest.step, latest.kind) == (17, "emergency")
    assert sorted(latest.files) == ["rank-1.pt", "state.pt"]

    ranks = launch(store, tmp_path / "final.pt", env=env)
    assert [rank.wait(180) for rank in ranks] == [0, 0]
    assert_same_weights(tmp_path / "final.pt", reference)
