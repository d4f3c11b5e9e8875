"""Rank resolution and the emergency budget: a guard must know which rank it is before it
acts, and must never spend more than the notice leaves."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from spotguard.errors import ConfigError
from spotguard.trainer_hooks import CheckpointStore, Preempted, SpotGuard
from tests.conftest import free_port


def test_a_torchrun_world_without_a_process_group_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    guard = SpotGuard(str(tmp_path / "store"))
    with pytest.raises(ConfigError, match=r"WORLD_SIZE=2 but torch\.distributed is not init"):
        guard.restore({})


PROCESS_GROUP_AFTER_FIRST_USE = textwrap.dedent(
    """
    import sys
    from datetime import timedelta

    import torch.distributed as dist

    from spotguard.errors import ConfigError
    from spotguard.trainer_hooks import SpotGuard

    rank = int(sys.argv[2])
    guard = SpotGuard(sys.argv[1] + f"/rank{rank}", lease_wait=5)
    guard.restore({})  # resolves "one process": no WORLD_SIZE, no process group yet
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[3]}",
                            rank=rank, world_size=2, timeout=timedelta(seconds=30))
    try:
        guard.step(1, {})
    except ConfigError as exc:
        print("refused:", exc)
        sys.exit(3)
    """
)


def test_a_process_group_made_after_the_first_use_is_refused(tmp_path):
    port = str(free_port())
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE")}
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", PROCESS_GROUP_AFTER_FIRST_USE, str(tmp_path), str(rank), port],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [rank.communicate(timeout=120)[0] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [3, 3]
    assert all("initialized after the guard's first use" in output for output in outputs)


@pytest.fixture
def state_dir(tmp_path):
    path = tmp_path / "run"
    path.mkdir()
    return path


def test_before_any_measured_save_a_state_too_big_for_the_window_keeps_the_last(
    tmp_path, state_dir, caplog
):
    """Resumed, then preempted before this run measured a save: the guard assumes a
    conservative speed instead of trying blind and overrunning the deadline."""
    uri = str(tmp_path / "store")
    state = {"weights": torch.zeros(16 * 1024 * 1024)}  # 64 MiB: ~2 s at the assumed speed
    with SpotGuard(uri, state_dir=state_dir) as first:
        first.restore(state)
        first.finish(5, state)
    guard = SpotGuard(uri, state_dir=state_dir, default_budget=1.5, safety_margin=1.0)
    assert guard.restore(state) == 5
    os.kill(os.getpid(), signal.SIGUSR1)
    with pytest.raises(Preempted) as caught:
        guard.step(6, state)
    assert caught.value.saved is False
    assert CheckpointStore(uri).latest().step == 5
    assert "no save measured yet" in caplog.text


def test_with_nothing_to_fall_back_on_the_emergency_save_is_tried_anyway(
    tmp_path, state_dir, caplog
):
    uri = str(tmp_path / "store")
    state = {"weights": torch.zeros(16 * 1024 * 1024)}
    guard = SpotGuard(uri, state_dir=state_dir, default_budget=1.5, safety_margin=1.0)
    guard.restore(state)
    os.kill(os.getpid(), signal.SIGUSR1)
    with pytest.raises(Preempted) as caught:
        guard.step(3, state)
    assert caught.value.saved is True
    assert CheckpointStore(uri).latest().step == 3
    assert "no checkpoint to fall back on: trying" in caplog.text


def test_a_bare_signals_budget_runs_from_the_signal_not_from_the_save(tmp_path, state_dir, caplog):
    """SIGTERM gives ``default_budget`` seconds from its arrival: time spent before the next
    step boundary is already gone (the stop agreement adds a step with several ranks)."""
    uri = str(tmp_path / "store")
    state = {"weights": torch.zeros(16)}
    guard = SpotGuard(uri, state_dir=state_dir, default_budget=3.0, safety_margin=0.0)
    guard.restore(state)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(2.0)  # the step the signal arrived in runs on
    with pytest.raises(Preempted):
        guard.step(1, state)
    left = float(re.search(r"at step 1; (-?[\d.]+) s left", caplog.text).group(1))
    assert left <= 1.0


GROUP_TIMEOUT = textwrap.dedent(
    """
    import sys
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from spotguard.trainer_hooks import SpotGuard

    dist.init_process_group("gloo", timeout=timedelta(seconds=42))
    guard = SpotGuard(sys.argv[1], state_dir="/none")
    guard.restore({})
    group = guard._core.ranks._group
    print(group._get_backend(torch.device("cpu")).options._timeout.total_seconds())
    guard.close()
    dist.destroy_process_group()
    """
)


def test_the_agreement_group_gives_up_when_the_jobs_collectives_do(tmp_path):
    """Not after torch's 30-minute default for a new group: a peer that vanished without a
    TCP reset would hold every rank's exit 75 that long."""
    port = str(free_port())
    world = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", GROUP_TIMEOUT, str(tmp_path / "store")],
            env={**os.environ, **world, "RANK": str(rank)},
            stdout=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [rank.communicate(timeout=120)[0] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0]
    assert [float(output.split()[-1]) for output in outputs] == [42.0, 42.0]
