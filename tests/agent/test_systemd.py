"""The unit file passes systemd's own checks: verify clean, exposure at most 3.5."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).parents[2] / "systemd" / "spotguard-agent.service"


@pytest.fixture
def unit(tmp_path: Path, systemd_analyze: str) -> Path:
    """The shipped unit, with ExecStart pointing at this environment's spotguard (tests
    using it need ``systemd-analyze``: they fail in CI without it, skip elsewhere)."""
    executable = Path(sys.executable).with_name("spotguard")
    text = UNIT.read_text().replace("/usr/local/bin/spotguard", str(executable))
    path = tmp_path / UNIT.name
    path.write_text(text)
    return path


def test_unit_declares_what_the_agent_relies_on():
    text = UNIT.read_text()
    for line in ("Type=notify", "Restart=always", "RuntimeDirectory=spotguard",
                 "RuntimeDirectoryMode=0755", "RuntimeDirectoryPreserve=yes",
                 "AmbientCapabilities=CAP_KILL",
                 # the registration socket
                 "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX"):  # fmt: skip
        assert f"\n{line}\n" in text, line
    assert re.search(r"\nWatchdogSec=\d+\n", text)


def test_systemd_analyze_verify_is_clean(unit, systemd_analyze):
    result = subprocess.run(
        [systemd_analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_exposure_is_at_most_3_5(unit, systemd_analyze):
    result = subprocess.run(
        [systemd_analyze, "security", "--offline=yes", str(unit)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 3.5
