"""The training unit and ``spotguard install-units``, which puts the shipped units in place."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SYSTEMD = Path(__file__).parents[2] / "systemd"
TRAINING = SYSTEMD / "spotguard-training@.service"


def test_training_unit_never_restarts_a_preempted_job_on_a_dying_node():
    text = TRAINING.read_text()
    for line in (
        "RestartPreventExitStatus=75",
        "Restart=on-failure",
        "After=network-online.target spotguard-agent.service",
        "EnvironmentFile=/etc/spotguard/training-%i.env",
        "ExecStart=/bin/bash /etc/spotguard/training-%i.sh",
        "KillSignal=SIGTERM",
    ):
        assert f"\n{line}\n" in text, line
    stop = int(re.search(r"\nTimeoutStopSec=(\d+)\n", text).group(1))  # type: ignore[union-attr]
    assert 30 <= stop < 120, "time to save, within the two-minute notice"


@pytest.fixture
def instance(tmp_path: Path, systemd_analyze: str) -> Path:
    """An instance of the training unit, for ``systemd-analyze`` (fails in CI without it)."""
    shutil.copy(TRAINING, tmp_path / TRAINING.name)
    path = tmp_path / "spotguard-training@job.service"
    path.symlink_to(TRAINING.name)
    return path


def test_training_unit_verifies_clean(instance, systemd_analyze):
    done = subprocess.run(
        [systemd_analyze, "verify", str(instance)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr


def test_training_unit_is_hardened_as_far_as_a_gpu_job_allows(instance, systemd_analyze):
    done = subprocess.run(
        [systemd_analyze, "security", "--offline=yes", str(instance)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert match, done.stdout + done.stderr
    assert float(match.group(1)) <= 7.5


def install_units(dest: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spotguard", "install-units", "--dest", str(dest)],
        capture_output=True,
        text=True,
    )


def test_install_units_copies_the_shipped_units_once(tmp_path):
    dest = tmp_path / "etc" / "systemd" / "system"
    first = install_units(dest)
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == [
        f"installed {dest / 'spotguard-agent.service'}",
        f"installed {dest / 'spotguard-training@.service'}",
    ]
    for name in ("spotguard-agent.service", "spotguard-training@.service"):
        assert (dest / name).read_bytes() == (SYSTEMD / name).read_bytes()
        assert (dest / name).stat().st_mode & 0o777 == 0o644
    again = install_units(dest)
    assert again.returncode == 0
    assert again.stdout == ""  # nothing changed: the caller skips daemon-reload
    (dest / "spotguard-agent.service").write_text("edited by hand\n")
    assert install_units(dest).stdout.splitlines() == [
        f"installed {dest / 'spotguard-agent.service'}"
    ]


def test_install_units_into_an_unwritable_place_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    done = install_units(blocker / "sub")
    assert done.returncode == 2
    assert done.stderr.startswith("spotguard install-units: cannot write to")
    assert done.stderr.count("\n") == 1
