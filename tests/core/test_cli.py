"""The spotguard command as an operator uses it."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from spotguard.imds.sim_control import SimControl

SPOTGUARD = [sys.executable, "-m", "spotguard"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SPOTGUARD, *args], capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip


def test_status_reports_notices_as_json(sim):
    sim.control.spot(in_seconds=90)
    result = run("status", "--config", "/dev/null", "--imds-endpoint", sim.url, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["spot-interruption"]["state"] == "notice"
    assert report["spot-interruption"]["notice"]["action"] == "terminate"
    assert report["rebalance-recommendation"] == {"state": "none"}


def test_status_plain_text(sim):
    result = run("status", "--config", "/dev/null", "--imds-endpoint", sim.url)
    assert result.returncode == 0
    assert re.search(r"spot-interruption\s+none", result.stdout)


def test_status_says_unknown_and_exits_1_when_imds_is_down(port):
    url = f"http://127.0.0.1:{port}"
    result = run("status", "--config", "/dev/null", "--imds-endpoint", url, "--json")
    assert result.returncode == 1
    assert json.loads(result.stdout)["spot-interruption"]["state"] == "unknown"


def test_usage_errors_are_one_line_exit_2():
    for args in (["agent", "--poll-interval", "soon"], ["no-such-command"], []):
        result = run(*args)
        assert result.returncode == 2, args
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_imds_sim_command_serves_until_terminated():
    process = subprocess.Popen(
        [*SPOTGUARD, "imds-sim", "--port", "0"], stdout=subprocess.PIPE, text=True
    )
    try:
        line = process.stdout.readline()
        url = re.search(r"http://\S+", line).group(0)
        control = SimControl(url)
        assert control.spot(in_seconds=120).endswith("Z")
        process.terminate()
        assert process.wait(10) == 0
    finally:
        process.kill()
