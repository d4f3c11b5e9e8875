"""The training unit and ``spotguard install-units``, which puts the shipped units in place."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SYSTEMD = Path(__file__).parents[2] / "systemd"
TRAINING = SYSTEMD / "spotguard-training@.service"


def _settings(text: str) -> dict[str, list[str]]:
    """Every ``Key=value`` of a unit file, in order (keys may repeat)."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


#: Signals after which systemd counts a main process as ended cleanly (systemd.service(5)).
CLEAN_SIGNALS = {"HUP", "INT", "TERM", "PIPE"}


def systemd_restarts(settings: dict[str, list[str]], code: str, status: str) -> bool:
    """systemd's rule for whether a service whose main process ended is restarted
    (systemd.service(5), Restart= table, plus Restart{Prevent,Force}ExitStatus=)."""
    (restart,) = settings["Restart"]
    prevent = " ".join(settings.get("RestartPreventExitStatus", [])).split()
    force = " ".join(settings.get("RestartForceExitStatus", [])).split()
    success = {"0", *" ".join(settings.get("SuccessExitStatus", [])).split()}
    if status in prevent:
        return False
    if status in force:
        return True
    clean = (code == "exited" and status in success) or (
        code == "killed" and status in CLEAN_SIGNALS
    )
    return {"always": True, "no": False, "on-success": clean, "on-failure": not clean}[restart]


def test_training_unit_wiring():
    settings = _settings(TRAINING.read_text())
    assert settings["EnvironmentFile"] == ["/etc/spotguard/training-%i.env"]
    assert settings["ExecStart"] == ["/bin/bash /etc/spotguard/training-%i.sh"]
    assert settings["After"] == ["network-online.target spotguard-agent.service"]
    assert settings["KillSignal"] == ["SIGTERM"]
    # Every end of the process is judged (as root: it may power the node off) ...
    assert settings["ExecStopPost"] == ["+/usr/local/bin/spotguard fleet job-end %i"]
    # ... and every start waits until no notice that stops training is active, for as long
    # as a maintenance window lasts; systemd's start limit never ends the restarts itself.
    # The GPU's UVM module is loaded as root first: the hardened job may not load modules.
    assert settings["ExecStartPre"] == [
        "+/bin/sh -c 'if command -v nvidia-modprobe >/dev/null; then nvidia-modprobe -u -c=0; fi'",
        "/usr/local/bin/spotguard fleet wait-clear",
    ]
    assert settings["TimeoutStartSec"] == ["infinity"]
    assert settings["StartLimitIntervalSec"] == ["0"]
    assert settings["StateDirectory"] == ["spotguard"]
    stop = int(re.search(r"\nTimeoutStopSec=(\d+)\n", TRAINING.read_text()).group(1))  # type: ignore[union-attr]
    assert 30 <= stop < 120, "time to save, within the two-minute notice"


@pytest.mark.parametrize(
    ("code", "status", "restarted", "why"),
    [
        ("exited", "0", False, "finished: job-end sets the fleet to 0 and powers off"),
        ("exited", "75", True, "preempted: back once wait-clear lets it (maintenance over)"),
        ("exited", "1", True, "a failure: again, until job-end has counted max_failures"),
        ("killed", "SEGV", True, "a crash is a failure"),
        ("killed", "KILL", True, "the OOM killer is a failure"),
        ("dumped", "ABRT", True, "a core dump is a failure"),
    ],
)
def test_training_unit_restart_policy_for_each_exit(code, status, restarted, why):
    assert systemd_restarts(_settings(TRAINING.read_text()), code, status) is restarted, why


def test_the_restart_model_knows_the_old_bug():
    """The rule above, applied to the unit as it was: exit 75 was never restarted, so a
    maintenance event without a reboot left the node idle (issue 14, item 9)."""
    old = {"Restart": ["on-failure"], "RestartPreventExitStatus": ["75"]}
    assert systemd_restarts(old, "exited", "75") is False
    assert systemd_restarts(old, "exited", "1") is True


@pytest.fixture
def instance(tmp_path: Path, systemd_analyze: str) -> Path:
    """An instance of the training unit, for ``systemd-analyze`` (fails in CI without it),
    with its commands pointing at this environment's spotguard (verify checks they exist)."""
    executable = Path(sys.executable).with_name("spotguard")
    text = TRAINING.read_text().replace("/usr/local/bin/spotguard", str(executable))
    (tmp_path / TRAINING.name).write_text(text)
    path = tmp_path / "spotguard-training@job.service"
    path.symlink_to(TRAINING.name)
    return path


def _verify(systemd_analyze: str, unit: Path) -> None:
    done = subprocess.run(
        [systemd_analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr


def _exposure(systemd_analyze: str, unit: Path) -> float:
    """systemd-analyze's exposure score of ``unit`` (0 locked down ... 10 exposed)."""
    done = subprocess.run(
        [systemd_analyze, "security", "--offline=yes", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert match, done.stdout + done.stderr
    return float(match.group(1))


def test_training_unit_verifies_clean(instance, systemd_analyze):
    _verify(systemd_analyze, instance)


def test_training_unit_is_hardened_as_far_as_a_gpu_job_allows(instance, systemd_analyze):
    assert _exposure(systemd_analyze, instance) <= 7.5


RENDEZVOUS = SYSTEMD / "spotguard-rendezvous.service"


def test_rendezvous_unit_serves_until_stopped_without_privileges():
    settings = _settings(RENDEZVOUS.read_text())
    assert settings["ExecStart"] == ["/bin/bash /etc/spotguard/rendezvous.sh"]
    # Restarted whatever ended it: the job's next attempt needs a store to meet at.
    assert systemd_restarts(settings, "exited", "1") is True
    assert systemd_restarts(settings, "killed", "KILL") is True
    assert settings["StartLimitIntervalSec"] == ["0"]
    assert settings["DynamicUser"] == ["yes"]


def test_rendezvous_unit_verifies_clean_and_is_locked_down(tmp_path, systemd_analyze):
    unit = tmp_path / RENDEZVOUS.name
    unit.write_text(RENDEZVOUS.read_text())
    _verify(systemd_analyze, unit)
    assert _exposure(systemd_analyze, unit) <= 2.5  # a store needs the network, nothing else


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
    names = (
        "spotguard-agent.service",
        "spotguard-training@.service",
        "spotguard-rendezvous.service",
    )
    assert first.stdout.splitlines() == [f"installed {dest / name}" for name in names]
    for name in names:
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
