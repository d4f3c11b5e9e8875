"""``spotguard drill`` end to end: the real agent, real signals, real Lightning, real resume.

Each drill launches real processes (agent, training, replacement), so these tests take tens of
seconds each; what they check is the report the drill prints, which is built from what those
processes did (exit codes, the store's manifests, the weights' digests).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spotguard.trainer_hooks import CheckpointStore

# Each drill is several real training processes; a busy CI machine may take minutes.
pytestmark = pytest.mark.timeout(420)

EVENTS = [
    "notice served by IMDS",
    "agent detected it",
    "emergency save started",
    "checkpoint committed",
    "process exited with 75",
    "replacement launched",
    "first resumed step done",
]


def drill(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    done = subprocess.run(
        [sys.executable, "-m", "spotguard", "drill", *args],
        env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    return done.returncode, done.stdout, done.stderr


def assert_interruptions_held(report: dict, ranks: int) -> None:
    assert report["passed"] is True, report["failure"]
    assert report["bit_exact"] is True
    assert report["reference_sha256"] == report["final_sha256"]
    assert report["interrupted_at_step"] == report["resumed_at_step"]
    for interruption in report["interruptions"]:
        assert interruption["interrupted_at_step"] >= interruption["scheduled_at_step"]
        assert interruption["rank_exit_codes"] == [75] * ranks
        events = [entry["event"] for entry in interruption["timeline"]]
        assert [e for e in events if e in EVENTS] == EVENTS
        assert f"rank {interruption['notified_rank']} got the stop request" in events
        seconds = [entry["seconds_since_notice"] for entry in interruption["timeline"]]
        assert seconds == sorted(seconds)
        assert seconds[0] == 0.0
        assert 0 < interruption["margin"] < 120


def test_drill_single_process_local_store_json():
    code, out, err = drill("--json", "--seed", "11")
    report = json.loads(out)
    assert code == 0, err
    assert_interruptions_held(report, ranks=1)
    (interruption,) = report["interruptions"]
    assert interruption["timeline"][-1]["event"] == "training finished (exit 0)"
    assert [{**entry, "interruption": 1} for entry in interruption["timeline"]] == [
        {key: entry[key] for key in ("event", "seconds_since_notice", "interruption")}
        for entry in report["timeline"]
    ]
    assert report["exit_codes"] == [75, 0]
    assert report["final_step"] == 128
    # The drill cleans up after itself: its temporary store is gone.
    assert not Path(report["store"]).exists()


def test_drill_two_ranks_on_moto_s3_only_one_node_notified(s3, tmp_path):
    store = f"s3://{s3}/drills"
    code, out, err = drill("--json", "--ranks", "2", "--seed", "5", "--store", store)
    report = json.loads(out)
    assert code == 0, err
    assert_interruptions_held(report, ranks=2)
    assert report["exit_codes"] == [75, 0]
    assert report["store"].startswith(f"{store}/spotguard-drill-")
    assert CheckpointStore(report["store"]).list() == []  # its own prefix, removed afterwards


def test_drill_two_interruptions_text_and_html_report(tmp_path):
    chart = tmp_path / "drill.html"
    code, out, err = drill("--interruptions", "2", "--seed", "9", "--report", str(chart))
    assert code == 0, err
    assert "drill passed" in out
    assert "exit codes: 75 then 75 then 0" in out
    assert out.count("margin left to the 2-minute deadline") == 2
    page = chart.read_text()
    assert page.count("<svg") == 2
    assert "checkpoint committed" in page


def test_drill_runs_a_users_script_and_compares_its_weights(tmp_path):
    script = Path(__file__).with_name("drill_script.py")
    code, out, err = drill("--json", "--script", str(script), "--seed", "2")
    report = json.loads(out)
    assert code == 0, err + out
    assert report["workload"] == f"script {script}"
    assert report["bit_exact"] is True
    assert report["interrupted_at_step"] == report["resumed_at_step"]
    assert report["exit_codes"] == [75, 0]


# -- failure drills: the right explanation, never a hang ---------------------------------------


def test_failure_agent_cannot_reach_imds(port):
    from spotguard.drill import DrillOptions, run_drill

    options = DrillOptions(agent_imds_endpoint=f"http://127.0.0.1:{port}", seed=1)
    report = run_drill(options)
    assert not report.passed
    assert report.failed_step == "agent"
    assert f"cannot reach IMDS at http://127.0.0.1:{port}" in report.failure
    assert report.exit_codes == []  # no training was started against a deaf agent


def test_failure_store_rejects_writes(s3):
    code, out, _ = drill("--json", "--store", "s3://no-such-bucket-here/run")
    report = json.loads(out)
    assert code == 1
    assert report["failed_step"] == "store"
    assert "rejects writes" in report["failure"]
    assert "no-such-bucket-here" in report["failure"]


def test_failure_script_without_the_hooks(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("import time\nfor step in range(20):\n    time.sleep(0.01)\n")
    code, out, _ = drill("--script", str(script), "--seed", "1")
    assert code == 1
    last = out.strip().splitlines()[-1]
    assert last.startswith(
        "drill FAILED at registration: the training exited with code 0 without registering"
    )
    assert "SpotCheckpoint or SpotGuard" in last


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ranks", "0"], "ranks must be 1..8"),
        (["--interruptions", "11"], "interruptions must be 1..10"),
        (["--script", "/nonexistent/train.py"], "does not exist"),
    ],
)
def test_bad_options_are_one_line_usage_errors(args, message):
    code, _, err = drill(*args)
    assert code == 2
    assert err.strip().count("\n") == 0
    assert message in err
