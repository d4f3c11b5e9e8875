"""SpotGuard's workers under torch's real elastic launcher (``torchrun``), on one node.

A notice on the node means the node goes away: its workers save and exit 75, and torchrun's
agent must not take that for a failure to recover from (it would restart the workers on the
dying node and rejoin the rendezvous). The workers stop it first (``.launcher``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from contextlib import suppress
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psutil
import pytest

from spotguard.protocol import Notice, write_notice
from spotguard.trainer_hooks import CheckpointStore
from spotguard.trainer_hooks._internals.launcher import _is_torchrun
from tests.conftest import free_port
from tests.support import wait_for
from tests.trainer_hooks.test_plain_resume import steps_done

TRAIN = Path(__file__).with_name("train_plain.py")


def launch(tmp_path: Path, state_dir: Path, *torchrun: str) -> subprocess.Popen[str]:
    """torchrun (``python -m torch.distributed.run``) with two train_plain.py workers."""
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node",
         "2", "--max-restarts", "3", "--monitor-interval", "0.2", "--rdzv-backend", "c10d",
         "--rdzv-endpoint", f"127.0.0.1:{free_port()}", *torchrun, str(TRAIN), "--ddp",
         "--store", str(tmp_path / "store"), "--out", str(tmp_path / "final.pt"), "--progress",
         str(tmp_path / "progress"), "--epochs", "100", "--every", "1000", "--step-sleep",
         "0.05"],
        env={**os.environ, "SPOTGUARD_STATE_DIR": str(state_dir)},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip


def workers(launcher: psutil.Process) -> list[psutil.Process]:
    """The launcher's live (not zombie) child processes."""
    found = []
    for child in launcher.children():
        with suppress(psutil.NoSuchProcess):
            if child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
    return found


def test_a_notice_stops_torchruns_agent_before_its_workers_leave(tmp_path):
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    process = launch(tmp_path, state_dir)
    try:
        launcher = psutil.Process(process.pid)
        wait_for(lambda: steps_done(tmp_path / "progress") >= 3, timeout=90, what="step 3")
        first = {worker.pid for worker in workers(launcher)}
        assert len(first) == 2
        now = datetime.now(timezone.utc)
        write_notice(state_dir, Notice("spot-interruption", "terminate",
                                       now + timedelta(seconds=120), now, key="k1"))  # fmt: skip
        # Both workers save and leave; their agent, stopped, never reaps or replaces them.
        wait_for(lambda: not workers(launcher), timeout=60, what="the workers to exit")
        latest = CheckpointStore(str(tmp_path / "store")).latest()
        assert latest is not None
        assert latest.kind == "emergency"
        assert launcher.status() == psutil.STATUS_STOPPED
        zombies = {child.pid for child in launcher.children()}
        assert zombies == first  # not reaped: the agent has not seen them exit
    finally:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["/venv/bin/python", "/venv/bin/torchrun", "--nnodes", "2", "train.py"], True),
        (["/usr/bin/python3", "-u", "-m", "torch.distributed.run", "train.py"], True),
        (["torchrun", "train.py"], True),
        (["/venv/bin/python", "train.py", "--launcher", "torchrun"], False),
        (["/venv/bin/python", "-m", "my.torch.distributed.run"], False),
        (["/venv/bin/python", "torch.distributed.run"], False),
        ([], False),
    ],
)
def test_torchrun_is_known_by_its_command_line(argv, expected):
    assert _is_torchrun(argv) is expected
