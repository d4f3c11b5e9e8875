"""Target discovery details that need no agent: cgroups, process trees, signalling."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest

from spotguard.agent.processes import identity
from spotguard.agent.targets import Target, TargetFinder, is_running, send_signal, units_of


def test_units_are_read_from_cgroup_v1_and_v2(tmp_path):
    (tmp_path / "10").mkdir()
    (tmp_path / "10" / "cgroup").write_text("0::/system.slice/spotguard-training@run42.service\n")
    (tmp_path / "11").mkdir()
    (tmp_path / "11" / "cgroup").write_text(
        "12:pids:/user.slice\n1:name=systemd:/user.slice/user-1000.slice/session-3.scope\n"
    )
    assert units_of(10, tmp_path) == ["spotguard-training@run42.service"]
    assert units_of(11, tmp_path) == ["session-3.scope"]
    assert units_of(12, tmp_path) == []


def test_unit_selector_matches_globs_via_proc(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / str(child.pid)).mkdir()
        (tmp_path / str(child.pid) / "cgroup").write_text(
            "0::/system.slice/spotguard-training@x.service\n"
        )
        finder = TargetFinder(units=("spotguard-training@*.service",), proc_root=tmp_path)
        targets = finder.find()
        assert [t.pid for t in targets] == [child.pid]
        assert targets[0].source == "unit:spotguard-training@*.service"
    finally:
        child.kill()
        child.wait()


def test_pattern_selects_the_topmost_process_not_its_workers(tmp_path):
    script = (
        "import multiprocessing as mp, time\n"
        "def work():\n    time.sleep(30)\n"
        "if __name__ == '__main__':\n"
        "    mp.set_start_method('fork'); p = mp.Process(target=work); p.start()\n"
        "    time.sleep(30)\n"
    )
    path = tmp_path / "topmost_trainer.py"
    path.write_text(script)
    parent = subprocess.Popen([sys.executable, str(path)])
    try:
        deadline = time.monotonic() + 10
        while not psutil.Process(parent.pid).children() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert psutil.Process(parent.pid).children(), "the worker did not start"
        targets = TargetFinder(patterns=("topmost_trainer",)).find()
        assert [t.pid for t in targets] == [parent.pid]
    finally:
        for child in psutil.Process(parent.pid).children():
            child.kill()
        parent.kill()
        parent.wait()


def test_signal_refuses_a_recycled_pid():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        real = identity(child.pid)
        pid, ticks, boot = real.split("@")
        for impostor in (f"{pid}@{int(ticks) - 100}@{boot}", f"{pid}@{ticks}@another-boot"):
            assert not is_running(Target(child.pid, impostor, "SIGTERM", "pattern:x"))
            with pytest.raises(psutil.NoSuchProcess):
                send_signal(Target(child.pid, impostor, "SIGTERM", "pattern:x"))
        assert child.poll() is None
        send_signal(Target(child.pid, real, "SIGTERM", "pattern:x"))
        assert child.wait(10) == -15
        assert not is_running(Target(child.pid, real, "SIGTERM", "pattern:x"))
    finally:
        child.kill()
        child.wait()
