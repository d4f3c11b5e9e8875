"""SpotGuard's workers under torch's real elastic launcher (``torchrun``), on one node.

A notice on the node means the node goes away: its workers save and exit 75, and torchrun's
agent must not take that for a failure to recover from (it would restart the workers on the
dying node and rejoin the rendezvous). The workers stop it first (``.launcher``); should the
node still be there once the notice's deadline and grace are past, the agent is ended so that
the job can start again (``.thaw``), once the agent no longer holds the notice.
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

from spotguard.protocol import NOTICE_GRACE_SECONDS, Notice, write_notice
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


def thaws(launcher_pid: int) -> list[psutil.Process]:
    """The thaw scripts started for ``launcher_pid`` (detached: in sessions of their own)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        argv = process.info["cmdline"] or []
        if any(arg.endswith("thaw.py") for arg in argv) and str(launcher_pid) in argv:
            found.append(process)
    return found


@pytest.mark.parametrize("deadline_in", [120, -NOTICE_GRACE_SECONDS + 25], ids=["due", "overdue"])
def test_a_notice_stops_torchruns_agent_before_its_workers_leave(tmp_path, deadline_in):
    """``due``: the node goes within the notice: the agent stays stopped (the instance goes
    with it). ``overdue``: the node is still here 25 s before the notice turns stale: once
    those 25 s are past and the agent has cleared the notice, torchrun's agent is ended (a
    signal: the rendezvous stays open) and exits."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    process = launch(tmp_path, state_dir)
    try:
        launcher = psutil.Process(process.pid)
        wait_for(lambda: steps_done(tmp_path / "progress") >= 3, timeout=90, what="step 3")
        first = {worker.pid for worker in workers(launcher)}
        assert len(first) == 2
        now = datetime.now(timezone.utc)
        deadline = now + timedelta(seconds=deadline_in)
        write_notice(state_dir, Notice("spot-interruption", "terminate", deadline, now, key="k"))
        # Both workers leave; their agent, stopped, never reaps or replaces them.
        wait_for(lambda: not workers(launcher), timeout=60, what="the workers to exit")
        assert launcher.status() == psutil.STATUS_STOPPED
        assert {child.pid for child in launcher.children()} == first  # not reaped
        (thaw,) = thaws(process.pid)
        if deadline_in > 0:
            latest = CheckpointStore(str(tmp_path / "store")).latest()
            assert latest is not None
            assert latest.kind == "emergency"
        else:  # past the deadline: no time to save; ended 25 s after the notice, once cleared
            (state_dir / "notice.json").unlink()  # what the agent does once it is over
            _, stderr = process.communicate(timeout=120)
            assert process.returncode != 0
            assert "SignalException" in stderr or "Signal 15" in stderr, stderr[-2000:]
            assert "will restart worker group" not in stderr
            thaw.wait(30)
    finally:
        with suppress(psutil.Error):  # torchrun starts its workers in sessions of their own
            for child in psutil.Process(process.pid).children(recursive=True):
                child.kill()
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)
        for thaw in thaws(process.pid):
            thaw.kill()


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


def test_the_thaw_waits_for_the_notice_to_end_then_ends_only_that_stopped_process(
    tmp_path, monkeypatch
):
    """Run in this process against a real stopped process: nothing while the notice file
    holds the notice (a maintenance window still open), then SIGTERM + SIGCONT; never a
    process whose start time differs (a recycled pid)."""
    import threading

    from spotguard.trainer_hooks._internals import thaw

    sleeper = subprocess.Popen(["sleep", "120"])
    try:
        os.kill(sleeper.pid, signal.SIGSTOP)
        ticks = thaw.proc_stat(sleeper.pid)[1]
        now = datetime.now(timezone.utc)
        notice = Notice("scheduled-maintenance", "reboot", now, now, key="e-1")
        path = write_notice(tmp_path, notice)
        thaw.main([str(sleeper.pid), str(ticks + 1), "0", str(path), "other/id"])
        assert thaw.proc_stat(sleeper.pid)[0] == "T"  # another start time: left alone
        reads = []
        holds = thaw._holds
        monkeypatch.setattr(thaw, "RECHECK_SECONDS", 0.01)
        monkeypatch.setattr(thaw, "_holds", lambda *args: reads.append(1) or holds(*args))
        ending = threading.Thread(
            target=thaw.main, args=([str(sleeper.pid), str(ticks), "0", str(path), notice.id],)
        )
        ending.start()
        wait_for(lambda: len(reads) >= 5, what="the thaw to re-read the notice")
        assert thaw.proc_stat(sleeper.pid)[0] == "T"  # the notice holds: still stopped
        path.unlink()
        ending.join(30)
        assert sleeper.wait(30) == -signal.SIGTERM
    finally:
        sleeper.kill()
        sleeper.wait()
