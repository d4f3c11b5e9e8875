"""Process identities (``pid@start ticks@boot id``) need no agent: read from ``/proc``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from spotguard.agent.processes import (
    boot_id,
    current_identity,
    identity,
    is_alive,
    start_ticks,
)


def fake_proc(root: Path, *, btime: int, ticks: int = 4242, boot: str = "boot-a") -> Path:
    """A ``/proc`` with one process (pid 77, a command name with spaces and parentheses)."""
    (root / "77").mkdir(parents=True, exist_ok=True)
    fields = ["S", "1"] + ["0"] * 17 + [str(ticks)] + ["0"] * 30
    (root / "77" / "stat").write_text(f"77 (my (odd) name) {' '.join(fields)}\n")
    (root / "sys" / "kernel" / "random").mkdir(parents=True, exist_ok=True)
    (root / "sys" / "kernel" / "random" / "boot_id").write_text(f"{boot}\n")
    (root / "stat").write_text(f"cpu 0 0 0 0\nbtime {btime}\n")
    return root


def test_a_wall_clock_step_does_not_change_an_identity(tmp_path):
    """The kernel's ``btime`` (boot time, derived from the wall clock) moves when the clock is
    stepped; psutil's ``create_time()`` adds it, so the former ``pid@create_time`` identities
    moved with it. Ticks since boot do not."""
    proc = fake_proc(tmp_path, btime=1_700_000_000)
    before = identity(77, proc)
    fake_proc(tmp_path, btime=1_700_003_600)  # the clock stepped one hour forward
    assert identity(77, proc) == before == "77@4242@boot-a"
    assert is_alive(before, proc)


def test_a_recycled_pid_or_another_boot_is_another_process(tmp_path):
    proc = fake_proc(tmp_path / "one", btime=0)
    assert not is_alive("77@4241@boot-a", proc)  # same pid, started at another tick
    assert not is_alive("77@4242@boot-b", proc)  # a saved identity from another boot
    assert not is_alive("78@4242@boot-a", proc)  # no such process
    assert not is_alive("garbage", proc)
    with pytest.raises(ProcessLookupError):
        start_ticks(78, proc)


def test_a_live_process_and_after_it_exited():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        who = identity(child.pid)
        assert who.split("@")[2] == boot_id() != "unknown"
        assert is_alive(who)
    finally:
        child.kill()
        child.wait()
    assert not is_alive(who)


def test_an_identity_saved_by_the_earlier_format_is_read_in_todays_form():
    """``pid@create time`` (before ticks since boot) names a live process: today's identity of
    that process is kept; a dead or another process's is dropped."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        created = psutil.Process(child.pid).create_time()
        assert current_identity(f"{child.pid}@{created:.2f}") == identity(child.pid)
        assert current_identity(f"{child.pid}@{created - 5:.2f}") is None
        assert current_identity(identity(child.pid)) == identity(child.pid)
    finally:
        child.kill()
        child.wait()
    assert current_identity(f"{child.pid}@{created:.2f}") is None
    assert current_identity("garbage") is None


def test_a_boot_id_that_could_not_be_read_is_not_kept(tmp_path):
    proc = fake_proc(tmp_path, btime=0)
    boot_file = proc / "sys" / "kernel" / "random" / "boot_id"
    boot_file.unlink()
    assert boot_id(proc) == "unknown"
    boot_file.write_text("boot-c\n")
    assert boot_id(proc) == "boot-c"
    boot_file.write_text("boot-d\n")
    assert boot_id(proc) == "boot-c"  # read once it worked: it cannot change while we run
